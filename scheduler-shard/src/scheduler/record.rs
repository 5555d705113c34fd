//! A task as the scheduler holds it in memory: only what scheduling needs, about 130 bytes
//! plus the encoded body (the params). Its disk record is made from shared parts
//! ([`TaskRecord::disk`]), and the public `pm.v1.Task` from that, outside the lock, when a
//! client or an agent reads the task.
//!
//! Every change goes through [`Next`]: planned under the lock (the record is marked busy),
//! written, then applied, so the state machine of [`crate::task`] is the only judge of a
//! state change.

use super::*;

/// A pipeline spec the shard holds, under its id (shared by every task that runs it).
pub(super) struct HeldSpec {
    pub id: SpecId,
    pub spec: Arc<PipelineSpec>,
}

/// The watchers of a running task and its current attempt's events (for late watchers).
/// Allocated only for watched tasks or tasks that report progress.
#[derive(Default)]
pub(super) struct Live {
    /// Events are shared, not copied, by the watchers and the history: a slot of the
    /// channel is a pointer, so a watched task costs [`WATCH_BUFFER`] pointers, not events.
    pub watchers: Option<broadcast::Sender<Arc<TaskEvent>>>,
    /// Bounded by [`HISTORY_LIMIT`]; emptied when the task finishes (its result carries the
    /// outputs).
    pub history: Vec<Arc<TaskEvent>>,
}

/// What the tasks of one pipeline, flow and spec share, interned by [`Inner::origin`]: one
/// pointer in each record instead of three (32 bytes less per task).
pub(super) struct Origin {
    pub pipeline: Arc<str>,
    /// The fair-share flow: `tenant/client`.
    pub flow: Arc<str>,
    pub spec: Arc<HeldSpec>,
}

pub(super) struct TaskRecord {
    pub origin: Arc<Origin>,
    pub rank: Rank,
    pub lease: Option<LeaseId>,
    /// An encoded `TaskBody`: params, timeout, idempotency key. Decoded only to show the task.
    pub body: Arc<[u8]>,
    /// A finished task's result; with a store behind the journal, only its summary
    /// ([`result_summary`]): the whole result is on disk, read back for GetTask and WatchTask.
    pub result: Option<Arc<TaskResult>>,
    pub live: Option<Box<Live>>,
    pub create_time_ms: i64,
    pub update_time_ms: i64,
    pub attempt: u32,
    pub state: TaskState,
    /// A change of this task is being written.
    pub busy: bool,
    /// The body holds an idempotency key.
    pub keyed: bool,
}

/// A state change planned under the lock and applied once written.
#[derive(Clone)]
pub(super) struct Next {
    pub state: TaskState,
    pub attempt: u32,
    pub update_time_ms: i64,
    pub result: Option<Arc<TaskResult>>,
}

/// A result without what its steps printed and without its output data: what a finished task
/// keeps in memory and what a list shows. A task may print megabytes; this is a few hundred
/// bytes, whatever it printed. Every field is named, so a new one is a decision here.
pub(super) fn result_summary(result: &TaskResult) -> TaskResult {
    let step = |s: &StepResult| StepResult {
        command: s.command.clone(),
        exit_code: s.exit_code,
        signal: s.signal,
        duration_ms: s.duration_ms,
        stdout: String::new(),
        stderr: String::new(),
        stdout_truncated: s.stdout_truncated,
        stderr_truncated: s.stderr_truncated,
        timed_out: s.timed_out,
    };
    let job = |j: &JobResult| JobResult {
        stage: j.stage.clone(),
        job: j.job.clone(),
        executor: j.executor.clone(),
        attempts: j.attempts,
        succeeded: j.succeeded,
        allowed_failure: j.allowed_failure,
        timed_out: j.timed_out,
        steps: j.steps.iter().map(step).collect(),
        duration_ms: j.duration_ms,
    };
    TaskResult {
        succeeded: result.succeeded,
        error: result.error.clone(),
        jobs: result.jobs.iter().map(job).collect(),
        duration_ms: result.duration_ms,
        output: None,
    }
}

impl TaskRecord {
    /// A record of a task read from the disk or handed over; `origin` holds its pipeline,
    /// flow and spec (interned by the caller). Its fair-share tag is 0 until it is ranked.
    pub fn from_disk(r: Record, origin: Arc<Origin>) -> Self {
        Self {
            origin,
            rank: Rank {
                client_priority: r.client_priority,
                task_priority: r.priority,
                tag: 0,
                seq: r.seq,
            },
            lease: None,
            body: r.body,
            result: r.result,
            live: None,
            create_time_ms: r.create_time_ms,
            update_time_ms: r.update_time_ms,
            attempt: r.attempt,
            state: r.state,
            busy: false,
            keyed: r.keyed,
        }
    }

