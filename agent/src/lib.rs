//! The agent: the small program in every pipeline pod (or bare on a Pi).
//!
//! - [`agent_stream`]: the long-lived stream to the gateway: Hello, Assign, Progress,
//!   Result, Renew, reconnects.
//! - [`runner`]: one task from spec to result: stages, parallel jobs, retries, timeouts.
//! - [`executor`]: one command with `sh -c` in its own process group, output bounded.
//! - [`metrics`]: the agent's metric names.
//! - [`runner_service`]: `pm.v1.RunnerService.Run`, direct runs without a scheduler.
//! - [`sidecar`]: executors in their own containers: the exec-server and its client.
//! - [`work_mount`]: each task's work directory at `/mnt/pipe` for its commands.

pub mod agent_stream;
pub mod executor;
pub mod metrics;
pub mod runner;
pub mod runner_service;
pub mod sidecar;
pub mod work_mount;

use std::future::Future;

use tokio::net::TcpListener;

use pm_proto::MAX_MESSAGE_BYTES;
use pm_proto::v1::runner_service_server::RunnerServiceServer;

pub use agent_stream::{AgentOptions, run};
pub use runner::RunnerOptions;
pub use work_mount::WorkMount;

/// Serves `RunnerService` (plus health and reflection) on `listener` until `shutdown`.
pub async fn serve_runner(
    listener: TcpListener,
    options: RunnerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (_health, health_service) = pm_proto::server::health();
    pm_proto::server::builder()
        // Plain HTTP/1.1 with JSON too: `curl -d '{...}'` gets the events as JSON lines.
        .accept_http1(true)
        .layer(pm_proto::json_http::JsonHttpLayer)
        .layer(pm_proto::metrics::GrpcMetricsLayer::new(metrics::COMPONENT))
        .layer(pm_proto::trace::ServerSpanLayer::new(metrics::COMPONENT))
        .add_service(health_service)
        .add_service(pm_proto::server::reflection())
        .add_service(
            RunnerServiceServer::new(runner_service::Runner::new(options))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(pm_proto::server::incoming(listener), shutdown)
        .await
}
