//! Token issuance: signing keys in the metadata store, IssueToken (client credentials for a
//! signed token), the public keys gateways verify with, and the first platform admin.
//!
//! Keys rotate every [`KEY_ROTATION`]. A new key is published [`KEY_PUBLISH_AHEAD`] before it
//! signs anything, so every gateway (which fetches keys every
//! [`PUBLIC_KEYS_REFRESH`]) knows it before its first token arrives; an old key is handed
//! out until the last token it signed has expired, then deleted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prost::Message;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use pm_auth::{Claims, KeyPair, Role, Signer, TOKEN_LIFETIME_SECS};
use pm_cluster::{Expect, MetadataStore};
use pm_proto::internal::v1::token_keys_server::TokenKeys;
use pm_proto::internal::v1::{
    PublicKey, PublicKeysRequest, PublicKeysResponse, StoredClient, StoredSigningKey,
};
use pm_proto::names::ClientName;
use pm_proto::unix_ms;
use pm_proto::v1::auth_service_server::AuthService;
use pm_proto::v1::{Client, IssueTokenRequest, IssueTokenResponse};

use crate::error::Error;
use crate::keys;

/// How often signing keys change.
pub const KEY_ROTATION: Duration = Duration::from_secs(24 * 3600);
/// How long a new key is public before it signs.
pub const KEY_PUBLISH_AHEAD: Duration = Duration::from_secs(90);
/// How often gateways fetch the public keys (and at once on an unknown key id).
pub const PUBLIC_KEYS_REFRESH: Duration = Duration::from_secs(30);
/// Secret checks at once: each is ~30 ms of one core (argon2id), so more would starve the
/// other calls on a small machine.
pub const HASHES_AT_ONCE: usize = 2;
/// IssueToken calls waiting for a secret check; past it RESOURCE_EXHAUSTED.
pub const MAX_WAITING_ISSUES: usize = 64;
/// Longest client secret accepted, in bytes (ours are 64).
const MAX_SECRET_BYTES: usize = 256;

type Result<T, E = Error> = std::result::Result<T, E>;

/// Issues tokens for the clients in `store`.
#[derive(Clone)]
pub struct Issuer {
    store: Arc<dyn MetadataStore>,
    hashing: Arc<Semaphore>,
    /// IssueToken calls between their secret's lookup and the end of its check.
    waiting: Arc<AtomicUsize>,
}

/// One call counted in [`Issuer::waiting`] while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Result<Self> {
        if count.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING_ISSUES {
            count.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::Exhausted(format!(
                "more than {MAX_WAITING_ISSUES} token requests are waiting; retry"
            )));
        }
        Ok(Waiting(count))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn decode<M: Message + Default>(bytes: &[u8], key: &str) -> Result<M> {
    M::decode(bytes).map_err(|e| {
        Error::Store(pm_cluster::Error::Unavailable(format!(
            "undecodable value at {key}: {e}"
        )))
    })
}

fn to_pair(k: &StoredSigningKey) -> KeyPair {
    KeyPair {
        kid: k.kid.clone(),
        private_pkcs8: k.private_pkcs8.clone(),
        public_key: k.public_key.clone(),
    }
}

/// The claims of a client's tokens, from its record.
pub fn claims_of(client: &Client, tenant: &str) -> Claims {
    let now = pm_auth::unix_secs();
    Claims {
        iss: String::new(),
        sub: client.name.clone(),
        tenant: tenant.to_owned(),
        roles: client
            .roles
            .iter()
            .filter_map(|r| Role::from_wire(*r))
            .collect(),
        priority: client.priority.unwrap_or(pm_spec::limits::DEFAULT_PRIORITY),
        pipelines: client.pipelines.clone(),
        iat: now,
        exp: now + TOKEN_LIFETIME_SECS,
    }
}

impl Issuer {
    pub fn new(store: Arc<dyn MetadataStore>) -> Self {
        Self {
            store,
            hashing: Arc::new(Semaphore::new(HASHES_AT_ONCE)),
            waiting: Arc::default(),
        }
    }

    /// Every stored key, oldest first.
    async fn keys(&self) -> Result<Vec<StoredSigningKey>> {
        let kvs = self.store.list(keys::SIGNING_KEYS, "", usize::MAX).await?;
        kvs.iter().map(|kv| decode(&kv.value, &kv.key)).collect()
    }

