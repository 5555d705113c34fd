//! Where a call goes: tenant-service for configuration, and for tasks and agent streams the
//! shard that owns the pipeline on the hash ring. The ring comes from etcd (every shard's
//! registration, watched), or is one fixed shard without etcd.
//!
//! A shard whose ring view differs answers "not the owner" with its ring revision
//! ([`NotOwner`]); [`Routes::call`] then lets this gateway's ring catch up to that revision
//! and tries again, a bounded number of times, so a client never sees a ring change.

use std::collections::HashMap;
use std::error::Error as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

use pm_cluster::{Member, Membership, RingKey};
use pm_proto::internal::v1::shard_service_client::ShardServiceClient;
use pm_proto::internal::v1::token_keys_client::TokenKeysClient;
use pm_proto::internal::v1::{EnqueueRequest, EnqueueResponse};
use pm_proto::names::PipelineName;
use pm_proto::raw::agent_service_client::AgentServiceClient as RawAgentServiceClient;
use pm_proto::status::NotOwner;
use pm_proto::v1::agent_service_client::AgentServiceClient;
use pm_proto::v1::auth_service_client::AuthServiceClient;
use pm_proto::v1::pipeline_service_client::PipelineServiceClient;
use pm_proto::v1::tenant_service_client::TenantServiceClient;

use crate::pipelines::PipelineCache;

/// Upstream endpoints, `http://host:port`.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub tenant_service: String,
    /// The one shard, when there is no etcd.
    pub shard: String,
    /// etcd endpoints: route by the ring of the shards registered there (`shard` unused).
    pub etcd: Vec<String>,
}

