//! The hash ring: which shard owns a ring key.
//!
//! Rendezvous (highest-random-weight) hashing: every shard scores every key with a hash of
//! the pair, and the highest score owns it. Adding one of S shards moves only the keys the
//! newcomer wins (about 1/S of them); removing one moves only its own keys, each to the shard
//! that scored second. No virtual-node table is needed, and every process holding the same
//! member list computes the same owner. A lookup is one xxh3 per shard (S ≤ a few hundred).
//!
//! What the ring places is a [`RingKey`]: a pipeline's partition. Everything a shard holds
//! and serves (queues, handoffs, agent sessions, idempotency keys) belongs to one. The
//! partitions of one pipeline are placed with a bound ([`Ring::owner`]) so that they spread
//! evenly: placed each on its own, 6 partitions over 3 shards land 1, 2 and 3 as often as
//! not. The bound costs movement: a join or a leave moves about half of a hot pipeline's
//! partitions instead of 1/S (`ring-sim` measures both; perf/RESULTS.md).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use pm_proto::names::{PipelineName, TaskName};
use pm_proto::v1::Pipeline;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// What the ring places: partition `partition` of `pipeline`. A pipeline with
/// `partitions: k` has the keys of partitions `0..k`; one without has partition 0 alone.
/// A task's id carries its partition ([`pm_proto::names::with_partition`]), so its name
/// alone gives its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RingKey {
    pub pipeline: PipelineName,
    pub partition: u32,
}

impl RingKey {
    pub fn new(pipeline: PipelineName, partition: u32) -> Self {
        Self {
            pipeline,
            partition,
        }
    }

    /// Partition 0: all of a pipeline without partitions.
    pub fn whole(pipeline: PipelineName) -> Self {
        Self::new(pipeline, 0)
    }

    /// The key of the task `name`.
    pub fn of_task(name: &TaskName) -> Self {
        Self::new(name.pipeline.clone(), name.partition())
    }

    /// What the ring hashes: `tenant/app/pipeline`, with `#i` for a partition `i` > 0.
    /// Partition 0 hashes as the pipeline did before it had partitions, so giving one
    /// partitions moves none of its tasks.
    fn hashed(&self) -> String {
        let p = &self.pipeline;
        match self.partition {
            0 => format!("{}/{}/{}", p.tenant, p.application, p.pipeline),
            i => format!("{}/{}/{}#{i}", p.tenant, p.application, p.pipeline),
        }
    }
}

impl fmt::Display for RingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hashed())
    }
}

/// The partitions a pipeline's tasks may be in: as many as any of its versions up to
/// `pipeline` had (`Pipeline.max_partitions`; the spec's own for a version stored before that
/// field), at least 1. Lowering `partitions` stops new tasks from going to the partitions
/// dropped, but what they hold drains: agents and lists keep covering them.
pub fn covered_partitions(pipeline: &Pipeline) -> u32 {
    let spec = pipeline.spec.as_ref().map_or(0, |s| s.partitions);
    pipeline.max_partitions.max(spec).max(1)
}

/// The partitions new tasks of `pipeline` are spread over: its spec's, at least 1.
pub fn submit_partitions(pipeline: &Pipeline) -> u32 {
    pipeline.spec.as_ref().map_or(1, |s| s.partitions.max(1))
}

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
    /// Where each partitioned pipeline's partitions are placed by this ring ([`Ring::owner`]).
    placed: Placements,
}

/// Partitions most pipelines' placements kept per ring: past it the cache starts over.
const MAX_PLACED: usize = 10_000;

/// A ring's cache of partition placements: indexes into its members, by partition, for the
/// partitions asked for so far. Computed again by any ring (the same members give the same
/// placement), so it is neither compared nor cloned.
#[derive(Debug, Default)]
struct Placements(Mutex<HashMap<PipelineName, Vec<u32>>>);

