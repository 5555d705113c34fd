//! Agent sessions: Hello (with lease reclaim), credit, renewals, progress, results, rejects,
//! and the reaper that delivers tasks again when their leases expire.

use super::*;

/// Whether `name` (from an agent) is the name of task `key` of `pipeline`.
fn names(key: TaskKey, pipeline: &str, name: &str) -> bool {
    TaskKey::parse_name(name) == Some((pipeline, key))
}

/// A result planned under the lock, to be written: the task, its next state, the write, and
/// the lease it ends (given back if the write fails).
type PlannedResult = (TaskKey, Next, Op, (LeaseId, Lease));

impl Scheduler {
    /// Registers an agent stream; returns its session id. Leases the agent still holds from
    /// an earlier stream (or from before a restart of this shard) move to this one, so running
    /// work is not delivered again.
    pub fn open_session(&self, hello: &Hello, tx: AgentTx) -> u64 {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.next_session += 1;
        let id = inner.next_session;
        let ttl = self.options.lease_ttl;
        let pipelines = (!hello.pipelines.is_empty())
            .then(|| hello.pipelines.iter().cloned().collect::<BTreeSet<_>>());
        let mut session = Session {
            agent_id: hello.agent_id.clone(),
            pipelines,
            partitions: hello.partitions.clone(),
            explicit_credit: hello.explicit_credit,
            credit: 0,
            held: HashSet::new(),
            tx,
        };
        for held in &hello.held_leases {
            let lease_id = LeaseId(held.lease_id.as_str().into());
            // Still running on the agent: its slot comes back with its result, whether or
            // not the lease is still current here.
            session.held.insert(lease_id.clone());
            let current = inner.leases.get(&lease_id).is_some_and(|l| {
                l.attempt == held.attempt
                    && inner.tasks.get(l.task).is_some_and(|r| {
                        session.serves(r.pipeline()) && names(l.task, r.pipeline(), &held.task)
                    })
            });
            if current {
                inner.leases.rebind(&lease_id, id, ttl);
                let (task, trace_id) = inner.about_leased(&lease_id);
                tracing::info!(%task, %trace_id, lease = %lease_id, "lease reclaimed");
            }
        }
        inner.add_session(id, session);
        inner.credit(id, hello.slots);
        self.dispatcher.notify_one();
        id
    }

    /// Forgets a stream. Its leases stay until they expire, so an agent that reconnects in
    /// time reclaims them.
    pub fn close_session(&self, session: u64) {
        let mut inner = self.lock();
        if let Some(s) = inner.remove_session(session) {
            tracing::info!(agent = %s.agent_id, session, "agent stream closed");
        }
    }

    pub fn credit(&self, session: u64, slots: u32) {
        self.lock().credit(session, slots);
        self.dispatch_now();
    }

    /// Renews leases held by `session`; unknown ones are ignored (their results will be
    /// fenced off).
    pub fn renew(&self, session: u64, leases: &[WireLease]) {
        let mut inner = self.lock();
        let ttl = self.options.lease_ttl;
        for l in leases {
            inner
                .leases
                .renew(&LeaseId(l.lease_id.as_str().into()), session, ttl);
        }
    }

    /// The task `lease` is the current lease of, if `session` holds it.
    fn current(inner: &Inner, session: u64, lease: &WireLease) -> Option<TaskKey> {
        let held = inner.leases.get(&LeaseId(lease.lease_id.as_str().into()))?;
        let record = inner.tasks.get(held.task)?;
        (held.session == session
            && held.attempt == lease.attempt
            && names(held.task, record.pipeline(), &lease.task))
        .then_some(held.task)
    }

    /// Ends `session`'s hold of `lease` and credits its slot back, if it held it (and the
    /// stream is not on explicit credit): a forged or repeated answer raises no credit.
    fn answer(inner: &mut Inner, session: u64, lease: &WireLease) {
        let id = LeaseId(lease.lease_id.as_str().into());
        if inner
            .sessions
            .get_mut(&session)
            .is_some_and(|s| s.held.remove(&id) && !s.explicit_credit)
        {
            inner.credit(session, 1);
        }
    }

    /// A running task's progress, kept for late watchers and sent to current ones when the
    /// lease is current and held by `session`.
    pub fn progress(&self, session: u64, lease: &WireLease, event: TaskEvent) {
        let mut inner = self.lock();
        if let Some(key) = Self::current(&inner, session, lease)
            && let Some(record) = inner.tasks.get_mut(key)
        {
            record.record(event);
        }
    }

