//! Submits: checking, admission, idempotency, and the write that acknowledges them.

use super::*;

/// What a submit answers with, made into a `Task` outside the lock.
#[derive(Clone)]
enum Answer {
    /// An idempotent repeat: the task already held.
    Held(Record),
    /// The task just queued.
    Queued(Task),
}

impl Scheduler {
    /// Queues validated tasks; each is acknowledged (durable) or refused on its own. All
    /// the new tasks of one call share one write.
    pub async fn enqueue(&self, items: Vec<EnqueueTask>) -> Vec<Result<Task, Error>> {
        // Specs that travel with their tasks are hashed here, not under the lock.
        let items: Vec<(EnqueueTask, Option<SpecId>)> = items
            .into_iter()
            .map(|item| {
                let id = item.spec.as_ref().map(spec_id);
                (item, id)
            })
            .collect();
        let mut outcomes: Vec<Option<Result<Answer, Error>>> = Vec::with_capacity(items.len());
        let mut planned: Vec<(usize, TaskKey, TaskRecord, Task)> = Vec::new();
        // A key repeated within this call gets the task of its first occurrence.
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        let mut first_of_key: HashMap<(String, String), usize> = HashMap::new();
        let mut ops = Vec::new();
        {
            let mut inner = self.lock();
            for (i, (item, spec_key)) in items.into_iter().enumerate() {
                if let Some(task) = item.task.as_ref().filter(|t| !t.idempotency_key.is_empty()) {
                    let key = (task.pipeline.clone(), task.idempotency_key.clone());
                    if let Some(&first) = first_of_key.get(&key) {
                        repeats.push((i, first));
                        outcomes.push(None);
                        continue;
                    }
                    first_of_key.insert(key, i);
                }
                match self.plan_enqueue(&mut inner, item, spec_key, &mut ops) {
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
        {
            let mut inner = self.lock();
            for (i, key, record, task) in planned {
                if record.keyed {
                    let key = (record.pipeline.clone(), task.idempotency_key.clone());
                    inner.idempotency_pending.remove(&key);
                }
                outcomes[i] = Some(match &written {
                    Ok(()) => {
                        inner.durable_specs.insert(record.spec.id);
                        inner.insert(key, record);
                        Ok(Answer::Queued(task))
                    }
                    Err(e) => {
                        inner.unreserve(&record.flow);
                        Err(e.clone())
                    }
                });
            }
        }
        if written.is_ok() {
            self.dispatcher.notify_one();
        }
        for (i, first) in repeats {
            outcomes[i] = outcomes[first].clone();
        }
        // Decoded here, not under the lock.
        outcomes
            .into_iter()
            .map(|o| {
                o.expect("every task has an outcome")
                    .map(|answer| match answer {
                        Answer::Held(record) => record.to_task(),
                        Answer::Queued(task) => task,
                    })
            })
            .collect()
    }

    /// Checks one task and builds its record (and the task to answer with); `Ok(Ok(task))`
    /// is an idempotent repeat. `spec_key` is the hash of `item.spec`, when it carries one.
    #[allow(clippy::type_complexity)] // (existing task | new record), or a refusal
    fn plan_enqueue(
        &self,
        inner: &mut Inner,
        item: EnqueueTask,
        spec_key: Option<SpecId>,
        ops: &mut Vec<Op>,
    ) -> Result<Result<Record, (TaskKey, TaskRecord, Task)>, Error> {
        let mut task = item.task.ok_or_else(|| Error::invalid("task", "missing"))?;
        if item.spec.is_none() && item.spec_id.is_empty() {
            return Err(Error::invalid(
                "spec",
                "missing: send the spec, or its spec_id once this shard holds it",
            ));
        }
        let pipeline_name = PipelineName::parse(&task.pipeline)
            .map_err(|e| Error::invalid("task.pipeline", e.to_string()))?;
        let pipeline = inner.intern(pipeline_name.to_string());
        if !task.idempotency_key.is_empty() {
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
        let (spec_key, spec) = match (item.spec, spec_key) {
            (Some(spec), Some(key)) => {
                let spec = match inner.specs.get(&key) {
                    Some(held) => held.spec.clone(),
                    None => Arc::new(spec),
                };
                (key, spec)
            }
            _ => {
                let key = SpecId::try_from(item.spec_id.as_slice())
                    .map_err(|_| Error::invalid("spec_id", "not 32 bytes (a SHA-256)"))?;
                let spec = inner
                    .specs
                    .get(&key)
                    .ok_or(Error::SpecNeeded(key))?
                    .spec
                    .clone();
                (key, spec)
            }
        };
        let flow = inner.intern(flow_of(&pipeline, &task.client));
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
        let quota = item.tenant_max_queued_tasks;
        let of_tenant = inner
            .active_by_tenant
            .get(pipeline_name.tenant.as_str())
            .copied()
            .unwrap_or(0);
        if quota > 0 && of_tenant as u64 >= quota {
            return Err(Error::ResourceExhausted {
                what: format!(
                    "tenant {} has {of_tenant} unfinished tasks, its quota (max_queued_tasks); retry later",
                    pipeline_name.tenant
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        let key = TaskKey::generate();
        let now = unix_ms();
        task.name = key.name(&pipeline);
        task.id = key.to_string();
        task.pipeline = pipeline.to_string();
        task.state = TaskState::Ready as i32;
        task.attempt = 0;
        task.create_time_ms = now;
        task.update_time_ms = now;
        task.result = None;
        inner.next_seq += 1;
        let rank = Rank {
            client_priority: item.client_priority,
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
        if !task.idempotency_key.is_empty() {
            inner
                .idempotency_pending
                .insert((pipeline.clone(), task.idempotency_key.clone()));
        }
        inner.reserve(&flow);
        let (body, keyed) = Record::body_of(&mut task);
        let record = TaskRecord {
            pipeline,
            flow,
            spec: held,
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
