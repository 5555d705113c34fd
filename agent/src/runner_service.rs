//! `pm.v1.RunnerService`: run a spec directly on this agent, no scheduler involved, with
//! the events streamed back. A client that goes away cancels its run.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use pm_proto::status::invalid_argument;
use pm_proto::unix_ms;
use pm_proto::v1::runner_service_server::RunnerService;
use pm_proto::v1::{RunRequest, Task, TaskEvent, TaskState, run_request, task_event};

use crate::runner::{Run, RunnerOptions, run_task};

pub struct Runner {
    options: RunnerOptions,
}

impl Runner {
    pub fn new(options: RunnerOptions) -> Self {
        Self { options }
    }
}

#[tonic::async_trait]
impl RunnerService for Runner {
    type RunStream = ReceiverStream<Result<TaskEvent, Status>>;

    async fn run(&self, request: Request<RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        let traceparent = pm_proto::trace::submit_traceparent(request.metadata().as_ref());
        let req = request.into_inner();
        let spec = match req.source {
            Some(run_request::Source::Spec(spec)) => pm_spec::load_structured(spec, "spec"),
            Some(run_request::Source::SpecDocument(doc)) => {
                pm_spec::load_document(&doc, "spec_document")
            }
            None => return Err(invalid_argument("source", "give `spec` or `spec_document`")),
        };
        let spec = spec.map_err(|v| invalid_argument(&v.field, &v.description))?;
        let params = pm_spec::resolve_params(&spec, &req.params)
            .map_err(|v| invalid_argument(&v.field, &v.description))?;
        pm_spec::validate::check_input("input", req.input.as_ref())
            .map_err(|v| invalid_argument(&v.field, &v.description))?;
        let input = req.input.as_ref().and_then(pm_proto::json::to_text);
        let id = format!("run-{}", uuid_like());
        let (tx, rx) = mpsc::channel(256);
        let options = self.options.clone();
        tokio::spawn(
            async move {
                let cancel = CancellationToken::new();
                let (events_tx, mut events_rx) = mpsc::unbounded_channel();
                let run = Run {
                    id: id.clone(),
                    spec: Arc::new(spec),
                    params: params.clone(),
                    timeout_seconds: 0,
                    input,
                    traceparent,
                };
                let started = unix_ms();
                let work = run_task(&options, run, events_tx, cancel.clone());
                tokio::pin!(work);
                let result = loop {
                    tokio::select! {
                        result = &mut work => break result,
                        Some(event) = events_rx.recv() => {
                            if tx.send(Ok(event)).await.is_err() {
                                cancel.cancel();
                            }
                        }
                    }
                };
                while let Ok(event) = events_rx.try_recv() {
                    let _ = tx.send(Ok(event)).await;
                }
                let state = if result.succeeded {
                    TaskState::Done
                } else {
                    TaskState::Error
                };
                let task = Task {
                    name: format!("runs/{id}"),
                    id,
                    params: params.into_iter().collect(),
                    state: state as i32,
                    attempt: 1,
                    create_time_ms: started,
                    update_time_ms: unix_ms(),
                    result: Some(result),
                    ..Task::default()
                };
                let _ = tx
                    .send(Ok(TaskEvent {
                        time_ms: unix_ms(),
                        event: Some(task_event::Event::Finished(task)),
                    }))
                    .await;
            }
            // In the call's span (when tracing), which outlives the call's answer.
            .instrument(tracing::Span::current()),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A process-unique id for a direct run: time and a counter.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{:x}-{:x}", unix_ms(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `pm-agent run -f FILE --param k=v`: serves [`Runner`] on an ephemeral loopback port, runs
/// the spec through `RunnerService.Run` like any client would, prints the output as it comes
/// and the result at the end. Exit code 0 when the run succeeded, 1 otherwise.
pub async fn run_locally(
    options: RunnerOptions,
    file: &std::path::Path,
    params: &[String],
) -> std::process::ExitCode {
    use std::process::ExitCode;

    let document = match std::fs::read_to_string(file) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("pm-agent run: cannot read {}: {e}", file.display());
            return ExitCode::from(64);
        }
    };
    let mut given = std::collections::HashMap::new();
    for pair in params {
        let Some((k, v)) = pair.split_once('=') else {
            eprintln!("pm-agent run: --param {pair:?}: expected name=value");
            return ExitCode::from(64);
        };
        given.insert(k.to_owned(), v.to_owned());
    }
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pm-agent run: cannot listen on loopback: {e}");
            return ExitCode::FAILURE;
        }
    };
    let endpoint = match listener.local_addr() {
        Ok(addr) => format!("http://{addr}"),
        Err(e) => {
            eprintln!("pm-agent run: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = CancellationToken::new();
    tokio::spawn(crate::serve_runner(
        listener,
        options,
        stop.clone().cancelled_owned(),
    ));
    let code = match print_run(&endpoint, document, given).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(status) => {
            eprintln!("pm-agent run: {:?}: {}", status.code(), status.message());
            ExitCode::FAILURE
        }
    };
    stop.cancel();
    code
}

async fn print_run(
    endpoint: &str,
    document: String,
    params: std::collections::HashMap<String, String>,
) -> Result<bool, Status> {
    let channel =
        pm_proto::client::channel(endpoint).map_err(|e| Status::unavailable(e.to_string()))?;
    let request = RunRequest {
        source: Some(run_request::Source::SpecDocument(document)),
        params,
        input: None,
    };
    let mut events = pm_proto::client::runner(channel)
        .run(request)
        .await?
        .into_inner();
    while let Some(event) = events.message().await? {
        match event.event {
            Some(task_event::Event::StepStarted(s)) => {
                let at = s.step.unwrap_or_default();
                println!("> {}/{} step {}: {}", at.stage, at.job, at.step, s.command);
            }
            Some(task_event::Event::Output(o)) => {
                for line in o.data.lines() {
                    println!("  | {line}");
                }
            }
            Some(task_event::Event::StepFinished(f)) => {
                let at = f.step.unwrap_or_default();
                let r = f.result.unwrap_or_default();
                let mark = if r.exit_code == 0 && !r.timed_out {
                    "ok"
                } else {
                    "FAILED"
                };
                println!(
                    "{mark} {}/{} step {}: exit {} in {} ms",
                    at.stage, at.job, at.step, r.exit_code, r.duration_ms
                );
            }
            Some(task_event::Event::Finished(task)) => {
                let result = task.result.unwrap_or_default();
                if !result.error.is_empty() {
                    println!("error: {}", result.error);
                }
                println!("{}", if result.succeeded { "DONE" } else { "ERROR" });
                return Ok(result.succeeded);
            }
            _ => {}
        }
    }
    Err(Status::unavailable("the run ended without a result"))
}
