//! The SQL data API: statements over REST on SQLite (one writer, pooled readers), named
//! queries whose cached results invalidate themselves, statistics and an analyzer.
//!
//! Cached named queries stay correct without configuration: the tables a query reads
//! come from SQLite's authorizer when it is first prepared, each write reports the
//! tables it touched, and a write to a table a cached result depends on removes that
//! result before the write is answered. A result is stored only if no write happened
//! while it was computed (`epoch`), and storing and invalidating exclude each other
//! (`fill_lock`), so a read after an acknowledged write never sees the old result.

pub mod analyze;
mod metrics;
pub mod postgres;
pub mod sqlite;
mod stats;
pub mod value;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};

use crate::cache::{Cache, Entry, Pattern, Target, expires_in};
use crate::config::SqlConfig;

pub use analyze::Analysis;
pub use metrics::SqlMetrics;
pub use postgres::{PgSettings, PgSqlBackend};
pub use sqlite::{Settings, SqliteBackend};
pub use stats::{SlowQuery, SortBy, StatementStats, StatsReport, normalize};
pub use value::{Params, params_from_json};

#[derive(Debug, Clone, thiserror::Error)]
pub enum SqlError {
    #[error("{0}")]
    BadParams(String),
    #[error("this statement writes; send it to /v1/sql/execute")]
    NotReadOnly,
    #[error("{0}")]
    NotAllowed(String),
    #[error("one statement per request; use /v1/sql/batch for several")]
    MultipleStatements,
    #[error("the statement ran longer than {0:?} and was stopped")]
    Timeout(Duration),
    #[error("the result has more than {0} rows (sql.max_rows)")]
    TooManyRows(u64),
    #[error("the result is larger than {0} bytes (sql.max_result_bytes)")]
    ResultTooLarge(usize),
    #[error("{message}")]
    Sqlite {
        /// SQLite's extended result code.
        code: i32,
        name: String,
        message: String,
    },
    #[error("writes are disabled (sql.allow_writes = false)")]
    WritesDisabled,
    #[error("no named query {0:?}")]
    UnknownQuery(String),
    #[error("statement {index}: {source}")]
    Batch {
        index: usize,
        /// Statements before it that were committed (0 in a transaction).
        committed: usize,
        source: Box<SqlError>,
    },
    #[error("{message}")]
    Postgres {
        /// PostgreSQL's SQLSTATE (`23505`).
        sqlstate: String,
        message: String,
    },
    /// The database cannot be reached now (PostgreSQL down, its pool exhausted past
    /// `sql.pool_timeout`); the same request may succeed later.
    #[error("{0}")]
    Unavailable(String),
    #[error("the SQL subsystem is shutting down")]
    Closed,
    #[error("{0}")]
    Internal(String),
}

impl From<rusqlite::Error> for SqlError {
    fn from(error: rusqlite::Error) -> Self {
        match error {
            rusqlite::Error::SqliteFailure(failure, message) => SqlError::Sqlite {
                code: failure.extended_code,
                name: code_name(failure.extended_code),
                message: message.unwrap_or_else(|| failure.to_string()),
            },
            rusqlite::Error::SqlInputError { error, msg, .. } => SqlError::Sqlite {
                code: error.extended_code,
                name: code_name(error.extended_code),
                message: msg,
            },
            rusqlite::Error::MultipleStatement => SqlError::MultipleStatements,
            rusqlite::Error::InvalidParameterCount(given, expected) => SqlError::BadParams(
                format!("the statement takes {expected} parameters, {given} were given"),
            ),
            rusqlite::Error::InvalidParameterName(name) => {
                SqlError::BadParams(format!("unknown parameter {name}"))
            }
            other => SqlError::Internal(other.to_string()),
        }
    }
}

