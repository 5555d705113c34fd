//! The dispatcher loop: READY tasks to sessions with credit, each dispatch written before
//! its Assign is sent.

use super::*;

impl Scheduler {
    pub(super) async fn run_dispatcher(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let (ops, planned) = self.plan_dispatch();
            if planned.is_empty() {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.dispatcher.notified() => continue,
                }
            }
            let written = self.write(ops).await;
            let failed = written.is_err();
            self.apply_dispatch(planned, written);
            if failed {
                // The disk refused; do not spin on it.
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }

    /// Takes READY tasks for sessions with credit and builds their dispatch records.
    fn plan_dispatch(&self) -> (Vec<Op>, Vec<Dispatch>) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut ops = Vec::new();
        let mut planned = Vec::new();
        if inner.queue.is_empty() {
            return (ops, planned);
        }
        let sessions: Vec<u64> = inner
            .sessions
            .iter()
            .filter(|(_, s)| s.credit > 0)
            .map(|(id, _)| *id)
            .collect();
        'sessions: for session_id in sessions {
            while let Some(session) = inner.sessions.get_mut(&session_id)
                && session.credit > 0
            {
                let Some(name) = inner.queue.pop(session.pipelines.as_ref()) else {
                    break;
                };
                session.credit -= 1;
                let lease_id = inner.leases.new_id();
                let record = inner.tasks.get_mut(&name).expect("queued tasks exist");
                record.busy = true;
                inner.fair.advance(record.rank.tag);
                let mut next = record
                    .next(Event::Dispatch)
                    .expect("queued tasks are READY");
                next.attempt += 1;
                ops.push(record.stored(&next, Some(&lease_id)));
                planned.push(Dispatch {
                    name,
                    session: session_id,
                    lease_id,
                    next,
                });
                if planned.len() >= DISPATCH_BATCH {
                    break 'sessions;
                }
            }
        }
        (ops, planned)
    }

    fn apply_dispatch(&self, planned: Vec<Dispatch>, written: Result<(), Error>) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let ttl = self.options.lease_ttl;
        let mut granted = false;
        for d in planned {
            let record = inner.tasks.get_mut(&d.name).expect("busy tasks stay");
            record.busy = false;
            if let Err(e) = &written {
                tracing::warn!(task = %d.name, error = %e, "dispatch not written; task stays READY");
                inner
                    .queue
                    .push(&record.pipeline, record.rank, d.name.clone());
                inner.credit(d.session, 1);
                continue;
            }
            record.task = d.next;
            record.history.clear();
            record.lease = Some(d.lease_id.clone());
            record.publish_state("");
            let lease = Lease {
                task: d.name.clone(),
                attempt: record.task.attempt,
                session: d.session,
                deadline: Instant::now() + ttl,
            };
            let assign = ServerMessage {
                message: Some(server_message::Message::Assign(Assign {
                    task: Some(record.task.clone()),
                    spec: Some((*record.spec).clone()),
                    lease: Some(wire_lease(
                        &d.lease_id,
                        &d.name,
                        lease.attempt,
                        lease.deadline,
                    )),
                })),
            };
            inner.leases.insert(d.lease_id, lease);
            granted = true;
            let sent = inner
                .sessions
                .get(&d.session)
                .is_some_and(|s| s.tx.send(Ok(assign)).is_ok());
            if !sent {
                // The stream went away meanwhile; the lease expires and the task is
                // delivered again.
                tracing::debug!(task = %d.name, "assign to a closed stream");
            }
        }
        if granted {
            self.reaper.notify_one();
        }
    }
}
