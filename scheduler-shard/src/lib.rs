//! scheduler-shard: owns a slice of pipelines, queues their tasks, leases them to agents
//! over their streams, and records results.
//!
//! - [`task`]: the state machine, the one owner of state transitions.
//! - [`queue`]: the ready queue and its dispatch order.
//! - [`lease`]: the lease table (grant, renew, expire, reclaim).
//! - [`scheduler`]: the tasks, queue, leases and agent sessions together, and every operation.
//! - [`store`]: the tasks on the shard's own disk (fjall); [`journal`]: the group-commit writer.
//! - [`agent_stream`]: the agents' `Connect` streams.
//! - [`service`]: `pm.internal.v1.ShardService`, the gateway's calls and other shards' handoffs.
//! - [`metrics`]: the shard's metric names and the scrape-time collector.
//! - [`ownership`]: which ring keys this shard serves; [`handoff`]: moving the others away.

pub mod agent_stream;
mod chunked;
pub mod error;
pub mod handoff;
pub mod journal;
pub mod key;
pub mod lease;
mod memory;
pub mod metrics;
pub mod ownership;
pub mod queue;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod task;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use pm_proto::MAX_MESSAGE_BYTES;
use pm_proto::internal::v1::shard_service_server::ShardServiceServer;
use pm_proto::v1::agent_service_server::AgentServiceServer;

use pm_cluster::{Member, Membership, Registration};

pub use error::Error;
pub use ownership::Ownership;
pub use scheduler::{Options, Scheduler};

/// Opens the task store in `data_dir` (or keeps tasks in memory only when `None`), replays
/// it, and starts the group-commit writer.
pub fn open(
    options: Options,
    data_dir: Option<&Path>,
) -> Result<Arc<Scheduler>, store::StoreError> {
    let Some(dir) = data_dir else {
        return Ok(Scheduler::new(
            options,
            journal::Journal::discard(),
            store::Contents::default(),
        ));
    };
    let started = std::time::Instant::now();
    let store = store::Store::open_with(
        dir,
        store::StoreOptions {
            fsync: !options.unsafe_no_fsync,
            memtable_bytes: options.memtable_mib << 20,
            slow_commit: options.slow_commit,
        },
    )?;
    let opened = started.elapsed();
    let salvage = options.salvage;
    let mut unreadable = Vec::new();
    let specs = store.read_specs(salvage.then_some(&mut unreadable))?;
    let len = store.approximate_tasks();
    let reader = store.clone();
    let salvager = store.clone();
    // One thread reads and decodes while this one indexes: a restart takes the longer of the
    // two, not their sum. Nothing writes until the scheduler serves.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<store::Record>>(READ_AHEAD_CHUNKS);
    let scheduler = std::thread::scope(|scope| {
        let read = scope.spawn(move || {
            let mut chunk = Vec::with_capacity(READ_CHUNK);
            let mut unreadable = Vec::new();
            let read = reader.read_tasks(
                |record| {
                    chunk.push(record);
                    if chunk.len() == READ_CHUNK {
                        let full = std::mem::replace(&mut chunk, Vec::with_capacity(READ_CHUNK));
                        // Fails only if the indexing side is gone (it panicked).
                        let _ = tx.send(full);
                    }
                },
                salvage.then_some(&mut unreadable),
            );
            let _ = tx.send(chunk);
            read.map(|()| unreadable)
        });
        let scheduler = Scheduler::recover(
            options,
            journal::Journal::start(store),
            specs,
            rx.iter().flatten(),
            len,
        );
        read.join()
            .expect("the store reader panicked")
            .map(|tasks| {
                unreadable.extend(tasks);
                scheduler
            })
    })?;
    if !unreadable.is_empty() {
        // Nothing writes until the scheduler serves: these deletes go alone.
        salvaged(&salvager, dir, &unreadable)?;
    }
    let read_and_indexed = started.elapsed() - opened;
    // What reading freed (the decoded chunks, fjall's replayed journal) goes back before the
    // shard serves, as a quiet shard's does (`memory`).
    let (_, rss_mib) = pm_proto::server::release_free_memory();
    tracing::info!(
        open_ms = opened.as_millis() as u64,
        read_and_index_ms = read_and_indexed.as_millis() as u64,
        tasks = scheduler.len(),
        rss_mib = rss_mib.map(|m| m.round()),
        "read the task store"
    );
    Ok(scheduler)
}

