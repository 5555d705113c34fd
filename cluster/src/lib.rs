//! What the services share about the cluster, and nothing of their handlers.
//!
//! - [`metadata`]: the [`MetadataStore`] trait (keys, values, revisions, compare-and-set) and
//!   [`EmbeddedStore`], the single-process implementation `pm dev` uses.
//! - [`etcd`]: [`EtcdStore`], the same trait over etcd, for a cluster.
//! - [`ring`]: the consistent-hash [`Ring`] that maps a pipeline to its shard.
//! - [`membership`]: a shard's [`Registration`] in etcd and everyone's [`Membership`] view.

pub mod etcd;
pub mod membership;
pub mod metadata;
pub mod ring;
#[doc(hidden)]
pub mod testing;

pub use etcd::EtcdStore;
pub use membership::{Membership, Registration};
pub use metadata::{EmbeddedStore, Error, Expect, KeyValue, MetadataStore};
pub use ring::{Member, Ring, RingKey};