/// `SQLITE_CONSTRAINT_UNIQUE` and friends, from SQLite's own table of names.
fn code_name(extended: i32) -> String {
    let primary = extended & 0xff;
    let base = match primary {
        1 => "SQLITE_ERROR",
        2 => "SQLITE_INTERNAL",
        3 => "SQLITE_PERM",
        4 => "SQLITE_ABORT",
        5 => "SQLITE_BUSY",
        6 => "SQLITE_LOCKED",
        7 => "SQLITE_NOMEM",
        8 => "SQLITE_READONLY",
        9 => "SQLITE_INTERRUPT",
        10 => "SQLITE_IOERR",
        11 => "SQLITE_CORRUPT",
        13 => "SQLITE_FULL",
        14 => "SQLITE_CANTOPEN",
        17 => "SQLITE_SCHEMA",
        18 => "SQLITE_TOOBIG",
        19 => "SQLITE_CONSTRAINT",
        20 => "SQLITE_MISMATCH",
        21 => "SQLITE_MISUSE",
        23 => "SQLITE_AUTH",
        25 => "SQLITE_RANGE",
        _ => return format!("SQLITE_{extended}"),
    };
    let detail = match extended {
        275 => "_CHECK",
        531 => "_COMMITHOOK",
        787 => "_FOREIGNKEY",
        1043 => "_FUNCTION",
        1299 => "_NOTNULL",
        1555 => "_PRIMARYKEY",
        1811 => "_TRIGGER",
        2067 => "_UNIQUE",
        2323 => "_VTAB",
        2579 => "_ROWID",
        3091 => "_DATATYPE",
        _ => "",
    };
    format!("{base}{detail}")
}

/// One statement and its parameters.
#[derive(Debug, Clone)]
pub struct Statement {
    pub sql: String,
    pub params: Params,
}

/// What a statement returned.
#[derive(Debug, Clone, Serialize)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Value>,
    pub rows_affected: u64,
    pub last_insert_id: Option<i64>,
    pub time_ms: f64,
}

/// What statements touched, as the named-query cache needs it: the tables a read
/// depends on, the tables a write changed, and whether the schema (or something keel
/// cannot follow, such as a trigger) changed so that every cached result must go.
#[derive(Debug, Clone, Default)]
pub struct Touched {
    pub tables_read: BTreeSet<String>,
    pub tables_written: BTreeSet<String>,
    pub changes_schema: bool,
}

