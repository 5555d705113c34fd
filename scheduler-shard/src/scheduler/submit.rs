//! Submits: checking, admission, idempotency, and the write that acknowledges them.

use super::*;

use pm_proto::trace::KeyValue;

/// What a submit answers with, made into a `Task` outside the lock.
#[derive(Clone)]
enum Answer {
    /// An idempotent repeat: the task already held.
    Held(Record),
    /// The task just queued.
    Queued(Task),
}

/// What one submit came to.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// Queued by this call: the task as it was sent, named and READY.
    Queued(Task),
    /// An idempotent repeat: the task its key first made (in an earlier call, or earlier in
    /// this one), which may differ from the one sent.
    Repeat(Task),
}

impl Submitted {
    pub fn into_task(self) -> Task {
        match self {
            Submitted::Queued(task) | Submitted::Repeat(task) => task,
        }
    }
}

/// A submit checked, named and encoded before the lock: everything that needs no shard
/// state, so the lock is held only for lookups and counters.
struct Prepared {
    /// The task to answer with: named, READY, its params kept.
    task: Task,
    key: TaskKey,
    /// The encoded [`crate::store::TaskBody`], and whether it holds an idempotency key.
    body: Arc<[u8]>,
    keyed: bool,
    flow: String,
    /// The spec sent with the task (and its hash), or the id of one this shard holds.
    spec: Result<(SpecId, PipelineSpec), SpecId>,
    client_priority: u32,
    tenant_max_queued_tasks: u64,
}

impl Prepared {
    /// Checks one task's shape and builds what it will be if admitted.
    fn new(item: EnqueueTask) -> Result<Self, Error> {
        let mut task = item.task.ok_or_else(|| Error::invalid("task", "missing"))?;
        let spec = match item.spec {
            // Specs that travel with their tasks are hashed here, not under the lock.
            Some(spec) => Ok((spec_id(&spec), spec)),
            None if item.spec_id.is_empty() => {
                return Err(Error::invalid(
                    "spec",
                    "missing: send the spec, or its spec_id once this shard holds it",
                ));
            }
            None => Err(SpecId::try_from(item.spec_id.as_slice())
                .map_err(|_| Error::invalid("spec_id", "not 32 bytes (a SHA-256)"))?),
        };
        PipelineName::check(&task.pipeline)
            .map_err(|e| Error::invalid("task.pipeline", e.to_string()))?;
        if item.partition >= pm_spec::limits::MAX_PARTITIONS {
            return Err(Error::invalid(
                "partition",
                format!(
                    "{} is past the last partition a pipeline may have ({})",
                    item.partition,
                    pm_spec::limits::MAX_PARTITIONS - 1
                ),
            ));
        }
        let key = TaskKey::generate_in(item.partition);
        let now = unix_ms();
        task.name = key.name(&task.pipeline);
        task.id = key.to_string();
        task.state = TaskState::Ready as i32;
        task.attempt = 0;
        task.create_time_ms = now;
        task.update_time_ms = now;
        task.result = None;
        if !task.traceparent.is_empty() {
            // Stored only if valid (W3C: an invalid one is ignored).
            task.traceparent = pm_proto::trace::normalize(&task.traceparent).unwrap_or_default();
        }
        let (body, keyed) = Record::body_of(&mut task);
        Ok(Self {
            flow: flow_of(&task.pipeline, &task.client),
            task,
            key,
            body,
            keyed,
            spec,
            client_priority: item.client_priority,
            tenant_max_queued_tasks: item.tenant_max_queued_tasks,
        })
    }
}

impl Scheduler {
    /// Queues validated tasks; each is acknowledged (durable) or refused on its own. All
    /// the new tasks of one call share one write.
    pub async fn enqueue(&self, items: Vec<EnqueueTask>) -> Vec<Result<Task, Error>> {
        self.submit(items)
            .await
            .into_iter()
            .map(|r| r.map(Submitted::into_task))
            .collect()
    }

