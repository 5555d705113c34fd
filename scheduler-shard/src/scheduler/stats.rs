//! What the shard counts per pipeline, and the snapshots of its queues that metrics and
//! `GetPipelineStats` read. The counts are kept under the scheduler's lock by the
//! transitions that already hold it; a snapshot takes the lock once, for O(pipelines +
//! leases + sessions) work, when it is asked for (a scrape, a stats call), never on the hot
//! path.

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

/// Tasks ended per second over the last [`RECENT_SECONDS`], by [`FINAL_STATES`]: a ring of
/// per-second buckets, each stamped with its second so a stale one reads as empty.
#[derive(Debug, Clone, Default)]
pub(super) struct RecentFinishes {
    buckets: Vec<(u64, [u32; 3])>,
}

/// The window of "ended in the last minute".
pub const RECENT_SECONDS: u64 = 60;

impl RecentFinishes {
    fn count(&mut self, now_s: u64, state: usize) {
        if self.buckets.is_empty() {
            self.buckets = vec![(0, [0; 3]); RECENT_SECONDS as usize];
        }
        let bucket = &mut self.buckets[(now_s % RECENT_SECONDS) as usize];
        if bucket.0 != now_s {
            *bucket = (now_s, [0; 3]);
        }
        bucket.1[state] = bucket.1[state].saturating_add(1);
    }

    /// Ended in the `RECENT_SECONDS` up to and including `now_s`.
    fn sum(&self, now_s: u64) -> [u64; 3] {
        let mut sum = [0u64; 3];
        for (second, counts) in &self.buckets {
            if now_s.saturating_sub(*second) < RECENT_SECONDS && *second <= now_s {
                for (s, c) in sum.iter_mut().zip(counts) {
                    *s += u64::from(*c);
                }
            }
        }
        sum
    }
}

/// One pipeline as `GetPipelineStats` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineQueue {
    pub ready: u64,
    pub in_progress: u64,
    /// Ended in the last [`RECENT_SECONDS`], by [`FINAL_STATES`].
    pub finished_recently: [u64; 3],
    /// How long the head of the queue has waited since it became READY.
    pub head_wait_ms: i64,
    /// How long ago the oldest READY task was submitted (to the second below).
    pub oldest_ready_age_ms: i64,
    pub agents: u32,
    pub free_slots: u64,
}

fn unix_seconds() -> u64 {
    (unix_ms().max(0) / 1000) as u64
}

/// One pipeline's queue now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineStats {
    pub pipeline: Arc<str>,
    pub ready: u64,
    pub in_progress: u64,
    /// When the oldest READY task was submitted, ms since the Unix epoch (to the second).
    pub oldest_ready_ms: Option<u64>,
    pub counts: PipelineCounts,
}

/// The shard's queues and agents now.
#[derive(Debug, Clone, Default)]
pub struct QueueStats {
    pub pipelines: Vec<PipelineStats>,
    pub sessions: u64,
    /// Credit of every session: slots free for another task.
    pub slots_free: u64,
    /// Pipelines with tasks on this shard.
    pub pipelines_held: u64,
    /// Tasks held (in any state) per partition of each partitioned pipeline.
    pub partitions: HashMap<Arc<str>, Vec<(u32, u64)>>,
}

impl Inner {
    /// The partitions of `pipeline` this shard holds tasks of, with how many, in order.
    pub(super) fn partitions_held(&self, pipeline: &str) -> Vec<(u32, u64)> {
        let all = self.by_pipeline.get(pipeline).map_or(0, |k| k.len());
        let others = self.by_partition.get(pipeline);
        let in_others: usize = others.map_or(0, |o| o.values().sum());
        let first = (all > in_others).then_some((0, (all - in_others) as u64));
        first
            .into_iter()
            .chain(others.into_iter().flatten().map(|(&i, &n)| (i, n as u64)))
            .collect()
    }

    fn counts(&mut self, pipeline: &Arc<str>) -> &mut PipelineCounts {
        self.counts.entry(pipeline.clone()).or_default()
    }

    pub(super) fn count_submitted(&mut self, pipeline: &Arc<str>) {
        self.counts(pipeline).submitted += 1;
    }

    pub(super) fn count_finished(&mut self, pipeline: &Arc<str>, state: TaskState) {
        if let Some(i) = FINAL_STATES.iter().position(|s| *s == state) {
            self.counts(pipeline).finished[i] += 1;
            self.recent
                .entry(pipeline.clone())
                .or_default()
                .count(unix_seconds(), i);
        }
    }
}

impl Scheduler {
    /// `pipeline`'s queue now (zeros for a pipeline this shard holds nothing of).
    pub fn pipeline_queue(&self, pipeline: &str) -> PipelineQueue {
        let inner = self.lock();
        let in_progress = inner
            .leases
            .tasks()
            .filter(|key| {
                inner
                    .tasks
                    .get(*key)
                    .is_some_and(|r| &**r.pipeline() == pipeline)
            })
            .count() as u64;
        let head_wait_ms = inner
            .queue
            .head_of(pipeline)
            .and_then(|key| inner.tasks.get(key))
            .map_or(0, |r| (unix_ms() - r.update_time_ms).max(0));
        let oldest_ready_age_ms = inner
            .queue
            .oldest_of(pipeline)
            .map_or(0, |ms| (unix_ms() - ms as i64).max(0));
        let serving = inner.sessions.values().filter(|s| s.serves(pipeline));
        let (agents, free_slots) = serving.fold((0u32, 0u64), |(n, free), s| {
            (n + 1, free + u64::from(s.credit))
        });
        PipelineQueue {
            ready: inner.queue.len_of(pipeline) as u64,
            in_progress,
            finished_recently: inner
                .recent
                .get(pipeline)
                .map_or([0; 3], |r| r.sum(unix_seconds())),
            head_wait_ms,
            oldest_ready_age_ms,
            agents,
            free_slots,
        }
    }

    /// Every pipeline's ready and leased tasks and counts, and the agents' free slots.
    pub fn queue_stats(&self) -> QueueStats {
        let inner = self.lock();
        let mut in_progress: HashMap<&str, u64> = HashMap::new();
        for key in inner.leases.tasks() {
            if let Some(record) = inner.tasks.get(key) {
                *in_progress.entry(&**record.pipeline()).or_default() += 1;
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
                oldest_ready_ms: inner.queue.oldest_of(pipeline),
                counts: inner.counts.get(pipeline).copied().unwrap_or_default(),
            })
            .collect();
        QueueStats {
            pipelines,
            sessions: inner.sessions.len() as u64,
            slots_free: inner.sessions.values().map(|s| u64::from(s.credit)).sum(),
            pipelines_held: inner.by_pipeline.len() as u64,
            partitions: inner
                .by_partition
                .keys()
                .map(|p| (p.clone(), inner.partitions_held(p)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_finishes_forget_what_left_the_window() {
        let mut recent = RecentFinishes::default();
        recent.count(1000, 0);
        recent.count(1000, 0);
        recent.count(1030, 1);
        recent.count(1059, 2);
        assert_eq!(recent.sum(1059), [2, 1, 1]);
        // 1000 is 60 s old at 1060: out of the window.
        assert_eq!(recent.sum(1060), [0, 1, 1]);
        // Its bucket is reused, not added to.
        recent.count(1060, 0);
        assert_eq!(recent.sum(1060), [1, 1, 1]);
        assert_eq!(recent.sum(1200), [0, 0, 0]);
        // A clock that went back does not count the future.
        assert_eq!(recent.sum(1020), [0, 0, 0]);
    }
}
