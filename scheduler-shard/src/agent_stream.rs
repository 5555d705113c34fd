//! The agent stream (`pm.v1.AgentService.Connect`) on the shard side: the Hello handshake
//! under a timeout, then one reader task per stream that feeds the scheduler, while the
//! scheduler pushes Assign/Cancel down the stream's channel.
//!
//! Results being written are bounded in bytes over all streams
//! ([`RESULT_BYTES_IN_FLIGHT`]): an agent's slot comes back before its result is durable, so
//! a fast agent could otherwise queue results faster than the disk takes them. Past the
//! bound a stream's reader waits, and HTTP/2 flow control holds the agent back. A result sent
//! in parts (protocol 2) is put together first, at most one per stream and 4 MiB, as one
//! message of that size was received before parts existed, and takes its place once whole:
//! a half-received result holds no place, so a stalled or hostile agent cannot hold room
//! that others' results need.

use std::sync::Arc;

use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use pm_proto::names::PipelineName;
use pm_proto::status::invalid_argument;
use pm_proto::v1::agent_service_server::AgentService;
use pm_proto::v1::{
    AgentMessage, Hello, Lease as WireLease, ResultPart, ServerMessage, TaskResult, Welcome,
    agent_message, server_message,
};
use pm_proto::{AGENT_PROTOCOL_MIN, AGENT_PROTOCOL_VERSION, MAX_MESSAGE_BYTES};

use crate::ownership::Ownership;
use crate::scheduler::{MAX_SLOTS, Scheduler};

/// Bytes of results (and rejects) received and not yet written, over all streams. A result
/// is at most a message (4 MiB); thousands of ordinary ones fit.
pub const RESULT_BYTES_IN_FLIGHT: usize = 32 * 1024 * 1024;

pub struct AgentStreams {
    scheduler: Arc<Scheduler>,
    ownership: Arc<Ownership>,
    /// [`RESULT_BYTES_IN_FLIGHT`], one permit a byte.
    in_flight: Arc<Semaphore>,
}

impl AgentStreams {
    pub fn new(scheduler: Arc<Scheduler>, ownership: Arc<Ownership>) -> Self {
        Self {
            scheduler,
            ownership,
            in_flight: Arc::new(Semaphore::new(RESULT_BYTES_IN_FLIGHT)),
        }
    }

    /// An agent is served by the shard that owns all its pipelines' ring keys: partition 0,
    /// or the partitions its Hello names (of its one pipeline).
    fn check_owned(&self, hello: &Hello) -> Result<(), Status> {
        let ring = self.ownership.ring();
        if hello.pipelines.is_empty() && ring.len() > 1 {
            return Err(Status::failed_precondition(format!(
                "an agent serving every pipeline needs a single shard; this cluster has {}: \
                 name the agent's pipelines (--pipeline)",
                ring.len()
            )));
        }
        if !hello.partitions.is_empty() && hello.pipelines.len() != 1 {
            return Err(invalid_argument(
                "hello.partitions",
                "names partitions of one pipeline: name exactly one in hello.pipelines",
            ));
        }
        for p in &hello.pipelines {
            if let Ok(name) = PipelineName::parse(p) {
                self.ownership.check_partitions(&name, &hello.partitions)?;
            }
        }
        Ok(())
    }
}

