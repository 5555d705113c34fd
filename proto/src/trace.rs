//! Traces: OpenTelemetry spans exported over OTLP/gRPC, and the W3C trace context a task
//! carries from its submit to its steps.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set:
//! then [`crate::server::init_tracing`] installs a batch exporter (the standard variables
//! apply: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `_ARG`,
//! `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS` and `_TIMEOUT`). Only spans of our own code are
//! exported, never the HTTP/2 stack's or the exporter's own.
//!
//! One task's trace:
//! 1. The public server's span for the call (`pm.v1.TaskService/SubmitTask`, kind server),
//!    a child of the client's `traceparent` header if it sent one ([`ServerSpanLayer`]).
//! 2. Its context is stored with the task (`Task.traceparent`, [`submit_traceparent`]) and
//!    goes wherever the task goes: into the Enqueue, the shard's disk, a handoff, the Assign.
//! 3. The shard records `enqueue` (received to durable) and `queued` (ready to assigned)
//!    spans after the fact, from times it keeps anyway ([`record`]): nothing is held open per
//!    task.
//! 4. The agent's `task` span (assigned to result), with a `job` span per job and a `step`
//!    span per command. Each step gets `TRACEPARENT` in its environment, naming its span.
//!
//! A process with tracing off still carries the context it was given: a client's valid
//! `traceparent` is stored as is, and steps get the task's.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::SystemTime;

pub use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header and the environment variable a step gets.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACEPARENT_ENV: &str = "TRACEPARENT";

static ENABLED: AtomicBool = AtomicBool::new(false);
static TRACER: OnceLock<opentelemetry_sdk::trace::SdkTracer> = OnceLock::new();

/// Whether this process exports spans.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether the environment asks for traces.
fn requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
}

/// The exporter of this process, flushed by [`Tracing::shutdown`].
#[must_use = "call shutdown() before exiting, or the last spans are lost"]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    pub(crate) fn off() -> Self {
        Self { provider: None }
    }

    /// Sends the spans still queued (bounded by the exporter's timeout), then stops.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // Blocking: the batch processor's thread exports on this runtime meanwhile.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// The layer exporting our spans, when the environment asks for traces; `service` names the
/// process unless `OTEL_SERVICE_NAME` does. Needs a Tokio runtime (the exporter's client
/// lives on it).
pub(crate) fn init<S>(
    service: &'static str,
) -> Result<(Option<impl tracing_subscriber::Layer<S>>, Tracing), String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    if !requested() {
        return Ok((None, Tracing::off()));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("pipeline-manager");
    let _ = TRACER.set(tracer.clone());
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    ENABLED.store(true, Ordering::Relaxed);
    // Our spans only (targets `pm…`): the HTTP/2 stack's would trace the exporter's own calls.
    let ours = tracing_subscriber::filter::filter_fn(|m| {
        m.target().starts_with("pm") && *m.level() <= tracing::Level::INFO
    });
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(ours);
    Ok((
        Some(layer),
        Tracing {
            provider: Some(provider),
        },
    ))
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// One `traceparent` value, as a carrier.
struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

#[derive(Default)]
struct Out(Option<String>);

impl Injector for Out {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

/// The remote context a `traceparent` value names, if it is a valid one.
fn context_of(traceparent: &str) -> Option<opentelemetry::Context> {
    let cx = TraceContextPropagator::new().extract(&One(traceparent));
    cx.span().span_context().is_valid().then_some(cx)
}

/// The `traceparent` of a context's span, if it has a valid one.
fn traceparent_of(cx: &opentelemetry::Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = Out::default();
    TraceContextPropagator::new().inject_context(cx, &mut out);
    out.0
}

/// A `traceparent` value checked and written the standard way (lower-case, version 00), or
/// `None` if it is not a valid one: an invalid header starts no trace (W3C says to ignore it).
pub fn normalize(traceparent: &str) -> Option<String> {
    context_of(traceparent).and_then(|cx| traceparent_of(&cx))
}

/// The trace id in a `traceparent` value, for log lines ("" if it is not a valid one).
pub fn trace_id_of(traceparent: &str) -> String {
    context_of(traceparent)
        .map(|cx| cx.span().span_context().trace_id().to_string())
        .unwrap_or_default()
}

/// The trace context a task submitted in this call is stored with: the server span's when
/// this process traces, else the client's own `traceparent` header, if valid.
pub fn submit_traceparent(headers: &http::HeaderMap) -> String {
    if enabled()
        && let Some(tp) = traceparent_of(&tracing::Span::current().context())
    {
        return tp;
    }
    headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(normalize)
        .unwrap_or_default()
}

/// Makes `span` a child of the context `traceparent` names (when tracing, and it is valid),
/// and records its trace id in its `trace_id` field, for the log lines inside it.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let Some(cx) = context_of(traceparent) else {
        return;
    };
    let trace_id = cx.span().span_context().trace_id();
    if enabled() {
        let _ = span.set_parent(cx);
    }
    span.record("trace_id", tracing::field::display(trace_id));
}

