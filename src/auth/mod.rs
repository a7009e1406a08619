//! Who may call keel, and what they may do: tokens with roles and scopes (`token.rs`),
//! their file in the data directory (`store.rs`), dashboard sessions with CSRF secrets
//! (`session.rs`), the route table (`access.rs`), and the static `auth.password`,
//! which stays an admin credential for older setups.
//!
//! Decides only: `http/` turns a refusal into problem+json and `resp/` into an error
//! reply. Failed authentications are counted by reason and limited per client address
//! (the rate limiter's login mode), and each token's requests are rate limited.
//! Nothing here logs a token or a session value.

mod access;
mod session;
mod store;
mod token;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, MetricsAccess};
use crate::ratelimit::{
    Decision, Key, KeyKind, Limiter, LimiterConfig, RateLimitMetrics, RateLimits,
};

pub use access::{Access, Forbidden, authorize, is_read, route_access};
pub use session::{IDLE_TIMEOUT, MAX_SESSIONS, Session};
pub use store::{TokenInfo, TokenStore, TokenStoreError};
pub use token::{Principal, Role, Scope, TOKEN_PREFIX, TokenHash, valid_name};

use session::{Sessions, digest};

/// Where keel writes the admin token it creates on a first start with authentication
/// on and no credentials (`keel demo` reads it to print the token).
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

/// Why a request or an `AUTH` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send Authorization: Bearer <token>")]
    Missing,
    #[error("the credentials are not valid")]
    Invalid,
    #[error("the session has ended; log in again")]
    SessionEnded,
    #[error("this request needs the X-CSRF-Token header of its session")]
    Csrf,
    #[error("{0}")]
    Forbidden(Forbidden),
    #[error("too many failed authentications from this address; try again later")]
    TooManyFailures(Decision),
    #[error("this token made too many requests; slow down")]
    RateLimited(Decision),
    #[error("authentication is disabled, so there are no tokens to manage")]
    Disabled,
}

/// The dashboard's session cookie. The gateway strips it from proxied requests: cookies
/// are not port-specific, so a browser sends it to a gateway on the same host too.
pub const SESSION_COOKIE: &str = "keel_session";

/// A request's credentials, as the protocol front end found them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    /// `Authorization: Bearer ...`.
    pub bearer: Option<&'a [u8]>,
    /// The `keel_session` cookie.
    pub cookie: Option<&'a str>,
    /// The `X-CSRF-Token` header.
    pub csrf: Option<&'a [u8]>,
}

/// A request that passed: who made it, and through which session if any.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub principal: Arc<Principal>,
    pub session: Option<Session>,
}

