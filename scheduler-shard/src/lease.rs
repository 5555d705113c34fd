//! The lease table: which agent session holds which task attempt, until when.
//!
//! A lease is granted on dispatch, renewed by the agent while it runs, released by its
//! result, and, when its deadline passes unrenewed, expired so the task is delivered again.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::key::TaskKey;

/// A lease id: 128 random bits in hex. It is a capability: the agent that was sent it proves
/// with it that it ran the attempt, so it must not be guessable (a counter was; any agent
/// could then finish another agent's tasks), and it never matches a lease from before a
/// restart by accident.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub Arc<str>);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone)]
pub struct Lease {
    pub task: TaskKey,
    pub attempt: u32,
    /// The agent stream holding it; changes when a reconnecting agent reclaims it.
    pub session: u64,
    pub deadline: Instant,
}

#[derive(Default)]
pub struct LeaseTable {
    by_id: HashMap<LeaseId, Lease>,
    deadlines: BTreeSet<(Instant, LeaseId)>,
}

impl LeaseTable {
    /// A fresh lease id (not yet in the table: the dispatch is written first), from the
    /// thread's CSPRNG (ChaCha, seeded by the OS).
    pub fn new_id(&mut self) -> LeaseId {
        LeaseId(format!("{:032x}", rand::random::<u128>()).into())
    }

    /// Adds a lease, or replaces one with the same id.
    pub fn insert(&mut self, id: LeaseId, lease: Lease) {
        if let Some(old) = self.by_id.insert(id.clone(), lease.clone()) {
            self.deadlines.remove(&(old.deadline, id.clone()));
        }
        self.deadlines.insert((lease.deadline, id));
    }

    pub fn get(&self, id: &LeaseId) -> Option<&Lease> {
        self.by_id.get(id)
    }

    /// Extends a lease held by `session`; `None` when it is not (or no longer) theirs.
    pub fn renew(&mut self, id: &LeaseId, session: u64, ttl: Duration) -> Option<Instant> {
        let lease = self.by_id.get_mut(id)?;
        if lease.session != session {
            return None;
        }
        self.deadlines.remove(&(lease.deadline, id.clone()));
        lease.deadline = Instant::now() + ttl;
        self.deadlines.insert((lease.deadline, id.clone()));
        Some(lease.deadline)
    }

    /// Moves a lease to a new session (an agent reconnected and still runs the task).
    pub fn rebind(&mut self, id: &LeaseId, session: u64, ttl: Duration) -> Option<&Lease> {
        let lease = self.by_id.get_mut(id)?;
        lease.session = session;
        self.renew(id, session, ttl)?;
        self.by_id.get(id)
    }

    pub fn release(&mut self, id: &LeaseId) -> Option<Lease> {
        let lease = self.by_id.remove(id)?;
        self.deadlines.remove(&(lease.deadline, id.clone()));
        Some(lease)
    }

    /// Removes and returns every lease whose deadline is at or before `now`.
    pub fn take_expired(&mut self, now: Instant) -> Vec<(LeaseId, Lease)> {
        let mut out = Vec::new();
        while let Some((deadline, _)) = self.deadlines.first() {
            if *deadline > now {
                break;
            }
            let (_, id) = self.deadlines.pop_first().expect("first exists");
            if let Some(lease) = self.by_id.remove(&id) {
                out.push((id, lease));
            }
        }
        out
    }

    /// The task of every lease.
    pub fn tasks(&self) -> impl Iterator<Item = TaskKey> + '_ {
        self.by_id.values().map(|l| l.task)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[tokio::test(start_paused = true)]
    async fn renew_postpones_expiry_and_fences_sessions() {
        let ttl = Duration::from_secs(10);
        let mut t = LeaseTable::default();
        let mut grant = |task: u128| {
            let id = t.new_id();
            let lease = Lease {
                task: TaskKey(task),
                attempt: 1,
                session: 7,
                deadline: Instant::now() + ttl,
            };
            t.insert(id.clone(), lease);
            id
        };
        let (a, b) = (grant(0xa), grant(0xb));
        assert!(!t.is_empty());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            t.renew(&a, 8, ttl).is_none(),
            "another session cannot renew"
        );
        assert!(t.renew(&a, 7, ttl).is_some());
        tokio::time::advance(Duration::from_secs(5)).await;
        let expired = t.take_expired(Instant::now());
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].0, b);
        assert!(t.get(&a).is_some());
        assert!(t.rebind(&a, 9, ttl).is_some());
        assert_eq!(t.get(&a).unwrap().session, 9);
        assert!(t.release(&a).is_some());
        assert!(t.is_empty() && t.next_deadline().is_none());
    }

    #[test]
    fn lease_ids_are_128_random_bits() {
        let mut t = LeaseTable::default();
        let ids: HashSet<LeaseId> = (0..1000).map(|_| t.new_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.0.len(), 32, "{id}");
            assert!(id.0.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
            // Log lines name a lease by its id, which is what an agent's log shows too.
            assert_eq!(id.to_string(), &*id.0);
        }
        // Consecutive ids share no structure a guesser could use: on average half of the
        // 128 bits differ (a counter differs in a few low bits).
        let ids: Vec<u128> = (0..200)
            .map(|_| u128::from_str_radix(&t.new_id().0, 16).unwrap())
            .collect();
        let differing: u32 = ids.windows(2).map(|w| (w[0] ^ w[1]).count_ones()).sum();
        let mean = differing as f64 / 199.0;
        assert!((54.0..74.0).contains(&mean), "mean differing bits {mean}");
    }
}
