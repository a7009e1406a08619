//! The configuration contract (PRODUCT.md, Appendix A) as typed structs.
//!
//! Every field has a built-in default, so an empty file is a valid configuration. Fields
//! are deserialized leniently here (unknown keys are collected, not fatal) and checked
//! for meaning in `validate.rs`; `load.rs` stitches file, environment and flags together.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::units::{ByteSize, Rate, Span};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    /// Schema version of this file; only 1 exists.
    pub version: u32,
    /// Where keel keeps its databases and lock file. `$STATE_DIRECTORY` wins when set.
    pub data_dir: PathBuf,
    pub log: LogConfig,
    pub listeners: ListenersConfig,
    pub auth: AuthConfig,
    pub lifecycle: LifecycleConfig,
    pub runtime: RuntimeConfig,
    pub cache: CacheConfig,
    pub queue: QueueConfig,
    pub gateway: GatewayConfig,
    pub sql: SqlConfig,
    pub ratelimit: RateLimitConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: 1,
            data_dir: PathBuf::from("/var/lib/keel"),
            log: LogConfig::default(),
            listeners: ListenersConfig::default(),
            auth: AuthConfig::default(),
            lifecycle: LifecycleConfig::default(),
            runtime: RuntimeConfig::default(),
            cache: CacheConfig::default(),
            queue: QueueConfig::default(),
            gateway: GatewayConfig::default(),
            sql: SqlConfig::default(),
            ratelimit: RateLimitConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct LogConfig {
    pub level: LogLevel,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A listen address; `""` in the file means "this listener is off".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind(pub Option<SocketAddr>);

impl Bind {
    fn on(addr: &str) -> Self {
        Bind(Some(addr.parse().expect("built-in default address")))
    }
}

impl<'de> Deserialize<'de> for Bind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.trim().is_empty() {
            return Ok(Bind(None));
        }
        text.trim().parse::<SocketAddr>().map(|addr| Bind(Some(addr))).map_err(|_| {
            serde::de::Error::custom(format!(
                "invalid socket address {text:?}; expected IP:PORT such as \"127.0.0.1:3100\" or \"[::1]:3100\", or \"\" to disable"
            ))
        })
    }
}

