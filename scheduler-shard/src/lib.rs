//! scheduler-shard: owns a slice of pipelines, queues their tasks, leases them to agents
//! over their streams, and records results.
//!
//! - [`task`]: the state machine, the one owner of state transitions.
//! - [`queue`]: the ready queue and its dispatch order.
//! - [`lease`]: the lease table (grant, renew, expire, reclaim).
//! - [`scheduler`]: the tasks, queue, leases and agent sessions together, and every operation.
//! - [`store`]: the tasks on the shard's own disk (fjall); [`journal`]: the group-commit writer.
//! - [`agent_stream`]: the agents' `Connect` streams.
//! - [`service`]: `pm.internal.v1.ShardService`, the gateway's calls.

pub mod agent_stream;
pub mod error;
pub mod journal;
pub mod lease;
pub mod queue;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod task;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use pm_proto::MAX_MESSAGE_BYTES;
use pm_proto::internal::v1::shard_service_server::ShardServiceServer;
use pm_proto::v1::agent_service_server::AgentServiceServer;

pub use error::Error;
pub use scheduler::{Options, Scheduler};

/// Opens the task store in `data_dir` (or keeps tasks in memory only when `None`), replays
/// it, and starts the group-commit writer.
pub fn open(
    options: Options,
    data_dir: Option<&Path>,
) -> Result<Arc<Scheduler>, store::StoreError> {
    let (journal, contents) = match data_dir {
        Some(dir) => {
            let store = store::Store::open_with(dir, !options.unsafe_no_fsync)?;
            let contents = store.load()?;
            (journal::Journal::start(store), contents)
        }
        None => (journal::Journal::discard(), store::Contents::default()),
    };
    Ok(Scheduler::new(options, journal, contents))
}

/// Serves `scheduler` on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    scheduler: Arc<Scheduler>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let cancel = CancellationToken::new();
    let reaper = tokio::spawn(scheduler.clone().run(cancel.clone()));
    let (_health, health_service) = pm_proto::server::health();
    tracing::info!(addr = ?listener.local_addr().ok(), "shard serving");
    let served = pm_proto::server::builder()
        .add_service(health_service)
        .add_service(pm_proto::server::reflection())
        .add_service(
            ShardServiceServer::new(service::Shard::new(scheduler.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AgentServiceServer::new(agent_stream::AgentStreams::new(scheduler.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(pm_proto::server::incoming(listener), shutdown)
        .await;
    cancel.cancel();
    let _ = reaper.await;
    let stats = scheduler.journal().stats();
    tracing::info!(
        syncs = stats.syncs.load(std::sync::atomic::Ordering::Relaxed),
        writes = stats.ops.load(std::sync::atomic::Ordering::Relaxed),
        "journal totals"
    );
    served
}
