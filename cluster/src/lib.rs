//! What the services share about the cluster, and nothing of their handlers.
//!
//! - [`metadata`]: the [`MetadataStore`] trait (keys, values, revisions, compare-and-set) and
//!   [`EmbeddedStore`], the single-process implementation `pm dev` uses. The etcd
//!   implementation, shard membership and the hash ring arrive with cluster mode.

pub mod metadata;

pub use metadata::{EmbeddedStore, Error, Expect, KeyValue, MetadataStore};