    async fn add_key(&self, active_from_ms: i64) -> Result<StoredSigningKey> {
        let pair = KeyPair::generate();
        let stored = StoredSigningKey {
            kid: pair.kid.clone(),
            private_pkcs8: pair.private_pkcs8,
            public_key: pair.public_key,
            create_time_ms: unix_ms(),
            active_from_ms,
        };
        let key = keys::signing_key(stored.create_time_ms, &stored.kid);
        self.store
            .put(&key, stored.encode_to_vec(), Expect::Absent)
            .await?;
        tracing::info!(kid = %stored.kid, active_from_ms, "signing key added");
        Ok(stored)
    }

    /// Makes a key when there is none (active at once: no token exists yet), adds the next
    /// one when the newest is due for rotation, and deletes keys whose tokens have all
    /// expired. Replicas doing it at once may add two keys; both are valid.
    pub async fn maintain_keys(&self) -> Result<()> {
        let now = unix_ms();
        let stored = self.keys().await?;
        let Some(newest) = stored.last() else {
            self.add_key(now).await?;
            return Ok(());
        };
        if now - newest.active_from_ms >= KEY_ROTATION.as_millis() as i64 {
            self.add_key(now + KEY_PUBLISH_AHEAD.as_millis() as i64)
                .await?;
        }
        // A key stops signing when its successor starts; its tokens live one lifetime more.
        let lifetime = (TOKEN_LIFETIME_SECS * 1000) as i64;
        for pair in stored.windows(2) {
            let (old, next) = (&pair[0], &pair[1]);
            if next.active_from_ms + lifetime + 60_000 < now {
                let key = keys::signing_key(old.create_time_ms, &old.kid);
                self.store.delete(&key, Expect::Any).await?;
                tracing::info!(kid = %old.kid, "signing key retired");
            }
        }
        Ok(())
    }

    /// Keeps the keys maintained until `cancel` fires.
    pub async fn run_key_rotation(self, cancel: CancellationToken) {
        loop {
            if let Err(e) = self.maintain_keys().await {
                tracing::warn!(error = %e, "signing keys not maintained; retrying");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(PUBLIC_KEYS_REFRESH) => {}
            }
        }
    }

    /// The signer of new tokens: the newest active key.
    pub async fn signer(&self) -> Result<Signer> {
        let mut stored = self.keys().await?;
        if stored.is_empty() {
            self.maintain_keys().await?;
            stored = self.keys().await?;
        }
        // After the read: a first key made meanwhile (active from its making) counts.
        let now = unix_ms();
        stored
            .iter()
            .rev()
            .find(|k| k.active_from_ms <= now)
            .map(|k| Signer::new(&to_pair(k)))
            .ok_or_else(|| {
                Error::Store(pm_cluster::Error::Unavailable(
                    "no signing key is active yet".into(),
                ))
            })
    }

    /// A token for `client` (of `tenant`), signed now.
    pub async fn token_for(&self, client: &Client, tenant: &str) -> Result<String> {
        Ok(self.signer().await?.sign(&claims_of(client, tenant)))
    }

    /// The client with `client_id` if `secret` is its secret.
    async fn authenticate(&self, client_id: &str, secret: &str) -> Result<Option<StoredClient>> {
        let refused = || Ok(None);
        if client_id.len() > 64 || secret.len() > MAX_SECRET_BYTES {
            return refused();
        }
        let Some(kv) = self.store.get(&keys::client_id(client_id)).await? else {
            return refused();
        };
        // The index holds the client's name (as `bytes` in a prost wrapper).
        let name: Vec<u8> = decode(&kv.value, &kv.key)?;
        let Ok(name) = ClientName::parse(&String::from_utf8_lossy(&name)) else {
            return refused();
        };
        let Some(kv) = self.store.get(&keys::client(&name)).await? else {
            return refused();
        };
        let stored: StoredClient = decode(&kv.value, &kv.key)?;
        let _waiting = Waiting::enter(&self.waiting)?;
        let _permit = self.hashing.acquire().await;
        let (secret, hash) = (secret.to_owned(), stored.secret_hash.clone());
        let matches = tokio::task::spawn_blocking(move || pm_auth::secret::verify(&secret, &hash))
            .await
            .unwrap_or(false);
        Ok(matches.then_some(stored))
    }

    async fn issue(&self, req: IssueTokenRequest) -> Result<IssueTokenResponse> {
        if req.client_id.is_empty() {
            return Err(Error::invalid("client_id", "give the client's id"));
        }
        if req.client_secret.is_empty() {
            return Err(Error::invalid("client_secret", "give the client's secret"));
        }
        let Some(stored) = self
            .authenticate(&req.client_id, &req.client_secret)
            .await?
        else {
            return Err(Error::Unauthenticated(
                "unknown client_id or wrong client_secret".into(),
            ));
        };
        let client = stored.client.unwrap_or_default();
        let tenant = ClientName::parse(&client.name)
            .map(|n| n.tenant)
            .unwrap_or_default();
        let access_token = self.token_for(&client, &tenant).await?;
        tracing::info!(client = %client.name, "token issued");
        Ok(IssueTokenResponse {
            access_token,
            expires_in_seconds: TOKEN_LIFETIME_SECS as u32,
        })
    }
}

