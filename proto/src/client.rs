//! One constructor per service: every client of ours gets the same message-size limits and
//! compression, whoever builds it.

use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};

use crate::MAX_MESSAGE_BYTES;
use crate::internal::v1::exec_service_client::ExecServiceClient;
use crate::internal::v1::shard_service_client::ShardServiceClient;
use crate::internal::v1::token_keys_client::TokenKeysClient;
use crate::raw::agent_service_client::AgentServiceClient as RawAgentServiceClient;
use crate::v1::agent_service_client::AgentServiceClient;
use crate::v1::auth_service_client::AuthServiceClient;
use crate::v1::pipeline_service_client::PipelineServiceClient;
use crate::v1::runner_service_client::RunnerServiceClient;
use crate::v1::task_service_client::TaskServiceClient;
use crate::v1::tenant_service_client::TenantServiceClient;

/// A lazily connecting channel to `endpoint` (`http://host:port`), with HTTP/2 keepalive so
/// a dead peer is noticed on idle streams too. With TLS on ([`crate::tls::init`]) it speaks
/// TLS whatever the scheme, verifying the server against the CA and presenting this
/// process's certificate.
pub fn channel(endpoint: &str) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(endpoint.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok(match crate::tls::get() {
        None => endpoint.connect_lazy(),
        Some(tls) => channel_tls(endpoint, tls.client.clone()),
    })
}

/// A lazily connecting channel through TLS with `config`.
pub fn channel_tls(endpoint: Endpoint, config: std::sync::Arc<rustls::ClientConfig>) -> Channel {
    endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: http::Uri| {
        let config = config.clone();
        async move {
            let stream = crate::tls::connect(config, uri).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    }))
}

/// Sends `authorization: Bearer <token>` with every call of a client (none: sends nothing).
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(..)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Bearer {
    /// `None` for no token; an error when the token cannot be a header value.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| "the token has characters a header cannot carry".to_owned())
            })
            .transpose()
            .map(Bearer)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry a token.
pub type AuthedChannel = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

macro_rules! constructor {
    ($(#[$doc:meta])* $fn:ident, $client:ident) => {
        $(#[$doc])*
        pub fn $fn(channel: Channel) -> $client<Channel> {
            $client::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
                .accept_compressed(CompressionEncoding::Gzip)
        }
    };
    ($(#[$doc:meta])* $fn:ident, $authed:ident, $client:ident) => {
        constructor!($(#[$doc])* $fn, $client);

        /// The same, sending `bearer`'s token with every call.
        pub fn $authed(channel: Channel, bearer: Bearer) -> $client<AuthedChannel> {
            $client::with_interceptor(channel, bearer)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
                .accept_compressed(CompressionEncoding::Gzip)
        }
    };
}

constructor!(
    /// `pm.v1.TenantService`.
    tenants, tenants_with, TenantServiceClient
);
constructor!(
    /// `pm.v1.PipelineService`.
    pipelines, pipelines_with, PipelineServiceClient
);
constructor!(
    /// `pm.v1.TaskService`.
    tasks, tasks_with, TaskServiceClient
);
constructor!(
    /// `pm.v1.AuthService`.
    auth, AuthServiceClient
);
constructor!(
    /// `pm.v1.AgentService`.
    agents, agents_with, AgentServiceClient
);
constructor!(
    /// `pm.v1.AgentService` on raw bytes ([`crate::raw`]): the gateway's hop to a shard.
    raw_agents, RawAgentServiceClient
);
constructor!(
    /// `pm.v1.RunnerService`.
    runner, RunnerServiceClient
);
constructor!(
    /// `pm.internal.v1.ShardService`.
    shard, ShardServiceClient
);
constructor!(
    /// `pm.internal.v1.ExecService` (a sidecar on a Unix socket).
    exec, ExecServiceClient
);
constructor!(
    /// `pm.internal.v1.TokenKeys` (tenant-service's public signing keys).
    token_keys, TokenKeysClient
);

/// How a client of the gateway proves who it is.
#[derive(Clone, Default)]
pub enum Credentials {
    /// No token (a gateway with auth off).
    #[default]
    None,
    /// A token obtained elsewhere (`pmctl login`, `pm dev --auth`'s admin.token).
    Token(String),
    /// A client's id and secret, exchanged for a fresh token when one is needed: what a
    /// long-running agent uses, since tokens are short-lived.
    Client { id: String, secret: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Token(_) => f.write_str("Token(..)"),
            Credentials::Client { id, .. } => write!(f, "Client {{ id: {id:?}, .. }}"),
        }
    }
}

impl Credentials {
    /// The bearer token to send now, issued through `channel`'s AuthService if need be.
    pub async fn token(&self, channel: &Channel) -> Result<Option<String>, tonic::Status> {
        Ok(self.issue(channel).await?.map(|(token, _)| token))
    }

    /// The token and, when just issued, how long it lasts.
    async fn issue(
        &self,
        channel: &Channel,
    ) -> Result<Option<(String, Option<std::time::Duration>)>, tonic::Status> {
        match self {
            Credentials::None => Ok(None),
            Credentials::Token(t) => Ok(Some((t.clone(), None))),
            Credentials::Client { id, secret } => {
                let issued = auth(channel.clone())
                    .issue_token(crate::v1::IssueTokenRequest {
                        client_id: id.clone(),
                        client_secret: secret.clone(),
                    })
                    .await?
                    .into_inner();
                let lasts = std::time::Duration::from_secs(issued.expires_in_seconds.into());
                Ok(Some((issued.access_token, Some(lasts))))
            }
        }
    }
}

/// Tokens of one set of credentials, reused until a minute before they expire: an agent
/// that reconnects often (or a thousand agents after a gateway restart) does not make
/// tenant-service check a slow secret hash on every connect.
#[derive(Debug, Default)]
pub struct TokenSource {
    credentials: Credentials,
    cached: std::sync::Mutex<Option<(String, std::time::Instant)>>,
}

impl TokenSource {
    /// How long before its expiry a token is replaced.
    pub const MARGIN: std::time::Duration = std::time::Duration::from_secs(60);

    pub fn new(credentials: Credentials) -> Self {
        Self {
            credentials,
            cached: std::sync::Mutex::default(),
        }
    }

    /// The token to send now: the cached one while it is fresh, else a new one.
    pub async fn token(&self, channel: &Channel) -> Result<Option<String>, tonic::Status> {
        if let Some((token, until)) = &*self.cached.lock().expect("token lock")
            && std::time::Instant::now() < *until
        {
            return Ok(Some(token.clone()));
        }
        let Some((token, lasts)) = self.credentials.issue(channel).await? else {
            return Ok(None);
        };
        if let Some(lasts) = lasts {
            let until = std::time::Instant::now() + lasts.saturating_sub(Self::MARGIN);
            *self.cached.lock().expect("token lock") = Some((token.clone(), until));
        }
        Ok(Some(token))
    }
}