/// The seam between the SQL subsystem and its database: SQLite embedded, or
/// PostgreSQL when scaled out. `Sql` keeps everything above it (limits of the API,
/// statistics, metrics, the named-query cache and its invalidation) the same for both.
#[async_trait::async_trait]
pub trait SqlBackend: Send + Sync + 'static {
    /// `sqlite` or `postgres`, for logs and `/v1/system`.
    fn kind(&self) -> &'static str;

    /// A read: refused with `NotReadOnly` when the database says the statement writes.
    /// Returns the tables it read (exactly, through views) when `want_tables`.
    async fn run_read(
        &self,
        statement: Statement,
        limits: SqlLimits,
        want_tables: bool,
    ) -> Result<(ResultSet, Touched), SqlError>;

    /// One statement on the primary, committed before it returns.
    async fn run_write(
        &self,
        statement: Statement,
        limits: SqlLimits,
    ) -> Result<(ResultSet, Touched), SqlError>;

    /// Several statements in one transaction: all commit or none. A failure is
    /// `SqlError::Batch` with its index and `committed: 0`.
    async fn run_transaction(
        &self,
        statements: Vec<Statement>,
        limits: SqlLimits,
    ) -> Result<(Vec<ResultSet>, Touched), SqlError>;

    /// The plan, findings and a proved index proposal (`POST /v1/sql/analyze`).
    async fn analyze(&self, sql: String) -> Result<Analysis, SqlError>;

    /// The `sql.maintenance` job's work.
    async fn maintenance(&self) -> Result<Value, SqlError>;

    /// A consistent copy into `destination`; `None` when the database is external
    /// (PostgreSQL is backed up with its own tools).
    async fn backup(&self, destination: std::path::PathBuf) -> Result<bool, SqlError>;

    /// The busiest statements by the database's own statistics, where it keeps them
    /// (PostgreSQL's `pg_stat_statements`); `None` when keel's own figures are the
    /// source.
    async fn statement_stats(
        &self,
        _sort: SortBy,
        _limit: usize,
    ) -> Result<Option<StatsReport>, SqlError> {
        Ok(None)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SqlLimits {
    pub statement_timeout: Duration,
    pub max_rows: u64,
    pub max_result_bytes: usize,
}

struct NamedQuery {
    sql: String,
    cache_ttl: Option<Duration>,
}

/// The SQL subsystem's handle. Cheap to clone.
#[derive(Clone)]
pub struct Sql {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn SqlBackend>,
    limits: SqlLimits,
    allow_writes: bool,
    stats: stats::Stats,
    metrics: SqlMetrics,
    queries: HashMap<String, NamedQuery>,
    cache: Option<Cache>,
    /// Bumped by every committed write, before its invalidation.
    epoch: AtomicU64,
    /// Writers invalidate under `write`; named-query fills store under `read`.
    fill_lock: tokio::sync::RwLock<()>,
    /// Tables some cached named query reads.
    cached_tables: Mutex<BTreeSet<String>>,
}

/// Cache keys of named-query results start with this; tags are `sql:t:TABLE`.
const CACHE_PREFIX: &str = "sql:q:";

/// The statement's text from its first word: leading blanks and comments skipped.
fn after_leading_comments(sql: &str) -> &str {
    let mut rest = sql.trim_start();
    loop {
        let tail = if let Some(after) = rest.strip_prefix("--") {
            after.split_once('\n').map_or("", |(_, tail)| tail)
        } else if let Some(after) = rest.strip_prefix("/*") {
            after.split_once("*/").map_or("", |(_, tail)| tail)
        } else {
            return rest;
        };
        rest = tail.trim_start();
    }
}

fn table_tag(table: &str) -> String {
    format!("sql:t:{}", table.to_ascii_lowercase())
}

impl Sql {
    pub fn new(
        backend: Arc<dyn SqlBackend>,
        config: &SqlConfig,
        cache: Option<Cache>,
        metrics: SqlMetrics,
    ) -> Sql {
        Sql {
            inner: Arc::new(Inner {
                backend,
                limits: SqlLimits {
                    statement_timeout: config.statement_timeout.0,
                    max_rows: config.max_rows,
                    max_result_bytes: config.max_result_bytes.0 as usize,
                },
                allow_writes: config.allow_writes,
                stats: stats::Stats::new(
                    config.stats_max_statements as usize,
                    Duration::from_millis(config.slow_query_ms),
                ),
                metrics,
                queries: config
                    .queries
                    .iter()
                    .filter_map(|(name, query)| {
                        Some((
                            name.clone(),
                            NamedQuery {
                                sql: query.sql.clone()?,
                                cache_ttl: query.cache_ttl.map(|ttl| ttl.0),
                            },
                        ))
                    })
                    .collect(),
                cache,
                epoch: AtomicU64::new(0),
                fill_lock: tokio::sync::RwLock::new(()),
                cached_tables: Mutex::new(BTreeSet::new()),
            }),
        }
    }

    /// `sqlite` or `postgres`.
    pub fn backend_kind(&self) -> &'static str {
        self.inner.backend.kind()
    }

    pub async fn analyze(&self, sql: String) -> Result<Analysis, SqlError> {
        self.inner.backend.analyze(sql).await
    }

    fn observe(
        &self,
        kind: &'static str,
        sql: &str,
        started: Instant,
        outcome: Result<u64, &SqlError>,
    ) {
        let elapsed = started.elapsed();
        let inner = &self.inner;
        inner.metrics.statements.with_label_values(&[kind]).inc();
        inner
            .metrics
            .statement_seconds
            .with_label_values(&[kind])
            .observe(elapsed.as_secs_f64());
        if let Err(error) = outcome {
            inner
                .metrics
                .errors
                .with_label_values(&[error_label(error)])
                .inc();
        }
        let rows = *outcome.as_ref().unwrap_or(&0);
        let slow = inner
            .stats
            .record(sql, elapsed, rows, outcome.is_err(), crate::cache::now_ms());
        if slow {
            inner.metrics.slow_queries.inc();
            tracing::warn!(
                statement = normalize(sql),
                ms = elapsed.as_millis() as u64,
                "slow query"
            );
        }
    }

    /// A read: refused if SQLite says the statement writes.
    pub async fn query(&self, statement: Statement) -> Result<ResultSet, SqlError> {
        let started = Instant::now();
        let sql = statement.sql.clone();
        let limits = self.inner.limits;
        let outcome = self
            .inner
            .backend
            .run_read(statement, limits, false)
            .await
            .map(|(result, _)| result);
        self.observe(
            "read",
            &sql,
            started,
            outcome.as_ref().map(|r| r.rows.len() as u64),
        );
        outcome
    }

    /// A write (or any statement) on the writer, committed before it is answered.
    ///
    /// Runs on a task of its own: a write commits even when its caller goes away (a
    /// client hanging up), and the invalidation of cached results must follow it.
    pub async fn execute(&self, statement: Statement) -> Result<ResultSet, SqlError> {
        let sql = self.clone();
        tokio::spawn(async move { sql.execute_now(statement).await })
            .await
            .map_err(|error| SqlError::Internal(format!("a write task failed: {error}")))?
    }

    async fn execute_now(&self, statement: Statement) -> Result<ResultSet, SqlError> {
        if !self.inner.allow_writes {
            return Err(SqlError::WritesDisabled);
        }
        let started = Instant::now();
        let sql = statement.sql.clone();
        let limits = self.inner.limits;
        let outcome = self.inner.backend.run_write(statement, limits).await;
        let outcome = match outcome {
            Ok((result, info)) => {
                self.after_write(&info.tables_written, info.changes_schema)
                    .await;
                Ok(result)
            }
            Err(error) => Err(error),
        };
        self.observe(
            "write",
            &sql,
            started,
            outcome.as_ref().map(|r| r.rows_affected),
        );
        outcome
    }

    /// Several statements: with `transaction`, all commit or none; without, each commits
    /// on its own and the first failure stops the rest. On a task of its own, like
    /// `execute`.
    pub async fn batch(
        &self,
        statements: Vec<Statement>,
        transaction: bool,
    ) -> Result<Vec<ResultSet>, SqlError> {
        let sql = self.clone();
        tokio::spawn(async move { sql.batch_now(statements, transaction).await })
            .await
            .map_err(|error| SqlError::Internal(format!("a write task failed: {error}")))?
    }

    async fn batch_now(
        &self,
        statements: Vec<Statement>,
        transaction: bool,
    ) -> Result<Vec<ResultSet>, SqlError> {
        if !self.inner.allow_writes {
            return Err(SqlError::WritesDisabled);
        }
        if statements.is_empty() || statements.len() > 1000 {
            return Err(SqlError::BadParams(
                "a batch holds 1 to 1000 statements".to_owned(),
            ));
        }
        let limits = self.inner.limits;
        if !transaction {
            let mut results = Vec::with_capacity(statements.len());
            for (index, statement) in statements.into_iter().enumerate() {
                match self.execute_now(statement).await {
                    Ok(result) => results.push(result),
                    Err(error) => {
                        return Err(SqlError::Batch {
                            index,
                            committed: index,
                            source: Box::new(error),
                        });
                    }
                }
            }
            return Ok(results);
        }
        let started = Instant::now();
        let texts: Vec<String> = statements.iter().map(|s| s.sql.clone()).collect();
        let outcome = self.inner.backend.run_transaction(statements, limits).await;
        let outcome = match outcome {
            Ok((results, touched)) => {
                self.after_write(&touched.tables_written, touched.changes_schema)
                    .await;
                Ok(results)
            }
            Err(error) => Err(error),
        };
        for sql in &texts {
            self.observe("batch", sql, started, outcome.as_ref().map(|_| 0));
        }
        outcome
    }

    /// Runs before a write is answered: drops cached results that read its tables.
    async fn after_write(&self, tables: &BTreeSet<String>, schema_changed: bool) {
        let inner = &self.inner;
        inner.epoch.fetch_add(1, Ordering::SeqCst);
        let Some(cache) = &inner.cache else {
            return;
        };
        let tags: Vec<String> = {
            let cached = inner.cached_tables.lock().expect("tables lock");
            tables
                .iter()
                .map(|table| table.to_ascii_lowercase())
                .filter(|table| cached.contains(table))
                .map(|table| table_tag(&table))
                .collect()
        };
        if tags.is_empty() && !schema_changed {
            return;
        }
        let _exclusive = inner.fill_lock.write().await;
        let target = if schema_changed {
            Target::Pattern(Pattern::new(format!("{CACHE_PREFIX}*").as_bytes()))
        } else {
            Target::Tags(tags)
        };
        if let Err(error) = cache.invalidate(target).await {
            // The write is committed; a failed invalidation must not leave stale
            // results behind, so every cached query result goes.
            tracing::error!(%error, "sql: invalidating cached results failed; clearing them all");
            let everything = Target::Pattern(Pattern::new(format!("{CACHE_PREFIX}*").as_bytes()));
            let _ = cache.invalidate(everything).await;
        }
    }

    pub fn query_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.queries.keys().cloned().collect();
        names.sort();
        names
    }

    /// Runs a named query with URL parameters; cached results when it has `cache_ttl`.
    /// Returns the result and whether it came from the cache.
    pub async fn named(
        &self,
        name: &str,
        params: BTreeMap<String, String>,
    ) -> Result<(Bytes, bool), SqlError> {
        let inner = &self.inner;
        let query = inner
            .queries
            .get(name)
            .ok_or_else(|| SqlError::UnknownQuery(name.to_owned()))?;
        let statement = || Statement {
            sql: query.sql.clone(),
            params: Params::Named(
                params
                    .iter()
                    .map(|(key, value)| (key.clone(), value::param_from_query(value)))
                    .collect(),
            ),
        };
        let (Some(cache), Some(ttl)) = (&inner.cache, query.cache_ttl) else {
            let result = self.query(statement()).await?;
            return Ok((
                Bytes::from(serde_json::to_vec(&result).expect("json")),
                false,
            ));
        };
        let key = cache_key(name, &params);
        // The hit path is the hot one: no statement, no label lookups.
        if let Ok(Some(entry)) = cache.get(key.as_bytes()).await {
            inner.metrics.named_cache_hits.inc();
            return Ok((entry.value, true));
        }
        inner.metrics.named_cache_misses.inc();
        let statement = statement();
        let before = inner.epoch.load(Ordering::SeqCst);
        let started = Instant::now();
        let sql = statement.sql.clone();
        let limits = inner.limits;
        let outcome = inner.backend.run_read(statement, limits, true).await;
        self.observe(
            "read",
            &sql,
            started,
            outcome.as_ref().map(|(r, _)| r.rows.len() as u64),
        );
        let (result, info) = outcome?;
        let body = Bytes::from(serde_json::to_vec(&result).expect("json"));
        let tables: Vec<String> = info
            .tables_read
            .iter()
            .map(|table| table.to_ascii_lowercase())
            .collect();
        // Registered before the epoch check: a write that commits after the check
        // sees these tables and invalidates what is stored below.
        inner
            .cached_tables
            .lock()
            .expect("tables lock")
            .extend(tables.iter().cloned());
        let _shared = inner.fill_lock.read().await;
        if inner.epoch.load(Ordering::SeqCst) == before {
            let entry = Entry {
                value: body.clone(),
                expires_at: Some(expires_in(ttl)),
                tags: Some(
                    tables
                        .iter()
                        .map(|t| table_tag(t))
                        .collect::<Vec<_>>()
                        .into(),
                ),
            };
            if let Err(error) = cache.set(key.as_bytes(), entry).await {
                tracing::warn!(%error, query = name, "sql: cannot cache a named query result");
            }
        }
        Ok((body, false))
    }

    /// The busiest statements: the database's own figures when it keeps them
    /// (pg_stat_statements), else keel's, which are also the fallback when the
    /// database's cannot be read (PostgreSQL away).
    pub async fn stats(&self, sort: SortBy, limit: usize) -> StatsReport {
        match self.inner.backend.statement_stats(sort, limit).await {
            Ok(Some(report)) => return report,
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(%error, "sql: the database's statement statistics are unreadable; reporting keel's own");
            }
        }
        StatsReport {
            source: "keel",
            statements: self.inner.stats.top(sort, limit),
            // At most `sql.stats_max_statements`.
            tracked: self.inner.stats.tracked(),
        }
    }

    pub fn slow_queries(&self) -> Vec<SlowQuery> {
        self.inner.stats.slow()
    }

    pub fn reset_stats(&self) {
        self.inner.stats.reset();
    }

    /// The database's housekeeping (SQLite: optimize, ANALYZE, incremental vacuum, a
    /// WAL checkpoint), the `sql.maintenance` job.
    pub async fn maintenance(&self) -> Result<Value, SqlError> {
        let started = Instant::now();
        let outcome = self.inner.backend.maintenance().await?;
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
        Ok(json!({ "maintenance": outcome, "ms": started.elapsed().as_millis() as u64 }))
    }

    /// A consistent copy of the database; false when the database is external and is
    /// backed up with its own tools.
    pub async fn backup(&self, destination: std::path::PathBuf) -> Result<bool, SqlError> {
        self.inner.backend.backup(destination).await
    }
}

