//! An ordered set kept as sorted chunks: the shard's ready queues, which hold every READY task,
//! and its lists of each pipeline's tasks by id.
//!
//! std's `BTreeSet` splits a full node in the middle, so a set that grows at its right edge
//! (a queue, where each new task ranks after the last) keeps its leaves about half full: a
//! 40-byte entry cost ~86 bytes, 82 MiB for a million READY tasks (heaptrack,
//! perf/RESULTS.md). Here a set is a `BTreeMap` of chunks of at most [`CHUNK`] entries, each
//! under a lower bound of its entries. An entry past the end of a full last chunk starts a new
//! chunk, so a queue filled in order keeps its chunks full; an entry into the middle of a full
//! chunk splits it in halves, as a B-tree does. Taking the first entry is a `VecDeque`'s
//! `pop_front`. The two-level tree crate we looked at (`indexset`) also keeps a Fenwick tree
//! for lookups by position, which a queue does not need; this structure is small enough to
//! be our own.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

/// Entries per chunk: a 40-byte entry makes a chunk 2.5 KiB, and an insert into the middle
/// of one moves at most half of that.
const CHUNK: usize = 64;

pub struct ChunkedSet<T> {
    /// Chunks under a lower bound of their entries (their first entry when made; it stays when
    /// that entry leaves). No chunk is empty.
    chunks: BTreeMap<T, VecDeque<T>>,
    len: usize,
}

impl<T> Default for ChunkedSet<T> {
    fn default() -> Self {
        Self {
            chunks: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<T: Ord + Copy> ChunkedSet<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `x`; false if it was there.
    pub fn insert(&mut self, x: T) -> bool {
        // Most inserts come after every entry (a queue filled in order): one descent.
        if let Some(mut last) = self.chunks.last_entry()
            && last.get().back().is_some_and(|back| *back < x)
        {
            if last.get().len() < CHUNK {
                last.get_mut().push_back(x);
            } else {
                let mut next = VecDeque::with_capacity(CHUNK);
                next.push_back(x);
                self.chunks.insert(x, next);
            }
            self.len += 1;
            return true;
        }
        let bound = match self.chunks.range(..=x).next_back() {
            Some((&bound, _)) => bound,
            // Below every bound: into the first chunk, whose bound becomes `x`, unless it is
            // full (or there is none).
            None => match self.chunks.first_key_value() {
                Some((&first, chunk)) if chunk.len() < CHUNK => {
                    let chunk = self.chunks.remove(&first).expect("the first chunk");
                    self.chunks.insert(x, chunk);
                    x
                }
                _ => {
                    self.chunks.insert(x, VecDeque::from([x]));
                    self.len += 1;
                    return true;
                }
            },
        };
        let last = self.chunks.last_key_value().map(|(&last, _)| last) == Some(bound);
        let chunk = self.chunks.get_mut(&bound).expect("the chunk found above");
        let at = match chunk.binary_search(&x) {
            Ok(_) => return false,
            Err(at) => at,
        };
        self.len += 1;
        if chunk.len() < CHUNK {
            chunk.insert(at, x);
        } else {
            // A full chunk splits in halves; the last one where `x` goes, when that is past
            // its middle, so entries arriving a little out of order (ids of one millisecond)
            // leave the chunks behind the edge full.
            let cut = if last { at.max(CHUNK / 2) } else { CHUNK / 2 };
            let mut tail = chunk.split_off(cut);
            if at <= cut {
                chunk.insert(at, x);
            } else {
                tail.insert(at - cut, x);
            }
            if !tail.is_empty() {
                self.chunks.insert(tail[0], tail);
            }
        }
        true
    }

    /// Removes `x`; false if it was not there.
    pub fn remove(&mut self, x: &T) -> bool {
        let Some((&bound, chunk)) = self.chunks.range_mut(..=*x).next_back() else {
            return false;
        };
        let Ok(at) = chunk.binary_search(x) else {
            return false;
        };
        chunk.remove(at);
        if chunk.is_empty() {
            self.chunks.remove(&bound);
        }
        self.len -= 1;
        true
    }

    pub fn first(&self) -> Option<&T> {
        self.chunks.first_key_value()?.1.front()
    }

    pub fn pop_first(&mut self) -> Option<T> {
        let mut first = self.chunks.first_entry()?;
        let x = first.get_mut().pop_front()?;
        if first.get().is_empty() {
            first.remove();
        }
        self.len -= 1;
        Some(x)
    }

    /// The entries in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.values().flatten()
    }

    /// The entries below `below` (all of them for `None`), last first.
    pub fn rev_below(&self, below: Option<T>) -> impl Iterator<Item = &T> {
        let upper = below.map_or(Bound::Unbounded, Bound::Excluded);
        self.chunks
            .range((Bound::Unbounded, upper))
            .rev()
            .flat_map(|(_, chunk)| chunk.iter().rev())
            .filter(move |x| below.is_none_or(|below| **x < below))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_set_filled_in_order_keeps_its_chunks_full() {
        let mut set = ChunkedSet::default();
        for i in 0..10 * CHUNK as u32 {
            assert!(set.insert(i));
        }
        assert!(!set.insert(5), "already there");
        assert_eq!(set.chunks.len(), 10);
        assert!(set.chunks.values().all(|c| c.len() == CHUNK));
        assert_eq!(set.pop_first(), Some(0));
        assert_eq!(set.first(), Some(&1));
        assert_eq!(set.len(), 10 * CHUNK - 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16),
        /// Near the last entry: just past it or a little before (ids of one millisecond).
        Near(u16),
        Remove(u16),
        Pop,
    }

    fn op() -> impl Strategy<Value = Op> {
        // A narrow range of values, so inserts hit present entries and chunks fill and split.
        prop_oneof![
            4 => (0..600u16).prop_map(Op::Insert),
            4 => (0..8u16).prop_map(Op::Near),
            2 => (0..600u16).prop_map(Op::Remove),
            1 => Just(Op::Pop),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Every operation answers as std's `BTreeSet` does, and the chunks stay sorted,
        /// non-empty, bounded and under a lower bound.
        #[test]
        fn it_behaves_as_a_btree_set(ops in proptest::collection::vec(op(), 1..3000)) {
            let (mut set, mut model) = (ChunkedSet::default(), BTreeSet::new());
            for op in ops {
                match op {
                    Op::Insert(x) => prop_assert_eq!(set.insert(x), model.insert(x)),
                    Op::Near(back) => {
                        let x = model.last().map_or(0, |last| last + 4).saturating_sub(back);
                        prop_assert_eq!(set.insert(x), model.insert(x));
                    }
                    Op::Remove(x) => prop_assert_eq!(set.remove(&x), model.remove(&x)),
                    Op::Pop => prop_assert_eq!(set.pop_first(), model.pop_first()),
                }
                prop_assert_eq!(set.len(), model.len());
                prop_assert_eq!(set.first(), model.first());
            }
            prop_assert!(set.iter().eq(model.iter()));
            for below in [None, Some(0), Some(299), Some(600)] {
                let want = match below {
                    Some(below) => model.range(..below).rev().collect::<Vec<_>>(),
                    None => model.iter().rev().collect(),
                };
                prop_assert_eq!(set.rev_below(below).collect::<Vec<_>>(), want);
            }
            for (bound, chunk) in &set.chunks {
                prop_assert!(!chunk.is_empty() && chunk.len() <= CHUNK);
                prop_assert!(*bound <= chunk[0]);
            }
        }
    }
}
