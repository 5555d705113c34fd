//! The map of every task the shard holds, by key.
//!
//! Records live in one slab, each beside its key, found through an index of slots. A
//! hash map of the records themselves was sized in powers of two and, with its entries spread
//! at random, touched every page of its capacity: the slab took 169 MiB off a shard holding a
//! million READY tasks (perf/RESULTS.md). The slab holds records densely (a freed slot is
//! reused). The index holds the 4-byte slot and 32 bits of the key's hash, compared through the
//! key in the slab (`hashbrown`'s `HashTable`): an entry costs 9 bytes where a map of key ->
//! slot cost 20 (~60 MiB at a million tasks, measured with heaptrack). The hash bits are kept
//! so growing the index rehashes without reading the slab: rehashing through it, one cache
//! miss per entry, took 7% of the shard's samples under batched submits. The index is split over
//! [`PARTS`] tables chosen by the key's random low bits, so growing it rehashes only 1/64 of
//! it at a time, never a million entries under the scheduler's lock. The slab is chunks of
//! [`CHUNK`] slots that never move: growing it adds a chunk. As one `Vec` it doubled, and
//! jemalloc's realloc of a large block copies it (glibc's remaps pages; jemalloc's does not):
//! 32 MiB at 262,144 tasks, 128 MiB at a million, copied and faulted in under the scheduler's
//! lock, stalled every submit for 17-25 ms and more, the longest acks at saturation, and left
//! the old copy behind as freed memory (perf/RESULTS.md, "The stall behind the longest acks").
//! Keys are hashed with xxh3, not SipHash: keys are ours (a UUIDv7 each, with 74 random
//! bits), so no client can aim at one bucket. Neither shrinks: slots freed by retention are
//! reused by later tasks.

use hashbrown::HashTable;
use xxhash_rust::xxh3::xxh3_64;

use super::TaskRecord;
use crate::key::TaskKey;

/// Tables the index is spread over (a power of two).
const PARTS: usize = 64;

/// Slots per chunk of the slab (2^[`CHUNK_BITS`]): 512 KiB of 128-byte slots, so a chunk is
/// made in microseconds and the last one, partly filled, has untouched pages only.
const CHUNK_BITS: u32 = 12;
const CHUNK: usize = 1 << CHUNK_BITS;

/// A slot of the slab: a record beside its key, or free.
type SlabSlot = Option<(TaskKey, TaskRecord)>;

/// The records, in chunks of [`CHUNK`] slots, each made full-size and never moved: a record
/// stays where it was put until it is removed, however many come after it.
#[derive(Default)]
struct Slab {
    chunks: Vec<Vec<SlabSlot>>,
    len: usize,
}

impl Slab {
    fn with_capacity(slots: usize) -> Self {
        Self {
            chunks: Vec::with_capacity(slots.div_ceil(CHUNK)),
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, slot: usize) -> Option<&SlabSlot> {
        self.chunks.get(slot >> CHUNK_BITS)?.get(slot & (CHUNK - 1))
    }

    fn get_mut(&mut self, slot: usize) -> Option<&mut SlabSlot> {
        self.chunks
            .get_mut(slot >> CHUNK_BITS)?
            .get_mut(slot & (CHUNK - 1))
    }

    /// Appends a slot; returns its index.
    fn push(&mut self, x: SlabSlot) -> usize {
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => last.push(x),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(x);
                self.chunks.push(chunk);
            }
        }
        self.len += 1;
        self.len - 1
    }
}

impl std::ops::Index<usize> for Slab {
    type Output = SlabSlot;

    fn index(&self, slot: usize) -> &SlabSlot {
        self.get(slot).expect("a slot of the slab")
    }
}

impl std::ops::IndexMut<usize> for Slab {
    fn index_mut(&mut self, slot: usize) -> &mut SlabSlot {
        self.get_mut(slot).expect("a slot of the slab")
    }
}

/// Slots of records, hashed by the key each record is stored beside.
type Part = HashTable<Entry>;

