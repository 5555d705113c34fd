//! The metadata store: a small ordered key-value map with revisions, shaped like etcd so the
//! etcd implementation is a thin adapter. Values are opaque bytes (encoded protos).
//!
//! Every mutation bumps a store-wide revision; a key's `mod_revision` is the revision of its
//! last write. Conditional writes compare it, which is how stateless replicas of
//! tenant-service create-if-absent and update versions without lost updates.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A conditional write found another revision.
    #[error("key {key} changed concurrently (expected revision {expected}, found {found})")]
    Conflict {
        key: String,
        expected: u64,
        found: u64,
    },
    /// The backing store could not be reached; retrying may help.
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    /// The local file of the embedded store failed.
    #[error("metadata store i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// More writes in one [`MetadataStore::put_all`] than one transaction holds: a caller's
    /// bug, refused before anything is written.
    #[error("{writes} writes in one transaction; at most {MAX_PUT_ALL}")]
    TooManyWrites { writes: usize },
}

/// Most writes in one [`MetadataStore::put_all`]: etcd's default `--max-txn-ops`, which
/// bounds each branch of a transaction (the compares, the writes, the reads on failure).
/// The embedded store keeps the same limit, so `pm dev` refuses what a cluster would.
pub const MAX_PUT_ALL: usize = 128;

/// [`Error::TooManyWrites`] past [`MAX_PUT_ALL`].
pub fn check_put_all<T>(writes: &[T]) -> Result<()> {
    if writes.len() > MAX_PUT_ALL {
        return Err(Error::TooManyWrites {
            writes: writes.len(),
        });
    }
    Ok(())
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last write of this key.
    pub mod_revision: u64,
}

/// What a conditional write expects of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Write whatever is there.
    Any,
    /// The key must not exist.
    Absent,
    /// The key must be at this revision.
    Revision(u64),
}

#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Writes `value` if `expect` holds; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64>;
    /// Writes every `(key, value, expect)` if every `expect` holds, all or none, in one
    /// revision; returns it. A failed expectation is the first one's [`Error::Conflict`].
    /// At most [`MAX_PUT_ALL`] writes.
    async fn put_all(&self, writes: Vec<(String, Vec<u8>, Expect)>) -> Result<u64>;
    /// Deletes the key if `expect` holds; `Ok(false)` when it did not exist.
    async fn delete(&self, key: &str, expect: Expect) -> Result<bool>;
    /// Keys with `prefix`, in key order, strictly after `start_after` (if non-empty).
    async fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<KeyValue>>;
    /// How many keys have `prefix` (values are not read where the store can avoid it).
    async fn count(&self, prefix: &str) -> Result<u64>;
}

/// The single-process store of `pm dev` and of a tenant-service without etcd: an fjall
/// database in one directory. A change is one fjall batch (its entries and the new revision)
/// synced before it is answered, so it costs the size of the change, not of the store; reads
/// go to fjall and never wait for a write's fsync. Writes are serialized by one lock, which
/// is what makes a conditional write's check and its write atomic.
pub struct EmbeddedStore {
    db: Option<Db>,
    /// Held by writers; `None` in memory (tests) keeps the entries here.
    state: Mutex<State>,
}

struct Db {
    path: PathBuf,
    db: fjall::Database,
    /// Key -> the revision of its last write (8 bytes, little-endian), then the value.
    entries: fjall::Keyspace,
    /// [`REVISION_KEY`] -> the store-wide revision.
    meta: fjall::Keyspace,
}

/// The store-wide revision's key in the `meta` keyspace.
const REVISION_KEY: &[u8] = b"revision";

#[derive(Default)]
struct State {
    revision: u64,
    /// The entries of an in-memory store only.
    entries: BTreeMap<String, (Vec<u8>, u64)>,
}

/// The first format (one file, rewritten whole on every change), imported once at open.
const MAGIC: &[u8; 8] = b"pmmeta01";

impl EmbeddedStore {
    /// A store that forgets everything when dropped (tests).
    pub fn in_memory() -> Self {
        Self {
            db: None,
            state: Mutex::new(State::default()),
        }
    }

