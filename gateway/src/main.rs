//! `pm-gateway`: the public endpoint as its own process.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "pipeline-manager gateway")]
struct Args {
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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pm_proto::server::init_tracing();
    let args = Args::parse();
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
    match pm_gateway::run(listener, upstreams, pm_proto::server::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pm-gateway: {e:#}");
            std::process::ExitCode::from(64)
        }
    }
}