/// The `traceparent` naming `span` when this process traces; else `inherited` (the task's
/// own), so the context still reaches the step.
pub fn traceparent_for(span: &tracing::Span, inherited: &str) -> Option<String> {
    if enabled()
        && let Some(tp) = traceparent_of(&span.context())
    {
        return Some(tp);
    }
    normalize(inherited)
}

/// Records a finished span of `component`, a child of `traceparent`, that started at `start`
/// and ended at `end`: for stretches the shard knows only afterwards (a task's time queued),
/// so nothing is held open per task. Nothing without tracing or a valid parent.
pub fn record(
    name: &'static str,
    traceparent: &str,
    start: SystemTime,
    end: SystemTime,
    failed: Option<&str>,
    attributes: Vec<KeyValue>,
) {
    if !enabled() {
        return;
    }
    let (Some(tracer), Some(parent)) = (TRACER.get(), context_of(traceparent)) else {
        return;
    };
    let mut span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(tracer, &parent);
    if let Some(error) = failed {
        span.set_status(Status::error(error.to_owned()));
    }
    span.end_with_timestamp(end);
}

/// A server span around each public unary or server-streaming call (`pm.v1`), a child of the
/// client's `traceparent`; only when tracing. Internal calls (a coalesced Enqueue carries many
/// traces) and long-lived client streams (an agent's) get none: their tasks carry their own.
#[derive(Clone)]
pub struct ServerSpanLayer {
    component: &'static str,
}

impl ServerSpanLayer {
    pub fn new(component: &'static str) -> Self {
        Self { component }
    }
}

impl<S> tower::Layer<S> for ServerSpanLayer {
    type Service = ServerSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerSpan {
            inner,
            component: self.component,
        }
    }
}

#[derive(Clone)]
pub struct ServerSpan<S> {
    inner: S,
    component: &'static str,
}

/// Whether calls of this path get a span.
fn traced(path: &str) -> bool {
    crate::methods()
        .get(path)
        .is_some_and(|m| m.parent_service().package_name() == "pm.v1" && !m.is_client_streaming())
}

impl<S, B> tower::Service<http::Request<B>> for ServerSpan<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    /// Boxed only when traced: an untraced call passes through as it is.
    type Future = futures::future::Either<
        std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if !enabled() || !traced(path) {
            return futures::future::Either::Right(self.inner.call(request));
        }
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        let span = tracing::info_span!(
            target: "pm::rpc",
            "rpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            pm.component = self.component,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&Headers(request.headers()))
        });
        let _ = span.set_parent(parent);
        let trace_id = span.context().span().span_context().trace_id();
        span.record("trace_id", tracing::field::display(trace_id));
        let call = span.in_scope(|| self.inner.call(request));
        let traced = async move {
            let response = call.await;
            if let Ok(response) = &response {
                status_of(response, &tracing::Span::current());
            }
            response
        };
        futures::future::Either::Left(Box::pin(traced.instrument(span)))
    }
}

/// Records a call's gRPC status on its span when it comes in the headers (every error tonic
/// answers does: trailers-only); an OK status comes in the trailers and is left unset.
fn status_of<R>(response: &http::Response<R>, span: &tracing::Span) {
    let Some(code) = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
    }
}
