//! tenant-service: CRUD for tenants, clients, applications and versioned pipelines.
//!
//! State lives in the metadata store ([`pm_cluster::MetadataStore`]); the service itself is
//! stateless, so any number of replicas can serve. [`service::Catalog`] holds the handlers,
//! [`keys`] the key layout, [`error`] the one mapping to `tonic::Status`, [`auth`] the signing
//! keys and token issuance.

pub mod auth;
pub mod error;
pub mod keys;
pub mod limits;
pub mod service;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use pm_cluster::MetadataStore;
use pm_proto::MAX_MESSAGE_BYTES;
use pm_proto::internal::v1::token_keys_server::TokenKeysServer;
use pm_proto::v1::auth_service_server::AuthServiceServer;
use pm_proto::v1::pipeline_service_server::PipelineServiceServer;
use pm_proto::v1::tenant_service_server::TenantServiceServer;

pub use auth::Issuer;
pub use error::Error;
pub use service::Catalog;

/// Serves tenant-service on `listener` until `shutdown` resolves; keeps the token signing
/// keys rotated meanwhile.
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn MetadataStore>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let issuer = Issuer::new(store.clone());
    // A key exists before the first PublicKeys answer, so a gateway that starts beside this
    // service knows the key of the first tokens.
    if let Err(e) = issuer.maintain_keys().await {
        tracing::warn!(error = %e, "no signing key yet; the rotation loop tries again");
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    let _stop_rotating = cancel.clone().drop_guard();
    tokio::spawn(issuer.clone().run_key_rotation(cancel));
    let catalog = Catalog::new(store);
    let (_health, health_service) = pm_proto::server::health();
    // The plaintext health-only and metrics ports, if any, for as long as this server runs.
    let stop_health = tokio_util::sync::CancellationToken::new();
    let _stop_health = stop_health.clone().drop_guard();
    tokio::spawn(pm_proto::server::serve_health_port(
        health_service.clone(),
        stop_health.clone().cancelled_owned(),
    ));
    tokio::spawn(pm_proto::metrics::serve_port(stop_health.cancelled_owned()));
    tracing::info!(addr = ?listener.local_addr().ok(), "tenant-service serving");
    pm_proto::server::builder()
        .layer(pm_proto::metrics::GrpcMetricsLayer::new("tenant-service"))
        // Inside the metrics: a call refused for the limit is counted with its code.
        .layer(pm_proto::in_flight::InFlightLimit::configured())
        .add_service(health_service)
        .add_service(pm_proto::server::reflection())
        .add_service(
            TenantServiceServer::new(catalog.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            PipelineServiceServer::new(catalog).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(AuthServiceServer::new(issuer.clone()))
        .add_service(TokenKeysServer::new(issuer))
        .serve_with_incoming_shutdown(pm_proto::server::incoming(listener), shutdown)
        .await
}