    /// [`Scheduler::enqueue`], saying which tasks this call queued and which were repeats.
    pub async fn submit(&self, items: Vec<EnqueueTask>) -> Vec<Result<Submitted, Error>> {
        let received = std::time::SystemTime::now();
        let items: Vec<Result<Prepared, Error>> = items.into_iter().map(Prepared::new).collect();
        let mut outcomes: Vec<Option<Result<Answer, Error>>> = Vec::with_capacity(items.len());
        let mut planned: Vec<(usize, TaskKey, TaskRecord, Task)> = Vec::new();
        // A key repeated within this call gets the task of its first occurrence.
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        let mut first_of_key: HashMap<(String, String), usize> = HashMap::new();
        let mut ops = Vec::new();
        {
            let mut inner = self.lock();
            for (i, item) in items.into_iter().enumerate() {
                let item = match item {
                    Ok(item) => item,
                    Err(e) => {
                        outcomes.push(Some(Err(e)));
                        continue;
                    }
                };
                if item.keyed {
                    let task = &item.task;
                    let key = (task.pipeline.clone(), task.idempotency_key.clone());
                    if let Some(&first) = first_of_key.get(&key) {
                        repeats.push((i, first));
                        outcomes.push(None);
                        continue;
                    }
                    first_of_key.insert(key, i);
                }
                match self.plan_enqueue(&mut inner, item, &mut ops) {
                    Ok(Ok(existing)) => outcomes.push(Some(Ok(Answer::Held(existing)))),
                    Ok(Err((key, record, task))) => {
                        planned.push((i, key, record, task));
                        outcomes.push(None);
                    }
                    Err(e) => outcomes.push(Some(Err(e))),
                }
            }
        }
        let written = self.write(ops).await;
        if pm_proto::trace::enabled() {
            let failed = written.as_ref().err().map(ToString::to_string);
            let traced = planned.iter().filter(|p| !p.3.traceparent.is_empty());
            for (_, _, _, task) in traced {
                pm_proto::trace::record(
                    "enqueue",
                    &task.traceparent,
                    received,
                    std::time::SystemTime::now(),
                    failed.as_deref(),
                    vec![
                        KeyValue::new("pm.component", "shard"),
                        KeyValue::new("pm.task", task.name.clone()),
                    ],
                );
            }
        }
        {
            let mut inner = self.lock();
            for (i, key, record, task) in planned {
                if record.keyed {
                    let key = (record.pipeline().clone(), task.idempotency_key.clone());
                    inner.idempotency_pending.remove(&key);
                }
                outcomes[i] = Some(match &written {
                    Ok(()) => {
                        inner.durable_specs.insert(record.spec().id);
                        inner.count_submitted(record.pipeline());
                        inner.insert(key, record);
                        Ok(Answer::Queued(task))
                    }
                    Err(e) => {
                        inner.unreserve(record.flow());
                        Err(e.clone())
                    }
                });
            }
        }
        if written.is_ok() {
            self.dispatcher.notify_one();
        }
        let repeated: HashSet<usize> = repeats.iter().map(|(i, _)| *i).collect();
        for (i, first) in repeats {
            outcomes[i] = outcomes[first].clone();
        }
        // Decoded (and a finished repeat's result read) here, not under the lock.
        outcomes
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.expect("every task has an outcome")
                    .and_then(|answer| match answer {
                        Answer::Held(record) => self.whole(record).map(Submitted::Repeat),
                        Answer::Queued(task) if repeated.contains(&i) => {
                            Ok(Submitted::Repeat(task))
                        }
                        Answer::Queued(task) => Ok(Submitted::Queued(task)),
                    })
            })
            .collect()
    }

    /// Admits one prepared task and builds its record; `Ok(Ok(task))` is an idempotent
    /// repeat. Only lookups and counters: the checking and encoding happened before the lock.
    #[allow(clippy::type_complexity)] // (existing task | new record), or a refusal
    fn plan_enqueue(
        &self,
        inner: &mut Inner,
        item: Prepared,
        ops: &mut Vec<Op>,
    ) -> Result<Result<Record, (TaskKey, TaskRecord, Task)>, Error> {
        let Prepared {
            task,
            key,
            body,
            keyed,
            flow,
            spec,
            client_priority,
            tenant_max_queued_tasks,
        } = item;
        let pipeline = inner.intern(&task.pipeline);
        if keyed {
            let key = (pipeline.clone(), task.idempotency_key.clone());
            if let Some(existing) = inner.idempotency.get(&key) {
                let record = inner.tasks.get(*existing).expect("indexed tasks exist");
                return Ok(Ok(record.disk(*existing)));
            }
            if inner.idempotency_pending.contains(&key) {
                return Err(Error::Aborted(format!(
                    "a submit with idempotency key {:?} is being written; retry to get its task",
                    task.idempotency_key
                )));
            }
        }
        // The spec: the one sent, or the one held under the id named (never trusted to match a
        // spec sent alongside: the shard hashes what it receives).
        let (spec_key, spec) = match spec {
            Ok((key, spec)) => match inner.specs.get(&key) {
                Some(held) => (key, held.spec.clone()),
                None => (key, Arc::new(spec)),
            },
            Err(key) => (
                key,
                inner
                    .specs
                    .get(&key)
                    .ok_or(Error::SpecNeeded(key))?
                    .spec
                    .clone(),
            ),
        };
        let flow = inner.intern(&flow);
        if inner.active >= self.options.max_active_tasks {
            return Err(Error::ResourceExhausted {
                what: format!(
                    "the shard holds {} unfinished tasks, its limit; retry later",
                    inner.active
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        let of_flow = inner.active_by_flow.get(&flow).copied().unwrap_or(0);
        if of_flow >= self.options.max_active_per_client {
            return Err(Error::ResourceExhausted {
                what: format!(
                    "client {flow} has {of_flow} unfinished tasks, its limit; retry later"
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        let tenant = tenant_of_flow(&flow);
        let of_tenant = inner.active_by_tenant.get(tenant).copied().unwrap_or(0);
        let quota = tenant_max_queued_tasks;
        if quota > 0 && of_tenant as u64 >= quota {
            return Err(Error::ResourceExhausted {
                what: format!(
                    "tenant {tenant} has {of_tenant} unfinished tasks, its quota (max_queued_tasks); retry later"
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        inner.next_seq += 1;
        let rank = Rank {
            client_priority,
            task_priority: task.priority,
            tag: inner.fair.tag(&flow),
            seq: inner.next_seq,
        };
        let held = inner.hold_spec(spec_key, spec);
        // Until a write carrying the spec has landed, every write that needs it carries it.
        if !inner.durable_specs.contains(&spec_key) {
            ops.push(Op::PutSpec {
                id: spec_key,
                spec: held.spec.encode_to_vec(),
            });
        }
        if keyed {
            inner
                .idempotency_pending
                .insert((pipeline.clone(), task.idempotency_key.clone()));
        }
        inner.reserve(&flow);
        let now = task.create_time_ms;
        let record = TaskRecord {
            origin: inner.origin(&pipeline, &flow, &held),
            rank,
            lease: None,
            body,
            result: None,
            live: None,
            create_time_ms: now,
            update_time_ms: now,
            attempt: 0,
            state: TaskState::Ready,
            busy: false,
            keyed,
        };
        ops.push(Op::PutTask(record.disk(key)));
        Ok(Err((key, record, task)))
    }
}