/// The credentials keel accepts. Cheap to clone; `Default` is authentication off.
#[derive(Clone, Default)]
pub struct Authenticator {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    /// SHA-256 of `auth.password`. Comparing digests keeps the comparison's timing
    /// independent of how much of a guess matched.
    password: Option<[u8; 32]>,
    store: TokenStore,
    sessions: Sessions,
    /// Login mode, by client address: only failures use quota.
    failures: Arc<Limiter>,
    /// By token name.
    per_token: Arc<Limiter>,
    /// Both limiters, for the sweeper.
    limits: RateLimits,
    failures_total: IntCounterVec,
    metrics_access: MetricsAccess,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error(transparent)]
    Store(#[from] TokenStoreError),
    #[error("auth rate limit: {0}")]
    Limit(#[from] crate::ratelimit::LimiterError),
    #[error("cannot write {path}: {source}")]
    AdminToken {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Authenticator {
    /// Authentication as configured: off, or on with the tokens of `data_dir`.
    /// Blocking (opens the token file).
    pub fn from_config(
        config: &Config,
        data_dir: &Path,
        registry: &Registry,
        limit_metrics: &RateLimitMetrics,
    ) -> Result<Authenticator, AuthSetupError> {
        let auth = &config.auth;
        if !auth.is_enabled(&config.listeners) {
            return Ok(Authenticator::default());
        }
        let store = TokenStore::open(data_dir)?;
        let sessions_gauge =
            IntGauge::new("keel_auth_sessions", "Dashboard sessions currently open.")
                .expect("valid metric");
        let failures_total = IntCounterVec::new(
            Opts::new(
                "keel_auth_failures_total",
                "Refused authentications and authorizations, by reason: missing, invalid, \
                 session, csrf, forbidden, throttled.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        // A second registration (tests building two on one registry) is harmless.
        let _ = registry.register(Box::new(sessions_gauge.clone()));
        let _ = registry.register(Box::new(failures_total.clone()));
        for reason in [
            "missing",
            "invalid",
            "session",
            "csrf",
            "forbidden",
            "throttled",
        ] {
            failures_total.with_label_values(&[reason]);
        }
        let limits = RateLimits::new();
        let failures = limits.insert(Limiter::new(
            "auth_failures",
            &LimiterConfig::new(KeyKind::Ip, auth.failure_rate_limit),
            limit_metrics,
        )?);
        let per_token = limits.insert(Limiter::new(
            "auth_tokens",
            &LimiterConfig::new(KeyKind::Global, auth.token_rate_limit),
            limit_metrics,
        )?);
        Ok(Authenticator {
            inner: Some(Arc::new(Inner {
                password: auth
                    .password
                    .as_ref()
                    .filter(|secret| !secret.expose().is_empty())
                    .map(|secret| digest(secret.expose().as_bytes())),
                store,
                sessions: Sessions::new(MAX_SESSIONS, IDLE_TIMEOUT, sessions_gauge),
                failures,
                per_token,
                limits,
                failures_total,
                metrics_access: auth.metrics,
            })),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// On a first start with authentication on, no password and no token: creates the
    /// admin token and writes it to [`admin_token_path`] (0600 from creation on).
    /// Returns the file's path when it did. Blocking.
    pub fn bootstrap_admin(&self, data_dir: &Path) -> Result<Option<PathBuf>, AuthSetupError> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        if inner.password.is_some() || !inner.store.is_empty() {
            return Ok(None);
        }
        let (_, token) = inner
            .store
            .create(Role::Admin, Vec::new(), Some("admin".to_owned()))?;
        let path = admin_token_path(data_dir);
        let io = |source| AuthSetupError::AdminToken {
            path: path.clone(),
            source,
        };
        // A file left from an earlier token store holds a token that no longer works.
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io(error)),
        }
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        writeln!(file, "{token}").map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(Some(path))
    }

    /// Sweeps the auth limiters until `shutdown` (see [`RateLimits::spawn_sweeper`]).
    pub fn spawn_sweeper(&self, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
        let inner = self.inner.as_ref()?;
        Some(
            inner
                .limits
                .spawn_sweeper(Duration::from_secs(10), shutdown),
        )
    }

    /// Checks one api request: `Ok(None)` for a route open to all (or with
    /// authentication off), `Ok(Some(..))` for a request that may go ahead.
    pub fn check_request(
        &self,
        method: &str,
        path: &str,
        client: IpAddr,
        presented: Presented<'_>,
    ) -> Result<Option<Authenticated>, AuthError> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        let access = route_access(path, inner.metrics_access);
        if access == Access::Open {
            return Ok(None);
        }
        let authenticated = if let Some(bearer) = presented.bearer {
            Authenticated {
                principal: self.authenticate(bearer, client)?,
                session: None,
            }
        } else if let Some(cookie) = presented.cookie {
            let (principal, session) = self.session(cookie)?;
            if !matches!(method, "GET" | "HEAD" | "OPTIONS") {
                let expected = digest(session.csrf.as_bytes());
                if presented.csrf.map(digest) != Some(expected) {
                    inner.fail("csrf");
                    return Err(AuthError::Csrf);
                }
            }
            Authenticated {
                principal,
                session: Some(session),
            }
        } else {
            inner.fail("missing");
            return Err(AuthError::Missing);
        };
        if let Err(forbidden) = authorize(&authenticated.principal, method, path, access) {
            inner.fail("forbidden");
            return Err(AuthError::Forbidden(forbidden));
        }
        let decision = inner
            .per_token
            .check(Key::hashed(authenticated.principal.name.as_bytes()));
        if !decision.is_allowed() {
            return Err(AuthError::RateLimited(decision));
        }
        Ok(Some(authenticated))
    }

    /// Checks a presented token (or the password) for `client`, counting and limiting
    /// failures by the client's address: once over the limit, even a right token is
    /// refused until the limit allows again, so guessing cannot go on in the background.
    pub fn authenticate(
        &self,
        presented: &[u8],
        client: IpAddr,
    ) -> Result<Arc<Principal>, AuthError> {
        let Some(inner) = &self.inner else {
            return Ok(Arc::new(Principal::unauthenticated_admin()));
        };
        let key = Key::ip(client);
        let peek = inner.failures.peek(key);
        if !peek.is_allowed() {
            inner.fail("throttled");
            return Err(AuthError::TooManyFailures(peek));
        }
        if inner
            .password
            .is_some_and(|password| digest(presented) == password)
        {
            return Ok(Arc::new(password_principal()));
        }
        match inner.store.authenticate(presented) {
            Some(principal) => Ok(principal),
            None => {
                inner.fail("invalid");
                inner.failures.record_failure(key);
                Err(AuthError::Invalid)
            }
        }
    }

    /// Whether a principal authenticated earlier still holds (its token not revoked).
    pub fn still_valid(&self, principal: &Principal) -> bool {
        match (&self.inner, &principal.token_hash) {
            (None, _) => true,
            (Some(inner), None) => inner.password.is_some(),
            (Some(inner), Some(hash)) => inner.store.resolve(hash).is_some(),
        }
    }

    /// Logs in with a token: a new session for it.
    pub fn login(
        &self,
        token: &[u8],
        client: IpAddr,
    ) -> Result<(String, Session, Arc<Principal>), AuthError> {
        let principal = self.authenticate(token, client)?;
        let inner = self.inner.as_ref().ok_or(AuthError::Disabled)?;
        let (cookie, session) = inner.sessions.create(principal.token_hash);
        Ok((cookie, session, principal))
    }

    pub fn logout(&self, cookie: &str) {
        if let Some(inner) = &self.inner {
            inner.sessions.remove(cookie);
        }
    }

    /// The live session a cookie names and its principal.
    fn session(&self, cookie: &str) -> Result<(Arc<Principal>, Session), AuthError> {
        let inner = self.inner.as_ref().ok_or(AuthError::Disabled)?;
        let Some(session) = inner.sessions.get(cookie) else {
            inner.fail("session");
            return Err(AuthError::SessionEnded);
        };
        let principal = match &session.token_hash {
            Some(hash) => inner.store.resolve(hash),
            None => inner.password.map(|_| Arc::new(password_principal())),
        };
        match principal {
            Some(principal) => Ok((principal, session)),
            None => {
                inner.sessions.remove(cookie);
                inner.fail("session");
                Err(AuthError::SessionEnded)
            }
        }
    }

    /// Writes the rate-limit header fields of a refusal that came from a limiter.
    pub fn write_limit_headers(&self, error: &AuthError, headers: &mut hyper::HeaderMap) {
        let Some(inner) = &self.inner else { return };
        match error {
            AuthError::TooManyFailures(decision) => inner.failures.write_headers(decision, headers),
            AuthError::RateLimited(decision) => inner.per_token.write_headers(decision, headers),
            _ => {}
        }
    }

    /// The token store, for listing and creating; `None` with authentication off.
    pub fn store(&self) -> Option<&TokenStore> {
        self.inner.as_ref().map(|inner| &inner.store)
    }

    /// Revokes a token and ends its sessions at once (other keels on the same data
    /// directory notice within a second).
    pub fn revoke_token(&self, name: &str) -> Result<Option<TokenInfo>, TokenStoreError> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        let (info, hash) = inner.store.revoke(name)?;
        inner.sessions.remove_token(&hash);
        Ok(Some(info))
    }
}

impl Inner {
    fn fail(&self, reason: &str) {
        self.failures_total.with_label_values(&[reason]).inc();
    }
}

fn password_principal() -> Principal {
    Principal {
        name: "password".to_owned(),
        role: Role::Admin,
        scopes: Vec::new(),
        token_hash: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use std::net::Ipv4Addr;

    fn enabled(dir: &Path, password: Option<&str>) -> Authenticator {
        let mut config = Config::default();
        config.auth.enabled = Some(true);
        config.auth.password = password.map(|text| Secret(text.into()));
        config.auth.failure_rate_limit = crate::config::Rate {
            count: 3,
            per: Duration::from_secs(60),
        };
        let registry = Registry::new();
        Authenticator::from_config(&config, dir, &registry, &RateLimitMetrics::new(&registry))
            .unwrap()
    }

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn auth_is_off_by_default_on_loopback_and_on_with_a_password() {
        let mut config = Config::default();
        assert!(!config.auth.is_enabled(&config.listeners));
        config.auth.password = Some(Secret("s3cret".into()));
        assert!(config.auth.is_enabled(&config.listeners));
        config.auth.password = None;
        config.listeners.api.bind.0 = Some("0.0.0.0:3100".parse().unwrap());
        assert!(config.auth.is_enabled(&config.listeners));
        config.auth.enabled = Some(false);
        assert!(!config.auth.is_enabled(&config.listeners));
    }

    #[test]
    fn the_password_stays_an_admin_credential() {
        let dir = tempfile::tempdir().unwrap();
        let auth = enabled(dir.path(), Some("s3cret"));
        assert_eq!(
            auth.authenticate(b"s3cret", CLIENT).unwrap().role,
            Role::Admin
        );
        assert_eq!(auth.authenticate(b"guess", CLIENT), Err(AuthError::Invalid));
        assert_eq!(
            auth.bootstrap_admin(dir.path()).unwrap(),
            None,
            "a password is a credential"
        );
    }

    #[test]
    fn bootstrap_writes_an_admin_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let auth = enabled(dir.path(), None);
        let path = auth.bootstrap_admin(dir.path()).unwrap().unwrap();
        let token = std::fs::read_to_string(&path).unwrap();
        let principal = auth.authenticate(token.trim().as_bytes(), CLIENT).unwrap();
        assert_eq!(
            (principal.name.as_str(), principal.role),
            ("admin", Role::Admin)
        );
        assert_eq!(auth.bootstrap_admin(dir.path()).unwrap(), None);
    }

    #[test]
    fn failures_are_limited_per_address_even_for_a_right_token_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let auth = enabled(dir.path(), Some("s3cret"));
        for _ in 0..3 {
            assert_eq!(auth.authenticate(b"guess", CLIENT), Err(AuthError::Invalid));
        }
        assert!(matches!(
            auth.authenticate(b"s3cret", CLIENT),
            Err(AuthError::TooManyFailures(_))
        ));
        let other = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        assert!(auth.authenticate(b"s3cret", other).is_ok());
    }

    #[test]
    fn sessions_need_csrf_for_writes_and_end_with_their_token() {
        let dir = tempfile::tempdir().unwrap();
        let auth = enabled(dir.path(), None);
        let (_, token) = auth
            .store()
            .unwrap()
            .create(Role::Operator, vec![Scope::Cache], Some("op".into()))
            .unwrap();
        let (cookie, session, _) = auth.login(token.as_bytes(), CLIENT).unwrap();
        let with_cookie = |method, csrf: Option<&[u8]>| {
            auth.check_request(
                method,
                "/v1/cache/k",
                CLIENT,
                Presented {
                    bearer: None,
                    cookie: Some(&cookie),
                    csrf,
                },
            )
        };
        assert!(with_cookie("GET", None).unwrap().is_some());
        assert_eq!(with_cookie("PUT", None).unwrap_err(), AuthError::Csrf);
        assert_eq!(
            with_cookie("PUT", Some(b"wrong")).unwrap_err(),
            AuthError::Csrf
        );
        assert!(with_cookie("PUT", Some(session.csrf.as_bytes())).is_ok());
        auth.revoke_token("op").unwrap();
        assert_eq!(
            with_cookie("GET", None).unwrap_err(),
            AuthError::SessionEnded
        );
    }
}
