//! `pm.v1.TaskService` at the edge: every submit is validated here, against the pipeline
//! version it will run, before it reaches a shard; then each call goes to the shard that owns
//! the task's pipeline.

use std::borrow::Cow;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use pm_cluster::RingKey;
use pm_proto::internal::v1::EnqueueTask;
use pm_proto::names::{PipelineName, TaskName};
use pm_proto::v1::task_service_server::TaskService;
use pm_proto::v1::{
    CancelTaskRequest, GetTaskRequest, ListTasksRequest, ListTasksResponse, PipelineSpec,
    SubmitTaskRequest, SubmitTaskResult, SubmitTasksRequest, SubmitTasksResponse, Task, TaskEvent,
    WatchTaskRequest, submit_task_request, submit_task_result,
};
use pm_spec::limits::DEFAULT_PRIORITY;
use pm_spec::validate::{check_priority, check_timeout};

use crate::auth::Caller;
use crate::authz::{self, Rpc, tenant_of};
use crate::enqueue::{Coalescer, Outcome, Prepared, enqueue};
use crate::error::{Error, status_of};
use crate::partitions;
use crate::pipelines::PipelineVersion;
use crate::routing::Routes;
use crate::watch::PerClient;

/// Events queued per watch for the client's HTTP/2 stream (boxed: pointers).
const WATCH_CHANNEL: usize = 64;

/// Most tasks in one SubmitTasks call.
pub const MAX_BATCH: usize = 1000;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

pub struct Tasks {
    routes: Routes,
    coalescer: Arc<Coalescer>,
    watches: PerClient,
}

impl Tasks {
    /// `max_watches_per_client`: see [`crate::watch::DEFAULT_MAX_WATCHES_PER_CLIENT`].
    pub fn new(routes: Routes, max_watches_per_client: usize) -> Self {
        Self {
            coalescer: Coalescer::new(routes.clone()),
            routes,
            watches: PerClient::new(max_watches_per_client),
        }
    }

    async fn pipeline(&self, name: &PipelineName) -> Result<Arc<PipelineVersion>, Error> {
        Ok(self.routes.pipeline_cache().get(name).await?)
    }

    /// Checks one submit against its pipeline and builds what the shard queues: a task of
    /// the pipeline's version names its spec by id; an inline task carries its own.
    fn prepare(
        version: &Arc<PipelineVersion>,
        req: SubmitTaskRequest,
        caller: &Caller,
        traceparent: &str,
    ) -> Result<Prepared, Error> {
        let pipeline = &version.pipeline;
        check_priority("priority", req.priority)?;
        check_timeout("timeout_seconds", req.timeout_seconds)?;
        if req.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(Error::invalid(
                "idempotency_key",
                format!("longer than {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
            ));
        }
        pm_spec::validate::check_input("input", req.input.as_ref())?;
        let default_spec = PipelineSpec::default();
        let (spec, inline) = match req.inline {
            None => (
                Cow::Borrowed(pipeline.spec.as_ref().unwrap_or(&default_spec)),
                false,
            ),
            Some(source) => {
                if !pipeline.spec.as_ref().is_some_and(|s| s.allow_inline_tasks) {
                    return Err(Error::FailedPrecondition(format!(
                        "{} does not allow inline tasks (set allow_inline_tasks in its spec)",
                        pipeline.name
                    )));
                }
                let spec = match source {
                    submit_task_request::Inline::InlineSpec(spec) => {
                        pm_spec::load_structured(spec, "inline_spec")?
                    }
                    submit_task_request::Inline::InlineSpecDocument(doc) => {
                        pm_spec::load_document(&doc, "inline_spec_document")?
                    }
                };
                (Cow::Owned(spec), true)
            }
        };
        let params = pm_spec::resolve_params(&spec, &req.params)?;
        let tenant_max_queued_tasks = version.tenant_max_queued_tasks;
        let partition = version.place(&req.idempotency_key);
        let (spec, spec_id, version) = match spec {
            Cow::Owned(inline) => (Some(inline), Vec::new(), None),
            Cow::Borrowed(_) => (None, version.spec_id.to_vec(), Some(version.clone())),
        };
        let task = EnqueueTask {
            task: Some(Task {
                pipeline: pipeline.name.clone(),
                pipeline_version: pipeline.version,
                params: params.into_iter().collect(),
                priority: req.priority.unwrap_or(DEFAULT_PRIORITY),
                idempotency_key: req.idempotency_key,
                timeout_seconds: req.timeout_seconds,
                inline,
                // Its fair share and its quota are counted per client.
                client: caller.client().to_owned(),
                input: req.input,
                traceparent: traceparent.to_owned(),
                ..Task::default()
            }),
            spec,
            spec_id,
            // The client's own, from its token: never from the request.
            client_priority: caller.priority(),
            tenant_max_queued_tasks,
            partition,
        };
        Ok(Prepared { task, version })
    }

