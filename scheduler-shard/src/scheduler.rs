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
use pm_proto::names::PipelineName;
use pm_proto::unix_ms;
use pm_proto::v1::{
    Assign, Cancel, Hello, JobResult, Lease as WireLease, PipelineSpec, ServerMessage, StateChange,
    StepResult, Task, TaskEvent, TaskResult, TaskState, server_message, task_event,
};

use crate::chunked::ChunkedSet;
use crate::error::Error;
use crate::journal::Journal;
use crate::key::TaskKey;
use crate::lease::{Lease, LeaseId, LeaseTable};
use crate::queue::{FairClock, Rank, ReadyQueue};
use crate::store::{Contents, Op, Record, SpecId, flow_of, spec_id, tenant_of_flow};
use crate::task::{self, Event};

mod dispatch;
mod finish;
mod finished;
mod record;
mod retention;
mod sessions;
mod stats;
mod submit;
mod task_map;
mod transfer;

use record::{HeldSpec, Next, Origin, TaskRecord, result_summary};
use task_map::{Slot, TaskMap};

pub use stats::{
    FINAL_STATES, PipelineCounts, PipelineQueue, PipelineStats, QueueStats, RECENT_SECONDS,
};
pub use submit::Submitted;
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
    /// Most finished tasks kept; past it the oldest are collected before their retention
    /// is over (each collector round, at most [`COLLECT_BATCH`] a round).
    pub max_finished_tasks: usize,
    /// Most finished tasks kept of one pipeline; past it its oldest are collected, so one
    /// busy pipeline cannot push the others' history out.
    pub max_finished_per_pipeline: usize,
    /// Benchmarks only: acknowledge without fsync (see [`crate::store::StoreOptions`]).
    pub unsafe_no_fsync: bool,
    /// The task store's memtable, MiB, for a data dir created with it
    /// ([`crate::store::StoreOptions`]).
    pub memtable_mib: u64,
    /// A group commit slower than this is logged as a warning
    /// ([`crate::store::StoreOptions::slow_commit`]).
    pub slow_commit: Duration,
    /// Watches (WatchTask streams) served at once; past it WatchTask answers
    /// RESOURCE_EXHAUSTED.
    pub max_watches: usize,
    /// At start, drop stored records that do not decode (each logged, and listed in a
    /// report file in the data directory) instead of refusing to start.
    pub salvage: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(30),
            max_active_tasks: 1_000_000,
            max_active_per_client: 250_000,
            max_deliveries: 10,
            retention: Duration::from_secs(24 * 3600),
            max_finished_tasks: 1_000_000,
            max_finished_per_pipeline: 100_000,
            unsafe_no_fsync: false,
            memtable_mib: 64,
            slow_commit: Duration::from_millis(100),
            max_watches: 10_000,
            salvage: false,
        }
    }
}

/// Messages to one agent stream. Unbounded because credit bounds the Assigns in flight and
/// the rest (Cancel, Drain) are rare.
pub type AgentTx = mpsc::UnboundedSender<Result<ServerMessage, Status>>;

/// Most tasks one agent stream may hold at once (its credit plus its unanswered leases).
pub const MAX_SLOTS: u32 = 4096;
/// Tasks dispatched per journal write, at most.
const DISPATCH_BATCH: usize = 1024;
/// Finished tasks collected per round, at most.
const COLLECT_BATCH: usize = 10_000;
/// Events kept per running task for late watchers.
const HISTORY_LIMIT: usize = 1024;
/// Events buffered per watched task for a watcher that reads slowly; one that falls further
/// behind is ended with RESOURCE_EXHAUSTED (a new watch starts from a snapshot).
pub const WATCH_BUFFER: usize = 128;

struct Session {
    agent_id: String,
    /// `None` serves every pipeline.
    pipelines: Option<BTreeSet<String>>,
    /// The partitions of its pipeline it was opened for (Hello.partitions; empty: 0). It
    /// takes any task of its pipelines held here; these say which ring keys it goes with.
    partitions: Vec<u32>,
    /// Hello.explicit_credit: only Credit messages add slots, not answers.
    explicit_credit: bool,
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

struct Inner {
    tasks: TaskMap,
    /// Tasks per pipeline, ordered by id (ids are time-ordered UUIDv7), so each set grows at
    /// its edge: [`ChunkedSet`]s, full where std's B-tree leaves half of each node empty.
    by_pipeline: HashMap<Arc<str>, ChunkedSet<TaskKey>>,
    /// Tasks held per partition > 0 of a partitioned pipeline (the rest of `by_pipeline` is
    /// partition 0): which ring keys this shard holds, without a scan.
    by_partition: HashMap<Arc<str>, BTreeMap<u32, usize>>,
    /// (pipeline, idempotency key) -> task, for durable tasks.
    idempotency: HashMap<(Arc<str>, String), TaskKey>,
    /// Keys whose first submit is being written.
    idempotency_pending: HashSet<(Arc<str>, String)>,
    specs: HashMap<SpecId, Arc<HeldSpec>>,
    /// The shared (pipeline, flow, spec) of tasks ([`Inner::origin`]); one no task holds is
    /// forgotten with the unused specs ([`Scheduler::collect_specs`]), so there are never
    /// more than the tasks held, plus those collected since the last collection.
    origins: HashMap<(Arc<str>, Arc<str>, SpecId), Arc<Origin>>,
    /// The origin [`Inner::origin`] gave last.
    last_origin: Option<Arc<Origin>>,
    /// Specs known to be on disk; others are written with the task that brings them.
    durable_specs: HashSet<SpecId>,
    queue: ReadyQueue,
    fair: FairClock,
    leases: LeaseTable,
    sessions: BTreeMap<u64, Session>,
    /// The sessions naming each pipeline, and those serving every pipeline: a dispatch round
    /// looks only at sessions that could take a READY task, so agents idle on other pipelines
    /// cost it nothing. Kept by [`Inner::add_session`] and [`Inner::remove_session`].
    sessions_by_pipeline: HashMap<String, BTreeSet<u64>>,
    sessions_for_all: BTreeSet<u64>,
    /// Finished tasks by pipeline and when they finished, for retention.
    finished: finished::Finished,
    next_seq: u64,
    next_session: u64,
    /// READY + IN_PROGRESS tasks (and submits being written), in all and per flow.
    active: usize,
    active_by_flow: HashMap<Arc<str>, usize>,
    /// Unfinished tasks per tenant (the tenant is the flow's first segment).
    active_by_tenant: HashMap<Arc<str>, usize>,
    /// Pipeline and flow names (see [`Inner::intern`]).
    interned: HashSet<Arc<str>>,
    /// Submits and final states per pipeline, for metrics ([`stats`]).
    counts: HashMap<Arc<str>, PipelineCounts>,
    /// Final states per pipeline over the last minute ([`stats`]).
    recent: HashMap<Arc<str>, stats::RecentFinishes>,
    /// Finished tasks keep only their result's summary in memory, the whole result being on
    /// disk (false for a journal that keeps nothing: then memory is all there is).
    results_on_disk: bool,
}

impl Inner {
    fn add_session(&mut self, id: u64, session: Session) {
        match &session.pipelines {
            None => {
                self.sessions_for_all.insert(id);
            }
            Some(pipelines) => {
                for p in pipelines {
                    self.sessions_by_pipeline
                        .entry(p.clone())
                        .or_default()
                        .insert(id);
                }
            }
        }
        self.sessions.insert(id, session);
    }

