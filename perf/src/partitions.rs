//! Scenario "partitions": one hot pipeline's submit rate with `partitions: k` over S shard
//! processes, on a real etcd, through one gateway: batches of 100 from 8 closed-loop
//! clients. For each (S, k) it reports tasks/s and each shard's CPU per task it took (its
//! share by the ring: the partitions it owns over k). On this two-core machine every
//! process shares the same cores, so the rate is expected flat: what shows the work
//! splitting is each shard's share of the tasks and of the CPU.
//!
//! Then, with 4 shards and k = 4, the spread of dispatch latency over the partitions: 4
//! no-op agents of 16 slots through the gateway (each fanned in from every owner), an open
//! loop of single submits at [`DISPATCH_RATE`], and submit -> Assign by partition; and the
//! same with k = 1 (one owner, no fan-in) to compare.

use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use pm_cluster::Membership;
use pm_cluster::testing::Etcd;
use pm_proto::names::PipelineName;

use crate::load::{self, Target};
use crate::procs::Proc;
use crate::scaling::{self, Figures};

/// Submits a second of the dispatch-latency phase.
const DISPATCH_RATE: f64 = 2_000.0;

/// Shard processes and partitions measured, in this order.
const CASES: [(usize, u32); 9] = [
    (1, 1),
    (1, 2),
    (1, 4),
    (2, 1),
    (2, 2),
    (2, 4),
    (4, 1),
    (4, 2),
    (4, 4),
];

