//! Agents against a real shard server on a random loopback port: slots bound concurrency,
//! and a draining agent finishes what it can and hands the rest back.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use pm_proto::internal::v1::enqueue_result;
use pm_proto::internal::v1::{EnqueueRequest, EnqueueTask};
use pm_proto::v1::{GetTaskRequest, Job, PipelineSpec, Stage, Task, TaskState};

const PIPELINE: &str = "tenants/t/applications/a/pipelines/p";
const WAIT: Duration = Duration::from_secs(60);

struct Shard {
    endpoint: String,
    stop: CancellationToken,
}

async fn shard() -> Shard {
    // Far beyond the waits below: a task back in READY was handed back, not expired.
    shard_with_ttl(Duration::from_secs(300)).await
}

async fn shard_with_ttl(lease_ttl: Duration) -> Shard {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let options = pm_scheduler_shard::Options {
        lease_ttl,
        ..Default::default()
    };
    let scheduler = pm_scheduler_shard::open(options, None).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(pm_scheduler_shard::run(
        listener,
        scheduler,
        stop.clone().cancelled_owned(),
    ));
    Shard { endpoint, stop }
}

fn agent(shard: &Shard, id: &str, slots: u32, work: &Path, drain: Duration) -> CancellationToken {
    let stop = CancellationToken::new();
    tokio::spawn(pm_agent::run(
        pm_agent::AgentOptions {
            endpoint: shard.endpoint.clone(),
            agent_id: id.into(),
            pipelines: vec![PIPELINE.into()],
            slots,
            executors: Vec::new(),
            runner: pm_agent::RunnerOptions {
                work_root: work.to_owned(),
                ..pm_agent::RunnerOptions::default()
            },
            drain_timeout: drain,
            credentials: Default::default(),
        },
        stop.clone(),
    ));
    stop
}

