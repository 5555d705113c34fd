//! Shard membership in etcd: a shard's [`Registration`] (its key under a lease it keeps
//! alive) and everyone's [`Membership`] view (a watch on the shards' prefix turned into a
//! [`Ring`]).
//!
//! When etcd cannot be reached, a view keeps the last ring it built and says so
//! ([`Membership::connected`]); a registration keeps trying, and registers again if its
//! lease expired meanwhile. So an etcd outage freezes the ring rather than emptying it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::etcd::unavailable;
use crate::metadata::{Error, Result};
use crate::ring::{Member, Ring};

/// Where shards register: `/pm/v1/shards/<shard-id>` = JSON [`Member`].
pub const SHARDS_PREFIX: &str = "/pm/v1/shards/";

/// Waits between attempts to reach etcd again.
const RETRY: Duration = Duration::from_millis(500);

fn shard_key(id: &str) -> String {
    format!("{SHARDS_PREFIX}{id}")
}

/// A shard's presence in the ring, for as long as it keeps its lease alive.
pub struct Registration {
    client: Client,
    lease: watch::Receiver<i64>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Registration {
    /// Registers `member` under a lease of `ttl` and keeps it alive in the background.
    /// Fails only if etcd cannot be reached for the first registration.
    pub async fn register(client: Client, member: Member, ttl: Duration) -> Result<Self> {
        let ttl_s = ttl.as_secs().max(1) as i64;
        let lease = put_under_lease(&client, &member, ttl_s).await?;
        let (tx, rx) = watch::channel(lease);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(keep_alive(
            client.clone(),
            member,
            ttl_s,
            tx,
            cancel.clone(),
        ));
        Ok(Self {
            client,
            lease: rx,
            cancel,
            task,
        })
    }

    /// Leaves the ring: stops renewing and revokes the lease, which deletes the key at once
    /// (every view sees the shard go without waiting for the TTL).
    pub async fn leave(mut self) -> Result<()> {
        self.cancel.cancel();
        let _ = (&mut self.task).await;
        let lease = *self.lease.borrow();
        self.client
            .lease_client()
            .revoke(lease)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

/// Dropped without [`Registration::leave`], the lease is no longer renewed and the shard
/// drops out of the ring when it expires, as if the process had died.
impl Drop for Registration {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn put_under_lease(client: &Client, member: &Member, ttl_s: i64) -> Result<i64> {
    let granted = client
        .lease_client()
        .grant(ttl_s, None)
        .await
        .map_err(unavailable)?;
    let value = serde_json::to_vec(member).expect("a member encodes");
    client
        .kv_client()
        .put(
            shard_key(&member.id),
            value,
            Some(PutOptions::new().with_lease(granted.id())),
        )
        .await
        .map_err(unavailable)?;
    Ok(granted.id())
}

/// Renews the lease at a third of its TTL; registers again when the lease was lost (etcd
/// unreachable for longer than the TTL, so the key is gone).
async fn keep_alive(
    client: Client,
    member: Member,
    ttl_s: i64,
    lease: watch::Sender<i64>,
    cancel: CancellationToken,
) {
    let period = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(100));
    loop {
        let id = *lease.borrow();
        let lost = tokio::select! {
            _ = cancel.cancelled() => return,
            lost = renew_until_lost(&client, id, period) => lost,
        };
        if lost {
            tracing::warn!(shard = %member.id, "membership lease lost; registering again");
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
            if !lost {
                break;
            }
            match put_under_lease(&client, &member, ttl_s).await {
                Ok(id) => {
                    lease.send_replace(id);
                    tracing::info!(shard = %member.id, "registered again");
                    break;
                }
                Err(e) => tracing::warn!(shard = %member.id, "cannot register: {e}"),
            }
        }
    }
}

/// Renews lease `id` every `period` until the stream breaks (`false`: try the same lease
/// again) or etcd says the lease is gone (`true`).
async fn renew_until_lost(client: &Client, id: i64, period: Duration) -> bool {
    let (mut keeper, mut responses) = match client.lease_client().keep_alive(id).await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!("membership keep-alive: {e}");
            return false;
        }
    };
    loop {
        if keeper.keep_alive().await.is_err() {
            return false;
        }
        match responses.message().await {
            Ok(Some(r)) if r.ttl() <= 0 => return true,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return false,
        }
        tokio::time::sleep(period).await;
    }
}

/// A process's view of the shards: the current [`Ring`], updated as etcd reports changes.
#[derive(Clone)]
pub struct Membership {
    ring: watch::Receiver<Arc<Ring>>,
    connected: watch::Receiver<bool>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("ring", &*self.ring.borrow())
            .finish()
    }
}

