//! The gateway's cache of pipelines (with their tenant's quota). Every submit is validated
//! against its pipeline's current version; asking tenant-service each time cost a second RPC
//! per task. An apply or a
//! delete through this gateway drops the entry at once. Misses (NOT_FOUND) are not cached,
//! so a new pipeline is usable immediately.
//!
//! Changes made through other gateways: in cluster mode the cache watches the pipelines'
//! keys in etcd and drops an entry as soon as its key changes, and entries live
//! [`WATCHED_TTL`] as a safety net. Without etcd, or while the watch is down, an entry lives
//! [`TTL`], so another gateway's apply is seen within it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::Channel;
use xxhash_rust::xxh3::xxh3_64;

use pm_proto::names::PipelineName;
use pm_proto::v1::pipeline_service_client::PipelineServiceClient;
use pm_proto::v1::tenant_service_client::TenantServiceClient;
use pm_proto::v1::{GetPipelineRequest, GetTenantRequest, Pipeline};

/// How long a cached pipeline version is trusted without a watch.
pub const TTL: Duration = Duration::from_secs(2);
/// How long it is trusted while the etcd watch reports changes.
pub const WATCHED_TTL: Duration = Duration::from_secs(60);
/// Where tenant-service keeps the latest version of each pipeline
/// (`tenant-service/src/keys.rs`): `/pm/v1/pipelines/<tenant>/<app>/<pipeline>`.
const PIPELINE_KEYS: &str = "/pm/v1/pipelines/";
/// Entries kept at most; past it the cache starts over (pipelines are few per gateway).
const MAX_ENTRIES: usize = 100_000;

/// A pipeline's latest version as the cache holds it, with its spec's id computed once, so
/// tasks can name their spec instead of carrying it.
#[derive(Debug)]
pub struct PipelineVersion {
    pub pipeline: Pipeline,
    pub spec_id: pm_spec::SpecId,
    /// Its tenant's `quota.max_queued_tasks` (0: none). A tenant's quota is set when it is
    /// made and cannot change while it has pipelines, so it is cached with them.
    pub tenant_max_queued_tasks: u64,
    /// The partition the next submit without an idempotency key goes to (round-robin).
    next_partition: AtomicU32,
}

impl PipelineVersion {
    pub fn new(pipeline: Pipeline, spec_id: pm_spec::SpecId, tenant_max_queued_tasks: u64) -> Self {
        Self {
            pipeline,
            spec_id,
            tenant_max_queued_tasks,
            // From a different partition on each gateway and each refresh of the entry, so
            // that partition 0 is not favoured by every short-lived count.
            next_partition: AtomicU32::new(rand::random()),
        }
    }

    /// The partition a new task goes to: one of the spec's `partitions`, in turn, so that
    /// each gets an even share from this gateway. A task with an idempotency key goes to
    /// the partition the key hashes to, on every gateway, so that its repeats meet the
    /// first submit on one shard (after `partitions` changes, a repeat may land in another
    /// partition and make a second task).
    pub fn place(&self, idempotency_key: &str) -> u32 {
        let k = pm_cluster::ring::submit_partitions(&self.pipeline);
        if k == 1 {
            0
        } else if idempotency_key.is_empty() {
            self.next_partition.fetch_add(1, Ordering::Relaxed) % k
        } else {
            (xxh3_64(idempotency_key.as_bytes()) % u64::from(k)) as u32
        }
    }
}

pub struct PipelineCache {
    client: PipelineServiceClient<Channel>,
    tenants: TenantServiceClient<Channel>,
    entries: Mutex<HashMap<String, (Arc<PipelineVersion>, Instant)>>,
    /// Whether the etcd watch is following changes right now.
    watching: AtomicBool,
    /// Bumped by every invalidation: a fetch that raced one is not cached, since it may
    /// hold the version from before the change.
    generation: AtomicU64,
}

impl PipelineCache {
    pub fn new(
        client: PipelineServiceClient<Channel>,
        tenants: TenantServiceClient<Channel>,
    ) -> Self {
        Self {
            client,
            tenants,
            entries: Mutex::new(HashMap::new()),
            watching: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        }
    }

