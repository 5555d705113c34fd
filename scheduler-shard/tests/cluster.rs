//! Cluster mode with real processes and a real etcd: etcd, tenant-service, three shards, two
//! gateways and one agent per pipeline, each its own process. Under a steady load of
//! submits through both gateways, a fourth shard joins, one shard leaves by SIGTERM, and one
//! is SIGKILLed and restarted with the same identity and disk. After each change the agents
//! must keep finishing work, every one of them; at the end every acknowledged task must be
//! DONE and have run (duplicates are counted and allowed, losses are not). After each change
//! the shards' own metrics must show every pipeline's unfinished tasks on its ring owner
//! only, and the pipelines that changed hands must be exactly those whose owner the ring
//! changed. Submits refused meanwhile must be refusals a client retries. Authentication is
//! on, as in production: the test, its gateways' clients and the agents hold tokens of the
//! platform admin that tenant-service bootstraps.
//!
//! Two of the pipelines have `partitions: 6`: `hot`, with two agents, and `idlehot`, whose
//! READY tasks wait on several shards through the changes. Their submits spread over the
//! partitions and so over the shards; their agents get work from every partition owner; a
//! task of `idlehot` is watched and another cancelled by name across the moves; and at the
//! end a paged list of each holds every acknowledged task once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tonic::Code;

mod common;

/// TLS and mTLS between the same processes.
#[path = "cluster/tls.rs"]
mod tls;

use pm_cluster::testing::Etcd;
use pm_cluster::{Membership, Ring};
use pm_proto::client::{AuthedChannel, Bearer, Credentials};
use pm_proto::v1::pipeline_service_client::PipelineServiceClient;
use pm_proto::v1::task_service_client::TaskServiceClient;
use pm_proto::v1::{
    ApplyPipelineRequest, CreateApplicationRequest, CreateTenantRequest, GetTaskRequest,
    PipelineSpec, SubmitTaskRequest, SubmitTasksRequest, TaskEvent, TaskState, WatchTaskRequest,
    apply_pipeline_request, submit_task_result, task_event,
};

const PIPELINES: usize = 8;
/// The partitioned pipelines (the last active one and the last idle one), and their
/// partitions.
const HOT: &str = "hot";
const IDLE_HOT: &str = "idlehot";
const PARTITIONS: u32 = 6;
/// Pipelines without agents until the end: their tasks wait READY through every change, so
/// the handoffs must carry them.
const IDLE: usize = 8;
const SUBMITTERS: usize = 4;
const BATCH: usize = 5;
/// Between a submitter's batches: ~200 tasks/s in all, well within what this machine runs
/// with a dozen processes on two cores.
const PACE: Duration = Duration::from_millis(100);
/// Runs the agents must finish after each change, in all...
const PROGRESS: usize = 40;
/// ...and of every pipeline that has an agent.
const PROGRESS_EACH: usize = 3;

fn bin(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_pm-shard")).with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo nextest run --workspace does)",
        bin.display()
    );
    bin
}

/// A child process, SIGKILLed when dropped.
struct Proc(Child);

impl Proc {
    fn spawn(bin_name: &str, args: &[String], log: &Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(bin(bin_name))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc(child)
    }

    /// Spawns a server given a port-0 address and waits for the line of its log that says
    /// `message`: the address it bound.
    async fn spawn_serving(
        bin_name: &str,
        args: &[String],
        log: &Path,
        message: &str,
    ) -> (Self, std::net::SocketAddr) {
        let from = common::log_end(log);
        let mut p = Self::spawn(bin_name, args, log);
        let addr = common::logged_addr(log, from, message, &mut p.0).await;
        (p, addr)
    }

    fn kill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    /// SIGTERM, then waits (bounded) for the exit; returns whether it exited cleanly.
    fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit {limit:?} after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test's directory; when the test fails it is kept, and the end of every process's log
/// is printed, so a failure in CI can be read.
struct Logs(Option<tempfile::TempDir>);

impl Drop for Logs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Some(dir) = self.0.take() else { return };
        let path = dir.keep();
        eprintln!("test directory kept: {}", path.display());
        let mut logs: Vec<_> = std::fs::read_dir(&path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                name.ends_with(".log") && !name.starts_with("runs-")
            })
            .collect();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {} (last 15 lines)", log.display());
            for line in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("{line}");
            }
        }
    }
}

struct Cluster {
    dir: PathBuf,
    etcd: String,
    tenant_service: String,
    /// The platform admin's client id and secret.
    admin: (String, String),
    /// Each shard's metrics address (`host:port`), as last started.
    metrics: Mutex<BTreeMap<String, String>>,
}

/// The task service of `gateway`, calling with `bearer`'s token.
fn tasks(gateway: &str, bearer: &Bearer) -> TaskServiceClient<AuthedChannel> {
    pm_proto::client::tasks_with(pm_proto::client::channel(gateway).unwrap(), bearer.clone())
}

/// Submits `n` tasks of `pipeline` in one batch; panics unless each is acknowledged.
/// Their names.
async fn submit_acknowledged(
    client: &mut TaskServiceClient<AuthedChannel>,
    pipeline: &str,
    n: usize,
) -> Vec<String> {
    let requests = (0..n)
        .map(|_| SubmitTaskRequest {
            parent: pipeline.to_owned(),
            ..SubmitTaskRequest::default()
        })
        .collect();
    let results = client
        .submit_tasks(SubmitTasksRequest { requests })
        .await
        .unwrap()
        .into_inner()
        .results;
    results
        .into_iter()
        .map(|r| match r.outcome {
            Some(submit_task_result::Outcome::Task(t)) => t.name,
            other => panic!("a submit to {pipeline} failed: {other:?}"),
        })
        .collect()
}