/// What a salvage dropped: each record logged, all of them listed in
/// `salvaged-{unix ms}.txt` in the data directory (synced before anything is deleted), then
/// deleted from the store so the next start is a plain one.
fn salvaged(
    store: &store::Store,
    dir: &Path,
    unreadable: &[store::Unreadable],
) -> Result<(), store::StoreError> {
    let report = dir.join(format!("salvaged-{}.txt", pm_proto::unix_ms()));
    let lines: String = unreadable.iter().map(|u| u.line() + "\n").collect();
    let written = std::fs::File::create(&report).and_then(|mut file| {
        std::io::Write::write_all(&mut file, lines.as_bytes())?;
        file.sync_all()
    });
    written.map_err(|e| store::StoreError(format!("cannot write {}: {e}", report.display())))?;
    for u in unreadable {
        tracing::error!(record = %u.line(), "salvage: unreadable record dropped");
    }
    store.drop_unreadable(unreadable)?;
    tracing::warn!(
        dropped = unreadable.len(),
        report = %report.display(),
        "salvage: the unreadable records were dropped; the rest is served"
    );
    Ok(())
}

/// Records sent at once from the store's reader to the indexing thread at start.
const READ_CHUNK: usize = 4096;
/// Chunks read ahead of indexing, at most.
const READ_AHEAD_CHUNKS: usize = 16;

/// A shard's place in the cluster: its view of the ring and, in cluster mode, its
/// registration in etcd.
pub struct Cluster {
    pub ownership: Arc<Ownership>,
    pub registration: Option<Registration>,
    /// How long a leaving shard (SIGTERM) may spend handing its tasks off (`None`: until
    /// every task is handed off).
    pub handoff_timeout: Option<Duration>,
}

impl Cluster {
    /// Alone, owning every pipeline: `pm dev` and shards without etcd.
    pub fn standalone() -> Self {
        Self {
            ownership: Arc::new(Ownership::standalone()),
            registration: None,
            handoff_timeout: Some(Duration::ZERO),
        }
    }

    /// Registers `me` in etcd under a lease of `ttl`, watches the other shards, and waits
    /// (at most `ttl`) until the ring shows this shard, so it serves its keys at once.
    pub async fn join(
        endpoints: &[String],
        me: Member,
        ttl: Duration,
        handoff_timeout: Option<Duration>,
        cancel: CancellationToken,
    ) -> Result<Self, pm_cluster::Error> {
        let client = pm_cluster::etcd::connect(endpoints).await?;
        let membership = Membership::watch(client.clone(), cancel);
        let id = me.id.clone();
        let registration = Registration::register(client, me, ttl).await?;
        if !membership
            .wait_for(ttl, |ring| ring.member(&id).is_some())
            .await
        {
            tracing::warn!(shard = %id, "not yet in the ring; serving nothing until it is");
        }
        Ok(Self {
            ownership: Arc::new(Ownership::new(id, membership)),
            registration: Some(registration),
            handoff_timeout,
        })
    }
}

/// Serves `scheduler` on `listener`, alone, until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    scheduler: Arc<Scheduler>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve(listener, scheduler, Cluster::standalone(), shutdown).await
}

/// The health service name that reports whether the shard follows etcd (NOT_SERVING: etcd
/// unreachable, serving the last ring it knew). The overall status stays SERVING.
pub const MEMBERSHIP_HEALTH: &str = "pm.cluster.Membership";

