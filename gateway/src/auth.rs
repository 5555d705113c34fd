//! Authentication at the edge: who is calling. Every request but IssueToken, health and
//! reflection passes [`Authenticator::intercept`], which verifies the bearer token locally
//! (no call per request) and leaves a [`Caller`] in the request's extensions for the
//! authorization table ([`crate::authz`]) to read.
//!
//! The public keys come from tenant-service: fetched at start, every
//! `PUBLIC_KEYS_REFRESH`, and at once when a token names a key not known yet (that token
//! gets UNAVAILABLE, to retry; tenant-service publishes a key before it signs with it, so
//! this only happens right after start).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use pm_auth::{Claims, Verifier, VerifyError};
use pm_proto::internal::v1::PublicKeysRequest;

use crate::routing::Routes;

/// How often the public keys are fetched (tenant-service publishes a key 90 s before it
/// signs with it).
pub const KEYS_REFRESH: Duration = Duration::from_secs(30);
/// Fewest time between two fetches forced by unknown key ids.
const FORCED_REFRESH_GAP: Duration = Duration::from_secs(1);

/// Who made a request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Authentication is off (`pm dev` without `--auth`): every call is allowed.
    Open,
    /// A verified token's holder.
    Token(Arc<Claims>),
}

impl Caller {
    /// The caller the interceptor left on `request`. A request it never saw is refused, so a
    /// service added without the interceptor fails closed.
    pub fn of<T>(request: &Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::internal("request was not authenticated (a gateway bug)"))
    }

    /// The dispatch priority of the caller's tasks, from its client record.
    pub fn priority(&self) -> u32 {
        match self {
            Caller::Open => pm_spec::limits::DEFAULT_PRIORITY,
            Caller::Token(c) => c.priority,
        }
    }

    /// The fair-share flow of the caller's tasks: its client, or one flow when auth is off.
    pub fn client(&self) -> &str {
        match self {
            Caller::Open => "",
            Caller::Token(c) => &c.sub,
        }
    }
}

/// Verifies bearer tokens, or lets everything through when auth is off.
#[derive(Clone)]
pub struct Authenticator {
    inner: Option<Arc<Keys>>,
}

struct Keys {
    verifier: Verifier,
    refresh: Notify,
}

impl Authenticator {
    /// Auth off: every caller is [`Caller::Open`].
    pub fn open() -> Self {
        Self { inner: None }
    }

    /// Auth on, with keys from tenant-service, refreshed until `cancel` fires.
    pub async fn fetching(routes: &Routes, cancel: CancellationToken) -> Self {
        let keys = Arc::new(Keys {
            verifier: Verifier::default(),
            refresh: Notify::new(),
        });
        let client = routes.token_keys();
        let fetch = {
            let keys = keys.clone();
            move || {
                let (keys, mut client) = (keys.clone(), client.clone());
                async move {
                    match client.public_keys(PublicKeysRequest {}).await {
                        Ok(r) => keys.verifier.set_keys(
                            r.into_inner()
                                .keys
                                .into_iter()
                                .map(|k| (k.kid, k.public_key)),
                        ),
                        Err(s) => {
                            tracing::warn!(status = %s, "cannot fetch the token keys; retrying")
                        }
                    }
                }
            }
        };
        // A gateway starting with tenant-service may find no key yet: the loop fetches again.
        fetch().await;
        let owner = keys.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(KEYS_REFRESH) => {}
                    _ = owner.refresh.notified() => {}
                }
                fetch().await;
                // Unknown key ids in a flood of forged tokens fetch at most this often.
                tokio::time::sleep(FORCED_REFRESH_GAP).await;
            }
        });
        Self { inner: Some(keys) }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The caller presenting `metadata`'s bearer token.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let Some(keys) = &self.inner else {
            return Ok(Caller::Open);
        };
        let header = metadata.get("authorization").ok_or_else(|| {
            Status::unauthenticated(
                "no token: send `authorization: Bearer <token>` (AuthService.IssueToken gives one)",
            )
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .ok_or_else(|| {
                Status::unauthenticated("the authorization metadata is not `Bearer <token>`")
            })?;
        match keys.verifier.verify(token.trim()) {
            Ok(claims) => Ok(Caller::Token(claims)),
            Err(VerifyError::UnknownKey(kid)) => {
                keys.refresh.notify_one();
                Err(pm_proto::status::unavailable(
                    format!(
                        "token signed by key {kid:?}, which this gateway does not know yet; retry"
                    ),
                    Duration::from_secs(1),
                ))
            }
            Err(e) => Err(Status::unauthenticated(e.to_string())),
        }
    }

    /// The interceptor every authenticated service is wrapped in.
    #[allow(clippy::result_large_err)] // tonic's interceptor signature
    pub fn intercept(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.authenticate(request.metadata())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}
