//! The gateway's cache of pipelines. Every submit is validated against its pipeline's
//! current version; asking tenant-service each time cost a second RPC per task. An entry
//! lives for [`TTL`], so an apply through another gateway is seen within it; an apply or a
//! delete through this gateway drops the entry at once. Misses (NOT_FOUND) are not cached,
//! so a new pipeline is usable immediately.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Status;
use tonic::transport::Channel;

use pm_proto::names::PipelineName;
use pm_proto::v1::pipeline_service_client::PipelineServiceClient;
use pm_proto::v1::{GetPipelineRequest, Pipeline};

/// How long a cached pipeline version is trusted.
pub const TTL: Duration = Duration::from_secs(2);
/// Entries kept at most; past it the cache starts over (pipelines are few per gateway).
const MAX_ENTRIES: usize = 100_000;

pub struct PipelineCache {
    client: PipelineServiceClient<Channel>,
    entries: Mutex<HashMap<String, (Arc<Pipeline>, Instant)>>,
}

impl PipelineCache {
    pub fn new(client: PipelineServiceClient<Channel>) -> Self {
        Self {
            client,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The latest version of `name`, from the cache while fresh.
    pub async fn get(&self, name: &PipelineName) -> Result<Arc<Pipeline>, Status> {
        let key = name.to_string();
        if let Some((pipeline, fetched)) = self.entries.lock().expect("cache lock").get(&key)
            && fetched.elapsed() < TTL
        {
            return Ok(pipeline.clone());
        }
        let request = GetPipelineRequest {
            name: key.clone(),
            version: 0,
        };
        let pipeline = Arc::new(
            self.client
                .clone()
                .get_pipeline(request)
                .await?
                .into_inner(),
        );
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key, (pipeline.clone(), Instant::now()));
        Ok(pipeline)
    }

    /// Forgets `name` (its spec changed or it was deleted through this gateway).
    pub fn invalidate(&self, name: &str) {
        self.entries.lock().expect("cache lock").remove(name);
    }
}
