//! The ready queue: which READY task an agent gets next.
//!
//! Order: client priority, then task priority (smaller first), then a fair-share tag, then
//! arrival. Each pipeline has its own ordered set, so an agent serving one pipeline finds its
//! next task in O(log n); an agent serving every pipeline takes the best head among them. The
//! sets are [`ChunkedSet`]s: a queue grows at its right edge, where std's B-tree leaves its
//! nodes half empty.
//!
//! Fair share: within equal priorities, tenants and clients (each `tenant/client` is one
//! flow) are served round-robin by start-time fair queuing. A flow's next task is tagged one
//! past the larger of its own last tag and the tag last dispatched; dispatch takes the
//! smallest tag. A client that queues 100,000 tasks therefore gets every other slot while a
//! quiet client has work, not the first 100,000; within one flow the order stays FIFO.
//!
//! Backlog age: each pipeline also counts its READY tasks by the second they were submitted
//! (read from their UUIDv7 keys), so the oldest one's age is found in O(log n) with no scan
//! and nothing stored per task: one entry per second that still has a READY task.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::chunked::ChunkedSet;
use crate::key::TaskKey;

/// Dispatch order key; derives `Ord` field by field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    pub client_priority: u32,
    pub task_priority: u32,
    /// Fair-share tag of the task's flow (see the module doc).
    pub tag: u64,
    /// Arrival order on this shard.
    pub seq: u64,
}

/// The virtual clock of fair sharing.
#[derive(Debug, Default)]
pub struct FairClock {
    /// Tag of the task dispatched last.
    now: u64,
    /// Last tag given to each flow.
    last: HashMap<Arc<str>, u64>,
}

impl FairClock {
    /// The tag of a new task of `flow`.
    pub fn tag(&mut self, flow: &Arc<str>) -> u64 {
        let now = self.now;
        match self.last.get_mut(flow) {
            Some(last) => {
                *last = (*last).max(now) + 1;
                *last
            }
            None => {
                self.last.insert(flow.clone(), now + 1);
                now + 1
            }
        }
    }

    /// A task with `tag` was dispatched.
    pub fn advance(&mut self, tag: u64) {
        self.now = self.now.max(tag);
    }
}

#[derive(Default)]
pub struct ReadyQueue {
    by_pipeline: BTreeMap<Arc<str>, ChunkedSet<(Rank, TaskKey)>>,
    /// READY tasks per pipeline by the second they were submitted (see the module doc).
    born: HashMap<Arc<str>, BTreeMap<u64, u32>>,
    len: usize,
}

impl ReadyQueue {
    pub fn push(&mut self, pipeline: &Arc<str>, rank: Rank, task: TaskKey) {
        if self
            .by_pipeline
            .entry(pipeline.clone())
            .or_default()
            .insert((rank, task))
        {
            self.len += 1;
            let born = self.born.entry(pipeline.clone()).or_default();
            *born.entry(task.created_ms() / 1000).or_default() += 1;
        }
    }

    pub fn remove(&mut self, pipeline: &str, rank: Rank, task: TaskKey) -> bool {
        let Some(set) = self.by_pipeline.get_mut(pipeline) else {
            return false;
        };
        let removed = set.remove(&(rank, task));
        if set.is_empty() {
            self.by_pipeline.remove(pipeline);
        }
        if removed {
            self.len -= 1;
            self.unborn(pipeline, task);
        }
        removed
    }

    /// Uncounts a task that left the queue of `pipeline`.
    fn unborn(&mut self, pipeline: &str, task: TaskKey) {
        let Some(born) = self.born.get_mut(pipeline) else {
            return;
        };
        let second = task.created_ms() / 1000;
        if let Some(n) = born.get_mut(&second) {
            *n -= 1;
            if *n == 0 {
                born.remove(&second);
            }
        }
        if born.is_empty() {
            self.born.remove(pipeline);
        }
    }

    /// When the oldest READY task of `pipeline` was submitted, ms since the Unix epoch (to
    /// the second below), if it has one.
    pub fn oldest_of(&self, pipeline: &str) -> Option<u64> {
        let (second, _) = self.born.get(pipeline)?.first_key_value()?;
        Some(second * 1000)
    }

    /// The pipelines with READY tasks.
    pub fn pipelines(&self) -> impl Iterator<Item = &Arc<str>> {
        self.by_pipeline.keys()
    }

    /// READY tasks of `pipeline`.
    pub fn len_of(&self, pipeline: &str) -> usize {
        self.by_pipeline.get(pipeline).map_or(0, ChunkedSet::len)
    }

    /// The READY task of `pipeline` an agent would get next.
    pub fn head_of(&self, pipeline: &str) -> Option<TaskKey> {
        self.by_pipeline.get(pipeline)?.first().map(|(_, key)| *key)
    }

