//! The handlers of `pm.v1.TenantService` and `pm.v1.PipelineService`. Stateless: every call
//! reads and writes the metadata store, and concurrent writers are fenced by revisions.

use std::sync::Arc;

use prost::Message;
use rand::RngCore;
use tonic::{Request, Response, Status};

use pm_cluster::{Expect, KeyValue, MetadataStore};
use pm_proto::internal::v1::StoredClient;
use pm_proto::names::{ApplicationName, ClientName, NameError, PipelineName, TenantName, check_id};
use pm_proto::unix_ms;
use pm_proto::v1::pipeline_service_server::PipelineService;
use pm_proto::v1::tenant_service_server::TenantService;
use pm_proto::v1::*;

use crate::error::Error;
use crate::keys;

/// Serves tenants, clients, applications and pipelines over a [`MetadataStore`].
#[derive(Clone)]
pub struct Catalog {
    store: Arc<dyn MetadataStore>,
    limits: crate::limits::Limits,
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn name_field<T>(field: &str, parsed: Result<T, NameError>) -> Result<T> {
    parsed.map_err(|e| Error::invalid(field, e.to_string()))
}

fn decode<M: Message + Default>(kv: &KeyValue) -> Result<M> {
    M::decode(kv.value.as_slice()).map_err(|e| {
        Error::Store(pm_cluster::Error::Unavailable(format!(
            "undecodable value at {}: {e}",
            kv.key
        )))
    })
}

/// One page of a collection: values after `page_token` (the last id of the previous page).
struct Page<M> {
    items: Vec<M>,
    next_page_token: String,
}

impl Catalog {
    /// A catalog over `store`, with this process's limits ([`crate::limits::get`]).
    pub fn new(store: Arc<dyn MetadataStore>) -> Self {
        Self::with_limits(store, crate::limits::get())
    }

    pub fn with_limits(store: Arc<dyn MetadataStore>, limits: crate::limits::Limits) -> Self {
        Self { store, limits }
    }

    /// Refused when `prefix` already holds `limit` keys.
    async fn check_room(&self, prefix: &str, limit: u64, what: &str, flag: &str) -> Result<()> {
        let held = self.store.count(prefix).await?;
        if held >= limit {
            return Err(Error::Exhausted(format!(
                "{what} {held}, the limit ({flag}); delete some first"
            )));
        }
        Ok(())
    }

    /// Deletes a pipeline's oldest versions past the limit. A failure only leaves them for
    /// the next apply to delete.
    async fn prune_versions(&self, name: &PipelineName) {
        let keep = self.limits.versions_per_pipeline.max(1);
        let prefix = keys::pipeline_versions_of(name);
        let Ok(held) = self.store.count(&prefix).await else {
            return;
        };
        if held <= keep {
            return;
        }
        // Zero-padded keys: the first listed are the oldest.
        let Ok(old) = self.store.list(&prefix, "", (held - keep) as usize).await else {
            return;
        };
        for kv in old {
            if let Err(e) = self
                .store
                .delete(&kv.key, Expect::Revision(kv.mod_revision))
                .await
            {
                tracing::warn!(key = %kv.key, error = %e, "old pipeline version not deleted");
            }
        }
    }

