//! The process's Prometheus metrics: the recorder, the `/metrics` endpoint, the gauges read
//! at scrape time, and the gRPC server layer every server mounts.
//!
//! Metrics go through the `metrics` facade to one recorder per process
//! (`metrics-exporter-prometheus`), installed by [`install`] when the process serves them
//! (`--metrics-listen`). Without it every handle is a no-op, so nothing accumulates. Each
//! component names its own metrics in a module of its crate and labels them with its
//! `component`, so `pm dev` serves every component on one endpoint. The names are listed in
//! docs/observability.md.
//!
//! State that a component already counts under its own lock (a shard's queue depth) is read
//! when Prometheus scrapes, by a [`on_scrape`] callback, never on the hot path.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::plain_http;

/// Bucket bounds (seconds) of every latency histogram: 100 µs to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];
/// Bucket bounds of histograms of counts (writes per journal batch).
pub const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];
/// Histograms whose name ends so count things, not seconds.
pub const COUNT_SUFFIX: &str = "_writes";
/// How often histogram samples are folded into their buckets between scrapes: the recorder
/// keeps raw samples until then, so this bounds its memory.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder; every metric from now on is kept. Idempotent.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix(COUNT_SUFFIX.into()), COUNT_BUCKETS)
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics shows nothing");
            }
            describe_grpc();
            handle
        })
        .clone()
}

/// Whether [`install`] ran: components skip work whose only use is a metric.
pub fn enabled() -> bool {
    HANDLE.get().is_some()
}

type Collector = Box<dyn Fn() -> bool + Send + Sync>;

static COLLECTORS: Mutex<Vec<Collector>> = Mutex::new(Vec::new());

/// Runs `collect` before each scrape, to set gauges from state its owner keeps anyway. It
/// returns false once its owner is gone, and is then dropped (hold the owner by `Weak`).
pub fn on_scrape(collect: impl Fn() -> bool + Send + Sync + 'static) {
    if enabled() {
        COLLECTORS
            .lock()
            .expect("collectors lock")
            .push(Box::new(collect));
    }
}

/// The text exposition of every metric, after the scrape-time collectors ran.
pub fn render() -> String {
    let Some(handle) = HANDLE.get() else {
        return String::new();
    };
    COLLECTORS
        .lock()
        .expect("collectors lock")
        .retain(|collect| collect());
    handle.render()
}

static LISTENER: Mutex<Option<std::net::TcpListener>> = Mutex::new(None);

/// Gives this process a metrics port (`--metrics-listen`) and installs the recorder. Call
/// at start, before the components make their metrics.
pub fn set_listener(listener: std::net::TcpListener) {
    install();
    *LISTENER.lock().expect("metrics listener lock") = Some(listener);
}

/// Serves the metrics port, if this process has one, until `shutdown`; the first server of
/// the process to call it takes the port (`pm dev` serves every component on it).
pub async fn serve_port(shutdown: impl Future<Output = ()> + Send + 'static) {
    let Some(listener) = LISTENER.lock().expect("metrics listener lock").take() else {
        return;
    };
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener));
    match listener {
        Ok(listener) => serve(listener, shutdown).await,
        Err(e) => tracing::error!(error = %e, "the metrics port stopped"),
    }
}

/// Serves `GET /metrics` (Prometheus text format 0.0.4) on `listener` until `shutdown`,
/// and folds histogram samples every few seconds meanwhile. HTTP/1.1, plaintext: a scrape
/// port inside the cluster, like every exporter's ([`crate::plain_http`]'s bounds).
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) {
    let handle = install();
    let upkeep = async {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            handle.run_upkeep();
        }
    };
    let respond = |method: &http::Method, path: &str| match (method, path) {
        (&http::Method::GET, "/metrics") => plain_http::ok(
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(render()),
        ),
        _ => plain_http::text(
            http::StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        ),
    };
    tokio::select! {
        () = plain_http::serve(listener, respond, shutdown) => {}
        () = upkeep => {}
    }
}

/// The kind of a known method, as `grpc_type` names it.
fn method_type(path: &str) -> Option<&'static str> {
    let method = crate::methods().get(path)?;
    Some(
        match (method.is_client_streaming(), method.is_server_streaming()) {
            (false, false) => "unary",
            (false, true) => "server_stream",
            (true, false) => "client_stream",
            (true, true) => "bidi_stream",
        },
    )
}

