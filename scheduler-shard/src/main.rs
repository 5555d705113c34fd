//! `pm-shard`: one scheduler shard as its own process.

// jemalloc on x86_64 (pm_proto::server_allocator: why).
pm_proto::server_allocator!();

use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "pipeline-manager scheduler shard")]
struct Args {
    #[command(flatten)]
    server: pm_proto::server::ServerArgs,
    /// Address to serve gRPC on (gateways and agents' streams).
    #[arg(long, env = "PM_LISTEN", default_value = "127.0.0.1:50053")]
    listen: String,
    /// Seconds a lease lasts unless the agent renews it.
    #[arg(long, env = "PM_LEASE_TTL_SECONDS", default_value_t = 30)]
    lease_ttl_seconds: u64,
    /// Most unfinished tasks the shard holds before refusing submits.
    #[arg(long, env = "PM_MAX_ACTIVE_TASKS", default_value_t = 1_000_000)]
    max_active_tasks: usize,
    /// Most unfinished tasks of one client.
    #[arg(long, env = "PM_MAX_ACTIVE_PER_CLIENT", default_value_t = 250_000)]
    max_active_per_client: usize,
    /// Most WatchTask streams served at once.
    #[arg(long, env = "PM_MAX_WATCHES", default_value_t = 10_000)]
    max_watches: usize,
    /// Seconds finished tasks keep their result before they are collected.
    #[arg(long, env = "PM_RETENTION_SECONDS", default_value_t = 24 * 3600)]
    retention_seconds: u64,
    /// Most finished tasks kept: past it the oldest are collected before their retention is
    /// over (memory and disk stay bounded whatever the finish rate).
    #[arg(long, env = "PM_MAX_FINISHED_TASKS", default_value_t = 1_000_000)]
    max_finished_tasks: usize,
    /// Most finished tasks kept of one pipeline: past it that pipeline's oldest are
    /// collected, so one busy pipeline does not push the others' history out.
    #[arg(long, env = "PM_MAX_FINISHED_PER_PIPELINE", default_value_t = 100_000)]
    max_finished_per_pipeline: usize,
    /// Benchmarks only: acknowledge submits without fsync. A machine crash then loses
    /// acknowledged tasks.
    #[arg(long, hide = true)]
    unsafe_no_fsync: bool,
    /// The task store's memtable, MiB (1-1024). Applies to a data dir created with it; an
    /// existing one keeps its first setting. 16 holds ~65 MiB less with a million READY tasks,
    /// at some throughput and tail latency when unary submits saturate the shard.
    #[arg(long, env = "PM_MEMTABLE_MIB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    memtable_mib: u64,
    /// Log a warning for every group commit whose oldest write waited longer than this
    /// (milliseconds, from its request to its answer), with where the time went: queued,
    /// written, synced. Disk stalls show up here.
    #[arg(long, env = "PM_SLOW_COMMIT_MS", default_value_t = 100)]
    slow_commit_ms: u64,
    /// Start even if stored records do not decode: drop them (each is logged and listed in
    /// `salvaged-*.txt` in --data-dir) and serve the rest. Without it such a store refuses
    /// to start, and says so.
    #[arg(long)]
    salvage: bool,
    /// etcd endpoints (comma-separated): join the cluster's hash ring. Without it the shard
    /// is alone and owns every pipeline.
    #[arg(long, env = "PM_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// This shard's stable identity in the ring (a StatefulSet pod name); with the same
    /// disk, a restarted shard gets its pipelines and its backlog back. Default: $HOSTNAME.
    #[arg(long, env = "PM_SHARD_ID")]
    shard_id: Option<String>,
    /// Where gateways and other shards reach this shard, `http://host:port`.
    /// Default: http:// and the address --listen bound (with port 0, the port the kernel
    /// picked).
    #[arg(long, env = "PM_ADVERTISE")]
    advertise: Option<String>,
    /// Seconds the shard's membership lease lasts unless renewed: how long a crashed
    /// shard keeps its pipelines before they go to the next owner.
    #[arg(long, env = "PM_MEMBERSHIP_TTL_SECONDS", default_value_t = 10)]
    membership_ttl_seconds: u64,
    /// Seconds a leaving shard (SIGTERM) may spend handing its tasks to the others; 0, the
    /// default, for as long as it takes: a shard that exits with tasks left strands them on
    /// its disk until it comes back. Bound it with the orchestrator's grace period instead.
    #[arg(long, env = "PM_HANDOFF_SECONDS", default_value_t = 0)]
    handoff_seconds: u64,
    /// Where the shard keeps its tasks (its own disk).
    #[arg(long, env = "PM_DATA_DIR", default_value = "pm-data/shard")]
    data_dir: std::path::PathBuf,
}

