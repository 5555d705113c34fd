//! Plain HTTP with JSON for the public API, so `curl` works where no stub is at hand: a tower
//! layer in front of a gRPC server that turns `POST /pm.v1.Service/Method` with a JSON body
//! into the same gRPC call, through everything below it (authentication, validation,
//! metrics, limits), and its answer back into JSON.
//!
//! - **Unary methods** speak the Connect protocol's unary JSON form: `Content-Type:
//!   application/json` in, the response message as JSON out (`200`), or an error as
//!   `{"code": "invalid_argument", "message": "...", "details": [...]}` with the HTTP status
//!   Connect gives that code (400, 401, 403, 404, 409, 429, 503, ...).
//! - **Server-streaming methods** (WatchTask, RunnerService.Run) answer
//!   `application/x-ndjson`: one JSON message per line as it comes; a failure after the first
//!   line ends the stream with a line `{"error": {"code": ..., "message": ...}}`.
//!
//! Messages use proto3's JSON mapping (lowerCamelCase names out; either form in, unknown
//! fields refused). Only `pm.v1` methods that are unary or server-streaming are served this
//! way; anything else passes through untouched, gRPC and grpc-web included. Bodies are
//! bounded by [`MAX_MESSAGE_BYTES`] both ways.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use tonic::Code;

use crate::MAX_MESSAGE_BYTES;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Response = http::Response<tonic::body::Body>;

/// How a method answers over HTTP/JSON.
struct Method {
    input: MessageDescriptor,
    output: MessageDescriptor,
    streaming: bool,
}

/// The `pm.v1` method at `path`, if it is served as JSON (not client-streaming).
fn method(path: &str) -> Option<Method> {
    let m = crate::methods().get(path)?;
    (m.parent_service().package_name() == "pm.v1" && !m.is_client_streaming()).then(|| Method {
        input: m.input(),
        output: m.output(),
        streaming: m.is_server_streaming(),
    })
}

/// The layer (see the module doc).
#[derive(Clone, Copy, Default)]
pub struct JsonHttpLayer;

impl<S> tower::Layer<S> for JsonHttpLayer {
    type Service = JsonHttp<S>;

    fn layer(&self, inner: S) -> Self::Service {
        JsonHttp { inner }
    }
}

#[derive(Clone)]
pub struct JsonHttp<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for JsonHttp<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<RB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = S::Error;
    /// gRPC and grpc-web calls pass through without a boxed future of their own: this layer
    /// sits on every call of the gateway.
    type Future = futures::future::Either<
        futures::future::MapOk<S::Future, fn(http::Response<RB>) -> Response>,
        Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send + 'static>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let is_json = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let method = (is_json && request.method() == http::Method::POST)
            .then(|| method(request.uri().path()))
            .flatten();
        let Some(method) = method else {
            use futures::TryFutureExt;
            let call = self.inner.call(request.map(tonic::body::Body::new));
            let to_body: fn(http::Response<RB>) -> Response = |r| r.map(tonic::body::Body::new);
            return futures::future::Either::Left(call.map_ok(to_body));
        };
        // The service was made ready for this call; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        futures::future::Either::Right(Box::pin(async move {
            let (parts, body) = request.into_parts();
            let message = match read_request(body, &method.input).await {
                Ok(message) => message,
                Err(status) => return Ok(error_response(&status)),
            };
            let mut grpc = http::Request::from_parts(
                parts,
                tonic::body::Body::new(http_body_util::Full::new(frame(&message))),
            );
            let headers = grpc.headers_mut();
            headers.remove(http::header::CONTENT_LENGTH);
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
            // gRPC is HTTP/2 to everything below (grpc-web's layer refuses gRPC over HTTP/1.1),
            // whatever carried the JSON.
            *grpc.version_mut() = http::Version::HTTP_2;
            let response = inner.call(grpc).await?;
            Ok(if method.streaming {
                stream_response(response, method.output)
            } else {
                unary_response(response, &method.output).await
            })
        }))
    }
}

/// The request body as the encoded protobuf message.
async fn read_request<B>(body: B, input: &MessageDescriptor) -> Result<Bytes, tonic::Status>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let bytes = http_body_util::Limited::new(body, MAX_MESSAGE_BYTES)
        .collect()
        .await
        .map_err(|e| {
            let e: BoxError = e;
            match e.is::<http_body_util::LengthLimitError>() {
                true => tonic::Status::resource_exhausted(format!(
                    "the request body is more than {MAX_MESSAGE_BYTES} bytes"
                )),
                false => tonic::Status::invalid_argument(format!("reading the body: {e}")),
            }
        })?
        .to_bytes();
    let mut json = serde_json::Deserializer::from_slice(&bytes);
    let message = DynamicMessage::deserialize(input.clone(), &mut json)
        .and_then(|m| json.end().map(|()| m))
        .map_err(|e| {
            tonic::Status::invalid_argument(format!(
                "the body is not a JSON {}: {e}",
                input.full_name()
            ))
        })?;
    Ok(prost::Message::encode_to_vec(&message).into())
}

