//! The shard's metrics: their names, labels and help, the handles the hot path updates
//! (atomics, no lock), and the scrape-time collector of queue depths and agents, which reads
//! [`Scheduler::queue_stats`]. Every series carries `component="shard"`. Without
//! `--metrics-listen` every handle is a no-op.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};

use ::metrics::{
    Counter, Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};

use pm_cluster::{Ring, RingKey};
use pm_proto::names::PipelineName;
use pm_proto::v1::TaskState;

use crate::ownership::Ownership;
use crate::scheduler::{FINAL_STATES, QueueStats, Scheduler};

pub const COMPONENT: &str = "shard";

/// What the scheduler updates as things happen.
pub struct SchedulerMetrics {
    /// READY (submit or requeue) to Assign; ms resolution (the record's clock).
    pub dispatch_latency: Histogram,
    /// Assign to result.
    pub task_duration: Histogram,
    pub leases_expired: Counter,
    pub results_duplicate: Counter,
    /// Tasks handed to other shards on a ring change.
    pub handoff_tasks: Counter,
}

impl SchedulerMetrics {
    pub fn new() -> Self {
        describe();
        Self {
            dispatch_latency: histogram!("pm_dispatch_latency_seconds", "component" => COMPONENT),
            task_duration: histogram!("pm_task_duration_seconds", "component" => COMPONENT),
            leases_expired: counter!("pm_leases_expired_total", "component" => COMPONENT),
            results_duplicate: counter!("pm_results_duplicate_total", "component" => COMPONENT),
            handoff_tasks: counter!("pm_handoff_tasks_total", "component" => COMPONENT),
        }
    }
}

impl Default for SchedulerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the group-commit writer updates, on its own thread.
pub struct JournalMetrics {
    pub sync_seconds: Histogram,
    pub fsync_seconds: Histogram,
    pub batch_writes: Histogram,
    pub unsynced_batches: Counter,
    pub store_errors: Counter,
}

impl JournalMetrics {
    pub fn new() -> Self {
        describe();
        Self {
            sync_seconds: histogram!("pm_journal_sync_seconds", "component" => COMPONENT),
            fsync_seconds: histogram!("pm_journal_fsync_seconds", "component" => COMPONENT),
            batch_writes: histogram!("pm_journal_batch_writes", "component" => COMPONENT),
            unsynced_batches: counter!("pm_journal_unsynced_batches_total", "component" => COMPONENT),
            store_errors: counter!("pm_store_errors_total", "component" => COMPONENT),
        }
    }
}

impl Default for JournalMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn describe() {
    describe_histogram!(
        "pm_dispatch_latency_seconds",
        ::metrics::Unit::Seconds,
        "From a task becoming READY (submit or requeue) to its Assign being sent; millisecond resolution."
    );
    describe_histogram!(
        "pm_task_duration_seconds",
        ::metrics::Unit::Seconds,
        "From a task's Assign to its agent's result."
    );
    describe_counter!(
        "pm_leases_expired_total",
        "Leases that expired unrenewed (their tasks were delivered again or ended in ERROR)."
    );
    describe_counter!(
        "pm_results_duplicate_total",
        "Results ignored as stale, repeated or from a session that does not hold the lease."
    );
    describe_counter!(
        "pm_handoff_tasks_total",
        "Tasks handed to their new owner after a ring change."
    );
    describe_histogram!(
        "pm_journal_sync_seconds",
        ::metrics::Unit::Seconds,
        "Time of one group commit: the write and its fsync."
    );
    describe_histogram!(
        "pm_journal_fsync_seconds",
        ::metrics::Unit::Seconds,
        "The fdatasync of one group commit alone."
    );
    describe_histogram!("pm_journal_batch_writes", "Writes per group commit.");
    describe_counter!(
        "pm_journal_unsynced_batches_total",
        "Batches of dispatch records and results only, handed to the OS without an fsync (the next group commit syncs them, within 1 ms if a result is among them)."
    );
    describe_counter!(
        "pm_store_errors_total",
        "Group commits that failed (every write in them was refused)."
    );
    describe_gauge!(
        "pm_queue_tasks",
        "Unfinished tasks on this shard by pipeline and state (ready or in_progress)."
    );
    describe_gauge!(
        "pm_queue_oldest_ready_age_seconds",
        "How long ago the oldest READY task of the pipeline was submitted (0 when none waits)."
    );
    describe_counter!(
        "pm_tasks_submitted_total",
        "Tasks acknowledged by this shard since it started."
    );
    describe_counter!(
        "pm_tasks_finished_total",
        "Tasks that ended on this shard since it started, by final state."
    );
    describe_gauge!(
        "pm_agent_sessions",
        "Agent streams connected to this shard."
    );
    describe_gauge!(
        "pm_agent_slots_free",
        "Slots the connected agents have free (their credit)."
    );
    describe_gauge!("pm_ring_shards", "Shards in the ring this shard sees.");
    describe_gauge!(
        "pm_ring_owned_keys",
        "Pipelines (ring keys) with tasks on this shard."
    );
    describe_gauge!(
        "pm_handoff_pending_tasks",
        "Unfinished tasks held here of pipelines this shard no longer owns (all of them while it leaves): what the handoff still has to move."
    );
    describe_gauge!(
        "pm_etcd_connected",
        "1 while the shard follows the ring in etcd, 0 while it serves the last ring it saw."
    );
}