fn main() -> std::process::ExitCode {
    // Without tokio's LIFO slot: measured faster here, though not explained (see its doc).
    pm_proto::server::block_on_without_lifo(serve())
}

async fn serve() -> std::process::ExitCode {
    pm_proto::server::private_files();
    let args = Args::parse();
    // Spans still queued are sent before the process exits.
    let tracing = pm_proto::server::init_tracing(args.server.log_format, "pm-shard");
    let code = run(args).await;
    tracing.shutdown().await;
    code
}

async fn run(args: Args) -> std::process::ExitCode {
    if let Err(e) = args.server.init() {
        eprintln!("pm-shard: {e}");
        return std::process::ExitCode::from(64);
    }
    if args.lease_ttl_seconds == 0 {
        eprintln!("pm-shard: --lease-ttl-seconds must be at least 1");
        return std::process::ExitCode::from(64);
    }
    let options = pm_scheduler_shard::Options {
        lease_ttl: Duration::from_secs(args.lease_ttl_seconds),
        max_active_tasks: args.max_active_tasks,
        max_active_per_client: args.max_active_per_client,
        retention: Duration::from_secs(args.retention_seconds),
        max_finished_tasks: args.max_finished_tasks,
        max_finished_per_pipeline: args.max_finished_per_pipeline,
        unsafe_no_fsync: args.unsafe_no_fsync,
        memtable_mib: args.memtable_mib,
        slow_commit: Duration::from_millis(args.slow_commit_ms),
        max_watches: args.max_watches,
        salvage: args.salvage,
        ..Default::default()
    };
    if options.unsafe_no_fsync {
        tracing::warn!("--unsafe-no-fsync: acknowledged tasks are NOT durable (benchmarks only)");
    }
    let scheduler = match pm_scheduler_shard::open(options, Some(&args.data_dir)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pm-shard: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pm-shard: cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::from(64);
        }
    };
    let cluster = if args.etcd.is_empty() {
        pm_scheduler_shard::Cluster::standalone()
    } else {
        let id = args
            .shard_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "pm-shard-0".into());
        if let Err(e) = pm_proto::names::check_id(&id) {
            eprintln!("pm-shard: --shard-id {id:?}: {e}");
            return std::process::ExitCode::from(64);
        }
        let me = pm_cluster::Member {
            id,
            address: args
                .advertise
                .clone()
                .unwrap_or_else(|| match listener.local_addr() {
                    Ok(bound) => format!("http://{bound}"),
                    Err(_) => format!("http://{}", args.listen),
                }),
            started_at: pm_proto::unix_ms(),
        };
        match pm_scheduler_shard::Cluster::join(
            &args.etcd,
            me,
            Duration::from_secs(args.membership_ttl_seconds.max(1)),
            (args.handoff_seconds > 0).then(|| Duration::from_secs(args.handoff_seconds)),
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("pm-shard: cannot join the cluster: {e}");
                return std::process::ExitCode::from(69);
            }
        }
    };
    let shutdown = pm_proto::server::shutdown_signal();
    match pm_scheduler_shard::serve(listener, scheduler, cluster, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pm-shard: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
