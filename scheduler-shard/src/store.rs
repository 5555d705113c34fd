//! The task store: the shard's tasks on its own disk, in fjall.
//!
//! Two keyspaces: `shard_tasks` (task name -> `ShardTask`, the shard's own compact record)
//! and `specs` (SHA-256 of an encoded spec -> the spec), so a pipeline version shared by a
//! million tasks is stored once. Writes go through [`crate::journal`], which batches them and
//! syncs once per batch; this module only knows how to apply a batch, how to read everything
//! back at start, and how to convert a record to and from the whole `pm.v1.Task` (for
//! clients, agents and handoffs).
//!
//! A record keeps what a task was submitted with and scheduling never reads (parameters,
//! timeout, idempotency key) as the encoded `TaskBody` bytes, in memory and on disk. So a
//! restart decodes only the scheduling fields, and memory holds no decoded map or strings
//! per task (docs/scheduler.md, "Compact state").
//!
//! Records are encoded here, on the journal's thread, not by the scheduler under its lock.
//! A batch may change one task twice (its dispatch and its result can share a group commit,
//! since an Assign no longer waits for its dispatch record): fjall gives every item of a batch
//! the same sequence number, so [`Store::apply`] keeps only the last write of each key, which
//! is what applying the ops one by one would leave.
//!
//! Data dirs of format 1 (whole `StoredTask`s in the keyspace `tasks`) are converted once at
//! open, before anything is served; a crash midway converts again from the start.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use prost::Message;

use pm_proto::internal::v1::{ShardTask, StoredTask, TaskBody};
use pm_proto::v1::{PipelineSpec, Task, TaskResult, TaskState};

use crate::key::TaskKey;

pub use pm_spec::{SpecId, spec_id};

/// One write.
#[derive(Debug, Clone)]
pub enum Op {
    /// A task's record, under its name (encoded on the journal's thread).
    PutTask(Record),
    DeleteTask {
        pipeline: Arc<str>,
        key: TaskKey,
    },
    PutSpec {
        id: SpecId,
        spec: Vec<u8>,
    },
    /// A spec no task holds any more.
    DeleteSpec {
        id: SpecId,
    },
}

/// A task as the shard keeps it: a `ShardTask` under the task's name, by its parts. The body
/// and result are shared with the scheduler's memory, so making a write copies neither.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// `tenants/{t}/applications/{a}/pipelines/{p}`.
    pub pipeline: Arc<str>,
    /// The task id (the record is stored under `{pipeline}/tasks/{id}`).
    pub key: TaskKey,
    /// `{tenant}/{client}`: the fair-share flow (the client may be empty).
    pub flow: Arc<str>,
    pub state: TaskState,
    pub attempt: u32,
    pub priority: u32,
    pub client_priority: u32,
    pub seq: u64,
    pub spec_id: SpecId,
    /// The lease of an IN_PROGRESS task.
    pub lease_id: Option<Arc<str>>,
    pub create_time_ms: i64,
    pub update_time_ms: i64,
    /// The body holds an idempotency key.
    pub keyed: bool,
    /// An encoded `TaskBody`.
    pub body: Arc<[u8]>,
    pub result: Option<Arc<TaskResult>>,
}

// A fair-share flow is named `{tenant}/{client}` (the client may be empty): one place builds
// and splits it.

