//! Authentication shared by tenant-service (which issues tokens) and gateways (which verify
//! them): [`secret`] makes client secrets and their argon2id hashes, [`token`] signs and
//! verifies tokens (Ed25519 JWTs, `kid` for rotation), [`claims`] says what a token carries
//! and the roles it grants. Which role may call which RPC is the gateway's authorization
//! table, not here.

pub mod claims;
pub mod secret;
pub mod token;

pub use claims::{Claims, Role};
pub use token::{KeyPair, Signer, Verifier, VerifyError};

/// `iss` of every token.
pub const ISSUER: &str = "pipeline-manager";
/// How long a token lasts: short, because a deleted client's tokens are not revoked.
pub const TOKEN_LIFETIME_SECS: u64 = 15 * 60;

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
