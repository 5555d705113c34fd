//! The task store: the shard's tasks on its own disk, in fjall.
//!
//! Two keyspaces: `tasks` (task name -> `StoredTask`) and `specs` (SHA-256 of an encoded spec
//! -> the spec), so a pipeline version shared by a million tasks is stored once. Writes go
//! through [`crate::journal`], which batches them and syncs once per batch; this module only
//! knows how to apply a batch and how to read everything back at start.
//!
//! Records are encoded here, on the journal's thread, not by the scheduler under its lock.
//! A batch may change one task twice (its dispatch and its result can share a group commit,
//! since an Assign no longer waits for its dispatch record): fjall gives every item of a batch
//! the same sequence number, so [`Store::apply`] keeps only the last write of each key, which
//! is what applying the ops one by one would leave.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use prost::Message;

use pm_proto::internal::v1::StoredTask;
use pm_proto::v1::{PipelineSpec, Task};

pub use pm_spec::{SpecId, spec_id};

/// One write.
#[derive(Debug, Clone)]
pub enum Op {
    /// A task's record, under its name (encoded on the journal's thread).
    PutTask(Record),
    DeleteTask {
        name: String,
    },
    PutSpec {
        id: SpecId,
        spec: Vec<u8>,
    },
}

/// A task's disk record (a `StoredTask`) by its parts, sharing the task with the scheduler's
/// memory: making a write copies no task.
#[derive(Debug, Clone)]
pub struct Record {
    pub task: Arc<Task>,
    pub spec_id: SpecId,
    pub client_priority: u32,
    pub seq: u64,
    /// The lease of an IN_PROGRESS task.
    pub lease_id: Option<Arc<str>>,
}

impl Record {
    /// The parts of a decoded `StoredTask`; `None` without a task or with a malformed spec id.
    pub fn from_stored(stored: StoredTask) -> Option<Self> {
        Some(Self {
            task: Arc::new(stored.task?),
            spec_id: SpecId::try_from(stored.spec_id.as_slice()).ok()?,
            client_priority: stored.client_priority,
            seq: stored.seq,
            lease_id: (!stored.lease_id.is_empty()).then(|| stored.lease_id.as_str().into()),
        })
    }

    /// The same bytes as the equivalent `StoredTask::encode_to_vec`, written from borrowed
    /// parts (prost's own field encoders, field numbers of `pm/internal/v1/store.proto`).
    pub fn encode(&self) -> Vec<u8> {
        use prost::encoding::{self, WireType};
        let lease = self.lease_id.as_deref().unwrap_or("");
        let mut buf = Vec::with_capacity(self.task.encoded_len() + 96 + lease.len());
        encoding::message::encode(1, &*self.task, &mut buf);
        encoding::encode_key(2, WireType::LengthDelimited, &mut buf);
        encoding::encode_varint(self.spec_id.len() as u64, &mut buf);
        buf.extend_from_slice(&self.spec_id);
        if self.client_priority != 0 {
            encoding::uint32::encode(3, &self.client_priority, &mut buf);
        }
        if self.seq != 0 {
            encoding::uint64::encode(4, &self.seq, &mut buf);
        }
        if !lease.is_empty() {
            encoding::encode_key(5, WireType::LengthDelimited, &mut buf);
            encoding::encode_varint(lease.len() as u64, &mut buf);
            buf.extend_from_slice(lease.as_bytes());
        }
        buf
    }

