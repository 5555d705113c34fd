//! `pm-gateway`: the public endpoint as its own process.

// jemalloc on x86_64 (pm_proto::server_allocator: why).
pm_proto::server_allocator!();

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "pipeline-manager gateway")]
struct Args {
    #[command(flatten)]
    server: pm_proto::server::ServerArgs,
    /// Address to serve gRPC and grpc-web on.
    #[arg(long, env = "PM_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// tenant-service endpoint.
    #[arg(
        long,
        env = "PM_TENANT_SERVICE",
        default_value = "http://127.0.0.1:50052"
    )]
    tenant_service: String,
    /// The shard's endpoint, when there is one shard and no etcd.
    #[arg(long, env = "PM_SHARD", default_value = "http://127.0.0.1:50053")]
    shard: String,
    /// etcd endpoints (comma-separated): route to the shards registered there, by the hash
    /// ring, instead of --shard.
    #[arg(long, env = "PM_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Let every caller do everything, with no token (as `pm dev` does). Only for a gateway
    /// that nobody else can reach.
    #[arg(long, env = "PM_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// Web origins browsers may call from (grpc-web), comma-separated: exact origins
    /// (`https://console.example.com`), `localhost` for loopback origins on any port, or `*`.
    /// None by default: only the gateway's own pages.
    #[arg(long, env = "PM_ALLOW_ORIGINS", value_delimiter = ',')]
    allow_origins: Vec<String>,
    /// Watches one client (a token's subject) may hold open through this gateway; past it,
    /// WatchTask answers RESOURCE_EXHAUSTED. Each shard also bounds its own (--max-watches).
    #[arg(long, env = "PM_MAX_WATCHES_PER_CLIENT", default_value_t = pm_gateway::watch::DEFAULT_MAX_WATCHES_PER_CLIENT)]
    max_watches_per_client: usize,
}

fn origins(given: &[String]) -> pm_gateway::Origins {
    use pm_gateway::Origins;
    if given.iter().any(|o| o == "*") {
        Origins::Any
    } else if given.iter().any(|o| o == "localhost") {
        Origins::Localhost
    } else if given.is_empty() {
        Origins::SameOnly
    } else {
        Origins::List(given.to_vec())
    }
}

fn main() -> std::process::ExitCode {
    // Without tokio's LIFO slot, so many answers to one connection go out in one write.
    pm_proto::server::block_on_without_lifo(serve())
}

async fn serve() -> std::process::ExitCode {
    let args = Args::parse();
    // Spans still queued are sent before the process exits.
    let tracing = pm_proto::server::init_tracing(args.server.log_format, "pm-gateway");
    let code = run(args).await;
    tracing.shutdown().await;
    code
}

async fn run(args: Args) -> std::process::ExitCode {
    if let Err(e) = args.server.init() {
        eprintln!("pm-gateway: {e}");
        return std::process::ExitCode::from(64);
    }
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pm-gateway: cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::from(64);
        }
    };
    let upstreams = pm_gateway::Upstreams {
        tenant_service: args.tenant_service,
        shard: args.shard,
        etcd: args.etcd,
    };
    if args.insecure_no_auth {
        tracing::warn!("authentication is OFF: every caller may do everything");
    }
    let security = pm_gateway::Security {
        auth: !args.insecure_no_auth,
        origins: origins(&args.allow_origins),
        max_watches_per_client: args.max_watches_per_client,
    };
    match pm_gateway::run(
        listener,
        upstreams,
        security,
        pm_proto::server::shutdown_signal(),
    )
    .await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pm-gateway: {e:#}");
            std::process::ExitCode::from(64)
        }
    }
}
