//! The limit on calls a server handles at once, over all its connections: past it a call is
//! answered RESOURCE_EXHAUSTED at once, with a retry hint, instead of queueing behind the
//! others (load shedding). A call holds its place until its handler has answered (for a
//! stream, until the stream starts), so long-lived streams do not hold places. Per
//! connection, HTTP/2's MAX_CONCURRENT_STREAMS bounds a single client.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;

/// Calls handled at once by default (`--max-in-flight`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;
/// The retry hint of a call refused for the limit.
const RETRY_AFTER: Duration = Duration::from_millis(100);

static MAX_IN_FLIGHT: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_IN_FLIGHT);

/// Sets the limit of the servers this process starts from now on (at least 1).
pub fn set_max_in_flight(max: usize) {
    MAX_IN_FLIGHT.store(max.max(1), Ordering::Relaxed);
}

/// A layer with a fresh limit of the configured size: one per server.
#[derive(Clone)]
pub struct InFlightLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl InFlightLimit {
    /// The process's configured limit ([`set_max_in_flight`]).
    pub fn configured() -> Self {
        Self::new(MAX_IN_FLIGHT.load(Ordering::Relaxed))
    }

    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl<S> tower::Layer<S> for InFlightLimit {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlight {
            inner,
            limit: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct InFlight<S> {
    inner: S,
    limit: InFlightLimit,
}

impl<S, B> tower::Service<http::Request<B>> for InFlight<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Ok(permit) = self.limit.permits.clone().try_acquire_owned() else {
            let status = crate::status::resource_exhausted(
                format!(
                    "the server is handling {} calls, its limit (--max-in-flight); retry",
                    self.limit.max
                ),
                RETRY_AFTER,
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(permit);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Service, ServiceExt};

    /// A handler that answers once told to, so calls stay in flight as long as the test
    /// wants: the thing under test is the layer in front of it.
    #[tokio::test]
    async fn calls_past_the_limit_are_refused_at_once_and_a_finished_call_frees_its_place() {
        let release = Arc::new(tokio::sync::Notify::new());
        let handler = {
            let release = release.clone();
            tower::service_fn(move |_: http::Request<()>| {
                let release = release.clone();
                async move {
                    release.notified().await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        tonic::body::Body::empty(),
                    ))
                }
            })
        };
        let mut service = tower::Layer::layer(&InFlightLimit::new(2), handler);
        let call = |s: &mut InFlight<_>| s.call(http::Request::new(()));
        let first = tokio::spawn(call(service.ready().await.unwrap()));
        let second = tokio::spawn(call(service.ready().await.unwrap()));
        tokio::task::yield_now().await;
        // The third finds both places taken: answered now, as RESOURCE_EXHAUSTED.
        let refused = call(service.ready().await.unwrap()).await.unwrap();
        let status = tonic::Status::from_header_map(refused.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("--max-in-flight"), "{status:?}");

        // Answering one frees its place.
        release.notify_one();
        tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .expect("the first call answers")
            .unwrap()
            .unwrap();
        let third = tokio::spawn(call(service.ready().await.unwrap()));
        tokio::task::yield_now().await;
        release.notify_one();
        release.notify_one();
        for call in [second, third] {
            let response = tokio::time::timeout(Duration::from_secs(10), call)
                .await
                .expect("answered")
                .unwrap()
                .unwrap();
            assert!(tonic::Status::from_header_map(response.headers()).is_none());
        }
    }
}
