//! The scheduler: the shard's task records, ready queue, lease table and agent sessions
//! behind one lock, and every operation on them.
//!
//! Every state change a client can observe follows one pattern: **plan** under the lock
//! (check, mark the record busy), **write** the new record through the group-commit
//! [`Journal`] without the lock, then **apply** under the lock. So such a change is durable
//! before anyone can see it: a submit is acknowledged after its fsync, and a result or a
//! cancel is visible once written. A record marked busy refuses other changes until its write
//! lands (a concurrent cancel answers ABORTED, a repeated result is a duplicate).
//!
//! The one exception is dispatch: an Assign goes out without waiting for its dispatch
//! record, which is only appended to the journal (in order, under the lock). The argument
//! that this keeps at-least-once is in [`dispatch`]'s module doc.
//!
//! Dispatch is push: a submit, a credit, a result or an expired lease wakes the dispatcher
//! loop, which hands READY tasks to sessions with credit at once; nothing polls.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prost::Message;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use pm_proto::internal::v1::EnqueueTask;
use pm_proto::names::{PipelineName, TaskName};
use pm_proto::unix_ms;
use pm_proto::v1::{
    Assign, Cancel, Hello, Lease as WireLease, PipelineSpec, ServerMessage, StateChange, Task,
    TaskEvent, TaskResult, TaskState, server_message, task_event,
};

use crate::error::Error;
use crate::journal::Journal;
use crate::lease::{Lease, LeaseId, LeaseTable};
use crate::queue::{FairClock, Rank, ReadyQueue};
use crate::store::{Contents, Op, Record, SpecId, spec_id};
use crate::task::{self, Event};

mod dispatch;
mod finish;
mod retention;
mod sessions;
mod submit;
mod task_map;
mod transfer;

use task_map::TaskMap;

pub use transfer::{Arriving, Outgoing};

/// Tunables of a shard.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long a lease lasts unless renewed; also the grace period after a restart in
    /// which reconnecting agents reclaim their leases.
    pub lease_ttl: Duration,
    /// Most READY + IN_PROGRESS tasks on the shard; past it submits are refused.
    pub max_active_tasks: usize,
    /// Most READY + IN_PROGRESS tasks of one client (`tenant/client`).
    pub max_active_per_client: usize,
    /// Deliveries after which a task whose leases keep expiring ends in ERROR.
    pub max_deliveries: u32,
    /// How long finished tasks keep their result (and their idempotency key) before they
    /// are collected.
    pub retention: Duration,
    /// Benchmarks only: acknowledge without fsync (see [`crate::store::Store::open_with`]).
    pub unsafe_no_fsync: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(30),
            max_active_tasks: 1_000_000,
            max_active_per_client: 250_000,
            max_deliveries: 10,
            retention: Duration::from_secs(24 * 3600),
            unsafe_no_fsync: false,
        }
    }
}

/// Messages to one agent stream. Unbounded because credit bounds the Assigns in flight and
/// the rest (Cancel, Drain) are rare.
pub type AgentTx = mpsc::UnboundedSender<Result<ServerMessage, Status>>;

/// The tenant of a fair-share flow, `tenant/client`.
fn tenant_of_flow(flow: &str) -> &str {
    flow.split_once('/').map_or(flow, |(tenant, _)| tenant)
}

/// Most tasks one agent stream may hold at once (its credit plus its unanswered leases).
pub const MAX_SLOTS: u32 = 4096;
/// Tasks dispatched per journal write, at most.
const DISPATCH_BATCH: usize = 1024;
/// Finished tasks collected per round, at most.
const COLLECT_BATCH: usize = 10_000;
/// Events kept per running task for late watchers.
const HISTORY_LIMIT: usize = 1024;

struct Session {
    agent_id: String,
    /// `None` serves every pipeline.
    pipelines: Option<BTreeSet<String>>,
    credit: u32,
    /// The leases this stream was given (or reclaimed in its Hello) and has not answered yet:
    /// each holds one of its slots. Only a Result or Reject naming one of them gives a slot
    /// back, so a forged or repeated one cannot raise credit. `credit + held.len()` stays
    /// within [`MAX_SLOTS`].
    held: HashSet<LeaseId>,
    tx: AgentTx,
}

impl Session {
    fn serves(&self, pipeline: &str) -> bool {
        self.pipelines.as_ref().is_none_or(|p| p.contains(pipeline))
    }
}

