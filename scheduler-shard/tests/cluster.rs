//! Cluster mode with real processes and a real etcd: etcd, tenant-service, three shards, two
//! gateways and one agent per pipeline, each its own process. Under a steady load of
//! submits through both gateways, a fourth shard joins, one shard leaves by SIGTERM, and one
//! is SIGKILLed and restarted with the same identity and disk. After each change the agents
//! must keep finishing work; at the end every acknowledged task must be DONE and have run
//! (duplicates are counted and allowed, losses are not), and each change must have moved
//! about 1/S of the ring's keys. Authentication is on, as in production: the test, its
//! gateways' clients and the agents hold tokens of the platform admin that tenant-service
//! bootstraps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tonic::Code;

mod common;
use common::free_port;

/// TLS and mTLS between the same processes.
#[path = "cluster/tls.rs"]
mod tls;

use pm_cluster::testing::Etcd;
use pm_cluster::{Membership, Ring};
use pm_proto::client::{AuthedChannel, Bearer, Credentials};
use pm_proto::v1::task_service_client::TaskServiceClient;
use pm_proto::v1::{
    ApplyPipelineRequest, CreateApplicationRequest, CreateTenantRequest, GetTaskRequest,
    PipelineSpec, SubmitTaskRequest, SubmitTasksRequest, TaskEvent, TaskState, WatchTaskRequest,
    apply_pipeline_request, submit_task_result, task_event,
};

const PIPELINES: usize = 8;
/// Pipelines without agents until the end: their tasks wait READY through every change, so
/// the handoffs must carry them.
const IDLE: usize = 4;
const SUBMITTERS: usize = 4;
const BATCH: usize = 5;
/// Between a submitter's batches: ~200 tasks/s in all, well within what this machine runs
/// with a dozen processes on two cores.
const PACE: Duration = Duration::from_millis(100);
/// Runs the agents must finish after each change.
const PROGRESS: usize = 40;

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
            .filter(|p| p.extension().is_some_and(|x| x == "log") && !p.ends_with("runs.log"))
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
}

/// The task service of `gateway`, calling with `bearer`'s token.
fn tasks(gateway: &str, bearer: &Bearer) -> TaskServiceClient<AuthedChannel> {
    pm_proto::client::tasks_with(pm_proto::client::channel(gateway).unwrap(), bearer.clone())
}

impl Cluster {
    fn shard(&self, id: &str) -> Proc {
        // A fresh port even for a restart: the identity is the id and the disk, and the
        // port just freed may already serve someone else's connection.
        let port = free_port();
        let args: Vec<String> = [
            "--etcd",
            &self.etcd,
            "--shard-id",
            id,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &self.dir.join(id).display().to_string(),
            "--membership-ttl-seconds",
            "2",
            "--lease-ttl-seconds",
            "3",
            "--handoff-seconds",
            "20",
        ]
        .map(String::from)
        .to_vec();
        Proc::spawn("pm-shard", &args, &self.dir.join(format!("{id}.log")))
    }