async fn submit(shard: &Shard, command: &str, n: usize) -> Vec<String> {
    let spec = PipelineSpec {
        stages: vec![Stage {
            name: "s".into(),
            jobs: vec![Job {
                name: "j".into(),
                executor: "host".into(),
                commands: vec![command.into()],
                ..Job::default()
            }],
            priority: None,
        }],
        ..PipelineSpec::default()
    };
    let tasks = (0..n)
        .map(|_| EnqueueTask {
            task: Some(Task {
                pipeline: PIPELINE.into(),
                ..Task::default()
            }),
            spec: Some(spec.clone()),
            client_priority: 10,
            ..EnqueueTask::default()
        })
        .collect();
    let mut client = pm_proto::client::shard(pm_proto::client::channel(&shard.endpoint).unwrap());
    let results = client
        .enqueue(EnqueueRequest {
            tasks,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    results
        .into_iter()
        .map(|r| match r.outcome {
            Some(enqueue_result::Outcome::Task(t)) => t.name,
            other => panic!("refused: {other:?}"),
        })
        .collect()
}

/// Polls until `accept` holds for the task; returns it.
async fn until(shard: &Shard, name: &str, accept: impl Fn(&Task) -> bool) -> Task {
    let mut client = pm_proto::client::shard(pm_proto::client::channel(&shard.endpoint).unwrap());
    let deadline = Instant::now() + WAIT;
    loop {
        let task = client
            .get_task(GetTaskRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        if accept(&task) {
            return task;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never got there: {task:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state(t: &Task) -> TaskState {
    TaskState::try_from(t.state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_never_runs_more_tasks_than_its_slots() {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let shard = shard().await;
    let agent = agent(
        &shard,
        "two-slots",
        2,
        &dir.path().join("work"),
        Duration::from_secs(5),
    );
    // Each run marks itself running, records how many runs are marked, waits, unmarks.
    let m = marks.display();
    let command = format!(
        "touch {m}/run-$PM_TASK_ID; ls {m} | grep -c run- >> {m}/../counts; sleep 0.2; rm {m}/run-$PM_TASK_ID"
    );
    let names = submit(&shard, &command, 8).await;
    for name in &names {
        until(&shard, name, |t| state(t) == TaskState::Done).await;
    }
    let counts: Vec<u32> = std::fs::read_to_string(dir.path().join("counts"))
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 8);
    assert!(
        counts.iter().all(|c| *c <= 2),
        "more runs at once than slots: {counts:?}"
    );
    agent.cancel();
    shard.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agent_finishes_short_tasks_and_hands_long_ones_back() {
    let dir = tempfile::tempdir().unwrap();
    let shard = shard().await;
    let first = agent(
        &shard,
        "first",
        2,
        &dir.path().join("w1"),
        Duration::from_secs(2),
    );
    // Short: runs until the test lets it finish, which it does once the drain has begun (a
    // fixed sleep could end before the test looks, on a loaded machine).
    let go = dir.path().join("go");
    let short = submit(
        &shard,
        &format!("until [ -e {} ]; do sleep 0.02; done", go.display()),
        1,
    )
    .await
    .remove(0);
    // Long on its first delivery only: a second agent finishes it at once.
    let long = submit(&shard, "case $PM_TASK_ID in *-1) sleep 60;; esac", 1)
        .await
        .remove(0);
    until(&shard, &short, |t| state(t) == TaskState::InProgress).await;
    until(&shard, &long, |t| state(t) == TaskState::InProgress).await;

    first.cancel();
    std::fs::write(&go, "").unwrap();
    let short = until(&shard, &short, |t| state(t) != TaskState::InProgress).await;
    assert_eq!(
        state(&short),
        TaskState::Done,
        "finished within the drain: {short:?}"
    );
    let handed_back = until(&shard, &long, |t| state(t) != TaskState::InProgress).await;
    assert_eq!(
        state(&handed_back),
        TaskState::Ready,
        "handed back, not failed: {handed_back:?}"
    );
    assert_eq!(handed_back.attempt, 1);

    let second = agent(
        &shard,
        "second",
        1,
        &dir.path().join("w2"),
        Duration::from_secs(5),
    );
    let long = until(&shard, &long, |t| state(t) == TaskState::Done).await;
    assert_eq!(long.attempt, 2);
    second.cancel();
    shard.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_keep_a_task_longer_than_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    // Renewed every third of the lease (0.5 s): a stall of up to a second on a loaded
    // machine is absorbed, and the run still outlasts three leases.
    let shard = shard_with_ttl(Duration::from_millis(1500)).await;
    let agent = agent(
        &shard,
        "renewing",
        1,
        &dir.path().join("w"),
        Duration::from_secs(5),
    );
    // Over three lease lengths long; without renewals it would be delivered again.
    let name = submit(&shard, "sleep 5", 1).await.remove(0);
    let task = until(&shard, &name, |t| state(t) == TaskState::Done).await;
    assert_eq!(task.attempt, 1, "never redelivered: {task:?}");
    agent.cancel();
    shard.stop.cancel();
}

/// An agent as its own process (the workspace's `pm-agent` binary, next to `pm-shard`).
struct AgentProcess(std::process::Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent_process(shard: &Shard, id: &str, work: &Path) -> AgentProcess {
    let bin = Path::new(env!("CARGO_BIN_EXE_pm-shard")).with_file_name("pm-agent");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo nextest run --workspace does)",
        bin.display()
    );
    let child = std::process::Command::new(bin)
        .args([
            "--endpoint",
            &shard.endpoint,
            "--agent-id",
            id,
            "--slots",
            "1",
        ])
        .args(["--pipeline", PIPELINE])
        .arg("--work-root")
        .arg(work)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    AgentProcess(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_agent_is_killed_is_redelivered_and_ends_done_once() {
    let dir = tempfile::tempdir().unwrap();
    let shard = shard_with_ttl(Duration::from_secs(1)).await;
    let log = dir.path().join("runs.log");
    // Slow on its first delivery only; every delivery leaves a line.
    let command = format!(
        "echo \"$PM_TASK_ID\" >> {}; case $PM_TASK_ID in *-1) sleep 60;; esac",
        log.display()
    );
    let name = submit(&shard, &command, 1).await.remove(0);
    let mut first = agent_process(&shard, "doomed", &dir.path().join("w1"));
    until(&shard, &name, |t| state(t) == TaskState::InProgress).await;
    let deadline = Instant::now() + WAIT;
    while !log.exists() {
        assert!(Instant::now() < deadline, "the first delivery never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.0.kill().unwrap();
    first.0.wait().unwrap();

    let _second = agent_process(&shard, "survivor", &dir.path().join("w2"));
    let task = until(&shard, &name, |t| state(t) == TaskState::Done).await;
    assert_eq!(task.attempt, 2, "delivered again after the lease expired");
    let runs = std::fs::read_to_string(&log).unwrap();
    let runs: Vec<&str> = runs.lines().collect();
    assert_eq!(runs.len(), 2, "one run per delivery: {runs:?}");
    assert!(
        runs[0].ends_with("-1") && runs[1].ends_with("-2"),
        "{runs:?}"
    );
    eprintln!("killed agent: task DONE once, 1 duplicate execution (the killed attempt)");
    shard.stop.cancel();
}