struct TaskRecord {
    /// Shared with the writes that carry it and the readers that copy it out of the lock.
    task: Arc<Task>,
    spec_id: SpecId,
    spec: Arc<PipelineSpec>,
    pipeline: Arc<str>,
    /// The fair-share flow: `tenant/client`.
    flow: Arc<str>,
    client_priority: u32,
    rank: Rank,
    lease: Option<LeaseId>,
    /// A change of this task is being written.
    busy: bool,
    watchers: Option<broadcast::Sender<TaskEvent>>,
    /// The current attempt's events, replayed to a watch that starts late. Bounded; emptied
    /// when the task finishes (its result carries the outputs).
    history: Vec<TaskEvent>,
}

impl TaskRecord {
    fn state(&self) -> TaskState {
        TaskState::try_from(self.task.state).unwrap_or_default()
    }

    /// The write that makes `task` (this record's task, changed) durable.
    fn stored(&self, task: &Arc<Task>, lease: Option<&LeaseId>) -> Op {
        Op::PutTask(self.disk_record(task, lease))
    }

    /// `task` (this record's task, maybe changed) as it is kept on disk.
    fn disk_record(&self, task: &Arc<Task>, lease: Option<&LeaseId>) -> Record {
        Record {
            task: task.clone(),
            spec_id: self.spec_id,
            client_priority: self.client_priority,
            seq: self.rank.seq,
            lease_id: lease.map(|l| l.0.clone()),
        }
    }

    /// This task after `event`, not yet applied.
    fn next(&self, event: Event) -> Result<Task, task::InvalidTransition> {
        let mut next = (*self.task).clone();
        next.state = task::transition(self.state(), event)? as i32;
        next.update_time_ms = unix_ms();
        Ok(next)
    }

    /// Keeps an event for late watchers and sends it to the current ones.
    fn record(&mut self, event: TaskEvent) {
        if self.history.len() < HISTORY_LIMIT {
            self.history.push(event.clone());
        }
        if let Some(tx) = &self.watchers {
            let _ = tx.send(event);
        }
    }

    fn publish(&mut self, e: task_event::Event) {
        self.record(TaskEvent {
            time_ms: unix_ms(),
            event: Some(e),
        });
    }

    /// A state change, for current watchers only: a watch that starts later sees the state
    /// in its snapshot, so it is not kept in the history (and a task nobody watches
    /// allocates nothing for it).
    fn publish_state(&mut self, reason: &str) {
        let Some(tx) = &self.watchers else {
            return;
        };
        let change = StateChange {
            state: self.task.state,
            attempt: self.task.attempt,
            reason: reason.to_owned(),
        };
        let _ = tx.send(TaskEvent {
            time_ms: unix_ms(),
            event: Some(task_event::Event::StateChanged(change)),
        });
    }
}

struct Inner {
    tasks: TaskMap,
    /// Task names per pipeline, ordered by id (ids are time-ordered UUIDv7).
    by_pipeline: HashMap<Arc<str>, BTreeSet<Arc<str>>>,
    /// (pipeline, idempotency key) -> task name, for durable tasks.
    idempotency: HashMap<(Arc<str>, String), Arc<str>>,
    /// Keys whose first submit is being written.
    idempotency_pending: HashSet<(Arc<str>, String)>,
    specs: HashMap<SpecId, Arc<PipelineSpec>>,
    /// Specs known to be on disk; others are written with the task that brings them.
    durable_specs: HashSet<SpecId>,
    queue: ReadyQueue,
    fair: FairClock,
    leases: LeaseTable,
    sessions: BTreeMap<u64, Session>,
    /// Finished tasks by when they finished, for retention.
    finished: BTreeSet<(Instant, Arc<str>)>,
    next_seq: u64,
    next_session: u64,
    /// READY + IN_PROGRESS tasks (and submits being written), in all and per flow.
    active: usize,
    active_by_flow: HashMap<Arc<str>, usize>,
    /// Unfinished tasks per tenant (the tenant is the flow's first segment).
    active_by_tenant: HashMap<Arc<str>, usize>,
    /// Pipeline and flow names (see [`Inner::intern`]).
    interned: HashSet<Arc<str>>,
}

impl Inner {
    fn reserve(&mut self, flow: &Arc<str>) {
        self.active += 1;
        *self.active_by_flow.entry(flow.clone()).or_default() += 1;
        let tenant = tenant_of_flow(flow);
        match self.active_by_tenant.get_mut(tenant) {
            Some(n) => *n += 1,
            None => {
                let tenant = self.intern(tenant.to_owned());
                self.active_by_tenant.insert(tenant, 1);
            }
        }
    }

