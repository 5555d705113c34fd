//! Configuration calls at the edge: tenants, clients, applications and pipelines go to
//! tenant-service, which validates them itself (it is the owner of those rules). Only the
//! message is forwarded, never the caller's transport headers.

use tonic::{Request, Response, Status};

use pm_proto::v1::auth_service_server::AuthService;
use pm_proto::v1::pipeline_service_server::PipelineService;
use pm_proto::v1::tenant_service_server::TenantService;
use pm_proto::v1::*;

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
        self.routes
            .tenants()
            .create_tenant(request.into_inner())
            .await
    }

    async fn get_tenant(
        &self,
        request: Request<GetTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        self.routes.tenants().get_tenant(request.into_inner()).await
    }

    async fn list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        self.routes
            .tenants()
            .list_tenants(request.into_inner())
            .await
    }

    async fn delete_tenant(
        &self,
        request: Request<DeleteTenantRequest>,
    ) -> Result<Response<DeleteTenantResponse>, Status> {
        self.routes
            .tenants()
            .delete_tenant(request.into_inner())
            .await
    }

    async fn create_client(
        &self,
        request: Request<CreateClientRequest>,
    ) -> Result<Response<CreateClientResponse>, Status> {
        self.routes
            .tenants()
            .create_client(request.into_inner())
            .await
    }

    async fn list_clients(
        &self,
        request: Request<ListClientsRequest>,
    ) -> Result<Response<ListClientsResponse>, Status> {
        self.routes
            .tenants()
            .list_clients(request.into_inner())
            .await
    }

    async fn delete_client(
        &self,
        request: Request<DeleteClientRequest>,
    ) -> Result<Response<DeleteClientResponse>, Status> {
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
        self.routes
            .pipelines()
            .create_application(request.into_inner())
            .await
    }

    async fn get_application(
        &self,
        request: Request<GetApplicationRequest>,
    ) -> Result<Response<Application>, Status> {
        self.routes
            .pipelines()
            .get_application(request.into_inner())
            .await
    }

    async fn list_applications(
        &self,
        request: Request<ListApplicationsRequest>,
    ) -> Result<Response<ListApplicationsResponse>, Status> {
        self.routes
            .pipelines()
            .list_applications(request.into_inner())
            .await
    }

    async fn delete_application(
        &self,
        request: Request<DeleteApplicationRequest>,
    ) -> Result<Response<DeleteApplicationResponse>, Status> {
        self.routes
            .pipelines()
            .delete_application(request.into_inner())
            .await
    }

    async fn apply_pipeline(
        &self,
        request: Request<ApplyPipelineRequest>,
    ) -> Result<Response<Pipeline>, Status> {
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
        self.routes
            .pipelines()
            .get_pipeline(request.into_inner())
            .await
    }

    async fn list_pipelines(
        &self,
        request: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        self.routes
            .pipelines()
            .list_pipelines(request.into_inner())
            .await
    }

    async fn delete_pipeline(
        &self,
        request: Request<DeletePipelineRequest>,
    ) -> Result<Response<DeletePipelineResponse>, Status> {
        let request = request.into_inner();
        let name = request.name.clone();
        let deleted = self.routes.pipelines().delete_pipeline(request).await?;
        self.routes.pipeline_cache().invalidate(&name);
        Ok(deleted)
    }
}

/// Token issuance needs the gateway's signing key, which arrives with authentication;
/// `pm dev` runs with auth off.
pub struct Auth;

#[tonic::async_trait]
impl AuthService for Auth {
    async fn issue_token(
        &self,
        _request: Request<IssueTokenRequest>,
    ) -> Result<Response<IssueTokenResponse>, Status> {
        Err(Status::unimplemented(
            "IssueToken: this gateway runs with authentication off (tokens are not issued yet)",
        ))
    }
}
