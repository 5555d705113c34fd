//! Validated tasks on their way to the shard that owns their pipeline: one `Enqueue` per
//! pipeline per call, specs by reference, and unary submits coalesced.
//!
//! - **Specs by reference.** A task of a pipeline version names its spec by id
//!   ([`pm_spec::spec_id`], computed once per cached version), so the spec's bytes do not
//!   travel, nor get decoded and hashed, per task. A shard that does not hold the spec yet
//!   (the first task of a version, a new owner after a ring change) lists the task in
//!   `spec_needed`, and it is sent once more with its spec.
//! - **Coalescing.** Each unary SubmitTask would otherwise be one HTTP/2 call from here to the
//!   shard, and that hop costs about as much as the shard's own work. Concurrent submits to
//!   one pipeline join a queue; at most [`MAX_IN_FLIGHT`] Enqueues per pipeline are in
//!   flight, each taking everything queued when it starts (up to [`MAX_COALESCED`] tasks). A
//!   submit to an idle pipeline goes at once: nothing waits on a timer. Every task is still
//!   acknowledged or refused on its own, with its own result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tokio::sync::oneshot;
use tonic::Status;

use pm_proto::internal::v1::{EnqueueRequest, EnqueueTask};
use pm_proto::names::PipelineName;
use pm_proto::v1::{Task, submit_task_result};

use crate::error::Error;
use crate::pipelines::PipelineVersion;
use crate::routing::Routes;

/// Enqueues in flight per pipeline from unary submits; what arrives meanwhile waits for the
/// next one, so the calls to a shard carry many tasks each under load.
pub const MAX_IN_FLIGHT: usize = 4;
/// Tasks in one coalesced Enqueue, at most.
pub const MAX_COALESCED: usize = 512;
/// Encoded bytes of the tasks in one coalesced Enqueue, at most (a single larger task goes
/// alone), well within the shard's message limit.
pub const MAX_COALESCED_BYTES: usize = 1024 * 1024;
/// Unary submits waiting for an Enqueue of one pipeline; past it a submit is refused with
/// RESOURCE_EXHAUSTED.
pub const MAX_QUEUED: usize = 16 * 1024;

/// One task as the shard gets it, with the spec it names by id (sent only if asked for).
#[derive(Clone)]
pub struct Prepared {
    pub task: EnqueueTask,
    pub version: Option<Arc<PipelineVersion>>,
}

/// What one task came to.
pub type Outcome = Result<Task, pm_proto::v1::Error>;

/// Sends `items`, all of `pipeline`, to its owner in one Enqueue; those whose spec the
/// shard asks for are sent again with it. One outcome per item, in order.
pub async fn enqueue(routes: &Routes, pipeline: &PipelineName, items: &[Prepared]) -> Vec<Outcome> {
    let tasks: Vec<EnqueueTask> = items.iter().map(|p| p.task.clone()).collect();
    let mut outcomes = match call(routes, pipeline, tasks).await {
        Ok((outcomes, spec_needed)) if !spec_needed.is_empty() => {
            let mut outcomes = outcomes;
            let again: Vec<usize> = spec_needed
                .into_iter()
                .map(|i| i as usize)
                .filter(|&i| i < items.len() && items[i].version.is_some())
                .collect();
            let tasks = again
                .iter()
                .map(|&i| {
                    let mut task = items[i].task.clone();
                    task.spec = items[i]
                        .version
                        .as_ref()
                        .and_then(|v| v.pipeline.spec.clone());
                    task
                })
                .collect();
            match call(routes, pipeline, tasks).await {
                Ok((retried, _)) => {
                    for (i, outcome) in again.into_iter().zip(retried) {
                        outcomes[i] = outcome;
                    }
                }
                Err(status) => {
                    for i in again {
                        outcomes[i] = Err(Error::Upstream(status.clone()).into());
                    }
                }
            }
            outcomes
        }
        Ok((outcomes, _)) => outcomes,
        Err(status) => vec![Err(Error::Upstream(status).into()); items.len()],
    };
    outcomes.resize_with(items.len(), || {
        Err(Error::Upstream(Status::internal("no result from the shard for this task")).into())
    });
    outcomes
}