/// Serves `scheduler` on `listener` as a member of `cluster` until `shutdown` resolves; then,
/// in a cluster, leaves the ring and hands its tasks off before it stops.
pub async fn serve(
    listener: TcpListener,
    scheduler: Arc<Scheduler>,
    cluster: Cluster,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let cancel = CancellationToken::new();
    let reaper = tokio::spawn(scheduler.clone().run(cancel.clone()));
    let release = memory::spawn(scheduler.journal(), cancel.clone());
    let (health, health_service) = pm_proto::server::health();
    // The plaintext health-only and metrics ports, if any, for as long as this server runs.
    let stop_health = tokio_util::sync::CancellationToken::new();
    let _stop_health = stop_health.clone().drop_guard();
    tokio::spawn(pm_proto::server::serve_health_port(
        health_service.clone(),
        stop_health.clone().cancelled_owned(),
    ));
    tokio::spawn(pm_proto::metrics::serve_port(stop_health.cancelled_owned()));
    tokio::spawn(report_store(
        health.clone(),
        scheduler.journal().writable(),
        cancel.clone(),
    ));
    let ownership = cluster.ownership.clone();
    metrics::collect_on_scrape(&scheduler, &ownership, cluster.registration.is_some());
    let handoff = handoff::Handoff::new(scheduler.clone(), ownership.clone());
    if cluster.registration.is_some() {
        tokio::spawn(handoff.clone().run(cancel.clone()));
        tokio::spawn(report_membership(
            health,
            ownership.membership().clone(),
            cancel.clone(),
        ));
    }
    // Leaving happens while the server still answers: the new owners' agents reconnect
    // elsewhere, and the handoff itself is served by the others.
    let stopping = CancellationToken::new();
    let leave = {
        let handoff = handoff.clone();
        let ownership = ownership.clone();
        let stopping = stopping.clone();
        async move {
            shutdown.await;
            let _stopping = stopping.drop_guard();
            if let Some(registration) = cluster.registration {
                ownership.leave();
                if let Err(e) = registration.leave().await {
                    tracing::warn!("cannot leave the ring in etcd ({e}); it expires instead");
                }
                let held = handoff.drain(cluster.handoff_timeout).await;
                tracing::info!(ring_keys_left = held, "left the ring");
            }
        }
    };
    tracing::info!(addr = ?listener.local_addr().ok(), shard = %ownership.me(), "shard serving");
    let served = pm_proto::server::builder()
        .layer(pm_proto::metrics::GrpcMetricsLayer::new("shard"))
        // Inside the metrics: a call refused for the limit is counted with its code.
        .layer(pm_proto::in_flight::InFlightLimit::configured())
        .add_service(health_service)
        .add_service(pm_proto::server::reflection())
        .add_service(
            ShardServiceServer::new(service::Shard::new(scheduler.clone(), ownership.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AgentServiceServer::new(agent_stream::AgentStreams::new(
                scheduler.clone(),
                ownership.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(pm_proto::server::incoming(listener), leave);
    // Streams still open when the server stops (a gateway's watch) get a few seconds.
    let served = pm_proto::server::with_stop_grace(served, &stopping).await;
    cancel.cancel();
    let _ = reaper.await;
    let _ = release.await;
    let stats = scheduler.journal().stats();
    tracing::info!(
        syncs = stats.syncs.load(std::sync::atomic::Ordering::Relaxed),
        unsynced = stats.unsynced.load(std::sync::atomic::Ordering::Relaxed),
        writes = stats.ops.load(std::sync::atomic::Ordering::Relaxed),
        "journal totals"
    );
    served
}

/// The shard's overall health follows its store: NOT_SERVING from a failed write (a full
/// disk: submits are answered UNAVAILABLE) until writes succeed again.
async fn report_store(
    health: tonic_health::server::HealthReporter,
    mut writable: tokio::sync::watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    loop {
        let status = if *writable.borrow_and_update() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = writable.changed() => if changed.is_err() { return },
        }
    }
}

async fn report_membership(
    health: tonic_health::server::HealthReporter,
    membership: Membership,
    cancel: CancellationToken,
) {
    let mut connected = membership.connected_changes();
    loop {
        let status = if *connected.borrow_and_update() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        health.set_service_status(MEMBERSHIP_HEALTH, status).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = connected.changed() => if changed.is_err() { return },
        }
    }
}