/// Checks a Hello; returns the protocol version to speak.
fn check_hello(hello: &Hello) -> Result<u32, Status> {
    if hello.agent_id.is_empty() || hello.agent_id.len() > 253 {
        return Err(invalid_argument("hello.agent_id", "must be 1..=253 bytes"));
    }
    // Zero free slots is fine for an agent reconnecting with all its slots busy, and for a
    // stream on explicit credit (slots come later).
    let idle = hello.slots == 0 && hello.held_leases.is_empty() && !hello.explicit_credit;
    if hello.slots > MAX_SLOTS || idle {
        return Err(invalid_argument(
            "hello.slots",
            &format!("{} is out of range 1..={MAX_SLOTS}", hello.slots),
        ));
    }
    let Some(version) = pm_proto::agent::protocol_for(hello.protocol_min, hello.protocol_max)
    else {
        return Err(Status::failed_precondition(format!(
            "agent speaks protocol {}..={}, this shard speaks \
             {AGENT_PROTOCOL_MIN}..={AGENT_PROTOCOL_VERSION}",
            hello.protocol_min, hello.protocol_max
        )));
    };
    if hello.held_leases.len() > MAX_SLOTS as usize {
        return Err(invalid_argument(
            "hello.held_leases",
            &format!("{} leases; at most {MAX_SLOTS}", hello.held_leases.len()),
        ));
    }
    for (i, p) in hello.pipelines.iter().enumerate() {
        PipelineName::parse(p)
            .map_err(|e| invalid_argument(&format!("hello.pipelines[{i}]"), &e.to_string()))?;
    }
    let max = pm_spec::limits::MAX_PARTITIONS;
    if hello.partitions.len() > max as usize || hello.partitions.iter().any(|&p| p >= max) {
        return Err(invalid_argument(
            "hello.partitions",
            &format!("a pipeline has at most {max} partitions, numbered from 0"),
        ));
    }
    Ok(version)
}

#[tonic::async_trait]
impl AgentService for AgentStreams {
    type ConnectStream = UnboundedReceiverStream<Result<ServerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = pm_proto::agent::read_hello(&mut inbound).await?;
        let version = check_hello(&hello)?;
        self.check_owned(&hello)?;

        let (tx, rx) = mpsc::unbounded_channel();
        let session_id = format!("{}#{}", hello.agent_id, pm_proto::unix_ms());
        // Welcome goes first: opening the session may push Assigns right away.
        let _ = tx.send(Ok(ServerMessage {
            message: Some(server_message::Message::Welcome(Welcome {
                protocol_version: version,
                session_id,
                lease_ttl_ms: self.scheduler.options().lease_ttl.as_millis() as u32,
            })),
        }));
        let session = self.scheduler.open_session(&hello, tx.clone());
        tracing::info!(agent = %hello.agent_id, slots = hello.slots, session, "agent connected");