/// The label name of a final state.
fn state_label(state: TaskState) -> &'static str {
    match state {
        TaskState::Done => "done",
        TaskState::Error => "error",
        TaskState::Cancelled => "cancelled",
        TaskState::Ready => "ready",
        TaskState::InProgress => "in_progress",
        _ => "unspecified",
    }
}

/// Sets the gauges and per-pipeline counters from the scheduler at each scrape, for as long
/// as the shard runs. Pipelines no longer on the shard are shown at 0 once, then dropped.
pub fn collect_on_scrape(scheduler: &Arc<Scheduler>, ownership: &Arc<Ownership>, clustered: bool) {
    let (scheduler, ownership): (Weak<Scheduler>, Weak<Ownership>) =
        (Arc::downgrade(scheduler), Arc::downgrade(ownership));
    let shown: Mutex<HashSet<Arc<str>>> = Mutex::default();
    pm_proto::metrics::on_scrape(move || {
        let (Some(scheduler), Some(ownership)) = (scheduler.upgrade(), ownership.upgrade()) else {
            return false;
        };
        let stats = scheduler.queue_stats();
        let now_ms = pm_proto::unix_ms().max(0) as u64;
        let mut shown = shown.lock().expect("shown lock");
        let mut now = HashSet::with_capacity(stats.pipelines.len());
        let ring = ownership.ring();
        let pending = pending_handoff(&stats, &ring, ownership.me(), ownership.leaving());
        for p in &stats.pipelines {
            let labels = pipeline_labels(&p.pipeline);
            let queued = |state: TaskState| {
                let mut l = labels.clone();
                l.push(("state", state_label(state).to_owned()));
                gauge!("pm_queue_tasks", &l)
            };
            queued(TaskState::Ready).set(p.ready as f64);
            queued(TaskState::InProgress).set(p.in_progress as f64);
            let age_ms = p.oldest_ready_ms.map_or(0, |ms| now_ms.saturating_sub(ms));
            gauge!("pm_queue_oldest_ready_age_seconds", &labels).set(age_ms as f64 / 1000.0);
            counter!("pm_tasks_submitted_total", &labels).absolute(p.counts.submitted);
            for (state, n) in FINAL_STATES.iter().zip(p.counts.finished) {
                let mut l = labels.clone();
                l.push(("state", state_label(*state).to_owned()));
                counter!("pm_tasks_finished_total", &l).absolute(n);
            }
            now.insert(p.pipeline.clone());
        }
        for gone in shown.difference(&now) {
            let labels = pipeline_labels(gone);
            for state in [TaskState::Ready, TaskState::InProgress] {
                let mut l = labels.clone();
                l.push(("state", state_label(state).to_owned()));
                gauge!("pm_queue_tasks", &l).set(0.0);
            }
            gauge!("pm_queue_oldest_ready_age_seconds", &labels).set(0.0);
        }
        *shown = now;
        gauge!("pm_agent_sessions", "component" => COMPONENT).set(stats.sessions as f64);
        gauge!("pm_agent_slots_free", "component" => COMPONENT).set(stats.slots_free as f64);
        gauge!("pm_ring_owned_keys", "component" => COMPONENT).set(stats.pipelines_held as f64);
        gauge!("pm_ring_shards", "component" => COMPONENT).set(ring.len() as f64);
        gauge!("pm_handoff_pending_tasks", "component" => COMPONENT).set(pending as f64);
        if clustered {
            let connected = ownership.membership().connected();
            gauge!("pm_etcd_connected", "component" => COMPONENT)
                .set(f64::from(u8::from(connected)));
        }
        true
    });
}