#[derive(Clone, Copy)]
struct Entry {
    slot: Slot,
    /// [`hash`] of the key at `slot`.
    hash: u32,
}

/// Where a record is in the slab; valid until the record is removed.
pub(super) type Slot = u32;

pub(super) struct TaskMap {
    index: Vec<Part>,
    slots: Slab,
    /// Empty slots, reused first.
    free: Vec<Slot>,
}

/// The part of a key: its low bits, random in a UUIDv7.
fn part(key: TaskKey) -> usize {
    key.0 as usize & (PARTS - 1)
}

/// 32 bits of the key's hash: what the index keeps of it.
fn hash(key: TaskKey) -> u32 {
    xxh3_64(&key.0.to_le_bytes()) as u32
}

/// The table's hash of an entry: its 32 bits spread over 64 (the table takes its tag from
/// the top bits and the bucket from the low ones).
fn spread(hash: u32) -> u64 {
    u64::from(hash).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Whether `entry` is the one of `key`, whose [`hash`] is `hash`: every indexed slot holds a
/// record.
fn is(slots: &Slab, entry: &Entry, key: TaskKey, hash: u32) -> bool {
    entry.hash == hash
        && slots[entry.slot as usize]
            .as_ref()
            .is_some_and(|(stored, _)| *stored == key)
}

impl TaskMap {
    /// A map with room for `tasks` (those read at start), so replaying them grows nothing.
    pub fn with_capacity(tasks: usize) -> Self {
        // Parts fill unevenly; 1/8 more than the mean keeps nearly all from growing.
        let per_part = tasks / PARTS + tasks / PARTS / 8;
        Self {
            index: (0..PARTS).map(|_| Part::with_capacity(per_part)).collect(),
            slots: Slab::with_capacity(tasks),
            free: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn slot(&self, key: TaskKey) -> Option<usize> {
        let (slots, h) = (&self.slots, hash(key));
        self.index[part(key)]
            .find(spread(h), |e| is(slots, e, key, h))
            .map(|e| e.slot as usize)
    }

    pub fn get(&self, key: TaskKey) -> Option<&TaskRecord> {
        let (_, record) = self.slots[self.slot(key)?].as_ref()?;
        Some(record)
    }

    pub fn get_mut(&mut self, key: TaskKey) -> Option<&mut TaskRecord> {
        let slot = self.slot(key)?;
        let (_, record) = self.slots[slot].as_mut()?;
        Some(record)
    }

    pub fn contains_key(&self, key: TaskKey) -> bool {
        self.slot(key).is_some()
    }

    /// The record at `slot` (from [`TaskMap::insert`], and not removed since).
    pub fn at_mut(&mut self, slot: Slot) -> Option<&mut TaskRecord> {
        let (_, record) = self.slots.get_mut(slot as usize)?.as_mut()?;
        Some(record)
    }

    /// Adds or replaces the record of `key`; returns its slot.
    pub fn insert(&mut self, key: TaskKey, record: TaskRecord) -> Slot {
        if let Some(slot) = self.slot(key) {
            self.slots[slot] = Some((key, record));
            return slot as Slot;
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some((key, record));
                slot
            }
            None => {
                let slot = self.slots.push(Some((key, record)));
                Slot::try_from(slot).expect("fewer than 4 billion tasks")
            }
        };
        let hash = hash(key);
        self.index[part(key)].insert_unique(spread(hash), Entry { slot, hash }, |e| spread(e.hash));
        slot
    }

    pub fn remove(&mut self, key: TaskKey) -> Option<TaskRecord> {
        let Self { index, slots, free } = self;
        let h = hash(key);
        let entry = index[part(key)]
            .find_entry(spread(h), |e| is(slots, e, key, h))
            .ok()?;
        let (Entry { slot, .. }, _) = entry.remove();
        free.push(slot);
        slots[slot as usize].take().map(|(_, record)| record)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::scheduler::{HeldSpec, Origin};
    use crate::store::Record;

    /// A READY record whose attempt tells it apart.
    fn record(spec: &Arc<HeldSpec>, attempt: u32) -> TaskRecord {
        let r = Record {
            pipeline: "tenants/t/applications/a/pipelines/p".into(),
            key: TaskKey(0),
            flow: "t/".into(),
            state: pm_proto::v1::TaskState::Ready,
            attempt,
            priority: 0,
            client_priority: 0,
            seq: 0,
            spec_id: spec.id,
            lease_id: None,
            create_time_ms: 0,
            update_time_ms: 0,
            keyed: false,
            body: Arc::from(&[][..]),
            result: None,
        };
        let origin = Origin {
            pipeline: r.pipeline.clone(),
            flow: r.flow.clone(),
            spec: spec.clone(),
        };
        TaskRecord::from_disk(r, Arc::new(origin))
    }

    fn spec() -> Arc<HeldSpec> {
        Arc::new(HeldSpec {
            id: [0; 32],
            spec: Arc::default(),
        })
    }

    #[test]
    fn keys_find_their_records_through_growth_removal_and_reuse() {
        let spec = spec();
        // Starts small, so every part grows (and rehashes through the slab) many times.
        let mut map = TaskMap::with_capacity(0);
        let keys: Vec<TaskKey> = (0..20_000u32)
            .map(|i| TaskKey::generate_in(i % 3))
            .collect();
        for (i, &key) in keys.iter().enumerate() {
            map.insert(key, record(&spec, i as u32));
        }
        for (i, &key) in keys.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
            assert_eq!(map.remove(key).map(|r| r.attempt), Some(i as u32));
        }
        assert_eq!(map.len(), 10_000);
        // New tasks reuse the freed slots; a replaced record keeps its slot.
        let newer: Vec<TaskKey> = (0..10_000).map(|_| TaskKey::generate()).collect();
        for &key in &newer {
            map.insert(key, record(&spec, u32::MAX));
        }
        assert_eq!(map.slots.len(), 20_000, "freed slots were reused");
        let slot = map.insert(keys[1], record(&spec, 7));
        assert_eq!(map.at_mut(slot).map(|r| r.attempt), Some(7));
        for (i, &key) in keys.iter().enumerate() {
            let want = match i {
                1 => Some(7),
                _ if i % 2 == 0 => None,
                _ => Some(i as u32),
            };
            assert_eq!(map.get(key).map(|r| r.attempt), want, "task {i}");
            assert_eq!(map.contains_key(key), want.is_some());
        }
        assert!(
            newer
                .iter()
                .all(|&k| map.get(k).is_some_and(|r| r.attempt == u32::MAX))
        );
        assert_eq!(map.remove(keys[0]).map(|r| r.attempt), None, "removed once");
        assert_eq!(map.len(), 20_000);
    }

    #[test]
    fn a_record_stays_where_it_was_put_while_the_slab_grows() {
        let spec = spec();
        let mut map = TaskMap::with_capacity(0);
        let first = TaskKey::generate();
        let slot = map.insert(first, record(&spec, 1));
        let at = |map: &mut TaskMap| map.at_mut(slot).map(|r| r as *const TaskRecord);
        let before = at(&mut map);
        // Several chunks' worth: a `Vec` would have moved its records each time it doubled.
        for i in 0..(3 * CHUNK + 1) {
            map.insert(TaskKey::generate(), record(&spec, i as u32));
        }
        assert_eq!(map.slots.chunks.len(), 4);
        assert_eq!(at(&mut map), before, "the first record moved");
        assert_eq!(map.get(first).map(|r| r.attempt), Some(1));
    }

    #[test]
    fn a_slot_costs_a_record_and_no_more() {
        // `Option` uses the record's own niche (its `Arc`s are never null).
        assert_eq!(
            std::mem::size_of::<Option<(TaskKey, TaskRecord)>>(),
            std::mem::size_of::<(TaskKey, TaskRecord)>()
        );
    }
}