    /// Takes the first task among `pipelines` (all pipelines when `None`).
    pub fn pop(&mut self, pipelines: Option<&BTreeSet<String>>) -> Option<TaskKey> {
        let best = match pipelines {
            None => self
                .by_pipeline
                .iter()
                .filter_map(|(p, set)| set.first().map(|(rank, _)| (*rank, p.clone())))
                .min(),
            Some(names) => names
                .iter()
                .filter_map(|p| {
                    let (key, set) = self.by_pipeline.get_key_value(p.as_str())?;
                    set.first().map(|(rank, _)| (*rank, key.clone()))
                })
                .min(),
        };
        let (_, pipeline) = best?;
        let set = self.by_pipeline.get_mut(&pipeline)?;
        let (_, task) = set.pop_first()?;
        if set.is_empty() {
            self.by_pipeline.remove(&pipeline);
        }
        self.len -= 1;
        self.unborn(&pipeline, task);
        Some(task)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(c: u32, t: u32, seq: u64) -> Rank {
        Rank {
            client_priority: c,
            task_priority: t,
            tag: 0,
            seq,
        }
    }

    #[test]
    fn a_noisy_flow_does_not_starve_a_quiet_one() {
        let mut clock = FairClock::default();
        let mut q = ReadyQueue::default();
        let p: Arc<str> = "p".into();
        let (noisy, quiet): (Arc<str>, Arc<str>) = ("t/noisy".into(), "t/quiet".into());
        let mut seq = 0;
        // The flow of each task, by its key.
        let mut flows: HashMap<TaskKey, Arc<str>> = HashMap::new();
        let mut push = |q: &mut ReadyQueue, clock: &mut FairClock, flow: &Arc<str>| {
            seq += 1;
            let tag = clock.tag(flow);
            let rank = Rank {
                tag,
                ..rank(10, 10, seq)
            };
            q.push(&p, rank, TaskKey(seq.into()));
            flows.insert(TaskKey(seq.into()), flow.clone());
        };
        for _ in 0..100 {
            push(&mut q, &mut clock, &noisy);
        }
        // Ten noisy tasks run, then the quiet client shows up with three.
        let mut order = Vec::new();
        for tag in 1..=10 {
            order.push(q.pop(None).unwrap());
            // The noisy flow's tags are 1..=100, dispatched in order.
            clock.advance(tag);
        }
        for _ in 0..3 {
            push(&mut q, &mut clock, &quiet);
        }
        for _ in 0..6 {
            order.push(q.pop(None).unwrap());
        }
        let next: Vec<&str> = order[10..].iter().map(|k| &*flows[k]).collect();
        assert_eq!(
            next,
            [
                "t/noisy", "t/quiet", "t/noisy", "t/quiet", "t/noisy", "t/quiet"
            ]
        );
    }

    #[test]
    fn priority_then_fifo_and_pipeline_filter() {
        let mut q = ReadyQueue::default();
        let (a, b): (Arc<str>, Arc<str>) = ("p/a".into(), "p/b".into());
        let [a1, a2, b0, b3] = [0xa1, 0xa2, 0xb0, 0xb3].map(TaskKey);
        q.push(&a, rank(10, 10, 1), a1);
        q.push(&a, rank(10, 5, 2), a2);
        q.push(&b, rank(10, 10, 0), b0);
        q.push(&b, rank(1, 99, 3), b3);
        let only_a: BTreeSet<String> = ["p/a".to_owned()].into();
        assert_eq!(q.pop(Some(&only_a)), Some(a2));
        assert_eq!(q.pop(None), Some(b3), "client priority first");
        assert_eq!(q.pop(None), Some(b0), "then FIFO");
        assert!(q.remove("p/a", rank(10, 10, 1), a1));
        assert!(q.is_empty());
        assert_eq!(q.pop(None), None);
    }

    #[test]
    fn the_oldest_ready_task_is_found_whatever_the_dispatch_order() {
        let mut q = ReadyQueue::default();
        let p: Arc<str> = "p".into();
        // A key submitted at `second` (a UUIDv7's time bits), told apart by `n`.
        let key = |second: u64, n: u128| TaskKey(u128::from(second * 1000) << 80 | n);
        let (old, mid, new) = (key(100, 1), key(200, 2), key(300, 3));
        // The oldest task has the lowest priority: the head is not the oldest.
        q.push(&p, rank(10, 99, 1), old);
        q.push(&p, rank(10, 1, 2), new);
        q.push(&p, rank(10, 5, 3), mid);
        q.push(&p, rank(10, 6, 4), key(200, 4));
        assert_eq!(q.oldest_of("p"), Some(100_000));
        assert_eq!(q.pop(None), Some(new));
        assert_eq!(q.oldest_of("p"), Some(100_000));
        assert!(q.remove("p", rank(10, 99, 1), old));
        assert_eq!(q.oldest_of("p"), Some(200_000));
        assert_eq!(q.pop(None), Some(mid));
        assert_eq!(
            q.oldest_of("p"),
            Some(200_000),
            "another task of that second waits"
        );
        q.pop(None);
        assert_eq!(q.oldest_of("p"), None);
        assert!(q.born.is_empty(), "nothing left behind");
    }
}