    /// A store persisted in the directory `path`, made if missing. A file of the first
    /// format at `path.bin` (`metadata.bin` beside a `metadata` directory) is imported once
    /// and renamed `*.bin.imported`.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let io = |source: io::Error| Error::Io {
            path: path.clone(),
            source,
        };
        let fjall = |e: fjall::Error| io(io::Error::other(e.to_string()));
        std::fs::create_dir_all(&path).map_err(io)?;
        let db = fjall::Database::builder(&path)
            // Synced by us, once per change (see `commit`).
            .manual_journal_persist(true)
            .open()
            .map_err(fjall)?;
        let entries = db
            .keyspace("entries", fjall::KeyspaceCreateOptions::default)
            .map_err(fjall)?;
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .map_err(fjall)?;
        let revision = match meta.get(REVISION_KEY).map_err(fjall)? {
            Some(bytes) => u64_of(&bytes).ok_or_else(|| io(corrupt("the revision")))?,
            None => 0,
        };
        let store = Self {
            db: Some(Db {
                path: path.clone(),
                db,
                entries,
                meta,
            }),
            state: Mutex::new(State {
                revision,
                entries: BTreeMap::new(),
            }),
        };
        let first_format = path.with_extension("bin");
        if first_format != path {
            store.import_first_format(&first_format)?;
        }
        Ok(store)
    }

    /// Imports a store of the first format at `file`, if there is one, then renames it.
    fn import_first_format(&self, file: &Path) -> Result<()> {
        let io = |source: io::Error| Error::Io {
            path: file.to_owned(),
            source,
        };
        if !file.is_file() {
            return Ok(());
        }
        let bytes = std::fs::read(file).map_err(io)?;
        let old = decode(&bytes).ok_or_else(|| io(corrupt("the first-format file")))?;
        let mut state = self.state.lock().expect("metadata lock poisoned");
        let writes = old
            .entries
            .into_iter()
            .map(|(key, (value, rev))| (key, Some((value, rev))))
            .collect();
        let revision = old.revision.max(state.revision);
        self.commit(&mut state, revision, writes)?;
        let mut imported = file.as_os_str().to_owned();
        imported.push(".imported");
        std::fs::rename(file, imported).map_err(io)?;
        tracing::info!(file = %file.display(), "metadata of the first format imported");
        Ok(())
    }

    /// The revision and value of `key` now.
    fn read(&self, state: Option<&State>, key: &str) -> Result<Option<(u64, Vec<u8>)>> {
        match &self.db {
            None => {
                let state = state.expect("an in-memory store is read under its lock");
                Ok(state.entries.get(key).map(|(v, rev)| (*rev, v.clone())))
            }
            Some(db) => {
                let Some(bytes) = db.entries.get(key).map_err(|e| db.error(e))? else {
                    return Ok(None);
                };
                entry(&bytes).map(Some).ok_or_else(|| db.corrupt(key))
            }
        }
    }

    /// Makes `writes` (a value and its revision, or a delete) and the store's `revision`
    /// durable in one batch, then current.
    #[allow(clippy::type_complexity)] // key -> (value, revision) or a delete
    fn commit(
        &self,
        state: &mut State,
        revision: u64,
        writes: Vec<(String, Option<(Vec<u8>, u64)>)>,
    ) -> Result<()> {
        let Some(db) = &self.db else {
            for (key, write) in writes {
                match write {
                    Some(entry) => state.entries.insert(key, entry),
                    None => state.entries.remove(&key),
                };
            }
            state.revision = revision;
            return Ok(());
        };
        let mut batch = db.db.batch();
        for (key, write) in &writes {
            match write {
                Some((value, rev)) => {
                    let mut bytes = Vec::with_capacity(8 + value.len());
                    bytes.extend_from_slice(&rev.to_le_bytes());
                    bytes.extend_from_slice(value);
                    batch.insert(&db.entries, key.as_str(), bytes)
                }
                None => batch.remove(&db.entries, key.as_str()),
            }
        }
        batch.insert(&db.meta, REVISION_KEY, revision.to_le_bytes());
        batch.commit().map_err(|e| db.error(e))?;
        db.db
            .persist(fjall::PersistMode::SyncData)
            .map_err(|e| db.error(e))?;
        state.revision = revision;
        Ok(())
    }

    /// Runs `f` on the current revision under the writers' lock; the writes it returns (and
    /// its output) are made durable in one revision, if any.
    #[allow(clippy::type_complexity)] // as in `commit`
    fn mutate<T>(
        &self,
        f: impl FnOnce(&Self, &State, u64) -> Result<(T, Vec<(String, Option<(Vec<u8>, u64)>)>)>,
    ) -> Result<T> {
        let mut state = self.state.lock().expect("metadata lock poisoned");
        let next = state.revision + 1;
        let (out, writes) = f(self, &state, next)?;
        if !writes.is_empty() {
            self.commit(&mut state, next, writes)?;
        }
        Ok(out)
    }
}