    /// Whether changes in etcd are being followed right now.
    pub fn watching(&self) -> bool {
        self.watching.load(Ordering::Relaxed)
    }

    fn ttl(&self) -> Duration {
        if self.watching.load(Ordering::Relaxed) {
            WATCHED_TTL
        } else {
            TTL
        }
    }

    /// Drops entries whose pipeline changes in etcd, until `cancel`.
    pub fn follow(self: &Arc<Self>, client: etcd_client::Client, cancel: CancellationToken) {
        let cache = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    end = cache.watch(&client) => {
                        cache.watching.store(false, Ordering::Relaxed);
                        tracing::warn!("pipeline watch ended ({end}); cache entries live {TTL:?} until it is back");
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
    }

    async fn watch(&self, client: &etcd_client::Client) -> String {
        let options = etcd_client::WatchOptions::new().with_prefix();
        let mut stream = match client
            .watch_client()
            .watch(PIPELINE_KEYS, Some(options))
            .await
        {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        // Changes missed while not watching: start over.
        {
            let mut entries = self.entries.lock().expect("cache lock");
            self.generation.fetch_add(1, Ordering::SeqCst);
            entries.clear();
        }
        self.watching.store(true, Ordering::Relaxed);
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    for event in response.events() {
                        if let Some(kv) = event.kv() {
                            let key = String::from_utf8_lossy(kv.key());
                            if let Some(name) = pipeline_of_key(&key) {
                                self.invalidate(&name);
                            }
                        }
                    }
                }
                Ok(None) => return "closed by etcd".into(),
                Err(e) => return e.to_string(),
            }
        }
    }

    /// The latest version of `name`, from the cache while fresh.
    pub async fn get(&self, name: &PipelineName) -> Result<Arc<PipelineVersion>, Status> {
        let key = name.to_string();
        if let Some((pipeline, fetched)) = self.entries.lock().expect("cache lock").get(&key)
            && fetched.elapsed() < self.ttl()
        {
            crate::metrics::METRICS.cache_hits.increment(1);
            return Ok(pipeline.clone());
        }
        crate::metrics::METRICS.cache_misses.increment(1);
        let generation = self.generation.load(Ordering::SeqCst);
        let request = GetPipelineRequest {
            name: key.clone(),
            version: 0,
        };
        let pipeline = self
            .client
            .clone()
            .get_pipeline(request)
            .await?
            .into_inner();
        let tenant = self
            .tenants
            .clone()
            .get_tenant(GetTenantRequest {
                name: format!("tenants/{}", name.tenant),
            })
            .await?
            .into_inner();
        let spec_id = pm_spec::spec_id(pipeline.spec.as_ref().unwrap_or(&Default::default()));
        let pipeline = Arc::new(PipelineVersion::new(
            pipeline,
            spec_id,
            tenant.quota.map_or(0, |q| q.max_queued_tasks),
        ));
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        if self.generation.load(Ordering::SeqCst) == generation {
            entries.insert(key, (pipeline.clone(), Instant::now()));
        }
        Ok(pipeline)
    }

    /// Forgets `name` (its spec changed or it was deleted through this gateway).
    pub fn invalidate(&self, name: &str) {
        let mut entries = self.entries.lock().expect("cache lock");
        self.generation.fetch_add(1, Ordering::SeqCst);
        entries.remove(name);
    }
}

/// `/pm/v1/pipelines/t/a/p` -> `tenants/t/applications/a/pipelines/p`.
fn pipeline_of_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix(PIPELINE_KEYS)?;
    let mut parts = rest.split('/');
    let (t, a, p) = (parts.next()?, parts.next()?, parts.next()?);
    parts
        .next()
        .is_none()
        .then(|| format!("tenants/{t}/applications/{a}/pipelines/{p}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn pipeline_keys_map_to_names() {
        assert_eq!(
            super::pipeline_of_key("/pm/v1/pipelines/t/a/p").as_deref(),
            Some("tenants/t/applications/a/pipelines/p")
        );
        assert_eq!(super::pipeline_of_key("/pm/v1/pipelines/t/a"), None);
        assert_eq!(super::pipeline_of_key("/pm/v1/tenants/t"), None);
    }
}
