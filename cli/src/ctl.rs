//! `pmctl`: the command line over the public API. Every command is one or two RPCs through
//! the generated clients; `--output json` prints the canonical proto3 JSON of the answer.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use prost_reflect::{DescriptorPool, DynamicMessage};
use tonic::transport::Channel;

use pm_proto::client::{AuthedChannel, Bearer};
use pm_proto::names::{ApplicationName, PipelineName, TaskName};
use pm_proto::v1::pipeline_service_client::PipelineServiceClient;
use pm_proto::v1::task_service_client::TaskServiceClient;
use pm_proto::v1::tenant_service_client::TenantServiceClient;
use pm_proto::v1::*;

#[derive(Parser, Debug)]
#[command(name = "pmctl", version, about = "Command line for pipeline-manager")]
pub struct Cli {
    /// The gateway.
    #[arg(
        long,
        global = true,
        env = "PM_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoint: String,
    /// How answers are printed.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// A token to send (`authorization: Bearer`); else PM_TOKEN_FILE's, else the one
    /// `pmctl login` cached for this endpoint.
    #[arg(long, global = true, env = "PM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the token (read at every command: `pm dev --auth` keeps its
    /// admin.token fresh).
    #[arg(long, global = true, env = "PM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The CA of the gateway's certificate (PEM): speak TLS to it.
    #[arg(long, global = true, env = "PM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Applications.
    App {
        #[command(subcommand)]
        command: AppCommand,
    },
    /// Pipelines.
    Pipeline {
        #[command(subcommand)]
        command: PipelineCommand,
    },
    /// Submit a task: `pmctl submit TENANT/APP/PIPELINE --param k=v [--wait]`.
    Submit(SubmitArgs),
    /// Tasks.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
    },
    /// API clients of a tenant (their secrets are shown once, at creation).
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// Trade a client's id and secret for a token, cached for this endpoint in
    /// `~/.config/pmctl/token` (readable by you only).
    Login {
        #[arg(long, env = "PM_CLIENT_ID")]
        client_id: String,
        /// Prefer the environment: a command line is visible to other users.
        #[arg(long, env = "PM_CLIENT_SECRET", hide_env_values = true)]
        client_secret: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Create a client of `TENANT`; prints its id and its secret (shown only now).
    Create {
        tenant: String,
        /// A role: tenant-admin, submitter, viewer, agent or platform-admin; repeat for more.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// For agents: a pipeline (`TENANT/APP/PIPELINE`) it may serve; repeat for more.
        #[arg(long = "pipeline")]
        pipelines: Vec<String>,
        /// Dispatch priority of its tasks, 0..=100, smaller first (default 10).
        #[arg(long)]
        priority: Option<u32>,
        #[arg(long, default_value = "")]
        display_name: String,
    },
    /// List a tenant's clients.
    List { tenant: String },
    /// Delete a client, `TENANT/CLIENT_ID`: it gets no new token.
    Delete { client: String },
}

