//! Load: closed loop (N workers, each waiting for its ack) and open loop (sends at scheduled
//! times whatever the answers do; latency is counted from the scheduled time, so a stall
//! shows up in every request it delayed: coordinated-omission corrected). And a fake agent
//! that speaks the real stream protocol and answers every Assign at once (a no-op run).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use pm_proto::client::{AuthedChannel, Bearer};
use pm_proto::internal::v1::shard_service_client::ShardServiceClient;
use pm_proto::internal::v1::{EnqueueRequest, EnqueueTask, enqueue_result};
use pm_proto::v1::task_service_client::TaskServiceClient;
use pm_proto::v1::{
    AgentMessage, AttemptResult, Hello, Job, PipelineSpec, Stage, SubmitTaskRequest,
    SubmitTasksRequest, Task, TaskResult, agent_message, server_message, submit_task_result,
};

/// Tasks acknowledged so far by any run, for the live progress line.
pub static ACKED: AtomicU64 = AtomicU64::new(0);

/// `pm-perf --slowest N`: every closed-loop run keeps its N slowest requests with the
/// wall-clock time each was sent, to be matched against the servers' logs. 0: none kept.
pub static SLOWEST: AtomicUsize = AtomicUsize::new(0);

/// Send the spec with every task straight to a shard, as shards before specs by reference
/// required (`--spec-every-task`, to measure older binaries); otherwise tasks name it by id.
pub static SPEC_EVERY_TASK: AtomicBool = AtomicBool::new(false);

/// Nanoseconds since this process's first look at the clock: the one clock that submit
/// times and agent receipts are both read from.
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub fn ns_of(at: Instant) -> u64 {
    let now = Instant::now();
    now_ns().saturating_sub(now.saturating_duration_since(at).as_nanos() as u64)
}

