//! `pm dev`: everything in one process. The components are the same libraries the cluster
//! binaries run, wired over loopback gRPC, with the embedded metadata store instead of etcd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::Request;

use pm_cluster::EmbeddedStore;
use pm_proto::v1::pipeline_service_server::PipelineService;
use pm_proto::v1::{ApplyPipelineRequest, CreateApplicationRequest, apply_pipeline_request};
use pm_tenant_service::Catalog;

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
    /// Tasks the embedded agent runs at once.
    pub slots: u32,
}

/// A running `pm dev`.
pub struct Dev {
    /// The gateway's address.
    pub addr: SocketAddr,
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
        let store = Arc::new(EmbeddedStore::open(options.data_dir.join("metadata.bin"))?);
        seed(&Catalog::new(store.clone()), options.sample).await?;

        let gateway = TcpListener::bind(&options.listen)
            .await
            .with_context(|| format!("cannot listen on {}", options.listen))?;
        let addr = gateway.local_addr()?;
        let scheduler = pm_scheduler_shard::open(
            pm_scheduler_shard::Options::default(),
            Some(&options.data_dir.join("shard")),
        )?;
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
        tasks.spawn(async move {
            if let Err(e) = pm_gateway::run(gateway, upstreams, stop.cancelled_owned()).await {
                tracing::error!(error = %e, "gateway stopped");
            }
        });
        let agent = pm_agent::AgentOptions {
            endpoint: format!("http://{addr}"),
            agent_id: "pm-dev".to_owned(),
            pipelines: Vec::new(),
            slots: options.slots,
            executors: Vec::new(),
            runner: pm_agent::RunnerOptions {
                work_root: options.data_dir.join("work"),
                ..pm_agent::RunnerOptions::default()
            },
            drain_timeout: std::time::Duration::from_secs(5),
        };
        tasks.spawn(pm_agent::run(agent, shutdown.clone()));
        Ok(Dev {
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
