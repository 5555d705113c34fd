//! `pm-agent`: connects to the gateway and runs the tasks it is given.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use pm_agent::{AgentOptions, RunnerOptions};
use pm_proto::client::Credentials;

#[derive(Parser)]
#[command(version, about = "pipeline-manager agent")]
struct Args {
    #[command(flatten)]
    tls: pm_proto::tls::TlsArgs,
    #[command(subcommand)]
    command: Option<Command>,
    /// The gateway to connect to.
    #[arg(long, env = "PM_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// Stable id of this agent; defaults to the host name.
    #[arg(long, env = "PM_AGENT_ID")]
    agent_id: Option<String>,
    /// Pipelines to serve (`tenants/t/applications/a/pipelines/p`); none means all allowed.
    #[arg(long = "pipeline", env = "PM_PIPELINES", value_delimiter = ',')]
    pipelines: Vec<String>,
    /// Tasks run at once.
    #[arg(long, env = "PM_SLOTS", default_value_t = 4)]
    slots: u32,
    /// Executors this agent runs; none means any executor runs on the host.
    #[arg(long = "executor", env = "PM_EXECUTORS", value_delimiter = ',')]
    executors: Vec<String>,
    /// Where per-task work directories are made.
    #[arg(long, env = "PM_WORK_ROOT", default_value = "/tmp/pm-work")]
    work_root: PathBuf,
    /// Show each task's work directory to its host jobs at this path (e.g. /mnt/pipe, where
    /// the source documents' commands write), through a private mount namespace per step, or
    /// one task at a time where none is allowed. Off when not given.
    #[arg(long, env = "PM_WORK_DIR_AT")]
    work_dir_at: Option<PathBuf>,
    /// Keep the work directory of a task that failed, for inspection.
    #[arg(long, env = "PM_KEEP_FAILED_WORK_DIRS")]
    keep_failed_work_dirs: bool,
    /// Bytes of stdout and stderr a task's result keeps over all its steps; the rest is cut
    /// and marked truncated (watchers see it live). At most the default: a result must fit
    /// in one message.
    #[arg(long, env = "PM_TASK_OUTPUT_BYTES", default_value_t = pm_agent::runner::TASK_OUTPUT_LIMIT)]
    task_output_bytes: usize,
    /// Bytes of `output.data` (a job's JSON result document) a task's result may carry; a
    /// larger one ends the task ERROR. At most 2 MiB: it shares the result's message with
    /// the steps' output.
    #[arg(long, env = "PM_OUTPUT_DATA_BYTES", default_value_t = pm_agent::runner::OUTPUT_DATA_LIMIT)]
    output_data_bytes: usize,
    /// On SIGTERM, seconds running tasks may take to finish before they are handed back.
    #[arg(long, env = "PM_DRAIN_SECONDS", default_value_t = 30)]
    drain_seconds: u64,
    /// An executor in its own container: `NAME=SOCKET` (its `pm-agent exec-server`); repeat.
    #[arg(
        long = "sidecar",
        env = "PM_SIDECARS",
        value_delimiter = ',',
        value_name = "NAME=SOCKET"
    )]
    sidecars: Vec<String>,
    /// A variable of the agent's environment that jobs on the host may see (besides PATH;
    /// none other is passed); repeat.
    #[arg(
        long = "pass-env",
        env = "PM_PASS_ENV",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pass_env: Vec<String>,
    /// How log lines are written to stderr.
    #[arg(long, env = "PM_LOG_FORMAT", value_enum, default_value_t)]
    log_format: pm_proto::server::LogFormat,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (plaintext HTTP/1.1).
    #[arg(long, env = "PM_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Also serve the direct RunnerService on this address.
    #[arg(long, env = "PM_RUNNER_LISTEN")]
    runner_listen: Option<String>,
    /// The agent client's id (ROLE_AGENT; `pmctl client create --role agent`): with
    /// PM_CLIENT_SECRET, a token is issued when it connects (and reused while fresh).
    #[arg(long, env = "PM_CLIENT_ID", requires = "client_secret")]
    client_id: Option<String>,
    /// The agent client's secret (prefer the environment to the command line).
    #[arg(long, env = "PM_CLIENT_SECRET", hide_env_values = true)]
    client_secret: Option<String>,
    /// A token to present instead of client credentials (it is not renewed).
    #[arg(
        long,
        env = "PM_TOKEN",
        hide_env_values = true,
        conflicts_with = "client_id"
    )]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a spec here and now, without a scheduler, through this agent's RunnerService.
    Run {
        /// The spec, YAML or JSON, in any accepted form.
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// A parameter, `name=value`; repeat for more.
        #[arg(long = "param", short = 'p', value_name = "K=V")]
        params: Vec<String>,
    },
    /// Serve commands inside an executor container, on a Unix socket on the shared volume.
    ExecServer {
        /// e.g. /mnt/pipe/.sockets/wget.sock (mode 0600: only this user may connect).
        #[arg(long)]
        socket: PathBuf,
        /// Work directories it accepts must be inside this one (the shared volume).
        #[arg(long, default_value = "/mnt/pipe")]
        work_root: PathBuf,
        /// Most bytes of stdout and of stderr kept per step, whatever the agent asks.
        #[arg(long, default_value_t = 1024 * 1024)]
        max_output_bytes: u64,
        /// A variable of this container's environment its jobs may see; repeat.
        #[arg(long = "pass-env", value_name = "NAME")]
        pass_env: Vec<String>,
        /// Let this group id use the socket too (mode 0660).
        #[arg(long)]
        socket_group: Option<u32>,
        /// Bind each step's work directory here (e.g. /mnt/pipe, the shared volume's mount
        /// point) in a private mount namespace, where the container allows one; the agent
        /// then gives no `--work-dir-at` of its own for sidecar jobs.
        #[arg(long, env = "PM_WORK_DIR_AT")]
        work_dir_at: Option<PathBuf>,
    },
    /// Exits 0 if an exec-server accepts connections on SOCKET, 1 if not: an executor
    /// container's startup probe (it needs nothing in the executor's image but this binary).
    ExecServerReady {
        #[arg(long)]
        socket: PathBuf,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // Spans still queued are sent before the process exits.
    let tracing = pm_proto::server::init_tracing(args.log_format, "pm-agent");
    let code = run(args).await;
    tracing.shutdown().await;
    code
}

