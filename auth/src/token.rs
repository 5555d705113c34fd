//! Tokens: Ed25519-signed JWTs (`alg: EdDSA`) whose `kid` names the signing key, so keys can
//! rotate while tokens signed by the previous one are still valid. Tokens are verified
//! locally by every gateway, with no call per request; a verified token is remembered until
//! it expires, so a client reusing its token pays for the signature check once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

use crate::{Claims, ISSUER, unix_secs};

/// Most verified tokens a gateway remembers. Past it the memory is emptied (and filled again
/// by the next requests), so it stays bounded whatever clients send.
pub const VERIFIED_CACHE_ENTRIES: usize = 10_000;
/// Longest token accepted, in bytes (ours are ~400).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A signing key pair, as tenant-service stores it.
#[derive(Clone)]
pub struct KeyPair {
    pub kid: String,
    /// PKCS#8 DER of the private key.
    pub private_pkcs8: Vec<u8>,
    /// The 32-byte public key.
    pub public_key: Vec<u8>,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A new Ed25519 key from the thread's CSPRNG, with a random key id.
    pub fn generate() -> KeyPair {
        let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let kid: [u8; 8] = rand::random();
        KeyPair {
            kid: kid.iter().map(|b| format!("{b:02x}")).collect(),
            private_pkcs8: key
                .to_pkcs8_der()
                .expect("an Ed25519 key encodes")
                .as_bytes()
                .to_vec(),
            public_key: key.verifying_key().to_bytes().to_vec(),
        }
    }
}

/// Signs tokens with one key.
pub struct Signer {
    kid: String,
    key: EncodingKey,
}

impl Signer {
    pub fn new(key: &KeyPair) -> Signer {
        Signer {
            kid: key.kid.clone(),
            key: EncodingKey::from_ed_der(&key.private_pkcs8),
        }
    }

