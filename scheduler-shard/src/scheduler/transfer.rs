//! Moving tasks between shards: taking a lost pipeline's tasks out (and putting them back
//! if the handoff fails), forgetting them once the new owner has them, and adopting tasks
//! handed to this shard. The decision of what to move, and the call, are
//! [`crate::handoff`]'s.

use pm_cluster::RingKey;
use pm_proto::internal::v1::{AdoptRequest, AdoptResponse, HandoffTask};
use pm_proto::names::PipelineName;

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use super::*;

/// Tasks taken out of memory for a handoff. Their disk records stay until
/// [`Scheduler::forget`], so a crash in between loses nothing.
#[derive(Debug, Default)]
pub struct Outgoing {
    pub specs: Vec<PipelineSpec>,
    pub tasks: Vec<HandoffTask>,
    /// Tasks left behind because a write of theirs was in flight: take again later.
    pub busy: usize,
    /// The specs of the tasks, kept from collection while the tasks are out of memory: a
    /// failed handoff puts them back, and their records on disk still name the specs.
    held: HeldSpecs,
}

#[derive(Default)]
struct HeldSpecs(Vec<Arc<HeldSpec>>);

impl std::fmt::Debug for HeldSpecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} specs held", self.0.len())
    }
}

impl Outgoing {
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

/// Counts a call that may add tasks (a submit or an adoption) from before its ownership
/// check until its tasks are indexed, so a leaving shard does not stop while one is
/// between the two.
pub struct Arriving<'a>(&'a AtomicUsize);

impl Drop for Arriving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, AtomicOrdering::SeqCst);
    }
}