#[tonic::async_trait]
impl AuthService for Issuer {
    async fn issue_token(
        &self,
        request: Request<IssueTokenRequest>,
    ) -> Result<Response<IssueTokenResponse>, Status> {
        Ok(Response::new(self.issue(request.into_inner()).await?))
    }
}

#[tonic::async_trait]
impl TokenKeys for Issuer {
    async fn public_keys(
        &self,
        _request: Request<PublicKeysRequest>,
    ) -> Result<Response<PublicKeysResponse>, Status> {
        let keys = self
            .keys()
            .await?
            .into_iter()
            .map(|k| PublicKey {
                kid: k.kid,
                public_key: k.public_key,
            })
            .collect();
        Ok(Response::new(PublicKeysResponse { keys }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> (Issuer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = pm_cluster::EmbeddedStore::open(dir.path().join("meta.bin")).unwrap();
        (Issuer::new(Arc::new(store)), dir)
    }

    /// Moves a stored key's times back by `ms` (as if it had been made that long ago).
    async fn age(issuer: &Issuer, kid: &str, ms: i64) {
        let key = issuer
            .keys()
            .await
            .unwrap()
            .into_iter()
            .find(|k| k.kid == kid)
            .unwrap();
        let old_key = keys::signing_key(key.create_time_ms, &key.kid);
        issuer.store.delete(&old_key, Expect::Any).await.unwrap();
        let aged = StoredSigningKey {
            create_time_ms: key.create_time_ms - ms,
            active_from_ms: key.active_from_ms - ms,
            ..key
        };
        let new_key = keys::signing_key(aged.create_time_ms, &aged.kid);
        issuer
            .store
            .put(&new_key, aged.encode_to_vec(), Expect::Absent)
            .await
            .unwrap();
    }

    fn kid_of(token: &str) -> String {
        jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
    }

    #[tokio::test]
    async fn keys_rotate_published_ahead_and_retire_after_their_tokens() {
        let (issuer, _dir) = issuer();
        let client = Client {
            name: "tenants/t/clients/c".into(),
            roles: vec![pm_proto::v1::Role::Viewer as i32],
            ..Client::default()
        };
        // The first key signs at once.
        let first = issuer.token_for(&client, "t").await.unwrap();
        let first_kid = kid_of(&first);
        issuer.maintain_keys().await.unwrap();
        assert_eq!(issuer.keys().await.unwrap().len(), 1, "not due yet");

        // A day later a new key is made, public at once, signing only after KEY_PUBLISH_AHEAD.
        age(&issuer, &first_kid, KEY_ROTATION.as_millis() as i64).await;
        issuer.maintain_keys().await.unwrap();
        let stored = issuer.keys().await.unwrap();
        assert_eq!(stored.len(), 2);
        let next_kid = stored[1].kid.clone();
        assert!(stored[1].active_from_ms > unix_ms(), "published ahead");
        let published = issuer
            .public_keys(Request::new(PublicKeysRequest {}))
            .await
            .unwrap()
            .into_inner()
            .keys;
        assert_eq!(published.len(), 2, "gateways learn the next key first");
        assert_eq!(
            kid_of(&issuer.token_for(&client, "t").await.unwrap()),
            first_kid
        );

        // Once active, it signs; the old key is still handed out for the tokens it signed.
        age(
            &issuer,
            &next_kid,
            KEY_PUBLISH_AHEAD.as_millis() as i64 + 1_000,
        )
        .await;
        assert_eq!(
            kid_of(&issuer.token_for(&client, "t").await.unwrap()),
            next_kid
        );
        issuer.maintain_keys().await.unwrap();
        assert_eq!(issuer.keys().await.unwrap().len(), 2);

        // A token lifetime (and a margin) after the switch, the old key goes.
        let lifetime = (TOKEN_LIFETIME_SECS * 1000) as i64 + 120_000;
        age(&issuer, &next_kid, lifetime).await;
        issuer.maintain_keys().await.unwrap();
        let left: Vec<String> = issuer
            .keys()
            .await
            .unwrap()
            .into_iter()
            .map(|k| k.kid)
            .collect();
        assert_eq!(left, [next_kid]);
    }
}
