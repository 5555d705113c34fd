//! `pm-perf`: runs the benchmark scenarios of DESIGN.md "Performance targets" against the
//! real release binaries and prints each figure with the rate actually achieved, per-process
//! CPU per 1,000 tasks and RSS. `--quick` shortens every scenario; the last line is always
//! `summary: submit_tps=.. submit_p99_ms=.. dispatch_p99_ms=.. cycle_tps=.. batch_tps=..`.

mod load;
mod partitions;
mod procs;
mod scaling;
mod soak;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

use load::{AgentStats, Measured, Target};
use pm_proto::client::Bearer;
use procs::Proc;

const APPLICATION: &str = "tenants/perf/applications/bench";
const PIPELINE: &str = "tenants/perf/applications/bench/pipelines/noop";
/// Served by the `streams` scenario's idle agents; no task is ever submitted to it.
const IDLE_PIPELINE: &str = "tenants/perf/applications/bench/pipelines/noop-idle";

/// Applies the no-op pipeline under [`APPLICATION`] as `id`.
fn apply_noop(id: &str) -> pm_proto::v1::ApplyPipelineRequest {
    pm_proto::v1::ApplyPipelineRequest {
        parent: APPLICATION.into(),
        pipeline_id: id.into(),
        source: Some(pm_proto::v1::apply_pipeline_request::Source::Spec(
            load::noop_spec(),
        )),
    }
}

#[derive(Parser)]
#[command(about = "pipeline-manager benchmarks")]
struct Args {
    /// Where pm-shard, pm-gateway and pm-tenant-service are (a release build).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Short runs (about 1 minute in all).
    #[arg(long)]
    quick: bool,
    /// Write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Send the spec with every task straight to a shard (shards before specs by reference
    /// need it; newer ones accept it, hashing each).
    #[arg(long)]
    spec_every_task: bool,
    /// gRPC connections the load is spread over (HTTP/2 multiplexes the clients on them).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Scenarios to run: submit, batch, latency, dispatch, cycle, gateway, null, peers, drain,
    /// restart, scaling (default all; scaling needs an etcd, /usr/bin/etcd or PM_ETCD_BIN).
    /// `submit` includes an unsynced baseline; `gateway` the direct baseline and a run over 10
    /// tenants x 10 pipelines; `null` the null-gRPC floors (pm-null); `peers` the shape the
    /// peers were measured in (8 agents x 1 and x 16 slots, dispatch at 1k/5k/10k per s);
    /// `drain` the same agents alone on a queue filled first (no producers);
    /// `auth` submits through a gateway with auth off and on, and the token check's cost;
    /// `streams` many idle agent streams, each on its own connection, held by one gateway
    /// and one shard (their memory, and dispatch p99 at 1,000/s without and with them);
    /// `soak` (only when named, 10 minutes by default): see `--soak-*` and perf/README.md.
    scenarios: Vec<String>,
    /// Idle agent streams the `streams` scenario opens.
    #[arg(long, default_value_t = 10_000)]
    idle_streams: usize,
    /// `soak` (never part of the default run): how long it submits.
    #[arg(long, default_value_t = 600)]
    soak_seconds: u64,
    /// `soak`: submits per second, open loop, through the gateway.
    #[arg(long, default_value_t = 500.0)]
    soak_rate: f64,
    /// `soak`: bytes each task prints.
    #[arg(long, default_value_t = 16 * 1024)]
    soak_output_bytes: usize,
    /// `soak`: idle watches held throughout (four per parked task).
    #[arg(long, default_value_t = 2_000)]
    soak_watches: usize,
    /// `soak`: idle agent streams held throughout, each on its own connection.
    #[arg(long, default_value_t = 5_000)]
    soak_idle: usize,
    /// `soak`: seconds between SIGKILLs of the agent (started again at once).
    #[arg(long, default_value_t = 60)]
    soak_kill_every: u64,
    /// Print the N slowest requests of every closed-loop run with the time each was sent,
    /// and the slow group commits of the shards of `submit` and `gateway` (their log lines;
    /// a shard logs those slower than `PM_SLOW_COMMIT_MS`, 100 by default): to match the
    /// tail against the commits behind it.
    #[arg(long, default_value_t = 0)]
    slowest: usize,
    /// `soak`: the agent's slots.
    #[arg(long, default_value_t = 32)]
    soak_slots: u32,
    /// `peers`: run only the legs whose figure name contains this (e.g. `cycle_gateway_8x1`
    /// or `dispatch_shard`), to alternate builds on one leg many times.
    #[arg(long, default_value = "")]
    peers_only: String,
}

/// The services a client talks to, each its own process.
struct Stack {
    tenants: Proc,
    shard: Proc,
    gateway: Proc,
}

impl Stack {
    /// The gateway's endpoint, or the shard's to go straight to it.
    fn endpoint(&self, gateway: bool) -> &str {
        if gateway {
            &self.gateway.endpoint
        } else {
            &self.shard.endpoint
        }
    }

    fn stop(self) {
        self.gateway.stop();
        slow_commits(&self.shard.stop());
        self.tenants.stop();
    }
}

/// With `--slowest`: prints the slow group commits a shard logged (see `Args::slowest`).
fn slow_commits(shard_log: &str) {
    if load::SLOWEST.load(Ordering::Relaxed) == 0 {
        return;
    }
    for commit in shard_log
        .lines()
        .filter(|l| l.contains("slow group commit"))
    {
        println!("  shard: {commit}");
    }
}

struct Bench {
    args: Args,
    dir: tempfile::TempDir,
    results: Vec<serde_json::Value>,
    warmup: Duration,
    duration: Duration,
    /// `--tls-*` flags every server started from now on gets (the `auth` scenario's last leg).
    tls: Vec<String>,
    /// Flags the shards started from now on get besides [`shard_args`] (the soak's).
    shard_extra: Vec<String>,
}

fn shard_args(data: &std::path::Path) -> Vec<String> {
    vec![
        "--data-dir".into(),
        data.display().to_string(),
        "--max-active-tasks".into(),
        "100000000".into(),
        "--max-active-per-client".into(),
        "100000000".into(),
    ]
}

