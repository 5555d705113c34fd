//! One constructor per service: every client of ours gets the same message-size limits and
//! compression, whoever builds it.

use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};

use crate::MAX_MESSAGE_BYTES;
use crate::internal::v1::exec_service_client::ExecServiceClient;
use crate::internal::v1::shard_service_client::ShardServiceClient;
use crate::v1::agent_service_client::AgentServiceClient;
use crate::v1::auth_service_client::AuthServiceClient;
use crate::v1::pipeline_service_client::PipelineServiceClient;
use crate::v1::runner_service_client::RunnerServiceClient;
use crate::v1::task_service_client::TaskServiceClient;
use crate::v1::tenant_service_client::TenantServiceClient;

/// A lazily connecting channel to `endpoint` (`http://host:port`), with HTTP/2 keepalive so
/// a dead peer is noticed on idle streams too.
pub fn channel(endpoint: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(endpoint.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

macro_rules! constructor {
    ($(#[$doc:meta])* $fn:ident, $client:ident) => {
        $(#[$doc])*
        pub fn $fn(channel: Channel) -> $client<Channel> {
            $client::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
                .accept_compressed(CompressionEncoding::Gzip)
        }
    };
}

constructor!(
    /// `pm.v1.TenantService`.
    tenants, TenantServiceClient
);
constructor!(
    /// `pm.v1.PipelineService`.
    pipelines, PipelineServiceClient
);
constructor!(
    /// `pm.v1.TaskService`.
    tasks, TaskServiceClient
);
constructor!(
    /// `pm.v1.AuthService`.
    auth, AuthServiceClient
);
constructor!(
    /// `pm.v1.AgentService`.
    agents, AgentServiceClient
);
constructor!(
    /// `pm.v1.RunnerService`.
    runner, RunnerServiceClient
);
constructor!(
    /// `pm.internal.v1.ShardService`.
    shard, ShardServiceClient
);
constructor!(
    /// `pm.internal.v1.ExecService` (a sidecar on a Unix socket).
    exec, ExecServiceClient
);
