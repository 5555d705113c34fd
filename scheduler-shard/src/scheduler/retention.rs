//! Retention: finished tasks are collected after `Options::retention`, or sooner, oldest
//! first, while a pipeline keeps more than `Options::max_finished_per_pipeline` or the shard
//! more than `Options::max_finished_tasks` ([`finished`] picks them); a spec once no task
//! holds it.

use super::*;

impl Scheduler {
    pub(super) async fn run_collector(self: Arc<Self>, cancel: CancellationToken) {
        let period =
            (self.options.retention / 10).clamp(Duration::from_millis(10), Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            // A backlog over the cap is worked off in batches, not one batch a period.
            while self.collect().await == COLLECT_BATCH {}
            self.collect_specs();
        }
    }

    /// Forgets the specs no task holds any more (their last task was collected or handed
    /// off, or a restart found them unused) and deletes them from disk; returns how many.
    /// Whoever still needs a spec holds its `Arc` (a record, a submit or an adoption being
    /// written), so a count of one is the map's own. The delete is appended under the lock:
    /// a later submit of that spec finds it gone and writes it again (or asks the gateway
    /// for it), and its write lands after the delete.
    /// A failed delete is logged by the journal and leaves the spec on disk; the next start
    /// finds it unused again.
    pub fn collect_specs(&self) -> usize {
        let mut guard = self.lock();
        let inner = &mut *guard;
        // Origins no task holds go first: they hold specs.
        inner.last_origin = None;
        inner
            .origins
            .retain(|_, origin| Arc::strong_count(origin) > 1);
        let mut unused = Vec::new();
        inner.specs.retain(|id, held| {
            let used = Arc::strong_count(held) > 1;
            if !used {
                unused.push(*id);
            }
            used
        });
        for id in &unused {
            inner.durable_specs.remove(id);
        }
        let n = unused.len();
        if n > 0 {
            self.journal
                .append(unused.into_iter().map(|id| Op::DeleteSpec { id }).collect());
            tracing::debug!(specs = n, "unused specs collected");
        }
        n
    }

    /// Deletes finished tasks older than the retention period, and the oldest ones past
    /// [`Options::max_finished_per_pipeline`] of a pipeline or
    /// [`Options::max_finished_tasks`] of the shard; at most [`COLLECT_BATCH`]; returns how
    /// many.
    pub async fn collect(&self) -> usize {
        let due = self.lock().finished.take_due(finished::Limits {
            cutoff: Instant::now().checked_sub(self.options.retention),
            max_total: self.options.max_finished_tasks,
            max_per_pipeline: self.options.max_finished_per_pipeline,
            batch: COLLECT_BATCH,
        });
        if due.is_empty() {
            return 0;
        }
        let ops = {
            let inner = self.lock();
            due.iter()
                .filter(|(_, _, key)| inner.tasks.get(*key).is_some())
                .map(|(pipeline, _, key)| Op::DeleteTask {
                    pipeline: pipeline.clone(),
                    key: *key,
                })
                .collect()
        };
        let written = self.write(ops).await;
        let mut inner = self.lock();
        if written.is_err() {
            inner.finished.put_back(due);
            return 0;
        }
        let collected = due.len();
        for (_, _, key) in due {
            inner.unindex(key);
        }
        tracing::debug!(collected, "finished tasks collected");
        collected
    }
}