#[derive(Subcommand, Debug)]
pub enum AppCommand {
    /// Create an application: `TENANT/APP`.
    Create { app: String },
    /// List a tenant's applications.
    List {
        #[arg(default_value = "default")]
        tenant: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PipelineCommand {
    /// Create or update a pipeline from a YAML or JSON file (staged, flat or task-pipeline form).
    Apply {
        /// The spec file.
        #[arg(short, long)]
        file: PathBuf,
        /// The application, `TENANT/APP`.
        #[arg(long, default_value = "default/demo")]
        app: String,
        /// The pipeline id; defaults to the spec's `name`.
        #[arg(long)]
        name: Option<String>,
    },
    /// Print the values of the Helm chart charts/pipeline that deploy this pipeline's pods
    /// (`TENANT/APP/PIPELINE`), with the `helm install` line: its executors from the spec,
    /// each with the image given by `--image NAME=IMAGE`. Talks to no server.
    Deploy {
        pipeline: String,
        /// The spec file (as `apply` takes it).
        #[arg(short, long)]
        file: PathBuf,
        /// An executor's image, `NAME=IMAGE`; one for each executor the spec's jobs name.
        #[arg(long = "image", value_name = "NAME=IMAGE")]
        images: Vec<String>,
    },
    /// Show a pipeline: `TENANT/APP/PIPELINE`.
    Get {
        pipeline: String,
        /// A version; the latest when absent.
        #[arg(long)]
        version: Option<u64>,
    },
    /// List an application's pipelines: `TENANT/APP`.
    List {
        #[arg(default_value = "default/demo")]
        app: String,
    },
    /// Show a pipeline's queue: `TENANT/APP/PIPELINE`. Tasks waiting and running, those that
    /// ended in the last minute, how long the next task has waited, agents and free slots.
    Stats {
        pipeline: String,
        /// Show it again every `--interval` seconds until interrupted (one line, or one JSON
        /// object, each time).
        #[arg(long, short)]
        watch: bool,
        /// Seconds between two reads with `--watch`.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval: u64,
    },
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// `TENANT/APP/PIPELINE`.
    pub pipeline: String,
    /// A parameter, `name=value`; repeat for more.
    #[arg(long = "param", short = 'p', value_name = "K=V")]
    pub params: Vec<String>,
    /// 0..=100, smaller runs first (default 10).
    #[arg(long)]
    pub priority: Option<u32>,
    /// Resubmitting with the same key returns the original task.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Seconds the task may run.
    #[arg(long)]
    pub timeout: Option<u32>,
    /// Run these steps instead of the pipeline's (the pipeline must allow inline tasks).
    #[arg(long, value_name = "FILE")]
    pub inline_file: Option<PathBuf>,
    /// The task's input document, JSON (its jobs read it as `input.data`); `@FILE` reads it
    /// from a file.
    #[arg(long, value_name = "JSON")]
    pub input: Option<String>,
    /// Follow the task to its end; the exit code tells how it ended.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Show a task and its result.
    Get { task: String },
    /// Follow a task to its end.
    Watch { task: String },
    /// Cancel a task.
    Cancel { task: String },
    /// List a pipeline's tasks, newest first.
    List {
        pipeline: String,
        /// Only tasks in this state (READY, IN_PROGRESS, DONE, ERROR, CANCELLED).
        #[arg(long)]
        state: Option<String>,
        /// Most tasks to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// Exit codes: 0 DONE or success, 1 a failed call or an ERROR task, 2 CANCELLED.
fn exit_for(state: TaskState) -> ExitCode {
    match state {
        TaskState::Done => ExitCode::SUCCESS,
        TaskState::Cancelled => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

/// Where `pmctl login` keeps its token: `$XDG_CONFIG_HOME/pmctl/token` or
/// `~/.config/pmctl/token`, as `ENDPOINT TOKEN`.
fn login_cache() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("pmctl").join("token"))
}

/// The token to send: --token, else --token-file's, else the login cache's for `endpoint`.
fn token(cli: &Cli) -> anyhow::Result<Option<String>> {
    if let Some(t) = &cli.token {
        return Ok(Some(t.clone()));
    }
    if let Some(path) = &cli.token_file {
        let t = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        return Ok(Some(t.trim().to_owned()));
    }
    let cached = login_cache().and_then(|p| std::fs::read_to_string(p).ok());
    Ok(cached.and_then(|c| {
        let (endpoint, token) = c.trim().split_once(' ')?;
        (endpoint == cli.endpoint).then(|| token.to_owned())
    }))
}

/// Runs one command; errors are printed by the caller.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let tls = pm_proto::tls::TlsArgs {
        tls_ca: cli.tls_ca.clone(),
        ..Default::default()
    };
    tls.init(false)?;
    let channel = pm_proto::client::channel(&cli.endpoint)
        .with_context(|| format!("bad endpoint {:?}", cli.endpoint))?;
    let bearer = Bearer::new(token(&cli)?.as_deref()).map_err(anyhow::Error::msg)?;
    let out = Printer { output: cli.output };
    let c = Conn { channel, bearer };
    match cli.command {
        Command::App { command } => app(c, &out, command).await,
        Command::Pipeline { command } => pipeline(c, &out, command).await,
        Command::Submit(args) => submit(c, &out, args).await,
        Command::Task { command } => task(c, &out, command).await,
        Command::Client { command } => client(c, &out, command).await,
        Command::Login {
            client_id,
            client_secret,
        } => login(&cli.endpoint, c, client_id, client_secret).await,
    }
}

/// A connection to the gateway and the token its calls carry.
struct Conn {
    channel: Channel,
    bearer: Bearer,
}

impl Conn {
    fn pipelines(self) -> PipelineServiceClient<AuthedChannel> {
        pm_proto::client::pipelines_with(self.channel, self.bearer)
    }

    fn tasks(self) -> TaskServiceClient<AuthedChannel> {
        pm_proto::client::tasks_with(self.channel, self.bearer)
    }

    fn tenants(self) -> TenantServiceClient<AuthedChannel> {
        pm_proto::client::tenants_with(self.channel, self.bearer)
    }
}

async fn login(
    endpoint: &str,
    c: Conn,
    client_id: String,
    client_secret: String,
) -> anyhow::Result<ExitCode> {
    let issued = pm_proto::client::auth(c.channel)
        .issue_token(IssueTokenRequest {
            client_id,
            client_secret,
        })
        .await?
        .into_inner();
    let path = login_cache().context("no HOME to keep the token in")?;
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir)?;
    let line = format!("{endpoint} {}\n", issued.access_token);
    pm_auth::secret::write_private_file(&path, line.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!(
        "pmctl: logged in to {endpoint}; the token lasts {} s (kept in {})",
        issued.expires_in_seconds,
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn client(c: Conn, out: &Printer, command: ClientCommand) -> anyhow::Result<ExitCode> {
    let mut clients = c.tenants();
    match command {
        ClientCommand::Create {
            tenant,
            roles,
            pipelines,
            priority,
            display_name,
        } => {
            let roles = roles
                .iter()
                .map(|r| {
                    pm_auth::Role::parse(r)
                        .map(|r| r.to_wire() as i32)
                        .with_context(|| format!("{r:?} is not a role (tenant-admin, submitter, viewer, agent, platform-admin)"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let pipelines = pipelines
                .iter()
                .map(|p| pipeline_name(p).map(|n| n.to_string()))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let created = clients
                .create_client(CreateClientRequest {
                    parent: format!("tenants/{tenant}"),
                    client: Some(Client {
                        display_name,
                        priority,
                        roles,
                        pipelines,
                        ..Client::default()
                    }),
                })
                .await?
                .into_inner();
            out.message("pm.v1.CreateClientResponse", &created, || {
                let c = created.client.clone().unwrap_or_default();
                println!("client_id      {}", c.client_id);
                println!("client_secret  {}", created.client_secret);
                println!("name           {}", c.name);
                eprintln!("pmctl: the secret is not shown again; keep it now");
            });
        }
        ClientCommand::List { tenant } => {
            let listed = clients
                .list_clients(ListClientsRequest {
                    parent: format!("tenants/{tenant}"),
                    page_size: 1000,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            out.message("pm.v1.ListClientsResponse", &listed, || {
                println!("{:<26} {:<10} ROLES", "CLIENT_ID", "PRIORITY");
                for c in &listed.clients {
                    let roles: Vec<&str> = c
                        .roles
                        .iter()
                        .filter_map(|r| pm_auth::Role::from_wire(*r))
                        .map(|r| r.as_str())
                        .collect();
                    println!(
                        "{:<26} {:<10} {}",
                        c.client_id,
                        c.priority.unwrap_or(pm_spec::limits::DEFAULT_PRIORITY),
                        roles.join(",")
                    );
                }
            });
        }
        ClientCommand::Delete { client } => {
            let name = match client.split_once('/') {
                Some((t, id)) if !client.starts_with("tenants/") => {
                    format!("tenants/{t}/clients/{id}")
                }
                _ => client.clone(),
            };
            clients
                .delete_client(DeleteClientRequest { name: name.clone() })
                .await?;
            if out.output == Output::Table {
                println!("deleted {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn application(short: &str) -> anyhow::Result<ApplicationName> {
    let parts: Vec<&str> = short.split('/').collect();
    let full = match parts.as_slice() {
        [t, a] => format!("tenants/{t}/applications/{a}"),
        _ => short.to_owned(),
    };
    ApplicationName::parse(&full)
        .map_err(|e| anyhow::anyhow!("application {short:?}: {e} (or TENANT/APP)"))
}

fn pipeline_name(short: &str) -> anyhow::Result<PipelineName> {
    PipelineName::parse_short(short)
        .map_err(|e| anyhow::anyhow!("pipeline {short:?}: {e} (or TENANT/APP/PIPELINE)"))
}

fn task_name(short: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = short.split('/').collect();
    let full = match parts.as_slice() {
        [t, a, p, id] => format!("tenants/{t}/applications/{a}/pipelines/{p}/tasks/{id}"),
        _ => short.to_owned(),
    };
    TaskName::parse(&full)
        .map(|n| n.to_string())
        .map_err(|e| anyhow::anyhow!("task {short:?}: {e} (or TENANT/APP/PIPELINE/ID)"))
}

async fn app(c: Conn, out: &Printer, command: AppCommand) -> anyhow::Result<ExitCode> {
    let mut client = c.pipelines();
    match command {
        AppCommand::Create { app } => {
            let name = application(&app)?;
            let created = client
                .create_application(CreateApplicationRequest {
                    parent: name.tenant().to_string(),
                    application_id: name.application.clone(),
                    application: None,
                })
                .await?
                .into_inner();
            out.message("pm.v1.Application", &created, || {
                println!("created {}", created.name)
            });
        }
        AppCommand::List { tenant } => {
            let listed = client
                .list_applications(ListApplicationsRequest {
                    parent: format!("tenants/{tenant}"),
                    page_size: 1000,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            out.message("pm.v1.ListApplicationsResponse", &listed, || {
                println!("{:<60} CREATED", "NAME");
                for a in &listed.applications {
                    println!("{:<60} {}", a.name, when(a.create_time_ms));
                }
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn pipeline(c: Conn, out: &Printer, command: PipelineCommand) -> anyhow::Result<ExitCode> {
    let mut client = c.pipelines();
    match command {
        PipelineCommand::Apply { file, app, name } => {
            let document = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let app = application(&app)?;
            let applied = client
                .apply_pipeline(ApplyPipelineRequest {
                    parent: app.to_string(),
                    pipeline_id: name.unwrap_or_default(),
                    source: Some(apply_pipeline_request::Source::SpecDocument(document)),
                })
                .await?
                .into_inner();
            out.message("pm.v1.Pipeline", &applied, || {
                println!("applied {} version {}", applied.name, applied.version)
            });
        }
        PipelineCommand::Deploy {
            pipeline,
            file,
            images,
        } => {
            let document = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let name = pipeline_name(&pipeline)?;
            print!(
                "{}",
                crate::deploy::values(&name, &file.display().to_string(), &document, &images)?
            );
        }
        PipelineCommand::Get { pipeline, version } => {
            let got = client
                .get_pipeline(GetPipelineRequest {
                    name: pipeline_name(&pipeline)?.to_string(),
                    version: version.unwrap_or(0),
                })
                .await?
                .into_inner();
            out.message("pm.v1.Pipeline", &got, || print_pipeline(&got));
        }
        PipelineCommand::List { app } => {
            let listed = client
                .list_pipelines(ListPipelinesRequest {
                    parent: application(&app)?.to_string(),
                    page_size: 1000,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            out.message("pm.v1.ListPipelinesResponse", &listed, || {
                println!("{:<70} {:>7} STAGES", "NAME", "VERSION");
                for p in &listed.pipelines {
                    let stages = p.spec.as_ref().map_or(0, |s| s.stages.len());
                    println!("{:<70} {:>7} {stages}", p.name, p.version);
                }
            });
        }
        PipelineCommand::Stats {
            pipeline,
            watch,
            interval,
        } => {
            let request = GetPipelineStatsRequest {
                name: pipeline_name(&pipeline)?.to_string(),
                ..Default::default()
            };
            let mut first = true;
            loop {
                let stats = client
                    .get_pipeline_stats(request.clone())
                    .await?
                    .into_inner();
                out.message("pm.v1.PipelineStats", &stats, || {
                    if first {
                        println!(
                            "{:>8} {:>11} {:>9} {:>10} {:>14} {:>10} {:>11} {:>6} {:>10}",
                            "READY",
                            "IN_PROGRESS",
                            "DONE/MIN",
                            "ERROR/MIN",
                            "CANCELLED/MIN",
                            "HEAD_WAIT",
                            "OLDEST_AGE",
                            "AGENTS",
                            "FREE_SLOTS"
                        );
                    }
                    println!(
                        "{:>8} {:>11} {:>9} {:>10} {:>14} {:>10} {:>11} {:>6} {:>10}",
                        stats.ready,
                        stats.in_progress,
                        stats.done_last_minute,
                        stats.error_last_minute,
                        stats.cancelled_last_minute,
                        format!("{:.1}s", stats.head_wait_ms as f64 / 1000.0),
                        format!("{}s", stats.oldest_ready_age_ms / 1000),
                        stats.agents,
                        stats.free_slots
                    );
                });
                first = false;
                if !watch {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(interval)) => {}
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_pipeline(p: &Pipeline) {
    println!("{} (version {})", p.name, p.version);
    let Some(spec) = &p.spec else { return };
    let mut params: Vec<_> = spec.params.iter().collect();
    params.sort_by_key(|(k, _)| k.as_str());
    for (name, param) in params {
        let what = match (&param.default_value, param.required) {
            (Some(d), _) => format!("default {d:?}"),
            (None, true) => "required".to_owned(),
            (None, false) => "optional".to_owned(),
        };
        println!("  param {name}: {what}");
    }
    for stage in &spec.stages {
        println!("  stage {}", stage.name);
        for job in &stage.jobs {
            println!("    job {} (executor {})", job.name, job.executor);
            for command in &job.commands {
                println!("      $ {command}");
            }
        }
    }
}

async fn submit(c: Conn, out: &Printer, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let mut params = HashMap::new();
    for pair in &args.params {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("--param {pair:?}: expected name=value");
        };
        params.insert(k.to_owned(), v.to_owned());
    }
    let inline = match &args.inline_file {
        Some(path) => Some(submit_task_request::Inline::InlineSpecDocument(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        )),
        None => None,
    };
    let input = match &args.input {
        None => None,
        Some(text) => {
            let text = match text.strip_prefix('@') {
                Some(path) => {
                    std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
                }
                None => text.clone(),
            };
            let json: serde_json::Value =
                serde_json::from_str(&text).context("--input is not JSON")?;
            Some(pm_proto::json::from_json(json))
        }
    };
    let mut client = c.tasks();
    let task = client
        .submit_task(SubmitTaskRequest {
            parent: pipeline_name(&args.pipeline)?.to_string(),
            params,
            priority: args.priority,
            idempotency_key: args.idempotency_key.unwrap_or_default(),
            timeout_seconds: args.timeout.unwrap_or(0),
            inline,
            input,
        })
        .await?
        .into_inner();
    if !args.wait {
        out.message("pm.v1.Task", &task, || println!("submitted {}", task.name));
        return Ok(ExitCode::SUCCESS);
    }
    if out.output == Output::Table {
        eprintln!("submitted {}", task.name);
    }
    let state = watch(&mut client, out, task.name).await?;
    Ok(exit_for(state))
}

async fn task(c: Conn, out: &Printer, command: TaskCommand) -> anyhow::Result<ExitCode> {
    let mut client = c.tasks();
    match command {
        TaskCommand::Get { task } => {
            let got = client
                .get_task(GetTaskRequest {
                    name: task_name(&task)?,
                })
                .await?
                .into_inner();
            out.message("pm.v1.Task", &got, || print_task(&got));
        }
        TaskCommand::Watch { task } => {
            let state = watch(&mut client, out, task_name(&task)?).await?;
            return Ok(exit_for(state));
        }
        TaskCommand::Cancel { task } => {
            let cancelled = client
                .cancel_task(CancelTaskRequest {
                    name: task_name(&task)?,
                })
                .await?
                .into_inner();
            out.message("pm.v1.Task", &cancelled, || {
                println!("{} {}", cancelled.name, state_name(cancelled.state))
            });
        }
        TaskCommand::List {
            pipeline,
            state,
            limit,
        } => {
            let state = match state {
                None => TaskState::Unspecified,
                Some(s) => {
                    TaskState::from_str_name(&s.to_ascii_uppercase()).with_context(|| {
                        format!("--state {s:?}: use READY, IN_PROGRESS, DONE, ERROR or CANCELLED")
                    })?
                }
            };
            let listed = client
                .list_tasks(ListTasksRequest {
                    parent: pipeline_name(&pipeline)?.to_string(),
                    state: state as i32,
                    page_size: limit,
                    page_token: String::new(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            out.message("pm.v1.ListTasksResponse", &listed, || {
                println!("{:<34} {:<12} {:>7}  CREATED", "ID", "STATE", "ATTEMPT");
                for t in &listed.tasks {
                    println!(
                        "{:<34} {:<12} {:>7}  {}",
                        t.id,
                        state_name(t.state),
                        t.attempt,
                        when(t.create_time_ms)
                    );
                }
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A `*_ms` time as RFC 3339 (UTC, seconds).
fn when(unix_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn state_name(state: i32) -> &'static str {
    TaskState::try_from(state).map_or("UNKNOWN", |s| s.as_str_name())
}

fn print_task(t: &Task) {
    println!("{}", t.name);
    println!("  state    {} (attempt {})", state_name(t.state), t.attempt);
    let mut params: Vec<_> = t.params.iter().collect();
    params.sort();
    for (k, v) in params {
        println!("  param    {k}={v:?}");
    }
    let json = |value: &Option<prost_types::Value>| {
        value
            .as_ref()
            .and_then(pm_proto::json::to_text)
            .unwrap_or_default()
    };
    if t.input.is_some() {
        println!("  input    {}", json(&t.input));
    }
    // What to search a tracing backend for.
    let trace_id = pm_proto::trace::trace_id_of(&t.traceparent);
    if !trace_id.is_empty() {
        println!("  trace    {trace_id}");
    }
    let Some(result) = &t.result else { return };
    if !result.error.is_empty() {
        println!("  error    {}", result.error);
    }
    if result.output.is_some() {
        println!("  output   {}", json(&result.output));
    }
    for job in &result.jobs {
        let status = match (job.succeeded, job.allowed_failure) {
            (true, _) => "ok",
            (false, true) => "failed (allowed)",
            (false, false) => "failed",
        };
        println!(
            "  job      {}/{} {status} after {} attempt(s), {} ms",
            job.stage, job.job, job.attempts, job.duration_ms
        );
        for (i, step) in job.steps.iter().enumerate() {
            println!(
                "    step {i} exit {} in {} ms: {}",
                step.exit_code, step.duration_ms, step.command
            );
            print_output("stdout", &step.stdout, step.stdout_truncated);
            print_output("stderr", &step.stderr, step.stderr_truncated);
        }
    }
}

fn print_output(label: &str, text: &str, truncated: bool) {
    if text.is_empty() {
        return;
    }
    println!("      {label}:");
    for line in text.lines() {
        println!("        {line}");
    }
    if truncated {
        println!("        [truncated]");
    }
}

fn step_label(step: &Option<StepRef>) -> String {
    step.as_ref().map_or_else(String::new, |s| {
        format!("{}/{} step {}", s.stage, s.job, s.step)
    })
}

/// Follows a task to its end: spinners per step on a terminal, plain lines otherwise, one
/// JSON event per line with `--output json`. Returns the final state.
async fn watch(
    client: &mut TaskServiceClient<AuthedChannel>,
    out: &Printer,
    name: String,
) -> anyhow::Result<TaskState> {
    use task_event::Event;
    let mut stream = client
        .watch_task(WatchTaskRequest { name: name.clone() })
        .await?
        .into_inner();
    let live = out.output == Output::Table && std::io::stderr().is_terminal();
    let bars = live.then(MultiProgress::new);
    let mut spinners: HashMap<String, ProgressBar> = HashMap::new();
    let mut streamed_output = false;
    let say = |line: String| match &bars {
        Some(bars) => {
            let _ = bars.println(line);
        }
        None => println!("{line}"),
    };
    while let Some(event) = stream.message().await? {
        if out.output == Output::Json {
            out.json("pm.v1.TaskEvent", &event);
        }
        let Some(e) = event.event else { continue };
        if out.output == Output::Json {
            if let Event::Finished(task) = e {
                return Ok(TaskState::try_from(task.state).unwrap_or_default());
            }
            continue;
        }
        match e {
            Event::Snapshot(t) => say(format!("{}: {}", t.name, state_name(t.state))),
            Event::StateChanged(s) => {
                let reason = if s.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", s.reason)
                };
                say(format!(
                    "state {} attempt {}{reason}",
                    state_name(s.state),
                    s.attempt
                ));
            }
            Event::StepStarted(s) => {
                let label = step_label(&s.step);
                match &bars {
                    Some(bars) => {
                        let spinner = bars.add(ProgressBar::new_spinner());
                        spinner.set_style(
                            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                                .expect("static template"),
                        );
                        spinner.set_message(format!("{label}: {}", s.command));
                        spinner.enable_steady_tick(Duration::from_millis(100));
                        spinners.insert(label, spinner);
                    }
                    None => say(format!("> {label}: {}", s.command)),
                }
            }
            Event::Output(chunk) => {
                streamed_output = true;
                for line in chunk.data.lines() {
                    say(format!("  | {line}"));
                }
            }
            Event::StepFinished(f) => {
                let label = step_label(&f.step);
                let r = f.result.unwrap_or_default();
                let mark = if r.exit_code == 0 && !r.timed_out {
                    "ok"
                } else {
                    "FAILED"
                };
                let line = format!(
                    "{mark} {label}: exit {} in {} ms{}",
                    r.exit_code,
                    r.duration_ms,
                    if r.timed_out { " (timed out)" } else { "" }
                );
                match spinners.remove(&label) {
                    Some(spinner) => {
                        // A finished step leaves one permanent line, not a stale spinner.
                        spinner.finish_and_clear();
                        say(line);
                    }
                    None => say(line),
                }
            }
            Event::Finished(task) => {
                for spinner in spinners.values() {
                    spinner.finish();
                }
                let state = TaskState::try_from(task.state).unwrap_or_default();
                if !streamed_output {
                    print_task(&task);
                } else if let Some(error) = task
                    .result
                    .as_ref()
                    .map(|r| &r.error)
                    .filter(|e| !e.is_empty())
                {
                    say(format!("error: {error}"));
                }
                say(format!("{} {}", task.name, state.as_str_name()));
                return Ok(state);
            }
        }
    }
    bail!("the watch of {name} ended before the task finished")
}

/// Prints answers as tables or as proto3 JSON.
struct Printer {
    output: Output,
}

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(pm_proto::FILE_DESCRIPTOR_SET).expect("our own descriptor set")
    })
}

impl Printer {
    fn message<M: prost::Message>(&self, full_name: &str, message: &M, table: impl FnOnce()) {
        match self.output {
            Output::Table => table(),
            Output::Json => self.json(full_name, message),
        }
    }

    fn json<M: prost::Message>(&self, full_name: &str, message: &M) {
        let descriptor = pool()
            .get_message_by_name(full_name)
            .expect("message names are ours");
        let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
            .expect("a message re-decodes with its own descriptor");
        println!(
            "{}",
            serde_json::to_string(&dynamic).expect("proto JSON serializes")
        );
    }
}

/// The `pmctl` entry point: runs the command and turns errors into one line on stderr.
pub async fn main(cli: Cli) -> ExitCode {
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("pmctl: {:?}: {}", status.code(), status.message()),
                None => eprintln!("pmctl: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
