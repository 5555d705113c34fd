//! Final states: installing a written one, client cancels, and undoing a change whose write
//! failed.

use super::*;

impl Scheduler {
    /// Installs a written final state: tells watchers, frees the slot in the admission
    /// counts, starts the retention clock, and keeps only the result's summary in memory.
    /// Returns the task as it ended, whole.
    pub(super) fn install_final(
        &self,
        inner: &mut Inner,
        key: TaskKey,
        next: Next,
        reason: &str,
    ) -> Record {
        let trim = inner.results_on_disk;
        let record = inner.tasks.get_mut(key).expect("task exists");
        record.busy = false;
        record.apply(next);
        record.lease = None;
        let ended = record.disk(key);
        if trim {
            record.keep_summary();
        }
        if record.watched() {
            record.publish_state(reason);
            record.publish(task_event::Event::Finished(ended.to_task()));
        }
        // Dropping the sender ends every watch after the final event; a later watch gets
        // the finished task as its snapshot.
        record.live = None;
        let (flow, pipeline, state) = (
            record.flow().clone(),
            record.pipeline().clone(),
            record.state,
        );
        inner.unreserve(&flow);
        inner.count_finished(&pipeline, state);
        inner.finished.insert(&pipeline, Instant::now(), key);
        ended
    }

    pub async fn cancel(&self, name: &str) -> Result<Task, Error> {
        let (key, next, op, lease) = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let key = inner.find(name)?;
            let record = inner.tasks.get_mut(key).expect("found");
            if record.busy {
                return Err(Error::Aborted(format!(
                    "{name} is changing state; retry to cancel it"
                )));
            }
            let state = record.state;
            let next = record.next(Event::Cancel).map_err(|_| {
                Error::FailedPrecondition(format!(
                    "{name} already finished ({})",
                    state.as_str_name()
                ))
            })?;
            record.busy = true;
            let op = record.stored(key, &next, None);
            let lease = match state {
                TaskState::Ready => {
                    inner.queue.remove(record.pipeline(), record.rank, key);
                    None
                }
                _ => record.lease.clone().and_then(|id| {
                    let lease = inner.leases.release(&id)?;
                    // The agent kills the run; its result arrives fenced off as stale.
                    let wire = wire_lease(&id, name.to_owned(), lease.attempt, lease.deadline);
                    if let Some(session) = inner.sessions.get(&lease.session) {
                        let _ = session.tx.send(Ok(ServerMessage {
                            message: Some(server_message::Message::Cancel(Cancel {
                                lease: Some(wire),
                            })),
                        }));
                    }
                    Some((id, lease))
                }),
            };
            (key, next, op, lease)
        };
        let written = self.write(vec![op]).await;
        let ended = {
            let mut inner = self.lock();
            match written {
                Ok(()) => self.install_final(&mut inner, key, next, "cancelled by a client"),
                Err(e) => {
                    self.undo(&mut inner, key, lease);
                    return Err(e);
                }
            }
        };
        Ok(ended.to_task())
    }

    /// Puts a task back as it was after a change could not be written: READY ones rejoin
    /// the queue; leased ones get their lease back, expiring at once, so the reaper delivers
    /// them again.
    pub(super) fn undo(&self, inner: &mut Inner, key: TaskKey, lease: Option<(LeaseId, Lease)>) {
        let record = inner.tasks.get_mut(key).expect("busy tasks stay");
        record.busy = false;
        match (record.state, lease) {
            (TaskState::Ready, _) => {
                inner.queue.push(record.pipeline(), record.rank, key);
                self.dispatcher.notify_one();
            }
            (_, Some((id, lease))) => {
                inner.leases.insert(
                    id,
                    Lease {
                        deadline: Instant::now(),
                        ..lease
                    },
                );
                self.reaper.notify_one();
            }
            _ => {}
        }
    }
}
