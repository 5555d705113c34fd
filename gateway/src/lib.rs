//! The gateway: the only public endpoint, for clients and agents alike, over gRPC and
//! grpc-web (with CORS) on one port.
//!
//! - [`tasks`]: `TaskService`, validated here against the pipeline version, routed to shards;
//!   [`enqueue`]: the way to the shard (specs by reference, unary submits coalesced).
//! - [`config`]: `TenantService` and `PipelineService`, forwarded to tenant-service.
//! - [`agents`]: agents' `Connect` streams, spliced to the owning shard.
//! - [`routing`]: which upstream serves what; [`pipelines`]: the pipeline cache submits are
//!   validated against.

pub mod agents;
pub mod config;
pub mod enqueue;
pub mod error;
pub mod pipelines;
pub mod routing;
pub mod tasks;

use std::future::Future;

use http::header::HeaderName;
use tokio::net::TcpListener;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use pm_proto::MAX_MESSAGE_BYTES;
use pm_proto::v1::agent_service_server::AgentServiceServer;
use pm_proto::v1::auth_service_server::AuthServiceServer;
use pm_proto::v1::pipeline_service_server::PipelineServiceServer;
use pm_proto::v1::task_service_server::TaskServiceServer;
use pm_proto::v1::tenant_service_server::TenantServiceServer;

pub use error::Error;
pub use routing::{Routes, Upstreams};

/// Browsers may call from any origin in this version (auth is off); they need to read the
/// gRPC status headers.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_headers(Any)
        .allow_methods([http::Method::POST, http::Method::OPTIONS])
        .expose_headers([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
        ])
}

/// Serves the gateway on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    upstreams: Upstreams,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cancel = tokio_util::sync::CancellationToken::new();
    let _stop_watching = cancel.clone().drop_guard();
    let routes = Routes::new(&upstreams, cancel).await?;
    let (_health, health_service) = pm_proto::server::health();
    tracing::info!(addr = ?listener.local_addr().ok(), ?upstreams, "gateway serving");
    pm_proto::server::builder()
        // grpc-web arrives over HTTP/1.1.
        .accept_http1(true)
        // Outermost: CORS answers preflights before anything else looks at the request.
        .layer(cors())
        // Then grpc-web is translated to gRPC for every service below.
        .layer(tonic_web::GrpcWebLayer::new())
        .add_service(health_service)
        .add_service(pm_proto::server::reflection())
        .add_service(
            TaskServiceServer::new(tasks::Tasks::new(routes.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            TenantServiceServer::new(config::Config::new(routes.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            PipelineServiceServer::new(config::Config::new(routes.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(AuthServiceServer::new(config::Auth))
        .add_service(
            AgentServiceServer::new(agents::Agents::new(routes))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(pm_proto::server::incoming(listener), shutdown)
        .await?;
    Ok(())
}
