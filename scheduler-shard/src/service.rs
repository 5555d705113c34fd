//! `pm.internal.v1.ShardService`: the task calls a gateway forwards, already validated and
//! resolved against the pipeline version.

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use pm_proto::internal::v1::shard_service_server::ShardService;
use pm_proto::internal::v1::{
    AdoptRequest, AdoptResponse, EnqueueRequest, EnqueueResponse, EnqueueResult, Queued,
    enqueue_result,
};
use pm_proto::names::{PipelineName, TaskName};
use pm_proto::v1::{
    CancelTaskRequest, GetPipelineStatsRequest, GetTaskRequest, ListTasksRequest,
    ListTasksResponse, PipelineStats, Task, TaskEvent, TaskState, WatchTaskRequest, task_event,
};

use crate::error::Error;
use crate::ownership::Ownership;
use crate::scheduler::{Scheduler, Submitted, WATCH_BUFFER};
use pm_cluster::RingKey;

/// Events queued per watch for the HTTP/2 stream (pointers to shared events).
const WATCH_CHANNEL: usize = 64;

/// A watch's events, as the server sends them.
pub type WatchStream = futures::stream::Map<
    ReceiverStream<Result<Arc<TaskEvent>, Status>>,
    fn(Result<Arc<TaskEvent>, Status>) -> Result<TaskEvent, Status>,
>;

pub struct Shard {
    scheduler: Arc<Scheduler>,
    ownership: Arc<Ownership>,
    /// One permit per open watch.
    watches: Arc<Semaphore>,
}

impl Shard {
    pub fn new(scheduler: Arc<Scheduler>, ownership: Arc<Ownership>) -> Self {
        Self {
            ownership,
            watches: Arc::new(Semaphore::new(scheduler.options().max_watches)),
            scheduler,
        }
    }

    /// The task's name, if this shard owns its ring key.
    fn task_name(&self, name: &str) -> Result<String, Error> {
        let name = TaskName::parse(name).map_err(|e| Error::invalid("name", e.to_string()))?;
        self.ownership.check(&RingKey::of_task(&name))?;
        Ok(name.to_string())
    }

