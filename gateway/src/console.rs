//! The web console, served on the gateway's public port: `GET /` goes to `/ui/`, every
//! `/ui/...` page gets the same `index.html` (the page reads its resource name from the
//! path), and `/ui/assets/` has the script and style. The files are `web/dist/`, built from
//! `web/` (`npm run build`) and committed, embedded here at compile time: building the
//! workspace needs no Node. The console talks to this same port through grpc-web, so it has
//! no access a user's own client would not have.
//!
//! Every other request passes through untouched; only GET and HEAD of these paths are
//! answered here.

use std::task::{Context, Poll};

use http::{HeaderValue, Method, StatusCode, header};

const INDEX: &[u8] = include_bytes!("../../web/dist/index.html");
const APP_JS: &[u8] = include_bytes!("../../web/dist/app.js");
const APP_JS_GZ: &[u8] = include_bytes!("../../web/dist/app.js.gz");
const APP_CSS: &[u8] = include_bytes!("../../web/dist/app.css");

/// Scripts, styles and calls from this origin only; no framing (clickjacking).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

type Response = http::Response<tonic::body::Body>;

/// One embedded file: its bytes, a gzipped form if any, its type.
struct Asset {
    bytes: &'static [u8],
    gzipped: Option<&'static [u8]>,
    content_type: &'static str,
}

/// What a GET of `path` answers, if it is the console's.
fn route(path: &str) -> Option<Result<Asset, &'static str>> {
    let asset = |bytes, gzipped, content_type| {
        Some(Ok(Asset {
            bytes,
            gzipped,
            content_type,
        }))
    };
    match path {
        "/" => Some(Err("/ui/")),
        "/ui/assets/app.js" => asset(APP_JS, Some(APP_JS_GZ), "text/javascript; charset=utf-8"),
        "/ui/assets/app.css" => asset(APP_CSS, None, "text/css; charset=utf-8"),
        p if p.starts_with("/ui/assets/") => None,
        "/ui" => Some(Err("/ui/")),
        p if p.starts_with("/ui/") => asset(INDEX, None, "text/html; charset=utf-8"),
        _ => None,
    }
}

fn answer<B>(request: &http::Request<B>, found: Result<Asset, &'static str>) -> Response {
    let mut response = http::Response::new(tonic::body::Body::empty());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Not hashed by name: revalidated on every load, so a new gateway's console is used at once.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let asset = match found {
        Ok(asset) => asset,
        Err(to) => {
            *response.status_mut() = StatusCode::FOUND;
            response
                .headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static(to));
            return response;
        }
    };
    let gzip_ok = request
        .headers()
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let bytes = match asset.gzipped {
        Some(gz) if gzip_ok => {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            gz
        }
        _ => asset.bytes,
    };
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    if request.method() == Method::GET {
        *response.body_mut() =
            tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from_static(bytes)));
    }
    response
}

/// Serves the console in front of the gateway's services.
#[derive(Clone, Copy, Default)]
pub struct ConsoleLayer;

impl<S> tower::Layer<S> for ConsoleLayer {
    type Service = Console<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Console { inner }
    }
}

#[derive(Clone)]
pub struct Console<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Console<S>
where
    S: tower::Service<http::Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<std::future::Ready<Result<Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let page = matches!(*request.method(), Method::GET | Method::HEAD)
            .then(|| route(request.uri().path()))
            .flatten();
        match page {
            Some(found) => {
                futures::future::Either::Left(std::future::ready(Ok(answer(&request, found))))
            }
            None => futures::future::Either::Right(self.inner.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_assets_and_everything_else() {
        assert!(matches!(route("/"), Some(Err("/ui/"))));
        assert!(matches!(route("/ui"), Some(Err("/ui/"))));
        for page in ["/ui/", "/ui/tenants/t/applications/a/pipelines/p/tasks/x"] {
            let Some(Ok(asset)) = route(page) else {
                panic!("{page}")
            };
            assert_eq!(asset.bytes, INDEX);
        }
        assert!(matches!(route("/ui/assets/app.js"), Some(Ok(a)) if a.gzipped.is_some()));
        assert!(route("/ui/assets/missing.js").is_none());
        assert!(route("/pm.v1.TaskService/SubmitTask").is_none());
        assert!(route("/metrics").is_none());
    }
}