impl Db {
    fn error(&self, e: fjall::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source: io::Error::other(e.to_string()),
        }
    }

    fn corrupt(&self, what: &str) -> Error {
        Error::Io {
            path: self.path.clone(),
            source: corrupt(&format!("the entry {what:?}")),
        }
    }
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt metadata: {what}"),
    )
}

fn u64_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// A stored entry: its revision and value.
fn entry(bytes: &[u8]) -> Option<(u64, Vec<u8>)> {
    Some((u64_of(bytes)?, bytes.get(8..)?.to_vec()))
}

/// `Ok` if `expect` holds for `key` at revision `current` (`None`: absent); else the conflict.
pub(crate) fn check(key: &str, expect: Expect, current: Option<u64>) -> Result<()> {
    let found = current.unwrap_or(0);
    let ok = match expect {
        Expect::Any => true,
        Expect::Absent => current.is_none(),
        Expect::Revision(r) => current == Some(r),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Conflict {
            key: key.to_owned(),
            expected: match expect {
                Expect::Revision(r) => r,
                _ => 0,
            },
            found,
        })
    }
}

#[async_trait]
impl MetadataStore for EmbeddedStore {
    async fn count(&self, prefix: &str) -> Result<u64> {
        let Some(db) = &self.db else {
            let state = self.state.lock().expect("metadata lock poisoned");
            return Ok(state
                .entries
                .range::<str, _>((
                    std::ops::Bound::Included(prefix),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| k.starts_with(prefix))
                .count() as u64);
        };
        let mut n = 0;
        for guard in db.entries.prefix(prefix) {
            guard.key().map_err(|e| db.error(e))?;
            n += 1;
        }
        Ok(n)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let state = self
            .db
            .is_none()
            .then(|| self.state.lock().expect("metadata lock poisoned"));
        Ok(self
            .read(state.as_deref(), key)?
            .map(|(mod_revision, value)| KeyValue {
                key: key.to_owned(),
                value,
                mod_revision,
            }))
    }

    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64> {
        self.mutate(|store, state, next| {
            check(key, expect, store.read(Some(state), key)?.map(|e| e.0))?;
            Ok((next, vec![(key.to_owned(), Some((value, next)))]))
        })
    }

    async fn put_all(&self, writes: Vec<(String, Vec<u8>, Expect)>) -> Result<u64> {
        check_put_all(&writes)?;
        self.mutate(|store, state, next| {
            for (key, _, expect) in &writes {
                check(key, *expect, store.read(Some(state), key)?.map(|e| e.0))?;
            }
            let writes = writes
                .into_iter()
                .map(|(key, value, _)| (key, Some((value, next))))
                .collect();
            Ok((next, writes))
        })
    }

    async fn delete(&self, key: &str, expect: Expect) -> Result<bool> {
        self.mutate(|store, state, _| {
            let current = store.read(Some(state), key)?.map(|e| e.0);
            if current.is_none() && expect == Expect::Any {
                return Ok((false, Vec::new()));
            }
            check(key, expect, current)?;
            Ok((current.is_some(), vec![(key.to_owned(), None)]))
        })
    }

    async fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<KeyValue>> {
        let from = if start_after.is_empty() {
            prefix
        } else {
            start_after
        };
        let after = |k: &str| k != start_after && k.starts_with(prefix);
        let Some(db) = &self.db else {
            let state = self.state.lock().expect("metadata lock poisoned");
            return Ok(state
                .entries
                .range::<str, _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
                .skip_while(|(k, _)| k.as_str() == start_after)
                .take_while(|(k, _)| k.starts_with(prefix))
                .take(limit)
                .map(|(k, (v, rev))| KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                    mod_revision: *rev,
                })
                .collect());
        };
        let mut out = Vec::new();
        for guard in db.entries.range(from..) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = guard.into_inner().map_err(|e| db.error(e))?;
            let key = String::from_utf8(key.to_vec()).map_err(|_| db.corrupt("a key"))?;
            if key == start_after {
                continue;
            }
            if !after(&key) {
                break;
            }
            let (mod_revision, value) = entry(&value).ok_or_else(|| db.corrupt(&key))?;
            out.push(KeyValue {
                key,
                value,
                mod_revision,
            });
        }
        Ok(out)
    }
}