/// A gRPC length-prefixed message (uncompressed).
fn frame(message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(message.len() as u32);
    framed.put_slice(message);
    framed.freeze()
}

/// Takes one whole message off the front of `buffer`, if it holds one.
fn unframe(buffer: &mut BytesMut) -> Result<Option<Bytes>, tonic::Status> {
    if buffer.len() < 5 {
        return Ok(None);
    }
    if buffer[0] != 0 {
        return Err(tonic::Status::internal(
            "a compressed message cannot be shown as JSON",
        ));
    }
    let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(tonic::Status::resource_exhausted(format!(
            "a response message of {len} bytes, more than {MAX_MESSAGE_BYTES}"
        )));
    }
    if buffer.len() < 5 + len {
        return Ok(None);
    }
    buffer.advance(5);
    Ok(Some(buffer.split_to(len).freeze()))
}

/// An encoded message as JSON text.
fn to_json(bytes: Bytes, output: &MessageDescriptor) -> Result<Vec<u8>, tonic::Status> {
    let message = DynamicMessage::decode(output.clone(), bytes)
        .map_err(|e| tonic::Status::internal(format!("decoding the answer: {e}")))?;
    serde_json::to_vec(&message)
        .map_err(|e| tonic::Status::internal(format!("writing the answer as JSON: {e}")))
}

/// The status a gRPC response ended with: in the headers (trailers-only) or the trailers.
fn status_of(headers: &http::HeaderMap) -> Option<tonic::Status> {
    headers.get("grpc-status")?;
    tonic::Status::from_header_map(headers)
}

async fn unary_response<RB>(response: http::Response<RB>, output: &MessageDescriptor) -> Response
where
    RB: http_body::Body<Data = Bytes>,
    RB::Error: Into<BoxError>,
{
    if let Some(status) = status_of(response.headers()) {
        return error_response(&status);
    }
    // The answer is one message and the trailers: bounded, then read whole.
    let limited = http_body_util::Limited::new(response.into_body(), MAX_MESSAGE_BYTES + 5);
    let collected = match limited.collect().await {
        Ok(collected) => collected,
        Err(e) => return error_response(&tonic::Status::unavailable(e.to_string())),
    };
    let status = collected.trailers().and_then(status_of);
    let mut buffer = BytesMut::from(collected.to_bytes());
    match status {
        Some(status) if status.code() != Code::Ok => return error_response(&status),
        None => return error_response(&tonic::Status::unknown("the call ended without a status")),
        Some(_) => {}
    }
    let json = unframe(&mut buffer).and_then(|message| {
        let message = message.ok_or_else(|| tonic::Status::internal("no answer"))?;
        to_json(message, output)
    });
    match json {
        Ok(json) => json_response(http::StatusCode::OK, "application/json", json.into()),
        Err(status) => error_response(&status),
    }
}

fn stream_response<RB>(response: http::Response<RB>, output: MessageDescriptor) -> Response
where
    RB: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    RB::Error: Into<BoxError>,
{
    if let Some(status) = status_of(response.headers())
        && status.code() != Code::Ok
    {
        return error_response(&status);
    }
    struct Lines<RB> {
        body: RB,
        buffer: BytesMut,
        output: MessageDescriptor,
        done: bool,
    }
    let lines = Lines {
        body: response.into_body(),
        buffer: BytesMut::new(),
        output,
        done: false,
    };
    let stream = futures::stream::unfold(lines, |mut lines| async move {
        loop {
            if lines.done {
                return None;
            }
            match unframe(&mut lines.buffer) {
                Ok(Some(message)) => {
                    let line = to_json(message, &lines.output)
                        .map(|mut json| {
                            json.push(b'\n');
                            Bytes::from(json)
                        })
                        .unwrap_or_else(|status| {
                            lines.done = true;
                            error_line(&status)
                        });
                    return Some((Ok::<_, BoxError>(http_body::Frame::data(line)), lines));
                }
                Ok(None) => {}
                Err(status) => {
                    lines.done = true;
                    return Some((Ok(http_body::Frame::data(error_line(&status))), lines));
                }
            }
            let ended = |lines: &mut Lines<RB>, status: Option<tonic::Status>| {
                lines.done = true;
                status
                    .filter(|s| s.code() != Code::Ok)
                    .map(|s| (Ok(http_body::Frame::data(error_line(&s))), ()))
            };
            match lines.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => lines.buffer.extend_from_slice(&data),
                    Err(frame) => {
                        let status = frame.trailers_ref().and_then(status_of);
                        let last = ended(&mut lines, status);
                        return last.map(|(line, ())| (line, lines));
                    }
                },
                Some(Err(e)) => {
                    let status = tonic::Status::unavailable(e.into().to_string());
                    let last = ended(&mut lines, Some(status));
                    return last.map(|(line, ())| (line, lines));
                }
                None => return None,
            }
        }
    });
    let mut response = http::Response::new(tonic::body::Body::new(
        http_body_util::StreamBody::new(stream),
    ));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// The Connect error body of `status`.
