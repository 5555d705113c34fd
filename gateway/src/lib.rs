//! The gateway: the only public endpoint, for clients and agents alike, over gRPC and
//! grpc-web (with CORS) on one port.
//!
//! - [`tasks`]: `TaskService`, validated here against the pipeline version, routed to shards;
//!   [`enqueue`]: the way to the shard (specs by reference, unary submits coalesced).
//! - [`config`]: `TenantService` and `PipelineService`, forwarded to tenant-service.
//! - [`agents`]: agents' `Connect` streams, spliced to the owning shard.
//! - [`routing`]: which upstream serves what; [`pipelines`]: the pipeline cache submits are
//!   validated against.
//! - [`metrics`]: the gateway's own metric names (pipeline cache, routing retries).
//! - [`watch`]: task watches that follow a task across shard moves.
//! - [`auth`]: who is calling (bearer tokens verified here); [`authz`]: the authorization
//!   table every handler asks.

pub mod agents;
pub mod auth;
pub mod authz;
pub mod config;
pub mod console;
pub mod enqueue;
pub mod error;
pub mod metrics;
pub mod partitions;
pub mod pipelines;
pub mod routing;
pub mod tasks;
pub mod watch;

use std::future::Future;

use http::header::HeaderName;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use pm_proto::MAX_MESSAGE_BYTES;
use pm_proto::raw::agent_service_server::AgentServiceServer;
use pm_proto::v1::auth_service_server::AuthServiceServer;
use pm_proto::v1::pipeline_service_server::PipelineServiceServer;
use pm_proto::v1::task_service_server::TaskServiceServer;
use pm_proto::v1::tenant_service_server::TenantServiceServer;

/// Calls and watches one client connection may have open at once (HTTP/2
/// SETTINGS_MAX_CONCURRENT_STREAMS): past it, the client's next call waits for one to end.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 2048;

pub use auth::Authenticator;
pub use error::Error;
pub use routing::{Routes, Upstreams};

/// Which web origins browsers may call the gateway from (grpc-web).
#[derive(Debug, Clone, Default)]
pub enum Origins {
    /// Only the gateway's own (no cross-origin call is allowed).
    #[default]
    SameOnly,
    /// `http(s)://localhost`, `127.0.0.1` or `[::1]`, any port: a developer's machine.
    Localhost,
    /// These exact origins (`https://console.example.com`).
    List(Vec<String>),
    /// Any origin (tokens still apply).
    Any,
}

/// How the gateway checks and bounds its callers.
#[derive(Debug, Clone)]
pub struct Security {
    /// Verify bearer tokens and authorize every call (`false`: everyone may do everything).
    pub auth: bool,
    pub origins: Origins,
    /// Watches one client may hold open here (not counted with `auth` off).
    pub max_watches_per_client: usize,
}

impl Default for Security {
    fn default() -> Self {
        Self {
            auth: false,
            origins: Origins::default(),
            max_watches_per_client: watch::DEFAULT_MAX_WATCHES_PER_CLIENT,
        }
    }
}

fn is_localhost(origin: &[u8]) -> bool {
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = match rest.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => rest,
    };
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

/// CORS for browsers of the allowed origins; they need to read the gRPC status headers.
fn cors(origins: &Origins) -> CorsLayer {
    let allow = match origins {
        Origins::SameOnly => AllowOrigin::list([]),
        Origins::Localhost => AllowOrigin::predicate(|o, _| is_localhost(o.as_bytes())),
        Origins::List(list) => AllowOrigin::list(list.iter().filter_map(|o| o.parse().ok())),
        Origins::Any => AllowOrigin::mirror_request(),
    };
    CorsLayer::new()
        .allow_origin(allow)
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
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cancel = tokio_util::sync::CancellationToken::new();
    let _stop_watching = cancel.clone().drop_guard();
    let routes = Routes::new(&upstreams, cancel.clone()).await?;
    let authn = if security.auth {
        Authenticator::fetching(&routes, cancel).await
    } else {
        Authenticator::open()
    };
    // Every service but token issuance, health and reflection sees only authenticated calls.
    let guard = |authn: &Authenticator| {
        let authn = authn.clone();
        move |request| authn.intercept(request)
    };
    let (_health, health_service) = pm_proto::server::health();
    // The plaintext health-only and metrics ports, if any, for as long as this server runs.
    let stop_health = tokio_util::sync::CancellationToken::new();
    let _stop_health = stop_health.clone().drop_guard();
    tokio::spawn(pm_proto::server::serve_health_port(
        health_service.clone(),
        stop_health.clone().cancelled_owned(),
    ));
    tokio::spawn(pm_proto::metrics::serve_port(stop_health.cancelled_owned()));
    tracing::info!(addr = ?listener.local_addr().ok(), ?upstreams, ?security, "gateway serving");
    // Agents' streams and watches never end by themselves: they get a few seconds, then are
    // cut, so a stop never waits on a peer.
    let stopping = tokio_util::sync::CancellationToken::new();
    let shutdown = {
        let stopping = stopping.clone();
        async move {
            shutdown.await;
            stopping.cancel();
        }
    };
    let served = pm_proto::server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // grpc-web arrives over HTTP/1.1.
        .accept_http1(true)
        // Outermost: CORS answers preflights before anything else looks at the request.
        .layer(cors(&security.origins))
        // The web console's pages and assets (GET only); everything else passes.
        .layer(console::ConsoleLayer)
        // Plain HTTP with JSON (curl) becomes the same gRPC call.
        .layer(pm_proto::json_http::JsonHttpLayer)
        // Then grpc-web is translated to gRPC for every service below.
        .layer(tonic_web::GrpcWebLayer::new())
        // Metrics see every call as gRPC, grpc-web ones included.
        .layer(pm_proto::metrics::GrpcMetricsLayer::new("gateway"))
        // A span per public call, for grpc-web ones too, when exporting traces.
        .layer(pm_proto::trace::ServerSpanLayer::new("gateway"))
        // Inside the metrics: a call refused for the limit is counted with its code.
        .layer(pm_proto::in_flight::InFlightLimit::configured())
        .add_service(health_service)
        .add_service(pm_proto::server::reflection())
        .add_service(InterceptedService::new(
            TaskServiceServer::new(tasks::Tasks::new(
                routes.clone(),
                security.max_watches_per_client,
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
            guard(&authn),
        ))
        .add_service(InterceptedService::new(
            TenantServiceServer::new(config::Config::new(routes.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            guard(&authn),
        ))
        .add_service(InterceptedService::new(
            PipelineServiceServer::new(config::Config::new(routes.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            guard(&authn),
        ))
        .add_service(AuthServiceServer::new(config::Auth::new(routes.clone())))
        .add_service(InterceptedService::new(
            AgentServiceServer::new(agents::Agents::new(routes))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            guard(&authn),
        ))
        .serve_with_incoming_shutdown(pm_proto::server::incoming_public(listener), shutdown);
    pm_proto::server::with_stop_grace(served, &stopping).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_localhost;

    #[test]
    fn localhost_origins_are_loopback_hosts_on_any_port() {
        for ok in [
            "http://localhost:5173",
            "http://127.0.0.1",
            "https://[::1]:8443",
        ] {
            assert!(is_localhost(ok.as_bytes()), "{ok}");
        }
        for no in [
            "http://localhost.evil.com",
            "http://evil.com:80",
            "http://127.0.0.1.evil.com:1",
            "localhost",
            "file://localhost",
        ] {
            assert!(!is_localhost(no.as_bytes()), "{no}");
        }
    }
}