impl Serialize for Bind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(addr) => serializer.collect_str(&addr),
            None => serializer.serialize_str(""),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ListenersConfig {
    pub api: ApiListenerConfig,
    pub resp: RespListenerConfig,
    pub gateway: GatewayListenerConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ApiListenerConfig {
    pub bind: Bind,
    pub tls: Option<TlsFiles>,
    /// Connections beyond this wait in the kernel backlog instead of being accepted.
    pub max_connections: u32,
    /// A client that has not sent its whole request head by then is disconnected (slowloris).
    pub header_read_timeout: Span,
    pub max_headers: u32,
    pub max_body_bytes: ByteSize,
}

impl Default for ApiListenerConfig {
    fn default() -> Self {
        ApiListenerConfig {
            bind: Bind::on("127.0.0.1:3100"),
            tls: None,
            max_connections: 10_000,
            header_read_timeout: Span(Duration::from_secs(10)),
            max_headers: 100,
            max_body_bytes: ByteSize(64 << 20),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct RespListenerConfig {
    pub bind: Bind,
    pub tls: Option<TlsFiles>,
    pub max_connections: u32,
}

impl Default for RespListenerConfig {
    fn default() -> Self {
        RespListenerConfig {
            bind: Bind::on("127.0.0.1:6380"),
            tls: None,
            max_connections: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct GatewayListenerConfig {
    pub bind: Bind,
    pub tls_bind: Bind,
    /// Certificates for the TLS listener, chosen by SNI.
    pub certificates: Vec<TlsFiles>,
    pub max_connections: u32,
    /// With `tls_bind`: answer plain HTTP with a 308 to the same URL over HTTPS.
    pub redirect_http: bool,
}

impl Default for GatewayListenerConfig {
    fn default() -> Self {
        GatewayListenerConfig {
            bind: Bind::on("0.0.0.0:8090"),
            tls_bind: Bind(None),
            certificates: Vec::new(),
            max_connections: 10_000,
            redirect_http: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AuthConfig {
    /// Unset means: on when the api or resp listener binds beyond loopback, or when a
    /// password is set.
    pub enabled: Option<bool>,
    /// Static admin secret, also accepted by RESP `AUTH`; tokens are the better way.
    pub password: Option<Secret>,
    /// Whether `/metrics` needs a token too (scrapers then send `Authorization`).
    pub metrics: MetricsAccess,
    /// Requests one token may make on the api listener (per token, across clients).
    pub token_rate_limit: Rate,
    /// Failed authentications one client address may make before it gets 429s.
    pub failure_rate_limit: Rate,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: None,
            password: None,
            metrics: MetricsAccess::Open,
            token_rate_limit: Rate {
                count: 1000,
                per: Duration::from_secs(1),
            },
            failure_rate_limit: Rate {
                count: 20,
                per: Duration::from_secs(60),
            },
        }
    }
}

impl AuthConfig {
    /// Whether authentication is on for this configuration: as set, or else on when a
    /// listener a client speaks to is reachable beyond this machine or a password is set.
    pub fn is_enabled(&self, listeners: &ListenersConfig) -> bool {
        self.enabled.unwrap_or_else(|| {
            let beyond_loopback = [listeners.api.bind.0, listeners.resp.bind.0]
                .into_iter()
                .flatten()
                .any(|addr| !addr.ip().is_loopback());
            beyond_loopback || self.has_password()
        })
    }

    pub fn has_password(&self) -> bool {
        self.password
            .as_ref()
            .is_some_and(|secret| !secret.expose().is_empty())
    }
}

/// Who may read `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsAccess {
    /// Anyone who reaches the api listener (scrapers usually sit on a private network).
    #[default]
    Open,
    /// Any valid token, like the `/v1/metrics` routes.
    Token,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct LifecycleConfig {
    /// How long SIGTERM waits for in-flight requests before closing connections.
    pub drain_timeout: Span,
}

/// The threads keel's tasks run on.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RuntimeConfig {
    /// Threads that run the listeners, the gateway and background tasks; 0 means one
    /// per CPU core. Like NGINX's `worker_processes`: fewer threads than cores leaves
    /// the rest to what shares the machine. Blocking work (SQLite, redb) has a pool
    /// of its own.
    pub worker_threads: u32,
}

/// Most threads `runtime.worker_threads` may ask for.
pub const MAX_WORKER_THREADS: u32 = 1024;

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            drain_timeout: Span(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct CacheConfig {
    pub l1_max_bytes: ByteSize,
    /// `none`, `redb` or a `redis://` URL (shown with its password blanked).
    #[serde(serialize_with = "serialize_redacted")]
    pub l2: String,
    /// Memory redb may use for its page cache of `cache.redb`.
    pub l2_page_cache_bytes: ByteSize,
    /// With a Redis L2: the prefix of every key keel stores there, and of its
    /// invalidation channel. Nodes that share a cache use the same prefix.
    pub redis_prefix: String,
    /// With a shared (Redis) L2: how long an L1 entry is served before L2 is read
    /// again; bounds staleness when an invalidation message is lost.
    pub l1_max_age: Span,
    pub max_key_bytes: ByteSize,
    pub max_value_bytes: ByteSize,
    pub namespaces: BTreeMap<String, NamespaceConfig>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            l1_max_bytes: ByteSize(256 << 20),
            l2: "redb".to_owned(),
            l2_page_cache_bytes: ByteSize(64 << 20),
            redis_prefix: "keel:cache:".to_owned(),
            l1_max_age: Span(Duration::from_secs(5)),
            max_key_bytes: ByteSize(64 << 10),
            max_value_bytes: ByteSize(64 << 20),
            namespaces: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NamespaceConfig {
    pub loader: Option<Loader>,
    pub ttl: Option<Span>,
    pub refresh_ahead: Option<f64>,
    /// How long a loader error is remembered; unset means errors are not cached.
    pub negative_ttl: Option<Span>,
    /// How long one loader call may take.
    pub timeout: Option<Span>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Loader {
    /// URL template; `{key}` is replaced by the percent-encoded key.
    Http(String),
    /// Name of a `[sql.queries.NAME]` entry.
    Query(String),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct QueueConfig {
    pub backend: QueueBackend,
    /// `postgres://...`: where jobs live when `backend = "postgres"` (default: `sql.url`
    /// when that is PostgreSQL).
    pub url: Option<Secret>,
    /// The PostgreSQL schema holding keel's queue tables; nodes sharing it share jobs.
    pub schema: String,
    /// Most PostgreSQL connections this node's queue holds.
    pub pool_size: u32,
    pub queues: BTreeMap<String, QueueDefinition>,
    pub schedules: Vec<ScheduleConfig>,
    /// Largest JSON payload one job may carry.
    pub max_payload_bytes: ByteSize,
    /// The lease a reserve gives when neither it nor the job names one.
    pub default_lease: Span,
    /// Attempts a job gets when its enqueue does not say.
    pub default_attempts: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            backend: QueueBackend::Redb,
            url: None,
            schema: "keel".to_owned(),
            pool_size: 16,
            queues: BTreeMap::new(),
            schedules: Vec::new(),
            max_payload_bytes: ByteSize(1 << 20),
            default_lease: Span(Duration::from_secs(30)),
            default_attempts: 3,
        }
    }
}

impl Config {
    /// Where a PostgreSQL queue lives, and the key that said so: `queue.url`, or else
    /// `sql.url` when the SQL data is in PostgreSQL too (Appendix A's scaled-out
    /// example names only `sql` and `queue.backend`).
    pub fn queue_postgres_url(&self) -> Option<(&'static str, &Secret)> {
        match &self.queue.url {
            Some(url) if !url.expose().is_empty() => Some(("queue.url", url)),
            _ => self.sql_postgres_url().map(|url| ("sql.url", url)),
        }
    }

    /// `sql.url` when the SQL data is in PostgreSQL.
    pub fn sql_postgres_url(&self) -> Option<&Secret> {
        let url = self.sql.url.expose();
        (url.starts_with("postgres://") || url.starts_with("postgresql://"))
            .then_some(&self.sql.url)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    Redb,
    Postgres,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct QueueDefinition {
    pub processor: Option<Processor>,
    pub concurrency: u32,
    pub rate_limit: Option<Rate>,
    pub remove_on_complete: Option<Retention>,
    pub remove_on_fail: Option<Retention>,
}

impl Default for QueueDefinition {
    fn default() -> Self {
        QueueDefinition {
            processor: None,
            concurrency: 1,
            rate_limit: None,
            remove_on_complete: None,
            remove_on_fail: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub enum Processor {
    #[serde(rename = "webhook")]
    Webhook {
        url: String,
        timeout: Option<Span>,
        /// POST unless set.
        method: Option<String>,
        #[serde(default)]
        headers: BTreeMap<String, String>,
    },
    #[serde(rename = "cache.warm")]
    CacheWarm { namespace: String },
    #[serde(rename = "sql.maintenance")]
    SqlMaintenance {},
    #[serde(rename = "cleanup")]
    Cleanup {},
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Retention {
    pub count: Option<u64>,
    pub age: Option<Span>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ScheduleConfig {
    pub name: Option<String>,
    pub queue: Option<String>,
    /// Six fields, seconds first: `"0 0 2 * * *"`.
    pub cron: Option<String>,
    #[serde(default = "utc")]
    pub timezone: String,
    /// The job's name; defaults to the schedule's.
    pub job: Option<String>,
    pub payload: Option<toml::Value>,
    /// Ticks missed while keel was down: `one` fires once for all, `all` each, `none` skips.
    #[serde(default)]
    pub catch_up: CatchUp,
}

/// What happens to the schedule ticks missed while keel was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Fire once for all of them.
    #[default]
    One,
    /// Fire each (at most 1,000).
    All,
    /// Skip them.
    None,
}

fn utc() -> String {
    "UTC".to_owned()
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct GatewayConfig {
    pub trusted_proxies: Vec<IpNet>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct UpstreamConfig {
    /// `HOST:PORT`, optionally followed by ` weight=N` (default 1).
    #[serde(default)]
    pub servers: Vec<String>,
    #[serde(default)]
    pub balance: Balance,
    pub health: Option<HealthCheckConfig>,
    /// Time to establish a connection to a server.
    #[serde(default = "connect_timeout")]
    pub connect_timeout: Span,
    /// Time from sending the request to the response head.
    #[serde(default = "response_timeout")]
    pub response_timeout: Span,
    /// Idle keep-alive connections to a server are closed after this.
    #[serde(default = "idle_timeout")]
    pub idle_timeout: Span,
    /// Consecutive failures that open a server's circuit (passive ejection).
    #[serde(default = "three")]
    pub max_fails: u32,
    /// How long an open circuit stays open before one probe request is let through.
    #[serde(default = "open_for")]
    pub open_for: Span,
}

fn connect_timeout() -> Span {
    Span(Duration::from_secs(3))
}
fn response_timeout() -> Span {
    Span(Duration::from_secs(30))
}
fn idle_timeout() -> Span {
    Span(Duration::from_secs(60))
}
fn open_for() -> Span {
    Span(Duration::from_secs(10))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HealthCheckConfig {
    #[serde(default = "health_path")]
    pub path: String,
    #[serde(default = "health_interval")]
    pub interval: Span,
    #[serde(default = "two")]
    pub rise: u32,
    #[serde(default = "three")]
    pub fall: u32,
    #[serde(default = "ok_status")]
    pub expect_status: u16,
}

fn health_path() -> String {
    "/healthz".to_owned()
}
fn health_interval() -> Span {
    Span(Duration::from_secs(2))
}
fn two() -> u32 {
    2
}
fn three() -> u32 {
    3
}
fn ok_status() -> u16 {
    200
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RouteConfig {
    /// A label for metrics and logs; `route-N` (its position) when absent.
    pub name: Option<String>,
    pub host: Option<String>,
    #[serde(default = "root_prefix")]
    pub path_prefix: String,
    pub upstream: Option<String>,
    /// Remove `path_prefix` from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace `path_prefix` with this before forwarding (implies strip).
    pub rewrite_prefix: Option<String>,
    /// Largest request body forwarded (413 beyond).
    #[serde(default = "route_body_limit")]
    pub max_body_bytes: ByteSize,
    pub cache: Option<RouteCacheConfig>,
    pub rate_limit: Option<RouteRateLimitConfig>,
    #[serde(default)]
    pub compress: bool,
}

fn route_body_limit() -> ByteSize {
    ByteSize(1 << 30)
}

fn root_prefix() -> String {
    "/".to_owned()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RouteCacheConfig {
    /// Freshness when the upstream's response says nothing.
    pub ttl: Span,
    pub stale_while_revalidate: Option<Span>,
    pub stale_if_error: Option<Span>,
    /// Query parameters left out of the cache key (`utm_source`, ...).
    #[serde(default)]
    pub ignore_query: Vec<String>,
    /// Store responses to requests carrying `Authorization` (off: never).
    #[serde(default)]
    pub cache_authorized: bool,
    /// Store responses that set cookies (off: never).
    #[serde(default)]
    pub cache_set_cookie: bool,
    /// Largest body stored; larger responses pass through uncached.
    #[serde(default = "cached_body_limit")]
    pub max_body_bytes: ByteSize,
}

fn cached_body_limit() -> ByteSize {
    ByteSize(8 << 20)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RouteRateLimitConfig {
    /// `ip`, `header:NAME`, `route` or `global`.
    #[serde(default = "ip_key")]
    pub key: String,
    pub rate: Rate,
    pub burst: Option<u32>,
    /// `requests` counts every request; `failures` (login routes) counts only answers
    /// with a status of 400 or more.
    #[serde(default)]
    pub count: RateLimitCount,
    /// Keys tracked at most; beyond, new keys share one overflow bucket.
    pub max_keys: Option<usize>,
    /// Ban keys that keep exceeding, for progressively longer.
    pub penalty: Option<PenaltyConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitCount {
    #[default]
    Requests,
    Failures,
}

/// `after` rejections within `within` ban the key for `ban`, doubling up to `max_ban`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PenaltyConfig {
    pub after: u32,
    pub within: Span,
    pub ban: Span,
    pub max_ban: Span,
}

fn ip_key() -> String {
    "ip".to_owned()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct SqlConfig {
    /// `sqlite://PATH` (relative to `data_dir`) or `postgres://...`.
    pub url: Secret,
    pub replica: Option<Secret>,
    pub readers: u32,
    /// PostgreSQL: connections per pool (the primary's, and the replica's).
    pub pool_size: u32,
    /// PostgreSQL: longest wait for a pooled connection before answering 503.
    pub pool_timeout: Span,
    /// PostgreSQL with a replica: after this node writes, its reads go to the
    /// primary for this long.
    pub read_your_writes: Span,
    pub migrations_dir: Option<PathBuf>,
    pub queries: BTreeMap<String, NamedQueryConfig>,
    /// `false` makes the API read-only: execute and batch are refused.
    pub allow_writes: bool,
    pub synchronous: SqlSynchronous,
    /// How long a statement waits for a lock held by another process.
    pub busy_timeout: Span,
    /// A statement running longer is interrupted.
    pub statement_timeout: Span,
    /// Most rows one result holds.
    pub max_rows: u64,
    /// Most bytes (values, roughly) one result holds.
    pub max_result_bytes: ByteSize,
    /// Statements slower than this go to the slow-query log.
    pub slow_query_ms: u64,
    /// Distinct normalized statements tracked by the statistics.
    pub stats_max_statements: u32,
    /// When the `sql.maintenance` job runs; `""` disables the built-in schedule.
    pub maintenance_cron: String,
}

impl Default for SqlConfig {
    fn default() -> Self {
        SqlConfig {
            url: Secret("sqlite://data.sqlite".to_owned()),
            replica: None,
            readers: 4,
            pool_size: 16,
            pool_timeout: Span(Duration::from_secs(5)),
            read_your_writes: Span(Duration::from_secs(2)),
            migrations_dir: None,
            queries: BTreeMap::new(),
            allow_writes: true,
            synchronous: SqlSynchronous::Full,
            busy_timeout: Span(Duration::from_secs(5)),
            statement_timeout: Span(Duration::from_secs(5)),
            max_rows: 10_000,
            max_result_bytes: ByteSize(16 << 20),
            slow_query_ms: 200,
            stats_max_statements: 1000,
            maintenance_cron: "0 30 3 * * *".to_owned(),
        }
    }
}

/// SQLite's `synchronous` for the data database. `full`: a committed write survives a
/// power cut. `normal` (WAL): it survives a crash of keel; a power cut can lose the
/// last commits, never corrupt the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SqlSynchronous {
    #[default]
    Full,
    Normal,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NamedQueryConfig {
    pub sql: Option<String>,
    pub cache_ttl: Option<Span>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct RateLimitConfig {
    /// `redis://...` to share limits between nodes.
    pub shared: Option<Secret>,
    /// The prefix of the shared limits' keys in Redis; nodes enforcing one limit use
    /// the same prefix.
    pub redis_prefix: String,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            shared: None,
            redis_prefix: "keel:ratelimit:".to_owned(),
        }
    }
}

/// Serializes a plain string that may be a URL with credentials as `Secret` does.
/// Words without `://` (`redb`, `none`) are shown as they are.
fn serialize_redacted<S: serde::Serializer>(value: &str, serializer: S) -> Result<S::Ok, S::Error> {
    if value.contains("://") {
        serializer.serialize_str(&Secret(value.to_owned()).redacted())
    } else {
        serializer.serialize_str(value)
    }
}

/// A string that may carry a password: printed with the credentials blanked.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// URLs keep their scheme, host and path so an operator can still tell which
    /// server is meant; anything else is replaced entirely.
    pub fn redacted(&self) -> String {
        match self.0.split_once("://") {
            Some((scheme, rest)) if !rest.contains('@') => format!("{scheme}://{rest}"),
            Some((scheme, rest)) => {
                let after_credentials = rest.rsplit_once('@').map(|(_, host)| host).unwrap_or(rest);
                format!("{scheme}://<redacted>@{after_credentials}")
            }
            None => "<redacted>".to_owned(),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}