/// One Enqueue at the owner; the outcomes and the indexes whose spec is needed.
async fn call(
    routes: &Routes,
    pipeline: &PipelineName,
    tasks: Vec<EnqueueTask>,
) -> Result<(Vec<Outcome>, Vec<u32>), Status> {
    // Cloned per attempt: a shard that does not own the pipeline (a ring change under way)
    // refuses the whole request before looking at it.
    let answer = routes
        .call(pipeline, |mut shard| {
            let tasks = tasks.clone();
            async move { shard.enqueue(EnqueueRequest { tasks }).await }
        })
        .await?
        .into_inner();
    let outcomes = answer
        .results
        .into_iter()
        .map(|r| match r.outcome {
            Some(submit_task_result::Outcome::Task(task)) => Ok(task),
            Some(submit_task_result::Outcome::Error(e)) => Err(e),
            None => Err(Error::Upstream(Status::internal("empty result from shard")).into()),
        })
        .collect();
    Ok((outcomes, answer.spec_needed))
}

struct Queue {
    waiting: Vec<(Prepared, oneshot::Sender<Outcome>)>,
    in_flight: usize,
}

/// Unary submits coalesced per pipeline (see the module doc).
pub struct Coalescer {
    routes: Routes,
    queues: Mutex<HashMap<PipelineName, Queue>>,
}

impl Coalescer {
    pub fn new(routes: Routes) -> Arc<Self> {
        Arc::new(Self {
            routes,
            queues: Mutex::new(HashMap::new()),
        })
    }

    /// Queues one task and waits for its own outcome.
    pub async fn submit(self: &Arc<Self>, pipeline: PipelineName, item: Prepared) -> Outcome {
        let (done, outcome) = oneshot::channel();
        let start = {
            let mut queues = self.queues.lock().expect("coalescer lock");
            let queue = queues.entry(pipeline.clone()).or_insert_with(|| Queue {
                waiting: Vec::new(),
                in_flight: 0,
            });
            if queue.waiting.len() >= MAX_QUEUED {
                return Err(Error::Upstream(pm_proto::status::resource_exhausted(
                    format!(
                        "{MAX_QUEUED} submits to {pipeline} are waiting for the shard; retry later"
                    ),
                    Duration::from_millis(100),
                ))
                .into());
            }
            queue.waiting.push((item, done));
            let start = queue.in_flight < MAX_IN_FLIGHT;
            if start {
                queue.in_flight += 1;
            }
            start
        };
        if start {
            // Its own task, so a client that goes away does not take others' submits with it.
            // It ends once the queue is empty.
            tokio::spawn(self.clone().drain(pipeline));
        }
        outcome.await.unwrap_or_else(|_| {
            Err(
                Error::Upstream(Status::internal("the submit was dropped before its answer"))
                    .into(),
            )
        })
    }

    /// Sends what is queued for `pipeline`, batch after batch, until nothing is.
    async fn drain(self: Arc<Self>, pipeline: PipelineName) {
        loop {
            let batch = {
                let mut queues = self.queues.lock().expect("coalescer lock");
                let Some(queue) = queues.get_mut(&pipeline) else {
                    return;
                };
                if queue.waiting.is_empty() {
                    queue.in_flight -= 1;
                    if queue.in_flight == 0 {
                        queues.remove(&pipeline);
                    }
                    return;
                }
                let mut n = 0;
                let mut bytes = 0;
                for (item, _) in queue.waiting.iter().take(MAX_COALESCED) {
                    bytes += item.task.encoded_len();
                    if n > 0 && bytes > MAX_COALESCED_BYTES {
                        break;
                    }
                    n += 1;
                }
                queue.waiting.drain(..n).collect::<Vec<_>>()
            };
            let (items, senders): (Vec<Prepared>, Vec<_>) = batch.into_iter().unzip();
            let outcomes = enqueue(&self.routes, &pipeline, &items).await;
            for (sender, outcome) in senders.into_iter().zip(outcomes) {
                let _ = sender.send(outcome);
            }
        }
    }
}
