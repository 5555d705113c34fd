//! Configuration calls at the edge: tenants, clients, applications and pipelines go to
//! tenant-service, which validates them itself (it is the owner of those rules). Only the
//! message is forwarded, never the caller's transport headers. Each call is authorized first
//! ([`crate::authz`]).

use tonic::{Request, Response, Status};

use pm_proto::v1::auth_service_server::AuthService;
use pm_proto::v1::pipeline_service_server::PipelineService;
use pm_proto::v1::tenant_service_server::TenantService;
use pm_proto::v1::*;

use crate::auth::Caller;
use crate::authz::{self, Rpc};
use crate::partitions;
use crate::routing::Routes;

pub struct Config {
    routes: Routes,
}

impl Config {
    pub fn new(routes: Routes) -> Self {
        Self { routes }
    }
}

#[tonic::async_trait]
impl TenantService for Config {
    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        authz::check(
            &request,
            Rpc::CreateTenant,
            &format!("tenants/{}", request.get_ref().tenant_id),
        )?;
        self.routes
            .tenants()
            .create_tenant(request.into_inner())
            .await
    }

    async fn get_tenant(
        &self,
        request: Request<GetTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        authz::check(&request, Rpc::GetTenant, &request.get_ref().name)?;
        self.routes.tenants().get_tenant(request.into_inner()).await
    }

    async fn list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let caller = Caller::of(&request)?;
        authz::authorize(&caller, Rpc::ListTenants, None)?;
        // A tenant's clients see their own tenant only: one page of one.
        if let Caller::Token(claims) = &caller
            && !claims.is_platform_admin()
        {
            let req = request.get_ref();
            pm_spec::validate::check_page(req.page_size, &req.page_token)
                .map_err(crate::Error::from)?;
            let tenants = if req.page_token.is_empty() {
                let own = GetTenantRequest {
                    name: format!("tenants/{}", claims.tenant),
                };
                vec![self.routes.tenants().get_tenant(own).await?.into_inner()]
            } else {
                Vec::new()
            };
            return Ok(Response::new(ListTenantsResponse {
                tenants,
                next_page_token: String::new(),
            }));
        }
        self.routes
            .tenants()
            .list_tenants(request.into_inner())
            .await
    }

    async fn delete_tenant(
        &self,
        request: Request<DeleteTenantRequest>,
    ) -> Result<Response<DeleteTenantResponse>, Status> {
        authz::check(&request, Rpc::DeleteTenant, &request.get_ref().name)?;
        self.routes
            .tenants()
            .delete_tenant(request.into_inner())
            .await
    }

    async fn create_client(
        &self,
        request: Request<CreateClientRequest>,
    ) -> Result<Response<CreateClientResponse>, Status> {
        let caller = authz::check(&request, Rpc::CreateClient, &request.get_ref().parent)?;
        let grants_admin = request.get_ref().client.as_ref().is_some_and(|c| {
            c.roles
                .contains(&(pm_proto::v1::Role::PlatformAdmin as i32))
        });
        if grants_admin && matches!(&caller, Caller::Token(c) if !c.is_platform_admin()) {
            return Err(Status::permission_denied(
                "only a platform admin grants ROLE_PLATFORM_ADMIN",
            ));
        }
        self.routes
            .tenants()
            .create_client(request.into_inner())
            .await
    }

    async fn list_clients(
        &self,
        request: Request<ListClientsRequest>,
    ) -> Result<Response<ListClientsResponse>, Status> {
        authz::check(&request, Rpc::ListClients, &request.get_ref().parent)?;
        self.routes
            .tenants()
            .list_clients(request.into_inner())
            .await
    }

    async fn delete_client(
        &self,
        request: Request<DeleteClientRequest>,
    ) -> Result<Response<DeleteClientResponse>, Status> {
        authz::check(&request, Rpc::DeleteClient, &request.get_ref().name)?;
        self.routes
            .tenants()
            .delete_client(request.into_inner())
            .await
    }
}

#[tonic::async_trait]
impl PipelineService for Config {
    async fn create_application(
        &self,
        request: Request<CreateApplicationRequest>,
    ) -> Result<Response<Application>, Status> {
        authz::check(&request, Rpc::CreateApplication, &request.get_ref().parent)?;
        self.routes
            .pipelines()
            .create_application(request.into_inner())
            .await
    }