    async fn page<M: Message + Default>(
        &self,
        prefix: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<Page<M>> {
        let size = pm_spec::validate::check_page(page_size, page_token)?;
        let start_after = if page_token.is_empty() {
            String::new()
        } else {
            format!("{prefix}{page_token}")
        };
        // One extra entry tells whether another page follows.
        let mut kvs = self.store.list(prefix, &start_after, size + 1).await?;
        let more = kvs.len() > size;
        kvs.truncate(size);
        let next_page_token = match (more, kvs.last()) {
            (true, Some(last)) => keys::last_segment(&last.key).to_owned(),
            _ => String::new(),
        };
        let items = kvs.iter().map(decode).collect::<Result<_>>()?;
        Ok(Page {
            items,
            next_page_token,
        })
    }

    async fn get_decoded<M: Message + Default>(&self, key: &str, what: &str) -> Result<(M, u64)> {
        let kv = self
            .store
            .get(key)
            .await?
            .ok_or_else(|| Error::NotFound(what.to_owned()))?;
        Ok((decode(&kv)?, kv.mod_revision))
    }

    async fn create<M: Message>(&self, key: &str, value: &M, what: &str) -> Result<()> {
        match self
            .store
            .put(key, value.encode_to_vec(), Expect::Absent)
            .await
        {
            Ok(_) => Ok(()),
            Err(pm_cluster::Error::Conflict { .. }) => Err(Error::AlreadyExists(what.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    async fn has_any(&self, prefix: &str) -> Result<bool> {
        Ok(!self.store.list(prefix, "", 1).await?.is_empty())
    }

    /// Makes sure a tenant exists, creating it if needed (`pm dev` seeds `default` this way).
    pub async fn ensure_tenant(&self, tenant_id: &str) -> Result<Tenant> {
        let name = TenantName {
            tenant: tenant_id.to_owned(),
        };
        match self
            .get_decoded(&keys::tenant(&name), &name.to_string())
            .await
        {
            Ok((tenant, _)) => Ok(tenant),
            Err(Error::NotFound(_)) => {
                let tenant = Tenant {
                    name: name.to_string(),
                    display_name: tenant_id.to_owned(),
                    create_time_ms: unix_ms(),
                    quota: None,
                };
                self.create(&keys::tenant(&name), &tenant, &tenant.name)
                    .await?;
                Ok(tenant)
            }
            Err(e) => Err(e),
        }
    }

    /// The first platform admin: a client with ROLE_PLATFORM_ADMIN in the tenant
    /// [`PLATFORM_TENANT`] (created if missing), made once per metadata store. It lives
    /// apart from every user's tenant, so no tenant admin can delete it. Returns it with its
    /// secret, or `None` when one was made before (its secret is not stored, so not shown
    /// again).
    pub async fn bootstrap_admin(
        &self,
    ) -> std::result::Result<Option<CreateClientResponse>, Status> {
        let tenant_id = PLATFORM_TENANT;
        self.ensure_tenant(tenant_id).await?;
        if self
            .store
            .get(keys::BOOTSTRAP_ADMIN)
            .await
            .map_err(Error::from)?
            .is_some()
        {
            return Ok(None);
        }
        let created = self
            .create_client(Request::new(CreateClientRequest {
                parent: format!("tenants/{tenant_id}"),
                client: Some(Client {
                    display_name: "platform admin (bootstrap)".into(),
                    roles: vec![Role::PlatformAdmin as i32],
                    ..Client::default()
                }),
            }))
            .await?
            .into_inner();
        let name = created
            .client
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default();
        if let Err(e) = self
            .store
            .put(keys::BOOTSTRAP_ADMIN, name.into_bytes(), Expect::Absent)
            .await
        {
            // Another replica made one meanwhile: this one goes again.
            let client = created.client.unwrap_or_default();
            let _ = self
                .delete_client(Request::new(DeleteClientRequest { name: client.name }))
                .await;
            return match e {
                pm_cluster::Error::Conflict { .. } => Ok(None),
                e => Err(Error::from(e).into()),
            };
        }
        Ok(Some(created))
    }

    async fn require_tenant(&self, name: &TenantName) -> Result<Tenant> {
        Ok(self
            .get_decoded(&keys::tenant(name), &name.to_string())
            .await?
            .0)
    }

    async fn require_application(&self, name: &ApplicationName) -> Result<Application> {
        Ok(self
            .get_decoded(&keys::application(name), &name.to_string())
            .await?
            .0)
    }

    /// The latest (version 0) or a given version of a pipeline.
    pub async fn pipeline(&self, name: &PipelineName, version: u64) -> Result<Pipeline> {
        let key = if version == 0 {
            keys::pipeline(name)
        } else {
            keys::pipeline_version(name, version)
        };
        let what = if version == 0 {
            name.to_string()
        } else {
            format!("{name} version {version}")
        };
        Ok(self.get_decoded(&key, &what).await?.0)
    }

    async fn apply(&self, req: ApplyPipelineRequest) -> Result<Pipeline> {
        let app = name_field("parent", ApplicationName::parse(&req.parent))?;
        let spec = match req.source {
            Some(apply_pipeline_request::Source::Spec(spec)) => {
                pm_spec::load_structured(spec, "spec")?
            }
            Some(apply_pipeline_request::Source::SpecDocument(doc)) => {
                pm_spec::load_document(&doc, "spec_document")?
            }
            None => {
                return Err(Error::invalid(
                    "source",
                    "give the pipeline as `spec` or `spec_document`",
                ));
            }
        };
        let (id, id_field) = if req.pipeline_id.is_empty() {
            (spec.name.clone(), "spec.name")
        } else {
            (req.pipeline_id.clone(), "pipeline_id")
        };
        if id.is_empty() {
            return Err(Error::invalid(
                "pipeline_id",
                "give a pipeline_id or a name in the spec",
            ));
        }
        check_id(&id).map_err(|e| Error::invalid(id_field, e.to_string()))?;
        self.require_application(&app).await?;
        let name = PipelineName {
            tenant: app.tenant.clone(),
            application: app.application.clone(),
            pipeline: id,
        };
        let latest_key = keys::pipeline(&name);
        let now = unix_ms();
        let latest = self.store.get(&latest_key).await?;
        if latest.is_none() {
            let tenant = TenantName {
                tenant: name.tenant.clone(),
            };
            self.check_room(
                &keys::pipelines_of_tenant(&tenant),
                self.limits.pipelines_per_tenant,
                &format!("tenant {} has pipelines:", name.tenant),
                "--max-pipelines-per-tenant",
            )
            .await?;
        }
        let (pipeline, expect) = match latest {
            Some(kv) => {
                let latest: Pipeline = decode(&kv)?;
                if latest.spec.as_ref() == Some(&spec) {
                    return Ok(latest);
                }
                let next = Pipeline {
                    name: name.to_string(),
                    version: latest.version + 1,
                    max_partitions: pm_cluster::ring::covered_partitions(&latest)
                        .max(spec.partitions),
                    spec: Some(spec),
                    create_time_ms: latest.create_time_ms,
                    update_time_ms: now,
                };
                (next, Expect::Revision(kv.mod_revision))
            }
            None => (
                Pipeline {
                    name: name.to_string(),
                    version: 1,
                    max_partitions: spec.partitions.max(1),
                    spec: Some(spec),
                    create_time_ms: now,
                    update_time_ms: now,
                },
                Expect::Absent,
            ),
        };
        let bytes = pipeline.encode_to_vec();
        // The version record and the latest pointer in one transaction: a version is never
        // the latest before it is readable, and no apply leaves a version nothing points to.
        // Two concurrent appliers collide on the latest pointer, and the loser gets ABORTED.
        // A version record without a latest pointing to it (left by an apply before this was
        // one transaction, cut between its two writes) is taken over, not a conflict forever.
        let version_key = keys::pipeline_version(&name, pipeline.version);
        let version_expect = match self.store.get(&version_key).await? {
            Some(orphan) => Expect::Revision(orphan.mod_revision),
            None => Expect::Absent,
        };
        self.store
            .put_all(vec![
                (version_key, bytes.clone(), version_expect),
                (latest_key, bytes, expect),
            ])
            .await?;
        tracing::info!(pipeline = %pipeline.name, version = pipeline.version, "pipeline applied");
        self.prune_versions(&name).await;
        Ok(pipeline)
    }
}

/// The tenant of the platform admins that tenant-service bootstraps.
pub const PLATFORM_TENANT: &str = "platform";

/// Most pipelines one agent client may serve.
pub const MAX_CLIENT_PIPELINES: usize = 1000;

/// A client's roles and agent scope: at least one role, pipelines (of its own tenant) only
/// for agents, and named by every agent that is not a platform admin.
fn check_grants(client: &Client, tenant: &TenantName) -> Result<()> {
    if client.roles.is_empty() {
        return Err(Error::invalid(
            "client.roles",
            "give at least one role (ROLE_TENANT_ADMIN, ROLE_SUBMITTER, ROLE_VIEWER, ROLE_AGENT)",
        ));
    }
    let mut roles = Vec::new();
    for (i, r) in client.roles.iter().enumerate() {
        let role = pm_auth::Role::from_wire(*r).ok_or_else(|| {
            Error::invalid(format!("client.roles[{i}]"), format!("{r} is not a role"))
        })?;
        roles.push(role);
    }
    let agent = roles.contains(&pm_auth::Role::Agent);
    if !client.pipelines.is_empty() && !agent {
        return Err(Error::invalid(
            "client.pipelines",
            "only an agent (ROLE_AGENT) serves pipelines",
        ));
    }
    if agent && client.pipelines.is_empty() && !roles.contains(&pm_auth::Role::PlatformAdmin) {
        return Err(Error::invalid(
            "client.pipelines",
            "an agent client names the pipelines it may serve",
        ));
    }
    if client.pipelines.len() > MAX_CLIENT_PIPELINES {
        return Err(Error::invalid(
            "client.pipelines",
            format!(
                "{} pipelines; at most {MAX_CLIENT_PIPELINES}",
                client.pipelines.len()
            ),
        ));
    }
    for (i, p) in client.pipelines.iter().enumerate() {
        let field = || format!("client.pipelines[{i}]");
        let name = PipelineName::parse(p).map_err(|e| Error::invalid(field(), e.to_string()))?;
        if name.tenant != tenant.tenant {
            return Err(Error::invalid(
                field(),
                format!("{p} is not a pipeline of {tenant}"),
            ));
        }
    }
    Ok(())
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TenantService for Catalog {
    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        let req = request.into_inner();
        check_id(&req.tenant_id).map_err(|e| Error::invalid("tenant_id", e.to_string()))?;
        let given = req.tenant.unwrap_or_default();
        pm_spec::validate::check_display_name("tenant.display_name", &given.display_name)
            .map_err(Error::from)?;
        let tenant = Tenant {
            name: format!("tenants/{}", req.tenant_id),
            display_name: given.display_name,
            create_time_ms: unix_ms(),
            quota: given.quota,
        };
        let name = TenantName {
            tenant: req.tenant_id,
        };
        self.create(&keys::tenant(&name), &tenant, &tenant.name)
            .await?;
        Ok(Response::new(tenant))
    }

    async fn get_tenant(
        &self,
        request: Request<GetTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        let name = name_field("name", TenantName::parse(&request.get_ref().name))?;
        Ok(Response::new(self.require_tenant(&name).await?))
    }

    async fn list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let req = request.into_inner();
        let page = self
            .page(keys::TENANTS, req.page_size, &req.page_token)
            .await?;
        Ok(Response::new(ListTenantsResponse {
            tenants: page.items,
            next_page_token: page.next_page_token,
        }))
    }

    async fn delete_tenant(
        &self,
        request: Request<DeleteTenantRequest>,
    ) -> Result<Response<DeleteTenantResponse>, Status> {
        let name = name_field("name", TenantName::parse(&request.get_ref().name))?;
        self.require_tenant(&name).await?;
        if self.has_any(&keys::applications_of(&name)).await? {
            return Err(Error::FailedPrecondition(format!(
                "{name} still has applications; delete them first"
            ))
            .into());
        }
        let clients_prefix = keys::clients_of(&name);
        let clients = self.store.list(&clients_prefix, "", usize::MAX);
        for kv in clients.await.map_err(Error::from)? {
            let stored: StoredClient = decode(&kv)?;
            let client_id = stored.client.map(|c| c.client_id).unwrap_or_default();
            self.store
                .delete(&keys::client_id(&client_id), Expect::Any)
                .await
                .map_err(Error::from)?;
            self.store
                .delete(&kv.key, Expect::Any)
                .await
                .map_err(Error::from)?;
        }
        self.store
            .delete(&keys::tenant(&name), Expect::Any)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(DeleteTenantResponse {}))
    }

    async fn create_client(
        &self,
        request: Request<CreateClientRequest>,
    ) -> Result<Response<CreateClientResponse>, Status> {
        let req = request.into_inner();
        let tenant = name_field("parent", TenantName::parse(&req.parent))?;
        let given = req.client.unwrap_or_default();
        pm_spec::validate::check_priority("client.priority", given.priority)
            .map_err(Error::from)?;
        pm_spec::validate::check_display_name("client.display_name", &given.display_name)
            .map_err(Error::from)?;
        check_grants(&given, &tenant)?;
        self.require_tenant(&tenant).await?;
        let client_id = random_hex(12);
        let secret = pm_auth::secret::generate();
        let name = ClientName {
            tenant: tenant.tenant.clone(),
            client: client_id.clone(),
        };
        let client = Client {
            name: name.to_string(),
            client_id: client_id.clone(),
            display_name: given.display_name,
            create_time_ms: unix_ms(),
            priority: given.priority,
            roles: given.roles,
            pipelines: given.pipelines,
        };
        let hashed = secret.clone();
        let secret_hash = tokio::task::spawn_blocking(move || pm_auth::secret::hash(&hashed))
            .await
            .map_err(|e| Status::internal(format!("hashing the secret: {e}")))?;
        let stored = StoredClient {
            client: Some(client.clone()),
            secret_hash,
        };
        self.create(
            &keys::client_id(&client_id),
            &name.to_string().into_bytes(),
            &client.name,
        )
        .await?;
        self.create(&keys::client(&name), &stored, &client.name)
            .await?;
        Ok(Response::new(CreateClientResponse {
            client: Some(client),
            client_secret: secret,
        }))
    }

    async fn list_clients(
        &self,
        request: Request<ListClientsRequest>,
    ) -> Result<Response<ListClientsResponse>, Status> {
        let req = request.into_inner();
        let tenant = name_field("parent", TenantName::parse(&req.parent))?;
        let page = self
            .page::<StoredClient>(&keys::clients_of(&tenant), req.page_size, &req.page_token)
            .await?;
        Ok(Response::new(ListClientsResponse {
            clients: page.items.into_iter().filter_map(|s| s.client).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn delete_client(
        &self,
        request: Request<DeleteClientRequest>,
    ) -> Result<Response<DeleteClientResponse>, Status> {
        let name = name_field("name", ClientName::parse(&request.get_ref().name))?;
        let key = keys::client(&name);
        if !self
            .store
            .delete(&key, Expect::Any)
            .await
            .map_err(Error::from)?
        {
            return Err(Error::NotFound(name.to_string()).into());
        }
        self.store
            .delete(&keys::client_id(&name.client), Expect::Any)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(DeleteClientResponse {}))
    }
}

#[tonic::async_trait]
impl PipelineService for Catalog {
    async fn create_application(
        &self,
        request: Request<CreateApplicationRequest>,
    ) -> Result<Response<Application>, Status> {
        let req = request.into_inner();
        let tenant = name_field("parent", TenantName::parse(&req.parent))?;
        check_id(&req.application_id)
            .map_err(|e| Error::invalid("application_id", e.to_string()))?;
        let given = req.application.unwrap_or_default();
        pm_spec::validate::check_display_name("application.display_name", &given.display_name)
            .map_err(Error::from)?;
        self.require_tenant(&tenant).await?;
        self.check_room(
            &keys::applications_of(&tenant),
            self.limits.applications_per_tenant,
            &format!("tenant {} has applications:", tenant.tenant),
            "--max-applications-per-tenant",
        )
        .await?;
        let name = ApplicationName {
            tenant: tenant.tenant,
            application: req.application_id,
        };
        let app = Application {
            name: name.to_string(),
            display_name: given.display_name,
            create_time_ms: unix_ms(),
        };
        self.create(&keys::application(&name), &app, &app.name)
            .await?;
        Ok(Response::new(app))
    }

    async fn get_application(
        &self,
        request: Request<GetApplicationRequest>,
    ) -> Result<Response<Application>, Status> {
        let name = name_field("name", ApplicationName::parse(&request.get_ref().name))?;
        Ok(Response::new(self.require_application(&name).await?))
    }

    async fn list_applications(
        &self,
        request: Request<ListApplicationsRequest>,
    ) -> Result<Response<ListApplicationsResponse>, Status> {
        let req = request.into_inner();
        let tenant = name_field("parent", TenantName::parse(&req.parent))?;
        let page = self
            .page(
                &keys::applications_of(&tenant),
                req.page_size,
                &req.page_token,
            )
            .await?;
        Ok(Response::new(ListApplicationsResponse {
            applications: page.items,
            next_page_token: page.next_page_token,
        }))
    }

    async fn delete_application(
        &self,
        request: Request<DeleteApplicationRequest>,
    ) -> Result<Response<DeleteApplicationResponse>, Status> {
        let name = name_field("name", ApplicationName::parse(&request.get_ref().name))?;
        self.require_application(&name).await?;
        if self.has_any(&keys::pipelines_of(&name)).await? {
            return Err(Error::FailedPrecondition(format!(
                "{name} still has pipelines; delete them first"
            ))
            .into());
        }
        self.store
            .delete(&keys::application(&name), Expect::Any)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(DeleteApplicationResponse {}))
    }

    async fn apply_pipeline(
        &self,
        request: Request<ApplyPipelineRequest>,
    ) -> Result<Response<Pipeline>, Status> {
        Ok(Response::new(self.apply(request.into_inner()).await?))
    }

    async fn get_pipeline(
        &self,
        request: Request<GetPipelineRequest>,
    ) -> Result<Response<Pipeline>, Status> {
        let req = request.into_inner();
        let name = name_field("name", PipelineName::parse(&req.name))?;
        Ok(Response::new(self.pipeline(&name, req.version).await?))
    }

    async fn list_pipelines(
        &self,
        request: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        let req = request.into_inner();
        let app = name_field("parent", ApplicationName::parse(&req.parent))?;
        let page = self
            .page(&keys::pipelines_of(&app), req.page_size, &req.page_token)
            .await?;
        Ok(Response::new(ListPipelinesResponse {
            pipelines: page.items,
            next_page_token: page.next_page_token,
        }))
    }

    async fn delete_pipeline(
        &self,
        request: Request<DeletePipelineRequest>,
    ) -> Result<Response<DeletePipelineResponse>, Status> {
        let name = name_field("name", PipelineName::parse(&request.get_ref().name))?;
        if !self
            .store
            .delete(&keys::pipeline(&name), Expect::Any)
            .await
            .map_err(Error::from)?
        {
            return Err(Error::NotFound(name.to_string()).into());
        }
        for kv in self
            .store
            .list(&keys::pipeline_versions_of(&name), "", usize::MAX)
            .await
            .map_err(Error::from)?
        {
            self.store
                .delete(&kv.key, Expect::Any)
                .await
                .map_err(Error::from)?;
        }
        Ok(Response::new(DeletePipelineResponse {}))
    }

    /// Queues are the shards': the gateway routes this call to the pipeline's owner.
    async fn get_pipeline_stats(
        &self,
        _request: Request<GetPipelineStatsRequest>,
    ) -> Result<Response<PipelineStats>, Status> {
        Err(Status::unimplemented(
            "pipeline statistics are served by the shards, through the gateway",
        ))
    }
}
