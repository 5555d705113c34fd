//! `pm dev`: everything in one process. The components are the same libraries the cluster
//! binaries run, wired over loopback gRPC, with the embedded metadata store instead of etcd.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::Request;

use pm_cluster::EmbeddedStore;
use pm_proto::client::Credentials;
use pm_proto::v1::pipeline_service_server::PipelineService;
use pm_proto::v1::tenant_service_server::TenantService;
use pm_proto::v1::{
    ApplyPipelineRequest, Client, CreateApplicationRequest, ListClientsRequest,
    apply_pipeline_request,
};
use pm_tenant_service::service::PLATFORM_TENANT;
use pm_tenant_service::{Catalog, Issuer};

/// The sample pipeline `pm dev` applies as `default/demo/ocr`.
pub const SAMPLE_PIPELINE: &str = include_str!("../../examples/ocr.yaml");
/// The tenant `pm dev` serves without authentication.
pub const DEFAULT_TENANT: &str = "default";

#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Metadata, the shard's tasks, and the agent's work directories.
    pub data_dir: PathBuf,
    /// The gateway's address.
    pub listen: String,
    /// Apply the sample application `demo` with its `ocr` pipeline.
    pub sample: bool,
    /// Tasks the embedded agent runs at once; 0 runs no embedded agent (agents of their own
    /// connect to the gateway, a Pi's for instance).
    pub slots: u32,
    /// Turn authentication on: every call needs a token; a platform admin's token is kept
    /// fresh in `<data_dir>/admin.token`.
    pub auth: bool,
    /// Show each task's work directory to its jobs here (`/mnt/pipe`, as the source
    /// documents' commands expect; see [`pm_agent::work_mount`]).
    pub work_dir_at: Option<PathBuf>,
    /// Watches one client may hold through the gateway (with `auth`; see
    /// [`pm_gateway::watch::DEFAULT_MAX_WATCHES_PER_CLIENT`]).
    pub max_watches_per_client: usize,
}

/// The platform admin's token, rewritten while `pm dev --auth` runs.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The platform admin's client id and secret (`id:secret`), written once.
pub const ADMIN_CLIENT_FILE: &str = "admin.client";
/// How often admin.token is rewritten (tokens last 15 minutes).
const ADMIN_TOKEN_REFRESH: std::time::Duration = std::time::Duration::from_secs(300);

/// A running `pm dev`.
pub struct Dev {
    /// The gateway's address.
    pub addr: SocketAddr,
    /// With `--auth`: the platform admin's credentials.
    pub admin: Option<Credentials>,
    /// How the agent's jobs see their work directories.
    pub work_mount: pm_agent::WorkMount,
    /// With the sample pipeline: where the sample image is served on loopback
    /// ([`crate::demo`]).
    pub sample_image_url: Option<String>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Dev {
    /// `http://addr`, for clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts every component; they serve until [`Dev::stop`].
    pub async fn start(options: DevOptions) -> anyhow::Result<Dev> {
        std::fs::create_dir_all(&options.data_dir)
            .with_context(|| format!("cannot create {}", options.data_dir.display()))?;
        let store = Arc::new(EmbeddedStore::open(options.data_dir.join("metadata"))?);
        let catalog = Catalog::new(store.clone());
        seed(&catalog, options.sample).await?;
        let admin = if options.auth {
            Some(admin(&catalog, &options.data_dir).await?)
        } else {
            None
        };

        let gateway = TcpListener::bind(&options.listen)
            .await
            .with_context(|| format!("cannot listen on {}", options.listen))?;
        let addr = gateway.local_addr()?;
        let scheduler = pm_scheduler_shard::open(
            pm_scheduler_shard::Options::default(),
            Some(&options.data_dir.join("shard")),
        )?;
        let store_for_tokens: Arc<dyn pm_cluster::MetadataStore> = store.clone();
        let tenant_service = TcpListener::bind("127.0.0.1:0").await?;
        let shard = TcpListener::bind("127.0.0.1:0").await?;
        let upstreams = pm_gateway::Upstreams {
            tenant_service: format!("http://{}", tenant_service.local_addr()?),
            shard: format!("http://{}", shard.local_addr()?),
            etcd: Vec::new(),
        };

        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) =
                pm_tenant_service::run(tenant_service, store, stop.cancelled_owned()).await
            {
                tracing::error!(error = %e, "tenant-service stopped");
            }
        });
        let stop = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = pm_scheduler_shard::run(shard, scheduler, stop.cancelled_owned()).await
            {
                tracing::error!(error = %e, "shard stopped");
            }
        });
        let stop = shutdown.clone();
        let (auth, max_watches_per_client) = (options.auth, options.max_watches_per_client);
        tasks.spawn(async move {
            let security = pm_gateway::Security {
                auth,
                origins: pm_gateway::Origins::Localhost,
                max_watches_per_client,
            };
            let served = pm_gateway::run(gateway, upstreams, security, stop.cancelled_owned());
            if let Err(e) = served.await {
                tracing::error!(error = %e, "gateway stopped");
            }
        });
        // Beside the data dir, not in it: a job's `..` is not the shard's files.
        let work_root = work_root(&options.data_dir);
        // Only the embedded agent runs jobs: without it there is nothing to probe.
        let at = options.work_dir_at.clone().filter(|_| options.slots > 0);
        let work_mount = {
            let root = work_root.clone();
            tokio::task::spawn_blocking(move || pm_agent::work_mount::probe(at.as_deref(), &root))
                .await?
        };
        let agent = pm_agent::AgentOptions {
            endpoint: format!("http://{addr}"),
            agent_id: "pm-dev".to_owned(),
            pipelines: Vec::new(),
            slots: work_mount.limit_slots(options.slots),
            executors: Vec::new(),
            runner: pm_agent::RunnerOptions {
                work_root,
                work_mount: work_mount.clone(),
                ..pm_agent::RunnerOptions::default()
            },
            drain_timeout: std::time::Duration::from_secs(5),
            // The platform admin serves every pipeline.
            credentials: admin
                .as_ref()
                .map(|a| a.credentials.clone())
                .unwrap_or_default(),
        };
        if options.slots > 0 {
            tasks.spawn(pm_agent::run(agent, shutdown.clone()));
        }
        if let Some(admin) = &admin {
            let (issuer, client) = (Issuer::new(store_for_tokens), admin.client.clone());
            let path = options.data_dir.join(ADMIN_TOKEN_FILE);
            let first = issuer.token_for(&client, PLATFORM_TENANT).await?;
            write_private(&path, first.as_bytes())?;
            let stop = shutdown.clone();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(ADMIN_TOKEN_REFRESH) => {}
                    }
                    let written = match issuer.token_for(&client, PLATFORM_TENANT).await {
                        Ok(token) => write_private(&path, token.as_bytes()),
                        Err(e) => Err(anyhow::anyhow!("{e}")),
                    };
                    if let Err(e) = written {
                        tracing::warn!(error = %e, "admin.token not refreshed");
                    }
                }
            });
        }
        let sample_image_url = if options.sample {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let url = format!(
                "http://{}{}",
                listener.local_addr()?,
                crate::demo::SAMPLE_IMAGE_PATH
            );
            tasks.spawn(crate::demo::serve_sample(
                listener,
                shutdown.clone().cancelled_owned(),
            ));
            Some(url)
        } else {
            None
        };
        Ok(Dev {
            admin: admin.map(|a| a.credentials),
            work_mount,
            sample_image_url,
            addr,
            shutdown,
            tasks,
        })
    }

    /// Stops every component and waits for them.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Where the embedded agent makes task work directories: `<data-dir>.work`, a sibling of the
