//! Retention: finished tasks are collected after `Options::retention`.

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
            self.collect().await;
        }
    }

    /// Deletes finished tasks older than the retention period; returns how many.
    pub async fn collect(&self) -> usize {
        let due: Vec<(Instant, TaskKey)> = {
            let mut inner = self.lock();
            let Some(cutoff) = Instant::now().checked_sub(self.options.retention) else {
                return 0;
            };
            let mut due = Vec::new();
            while due.len() < COLLECT_BATCH
                && inner.finished.first().is_some_and(|(at, _)| *at <= cutoff)
            {
                due.push(inner.finished.pop_first().expect("first exists"));
            }
            due
        };
        if due.is_empty() {
            return 0;
        }
        let ops = {
            let inner = self.lock();
            due.iter()
                .filter_map(|&(_, key)| {
                    let pipeline = inner.tasks.get(key)?.pipeline.clone();
                    Some(Op::DeleteTask { pipeline, key })
                })
                .collect()
        };
        let written = self.write(ops).await;
        let mut inner = self.lock();
        if written.is_err() {
            inner.finished.extend(due);
            return 0;
        }
        let collected = due.len();
        for (_, key) in due {
            inner.unindex(key);
        }
        tracing::debug!(collected, "finished tasks collected");
        collected
    }
}
