//! The map of every task the shard holds, by name.
//!
//! One `HashMap` of a million records stalls the scheduler's lock while it grows: doubling it
//! moves every record and hashes every key again (tens of milliseconds at a million, seen as
//! the submit tail). Split over [`PARTS`] maps chosen by a hash of the name, each growth moves
//! only its part's records, 1/64 of the whole. Records hold their task behind an `Arc`, so
//! what moves is small. Keys are hashed with xxh3, not SipHash: names are ours (a random
//! UUIDv7 each), so no client can aim at one bucket.

use std::collections::HashMap;
use std::sync::Arc;

use xxhash_rust::xxh3::{Xxh3DefaultBuilder, xxh3_64_with_seed};

use super::TaskRecord;

/// Maps the tasks are spread over (a power of two).
const PARTS: usize = 64;

/// Seed of the part choice: independent of the hash each part's map uses.
const PART_SEED: u64 = 0x706d_7061_7274;

type Part = HashMap<Arc<str>, TaskRecord, Xxh3DefaultBuilder>;

pub(super) struct TaskMap {
    parts: Vec<Part>,
    len: usize,
}

fn part(name: &str) -> usize {
    xxh3_64_with_seed(name.as_bytes(), PART_SEED) as usize & (PARTS - 1)
}

impl TaskMap {
    pub fn new() -> Self {
        Self {
            parts: (0..PARTS).map(|_| Part::default()).collect(),
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