/// The flow of `client`'s tasks of `pipeline` (a pipeline or task name, `tenants/{t}/...`).
pub fn flow_of(pipeline: &str, client: &str) -> String {
    let tenant = pipeline
        .strip_prefix("tenants/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("");
    let mut flow = String::with_capacity(tenant.len() + 1 + client.len());
    flow.push_str(tenant);
    flow.push('/');
    flow.push_str(client);
    flow
}

/// The tenant of a flow.
pub fn tenant_of_flow(flow: &str) -> &str {
    flow.split_once('/').map_or(flow, |(tenant, _)| tenant)
}

/// The client of a flow.
fn client_of_flow(flow: &str) -> &str {
    flow.split_once('/').map_or("", |(_, client)| client)
}

/// The idempotency key in an encoded `TaskBody` (decoded only when `keyed`).
pub fn idempotency_key_in(keyed: bool, body: &[u8]) -> String {
    if !keyed {
        return String::new();
    }
    TaskBody::decode(body)
        .map(|b| b.idempotency_key)
        .unwrap_or_default()
}

impl Record {
    /// The idempotency key in the body ("" without one).
    pub fn idempotency_key(&self) -> String {
        idempotency_key_in(self.keyed, &self.body)
    }

    /// The task's resource name (the record's key on disk).
    pub fn name(&self) -> String {
        self.key.name(&self.pipeline)
    }

    /// The task as clients and agents see it (decodes the body).
    pub fn to_task(&self) -> Task {
        let body = TaskBody::decode(&*self.body).unwrap_or_default();
        Task {
            name: self.name(),
            id: self.key.to_string(),
            pipeline: self.pipeline.to_string(),
            pipeline_version: body.pipeline_version,
            params: body.params,
            priority: self.priority,
            idempotency_key: body.idempotency_key,
            timeout_seconds: body.timeout_seconds,
            inline: body.inline,
            state: self.state as i32,
            attempt: self.attempt,
            create_time_ms: self.create_time_ms,
            update_time_ms: self.update_time_ms,
            result: self.result.as_deref().cloned(),
            client: client_of_flow(&self.flow).to_owned(),
            input: body.input,
            traceparent: body.traceparent,
        }
    }

    /// The body of `task` (its fields fixed at submit that scheduling never reads), and
    /// whether it holds an idempotency key. Takes the params (and input) out of `task` and
    /// puts them back, so nothing is copied but the encoding.
    pub fn body_of(task: &mut Task) -> (Arc<[u8]>, bool) {
        let body = TaskBody {
            params: std::mem::take(&mut task.params),
            timeout_seconds: task.timeout_seconds,
            inline: task.inline,
            pipeline_version: task.pipeline_version,
            idempotency_key: std::mem::take(&mut task.idempotency_key),
            input: task.input.take(),
            traceparent: std::mem::take(&mut task.traceparent),
        };
        let bytes = body.encode_to_vec().into();
        task.params = body.params;
        task.idempotency_key = body.idempotency_key;
        task.input = body.input;
        task.traceparent = body.traceparent;
        (bytes, !task.idempotency_key.is_empty())
    }

    /// The record of a whole task (a handoff, or a format-1 disk record); `None` without a
    /// task, with a malformed spec id or a name that is not a task's.
    pub fn from_stored(stored: StoredTask) -> Option<Self> {
        let mut task = stored.task?;
        let (pipeline, key) = TaskKey::parse_name(&task.name)?;
        let pipeline: Arc<str> = pipeline.into();
        let (body, keyed) = Self::body_of(&mut task);
        Some(Self {
            flow: flow_of(&pipeline, &task.client).into(),
            pipeline,
            key,
            state: TaskState::try_from(task.state).unwrap_or_default(),
            attempt: task.attempt,
            priority: task.priority,
            client_priority: stored.client_priority,
            seq: stored.seq,
            spec_id: SpecId::try_from(stored.spec_id.as_slice()).ok()?,
            lease_id: (!stored.lease_id.is_empty()).then(|| stored.lease_id.as_str().into()),
            create_time_ms: task.create_time_ms,
            update_time_ms: task.update_time_ms,
            keyed,
            body,
            result: task.result.map(Arc::new),
        })
    }

    /// The whole task, for a handoff.
    pub fn to_stored(&self) -> StoredTask {
        StoredTask {
            task: Some(self.to_task()),
            spec_id: self.spec_id.to_vec(),
            client_priority: self.client_priority,
            seq: self.seq,
            lease_id: self.lease_id.as_deref().unwrap_or("").to_owned(),
        }
    }

    /// The record stored under `name`, its pipeline and flow shared through `names`.
    pub fn decode(name: &[u8], value: &[u8], names: &mut Names) -> Result<Self, StoreError> {
        let bad =
            |why: String| StoreError(format!("task {}: {why}", String::from_utf8_lossy(name)));
        let name = std::str::from_utf8(name).map_err(|e| bad(e.to_string()))?;
        let (pipeline, key) =
            TaskKey::parse_name(name).ok_or_else(|| bad("not a task name".into()))?;
        let stored = ShardTask::decode(value).map_err(|e| bad(e.to_string()))?;
        let (pipeline, flow) = names.get(pipeline, &stored.client);
        Ok(Self {
            pipeline,
            key,
            flow,
            state: TaskState::try_from(stored.state).unwrap_or_default(),
            attempt: stored.attempt,
            priority: stored.priority,
            client_priority: stored.client_priority,
            seq: stored.seq,
            spec_id: SpecId::try_from(stored.spec_id.as_slice())
                .map_err(|_| bad("the spec id is not 32 bytes".into()))?,
            lease_id: (!stored.lease_id.is_empty()).then(|| stored.lease_id.as_str().into()),
            create_time_ms: stored.create_time_ms,
            update_time_ms: stored.update_time_ms,
            keyed: stored.keyed,
            body: stored.body.into(),
            result: stored.result.map(Arc::new),
        })
    }

    /// The same bytes as the equivalent `ShardTask::encode_to_vec`, written from borrowed
    /// parts (prost's own field encoders, field numbers of `pm/internal/v1/store.proto`).
    pub fn encode(&self) -> Vec<u8> {
        use prost::encoding::{self, WireType};
        fn bytes(tag: u32, value: &[u8], buf: &mut Vec<u8>) {
            if !value.is_empty() {
                encoding::encode_key(tag, WireType::LengthDelimited, buf);
                encoding::encode_varint(value.len() as u64, buf);
                buf.extend_from_slice(value);
            }
        }
        let lease = self.lease_id.as_deref().unwrap_or("");
        let result_len = self.result.as_ref().map_or(0, |r| r.encoded_len() + 8);
        let mut buf = Vec::with_capacity(96 + self.body.len() + lease.len() + result_len);
        bytes(1, client_of_flow(&self.flow).as_bytes(), &mut buf);
        if self.state as i32 != 0 {
            encoding::int32::encode(2, &(self.state as i32), &mut buf);
        }
        for (tag, value) in [
            (3, self.attempt),
            (4, self.priority),
            (5, self.client_priority),
        ] {
            if value != 0 {
                encoding::uint32::encode(tag, &value, &mut buf);
            }
        }
        if self.seq != 0 {
            encoding::uint64::encode(6, &self.seq, &mut buf);
        }
        bytes(7, &self.spec_id, &mut buf);
        bytes(8, lease.as_bytes(), &mut buf);
        for (tag, value) in [(9, self.create_time_ms), (10, self.update_time_ms)] {
            if value != 0 {
                encoding::int64::encode(tag, &value, &mut buf);
            }
        }
        if self.keyed {
            encoding::bool::encode(11, &self.keyed, &mut buf);
        }
        bytes(12, &self.body, &mut buf);
        if let Some(result) = &self.result {
            encoding::message::encode(13, &**result, &mut buf);
        }
        buf
    }
}

/// Pipeline and flow names read back at start, one shared copy of each (a million tasks of
/// one pipeline allocate its name once). Records come in name order, so most share the last
/// record's pipeline and client, which are checked first.
#[derive(Default)]
pub struct Names {
    /// Pipeline -> client -> flow.
    pipelines: HashMap<Arc<str>, HashMap<String, Arc<str>>>,
    last: Option<(Arc<str>, String, Arc<str>)>,
}

impl Names {
    fn get(&mut self, pipeline: &str, client: &str) -> (Arc<str>, Arc<str>) {
        if let Some((p, c, flow)) = &self.last
            && **p == *pipeline
            && c == client
        {
            return (p.clone(), flow.clone());
        }
        if !self.pipelines.contains_key(pipeline) {
            self.pipelines.insert(pipeline.into(), HashMap::new());
        }
        let (shared, flows) = self
            .pipelines
            .get_key_value(pipeline)
            .expect("inserted above");
        let (shared, flow) = match flows.get(client) {
            Some(flow) => (shared.clone(), flow.clone()),
            None => {
                let shared = shared.clone();
                let flow: Arc<str> = flow_of(pipeline, client).into();
                self.pipelines
                    .get_mut(pipeline)
                    .expect("inserted above")
                    .insert(client.to_owned(), flow.clone());
                (shared, flow)
            }
        };
        self.last = Some((shared.clone(), client.to_owned(), flow.clone()));
        (shared, flow)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("task store: {0}")]
pub struct StoreError(pub String);

impl StoreError {
    /// This error (a record that does not decode), saying how to start anyway.
    fn needs_salvage(self) -> Self {
        StoreError(format!(
            "{}: the task store has a record that does not decode. Start with --salvage to drop \
             such records (each is logged and listed in a salvage report in the data directory) \
             and serve the rest",
            self.0
        ))
    }
}

/// A stored record that does not decode, found by a salvage.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub is_spec: bool,
    pub key: Vec<u8>,
    pub why: String,
}

impl Unreadable {
    fn task(key: &[u8], e: StoreError) -> Self {
        Self {
            is_spec: false,
            key: key.to_vec(),
            why: e.0,
        }
    }

    fn spec(key: &[u8], e: StoreError) -> Self {
        Self {
            is_spec: true,
            key: key.to_vec(),
            why: e.0,
        }
    }

    /// One line of the salvage report: what it was, its key, why it did not decode.
    pub fn line(&self) -> String {
        let kind = if self.is_spec { "spec" } else { "task" };
        let key = match std::str::from_utf8(&self.key) {
            Ok(text) if !self.is_spec => text.to_owned(),
            _ => self.key.iter().map(|b| format!("{b:02x}")).collect(),
        };
        format!("{kind} {key}: {}", self.why)
    }
}

impl From<fjall::Error> for StoreError {
    fn from(e: fjall::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// Everything on disk, read back at start.
#[derive(Default)]
pub struct Contents {
    pub tasks: Vec<Record>,
    pub specs: HashMap<SpecId, PipelineSpec>,
}

/// fjall replays its journal at open (every write not yet flushed to a table), and keeps it
/// until the memtables it covers are flushed; an idle keyspace (`specs`) holds it until this
/// size forces a flush. fjall's default (512 MiB) took ~2 s of replay at a restart with a
/// million tasks; this is fjall's minimum.
const MAX_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

/// How a store is opened.
/// Where one [`Store::apply`] spent its time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Applied {
    /// Into fjall's journal and memtables (and, when a memtable is full, sealing it).
    pub write: std::time::Duration,
    /// The fdatasync (or, unsynced, the hand-off to the OS).
    pub sync: std::time::Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// With `fsync` false, writes reach the OS but are not synced before acknowledgement: a
    /// machine crash loses acknowledged tasks. Only for measuring what the fsync costs
    /// (`pm-shard --unsafe-no-fsync`, like etcd's flag of the same name).
    pub fsync: bool,
    /// The tasks' memtable, in bytes (`pm-shard --memtable-mib`). fjall stores a keyspace's
    /// options when it creates it: this applies to a data dir created with it, and an
    /// existing one keeps its first setting. fjall's default, 64 MiB, is kept: 16 MiB holds
    /// ~65 MiB less with a million READY tasks (347-366 MiB instead of 416-428), but unary
    /// submits at saturation fall further behind and their p99.9 is higher (more flushes
    /// competing for the same cores; perf/RESULTS.md, "A million READY tasks in less memory").
    pub memtable_bytes: u64,
    /// A group commit whose oldest write waited longer than this, from its request to its
    /// answer, is logged as a warning with where the time went (`pm-shard --slow-commit-ms`;
    /// like etcd's warning for a slow apply). fsync stalls of a disk show up here first.
    pub slow_commit: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            fsync: true,
            memtable_bytes: 64 * 1024 * 1024,
            slow_commit: std::time::Duration::from_millis(100),
        }
    }
}

