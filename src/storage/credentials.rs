//! Callback credentials kept in the database (`platform rotate`), beside those of the
//! configuration file, so that every replica sharing the database accepts a rotated pair without
//! a restart. The shared core: the record and what a rotation writes; each backend's
//! `credentials.rs` holds the SQL.
//!
//! At rest a password is kept as its SHA-256 digest, which is all that checking a callback needs,
//! and in clear only while it is the current pair: `platform register` must send it to the
//! platform again. A retired pair keeps its digest alone. (The digest is unsalted on purpose: a
//! rotated password is 40 random alphanumerics, ~238 bits, out of reach of any guessing, and the
//! callback edge compares digests in constant time. The clear current password is no more exposed
//! than in the raw callback bodies beside it, which carry it on every callback.)

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::domain::Secret;

/// Where a stored pair came from.
pub const SOURCE_ROTATED: &str = "rotated";
/// A pair of the configuration file (or the generated one) that a rotation retired: only its
/// digest and the end of its overlap are stored.
pub const SOURCE_RETIRED: &str = "retired";

/// One stored pair.
#[derive(Clone, Debug)]
pub struct StoredCredential {
    pub username: String,
    pub password_digest: [u8; 32],
    /// In clear while the pair is current (rotated, not retired); `None` afterwards.
    pub password: Option<Secret>,
    pub account: Option<String>,
    /// [`SOURCE_ROTATED`] or [`SOURCE_RETIRED`].
    pub source: String,
    pub created_at: String,
    /// Accepted until then (RFC 3339, as [`crate::storage::timestamp`] writes it); `None`: current.
    pub valid_until: Option<String>,
}

impl StoredCredential {
    /// Whether the pair is still accepted at `now`.
    pub fn valid_at(&self, now: &str) -> bool {
        self.valid_until.as_deref().is_none_or(|until| until > now)
    }
}

/// A pair a rotation retires: accepted until the end of the overlap, then refused.
#[derive(Clone, Debug)]
pub struct RetiredPair {
    pub username: String,
    pub password_digest: [u8; 32],
}

/// What `platform rotate` writes, in one transaction: every current stored pair and `retire`
/// (the pair registered until now, from the file or generated) accepted until `valid_until`, and
/// the new pair current.
#[derive(Clone, Debug)]
pub struct Rotation {
    pub username: String,
    pub password: Secret,
    pub account: Option<String>,
    pub retire: Vec<RetiredPair>,
    /// When the rotation happens (`created_at` of the new pair), as stored.
    pub now: String,
    /// The end of the overlap, as stored.
    pub valid_until: String,
}

impl Rotation {
    pub fn new(
        username: String,
        password: Secret,
        account: Option<String>,
        retire: Vec<RetiredPair>,
        now: OffsetDateTime,
        overlap: std::time::Duration,
    ) -> Self {
        Self {
            username,
            password,
            account,
            retire,
            now: super::timestamp(now),
            valid_until: super::timestamp(now + overlap),
        }
    }

    pub fn password_digest(&self) -> [u8; 32] {
        password_digest(self.password.expose())
    }
}

/// The digest a stored pair keeps of its password: the one [`crate::auth::Authenticator`] keeps
/// of a configured password, so that a retired configured pair is found by it.
pub fn password_digest(password: &str) -> [u8; 32] {
    Sha256::digest(password.as_bytes()).into()
}
