//! The agent stream, agent side: one long-lived `Connect` to the gateway. Hello announces the
//! free slots and any leases still held (so running work is not delivered again); Assigns
//! start tasks; Progress and Result flow back; leases are renewed at a third of their TTL.
//! On any stream error the agent reconnects with exponential backoff and jitter, while its
//! running tasks carry on.
//!
//! Shutdown drains: new Assigns are handed back at once (Reject), running tasks get
//! `drain_timeout` to finish and report, and whatever still runs then is cancelled and
//! handed back too, so the shard queues it again without waiting for its lease to expire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use pm_proto::v1::{
    AgentMessage, Assign, AttemptResult, Hello, Lease, Progress, Reject, Renew, ResultPart,
    agent_message, server_message,
};
use pm_proto::{AGENT_PROTOCOL_MIN, AGENT_PROTOCOL_VERSION, RESULT_PART_BYTES};
use prost::Message as _;

use crate::runner::{Run, RunnerOptions, run_task};

/// What an agent is and where it connects.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The gateway (or, in tests, a shard): `http://host:port`.
    pub endpoint: String,
    pub agent_id: String,
    /// Pipelines served, as resource names; empty for every pipeline allowed.
    pub pipelines: Vec<String>,
    /// Tasks run at once.
    pub slots: u32,
    /// Executors this agent runs; empty means any executor runs on the host (`pm dev`).
    pub executors: Vec<String>,
    pub runner: RunnerOptions,
    /// On shutdown, how long running tasks may take to finish before they are handed back.
    pub drain_timeout: Duration,
    /// What the agent presents to the gateway: client credentials of ROLE_AGENT, exchanged
    /// for a token when it connects with none fresh.
    pub credentials: pm_proto::client::Credentials,
}

/// Tasks running on this agent, by lease id.
type Running = Arc<Mutex<HashMap<String, (Lease, CancellationToken)>>>;

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot reach {0}: {1}")]
    Connect(String, tonic::Status),
    #[error("stream ended: {0}")]
    Stream(String),
}

fn message(m: agent_message::Message) -> AgentMessage {
    AgentMessage { message: Some(m) }
}

