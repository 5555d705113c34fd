//! The map of every task the shard holds, by name.
//!
//! One `HashMap` of a million records stalls the scheduler's lock while it grows: doubling it
//! moves every record and hashes every key again (tens of milliseconds at a million, seen as
//! the submit tail). Split over [`PARTS`] maps chosen by a hash of the name, each growth moves
//! only its part's records, 1/64 of the whole.

use std::collections::HashMap;
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

use super::TaskRecord;

/// Maps the tasks are spread over (a power of two).
const PARTS: usize = 64;

pub(super) struct TaskMap {
    parts: Vec<HashMap<Arc<str>, TaskRecord>>,
    len: usize,
}

fn part(name: &str) -> usize {
    xxh3_64(name.as_bytes()) as usize & (PARTS - 1)
}

impl TaskMap {
    pub fn new() -> Self {
        Self {
            parts: (0..PARTS).map(|_| HashMap::new()).collect(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, name: &str) -> Option<&TaskRecord> {
        self.parts[part(name)].get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut TaskRecord> {
        self.parts[part(name)].get_mut(name)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.parts[part(name)].contains_key(name)
    }

    pub fn insert(&mut self, name: Arc<str>, record: TaskRecord) {
        if self.parts[part(&name)].insert(name, record).is_none() {
            self.len += 1;
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<TaskRecord> {
        let removed = self.parts[part(name)].remove(name);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }
}