/// Calls to the owner, at most this many when shards answer "not the owner".
pub const ATTEMPTS: u32 = 6;
/// How long to wait for this gateway's ring to reach a shard's revision.
const RING_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Routes {
    /// tenant-service.
    catalog: Channel,
    tenants: TenantServiceClient<Channel>,
    pipelines: PipelineServiceClient<Channel>,
    cache: Arc<PipelineCache>,
    membership: Membership,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Routes {
    pub async fn new(upstreams: &Upstreams, cancel: CancellationToken) -> anyhow::Result<Self> {
        let catalog = pm_proto::client::channel(&upstreams.tenant_service)?;
        let pipelines = pm_proto::client::pipelines(catalog.clone());
        let cache = Arc::new(PipelineCache::new(
            pipelines.clone(),
            pm_proto::client::tenants(catalog.clone()),
        ));
        let membership = if upstreams.etcd.is_empty() {
            Membership::fixed([Member {
                id: "standalone".into(),
                address: upstreams.shard.clone(),
                started_at: 0,
            }])
        } else {
            let client = pm_cluster::etcd::connect(&upstreams.etcd).await?;
            cache.follow(client.clone(), cancel.clone());
            let membership = Membership::watch(client, cancel);
            // Serve at once either way; until the first ring arrives, task calls answer
            // UNAVAILABLE.
            membership.wait_for(RING_WAIT, |r| !r.is_empty()).await;
            membership
        };
        Ok(Self {
            tenants: pm_proto::client::tenants(catalog.clone()),
            catalog,
            cache,
            pipelines,
            membership,
            channels: Arc::default(),
        })
    }

    pub fn tenants(&self) -> TenantServiceClient<Channel> {
        self.tenants.clone()
    }

    pub fn pipelines(&self) -> PipelineServiceClient<Channel> {
        self.pipelines.clone()
    }

    /// tenant-service's token issuance.
    pub fn auth(&self) -> AuthServiceClient<Channel> {
        pm_proto::client::auth(self.catalog.clone())
    }

    /// tenant-service's public signing keys.
    pub fn token_keys(&self) -> TokenKeysClient<Channel> {
        pm_proto::client::token_keys(self.catalog.clone())
    }

    /// Pipeline versions as submits are validated against them.
    pub fn pipeline_cache(&self) -> &PipelineCache {
        &self.cache
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// A channel to the shard at `address`, made once and shared.
    fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().expect("channel cache poisoned");
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let channel = pm_proto::client::channel(address)
            .map_err(|e| Status::internal(format!("shard address {address}: {e}")))?;
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    /// UNAVAILABLE: no shard to send a call to.
    pub fn no_shard(&self) -> Status {
        pm_proto::status::unavailable(
            if self.membership.connected() {
                "no scheduler shard is registered".into()
            } else {
                "no scheduler shard known yet (etcd unreachable)".into()
            },
            Duration::from_secs(1),
        )
    }

    /// The address of the shard that owns `key` (`None`: any shard), by this gateway's ring.
    fn owner(&self, key: Option<&RingKey>) -> Result<String, Status> {
        let ring = self.membership.ring();
        let owner = match key {
            Some(key) => ring.owner(key),
            None => ring.members().next(),
        };
        owner
            .map(|m| m.address.clone())
            .ok_or_else(|| self.no_shard())
    }

    /// The address of the shard that owns `key` now, by this gateway's ring.
    pub fn owner_of(&self, key: &RingKey) -> Result<String, Status> {
        self.owner(Some(key))
    }

    /// One Enqueue at the shard at `address`, without following "not the owner" answers:
    /// the caller decides what to do with them (a coalesced batch of several pipelines goes
    /// back to [`Routes::call`] one pipeline at a time).
    pub async fn enqueue_at(
        &self,
        address: &str,
        request: EnqueueRequest,
    ) -> Result<EnqueueResponse, Status> {
        let mut shard = pm_proto::client::shard(self.channel(address)?);
        match shard.enqueue(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(broken(address, status)),
        }
    }

    /// Calls `f` on the shard that owns `key`, following "not the owner" answers.
    pub async fn call<T, F, Fut>(&self, key: &RingKey, f: F) -> Result<T, Status>
    where
        F: FnMut(ShardServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.follow(Some(key), pm_proto::client::shard, f).await
    }

    /// The same for an agent's stream (raw: forwarded as it comes), by the ring key of its pipelines (all must share one
    /// owner; an agent serving every pipeline goes to the only shard). An agent of a
    /// partitioned pipeline is [`crate::agents`]' fan-in instead.
    pub async fn call_agents<T, F, Fut>(&self, pipelines: &[String], f: F) -> Result<T, Status>
    where
        F: FnMut(RawAgentServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let key = self.agent_key(pipelines)?;
        self.follow(key.as_ref(), pm_proto::client::raw_agents, f)
            .await
    }

    /// The agent stream to the shard at `address`, without following "not the owner".
    pub fn agents_at(&self, address: &str) -> Result<AgentServiceClient<Channel>, Status> {
        Ok(pm_proto::client::agents(self.channel(address)?))
    }

    /// Waits (bounded) for this gateway's ring to reach the revision a "not the owner"
    /// answer names, or gives a lagging shard a moment; `attempt` counts from 0.
    pub async fn catch_up(&self, status: &Status, attempt: u32) {
        let Some(view) = NotOwner::from_status(status) else {
            return;
        };
        let ours = self.membership.ring().revision;
        if view.revision > ours {
            // The shard has seen a newer ring: wait for ours to catch up.
            self.membership
                .wait_for(RING_WAIT, |r| r.revision >= view.revision)
                .await;
        } else {
            // The shard lags behind us (or we agree and a change is under way): give it a
            // moment.
            tokio::time::sleep(Duration::from_millis(10 << attempt.min(6))).await;
        }
        crate::metrics::METRICS.routing_retries.increment(1);
    }

    fn agent_key(&self, pipelines: &[String]) -> Result<Option<RingKey>, Status> {
        let ring = self.membership.ring();
        let keys: Vec<RingKey> = pipelines
            .iter()
            .filter_map(|p| PipelineName::parse(p).ok().map(RingKey::whole))
            .collect();
        match keys.first() {
            // Any shard: it refuses unless it is the only one.
            None => Ok(None),
            Some(first) => {
                let owner = ring.owner(first).map(|m| m.id.clone());
                if let Some(other) = keys
                    .iter()
                    .find(|k| ring.owner(k).map(|m| &m.id) != owner.as_ref())
                {
                    return Err(Status::failed_precondition(format!(
                        "the agent's pipelines {first} and {other} are on different shards: \
                         run one agent per pipeline in a cluster"
                    )));
                }
                Ok(Some(first.clone()))
            }
        }
    }

    async fn follow<C, T, F, Fut>(
        &self,
        key: Option<&RingKey>,
        client: impl Fn(Channel) -> C,
        mut f: F,
    ) -> Result<T, Status>
    where
        F: FnMut(C) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            let address = self.owner(key)?;
            let status = match f(client(self.channel(&address)?)).await {
                Ok(v) => return Ok(v),
                Err(status) => broken(&address, status),
            };
            if NotOwner::from_status(&status).is_none() {
                return Err(status);
            }
            self.catch_up(&status, attempt).await;
            tracing::debug!(?key, attempt, %status, "not the owner; retrying");
            last = Some(status);
        }
        Err(last.map_or_else(
            || Status::unavailable("no attempt made"),
            |s| {
                pm_proto::status::unavailable(
                    format!("the ring is changing: {}", s.message()),
                    Duration::from_millis(500),
                )
            },
        ))
    }
}

/// A call whose connection broke (a shard died mid-call) as UNAVAILABLE: whether it took
/// effect is unknown, so it is not repeated here; the client may retry. A transport error
/// comes as UNKNOWN with a source; a stream the dying shard reset comes as CANCELLED, which
/// the gateway never asks for (a client that cancels drops the gateway's call, which then
/// answers nothing). Other answers as they are.
fn broken(address: &str, status: Status) -> Status {
    let reset = status.code() == Code::Cancelled;
    if reset || (status.code() == Code::Unknown && status.source().is_some()) {
        return pm_proto::status::unavailable(
            format!("shard at {address} unreachable: {}", status.message()),
            Duration::from_secs(1),
        );
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_or_broken_upstream_is_unavailable_and_answers_pass_through() {
        let reset = broken("s0:1", Status::cancelled("h2 protocol error: stream reset"));
        assert_eq!(reset.code(), Code::Unavailable, "{reset:?}");
        assert!(reset.message().contains("s0:1"), "{reset:?}");
        for answer in [
            Status::not_found("no such task"),
            Status::invalid_argument("bad"),
            Status::unknown("an answer, not a transport error"),
        ] {
            let code = answer.code();
            assert_eq!(broken("s0:1", answer).code(), code);
        }
    }
}