fn describe_grpc() {
    metrics::describe_counter!(
        "grpc_server_started_total",
        "RPCs started on the server, by component, type, service and method."
    );
    metrics::describe_counter!(
        "grpc_server_handled_total",
        "RPCs completed on the server, by their status code (Canceled: the client went away)."
    );
    metrics::describe_histogram!(
        "grpc_server_handling_seconds",
        metrics::Unit::Seconds,
        "Time from an RPC's start to its status (for a stream, its end)."
    );
}

/// The name `grpc_code` gives a status code (as gRPC's own Go middleware names them).
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Canceled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}

/// The handles of one method: made on its first call, then shared.
struct MethodMetrics {
    started: metrics::Counter,
    handled: [OnceLock<metrics::Counter>; 17],
    seconds: metrics::Histogram,
    labels: [(&'static str, String); 4],
}

impl MethodMetrics {
    fn new(component: &'static str, path: &str) -> Self {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", "unknown"));
        // Unknown paths (a scanner's) share one series, so they cannot grow the registry.
        let known = method_type(path);
        let (service, method) = match known {
            Some(_) => (service.to_owned(), method.to_owned()),
            None => ("unknown".to_owned(), "unknown".to_owned()),
        };
        let labels = [
            ("component", component.to_owned()),
            ("grpc_type", known.unwrap_or("unary").to_owned()),
            ("grpc_service", service),
            ("grpc_method", method),
        ];
        Self {
            started: metrics::counter!("grpc_server_started_total", &labels),
            handled: Default::default(),
            seconds: metrics::histogram!("grpc_server_handling_seconds", &labels),
            labels,
        }
    }

    fn finish(&self, code: i32, started: Instant) {
        self.seconds.record(started.elapsed().as_secs_f64());
        let code = code.clamp(0, 16);
        self.handled[code as usize]
            .get_or_init(|| {
                let mut labels: Vec<(&'static str, String)> = self.labels.to_vec();
                labels.push(("grpc_code", code_name(code).to_owned()));
                metrics::counter!("grpc_server_handled_total", &labels)
            })
            .increment(1);
    }
}

/// The gRPC server metrics every server mounts (`grpc_server_started_total`,
/// `grpc_server_handled_total`, `grpc_server_handling_seconds`, named and labelled as
/// go-grpc-prometheus names them, so Grafana's gRPC dashboards work). A call is handled
/// when its status is known: at once for an error in the headers, at the trailers for a
/// unary answer or a stream that ends; a stream the client drops counts as Canceled.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    component: &'static str,
    methods: Arc<Mutex<HashMap<String, Arc<MethodMetrics>>>>,
}

impl GrpcMetricsLayer {
    pub fn new(component: &'static str) -> Self {
        Self {
            component,
            methods: Arc::default(),
        }
    }

    fn method(&self, path: &str) -> Option<Arc<MethodMetrics>> {
        if !enabled() {
            return None;
        }
        let known = crate::methods().contains_key(path);
        let key = if known { path } else { "" };
        let mut methods = self.methods.lock().expect("methods lock");
        if let Some(m) = methods.get(key) {
            return Some(m.clone());
        }
        let m = Arc::new(MethodMetrics::new(self.component, path));
        methods.insert(key.to_owned(), m.clone());
        Some(m)
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    layer: GrpcMetricsLayer,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<MeteredBody>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = self.layer.method(request.uri().path());
        let started = Instant::now();
        if let Some(m) = &method {
            m.started.increment(1);
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let Some(method) = method else {
                return Ok(response.map(|body| MeteredBody { body, call: None }));
            };
            // A status in the headers (an error, trailers-only) ends the call now.
            let status = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok());
            let call = match status {
                Some(code) => {
                    method.finish(code, started);
                    None
                }
                None => Some(Call { method, started }),
            };
            Ok(response.map(|body| MeteredBody { body, call }))
        })
    }
}

/// A call whose status is still to come (in the trailers).
struct Call {
    method: Arc<MethodMetrics>,
    started: Instant,
}

/// A response body that records its call's status when the trailers pass.
pub struct MeteredBody {
    body: tonic::body::Body,
    call: Option<Call>,
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // Dropped before its trailers: the client went away (or the server stopped).
        if let Some(call) = self.call.take() {
            call.method.finish(1, call.started);
        }
    }
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = self.call.take()
                {
                    let code = trailers
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .unwrap_or(2);
                    call.method.finish(code, call.started);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                if let Some(call) = self.call.take() {
                    call.method.finish(2, call.started);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