    /// The `StoredTask` these parts make (for a handoff).
    pub fn to_stored(&self) -> StoredTask {
        StoredTask {
            task: Some((*self.task).clone()),
            spec_id: self.spec_id.to_vec(),
            client_priority: self.client_priority,
            seq: self.seq,
            lease_id: self.lease_id.as_deref().unwrap_or("").to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("task store: {0}")]
pub struct StoreError(pub String);

impl From<fjall::Error> for StoreError {
    fn from(e: fjall::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// Everything on disk, read back at start.
#[derive(Default)]
pub struct Contents {
    pub tasks: Vec<StoredTask>,
    pub specs: HashMap<SpecId, PipelineSpec>,
}

pub struct Store {
    db: Database,
    tasks: Keyspace,
    specs: Keyspace,
    /// `SyncData`, except in the benchmark-only unsynced mode.
    persist: PersistMode,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, true)
    }

    /// With `fsync` false, writes reach the OS but are not synced before acknowledgement:
    /// a machine crash loses acknowledged tasks. Only for measuring what the fsync costs
    /// (`pm-shard --unsafe-no-fsync`, like etcd's flag of the same name).
    pub fn open_with(dir: &Path, fsync: bool) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        let db = Database::builder(dir)
            // We sync ourselves, once per group commit.
            .manual_journal_persist(true)
            .open()?;
        let tasks = db.keyspace("tasks", KeyspaceCreateOptions::default)?;
        let specs = db.keyspace("specs", KeyspaceCreateOptions::default)?;
        let persist = if fsync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        Ok(Self {
            db,
            tasks,
            specs,
            persist,
        })
    }

    /// Applies `ops` atomically and makes them durable (fdatasync) before returning.
    pub fn apply<'a>(&self, ops: impl IntoIterator<Item = &'a Op>) -> Result<(), StoreError> {
        let ops: Vec<&Op> = ops.into_iter().collect();
        // The last write of each task wins (see the module doc).
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::PutTask(record) => last.insert(record.task.name.as_str(), i),
                Op::DeleteTask { name } => last.insert(name.as_str(), i),
                Op::PutSpec { .. } => None,
            };
        }
        let mut batch = self.db.batch();
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::PutTask(record) if last[record.task.name.as_str()] != i => {}
                Op::DeleteTask { name } if last[name.as_str()] != i => {}
                Op::PutTask(record) => {
                    batch.insert(&self.tasks, record.task.name.as_bytes(), record.encode())
                }
                Op::DeleteTask { name } => batch.remove(&self.tasks, name.as_bytes()),
                Op::PutSpec { id, spec } => {
                    batch.insert(&self.specs, id.as_slice(), spec.as_slice())
                }
            }
        }
        batch.commit()?;
        self.db.persist(self.persist)?;
        Ok(())
    }

    /// Reads every task and spec.
    pub fn load(&self) -> Result<Contents, StoreError> {
        let mut contents = Contents::default();
        for guard in self.specs.iter() {
            let (key, value) = guard.into_inner()?;
            let id: SpecId = key
                .as_ref()
                .try_into()
                .map_err(|_| StoreError("a spec key is not 32 bytes".into()))?;
            let spec = PipelineSpec::decode(value.as_ref())
                .map_err(|e| StoreError(format!("undecodable spec: {e}")))?;
            contents.specs.insert(id, spec);
        }
        for guard in self.tasks.iter() {
            let (key, value) = guard.into_inner()?;
            let task = StoredTask::decode(value.as_ref()).map_err(|e| {
                StoreError(format!(
                    "undecodable task {}: {e}",
                    String::from_utf8_lossy(&key)
                ))
            })?;
            contents.tasks.push(task);
        }
        Ok(contents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_encodes_as_its_stored_task_does() {
        let task = Task {
            name: "tenants/t/applications/a/pipelines/p/tasks/x".into(),
            params: [("k".to_owned(), "v".to_owned())].into(),
            attempt: 3,
            state: 2,
            ..Task::default()
        };
        for (client_priority, seq, lease) in [(0, 0, None), (7, 1 << 40, Some("l1-2a"))] {
            let record = Record {
                task: Arc::new(task.clone()),
                spec_id: [9; 32],
                client_priority,
                seq,
                lease_id: lease.map(Into::into),
            };
            let stored = record.to_stored();
            assert_eq!(record.encode(), stored.encode_to_vec());
            assert_eq!(
                StoredTask::decode(record.encode().as_slice()).unwrap(),
                stored
            );
        }
    }

    #[test]
    fn writes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let spec = PipelineSpec {
            name: "s".into(),
            ..PipelineSpec::default()
        };
        let id = spec_id(&spec);
        let record = |name: &str| StoredTask {
            task: Some(Task {
                name: name.into(),
                ..Task::default()
            }),
            spec_id: id.to_vec(),
            seq: 1,
            ..StoredTask::default()
        };
        let put = |stored: StoredTask| Op::PutTask(Record::from_stored(stored).unwrap());
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .apply(&[
                    Op::PutSpec {
                        id,
                        spec: spec.encode_to_vec(),
                    },
                    put(record("a")),
                    put(record("b")),
                ])
                .unwrap();
            store.apply(&[Op::DeleteTask { name: "a".into() }]).unwrap();
            // One batch that writes a task twice, then deletes and writes another: the last
            // write of each key is what stays.
            let mut second = record("c");
            second.seq = 2;
            store
                .apply(&[
                    put(record("c")),
                    put(second.clone()),
                    Op::DeleteTask { name: "b".into() },
                    put(record("b")),
                ])
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let contents = store.load().unwrap();
        let mut c = record("c");
        c.seq = 2;
        assert_eq!(contents.tasks, vec![record("b"), c]);
        assert_eq!(contents.specs[&id], spec);
    }
}
