//! Validated tasks on their way to the shard that owns their ring key (their pipeline's
//! partition): one `Enqueue` per ring key per call, specs by reference, and unary submits
//! coalesced.
//!
//! - **Specs by reference.** A task of a pipeline version names its spec by id
//!   ([`pm_spec::spec_id`], computed once per cached version), so the spec's bytes do not
//!   travel, nor get decoded and hashed, per task. A shard that does not hold the spec yet
//!   (the first task of a version, a new owner after a ring change) lists the task in
//!   `spec_needed`, and it is sent once more with its spec.
//! - **Coalescing.** Each unary SubmitTask would otherwise be one HTTP/2 call from here to the
//!   shard, and that hop costs about as much as the shard's own work. Concurrent submits to
//!   one shard (any of its pipelines) join a queue; at most [`MAX_IN_FLIGHT`] Enqueues per
//!   shard are in flight, each taking everything queued when it starts (up to
//!   [`MAX_COALESCED`] tasks). A submit to an idle shard (nothing in flight) goes at once,
//!   on its own call: nothing waits on a timer. Every task is still acknowledged or refused on its own, with
//!   its own result. A shard that answers "not the owner" (a ring change) gets nothing more
//!   of that batch: each ring key's tasks are sent again by [`enqueue`], which follows the
//!   ring.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tokio::sync::oneshot;
use tonic::Status;

use pm_cluster::RingKey;
use pm_proto::internal::v1::{EnqueueRequest, EnqueueResult, EnqueueTask, Queued, enqueue_result};
use pm_proto::status::NotOwner;
use pm_proto::v1::{Task, TaskState};

use crate::error::Error;
use crate::pipelines::PipelineVersion;
use crate::routing::Routes;

/// Enqueues in flight per shard from unary submits; what arrives meanwhile waits for the
/// next one, so the calls to a shard carry many tasks each under load.
pub const MAX_IN_FLIGHT: usize = 4;
/// Tasks in one coalesced Enqueue, at most.
pub const MAX_COALESCED: usize = 512;
/// Encoded bytes of the tasks in one coalesced Enqueue, at most (a single larger task goes
/// alone), well within the shard's message limit.
pub const MAX_COALESCED_BYTES: usize = 1024 * 1024;
/// Unary submits waiting for an Enqueue to one shard; past it a submit is refused with
/// RESOURCE_EXHAUSTED.
pub const MAX_QUEUED: usize = 16 * 1024;

/// One task as the shard gets it, with the spec it names by id (sent only if asked for).
pub struct Prepared {
    pub task: EnqueueTask,
    pub version: Option<Arc<PipelineVersion>>,
}

/// What one task came to.
pub type Outcome = Result<Task, pm_proto::v1::Error>;

/// Sends `items`, all of ring key `key`, to its owner in one Enqueue (following the ring);
/// those whose spec the shard asks for are sent again with it. One outcome per item, in
/// order.
pub async fn enqueue(routes: &Routes, key: &RingKey, mut items: Vec<Prepared>) -> Vec<Outcome> {
    let n = items.len();
    send(routes, To::Owner(key), &mut items)
        .await
        .unwrap_or_else(|status| vec![Err(Error::Upstream(status).into()); n])
}