fn error_json(status: &tonic::Status) -> serde_json::Value {
    let mut error = serde_json::json!({
        "code": code_name(status.code()),
        "message": status.message(),
    });
    // Details (the field a refusal names, a retry hint) as Connect carries them.
    if let Ok(details) = <tonic_types::pb::Status as prost::Message>::decode(status.details())
        && !details.details.is_empty()
    {
        use base64::Engine;
        let encode = |b: &[u8]| base64::engine::general_purpose::STANDARD_NO_PAD.encode(b);
        error["details"] = details
            .details
            .iter()
            .map(|any| {
                let kind = any.type_url.rsplit('/').next().unwrap_or_default();
                serde_json::json!({ "type": kind, "value": encode(&any.value) })
            })
            .collect();
    }
    error
}

fn error_line(status: &tonic::Status) -> Bytes {
    let mut line =
        serde_json::to_vec(&serde_json::json!({ "error": error_json(status) })).unwrap_or_default();
    line.push(b'\n');
    line.into()
}

fn error_response(status: &tonic::Status) -> Response {
    let body = serde_json::to_vec(&error_json(status)).unwrap_or_default();
    json_response(http_status(status.code()), "application/json", body.into())
}

fn json_response(status: http::StatusCode, content_type: &'static str, body: Bytes) -> Response {
    let mut response = http::Response::new(tonic::body::Body::new(http_body_util::Full::new(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// Connect's name of a code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status Connect gives a code.
pub fn http_status(code: Code) -> http::StatusCode {
    use http::StatusCode as H;
    match code {
        Code::Ok => H::OK,
        Code::Cancelled => H::from_u16(499).unwrap_or(H::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => H::BAD_REQUEST,
        Code::DeadlineExceeded => H::GATEWAY_TIMEOUT,
        Code::NotFound => H::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => H::CONFLICT,
        Code::PermissionDenied => H::FORBIDDEN,
        Code::ResourceExhausted => H::TOO_MANY_REQUESTS,
        Code::Unimplemented => H::NOT_IMPLEMENTED,
        Code::Unavailable => H::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => H::UNAUTHORIZED,
        Code::Unknown | Code::Internal | Code::DataLoss => H::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_methods_are_served_but_the_agent_stream_is_not() {
        let streaming = |path| method(path).map(|m| m.streaming);
        assert_eq!(streaming("/pm.v1.TaskService/SubmitTask"), Some(false));
        assert_eq!(streaming("/pm.v1.TaskService/WatchTask"), Some(true));
        assert_eq!(streaming("/pm.v1.RunnerService/Run"), Some(true));
        assert_eq!(streaming("/pm.v1.AgentService/Connect"), None);
        assert!(crate::methods().contains_key("/pm.v1.AgentService/Connect"));
        // The table holds internal and health methods too; none of them is served.
        let others: Vec<&String> = crate::methods()
            .keys()
            .filter(|k| !k.starts_with("/pm.v1."))
            .collect();
        assert!(
            others
                .iter()
                .any(|k| k.starts_with("/pm.internal.v1.ShardService/"))
        );
        assert!(others.iter().any(|k| k.starts_with("/grpc.health.v1.")));
        assert!(others.iter().all(|k| method(k).is_none()));
    }

    #[test]
    fn frames_split_across_reads_are_put_together() {
        let framed = frame(b"hello");
        let mut buffer = BytesMut::from(&framed[..3]);
        assert_eq!(unframe(&mut buffer).unwrap(), None);
        buffer.extend_from_slice(&framed[3..]);
        buffer.extend_from_slice(&frame(b"")[..]);
        assert_eq!(
            unframe(&mut buffer).unwrap().as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(unframe(&mut buffer).unwrap().as_deref(), Some(&b""[..]));
        assert!(buffer.is_empty());
    }
}