/// The keyspace of format-1 records (whole `StoredTask`s).
const FORMAT_1_TASKS: &str = "tasks";
/// Records converted per synced batch when a format-1 data dir is opened.
const MIGRATE_BATCH: usize = 10_000;

/// Cheap to clone: the handles share one database.
#[derive(Clone)]
pub struct Store {
    db: Database,
    tasks: Keyspace,
    specs: Keyspace,
    options: StoreOptions,
    dir: std::path::PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, StoreOptions::default())
    }

    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        let db = Database::builder(dir)
            // We sync ourselves, once per group commit.
            .manual_journal_persist(true)
            .max_journaling_size(MAX_JOURNAL_BYTES)
            .open()?;
        let tasks = db.keyspace("shard_tasks", || {
            KeyspaceCreateOptions::default().max_memtable_size(options.memtable_bytes)
        })?;
        let specs = db.keyspace("specs", KeyspaceCreateOptions::default)?;
        let store = Self {
            db,
            tasks,
            specs,
            options,
            dir: dir.to_owned(),
        };
        store.migrate_format_1()?;
        Ok(store)
    }

    /// Where the store lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How it was opened.
    pub fn options(&self) -> StoreOptions {
        self.options
    }

    /// Whether a sealed memtable of the tasks is still being flushed to a table (its memory
    /// is freed once it is).
    pub fn flushing(&self) -> bool {
        self.tasks.sealed_memtable_count() > 0
    }

    /// Seals both keyspaces' memtables and has fjall flush them to tables in the background
    /// (it frees them once written). Then the journal holds nothing a restart must replay, and
    /// memory no memtable of recent writes. Nothing is more or less durable for it: every
    /// write it covers is in the journal already. `rotate_memtable` is fjall's (hidden from
    /// its docs, used by its tests): the version is pinned in Cargo.lock.
    pub fn flush_memtables(&self) -> Result<(), StoreError> {
        self.tasks.rotate_memtable()?;
        self.specs.rotate_memtable()?;
        Ok(())
    }

    /// Converts format-1 records into this format, then drops their keyspace. Idempotent:
    /// the old keyspace goes only after every converted record is synced.
    fn migrate_format_1(&self) -> Result<(), StoreError> {
        if !self.db.keyspace_exists(FORMAT_1_TASKS) {
            return Ok(());
        }
        let old = self
            .db
            .keyspace(FORMAT_1_TASKS, KeyspaceCreateOptions::default)?;
        let mut converted = 0usize;
        let mut batch = self.db.batch();
        let mut in_batch = 0;
        for guard in old.iter() {
            let (key, value) = guard.into_inner()?;
            let stored = StoredTask::decode(value.as_ref()).map_err(|e| {
                StoreError(format!(
                    "undecodable format-1 task {}: {e}",
                    String::from_utf8_lossy(&key)
                ))
            })?;
            let Some(record) = Record::from_stored(stored) else {
                tracing::error!(task = %String::from_utf8_lossy(&key), "a format-1 task is malformed; skipped");
                continue;
            };
            batch.insert(&self.tasks, record.name(), record.encode());
            converted += 1;
            in_batch += 1;
            if in_batch == MIGRATE_BATCH {
                batch.commit()?;
                batch = self.db.batch();
                in_batch = 0;
            }
        }
        batch.commit()?;
        self.db.persist(PersistMode::SyncAll)?;
        self.db.delete_keyspace(old)?;
        self.db.persist(PersistMode::SyncAll)?;
        tracing::info!(converted, "task store converted from format 1");
        Ok(())
    }

    /// Applies `ops` atomically and, with `sync`, makes them durable (fdatasync, with every
    /// batch before them) before returning; without it they only reach the OS. Returns how
    /// long each part took.
    pub fn apply<'a>(
        &self,
        ops: impl IntoIterator<Item = &'a Op>,
        sync: bool,
    ) -> Result<Applied, StoreError> {
        let started = std::time::Instant::now();
        let ops: Vec<&Op> = ops.into_iter().collect();
        // None: a sync of what was written before (the journal's owed syncs).
        if !ops.is_empty() {
            // The last write of each task and of each spec wins (see the module doc).
            let mut last: HashMap<TaskKey, usize> = HashMap::with_capacity(ops.len());
            let mut last_spec: HashMap<SpecId, usize> = HashMap::new();
            for (i, op) in ops.iter().enumerate() {
                match op {
                    Op::PutTask(record) => last.insert(record.key, i),
                    Op::DeleteTask { key, .. } => last.insert(*key, i),
                    Op::PutSpec { id, .. } | Op::DeleteSpec { id } => last_spec.insert(*id, i),
                };
            }
            let mut batch = self.db.batch();
            for (i, op) in ops.iter().enumerate() {
                match op {
                    Op::PutTask(record) if last[&record.key] != i => {}
                    Op::DeleteTask { key, .. } if last[key] != i => {}
                    Op::PutSpec { id, .. } | Op::DeleteSpec { id } if last_spec[id] != i => {}
                    Op::PutTask(record) => {
                        batch.insert(&self.tasks, record.name(), record.encode())
                    }
                    Op::DeleteTask { pipeline, key } => {
                        batch.remove(&self.tasks, key.name(pipeline))
                    }
                    Op::PutSpec { id, spec } => {
                        batch.insert(&self.specs, id.as_slice(), spec.as_slice())
                    }
                    Op::DeleteSpec { id } => batch.remove(&self.specs, id.as_slice()),
                }
            }
            batch.commit()?;
        }
        let written = std::time::Instant::now();
        // `SyncData`, except for unsynced writes and in the benchmark-only unsynced mode.
        let persist = if sync && self.options.fsync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        self.db.persist(persist)?;
        Ok(Applied {
            write: written - started,
            sync: written.elapsed(),
        })
    }

    /// Reads every task and spec.
    pub fn load(&self) -> Result<Contents, StoreError> {
        let mut tasks = Vec::new();
        self.read_tasks(|record| tasks.push(record), None)?;
        Ok(Contents {
            tasks,
            specs: self.read_specs(None)?,
        })
    }

    /// Every spec. With `unreadable`, a record that does not decode is listed there and
    /// skipped (a salvage); without, it fails the read.
    pub fn read_specs(
        &self,
        mut unreadable: Option<&mut Vec<Unreadable>>,
    ) -> Result<HashMap<SpecId, PipelineSpec>, StoreError> {
        let mut specs = HashMap::new();
        for guard in self.specs.iter() {
            let (key, value) = guard.into_inner()?;
            let decoded = SpecId::try_from(key.as_ref())
                .map_err(|_| StoreError("a spec key is not 32 bytes".into()))
                .and_then(|id| {
                    PipelineSpec::decode(value.as_ref())
                        .map(|spec| (id, spec))
                        .map_err(|e| StoreError(format!("undecodable spec: {e}")))
                });
            match (decoded, unreadable.as_deref_mut()) {
                (Ok((id, spec)), _) => {
                    specs.insert(id, spec);
                }
                (Err(e), Some(list)) => list.push(Unreadable::spec(&key, e)),
                (Err(e), None) => return Err(e.needs_salvage()),
            }
        }
        Ok(specs)
    }

    /// Every task, in name order, to `each`; `unreadable` as in [`Store::read_specs`].
    pub fn read_tasks(
        &self,
        mut each: impl FnMut(Record),
        mut unreadable: Option<&mut Vec<Unreadable>>,
    ) -> Result<(), StoreError> {
        let mut names = Names::default();
        for guard in self.tasks.iter() {
            let (key, value) = guard.into_inner()?;
            match (
                Record::decode(&key, &value, &mut names),
                unreadable.as_deref_mut(),
            ) {
                (Ok(record), _) => each(record),
                (Err(e), Some(list)) => list.push(Unreadable::task(&key, e)),
                (Err(e), None) => return Err(e.needs_salvage()),
            }
        }
        Ok(())
    }

    /// The result stored with task `key` of `pipeline`: a finished task keeps only its
    /// summary in memory, and this is the rest (what its steps printed, its output data).
    pub fn task_result(
        &self,
        pipeline: &str,
        key: TaskKey,
    ) -> Result<Option<TaskResult>, StoreError> {
        let name = key.name(pipeline);
        let Some(value) = self.tasks.get(&name)? else {
            return Ok(None);
        };
        let stored = ShardTask::decode(value.as_ref())
            .map_err(|e| StoreError(format!("task {name}: {e}")))?;
        Ok(stored.result)
    }

    /// Deletes records a salvage skipped, in one synced write.
    pub fn drop_unreadable(&self, unreadable: &[Unreadable]) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for u in unreadable {
            let keyspace = if u.is_spec { &self.specs } else { &self.tasks };
            batch.remove(keyspace, u.key.as_slice());
        }
        batch.commit()?;
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// About how many tasks are stored (fjall's estimate, for sizing).
    pub fn approximate_tasks(&self) -> usize {
        self.tasks.approximate_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str) -> Task {
        Task {
            name: name.into(),
            id: TaskKey::parse_name(name).unwrap().1.to_string(),
            pipeline: TaskKey::parse_name(name).unwrap().0.into(),
            pipeline_version: 4,
            params: [("k".to_owned(), "v".to_owned())].into(),
            priority: 5,
            idempotency_key: "key-1".into(),
            timeout_seconds: 60,
            inline: false,
            state: TaskState::InProgress as i32,
            attempt: 3,
            create_time_ms: 1_700_000_000_000,
            update_time_ms: 1_700_000_000_500,
            result: None,
            client: "c1".into(),
            input: Some(prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("in".into())),
            }),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        }
    }

    const NAME: &str =
        "tenants/t/applications/a/pipelines/p/tasks/0193aaaa0000700080000000000000aa";

    #[test]
    fn a_record_encodes_as_its_shard_task_does_and_round_trips_the_whole_task() {
        let mut finished = task(NAME);
        finished.state = TaskState::Done as i32;
        finished.client = String::new();
        finished.idempotency_key = String::new();
        finished.result = Some(TaskResult {
            succeeded: true,
            duration_ms: 12,
            ..TaskResult::default()
        });
        for (t, client_priority, seq, lease) in [
            (task(NAME), 0, 0, None),
            (task(NAME), 7, 1 << 40, Some("l1-2a")),
            (finished, 1, 2, None),
        ] {
            let stored = StoredTask {
                task: Some(t.clone()),
                spec_id: vec![9; 32],
                client_priority,
                seq,
                lease_id: lease.unwrap_or("").into(),
            };
            let record = Record::from_stored(stored.clone()).unwrap();
            assert_eq!(record.keyed, !t.idempotency_key.is_empty());
            let shard_task = ShardTask {
                client: t.client.clone(),
                state: t.state,
                attempt: t.attempt,
                priority: t.priority,
                client_priority,
                seq,
                spec_id: vec![9; 32],
                lease_id: lease.unwrap_or("").into(),
                create_time_ms: t.create_time_ms,
                update_time_ms: t.update_time_ms,
                keyed: record.keyed,
                body: record.body.to_vec(),
                result: t.result.clone(),
            };
            assert_eq!(record.encode(), shard_task.encode_to_vec());
            assert_eq!(
                Record::decode(NAME.as_bytes(), &record.encode(), &mut Names::default()).unwrap(),
                record
            );
            assert_eq!(record.to_task(), t);
            assert_eq!(record.to_stored(), stored);
            assert_eq!(record.idempotency_key(), t.idempotency_key);
        }
    }

    fn record(name: &str, seq: u64, id: SpecId) -> Record {
        let mut t = task(name);
        t.state = TaskState::Ready as i32;
        Record::from_stored(StoredTask {
            task: Some(t),
            spec_id: id.to_vec(),
            seq,
            ..StoredTask::default()
        })
        .unwrap()
    }

    #[test]
    fn the_tasks_memtable_is_sealed_at_the_size_the_store_was_opened_with() {
        let id = spec_id(&PipelineSpec::default());
        // A store holding 3 MiB of tasks, written in one batch.
        let filled = |options: StoreOptions| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open_with(dir.path(), options).unwrap();
            let ops: Vec<Op> = (1..=48u64)
                .map(|n| {
                    let name = format!("tenants/t/applications/a/pipelines/p/tasks/{n:0>32}");
                    let mut r = record(&name, n, id);
                    r.body = vec![7u8; 64 * 1024].into();
                    Op::PutTask(r)
                })
                .collect();
            store.apply(&ops, true).unwrap();
            (dir, store)
        };
        // Memtables of the tasks' keyspace sealed so far, flushed or not.
        let sealed =
            |store: &Store| store.tasks.sealed_memtable_count() + store.tasks.table_count();
        // The write that passes the size only asks for a rotation (fjall decides it at once,
        // so a store under its size has none coming); a worker carries it out.
        let (_dir, large) = filled(StoreOptions::default());
        assert_eq!(sealed(&large), 0, "3 MiB fit in 64 MiB");
        let (_dir, small) = filled(StoreOptions {
            memtable_bytes: 1024 * 1024,
            ..StoreOptions::default()
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while sealed(&small) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(sealed(&small) >= 1, "3 MiB do not fit in 1 MiB");
    }

    #[test]
    fn flushed_memtables_leave_every_write_in_tables_and_little_journal() {
        let dir = tempfile::tempdir().unwrap();
        let spec = PipelineSpec {
            name: "s".into(),
            ..PipelineSpec::default()
        };
        let id = spec_id(&spec);
        let name = |n: u64| format!("tenants/t/applications/a/pipelines/p/tasks/{n:0>32}");
        let mut ops = vec![Op::PutSpec {
            id,
            spec: spec.encode_to_vec(),
        }];
        ops.extend((1..=100u64).map(|n| Op::PutTask(record(&name(n), n, id))));
        {
            let store = Store::open(dir.path()).unwrap();
            store.apply(&ops, true).unwrap();
            assert_eq!(
                store.tasks.table_count(),
                0,
                "the writes are in the memtable"
            );
            let journals = store.db.journal_count();
            store.flush_memtables().unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while (store.flushing() || store.tasks.table_count() == 0)
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert!(!store.flushing());
            assert_eq!(store.tasks.table_count(), 1);
            assert_eq!(store.specs.table_count(), 1);
            // The sealed journal is dropped once both keyspaces' memtables are flushed.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while store.db.journal_count() > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert_eq!(
                store.db.journal_count(),
                1,
                "was {journals} before the flush"
            );
        }
        let store = Store::open(dir.path()).unwrap();
        let contents = store.load().unwrap();
        assert_eq!(contents.tasks.len(), 100);
        assert_eq!(contents.tasks[99], record(&name(100), 100, id));
        assert_eq!(contents.specs[&id], spec);
    }

    #[test]
    fn writes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let spec = PipelineSpec {
            name: "s".into(),
            ..PipelineSpec::default()
        };
        let id = spec_id(&spec);
        // Ids "…a", "…b", "…c" (the last hex digit), in that order on disk.
        let name = |n: &str| format!("tenants/t/applications/a/pipelines/p/tasks/{:0>32}", n);
        let put = |n: &str, seq| Op::PutTask(record(&name(n), seq, id));
        let delete = |n: &str| Op::DeleteTask {
            pipeline: "tenants/t/applications/a/pipelines/p".into(),
            key: TaskKey::parse_name(&name(n)).unwrap().1,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .apply(
                    &[
                        Op::PutSpec {
                            id,
                            spec: spec.encode_to_vec(),
                        },
                        put("a", 1),
                        put("b", 1),
                    ],
                    true,
                )
                .unwrap();
            store.apply(&[delete("a")], true).unwrap();
            // One batch that writes a task twice, then deletes and writes another: the last
            // write of each key is what stays.
            store
                .apply(&[put("c", 1), put("c", 2), delete("b"), put("b", 1)], true)
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let contents = store.load().unwrap();
        assert_eq!(
            contents.tasks,
            vec![record(&name("b"), 1, id), record(&name("c"), 2, id)]
        );
        assert_eq!(contents.specs[&id], spec);
    }

    #[test]
    fn a_deleted_spec_is_gone_and_the_last_write_of_a_spec_wins() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |name: &str| PipelineSpec {
            name: name.into(),
            ..PipelineSpec::default()
        };
        let put = |s: &PipelineSpec| Op::PutSpec {
            id: spec_id(s),
            spec: s.encode_to_vec(),
        };
        let delete = |s: &PipelineSpec| Op::DeleteSpec { id: spec_id(s) };
        let (a, b, c) = (spec("a"), spec("b"), spec("c"));
        {
            let store = Store::open(dir.path()).unwrap();
            store.apply(&[put(&a), put(&b)], true).unwrap();
            store.apply(&[delete(&a)], true).unwrap();
            // In one batch: b deleted then written again stays; c written then deleted goes.
            store
                .apply(&[delete(&b), put(&b), put(&c), delete(&c)], true)
                .unwrap();
        }
        let specs = Store::open(dir.path()).unwrap().read_specs(None).unwrap();
        assert_eq!(specs.into_values().collect::<Vec<_>>(), vec![b]);
    }

    #[test]
    fn a_format_1_data_dir_is_converted_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut stored = StoredTask {
            task: Some(task(NAME)),
            spec_id: vec![3; 32],
            client_priority: 2,
            seq: 9,
            lease_id: "lease-1".into(),
        };
        {
            // What a format-1 shard left: whole tasks in the keyspace `tasks`.
            let db = Database::builder(dir.path()).open().unwrap();
            let old = db
                .keyspace(FORMAT_1_TASKS, KeyspaceCreateOptions::default)
                .unwrap();
            old.insert(NAME, stored.encode_to_vec()).unwrap();
            old.insert("not a task name", stored.encode_to_vec())
                .unwrap();
            db.persist(PersistMode::SyncAll).unwrap();
        }
        let expected = Record::from_stored(stored.clone()).unwrap();
        for _ in 0..2 {
            let store = Store::open(dir.path()).unwrap();
            assert!(!store.db.keyspace_exists(FORMAT_1_TASKS));
            assert_eq!(store.load().unwrap().tasks, vec![expected.clone()]);
        }
        stored.task = None;
        assert!(Record::from_stored(stored).is_none());
    }
}
