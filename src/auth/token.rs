//! What a token is: its role and scopes, how a fresh one is made, and how it is hashed
//! for storage. Pure values and functions; the file lives in `store.rs`.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Every token starts with this, so a leaked one is recognisable (secret scanners,
/// log reviews) and a password is never mistaken for one.
pub const TOKEN_PREFIX: &str = "keel_";

/// What a token may do. Ordered: each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads only: GET/HEAD and the read-only POSTs; RESP read commands.
    Readonly,
    /// Everything in its scopes except the admin-only routes.
    Operator,
    /// Everything, including tokens, backups and configuration checks.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Readonly => "readonly",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Role, String> {
        match text {
            "readonly" | "read-only" => Ok(Role::Readonly),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}; expected admin, operator or readonly"
            )),
        }
    }
}

/// A subsystem a token may be limited to. A token with no scopes reaches all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Cache,
    Queue,
    Sql,
    Gateway,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Cache => "cache",
            Scope::Queue => "queue",
            Scope::Sql => "sql",
            Scope::Gateway => "gateway",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Scope, String> {
        match text {
            "cache" => Ok(Scope::Cache),
            "queue" => Ok(Scope::Queue),
            "sql" => Ok(Scope::Sql),
            "gateway" => Ok(Scope::Gateway),
            other => Err(format!(
                "unknown scope {other:?}; expected cache, queue, sql or gateway"
            )),
        }
    }
}

/// Who a request acts as, once its credentials checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name, or `password` for the static admin secret.
    pub name: String,
    pub role: Role,
    /// Sorted, no duplicates; empty means every subsystem.
    pub scopes: Vec<Scope>,
    /// Which credential this is, to notice its revocation; `None` for the password,
    /// which lives in the configuration and cannot be revoked at run time.
    pub token_hash: Option<TokenHash>,
}

impl Principal {
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.is_empty() || self.scopes.contains(&scope)
    }

    /// The principal of a keel without authentication: everything is allowed.
    pub fn unauthenticated_admin() -> Principal {
        Principal {
            name: String::new(),
            role: Role::Admin,
            scopes: Vec::new(),
            token_hash: None,
        }
    }
}

/// The keyed hash of a token: what the store keeps and looks tokens up by.
pub type TokenHash = [u8; 32];

/// Hashes tokens with HMAC-SHA256 under the install's own key.
///
/// Why not argon2 or bcrypt: those slow hashes exist to protect low-entropy passwords
/// against guessing once the hashes leak. A keel token is 256 random bits, so no amount
/// of guessing finds one, slow hash or not, while a per-request argon2 would cost ~50 ms
/// of CPU on every API call. The key (kept in the data directory, 0600) means a leaked
/// `tokens.json` alone cannot even be used to test candidate tokens offline.
#[derive(Clone)]
pub(super) struct TokenHasher {
    key: hmac::Key,
}

impl TokenHasher {
    pub(super) fn new(key: &[u8]) -> TokenHasher {
        TokenHasher {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    pub(super) fn hash(&self, token: &[u8]) -> TokenHash {
        hmac::sign(&self.key, token)
            .as_ref()
            .try_into()
            .expect("HMAC-SHA256 is 32 bytes")
    }
}

/// `keel_` and 32 random bytes in base64url: 256 bits from the operating system.
pub(super) fn generate_token() -> String {
    format!(
        "{TOKEN_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(random_bytes::<32>())
    )
}

/// Random bytes from the operating system's generator. Failing to read it is not
/// something keel can work around, and continuing with weaker randomness would be worse.
pub(super) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random generator is available");
    bytes
}

/// Token names appear in lists, logs and URLs, so they stay in a small alphabet.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'))
}

/// A name for a token created without one: the role and a short random suffix.
pub(super) fn default_name(role: Role) -> String {
    let suffix: String = random_bytes::<4>()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("{role}-{suffix}")
}

/// Sorts and de-duplicates, so equal sets of scopes compare and print the same.
pub(super) fn normalize_scopes(mut scopes: Vec<Scope>) -> Vec<Scope> {
    scopes.sort();
    scopes.dedup();
    scopes
}