pub async fn run(
    bin: &std::path::Path,
    dir: &std::path::Path,
    quick: bool,
) -> anyhow::Result<Figures> {
    let (warmup, duration) = if quick {
        (Duration::from_millis(500), Duration::from_secs(2))
    } else {
        (Duration::from_secs(1), Duration::from_secs(5))
    };
    let mut text =
        String::from("partitions: one pipeline, batches of 100, 8 clients, through a gateway\n");
    let mut rows = Vec::new();
    for (n, (shards, k)) in CASES.into_iter().enumerate() {
        let dir = dir.join(format!("case{n}"));
        std::fs::create_dir_all(&dir)?;
        let etcd = Etcd::start();
        let e = etcd.endpoint.clone();
        let tenants = Proc::start(
            bin,
            "pm-tenant-service",
            &["--etcd".into(), e.clone()],
            &dir,
        )
        .await?;
        let mut procs = Vec::new();
        for i in 0..shards {
            let id = format!("s{i}");
            let args = scaling::shard_args(&e, &id, &dir);
            procs.push((id, Proc::start(bin, "pm-shard", &args, &dir).await?));
        }
        let cancel = CancellationToken::new();
        let view = Membership::watch(
            pm_cluster::etcd::connect(std::slice::from_ref(&e)).await?,
            cancel.clone(),
        );
        anyhow::ensure!(
            view.wait_for(Duration::from_secs(20), |r| r.len() == shards)
                .await,
            "{shards} shards not in the ring"
        );
        let gateway = scaling::gateway(bin, &e, &tenants.endpoint, &dir).await?;
        let channel = pm_proto::client::channel(&gateway.endpoint)?;
        let mut config = pm_proto::client::pipelines(channel);
        config
            .create_application(pm_proto::v1::CreateApplicationRequest {
                parent: "tenants/default".into(),
                application_id: "hot".into(),
                application: None,
            })
            .await?;
        let mut spec = load::noop_spec();
        spec.partitions = k;
        let name = config
            .apply_pipeline(pm_proto::v1::ApplyPipelineRequest {
                parent: "tenants/default/applications/hot".into(),
                pipeline_id: "hot".into(),
                source: Some(pm_proto::v1::apply_pipeline_request::Source::Spec(spec)),
            })
            .await?
            .into_inner()
            .name;
        let targets: Vec<Target> = (0..8)
            .map(|_| Target::connect(&gateway.endpoint, true, &name))
            .collect::<Result<_, _>>()?;
        // Each shard's share: the partitions it owns.
        let owners = view
            .ring()
            .partition_owners(&PipelineName::parse(&name)?, k);
        let share = |id: &str| {
            owners
                .get(id)
                .map_or(0.0, |(_, ps)| ps.len() as f64 / f64::from(k))
        };
        let before: Vec<f64> = procs.iter().map(|(_, p)| p.cpu_seconds()).collect();
        let gateway_before = gateway.cpu_seconds();
        let started = std::time::Instant::now();
        let m = load::closed_loop(&targets, 8, 100, warmup, duration).await;
        let elapsed = started.elapsed().as_secs_f64();
        let gateway_cpu = gateway.cpu_seconds() - gateway_before;
        // Tasks each shard took over the whole run (warm-up included), by its share.
        let all_tasks = m.tps() * elapsed;
        let mut per_shard = Vec::new();
        for ((id, p), cpu0) in procs.iter().zip(&before) {
            let cpu = p.cpu_seconds() - cpu0;
            let tasks = all_tasks * share(id);
            let us = if tasks > 0.0 {
                cpu / tasks * 1e6
            } else {
                f64::NAN
            };
            per_shard
                .push(json!({"shard": id, "share": share(id), "cpu_s": cpu, "us_per_task": us}));
        }
        let line = format!(
            "  S={shards} k={k}: {:.0} tasks/s; gateway {:.1} µs/task; shards (share, CPU s, µs/task): {}",
            m.tps(),
            gateway_cpu / all_tasks * 1e6,
            per_shard
                .iter()
                .map(|s| format!(
                    "{} {:.2} {:.2} {:.1}",
                    s["shard"].as_str().unwrap_or_default(),
                    s["share"].as_f64().unwrap_or_default(),
                    s["cpu_s"].as_f64().unwrap_or_default(),
                    s["us_per_task"].as_f64().unwrap_or(f64::NAN)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("{line}");
        text += &line;
        text.push('\n');
        rows.push(json!({"shards": shards, "partitions": k, "tasks_per_s": m.tps().round(),
            "errors": m.errors, "gateway_us_per_task": gateway_cpu / all_tasks * 1e6, "per_shard": per_shard}));
        // The dispatch phase at k = 4, and the same at k = 1 (no fan-in) to compare.
        if shards == 4 && (k == 1 || k == 4) {
            // A pipeline of its own: the first holds the READY backlog the submits left.
            let mut spec = load::noop_spec();
            spec.partitions = k;
            let fresh = config
                .apply_pipeline(pm_proto::v1::ApplyPipelineRequest {
                    parent: "tenants/default/applications/hot".into(),
                    pipeline_id: format!("dispatch-{k}"),
                    source: Some(pm_proto::v1::apply_pipeline_request::Source::Spec(spec)),
                })
                .await?
                .into_inner()
                .name;
            let spread =
                dispatch_by_partition(&gateway.endpoint, &fresh, k, warmup, duration).await?;
            println!("{}", spread.0);
            text += &spread.0;
            text.push('\n');
            rows.push(spread.1);
        }
        cancel.cancel();
        gateway.stop();
        for (_, p) in procs {
            p.stop();
        }
        tenants.stop();
    }
    Ok(Figures {
        json: json!({"scenario": "partitions", "cases": rows}),
        text,
    })
}

/// Submit -> Assign by partition of `pipeline` (with `k` partitions), at [`DISPATCH_RATE`]
/// open loop, with 4 no-op agents of 16 slots on `gateway`: the line printed and its JSON.
async fn dispatch_by_partition(
    gateway: &str,
    pipeline: &str,
    k: u32,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<(String, serde_json::Value)> {
    let stats = std::sync::Arc::new(load::AgentStats::default());
    let agents: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(load::fake_agent(
                gateway.to_owned(),
                pipeline.to_owned(),
                16,
                stats.clone(),
            ))
        })
        .collect();
    let targets = vec![Target::connect(gateway, true, pipeline)?];
    let recording = stats.clone();
    tokio::spawn(async move {
        tokio::time::sleep(warmup).await;
        recording
            .recording
            .store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let submitted = load::open_loop(&targets, DISPATCH_RATE, 1, warmup, duration).await;
    // The last tasks arrive (bounded).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for a in agents {
        a.abort();
    }
    let by_partition = std::mem::take(&mut *stats.by_partition.lock().expect("lock"));
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let line = format!(
        "  dispatch, S=4 k={k}, {DISPATCH_RATE:.0}/s open loop ({} submitted, refused {:?}), submit -> Assign by partition: {}",
        submitted.tasks,
        submitted.errors,
        by_partition
            .iter()
            .map(|(p, h)| format!(
                "p{p} n={} p50 {:.2} ms p99 {:.2} ms",
                h.len(),
                ms(h, 0.5),
                ms(h, 0.99)
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let json = json!({"dispatch_rate": DISPATCH_RATE, "partitions": k, "by_partition": by_partition.iter().map(|(p, h)| json!({
        "partition": p, "n": h.len(), "p50_ms": ms(h, 0.5), "p99_ms": ms(h, 0.99)})).collect::<Vec<_>>()});
    Ok((line, json))
}
