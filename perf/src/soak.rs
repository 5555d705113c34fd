//! The soak (`pm-perf soak`, not part of the default run): one gateway and one shard under a
//! steady open-loop submit rate for many minutes, every task run by a real `pm-agent` as a
//! real process printing `--soak-output-bytes`, while `--soak-watches` idle watches and
//! `--soak-idle` idle agent streams (each on its own connection) are held, and the agent is
//! SIGKILLed every `--soak-kill-every` seconds and started again. Reports the servers' RSS
//! over time, the submit latency and errors by code, and, once the queue has drained,
//! whether every acknowledged task finished (from the shard's own counters).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::load::{self, Target};
use crate::procs::{self, Proc};
use crate::{APPLICATION as APP, Bench, IDLE_PIPELINE, apply_noop};

const SOAK: &str = "soak";
/// Tasks of this pipeline are never run (no agent serves it): the idle watches watch them.
const PARKED: &str = "soak-parked";

/// The real agent, started again after each SIGKILL.
struct Agent {
    child: Child,
}

impl Agent {
    fn start(bench: &Bench, gateway: &str, kills: u64) -> anyhow::Result<Agent> {
        let log = bench.path(&format!("pm-agent-{kills}.log"));
        let child = Command::new(bench.args.bin_dir.join("pm-agent"))
            .args(["--endpoint", gateway, "--agent-id", "soak"])
            .args(["--pipeline", &format!("{APP}/pipelines/{SOAK}")])
            .args(["--slots", &bench.args.soak_slots.to_string()])
            .arg("--work-root")
            .arg(bench.path("agent-work"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        Ok(Agent { child })
    }
}

/// SIGKILL, and reaped.
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shard's `/metrics`, over plain HTTP/1.0.
async fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: pm\r\n\r\n")
        .await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    Ok(body)
}

/// The values of `metric` for the pipeline `pipeline`, by their `state` label (or "" for
/// none).
fn by_state(text: &str, metric: &str, pipeline: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let wanted = format!("pipeline=\"{pipeline}\"");
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        if !rest.starts_with('{') || !rest.contains(&wanted) {
            continue;
        }
        let state = rest
            .split("state=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
            .to_owned();
        let value = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        *out.entry(state).or_default() += value;
    }
    out
}

fn total(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Bench {
    pub(crate) async fn soak(&mut self) -> anyhow::Result<()> {
        let seconds = self.args.soak_seconds;
        let rate = self.args.soak_rate;
        let bytes = self.args.soak_output_bytes;
        let (n_watches, n_idle) = (self.args.soak_watches, self.args.soak_idle);
        let kill_every = Duration::from_secs(self.args.soak_kill_every.max(1));
        // One descriptor per idle connection.
        let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
        self.settle()?;
        let metrics = format!("127.0.0.1:{}", procs::free_port());
        // Leases of a killed agent's tasks come back within 10 s; finished tasks are retained
        // 20,000 per pipeline, so retention runs during the soak, not only after it.
        self.shard_extra = [
            "--metrics-listen",
            &metrics,
            "--lease-ttl-seconds",
            "10",
            "--max-finished-per-pipeline",
            "20000",
        ]
        .map(String::from)
        .to_vec();
        let stack = self.stack("soak").await;
        self.shard_extra.clear();
        let stack = stack?;
        let gw = stack.gateway.endpoint.clone();
        let mut pipelines = pm_proto::client::pipelines(pm_proto::client::channel(&gw)?);
        // One process per task (sh's own printf), printing `bytes` bytes and a newline.
        let command = format!("printf '%{bytes}s\\n' x");
        for (id, commands) in [(SOAK, vec![command]), (PARKED, vec!["true".to_owned()])] {
            let document = format!(
                "name: {id}\nparams: {{t0: {{}}}}\nstages:\n  - name: s\n    jobs:\n      - name: j\n        commands: {commands:?}\n"
            );
            pipelines
                .apply_pipeline(pm_proto::v1::ApplyPipelineRequest {
                    parent: APP.into(),
                    pipeline_id: String::new(),
                    source: Some(pm_proto::v1::apply_pipeline_request::Source::SpecDocument(
                        document,
                    )),
                })
                .await?;
        }
        pipelines
            .apply_pipeline(apply_noop(load::last_segment(IDLE_PIPELINE)))
            .await?;

        // Idle watches, four per parked task.
        let mut tasks = pm_proto::client::tasks(pm_proto::client::channel(&gw)?);
        let mut held = Vec::new();
        let parked: Vec<String> = {
            let mut names = Vec::new();
            for _ in 0..n_watches.div_ceil(4) {
                let task = tasks
                    .submit_task(pm_proto::v1::SubmitTaskRequest {
                        parent: format!("{APP}/pipelines/{PARKED}"),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                names.push(task.name);
            }
            names
        };
        let rss = |p: &Proc| p.rss_mib();
        let start_rss = (rss(&stack.gateway), rss(&stack.shard));
        for name in parked.iter().cycle().take(n_watches) {
            let mut stream = tasks
                .watch_task(pm_proto::v1::WatchTaskRequest { name: name.clone() })
                .await?
                .into_inner();
            stream.message().await?;
            held.push(stream);
        }
        // Idle agent streams, each on its own connection.
        let idle = load::IdleAgents::open(&gw, IDLE_PIPELINE, n_idle).await;
        println!(
            "  soak: {n_watches} idle watches, {} of {n_idle} idle agent streams; RSS gateway {:.0} -> {:.0} MiB, shard {:.0} -> {:.0} MiB",
            idle.connected(),
            start_rss.0,
            rss(&stack.gateway),
            start_rss.1,
            rss(&stack.shard)
        );

        // The load: open-loop submits, the agent killed every `kill_every`, RSS sampled.
        let targets = (0..self.args.connections)
            .map(|_| Target::connect(&gw, true, &format!("{APP}/pipelines/{SOAK}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let run = Duration::from_secs(seconds);
        let load =
            tokio::spawn(
                async move { load::open_loop(&targets, rate, 1, Duration::ZERO, run).await },
            );
        let started = Instant::now();
        let mut agent = Some(Agent::start(self, &gw, 0)?);
        let mut kills = 0;
        let mut next_kill = started + kill_every;
        let mut samples = Vec::new();
        let mut next_sample = started;
        while started.elapsed() < run {
            let now = Instant::now();
            if now >= next_sample {
                let (g, s) = (rss(&stack.gateway), rss(&stack.shard));
                let t = started.elapsed().as_secs();
                println!(
                    "  soak t={t:>4} s  RSS gateway {g:.0} MiB  shard {s:.0} MiB  ({kills} agent kills)"
                );
                samples.push(json!({"t_s": t, "gateway_rss_mib": g, "shard_rss_mib": s}));
                next_sample += Duration::from_secs(30);
            }
            if now >= next_kill {
                drop(agent.take());
                kills += 1;
                agent = Some(Agent::start(self, &gw, kills)?);
                next_kill += kill_every;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let measured = load.await?;

        // Drained: no soak task READY or IN_PROGRESS (bounded: a backlog the agent could not
        // keep up with is reported as still queued), then the counters.
        let drain = Instant::now();
        let text = loop {
            let text = scrape(&metrics).await?;
            let queued = by_state(&text, "pm_queue_tasks", SOAK);
            if queued.values().sum::<f64>() == 0.0 || drain.elapsed() > Duration::from_secs(300) {
                break text;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let queued = by_state(&text, "pm_queue_tasks", SOAK);
        let submitted = by_state(&text, "pm_tasks_submitted_total", SOAK);
        let finished = by_state(&text, "pm_tasks_finished_total", SOAK);
        let acked = measured.tasks;
        // Acknowledged and neither finished nor still queued: lost.
        let lost = acked as f64 - finished.values().sum::<f64>() - queued.values().sum::<f64>();
        println!(
            "  soak: {acked} acknowledged at {:.0}/s, submit p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.1} ms, errors {:?}",
            measured.tps(),
            measured.ms(0.5),
            measured.ms(0.99),
            measured.ms(0.999),
            measured.max_ms(),
            measured.errors
        );
        println!(
            "  soak: drained in {:.1} s; submitted (shard) {submitted:?}, finished {finished:?}, still queued {queued:?}; lost (acknowledged, neither finished nor queued): {lost}; duplicate results {}, leases expired {}",
            drain.elapsed().as_secs_f64(),
            total(&text, "pm_results_duplicate_total"),
            total(&text, "pm_leases_expired_total"),
        );
        self.results.push(json!({
            "scenario": "soak",
            "seconds": seconds,
            "rate": rate,
            "output_bytes": bytes,
            "idle_watches": n_watches,
            "idle_streams": idle.connected(),
            "agent_kills": kills,
            "acked": acked,
            "submit_p99_ms": measured.ms(0.99),
            "submit_p999_ms": measured.ms(0.999),
            "submit_max_ms": measured.max_ms(),
            "errors": measured.errors,
            "finished": finished,
            "still_queued": queued,
            "lost": lost,
            "duplicate_results": total(&text, "pm_results_duplicate_total"),
            "rss": samples,
        }));
        drop(agent);
        drop(held);
        drop(idle);
        stack.stop();
        Ok(())
    }
}