/// Each process's CPU seconds, and this one's, at one moment: the start of a measured
/// window. A window starts after its warm-up, so the warm-up's CPU is not counted against the
/// window's tasks (it was until 2026-12-04: perf/RESULTS.md, "CPU per task, read as relative").
struct CpuMark {
    procs: Vec<f64>,
    own: f64,
}

impl CpuMark {
    fn now(procs: &[&Proc]) -> Self {
        Self {
            procs: procs.iter().map(|p| p.cpu_seconds()).collect(),
            own: procs::own_cpu_seconds(),
        }
    }

    /// The mark `delay` from now: with a load that warms up for `delay`, its window's start.
    async fn after(procs: &[&Proc], delay: Duration) -> Self {
        tokio::time::sleep(delay).await;
        Self::now(procs)
    }

    /// CPU seconds spent since the mark, by each process and by this one.
    fn spent(&self, procs: &[&Proc]) -> CpuSpent {
        CpuSpent {
            procs: procs
                .iter()
                .zip(&self.procs)
                .map(|(p, b)| p.cpu_seconds() - b)
                .collect(),
            own: procs::own_cpu_seconds() - self.own,
        }
    }
}

/// CPU seconds spent over one window or several, as [`CpuMark::spent`] gives them.
#[derive(Default)]
struct CpuSpent {
    procs: Vec<f64>,
    own: f64,
}

impl CpuSpent {
    fn add(&mut self, other: CpuSpent) {
        self.procs.resize(other.procs.len(), 0.0);
        for (a, b) in self.procs.iter_mut().zip(other.procs) {
            *a += b;
        }
        self.own += other.own;
    }
}

/// CPU seconds per 1,000 tasks of each process over the windows `spent` covers.
fn cpu_per_k(procs: &[&Proc], spent: &CpuSpent, tasks: u64) -> serde_json::Value {
    // To 0.1 µs per task: batched submits cost ~8 µs each, so 1 µs steps hid 10% changes.
    let per_k = |secs: f64| (secs / tasks.max(1) as f64 * 1000.0 * 10_000.0).round() / 10_000.0;
    let mut out = serde_json::Map::new();
    for (p, secs) in procs.iter().zip(&spent.procs) {
        out.insert(p.name.clone(), json!(per_k(*secs)));
    }
    out.insert("pm-perf".into(), json!(per_k(spent.own)));
    serde_json::Value::Object(out)
}

fn line(name: &str, m: &Measured, extra: &str) {
    let errors = if m.errors.is_empty() {
        String::new()
    } else {
        format!(" errors={:?}", m.errors)
    };
    println!(
        "{name:<34} {:>10.0} tasks/s  p50 {:>7.2} ms  p90 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2}  max {:>8.2}{extra}{errors}",
        m.tps(),
        m.ms(0.5),
        m.ms(0.9),
        m.ms(0.99),
        m.ms(0.999),
        m.max_ms()
    );
    for slow in &m.slowest {
        println!(
            "  slow: sent {} took {:.2} ms",
            humantime::format_rfc3339_micros(slow.sent),
            slow.us as f64 / 1000.0
        );
    }
}

fn figures(name: &str, m: &Measured) -> serde_json::Value {
    json!({
        "scenario": name,
        "tasks_per_s": m.tps().round(),
        "p50_ms": m.ms(0.5), "p90_ms": m.ms(0.9), "p99_ms": m.ms(0.99),
        "p999_ms": m.ms(0.999), "max_ms": m.max_ms(),
        "errors": m.errors,
    })
}