async fn run(args: Args) -> std::process::ExitCode {
    if let Err(e) = args.tls.init(args.runner_listen.is_some()) {
        eprintln!("pm-agent: {e}");
        return std::process::ExitCode::from(64);
    }
    if args.task_output_bytes > pm_agent::runner::TASK_OUTPUT_LIMIT {
        eprintln!(
            "pm-agent: --task-output-bytes is at most {}: a task's result must fit in one message",
            pm_agent::runner::TASK_OUTPUT_LIMIT
        );
        return std::process::ExitCode::from(64);
    }
    if args.output_data_bytes > pm_agent::runner::MAX_OUTPUT_DATA {
        eprintln!(
            "pm-agent: --output-data-bytes is at most {}: a task's result must fit in one message",
            pm_agent::runner::MAX_OUTPUT_DATA
        );
        return std::process::ExitCode::from(64);
    }
    if let Some(Command::ExecServerReady { socket }) = &args.command {
        return match std::os::unix::net::UnixStream::connect(socket) {
            Ok(_) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pm-agent: no exec-server on {}: {e}", socket.display());
                std::process::ExitCode::from(1)
            }
        };
    }
    if let Some(Command::ExecServer {
        socket,
        work_root,
        max_output_bytes,
        pass_env,
        socket_group,
        work_dir_at,
    }) = &args.command
    {
        // Only a private namespace helps here: the agent decides which tasks run at once.
        let probed = work_dir_at
            .as_deref()
            .map(|at| pm_agent::WorkMount::probe(at, work_root));
        let work_mount = match probed {
            Some(mount @ pm_agent::WorkMount::Private { .. }) => {
                tracing::info!("work directories: {}", mount.describe());
                mount
            }
            Some(_) => {
                tracing::warn!(
                    "no mount namespace allowed here: steps see their work directory where the agent made it, not at the --work-dir-at path"
                );
                pm_agent::WorkMount::Off
            }
            None => pm_agent::WorkMount::Off,
        };
        let options = pm_agent::sidecar::ExecServerOptions {
            work_root: work_root.clone(),
            max_output_bytes: *max_output_bytes,
            pass_env: pass_env.clone(),
            socket_group: *socket_group,
            work_mount,
        };
        let served = pm_agent::sidecar::serve(socket, options, pm_proto::server::shutdown_signal());
        return match served.await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pm-agent exec-server: {e:#}");
                std::process::ExitCode::from(64)
            }
        };
    }
    let work_mount = pm_agent::work_mount::probe(args.work_dir_at.as_deref(), &args.work_root);
    if let Some(Command::Run { file, params }) = &args.command {
        let runner = RunnerOptions {
            work_root: args.work_root.clone(),
            work_mount: work_mount.for_concurrent_runs(),
            output_data_limit: args.output_data_bytes,
            keep_failed_work_dirs: args.keep_failed_work_dirs,
            pass_env: args.pass_env.clone(),
            task_output_limit: args.task_output_bytes,
            ..RunnerOptions::default()
        };
        return pm_agent::runner_service::run_locally(runner, file, params).await;
    }
    let mut sidecars = pm_agent::sidecar::Sidecars::new();
    for entry in &args.sidecars {
        let Some((name, socket)) = entry.split_once('=') else {
            eprintln!("pm-agent: --sidecar {entry:?}: expected NAME=SOCKET");
            return std::process::ExitCode::from(64);
        };
        sidecars.insert(name.to_owned(), PathBuf::from(socket));
    }
    if args.slots == 0 {
        eprintln!("pm-agent: --slots must be at least 1");
        return std::process::ExitCode::from(64);
    }
    let slots = work_mount.limit_slots(args.slots);
    let runner = RunnerOptions {
        work_root: args.work_root,
        work_mount,
        output_data_limit: args.output_data_bytes,
        keep_failed_work_dirs: args.keep_failed_work_dirs,
        sidecars,
        pass_env: args.pass_env,
        task_output_limit: args.task_output_bytes,
        ..RunnerOptions::default()
    };
    let shutdown = CancellationToken::new();
    if let Some(addr) = &args.metrics_listen {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => pm_proto::metrics::set_listener(listener),
            Err(e) => {
                eprintln!("pm-agent: cannot listen on {addr}: {e}");
                return std::process::ExitCode::from(64);
            }
        }
        tokio::spawn(pm_proto::metrics::serve_port(
            shutdown.clone().cancelled_owned(),
        ));
    }
    if let Some(addr) = &args.runner_listen {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("pm-agent: cannot listen on {addr}: {e}");
                return std::process::ExitCode::from(64);
            }
        };
        let (mut runner, stop) = (runner.clone(), shutdown.clone());
        // Direct runs are not counted in the agent's slots.
        runner.work_mount = runner.work_mount.for_concurrent_runs();
        tokio::spawn(async move {
            if let Err(e) = pm_agent::serve_runner(listener, runner, stop.cancelled_owned()).await {
                tracing::error!(error = %e, "runner service failed");
            }
        });
    }
    let options = AgentOptions {
        endpoint: args.endpoint,
        agent_id: args.agent_id.unwrap_or_else(default_agent_id),
        pipelines: args.pipelines,
        slots,
        executors: args.executors,
        runner,
        drain_timeout: std::time::Duration::from_secs(args.drain_seconds),
        credentials: match (args.client_id, args.client_secret, args.token) {
            (Some(id), Some(secret), _) => Credentials::Client { id, secret },
            (_, _, Some(token)) => Credentials::Token(token),
            _ => Credentials::None,
        },
    };
    let stop = shutdown.clone();
    tokio::spawn(async move {
        pm_proto::server::shutdown_signal().await;
        stop.cancel();
    });
    pm_agent::run(options, shutdown).await;
    std::process::ExitCode::SUCCESS
}

fn default_agent_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("agent-{}", std::process::id()))
}