    async fn get_application(
        &self,
        request: Request<GetApplicationRequest>,
    ) -> Result<Response<Application>, Status> {
        authz::check(&request, Rpc::GetApplication, &request.get_ref().name)?;
        self.routes
            .pipelines()
            .get_application(request.into_inner())
            .await
    }

    async fn list_applications(
        &self,
        request: Request<ListApplicationsRequest>,
    ) -> Result<Response<ListApplicationsResponse>, Status> {
        authz::check(&request, Rpc::ListApplications, &request.get_ref().parent)?;
        self.routes
            .pipelines()
            .list_applications(request.into_inner())
            .await
    }

    async fn delete_application(
        &self,
        request: Request<DeleteApplicationRequest>,
    ) -> Result<Response<DeleteApplicationResponse>, Status> {
        authz::check(&request, Rpc::DeleteApplication, &request.get_ref().name)?;
        self.routes
            .pipelines()
            .delete_application(request.into_inner())
            .await
    }

    async fn apply_pipeline(
        &self,
        request: Request<ApplyPipelineRequest>,
    ) -> Result<Response<Pipeline>, Status> {
        authz::check(&request, Rpc::ApplyPipeline, &request.get_ref().parent)?;
        let applied = self
            .routes
            .pipelines()
            .apply_pipeline(request.into_inner())
            .await?;
        self.routes
            .pipeline_cache()
            .invalidate(&applied.get_ref().name);
        Ok(applied)
    }

    async fn get_pipeline(
        &self,
        request: Request<GetPipelineRequest>,
    ) -> Result<Response<Pipeline>, Status> {
        authz::check(&request, Rpc::GetPipeline, &request.get_ref().name)?;
        self.routes
            .pipelines()
            .get_pipeline(request.into_inner())
            .await
    }

    async fn list_pipelines(
        &self,
        request: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        authz::check(&request, Rpc::ListPipelines, &request.get_ref().parent)?;
        self.routes
            .pipelines()
            .list_pipelines(request.into_inner())
            .await
    }

    async fn delete_pipeline(
        &self,
        request: Request<DeletePipelineRequest>,
    ) -> Result<Response<DeletePipelineResponse>, Status> {
        authz::check(&request, Rpc::DeletePipeline, &request.get_ref().name)?;
        let request = request.into_inner();
        let name = request.name.clone();
        let deleted = self.routes.pipelines().delete_pipeline(request).await?;
        self.routes.pipeline_cache().invalidate(&name);
        Ok(deleted)
    }

    /// Answered by the shard that owns the pipeline, not by tenant-service.
    async fn get_pipeline_stats(
        &self,
        request: Request<GetPipelineStatsRequest>,
    ) -> Result<Response<PipelineStats>, Status> {
        authz::check(&request, Rpc::GetPipelineStats, &request.get_ref().name)?;
        let req = request.into_inner();
        let pipeline = pm_proto::names::PipelineName::parse(&req.name)
            .map_err(|e| crate::error::Error::invalid("name", e.to_string()))?;
        // NOT_FOUND for a pipeline that does not exist, rather than zeros.
        let version = self.routes.pipeline_cache().get(&pipeline).await?;
        let covered = pm_cluster::ring::covered_partitions(&version.pipeline);
        let partitions = partitions::wanted("partitions", &req.partitions, covered)?;
        let stats = partitions::per_owner(&self.routes, &pipeline, &partitions, |mut s, p| {
            let req = GetPipelineStatsRequest {
                partitions: p,
                ..req.clone()
            };
            async move { s.get_pipeline_stats(req).await.map(Response::into_inner) }
        })
        .await?;
        Ok(Response::new(partitions::sum_stats(req.name, stats)))
    }
}

/// Token issuance is tenant-service's (it holds the clients and the signing keys); the
/// gateway forwards the credentials and only verifies tokens.
pub struct Auth {
    routes: Routes,
}

impl Auth {
    pub fn new(routes: Routes) -> Self {
        Self { routes }
    }
}

#[tonic::async_trait]
impl AuthService for Auth {
    async fn issue_token(
        &self,
        request: Request<IssueTokenRequest>,
    ) -> Result<Response<IssueTokenResponse>, Status> {
        self.routes.auth().issue_token(request.into_inner()).await
    }
}
