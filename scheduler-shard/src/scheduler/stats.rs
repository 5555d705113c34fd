//! What the shard counts per pipeline, and the snapshot of its queues that metrics (and
//! queue statistics) read. The counts are kept under the scheduler's lock by the
//! transitions that already hold it; a snapshot takes the lock once, for O(pipelines +
//! leases) work, when it is asked for (a scrape), never on the hot path.

use super::*;

/// Final states, in the order [`PipelineCounts::finished`] counts them.
pub const FINAL_STATES: [TaskState; 3] = [TaskState::Done, TaskState::Error, TaskState::Cancelled];

/// Counted for the shard's life per pipeline it ever served (as many as its interned names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineCounts {
    /// Tasks acknowledged by this shard (not adoptions from other shards).
    pub submitted: u64,
    /// Tasks that ended here, by [`FINAL_STATES`].
    pub finished: [u64; 3],
}

/// One pipeline's queue now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineStats {
    pub pipeline: Arc<str>,
    pub ready: u64,
    pub in_progress: u64,
    pub counts: PipelineCounts,
}

/// The shard's queues and agents now.
#[derive(Debug, Clone, Default)]
pub struct QueueStats {
    pub pipelines: Vec<PipelineStats>,
    pub sessions: u64,
    /// Credit of every session: slots free for another task.
    pub slots_free: u64,
    /// Pipelines with tasks on this shard (ring keys it holds).
    pub pipelines_held: u64,
}

impl Inner {
    fn counts(&mut self, pipeline: &Arc<str>) -> &mut PipelineCounts {
        self.counts.entry(pipeline.clone()).or_default()
    }

    pub(super) fn count_submitted(&mut self, pipeline: &Arc<str>) {
        self.counts(pipeline).submitted += 1;
    }

    pub(super) fn count_finished(&mut self, pipeline: &Arc<str>, state: TaskState) {
        if let Some(i) = FINAL_STATES.iter().position(|s| *s == state) {
            self.counts(pipeline).finished[i] += 1;
        }
    }
}

impl Scheduler {
    /// Every pipeline's ready and leased tasks and counts, and the agents' free slots.
    pub fn queue_stats(&self) -> QueueStats {
        let inner = self.lock();
        let mut in_progress: HashMap<&str, u64> = HashMap::new();
        for key in inner.leases.tasks() {
            if let Some(record) = inner.tasks.get(key) {
                *in_progress.entry(&*record.pipeline).or_default() += 1;
            }
        }
        // Every pipeline with tasks here or counted here (one may have ended all its tasks,
        // or had them handed off, and still have counts).
        let mut names: Vec<&Arc<str>> = inner.by_pipeline.keys().collect();
        names.extend(
            inner
                .counts
                .keys()
                .filter(|p| !inner.by_pipeline.contains_key(*p)),
        );
        let pipelines = names
            .into_iter()
            .map(|pipeline| PipelineStats {
                pipeline: pipeline.clone(),
                ready: inner.queue.len_of(pipeline) as u64,
                in_progress: in_progress.get(&**pipeline).copied().unwrap_or(0),
                counts: inner.counts.get(pipeline).copied().unwrap_or_default(),
            })
            .collect();
        QueueStats {
            pipelines,
            sessions: inner.sessions.len() as u64,
            slots_free: inner.sessions.values().map(|s| u64::from(s.credit)).sum(),
            pipelines_held: inner.by_pipeline.len() as u64,
        }
    }
}
