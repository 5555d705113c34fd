//! The scheduler: the shard's task records, ready queue, lease table and agent sessions
//! behind one lock, and every operation on them.
//!
//! Dispatch is push: enqueueing a task, a credit arriving or a lease expiring each try to
//! hand READY tasks to sessions with free credit at once; nothing polls.
//!
//! Tasks live in memory in this version: a restart forgets them. The durable store
//! (group-committed, fsync'd before the ack) replaces this map in "Durable scheduler shard".

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, mpsc};
use tokio::time::Instant;
use tonic::Status;

use pm_proto::internal::v1::EnqueueTask;
use pm_proto::names::{PipelineName, TaskName};
use pm_proto::unix_ms;
use pm_proto::v1::{
    Assign, Cancel, Hello, Lease as WireLease, PipelineSpec, ServerMessage, StateChange, Task,
    TaskEvent, TaskResult, TaskState, server_message, task_event,
};

use crate::error::Error;
use crate::lease::{LeaseId, LeaseTable};
use crate::queue::{Rank, ReadyQueue};
use crate::task::{self, Event};

/// Tunables of a shard.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long a lease lasts unless renewed.
    pub lease_ttl: Duration,
    /// Most READY + IN_PROGRESS tasks on the shard; past it submits are refused.
    pub max_active_tasks: usize,
    /// Deliveries after which a task whose leases keep expiring ends in ERROR.
    pub max_deliveries: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(30),
            max_active_tasks: 1_000_000,
            max_deliveries: 10,
        }
    }
}

/// Messages to one agent stream. Unbounded because credit bounds the Assigns in flight and
/// the rest (Cancel, Drain) are rare.
pub type AgentTx = mpsc::UnboundedSender<Result<ServerMessage, Status>>;

struct Session {
    agent_id: String,
    /// `None` serves every pipeline.
    pipelines: Option<BTreeSet<String>>,
    credit: u32,
    tx: AgentTx,
}

struct TaskRecord {
    task: Task,
    spec: Arc<PipelineSpec>,
    pipeline: Arc<str>,
    rank: Rank,
    lease: Option<LeaseId>,
    watchers: Option<broadcast::Sender<TaskEvent>>,
    /// The current attempt's events, replayed to a watch that starts late. Bounded; emptied
    /// when the task finishes (its result carries the outputs).
    history: Vec<TaskEvent>,
}

/// Events kept per running task for late watchers.
const HISTORY_LIMIT: usize = 1024;

#[derive(Default)]
struct Inner {
    tasks: HashMap<Arc<str>, TaskRecord>,
    /// Task names per pipeline, ordered by id (ids are time-ordered UUIDv7).
    by_pipeline: HashMap<Arc<str>, BTreeSet<Arc<str>>>,
    /// (pipeline, idempotency key) -> task name.
    idempotency: HashMap<(Arc<str>, String), Arc<str>>,
    queue: ReadyQueue,
    leases: Option<LeaseTable>,
    sessions: BTreeMap<u64, Session>,
    next_seq: u64,
    next_session: u64,
    active: usize,
}

impl Inner {
    fn leases(&mut self) -> &mut LeaseTable {
        self.leases
            .as_mut()
            .expect("lease table set at construction")
    }
}

pub struct Scheduler {
    options: Options,
    inner: Mutex<Inner>,
    /// Wakes the lease reaper when an earlier deadline may exist.
    reaper: Notify,
}

/// What a watcher gets: the task now, what its current attempt did so far, and its future
/// events unless it already finished.
pub struct Watch {
    pub snapshot: Task,
    pub history: Vec<TaskEvent>,
    pub events: Option<broadcast::Receiver<TaskEvent>>,
}

fn event(e: task_event::Event) -> TaskEvent {
    TaskEvent {
        time_ms: unix_ms(),
        event: Some(e),
    }
}

