//! How much one tenant may keep in the metadata store: applications, pipelines, and versions
//! kept per pipeline. Set once at start (`pm-tenant-service --max-...`); `pm dev` and tests
//! use the defaults. A create past a count is refused with RESOURCE_EXHAUSTED naming the
//! limit. The counts are checked before the write, not in the same transaction, so replicas
//! creating at the same moment may pass a limit by a few: it bounds growth, it is not an
//! exact quota.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Applications one tenant may have.
    pub applications_per_tenant: u64,
    /// Pipelines one tenant may have, over all its applications.
    pub pipelines_per_tenant: u64,
    /// Versions kept per pipeline: an apply past it deletes the oldest (tasks already queued
    /// keep their spec on their shard; only GetPipeline of a deleted version is NOT_FOUND).
    pub versions_per_pipeline: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            applications_per_tenant: 1000,
            pipelines_per_tenant: 10_000,
            versions_per_pipeline: 100,
        }
    }
}

static LIMITS: OnceLock<Limits> = OnceLock::new();

/// Sets this process's limits; the first call wins. Call at start, before serving.
pub fn set(limits: Limits) {
    let _ = LIMITS.set(limits);
}

/// This process's limits (the defaults unless [`set`]).
pub fn get() -> Limits {
    LIMITS.get().copied().unwrap_or_default()
}
