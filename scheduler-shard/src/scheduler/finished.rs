//! The finished tasks awaiting collection, per pipeline, each pipeline's in the order they
//! finished: retention takes the oldest of one pipeline (its cap) and of the shard (the
//! retention period and the shard's cap) without a second index.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use tokio::time::Instant;

use crate::key::TaskKey;

/// A finished task that is due: its pipeline, when it finished, its key.
pub(super) type Due = (Arc<str>, Instant, TaskKey);

/// What makes a finished task due.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Tasks that finished at or before it (None: the retention reaches back before the
    /// process's clock began, so age alone collects nothing).
    pub cutoff: Option<Instant>,
    /// Most finished tasks the shard keeps.
    pub max_total: usize,
    /// Most finished tasks one pipeline keeps.
    pub max_per_pipeline: usize,
    /// Most tasks one call returns.
    pub batch: usize,
}

#[derive(Debug, Default)]
pub(super) struct Finished {
    by_pipeline: HashMap<Arc<str>, BTreeSet<(Instant, TaskKey)>>,
    len: usize,
}

impl Finished {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn insert(&mut self, pipeline: &Arc<str>, at: Instant, key: TaskKey) {
        if self
            .by_pipeline
            .entry(pipeline.clone())
            .or_default()
            .insert((at, key))
        {
            self.len += 1;
        }
    }

    /// Forgets `keys` (tasks handed to another shard).
    pub fn remove(&mut self, keys: &HashSet<TaskKey>) {
        let mut removed = 0;
        self.by_pipeline.retain(|_, set| {
            let before = set.len();
            set.retain(|(_, key)| !keys.contains(key));
            removed += before - set.len();
            !set.is_empty()
        });
        self.len -= removed;
    }

    /// Takes out up to `limits.batch` due tasks: first every pipeline's past its cap or the
    /// cutoff, then the shard's oldest while it keeps more than its cap.
    pub fn take_due(&mut self, limits: Limits) -> Vec<Due> {
        let mut due = Vec::new();
        for (pipeline, set) in &mut self.by_pipeline {
            while due.len() < limits.batch
                && let Some(&(at, key)) = set.first()
                && (set.len() > limits.max_per_pipeline
                    || limits.cutoff.is_some_and(|cutoff| at <= cutoff))
            {
                set.pop_first();
                due.push((pipeline.clone(), at, key));
            }
        }
        self.len -= due.len();
        if self.len > limits.max_total && due.len() < limits.batch {
            // The oldest of the shard: a heap of each pipeline's oldest.
            let mut heads: BinaryHeap<Reverse<(Instant, TaskKey, Arc<str>)>> = self
                .by_pipeline
                .iter()
                .filter_map(|(p, set)| set.first().map(|&(at, key)| Reverse((at, key, p.clone()))))
                .collect();
            while self.len > limits.max_total
                && due.len() < limits.batch
                && let Some(Reverse((at, key, pipeline))) = heads.pop()
            {
                let set = self.by_pipeline.get_mut(&pipeline).expect("a head's set");
                set.pop_first();
                self.len -= 1;
                if let Some(&(at, key)) = set.first() {
                    heads.push(Reverse((at, key, pipeline.clone())));
                }
                due.push((pipeline, at, key));
            }
        }
        self.by_pipeline.retain(|_, set| !set.is_empty());
        due
    }

    /// Due tasks whose delete was not written: kept, as before.
    pub fn put_back(&mut self, due: Vec<Due>) {
        for (pipeline, at, key) in due {
            self.insert(&pipeline, at, key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(n: u128) -> TaskKey {
        TaskKey(n)
    }

    fn limits(max_total: usize, max_per_pipeline: usize) -> Limits {
        Limits {
            cutoff: None,
            max_total,
            max_per_pipeline,
            batch: 1000,
        }
    }

    #[test]
    fn each_cap_takes_the_oldest_of_its_scope() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let (a, b): (Arc<str>, Arc<str>) = ("t/a/a".into(), "t/a/b".into());
        let mut f = Finished::default();
        // a finishes at 0, 2, 4, ...; b at 1, 3, 5, ...
        for i in 0..10u64 {
            f.insert(&a, at(2 * i), key(u128::from(2 * i)));
            f.insert(&b, at(2 * i + 1), key(u128::from(2 * i + 1)));
        }
        assert_eq!(f.len(), 20);
        // Per pipeline: each keeps its newest 7.
        let due = f.take_due(limits(100, 7));
        let mut keys: Vec<u128> = due.iter().map(|d| d.2.0).collect();
        keys.sort_unstable();
        assert_eq!(keys, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(f.len(), 14);
        // The shard's cap: the oldest across both, in finish order.
        let due = f.take_due(limits(10, 7));
        let keys: Vec<u128> = due.iter().map(|d| d.2.0).collect();
        assert_eq!(keys, vec![6, 7, 8, 9]);
        assert_eq!(f.len(), 10);
        // Age: everything that finished by 13 ms.
        let due = f.take_due(Limits {
            cutoff: Some(at(13)),
            ..limits(100, 100)
        });
        let mut keys: Vec<u128> = due.iter().map(|d| d.2.0).collect();
        keys.sort_unstable();
        assert_eq!(keys, vec![10, 11, 12, 13]);
        // Nothing more is due; a failed delete puts them back.
        assert!(f.take_due(limits(100, 100)).is_empty());
        f.put_back(due);
        assert_eq!(f.len(), 10);
        // Batches bound one call.
        let due = f.take_due(Limits {
            batch: 3,
            ..limits(0, 100)
        });
        assert_eq!(due.len(), 3);
        f.remove(&[key(16), key(17), key(999)].into_iter().collect());
        assert_eq!(f.len(), 5);
        assert_eq!(f.take_due(limits(0, 100)).len(), 5);
        assert_eq!(f.len(), 0);
        assert!(f.by_pipeline.is_empty(), "empty pipelines are dropped");
    }
}