fn wire_lease(id: &LeaseId, task: &str, attempt: u32, deadline: Instant) -> WireLease {
    let left = deadline.saturating_duration_since(Instant::now());
    WireLease {
        task: task.to_owned(),
        lease_id: id.0.to_string(),
        attempt,
        deadline_ms: unix_ms() + left.as_millis() as i64,
    }
}

impl Scheduler {
    pub fn new(options: Options) -> Arc<Self> {
        let incarnation = format!("{:x}", unix_ms() & 0xff_ffff);
        Arc::new(Self {
            options,
            inner: Mutex::new(Inner {
                leases: Some(LeaseTable::new(incarnation)),
                ..Inner::default()
            }),
            reaper: Notify::new(),
        })
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("scheduler lock poisoned")
    }

    /// Queues validated tasks; each is accepted or refused on its own.
    pub fn enqueue(&self, items: Vec<EnqueueTask>) -> Vec<Result<Task, Error>> {
        let mut inner = self.lock();
        let results = items
            .into_iter()
            .map(|item| self.enqueue_one(&mut inner, item))
            .collect();
        self.dispatch(&mut inner);
        results
    }

    fn enqueue_one(&self, inner: &mut Inner, item: EnqueueTask) -> Result<Task, Error> {
        let mut task = item.task.ok_or_else(|| Error::invalid("task", "missing"))?;
        let spec = item.spec.ok_or_else(|| Error::invalid("spec", "missing"))?;
        let pipeline_name = PipelineName::parse(&task.pipeline)
            .map_err(|e| Error::invalid("task.pipeline", e.to_string()))?;
        let pipeline: Arc<str> = pipeline_name.to_string().into();
        if !task.idempotency_key.is_empty() {
            let key = (pipeline.clone(), task.idempotency_key.clone());
            if let Some(existing) = inner.idempotency.get(&key) {
                return Ok(inner.tasks[existing].task.clone());
            }
        }
        if inner.active >= self.options.max_active_tasks {
            return Err(Error::ResourceExhausted {
                what: format!(
                    "the shard holds {} unfinished tasks, its limit; retry later",
                    inner.active
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        let id = uuid::Uuid::now_v7().simple().to_string();
        let name: Arc<str> = TaskName {
            pipeline: pipeline_name,
            task: id.clone(),
        }
        .to_string()
        .into();
        let now = unix_ms();
        task.name = name.to_string();
        task.id = id;
        task.state = TaskState::Ready as i32;
        task.attempt = 0;
        task.create_time_ms = now;
        task.update_time_ms = now;
        task.result = None;
        inner.next_seq += 1;
        let rank = Rank {
            client_priority: item.client_priority,
            task_priority: task.priority,
            seq: inner.next_seq,
        };
        if !task.idempotency_key.is_empty() {
            inner.idempotency.insert(
                (pipeline.clone(), task.idempotency_key.clone()),
                name.clone(),
            );
        }
        inner
            .by_pipeline
            .entry(pipeline.clone())
            .or_default()
            .insert(name.clone());
        inner.queue.push(&pipeline, rank, name.clone());
        inner.active += 1;
        let snapshot = task.clone();
        inner.tasks.insert(
            name,
            TaskRecord {
                task,
                spec: Arc::new(spec),
                pipeline,
                rank,
                lease: None,
                watchers: None,
                history: Vec::new(),
            },
        );
        Ok(snapshot)
    }

    /// Hands READY tasks to sessions with credit, until one of them runs out.
    fn dispatch(&self, inner: &mut Inner) {
        if inner.queue.is_empty() {
            return;
        }
        let session_ids: Vec<u64> = inner
            .sessions
            .iter()
            .filter(|(_, s)| s.credit > 0)
            .map(|(id, _)| *id)
            .collect();
        for session_id in session_ids {
            while let Some(session) = inner.sessions.get(&session_id)
                && session.credit > 0
            {
                let Some(name) = inner.queue.pop(session.pipelines.as_ref()) else {
                    break;
                };
                self.assign(inner, session_id, name);
            }
            if inner.queue.is_empty() {
                return;
            }
        }
    }

    fn assign(&self, inner: &mut Inner, session_id: u64, name: Arc<str>) {
        let ttl = self.options.lease_ttl;
        let record = inner.tasks.get_mut(&name).expect("queued task exists");
        let state = TaskState::try_from(record.task.state).unwrap_or_default();
        let next = task::transition(state, Event::Dispatch).expect("queued tasks are READY");
        record.task.state = next as i32;
        record.task.attempt += 1;
        record.task.update_time_ms = unix_ms();
        record.history.clear();
        let attempt = record.task.attempt;
        let (lease_id, lease) = inner.leases().grant(name.clone(), attempt, session_id, ttl);
        let record = inner.tasks.get_mut(&name).expect("queued task exists");
        record.lease = Some(lease_id.clone());
        let wire = wire_lease(&lease_id, &name, attempt, lease.deadline);
        let assign = ServerMessage {
            message: Some(server_message::Message::Assign(Assign {
                task: Some(record.task.clone()),
                spec: Some((*record.spec).clone()),
                lease: Some(wire),
            })),
        };
        publish(
            record,
            task_event::Event::StateChanged(StateChange {
                state: next as i32,
                attempt,
                reason: String::new(),
            }),
        );
        let session = inner.sessions.get_mut(&session_id).expect("session exists");
        session.credit -= 1;
        if session.tx.send(Ok(assign)).is_err() {
            // The stream is gone; the lease expires and the task is delivered again.
            tracing::debug!(task = %name, "assign to a closed stream");
        }
        // Every lease has the same TTL, so a new one is never the earliest unless it is the
        // only one: only then may the reaper be sleeping on nothing.
        if inner.leases().len() == 1 {
            self.reaper.notify_one();
        }
    }

    pub fn get(&self, name: &str) -> Result<Task, Error> {
        let inner = self.lock();
        inner
            .tasks
            .get(name)
            .map(|r| r.task.clone())
            .ok_or_else(|| Error::NotFound(name.to_owned()))
    }

    pub fn watch(&self, name: &str) -> Result<Watch, Error> {
        let mut inner = self.lock();
        let record = inner
            .tasks
            .get_mut(name)
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        let snapshot = record.task.clone();
        let state = TaskState::try_from(snapshot.state).unwrap_or_default();
        let events = (!task::is_final(state)).then(|| {
            record
                .watchers
                .get_or_insert_with(|| broadcast::channel(1024).0)
                .subscribe()
        });
        Ok(Watch {
            snapshot,
            history: record.history.clone(),
            events,
        })
    }

    pub fn cancel(&self, name: &str) -> Result<Task, Error> {
        let mut inner = self.lock();
        let record = inner
            .tasks
            .get(name)
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        let state = TaskState::try_from(record.task.state).unwrap_or_default();
        let key: Arc<str> = name.into();
        match state {
            TaskState::Ready => {
                let (pipeline, rank) = (record.pipeline.clone(), record.rank);
                inner.queue.remove(&pipeline, rank, &key);
            }
            TaskState::InProgress => {
                if let Some(lease_id) = record.lease.clone()
                    && let Some(lease) = inner.leases().release(&lease_id)
                {
                    // The agent kills the run; its result arrives fenced off as stale.
                    let wire = wire_lease(&lease_id, name, lease.attempt, lease.deadline);
                    if let Some(session) = inner.sessions.get(&lease.session) {
                        let _ = session.tx.send(Ok(ServerMessage {
                            message: Some(server_message::Message::Cancel(Cancel {
                                lease: Some(wire),
                            })),
                        }));
                    }
                }
            }
            _ => {
                return Err(Error::FailedPrecondition(format!(
                    "{name} already finished ({})",
                    state.as_str_name()
                )));
            }
        }
        Ok(self.finish(
            &mut inner,
            &key,
            Event::Cancel,
            None,
            "cancelled by a client",
        ))
    }

    /// Moves a task to a final state, tells its watchers, and returns it.
    fn finish(
        &self,
        inner: &mut Inner,
        name: &Arc<str>,
        event: Event,
        result: Option<TaskResult>,
        reason: &str,
    ) -> Task {
        let record = inner.tasks.get_mut(name).expect("task exists");
        let state = TaskState::try_from(record.task.state).unwrap_or_default();
        let next = task::transition(state, event).expect("caller checked the state");
        record.task.state = next as i32;
        record.task.update_time_ms = unix_ms();
        record.lease = None;
        if result.is_some() {
            record.task.result = result;
        } else if next == TaskState::Error {
            record.task.result = Some(TaskResult {
                succeeded: false,
                error: reason.to_owned(),
                ..TaskResult::default()
            });
        }
        publish(
            record,
            task_event::Event::StateChanged(StateChange {
                state: next as i32,
                attempt: record.task.attempt,
                reason: reason.to_owned(),
            }),
        );
        publish(record, task_event::Event::Finished(record.task.clone()));
        // Dropping the sender ends every watch after the final event.
        record.watchers = None;
        record.history = Vec::new();
        inner.active -= 1;
        record.task.clone()
    }

    pub fn list(
        &self,
        pipeline: &str,
        state: TaskState,
        page_size: usize,
        page_token: &str,
    ) -> (Vec<Task>, String) {
        let inner = self.lock();
        let Some(names) = inner.by_pipeline.get(pipeline) else {
            return (Vec::new(), String::new());
        };
        let upper: Arc<str> = if page_token.is_empty() {
            // Past every name of this pipeline: '~' sorts after the id alphabet.
            format!("{pipeline}/tasks/~").into()
        } else {
            format!("{pipeline}/tasks/{page_token}").into()
        };
        let mut tasks = Vec::with_capacity(page_size);
        let mut more = false;
        for name in names.range(..upper).rev() {
            let task = &inner.tasks[name].task;
            if state != TaskState::Unspecified && task.state != state as i32 {
                continue;
            }
            if tasks.len() == page_size {
                more = true;
                break;
            }
            tasks.push(task.clone());
        }
        let next = match (more, tasks.last()) {
            (true, Some(last)) => last.id.clone(),
            _ => String::new(),
        };
        (tasks, next)
    }

    // ---- agent sessions ----

    /// Registers an agent stream; returns its session id. Leases the agent still holds from
    /// an earlier stream are moved to this one, so running work is not delivered again.
    pub fn open_session(&self, hello: &Hello, tx: AgentTx) -> u64 {
        let mut inner = self.lock();
        inner.next_session += 1;
        let id = inner.next_session;
        let ttl = self.options.lease_ttl;
        for held in &hello.held_leases {
            let lease_id = LeaseId(held.lease_id.as_str().into());
            let current = inner
                .leases()
                .get(&lease_id)
                .is_some_and(|l| *l.task == *held.task && l.attempt == held.attempt);
            if current {
                inner.leases().rebind(&lease_id, id, ttl);
                tracing::info!(task = %held.task, lease = %lease_id, "lease reclaimed");
            }
        }
        let pipelines = (!hello.pipelines.is_empty())
            .then(|| hello.pipelines.iter().cloned().collect::<BTreeSet<_>>());
        inner.sessions.insert(
            id,
            Session {
                agent_id: hello.agent_id.clone(),
                pipelines,
                credit: hello.slots,
                tx,
            },
        );
        self.dispatch(&mut inner);
        id
    }

    /// Forgets a stream. Its leases stay until they expire, so an agent that reconnects in
    /// time reclaims them.
    pub fn close_session(&self, session: u64) {
        let mut inner = self.lock();
        if let Some(s) = inner.sessions.remove(&session) {
            tracing::info!(agent = %s.agent_id, session, "agent stream closed");
        }
    }

    pub fn credit(&self, session: u64, slots: u32) {
        let mut inner = self.lock();
        if let Some(s) = inner.sessions.get_mut(&session) {
            s.credit = s.credit.saturating_add(slots);
        }
        self.dispatch(&mut inner);
    }

    /// Renews leases held by `session`; unknown ones are ignored (their results will be
    /// fenced off).
    pub fn renew(&self, session: u64, leases: &[WireLease]) {
        let mut inner = self.lock();
        let ttl = self.options.lease_ttl;
        for l in leases {
            inner
                .leases()
                .renew(&LeaseId(l.lease_id.as_str().into()), session, ttl);
        }
    }

    /// Checks that `lease` is the task's current one; returns the task's name.
    fn current(inner: &mut Inner, lease: &WireLease) -> Option<Arc<str>> {
        let id = LeaseId(lease.lease_id.as_str().into());
        let held = inner.leases().get(&id)?;
        if *held.task != *lease.task || held.attempt != lease.attempt {
            return None;
        }
        Some(held.task.clone())
    }

    /// A running task's progress, forwarded to its watchers when the lease is current.
    pub fn progress(&self, lease: &WireLease, event: TaskEvent) {
        let mut inner = self.lock();
        if let Some(name) = Self::current(&mut inner, lease)
            && let Some(record) = inner.tasks.get_mut(&name)
        {
            record.record(event);
        }
    }

    /// An attempt's end. The first result of the current lease wins; anything else is a
    /// duplicate and changes nothing. Returns whether it was applied.
    pub fn complete(&self, session: u64, lease: &WireLease, result: TaskResult) -> bool {
        let mut inner = self.lock();
        if let Some(s) = inner.sessions.get_mut(&session) {
            s.credit = s.credit.saturating_add(1);
        }
        let applied = match Self::current(&mut inner, lease) {
            Some(name) => {
                inner
                    .leases()
                    .release(&LeaseId(lease.lease_id.as_str().into()));
                let event = Event::Finish {
                    succeeded: result.succeeded,
                };
                let reason = if result.succeeded {
                    String::new()
                } else {
                    result.error.clone()
                };
                self.finish(&mut inner, &name, event, Some(result), &reason);
                true
            }
            None => {
                tracing::info!(task = %lease.task, attempt = lease.attempt, "duplicate or stale result ignored");
                false
            }
        };
        self.dispatch(&mut inner);
        applied
    }

    /// The agent refused an assigned task: it goes back to READY (its slot is credited back).
    pub fn reject(&self, session: u64, lease: &WireLease, reason: &str) {
        let mut inner = self.lock();
        if let Some(s) = inner.sessions.get_mut(&session) {
            s.credit = s.credit.saturating_add(1);
        }
        if let Some(name) = Self::current(&mut inner, lease) {
            inner
                .leases()
                .release(&LeaseId(lease.lease_id.as_str().into()));
            tracing::warn!(task = %name, reason, "agent rejected task");
            self.requeue(&mut inner, &name, reason);
        }
        self.dispatch(&mut inner);
    }

    /// IN_PROGRESS -> READY, or ERROR once it was delivered too often.
    fn requeue(&self, inner: &mut Inner, name: &Arc<str>, reason: &str) {
        let record = inner.tasks.get_mut(name).expect("task exists");
        if record.task.attempt >= self.options.max_deliveries {
            let why = format!("{reason}; gave up after {} deliveries", record.task.attempt);
            self.finish(inner, name, Event::Fail, None, &why);
            return;
        }
        let state = TaskState::try_from(record.task.state).unwrap_or_default();
        let next = task::transition(state, Event::Requeue).expect("leased tasks are IN_PROGRESS");
        record.task.state = next as i32;
        record.task.update_time_ms = unix_ms();
        record.lease = None;
        publish(
            record,
            task_event::Event::StateChanged(StateChange {
                state: next as i32,
                attempt: record.task.attempt,
                reason: reason.to_owned(),
            }),
        );
        let (pipeline, rank) = (record.pipeline.clone(), record.rank);
        inner.queue.push(&pipeline, rank, name.clone());
    }

    /// Expires due leases (their tasks go back to READY) and returns the next deadline.
    fn expire_due(&self) -> Option<Instant> {
        let mut inner = self.lock();
        let expired = inner.leases().take_expired(Instant::now());
        for (id, lease) in &expired {
            tracing::info!(task = %lease.task, lease = %id, attempt = lease.attempt, "lease expired");
            self.requeue(&mut inner, &lease.task, "lease expired");
        }
        if !expired.is_empty() {
            self.dispatch(&mut inner);
        }
        inner.leases().next_deadline()
    }

    /// Expires leases at their deadlines until `cancel` fires. Sleeps until the earliest
    /// deadline, or until a new lease may have brought it forward.
    pub async fn run_reaper(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            let next = self.expire_due();
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

    /// READY + IN_PROGRESS tasks (for health and tests).
    pub fn active_tasks(&self) -> usize {
        self.lock().active
    }
}

fn publish(record: &mut TaskRecord, e: task_event::Event) {
    record.record(event(e));
}

impl TaskRecord {
    /// Keeps an event for late watchers and sends it to the current ones.
    fn record(&mut self, event: TaskEvent) {
        if self.history.len() < HISTORY_LIMIT {
            self.history.push(event.clone());
        }
        if let Some(tx) = &self.watchers {
            let _ = tx.send(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use pm_proto::v1::{Job, Stage};
    use tokio::sync::mpsc::UnboundedReceiver;
    use tokio_util::sync::CancellationToken;

    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn item(priority: u32, idempotency_key: &str) -> EnqueueTask {
        EnqueueTask {
            task: Some(Task {
                pipeline: "tenants/t/applications/a/pipelines/p".into(),
                priority,
                idempotency_key: idempotency_key.into(),
                ..Task::default()
            }),
            spec: Some(PipelineSpec {
                stages: vec![Stage {
                    name: "s".into(),
                    jobs: vec![Job {
                        name: "j".into(),
                        executor: "host".into(),
                        commands: vec!["true".into()],
                        ..Job::default()
                    }],
                    priority: None,
                }],
                ..PipelineSpec::default()
            }),
            client_priority: 10,
        }
    }

    fn hello(slots: u32, held: Vec<WireLease>) -> Hello {
        Hello {
            agent_id: "a".into(),
            slots,
            held_leases: held,
            ..Hello::default()
        }
    }

    fn scheduler(max_active_tasks: usize) -> Arc<Scheduler> {
        Scheduler::new(Options {
            lease_ttl: TTL,
            max_active_tasks,
            max_deliveries: 10,
        })
    }

    /// The next Assign pushed to a fake agent stream.
    fn assigned(rx: &mut UnboundedReceiver<Result<ServerMessage, Status>>) -> (Task, WireLease) {
        loop {
            let message = rx.try_recv().expect("an Assign was pushed").unwrap();
            if let Some(server_message::Message::Assign(a)) = message.message {
                return (a.task.unwrap(), a.lease.unwrap());
            }
        }
    }

    fn done() -> TaskResult {
        TaskResult {
            succeeded: true,
            ..TaskResult::default()
        }
    }

    fn state_of(s: &Scheduler, name: &str) -> (TaskState, u32) {
        let t = s.get(name).unwrap();
        (TaskState::try_from(t.state).unwrap(), t.attempt)
    }

    /// Lets the reaper task run after time moved (paused clock), until `f` holds.
    async fn until(mut f: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition not reached");
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_is_delivered_again_and_stale_results_are_fenced() {
        let s = scheduler(100);
        let cancel = CancellationToken::new();
        tokio::spawn(s.clone().run_reaper(cancel.clone()));
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let first = s.open_session(&hello(1, vec![]), tx1);
        let task = s.enqueue(vec![item(10, "")]).pop().unwrap().unwrap();
        let (_, lease1) = assigned(&mut rx1);
        assert_eq!(lease1.attempt, 1);
        assert_eq!(state_of(&s, &task.name), (TaskState::InProgress, 1));

        // No renewal: past the TTL the task is READY again, and a second agent gets it.
        tokio::time::advance(TTL + Duration::from_millis(1)).await;
        until(|| state_of(&s, &task.name).0 == TaskState::Ready).await;
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        let second = s.open_session(&hello(1, vec![]), tx2);
        let (_, lease2) = assigned(&mut rx2);
        assert_eq!(lease2.attempt, 2);
        assert_ne!(lease2.lease_id, lease1.lease_id);

        // The first agent's late result is a duplicate: nothing changes.
        assert!(!s.complete(first, &lease1, done()));
        assert_eq!(state_of(&s, &task.name), (TaskState::InProgress, 2));
        // The current attempt's result wins, once.
        assert!(s.complete(second, &lease2, done()));
        assert_eq!(state_of(&s, &task.name), (TaskState::Done, 2));
        assert!(
            !s.complete(second, &lease2, done()),
            "a repeated result is not applied twice"
        );
        assert_eq!(s.active_tasks(), 0);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_keeps_a_lease_and_a_reconnecting_agent_reclaims_it() {
        let s = scheduler(100);
        let cancel = CancellationToken::new();
        tokio::spawn(s.clone().run_reaper(cancel.clone()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let session = s.open_session(&hello(1, vec![]), tx);
        let task = s.enqueue(vec![item(10, "")]).pop().unwrap().unwrap();
        let (_, lease) = assigned(&mut rx);

        tokio::time::advance(TTL * 6 / 10).await;
        s.renew(session, std::slice::from_ref(&lease));
        tokio::time::advance(TTL * 6 / 10).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            state_of(&s, &task.name),
            (TaskState::InProgress, 1),
            "renewed, not expired"
        );

        // The stream breaks; the agent comes back still holding the lease.
        s.close_session(session);
        let (tx, _rx) = mpsc::unbounded_channel();
        let back = s.open_session(&hello(0, vec![lease.clone()]), tx);
        tokio::time::advance(TTL * 8 / 10).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            state_of(&s, &task.name),
            (TaskState::InProgress, 1),
            "reclaimed, not redelivered"
        );
        assert!(s.complete(back, &lease, done()));
        assert_eq!(state_of(&s, &task.name).0, TaskState::Done);
        cancel.cancel();
    }

    #[test]
    fn priority_then_fifo_idempotency_and_admission() {
        let s = scheduler(3);
        let results = s.enqueue(vec![
            item(10, "a"),
            item(5, ""),
            item(10, ""),
            item(10, "a"),
        ]);
        let names: Vec<String> = results
            .iter()
            .map(|r| r.as_ref().unwrap().name.clone())
            .collect();
        assert_eq!(
            names[3], names[0],
            "the same idempotency key returns the original task"
        );
        let refused = s.enqueue(vec![item(10, "")]).pop().unwrap();
        assert!(
            matches!(refused, Err(Error::ResourceExhausted { .. })),
            "{refused:?}"
        );
        assert_eq!(s.active_tasks(), 3, "a refusal touches nothing accepted");

        let (tx, mut rx) = mpsc::unbounded_channel();
        s.open_session(&hello(3, vec![]), tx);
        let order: Vec<String> = (0..3).map(|_| assigned(&mut rx).0.name).collect();
        assert_eq!(
            order,
            vec![names[1].clone(), names[0].clone(), names[2].clone()]
        );

        // Cancel of a READY task: it is never dispatched.
        let s = scheduler(10);
        let task = s.enqueue(vec![item(10, "")]).pop().unwrap().unwrap();
        assert_eq!(
            TaskState::try_from(s.cancel(&task.name).unwrap().state),
            Ok(TaskState::Cancelled)
        );
        let (tx, mut rx) = mpsc::unbounded_channel();
        s.open_session(&hello(1, vec![]), tx);
        assert!(rx.try_recv().is_err(), "nothing is assigned");
        assert!(matches!(
            s.cancel(&task.name),
            Err(Error::FailedPrecondition(_))
        ));
    }
}