/// Where one Enqueue goes.
#[derive(Clone, Copy)]
enum To<'a> {
    /// The owner of this ring key, following "not the owner" answers.
    Owner(&'a RingKey),
    /// This shard, whatever it answers.
    Shard(&'a str),
}

/// One Enqueue of `items`, then once more with their specs for those the shard asks for.
/// Fails only if the first call does, leaving `items` as they were (to be sent elsewhere);
/// otherwise their tasks are taken into the outcomes.
async fn send(routes: &Routes, to: To<'_>, items: &mut [Prepared]) -> Result<Vec<Outcome>, Status> {
    // The one copy of each task: the request is encoded after this returns control, and
    // the tasks stay here to become the answers (see `outcome`).
    let tasks: Vec<EnqueueTask> = items.iter().map(|p| p.task.clone()).collect();
    let (results, spec_needed) = call(routes, to, tasks).await?;
    let again: Vec<usize> = spec_needed
        .into_iter()
        .map(|i| i as usize)
        .filter(|&i| i < items.len() && items[i].version.is_some())
        .collect();
    let mut sent_again = vec![false; items.len()];
    for &i in &again {
        sent_again[i] = true;
    }
    let mut outcomes: Vec<Outcome> = results
        .into_iter()
        .zip(items.iter_mut().zip(sent_again))
        .map(|(r, (item, again))| {
            // A task sent again keeps its task for the second answer.
            let task = if again {
                item.task.clone()
            } else {
                std::mem::take(&mut item.task)
            };
            outcome(r, task)
        })
        .collect();
    if !again.is_empty() {
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
        match call(routes, to, tasks).await {
            Ok((retried, _)) => {
                for (i, result) in again.into_iter().zip(retried) {
                    outcomes[i] = outcome(result, std::mem::take(&mut items[i].task));
                }
            }
            Err(status) => {
                for i in again {
                    outcomes[i] = Err(Error::Upstream(status.clone()).into());
                }
            }
        }
    }
    outcomes.resize_with(items.len(), || {
        Err(Error::Upstream(Status::internal("no result from the shard for this task")).into())
    });
    Ok(outcomes)
}

/// One Enqueue; the shard's results and the indexes whose spec is needed.
async fn call(
    routes: &Routes,
    to: To<'_>,
    tasks: Vec<EnqueueTask>,
) -> Result<(Vec<EnqueueResult>, Vec<u32>), Status> {
    // Tasks queued now come back as ids: the gateway holds the rest (see `outcome`).
    let request = |tasks| EnqueueRequest {
        tasks,
        answer_queued_by_id: true,
    };
    let answer = match to {
        // Cloned per attempt: a shard that does not own the key (a ring change under way)
        // refuses the whole request before looking at it.
        To::Owner(key) => routes
            .call(key, |mut shard| {
                let request = request(tasks.clone());
                async move { shard.enqueue(request).await }
            })
            .await?
            .into_inner(),
        To::Shard(address) => routes.enqueue_at(address, request(tasks)).await?,
    };
    Ok((answer.results, answer.spec_needed))
}

/// What the shard's `result` for the task `sent` means to the client: a task queued now is
/// the one sent, named and READY as the shard made it (`pm_scheduler_shard`'s `Prepared`).
fn outcome(result: EnqueueResult, sent: EnqueueTask) -> Outcome {
    match result.outcome {
        Some(enqueue_result::Outcome::Task(task)) => Ok(task),
        Some(enqueue_result::Outcome::Error(e)) => Err(e),
        Some(enqueue_result::Outcome::Queued(Queued { id, create_time_ms })) => {
            let mut task = sent.task.unwrap_or_default();
            task.name = format!("{}/tasks/{id}", task.pipeline);
            task.id = id;
            task.state = TaskState::Ready as i32;
            task.attempt = 0;
            task.create_time_ms = create_time_ms;
            task.update_time_ms = create_time_ms;
            task.result = None;
            Ok(task)
        }
        None => Err(Error::Upstream(Status::internal("empty result from shard")).into()),
    }
}

/// A unary submit waiting for its shard.
struct Waiting {
    key: RingKey,
    item: Prepared,
    done: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    in_flight: usize,
}

/// Unary submits coalesced per shard (see the module doc).
pub struct Coalescer {
    routes: Routes,
    /// By shard address.
    queues: Mutex<HashMap<String, Queue>>,
}

/// One Enqueue in flight to `address`, counted until dropped (also when the submit that
/// sent it goes away mid-call); then whatever queued meanwhile gets a drainer.
struct Flight {
    coalescer: Arc<Coalescer>,
    address: String,
}

impl Drop for Flight {
    fn drop(&mut self) {
        let mut queues = self.coalescer.queues.lock().expect("coalescer lock");
        let Some(queue) = queues.get_mut(&self.address) else {
            return;
        };
        if queue.waiting.is_empty() {
            queue.in_flight -= 1;
            if queue.in_flight == 0 {
                queues.remove(&self.address);
            }
            return;
        }
        // The flight goes on as a drainer of its own (not tied to any client's call). Without
        // a runtime (it is shutting down) the waiting submits get their channel's error.
        drop(queues);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let coalescer = self.coalescer.clone();
            let address = std::mem::take(&mut self.address);
            runtime.spawn(coalescer.drain(address));
        }
    }
}

impl Coalescer {
    pub fn new(routes: Routes) -> Arc<Self> {
        Arc::new(Self {
            routes,
            queues: Mutex::new(HashMap::new()),
        })
    }