fn decode(bytes: &[u8]) -> Option<State> {
    let mut rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let revision = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let mut entries = BTreeMap::new();
    // The file is replaced whole by rename, so it ends exactly after a record.
    while let Some(len) = take(4) {
        let key_len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        let key = String::from_utf8(take(key_len)?.to_vec()).ok()?;
        let value_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let value = take(value_len)?.to_vec();
        let rev = u64::from_le_bytes(take(8)?.try_into().ok()?);
        entries.insert(key, (value, rev));
    }
    Some(State { revision, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conditional_writes_listing_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.bin");
        let store = EmbeddedStore::open(&path).unwrap();
        let r2 = crate::testing::check_store_contract(&store).await;
        drop(store);

        let reopened = EmbeddedStore::open(&path).unwrap();
        let keys = |kvs: Vec<KeyValue>| kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
        let kv = reopened.get("/a/1").await.unwrap().unwrap();
        assert_eq!(
            (kv.value.as_slice(), kv.mod_revision),
            (b"uno".as_slice(), r2)
        );
        assert!(reopened.get("/a/2").await.unwrap().is_none());
        assert_eq!(
            keys(reopened.list("/", "", 10).await.unwrap()),
            ["/a/1", "/b/1"]
        );
        // Revisions keep growing after a reopen.
        assert!(reopened.put("/c", vec![], Expect::Any).await.unwrap() > r2);
    }

    #[tokio::test]
    async fn the_in_memory_store_keeps_the_same_contract() {
        crate::testing::check_store_contract(&EmbeddedStore::in_memory()).await;
    }

    /// A `pm dev` data directory from before: `metadata.bin` of the first format.
    #[tokio::test]
    async fn a_store_of_the_first_format_is_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&7u64.to_le_bytes());
        for (key, value, rev) in [("/t/a", b"x".as_slice(), 3u64), ("/t/b", b"yz", 7)] {
            file.extend_from_slice(&(key.len() as u32).to_le_bytes());
            file.extend_from_slice(key.as_bytes());
            file.extend_from_slice(&(value.len() as u32).to_le_bytes());
            file.extend_from_slice(value);
            file.extend_from_slice(&rev.to_le_bytes());
        }
        std::fs::write(dir.path().join("metadata.bin"), &file).unwrap();

        let store = EmbeddedStore::open(dir.path().join("metadata")).unwrap();
        let listed: Vec<(String, Vec<u8>, u64)> = store
            .list("/t/", "", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|kv| (kv.key, kv.value, kv.mod_revision))
            .collect();
        assert_eq!(
            listed,
            [
                ("/t/a".to_owned(), b"x".to_vec(), 3),
                ("/t/b".to_owned(), b"yz".to_vec(), 7)
            ]
        );
        assert!(!dir.path().join("metadata.bin").exists());
        assert!(dir.path().join("metadata.bin.imported").is_file());
        // The revision continues from the old store's, and a conditional write sees the
        // imported revision.
        assert_eq!(
            store
                .put("/t/a", b"w".to_vec(), Expect::Revision(3))
                .await
                .unwrap(),
            8
        );
        drop(store);
        // Imported once: a reopen reads its own directory.
        let store = EmbeddedStore::open(dir.path().join("metadata")).unwrap();
        assert_eq!(store.get("/t/a").await.unwrap().unwrap().mod_revision, 8);
        assert_eq!(store.put("/t/c", vec![], Expect::Absent).await.unwrap(), 9);
    }
}