impl Bench {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Between runs, with no process of ours running: removes the data dirs of earlier runs
    /// and waits for the kernel to write their dirty pages back (`sync`). Otherwise a run
    /// after one that wrote gigabytes pays for that write-back in its own fsyncs (measured:
    /// dispatch p50 at 10,000/s 4-6 ms alone, 0.3-1.1 s right after the submit runs).
    fn settle(&self) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(self.dir.path())? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        let synced = std::process::Command::new("sync").status()?;
        anyhow::ensure!(synced.success(), "sync failed: {synced}");
        Ok(())
    }

    async fn shard(&self, name: &str) -> anyhow::Result<Proc> {
        let mut args = shard_args(&self.path(name));
        args.extend(self.tls.iter().cloned());
        args.extend(self.shard_extra.iter().cloned());
        Proc::start(&self.args.bin_dir, "pm-shard", &args, self.dir.path()).await
    }

    fn targets(endpoint: &str, gateway: bool, n: usize) -> anyhow::Result<Vec<Target>> {
        (0..n)
            .map(|_| Target::connect(endpoint, gateway, PIPELINE))
            .collect()
    }

    fn journal(log: &str) -> (u64, u64) {
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("journal totals"))
            .unwrap_or("");
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (field("syncs="), field("writes="))
    }

    /// Durable submits straight to one shard: closed loop with 64 clients, then batches of
    /// 100, then ack latency open loop at a fixed rate.
    async fn submit(&mut self, which: &[&str]) -> anyhow::Result<()> {
        self.settle()?;
        let shard = self.shard("submit").await?;
        let targets = Self::targets(&shard.endpoint, false, self.args.connections)?;
        let started = Instant::now();
        let measured = [&shard];
        let mut spent = CpuSpent::default();
        let mut total = 0;
        if which.contains(&"submit") {
            let (m, mark) = tokio::join!(
                load::closed_loop(&targets, 64, 1, self.warmup, self.duration),
                CpuMark::after(&measured, self.warmup)
            );
            spent.add(mark.spent(&measured));
            total += m.tasks;
            line("submit (64 clients, unary)", &m, "");
            self.results.push(figures("submit_unary_64", &m));
        }
        if which.contains(&"batch") {
            let (m, mark) = tokio::join!(
                load::closed_loop(&targets, 8, 100, self.warmup, self.duration),
                CpuMark::after(&measured, self.warmup)
            );
            spent.add(mark.spent(&measured));
            total += m.tasks;
            line("submit (8 clients, batches of 100)", &m, "");
            self.results.push(figures("submit_batch_100", &m));
        }
        if which.contains(&"latency") {
            for rate in [1_000.0, 20_000.0] {
                let (m, mark) = tokio::join!(
                    load::open_loop(&targets, rate, 1, self.warmup, self.duration),
                    CpuMark::after(&measured, self.warmup)
                );
                spent.add(mark.spent(&measured));
                total += m.tasks;
                self.record_open_loop(
                    &format!("ack latency, open loop {rate:.0}/s"),
                    &format!("ack_latency_{rate:.0}"),
                    &m,
                    "",
                    rate,
                );
            }
        }
        let cpu = cpu_per_k(&measured, &spent, total);
        let rss = shard.rss_mib();
        let elapsed = started.elapsed();
        let log = shard.stop();
        slow_commits(&log);
        if which.contains(&"submit") {
            // The same unary load on a shard that does not fsync: what durability costs.
            self.settle()?;
            let mut args = shard_args(&self.path("submit-unsynced"));
            args.push("--unsafe-no-fsync".into());
            let unsynced =
                Proc::start(&self.args.bin_dir, "pm-shard", &args, self.dir.path()).await?;
            let targets = Self::targets(&unsynced.endpoint, false, self.args.connections)?;
            let m = load::closed_loop(&targets, 64, 1, self.warmup, self.duration).await;
            let synced = pick(&self.results, "submit_unary_64", "tasks_per_s");
            line(
                "baseline: same, without fsync",
                &m,
                &format!("  (fsync'd / unsynced: {:.2}x)", synced / m.tps()),
            );
            let mut f = figures("submit_unary_64_unsynced_baseline", &m);
            f["synced_over_unsynced"] = json!(synced / m.tps());
            self.results.push(f);
            unsynced.stop();
        }
        let (syncs, writes) = Self::journal(&log);
        println!(
            "  shard: {syncs} fsyncs for {writes} writes ({:.1} per fsync, {:.0} fsyncs/s), cpu s per 1k tasks {cpu}, rss {rss:.0} MiB with the tasks queued",
            writes as f64 / syncs.max(1) as f64,
            syncs as f64 / elapsed.as_secs_f64()
        );
        self.results.push(json!({"scenario": "submit_shard_process", "fsyncs": syncs, "writes": writes,
            "fsyncs_per_s": (syncs as f64 / elapsed.as_secs_f64()).round(), "cpu_s_per_1k": cpu, "rss_mib": rss}));
        Ok(())
    }

    /// Submit -> agent receipt with an idle agent holding free slots, open loop; then the
    /// full cycle with the agent finishing each task at once.
    async fn dispatch(&mut self, which: &[&str]) -> anyhow::Result<()> {
        if which.contains(&"dispatch") {
            for rate in [1_000.0, 10_000.0] {
                self.settle()?;
                let shard = self.shard(&format!("dispatch-{rate}")).await?;
                let m = self
                    .open_dispatch(&shard.endpoint, false, &shard.endpoint, 1, 4096, rate)
                    .await?;
                self.record_open_loop(
                    &format!("dispatch, open loop {rate:.0}/s"),
                    &format!("dispatch_{rate:.0}"),
                    &m,
                    "  (submit -> Assign at the agent)",
                    rate,
                );
                shard.stop();
            }
        }
        if which.contains(&"cycle") {
            self.settle()?;
            let shard = self.shard("cycle").await?;
            let (m, submitted_tps, cpu) = self
                .cycle(&shard.endpoint, false, &shard.endpoint, 1, 1024, &[&shard])
                .await?;
            line(
                "full cycle (64 clients, no-op agent)",
                &m,
                &format!("  (latency: submit ack; cpu s/1k {cpu})"),
            );
            let mut f = figures("full_cycle", &m);
            f["submitted_per_s"] = json!(submitted_tps.round());
            f["cpu_s_per_1k"] = cpu;
            self.results.push(f);
            shard.stop();
        }
        Ok(())
    }

    /// 64 unary producers against `targets`, closed loop; prints and keeps the figure with
    /// the CPU per 1,000 tasks of `procs`.
    async fn unary_64(&mut self, label: &str, scenario: &str, targets: &[Target], procs: &[&Proc]) {
        let (m, mark) = tokio::join!(
            load::closed_loop(targets, 64, 1, self.warmup, self.duration),
            CpuMark::after(procs, self.warmup)
        );
        let cpu = cpu_per_k(procs, &mark.spent(procs), m.tasks);
        line(label, &m, &format!("  cpu s/1k {cpu}"));
        let mut f = figures(scenario, &m);
        f["cpu_s_per_1k"] = cpu;
        self.results.push(f);
    }

    /// Prints and keeps an open-loop figure with the rate it was driven at.
    fn record_open_loop(
        &mut self,
        label: &str,
        scenario: &str,
        m: &Measured,
        note: &str,
        rate: f64,
    ) {
        line(label, m, note);
        let mut f = figures(scenario, m);
        f["target_rate"] = json!(rate);
        self.results.push(f);
    }

    /// `agents` fake agents with `slots` each, connected to `agent_endpoint`; returns their
    /// shared receipts and what stops them.
    fn agents(
        agent_endpoint: &str,
        agents: usize,
        slots: u32,
    ) -> (
        Arc<AgentStats>,
        Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    ) {
        let stats = Arc::new(AgentStats::default());
        let handles = (0..agents)
            .map(|_| {
                tokio::spawn(load::fake_agent(
                    agent_endpoint.to_owned(),
                    PIPELINE.into(),
                    slots,
                    stats.clone(),
                ))
            })
            .collect();
        (stats, handles)
    }

    /// Open-loop submits at `rate` to `submit_endpoint` while `agents` x `slots` fake agents
    /// on `agent_endpoint` take them; latency is submit (scheduled time) -> Assign received.
    async fn open_dispatch(
        &self,
        submit_endpoint: &str,
        gateway: bool,
        agent_endpoint: &str,
        agents: usize,
        slots: u32,
        rate: f64,
    ) -> anyhow::Result<Measured> {
        let (stats, handles) = Self::agents(agent_endpoint, agents, slots);
        let targets = Self::targets(submit_endpoint, gateway, self.args.connections)?;
        let recording = stats.clone();
        let warmup = self.warmup;
        tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            recording.recording.store(true, Ordering::Relaxed);
        });
        let submitted = load::open_loop(&targets, rate, 1, self.warmup, self.duration).await;
        // Let the last tasks arrive (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.received.load(Ordering::Relaxed)
            < (rate * (self.warmup + self.duration).as_secs_f64()) as u64 * 99 / 100
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for h in handles {
            h.abort();
        }
        let latency = stats.latency.lock().expect("lock").take();
        Ok(Measured {
            tasks: submitted.tasks,
            window: self.duration,
            latency,
            errors: submitted.errors,
            ..Measured::default()
        })
    }

    /// The full cycle: 64 closed-loop producers submit to `submit_endpoint` while `agents` x
    /// `slots` fake agents on `agent_endpoint` finish each task at once. Returns tasks
    /// finished (latency: submit ack), the submit rate, and CPU per 1,000 finished of `procs`.
    async fn cycle(
        &self,
        submit_endpoint: &str,
        gateway: bool,
        agent_endpoint: &str,
        agents: usize,
        slots: u32,
        procs: &[&Proc],
    ) -> anyhow::Result<(Measured, f64, serde_json::Value)> {
        let (stats, handles) = Self::agents(agent_endpoint, agents, slots);
        let targets = Self::targets(submit_endpoint, gateway, self.args.connections)?;
        let measure = async {
            tokio::time::sleep(self.warmup).await;
            let mark = CpuMark::now(procs);
            let before = stats.received.load(Ordering::Relaxed);
            tokio::time::sleep(self.duration).await;
            let cycled = stats.received.load(Ordering::Relaxed) - before;
            (cycled, mark.spent(procs))
        };
        let (submitted, (cycled, spent)) = tokio::join!(
            load::closed_loop(&targets, 64, 1, self.warmup, self.duration),
            measure
        );
        for h in handles {
            h.abort();
        }
        let cpu = cpu_per_k(procs, &spent, cycled);
        let tps = submitted.tps();
        Ok((
            Measured {
                tasks: cycled,
                window: self.duration,
                latency: submitted.latency,
                errors: submitted.errors,
                ..Measured::default()
            },
            tps,
            cpu,
        ))
    }

    /// The null-gRPC floors: `pm-null` answering SubmitTask at once, then the same behind a
    /// `pm-null --forward` hop, under the same 64 unary producers on the same connections as
    /// every other unary scenario. The unary targets are ratios of these.
    async fn null(&mut self) -> anyhow::Result<()> {
        self.settle()?;
        let bin = self.args.bin_dir.clone();
        let server = Proc::start(&bin, "pm-null", &[], self.dir.path()).await?;
        let targets = Self::targets(&server.endpoint, true, self.args.connections)?;
        self.unary_64(
            "null gRPC server (64 clients, unary)",
            "null_unary_64",
            &targets,
            &[&server],
        )
        .await;
        // The latency floor: the same open loop as `latency`, answered at once.
        let m = load::open_loop(&targets, 1_000.0, 1, self.warmup, self.duration).await;
        line("null gRPC server, open loop 1000/s", &m, "");
        self.results.push(figures("null_latency_1000", &m));
        let mut hop = Proc::start(
            &bin,
            "pm-null",
            &["--forward".into(), server.endpoint.clone()],
            self.dir.path(),
        )
        .await?;
        hop.name = "pm-null-hop".into();
        let targets = Self::targets(&hop.endpoint, true, self.args.connections)?;
        self.unary_64(
            "null gRPC behind a null hop",
            "null_hop_unary_64",
            &targets,
            &[&hop, &server],
        )
        .await;
        hop.stop();
        server.stop();
        Ok(())
    }

    /// The peers' harness shape, through the gateway and straight to the shard: 64 unary
    /// producers while 8 agents x 1 and x 16 slots finish every task at once, then open-loop
    /// dispatch at 1,000, 5,000 and 10,000/s to 8 agents x 16 slots.
    async fn peers(&mut self) -> anyhow::Result<()> {
        for gateway in [true, false] {
            let path = if gateway { "gateway" } else { "shard" };
            for slots in [1u32, 16] {
                let scenario = format!("peers_cycle_{path}_8x{slots}");
                if !scenario.contains(&self.args.peers_only) {
                    continue;
                }
                self.settle()?;
                let stack = self.stack(&format!("peers-{path}-{slots}")).await?;
                let endpoint = stack.endpoint(gateway);
                let procs = [&stack.gateway, &stack.shard];
                let (m, submitted_tps, cpu) = self
                    .cycle(endpoint, gateway, endpoint, 8, slots, &procs)
                    .await?;
                line(
                    &format!("cycle via {path}, 8 agents x {slots}"),
                    &m,
                    &format!("  (submitted {submitted_tps:.0}/s; cpu s/1k {cpu})"),
                );
                let mut f = figures(&scenario, &m);
                f["submitted_per_s"] = json!(submitted_tps.round());
                f["cpu_s_per_1k"] = cpu;
                self.results.push(f);
                stack.stop();
            }
            for rate in [1_000.0, 5_000.0, 10_000.0] {
                let scenario = format!("peers_dispatch_{path}_{rate:.0}");
                if !scenario.contains(&self.args.peers_only) {
                    continue;
                }
                self.settle()?;
                let stack = self.stack(&format!("peers-{path}-{rate}")).await?;
                let endpoint = stack.endpoint(gateway);
                let m = self
                    .open_dispatch(endpoint, gateway, endpoint, 8, 16, rate)
                    .await?;
                self.record_open_loop(
                    &format!("dispatch via {path}, open loop {rate:.0}/s"),
                    &scenario,
                    &m,
                    "  (submit -> Assign, 8 agents x 16)",
                    rate,
                );
                stack.stop();
            }
        }
        Ok(())
    }

    /// The agents' loop alone: the queue filled first (batches of 100 for 3 s, 8 s for 16
    /// slots, through the same path), then 8 agents x 1 and x 16 slots finish every task at once with no
    /// producer running, through the gateway and straight to the shard. Against `peers`, whose
    /// cycles share the cores with 64 producers, it tells the loop's own rate from the cost of
    /// sharing.
    async fn drain(&mut self) -> anyhow::Result<()> {
        for gateway in [true, false] {
            let path = if gateway { "gateway" } else { "shard" };
            for slots in [1u32, 16] {
                self.settle()?;
                let stack = self.stack(&format!("drain-{path}-{slots}")).await?;
                let endpoint = stack.endpoint(gateway);
                let targets = Self::targets(endpoint, gateway, self.args.connections)?;
                // Enough for the window at the rates measured here (x16 drains ~3x faster).
                let fill = Duration::from_secs(if slots == 1 { 3 } else { 8 });
                let filled = load::closed_loop(&targets, 64, 100, Duration::ZERO, fill).await;
                let procs = [&stack.gateway, &stack.shard];
                let (stats, handles) = Self::agents(endpoint, 8, slots);
                tokio::time::sleep(self.warmup).await;
                let mark = CpuMark::now(&procs);
                let start = stats.received.load(Ordering::Relaxed);
                tokio::time::sleep(self.duration).await;
                let end = stats.received.load(Ordering::Relaxed);
                let spent = mark.spent(&procs);
                for h in handles {
                    h.abort();
                }
                let cycled = end - start;
                let cpu = cpu_per_k(&procs, &spent, cycled);
                // A queue that ran dry before the window closed understates the rate.
                let dry = end >= filled.tasks;
                let refused: u64 = filled.errors.values().sum();
                let m = Measured {
                    tasks: cycled,
                    window: self.duration,
                    ..Measured::default()
                };
                line(
                    &format!("drain via {path}, 8 agents x {slots}, no producers"),
                    &m,
                    &format!(
                        "  ({} queued first, {refused} batches refused{}; cpu s/1k {cpu})",
                        filled.tasks,
                        if dry { ", RAN DRY: a lower bound" } else { "" }
                    ),
                );
                let mut f = figures(&format!("drain_{path}_8x{slots}"), &m);
                f["queued_first"] = json!(filled.tasks);
                f["ran_dry"] = json!(dry);
                f["cpu_s_per_1k"] = cpu;
                self.results.push(f);
                stack.stop();
            }
        }
        Ok(())
    }

    /// Many idle agent streams (the seeds' "large number of established TCP connections"):
    /// dispatch at 1,000/s through the gateway to 8 agents x 16, then `--idle-streams`
    /// agents connect, each on its own TCP connection through the gateway, serving a
    /// pipeline that gets no tasks; the gateway's and the shard's RSS before and after give
    /// the memory per idle stream; then the same dispatch again with them held.
    async fn streams(&mut self) -> anyhow::Result<()> {
        // One descriptor per connection here too.
        let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
        let n = self.args.idle_streams;
        self.settle()?;
        let stack = self.stack("streams").await?;
        let gw = stack.gateway.endpoint.clone();
        let before = self.open_dispatch(&gw, true, &gw, 8, 16, 1_000.0).await?;
        self.record_open_loop(
            "dispatch via gateway 1,000/s, no idle streams",
            "streams_dispatch_before",
            &before,
            "  (submit -> Assign, 8 agents x 16)",
            1_000.0,
        );
        // The idle agents' pipeline: it exists, and no task is ever submitted to it.
        pm_proto::client::pipelines(pm_proto::client::channel(&gw)?)
            .apply_pipeline(apply_noop(load::last_segment(IDLE_PIPELINE)))
            .await?;
        let rss = |p: &procs::Proc| p.rss_mib();
        let (gw0, shard0) = (rss(&stack.gateway), rss(&stack.shard));
        let started = Instant::now();
        let idle = load::IdleAgents::open(&gw, IDLE_PIPELINE, n).await;
        let connect_s = started.elapsed().as_secs_f64();
        let (held, failed) = (idle.connected(), idle.ended());
        println!("  {held} of {n} idle streams connected in {connect_s:.1} s ({failed} ended)");
        // Let allocations settle before reading RSS.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (gw1, shard1) = (rss(&stack.gateway), rss(&stack.shard));
        let per = |a: f64, b: f64| (b - a) * 1024.0 / held.max(1) as f64;
        println!(
            "  RSS: gateway {gw0:.1} -> {gw1:.1} MiB ({:.1} KiB per stream), shard {shard0:.1} -> {shard1:.1} MiB ({:.1} KiB per stream)",
            per(gw0, gw1),
            per(shard0, shard1)
        );
        let after = self.open_dispatch(&gw, true, &gw, 8, 16, 1_000.0).await?;
        self.record_open_loop(
            &format!("dispatch via gateway 1,000/s, {held} idle streams"),
            "streams_dispatch_after",
            &after,
            "  (submit -> Assign, 8 agents x 16)",
            1_000.0,
        );
        let mut f = json!({
            "scenario": "streams_memory",
            "idle_streams": held,
            "gateway_rss_mib": [gw0, gw1],
            "shard_rss_mib": [shard0, shard1],
            "gateway_kib_per_stream": per(gw0, gw1),
            "shard_kib_per_stream": per(shard0, shard1),
        });
        f["connect_s"] = json!(connect_s);
        self.results.push(f);
        drop(idle);
        stack.stop();
        Ok(())
    }

    /// tenant-service, a shard and a gateway in front of them (auth off: the hot path as
    /// measured before auth), with the tenant `perf`, the application `bench` and the no-op
    /// pipeline applied through the public API.
    async fn stack(&self, name: &str) -> anyhow::Result<Stack> {
        Ok(self.stack_with(name, false).await?.0)
    }

    /// The same, with auth on or off; with it on, also the platform admin's token.
    async fn stack_with(&self, name: &str, auth: bool) -> anyhow::Result<(Stack, Bearer)> {
        let bin = self.args.bin_dir.clone();
        let meta = self.path(&format!("{name}-tenant-service"));
        let admin_file = self.path(&format!("{name}-admin.client"));
        let mut args = vec!["--data-dir".into(), meta.display().to_string()];
        if auth {
            args.extend([
                "--bootstrap-admin-file".into(),
                admin_file.display().to_string(),
            ]);
        }
        args.extend(self.tls.iter().cloned());
        let tenants = Proc::start(&bin, "pm-tenant-service", &args, self.dir.path()).await?;
        let shard = self.shard(&format!("{name}-shard")).await?;
        let mut args = vec![
            "--tenant-service".into(),
            tenants.endpoint.clone(),
            "--shard".into(),
            shard.endpoint.clone(),
        ];
        if !auth {
            args.push("--insecure-no-auth".into());
        }
        args.extend(self.tls.iter().cloned());
        let gateway = Proc::start(&bin, "pm-gateway", &args, self.dir.path()).await?;
        let channel = pm_proto::client::channel(&gateway.endpoint)?;
        let token = if auth {
            // Written before tenant-service listens, so it is there now.
            let saved = std::fs::read_to_string(&admin_file)?;
            let (id, secret) = saved
                .trim()
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("{} is not id:secret", admin_file.display()))?;
            let admin = pm_proto::client::Credentials::Client {
                id: id.into(),
                secret: secret.into(),
            };
            admin.token(&channel).await?
        } else {
            None
        };
        let bearer = Bearer::new(token.as_deref()).map_err(anyhow::Error::msg)?;
        pm_proto::client::tenants_with(channel.clone(), bearer.clone())
            .create_tenant(pm_proto::v1::CreateTenantRequest {
                tenant_id: "perf".into(),
                tenant: None,
            })
            .await?;
        let mut pipelines = pm_proto::client::pipelines_with(channel, bearer.clone());
        pipelines
            .create_application(pm_proto::v1::CreateApplicationRequest {
                parent: "tenants/perf".into(),
                application_id: "bench".into(),
                application: None,
            })
            .await?;
        pipelines
            .apply_pipeline(apply_noop(load::last_segment(PIPELINE)))
            .await?;
        let stack = Stack {
            tenants,
            shard,
            gateway,
        };
        Ok((stack, bearer))
    }

    /// The cost of authentication on the submit path: the same unary submits through a
    /// gateway with auth off, then on (a token per client, verified on every call), then on
    /// over TLS with mTLS behind the gateway, back to back; and the token check itself, cold
    /// (a new token each time) and remembered. Runs last: TLS, once on, stays on in this
    /// process.
    async fn auth(&mut self) -> anyhow::Result<()> {
        let legs = [
            (
                "auth-off",
                false,
                "submit through the gateway, auth off",
                "submit_via_gateway_auth_off",
            ),
            (
                "auth-on",
                true,
                "submit through the gateway, auth on",
                "submit_via_gateway_auth_on",
            ),
            (
                "auth-tls",
                true,
                "submit through the gateway, auth on, TLS + mTLS",
                "submit_via_gateway_auth_tls",
            ),
        ];
        for (name, auth, label, scenario) in legs {
            self.settle()?;
            if name == "auth-tls" {
                self.tls = self.certificates()?;
            }
            let (stack, bearer) = self.stack_with(name, auth).await?;
            let targets = (0..self.args.connections)
                .map(|_| {
                    Target::connect_as(&stack.gateway.endpoint, true, PIPELINE, bearer.clone())
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let all = [&stack.gateway, &stack.tenants, &stack.shard];
            self.unary_64(label, scenario, &targets, &all).await;
            stack.stop();
        }
        let (cold, warm) = auth_check_cost();
        println!("  token check: {cold:.1} us cold (signature), {warm:.2} us remembered");
        self.results.push(json!({
            "scenario": "token_check",
            "cold_us": cold,
            "remembered_us": warm,
        }));
        Ok(())
    }

    /// The same closed-loop submit through the gateway (with tenant-service behind it) and
    /// straight to a shard, side by side: throughput and CPU per 1,000 tasks of each process.
    async fn gateway(&mut self) -> anyhow::Result<()> {
        self.settle()?;
        let Stack {
            tenants,
            shard,
            gateway,
        } = self.stack("gateway").await?;
        let all = [&gateway, &tenants, &shard];
        let targets = Self::targets(&gateway.endpoint, true, self.args.connections)?;
        let (via, mark) = tokio::join!(
            load::closed_loop(&targets, 64, 1, self.warmup, self.duration),
            CpuMark::after(&all, self.warmup)
        );
        let via_cpu = cpu_per_k(&all, &mark.spent(&all), via.tasks);
        line(
            "submit through the gateway",
            &via,
            &format!("  cpu s/1k {via_cpu}"),
        );
        let direct_targets = Self::targets(&shard.endpoint, false, self.args.connections)?;
        let measured = [&shard];
        let (direct, mark) = tokio::join!(
            load::closed_loop(&direct_targets, 64, 1, self.warmup, self.duration),
            CpuMark::after(&measured, self.warmup)
        );
        let direct_cpu = cpu_per_k(&measured, &mark.spent(&measured), direct.tasks);
        line(
            "submit straight to the shard",
            &direct,
            &format!("  cpu s/1k {direct_cpu}"),
        );
        let server_cpu = |v: &serde_json::Value| {
            ["pm-gateway", "pm-tenant-service", "pm-shard"]
                .iter()
                .filter_map(|k| v.get(*k).and_then(|x| x.as_f64()))
                .sum::<f64>()
        };
        let ratio = server_cpu(&via_cpu) / server_cpu(&direct_cpu).max(1e-9);
        println!(
            "  gateway path / direct: {:.2}x server CPU per task, {:.2}x throughput",
            ratio,
            via.tps() / direct.tps()
        );
        let mut f = figures("submit_via_gateway", &via);
        f["cpu_s_per_1k"] = via_cpu;
        f["server_cpu_ratio_vs_direct"] = json!(ratio);
        self.results.push(f);
        let mut f = figures("submit_direct_baseline", &direct);
        f["cpu_s_per_1k"] = direct_cpu;
        self.results.push(f);
        // Many tenants and pipelines: 10 tenants with 10 pipelines each, submits spread
        // round-robin over all 100 (pipeline cache, validation and fair-share flows included).
        let mut names = Vec::new();
        let channel = pm_proto::client::channel(&gateway.endpoint)?;
        let mut tenant_client = pm_proto::client::tenants(channel.clone());
        let mut pipelines = pm_proto::client::pipelines(channel);
        for t in 0..10 {
            let tenant = format!("tenant-{t}");
            tenant_client
                .create_tenant(pm_proto::v1::CreateTenantRequest {
                    tenant_id: tenant.clone(),
                    tenant: None,
                })
                .await?;
            pipelines
                .create_application(pm_proto::v1::CreateApplicationRequest {
                    parent: format!("tenants/{tenant}"),
                    application_id: "app".into(),
                    application: None,
                })
                .await?;
            for p in 0..10 {
                let applied = pipelines
                    .apply_pipeline(pm_proto::v1::ApplyPipelineRequest {
                        parent: format!("tenants/{tenant}/applications/app"),
                        pipeline_id: format!("p{p}"),
                        source: Some(pm_proto::v1::apply_pipeline_request::Source::Spec(
                            load::noop_spec(),
                        )),
                    })
                    .await?;
                names.push(applied.into_inner().name);
            }
        }
        let names = Arc::new(names);
        let spread: Vec<Target> = Self::targets(&gateway.endpoint, true, self.args.connections)?
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.over(names.clone(), i * 13))
            .collect();
        let m = load::closed_loop(&spread, 64, 1, self.warmup, self.duration).await;
        line("gateway, 10 tenants x 10 pipelines", &m, "");
        self.results
            .push(figures("submit_via_gateway_100_pipelines", &m));
        gateway.stop();
        slow_commits(&shard.stop());
        tenants.stop();
        Ok(())
    }

    /// Fills a shard with N READY tasks, reads its RSS, kills it, and times the restart
    /// until it serves again.
    async fn restart(&mut self) -> anyhow::Result<()> {
        self.settle()?;
        let n: u64 = if self.args.quick { 100_000 } else { 1_000_000 };
        let port = procs::free_port();
        let data = self.path("restart");
        let bin = self.args.bin_dir.clone();
        let shard =
            Proc::start_on(&bin, "pm-shard", &shard_args(&data), self.dir.path(), port).await?;
        let idle_rss = shard.rss_mib();
        let targets = Self::targets(&shard.endpoint, false, self.args.connections)?;
        let filled = Instant::now();
        let per_worker = n / 8 / 1000;
        let workers: Vec<_> = (0..8)
            .map(|i| {
                let mut t = targets[i % targets.len()].clone();
                tokio::spawn(async move {
                    let mut acked = 0u64;
                    for _ in 0..per_worker {
                        acked += t.submit(1000, 0).await.unwrap_or(0) as u64;
                    }
                    acked
                })
            })
            .collect();
        let mut acked = 0;
        for w in workers {
            acked += w.await?;
        }
        let fill_secs = filled.elapsed().as_secs_f64();
        let rss = shard.rss_mib();
        // The store's memtables are still being flushed right after the fill; read again
        // once they are (the figure a shard holding these tasks idles at).
        tokio::time::sleep(Duration::from_secs(10)).await;
        let rss_settled = shard.rss_mib();
        let filled_log = shard.log_so_far();
        shard.crash();
        let restarted = Instant::now();
        let shard =
            Proc::start_on(&bin, "pm-shard", &shard_args(&data), self.dir.path(), port).await?;
        let serving = restarted.elapsed();
        let rss_after = shard.rss_mib();
        let log = shard.stop();
        // A field of the shard's log line that contains `line`.
        let logged_in = |log: &str, line: &str, field: &str| {
            let prefix = format!("{field}=");
            log.lines()
                .find(|l| l.contains(line))
                .and_then(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(prefix.as_str()))
                })
                .unwrap_or("?")
                .to_owned()
        };
        let logged = |line: &str, field: &str| logged_in(&log, line, field);
        // The filled shard flushes its memtables and hands freed memory back once quiet
        // (scheduler-shard `memory`).
        let released = "freed memory returned to the OS";
        let release_ms = logged_in(&filled_log, released, "flushed_and_purged_ms");
        let released_from = logged_in(&filled_log, released, "rss_before_mib");
        let released_to = logged_in(&filled_log, released, "rss_after_mib");
        let open_ms = logged("read the task store", "open_ms");
        let replay_ms = logged("read the task store", "read_and_index_ms");
        let indexed_ms = logged("recovered tasks from disk", "indexed_ms");
        println!(
            "restart with {acked} READY tasks        serving again {:.2} s after SIGKILL (store open {open_ms} ms, read and indexed {replay_ms} ms, records all read at {indexed_ms} ms); rss {rss:.0} MiB right after the fill, {rss_settled:.0} MiB 10 s later (once quiet, flushed and purged: {released_from} -> {released_to} MiB in {release_ms} ms), {rss_after:.0} MiB after the restart (idle {idle_rss:.0}); filled at {:.0} tasks/s in batches of 1000",
            serving.as_secs_f64(),
            acked as f64 / fill_secs
        );
        self.results.push(json!({"scenario": "restart", "tasks": acked, "serving_after_s": serving.as_secs_f64(),
            "store_open_ms": open_ms,
            "replay_ms": replay_ms, "rss_mib": rss, "rss_settled_mib": rss_settled, "release_ms": release_ms, "rss_after_restart_mib": rss_after, "idle_rss_mib": idle_rss,
            "fill_tasks_per_s": (acked as f64 / fill_secs).round()}));
        Ok(())
    }
}

