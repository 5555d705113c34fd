//! The map of every task the shard holds, by key.
//!
//! Records live in one slab (`Vec`), found through an index of key -> slot. A hash map of the
//! records themselves was sized in powers of two and, with its entries spread at random,
//! touched every page of its capacity: the slab took 169 MiB off a shard holding a million
//! READY tasks (perf/RESULTS.md). The slab holds
//! records densely (a freed slot is reused) and the index entries are 20 bytes. The index is
//! split over [`PARTS`] maps chosen by the key's random low bits, so growing it rehashes only
//! 1/64 of it at a time, never a million entries under the scheduler's lock; the slab grows by
//! reallocation, which moves no pages for a large allocation. Keys are hashed with xxh3, not
//! SipHash: keys are ours (a UUIDv7 each, with 74 random bits), so no client can aim at one
//! bucket. Neither shrinks: slots freed by retention are reused by later tasks.

use std::collections::HashMap;

use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use super::TaskRecord;
use crate::key::TaskKey;

/// Maps the index is spread over (a power of two).
const PARTS: usize = 64;

type Part = HashMap<TaskKey, Slot, Xxh3DefaultBuilder>;

/// Where a record is in the slab; valid until the record is removed.
pub(super) type Slot = u32;

pub(super) struct TaskMap {
    index: Vec<Part>,
    slots: Vec<Option<TaskRecord>>,
    /// Empty slots, reused first.
    free: Vec<Slot>,
}

/// The part of a key: its low bits, random in a UUIDv7.
fn part(key: TaskKey) -> usize {
    key.0 as usize & (PARTS - 1)
}

impl TaskMap {
    /// A map with room for `tasks` (those read at start), so replaying them grows nothing.
    pub fn with_capacity(tasks: usize) -> Self {
        // Parts fill unevenly; 1/8 more than the mean keeps nearly all from growing.
        let per_part = tasks / PARTS + tasks / PARTS / 8;
        Self {
            index: (0..PARTS)
                .map(|_| Part::with_capacity_and_hasher(per_part, Default::default()))
                .collect(),
            slots: Vec::with_capacity(tasks),
            free: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn slot(&self, key: TaskKey) -> Option<usize> {
        self.index[part(key)].get(&key).map(|&slot| slot as usize)
    }

    pub fn get(&self, key: TaskKey) -> Option<&TaskRecord> {
        self.slots[self.slot(key)?].as_ref()
    }

    pub fn get_mut(&mut self, key: TaskKey) -> Option<&mut TaskRecord> {
        let slot = self.slot(key)?;
        self.slots[slot].as_mut()
    }

    pub fn contains_key(&self, key: TaskKey) -> bool {
        self.index[part(key)].contains_key(&key)
    }

    /// The record at `slot` (from [`TaskMap::insert`], and not removed since).
    pub fn at_mut(&mut self, slot: Slot) -> Option<&mut TaskRecord> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// Adds or replaces the record of `key`; returns its slot.
    pub fn insert(&mut self, key: TaskKey, record: TaskRecord) -> Slot {
        if let Some(slot) = self.slot(key) {
            self.slots[slot] = Some(record);
            return slot as Slot;
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(record);
                slot
            }
            None => {
                self.slots.push(Some(record));
                Slot::try_from(self.slots.len() - 1).expect("fewer than 4 billion tasks")
            }
        };
        self.index[part(key)].insert(key, slot);
        slot
    }

    pub fn remove(&mut self, key: TaskKey) -> Option<TaskRecord> {
        let slot = self.index[part(key)].remove(&key)?;
        self.free.push(slot);
        self.slots[slot as usize].take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_costs_a_record_and_no_more() {
        // `Option` uses the record's own niche (its `Arc`s are never null).
        assert_eq!(
            std::mem::size_of::<Option<TaskRecord>>(),
            std::mem::size_of::<TaskRecord>()
        );
    }
}