    /// Queues one task for the shard that owns `key` and waits for its own outcome.
    pub async fn submit(self: &Arc<Self>, key: RingKey, item: Prepared) -> Outcome {
        let address = match self.routes.owner_of(&key) {
            Ok(address) => address,
            Err(status) => return Err(Error::Upstream(status).into()),
        };
        // Decided under the lock, done after it.
        enum Step {
            Alone(RingKey, Box<Prepared>),
            Wait(oneshot::Receiver<Outcome>),
        }
        let step = {
            let mut queues = self.queues.lock().expect("coalescer lock");
            let queue = queues.entry(address.clone()).or_default();
            if queue.in_flight == 0 {
                // An idle shard: this submit goes now, alone, on its own call (no hand-off
                // to a drainer). Under load there is always a flight, so submits queue and
                // share calls.
                queue.in_flight += 1;
                Step::Alone(key, Box::new(item))
            } else if queue.waiting.len() >= MAX_QUEUED {
                return Err(Error::Upstream(pm_proto::status::resource_exhausted(
                    format!("{MAX_QUEUED} submits to shard {address} are waiting; retry later"),
                    Duration::from_millis(100),
                ))
                .into());
            } else {
                let (done, outcome) = oneshot::channel();
                queue.waiting.push(Waiting { key, item, done });
                if queue.in_flight < MAX_IN_FLIGHT {
                    queue.in_flight += 1;
                    // Its own task, so a client that goes away does not take others'
                    // submits with it.
                    tokio::spawn(self.clone().drain(address.clone()));
                }
                Step::Wait(outcome)
            }
        };
        match step {
            Step::Alone(key, item) => {
                let _flight = Flight {
                    coalescer: self.clone(),
                    address: address.clone(),
                };
                let mut items = [*item];
                match send(&self.routes, To::Shard(&address), &mut items).await {
                    Ok(mut outcomes) => outcomes.pop().expect("one outcome"),
                    Err(status) if NotOwner::from_status(&status).is_some() => {
                        let mut outcomes = enqueue(&self.routes, &key, items.into()).await;
                        outcomes.pop().expect("one outcome")
                    }
                    Err(status) => Err(Error::Upstream(status).into()),
                }
            }
            Step::Wait(outcome) => outcome.await.unwrap_or_else(|_| {
                Err(
                    Error::Upstream(Status::internal("the submit was dropped before its answer"))
                        .into(),
                )
            }),
        }
    }

    /// One flight to `address`: sends what is queued, batch after batch, until nothing is.
    async fn drain(self: Arc<Self>, address: String) {
        let _flight = Flight {
            coalescer: self.clone(),
            address: address.clone(),
        };
        loop {
            let batch: Vec<Waiting> = {
                let mut queues = self.queues.lock().expect("coalescer lock");
                let Some(queue) = queues.get_mut(&address) else {
                    return;
                };
                let mut n = 0;
                let mut bytes = 0;
                for w in queue.waiting.iter().take(MAX_COALESCED) {
                    bytes += w.item.task.encoded_len();
                    if n > 0 && bytes > MAX_COALESCED_BYTES {
                        break;
                    }
                    n += 1;
                }
                queue.waiting.drain(..n).collect()
            };
            if batch.is_empty() {
                // `_flight` ends the flight (or hands it on if a submit slipped in).
                return;
            }
            let (mut items, waiting): (Vec<Prepared>, Vec<(RingKey, oneshot::Sender<Outcome>)>) =
                batch.into_iter().map(|w| (w.item, (w.key, w.done))).unzip();
            let outcomes = match send(&self.routes, To::Shard(&address), &mut items).await {
                Ok(outcomes) => outcomes,
                Err(status) if NotOwner::from_status(&status).is_some() => {
                    self.per_key(&waiting, items).await
                }
                Err(status) => vec![Err(Error::Upstream(status).into()); items.len()],
            };
            for ((_, done), outcome) in waiting.into_iter().zip(outcomes) {
                let _ = done.send(outcome);
            }
        }
    }

    /// A batch the shard no longer owns all of: each ring key's tasks to its owner, in
    /// parallel, following the ring. Outcomes in the batch's order.
    async fn per_key(
        &self,
        batch: &[(RingKey, oneshot::Sender<Outcome>)],
        items: Vec<Prepared>,
    ) -> Vec<Outcome> {
        let n = items.len();
        let mut groups: HashMap<&RingKey, (Vec<usize>, Vec<Prepared>)> = HashMap::new();
        for (i, ((key, _), item)) in batch.iter().zip(items).enumerate() {
            let group = groups.entry(key).or_default();
            group.0.push(i);
            group.1.push(item);
        }
        let sends = groups
            .into_iter()
            .map(|(key, (indexes, group))| async move {
                (indexes, enqueue(&self.routes, key, group).await)
            });
        let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
        for (indexes, answers) in futures::future::join_all(sends).await {
            for (i, outcome) in indexes.into_iter().zip(answers) {
                outcomes[i] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.expect("every task is in a group"))
            .collect()
    }
}
