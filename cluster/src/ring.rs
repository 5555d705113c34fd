//! The hash ring: which shard owns a ring key.
//!
//! Rendezvous (highest-random-weight) hashing: every shard scores every key with a hash of
//! the pair, and the highest score owns it. Adding one of S shards moves only the keys the
//! newcomer wins (about 1/S of them); removing one moves only its own keys, each to the shard
//! that scored second. No virtual-node table is needed, and every process holding the same
//! member list computes the same owner. A lookup is one xxh3 per shard (S ≤ a few hundred).
//!
//! The ring key of a task is its pipeline, `<tenant>/<app>/<pipeline>`; a pipeline with
//! `partitions: k` has the keys `<tenant>/<app>/<pipeline>#<i>` for `i` in `0..k`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// One shard, as registered under `/pm/v1/shards/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// Where gateways and other shards reach it, `http://host:port`.
    pub address: String,
    /// Unix milliseconds when this incarnation registered.
    #[serde(default)]
    pub started_at: i64,
}

/// A view of the membership at one etcd revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ring {
    /// The etcd revision up to which membership changes are reflected (0: standalone).
    pub revision: u64,
    /// Sorted by id.
    members: Vec<(u64, Arc<Member>)>,
}

impl Ring {
    pub fn new(revision: u64, members: impl IntoIterator<Item = Member>) -> Self {
        let mut members: Vec<_> = members
            .into_iter()
            .map(|m| (seed(&m.id), Arc::new(m)))
            .collect();
        members.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        members.dedup_by(|a, b| a.1.id == b.1.id);
        Self { revision, members }
    }

    pub fn members(&self) -> impl ExactSizeIterator<Item = &Arc<Member>> {
        self.members.iter().map(|(_, m)| m)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn member(&self, id: &str) -> Option<&Arc<Member>> {
        self.members
            .binary_search_by(|(_, m)| m.id.as_str().cmp(id))
            .ok()
            .map(|i| &self.members[i].1)
    }

    /// The shard that owns `key`, or `None` when no shard is registered.
    pub fn owner(&self, key: &str) -> Option<&Arc<Member>> {
        self.members
            .iter()
            .max_by_key(|(seed, m)| (xxh3_64_with_seed(key.as_bytes(), *seed), &m.id))
            .map(|(_, m)| m)
    }

    /// The same ring without `id` (a shard leaving).
    pub fn without(&self, id: &str) -> Self {
        Self {
            revision: self.revision,
            members: self
                .members
                .iter()
                .filter(|(_, m)| m.id != id)
                .cloned()
                .collect(),
        }
    }
}

fn seed(id: &str) -> u64 {
    xxh3_64_with_seed(id.as_bytes(), 0x706d_7269_6e67)
}

/// The ring key of a pipeline's tasks: the pipeline itself, or one of its partitions.
pub fn ring_key(pipeline: &str, partitions: u32, partition: u32) -> String {
    if partitions <= 1 {
        pipeline.to_owned()
    } else {
        format!("{pipeline}#{}", partition % partitions)
    }
}

/// The partition a task of a partitioned pipeline falls in, stable for its id.
pub fn partition_of(task_id: &str, partitions: u32) -> u32 {
    if partitions <= 1 {
        0
    } else {
        (xxh3_64_with_seed(task_id.as_bytes(), 0) % u64::from(partitions)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize) -> Ring {
        Ring::new(
            1,
            (0..n).map(|i| Member {
                id: format!("pm-shard-{i}"),
                address: format!("http://shard-{i}"),
                started_at: 0,
            }),
        )
    }

    fn keys() -> Vec<String> {
        (0..20_000).map(|i| format!("t/app/p{i}")).collect()
    }

    #[test]
    fn adding_or_removing_a_shard_moves_about_one_share_of_keys() {
        for s in [2usize, 3, 5, 8] {
            let before = ring(s);
            let after = ring(s + 1);
            let keys = keys();
            let moved = keys
                .iter()
                .filter(|k| before.owner(k).unwrap().id != after.owner(k).unwrap().id)
                .count();
            // Every moved key went to the newcomer, and about 1/(S+1) of them moved.
            for k in &keys {
                let (b, a) = (before.owner(k).unwrap(), after.owner(k).unwrap());
                assert!(b.id == a.id || a.id == format!("pm-shard-{s}"), "{k}");
            }
            let share = moved as f64 / keys.len() as f64;
            let ideal = 1.0 / (s + 1) as f64;
            assert!(
                (share - ideal).abs() < ideal * 0.15,
                "S={s}: {share} vs {ideal}"
            );

            // Removing one moves only its own keys.
            let gone = before.without("pm-shard-0");
            for k in &keys {
                let (b, a) = (before.owner(k).unwrap(), gone.owner(k).unwrap());
                assert!(b.id == a.id || b.id == "pm-shard-0", "{k}");
            }
        }
    }

    #[test]
    fn owners_agree_whatever_the_order_and_an_empty_ring_owns_nothing() {
        let a = ring(4);
        let mut reversed: Vec<Member> = a.members().map(|m| (**m).clone()).collect();
        reversed.reverse();
        let b = Ring::new(1, reversed);
        for k in keys().iter().take(1000) {
            assert_eq!(a.owner(k).unwrap().id, b.owner(k).unwrap().id);
        }
        assert!(Ring::default().owner("x").is_none());
        assert!(Ring::default().is_empty() && !a.is_empty());
        assert!(a.without("pm-shard-0").without("pm-shard-1").len() == 2);
        assert_eq!(a.member("pm-shard-2").unwrap().address, "http://shard-2");
    }

    #[test]
    fn partitions_spread_one_pipeline() {
        assert_eq!(ring_key("t/a/p", 1, 0), "t/a/p");
        assert_eq!(ring_key("t/a/p", 4, 6), "t/a/p#2");
        let r = ring(4);
        let owners: std::collections::BTreeSet<_> = (0..8)
            .map(|i| r.owner(&ring_key("t/a/hot", 8, i)).unwrap().id.clone())
            .collect();
        assert!(owners.len() > 1);
        assert!(partition_of("abc", 8) < 8);
        assert_eq!(partition_of("abc", 1), 0);
        let used: std::collections::BTreeSet<u32> = (0..200)
            .map(|i| partition_of(&format!("task-{i}"), 8))
            .collect();
        assert_eq!(used.len(), 8, "tasks fall in every partition: {used:?}");
    }
}
