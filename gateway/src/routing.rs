//! Where a call goes: tenant-service for configuration, the shard that owns the pipeline for
//! tasks and agent streams. With one shard every pipeline maps to it; the consistent-hash
//! ring over etcd membership replaces [`Routes::shard_for`]'s body in cluster mode.

use std::sync::Arc;

use tonic::transport::Channel;

use pm_proto::internal::v1::shard_service_client::ShardServiceClient;
use pm_proto::names::PipelineName;
use pm_proto::v1::agent_service_client::AgentServiceClient;
use pm_proto::v1::pipeline_service_client::PipelineServiceClient;
use pm_proto::v1::tenant_service_client::TenantServiceClient;

use crate::pipelines::PipelineCache;

/// Upstream endpoints, `http://host:port`.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub tenant_service: String,
    pub shard: String,
}

#[derive(Clone)]
pub struct Routes {
    tenants: TenantServiceClient<Channel>,
    pipelines: PipelineServiceClient<Channel>,
    cache: Arc<PipelineCache>,
    shard: ShardServiceClient<Channel>,
    shard_agents: AgentServiceClient<Channel>,
}

impl Routes {
    pub fn new(upstreams: &Upstreams) -> Result<Self, tonic::transport::Error> {
        let catalog = pm_proto::client::channel(&upstreams.tenant_service)?;
        let shard = pm_proto::client::channel(&upstreams.shard)?;
        let pipelines = pm_proto::client::pipelines(catalog.clone());
        Ok(Self {
            tenants: pm_proto::client::tenants(catalog),
            cache: Arc::new(PipelineCache::new(pipelines.clone())),
            pipelines,
            shard: pm_proto::client::shard(shard.clone()),
            shard_agents: pm_proto::client::agents(shard),
        })
    }

    pub fn tenants(&self) -> TenantServiceClient<Channel> {
        self.tenants.clone()
    }

    pub fn pipelines(&self) -> PipelineServiceClient<Channel> {
        self.pipelines.clone()
    }

    /// Pipeline versions as submits are validated against them.
    pub fn pipeline_cache(&self) -> &PipelineCache {
        &self.cache
    }

    /// The shard that owns `pipeline`'s tasks.
    pub fn shard_for(&self, _pipeline: &PipelineName) -> ShardServiceClient<Channel> {
        self.shard.clone()
    }

    /// The shard an agent serving `pipelines` streams to.
    pub fn agent_shard_for(&self, _pipelines: &[String]) -> AgentServiceClient<Channel> {
        self.shard_agents.clone()
    }
}