impl Bench {
    /// A CA and one certificate for 127.0.0.1 and localhost (made with rcgen), written to the
    /// bench dir; turns TLS on in this process with them and returns the servers' flags.
    fn certificates(&self) -> anyhow::Result<Vec<String>> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Not rcgen's default name, which the leaf also has: a leaf named like its issuer
        // does not verify.
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "pm-perf CA");
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        let key = KeyPair::generate()?;
        let cert = leaf.signed_by(&key, &issuer)?;
        let (ca_path, cert_path, key_path) = (
            self.path("tls-ca.pem"),
            self.path("tls.crt"),
            self.path("tls.key"),
        );
        std::fs::write(&ca_path, ca_cert.pem())?;
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        pm_proto::tls::init(&pm_proto::tls::TlsFiles {
            identity: Some((cert_path.clone(), key_path.clone())),
            ca: ca_path.clone(),
        })?;
        Ok(vec![
            "--tls-cert".into(),
            cert_path.display().to_string(),
            "--tls-key".into(),
            key_path.display().to_string(),
            "--tls-ca".into(),
            ca_path.display().to_string(),
        ])
    }
}

/// Microseconds per token check: cold (2,000 distinct tokens, each's signature verified) and
/// remembered (the same token 100,000 times), on one core of this process.
fn auth_check_cost() -> (f64, f64) {
    use pm_auth::{Claims, KeyPair, Role, Signer, Verifier};
    let key = KeyPair::generate();
    let verifier = Verifier::default();
    verifier.set_keys([(key.kid.clone(), key.public_key.clone())]);
    let signer = Signer::new(&key);
    let now = pm_auth::unix_secs();
    let tokens: Vec<String> = (0..2_000)
        .map(|i| {
            signer.sign(&Claims {
                iss: String::new(),
                sub: format!("tenants/perf/clients/c{i}"),
                tenant: "perf".into(),
                roles: vec![Role::Submitter],
                priority: 10,
                pipelines: vec![],
                iat: now,
                exp: now + 600,
            })
        })
        .collect();
    let start = std::time::Instant::now();
    for t in &tokens {
        verifier.verify(t).expect("a fresh token verifies");
    }
    let cold = start.elapsed().as_secs_f64() * 1e6 / tokens.len() as f64;
    let start = std::time::Instant::now();
    for _ in 0..100_000 {
        verifier.verify(&tokens[0]).expect("remembered");
    }
    let warm = start.elapsed().as_secs_f64() * 1e6 / 100_000.0;
    (cold, warm)
}

