//! Scenario (e), scaling: a cluster on a real etcd (two shards, tenant-service, a gateway),
//! under an open-loop load of submits through the gateway spread over 20 pipelines with no
//! agents, so every shard holds a growing READY backlog. Meanwhile a third shard joins
//! (timed from its start until the gateway's ring shows it) and one of the first two leaves
//! by SIGTERM (timed from the signal until it exits, its backlog handed off). Submit latency
//! and refusals are measured across both changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use pm_cluster::Membership;
use pm_cluster::testing::Etcd;

use crate::load::{self, Target};
use crate::procs::Proc;

pub struct Figures {
    pub json: serde_json::Value,
    pub text: String,
}

/// A cluster shard's arguments: registered in `etcd` as `id`, its disk under `dir`, and no
/// admission limit in the way of a benchmark's backlog.
pub fn shard_args(etcd: &str, id: &str, dir: &std::path::Path) -> Vec<String> {
    vec![
        "--etcd".to_owned(),
        etcd.to_owned(),
        "--shard-id".into(),
        id.into(),
        "--data-dir".into(),
        dir.join(id).display().to_string(),
        "--max-active-tasks".into(),
        "100000000".into(),
        "--max-active-per-client".into(),
        "100000000".into(),
    ]
}

/// A gateway routing by the ring in `etcd`, with auth off.
pub async fn gateway(
    bin: &std::path::Path,
    etcd: &str,
    tenant_service: &str,
    dir: &std::path::Path,
) -> anyhow::Result<Proc> {
    let args = [
        "--etcd".into(),
        etcd.to_owned(),
        "--tenant-service".into(),
        tenant_service.to_owned(),
        "--insecure-no-auth".into(),
    ];
    Proc::start(bin, "pm-gateway", &args, dir).await
}

pub async fn run(
    bin: &std::path::Path,
    dir: &std::path::Path,
    rate_per_s: f64,
    quick: bool,
) -> anyhow::Result<Figures> {
    let etcd = Etcd::start();
    let e = etcd.endpoint.clone();
    let tenants = Proc::start(bin, "pm-tenant-service", &["--etcd".into(), e.clone()], dir).await?;
    let shard = |id: &str| shard_args(&e, id, dir);
    let s0 = Proc::start(bin, "pm-shard", &shard("s0"), dir).await?;
    let s1 = Proc::start(bin, "pm-shard", &shard("s1"), dir).await?;
    let view = Membership::watch(
        pm_cluster::etcd::connect(std::slice::from_ref(&e)).await?,
        CancellationToken::new(),
    );
    anyhow::ensure!(
        view.wait_for(Duration::from_secs(20), |r| r.len() == 2)
            .await,
        "two shards not in the ring"
    );
    let gateway = gateway(bin, &e, &tenants.endpoint, dir).await?;

    let channel = pm_proto::client::channel(&gateway.endpoint)?;
    pm_proto::client::pipelines(channel.clone())
        .create_application(pm_proto::v1::CreateApplicationRequest {
            parent: "tenants/default".into(),
            application_id: "scale".into(),
            application: None,
        })
        .await?;
    let mut names = Vec::new();
    for p in 0..20 {
        let applied = pm_proto::client::pipelines(channel.clone())
            .apply_pipeline(pm_proto::v1::ApplyPipelineRequest {
                parent: "tenants/default/applications/scale".into(),
                pipeline_id: format!("p{p}"),
                source: Some(pm_proto::v1::apply_pipeline_request::Source::Spec(
                    load::noop_spec(),
                )),
            })
            .await?;
        names.push(applied.into_inner().name);
    }
    let names = Arc::new(names);
    let targets: Vec<Target> = (0..4)
        .map(|i| {
            Target::connect(&gateway.endpoint, true, &names[0])
                .map(|t| t.over(names.clone(), i * 5))
        })
        .collect::<Result<_, _>>()?;

    let phase = if quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(8)
    };
    // Batches of 10 at rate/10 requests a second, over join + leave + a quiet tail.
    let load = tokio::spawn(async move {
        load::open_loop(&targets, rate_per_s / 10.0, 10, Duration::ZERO, phase * 3).await
    });

    tokio::time::sleep(phase).await;
    let t = Instant::now();
    let s2 = Proc::start(bin, "pm-shard", &shard("s2"), dir).await?;
    anyhow::ensure!(
        view.wait_for(Duration::from_secs(20), |r| r.len() == 3)
            .await,
        "s2 not in the ring"
    );
    let join = t.elapsed();

    tokio::time::sleep(phase).await;
    let t = Instant::now();
    let log = tokio::task::spawn_blocking(move || s0.stop()).await?;
    let leave = t.elapsed();
    let handed: u64 = log
        .lines()
        .filter(|l| l.contains("tasks handed off"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("adopted="))
        })
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    let m = load.await?;
    let text = format!(
        "scaling: join {:.0} ms (start -> in the ring), leave {:.2} s (SIGTERM -> exit, {handed} tasks handed off); submits during both at {:.0}/s: p50 {:.1} ms p99 {:.1} ms max {:.1} ms, refused {:?}",
        join.as_secs_f64() * 1000.0,
        leave.as_secs_f64(),
        m.tps(),
        m.ms(0.5),
        m.ms(0.99),
        m.max_ms(),
        m.errors
    );
    let json = json!({"scenario": "scaling", "join_ms": join.as_secs_f64() * 1000.0,
        "leave_s": leave.as_secs_f64(), "handed_off_on_leave": handed, "tasks_per_s": m.tps().round(),
        "p50_ms": m.ms(0.5), "p99_ms": m.ms(0.99), "max_ms": m.max_ms(), "errors": m.errors});
    for p in [s1, s2, gateway, tenants] {
        p.stop();
    }
    Ok(Figures { json, text })
}