fn cache_key(name: &str, params: &BTreeMap<String, String>) -> String {
    use std::fmt::Write;
    fn encode(text: &str) -> percent_encoding::PercentEncode<'_> {
        percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC)
    }
    let mut key = String::with_capacity(CACHE_PREFIX.len() + name.len() + 32);
    key.push_str(CACHE_PREFIX);
    key.push_str(name);
    key.push('?');
    for (index, (param, value)) in params.iter().enumerate() {
        if index > 0 {
            key.push('&');
        }
        let _ = write!(key, "{}={}", encode(param), encode(value));
    }
    key
}

fn error_label(error: &SqlError) -> &'static str {
    match error {
        SqlError::BadParams(_) => "bad_params",
        SqlError::NotReadOnly => "not_read_only",
        SqlError::NotAllowed(_) => "not_allowed",
        SqlError::MultipleStatements => "multiple_statements",
        SqlError::Timeout(_) => "timeout",
        SqlError::TooManyRows(_) => "too_many_rows",
        SqlError::ResultTooLarge(_) => "result_too_large",
        SqlError::Sqlite { .. } => "sqlite",
        SqlError::Postgres { .. } => "postgres",
        SqlError::Unavailable(_) => "unavailable",
        SqlError::WritesDisabled => "writes_disabled",
        SqlError::UnknownQuery(_) => "unknown_query",
        SqlError::Batch { .. } => "batch",
        SqlError::Closed | SqlError::Internal(_) => "internal",
    }
}

