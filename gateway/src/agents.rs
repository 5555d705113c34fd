//! Agents' streams through the gateway: the gateway reads Hello to learn which pipelines the
//! agent serves (within its token's scope), opens the same stream to the shard that owns
//! them, and splices the two. Past Hello the gateway changes nothing on a stream to one
//! shard, so it forwards each message as its encoded bytes ([`pm_proto::raw`]), in both
//! directions, without decoding or re-encoding it.
//!
//! **A partitioned pipeline's agent** gets work from every partition owner through its one
//! stream: the gateway fans in. It opens one stream per owner, each with a Hello naming the
//! partitions that owner has, and merges what they send. The gateway holds the agent's
//! slots ([`Slots`]): the owners' streams are on explicit credit (Hello.explicit_credit),
//! so an answer frees its slot here, not at the owner, and the gateway gives it with a
//! Credit to the owner furthest below its even share. Credit out plus leases running never
//! pass the agent's slots, so no agent holds more than its slots, and each owner gets back
//! to its share whatever was running where when the agent reconnected. An agent with fewer
//! slots than owners gives one slot each to as many owners, starting at one its id hashes
//! to, so that agents together cover every owner (run agents × slots ≥ owners). A share
//! held by an idle partition's owner waits there: no partition starves, but slots do not
//! move to a busier one. When a partition moves, the shard losing it ends the stream, and
//! the agent reconnects to the new owners, as for any pipeline.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use xxhash_rust::xxh3::xxh3_64;

use pm_cluster::Member;
use pm_proto::names::{PipelineName, TaskName};
use pm_proto::raw::agent_service_server::AgentService;
use pm_proto::status::NotOwner;
use pm_proto::v1::{
    AgentMessage, Credit, Hello, Lease, Renew, ServerMessage, Welcome, agent_message,
    server_message,
};

use crate::auth::Caller;
use crate::authz::{self, Rpc};
use crate::routing::{self, Routes};

/// What the gateway streams to an agent: encoded `ServerMessage`s.
type ConnectStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// Slots one Credit message from an agent may add (a stream holds at most 4096).
const MAX_CREDIT_AT_ONCE: u32 = 4096;

/// How long a partition owner has to answer Hello with Welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Agents {
    routes: Routes,
}

impl Agents {
    pub fn new(routes: Routes) -> Self {
        Self { routes }
    }

    /// The partitions an agent's one pipeline covers, when there are several. An agent of
    /// several pipelines, or of one not found, is routed as before.
    async fn partitioned(&self, hello: &Hello) -> Option<u32> {
        let [pipeline] = hello.pipelines.as_slice() else {
            return None;
        };
        let name = PipelineName::parse(pipeline).ok()?;
        let version = self.routes.pipeline_cache().get(&name).await.ok()?;
        let covered = pm_cluster::ring::covered_partitions(&version.pipeline);
        (covered > 1).then_some(covered)
    }
}

/// Messages queued to one owner's stream, and to the agent from all of them.
const FAN_CHANNEL: usize = 64;

/// Each owner's share of `slots`: `slots / n`, and one more for `slots % n` of them,
/// counted from `start`.
fn shares(slots: u32, n: usize, start: usize) -> Vec<u32> {
    let n32 = n as u32;
    (0..n)
        .map(|i| {
            let rank = ((i + n - start % n) % n) as u32;
            slots / n32 + u32::from(rank < slots % n32)
        })
        .collect()
}

/// The partition a lease's task is in (0 for a name that does not parse: its owner then
/// refuses what it does not hold).
fn partition_of(lease: Option<&Lease>) -> u32 {
    lease
        .and_then(|l| TaskName::parse(&l.task).ok())
        .map_or(0, |n| n.partition())
}

/// A fanned-in agent's slots, by owner. The owners' streams are on explicit credit, so a
/// slot an answer frees comes here, and goes to the owner furthest below its share:
/// wherever the slots were when the agent (re)connected, each owner gets back to its share.
/// Only a lease an owner gave (or the agent held at Hello) frees a slot, once.
struct Slots {
    /// The agent's slots, and the start of its shares ([`shares`]).
    total: u32,
    start: usize,
    share: Vec<u32>,
    /// Credit sent to each owner and not yet used by an Assign.
    credit: Vec<u32>,
    /// Leases given to the agent and not yet answered, and their owner.
    leases: HashMap<String, usize>,
    running: Vec<u32>,
}