fn pick(results: &[serde_json::Value], scenario: &str, key: &str) -> f64 {
    results
        .iter()
        .find(|r| r["scenario"] == scenario)
        .and_then(|r| r[key].as_f64())
        .unwrap_or(f64::NAN)
}

// jemalloc on x86_64, as in the servers: the generator shares the machine's two cores with
// them, and glibc's malloc was ~21% of its samples in open loop, its arena lock contended
// (perf/RESULTS.md, "A lighter closed-loop generator").
pm_proto::server_allocator!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    load::SLOWEST.store(args.slowest, Ordering::Relaxed);
    let (warmup, duration) = if args.quick {
        (Duration::from_millis(500), Duration::from_secs(3))
    } else {
        (Duration::from_secs(2), Duration::from_secs(10))
    };
    let all = [
        "submit",
        "batch",
        "latency",
        "dispatch",
        "cycle",
        "gateway",
        "null",
        "peers",
        "drain",
        "restart",
        "scaling",
        "partitions",
        "auth",
        "streams",
    ];
    let chosen: Vec<String> =
        if args.scenarios.is_empty() || args.scenarios.iter().any(|s| s == "all") {
            all.iter().map(|s| s.to_string()).collect()
        } else {
            args.scenarios.clone()
        };
    for s in &chosen {
        anyhow::ensure!(
            all.contains(&s.as_str()) || s == "soak",
            "unknown scenario {s:?}; use {}, or soak",
            all.join(", ")
        );
    }
    let which: Vec<&str> = chosen.iter().map(String::as_str).collect();
    let mut bench = Bench {
        args,
        dir: tempfile::tempdir()?,
        results: Vec::new(),
        warmup,
        duration,
        tls: Vec::new(),
        shard_extra: Vec::new(),
    };
    let _ = load::now_ns();
    load::SPEC_EVERY_TASK.store(bench.args.spec_every_task, Ordering::Relaxed);
    anyhow::ensure!(
        bench.args.connections > 0,
        "--connections must be at least 1"
    );
    // The live progress line, on a terminal only (logs stay clean).
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        tokio::spawn(async {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let now = load::ACKED.load(Ordering::Relaxed);
                eprint!(
                    "\r  {:>9} tasks/s now, {:>10} acknowledged so far  ",
                    now - last,
                    now
                );
                last = now;
            }
        });
    }
    println!(
        "pm-perf: {} s per scenario after {} ms warm-up; binaries from {}",
        duration.as_secs(),
        warmup.as_millis(),
        bench.args.bin_dir.display()
    );
    if which
        .iter()
        .any(|s| ["submit", "batch", "latency"].contains(s))
    {
        bench.submit(&which).await?;
    }
    if which.iter().any(|s| ["dispatch", "cycle"].contains(s)) {
        bench.dispatch(&which).await?;
    }
    if which.contains(&"gateway") {
        bench.gateway().await?;
    }
    if which.contains(&"null") {
        bench.null().await?;
    }
    if which.contains(&"peers") {
        bench.peers().await?;
    }
    if which.contains(&"drain") {
        bench.drain().await?;
    }
    if which.contains(&"restart") {
        bench.restart().await?;
    }
    if which.contains(&"streams") {
        bench.streams().await?;
    }
    if which.contains(&"soak") {
        bench.soak().await?;
    }
    let etcd = pm_cluster::testing::etcd_binary();
    if which.contains(&"scaling") && !etcd.exists() {
        println!(
            "scaling: skipped, no etcd at {} (`./scripts/setup.sh --test` installs one, or set PM_ETCD_BIN)",
            etcd.display()
        );
    } else if which.contains(&"scaling") {
        let rate = if bench.args.quick { 2_000.0 } else { 5_000.0 };
        let dir = bench.path("scaling");
        std::fs::create_dir_all(&dir)?;
        let f = scaling::run(&bench.args.bin_dir, &dir, rate, bench.args.quick).await?;
        println!("{}", f.text);
        bench.results.push(f.json);
    }
    if which.contains(&"partitions") && !etcd.exists() {
        println!("partitions: skipped, no etcd at {}", etcd.display());
    } else if which.contains(&"partitions") {
        let dir = bench.path("partitions");
        std::fs::create_dir_all(&dir)?;
        let f = partitions::run(&bench.args.bin_dir, &dir, bench.args.quick).await?;
        bench.results.push(f.json);
    }
    // Last: its TLS leg turns TLS on for the rest of this process.
    if which.contains(&"auth") {
        bench.auth().await?;
    }
    if let Some(path) = &bench.args.json {
        std::fs::write(path, serde_json::to_string_pretty(&bench.results)?)?;
    }
    let r = &bench.results;
    println!(
        "summary: submit_tps={:.0} submit_p99_ms={:.2} dispatch_p99_ms={:.2} cycle_tps={:.0} batch_tps={:.0}",
        pick(r, "submit_unary_64", "tasks_per_s"),
        pick(r, "ack_latency_20000", "p99_ms"),
        pick(r, "dispatch_10000", "p99_ms"),
        pick(r, "full_cycle", "tasks_per_s"),
        pick(r, "submit_batch_100", "tasks_per_s"),
    );
    Ok(())
}