impl Scheduler {
    /// Marks a call that may add tasks; see [`Arriving`].
    pub fn arriving(&self) -> Arriving<'_> {
        self.arriving.fetch_add(1, AtomicOrdering::SeqCst);
        Arriving(&self.arriving)
    }

    /// Calls that may still add tasks.
    pub fn arrivals_in_flight(&self) -> usize {
        self.arriving.load(AtomicOrdering::SeqCst)
    }

    /// Closes the streams of agents one of whose ring keys `moved` says this shard lost
    /// (`None`: an agent serving every pipeline), whether or not tasks of theirs are held
    /// here. They reconnect through the gateway, which routes them to the new owners.
    pub fn close_sessions_where(&self, moved: impl Fn(Option<&RingKey>) -> bool, reason: &str) {
        let mut inner = self.lock();
        let lost: Vec<u64> = inner
            .sessions
            .iter()
            .filter(|(_, s)| match &s.pipelines {
                None => moved(None),
                Some(ps) => ps
                    .iter()
                    .filter_map(|p| PipelineName::parse(p).ok())
                    .any(|p| {
                        let first = s.partitions.is_empty().then_some(0);
                        first
                            .into_iter()
                            .chain(s.partitions.iter().copied())
                            .any(|i| moved(Some(&RingKey::new(p.clone(), i))))
                    }),
            })
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            if let Some(s) = inner.remove_session(id) {
                tracing::info!(agent = %s.agent_id, session = id, "{reason}");
                let _ = s.tx.send(Err(Status::unavailable(reason.to_owned())));
            }
        }
    }

    /// The ring keys this shard holds tasks of: each pipeline with its partitions held.
    pub fn ring_keys_held(&self) -> Vec<(Arc<str>, Vec<u32>)> {
        let inner = self.lock();
        inner
            .by_pipeline
            .keys()
            .map(|p| {
                let held = inner.partitions_held(p);
                (p.clone(), held.into_iter().map(|(i, _)| i).collect())
            })
            .collect()
    }

    /// Takes up to `limit` tasks of `pipeline` out of memory to hand them off, finished ones
    /// with their whole results (read from the disk). Tasks with a write in flight stay for a
    /// later round, and so does every task if a result cannot be read.
    pub fn take_for_handoff(&self, pipeline: &str, partition: u32, limit: usize) -> Outgoing {
        let mut out = self.take_out(pipeline, partition, limit);
        for task in out.tasks.iter_mut().filter_map(|t| t.stored.as_mut()) {
            let Some(t) = task.task.as_mut().filter(|t| t.result.is_some()) else {
                continue;
            };
            let read = TaskKey::parse_name(&t.name)
                .ok_or_else(|| storage_error(format!("{} is not a task name", t.name)))
                .and_then(|(pipeline, key)| {
                    self.journal
                        .read_result(pipeline, key)
                        .map_err(storage_error)
                });
            match read {
                Ok(Some(result)) => t.result = Some(result),
                // Collected meanwhile: the summary is all there is.
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%pipeline, error = %e, "results not read for a handoff; retrying");
                    let busy = out.tasks.len();
                    self.put_back(out);
                    return Outgoing {
                        busy,
                        ..Outgoing::default()
                    };
                }
            }
        }
        out
    }

    /// [`Scheduler::take_for_handoff`] under the lock: the tasks as memory holds them.
    fn take_out(&self, pipeline: &str, partition: u32, limit: usize) -> Outgoing {
        let mut inner = self.lock();
        let Some(keys) = inner.by_pipeline.get(pipeline) else {
            return Outgoing::default();
        };
        let mut out = Outgoing::default();
        let mut take = Vec::new();
        for &key in keys.iter().filter(|k| k.partition() == partition) {
            if inner.tasks.get(key).is_some_and(|r| r.busy) {
                out.busy += 1;
            } else if take.len() < limit {
                take.push(key);
            }
        }
        let now = Instant::now();
        let mut specs = HashSet::new();
        let mut finished = HashSet::new();
        for key in take {
            let Some(record) = inner.unindex(key) else {
                continue;
            };
            let mut lease_remaining_ms = 0;
            match record.state {
                TaskState::Ready => {
                    inner.queue.remove(record.pipeline(), record.rank, key);
                    inner.unreserve(record.flow());
                }
                TaskState::InProgress => {
                    if let Some(lease) = record
                        .lease
                        .as_ref()
                        .and_then(|id| inner.leases.release(id))
                    {
                        lease_remaining_ms =
                            lease.deadline.saturating_duration_since(now).as_millis() as i64;
                    }
                    inner.unreserve(record.flow());
                }
                _ => {
                    finished.insert(key);
                }
            }
            if specs.insert(record.spec().id) {
                out.specs.push((*record.spec().spec).clone());
                out.held.0.push(record.spec().clone());
            }
            out.tasks.push(HandoffTask {
                stored: Some(record.disk(key).to_stored()),
                lease_remaining_ms,
            });
        }
        if !finished.is_empty() {
            inner.finished.remove(&finished);
        }
        out
    }

    /// A handoff failed: the tasks are this shard's again, as they were.
    pub fn put_back(&self, out: Outgoing) {
        let mut inner = self.lock();
        let now = Instant::now();
        for t in out.tasks {
            let Some(record) = t.stored.and_then(Record::from_stored) else {
                continue;
            };
            if inner.tasks.contains_key(record.key) {
                continue;
            }
            let left = Duration::from_millis(t.lease_remaining_ms.max(0) as u64);
            inner.restore(record, left, now);
        }
        drop(inner);
        self.dispatcher.notify_one();
        self.reaper.notify_one();
    }

    /// The new owner has persisted the tasks: delete them from this shard's disk.
    pub async fn forget(&self, out: &Outgoing) -> Result<(), Error> {
        let ops = out
            .tasks
            .iter()
            .filter_map(|t| t.stored.as_ref()?.task.as_ref())
            .filter_map(|t| {
                let (pipeline, key) = TaskKey::parse_name(&t.name)?;
                Some(Op::DeleteTask {
                    pipeline: pipeline.into(),
                    key,
                })
            })
            .collect::<Vec<_>>();
        let handed = ops.len() as u64;
        self.write(ops).await?;
        self.metrics.handoff_tasks.increment(handed);
        Ok(())
    }

    /// Persists and queues tasks another shard hands over. Tasks already here are left as
    /// they are; leased ones keep their lease id and deadline, so their agents reclaim them.
    pub async fn adopt(&self, request: AdoptRequest) -> Result<AdoptResponse, Error> {
        let specs: HashMap<SpecId, PipelineSpec> = request
            .specs
            .into_iter()
            .map(|s| (spec_id(&s), s))
            .collect();
        let mut ops = Vec::new();
        let mut incoming = Vec::new();
        let mut already_held = 0u32;
        // The specs held here that adopted tasks run: kept from collection until they are
        // indexed.
        let mut kept = Vec::new();
        {
            let mut inner = self.lock();
            for (id, spec) in &specs {
                if !inner.durable_specs.contains(id) {
                    ops.push(Op::PutSpec {
                        id: *id,
                        spec: spec.encode_to_vec(),
                    });
                }
            }
            for t in request.tasks {
                let Some(mut stored) = t.stored else { continue };
                let Some(task) = stored.task.as_ref() else {
                    continue;
                };
                // Refused, not skipped: the old owner keeps what this shard does not take.
                let Some((_, key)) = TaskKey::parse_name(&task.name) else {
                    return Err(Error::invalid(
                        "tasks.stored.task.name",
                        format!("{:?} is not a task name", task.name),
                    ));
                };
                if inner.tasks.contains_key(key) {
                    already_held += 1;
                    continue;
                }
                let known = SpecId::try_from(stored.spec_id.as_slice()).is_ok_and(|id| {
                    specs.contains_key(&id)
                        || inner
                            .specs
                            .get(&id)
                            .map(|held| kept.push(held.clone()))
                            .is_some()
                });
                if !known {
                    return Err(Error::invalid(
                        "tasks.stored.spec_id",
                        format!("task {} runs a spec the request does not carry", task.name),
                    ));
                }
                // Queued after what is here already, in the order the old owner had them.
                inner.next_seq += 1;
                stored.seq = inner.next_seq;
                let record = Record::from_stored(stored).expect("name and spec id checked above");
                ops.push(Op::PutTask(record.clone()));
                incoming.push((record, t.lease_remaining_ms));
            }
        }
        self.write(ops).await?;
        let mut inner = self.lock();
        for (id, spec) in specs {
            inner.durable_specs.insert(id);
            inner.hold_spec(id, Arc::new(spec));
        }
        let now = Instant::now();
        let mut adopted = 0u32;
        for (record, lease_ms) in incoming {
            if inner.tasks.contains_key(record.key) {
                already_held += 1;
                continue;
            }
            let left = Duration::from_millis(lease_ms.max(0) as u64);
            if !matches!(inner.restore(record, left, now), Restored::Lost) {
                adopted += 1;
            }
        }
        // Indexed: their records hold the specs now.
        drop(kept);
        drop(inner);
        self.dispatcher.notify_one();
        self.reaper.notify_one();
        Ok(AdoptResponse {
            adopted,
            already_held,
        })
    }
}
