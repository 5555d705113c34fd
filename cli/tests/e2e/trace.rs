//! One task's trace, received over OTLP/gRPC from a live `pm dev` started with the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`: the client's context, the gateway's server span, the
//! shard's enqueue and queued spans, the agent's task, job and step spans, all in one trace
//! with the right parents; a step sees its own span as `TRACEPARENT`; the log line about a
//! retried job names the task and its trace.

use std::collections::HashMap;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::{Span, span, status};
use tokio::sync::mpsc;

use pm_proto::v1::*;

use super::pm_dev::pm_dev;
use super::{WAIT, apply_document, follow_to_end, pipeline_name, state};

/// An OTLP TraceService that hands every span it receives to the test.
struct Collector {
    spans: mpsc::UnboundedSender<Span>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.spans.send(span);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves the collector on a free loopback port: its endpoint and the spans it receives.
async fn collector() -> (String, mpsc::UnboundedReceiver<Span>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector { spans: tx }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (endpoint, rx)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn failed(span: &Span) -> bool {
    span.status
        .as_ref()
        .is_some_and(|s| s.code == status::StatusCode::Error as i32)
}

#[tokio::test]
async fn one_tasks_trace_reaches_an_otlp_collector_from_submit_to_each_step() {
    let (otlp, mut received) = collector().await;
    let dev = pm_dev(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ]);
    let channel = pm_proto::client::channel(&dev.endpoint).unwrap();
    let mut tasks = pm_proto::client::tasks(channel.clone());
    let mut pipelines = pm_proto::client::pipelines(channel);
    // The job fails once, then its retry prints the context its second step got.
    let document = r#"name: traced
stages:
  - name: s
    jobs:
      - name: j
        retries: 1
        commands:
          - 'test -e "$PM_WORK_DIR/again" || { touch "$PM_WORK_DIR/again"; exit 3; }'
          - 'printf %s "$TRACEPARENT"'
"#;
    apply_document(&mut pipelines, "", document).await;

    // The client's own trace: pm continues it.
    let trace = format!("{:032x}", rand_u128());
    let client_span = format!("{:016x}", rand_u128() as u64 | 1);
    let mut request = tonic::Request::new(SubmitTaskRequest {
        parent: pipeline_name("traced"),
        ..SubmitTaskRequest::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{client_span}-01").parse().unwrap(),
    );
    let task = tasks.submit_task(request).await.unwrap().into_inner();
    let watch = tasks
        .watch_task(WatchTaskRequest {
            name: task.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let (task, _) = follow_to_end(watch, &task.name).await;
    assert_eq!(state(&task), TaskState::Done, "{task:?}");

    // Every span of the trace, until the eight expected are in.
    let wanted = [
        "pm.v1.TaskService/SubmitTask",
        "enqueue",
        "queued",
        "task",
        "job s/j",
        "step 0",
        "step 0",
        "step 1",
    ];
    let mut spans: Vec<Span> = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let count = |spans: &[Span], name: &str| spans.iter().filter(|s| s.name == name).count();
    while !wanted
        .iter()
        .all(|w| count(&spans, w) >= wanted.iter().filter(|x| *x == w).count())
    {
        let span = tokio::time::timeout_at(deadline, received.recv())
            .await
            .unwrap_or_else(|_| {
                let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
                panic!("the trace's spans did not all arrive; got {names:?}")
            })
            .expect("the collector runs");
        if hex(&span.trace_id) == trace {
            spans.push(span);
        }
    }
    let one = |name: &str| -> &Span {
        let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span: {found:?}");
        found[0]
    };
    let id = |span: &Span| hex(&span.span_id);
    let parent = |span: &Span| hex(&span.parent_span_id);

    let submit = one("pm.v1.TaskService/SubmitTask");
    assert_eq!(
        parent(submit),
        client_span,
        "the gateway continues the client's trace"
    );
    assert_eq!(submit.kind, span::SpanKind::Server as i32);
    assert_eq!(
        task.traceparent,
        format!("00-{trace}-{}-01", id(submit)),
        "the task is stored with the submit's context"
    );
    for name in ["enqueue", "queued"] {
        let s = one(name);
        assert_eq!(parent(s), id(submit), "{name}");
        assert_eq!(attribute(s, "pm.task").as_deref(), Some(task.name.as_str()));
        assert!(s.start_time_unix_nano <= s.end_time_unix_nano, "{name}");
    }
    let run = one("task");
    assert_eq!(parent(run), id(submit));
    assert_eq!(run.kind, span::SpanKind::Consumer as i32);
    assert!(!failed(run));
    let job = one("job s/j");
    assert_eq!(parent(job), id(run));
    assert!(!failed(job), "the job succeeded on its retry");

    let steps: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name.starts_with("step "))
        .collect();
    assert!(steps.iter().all(|s| parent(s) == id(job)));
    let by_attempt: HashMap<(String, String), &Span> = steps
        .iter()
        .map(|s| {
            let key = (
                attribute(s, "job_attempt").unwrap(),
                attribute(s, "step").unwrap(),
            );
            (key, *s)
        })
        .collect();
    let first = by_attempt[&("1".to_owned(), "0".to_owned())];
    assert!(failed(first), "the failed first attempt's step is an error");
    assert_eq!(attribute(first, "exit_code").as_deref(), Some("3"));
    assert!(!failed(by_attempt[&("2".to_owned(), "0".to_owned())]));
    let printed = by_attempt[&("2".to_owned(), "1".to_owned())];
    let steps_out = &task.result.as_ref().unwrap().jobs[0].steps;
    assert_eq!(
        steps_out[1].stdout,
        format!("00-{trace}-{}-01", id(printed)),
        "a step's TRACEPARENT names its own span"
    );

    // The log line about the retry names the task and its trace.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = dev
            .logs
            .recv_timeout(left)
            .expect("pm dev logged the retry");
        let log: serde_json::Value = serde_json::from_str(&line).unwrap();
        if log["fields"]["message"] != "job failed; retrying" {
            continue;
        }
        let spans = log["spans"].as_array().expect("the line's spans");
        let task_span = spans
            .iter()
            .find(|s| s["name"] == "task")
            .unwrap_or_else(|| panic!("in the task's span: {line}"));
        assert_eq!(task_span["task"], task.name.as_str(), "{line}");
        assert_eq!(task_span["trace_id"], trace.as_str(), "{line}");
        break;
    }
}

fn rand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .unwrap();
    u128::from_le_bytes(bytes) | 1
}
