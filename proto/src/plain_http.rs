//! A small plaintext HTTP/1.1 server for the side ports that are not gRPC: the metrics
//! endpoint and `pm dev`'s sample files. Bounded: at most [`MAX_CONNECTIONS`] at once (past
//! it a new connection is closed at once), each closed after [`CONNECTION_TIMEOUT`].

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::net::TcpListener;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection is closed after this long, busy or not.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// A response with a body in memory.
pub type Response = http::Response<Full<Bytes>>;

/// Serves `respond(method, path)` on `listener` until `shutdown`.
pub async fn serve<F>(
    listener: TcpListener,
    respond: F,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    F: Fn(&http::Method, &str) -> Response + Clone + Send + Sync + 'static,
{
    let mut shutdown = std::pin::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if connections.len() >= MAX_CONNECTIONS {
                    continue; // dropped: closed at once
                }
                let respond = respond.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            std::future::ready(Ok::<_, std::convert::Infallible>(respond(
                                request.method(),
                                request.uri().path(),
                            )))
                        },
                    );
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
                });
            }
        }
    }
    connections.shutdown().await;
}

/// `status` with a short text body.
pub fn text(status: http::StatusCode, body: &'static str) -> Response {
    let mut response = http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// 200 with `body` of `content_type`.
pub fn ok(content_type: &'static str, body: Bytes) -> Response {
    let mut response = http::Response::new(Full::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}
