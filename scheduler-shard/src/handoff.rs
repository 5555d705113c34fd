//! Handoff: when the ring gives a pipeline this shard holds tasks of to another shard, its
//! tasks (ready, leased with their deadlines, and finished ones still retained) move there.
//! The new owner persists them first (`Adopt`), then this shard deletes them; if the call
//! fails they are put back and tried again. Agents serving the pipeline are disconnected and
//! reconnect, through the gateway, to the new owner, where they reclaim their leases.
//!
//! It runs on every ring change and every few seconds (a straggler whose write was in
//! flight, a call that failed), and once more to the end when the shard leaves (SIGTERM).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use pm_proto::internal::v1::AdoptRequest;
use pm_proto::internal::v1::shard_service_client::ShardServiceClient;

use crate::ownership::Ownership;
use crate::scheduler::Scheduler;
use pm_cluster::RingKey;
use pm_proto::names::PipelineName;

/// Tasks per Adopt call (well under the 4 MiB message limit for ordinary tasks).
pub const BATCH: usize = 500;

/// How long one Adopt call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a leaving shard logs what it still holds.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Channels to the other shards, by address.
#[derive(Default)]
pub struct Peers {
    clients: HashMap<String, ShardServiceClient<Channel>>,
}

impl Peers {
    fn client(&mut self, address: &str) -> Option<ShardServiceClient<Channel>> {
        if let Some(c) = self.clients.get(address) {
            return Some(c.clone());
        }
        let channel = pm_proto::client::channel(address)
            .inspect_err(|e| tracing::warn!(address, "bad shard address: {e}"))
            .ok()?;
        let client = pm_proto::client::shard(channel);
        self.clients.insert(address.to_owned(), client.clone());
        Some(client)
    }
}

/// The handoff of one shard. Rounds never overlap: the ring-change loop and a leaving
/// shard's drain share one lock, so the drain cannot see "nothing left here" while a batch
/// it did not take is still on its way to the new owner.
pub struct Handoff {
    scheduler: Arc<Scheduler>,
    ownership: Arc<Ownership>,
    peers: tokio::sync::Mutex<Peers>,
}

impl Handoff {
    pub fn new(scheduler: Arc<Scheduler>, ownership: Arc<Ownership>) -> Arc<Self> {
        Arc::new(Self {
            scheduler,
            ownership,
            peers: tokio::sync::Mutex::new(Peers::default()),
        })
    }

    /// Hands off lost pipelines on every ring change until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut changes = self.ownership.membership().subscribe();
        loop {
            let pending = self.round().await;
            let wait = if pending {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(5)
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                // A view that stopped watching (its sender gone) no longer wakes us: tick.
                changed = changes.changed() => if changed.is_err() {
                    tokio::time::sleep(wait).await;
                },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass over the pipelines held here; returns whether something is left to move.
    pub async fn round(&self) -> bool {
        let mut peers = self.peers.lock().await;
        round(&self.scheduler, &self.ownership, &mut peers).await
    }

    /// Scale-down: hands everything off by the ring without this shard, until nothing is
    /// left, or `timeout` passes when there is one. Returns how many ring keys are still
    /// held (0: all moved). Logs its progress every [`PROGRESS_EVERY`].
    pub async fn drain(&self, timeout: Option<Duration>) -> usize {
        self.ownership.leave();
        let started = tokio::time::Instant::now();
        let deadline = timeout.map(|t| started + t);
        let mut reported = started;
        let total = self.scheduler.len();
        tracing::info!(tasks = total, "leaving: handing every task off");
        loop {
            let pending = self.round().await;
            let held: usize = self
                .scheduler
                .ring_keys_held()
                .iter()
                .map(|(_, partitions)| partitions.len())
                .sum();
            // A submit that passed its ownership check before the leave may still land.
            if held == 0 && self.scheduler.arrivals_in_flight() == 0 {
                tracing::info!(
                    tasks = total,
                    seconds = started.elapsed().as_secs_f64(),
                    "every task handed off"
                );
                return 0;
            }
            if reported.elapsed() >= PROGRESS_EVERY {
                reported = tokio::time::Instant::now();
                tracing::info!(
                    tasks_left = self.scheduler.len(),
                    ring_keys_left = held,
                    seconds = started.elapsed().as_secs_f64(),
                    "handing off"
                );
            }
            if held > 0 && self.ownership.ring().is_empty() {
                tracing::warn!(
                    ring_keys = held,
                    "no other shard to hand off to: tasks stay on this shard's disk"
                );
                return held;
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                tracing::warn!(
                    ring_keys = held,
                    tasks = self.scheduler.len(),
                    "handoff not finished within --handoff-seconds: the tasks left stay on this shard's disk until it is back"
                );
                return held;
            }
            let wait = if pending { 200 } else { 50 };
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
}

/// One pass over the pipelines held here; returns whether something is left to move.
async fn round(scheduler: &Scheduler, ownership: &Ownership, peers: &mut Peers) -> bool {
    let ring = ownership.ring();
    if !ownership.settled(&ring) {
        return false;
    }
    // Agents of lost ring keys go, even where no task of theirs is held here: their new
    // tasks queue at the new owner.
    let moved = |key: &RingKey| {
        ring.owner(key)
            .is_some_and(|o| o.id != ownership.me() || ownership.leaving())
    };
    scheduler.close_sessions_where(
        |key| match key {
            Some(key) => moved(key),
            None => ring.len() > 1 || ownership.leaving(),
        },
        "its pipeline moved to another shard; reconnect",
    );
    let mut pending = false;
    for (pipeline, partition) in scheduler
        .ring_keys_held()
        .into_iter()
        .flat_map(|(p, partitions)| partitions.into_iter().map(move |i| (p.clone(), i)))
    {
        // A task's key is its pipeline's partition; an unparsable pipeline stays.
        let Some(key) = PipelineName::parse(&pipeline)
            .ok()
            .map(|p| RingKey::new(p, partition))
        else {
            continue;
        };
        // An empty ring (the last shard leaving) has no one to take them: they stay on disk.
        let Some(owner) = ring.owner(&key).cloned() else {
            continue;
        };
        if owner.id == ownership.me() && !ownership.leaving() {
            continue;
        }
        let Some(mut client) = peers.client(&owner.address) else {
            pending = true;
            continue;
        };
        loop {
            let out = scheduler.take_for_handoff(&pipeline, partition, BATCH);
            pending |= out.busy > 0;
            if out.is_empty() {
                break;
            }
            let mut request = tonic::Request::new(AdoptRequest {
                from_shard: ownership.me().to_owned(),
                ring_revision: ring.revision,
                specs: out.specs.clone(),
                tasks: out.tasks.clone(),
            });
            request.set_timeout(CALL_TIMEOUT);
            match client.adopt(request).await {
                Ok(response) => {
                    let r = response.into_inner();
                    if let Err(e) = scheduler.forget(&out).await {
                        // They stay on disk too; a restart hands them off again, and the
                        // new owner keeps its own copy.
                        tracing::warn!(%key, "handed-off tasks not deleted here: {e}");
                    }
                    tracing::info!(
                        %key,
                        to = %owner.id,
                        adopted = r.adopted,
                        already_held = r.already_held,
                        "tasks handed off"
                    );
                    if out.tasks.len() < BATCH {
                        break;
                    }
                }
                Err(status) => {
                    tracing::warn!(%key, to = %owner.id, %status, "handoff failed; retrying");
                    scheduler.put_back(out);
                    pending = true;
                    break;
                }
            }
        }
    }
    pending
}
