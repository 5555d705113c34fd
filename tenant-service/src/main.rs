//! `pm-tenant-service`: tenant-service as its own process.

// jemalloc on x86_64 (pm_proto::server_allocator: why).
pm_proto::server_allocator!();

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "pipeline-manager tenant-service")]
struct Args {
    #[command(flatten)]
    server: pm_proto::server::ServerArgs,
    /// Address to serve gRPC on.
    #[arg(long, env = "PM_LISTEN", default_value = "127.0.0.1:50052")]
    listen: String,
    /// etcd endpoints (comma-separated, `http://host:2379`): keep the metadata in etcd, so
    /// any number of replicas can serve. Without it, the embedded store in --data-dir.
    #[arg(long, env = "PM_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// A tenant to create at start if missing (as `pm dev` does); empty for none.
    #[arg(long, env = "PM_DEFAULT_TENANT", default_value = "default")]
    default_tenant: String,
    /// Make the first platform admin (a client of the tenant `platform`) if the store has none,
    /// and write its `id:secret` to this file (mode 0600). Trade it for a token with
    /// `pmctl login`, make the clients you need, then delete the file.
    #[arg(long, env = "PM_BOOTSTRAP_ADMIN_FILE")]
    bootstrap_admin_file: Option<PathBuf>,
    /// Applications one tenant may have; past it CreateApplication is RESOURCE_EXHAUSTED.
    #[arg(long, env = "PM_MAX_APPLICATIONS_PER_TENANT", default_value_t = pm_tenant_service::limits::Limits::default().applications_per_tenant)]
    max_applications_per_tenant: u64,
    /// Pipelines one tenant may have over all its applications; past it a new pipeline's
    /// ApplyPipeline is RESOURCE_EXHAUSTED.
    #[arg(long, env = "PM_MAX_PIPELINES_PER_TENANT", default_value_t = pm_tenant_service::limits::Limits::default().pipelines_per_tenant)]
    max_pipelines_per_tenant: u64,
    /// Versions kept per pipeline; an apply past it deletes the oldest.
    #[arg(long, env = "PM_MAX_VERSIONS_PER_PIPELINE", default_value_t = pm_tenant_service::limits::Limits::default().versions_per_pipeline)]
    max_versions_per_pipeline: u64,
    /// Directory of the embedded metadata store (single replica, no etcd).
    #[arg(long, env = "PM_DATA_DIR", default_value = "pm-data/tenant-service")]
    data_dir: PathBuf,
}

async fn store(args: &Args) -> anyhow::Result<Arc<dyn pm_cluster::MetadataStore>> {
    if !args.etcd.is_empty() {
        return Ok(Arc::new(pm_cluster::EtcdStore::connect(&args.etcd).await?));
    }
    std::fs::create_dir_all(&args.data_dir)?;
    Ok(Arc::new(pm_cluster::EmbeddedStore::open(
        args.data_dir.join("metadata"),
    )?))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pm_proto::server::private_files();
    let args = Args::parse();
    // Spans still queued are sent before the process exits.
    let tracing = pm_proto::server::init_tracing(args.server.log_format, "pm-tenant-service");
    let code = run(args).await;
    tracing.shutdown().await;
    code
}

async fn run(args: Args) -> std::process::ExitCode {
    if let Err(e) = args.server.init() {
        eprintln!("pm-tenant-service: {e}");
        return std::process::ExitCode::from(64);
    }
    if args.max_versions_per_pipeline == 0 {
        eprintln!("pm-tenant-service: --max-versions-per-pipeline must be at least 1");
        return std::process::ExitCode::from(64);
    }
    pm_tenant_service::limits::set(pm_tenant_service::limits::Limits {
        applications_per_tenant: args.max_applications_per_tenant,
        pipelines_per_tenant: args.max_pipelines_per_tenant,
        versions_per_pipeline: args.max_versions_per_pipeline,
    });
    let store = match store(&args).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("pm-tenant-service: {e:#}");
            return std::process::ExitCode::from(64);
        }
    };
    if !args.default_tenant.is_empty() {
        let catalog = pm_tenant_service::Catalog::new(store.clone());
        // Replicas starting together race for it; whoever loses finds it there.
        let mut attempts = 0;
        while let Err(e) = catalog.ensure_tenant(&args.default_tenant).await {
            attempts += 1;
            if attempts == 10 {
                eprintln!(
                    "pm-tenant-service: cannot create tenant {}: {e}",
                    args.default_tenant
                );
                return std::process::ExitCode::from(69);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
    if let Some(path) = &args.bootstrap_admin_file {
        let catalog = pm_tenant_service::Catalog::new(store.clone());
        match catalog.bootstrap_admin().await {
            Ok(Some(created)) => {
                let id = created.client.map(|c| c.client_id).unwrap_or_default();
                let line = format!("{id}:{}\n", created.client_secret);
                if let Err(e) = pm_auth::secret::write_private_file(path, line.as_bytes()) {
                    eprintln!("pm-tenant-service: cannot write {}: {e}", path.display());
                    return std::process::ExitCode::from(73);
                }
                tracing::info!(file = %path.display(), "platform admin created");
            }
            Ok(None) => tracing::info!("a platform admin was made before; none created"),
            Err(s) => {
                eprintln!(
                    "pm-tenant-service: cannot create the platform admin: {}",
                    s.message()
                );
                return std::process::ExitCode::from(69);
            }
        }
    }
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pm-tenant-service: cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::from(64);
        }
    };
    match pm_tenant_service::run(listener, store, pm_proto::server::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pm-tenant-service: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