    /// Refuses the whole call unless this shard owns every ring key of the tasks (`None`:
    /// a task whose pipeline does not parse, refused on its own by the scheduler).
    fn check_owned(&self, keys: impl Iterator<Item = Option<RingKey>>) -> Result<(), Error> {
        let mut seen = HashSet::new();
        for key in keys.flatten() {
            if seen.insert(key.clone()) {
                self.ownership.check(&key)?;
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ShardService for Shard {
    async fn enqueue(
        &self,
        request: Request<EnqueueRequest>,
    ) -> Result<Response<EnqueueResponse>, Status> {
        let EnqueueRequest {
            tasks,
            answer_queued_by_id: by_id,
        } = request.into_inner();
        let _arriving = self.scheduler.arriving();
        self.check_owned(tasks.iter().map(|t| {
            let pipeline = t.task.as_ref().map(|t| t.pipeline.as_str())?;
            let name = PipelineName::parse(pipeline).ok()?;
            Some(RingKey::new(name, t.partition))
        }))?;
        let mut spec_needed = Vec::new();
        let results = self
            .scheduler
            .submit(tasks)
            .await
            .into_iter()
            .enumerate()
            .map(|(i, r)| EnqueueResult {
                outcome: Some(match r {
                    // The caller holds the task: it gets the id and time, not the task back.
                    Ok(Submitted::Queued(task)) if by_id => {
                        enqueue_result::Outcome::Queued(Queued {
                            id: task.id,
                            create_time_ms: task.create_time_ms,
                        })
                    }
                    Ok(submitted) => enqueue_result::Outcome::Task(submitted.into_task()),
                    Err(e) => {
                        if matches!(e, Error::SpecNeeded(_)) {
                            spec_needed.push(i as u32);
                        }
                        enqueue_result::Outcome::Error(e.into())
                    }
                }),
            })
            .collect();
        Ok(Response::new(EnqueueResponse {
            results,
            spec_needed,
        }))
    }

    async fn get_task(&self, request: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        let name = self.task_name(&request.get_ref().name)?;
        Ok(Response::new(self.scheduler.get(&name)?))
    }

    type WatchTaskStream = WatchStream;

    async fn watch_task(
        &self,
        request: Request<WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let name = self.task_name(&request.get_ref().name)?;
        let permit =
            self.watches
                .clone()
                .try_acquire_owned()
                .map_err(|_| Error::ResourceExhausted {
                    what: format!(
                        "this shard serves {} watches, its limit (--max-watches); retry later",
                        self.scheduler.options().max_watches
                    ),
                    retry_after: std::time::Duration::from_secs(1),
                })?;
        let watch = self.scheduler.watch(&name)?;
        // Events are pointers until h2 takes them: an idle watch holds no event copies.
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        tokio::spawn(async move {
            let _permit = permit;
            let snapshot = watch.snapshot;
            let now = pm_proto::unix_ms();
            let send = |e| {
                Arc::new(TaskEvent {
                    time_ms: now,
                    event: Some(e),
                })
            };
            if tx
                .send(Ok(send(task_event::Event::Snapshot(snapshot.clone()))))
                .await
                .is_err()
            {
                return;
            }
            for event in watch.history {
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            let Some(mut events) = watch.events else {
                // Already final: the finished event closes the watch.
                let _ = tx
                    .send(Ok(send(task_event::Event::Finished(snapshot))))
                    .await;
                return;
            };
            loop {
                let next = tokio::select! {
                    next = events.recv() => next,
                    // The watcher went: its permit comes back now, not at the next event.
                    () = tx.closed() => return,
                };
                match next {
                    Ok(event) => {
                        let last = matches!(event.event, Some(task_event::Event::Finished(_)));
                        if tx.send(Ok(event)).await.is_err() || last {
                            return;
                        }
                    }
                    // Past the buffer, the watcher is told rather than held: the events it
                    // missed are gone, and a new watch starts from a snapshot.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(pm_proto::status::resource_exhausted(
                                format!(
                                    "this watcher fell {n} events behind the task (a watch \
                                     buffers {WATCH_BUFFER}); watch again for a snapshot"
                                ),
                                std::time::Duration::ZERO,
                            )))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(
            ReceiverStream::new(rx).map(|e| e.map(Arc::unwrap_or_clone)),
        ))
    }

    async fn cancel_task(
        &self,
        request: Request<CancelTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        let name = self.task_name(&request.get_ref().name)?;
        Ok(Response::new(self.scheduler.cancel(&name).await?))
    }

    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let req = request.into_inner();
        let pipeline = PipelineName::parse(&req.parent)
            .map_err(|e| Error::invalid("parent", e.to_string()))?;
        self.ownership
            .check_partitions(&pipeline, &req.partitions)?;
        let state = TaskState::try_from(req.state)
            .map_err(|_| Error::invalid("state", format!("{} is not a task state", req.state)))?;
        let size = pm_spec::validate::check_page(req.page_size, &req.page_token)
            .map_err(Error::InvalidArgument)?;
        let (tasks, next_page_token) = self.scheduler.list(
            &pipeline.to_string(),
            &req.partitions,
            state,
            size,
            &req.page_token,
        )?;
        Ok(Response::new(ListTasksResponse {
            tasks,
            next_page_token,
        }))
    }

    async fn get_pipeline_stats(
        &self,
        request: Request<GetPipelineStatsRequest>,
    ) -> Result<Response<PipelineStats>, Status> {
        let req = request.into_inner();
        let pipeline =
            PipelineName::parse(&req.name).map_err(|e| Error::invalid("name", e.to_string()))?;
        self.ownership
            .check_partitions(&pipeline, &req.partitions)?;
        let name = pipeline.to_string();
        let q = self.scheduler.pipeline_queue(&name);
        let [done, error, cancelled] = q.finished_recently;
        Ok(Response::new(PipelineStats {
            name,
            ready: q.ready,
            in_progress: q.in_progress,
            done_last_minute: done,
            error_last_minute: error,
            cancelled_last_minute: cancelled,
            head_wait_ms: q.head_wait_ms,
            oldest_ready_age_ms: q.oldest_ready_age_ms,
            agents: q.agents,
            free_slots: q.free_slots,
            time_ms: pm_proto::unix_ms(),
        }))
    }

    async fn adopt(
        &self,
        request: Request<AdoptRequest>,
    ) -> Result<Response<AdoptResponse>, Status> {
        let request = request.into_inner();
        let _arriving = self.scheduler.arriving();
        self.check_owned(request.tasks.iter().map(|t| {
            let task = t.stored.as_ref().and_then(|s| s.task.as_ref())?;
            TaskName::parse(&task.name)
                .ok()
                .map(|n| RingKey::of_task(&n))
        }))?;
        let n = request.tasks.len();
        let from = request.from_shard.clone();
        let response = self.scheduler.adopt(request).await?;
        tracing::info!(from = %from, tasks = n, adopted = response.adopted, "tasks adopted");
        Ok(Response::new(response))
    }
}
