//! Which ring keys this shard serves: its identity and its view of the ring. A call on a
//! key the view gives to another shard is refused with that owner and the ring revision
//! ([`Error::NotOwner`]), so the gateway retries there.
//!
//! A shard that has not yet seen itself in the ring (just started) serves nothing; one
//! that is leaving acts on the ring without itself. Without etcd (`pm dev`) the ring is
//! this shard alone and it owns every key.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pm_cluster::{Member, Membership, Ring, RingKey};
use pm_proto::names::PipelineName;

use crate::error::Error;
use crate::key::TaskKey;

pub struct Ownership {
    me: String,
    membership: Membership,
    leaving: AtomicBool,
}

impl Ownership {
    /// A shard alone, owning every key.
    pub fn standalone() -> Self {
        let me = Member {
            id: "standalone".into(),
            address: String::new(),
            started_at: pm_proto::unix_ms(),
        };
        Self::new(me.id.clone(), Membership::fixed([me]))
    }

    pub fn new(me: String, membership: Membership) -> Self {
        Self {
            me,
            membership,
            leaving: AtomicBool::new(false),
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// From now on this shard owns nothing: it is handing everything off.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::SeqCst);
    }

    pub fn leaving(&self) -> bool {
        self.leaving.load(Ordering::SeqCst)
    }

    /// The ring this shard acts on.
    pub fn ring(&self) -> Arc<Ring> {
        let ring = self.membership.ring();
        if self.leaving() {
            Arc::new(ring.without(&self.me))
        } else {
            ring
        }
    }

    /// Whether this shard may move tasks by `ring`: it is in it (it knows its own place),
    /// or it is leaving.
    pub fn settled(&self, ring: &Ring) -> bool {
        self.leaving() || ring.member(&self.me).is_some()
    }

    /// Ok when this shard owns ring key `key`; otherwise who does, by its view.
    pub fn check(&self, key: &RingKey) -> Result<(), Error> {
        let ring = self.ring();
        let owner = ring.owner(key);
        if !self.leaving() && owner.is_some_and(|m| m.id == self.me) {
            return Ok(());
        }
        let message = match owner {
            Some(m) => format!(
                "shard {} does not own {key}: shard {} does (ring revision {})",
                self.me, m.id, ring.revision
            ),
            None => format!(
                "shard {} does not own {key}: no shard is registered (ring revision {})",
                self.me, ring.revision
            ),
        };
        Err(Error::NotOwner {
            message,
            view: pm_proto::status::NotOwner {
                revision: ring.revision,
                owner: owner.map(|m| (m.id.clone(), m.address.clone())),
            },
        })
    }

    /// Ok when this shard owns each of `partitions` of `pipeline` (partition 0 alone when
    /// none is named); INVALID_ARGUMENT for a list past a pipeline's partitions.
    pub fn check_partitions(
        &self,
        pipeline: &PipelineName,
        partitions: &[u32],
    ) -> Result<(), Error> {
        let max = pm_spec::limits::MAX_PARTITIONS;
        if partitions.len() > max as usize || partitions.iter().any(|&p| p >= max) {
            return Err(Error::invalid(
                "partitions",
                format!(
                    "{} named; a pipeline has at most {max}, numbered from 0",
                    partitions.len()
                ),
            ));
        }
        if partitions.is_empty() {
            return self.check(&RingKey::whole(pipeline.clone()));
        }
        for &p in partitions {
            self.check(&RingKey::new(pipeline.clone(), p))?;
        }
        Ok(())
    }
}

/// The ring key of a task of `pipeline` (held under its resource name) with `key`.
pub fn ring_key_of(pipeline: &str, key: TaskKey) -> Option<RingKey> {
    PipelineName::parse(pipeline)
        .ok()
        .map(|p| RingKey::new(p, key.partition()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member {
            id: id.into(),
            address: format!("http://{id}"),
            started_at: 1,
        }
    }

    /// A shard serves the keys the ring gives it and names the owner of the others; once
    /// leaving it serves none, names the owner each key goes to without it, and may still
    /// move tasks (it hands everything off).
    #[test]
    fn a_shard_owns_its_keys_until_it_leaves() {
        let ring = Ring::new(0, [member("a"), member("b")]);
        let ownership = Ownership::new("a".into(), Membership::fixed([member("a"), member("b")]));
        assert_eq!(ownership.me(), "a");
        let keys: Vec<RingKey> = (0..64)
            .map(|i| {
                RingKey::whole(
                    PipelineName::parse(&format!("tenants/t/applications/a/pipelines/p{i}"))
                        .unwrap(),
                )
            })
            .collect();
        let mine: Vec<&RingKey> = keys
            .iter()
            .filter(|k| ring.owner(k).is_some_and(|m| m.id == "a"))
            .collect();
        assert!(
            !mine.is_empty() && mine.len() < keys.len(),
            "the keys split"
        );
        for key in &keys {
            let owned = ownership.check(key).is_ok();
            assert_eq!(owned, mine.contains(&key), "{key}");
            if let Err(Error::NotOwner { message, view }) = ownership.check(key) {
                assert_eq!(view.owner.map(|(id, _)| id).as_deref(), Some("b"));
                assert!(message.starts_with("shard a does not own"), "{message}");
            }
        }
        assert!(ownership.settled(&ring) && !ownership.leaving());
        assert!(
            !ownership.settled(&Ring::new(0, [member("b")])),
            "not before it sees itself in the ring"
        );
        // A partitioned pipeline's partitions are keys of their own; a task's is in its key.
        let hot = PipelineName::parse("tenants/t/applications/a/pipelines/hot").unwrap();
        let partitions: Vec<u32> = (0..16).collect();
        let (owned, other): (Vec<u32>, Vec<u32>) = partitions
            .iter()
            .partition(|&&p| ring.owner(&RingKey::new(hot.clone(), p)).unwrap().id == "a");
        assert!(
            !owned.is_empty() && !other.is_empty(),
            "the partitions split"
        );
        assert!(ownership.check_partitions(&hot, &owned).is_ok());
        assert!(
            ownership
                .check_partitions(&hot, &[owned[0], other[0]])
                .is_err()
        );
        assert_eq!(
            ownership.check_partitions(&hot, &[]).is_ok(),
            ownership.check(&RingKey::whole(hot.clone())).is_ok()
        );
        let key = TaskKey::generate_in(other[0]);
        assert_eq!(
            ring_key_of(&hot.to_string(), key),
            Some(RingKey::new(hot.clone(), other[0]))
        );
        assert_eq!(ring_key_of("not a pipeline", key), None);

        ownership.leave();
        assert!(ownership.leaving());
        assert!(
            ownership.ring().member("a").is_none(),
            "acts on the ring without itself"
        );
        assert!(ownership.settled(&Ring::new(0, [member("b")])));
        for key in &keys {
            match ownership.check(key) {
                Err(Error::NotOwner { view, .. }) => {
                    assert_eq!(view.owner.map(|(id, _)| id).as_deref(), Some("b"), "{key}");
                }
                other => panic!("{key}: a leaving shard owns nothing: {other:?}"),
            }
        }
    }
}