        let (scheduler, in_flight) = (self.scheduler.clone(), self.in_flight.clone());
        tokio::spawn(async move {
            read_stream(&scheduler, &in_flight, session, &mut inbound, &tx).await;
            scheduler.close_session(session);
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// A place for `bytes` among the results in flight, once they fit (waiting until they do).
async fn place(in_flight: &Arc<Semaphore>, bytes: usize) -> OwnedSemaphorePermit {
    let bytes = bytes.clamp(1, RESULT_BYTES_IN_FLIGHT) as u32;
    in_flight
        .clone()
        .acquire_many_owned(bytes)
        .await
        .expect("nothing closes the semaphore")
}

/// Runs `write` (a result or a reject) on its own task, holding its place until it is done.
fn spawn_holding<T>(permit: OwnedSemaphorePermit, write: impl Future<Output = T> + Send + 'static) {
    tokio::spawn(async move {
        write.await;
        drop(permit);
    });
}

/// A result arriving in parts: whose, the bytes so far, the length its parts declare.
struct Assembling {
    lease: WireLease,
    data: Vec<u8>,
    total: usize,
}

/// A result once its last part is in, with its place.
type Assembled = (WireLease, TaskResult, OwnedSemaphorePermit);

/// Adds one part to the result being assembled; returns the whole result with its last part.
/// A part of another result before the last one, more or fewer bytes than declared, more than
/// a message's worth, or bytes that are no `TaskResult`, break the protocol.
async fn add_part(
    assembling: &mut Option<Assembling>,
    in_flight: &Arc<Semaphore>,
    part: ResultPart,
) -> Result<Option<Assembled>, Status> {
    let Some(lease) = part.lease else {
        return Err(invalid_argument("result_part.lease", "is required"));
    };
    let total = part.total_bytes as usize;
    if total > MAX_MESSAGE_BYTES {
        return Err(invalid_argument(
            "result_part.total_bytes",
            &format!("{total} bytes; a result has at most {MAX_MESSAGE_BYTES}"),
        ));
    }
    let mut current = match assembling.take() {
        Some(a) if a.lease.lease_id == lease.lease_id && a.total == total => a,
        Some(a) => {
            return Err(invalid_argument(
                "result_part",
                &format!(
                    "a part of another result (or of another length) arrived before the \
                     last part of lease {}",
                    a.lease.lease_id
                ),
            ));
        }
        None => Assembling {
            lease,
            data: Vec::with_capacity(total),
            total,
        },
    };
    if current.data.len() + part.data.len() > total {
        return Err(invalid_argument(
            "result_part.data",
            &format!("the parts carry more than total_bytes ({total})"),
        ));
    }
    current.data.extend_from_slice(&part.data);
    if !part.last {
        *assembling = Some(current);
        return Ok(None);
    }
    if current.data.len() != total {
        return Err(invalid_argument(
            "result_part.total_bytes",
            &format!("{total}, but the parts carried {}", current.data.len()),
        ));
    }
    let result = TaskResult::decode(current.data.as_slice())
        .map_err(|e| invalid_argument("result_part.data", &format!("not a TaskResult: {e}")))?;
    Ok(Some((current.lease, result, place(in_flight, total).await)))
}

/// Feeds one stream's messages to the scheduler until it ends or breaks the protocol.
async fn read_stream(
    scheduler: &Arc<Scheduler>,
    in_flight: &Arc<Semaphore>,
    session: u64,
    inbound: &mut Streaming<AgentMessage>,
    tx: &mpsc::UnboundedSender<Result<ServerMessage, Status>>,
) {
    use agent_message::Message;
    let mut assembling = None;
    loop {
        let message = match inbound.message().await {
            Ok(Some(AgentMessage { message: Some(m) })) => m,
            Ok(Some(AgentMessage { message: None })) => continue,
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(session, %status, "agent stream broke");
                return;
            }
        };
        match message {
            Message::Credit(c) => scheduler.credit(session, c.slots),
            Message::Renew(r) => scheduler.renew(session, &r.leases),
            Message::Progress(p) => {
                if let (Some(lease), Some(event)) = (p.lease, p.event) {
                    scheduler.progress(session, &lease, event);
                }
            }
            // Results and rejects are written concurrently, so one agent's results share
            // group commits instead of waiting for one fsync each, within the bytes allowed
            // in flight (see the module doc); a repeat of a lease is fenced as a duplicate.
            Message::Result(r) => {
                let bytes = r.encoded_len();
                if let Some(lease) = r.lease {
                    let permit = place(in_flight, bytes).await;
                    // The slot comes back here, at once; only the write is a task of its own.
                    let write = scheduler.complete(session, &lease, r.result.unwrap_or_default());
                    spawn_holding(permit, write);
                }
            }
            Message::ResultPart(part) => match add_part(&mut assembling, in_flight, part).await {
                Ok(None) => {}
                Ok(Some((lease, result, permit))) => {
                    let write = scheduler.complete(session, &lease, result);
                    spawn_holding(permit, write);
                }
                Err(status) => {
                    tracing::debug!(session, %status, "agent stream broke the protocol");
                    let _ = tx.send(Err(status));
                    return;
                }
            },
            Message::Reject(r) => {
                let bytes = r.encoded_len();
                if let Some(lease) = r.lease {
                    let scheduler = scheduler.clone();
                    spawn_holding(place(in_flight, bytes).await, async move {
                        scheduler.reject(session, &lease, &r.reason).await;
                    });
                }
            }
            Message::Hello(_) => {
                let _ = tx.send(Err(invalid_argument(
                    "message",
                    "Hello is only valid as the first message",
                )));
                return;
            }
        }
    }
}
