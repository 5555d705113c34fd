//! The at-least-once promise under SIGKILL, with real processes: a `pm-shard` binary takes
//! concurrent submits and is killed at random moments and restarted on the same data
//! directory, several times (each start on a fresh port behind one stable address); then an
//! agent runs everything while the shard is killed once more. Every acknowledged task must
//! end DONE; duplicates are allowed and reported, losses are not.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;

mod common;
use common::Forwarder;

use pm_proto::internal::v1::enqueue_result;
use pm_proto::internal::v1::{EnqueueRequest, EnqueueTask};
use pm_proto::v1::{ListTasksRequest, PipelineSpec, Task, TaskState};

const PIPELINE: &str = "tenants/crash/applications/test/pipelines/p";
const KILLS_WHILE_SUBMITTING: usize = 5;
const SUBMITTERS: usize = 8;

/// A shard process, killed with SIGKILL when dropped.
struct Shard {
    child: Child,
}

impl Shard {
    /// With short leases: after a kill, a lease no agent reclaims is delivered again soon.
    async fn start(dir: &Path, front: &Forwarder, run: usize) -> Shard {
        Self::start_with_ttl(dir, front, run, 2).await
    }

    /// Starts the shard on a port the kernel picks, and once it serves, puts it behind
    /// `front` (until then `front` closes every connection, as a Service with no ready pod).
    async fn start_with_ttl(
        dir: &Path,
        front: &Forwarder,
        run: usize,
        lease_ttl_seconds: u32,
    ) -> Shard {
        front.forward_to(0);
        let log_path = dir.join(format!("shard-{run}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pm-shard"))
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--lease-ttl-seconds", &lease_ttl_seconds.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // Owned first, so a failed wait kills it on the way out.
        let mut shard = Shard { child };
        let addr = common::logged_addr(&log_path, 0, "shard serving", &mut shard.child).await;
        front.forward_to(addr.port());
        shard
    }

    /// SIGKILL, and wait for the process to be gone.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spec(log: &Path) -> PipelineSpec {
    // One line per execution: the duplicates are counted from it.
    common::spec(vec![format!("echo \"$PM_TASK_ID\" >> {}", log.display())])
}

fn item(spec: &PipelineSpec) -> EnqueueTask {
    EnqueueTask {
        task: Some(Task {
            pipeline: PIPELINE.into(),
            priority: 10,
            ..Task::default()
        }),
        spec: Some(spec.clone()),
        client_priority: 10,
        ..EnqueueTask::default()
    }
}

/// Everything under a shard's data dir is its user's only: directories 0700, files 0600.
fn assert_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut seen = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", path.display());
        seen += 1;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
    }
    assert!(seen > 2, "the store made files");
}