    fn unreserve(&mut self, flow: &Arc<str>) {
        self.active -= 1;
        for (map, key) in [
            (&mut self.active_by_flow, &**flow),
            (&mut self.active_by_tenant, tenant_of_flow(flow)),
        ] {
            if let Some(n) = map.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
    }

    /// The one shared copy of a pipeline or flow name, so a million tasks of one pipeline
    /// hold one string, not a million. Names are kept for the shard's life (like the fair
    /// clock's flows): as many as pipelines and clients ever seen here.
    fn intern(&mut self, name: String) -> Arc<str> {
        if let Some(shared) = self.interned.get(name.as_str()) {
            return shared.clone();
        }
        let shared: Arc<str> = name.into();
        self.interned.insert(shared.clone());
        shared
    }

    /// More slots for `session`, never past [`MAX_SLOTS`] with the leases it holds.
    fn credit(&mut self, session: u64, slots: u32) {
        if let Some(s) = self.sessions.get_mut(&session) {
            let room = MAX_SLOTS.saturating_sub(s.held.len() as u32);
            s.credit = s.credit.saturating_add(slots).min(room);
        }
    }

    /// Indexes a task from the disk (recovery) or from a handoff. A leased task keeps its
    /// lease for `lease_left`, held by no stream until its agent reclaims it.
    fn restore(&mut self, r: Record, lease_left: Duration, now: Instant) -> Restored {
        let (task, spec_key) = (r.task, r.spec_id);
        let Some(spec) = self.specs.get(&spec_key).cloned() else {
            tracing::error!(task = %task.name, "the spec of a stored task is missing; task skipped");
            return Restored::Lost;
        };
        let Ok(name) = TaskName::parse(&task.name) else {
            return Restored::Lost;
        };
        let pipeline = self.intern(name.pipeline.to_string());
        let flow = self.intern(format!("{}/{}", name.pipeline.tenant, task.client));
        let rank = Rank {
            client_priority: r.client_priority,
            task_priority: task.priority,
            tag: self.fair.tag(&flow),
            seq: r.seq,
        };
        self.next_seq = self.next_seq.max(r.seq);
        let key: Arc<str> = task.name.as_str().into();
        let mut record = TaskRecord {
            task,
            spec_id: spec_key,
            spec,
            pipeline,
            flow: flow.clone(),
            client_priority: r.client_priority,
            rank,
            lease: None,
            busy: false,
            watchers: None,
            history: Vec::new(),
        };
        let restored = match record.state() {
            TaskState::Ready => {
                self.reserve(&flow);
                Restored::Ready
            }
            TaskState::InProgress => {
                self.reserve(&flow);
                let id = LeaseId(r.lease_id.unwrap_or_default());
                let lease = Lease {
                    task: key.clone(),
                    attempt: record.task.attempt,
                    session: 0,
                    deadline: now + lease_left,
                };
                self.leases.insert(id.clone(), lease);
                record.lease = Some(id);
                Restored::Leased
            }
            _ => {
                let age = (unix_ms() - record.task.update_time_ms).max(0) as u64;
                let finished_at = now.checked_sub(Duration::from_millis(age)).unwrap_or(now);
                self.finished.insert((finished_at, key.clone()));
                Restored::Finished
            }
        };
        self.insert(key, record);
        restored
    }

    /// Removes a task from every index; its disk record is untouched.
    fn unindex(&mut self, name: &Arc<str>) -> Option<TaskRecord> {
        let record = self.tasks.remove(name)?;
        if let Some(names) = self.by_pipeline.get_mut(&record.pipeline) {
            names.remove(name);
            if names.is_empty() {
                self.by_pipeline.remove(&record.pipeline);
            }
        }
        if !record.task.idempotency_key.is_empty() {
            self.idempotency
                .remove(&(record.pipeline.clone(), record.task.idempotency_key.clone()));
        }
        Some(record)
    }

    /// Indexes a durable record; READY ones join the queue.
    fn insert(&mut self, name: Arc<str>, record: TaskRecord) {
        if !record.task.idempotency_key.is_empty() {
            let key = (record.pipeline.clone(), record.task.idempotency_key.clone());
            self.idempotency.insert(key, name.clone());
        }
        self.by_pipeline
            .entry(record.pipeline.clone())
            .or_default()
            .insert(name.clone());
        if record.state() == TaskState::Ready {
            self.queue.push(&record.pipeline, record.rank, name.clone());
        }
        self.tasks.insert(name, record);
    }
}

pub struct Scheduler {
    options: Options,
    inner: Mutex<Inner>,
    journal: Journal,
    /// Wakes the dispatcher: there may be READY tasks and credit.
    dispatcher: Notify,
    /// Wakes the lease reaper when an earlier deadline may exist.
    reaper: Notify,
    /// Submits and adoptions between their ownership check and their tasks being indexed.
    arriving: std::sync::atomic::AtomicUsize,
}

/// What a watcher gets: the task now, what its current attempt did so far, and its future
/// events unless it already finished.
pub struct Watch {
    pub snapshot: Task,
    pub history: Vec<TaskEvent>,
    pub events: Option<broadcast::Receiver<TaskEvent>>,
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

fn storage_error(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("{e}; nothing was changed, retry"))
}

/// What [`Inner::restore`] made of a stored task.
enum Restored {
    Ready,
    Leased,
    Finished,
    /// Unreadable, or its spec is missing.
    Lost,
}

/// A requeue or final failure being written.
struct Requeue {
    name: Arc<str>,
    next: Arc<Task>,
    reason: String,
    /// The lease it had, restored (expiring soon) if the write fails.
    lease: Option<(LeaseId, Lease)>,
}

impl Scheduler {
    /// A scheduler over what `contents` holds (the disk, read at start), writing through
    /// `journal`. Leased tasks from before a restart keep their leases for one TTL, so
    /// reconnecting agents reclaim them; unclaimed ones are then delivered again.
    pub fn new(options: Options, journal: Journal, contents: Contents) -> Arc<Self> {
        let started = std::time::Instant::now();
        let mut inner = Inner {
            tasks: TaskMap::new(),
            by_pipeline: HashMap::new(),
            idempotency: HashMap::new(),
            idempotency_pending: HashSet::new(),
            specs: HashMap::new(),
            durable_specs: HashSet::new(),
            queue: ReadyQueue::default(),
            fair: FairClock::default(),
            leases: LeaseTable::default(),
            sessions: BTreeMap::new(),
            finished: BTreeSet::new(),
            next_seq: 0,
            next_session: 0,
            active: 0,
            active_by_flow: HashMap::new(),
            active_by_tenant: HashMap::new(),
            interned: HashSet::new(),
        };
        for (id, spec) in contents.specs {
            inner.durable_specs.insert(id);
            inner.specs.insert(id, Arc::new(spec));
        }
        let mut stored = contents.tasks;
        stored.sort_unstable_by_key(|t| t.seq);
        let (mut ready, mut leased, mut lost) = (0usize, 0usize, 0usize);
        let now = Instant::now();
        for s in stored {
            let restored = Record::from_stored(s)
                .map_or(Restored::Lost, |r| inner.restore(r, options.lease_ttl, now));
            match restored {
                Restored::Ready => ready += 1,
                Restored::Leased => leased += 1,
                Restored::Finished => {}
                Restored::Lost => lost += 1,
            }
        }
        let total = inner.tasks.len();
        if total > 0 || lost > 0 {
            tracing::info!(
                tasks = total,
                ready,
                leased,
                lost,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "recovered tasks from disk"
            );
        }
        Arc::new(Self {
            options,
            inner: Mutex::new(inner),
            journal,
            dispatcher: Notify::new(),
            reaper: Notify::new(),
            arriving: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("scheduler lock poisoned")
    }

    async fn write(&self, ops: Vec<Op>) -> Result<(), Error> {
        if ops.is_empty() {
            return Ok(());
        }
        self.journal.write(ops).await.map_err(storage_error)
    }

    /// Runs the dispatcher, the lease reaper and the retention collector until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        tokio::join!(
            self.clone().run_dispatcher(cancel.clone()),
            self.clone().run_reaper(cancel.clone()),
            self.run_collector(cancel),
        );
    }