impl Slots {
    /// The agent's `free` slots and `held` leases (by owner index) over `n` owners.
    fn new(free: u32, held: &[(String, usize)], n: usize, start: usize) -> Self {
        let total = free.saturating_add(held.len() as u32);
        let mut slots = Self {
            total,
            start,
            share: shares(total, n, start),
            credit: vec![0; n],
            leases: HashMap::new(),
            running: vec![0; n],
        };
        for (lease, i) in held {
            if slots.leases.insert(lease.clone(), *i).is_none() {
                slots.running[*i] += 1;
            }
        }
        slots
    }

    /// Gives one free slot to the owner furthest below its share; returns it.
    fn grant(&mut self) -> usize {
        let deficit = |i: usize| {
            i64::from(self.share[i]) - i64::from(self.credit[i]) - i64::from(self.running[i])
        };
        let i = (0..self.share.len())
            .max_by_key(|&i| (deficit(i), std::cmp::Reverse(i)))
            .unwrap_or(0);
        self.credit[i] += 1;
        i
    }

    /// Owner `i` leased `lease` to the agent with one of its credits.
    fn assigned(&mut self, i: usize, lease: &str) {
        self.credit[i] = self.credit[i].saturating_sub(1);
        if self.leases.insert(lease.to_owned(), i).is_none() {
            self.running[i] += 1;
        }
    }

    /// The agent answered `lease` (a result or a reject): its slot is free, if it was one.
    fn answered(&mut self, lease: &str) -> bool {
        let Some(i) = self.leases.remove(lease) else {
            return false;
        };
        self.running[i] = self.running[i].saturating_sub(1);
        true
    }

    /// The agent added `n` slots (Credit).
    fn add(&mut self, n: u32) {
        self.total = self.total.saturating_add(n);
        self.share = shares(self.total, self.share.len(), self.start);
    }
}

/// Credit messages from a grant: `(owner, message)`.
fn credit(i: usize) -> (usize, AgentMessage) {
    let credit = agent_message::Message::Credit(Credit { slots: 1 });
    (
        i,
        AgentMessage {
            message: Some(credit),
        },
    )
}

/// Opens one stream per owner of `covered` partitions of the agent's one pipeline (see the
/// module doc), following "not the owner" answers, and splices them to the agent's stream.
async fn fan_in(
    routes: &Routes,
    hello: Hello,
    covered: u32,
    agent: Streaming<Bytes>,
) -> Result<Response<ConnectStream>, Status> {
    let pipeline = PipelineName::parse(&hello.pipelines[0])
        .map_err(|e| pm_proto::status::invalid_argument("hello.pipelines[0]", &e.to_string()))?;
    let mut last = None;
    for attempt in 0..routing::ATTEMPTS {
        let ring = routes.membership().ring();
        let owners: Vec<(Arc<Member>, Vec<u32>)> = ring
            .partition_owners(&pipeline, covered)
            .into_values()
            .collect();
        if owners.is_empty() {
            return Err(routes.no_shard());
        }
        let owner_of = |partition: u32| owners.iter().position(|(_, ps)| ps.contains(&partition));
        let mut held = vec![Vec::new(); owners.len()];
        let mut held_by = Vec::new();
        for lease in &hello.held_leases {
            if let Some(i) = owner_of(partition_of(Some(lease))) {
                held[i].push(lease.clone());
                held_by.push((lease.lease_id.clone(), i));
            }
        }
        let start = xxh3_64(hello.agent_id.as_bytes()) as usize % owners.len();
        let mut slots = Slots::new(hello.slots, &held_by, owners.len(), start);
        let mut first = vec![0u32; owners.len()];
        for _ in 0..hello.slots {
            first[slots.grant()] += 1;
        }
        // Every owner gets a stream, with slots or not: a slot freed later may go to it.
        let opens = owners.iter().enumerate().map(|(i, (member, partitions))| {
            let upstream_hello = Hello {
                slots: first[i],
                held_leases: std::mem::take(&mut held[i]),
                partitions: partitions.clone(),
                explicit_credit: true,
                ..hello.clone()
            };
            async move {
                let (tx, rx) = mpsc::channel(FAN_CHANNEL);
                let _ = tx.try_send(AgentMessage {
                    message: Some(agent_message::Message::Hello(upstream_hello)),
                });
                let mut shard = routes.agents_at(&member.address)?;
                let inbound = shard.connect(ReceiverStream::new(rx)).await?.into_inner();
                Ok::<_, Status>((partitions.clone(), tx, inbound))
            }
        });
        let opened: Result<Vec<_>, Status> =
            futures::future::join_all(opens).await.into_iter().collect();
        match opened {
            Ok(upstreams) => return splice(upstreams, slots, agent).await,
            Err(status) if NotOwner::from_status(&status).is_some() => {
                routes.catch_up(&status, attempt).await;
                last = Some(status);
            }
            Err(status) => return Err(status),
        }
    }
    Err(pm_proto::status::unavailable(
        format!(
            "the ring is changing: {}",
            last.map_or_else(String::new, |s| s.message().to_owned())
        ),
        Duration::from_millis(500),
    ))
}