async fn wait_ready(endpoint: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut client = pm_proto::client::shard(pm_proto::client::channel(endpoint).unwrap());
        let probe = client.list_tasks(ListTasksRequest {
            parent: PIPELINE.into(),
            page_size: 1,
            ..ListTasksRequest::default()
        });
        if tokio::time::timeout(Duration::from_secs(2), probe)
            .await
            .is_ok_and(|r| r.is_ok())
        {
            return;
        }
        assert!(Instant::now() < deadline, "shard not serving within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submits batches of 1..=8 tasks until `stop`; records every acknowledged task.
async fn submitter(
    endpoint: String,
    spec: PipelineSpec,
    acked: Arc<Mutex<HashSet<String>>>,
    stop: Arc<AtomicBool>,
) -> usize {
    let mut refused = 0;
    let mut client = pm_proto::client::shard(pm_proto::client::channel(&endpoint).unwrap());
    // Bounded: at most this many calls, whatever happens.
    for _ in 0..20_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let n = rand::rng().random_range(1..=8);
        let tasks = (0..n).map(|_| item(&spec)).collect();
        let call = client.enqueue(EnqueueRequest {
            tasks,
            ..Default::default()
        });
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(response)) => {
                let mut acked = acked.lock().unwrap();
                for r in response.into_inner().results {
                    match r.outcome {
                        Some(enqueue_result::Outcome::Task(t)) => {
                            acked.insert(t.name);
                        }
                        _ => refused += 1,
                    }
                }
            }
            // The shard is down or restarting: not acknowledged, try again.
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    refused
}

fn executions(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// How many acknowledged tasks are DONE, and which are missing altogether (lost).
async fn count_done(endpoint: &str, acked: &HashSet<String>) -> (usize, Vec<String>) {
    let mut client = pm_proto::client::shard(pm_proto::client::channel(endpoint).unwrap());
    let mut states = std::collections::HashMap::new();
    let mut page_token = String::new();
    // Bounded: more pages than tasks could ever fill.
    for _ in 0..10_000 {
        let page = client
            .list_tasks(ListTasksRequest {
                parent: PIPELINE.into(),
                page_size: 1000,
                page_token: page_token.clone(),
                ..ListTasksRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        for t in page.tasks {
            states.insert(t.name, t.state);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let done = acked
        .iter()
        .filter(|n| states.get(*n) == Some(&(TaskState::Done as i32)))
        .count();
    let missing = acked
        .iter()
        .filter(|n| !states.contains_key(*n))
        .cloned()
        .collect();
    (done, missing)
}

/// An in-process agent serving the test pipeline; cancel the token to stop it.
fn start_agent(
    endpoint: &str,
    id: &str,
    slots: u32,
    dir: &Path,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let agent = tokio::spawn(pm_agent::run(
        pm_agent::AgentOptions {
            endpoint: endpoint.to_owned(),
            agent_id: id.into(),
            pipelines: vec![PIPELINE.into()],
            slots,
            executors: Vec::new(),
            runner: pm_agent::RunnerOptions {
                work_root: dir.join("work"),
                ..pm_agent::RunnerOptions::default()
            },
            drain_timeout: Duration::from_secs(1),
            credentials: Default::default(),
        },
        stop.clone(),
    ));
    (stop, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_task_is_lost_when_the_shard_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let dir_path: PathBuf = dir.path().to_owned();
    // Clients and the agent keep this address; each start of the shard takes a fresh port.
    let front = Forwarder::start().await;
    let endpoint = front.endpoint.clone();
    let log = dir_path.join("executions.log");
    let spec = spec(&log);

    let mut run = 0;
    let mut shard = Shard::start(&dir_path, &front, run).await;
    wait_ready(&endpoint).await;

    let acked = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|_| {
            tokio::spawn(submitter(
                endpoint.clone(),
                spec.clone(),
                acked.clone(),
                stop.clone(),
            ))
        })
        .collect();

    for _ in 0..KILLS_WHILE_SUBMITTING {
        // A random moment of the submit load (the chaos schedule, not a synchronisation).
        let pause = rand::rng().random_range(50..200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        shard.kill();
        run += 1;
        shard = Shard::start(&dir_path, &front, run).await;
        wait_ready(&endpoint).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut refused = 0;
    for s in submitters {
        refused += s.await.unwrap();
    }
    let acked: HashSet<String> = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "the load acknowledged only {} tasks",
        acked.len()
    );

    // Every acknowledged task survived the kills.
    let (_, missing) = count_done(&endpoint, &acked).await;
    assert!(
        missing.is_empty(),
        "{} acknowledged tasks lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );

    // An agent runs them; the shard is killed once more while it does.
    let (agent_stop, agent) = start_agent(&endpoint, "crash-agent", 8, &dir_path);
    let deadline = Instant::now() + Duration::from_secs(120);
    while executions(&log).len() < acked.len() / 3 {
        assert!(Instant::now() < deadline, "the agent made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shard.kill();
    run += 1;
    let _shard = Shard::start(&dir_path, &front, run).await;
    wait_ready(&endpoint).await;

    let (mut done, mut missing) = count_done(&endpoint, &acked).await;
    while done < acked.len() {
        assert!(missing.is_empty(), "acknowledged tasks lost: {missing:?}");
        assert!(
            Instant::now() < deadline,
            "only {done} of {} acknowledged tasks DONE after 2 minutes",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        (done, missing) = count_done(&endpoint, &acked).await;
    }
    agent_stop.cancel();
    agent.await.expect("the agent stopped without a panic");

    let runs = executions(&log);
    let distinct: HashSet<&str> = runs
        .iter()
        .map(|r| r.rsplit_once('-').map_or(r.as_str(), |(id, _attempt)| id))
        .collect();
    let acked_ids: HashSet<&str> = acked.iter().filter_map(|n| n.rsplit('/').next()).collect();
    // A task made durable whose ack the kill cut off may run too; it was never promised.
    assert!(
        acked_ids.is_subset(&distinct),
        "every acknowledged task ran"
    );
    eprintln!(
        "crash test: {} kills, {} tasks acknowledged, 0 lost, {} refused while restarting, \
         {} executions of {} distinct tasks, {} duplicate executions",
        KILLS_WHILE_SUBMITTING + 1,
        acked.len(),
        refused,
        runs.len(),
        distinct.len(),
        runs.len() - distinct.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reclaims_its_lease_from_a_restarted_shard() {
    let dir = tempfile::tempdir().unwrap();
    let dir_path: PathBuf = dir.path().to_owned();
    let front = Forwarder::start().await;
    let endpoint = front.endpoint.clone();
    let log = dir_path.join("runs.log");
    // The lease must outlast the restart plus the agent's jittered reconnect backoff
    // (0.1, 0.2, 0.4... s, ±50%) on a loaded machine: a reclaim, not a race against the TTL.
    const TTL_SECONDS: u32 = 15;
    let shard = Shard::start_with_ttl(&dir_path, &front, 0, TTL_SECONDS).await;
    wait_ready(&endpoint).await;

    // One task that runs for a while; every execution leaves a line.
    let mut spec = spec(&log);
    spec.stages[0].jobs[0].commands.push("sleep 3".into());
    let mut client = pm_proto::client::shard(pm_proto::client::channel(&endpoint).unwrap());
    let task = common::enqueue_acknowledged(&mut client, item(&spec)).await;
    let (agent_stop, agent) = start_agent(&endpoint, "reclaimer", 1, &dir_path);
    let deadline = Instant::now() + Duration::from_secs(60);
    while executions(&log).is_empty() {
        assert!(Instant::now() < deadline, "the task never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An Assign does not wait for its dispatch record, so the lease may not be on disk yet.
    // The journal writes in order: once a later submit is acknowledged (durable), so is the
    // dispatch. (Another pipeline's task, which this agent does not take.)
    let mut marker = item(&spec);
    marker.task.as_mut().unwrap().pipeline = format!("{PIPELINE}-marker");
    common::enqueue_acknowledged(&mut client, marker).await;

    // The shard dies mid-run and comes back on the same disk; the agent reconnects holding
    // the lease, and the shard (which replayed it) lets it keep the task.
    shard.kill();
    let _shard = Shard::start_with_ttl(&dir_path, &front, 1, TTL_SECONDS).await;
    assert_private(&dir_path.join("data"));
    wait_ready(&endpoint).await;
    let mut client = pm_proto::client::shard(pm_proto::client::channel(&endpoint).unwrap());
    let done = common::until_done(&mut client, &task.name, deadline).await;
    assert_eq!(done.attempt, 1, "reclaimed, not delivered again");
    assert_eq!(executions(&log).len(), 1, "it ran once");
    let restarted_log = std::fs::read_to_string(dir_path.join("shard-1.log")).unwrap();
    assert!(restarted_log.contains("lease reclaimed"), "{restarted_log}");
    agent_stop.cancel();
    agent.await.expect("the agent stopped without a panic");
}

/// Unmounts a test's filesystem when dropped (lazily: a handle still open cannot stop it).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The overall health of the shard at `endpoint`, as its next change arrives (the first one
/// is the current status).
async fn health_becomes(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    want: tonic_health::pb::health_check_response::ServingStatus,
) {
    let reached = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(answer) = watch.message().await.unwrap() {
            if answer.status == want as i32 {
                return;
            }
        }
        panic!("the health watch ended");
    })
    .await;
    reached.unwrap_or_else(|_| panic!("health never became {want:?}"));
}

/// A full disk, for real: the shard's data dir on a 6 MiB tmpfs. Past the space it refuses
/// submits with UNAVAILABLE and reports NOT_SERVING, acknowledging nothing it did not write;
/// once there is room it takes submits again and reports SERVING, with no restart; and
/// after one, every acknowledged task is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_submits_and_the_shard_recovers_without_a_restart() {
    use tonic_health::pb::health_check_response::ServingStatus;

    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mounting a tmpfs needs root (CI runs as root)"
    );
    let _unmount = Mounted(small.clone());
    // Room the test gives back later.
    let filler = small.join("filler");
    std::fs::write(&filler, vec![1u8; 2 << 20]).unwrap();

    let data = small.join("data");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let scheduler =
        pm_scheduler_shard::open(pm_scheduler_shard::Options::default(), Some(&data)).unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(pm_scheduler_shard::run(
        listener,
        scheduler,
        stop.clone().cancelled_owned(),
    ));
    let channel = pm_proto::client::channel(&endpoint).unwrap();
    let client = pm_proto::client::shard(channel.clone());
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    health_becomes(&mut health, ServingStatus::Serving).await;

    // 128 KiB a task, random so that no compression shrinks it: the disk is full within
    // ~50 tasks.
    let mut spec = common::spec(vec!["true".into()]);
    spec.params.insert("blob".into(), Default::default());
    let big = || {
        let mut it = item(&spec);
        let task = it.task.as_mut().unwrap();
        let blob: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(128 * 1024)
            .map(char::from)
            .collect();
        task.params.insert("blob".into(), blob);
        it
    };
    let submit = || {
        let request = EnqueueRequest {
            tasks: vec![big()],
            ..Default::default()
        };
        let mut client = client.clone();
        async move {
            let answer = tokio::time::timeout(Duration::from_secs(20), client.enqueue(request));
            let answer = answer
                .await
                .expect("answered within 20 s")
                .unwrap()
                .into_inner();
            answer.results.into_iter().next().unwrap().outcome.unwrap()
        }
    };
    let mut acked = HashSet::new();
    let mut refused = None;
    for _ in 0..500 {
        match submit().await {
            enqueue_result::Outcome::Task(t) => {
                acked.insert(t.name);
            }
            enqueue_result::Outcome::Error(e) => {
                refused = Some(e);
                break;
            }
            other => panic!("an answer not asked for: {other:?}"),
        }
    }
    let refused = refused.expect("the disk filled up");
    assert_eq!(refused.code, tonic::Code::Unavailable as i32, "{refused:?}");
    assert!(acked.len() > 5, "only {} tasks fit", acked.len());
    health_becomes(&mut health, ServingStatus::NotServing).await;
    // Still full: still refused, nothing acknowledged.
    assert!(matches!(submit().await, enqueue_result::Outcome::Error(_)));

    // Room again: the next submit is taken, and the shard is healthy, with no restart.
    std::fs::remove_file(&filler).unwrap();
    match submit().await {
        enqueue_result::Outcome::Task(t) => acked.insert(t.name),
        other => panic!("refused with room on the disk: {other:?}"),
    };
    health_becomes(&mut health, ServingStatus::Serving).await;

    // After a restart on the same disk, every acknowledged task is there. (The connection
    // goes first: a server's open connection holds its services, and so the store.)
    drop((client, health));
    stop.cancel();
    server.await.unwrap().unwrap();
    let mut reopened = None;
    for _ in 0..1000 {
        // The journal thread closes the store (and fjall's lock) just after the server ends.
        match pm_scheduler_shard::open(pm_scheduler_shard::Options::default(), Some(&data)) {
            Ok(s) => {
                reopened = Some(s);
                break;
            }
            Err(e) if e.to_string().to_lowercase().contains("lock") => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let reopened = reopened.expect("the store reopens within 10 s");
    for name in &acked {
        reopened
            .get(name)
            .unwrap_or_else(|e| panic!("acknowledged {name} lost: {e:?}"));
    }
    eprintln!(
        "disk full: {} tasks acknowledged, refused with {:?}; {} on disk after a restart",
        acked.len(),
        refused.message,
        reopened.len()
    );
}

/// Resident memory of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/pid/status");
    kib * 1024
}

/// 500 tasks that each print 1 MiB, run to DONE through a real shard process: what they
/// printed is on its disk, not in its memory (a shard that kept results in memory held
/// ~890 MiB after this, debug build), and GetTask still returns every byte of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_finished_tasks_printed_stays_on_disk_not_in_memory() {
    const TASKS: usize = 500;
    /// The shard's RSS once fjall has flushed what it was given. Measured (debug build):
    /// 340-480 MiB, most of it fjall's memtables, which it frees only at its next memtable
    /// rotation (docs/scheduler.md); results kept in memory added ~500 MiB (~900 in all).
    const RSS_BOUND: u64 = 640 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let front = Forwarder::start().await;
    let endpoint = front.endpoint.clone();
    let shard = Shard::start_with_ttl(dir.path(), &front, 0, 300).await;
    wait_ready(&endpoint).await;

    let spec = common::spec(vec!["print".into()]);
    let mut client = pm_proto::client::shard(pm_proto::client::channel(&endpoint).unwrap());
    for _ in 0..TASKS / 100 {
        let answer = client
            .enqueue(EnqueueRequest {
                tasks: (0..100).map(|_| item(&spec)).collect(),
                ..EnqueueRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            answer
                .results
                .iter()
                .all(|r| matches!(r.outcome, Some(enqueue_result::Outcome::Task(_)))),
            "{answer:?}"
        );
    }

    // An agent of one slot answers each task with a MiB of stdout.
    let (tx, answer) = common::connect_agent(&endpoint, PIPELINE).await;
    let mut stream = answer.unwrap().into_inner();
    let mib = "x".repeat(1024 * 1024);
    let mut last = String::new();
    for _ in 0..TASKS {
        let assign = loop {
            let message = tokio::time::timeout(Duration::from_secs(60), stream.message())
                .await
                .expect("an Assign within a minute")
                .unwrap()
                .expect("the stream stays open");
            if let Some(pm_proto::v1::server_message::Message::Assign(a)) = message.message {
                break a;
            }
        };
        last = assign.task.unwrap().name;
        let result = pm_proto::v1::TaskResult {
            succeeded: true,
            jobs: vec![pm_proto::v1::JobResult {
                steps: vec![pm_proto::v1::StepResult {
                    command: "print".into(),
                    stdout: mib.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        tx.send(pm_proto::v1::AgentMessage {
            message: Some(pm_proto::v1::agent_message::Message::Result(
                pm_proto::v1::AttemptResult {
                    lease: assign.lease,
                    result: Some(result),
                },
            )),
        })
        .unwrap();
    }
    // Results are taken in order on the stream: once the last is DONE, so are the others.
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = common::until_done(&mut client, &last, deadline).await;
    // fjall may still be flushing; what the shard itself holds does not go away.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rss = loop {
        let rss = rss_bytes(shard.child.id());
        if rss < RSS_BOUND || Instant::now() > deadline {
            break rss;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        rss < RSS_BOUND,
        "the shard holds {} MiB after {TASKS} tasks printed 1 MiB each",
        rss >> 20
    );
    let step = &done.result.unwrap().jobs[0].steps[0];
    assert_eq!(step.stdout.len(), mib.len(), "GetTask has the whole output");
    eprintln!("{TASKS} tasks of 1 MiB output: shard RSS {} MiB", rss >> 20);
}