    pub fn pipeline(&self) -> &Arc<str> {
        &self.origin.pipeline
    }

    /// The fair-share flow: `tenant/client`.
    pub fn flow(&self) -> &Arc<str> {
        &self.origin.flow
    }

    pub fn spec(&self) -> &Arc<HeldSpec> {
        &self.origin.spec
    }

    /// The disk record of this task as it is now.
    pub fn disk(&self, key: TaskKey) -> Record {
        Record {
            pipeline: self.pipeline().clone(),
            key,
            flow: self.flow().clone(),
            state: self.state,
            attempt: self.attempt,
            priority: self.rank.task_priority,
            client_priority: self.rank.client_priority,
            seq: self.rank.seq,
            spec_id: self.spec().id,
            lease_id: self.lease.as_ref().map(|l| l.0.clone()),
            create_time_ms: self.create_time_ms,
            update_time_ms: self.update_time_ms,
            keyed: self.keyed,
            body: self.body.clone(),
            result: self.result.clone(),
        }
    }

    /// The write that makes this task after `next` durable, leased by `lease`.
    pub fn stored(&self, key: TaskKey, next: &Next, lease: Option<&LeaseId>) -> Op {
        let mut record = self.disk(key);
        record.state = next.state;
        record.attempt = next.attempt;
        record.update_time_ms = next.update_time_ms;
        record.result = next.result.clone();
        record.lease_id = lease.map(|l| l.0.clone());
        Op::PutTask(record)
    }

    /// The task's name and the trace id it was submitted in ("" for none), for a log line
    /// about it. Decodes the body: for the rare lines (expiries, failed writes) only.
    pub fn about(&self, key: TaskKey) -> (String, String) {
        let traceparent = pm_proto::internal::v1::TaskBody::decode(&*self.body)
            .map(|b| b.traceparent)
            .unwrap_or_default();
        (
            key.name(self.pipeline()),
            pm_proto::trace::trace_id_of(&traceparent),
        )
    }

    /// The idempotency key ("" without one).
    pub fn idempotency_key(&self) -> String {
        crate::store::idempotency_key_in(self.keyed, &self.body)
    }

    /// This task after `event`, not yet applied.
    pub fn next(&self, event: Event) -> Result<Next, task::InvalidTransition> {
        Ok(Next {
            state: task::transition(self.state, event)?,
            attempt: self.attempt,
            update_time_ms: unix_ms(),
            result: self.result.clone(),
        })
    }

    /// Keeps only the summary of this task's result in memory (its whole result is on disk).
    pub fn keep_summary(&mut self) {
        if let Some(result) = &mut self.result {
            *result = Arc::new(result_summary(result));
        }
    }

    /// Applies a written change.
    pub fn apply(&mut self, next: Next) {
        self.state = next.state;
        self.attempt = next.attempt;
        self.update_time_ms = next.update_time_ms;
        self.result = next.result;
    }

    /// Keeps an event for late watchers and sends it to the current ones.
    pub fn record(&mut self, event: TaskEvent) {
        let live = self.live.get_or_insert_with(Box::default);
        let event = Arc::new(event);
        if live.history.len() < HISTORY_LIMIT {
            live.history.push(event.clone());
        }
        if let Some(tx) = &live.watchers {
            let _ = tx.send(event);
        }
    }

    pub fn publish(&mut self, e: task_event::Event) {
        self.record(TaskEvent {
            time_ms: unix_ms(),
            event: Some(e),
        });
    }

    pub fn watched(&self) -> bool {
        self.live.as_ref().is_some_and(|l| l.watchers.is_some())
    }

    /// A new attempt starts: the last one's events are no longer replayed.
    pub fn clear_history(&mut self) {
        if let Some(live) = &mut self.live {
            if live.watchers.is_none() {
                self.live = None;
            } else {
                live.history.clear();
            }
        }
    }

    /// A state change, for current watchers only: a watch that starts later sees the state
    /// in its snapshot, so it is not kept in the history (and a task nobody watches
    /// allocates nothing for it).
    pub fn publish_state(&mut self, reason: &str) {
        let Some(tx) = self.live.as_ref().and_then(|l| l.watchers.as_ref()) else {
            return;
        };
        let change = StateChange {
            state: self.state as i32,
            attempt: self.attempt,
            reason: reason.to_owned(),
        };
        let _ = tx.send(Arc::new(TaskEvent {
            time_ms: unix_ms(),
            event: Some(task_event::Event::StateChanged(change)),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget behind "about 130 bytes": a change that grows the record shows here.
    #[test]
    fn a_record_stays_compact() {
        assert!(
            std::mem::size_of::<TaskRecord>() <= 112,
            "TaskRecord is {} bytes",
            std::mem::size_of::<TaskRecord>()
        );
    }
}