impl Membership {
    /// A ring that never changes: `pm dev` and single-shard setups without etcd.
    pub fn fixed(members: impl IntoIterator<Item = Member>) -> Self {
        let (_, ring) = watch::channel(Arc::new(Ring::new(0, members)));
        let (_, connected) = watch::channel(true);
        Self { ring, connected }
    }

    /// Watches the shards registered in etcd until `cancel`.
    pub fn watch(client: Client, cancel: CancellationToken) -> Self {
        let (ring_tx, ring) = watch::channel(Arc::new(Ring::default()));
        let (connected_tx, connected) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                let result = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = follow(&client, &ring_tx, &connected_tx) => r,
                };
                connected_tx.send_replace(false);
                if let Err(e) = result {
                    tracing::warn!("shard membership: {e}; keeping the last ring");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        });
        Self { ring, connected }
    }

    /// The ring now.
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.borrow().clone()
    }

    /// Changes of the ring, for whoever reacts to them.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Ring>> {
        self.ring.clone()
    }

    /// Whether the view is following etcd right now (false: serving the last ring known).
    pub fn connected(&self) -> bool {
        *self.connected.borrow()
    }

    pub fn connected_changes(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Waits until the ring satisfies `f`, or `timeout` passes.
    pub async fn wait_for(&self, timeout: Duration, f: impl FnMut(&Arc<Ring>) -> bool) -> bool {
        let mut rx = self.ring.clone();
        tokio::time::timeout(timeout, rx.wait_for(f))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Lists the shards, then follows changes from the next revision until the watch breaks.
async fn follow(
    client: &Client,
    ring: &watch::Sender<Arc<Ring>>,
    connected: &watch::Sender<bool>,
) -> Result<()> {
    let listed = client
        .kv_client()
        .get(SHARDS_PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(unavailable)?;
    let mut revision = listed.header().map(|h| h.revision()).unwrap_or(0);
    let mut members: BTreeMap<String, Member> = BTreeMap::new();
    for kv in listed.kvs() {
        if let Some(m) = decode(kv.key(), kv.value()) {
            members.insert(m.id.clone(), m);
        }
    }
    publish(ring, revision, &members);
    connected.send_replace(true);

    let mut stream = client
        .watch_client()
        .watch(
            SHARDS_PREFIX,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1)
                    .with_progress_notify(),
            ),
        )
        .await
        .map_err(unavailable)?;
    while let Some(response) = stream.message().await.map_err(unavailable)? {
        if response.canceled() {
            return Err(Error::Unavailable(format!(
                "etcd cancelled the membership watch: {}",
                response.cancel_reason()
            )));
        }
        let mut changed = false;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let id = String::from_utf8_lossy(kv.key())
                .trim_start_matches(SHARDS_PREFIX)
                .to_owned();
            match event.event_type() {
                EventType::Put => {
                    if let Some(m) = decode(kv.key(), kv.value()) {
                        changed |= members.insert(id, m.clone()).as_ref() != Some(&m);
                    }
                }
                EventType::Delete => changed |= members.remove(&id).is_some(),
            }
        }
        let at = response.header().map(|h| h.revision()).unwrap_or(revision);
        if changed {
            revision = at;
            publish(ring, revision, &members);
        }
    }
    Err(Error::Unavailable(
        "etcd closed the membership watch".into(),
    ))
}

fn publish(ring: &watch::Sender<Arc<Ring>>, revision: i64, members: &BTreeMap<String, Member>) {
    let next = Ring::new(revision as u64, members.values().cloned());
    let ids: Vec<&str> = next.members().map(|m| m.id.as_str()).collect();
    tracing::info!(revision, shards = ?ids, "ring");
    ring.send_replace(Arc::new(next));
}

fn decode(key: &[u8], value: &[u8]) -> Option<Member> {
    match serde_json::from_slice::<Member>(value) {
        Ok(m) if key.ends_with(m.id.as_bytes()) => Some(m),
        Ok(m) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), id = %m.id, "shard key and id differ; ignored");
            None
        }
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), "undecodable shard registration: {e}");
            None
        }
    }
}