    // ---- reads ----

    pub fn get(&self, name: &str) -> Result<Task, Error> {
        let task = self
            .lock()
            .tasks
            .get(name)
            .map(|r| r.task.clone())
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        Ok((*task).clone())
    }

    pub fn watch(&self, name: &str) -> Result<Watch, Error> {
        let (snapshot, history, events) = {
            let mut inner = self.lock();
            let record = inner
                .tasks
                .get_mut(name)
                .ok_or_else(|| Error::NotFound(name.to_owned()))?;
            let events = (!task::is_final(record.state())).then(|| {
                record
                    .watchers
                    .get_or_insert_with(|| broadcast::channel(1024).0)
                    .subscribe()
            });
            (record.task.clone(), record.history.clone(), events)
        };
        Ok(Watch {
            snapshot: (*snapshot).clone(),
            history,
            events,
        })
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
        let mut page: Vec<Arc<Task>> = Vec::with_capacity(page_size);
        let mut more = false;
        for name in names.range(..upper).rev() {
            let task = &inner.tasks.get(name).expect("indexed tasks exist").task;
            if state != TaskState::Unspecified && task.state != state as i32 {
                continue;
            }
            if page.len() == page_size {
                more = true;
                break;
            }
            page.push(task.clone());
        }
        drop(inner);
        let next = match (more, page.last()) {
            (true, Some(last)) => last.id.clone(),
            _ => String::new(),
        };
        // Copied out of the records here, not under the lock.
        (page.iter().map(|t| (**t).clone()).collect(), next)
    }