impl Clone for Placements {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for Placements {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Placements {}

impl Ring {
    pub fn new(revision: u64, members: impl IntoIterator<Item = Member>) -> Self {
        let mut members: Vec<_> = members
            .into_iter()
            .map(|m| (seed(&m.id), Arc::new(m)))
            .collect();
        members.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        members.dedup_by(|a, b| a.1.id == b.1.id);
        Self {
            revision,
            members,
            placed: Placements::default(),
        }
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
    ///
    /// Partition 0 is the pipeline's own key: the shard scoring it highest. Partition i > 0
    /// goes to the shard scoring `pipeline#i` highest among those holding fewer than
    /// ⌈(i+1)/S⌉ of partitions 0..i (S shards): placed in order, the partitions of one
    /// pipeline spread evenly over the shards, for whatever k, within one of each other,
    /// while each keeps its own first choice where the bound allows. A placement depends
    /// only on the members and the partition number, never on k, so every process places
    /// alike and raising k moves no partition.
    pub fn owner(&self, key: &RingKey) -> Option<&Arc<Member>> {
        if key.partition == 0 {
            return self.owner_of_hashed(&key.hashed());
        }
        let i = self.placement(&key.pipeline, key.partition)?;
        Some(&self.members[i as usize].1)
    }

    /// The index of the member that holds `partition` of `pipeline` (see [`Ring::owner`]).
    fn placement(&self, pipeline: &PipelineName, partition: u32) -> Option<u32> {
        if self.members.is_empty() {
            return None;
        }
        let mut placed = self.placed.0.lock().expect("placements lock");
        if let Some(i) = placed.get(pipeline).and_then(|p| p.get(partition as usize)) {
            return Some(*i);
        }
        if placed.len() >= MAX_PLACED {
            placed.clear();
        }
        let n = self.members.len();
        let mut load = vec![0u32; n];
        let mut owners = Vec::with_capacity(partition as usize + 1);
        for i in 0..=partition {
            let cap = i / n as u32 + 1;
            let hashed = RingKey::new(pipeline.clone(), i).hashed();
            let best = (0..n)
                .filter(|&m| load[m] < cap)
                .max_by_key(|&m| {
                    let (seed, member) = &self.members[m];
                    (xxh3_64_with_seed(hashed.as_bytes(), *seed), &member.id)
                })
                .expect("some member is below the bound");
            load[best] += 1;
            owners.push(best as u32);
        }
        placed.insert(pipeline.clone(), owners);
        Some(placed[pipeline][partition as usize])
    }

    fn owner_of_hashed(&self, key: &str) -> Option<&Arc<Member>> {
        self.members
            .iter()
            .max_by_key(|(seed, m)| (xxh3_64_with_seed(key.as_bytes(), *seed), &m.id))
            .map(|(_, m)| m)
    }

    /// The owners of partitions `0..partitions` of `pipeline`, each with the partitions it
    /// owns, by shard id; empty when no shard is registered.
    pub fn partition_owners(
        &self,
        pipeline: &PipelineName,
        partitions: u32,
    ) -> BTreeMap<String, (Arc<Member>, Vec<u32>)> {
        let mut owners: BTreeMap<String, (Arc<Member>, Vec<u32>)> = BTreeMap::new();
        for i in 0..partitions.max(1) {
            if let Some(m) = self.owner(&RingKey::new(pipeline.clone(), i)) {
                owners
                    .entry(m.id.clone())
                    .or_insert_with(|| (m.clone(), Vec::new()))
                    .1
                    .push(i);
            }
        }
        owners
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
            placed: Placements::default(),
        }
    }
}

fn seed(id: &str) -> u64 {
    xxh3_64_with_seed(id.as_bytes(), 0x706d_7269_6e67)
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

    fn pipeline(id: &str) -> PipelineName {
        PipelineName {
            tenant: "t".into(),
            application: "app".into(),
            pipeline: id.into(),
        }
    }

    fn keys() -> Vec<RingKey> {
        (0..20_000)
            .map(|i| RingKey::whole(pipeline(&format!("p{i}"))))
            .collect()
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
        assert!(Ring::default().owner(&keys()[0]).is_none());
        assert!(Ring::default().is_empty() && !a.is_empty());
        assert!(a.without("pm-shard-0").without("pm-shard-1").len() == 2);
        assert_eq!(a.member("pm-shard-2").unwrap().address, "http://shard-2");
    }

    #[test]
    fn partitions_spread_one_pipeline_and_partition_0_stays_where_the_pipeline_was() {
        let hot = pipeline("hot");
        assert_eq!(RingKey::whole(hot.clone()).to_string(), "t/app/hot");
        assert_eq!(RingKey::new(hot.clone(), 3).to_string(), "t/app/hot#3");
        let r = ring(4);
        let owners = r.partition_owners(&hot, 8);
        assert!(owners.len() > 1, "{owners:?}");
        let mut all: Vec<u32> = owners.values().flat_map(|(_, ps)| ps.clone()).collect();
        all.sort();
        assert_eq!(
            all,
            (0..8).collect::<Vec<_>>(),
            "each partition has one owner"
        );
        for (id, (member, ps)) in &owners {
            assert_eq!(&member.id, id);
            for &p in ps {
                assert_eq!(&r.owner(&RingKey::new(hot.clone(), p)).unwrap().id, id);
            }
        }
        assert_eq!(
            r.partition_owners(&hot, 0).len(),
            1,
            "0 partitions means one"
        );
        // Partition 0 is where the pipeline was; the rest spread within one of even, for
        // any k and any number of shards, and raising k moves none of them.
        assert_eq!(
            r.owner(&RingKey::whole(hot.clone())).unwrap().id,
            r.owner_of_hashed("t/app/hot").unwrap().id
        );
        for s in 1..7 {
            let r = ring(s);
            for p in 0..50 {
                let pipeline = pipeline(&format!("hot{p}"));
                let mut before: Option<BTreeMap<u32, String>> = None;
                for k in 1..=24 {
                    let owners = r.partition_owners(&pipeline, k);
                    let loads: Vec<usize> = owners.values().map(|(_, ps)| ps.len()).collect();
                    let (most, least) = (loads.iter().max().unwrap(), loads.iter().min().unwrap());
                    assert!(
                        most - least <= 1 && owners.len() == s.min(k as usize),
                        "{loads:?}"
                    );
                    let now: BTreeMap<u32, String> = owners
                        .iter()
                        .flat_map(|(id, (_, ps))| ps.iter().map(move |&i| (i, id.clone())))
                        .collect();
                    if let Some(before) = &before {
                        assert!(
                            before.iter().all(|(i, id)| &now[i] == id),
                            "k={k} moved one"
                        );
                    }
                    before = Some(now);
                }
            }
        }
        // A fresh ring of the same members places alike (the cache is not the answer).
        let again = ring(4);
        for i in 0..8 {
            let key = RingKey::new(hot.clone(), i);
            assert_eq!(r.owner(&key).unwrap().id, again.owner(&key).unwrap().id);
        }
        assert!(Ring::default().partition_owners(&hot, 4).is_empty());
        // A task named with a partition routes to that partition's key.
        let id = pm_proto::names::with_partition(0x0190_f3a2_b4c1_7abc_9def_0123_4567_89ab, 5);
        let name = TaskName::parse(&format!("{hot}/tasks/{id:032x}")).unwrap();
        assert_eq!(RingKey::of_task(&name), RingKey::new(hot, 5));
    }

    #[test]
    fn lowered_partitions_stay_covered() {
        let mut p = Pipeline {
            spec: Some(pm_proto::v1::PipelineSpec {
                partitions: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!((covered_partitions(&p), submit_partitions(&p)), (2, 2));
        p.max_partitions = 6;
        assert_eq!((covered_partitions(&p), submit_partitions(&p)), (6, 2));
        p.spec = None;
        p.max_partitions = 0;
        assert_eq!((covered_partitions(&p), submit_partitions(&p)), (1, 1));
    }
}