/// Runs the agent until `shutdown` fires, then drains (see the module doc).
pub async fn run(options: AgentOptions, shutdown: CancellationToken) {
    // No work is taken before the executors can run it.
    crate::sidecar::wait_until_reachable(&options.runner.sidecars, &shutdown).await;
    let running: Running = Arc::default();
    // Tasks report here; whichever stream is current forwards it. Messages wait here while
    // the agent reconnects.
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<AgentMessage>();
    let tokens = pm_proto::client::TokenSource::new(options.credentials.clone());
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let mut welcomed = false;
        let end = session(
            &options,
            &tokens,
            &running,
            &out_tx,
            &mut out_rx,
            &shutdown,
            &mut welcomed,
        )
        .await;
        if welcomed {
            backoff = Duration::from_millis(100);
        }
        crate::metrics::METRICS.connected.set(0.0);
        match end {
            Ok(()) => break,
            Err(e) => {
                crate::metrics::METRICS.reconnects.increment(1);
                tracing::warn!(error = %e, ?backoff, "agent stream lost; reconnecting");
            }
        }
        let jittered = backoff.mul_f64(rand::rng().random_range(0.5..1.5));
        tokio::select! {
            _ = tokio::time::sleep(jittered) => {}
            _ = shutdown.cancelled() => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    for (_, cancel) in running.lock().expect("running lock").values() {
        cancel.cancel();
    }
}

async fn session(
    options: &AgentOptions,
    tokens: &pm_proto::client::TokenSource,
    running: &Running,
    out_tx: &mpsc::UnboundedSender<AgentMessage>,
    out_rx: &mut mpsc::UnboundedReceiver<AgentMessage>,
    shutdown: &CancellationToken,
    welcomed: &mut bool,
) -> Result<(), SessionError> {
    let channel = pm_proto::client::channel(&options.endpoint)
        .map_err(|e| SessionError::Stream(e.to_string()))?;
    let token = tokens
        .token(&channel)
        .await
        .map_err(|s| SessionError::Connect(options.endpoint.clone(), s))?;
    let bearer = pm_proto::client::Bearer::new(token.as_deref())
        .map_err(|e| SessionError::Stream(e.to_string()))?;
    let mut client = pm_proto::client::agents_with(channel, bearer);
    let (stream_tx, stream_rx) = mpsc::unbounded_channel();
    let (held, busy) = {
        let running = running.lock().expect("running lock");
        let held: Vec<Lease> = running.values().map(|(l, _)| l.clone()).collect();
        let busy = held.len() as u32;
        (held, busy)
    };
    let hello = Hello {
        agent_id: options.agent_id.clone(),
        pipelines: options.pipelines.clone(),
        slots: options.slots.saturating_sub(busy),
        executors: options.executors.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_min: AGENT_PROTOCOL_MIN,
        protocol_max: AGENT_PROTOCOL_VERSION,
        held_leases: held,
        partitions: Vec::new(),
        explicit_credit: false,
    };
    let _ = stream_tx.send(message(agent_message::Message::Hello(hello)));
    let mut inbound = client
        .connect(UnboundedReceiverStream::new(stream_rx))
        .await
        .map_err(|s| SessionError::Connect(options.endpoint.clone(), s))?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .map_err(|_| SessionError::Stream("no Welcome within 10s".into()))?
        .map_err(|s| SessionError::Stream(s.to_string()))?;
    let Some(server_message::Message::Welcome(welcome)) = first.and_then(|m| m.message) else {
        return Err(SessionError::Stream(
            "the first message was not Welcome".into(),
        ));
    };
    *welcomed = true;
    tracing::info!(session = %welcome.session_id, endpoint = %options.endpoint, "agent connected");
    crate::metrics::METRICS.connected.set(1.0);
    let renew_every = Duration::from_millis(u64::from(welcome.lease_ttl_ms.max(300)) / 3);
    let mut renew = tokio::time::interval(renew_every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining: Option<tokio::time::Instant> = None;
    loop {
        if draining.is_some() && running.lock().expect("running lock").is_empty() {
            // Every result is queued (a task reports under the lock that removes it).
            while let Ok(out) = out_rx.try_recv() {
                send(&stream_tx, out, welcome.protocol_version);
            }
            drop(stream_tx);
            // The shard ends the stream once it has read all of ours.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
            tracing::info!("drained");
            return Ok(());
        }
        let deadline = async {
            match draining {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled(), if draining.is_none() => {
                tracing::info!(timeout = ?options.drain_timeout, "draining: finishing running tasks");
                draining = Some(tokio::time::Instant::now() + options.drain_timeout);
            }
            _ = deadline => {
                hand_back(running, out_tx, "the agent shut down before the task finished");
            }
            incoming = inbound.message() => {
                let incoming = incoming.map_err(|s| SessionError::Stream(s.to_string()))?;
                let Some(m) = incoming.and_then(|m| m.message) else {
                    return Err(SessionError::Stream("closed by the server".into()));
                };
                match m {
                    server_message::Message::Assign(assign) if draining.is_some() => {
                        let _ = out_tx.send(message(agent_message::Message::Reject(Reject {
                            lease: assign.lease,
                            reason: "the agent is shutting down".into(),
                        })));
                    }
                    server_message::Message::Assign(assign) => start(options, running, out_tx, assign),
                    server_message::Message::Cancel(c) => {
                        let id = c.lease.map(|l| l.lease_id).unwrap_or_default();
                        if let Some((_, cancel)) = running.lock().expect("running lock").get(&id) {
                            tracing::info!(lease = %id, "task cancelled by the server");
                            cancel.cancel();
                        }
                    }
                    server_message::Message::Drain(d) => {
                        tracing::info!(reason = %d.reason, "server asked to drain");
                        return Err(SessionError::Stream(format!("drained: {}", d.reason)));
                    }
                    server_message::Message::Welcome(_) => {
                        return Err(SessionError::Stream("a second Welcome".into()));
                    }
                }
            }
            Some(out) = out_rx.recv() => {
                if !send(&stream_tx, out, welcome.protocol_version) {
                    return Err(SessionError::Stream("outbound closed".into()));
                }
            }
            _ = renew.tick() => {
                let leases: Vec<Lease> = running.lock().expect("running lock").values().map(|(l, _)| l.clone()).collect();
                if !leases.is_empty() {
                    let _ = stream_tx.send(message(agent_message::Message::Renew(Renew { leases })));
                }
            }
        }
    }
}

/// Sends `out` down the stream; returns false once the stream is closed. With protocol 2, a
/// result whose encoding passes [`RESULT_PART_BYTES`] goes as `ResultPart`s, one after the
/// other, so no message comes near the message limit.
fn send(stream_tx: &mpsc::UnboundedSender<AgentMessage>, out: AgentMessage, protocol: u32) -> bool {
    let out = match out.message {
        Some(agent_message::Message::Result(AttemptResult {
            lease,
            result: Some(result),
        })) if protocol >= 2 && result.encoded_len() > RESULT_PART_BYTES => {
            let data = result.encode_to_vec();
            let chunks = data.chunks(RESULT_PART_BYTES).count();
            return data
                .chunks(RESULT_PART_BYTES)
                .enumerate()
                .all(|(i, chunk)| {
                    let part = ResultPart {
                        lease: lease.clone(),
                        data: chunk.to_vec(),
                        last: i + 1 == chunks,
                        total_bytes: data.len() as u32,
                    };
                    stream_tx
                        .send(message(agent_message::Message::ResultPart(part)))
                        .is_ok()
                });
        }
        message => AgentMessage { message },
    };
    stream_tx.send(out).is_ok()
}

/// Starts an assigned task, or rejects it when this agent cannot run it.
fn start(
    options: &AgentOptions,
    running: &Running,
    out_tx: &mpsc::UnboundedSender<AgentMessage>,
    assign: Assign,
) {
    let (Some(task), Some(spec), Some(lease)) = (assign.task, assign.spec, assign.lease) else {
        tracing::warn!("malformed Assign ignored");
        return;
    };
    let missing = spec
        .stages
        .iter()
        .flat_map(|s| &s.jobs)
        .find(|j| !options.executors.is_empty() && !options.executors.contains(&j.executor));
    if let Some(job) = missing {
        let reason = format!(
            "executor {:?} is not on agent {}",
            job.executor, options.agent_id
        );
        let _ = out_tx.send(message(agent_message::Message::Reject(Reject {
            lease: Some(lease),
            reason,
        })));
        crate::metrics::METRICS.rejected.increment(1);
        return;
    }
    let cancel = CancellationToken::new();
    running
        .lock()
        .expect("running lock")
        .insert(lease.lease_id.clone(), (lease.clone(), cancel.clone()));
    let runner: RunnerOptions = options.runner.clone();
    let running = running.clone();
    crate::metrics::METRICS.running.increment(1.0);
    let out_tx = out_tx.clone();
    // Every log line about the task carries its name and trace id; with traces on, this is
    // the task's span in its trace (assigned to result).
    let span = tracing::info_span!(
        "task",
        otel.kind = "consumer",
        task = %task.name,
        attempt = lease.attempt,
        trace_id = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    pm_proto::trace::set_parent(&span, &task.traceparent);
    let task_span = span.clone();
    let work = async move {
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let forward = {
            let (out_tx, lease) = (out_tx.clone(), lease.clone());
            tokio::spawn(async move {
                while let Some(event) = events_rx.recv().await {
                    let _ = out_tx.send(message(agent_message::Message::Progress(Progress {
                        lease: Some(lease.clone()),
                        event: Some(event),
                    })));
                }
            })
        };
        let run = Run {
            id: format!("{}-{}", task.id, lease.attempt),
            spec: Arc::new(spec),
            params: task.params.into_iter().collect(),
            timeout_seconds: task.timeout_seconds,
            // Checked at the gateway: JSON writes it.
            input: task.input.as_ref().and_then(pm_proto::json::to_text),
            traceparent: task.traceparent,
        };
        let result = run_task(&runner, run, events_tx, cancel).await;
        if !result.succeeded {
            task_span.record("otel.status_code", "ERROR");
        }
        // Progress goes out before the result.
        let _ = forward.await;
        // Reported under the lock that removes it: a drain sees either the task running or
        // its result queued, and a task handed back meanwhile does not report at all.
        crate::metrics::METRICS.running.decrement(1.0);
        let mut running = running.lock().expect("running lock");
        if running.remove(&lease.lease_id).is_some() {
            let metrics = &crate::metrics::METRICS;
            match result.succeeded {
                true => metrics.succeeded.increment(1),
                false => metrics.failed.increment(1),
            }
            let _ = out_tx.send(message(agent_message::Message::Result(AttemptResult {
                lease: Some(lease),
                result: Some(result),
            })));
        }
    };
    tokio::spawn(work.instrument(span));
}

/// Cancels every running task and gives its lease back to the shard, which queues it again.
fn hand_back(running: &Running, out_tx: &mpsc::UnboundedSender<AgentMessage>, reason: &str) {
    for (_, (lease, cancel)) in running.lock().expect("running lock").drain() {
        crate::metrics::METRICS.handed_back.increment(1);
        tracing::info!(task = %lease.task, "handing back a running task");
        cancel.cancel();
        let _ = out_tx.send(message(agent_message::Message::Reject(Reject {
            lease: Some(lease),
            reason: reason.to_owned(),
        })));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pm_proto::v1::{JobResult, StepResult, TaskResult};

    fn result_of(stdout_bytes: usize) -> (Lease, TaskResult, AgentMessage) {
        let lease = Lease {
            task: "tenants/t/applications/a/pipelines/p/tasks/x".into(),
            lease_id: "l".into(),
            attempt: 1,
            deadline_ms: 0,
        };
        let result = TaskResult {
            succeeded: true,
            jobs: vec![JobResult {
                steps: vec![StepResult {
                    stdout: "x".repeat(stdout_bytes),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let out = message(agent_message::Message::Result(AttemptResult {
            lease: Some(lease.clone()),
            result: Some(result.clone()),
        }));
        (lease, result, out)
    }

    fn sent(out: AgentMessage, protocol: u32) -> Vec<agent_message::Message> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert!(send(&tx, out, protocol));
        drop(tx);
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|m| m.message)
            .collect()
    }

    #[test]
    fn a_large_result_goes_in_parts_that_add_up_to_it() {
        let (lease, result, out) = result_of(300 * 1024);
        let parts: Vec<ResultPart> = sent(out, 2)
            .into_iter()
            .map(|m| match m {
                agent_message::Message::ResultPart(p) => p,
                other => panic!("not a part: {other:?}"),
            })
            .collect();
        assert_eq!(parts.len(), 5, "300 KiB and a little, in 64 KiB parts");
        let total = result.encoded_len();
        let mut data = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            assert!(p.data.len() <= RESULT_PART_BYTES);
            assert_eq!(p.last, i == parts.len() - 1);
            assert_eq!(p.total_bytes as usize, total);
            assert_eq!(p.lease.as_ref(), Some(&lease));
            data.extend_from_slice(&p.data);
        }
        assert_eq!(TaskResult::decode(data.as_slice()).unwrap(), result);
    }

    #[test]
    fn a_small_result_or_an_old_server_gets_one_message() {
        let (_, _, small) = result_of(1024);
        assert!(matches!(
            sent(small, 2).as_slice(),
            [agent_message::Message::Result(_)]
        ));
        let (_, _, large) = result_of(300 * 1024);
        assert!(matches!(
            sent(large, 1).as_slice(),
            [agent_message::Message::Result(_)]
        ));
    }
}
