//! `pm.internal.v1.ShardService`: the task calls a gateway forwards, already validated and
//! resolved against the pipeline version.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use pm_proto::internal::v1::shard_service_server::ShardService;
use pm_proto::internal::v1::{AdoptRequest, AdoptResponse, EnqueueRequest, EnqueueResponse};
use pm_proto::names::{PipelineName, TaskName};
use pm_proto::v1::{
    CancelTaskRequest, GetTaskRequest, ListTasksRequest, ListTasksResponse, SubmitTaskResult, Task,
    TaskEvent, TaskState, WatchTaskRequest, submit_task_result, task_event,
};

use crate::error::Error;
use crate::ownership::Ownership;
use crate::scheduler::Scheduler;

pub struct Shard {
    scheduler: Arc<Scheduler>,
    ownership: Arc<Ownership>,
}

impl Shard {
    pub fn new(scheduler: Arc<Scheduler>, ownership: Arc<Ownership>) -> Self {
        Self {
            scheduler,
            ownership,
        }
    }

    /// The task's name, if this shard owns its pipeline.
    fn task_name(&self, name: &str) -> Result<String, Error> {
        let name = TaskName::parse(name).map_err(|e| Error::invalid("name", e.to_string()))?;
        self.ownership.check(&name.pipeline)?;
        Ok(name.to_string())
    }

    /// Refuses the whole call unless this shard owns every pipeline of `tasks`.
    fn check_owned<'a>(&self, tasks: impl Iterator<Item = Option<&'a Task>>) -> Result<(), Error> {
        let mut seen = HashSet::new();
        for task in tasks {
            let pipeline = task.map(|t| t.pipeline.as_str()).unwrap_or_default();
            if !seen.insert(pipeline) {
                continue;
            }
            // A bad name is refused for that task alone, by the scheduler.
            if let Ok(name) = PipelineName::parse(pipeline) {
                self.ownership.check(&name)?;
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
        let tasks = request.into_inner().tasks;
        let _arriving = self.scheduler.arriving();
        self.check_owned(tasks.iter().map(|t| t.task.as_ref()))?;
        let mut spec_needed = Vec::new();
        let results = self
            .scheduler
            .enqueue(tasks)
            .await
            .into_iter()
            .enumerate()
            .map(|(i, r)| SubmitTaskResult {
                outcome: Some(match r {
                    Ok(task) => submit_task_result::Outcome::Task(task),
                    Err(e) => {
                        if matches!(e, Error::SpecNeeded(_)) {
                            spec_needed.push(i as u32);
                        }
                        submit_task_result::Outcome::Error(e.into())
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

    type WatchTaskStream = ReceiverStream<Result<TaskEvent, Status>>;

    async fn watch_task(
        &self,
        request: Request<WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let name = self.task_name(&request.get_ref().name)?;
        let watch = self.scheduler.watch(&name)?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let snapshot = watch.snapshot;
            let now = pm_proto::unix_ms();
            let send = |e| TaskEvent {
                time_ms: now,
                event: Some(e),
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
                match events.recv().await {
                    Ok(event) => {
                        let last = matches!(event.event, Some(task_event::Event::Finished(_)));
                        if tx.send(Ok(event)).await.is_err() || last {
                            return;
                        }
                    }
                    // A slow watcher misses some progress; state and the final result
                    // still arrive.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(skipped = n, "watcher lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
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
        self.ownership.check(&pipeline)?;
        let state = TaskState::try_from(req.state)
            .map_err(|_| Error::invalid("state", format!("{} is not a task state", req.state)))?;
        let size = pm_spec::validate::check_page(req.page_size, &req.page_token)
            .map_err(Error::InvalidArgument)?;
        let (tasks, next_page_token) =
            self.scheduler
                .list(&pipeline.to_string(), state, size, &req.page_token)?;
        Ok(Response::new(ListTasksResponse {
            tasks,
            next_page_token,
        }))
    }

    async fn adopt(
        &self,
        request: Request<AdoptRequest>,
    ) -> Result<Response<AdoptResponse>, Status> {
        let request = request.into_inner();
        let _arriving = self.scheduler.arriving();
        self.check_owned(
            request
                .tasks
                .iter()
                .map(|t| t.stored.as_ref().and_then(|s| s.task.as_ref())),
        )?;
        let n = request.tasks.len();
        let from = request.from_shard.clone();
        let response = self.scheduler.adopt(request).await?;
        tracing::info!(from = %from, tasks = n, adopted = response.adopted, "tasks adopted");
        Ok(Response::new(response))
    }
}