/// data dir (created 0700).
pub fn work_root(data_dir: &Path) -> PathBuf {
    let mut name = data_dir.file_name().unwrap_or_default().to_owned();
    name.push(".work");
    data_dir.with_file_name(name)
}

/// The bootstrap platform admin of a `pm dev --auth` data dir.
struct Admin {
    client: Client,
    credentials: Credentials,
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    pm_auth::secret::write_private_file(path, bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The platform admin: made on the first `--auth` start (its secret saved in admin.client),
/// read back on later ones.
async fn admin(catalog: &Catalog, data_dir: &Path) -> anyhow::Result<Admin> {
    let path = data_dir.join(ADMIN_CLIENT_FILE);
    if let Some(created) = catalog
        .bootstrap_admin()
        .await
        .map_err(|s| anyhow::anyhow!("cannot create the platform admin: {}", s.message()))?
    {
        let client = created.client.unwrap_or_default();
        let line = format!("{}:{}\n", client.client_id, created.client_secret);
        write_private(&path, line.as_bytes())?;
        return Ok(Admin {
            credentials: Credentials::Client {
                id: client.client_id.clone(),
                secret: created.client_secret,
            },
            client,
        });
    }
    let saved = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "this data dir has a platform admin, but its secret ({}) is gone",
            path.display()
        )
    })?;
    let (id, secret) = saved
        .trim()
        .split_once(':')
        .with_context(|| format!("{} is not `id:secret`", path.display()))?;
    let client = catalog
        .list_clients(Request::new(ListClientsRequest {
            parent: format!("tenants/{PLATFORM_TENANT}"),
            page_size: 1000,
            page_token: String::new(),
        }))
        .await
        .map_err(|s| anyhow::anyhow!("cannot read the clients: {}", s.message()))?
        .into_inner()
        .clients
        .into_iter()
        .find(|c| c.client_id == id)
        .with_context(|| format!("the platform admin of {} was deleted", path.display()))?;
    Ok(Admin {
        client,
        credentials: Credentials::Client {
            id: id.to_owned(),
            secret: secret.to_owned(),
        },
    })
}

/// The `default` tenant, and with `sample` the `demo` application and its `ocr` pipeline.
async fn seed(catalog: &Catalog, sample: bool) -> anyhow::Result<()> {
    catalog.ensure_tenant(DEFAULT_TENANT).await?;
    if !sample {
        return Ok(());
    }
    let created = catalog
        .create_application(Request::new(CreateApplicationRequest {
            parent: format!("tenants/{DEFAULT_TENANT}"),
            application_id: "demo".to_owned(),
            application: None,
        }))
        .await;
    match created {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) => anyhow::bail!("cannot create the sample application: {}", s.message()),
    }
    catalog
        .apply_pipeline(Request::new(ApplyPipelineRequest {
            parent: format!("tenants/{DEFAULT_TENANT}/applications/demo"),
            pipeline_id: String::new(),
            source: Some(apply_pipeline_request::Source::SpecDocument(
                SAMPLE_PIPELINE.to_owned(),
            )),
        }))
        .await
        .map_err(|s| anyhow::anyhow!("cannot apply the sample pipeline: {}", s.message()))?;
    Ok(())
}