/// One owner's stream: the partitions it serves, what goes to it, and what it sends.
type Upstream = (
    Vec<u32>,
    mpsc::Sender<AgentMessage>,
    Streaming<ServerMessage>,
);

/// Joins the owners' streams to the agent's: one Welcome for all, then whatever any owner
/// sends; the agent's messages go to the owner of their task's partition, and each slot an
/// answer frees to the owner [`Slots`] picks. The first stream to end ends the agent's,
/// which reconnects. The gateway reads every message here, so the agent's are decoded and
/// the owners' encoded again.
async fn splice(
    upstreams: Vec<Upstream>,
    slots: Slots,
    mut agent: Streaming<Bytes>,
) -> Result<Response<ConnectStream>, Status> {
    let mut welcome: Option<Welcome> = None;
    let mut by_partition: HashMap<u32, usize> = HashMap::new();
    let (mut txs, mut streams) = (Vec::new(), Vec::new());
    for (i, (partitions, tx, mut inbound)) in upstreams.into_iter().enumerate() {
        let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::unavailable("a partition owner sent no Welcome"))??;
        let Some(server_message::Message::Welcome(w)) = first.and_then(|m| m.message) else {
            return Err(Status::internal(
                "a partition owner's first message was not Welcome",
            ));
        };
        welcome = Some(match welcome {
            None => w,
            Some(mut all) => {
                all.session_id = format!("{},{}", all.session_id, w.session_id);
                all.lease_ttl_ms = all.lease_ttl_ms.min(w.lease_ttl_ms);
                all.protocol_version = all.protocol_version.min(w.protocol_version);
                all
            }
        });
        by_partition.extend(partitions.into_iter().map(|p| (p, i)));
        txs.push(tx);
        // Each item names its owner; `None` marks the end of that owner's stream.
        streams.push(
            inbound
                .map(move |m| Some((i, m)))
                .chain(futures::stream::once(async { None }))
                .boxed(),
        );
    }
    let slots = Arc::new(Mutex::new(slots));
    let (down, rx) = mpsc::channel(FAN_CHANNEL);
    let welcome = ServerMessage {
        message: welcome.map(server_message::Message::Welcome),
    };
    let _ = down.try_send(Ok(Bytes::from(welcome.encode_to_vec())));
    // Owners to the agent, until one ends or the agent goes.
    let counted = slots.clone();
    tokio::spawn(async move {
        let mut merged = futures::stream::select_all(streams);
        while let Some(item) = merged.next().await {
            let (item, last) = match item {
                Some((i, Ok(m))) => {
                    if let Some(server_message::Message::Assign(a)) = &m.message {
                        let lease = a.lease.as_ref().map_or("", |l| l.lease_id.as_str());
                        counted.lock().expect("slots lock").assigned(i, lease);
                    }
                    (Ok(Bytes::from(m.encode_to_vec())), false)
                }
                Some((_, Err(status))) => (Err(status), true),
                None => (
                    Err(Status::unavailable(
                        "a partition owner ended the stream; reconnect",
                    )),
                    true,
                ),
            };
            if down.send(item).await.is_err() || last {
                return;
            }
        }
    });
    // The agent to the owners, until it ends its stream or an owner's is gone (the merge
    // above then ends the agent's).
    tokio::spawn(async move {
        let to = |lease: Option<&Lease>| by_partition.get(&partition_of(lease)).copied();
        while let Ok(Some(raw)) = agent.message().await {
            // A message that does not decode ends the stream, as it would at a shard.
            let Ok(m) = AgentMessage::decode(raw) else {
                return;
            };
            let mut sends: Vec<(usize, AgentMessage)> = Vec::new();
            // The lease an answer frees the slot of.
            let mut answered = None;
            match &m.message {
                Some(agent_message::Message::Renew(r)) => {
                    let mut split: BTreeMap<usize, Vec<Lease>> = BTreeMap::new();
                    for lease in &r.leases {
                        if let Some(i) = to(Some(lease)) {
                            split.entry(i).or_default().push(lease.clone());
                        }
                    }
                    for (i, leases) in split {
                        let renew = agent_message::Message::Renew(Renew { leases });
                        sends.push((
                            i,
                            AgentMessage {
                                message: Some(renew),
                            },
                        ));
                    }
                }
                Some(agent_message::Message::Progress(p)) => {
                    sends.extend(to(p.lease.as_ref()).map(|i| (i, m.clone())));
                }
                Some(agent_message::Message::Result(r)) => {
                    answered = r.lease.clone();
                    sends.extend(to(r.lease.as_ref()).map(|i| (i, m.clone())));
                }
                Some(agent_message::Message::ResultPart(r)) => {
                    if r.last {
                        answered = r.lease.clone();
                    }
                    sends.extend(to(r.lease.as_ref()).map(|i| (i, m.clone())));
                }
                Some(agent_message::Message::Reject(r)) => {
                    answered = r.lease.clone();
                    sends.extend(to(r.lease.as_ref()).map(|i| (i, m.clone())));
                }
                // More slots: each to the owner furthest below its share.
                Some(agent_message::Message::Credit(c)) => {
                    let mut slots = slots.lock().expect("slots lock");
                    slots.add(c.slots);
                    let n = c.slots.min(MAX_CREDIT_AT_ONCE);
                    sends.extend((0..n).map(|_| credit(slots.grant())));
                }
                // A second Hello: the first owner refuses it.
                Some(agent_message::Message::Hello(_)) | None => sends.push((0, m.clone())),
            }
            if let Some(lease) = answered {
                let mut slots = slots.lock().expect("slots lock");
                if slots.answered(&lease.lease_id) {
                    sends.push(credit(slots.grant()));
                }
            }
            for (i, message) in sends {
                if txs[i].send(message).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

/// Confines an agent's Hello to the pipelines its token names: an empty list becomes those
/// pipelines, one outside them is PERMISSION_DENIED. Only a platform admin (or anyone with
/// auth off) serves every pipeline.
#[allow(clippy::result_large_err)]
fn scope(caller: &Caller, pipelines: &mut Vec<String>) -> Result<(), Status> {
    let Caller::Token(claims) = caller else {
        return Ok(());
    };
    if claims.is_platform_admin() {
        return Ok(());
    }
    if pipelines.is_empty() {
        if claims.pipelines.is_empty() {
            return Err(Status::permission_denied(format!(
                "{} may serve no pipeline; serving every pipeline takes a platform admin",
                claims.sub
            )));
        }
        pipelines.clone_from(&claims.pipelines);
        return Ok(());
    }
    for (i, p) in pipelines.iter().enumerate() {
        if !claims.pipelines.contains(p) {
            return Err(Status::permission_denied(format!(
                "hello.pipelines[{i}]: {} may not serve {p}",
                claims.sub
            )));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl AgentService for Agents {
    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        request: Request<Streaming<Bytes>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let caller = Caller::of(&request)?;
        authz::authorize(&caller, Rpc::Connect, None)?;
        let mut inbound = request.into_inner();
        let mut h = pm_proto::agent::read_raw_hello(&mut inbound).await?;
        scope(&caller, &mut h.pipelines)?;
        if let Some(covered) = self.partitioned(&h).await {
            return fan_in(&self.routes, h, covered, inbound).await;
        }
        let pipelines = h.pipelines.clone();
        let hello = Bytes::from(
            AgentMessage {
                message: Some(agent_message::Message::Hello(h)),
            }
            .encode_to_vec(),
        );
        // The shard reads Hello before it answers, so a shard that does not own the
        // pipelines refuses before anything else is sent: each attempt's stream is the Hello,
        // then the agent's own messages once that attempt is the one accepted. The accepted
        // stream reads the agent's stream itself, as it comes, until it ends or breaks (the
        // shard sees the end): no task and no channel between the two, so a result reaches
        // the shard's connection one wake-up sooner.
        let mut accepted = None;
        let response = self
            .routes
            .call_agents(&pipelines, |mut shard| {
                let (gate, opened) = oneshot::channel::<Streaming<Bytes>>();
                accepted = Some(gate);
                let agent = stream::once(opened)
                    .filter_map(|inbound| std::future::ready(inbound.ok()))
                    .flatten()
                    .take_while(|m| std::future::ready(m.is_ok()))
                    .filter_map(|m| std::future::ready(m.ok()));
                let outbound = stream::once(std::future::ready(hello.clone())).chain(agent);
                async move { shard.connect(outbound).await }
            })
            .await?;
        // A refused attempt's gate was dropped with it, which ended its stream after Hello.
        // This one fails only if the shard has already ended the stream: the agent sees
        // that end on the response.
        let _ = accepted.expect("a call was made").send(inbound);
        Ok(Response::new(Box::pin(response.into_inner())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_slots_and_few_slots_start_where_the_id_hashes() {
        assert_eq!(shares(16, 3, 0), vec![6, 5, 5]);
        assert_eq!(shares(16, 3, 2), vec![5, 5, 6]);
        assert_eq!(shares(1, 3, 1), vec![0, 1, 0]);
        assert_eq!(shares(2, 3, 2), vec![1, 0, 1]);
        assert_eq!(shares(0, 2, 0), vec![0, 0]);
        for slots in 0..40 {
            for n in 1..8 {
                for start in 0..n {
                    let s = shares(slots, n, start);
                    assert_eq!(s.iter().sum::<u32>(), slots, "{slots} over {n}");
                    assert!(s.iter().max().unwrap() - s.iter().min().unwrap() <= 1);
                }
            }
        }
    }

    #[test]
    fn a_freed_slot_goes_to_the_owner_furthest_below_its_share() {
        // 4 slots over 2 owners: 3 leases were running on owner 0 when the agent came back.
        let held: Vec<(String, usize)> = (0..3).map(|i| (format!("l{i}"), 0)).collect();
        let mut slots = Slots::new(1, &held, 2, 0);
        assert_eq!(slots.share, vec![2, 2]);
        assert_eq!(slots.grant(), 1, "the free slot to the owner with none");
        assert_eq!(slots.grant(), 1, "(a second would too)");
        slots.credit[1] -= 1;
        // Owner 0's leases end: the first slot goes to owner 1, then they are even.
        assert!(slots.answered("l0"));
        assert_eq!(slots.grant(), 1);
        assert!(slots.answered("l1"));
        assert_eq!(slots.grant(), 0);
        assert_eq!(
            (slots.credit.clone(), slots.running.clone()),
            (vec![1, 2], vec![1, 0])
        );
        // Only a lease given out frees a slot, once.
        assert!(!slots.answered("l1"));
        assert!(!slots.answered("forged"));
        slots.assigned(1, "l9");
        assert_eq!((slots.credit[1], slots.running[1]), (1, 1));
        assert!(slots.answered("l9"));
        slots.add(2);
        assert_eq!(slots.share, vec![3, 3]);
    }

    #[test]
    fn a_lease_routes_by_its_task_partition() {
        let id = pm_proto::names::with_partition(0x0190_f3a2_b4c1_7abc_9def_0123_4567_89ab, 3);
        let lease = Lease {
            task: format!("tenants/t/applications/a/pipelines/p/tasks/{id:032x}"),
            ..Lease::default()
        };
        assert_eq!(partition_of(Some(&lease)), 3);
        assert_eq!(partition_of(None), 0);
    }
}
