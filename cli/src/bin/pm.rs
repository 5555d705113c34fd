//! `pm`: the all-in-one. `pm dev` runs gateway, tenant-service, a shard and an agent in one
//! process.

// jemalloc on x86_64 (pm_proto::server_allocator: why).
pm_proto::server_allocator!();

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use pm_cli::dev::{Dev, DevOptions};

#[derive(Parser)]
#[command(version, about = "pipeline-manager all-in-one")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run gateway, tenant-service, one shard and an agent in this process.
    Dev {
        /// Where metadata and work directories live.
        #[arg(long, env = "PM_DATA_DIR", default_value = "pm-data")]
        data_dir: PathBuf,
        /// The gateway's address (gRPC and grpc-web).
        #[arg(long, env = "PM_LISTEN", default_value = "127.0.0.1:50051")]
        listen: String,
        /// Do not apply the sample `default/demo/ocr` pipeline.
        #[arg(long)]
        no_sample: bool,
        /// Tasks the embedded agent runs at once; 0 runs no embedded agent (run `pm-agent
        /// --endpoint` against this one, from another machine or a Pi).
        #[arg(long, default_value_t = 8)]
        slots: u32,
        /// Run no embedded agent (as `--slots 0`): agents of their own, in containers or on
        /// other machines, serve the pipelines.
        #[arg(long, conflicts_with_all = ["slots", "demo"])]
        no_agent: bool,
        /// Turn authentication on: every call needs a token, and a platform admin's token is
        /// kept fresh in `<data-dir>/admin.token` (its credentials in admin.client).
        #[arg(long)]
        auth: bool,
        /// Serve Prometheus metrics of every component at `http://ADDR/metrics`, each series
        /// labelled with its `component`.
        #[arg(long, env = "PM_METRICS_LISTEN")]
        metrics_listen: Option<String>,
        /// How log lines are written to stderr.
        #[arg(long, env = "PM_LOG_FORMAT", value_enum, default_value_t)]
        log_format: pm_proto::server::LogFormat,
        /// Where jobs see their task's work directory: a private mount namespace per step
        /// binds it here where the host allows one, else this directory is the work
        /// directory and tasks run one at a time.
        #[arg(long, env = "PM_WORK_DIR_AT", default_value = pm_agent::work_mount::DEFAULT_AT)]
        work_dir_at: PathBuf,
        /// Once serving, run the sample OCR pipeline on the sample image and print the text
        /// it recognized.
        #[arg(long, conflicts_with = "no_sample")]
        demo: bool,
        /// Leave work directories where they are made (no --work-dir-at).
        #[arg(long, conflicts_with = "work_dir_at")]
        no_work_dir_at: bool,
        /// Watches one client may hold open (with --auth); past it, WatchTask answers
        /// RESOURCE_EXHAUSTED.
        #[arg(long, env = "PM_MAX_WATCHES_PER_CLIENT", default_value_t = pm_gateway::watch::DEFAULT_MAX_WATCHES_PER_CLIENT)]
        max_watches_per_client: usize,
    },
}

/// How long `--demo` waits for its task.
const DEMO_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

fn main() -> std::process::ExitCode {
    // The gateway and the shard run here: the servers' runtime, without tokio's LIFO slot.
    pm_proto::server::block_on_without_lifo(dev())
}

async fn dev() -> std::process::ExitCode {
    pm_proto::server::private_files();
    let Command::Dev {
        data_dir,
        listen,
        no_sample,
        slots,
        no_agent,
        auth,
        metrics_listen,
        log_format,
        work_dir_at,
        no_work_dir_at,
        demo,
        max_watches_per_client,
    } = Cli::parse().command;
    // Spans still queued are sent before the process exits.
    let tracing = pm_proto::server::init_tracing(log_format, "pm");
    let slots = if no_agent { 0 } else { slots };
    if slots == 0 && demo {
        eprintln!("pm dev: --demo needs the embedded agent (--slots at least 1)");
        return std::process::ExitCode::from(64);
    }
    let mut metrics_addr = None;
    if let Some(addr) = &metrics_listen {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => {
                metrics_addr = listener.local_addr().ok();
                pm_proto::metrics::set_listener(listener);
            }
            Err(e) => {
                eprintln!("pm dev: cannot listen on {addr}: {e}");
                return std::process::ExitCode::from(64);
            }
        }
    }
    let options = DevOptions {
        data_dir,
        listen,
        sample: !no_sample,
        slots,
        auth,
        work_dir_at: (!no_work_dir_at).then_some(work_dir_at),
        max_watches_per_client,
    };
    let token_file = options.data_dir.join(pm_cli::dev::ADMIN_TOKEN_FILE);
    let dev = match Dev::start(options).await {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("pm dev: {e:#}");
            return std::process::ExitCode::from(64);
        }
    };
    let endpoint = dev.endpoint();
    // What a person reads first; with JSON logs, a log line like the others.
    let say = |line: String| match log_format {
        pm_proto::server::LogFormat::Text => eprintln!("{line}"),
        pm_proto::server::LogFormat::Json => tracing::info!("{line}"),
    };
    if let Some(addr) = metrics_addr {
        say(format!(
            "pm dev: metrics of every component at http://{addr}/metrics"
        ));
    }
    let token_env = match auth {
        true => format!("PM_TOKEN_FILE={} ", token_file.display()),
        false => String::new(),
    };
    if auth {
        say(format!(
            "pm dev: serving gRPC and grpc-web on {endpoint} (tenant `default`, auth ON: a platform admin's token is in {})",
            token_file.display()
        ));
    } else {
        say(format!(
            "pm dev: serving gRPC and grpc-web on {endpoint} (tenant `default`, auth OFF: anyone who reaches this port controls everything; --auth turns it on)"
        ));
    }
    say(format!("pm dev: the web console is at {endpoint}/ui/"));
    if let Some(image) = &dev.sample_image_url {
        say(format!(
            "pm dev: try  {token_env}pmctl --endpoint {endpoint} submit default/demo/ocr --param url={image} --wait"
        ));
    }
    if let (true, Some(image)) = (demo, &dev.sample_image_url) {
        let credentials = dev.admin.clone().unwrap_or_default();
        let ran = pm_cli::demo::run_sample(&endpoint, &credentials, image, DEMO_WAIT).await;
        match ran
            .map_err(|e| format!("{e:#}"))
            .and_then(|task| pm_cli::demo::recognized(&task).map(|text| (task.name, text)))
        {
            Ok((name, text)) => say(format!(
                "pm dev: demo: tesseract read {text:?} in {image} ({name})"
            )),
            Err(e) => say(format!("pm dev: demo failed: {e}")),
        }
    }
    pm_proto::server::shutdown_signal().await;
    dev.stop().await;
    tracing.shutdown().await;
    std::process::ExitCode::SUCCESS
}