/// The `query` cache loader: runs a named query with `:key` bound to the cache key and
/// returns its rows as JSON; no rows is "not found".
pub struct QueryLoader {
    pub sql: Sql,
    pub query: String,
}

#[async_trait::async_trait]
impl crate::cache::loader::Loader for QueryLoader {
    async fn load(&self, key: &str) -> Result<Bytes, crate::cache::loader::LoadError> {
        use crate::cache::loader::LoadError;
        let query = self
            .sql
            .inner
            .queries
            .get(&self.query)
            .ok_or_else(|| LoadError::Failed(format!("no named query {:?}", self.query)))?;
        let statement = Statement {
            sql: query.sql.clone(),
            params: Params::Named(vec![("key".to_owned(), value::param_from_query(key))]),
        };
        let result = self
            .sql
            .query(statement)
            .await
            .map_err(|error| LoadError::Failed(error.to_string()))?;
        if result.rows.is_empty() {
            return Err(LoadError::NotFound);
        }
        Ok(Bytes::from(serde_json::to_vec(&result).expect("json")))
    }
}

/// The `sql.maintenance` queue processor.
pub struct MaintenanceProcessor {
    pub sql: Sql,
}

#[async_trait::async_trait]
impl crate::queue::Processor for MaintenanceProcessor {
    async fn process(&self, _job: &crate::queue::Job) -> Result<Value, String> {
        self.sql
            .maintenance()
            .await
            .map_err(|error| error.to_string())
    }
}