    /// An attempt's end. Only the current lease, held by `session`, counts (the lease table
    /// keeps the holder after its stream closed, so a result read just before the close
    /// still lands); the first such result wins. Anything else is stale, repeated or forged
    /// and changes nothing. The lease is released, and the slot's next Assign sent, at the
    /// call; the future writes the result and says whether it was applied.
    pub fn complete(
        self: &Arc<Self>,
        session: u64,
        lease: &WireLease,
        result: TaskResult,
    ) -> impl Future<Output = bool> + Send + 'static {
        let planned = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            Self::answer(inner, session, lease);
            let planned = Self::current(inner, session, lease).and_then(|key| {
                let id = LeaseId(lease.lease_id.as_str().into());
                let held = inner.leases.release(&id)?;
                let record = inner.tasks.get_mut(key)?;
                let event = Event::Finish {
                    succeeded: result.succeeded,
                };
                let mut next = record.next(event).ok()?;
                // Dispatch set the record's time: this is how long the agent had it.
                let ran_ms = (next.update_time_ms - record.update_time_ms).max(0);
                self.metrics.task_duration.record(ran_ms as f64 / 1000.0);
                record.busy = true;
                next.result = Some(Arc::new(result));
                let op = record.stored(key, &next, None);
                Some((key, next, op, (id, held)))
            });
            if planned.is_none() {
                self.metrics.results_duplicate.increment(1);
                tracing::info!(task = %lease.task, attempt = lease.attempt, session, "stale, repeated or foreign result ignored");
            }
            planned
        };
        // The slot came back either way.
        self.dispatch_now();
        let this = self.clone();
        async move { this.write_result(planned).await }
    }

    /// The second half of [`Scheduler::complete`]: the result's write, then the task final
    /// (or, if the write failed, leased again with its lease expiring).
    async fn write_result(&self, planned: Option<PlannedResult>) -> bool {
        let Some((key, next, op, lease)) = planned else {
            return false;
        };
        // Visible as final only once durable, like every write; no one waits for it before.
        let written = self.write_soon(vec![op]).await;
        let mut inner = self.lock();
        match written {
            Ok(()) => {
                let reason = next
                    .result
                    .as_ref()
                    .map(|r| r.error.clone())
                    .unwrap_or_default();
                self.install_final(&mut inner, key, next, &reason);
                true
            }
            Err(e) => {
                let (task, trace_id) = inner.about(key);
                tracing::warn!(%task, %trace_id, error = %e, "result not written; the task will run again");
                self.undo(&mut inner, key, Some(lease));
                false
            }
        }
    }

    /// The agent refused an assigned task: it goes back to READY (its slot is credited back).
    /// Like a result, only from the session that holds the lease.
    pub async fn reject(&self, session: u64, lease: &WireLease, reason: &str) {
        let released = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            Self::answer(inner, session, lease);
            Self::current(inner, session, lease).and_then(|key| {
                let id = LeaseId(lease.lease_id.as_str().into());
                let about = inner.about(key);
                inner.leases.release(&id).map(|held| (about, id, held))
            })
        };
        if let Some(((task, trace_id), id, held)) = released {
            tracing::warn!(%task, %trace_id, reason, "agent rejected task");
            self.requeue(vec![(id, held)], reason).await;
        }
        self.dispatcher.notify_one();
    }

    /// IN_PROGRESS -> READY for tasks whose leases ended (or ERROR once delivered too often),
    /// in one write.
    async fn requeue(&self, leases: Vec<(LeaseId, Lease)>, reason: &str) {
        let (ops, planned) = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let mut ops = Vec::new();
            let mut planned = Vec::new();
            for (id, lease) in leases {
                let Some(record) = inner.tasks.get_mut(lease.task) else {
                    continue;
                };
                if record.busy || record.lease.as_ref() != Some(&id) {
                    continue;
                }
                record.busy = true;
                let (event, why) = if record.attempt >= self.options.max_deliveries {
                    let why = format!("{reason}; gave up after {} deliveries", record.attempt);
                    (Event::Fail, why)
                } else {
                    (Event::Requeue, reason.to_owned())
                };
                let mut next = record.next(event).expect("leased tasks are IN_PROGRESS");
                if event == Event::Fail {
                    next.result = Some(Arc::new(TaskResult {
                        succeeded: false,
                        error: why.clone(),
                        ..TaskResult::default()
                    }));
                }
                ops.push(record.stored(lease.task, &next, None));
                planned.push(Requeue {
                    key: lease.task,
                    next,
                    reason: why,
                    lease: Some((id, lease)),
                });
            }
            (ops, planned)
        };
        if planned.is_empty() {
            return;
        }
        let written = self.write(ops).await;
        let mut guard = self.lock();
        let inner = &mut *guard;
        for r in planned {
            if let Err(e) = &written {
                let (task, trace_id) = inner.about(r.key);
                tracing::warn!(%task, %trace_id, error = %e, "requeue not written; retrying soon");
                // Back as it was, expiring again shortly.
                let record = inner.tasks.get_mut(r.key).expect("busy tasks stay");
                record.busy = false;
                if let Some((id, lease)) = r.lease {
                    let later = Instant::now() + Duration::from_secs(1);
                    inner.leases.insert(
                        id,
                        Lease {
                            deadline: later,
                            ..lease
                        },
                    );
                }
                continue;
            }
            if task::is_final(r.next.state) {
                self.install_final(inner, r.key, r.next, &r.reason);
                continue;
            }
            let record = inner.tasks.get_mut(r.key).expect("busy tasks stay");
            record.busy = false;
            record.apply(r.next);
            record.lease = None;
            record.publish_state(&r.reason);
            inner.queue.push(record.pipeline(), record.rank, r.key);
        }
        self.dispatcher.notify_one();
        self.reaper.notify_one();
    }

    /// Expires leases at their deadlines until `cancel` fires. Sleeps until the earliest
    /// deadline, or until a new lease may have brought it forward.
    pub(super) async fn run_reaper(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let (expired, about, next) = {
                let mut inner = self.lock();
                let expired = inner.leases.take_expired(Instant::now());
                let about: Vec<_> = expired.iter().map(|(_, l)| inner.about(l.task)).collect();
                (expired, about, inner.leases.next_deadline())
            };
            if !expired.is_empty() {
                self.metrics.leases_expired.increment(expired.len() as u64);
                for ((id, lease), (task, trace_id)) in expired.iter().zip(about) {
                    tracing::info!(%task, %trace_id, lease = %id, attempt = lease.attempt, "lease expired");
                }
                self.requeue(expired, "lease expired").await;
                continue;
            }
            let sleep = async {
                match next {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = sleep => {}
                _ = self.reaper.notified() => {}
            }
        }
    }
}