    /// READY + IN_PROGRESS tasks (for health and tests).
    pub fn active_tasks(&self) -> usize {
        self.lock().active
    }

    /// Every task the shard holds, finished ones included.
    pub fn len(&self) -> usize {
        self.lock().tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
            spec_id: Vec::new(),
            tenant_max_queued_tasks: 0,
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

    fn options(max_active_tasks: usize) -> Options {
        Options {
            lease_ttl: TTL,
            max_active_tasks,
            max_active_per_client: max_active_tasks,
            max_deliveries: 10,
            retention: Duration::from_secs(3600),
            unsafe_no_fsync: false,
        }
    }

    /// A scheduler whose writes succeed at once (logic on a paused clock).
    fn scheduler(max_active_tasks: usize) -> Arc<Scheduler> {
        Scheduler::new(
            options(max_active_tasks),
            Journal::discard(),
            Contents::default(),
        )
    }

    async fn enqueue_one(s: &Scheduler, item: EnqueueTask) -> Task {
        s.enqueue(vec![item]).await.pop().unwrap().unwrap()
    }

    /// Starts the scheduler's loops; returns what stops them. On the current-thread test
    /// runtime one yield runs the new task first, so its timers (reaper, collector) start
    /// now, before a test moves the paused clock.
    async fn start(s: &Arc<Scheduler>) -> CancellationToken {
        let cancel = CancellationToken::new();
        tokio::spawn(s.clone().run(cancel.clone()));
        tokio::task::yield_now().await;
        cancel
    }

    /// The next Assign pushed to a fake agent stream.
    async fn assigned(
        rx: &mut UnboundedReceiver<Result<ServerMessage, Status>>,
    ) -> (Task, WireLease) {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .expect("an Assign within a minute")
                .expect("stream open")
                .unwrap();
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
        let cancel = start(&s).await;
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let first = s.open_session(&hello(1, vec![]), tx1);
        let task = enqueue_one(&s, item(10, "")).await;
        let (_, lease1) = assigned(&mut rx1).await;
        assert_eq!(lease1.attempt, 1);
        assert_eq!(state_of(&s, &task.name), (TaskState::InProgress, 1));

        // No renewal: past the TTL the task is READY again, and a second agent gets it.
        tokio::time::advance(TTL + Duration::from_millis(1)).await;
        until(|| state_of(&s, &task.name).0 == TaskState::Ready).await;
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        let second = s.open_session(&hello(1, vec![]), tx2);
        let (_, lease2) = assigned(&mut rx2).await;
        assert_eq!(lease2.attempt, 2);
        assert_ne!(lease2.lease_id, lease1.lease_id);

        // The first agent's late result is a duplicate: nothing changes.
        assert!(!s.complete(first, &lease1, done()).await);
        assert_eq!(state_of(&s, &task.name), (TaskState::InProgress, 2));
        // The current attempt's result wins, once.
        assert!(s.complete(second, &lease2, done()).await);
        assert_eq!(state_of(&s, &task.name), (TaskState::Done, 2));
        assert!(
            !s.complete(second, &lease2, done()).await,
            "a repeated result is not applied twice"
        );
        assert_eq!(s.active_tasks(), 0);
        cancel.cancel();
    }

    fn credit_of(s: &Scheduler, session: u64) -> u32 {
        s.lock().sessions[&session].credit
    }

    /// An attacker's agent stream, serving a pipeline of its own, that knows (or guesses)
    /// the leases of another stream: nothing it sends about them counts.
    #[tokio::test(start_paused = true)]
    async fn results_renewals_rejects_and_reclaims_count_only_from_the_holder() {
        let s = scheduler(100);
        let cancel = start(&s).await;
        let p = "tenants/t/applications/a/pipelines/p";
        let q = "tenants/t/applications/a/pipelines/q";
        let scoped = |slots, pipeline: &str, held| Hello {
            pipelines: vec![pipeline.into()],
            ..hello(slots, held)
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let victim = s.open_session(&scoped(2, p, vec![]), tx);
        let (tx, mut rogue_rx) = mpsc::unbounded_channel();
        let rogue = s.open_session(&scoped(1, q, vec![]), tx);
        let first = enqueue_one(&s, item(10, "")).await;
        let second = enqueue_one(&s, item(10, "")).await;
        let (_, lease1) = assigned(&mut rx).await;
        let (_, lease2) = assigned(&mut rx).await;

        // A forged result for the victim's lease: not applied, and no credit for it.
        let forged = TaskResult {
            succeeded: true,
            error: "forged".into(),
            ..TaskResult::default()
        };
        assert!(!s.complete(rogue, &lease1, forged.clone()).await);
        s.reject(rogue, &lease2, "forged").await;
        s.progress(
            rogue,
            &lease1,
            TaskEvent {
                time_ms: 1,
                event: None,
            },
        );
        for name in [&first.name, &second.name] {
            assert_eq!(state_of(&s, name), (TaskState::InProgress, 1));
        }
        assert!(s.lock().tasks.get(&first.name).unwrap().history.is_empty());
        // Made-up leases (42 of them) raise no credit either: still the one slot it had.
        for i in 0..42 {
            let made_up = WireLease {
                lease_id: format!("{i:032x}"),
                ..lease1.clone()
            };
            assert!(!s.complete(rogue, &made_up, forged.clone()).await);
        }
        assert_eq!(credit_of(&s, rogue), 1);
        // Nor does a flood of Credit: a stream holds at most MAX_SLOTS.
        s.credit(rogue, u32::MAX);
        assert_eq!(credit_of(&s, rogue), MAX_SLOTS);

        // Its renewals do not keep the victim's lease: past the TTL the task is READY again
        // (the victim has no free slot for it), while the renewed one is still running.
        tokio::time::advance(TTL * 6 / 10).await;
        s.renew(rogue, std::slice::from_ref(&lease1));
        s.renew(victim, std::slice::from_ref(&lease2));
        tokio::time::advance(TTL * 6 / 10).await;
        until(|| state_of(&s, &first.name).0 == TaskState::Ready).await;
        assert_eq!(state_of(&s, &second.name), (TaskState::InProgress, 1));

        // A Hello outside the task's pipeline cannot reclaim the victim's lease.
        s.close_session(rogue);
        let (tx, _rx) = mpsc::unbounded_channel();
        let thief = s.open_session(&scoped(1, q, vec![lease2.clone()]), tx);
        assert!(!s.complete(thief, &lease2, forged).await);
        assert_eq!(state_of(&s, &second.name), (TaskState::InProgress, 1));

        // The holder's result counts, once, and gives its slot back once.
        let before = credit_of(&s, victim);
        assert!(s.complete(victim, &lease2, done()).await);
        assert!(!s.complete(victim, &lease2, done()).await);
        assert_eq!(state_of(&s, &second.name).0, TaskState::Done);
        assert_eq!(credit_of(&s, victim), before + 1);
        assert!(
            rogue_rx.try_recv().is_err(),
            "nothing of pipeline p was assigned to the stream serving q"
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_delivered_max_deliveries_times_ends_in_error() {
        let s = Scheduler::new(
            Options {
                max_deliveries: 2,
                ..options(100)
            },
            Journal::discard(),
            Contents::default(),
        );
        let cancel = start(&s).await;
        let task = enqueue_one(&s, item(10, "")).await;
        for attempt in 1..=2 {
            // A fresh agent each time: the last one's slot is still busy with the lost run.
            let (tx, mut rx) = mpsc::unbounded_channel();
            s.open_session(&hello(1, vec![]), tx);
            let (_, lease) = assigned(&mut rx).await;
            assert_eq!(lease.attempt, attempt);
            tokio::time::advance(TTL + Duration::from_millis(1)).await;
            until(|| state_of(&s, &task.name).0 != TaskState::InProgress).await;
        }
        let ended = s.get(&task.name).unwrap();
        assert_eq!(TaskState::try_from(ended.state), Ok(TaskState::Error));
        let error = ended.result.unwrap().error;
        assert!(error.contains("gave up after 2 deliveries"), "{error}");
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_keeps_a_lease_and_a_reconnecting_agent_reclaims_it() {
        let s = scheduler(100);
        let cancel = start(&s).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let session = s.open_session(&hello(1, vec![]), tx);
        let task = enqueue_one(&s, item(10, "")).await;
        let (_, lease) = assigned(&mut rx).await;

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
        assert!(s.complete(back, &lease, done()).await);
        assert_eq!(state_of(&s, &task.name).0, TaskState::Done);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn priority_then_fifo_idempotency_admission_and_cancel() {
        let s = scheduler(3);
        let cancel = start(&s).await;
        let results = s
            .enqueue(vec![
                item(10, "a"),
                item(5, ""),
                item(10, ""),
                item(10, "a"),
            ])
            .await;
        let names: Vec<String> = results
            .iter()
            .map(|r| r.as_ref().unwrap().name.clone())
            .collect();
        assert_eq!(
            names[3], names[0],
            "the same idempotency key returns the original task"
        );
        let refused = s.enqueue(vec![item(10, "")]).await.pop().unwrap();
        assert!(
            matches!(refused, Err(Error::ResourceExhausted { .. })),
            "{refused:?}"
        );
        assert_eq!(s.active_tasks(), 3, "a refusal touches nothing accepted");

        let (tx, mut rx) = mpsc::unbounded_channel();
        s.open_session(&hello(3, vec![]), tx);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(assigned(&mut rx).await.0.name);
        }
        assert_eq!(
            order,
            vec![names[1].clone(), names[0].clone(), names[2].clone()]
        );
        cancel.cancel();

        // Cancel of a READY task: it is never dispatched.
        let s = scheduler(10);
        let cancel = start(&s).await;
        let task = enqueue_one(&s, item(10, "")).await;
        let cancelled = s.cancel(&task.name).await.unwrap();
        assert_eq!(
            TaskState::try_from(cancelled.state),
            Ok(TaskState::Cancelled)
        );
        let later = enqueue_one(&s, item(10, "")).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        s.open_session(&hello(1, vec![]), tx);
        assert_eq!(
            assigned(&mut rx).await.0.name,
            later.name,
            "the cancelled task is skipped"
        );
        assert!(matches!(
            s.cancel(&task.name).await,
            Err(Error::FailedPrecondition(_))
        ));
        cancel.cancel();
    }

    fn from(client: &str) -> EnqueueTask {
        let mut it = item(10, "");
        it.task.as_mut().unwrap().client = client.into();
        it
    }

    #[tokio::test(start_paused = true)]
    async fn a_noisy_client_does_not_starve_a_quiet_one_and_quotas_are_per_client() {
        let mut o = options(1000);
        o.max_active_per_client = 60;
        let s = Scheduler::new(o, Journal::discard(), Contents::default());
        let cancel = start(&s).await;
        let noisy: Vec<EnqueueTask> = (0..60).map(|_| from("noisy")).collect();
        assert!(s.enqueue(noisy).await.iter().all(Result::is_ok));
        let over = s.enqueue(vec![from("noisy")]).await.pop().unwrap();
        assert!(
            matches!(over, Err(Error::ResourceExhausted { .. })),
            "{over:?}"
        );
        let quiet: Vec<Task> = s
            .enqueue((0..5).map(|_| from("quiet")).collect())
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();

        let (tx, mut rx) = mpsc::unbounded_channel();
        s.open_session(&hello(10, vec![]), tx);
        let mut first_ten = Vec::new();
        for _ in 0..10 {
            first_ten.push(assigned(&mut rx).await.0.client);
        }
        let quiet_served = first_ten.iter().filter(|c| *c == "quiet").count();
        assert_eq!(
            quiet_served, 5,
            "the quiet client's 5 tasks run among the first 10: {first_ten:?}"
        );
        assert_eq!(quiet.len(), 5);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_quota_counts_its_unfinished_tasks_on_the_shard() {
        let s = scheduler(100);
        let cancel = start(&s).await;
        let quota = |tenant: &str, max| EnqueueTask {
            task: Some(Task {
                pipeline: format!("tenants/{tenant}/applications/a/pipelines/p"),
                ..item(10, "").task.unwrap()
            }),
            tenant_max_queued_tasks: max,
            ..item(10, "")
        };
        let first = enqueue_one(&s, quota("t", 2)).await;
        enqueue_one(&s, quota("t", 2)).await;
        let refused = Status::from(
            s.enqueue(vec![quota("t", 2)])
                .await
                .pop()
                .unwrap()
                .unwrap_err(),
        );
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(refused.message().contains("tenant t"), "{refused:?}");
        // Another tenant is not held back.
        enqueue_one(&s, quota("u", 2)).await;
        // A finished task frees its place.
        s.cancel(&first.name).await.unwrap();
        enqueue_one(&s, quota("t", 2)).await;
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn finished_tasks_are_collected_after_retention() {
        let mut o = options(100);
        o.retention = Duration::from_secs(60);
        let s = Scheduler::new(o, Journal::discard(), Contents::default());
        let cancel = start(&s).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let session = s.open_session(&hello(1, vec![]), tx);
        let task = enqueue_one(&s, item(10, "key")).await;
        let (_, lease) = assigned(&mut rx).await;
        assert!(s.complete(session, &lease, done()).await);
        assert_eq!(
            enqueue_one(&s, item(10, "key")).await.name,
            task.name,
            "within retention"
        );

        tokio::time::advance(Duration::from_secs(61)).await;
        until(|| s.get(&task.name).is_err()).await;
        assert!(s.is_empty());
        let again = enqueue_one(&s, item(10, "key")).await;
        assert_ne!(again.name, task.name, "the key is forgotten with its task");
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_names_its_spec_by_id_once_the_shard_holds_it() {
        let s = scheduler(100);
        let with_spec = item(10, "");
        let id = crate::store::spec_id(with_spec.spec.as_ref().unwrap()).to_vec();
        let by_id = || {
            let mut it = item(10, "");
            it.spec = None;
            it.spec_id = id.clone();
            it
        };
        // Unknown id: refused as needing the spec, and nothing is held for it.
        let refused = s.enqueue(vec![by_id()]).await.pop().unwrap();
        assert!(matches!(refused, Err(Error::SpecNeeded(_))), "{refused:?}");
        assert_eq!((s.active_tasks(), s.len()), (0, 0));
        // A malformed id, or neither spec nor id, names the field.
        let mut bad = by_id();
        bad.spec_id = vec![1, 2, 3];
        let mut neither = by_id();
        neither.spec_id.clear();
        for (it, field) in [(bad, "spec_id"), (neither, "spec")] {
            match s.enqueue(vec![it]).await.pop().unwrap() {
                Err(Error::InvalidArgument(v)) => assert_eq!(v.field, field),
                other => panic!("{other:?}"),
            }
        }
        // Once a task brought the spec, the id alone is enough, and the task runs that spec.
        let results = s.enqueue(vec![with_spec.clone(), by_id()]).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let cancel = start(&s).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        s.open_session(&hello(2, vec![]), tx);
        for _ in 0..2 {
            let message = rx.recv().await.unwrap().unwrap();
            let Some(server_message::Message::Assign(a)) = message.message else {
                panic!("{message:?}")
            };
            assert_eq!(a.spec, with_spec.spec);
        }
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_restart_replays_the_disk_and_lets_agents_reclaim_their_leases() {
        let dir = tempfile::tempdir().unwrap();
        // The old journal thread lets go of the store's lock once its last writer is dropped.
        let open = || async {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match crate::open(options(100), Some(dir.path())) {
                    Ok(s) => return s,
                    Err(_) if std::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(e) => panic!("reopen: {e}"),
                }
            }
        };
        let s = open().await;
        let cancel = start(&s).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let session = s.open_session(&hello(2, vec![]), tx);
        let items = vec![item(10, ""), item(10, "k"), item(10, ""), item(10, "")];
        let tasks: Vec<Task> = s
            .enqueue(items)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let (_, finished) = assigned(&mut rx).await;
        let (_, running) = assigned(&mut rx).await;
        // The stream closes (so no slot comes back), then its result still lands.
        s.close_session(session);
        assert!(s.complete(session, &finished, done()).await);
        cancel.cancel();
        drop(s);

        let s = open().await;
        let cancel = start(&s).await;
        let state = |t: &Task| TaskState::try_from(s.get(&t.name).unwrap().state).unwrap();
        assert_eq!(state(&tasks[0]), TaskState::Done);
        assert_eq!(
            state(&tasks[1]),
            TaskState::InProgress,
            "leased before the restart"
        );
        assert_eq!(state(&tasks[2]), TaskState::Ready);
        assert_eq!(
            enqueue_one(&s, item(10, "k")).await.name,
            tasks[1].name,
            "idempotency survives"
        );
        // The agent comes back with its lease; the others are dispatched as before.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let back = s.open_session(&hello(2, vec![running.clone()]), tx);
        let next: Vec<String> = vec![
            assigned(&mut rx).await.0.name,
            assigned(&mut rx).await.0.name,
        ];
        assert_eq!(
            next,
            vec![tasks[2].name.clone(), tasks[3].name.clone()],
            "FIFO kept"
        );
        assert!(
            s.complete(back, &running, done()).await,
            "the reclaimed lease's result counts"
        );
        assert_eq!(state(&tasks[1]), TaskState::Done);
        cancel.cancel();
    }
}
