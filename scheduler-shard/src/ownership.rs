//! Which ring keys this shard serves: its identity and its view of the ring. A call on a
//! key the view gives to another shard is refused with that owner and the ring revision
//! ([`Error::NotOwner`]), so the gateway retries there.
//!
//! A shard that has not yet seen itself in the ring (just started) serves nothing; one
//! that is leaving acts on the ring without itself. Without etcd (`pm dev`) the ring is
//! this shard alone and it owns every key.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pm_cluster::{Member, Membership, Ring};
use pm_proto::names::PipelineName;

use crate::error::Error;

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

    /// Ok when this shard owns `pipeline`'s tasks; otherwise who does, by its view.
    pub fn check(&self, pipeline: &PipelineName) -> Result<(), Error> {
        self.check_key(&pipeline.ring_key())
    }

    /// Ok when this shard owns ring key `key`.
    pub fn check_key(&self, key: &str) -> Result<(), Error> {
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
}

/// The ring key of a pipeline held under its resource name.
pub fn ring_key_of(pipeline: &str) -> String {
    PipelineName::parse(pipeline)
        .map(|p| p.ring_key())
        .unwrap_or_else(|_| pipeline.to_owned())
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
        let keys: Vec<String> = (0..64).map(|i| format!("t/a/p{i}")).collect();
        let mine: Vec<&String> = keys
            .iter()
            .filter(|k| ring.owner(k).is_some_and(|m| m.id == "a"))
            .collect();
        assert!(
            !mine.is_empty() && mine.len() < keys.len(),
            "the keys split"
        );
        for key in &keys {
            let owned = ownership.check_key(key).is_ok();
            assert_eq!(owned, mine.contains(&key), "{key}");
            if let Err(Error::NotOwner { message, view }) = ownership.check_key(key) {
                assert_eq!(view.owner.map(|(id, _)| id).as_deref(), Some("b"));
                assert!(message.starts_with("shard a does not own"), "{message}");
            }
        }
        assert!(ownership.settled(&ring) && !ownership.leaving());
        assert!(
            !ownership.settled(&Ring::new(0, [member("b")])),
            "not before it sees itself in the ring"
        );
        // A pipeline is owned by its ring key.
        let pipelines: Vec<String> = (0..16)
            .map(|i| format!("tenants/t/applications/a/pipelines/p{i}"))
            .collect();
        for p in &pipelines {
            let name = PipelineName::parse(p).unwrap();
            assert_eq!(ring_key_of(p), name.ring_key());
            assert_eq!(
                ownership.check(&name).is_ok(),
                ownership.check_key(&name.ring_key()).is_ok()
            );
        }
        assert!(
            pipelines
                .iter()
                .any(|p| ownership.check(&PipelineName::parse(p).unwrap()).is_err()),
            "some pipelines are b's"
        );
        assert_eq!(ring_key_of("not a pipeline"), "not a pipeline");

        ownership.leave();
        assert!(ownership.leaving());
        assert!(
            ownership.ring().member("a").is_none(),
            "acts on the ring without itself"
        );
        assert!(ownership.settled(&Ring::new(0, [member("b")])));
        for key in &keys {
            match ownership.check_key(key) {
                Err(Error::NotOwner { view, .. }) => {
                    assert_eq!(view.owner.map(|(id, _)| id).as_deref(), Some("b"), "{key}");
                }
                other => panic!("{key}: a leaving shard owns nothing: {other:?}"),
            }
        }
    }
}