/// The id at the end of a resource name.
pub fn last_segment(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

pub fn noop_spec() -> PipelineSpec {
    PipelineSpec {
        name: "noop".into(),
        params: [("t0".to_owned(), pm_proto::v1::ParamSpec::default())].into(),
        stages: vec![Stage {
            name: "s".into(),
            jobs: vec![Job {
                name: "j".into(),
                executor: "host".into(),
                commands: vec!["true".into()],
                ..Job::default()
            }],
            priority: None,
        }],
        ..PipelineSpec::default()
    }
}

/// Where submits go.
#[derive(Clone)]
pub enum Target {
    /// Straight to a shard's internal Enqueue (as the gateway does after validation).
    Shard {
        client: ShardServiceClient<Channel>,
        pipeline: String,
        spec: PipelineSpec,
        /// `spec`'s id, hashed once, not per request.
        spec_id: Arc<[u8]>,
    },
    /// Through the gateway's public TaskService, round-robin over `pipelines`.
    Gateway {
        client: TaskServiceClient<AuthedChannel>,
        pipelines: Arc<Vec<String>>,
        next: usize,
    },
}

/// A refusal's gRPC code name, or "transport".
pub type Failure = String;

impl Target {
    /// The same gateway target spread over several pipelines.
    pub fn over(self, names: Arc<Vec<String>>, offset: usize) -> Target {
        match self {
            Target::Gateway { client, .. } => Target::Gateway {
                client,
                pipelines: names,
                next: offset,
            },
            shard => shard,
        }
    }

    pub fn connect(endpoint: &str, gateway: bool, pipeline: &str) -> anyhow::Result<Target> {
        Self::connect_as(endpoint, gateway, pipeline, Bearer::default())
    }

    /// The same, sending `bearer`'s token (to a gateway with auth on).
    pub fn connect_as(
        endpoint: &str,
        gateway: bool,
        pipeline: &str,
        bearer: Bearer,
    ) -> anyhow::Result<Target> {
        let channel = pm_proto::client::channel(endpoint)?;
        Ok(if gateway {
            Target::Gateway {
                client: pm_proto::client::tasks_with(channel, bearer),
                pipelines: Arc::new(vec![pipeline.to_owned()]),
                next: 0,
            }
        } else {
            let spec = noop_spec();
            Target::Shard {
                client: pm_proto::client::shard(channel),
                pipeline: pipeline.to_owned(),
                spec_id: pm_spec::spec_id(&spec).to_vec().into(),
                spec,
            }
        })
    }

    /// Submits `n` tasks stamped with `t0`; returns how many were acknowledged.
    pub async fn submit(&mut self, n: usize, t0: u64) -> Result<usize, Failure> {
        let params = [("t0".to_owned(), t0.to_string())];
        let code = |s: tonic::Status| format!("{:?}", s.code());
        match self {
            Target::Shard {
                client,
                pipeline,
                spec,
                spec_id,
            } => {
                let every = SPEC_EVERY_TASK.load(Ordering::Relaxed);
                let mut tasks: Vec<EnqueueTask> = (0..n)
                    .map(|_| EnqueueTask {
                        task: Some(Task {
                            pipeline: pipeline.clone(),
                            params: params.clone().into(),
                            priority: 10,
                            ..Task::default()
                        }),
                        spec: every.then(|| spec.clone()),
                        spec_id: spec_id.to_vec(),
                        client_priority: 10,
                        tenant_max_queued_tasks: 0,
                        partition: 0,
                    })
                    .collect();
                let mut answer = client
                    .enqueue(EnqueueRequest {
                        tasks: tasks.clone(),
                        // As the gateway asks: new tasks come back as ids.
                        answer_queued_by_id: true,
                    })
                    .await
                    .map_err(code)?
                    .into_inner();
                if !answer.spec_needed.is_empty() {
                    // The shard does not hold the spec yet: once more, with it.
                    for t in &mut tasks {
                        t.spec = Some(spec.clone());
                    }
                    answer = client
                        .enqueue(EnqueueRequest {
                            tasks,
                            answer_queued_by_id: true,
                        })
                        .await
                        .map_err(code)?
                        .into_inner();
                }
                // Counted as the gateway reads them: a whole task (an older shard, or a
                // repeat) or an id are both acknowledgements.
                let results = answer
                    .results
                    .into_iter()
                    .map(|r| pm_proto::v1::SubmitTaskResult {
                        outcome: r.outcome.map(|o| match o {
                            enqueue_result::Outcome::Error(e) => {
                                submit_task_result::Outcome::Error(e)
                            }
                            enqueue_result::Outcome::Task(t) => {
                                submit_task_result::Outcome::Task(t)
                            }
                            enqueue_result::Outcome::Queued(_) => {
                                submit_task_result::Outcome::Task(Task::default())
                            }
                        }),
                    });
                count_acked(results.collect())
            }
            Target::Gateway {
                client,
                pipelines,
                next,
            } => {
                *next += 1;
                let request = SubmitTaskRequest {
                    parent: pipelines[*next % pipelines.len()].clone(),
                    params: params.clone().into(),
                    ..SubmitTaskRequest::default()
                };
                if n == 1 {
                    client.submit_task(request).await.map_err(code)?;
                    return Ok(1);
                }
                let requests = vec![request; n];
                let answer = client
                    .submit_tasks(SubmitTasksRequest { requests })
                    .await
                    .map_err(code)?;
                count_acked(answer.into_inner().results)
            }
        }
    }
}

fn count_acked(results: Vec<pm_proto::v1::SubmitTaskResult>) -> Result<usize, Failure> {
    let mut acked = 0;
    let mut refused = None;
    for r in results {
        match r.outcome {
            Some(submit_task_result::Outcome::Task(_)) => acked += 1,
            Some(submit_task_result::Outcome::Error(e)) => {
                refused = Some(format!("{:?}", tonic::Code::from(e.code)))
            }
            None => refused = Some("empty".into()),
        }
    }
    match (acked, refused) {
        (0, Some(code)) => Err(code),
        _ => Ok(acked),
    }
}

/// What one run measured.
#[derive(Debug, Default)]
pub struct Measured {
    pub tasks: u64,
    pub window: Duration,
    /// Latency in microseconds.
    pub latency: Option<Histogram<u64>>,
    pub errors: BTreeMap<String, u64>,
    /// The slowest requests, slowest first (see [`SLOWEST`]).
    pub slowest: Vec<Slow>,
}

/// One of a run's slowest requests.
#[derive(Debug, Clone, Copy)]
pub struct Slow {
    pub us: u64,
    pub sent: std::time::SystemTime,
}

/// Keeps the `n` slowest of the requests offered; cheap while a request is faster than all
/// of them, which is almost every request.
struct Slowest {
    n: usize,
    kept: Vec<Slow>,
    /// The fastest kept, once `n` are kept: a request must beat it to be kept.
    floor: u64,
}

impl Slowest {
    fn new() -> Self {
        Self {
            n: SLOWEST.load(Ordering::Relaxed),
            kept: Vec::new(),
            floor: 0,
        }
    }

    fn offer(&mut self, us: u64, sent: Instant) {
        if self.n == 0 || (self.kept.len() == self.n && us <= self.floor) {
            return;
        }
        let slow = Slow {
            us,
            sent: std::time::SystemTime::now() - sent.elapsed(),
        };
        if self.kept.len() < self.n {
            self.kept.push(slow);
        } else if let Some(fastest) = self.kept.iter_mut().min_by_key(|s| s.us) {
            *fastest = slow;
        }
        if self.kept.len() == self.n {
            self.floor = self.kept.iter().map(|s| s.us).min().unwrap_or(0);
        }
    }

    /// Slowest first, at most `n` of `all`.
    fn merge(n: usize, mut all: Vec<Slow>) -> Vec<Slow> {
        all.sort_by_key(|s| std::cmp::Reverse(s.us));
        all.truncate(n);
        all
    }
}

impl Measured {
    pub fn tps(&self) -> f64 {
        self.tasks as f64 / self.window.as_secs_f64()
    }

    pub fn ms(&self, quantile: f64) -> f64 {
        self.latency
            .as_ref()
            .filter(|h| !h.is_empty())
            .map_or(f64::NAN, |h| h.value_at_quantile(quantile) as f64 / 1000.0)
    }

    pub fn max_ms(&self) -> f64 {
        self.latency
            .as_ref()
            .filter(|h| !h.is_empty())
            .map_or(f64::NAN, |h| h.max() as f64 / 1000.0)
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

/// `workers` loops, each submitting `batch` tasks and waiting for the answer, for
/// `warmup + duration`; only the last `duration` counts.
pub async fn closed_loop(
    targets: &[Target],
    workers: usize,
    batch: usize,
    warmup: Duration,
    duration: Duration,
) -> Measured {
    let start = Instant::now();
    let window_start = start + warmup;
    let end = window_start + duration;
    let handles: Vec<_> = (0..workers)
        .map(|i| {
            let mut target = targets[i % targets.len()].clone();
            tokio::spawn(async move {
                let mut m = Measured {
                    latency: Some(histogram()),
                    ..Measured::default()
                };
                let mut slowest = Slowest::new();
                while Instant::now() < end {
                    let sent = Instant::now();
                    let result = target.submit(batch, ns_of(sent)).await;
                    if sent < window_start {
                        continue;
                    }
                    match result {
                        Ok(n) => {
                            ACKED.fetch_add(n as u64, Ordering::Relaxed);
                            m.tasks += n as u64;
                            let us = sent.elapsed().as_micros() as u64;
                            let _ = m.latency.as_mut().expect("set").record(us.max(1));
                            slowest.offer(us, sent);
                        }
                        Err(code) => *m.errors.entry(code).or_default() += 1,
                    }
                }
                m.slowest = slowest.kept;
                m
            })
        })
        .collect();
    let mut total = Measured {
        latency: Some(histogram()),
        window: duration,
        ..Measured::default()
    };
    for h in handles {
        let m = h.await.expect("worker");
        total.tasks += m.tasks;
        if let (Some(t), Some(l)) = (total.latency.as_mut(), m.latency.as_ref()) {
            let _ = t.add(l);
        }
        for (k, v) in m.errors {
            *total.errors.entry(k).or_default() += v;
        }
        total.slowest.extend(m.slowest);
    }
    total.slowest = Slowest::merge(SLOWEST.load(Ordering::Relaxed), total.slowest);
    total
}

/// The pacer's shortest sleep. At rates above 1 / this (5,000/s) a wake-up releases every
/// request due by then, not one: one wake-up of the runtime for several requests. A request
/// so released leaves up to this much after its scheduled time, and that lateness counts in
/// its latency (measured from the scheduled time), against the server, never hidden. One
/// wake-up per request cost the generator a thread switch per request: at 20,000/s it took
/// ~80 µs of CPU per request against ~30 in closed loop, and with the shard on the same two
/// cores the machine was full before the shard was (perf/RESULTS.md, "A lighter open-loop
/// generator").
pub const PACER_TICK: Duration = Duration::from_micros(200);

/// Submits one request of `batch` tasks every `1/rate` seconds for `warmup + duration`,
/// whatever the answers do; latency from each request's scheduled time.
pub async fn open_loop(
    targets: &[Target],
    rate: f64,
    batch: usize,
    warmup: Duration,
    duration: Duration,
) -> Measured {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let requests = (rate * (warmup + duration).as_secs_f64()) as u64;
    let start = Instant::now() + Duration::from_millis(10);
    let window_start = start + warmup;
    // Recorded in place by each request: no channel and no collector task to wake per answer.
    let measured = Arc::new(Mutex::new(Measured {
        latency: Some(histogram()),
        window: duration,
        ..Measured::default()
    }));
    // The send times come from a thread of their own: tokio's timers tick in whole
    // milliseconds, so a request would leave up to 1 ms after its scheduled time, and that
    // lateness (the generator's, not the server's) would count in every latency.
    let (due_tx, mut due) = mpsc::unbounded_channel::<Vec<(u64, Instant)>>();
    let pacer = std::thread::spawn(move || {
        let at = |i: u64| start + interval.mul_f64(i as f64);
        let mut next = 0;
        let mut woke = Instant::now();
        while next < requests {
            let until = at(next).max(woke + PACER_TICK);
            if let Some(wait) = until.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            woke = Instant::now();
            let mut released = Vec::new();
            while next < requests && at(next) <= woke {
                released.push((next, at(next)));
                next += 1;
            }
            if due_tx.send(released).is_err() {
                return;
            }
        }
    });
    // Requests are spawned from a worker (its own queue, no wake-up of another thread per
    // spawn), and tracked so the figures are read once every one has its answer.
    let tracker = tokio_util::task::TaskTracker::new();
    let driver = {
        let targets = targets.to_vec();
        let measured = measured.clone();
        let tracker = tracker.clone();
        tokio::spawn(async move {
            while let Some(released) = due.recv().await {
                for (i, scheduled) in released {
                    let mut target = targets[i as usize % targets.len()].clone();
                    let measured = measured.clone();
                    tracker.spawn(async move {
                        let r = target.submit(batch, ns_of(scheduled)).await;
                        let us = scheduled.elapsed().as_micros() as u64;
                        if let Ok(n) = r {
                            ACKED.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        if scheduled < window_start {
                            return;
                        }
                        let mut m = measured.lock().expect("measured");
                        match r {
                            Ok(n) => {
                                m.tasks += n as u64;
                                let _ = m.latency.as_mut().expect("set").record(us.max(1));
                            }
                            Err(code) => *m.errors.entry(code).or_default() += 1,
                        }
                    });
                }
            }
        })
    };
    let _ = driver.await;
    let _ = pacer.join();
    tracker.close();
    tracker.wait().await;
    std::mem::take(&mut *measured.lock().expect("measured"))
}

/// Receipts of a fake agent.
#[derive(Default)]
pub struct AgentStats {
    pub received: AtomicU64,
    /// Receipts recorded into `latency` only while set.
    pub recording: AtomicBool,
    /// Submit (scheduled time) -> Assign received, microseconds.
    pub latency: Mutex<Option<Histogram<u64>>>,
    /// The same by the partition of the task's pipeline.
    pub by_partition: Mutex<BTreeMap<u32, Histogram<u64>>>,
}

/// A fake agent's first message: serving `pipeline` with `slots`.
fn hello(agent_id: &str, pipeline: String, slots: u32) -> AgentMessage {
    AgentMessage {
        message: Some(agent_message::Message::Hello(Hello {
            agent_id: agent_id.into(),
            pipelines: vec![pipeline],
            slots,
            protocol_min: pm_proto::AGENT_PROTOCOL_VERSION,
            protocol_max: pm_proto::AGENT_PROTOCOL_VERSION,
            ..Hello::default()
        })),
    }
}

/// `n` [`idle_agent`]s on `endpoint` for `pipeline`, held until dropped.
pub struct IdleAgents {
    handles: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    connected: Arc<AtomicU64>,
}

impl IdleAgents {
    /// Opens them, 200 every 20 ms (a burst of thousands of handshakes at once is another
    /// benchmark), and waits until all are connected or 120 s have passed.
    pub async fn open(endpoint: &str, pipeline: &str, n: usize) -> Self {
        let connected = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            handles.push(tokio::spawn(idle_agent(
                endpoint.to_owned(),
                pipeline.to_owned(),
                connected.clone(),
            )));
            if i % 200 == 199 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let agents = Self { handles, connected };
        let deadline = Instant::now() + Duration::from_secs(120);
        while agents.connected() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        agents
    }

    /// Streams the server accepted.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed) as usize
    }

    /// Agents whose stream ended (refused or lost).
    pub fn ended(&self) -> usize {
        self.handles.iter().filter(|h| h.is_finished()).count()
    }
}

impl Drop for IdleAgents {
    fn drop(&mut self) {
        for h in &self.handles {
            h.abort();
        }
    }
}

/// An agent that connects on a connection of its own, says Hello for `pipeline` (one that
/// gets no tasks) and then only holds its stream: what an idle agent costs the servers.
/// `connected` counts the streams the server accepted.
pub async fn idle_agent(
    endpoint: String,
    pipeline: String,
    connected: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut client = pm_proto::client::agents(pm_proto::client::channel(&endpoint)?);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(hello("pm-perf-idle", pipeline, 1))?;
    let mut inbound = client
        .connect(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    // The Welcome: the shard has the session.
    inbound.message().await?;
    connected.fetch_add(1, Ordering::Relaxed);
    // Held until aborted; `tx` lives as long, so the stream stays open.
    while inbound.message().await?.is_some() {}
    drop(tx);
    Ok(())
}

/// An agent that speaks the real protocol and finishes every task the moment it arrives
/// (a no-op run): it measures the scheduler, not `sh`.
pub async fn fake_agent(
    endpoint: String,
    pipeline: String,
    slots: u32,
    stats: Arc<AgentStats>,
) -> anyhow::Result<()> {
    *stats.latency.lock().expect("lock") = Some(histogram());
    let mut client = pm_proto::client::agents(pm_proto::client::channel(&endpoint)?);
    let (tx, rx) = mpsc::unbounded_channel();
    let message = |m| AgentMessage { message: Some(m) };
    tx.send(hello("pm-perf-agent", pipeline, slots))?;
    let mut inbound = client
        .connect(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(m) = inbound.message().await? {
        let Some(server_message::Message::Assign(assign)) = m.message else {
            continue;
        };
        let received = now_ns();
        stats.received.fetch_add(1, Ordering::Relaxed);
        let t0 = assign
            .task
            .as_ref()
            .and_then(|t| t.params.get("t0"))
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(t0) = t0
            && stats.recording.load(Ordering::Relaxed)
        {
            let us = received.saturating_sub(t0) / 1000;
            if let Some(h) = stats.latency.lock().expect("lock").as_mut() {
                let _ = h.record(us.max(1));
            }
            let partition = assign
                .task
                .as_ref()
                .and_then(|t| pm_proto::names::TaskName::parse(&t.name).ok())
                .map_or(0, |n| n.partition());
            let _ = stats
                .by_partition
                .lock()
                .expect("lock")
                .entry(partition)
                .or_insert_with(histogram)
                .record(us.max(1));
        }
        tx.send(message(agent_message::Message::Result(AttemptResult {
            lease: assign.lease,
            result: Some(TaskResult {
                succeeded: true,
                ..TaskResult::default()
            }),
        })))?;
    }
    Ok(())
}
