//! `pm-null`: the null-gRPC floor. A `pm.v1.TaskService` whose SubmitTask answers at once
//! (no validation, no disk), or, with `--forward URL`, a null hop that forwards every
//! SubmitTask to another such server over one HTTP/2 channel. Driven by `pm-perf null` with
//! the same generator and connections as the real servers, it shows the most unary gRPC
//! carries on this machine, which the unary targets are ratios of.

use std::pin::Pin;

use clap::Parser;
use futures::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use pm_proto::v1::task_service_client::TaskServiceClient;
use pm_proto::v1::task_service_server::{TaskService, TaskServiceServer};
use pm_proto::v1::{
    CancelTaskRequest, GetTaskRequest, ListTasksRequest, ListTasksResponse, SubmitTaskRequest,
    SubmitTaskResult, SubmitTasksRequest, SubmitTasksResponse, Task, TaskEvent, WatchTaskRequest,
    submit_task_result,
};

#[derive(Parser)]
#[command(about = "a null TaskService: the unary gRPC floor for pm-perf")]
struct Args {
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Forward every submit to this null server instead of answering (a null hop).
    #[arg(long)]
    forward: Option<String>,
}

struct Null {
    forward: Option<TaskServiceClient<Channel>>,
}

fn answer(req: &SubmitTaskRequest) -> Task {
    Task {
        pipeline: req.parent.clone(),
        ..Task::default()
    }
}

#[tonic::async_trait]
impl TaskService for Null {
    async fn submit_task(
        &self,
        request: Request<SubmitTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        match &self.forward {
            Some(client) => client.clone().submit_task(request.into_inner()).await,
            None => Ok(Response::new(answer(request.get_ref()))),
        }
    }

    async fn submit_tasks(
        &self,
        request: Request<SubmitTasksRequest>,
    ) -> Result<Response<SubmitTasksResponse>, Status> {
        if let Some(client) = &self.forward {
            return client.clone().submit_tasks(request.into_inner()).await;
        }
        let results = request
            .get_ref()
            .requests
            .iter()
            .map(|r| SubmitTaskResult {
                outcome: Some(submit_task_result::Outcome::Task(answer(r))),
            })
            .collect();
        Ok(Response::new(SubmitTasksResponse { results }))
    }

    async fn get_task(&self, _: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        Err(Status::unimplemented("null server"))
    }

    type WatchTaskStream = Pin<Box<dyn Stream<Item = Result<TaskEvent, Status>> + Send>>;

    async fn watch_task(
        &self,
        _: Request<WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        Err(Status::unimplemented("null server"))
    }

    async fn cancel_task(&self, _: Request<CancelTaskRequest>) -> Result<Response<Task>, Status> {
        Err(Status::unimplemented("null server"))
    }

    async fn list_tasks(
        &self,
        _: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        Err(Status::unimplemented("null server"))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let forward = match &args.forward {
        Some(url) => Some(pm_proto::client::tasks(pm_proto::client::channel(url)?)),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let (_health, health_service) = pm_proto::server::health();
    pm_proto::server::builder()
        .add_service(health_service)
        .add_service(TaskServiceServer::new(Null { forward }))
        .serve_with_incoming_shutdown(
            pm_proto::server::incoming(listener),
            pm_proto::server::shutdown_signal(),
        )
        .await?;
    Ok(())
}