    fn gateway(&self, n: usize) -> (Proc, String) {
        let port = free_port();
        let args = [
            "--etcd".to_owned(),
            self.etcd.clone(),
            "--tenant-service".to_owned(),
            self.tenant_service.clone(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
        ];
        let p = Proc::spawn("pm-gateway", &args, &self.dir.join(format!("gw{n}.log")));
        (p, format!("http://127.0.0.1:{port}"))
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

/// Polls `f` every 50 ms until it holds; panics with `what` after `limit`.
async fn until(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the agents have finished `PROGRESS` more runs.
async fn progress(log: &Path, what: &str) {
    let start = runs(log).len();
    until(what, Duration::from_secs(45), async || {
        runs(log).len() >= start + PROGRESS
    })
    .await;
}

fn ids(ring: &Ring) -> Vec<String> {
    ring.members().map(|m| m.id.clone()).collect()
}

/// Share of 10,000 ring keys whose owner differs between two rings.
fn moved(a: &Ring, b: &Ring) -> f64 {
    let n = 10_000;
    let moved = (0..n)
        .filter(|i| {
            let k = format!("t/app/p{i}");
            a.owner(&k).map(|m| &m.id) != b.owner(&k).map(|m| &m.id)
        })
        .count();
    moved as f64 / n as f64
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
    let tenant_port = free_port();
    let admin_file = dir.join("admin.client");
    let _tenant = Proc::spawn(
        "pm-tenant-service",
        &[
            "--etcd".into(),
            etcd.endpoint.clone(),
            "--listen".into(),
            format!("127.0.0.1:{tenant_port}"),
            "--bootstrap-admin-file".into(),
            admin_file.display().to_string(),
        ],
        &dir.join("tenant.log"),
    );
    // Written before tenant-service listens.
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
        dir: dir.clone(),
        etcd: etcd.endpoint.clone(),
        tenant_service: format!("http://127.0.0.1:{tenant_port}"),
        admin: (id.to_owned(), secret.to_owned()),
    };

    // The test's own view of the ring, as the gateways build it.
    let cancel = CancellationToken::new();
    let client = pm_cluster::etcd::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .unwrap();
    let view = Membership::watch(client, cancel.clone());
    let ring_is = |want: &'static [&'static str]| {
        move |r: &Arc<Ring>| ids(r) == want.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let wait_ring = Duration::from_secs(20);

    let mut shards: HashMap<&str, Proc> = HashMap::new();
    for id in ["s0", "s1", "s2"] {
        shards.insert(id, cluster.shard(id));
    }
    assert!(
        view.wait_for(wait_ring, ring_is(&["s0", "s1", "s2"])).await,
        "{:?}",
        ids(&view.ring())
    );
    let (_gw0, gw0) = cluster.gateway(0);
    let (_gw1, gw1) = cluster.gateway(1);
    let gateways = [gw0.clone(), gw1.clone()];

    // Configuration through a gateway, stored in etcd by tenant-service.
    let log = dir.join("runs.log");
    let channel = pm_proto::client::channel(&gw0).unwrap();
    let mut token = None;
    until(
        "the gateway issues a token",
        Duration::from_secs(30),
        async || {
            let admin = Credentials::Client {
                id: cluster.admin.0.clone(),
                secret: cluster.admin.1.clone(),
            };
            token = admin.token(&channel).await.ok().flatten();
            token.is_some()
        },
    )
    .await;
    let bearer = Bearer::new(token.as_deref()).unwrap();
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
    let mut pipelines = Vec::new();
    let ids_of_pipelines = (0..PIPELINES)
        .map(|p| format!("p{p}"))
        .chain((0..IDLE).map(|p| format!("idle{p}")));
    for id in ids_of_pipelines {
        let applied = config
            .apply_pipeline(ApplyPipelineRequest {
                parent: "tenants/c/applications/a".into(),
                pipeline_id: id,
                source: Some(apply_pipeline_request::Source::Spec(spec(&log))),
            })
            .await
            .unwrap();
        pipelines.push(applied.into_inner().name);
    }
    let pipelines = Arc::new(pipelines);
    let mut agents: Vec<Proc> = pipelines[..PIPELINES]
        .iter()
        .enumerate()
        .map(|(n, p)| cluster.agent(n, &gateways[n % 2], p))
        .collect();

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
    progress(&log, "runs with three shards").await;

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

    let mut moves = Vec::new();
    let idle_keys: Vec<String> = pipelines[PIPELINES..]
        .iter()
        .map(|p| pm_proto::names::PipelineName::parse(p).unwrap().ring_key())
        .collect();
    let mut idle_moves = 0;
    let mut step = |before: &Ring, after: &Ring, what: &str| {
        idle_moves += idle_keys
            .iter()
            .filter(|k| before.owner(k).map(|m| &m.id) != after.owner(k).map(|m| &m.id))
            .count();
        let share = moved(before, after);
        let s = before.len().max(after.len());
        eprintln!(
            "{what}: {:?} -> {:?}: {:.1}% of keys moved (1/S = {:.1}%)",
            ids(before),
            ids(after),
            share * 100.0,
            100.0 / s as f64
        );
        moves.push((what.to_owned(), share, s));
    };

    // 1. A shard joins.
    let before = view.ring();
    shards.insert("s3", cluster.shard("s3"));
    assert!(
        view.wait_for(wait_ring, ring_is(&["s0", "s1", "s2", "s3"]))
            .await
    );
    step(&before, &view.ring(), "join s3");
    progress(&log, "runs after s3 joined").await;

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
    assert!(view.wait_for(wait_ring, ring_is(&["s1", "s2", "s3"])).await);
    step(&before, &view.ring(), "SIGTERM s0");
    progress(&log, "runs after s0 left").await;

    // 3. A shard is SIGKILLed: its keys go to the others when its lease expires...
    let before = view.ring();
    shards.remove("s1").unwrap().kill();
    assert!(view.wait_for(wait_ring, ring_is(&["s2", "s3"])).await);
    step(&before, &view.ring(), "SIGKILL s1");
    progress(&log, "runs while s1 is down").await;
    // ...and it comes back with the same identity and disk, and serves its backlog.
    let before = view.ring();
    shards.insert("s1", cluster.shard("s1"));
    assert!(view.wait_for(wait_ring, ring_is(&["s1", "s2", "s3"])).await);
    step(&before, &view.ring(), "restart s1");
    progress(&log, "runs after s1 returned").await;

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
    let acked: Vec<String> = load.acked.lock().unwrap().iter().cloned().collect();
    eprintln!(
        "acknowledged {} tasks; refused {:?}",
        acked.len(),
        load.refused.lock().unwrap()
    );
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
    let ran = runs(&log);
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
    eprintln!(
        "{} runs of {} acknowledged tasks: {duplicates} duplicate executions, 0 lost",
        ran.len(),
        acked.len()
    );

    // Each change moved about 1/S of the keys, never more than twice that.
    for (what, share, s) in &moves {
        let ideal = 1.0 / *s as f64;
        assert!(
            *share > ideal * 0.5 && *share < ideal * 2.0,
            "{what}: {share} of keys moved, 1/S = {ideal}"
        );
    }
    cancel.cancel();
}