    /// The pipeline a submit's parent names.
    fn pipeline_of(parent: &str) -> Result<PipelineName, Error> {
        PipelineName::parse(parent).map_err(|e| Error::invalid("parent", e.to_string()))
    }

    /// A lone submit (SubmitTask) by a caller already authorized for its parent
    /// (`authz::check`): [`Self::submit`]'s checks and outcome for one task, straight to the
    /// [`Coalescer`], without a batch's grouping by shard, its maps and its `join_all` (4-21%
    /// of the gateway's CPU per unary submit: perf/RESULTS.md, "A lone submit skips the batch
    /// machinery").
    async fn submit_one(
        &self,
        caller: &Caller,
        req: SubmitTaskRequest,
        traceparent: &str,
    ) -> Outcome {
        let name = Self::pipeline_of(&req.parent)?;
        let version = self
            .pipeline(&name)
            .await
            .map_err(|e| Error::Upstream(e.into()))?;
        let task = Self::prepare(&version, req, caller, traceparent)?;
        let key = RingKey::new(name, task.task.partition);
        self.coalescer.submit(key, task).await
    }

    /// Authorizes and validates a batch (each task on its own) and queues the valid ones on
    /// their shards. A lone submit joins the [`Coalescer`]; a batch goes as one Enqueue per
    /// pipeline. Every task is stored with the call's `traceparent`
    /// ([`pm_proto::trace::submit_traceparent`]).
    async fn submit(
        &self,
        caller: &Caller,
        requests: Vec<SubmitTaskRequest>,
        traceparent: &str,
    ) -> Vec<SubmitTaskResult> {
        let mut outcomes: Vec<Option<Result<Task, pm_proto::v1::Error>>> =
            vec![None; requests.len()];
        let mut pipelines: HashMap<String, Result<Arc<PipelineVersion>, Status>> = HashMap::new();
        // Valid tasks grouped by ring key (so by shard), with their index in the batch.
        let mut by_key: HashMap<RingKey, Vec<(usize, Prepared)>> = HashMap::new();
        let alone = requests.len() == 1;
        for (i, req) in requests.into_iter().enumerate() {
            // Each task's tenant on its own: a batch may span tenants.
            let admitted = authz::authorize(caller, Rpc::SubmitTask, tenant_of(&req.parent))
                .map_err(Error::from)
                .and_then(|()| Self::pipeline_of(&req.parent));
            let name = match admitted {
                Ok(name) => name,
                Err(e) => {
                    outcomes[i] = Some(Err(e.into()));
                    continue;
                }
            };
            let key = name.to_string();
            if !pipelines.contains_key(&key) {
                let fetched = self.pipeline(&name).await.map_err(Status::from);
                pipelines.insert(key.clone(), fetched);
            }
            let prepared = match &pipelines[&key] {
                Ok(pipeline) => Self::prepare(pipeline, req, caller, traceparent),
                Err(status) => Err(Error::Upstream(status.clone())),
            };
            match prepared {
                Ok(task) => {
                    let key = RingKey::new(name, task.task.partition);
                    by_key.entry(key).or_default().push((i, task));
                }
                Err(e) => outcomes[i] = Some(Err(e.into())),
            }
        }
        // Each ring key's Enqueue in parallel: a partitioned pipeline's batch is split by
        // partition, and each task is still acknowledged or refused on its own.
        let sends = by_key.into_iter().map(|(key, items)| async move {
            let (indexes, items): (Vec<usize>, Vec<Prepared>) = items.into_iter().unzip();
            let answers = if alone {
                let item = items.into_iter().next().expect("one item");
                vec![self.coalescer.submit(key, item).await]
            } else {
                enqueue(&self.routes, &key, items).await
            };
            (indexes, answers)
        });
        for (indexes, answers) in futures::future::join_all(sends).await {
            for (i, outcome) in indexes.into_iter().zip(answers) {
                outcomes[i] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|o| SubmitTaskResult {
                outcome: Some(match o.expect("every task has an outcome") {
                    Ok(task) => submit_task_result::Outcome::Task(task),
                    Err(e) => submit_task_result::Outcome::Error(e),
                }),
            })
            .collect()
    }
}

fn task_name(name: &str) -> Result<TaskName, Error> {
    TaskName::parse(name).map_err(|e| Error::invalid("name", e.to_string()))
}

#[tonic::async_trait]
impl TaskService for Tasks {
    async fn submit_task(
        &self,
        request: Request<SubmitTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        let caller = authz::check(&request, Rpc::SubmitTask, &request.get_ref().parent)?;
        let traceparent = pm_proto::trace::submit_traceparent(request.metadata().as_ref());
        self.submit_one(&caller, request.into_inner(), &traceparent)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn submit_tasks(
        &self,
        request: Request<SubmitTasksRequest>,
    ) -> Result<Response<SubmitTasksResponse>, Status> {
        // The role here; each task's tenant on its own below.
        let caller = Caller::of(&request)?;
        authz::authorize(&caller, Rpc::SubmitTasks, None)?;
        let traceparent = pm_proto::trace::submit_traceparent(request.metadata().as_ref());
        let requests = request.into_inner().requests;
        if requests.is_empty() || requests.len() > MAX_BATCH {
            return Err(Error::invalid(
                "requests",
                format!("{} tasks; a batch holds 1..={MAX_BATCH}", requests.len()),
            )
            .into());
        }
        let results = self.submit(&caller, requests, &traceparent).await;
        Ok(Response::new(SubmitTasksResponse { results }))
    }

    async fn get_task(&self, request: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        authz::check(&request, Rpc::GetTask, &request.get_ref().name)?;
        let req = request.into_inner();
        let name = task_name(&req.name)?;
        let routes = &self.routes;
        routes
            .call(&RingKey::of_task(&name), |mut s| {
                let req = req.clone();
                async move { s.get_task(req).await }
            })
            .await
    }

    type WatchTaskStream = Pin<Box<dyn Stream<Item = Result<TaskEvent, Status>> + Send>>;

    async fn watch_task(
        &self,
        request: Request<WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        authz::check(&request, Rpc::WatchTask, &request.get_ref().name)?;
        // Held until the watch ends, whoever ends it.
        let permit = self.watches.acquire(Caller::of(&request)?.client())?;
        let req = request.into_inner();
        let name = task_name(&req.name)?;
        let open = {
            let routes = self.routes.clone();
            move || {
                let (routes, req, key) = (routes.clone(), req.clone(), RingKey::of_task(&name));
                async move {
                    routes
                        .call(&key, |mut s| {
                            let req = req.clone();
                            async move { s.watch_task(req).await }
                        })
                        .await
                        .map(|r| r.into_inner())
                }
            }
        };
        let upstream = open().await?;
        // The watch outlives handoffs (see `watch`).
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        tokio::spawn(crate::watch::follow(upstream, open, tx, permit));
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|e| e.map(|event| *event)),
        )))
    }

    async fn cancel_task(
        &self,
        request: Request<CancelTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        authz::check(&request, Rpc::CancelTask, &request.get_ref().name)?;
        let req = request.into_inner();
        let name = task_name(&req.name)?;
        self.routes
            .call(&RingKey::of_task(&name), |mut s| {
                let req = req.clone();
                async move { s.cancel_task(req).await }
            })
            .await
    }

    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        authz::check(&request, Rpc::ListTasks, &request.get_ref().parent)?;
        let req = request.into_inner();
        let pipeline = PipelineName::parse(&req.parent)
            .map_err(|e| Error::invalid("parent", e.to_string()))?;
        // NOT_FOUND for a pipeline that does not exist, rather than an empty list.
        let version = self.pipeline(&pipeline).await?;
        let covered = pm_cluster::ring::covered_partitions(&version.pipeline);
        let partitions = partitions::wanted("partitions", &req.partitions, covered)?;
        let size =
            pm_spec::validate::check_page(req.page_size, &req.page_token).map_err(Error::from)?;
        let pages = partitions::per_owner(&self.routes, &pipeline, &partitions, |mut s, p| {
            let req = ListTasksRequest {
                partitions: p,
                ..req.clone()
            };
            async move { s.list_tasks(req).await.map(Response::into_inner) }
        })
        .await?;
        Ok(Response::new(partitions::merge_pages(pages, size)))
    }
}