    fn remove_session(&mut self, id: u64) -> Option<Session> {
        let session = self.sessions.remove(&id)?;
        match &session.pipelines {
            None => {
                self.sessions_for_all.remove(&id);
            }
            Some(pipelines) => {
                for p in pipelines {
                    if let Some(ids) = self.sessions_by_pipeline.get_mut(p) {
                        ids.remove(&id);
                        if ids.is_empty() {
                            self.sessions_by_pipeline.remove(p);
                        }
                    }
                }
            }
        }
        Some(session)
    }

    /// Sessions with credit that serve a pipeline with READY tasks, in session order:
    /// O(pipelines with READY tasks + their sessions), not O(every session).
    fn dispatch_candidates(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.sessions_for_all.iter().copied().collect();
        for pipeline in self.queue.pipelines() {
            if let Some(serving) = self.sessions_by_pipeline.get(&**pipeline) {
                ids.extend(serving);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids.retain(|id| self.sessions.get(id).is_some_and(|s| s.credit > 0));
        ids
    }
    /// The name and trace id of a task, for a log line about it (empty if it is gone).
    fn about(&self, key: TaskKey) -> (String, String) {
        self.tasks
            .get(key)
            .map(|r| r.about(key))
            .unwrap_or_else(|| (key.to_string(), String::new()))
    }

    /// [`Inner::about`] the task a lease holds.
    fn about_leased(&self, lease: &LeaseId) -> (String, String) {
        match self.leases.get(lease) {
            Some(l) => self.about(l.task),
            None => (String::new(), String::new()),
        }
    }

    fn reserve(&mut self, flow: &Arc<str>) {
        self.active += 1;
        match self.active_by_flow.get_mut(flow) {
            Some(n) => *n += 1,
            None => {
                self.active_by_flow.insert(flow.clone(), 1);
            }
        }
        let tenant = tenant_of_flow(flow);
        match self.active_by_tenant.get_mut(tenant) {
            Some(n) => *n += 1,
            None => {
                let tenant = self.intern(tenant);
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
    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.interned.get(name) {
            return shared.clone();
        }
        let shared: Arc<str> = name.into();
        self.interned.insert(shared.clone());
        shared
    }

    /// The shared entry of a spec, added if new.
    fn hold_spec(&mut self, id: SpecId, spec: Arc<PipelineSpec>) -> Arc<HeldSpec> {
        self.specs
            .entry(id)
            .or_insert_with(|| Arc::new(HeldSpec { id, spec }))
            .clone()
    }

    /// The one shared [`Origin`] of tasks of `pipeline` and `flow` (both interned) running
    /// `spec`.
    fn origin(
        &mut self,
        pipeline: &Arc<str>,
        flow: &Arc<str>,
        spec: &Arc<HeldSpec>,
    ) -> Arc<Origin> {
        // A batch, or a client's stream of submits, has one origin: no hashing of its names.
        if let Some(last) = &self.last_origin
            && Arc::ptr_eq(&last.pipeline, pipeline)
            && Arc::ptr_eq(&last.flow, flow)
            && Arc::ptr_eq(&last.spec, spec)
        {
            return last.clone();
        }
        let origin = self
            .origins
            .entry((pipeline.clone(), flow.clone(), spec.id))
            .or_insert_with(|| {
                Arc::new(Origin {
                    pipeline: pipeline.clone(),
                    flow: flow.clone(),
                    spec: spec.clone(),
                })
            })
            .clone();
        self.last_origin = Some(origin.clone());
        origin
    }

    /// [`Inner::intern`] of a shared name, in place: kept as the one copy when it is the
    /// first, untouched when it is the one copy already (a restart moves a million names
    /// shared with the store's reader thread without touching their counts).
    fn intern_shared(&mut self, name: &mut Arc<str>) {
        match self.interned.get(&**name) {
            Some(shared) if Arc::ptr_eq(shared, name) => {}
            Some(shared) => *name = shared.clone(),
            None => {
                self.interned.insert(name.clone());
            }
        }
    }

    /// More slots for `session`, never past [`MAX_SLOTS`] with the leases it holds.
    fn credit(&mut self, session: u64, slots: u32) {
        if let Some(s) = self.sessions.get_mut(&session) {
            let room = MAX_SLOTS.saturating_sub(s.held.len() as u32);
            s.credit = s.credit.saturating_add(slots).min(room);
        }
    }

    /// Indexes a task from the disk (recovery) or from a handoff, and queues it. A leased
    /// task keeps its lease for `lease_left`, held by no stream until its agent reclaims it.
    fn restore(&mut self, r: Record, lease_left: Duration, now: Instant) -> Restored {
        let (restored, unfinished) = self.index_restored(r, lease_left, now);
        if let Some((_, slot, key)) = unfinished {
            self.rank_restored(slot, key);
        }
        restored
    }

    /// [`Inner::restore`] without the part that depends on arrival order: the fair-share
    /// tag and the ready queue ([`Inner::rank_restored`]). Returns the (seq, slot, key) of an
    /// unfinished task, to be ranked in seq order.
    fn index_restored(
        &mut self,
        r: Record,
        lease_left: Duration,
        now: Instant,
    ) -> (Restored, Option<(u64, Slot, TaskKey)>) {
        let Some(spec) = self.specs.get(&r.spec_id).cloned() else {
            tracing::error!(task = %r.name(), "the spec of a stored task is missing; task skipped");
            return (Restored::Lost, None);
        };
        let mut r = r;
        self.intern_shared(&mut r.pipeline);
        self.intern_shared(&mut r.flow);
        self.next_seq = self.next_seq.max(r.seq);
        let (key, seq) = (r.key, r.seq);
        let lease_id = r.lease_id.take();
        let origin = self.origin(&r.pipeline, &r.flow, &spec);
        let mut record = TaskRecord::from_disk(r, origin);
        let restored = match record.state {
            TaskState::Ready => {
                self.reserve(record.flow());
                Restored::Ready
            }
            TaskState::InProgress => {
                self.reserve(record.flow());
                let id = LeaseId(lease_id.unwrap_or_else(|| "".into()));
                let lease = Lease {
                    task: key,
                    attempt: record.attempt,
                    session: 0,
                    deadline: now + lease_left,
                };
                self.leases.insert(id.clone(), lease);
                record.lease = Some(id);
                Restored::Leased
            }
            _ => {
                let age = (unix_ms() - record.update_time_ms).max(0) as u64;
                let finished_at = now.checked_sub(Duration::from_millis(age)).unwrap_or(now);
                self.finished.insert(record.pipeline(), finished_at, key);
                if self.results_on_disk {
                    record.keep_summary();
                }
                Restored::Finished
            }
        };
        // Not queued yet: its rank is not known until every earlier task has its tag.
        let unfinished = !task::is_final(record.state);
        let slot = self.index(key, record);
        (restored, unfinished.then_some((seq, slot, key)))
    }

    /// Gives a restored, unfinished task its fair-share tag and queues it if READY. Called in
    /// seq order, so each flow's tasks keep their order. Found by slot, not key: a restart
    /// ranks a million tasks, mostly in the order they were put in the slab.
    fn rank_restored(&mut self, slot: Slot, key: TaskKey) {
        let Some(record) = self.tasks.at_mut(slot) else {
            return;
        };
        record.rank.tag = self.fair.tag(record.flow());
        if record.state == TaskState::Ready {
            self.queue.push(record.pipeline(), record.rank, key);
        }
    }

    /// Removes a task from every index; its disk record is untouched.
    fn unindex(&mut self, key: TaskKey) -> Option<TaskRecord> {
        let record = self.tasks.remove(key)?;
        let mut indexed = false;
        if let Some(keys) = self.by_pipeline.get_mut(record.pipeline()) {
            indexed = keys.remove(&key);
            if keys.is_empty() {
                self.by_pipeline.remove(record.pipeline());
            }
        }
        let partition = key.partition();
        if indexed
            && partition > 0
            && let Some(counts) = self.by_partition.get_mut(record.pipeline())
        {
            if let Some(n) = counts.get_mut(&partition) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&partition);
                }
            }
            if counts.is_empty() {
                self.by_partition.remove(record.pipeline());
            }
        }
        if record.keyed {
            self.idempotency
                .remove(&(record.pipeline().clone(), record.idempotency_key()));
        }
        Some(record)
    }

    /// Indexes a durable record; READY ones join the queue.
    fn insert(&mut self, key: TaskKey, record: TaskRecord) {
        if record.state == TaskState::Ready {
            self.queue.push(record.pipeline(), record.rank, key);
        }
        self.index(key, record);
    }

    /// [`Inner::insert`] without the queue.
    fn index(&mut self, key: TaskKey, record: TaskRecord) -> Slot {
        if record.keyed {
            let idempotency = (record.pipeline().clone(), record.idempotency_key());
            self.idempotency.insert(idempotency, key);
        }
        let partition = key.partition();
        if self
            .by_pipeline
            .entry(record.pipeline().clone())
            .or_default()
            .insert(key)
            && partition > 0
        {
            *self
                .by_partition
                .entry(record.pipeline().clone())
                .or_default()
                .entry(partition)
                .or_default() += 1;
        }
        self.tasks.insert(key, record)
    }

    /// The key of the task `name` names, if this shard holds it.
    fn find(&self, name: &str) -> Result<TaskKey, Error> {
        TaskKey::parse_name(name)
            .filter(|(pipeline, key)| {
                self.tasks
                    .get(*key)
                    .is_some_and(|r| &**r.pipeline() == *pipeline)
            })
            .map(|(_, key)| key)
            .ok_or_else(|| Error::NotFound(name.to_owned()))
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
    metrics: crate::metrics::SchedulerMetrics,
}

/// What a watcher gets: the task now, what its current attempt did so far, and its future
/// events unless it already finished.
pub struct Watch {
    pub snapshot: Task,
    pub history: Vec<Arc<TaskEvent>>,
    pub events: Option<broadcast::Receiver<Arc<TaskEvent>>>,
}

/// Most bytes of the tasks of one ListTasks page (under the 4 MiB message limit); a page
/// that would pass it ends early, with a `next_page_token`.
pub const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// `task` as a list shows it: its result's summary, without its steps' stdout and stderr and
/// its output data (GetTask and WatchTask have them), so a page of finished tasks stays small
/// whatever they printed.
fn summary(mut task: Task) -> Task {
    if let Some(result) = &mut task.result {
        *result = result_summary(result);
    }
    task
}

fn wire_lease(id: &LeaseId, task: String, attempt: u32, deadline: Instant) -> WireLease {
    let left = deadline.saturating_duration_since(Instant::now());
    WireLease {
        task,
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
    key: TaskKey,
    next: Next,
    reason: String,
    /// The lease it had, restored (expiring soon) if the write fails.
    lease: Option<(LeaseId, Lease)>,
}

impl Scheduler {
    /// A scheduler over what `contents` holds (the disk, read at start), writing through
    /// `journal`. Leased tasks from before a restart keep their leases for one TTL, so
    /// reconnecting agents reclaim them; unclaimed ones are then delivered again.
    pub fn new(options: Options, journal: Journal, contents: Contents) -> Arc<Self> {
        let len = contents.tasks.len();
        Self::recover(options, journal, contents.specs, contents.tasks, len)
    }

    /// [`Scheduler::new`] over tasks as they are read (about `len` of them), so a restart
    /// indexes them while the store is still reading.
    pub fn recover(
        options: Options,
        journal: Journal,
        specs: HashMap<SpecId, PipelineSpec>,
        tasks: impl IntoIterator<Item = Record>,
        len: usize,
    ) -> Arc<Self> {
        let started = std::time::Instant::now();
        let mut inner = Inner {
            tasks: TaskMap::with_capacity(len),
            by_pipeline: HashMap::new(),
            by_partition: HashMap::new(),
            idempotency: HashMap::new(),
            idempotency_pending: HashSet::new(),
            specs: HashMap::new(),
            origins: HashMap::new(),
            last_origin: None,
            durable_specs: HashSet::new(),
            queue: ReadyQueue::default(),
            fair: FairClock::default(),
            leases: LeaseTable::default(),
            sessions: BTreeMap::new(),
            sessions_by_pipeline: HashMap::new(),
            sessions_for_all: BTreeSet::new(),
            finished: Default::default(),
            next_seq: 0,
            next_session: 0,
            active: 0,
            active_by_flow: HashMap::new(),
            active_by_tenant: HashMap::new(),
            interned: HashSet::new(),
            counts: HashMap::new(),
            recent: HashMap::new(),
            results_on_disk: journal.keeps_records(),
        };
        for (id, spec) in specs {
            inner.durable_specs.insert(id);
            inner.hold_spec(id, Arc::new(spec));
        }
        let (mut ready, mut leased, mut lost) = (0usize, 0usize, 0usize);
        let now = Instant::now();
        let mut unfinished = Vec::with_capacity(len);
        for r in tasks {
            let (restored, pending) = inner.index_restored(r, options.lease_ttl, now);
            match restored {
                Restored::Ready => ready += 1,
                Restored::Leased => leased += 1,
                Restored::Finished => {}
                Restored::Lost => lost += 1,
            }
            unfinished.extend(pending);
        }
        let indexed = started.elapsed();
        // Tags and queue places in arrival order (records come in name order).
        unfinished.sort_unstable();
        for (_, slot, key) in unfinished {
            inner.rank_restored(slot, key);
        }
        let total = inner.tasks.len();
        if total > 0 || lost > 0 {
            tracing::info!(
                tasks = total,
                ready,
                leased,
                lost,
                indexed_ms = indexed.as_millis() as u64,
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
            metrics: crate::metrics::SchedulerMetrics::new(),
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

    /// [`Scheduler::write`] for a write nobody is blocked on (a result: its slot was given
    /// back at once), whose sync may wait up to [`crate::journal::SOON`] to be shared.
    async fn write_soon(&self, ops: Vec<Op>) -> Result<(), Error> {
        self.journal.write_soon(ops).await.map_err(storage_error)
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
        let record = {
            let inner = self.lock();
            let key = inner.find(name)?;
            inner.tasks.get(key).expect("found").disk(key)
        };
        // Decoded (and a finished task's result read) here, not under the lock.
        self.whole(record)
    }

    /// The task `record` is, with its whole result: a finished task holds only its result's
    /// summary in memory, so the rest is read from the disk. A task collected meanwhile
    /// (retention) is NOT_FOUND; a store that cannot be read is UNAVAILABLE.
    fn whole(&self, mut record: Record) -> Result<Task, Error> {
        if self.journal.keeps_records() && record.result.is_some() {
            let stored = self
                .journal
                .read_result(&record.pipeline, record.key)
                .map_err(storage_error)?;
            let Some(result) = stored else {
                return Err(Error::NotFound(record.name()));
            };
            record.result = Some(Arc::new(result));
        }
        Ok(record.to_task())
    }

    pub fn watch(&self, name: &str) -> Result<Watch, Error> {
        let (snapshot, history, events) = {
            let mut inner = self.lock();
            let key = inner.find(name)?;
            let record = inner.tasks.get_mut(key).expect("found");
            let events = (!task::is_final(record.state)).then(|| {
                record
                    .live
                    .get_or_insert_with(Box::default)
                    .watchers
                    .get_or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
                    .subscribe()
            });
            let history = record
                .live
                .as_ref()
                .map(|l| l.history.clone())
                .unwrap_or_default();
            (record.disk(key), history, events)
        };
        Ok(Watch {
            snapshot: self.whole(snapshot)?,
            history,
            events,
        })
    }

    /// A page of `pipeline`'s tasks (of `partitions` only, unless empty), newest first;
    /// `page_token` is the id of the last task of the page before. Ids are in time order
    /// whatever their partition, so the token of a merged list works on every shard.
    pub fn list(
        &self,
        pipeline: &str,
        partitions: &[u32],
        state: TaskState,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<Task>, String), Error> {
        let below =
            if page_token.is_empty() {
                None
            } else {
                Some(TaskKey::parse_id(page_token).ok_or_else(|| {
                    Error::invalid("page_token", "not a token this list returned")
                })?)
            };
        let inner = self.lock();
        let Some(keys) = inner.by_pipeline.get(pipeline) else {
            return Ok((Vec::new(), String::new()));
        };
        let mut page: Vec<Record> = Vec::with_capacity(page_size);
        let mut more = false;
        for &key in keys.rev_below(below) {
            if !partitions.is_empty() && !partitions.contains(&key.partition()) {
                continue;
            }
            let record = inner.tasks.get(key).expect("indexed tasks exist");
            if state != TaskState::Unspecified && record.state != state {
                continue;
            }
            if page.len() == page_size {
                more = true;
                break;
            }
            page.push(record.disk(key));
        }
        drop(inner);
        // Decoded here, not under the lock; summaries, cut where the page's bytes run out.
        let mut tasks = Vec::with_capacity(page.len());
        let mut bytes = 0;
        for record in &page {
            let task = summary(record.to_task());
            bytes += task.encoded_len();
            if bytes > MAX_PAGE_BYTES && !tasks.is_empty() {
                more = true;
                break;
            }
            tasks.push(task);
        }
        // The last id shown: the next page starts below it.
        let next = match (more, tasks.last()) {
            (true, Some(last)) => last.id.clone(),
            _ => String::new(),
        };
        Ok((tasks, next))
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
            partition: 0,
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
            ..Options::default()
        }
    }

    /// Opens the store in `dir`, retrying while an earlier scheduler's journal thread still
    /// holds its lock (it lets go once its last writer is dropped); an error that names
    /// `--salvage` is the store's own answer and comes back at once.
    async fn reopen(
        options: Options,
        dir: &std::path::Path,
    ) -> Result<Arc<Scheduler>, crate::store::StoreError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match crate::open(options.clone(), Some(dir)) {
                Err(e) if !e.0.contains("--salvage") && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => return other,
            }
        }
    }

    /// A scheduler whose writes succeed at once (logic on a paused clock).
    fn scheduler(max_active_tasks: usize) -> Arc<Scheduler> {
        scheduler_with(options(max_active_tasks))
    }

    /// The same with `options`.
    fn scheduler_with(options: Options) -> Arc<Scheduler> {
        Scheduler::new(options, Journal::discard(), Contents::default())
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
    async fn pipeline_stats_follow_the_queue_the_leases_and_the_agents() {
        let s = scheduler(100);
        let cancel = start(&s).await;
        let pipeline = "tenants/t/applications/a/pipelines/p";
        assert_eq!(s.pipeline_queue(pipeline), PipelineQueue::default());
        for _ in 0..3 {
            enqueue_one(&s, item(10, "")).await;
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let session = s.open_session(&hello(2, vec![]), tx);
        let (_, lease) = assigned(&mut rx).await;
        assigned(&mut rx).await;
        let q = s.pipeline_queue(pipeline);
        assert_eq!(
            (q.ready, q.in_progress, q.agents, q.free_slots),
            (1, 2, 1, 0)
        );
        assert_eq!(q.finished_recently, [0, 0, 0]);
        // The head's wait is wall-clock time since it became READY (which the paused clock
        // does not move): let some pass.
        std::thread::sleep(Duration::from_millis(20));
        let q = s.pipeline_queue(pipeline);
        assert!(q.head_wait_ms >= 20, "head waited {} ms", q.head_wait_ms);

        assert!(s.complete(session, &lease, done()).await);
        let q = s.pipeline_queue(pipeline);
        assert_eq!(q.finished_recently, [1, 0, 0]);
        let all = s.queue_stats();
        let p = &all.pipelines[0];
        assert_eq!(
            (&*p.pipeline, p.counts.submitted, p.counts.finished),
            (pipeline, 3, [1, 0, 0])
        );
        // The freed slot took the last READY task.
        until(|| s.pipeline_queue(pipeline).ready == 0).await;
        assert_eq!(s.pipeline_queue(pipeline).in_progress, 2);
        // The agent serves every pipeline: it counts for one with no tasks too.
        let other = s.pipeline_queue("tenants/t/applications/a/pipelines/other");
        assert_eq!((other.ready, other.in_progress, other.agents), (0, 0, 1));
        cancel.cancel();
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

    /// A stream on explicit credit (a gateway's fan-in) gets a slot back only by Credit:
    /// its answers free nothing, so the gateway can give the slot to another owner.
    #[tokio::test(start_paused = true)]
    async fn on_explicit_credit_an_answer_gives_no_slot_back() {
        let s = scheduler(100);
        let cancel = start(&s).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let explicit = Hello {
            explicit_credit: true,
            ..hello(0, vec![])
        };
        let session = s.open_session(&explicit, tx);
        assert_eq!(credit_of(&s, session), 0);
        s.credit(session, 2);
        enqueue_one(&s, item(10, "")).await;
        enqueue_one(&s, item(10, "")).await;
        let (_, first) = assigned(&mut rx).await;
        let (_, second) = assigned(&mut rx).await;
        assert_eq!(credit_of(&s, session), 0);
        assert!(s.complete(session, &first, done()).await);
        s.reject(session, &second, "not here").await;
        assert_eq!(credit_of(&s, session), 0, "no slot back by answers");
        s.credit(session, 1);
        // The slot takes the rejected task, READY again, at once: on the caller's task,
        // before the dispatcher loop has had a turn (nothing here yielded to it).
        let again = match rx.try_recv() {
            Ok(Ok(ServerMessage {
                message: Some(server_message::Message::Assign(a)),
            })) => a.task.unwrap(),
            other => panic!("no Assign at the Credit: {other:?}"),
        };
        assert_eq!(again.name, second.task);
        assert_eq!(credit_of(&s, session), 0);
        cancel.cancel();
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
        let first_key = TaskKey::parse_id(&first.id).unwrap();
        assert!(s.lock().tasks.get(first_key).unwrap().live.is_none());
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

        // The holder's result counts, once, and gives its slot back once: `first`, READY
        // again, takes it at once, and the repeat gives back no other.
        let before = credit_of(&s, victim);
        assert!(s.complete(victim, &lease2, done()).await);
        assert!(!s.complete(victim, &lease2, done()).await);
        assert_eq!(state_of(&s, &second.name).0, TaskState::Done);
        let (again, _) = assigned(&mut rx).await;
        assert_eq!(again.name, first.name);
        assert_eq!(credit_of(&s, victim), before);
        assert!(
            rogue_rx.try_recv().is_err(),
            "nothing of pipeline p was assigned to the stream serving q"
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_delivered_max_deliveries_times_ends_in_error() {
        let s = scheduler_with(Options {
            max_deliveries: 2,
            ..options(100)
        });
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

    /// When the journal fails (a full disk), nothing a client was told changes: a submit is
    /// refused and leaves no task or count behind, a result that was not written lets the
    /// task run again, and a cancel that was not written leaves the task queued.
    #[tokio::test(start_paused = true)]
    async fn changes_whose_writes_fail_are_undone() {
        let s = scheduler(100);
        let cancel = start(&s).await;
        let journal = s.journal().clone();

        // A submit: refused, retryable, nothing left behind (not even its idempotency key).
        journal.fail_writes(true);
        let refused = s.enqueue(vec![item(10, "k")]).await.pop().unwrap();
        assert!(matches!(refused, Err(Error::Unavailable(_))), "{refused:?}");
        assert_eq!((s.len(), s.active_tasks()), (0, 0));
        journal.fail_writes(false);
        let task = enqueue_one(&s, item(10, "k")).await;
        assert_eq!(s.active_tasks(), 1);

        // A result: not applied; the lease comes back expiring at once, so once the disk
        // takes writes again the task is delivered again and its next result counts.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let session = s.open_session(&hello(1, vec![]), tx);
        let (_, lease) = assigned(&mut rx).await;
        journal.fail_writes(true);
        assert!(!s.complete(session, &lease, done()).await);
        assert_eq!(state_of(&s, &task.name), (TaskState::InProgress, 1));
        journal.fail_writes(false);
        let (_, again) = assigned(&mut rx).await;
        assert_eq!(again.attempt, 2);
        assert!(s.complete(session, &again, done()).await);
        assert_eq!(state_of(&s, &task.name), (TaskState::Done, 2));
        assert_eq!(s.active_tasks(), 0);

        // A cancel: refused; the task stays queued and is dispatched once writes succeed.
        let queued = enqueue_one(&s, item(10, "")).await;
        let (tx, mut idle) = mpsc::unbounded_channel();
        let waiting = s.open_session(&hello(0, vec![]), tx);
        journal.fail_writes(true);
        let refused = s.cancel(&queued.name).await;
        assert!(
            matches!(refused, Err(Error::Unavailable(_))),
            "{:?}",
            refused.err()
        );
        assert_eq!(state_of(&s, &queued.name), (TaskState::Ready, 0));
        journal.fail_writes(false);
        s.credit(waiting, 1);
        let (assigned_task, queued_lease) = assigned(&mut idle).await;
        assert_eq!(assigned_task.name, queued.name);
        assert!(s.complete(waiting, &queued_lease, done()).await);

        // A requeue (its lease ran out) that is not written: tried again a second later. The
        // streams above go, so the task can only go to the next one.
        s.close_session(session);
        s.close_session(waiting);
        let expiring = enqueue_one(&s, item(10, "")).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        s.open_session(&hello(1, vec![]), tx);
        let (leased, _) = assigned(&mut rx).await;
        assert_eq!(leased.name, expiring.name);
        journal.fail_writes(true);
        tokio::time::advance(TTL + Duration::from_millis(1)).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(state_of(&s, &expiring.name), (TaskState::InProgress, 1));
        journal.fail_writes(false);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        s.open_session(&hello(1, vec![]), tx);
        let (redelivered, lease) = assigned(&mut rx).await;
        assert_eq!((redelivered.name, lease.attempt), (expiring.name, 2));
        cancel.cancel();
    }

    /// Tasks as a restart reads them: in name order, which is not their arrival order
    /// across pipelines. Fair-share tags go by arrival, so one client's tasks of two
    /// pipelines are dispatched in the order they came.
    #[tokio::test(start_paused = true)]
    async fn a_restart_ranks_tasks_in_arrival_order_across_pipelines() {
        let spec = item(10, "").spec.unwrap();
        let spec_key = spec_id(&spec);
        let record = |pipeline: &str, seq: u64| {
            let name = TaskKey(0x0193_0000_0000_7000_8000_0000_0000_0000 + seq as u128)
                .name(&format!("tenants/t/applications/a/pipelines/{pipeline}"));
            Record::from_stored(pm_proto::internal::v1::StoredTask {
                task: Some(Task {
                    name,
                    state: TaskState::Ready as i32,
                    priority: 10,
                    client: "c".into(),
                    ..Task::default()
                }),
                spec_id: spec_key.to_vec(),
                client_priority: 10,
                seq,
                lease_id: String::new(),
            })
            .unwrap()
        };
        // Pipeline p's tasks arrived 2nd, 4th and 6th; q's 1st, 3rd and 5th.
        let tasks = vec![
            record("p", 2),
            record("p", 4),
            record("p", 6),
            record("q", 1),
            record("q", 3),
            record("q", 5),
        ];
        let contents = Contents {
            tasks,
            specs: [(spec_key, spec)].into(),
        };
        let s = Scheduler::new(options(100), Journal::discard(), contents);
        let cancel = start(&s).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        s.open_session(&hello(6, vec![]), tx);
        let mut order = Vec::new();
        for _ in 0..6 {
            let (task, _) = assigned(&mut rx).await;
            order.push(TaskKey::parse_id(&task.id).unwrap().0 as u64 & 0xff);
        }
        assert_eq!(order, [1, 2, 3, 4, 5, 6]);
        cancel.cancel();
    }

    /// A name is accepted whole: the right id under another pipeline is not the task, and a
    /// list token that is not an id is refused by field.
    #[tokio::test(start_paused = true)]
    async fn names_and_page_tokens_are_checked_whole() {
        let s = scheduler(100);
        let task = enqueue_one(&s, item(10, "")).await;
        assert_eq!(s.get(&task.name).unwrap().name, task.name);
        let elsewhere = format!("tenants/t/applications/a/pipelines/other/tasks/{}", task.id);
        assert!(matches!(s.get(&elsewhere), Err(Error::NotFound(_))));
        assert!(matches!(
            s.cancel(&elsewhere).await,
            Err(Error::NotFound(_))
        ));
        let made_up = format!("{}/tasks/not-an-id", task.pipeline);
        assert!(matches!(s.watch(&made_up), Err(Error::NotFound(_))));
        let listed = s.list(&task.pipeline, &[], TaskState::Unspecified, 10, "");
        assert_eq!(listed.unwrap().0.len(), 1);
        let refused = s.list(&task.pipeline, &[], TaskState::Unspecified, 10, "zz");
        assert!(
            matches!(&refused, Err(Error::InvalidArgument(v)) if v.field == "page_token"),
            "{:?}",
            refused.err()
        );
    }

    /// A list page shows tasks without their output and ends early rather than pass its
    /// byte budget; following the tokens still shows every task once, newest first.
    #[tokio::test(start_paused = true)]
    async fn list_pages_are_summaries_within_a_byte_budget() {
        let s = scheduler(100);
        let cancel = start(&s).await;
        let mib = "x".repeat(1024 * 1024);
        let mut names = Vec::new();
        for _ in 0..8 {
            let mut big = item(10, "");
            let task = big.task.as_mut().unwrap();
            task.params.insert("p".into(), mib.clone());
            names.push(enqueue_one(&s, big).await.name);
        }
        // One finishes, having printed a MiB.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let agent = s.open_session(&hello(1, vec![]), tx);
        let (ran, lease) = assigned(&mut rx).await;
        let printed = TaskResult {
            succeeded: true,
            jobs: vec![pm_proto::v1::JobResult {
                steps: vec![pm_proto::v1::StepResult {
                    stdout: mib.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..TaskResult::default()
        };
        assert!(s.complete(agent, &lease, printed).await);
        let got = s.get(&ran.name).unwrap();
        assert_eq!(got.result.unwrap().jobs[0].steps[0].stdout.len(), mib.len());

        let mut listed = Vec::new();
        let mut token = String::new();
        for _ in 0..8 {
            let (page, next) = s
                .list(&ran.pipeline, &[], TaskState::Unspecified, 100, &token)
                .unwrap();
            let bytes: usize = page.iter().map(Message::encoded_len).sum();
            assert!(bytes <= MAX_PAGE_BYTES, "a page of {bytes} bytes");
            for task in &page {
                let mut steps = task
                    .result
                    .iter()
                    .flat_map(|r| &r.jobs)
                    .flat_map(|j| &j.steps);
                assert!(steps.all(|s| s.stdout.is_empty()), "no output in a list");
                if task.name == ran.name {
                    let result = task.result.as_ref().expect("a summary keeps the result");
                    assert!(result.succeeded && result.jobs[0].steps.len() == 1);
                }
                listed.push(task.name.clone());
            }
            if next.is_empty() {
                break;
            }
            token = next;
        }
        names.reverse();
        assert_eq!(listed, names, "every task once, newest first");
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_finished_task_keeps_a_summary_in_memory_and_its_output_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let open = || async { reopen(options(100), dir).await.expect("reopen") };
        let mib = "x".repeat(1024 * 1024);
        let printed = TaskResult {
            succeeded: true,
            jobs: vec![JobResult {
                job: "j".into(),
                steps: vec![StepResult {
                    command: "print".into(),
                    stdout: mib.clone(),
                    stderr: "warned".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            output: Some(prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(3.0)),
            }),
            ..TaskResult::default()
        };
        let whole = |t: &Task| {
            let result = t.result.as_ref().expect("a result");
            let step = &result.jobs[0].steps[0];
            step.stdout.len() == mib.len() && step.stderr == "warned" && result.output.is_some()
        };
        // What memory holds: the summary (the command and how it ended), nothing printed.
        let held = |s: &Scheduler, name: &str| {
            let (_, key) = TaskKey::parse_name(name).unwrap();
            let inner = s.lock();
            let result = inner.tasks.get(key).unwrap().result.clone().unwrap();
            let step = &result.jobs[0].steps[0];
            assert!(result.succeeded && step.command == "print");
            assert!(step.stdout.is_empty() && step.stderr.is_empty() && result.output.is_none());
        };

        let s = open().await;
        let cancel = start(&s).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let agent = s.open_session(&hello(1, vec![]), tx);
        let task = enqueue_one(&s, item(10, "k")).await;
        let (_, lease) = assigned(&mut rx).await;
        assert!(s.complete(agent, &lease, printed).await);
        held(&s, &task.name);
        assert!(whole(&s.get(&task.name).unwrap()), "GetTask reads it back");
        assert!(
            whole(&s.watch(&task.name).unwrap().snapshot),
            "so does a watch"
        );
        let repeat = enqueue_one(&s, item(10, "k")).await;
        assert!(repeat.name == task.name && whole(&repeat), "and a repeat");
        let (page, _) = s
            .list(&task.pipeline, &[], TaskState::Done, 10, "")
            .unwrap();
        let listed = page[0].result.as_ref().unwrap();
        assert!(listed.jobs[0].steps[0].stdout.is_empty() && listed.output.is_none());
        assert_eq!(
            listed.jobs[0].steps[0].command, "print",
            "a list shows the summary"
        );
        cancel.cancel();
        drop(s);

        // A restart keeps the summary in memory too, and the whole result on disk.
        let s = open().await;
        held(&s, &task.name);
        assert!(whole(&s.get(&task.name).unwrap()));
        // A handoff carries the whole result to the next owner.
        let out = s.take_for_handoff(&task.pipeline, 0, 10);
        let handed = out.tasks[0].stored.as_ref().unwrap().task.as_ref().unwrap();
        assert!(whole(handed), "handed off whole");
    }

    #[tokio::test(start_paused = true)]
    async fn a_noisy_client_does_not_starve_a_quiet_one_and_quotas_are_per_client() {
        let mut o = options(1000);
        o.max_active_per_client = 60;
        let s = scheduler_with(o);
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
        let s = scheduler_with(o);
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

    /// Submits one task to each of `pipelines` (`tenants/t/applications/a/pipelines/{p}`)
    /// in turn, and an agent of one slot finishes each before the next, a paused
    /// millisecond apart, so finish times follow the clock, not chance. Returns their names.
    async fn finish_one_by_one<const N: usize>(
        s: &Arc<Scheduler>,
        pipelines: [&str; N],
    ) -> Vec<String> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let session = s.open_session(&hello(1, vec![]), tx);
        let mut finished = Vec::new();
        for pipeline in pipelines {
            let mut task = item(10, "");
            task.task.as_mut().expect("task").pipeline =
                format!("tenants/t/applications/a/pipelines/{pipeline}");
            let task = enqueue_one(s, task).await;
            let (_, lease) = assigned(&mut rx).await;
            assert!(s.complete(session, &lease, done()).await);
            finished.push(task.name);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        finished
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_cap_the_oldest_finished_tasks_are_collected_early() {
        let mut o = options(100);
        o.max_finished_tasks = 2;
        let s = scheduler_with(o);
        let cancel = start(&s).await;
        let finished = finish_one_by_one(&s, ["p"; 4]).await;
        // Long before the hour of retention: only the cap applies (this round, or the
        // collector's own if the paused clock reached it first).
        s.collect().await;
        let kept: Vec<bool> = finished.iter().map(|n| s.get(n).is_ok()).collect();
        assert_eq!(kept, [false, false, true, true], "the oldest two went");
        assert_eq!(s.collect().await, 0, "at the cap, nothing more");
        cancel.cancel();
    }

    /// One busy pipeline past its own cap loses its oldest finished tasks; a quiet one
    /// keeps its older history.
    #[tokio::test(start_paused = true)]
    async fn past_a_pipelines_cap_only_its_oldest_finished_tasks_are_collected() {
        let mut o = options(100);
        o.max_finished_per_pipeline = 2;
        let s = scheduler_with(o);
        let cancel = start(&s).await;
        // The quiet pipeline's task finishes first, then four of the busy one's.
        let finished = finish_one_by_one(&s, ["quiet", "busy", "busy", "busy", "busy"]).await;
        s.collect().await;
        let kept: Vec<bool> = finished.iter().map(|n| s.get(n).is_ok()).collect();
        assert_eq!(kept, [true, false, false, true, true]);
        assert_eq!(s.collect().await, 0, "each pipeline at or under its cap");
        cancel.cancel();
    }

    /// A leased task handed to another shard keeps its lease and what was left of its
    /// deadline: its agent reclaims it there, and an unclaimed one is delivered again when
    /// that time is up, not before. Meanwhile the old shard keeps the task's spec.
    #[tokio::test(start_paused = true)]
    async fn a_leased_task_handed_off_keeps_its_lease_and_remaining_deadline() {
        let old = scheduler(100);
        let cancel_old = start(&old).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        old.open_session(&hello(2, vec![]), tx);
        let (reclaimed, reclaimed_lease) = {
            enqueue_one(&old, item(10, "")).await;
            assigned(&mut rx).await
        };
        let (unclaimed, _) = {
            enqueue_one(&old, item(10, "")).await;
            assigned(&mut rx).await
        };
        tokio::time::advance(TTL / 2).await;

        let out = old.take_for_handoff(&reclaimed.pipeline, 0, 100);
        assert_eq!(out.tasks.len(), 2);
        for t in &out.tasks {
            let left = Duration::from_millis(t.lease_remaining_ms as u64);
            assert!(
                left <= TTL / 2 && left > TTL / 2 - Duration::from_millis(10),
                "{left:?}"
            );
        }
        assert_eq!(old.collect_specs(), 0, "the handoff holds the spec");

        let new = scheduler(100);
        let cancel_new = start(&new).await;
        let adopted = new
            .adopt(pm_proto::internal::v1::AdoptRequest {
                from_shard: "old".into(),
                ring_revision: 1,
                specs: out.specs.clone(),
                tasks: out.tasks.clone(),
            })
            .await
            .unwrap();
        assert_eq!(adopted.adopted, 2);
        old.forget(&out).await.unwrap();
        drop(out);
        assert!(old.is_empty());
        assert_eq!(old.collect_specs(), 1, "gone with its last task");

        // The agent, moved to the new shard, reclaims the lease it holds and finishes.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let agent = new.open_session(&hello(1, vec![reclaimed_lease.clone()]), tx);
        for name in [&reclaimed.name, &unclaimed.name] {
            assert_eq!(state_of(&new, name), (TaskState::InProgress, 1));
        }
        assert!(new.complete(agent, &reclaimed_lease, done()).await);
        assert_eq!(state_of(&new, &reclaimed.name).0, TaskState::Done);

        // The other lease runs out where it would have on the old shard, then the task is
        // delivered again.
        tokio::time::advance(TTL / 2 - Duration::from_millis(20)).await;
        assert_eq!(state_of(&new, &unclaimed.name), (TaskState::InProgress, 1));
        tokio::time::advance(Duration::from_millis(30)).await;
        // With no more time passing: the reaper and dispatcher run on what is due now.
        until(|| state_of(&new, &unclaimed.name).1 == 2).await;
        let (again, lease) = assigned(&mut rx).await;
        assert_eq!((again.name, lease.attempt), (unclaimed.name, 2));
        cancel_old.cancel();
        cancel_new.cancel();
    }

    /// A spec goes with the last task that runs it, and not before: a spec still run by a
    /// queued task stays, and one whose tasks were all collected must be sent again.
    #[tokio::test(start_paused = true)]
    async fn a_spec_is_collected_with_its_last_task() {
        let mut o = options(100);
        o.retention = Duration::from_secs(60);
        let s = scheduler_with(o);
        let cancel = start(&s).await;
        let other = |priority| {
            let mut it = item(priority, "");
            let job = &mut it.spec.as_mut().unwrap().stages[0].jobs[0];
            job.commands = vec!["date".into()];
            it
        };
        let id_of = |it: &EnqueueTask| crate::store::spec_id(it.spec.as_ref().unwrap());
        let (kept, gone) = (id_of(&item(1, "")), id_of(&other(1)));
        // The one task of the spec that goes runs first and finishes; the task of the spec
        // that stays does not finish.
        enqueue_one(&s, other(1)).await;
        enqueue_one(&s, item(10, "")).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let session = s.open_session(&hello(1, vec![]), tx);
        let (ran, lease) = assigned(&mut rx).await;
        assert_eq!(ran.priority, 1);
        assert!(s.complete(session, &lease, done()).await);
        assert_eq!(s.collect_specs(), 0, "both specs are still run by a task");

        tokio::time::advance(Duration::from_secs(61)).await;
        until(|| s.get(&ran.name).is_err()).await;
        until(|| !s.lock().specs.contains_key(&gone)).await;
        assert!(
            s.lock().specs.contains_key(&kept),
            "its task is still queued"
        );
        assert!(!s.lock().durable_specs.contains(&gone));
        let mut by_id = other(1);
        by_id.spec = None;
        by_id.spec_id = gone.to_vec();
        let refused = s.enqueue(vec![by_id]).await.pop().unwrap();
        assert!(matches!(refused, Err(Error::SpecNeeded(_))), "{refused:?}");
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

    /// Watches are bounded: past `max_watches` one is refused, a watch that closes gives its
    /// place back, and a watcher that falls a buffer behind the task's events is ended with a
    /// clear status while one that keeps reading gets every event.
    #[tokio::test(start_paused = true)]
    async fn watches_are_bounded_in_number_and_in_what_they_hold() {
        use futures::StreamExt;
        use pm_proto::internal::v1::shard_service_server::ShardService;
        use pm_proto::v1::WatchTaskRequest;

        let s = scheduler_with(Options {
            max_watches: 2,
            ..options(100)
        });
        let cancel = start(&s).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let agent = s.open_session(&hello(1, vec![]), tx);
        let task = enqueue_one(&s, item(10, "")).await;
        let (_, lease) = assigned(&mut rx).await;
        let shard = crate::service::Shard::new(
            s.clone(),
            Arc::new(crate::ownership::Ownership::standalone()),
        );
        let watch = || {
            shard.watch_task(tonic::Request::new(WatchTaskRequest {
                name: task.name.clone(),
            }))
        };
        let slow = watch().await.unwrap().into_inner();
        let mut closing = watch().await.unwrap().into_inner();
        let refused = watch().await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        // Its forwarder sent the snapshot and waits for the task's next event when it closes.
        closing.next().await.unwrap().unwrap();
        tokio::task::yield_now().await;
        drop(closing);
        let mut reader = None;
        for _ in 0..1000 {
            match watch().await {
                Ok(w) => {
                    reader = Some(w.into_inner());
                    break;
                }
                Err(e) => assert_eq!(e.code(), tonic::Code::ResourceExhausted),
            }
            tokio::task::yield_now().await;
        }
        let mut reader = reader.expect("the closed watch's place is given back");
        let first = reader.next().await.unwrap().unwrap();
        assert!(matches!(first.event, Some(task_event::Event::Snapshot(_))));

        // Four buffers' worth of progress, read as it comes by one watcher only.
        let events = WATCH_BUFFER as i64 * 4;
        for n in 0..events {
            s.progress(
                agent,
                &lease,
                TaskEvent {
                    time_ms: n,
                    event: None,
                },
            );
            let event = tokio::time::timeout(Duration::from_secs(10), reader.next())
                .await
                .expect("the reading watcher keeps up")
                .unwrap()
                .unwrap();
            assert_eq!(event.time_ms, n, "every event, in order");
        }
        let mut slow = slow;
        let mut ended = None;
        for _ in 0..events + 2 {
            let next = tokio::time::timeout(Duration::from_secs(10), slow.next()).await;
            match next
                .expect("not held")
                .expect("ended with a status, not silently")
            {
                Ok(_) => {}
                Err(status) => {
                    ended = Some(status);
                    break;
                }
            }
        }
        let ended = ended.expect("the slow watcher is told it fell behind");
        assert_eq!(ended.code(), tonic::Code::ResourceExhausted, "{ended:?}");
        assert!(ended.message().contains("fell"), "{ended:?}");
        cancel.cancel();
    }

    /// A store with a task record and a spec record that do not decode: a plain start
    /// refuses, naming --salvage; a salvage drops both, lists them in its report and serves
    /// the rest; the next plain start is clean.
    #[tokio::test]
    async fn unreadable_records_stop_a_start_unless_salvaged_and_then_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let open = |salvage: bool| {
            let options = Options {
                salvage,
                ..options(100)
            };
            reopen(options, dir.path())
        };
        let s = open(false).await.unwrap();
        let cancel = start(&s).await;
        let kept = enqueue_one(&s, item(10, "")).await;
        cancel.cancel();
        drop(s);
        let bad_task =
            "tenants/t/applications/a/pipelines/p/tasks/0193aaaa0000700080000000000000bb";
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let db = loop {
            match fjall::Database::builder(dir.path()).open() {
                Ok(db) => break db,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        let keyspace = |name| {
            db.keyspace(name, fjall::KeyspaceCreateOptions::default)
                .unwrap()
        };
        keyspace("shard_tasks")
            .insert(bad_task, b"\xff\xffnot a record")
            .unwrap();
        keyspace("specs").insert([7u8; 32], b"\xff\xff").unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
        drop(db);

        let refused = open(false).await.err().expect("a plain start refuses");
        assert!(refused.0.contains("--salvage"), "{refused}");
        let s = open(true).await.unwrap();
        assert_eq!(s.len(), 1);
        assert!(s.get(&kept.name).is_ok());
        let report = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("salvaged-"))
            .expect("a salvage report");
        let mut lines: Vec<String> = std::fs::read_to_string(report.path())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with(&format!("spec {}: ", "07".repeat(32))),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with(&format!("task {bad_task}: ")),
            "{lines:?}"
        );
        drop(s);
        let s = open(false).await.expect("the next plain start is clean");
        assert_eq!(s.len(), 1);
    }

    #[tokio::test]
    async fn a_restart_replays_the_disk_and_lets_agents_reclaim_their_leases() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let open = |options: Options| async move { reopen(options, dir).await.expect("reopen") };
        let s = open(options(100)).await;
        let cancel = start(&s).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let session = s.open_session(&hello(3, vec![]), tx);
        let items = vec![
            item(10, ""),
            item(10, "k"),
            item(10, ""),
            item(10, ""),
            item(10, ""),
        ];
        let tasks: Vec<Task> = s
            .enqueue(items)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let (_, finished) = assigned(&mut rx).await;
        let (_, running) = assigned(&mut rx).await;
        // Leased to an agent that never comes back.
        let (orphan, _) = assigned(&mut rx).await;
        assert_eq!(orphan.name, tasks[2].name);
        // The stream closes (so no slot comes back), then its result still lands.
        s.close_session(session);
        assert!(s.complete(session, &finished, done()).await);
        cancel.cancel();
        drop(s);

        // Back with a lease TTL short enough to see the orphan's lease run out (and long
        // enough for the reclaimed one to be answered before it runs out too).
        let ttl = Duration::from_secs(2);
        // Before the open, which gives restored leases their TTL from its own clock reading.
        let restarted = Instant::now();
        let s = open(Options {
            lease_ttl: ttl,
            ..options(100)
        })
        .await;
        let cancel = start(&s).await;
        let state = |t: &Task| TaskState::try_from(s.get(&t.name).unwrap().state).unwrap();
        assert_eq!(state(&tasks[0]), TaskState::Done);
        for leased in [&tasks[1], &tasks[2]] {
            assert_eq!(
                state(leased),
                TaskState::InProgress,
                "leased before the restart"
            );
        }
        assert_eq!(state(&tasks[3]), TaskState::Ready);
        assert_eq!(
            enqueue_one(&s, item(10, "k")).await.name,
            tasks[1].name,
            "idempotency survives"
        );
        // The agent comes back with its lease; the others are dispatched as before, and the
        // lease nobody reclaimed is delivered again once its TTL from the restart is over.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let back = s.open_session(&hello(3, vec![running.clone()]), tx);
        assert!(
            s.complete(back, &running, done()).await,
            "the reclaimed lease's result counts"
        );
        assert_eq!(state(&tasks[1]), TaskState::Done);
        let next: Vec<String> = vec![
            assigned(&mut rx).await.0.name,
            assigned(&mut rx).await.0.name,
        ];
        assert_eq!(
            next,
            vec![tasks[3].name.clone(), tasks[4].name.clone()],
            "FIFO kept"
        );
        let (again, _) = assigned(&mut rx).await;
        assert_eq!(
            (again.name.as_str(), again.attempt),
            (tasks[2].name.as_str(), 2),
            "the unclaimed lease, delivered again"
        );
        assert!(
            restarted.elapsed() >= ttl,
            "not before its lease ran out: {:?}",
            restarted.elapsed()
        );
        cancel.cancel();
    }
}