/// Tasks of the ring keys `me` no longer owns by `ring` (all of them while it is
/// `leaving`): `pm_handoff_pending_tasks`. A pipeline's unfinished tasks; for a partitioned
/// one, every task held of a lost partition, finished ones too (they move as well). With no
/// owner at all (an empty ring), there is nowhere to move them, so they are not pending.
fn pending_handoff(stats: &QueueStats, ring: &Ring, me: &str, leaving: bool) -> u64 {
    let lost = |key: RingKey| ring.owner(&key).is_some_and(|o| o.id != me || leaving);
    stats
        .pipelines
        .iter()
        .filter_map(|p| Some((p, PipelineName::parse(&p.pipeline).ok()?)))
        .map(|(p, name)| match stats.partitions.get(&p.pipeline) {
            Some(held) => held
                .iter()
                .filter(|(i, _)| lost(RingKey::new(name.clone(), *i)))
                .map(|(_, n)| n)
                .sum(),
            None if lost(RingKey::whole(name)) => p.ready + p.in_progress,
            None => 0,
        })
        .sum()
}

fn pipeline_labels(pipeline: &str) -> Vec<(&'static str, String)> {
    let (tenant, application, name) = match PipelineName::parse(pipeline) {
        Ok(p) => (p.tenant, p.application, p.pipeline),
        Err(_) => (String::new(), String::new(), pipeline.to_owned()),
    };
    vec![
        ("component", COMPONENT.to_owned()),
        ("tenant", tenant),
        ("application", application),
        ("pipeline", name),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::PipelineStats;
    use pm_cluster::Member;

    #[test]
    fn pending_handoff_counts_the_unfinished_tasks_of_pipelines_owned_elsewhere() {
        let member = |id: &str| Member {
            id: id.into(),
            address: format!("http://{id}:1"),
            started_at: 1,
        };
        let ring = Ring::new(1, [member("a"), member("b")]);
        let pipelines: Vec<PipelineStats> = (0..40)
            .map(|i| PipelineStats {
                pipeline: format!("tenants/t/applications/a/pipelines/p{i}").into(),
                ready: 10,
                in_progress: 1,
                oldest_ready_ms: None,
                counts: Default::default(),
            })
            .collect();
        let owned_by_b = pipelines
            .iter()
            .filter(|p| {
                let key = RingKey::whole(PipelineName::parse(&p.pipeline).unwrap());
                ring.owner(&key).unwrap().id == "b"
            })
            .count() as u64;
        let hot = "tenants/t/applications/a/pipelines/hot";
        let lost_partitions: Vec<u32> = (0..8)
            .filter(|&i| {
                let key = RingKey::new(PipelineName::parse(hot).unwrap(), i);
                ring.owner(&key).unwrap().id == "b"
            })
            .collect();
        assert!(!lost_partitions.is_empty() && lost_partitions.len() < 8);
        let mut stats = QueueStats {
            pipelines,
            ..QueueStats::default()
        };
        stats.pipelines.push(PipelineStats {
            pipeline: hot.into(),
            ready: 1000,
            in_progress: 1000,
            oldest_ready_ms: None,
            counts: Default::default(),
        });
        stats.partitions.insert(
            hot.into(),
            (0..8).map(|i| (i, 100 + u64::from(i))).collect(),
        );
        let hot_lost: u64 = lost_partitions.iter().map(|&i| 100 + u64::from(i)).sum();
        let stats = &stats;
        assert!(owned_by_b > 0 && owned_by_b < 40);
        assert_eq!(
            pending_handoff(stats, &ring, "a", false),
            owned_by_b * 11 + hot_lost,
            "the pipelines b owns, and the partitions of the hot one b owns"
        );
        assert_eq!(
            pending_handoff(stats, &ring, "a", true),
            40 * 11 + (0..8).map(|i| 100 + i).sum::<u64>(),
            "leaving: all of them"
        );
        let empty = Ring::new(2, []);
        assert_eq!(
            pending_handoff(stats, &empty, "a", true),
            0,
            "nowhere to go"
        );
    }
}
