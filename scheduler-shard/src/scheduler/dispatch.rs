//! The dispatcher loop: READY tasks to sessions with credit. Submits wake it; a slot that
//! comes back (a result, a Credit) is leased again on the task that reported it
//! ([`Scheduler::dispatch_now`]).
//!
//! An Assign does not wait for its dispatch record to be durable. The record is appended to
//! the journal under the scheduler's lock, so it lands before any later change of the same
//! task (its result, a requeue, a cancel, a handoff), and the Assign goes out at once; the
//! loop never waits for the disk, so any number of dispatch batches are in flight.
//!
//! Why this keeps at-least-once: a dispatch record only says "leased: attempt n, lease l".
//! - If the shard crashes before it is synced, the disk still holds the task READY (or
//!   leased by an older attempt), so after the restart it is delivered again: a duplicate
//!   run, which at-least-once allows. The agent that ran attempt n reconnects holding lease
//!   l, which the restarted shard does not know: its result is fenced off as stale.
//! - If the write fails (disk full), memory says IN_PROGRESS and the disk does not: the same
//!   as a crash for the disk, and in memory the task is leased as usual; its result is then
//!   written like any other, and only a durable result is shown.
//! - Nothing a client can observe as final depends on it: submits are acknowledged after their
//!   own fsync, and results and cancels are visible only once written.
//!
//! For the same reasons the record is not synced on its own ([`Journal::append_unsynced`]):
//! it reaches the OS at once, so a crash of the shard's process keeps it, and is synced with
//! the next write someone waits for (a submit, a result), which every later change of the
//! task is. Only a machine crash can lose it, and that is the case above. With few slots per
//! agent, a dispatch record alone was an fsync per task.

use super::*;

/// One Assign, built outside the lock.
struct PendingAssign {
    tx: AgentTx,
    /// The task as leased (decoded into the Assign outside the lock).
    task: Record,
    spec: Arc<PipelineSpec>,
    lease_id: LeaseId,
    deadline: Instant,
    /// When the task became READY (its submit or requeue), ms since the epoch.
    ready_since_ms: i64,
}

/// The task's `queued` span (READY to assigned), in its trace.
fn queued_span(task: &Task, ready_since_ms: i64) {
    let at = |ms: i64| std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    pm_proto::trace::record(
        "queued",
        &task.traceparent,
        at(ready_since_ms),
        std::time::SystemTime::now(),
        None,
        vec![
            pm_proto::trace::KeyValue::new("pm.component", "shard"),
            pm_proto::trace::KeyValue::new("pm.task", task.name.clone()),
            pm_proto::trace::KeyValue::new("pm.attempt", i64::from(task.attempt)),
        ],
    );
}

impl Scheduler {
    pub(super) async fn run_dispatcher(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            if Self::send_assigns(self.dispatch_ready()) == 0 {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.dispatcher.notified() => continue,
                }
            }
            // Let submits and results in before the next round.
            tokio::task::yield_now().await;
        }
    }

    /// One round of dispatch on the caller's task: leases what it can (at most
    /// [`DISPATCH_BATCH`]) and sends the Assigns. A result calls it for the slot it gave
    /// back, so the next Assign goes out without waking the dispatcher (a wake-up waits its
    /// turn behind every ready task of a busy runtime).
    pub(super) fn dispatch_now(&self) {
        if Self::send_assigns(self.dispatch_ready()) >= DISPATCH_BATCH {
            // Perhaps more to lease: the dispatcher's loop goes on.
            self.dispatcher.notify_one();
        }
    }

    /// Sends `assigns` down their streams; returns how many there were.
    fn send_assigns(assigns: Vec<PendingAssign>) -> usize {
        let sent = assigns.len();
        for a in assigns {
            let task = a.task.to_task();
            if !task.traceparent.is_empty() && pm_proto::trace::enabled() {
                queued_span(&task, a.ready_since_ms);
            }
            let assign = ServerMessage {
                message: Some(server_message::Message::Assign(Assign {
                    task: Some(task),
                    spec: Some((*a.spec).clone()),
                    lease: Some(wire_lease(
                        &a.lease_id,
                        a.task.name(),
                        a.task.attempt,
                        a.deadline,
                    )),
                })),
            };
            if a.tx.send(Ok(assign)).is_err() {
                // The stream went away meanwhile; the lease expires and the task is
                // delivered again.
                tracing::debug!("assign to a closed stream");
            }
        }
        sent
    }

    /// Leases READY tasks to sessions with credit, appends their dispatch records to the
    /// journal (not waiting for them), and returns the Assigns to send.
    fn dispatch_ready(&self) -> Vec<PendingAssign> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut out = Vec::new();
        if inner.queue.is_empty() {
            return out;
        }
        let mut ops = Vec::new();
        let deadline = Instant::now() + self.options.lease_ttl;
        let sessions = inner.dispatch_candidates();
        'sessions: for session_id in sessions {
            while let Some(session) = inner.sessions.get_mut(&session_id)
                && session.credit > 0
            {
                let Some(key) = inner.queue.pop(session.pipelines.as_ref()) else {
                    break;
                };
                session.credit -= 1;
                let lease_id = inner.leases.new_id();
                session.held.insert(lease_id.clone());
                let tx = session.tx.clone();
                let record = inner.tasks.get_mut(key).expect("queued tasks exist");
                debug_assert!(!record.busy, "a queued task is not being changed");
                inner.fair.advance(record.rank.tag);
                let mut next = record
                    .next(Event::Dispatch)
                    .expect("queued tasks are READY");
                // The record's time is when it became READY (its submit or requeue).
                let ready_since_ms = record.update_time_ms;
                let waited_ms = (next.update_time_ms - record.update_time_ms).max(0);
                self.metrics
                    .dispatch_latency
                    .record(waited_ms as f64 / 1000.0);
                next.attempt += 1;
                record.apply(next);
                record.clear_history();
                record.lease = Some(lease_id.clone());
                record.publish_state("");
                let leased = record.disk(key);
                ops.push(Op::PutTask(leased.clone()));
                let attempt = record.attempt;
                out.push(PendingAssign {
                    tx,
                    task: leased,
                    spec: record.spec().spec.clone(),
                    lease_id: lease_id.clone(),
                    deadline,
                    ready_since_ms,
                });
                inner.leases.insert(
                    lease_id,
                    Lease {
                        task: key,
                        attempt,
                        session: session_id,
                        deadline,
                    },
                );
                if out.len() >= DISPATCH_BATCH {
                    break 'sessions;
                }
            }
        }
        if !out.is_empty() {
            // Not awaited, and no fsync of its own (see the module doc); a failure is logged
            // by the journal.
            self.journal.append_unsynced(ops);
            self.reaper.notify_one();
        }
        out
    }
}
