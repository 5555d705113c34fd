//! The metadata store: a small ordered key-value map with revisions, shaped like etcd so the
//! etcd implementation is a thin adapter. Values are opaque bytes (encoded protos).
//!
//! Every mutation bumps a store-wide revision; a key's `mod_revision` is the revision of its
//! last write. Conditional writes compare it, which is how stateless replicas of
//! tenant-service create-if-absent and update versions without lost updates.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
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
    async fn put_all(&self, writes: Vec<(String, Vec<u8>, Expect)>) -> Result<u64>;
    /// Deletes the key if `expect` holds; `Ok(false)` when it did not exist.
    async fn delete(&self, key: &str, expect: Expect) -> Result<bool>;
    /// Keys with `prefix`, in key order, strictly after `start_after` (if non-empty).
    async fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<KeyValue>>;
}

#[derive(Default)]
struct State {
    revision: u64,
    entries: BTreeMap<String, (Vec<u8>, u64)>,
}

/// The single-process store of `pm dev`: a map in memory, written through to one file
/// (temp file, fsync, rename) on every change. Metadata changes are rare and small, so a
/// whole-file rewrite keeps the format trivial and every state on disk complete.
pub struct EmbeddedStore {
    path: Option<PathBuf>,
    state: Mutex<State>,
}

const MAGIC: &[u8; 8] = b"pmmeta01";

impl EmbeddedStore {
    /// A store that forgets everything when dropped (tests).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            state: Mutex::new(State::default()),
        }
    }

    /// A store persisted at `path`, loaded from it when it exists.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let state = match std::fs::File::open(&path) {
            Ok(mut file) => {
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                decode(&bytes).ok_or_else(|| Error::Io {
                    path: path.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidData, "corrupt metadata file"),
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(Error::Io { path, source }),
        };
        Ok(Self {
            path: Some(path),
            state: Mutex::new(state),
        })
    }

    fn mutate<T>(&self, f: impl FnOnce(&mut State) -> Result<(T, bool)>) -> Result<T> {
        let mut state = self.state.lock().expect("metadata lock poisoned");
        let mut next = State {
            revision: state.revision,
            entries: state.entries.clone(),
        };
        let (out, changed) = f(&mut next)?;
        if changed {
            if let Some(path) = &self.path {
                persist(path, &next).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
            }
            *state = next;
        }
        Ok(out)
    }
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
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let state = self.state.lock().expect("metadata lock poisoned");
        Ok(state.entries.get(key).map(|(value, rev)| KeyValue {
            key: key.to_owned(),
            value: value.clone(),
            mod_revision: *rev,
        }))
    }

    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64> {
        self.mutate(|state| {
            check(key, expect, state.entries.get(key).map(|e| e.1))?;
            state.revision += 1;
            let revision = state.revision;
            state.entries.insert(key.to_owned(), (value, revision));
            Ok((revision, true))
        })
    }

    async fn put_all(&self, writes: Vec<(String, Vec<u8>, Expect)>) -> Result<u64> {
        self.mutate(|state| {
            for (key, _, expect) in &writes {
                check(key, *expect, state.entries.get(key).map(|e| e.1))?;
            }
            state.revision += 1;
            let revision = state.revision;
            for (key, value, _) in writes {
                state.entries.insert(key, (value, revision));
            }
            Ok((revision, true))
        })
    }

    async fn delete(&self, key: &str, expect: Expect) -> Result<bool> {
        self.mutate(|state| {
            let current = state.entries.get(key).map(|e| e.1);
            if current.is_none() && expect == Expect::Any {
                return Ok((false, false));
            }
            check(key, expect, current)?;
            state.revision += 1;
            Ok((state.entries.remove(key).is_some(), true))
        })
    }

    async fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<KeyValue>> {
        let state = self.state.lock().expect("metadata lock poisoned");
        let from = if start_after.is_empty() {
            prefix
        } else {
            start_after
        };
        Ok(state
            .entries
            .range::<str, _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
            .filter(|(k, _)| k.as_str() != start_after)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, (v, rev))| KeyValue {
                key: k.clone(),
                value: v.clone(),
                mod_revision: *rev,
            })
            .collect())
    }
}

fn persist(path: &Path, state: &State) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(64 + state.entries.len() * 64);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&state.revision.to_le_bytes());
    for (key, (value, rev)) in &state.entries {
        bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
        bytes.extend_from_slice(value);
        bytes.extend_from_slice(&rev.to_le_bytes());
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_data()?;
    std::fs::rename(&tmp, path)?;
    // The rename is durable only once the directory is.
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
}