/// Every task of `pipeline`, listed in pages of `page_size` (at most 10,000 pages), in the
/// order listed.
async fn list_all(
    client: &mut TaskServiceClient<AuthedChannel>,
    pipeline: &str,
    page_size: u32,
) -> Vec<String> {
    let mut listed = Vec::new();
    let mut token = String::new();
    for _ in 0..10_000 {
        let page = client
            .list_tasks(pm_proto::v1::ListTasksRequest {
                parent: pipeline.to_owned(),
                page_size,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.tasks.into_iter().map(|t| t.name));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    listed
}

impl Cluster {
    /// tenant-service on `etcd` (it makes the platform admin, whose secret it writes to a
    /// file before it listens) and the cluster around it; the process runs while kept.
    async fn boot(dir: &Path, etcd: &Etcd) -> (Cluster, Proc) {
        let admin_file = dir.join("admin.client");
        let (tenant, tenant_addr) = Proc::spawn_serving(
            "pm-tenant-service",
            &[
                "--etcd".into(),
                etcd.endpoint.clone(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--bootstrap-admin-file".into(),
                admin_file.display().to_string(),
            ],
            &dir.join("tenant.log"),
            "tenant-service serving",
        )
        .await;
        let mut saved = None;
        until(
            "the platform admin is made",
            Duration::from_secs(30),
            async || {
                saved = std::fs::read_to_string(&admin_file).ok();
                saved.is_some()
            },
        )
        .await;
        let saved = saved.unwrap();
        let (id, secret) = saved.trim().split_once(':').expect("id:secret");
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            etcd: etcd.endpoint.clone(),
            tenant_service: format!("http://{tenant_addr}"),
            admin: (id.to_owned(), secret.to_owned()),
            metrics: Mutex::default(),
        };
        (cluster, tenant)
    }

    /// The platform admin's token, once `gateway` issues one.
    async fn login(&self, gateway: &str) -> Bearer {
        let channel = pm_proto::client::channel(gateway).unwrap();
        let mut token = None;
        until(
            "the gateway issues a token",
            Duration::from_secs(30),
            async || {
                let admin = Credentials::Client {
                    id: self.admin.0.clone(),
                    secret: self.admin.1.clone(),
                };
                token = admin.token(&channel).await.ok().flatten();
                token.is_some()
            },
        )
        .await;
        Bearer::new(token.as_deref()).unwrap()
    }

    /// Tenant `c` and its application `a`, made through `gateway`: its pipeline service.
    async fn application(
        &self,
        gateway: &str,
        bearer: &Bearer,
    ) -> PipelineServiceClient<AuthedChannel> {
        let channel = pm_proto::client::channel(gateway).unwrap();
        let mut tenants = pm_proto::client::tenants_with(channel.clone(), bearer.clone());
        until("the gateway serves", Duration::from_secs(30), async || {
            let r = tenants
                .create_tenant(CreateTenantRequest {
                    tenant_id: "c".into(),
                    tenant: None,
                })
                .await;
            r.is_ok() || r.is_err_and(|s| s.code() == Code::AlreadyExists)
        })
        .await;
        let mut config = pm_proto::client::pipelines_with(channel, bearer.clone());
        config
            .create_application(CreateApplicationRequest {
                parent: "tenants/c".into(),
                application_id: "a".into(),
                application: None,
            })
            .await
            .unwrap();
        config
    }

    /// Why a ring wait failed: the ring seen, and the last lines of each expected shard's
    /// log (a shard that could not start says why there).
    fn ring_failure(&self, view: &Membership, want: &[&str]) -> String {
        let mut out = format!("the ring is {:?}, wanted {want:?}", ids(&view.ring()));
        for id in want {
            let log =
                std::fs::read_to_string(self.dir.join(format!("{id}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            out += &format!("\n--- {id}.log, last lines:");
            for line in tail.into_iter().rev() {
                out += &format!("\n{line}");
            }
        }
        out
    }

    /// Shard `id`, whose handoff on leaving is bounded at 20 s (this test's changes come
    /// one after another; an unbounded one is [`Cluster::shard_with`]).
    async fn shard(&self, id: &str) -> Proc {
        self.shard_with(id, &["--handoff-seconds", "20"]).await
    }

    /// Shard `id`, once it listens for metrics (it logs that before it opens its store).
    async fn shard_with(&self, id: &str, extra: &[&str]) -> Proc {
        // Ports the kernel picks, even for a restart: the identity is the id and the disk,
        // and the shard advertises in the ring the address it bound.
        let args: Vec<String> = [
            "--metrics-listen",
            "127.0.0.1:0",
            "--etcd",
            &self.etcd,
            "--shard-id",
            id,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &self.dir.join(id).display().to_string(),
            "--membership-ttl-seconds",
            "2",
            "--lease-ttl-seconds",
            "3",
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .map(String::from)
        .collect();
        let log = self.dir.join(format!("{id}.log"));
        let (p, metrics) = Proc::spawn_serving("pm-shard", &args, &log, "metrics listening").await;
        self.metrics
            .lock()
            .unwrap()
            .insert(id.to_owned(), metrics.to_string());
        p
    }

    async fn gateway(&self, n: usize) -> (Proc, String) {
        let args = [
            "--etcd".to_owned(),
            self.etcd.clone(),
            "--tenant-service".to_owned(),
            self.tenant_service.clone(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        let log = self.dir.join(format!("gw{n}.log"));
        let (p, addr) = Proc::spawn_serving("pm-gateway", &args, &log, "gateway serving").await;
        (p, format!("http://{addr}"))
    }

    fn agent(&self, n: usize, gateway: &str, pipeline: &str) -> Proc {
        let args = [
            "--endpoint",
            gateway,
            "--agent-id",
            &format!("agent-{n}"),
            "--pipeline",
            pipeline,
            "--slots",
            "4",
            "--work-root",
            &self.dir.join("work").display().to_string(),
            "--client-id",
            &self.admin.0,
            "--client-secret",
            &self.admin.1,
        ]
        .map(String::from);
        Proc::spawn("pm-agent", &args, &self.dir.join(format!("agent-{n}.log")))
    }
}

/// The runs log of pipeline `id`.
fn log_of(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("runs-{id}.log"))
}

fn spec(log: &Path) -> PipelineSpec {
    // One line per execution: runs and duplicates are counted from it. The sleep keeps some
    // tasks leased at every change.
    common::spec(vec![
        format!("echo \"$PM_TASK_ID\" >> {}", log.display()),
        "sleep 0.1".into(),
    ])
}

fn runs(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Every run of every pipeline.
fn all_runs(logs: &[PathBuf]) -> Vec<String> {
    logs.iter().flat_map(|l| runs(l)).collect()
}

/// Polls `f` every 50 ms until it holds; panics with `what` after `limit`.
async fn until(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the agents have finished `PROGRESS` more runs, and every pipeline's agent
/// `PROGRESS_EACH` more: one stalled pipeline fails here, not at the end.
async fn progress(logs: &[PathBuf], what: &str) {
    let start: Vec<usize> = logs.iter().map(|l| runs(l).len()).collect();
    until(what, Duration::from_secs(45), async || {
        let now: Vec<usize> = logs.iter().map(|l| runs(l).len()).collect();
        let total: usize = now.iter().sum::<usize>() - start.iter().sum::<usize>();
        total >= PROGRESS && now.iter().zip(&start).all(|(n, s)| *n >= s + PROGRESS_EACH)
    })
    .await;
}

/// Which shards hold unfinished tasks of each pipeline (`tenants/c/...` names), from the
/// shards' own metrics (`pm_queue_tasks`).
async fn holders(cluster: &Cluster, live: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let mut held: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for id in live {
        let addr = cluster.metrics.lock().unwrap()[*id].clone();
        let Ok(text) = scrape(&addr).await else {
            continue;
        };
        for line in text.lines().filter(|l| l.starts_with("pm_queue_tasks{")) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if value.parse::<f64>().unwrap_or(0.0) <= 0.0 {
                continue;
            }
            let label = |name: &str| {
                let start = series.find(&format!("{name}=\""))? + name.len() + 2;
                let end = series[start..].find('"')? + start;
                Some(series[start..end].to_owned())
            };
            if let (Some(t), Some(a), Some(p)) =
                (label("tenant"), label("application"), label("pipeline"))
            {
                held.entry(format!("tenants/{t}/applications/{a}/pipelines/{p}"))
                    .or_default()
                    .insert(id.to_string());
            }
        }
    }
    held
}

/// The test's own view of the ring in etcd, as the gateways build it, until `cancel`.
async fn ring_view(etcd: &str, cancel: &CancellationToken) -> Membership {
    let client = pm_cluster::etcd::connect(&[etcd.to_owned()]).await.unwrap();
    Membership::watch(client, cancel.clone())
}

/// One GET of a shard's /metrics.
async fn scrape(addr: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

fn partitions_of(name: &str) -> u32 {
    if name.ends_with(&format!("/{HOT}")) || name.ends_with(&format!("/{IDLE_HOT}")) {
        PARTITIONS
    } else {
        1
    }
}

/// The ring owners of pipeline `name`'s partitions.
fn owners(ring: &Ring, name: &str) -> BTreeSet<String> {
    let pipeline = pm_proto::names::PipelineName::parse(name).unwrap();
    ring.partition_owners(&pipeline, partitions_of(name))
        .into_keys()
        .collect()
}

/// Waits until every pipeline's unfinished tasks are on its partitions' owners in `ring`
/// and nowhere else, as the live shards report them, and each of `must_hold` is on all of
/// them; returns who holds what.
async fn settled(
    cluster: &Cluster,
    ring: &Ring,
    live: &[&str],
    must_hold: &[String],
    what: &str,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut held = BTreeMap::new();
    until(what, Duration::from_secs(30), async || {
        held = holders(cluster, live).await;
        must_hold
            .iter()
            .all(|p| held.get(p) == Some(&owners(ring, p)))
            && held
                .iter()
                .all(|(p, shards)| shards.is_subset(&owners(ring, p)))
    })
    .await;
    held
}

fn ids(ring: &Ring) -> Vec<String> {
    ring.members().map(|m| m.id.clone()).collect()
}

#[derive(Default)]
struct Load {
    acked: Mutex<HashSet<String>>,
    refused: Mutex<BTreeMap<String, usize>>,
}

async fn submitter(
    gateway: String,
    bearer: Bearer,
    pipelines: Arc<Vec<String>>,
    load: Arc<Load>,
    stop: CancellationToken,
    n: usize,
) {
    let mut client = tasks(&gateway, &bearer);
    let mut i = n;
    while !stop.is_cancelled() {
        let requests = (0..BATCH)
            .map(|j| SubmitTaskRequest {
                parent: pipelines[(i + j) % pipelines.len()].clone(),
                ..SubmitTaskRequest::default()
            })
            .collect();
        i += 1;
        let call = client.submit_tasks(SubmitTasksRequest { requests });
        match tokio::time::timeout(Duration::from_secs(10), call).await {
            Ok(Ok(response)) => {
                for r in response.into_inner().results {
                    match r.outcome {
                        Some(submit_task_result::Outcome::Task(t)) => {
                            load.acked.lock().unwrap().insert(t.name);
                        }
                        Some(submit_task_result::Outcome::Error(e)) => {
                            let code = format!("{:?}", Code::from_i32(e.code));
                            *load.refused.lock().unwrap().entry(code).or_default() += 1;
                        }
                        None => {}
                    }
                }
            }
            Ok(Err(status)) => {
                *load
                    .refused
                    .lock()
                    .unwrap()
                    .entry(format!("{:?}", status.code()))
                    .or_default() += BATCH;
            }
            Err(_) => {
                *load
                    .refused
                    .lock()
                    .unwrap()
                    .entry("timeout".into())
                    .or_default() += BATCH
            }
        }
        tokio::time::sleep(PACE).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_join_leave_and_crash_under_load_and_no_acknowledged_task_is_lost() {
    let tmp = Logs(Some(tempfile::tempdir().unwrap()));
    let dir = tmp.0.as_ref().unwrap().path().to_path_buf();
    let etcd = Etcd::start();
    let (cluster, _tenant) = Cluster::boot(&dir, &etcd).await;

    // The test's own view of the ring, as the gateways build it.
    let cancel = CancellationToken::new();
    let view = ring_view(&etcd.endpoint, &cancel).await;
    let ring_is = |want: &'static [&'static str]| {
        move |r: &Arc<Ring>| ids(r) == want.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let wait_ring = Duration::from_secs(20);

    let mut shards: HashMap<&str, Proc> = HashMap::new();
    for id in ["s0", "s1", "s2"] {
        shards.insert(id, cluster.shard(id).await);
    }
    assert!(
        view.wait_for(wait_ring, ring_is(&["s0", "s1", "s2"])).await,
        "{}",
        cluster.ring_failure(&view, &["s0", "s1", "s2"])
    );
    let (_gw0, gw0) = cluster.gateway(0).await;
    let (_gw1, gw1) = cluster.gateway(1).await;
    let gateways = [gw0.clone(), gw1.clone()];

    // Configuration through a gateway, stored in etcd by tenant-service.
    let bearer = cluster.login(&gw0).await;
    let mut config = cluster.application(&gw0, &bearer).await;
    let mut pipelines = Vec::new();
    let mut logs = Vec::new();
    let ids_of_pipelines = (0..PIPELINES - 1)
        .map(|p| format!("p{p}"))
        .chain([HOT.to_owned()])
        .chain((0..IDLE - 1).map(|p| format!("idle{p}")))
        .chain([IDLE_HOT.to_owned()]);
    for id in ids_of_pipelines {
        let log = log_of(&dir, &id);
        let mut spec = spec(&log);
        if id == HOT || id == IDLE_HOT {
            spec.partitions = PARTITIONS;
        }
        let applied = config
            .apply_pipeline(ApplyPipelineRequest {
                parent: "tenants/c/applications/a".into(),
                pipeline_id: id,
                source: Some(apply_pipeline_request::Source::Spec(spec)),
            })
            .await
            .unwrap();
        pipelines.push(applied.into_inner().name);
        logs.push(log);
    }
    // The pipelines with agents from the start.
    let active_logs = &logs[..PIPELINES];
    let pipelines = Arc::new(pipelines);
    let mut agents: Vec<Proc> = pipelines[..PIPELINES]
        .iter()
        .enumerate()
        .map(|(n, p)| cluster.agent(n, &gateways[n % 2], p))
        .collect();
    // The hot pipeline's second agent, through the other gateway.
    let hot = pipelines[PIPELINES - 1].clone();
    let idle_hot = pipelines[PIPELINES + IDLE - 1].clone();
    agents.push(cluster.agent(100, &gateways[PIPELINES % 2], &hot));

    let load = Arc::new(Load::default());
    let stop = CancellationToken::new();
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|n| {
            tokio::spawn(submitter(
                gateways[n % 2].clone(),
                bearer.clone(),
                pipelines.clone(),
                load.clone(),
                stop.clone(),
                n,
            ))
        })
        .collect();
    progress(active_logs, "runs with three shards").await;
    let first_ring = view.ring();

    // The hot pipelines' submits spread over their partitions, and so over the shards: a
    // burst of batches to each through both gateways.
    let acked_of = |p: &str| -> Vec<String> {
        let acked = load.acked.lock().unwrap();
        let prefix = format!("{p}/tasks/");
        acked
            .iter()
            .filter(|t| t.starts_with(&prefix))
            .cloned()
            .collect()
    };
    let mut spread: Vec<String> = Vec::new();
    for (i, pipeline) in [&hot, &idle_hot, &hot, &idle_hot].into_iter().enumerate() {
        let mut client = tasks(&gateways[i % 2], &bearer);
        for _ in 0..3 {
            spread.extend(submit_acknowledged(&mut client, pipeline, 50).await);
        }
    }
    load.acked.lock().unwrap().extend(spread.iter().cloned());
    let mut by_partition = vec![0usize; PARTITIONS as usize];
    let mut by_shard: BTreeMap<String, usize> = BTreeMap::new();
    for name in &spread {
        let task = pm_proto::names::TaskName::parse(name).unwrap();
        by_partition[task.partition() as usize] += 1;
        let key = pm_cluster::RingKey::of_task(&task);
        *by_shard
            .entry(first_ring.owner(&key).unwrap().id.clone())
            .or_default() += 1;
    }
    eprintln!(
        "hot submits: {} by partition {by_partition:?}, by shard {by_shard:?}",
        spread.len()
    );
    let even = spread.len() as f64 / f64::from(PARTITIONS);
    for (p, n) in by_partition.iter().enumerate() {
        assert!(
            (*n as f64 - even).abs() <= even * 0.5,
            "partition {p} got {n} of {} submits: {by_partition:?}",
            spread.len()
        );
    }
    // Every shard gets a share within ±50% of even: the ring spreads one pipeline's
    // partitions evenly (docs/partitions.md).
    let even = spread.len() as f64 / 3.0;
    assert_eq!(by_shard.len(), 3, "every shard gets a share: {by_shard:?}");
    for (shard, n) in &by_shard {
        assert!(
            (*n as f64 - even).abs() <= even * 0.5,
            "shard {shard} got {n} of {} submits: {by_shard:?}",
            spread.len()
        );
    }

    // A watch on one task of each idle pipeline, open through every change until the task
    // finishes at the end: the gateway follows each task to its new owner.
    let idle_task = |p: &str| {
        let acked = load.acked.lock().unwrap();
        acked
            .iter()
            .find(|t| t.starts_with(&format!("{p}/")))
            .cloned()
    };
    until(
        "a task of every idle pipeline acknowledged",
        Duration::from_secs(20),
        async || {
            pipelines[PIPELINES..]
                .iter()
                .all(|p| idle_task(p).is_some())
        },
    )
    .await;
    let watched: Vec<String> = pipelines[PIPELINES..]
        .iter()
        .filter_map(|p| idle_task(p))
        .collect();
    let watches: Vec<_> = watched
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let endpoint = gateways[i % 2].clone();
            let name = name.clone();
            let bearer = bearer.clone();
            tokio::spawn(async move {
                let mut client = tasks(&endpoint, &bearer);
                let mut events = client
                    .watch_task(WatchTaskRequest { name })
                    .await
                    .unwrap()
                    .into_inner();
                loop {
                    match events.message().await {
                        Ok(Some(TaskEvent {
                            event: Some(task_event::Event::Finished(task)),
                            ..
                        })) => return Ok(task.state),
                        Ok(Some(_)) => {}
                        Ok(None) => return Err("ended without Finished".to_owned()),
                        Err(status) => return Err(format!("{status:?}")),
                    }
                }
            })
        })
        .collect();

    // After each change: the shards hold each pipeline's tasks where the ring says, and the
    // idle pipelines (always holding READY tasks) changed hands exactly where the ring moved
    // them.
    let idle: Vec<String> = pipelines[PIPELINES..].to_vec();
    let mut held = settled(
        &cluster,
        &view.ring(),
        &["s0", "s1", "s2"],
        &idle,
        "tasks on their owners with three shards",
    )
    .await;
    let mut idle_moves = 0;
    let mut step = async |before: &Ring, after: &Ring, live: &[&str], what: &str| {
        let now = settled(&cluster, after, live, &idle, what).await;
        let by_ring: BTreeSet<&String> = idle
            .iter()
            .filter(|p| owners(before, p) != owners(after, p))
            .collect();
        let by_shards: BTreeSet<&String> = idle
            .iter()
            .filter(|p| held.get(*p) != now.get(*p))
            .collect();
        eprintln!(
            "{what}: {:?} -> {:?}: idle pipelines moved by the ring {:?}, by the shards {:?}",
            ids(before),
            ids(after),
            by_ring,
            by_shards
        );
        assert_eq!(
            by_shards, by_ring,
            "{what}: the shards moved other pipelines than the ring did"
        );
        idle_moves += by_ring.len();
        held = now;
    };

    // 1. A shard joins.
    let before = view.ring();
    shards.insert("s3", cluster.shard("s3").await);
    assert!(
        view.wait_for(wait_ring, ring_is(&["s0", "s1", "s2", "s3"]))
            .await,
        "{}",
        cluster.ring_failure(&view, &["s0", "s1", "s2", "s3"])
    );
    step(&before, &view.ring(), &["s0", "s1", "s2", "s3"], "join s3").await;
    progress(active_logs, "runs after s3 joined").await;

    // 2. A shard leaves by SIGTERM: it leaves the ring, hands off, and exits cleanly.
    let before = view.ring();
    let clean = tokio::task::spawn_blocking({
        let s0 = shards.remove("s0").unwrap();
        move || s0.terminate(Duration::from_secs(40))
    })
    .await
    .unwrap();
    assert!(
        clean.success(),
        "s0 did not exit cleanly after SIGTERM: {clean}"
    );
    assert!(
        view.wait_for(wait_ring, ring_is(&["s1", "s2", "s3"])).await,
        "{}",
        cluster.ring_failure(&view, &["s1", "s2", "s3"])
    );
    step(&before, &view.ring(), &["s1", "s2", "s3"], "SIGTERM s0").await;
    progress(active_logs, "runs after s0 left").await;

    // 3. A shard is SIGKILLed: its keys go to the others when its lease expires...
    let before = view.ring();
    shards.remove("s1").unwrap().kill();
    assert!(
        view.wait_for(wait_ring, ring_is(&["s2", "s3"])).await,
        "{}",
        cluster.ring_failure(&view, &["s2", "s3"])
    );
    step(&before, &view.ring(), &["s2", "s3"], "SIGKILL s1").await;
    progress(active_logs, "runs while s1 is down").await;
    // ...and it comes back with the same identity and disk, and serves its backlog.
    let before = view.ring();
    shards.insert("s1", cluster.shard("s1").await);
    assert!(
        view.wait_for(wait_ring, ring_is(&["s1", "s2", "s3"])).await,
        "{}",
        cluster.ring_failure(&view, &["s1", "s2", "s3"])
    );
    step(&before, &view.ring(), &["s1", "s2", "s3"], "restart s1").await;
    progress(active_logs, "runs after s1 returned").await;

    // A READY task of the partitioned idle pipeline, on another shard than it was queued
    // on, is cancelled by its name through a gateway.
    let now = view.ring();
    let moved_task = acked_of(&idle_hot)
        .into_iter()
        .filter(|t| !watched.contains(t))
        .find(|t| {
            let key = pm_cluster::RingKey::of_task(&pm_proto::names::TaskName::parse(t).unwrap());
            first_ring.owner(&key).map(|m| &m.id) != now.owner(&key).map(|m| &m.id)
        })
        .expect("a task of idlehot whose partition moved");
    let mut client = tasks(&gw0, &bearer);
    let cancelled = client
        .cancel_task(pm_proto::v1::CancelTaskRequest {
            name: moved_task.clone(),
        })
        .await
        .expect("cancel by name after the move")
        .into_inner();
    assert_eq!(cancelled.state, TaskState::Cancelled as i32, "{moved_task}");

    stop.cancel();
    for s in submitters {
        s.await.unwrap();
    }
    // The idle pipelines' tasks waited through the changes; now they get agents.
    assert!(
        idle_moves > 0,
        "no idle pipeline changed owners: the test proves no READY handoff"
    );
    for (n, p) in pipelines[PIPELINES..].iter().enumerate() {
        agents.push(cluster.agent(PIPELINES + n, &gateways[n % 2], p));
    }
    let acked: Vec<String> = load
        .acked
        .lock()
        .unwrap()
        .iter()
        .filter(|t| **t != moved_task)
        .cloned()
        .collect();
    let refused = load.refused.lock().unwrap().clone();
    eprintln!("acknowledged {} tasks; refused {refused:?}", acked.len());
    // A ring change may refuse a submit, but only as a client retries it: never "not the
    // owner" (the gateway follows the ring), never a bad request or an internal error.
    for code in refused.keys() {
        assert!(
            ["Unavailable", "Aborted", "DeadlineExceeded", "timeout"].contains(&code.as_str()),
            "a submit refused with {code} during ring changes: {refused:?}"
        );
    }
    assert!(
        acked.len() > 4 * PROGRESS,
        "too few tasks acknowledged: {}",
        acked.len()
    );

    for (name, watch) in watched.iter().zip(watches) {
        let finished = tokio::time::timeout(Duration::from_secs(90), watch)
            .await
            .expect("the watch finishes")
            .unwrap();
        assert_eq!(finished, Ok(TaskState::Done as i32), "watch of {name}");
    }

    // Every acknowledged task ends DONE, whichever shard holds it now.
    let mut tasks = tasks(&gw1, &bearer);
    let mut pending: Vec<String> = acked.clone();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last_states = BTreeMap::new();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        last_states.clear();
        for name in pending {
            let state = match tasks.get_task(GetTaskRequest { name: name.clone() }).await {
                Ok(t) => format!(
                    "{:?}",
                    TaskState::try_from(t.into_inner().state).unwrap_or_default()
                ),
                Err(s) => format!("{:?}", s.code()),
            };
            if state != "Done" {
                *last_states.entry(state).or_insert(0usize) += 1;
                still.push(name);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(
        pending.is_empty(),
        "{} acknowledged tasks not DONE after 90 s (by state: {last_states:?}), e.g. {:?}",
        pending.len(),
        &pending[..pending.len().min(5)]
    );

    // Every acknowledged task ran at least once; more than once is a duplicate.
    let ran = all_runs(&logs);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for line in &ran {
        // PM_TASK_ID is `<task id>-<attempt>`.
        let id = line.rsplit_once('-').map_or(line.as_str(), |(id, _)| id);
        *counts.entry(id).or_default() += 1;
    }
    let never: Vec<&String> = acked
        .iter()
        .filter(|name| {
            let id = name.rsplit('/').next().unwrap_or_default();
            !counts.contains_key(id)
        })
        .collect();
    assert!(
        never.is_empty(),
        "{} DONE tasks never ran, e.g. {:?}",
        never.len(),
        &never[..never.len().min(5)]
    );
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let cancelled = tasks
        .get_task(GetTaskRequest {
            name: moved_task.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, TaskState::Cancelled as i32);
    assert!(
        !counts.contains_key(cancelled.id.as_str()),
        "the cancelled task never ran"
    );

    // A paged list of each partitioned pipeline, merged from its partitions' owners, holds
    // every acknowledged task once.
    for pipeline in [&hot, &idle_hot] {
        let listed = list_all(&mut tasks, pipeline, 37).await;
        let unique: HashSet<&String> = listed.iter().collect();
        assert_eq!(
            unique.len(),
            listed.len(),
            "{pipeline}: a task listed twice"
        );
        let expected: Vec<&String> = acked
            .iter()
            .chain([&moved_task])
            .filter(|t| t.starts_with(&format!("{pipeline}/")))
            .collect();
        let missing: Vec<&&String> = expected.iter().filter(|t| !unique.contains(**t)).collect();
        assert!(
            missing.is_empty(),
            "{pipeline}: {} of {} acknowledged tasks not listed, e.g. {:?}",
            missing.len(),
            expected.len(),
            &missing[..missing.len().min(3)]
        );
        eprintln!("{pipeline}: {} tasks listed in pages of 37", listed.len());
    }
    eprintln!(
        "{} runs of {} acknowledged tasks: {duplicates} duplicate executions, 0 lost",
        ran.len(),
        acked.len()
    );

    cancel.cancel();
}

/// Scale-down under a backlog: a shard holding 100,000 READY tasks gets SIGTERM with no
/// handoff bound (the default), and exits only once every task is on the remaining shard,
/// however long that takes; nothing is left on its disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_shard_hands_off_its_whole_backlog_before_it_exits() {
    const TASKS: usize = 100_000;
    const PER_CALL: usize = 1_000;
    let tmp = Logs(Some(tempfile::tempdir().unwrap()));
    let dir = tmp.0.as_ref().unwrap().path().to_path_buf();
    let etcd = Etcd::start();
    let cluster = Cluster {
        dir: dir.clone(),
        etcd: etcd.endpoint.clone(),
        tenant_service: String::new(),
        admin: (String::new(), String::new()),
        metrics: Mutex::default(),
    };
    let cancel = CancellationToken::new();
    let view = ring_view(&etcd.endpoint, &cancel).await;
    let leaver = cluster.shard_with("s0", &[]).await;
    let _stayer = cluster.shard_with("s1", &[]).await;
    assert!(
        view.wait_for(Duration::from_secs(20), |r| ids(r) == ["s0", "s1"])
            .await,
        "{}",
        cluster.ring_failure(&view, &["s0", "s1"])
    );
    let ring = view.ring();
    let address = |id: &str| {
        ring.members()
            .find(|m| m.id == id)
            .map(|m| m.address.clone())
            .unwrap()
    };
    // Four pipelines s0 owns: the whole backlog is on the shard that leaves.
    let pipelines: Vec<String> = (0..200)
        .map(|i| format!("tenants/c/applications/a/pipelines/q{i}"))
        .filter(|p| owners(&ring, p) == BTreeSet::from(["s0".to_owned()]))
        .take(4)
        .collect();
    assert_eq!(pipelines.len(), 4);
    let s0 = pm_proto::client::shard(pm_proto::client::channel(&address("s0")).unwrap());
    let submitters: Vec<_> = (0..4)
        .map(|w| {
            let mut s0 = s0.clone();
            let pipeline = pipelines[w].clone();
            let item = common::item(&pipeline);
            tokio::spawn(async move {
                let mut names = Vec::new();
                for _ in 0..TASKS / 4 / PER_CALL {
                    let tasks =
                        common::enqueue_all_acknowledged(&mut s0, vec![item.clone(); PER_CALL])
                            .await;
                    names.extend(tasks.into_iter().map(|t| t.name));
                }
                names
            })
        })
        .collect();
    let mut acked = Vec::new();
    for s in submitters {
        acked.extend(s.await.unwrap());
    }
    assert_eq!(acked.len(), TASKS);

    // SIGTERM with no bound but the test's own.
    let left = Instant::now();
    let status = leaver.terminate(Duration::from_secs(300));
    let took = left.elapsed();
    assert!(status.success(), "s0 exited with {status}");
    eprintln!("s0 handed off {TASKS} READY tasks and exited {took:?} after SIGTERM");
    let log = std::fs::read_to_string(dir.join("s0.log")).unwrap();
    assert!(log.contains("every task handed off"), "{log}");
    assert!(
        !log.contains("handoff not finished"),
        "s0 gave up on its handoff: {log}"
    );

    // Every task is on s1, READY, and findable by the name s0 acknowledged it under.
    let metrics = cluster.metrics.lock().unwrap()["s1"].clone();
    let text = scrape(&metrics).await.unwrap();
    let ready: f64 = text
        .lines()
        .filter(|l| l.starts_with("pm_queue_tasks{") && l.contains("state=\"ready\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(ready as usize, TASKS, "{text}");
    let mut s1 = pm_proto::client::shard(pm_proto::client::channel(&address("s1")).unwrap());
    for name in acked.iter().step_by(997) {
        let task = s1
            .get_task(GetTaskRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(task.state(), TaskState::Ready, "{name}");
    }
    // And nothing is left on s0's disk: started again, it replays no task (it logs what it
    // recovered, before it serves).
    let before = log.len();
    let back = cluster.shard_with("s0", &[]).await;
    let mut restarted = String::new();
    until("s0 serves again", Duration::from_secs(30), async || {
        let log = std::fs::read_to_string(dir.join("s0.log")).unwrap_or_default();
        restarted = log.get(before..).unwrap_or_default().to_owned();
        restarted.contains("shard serving")
    })
    .await;
    assert!(
        !restarted.contains("recovered tasks from disk"),
        "s0 kept tasks on its disk: {restarted}"
    );
    drop(back);
    cancel.cancel();
}

/// Changing a pipeline's partitions strands nothing: READY tasks queued over 6 partitions on
/// three shards still run after `partitions` drops to 2 (new tasks go to partitions 0 and 1
/// only) and rises to 4, once an agent comes, and one paged list holds them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_or_raising_partitions_strands_no_task() {
    let tmp = Logs(Some(tempfile::tempdir().unwrap()));
    let dir = tmp.0.as_ref().unwrap().path().to_path_buf();
    let etcd = Etcd::start();
    let (cluster, _tenant) = Cluster::boot(&dir, &etcd).await;
    let cancel = CancellationToken::new();
    let view = ring_view(&etcd.endpoint, &cancel).await;
    let mut _shards = Vec::new();
    for id in ["s0", "s1", "s2"] {
        _shards.push(cluster.shard(id).await);
    }
    assert!(
        view.wait_for(Duration::from_secs(20), |r| r.len() == 3)
            .await,
        "{}",
        cluster.ring_failure(&view, &["s0", "s1", "s2"])
    );
    let (_gw, gw) = cluster.gateway(0).await;
    let bearer = cluster.login(&gw).await;
    let mut config = cluster.application(&gw, &bearer).await;
    let log = log_of(&dir, "shift");
    let mut apply = async |k: u32| {
        let mut spec = spec(&log);
        spec.partitions = k;
        config
            .apply_pipeline(ApplyPipelineRequest {
                parent: "tenants/c/applications/a".into(),
                pipeline_id: "shift".into(),
                source: Some(apply_pipeline_request::Source::Spec(spec)),
            })
            .await
            .unwrap()
            .into_inner()
    };
    let mut client = tasks(&gw, &bearer);
    let first = apply(6).await;
    let pipeline = first.name.clone();
    let owners = view
        .ring()
        .partition_owners(&pm_proto::names::PipelineName::parse(&pipeline).unwrap(), 6);
    assert!(
        owners.len() > 1,
        "the partitions are on several shards: {owners:?}"
    );
    // Submits through the gateway, all acknowledged: their names and partitions.
    let mut submit = async |n: usize| -> Vec<(String, u32)> {
        let names = submit_acknowledged(&mut client, &pipeline, n).await;
        names
            .into_iter()
            .map(|name| {
                let partition = pm_proto::names::TaskName::parse(&name).unwrap().partition();
                (name, partition)
            })
            .collect()
    };
    let partitions =
        |tasks: &[(String, u32)]| -> BTreeSet<u32> { tasks.iter().map(|(_, p)| *p).collect() };
    let mut acked = submit(60).await;
    assert_eq!(partitions(&acked), (0..6).collect());

    // Down to 2: new tasks go to partitions 0 and 1; tenant-service remembers 6.
    let lowered = apply(2).await;
    assert_eq!((lowered.version, lowered.max_partitions), (2, 6));
    let later = submit(20).await;
    assert_eq!(partitions(&later), (0..2).collect());
    acked.extend(later);
    // Up to 4: 0 to 3.
    let raised = apply(4).await;
    assert_eq!((raised.version, raised.max_partitions), (3, 6));
    let later = submit(20).await;
    assert_eq!(partitions(&later), (0..4).collect());
    acked.extend(later);

    // One agent, through the gateway, reaches every partition's owner, dropped ones too.
    let _agent = cluster.agent(0, &gw, &pipeline);
    let mut client = tasks(&gw, &bearer);
    let mut pending: Vec<String> = acked.iter().map(|(n, _)| n.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} tasks not DONE within 60 s, e.g. {:?}",
            pending.len(),
            &pending[..pending.len().min(3)]
        );
        let mut still = Vec::new();
        for name in pending {
            let task = client
                .get_task(GetTaskRequest { name: name.clone() })
                .await
                .unwrap()
                .into_inner();
            if task.state != TaskState::Done as i32 {
                still.push(name);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(runs(&log).len(), acked.len(), "each ran once");

    // One list, in pages merged from the owners, holds every task once.
    let listed = list_all(&mut client, &pipeline, 7).await;
    let mut expected: Vec<String> = acked.into_iter().map(|(n, _)| n).collect();
    expected.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, expected, "listed: every task, once");
    assert!(
        listed.windows(2).all(|w| w[0] > w[1]),
        "newest first across partitions"
    );
    cancel.cancel();
}