    /// A token carrying `claims` (their `iss` is set here).
    pub fn sign(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let claims = Claims {
            iss: ISSUER.to_owned(),
            ..claims.clone()
        };
        jsonwebtoken::encode(&header, &claims, &self.key).expect("Ed25519 signing cannot fail")
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed token: {0}")]
    Malformed(String),
    /// Signed by a key this verifier does not know (yet: a new key may not have been
    /// fetched; or never: forged or from another installation).
    #[error("token signed by unknown key {0:?}")]
    UnknownKey(String),
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Verifies tokens against the public keys it was given.
pub struct Verifier {
    keys: RwLock<HashMap<String, DecodingKey>>,
    validation: Validation,
    verified: Mutex<HashMap<Box<str>, Arc<Claims>>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Default for Verifier {
    fn default() -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        // Our clocks are the same machines' clocks; no grace past `exp`.
        validation.leeway = 0;
        Verifier {
            keys: RwLock::default(),
            validation,
            verified: Mutex::default(),
        }
    }
}

impl Verifier {
    /// Replaces the known keys with `keys` (kid, 32-byte public key). Tokens of a key that
    /// is gone stop verifying at once.
    pub fn set_keys(&self, keys: impl IntoIterator<Item = (String, Vec<u8>)>) {
        let keys = keys
            .into_iter()
            .map(|(kid, public)| (kid, DecodingKey::from_ed_der(&public)))
            .collect::<HashMap<_, _>>();
        let mut known = self.keys.write().expect("keys lock");
        if known.keys().any(|k| !keys.contains_key(k)) {
            self.verified.lock().expect("cache lock").clear();
        }
        *known = keys;
    }

    pub fn knows(&self, kid: &str) -> bool {
        self.keys.read().expect("keys lock").contains_key(kid)
    }

    /// The claims of a valid, unexpired token signed by a known key.
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, VerifyError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(VerifyError::Malformed(format!(
                "longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let now = unix_secs();
        if let Some(claims) = self.verified.lock().expect("cache lock").get(token)
            && claims.exp > now
        {
            return Ok(claims.clone());
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        let kid = header
            .kid
            .ok_or_else(|| VerifyError::Malformed("no key id (kid)".into()))?;
        let claims = {
            let keys = self.keys.read().expect("keys lock");
            let key = keys
                .get(&kid)
                .ok_or_else(|| VerifyError::UnknownKey(kid.clone()))?;
            jsonwebtoken::decode::<Claims>(token, key, &self.validation)
        };
        let claims = claims.map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => VerifyError::Expired,
            _ => VerifyError::Invalid(e.to_string()),
        })?;
        let claims = Arc::new(claims.claims);
        if claims.exp <= now {
            return Err(VerifyError::Expired);
        }
        let mut verified = self.verified.lock().expect("cache lock");
        if verified.len() >= VERIFIED_CACHE_ENTRIES {
            verified.clear();
        }
        verified.insert(token.into(), claims.clone());
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Role, TOKEN_LIFETIME_SECS};
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn claims(exp: u64) -> Claims {
        Claims {
            iss: String::new(),
            sub: "tenants/t/clients/c".into(),
            tenant: "t".into(),
            roles: vec![Role::Submitter],
            priority: 10,
            pipelines: vec![],
            iat: unix_secs(),
            exp,
        }
    }

    #[test]
    fn tokens_verify_only_with_their_key_unchanged_and_unexpired() {
        let (old, new) = (KeyPair::generate(), KeyPair::generate());
        let verifier = Verifier::default();
        verifier.set_keys([(old.kid.clone(), old.public_key.clone())]);
        let good = claims(unix_secs() + TOKEN_LIFETIME_SECS);
        let token = Signer::new(&old).sign(&good);
        let got = verifier.verify(&token).unwrap();
        assert_eq!(got.tenant, "t");
        assert_eq!(got.iss, ISSUER);
        // Again, from memory.
        assert_eq!(verifier.verify(&token).unwrap(), got);

        // Another key's token, until that key is known.
        let rotated = Signer::new(&new).sign(&good);
        assert_eq!(
            verifier.verify(&rotated),
            Err(VerifyError::UnknownKey(new.kid.clone()))
        );
        verifier.set_keys([
            (old.kid.clone(), old.public_key.clone()),
            (new.kid.clone(), new.public_key.clone()),
        ]);
        assert!(verifier.verify(&rotated).is_ok());
        assert!(verifier.verify(&token).is_ok(), "the old key stays valid");

        // A changed payload (another tenant) under the same signature.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let other = Claims {
            tenant: "other".into(),
            ..(*got).clone()
        };
        let json = format!(
            r#"{{"iss":"{ISSUER}","sub":"{}","tenant":"{}","roles":["submitter"],"priority":10,"iat":{},"exp":{}}}"#,
            other.sub, other.tenant, other.iat, other.exp
        );
        parts[1] = URL_SAFE_NO_PAD.encode(json);
        assert!(matches!(
            verifier.verify(&parts.join(".")),
            Err(VerifyError::Invalid(_))
        ));
        // A key with the right id but not the right key (forged).
        let forger = KeyPair {
            kid: old.kid.clone(),
            ..KeyPair::generate()
        };
        assert!(matches!(
            verifier.verify(&Signer::new(&forger).sign(&good)),
            Err(VerifyError::Invalid(_))
        ));
        // Expired.
        let expired = Signer::new(&old).sign(&claims(unix_secs() - 1));
        assert_eq!(verifier.verify(&expired), Err(VerifyError::Expired));
        assert!(matches!(
            verifier.verify("not.a.token"),
            Err(VerifyError::Malformed(_))
        ));

        // A key that is dropped takes its tokens, remembered or not, with it.
        verifier.set_keys([(new.kid.clone(), new.public_key.clone())]);
        assert_eq!(
            verifier.verify(&token),
            Err(VerifyError::UnknownKey(old.kid.clone()))
        );
    }
}
