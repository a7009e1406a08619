//! The PostgreSQL backend (`sql.url = "postgres://..."`): the same API on a pool of
//! connections to a primary, and reads on `sql.replica` when one is configured.
//!
//! Every statement runs in a transaction of its own with `SET LOCAL statement_timeout`.
//! Reads run in `READ ONLY` transactions, ended with ROLLBACK: PostgreSQL itself refuses
//! a write on the read path (SQLSTATE 25006, answered `not_read_only`), so a write can
//! never reach the replica, and a `SET` made by a read does not outlive it on the pooled
//! connection. Nothing is classified by reading SQL text.
//!
//! Read-your-writes is per node, not per client: after this node commits a write, all
//! its reads go to the primary for `sql.read_your_writes`. That is stronger than per
//! client, and it is what the named-query cache needs: a result computed after a write
//! must include it, whoever asked.
//!
//! Tables for the named-query cache come from PostgreSQL's planner, once per statement
//! text: `EXPLAIN (VERBOSE, FORMAT JSON)` names every relation a read scans (views are
//! expanded to their tables) and the `ModifyTable` target of a write. A write the planner
//! cannot explain (DDL, TRUNCATE) or to a table with triggers or cascading foreign keys
//! (which write tables the plan does not show) counts as a schema change and drops every
//! cached result: over-invalidation, never a stale result.

use std::collections::{BTreeSet, HashMap};
use std::error::Error as StdError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{BufMut, BytesMut};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::{TryStreamExt, pin_mut};
use rusqlite::types::Value as SqliteValue;
use serde_json::{Map, Value, json};
use tokio_postgres::NoTls;
use tokio_postgres::types::{FromSql, IsNull, Kind, ToSql, Type, to_sql_checked};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::analyze::Analysis;
use super::value::{Param, Params};
use super::{
    ResultSet, SortBy, SqlBackend, SqlError, SqlLimits, SqlMetrics, Statement, StatementStats,
    StatsReport, Touched,
};
use crate::observe::Dependency;
use crate::pg_pool::{PgPool, PgPoolError};

/// How the pool reaches PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgSettings {
    pub url: String,
    pub replica: Option<String>,
    pub pool_size: usize,
    /// Longest wait for a connection (and to open one) before `Unavailable`.
    pub pool_timeout: Duration,
    /// After a write, reads go to the primary for this long.
    pub read_your_writes: Duration,
}

pub struct PgSqlBackend {
    /// Reports to the `postgres` dependency, the replica's to `postgres_replica`.
    primary: Arc<PgPool>,
    replica: Option<Arc<PgPool>>,
    settings: PgSettings,
    /// `keel_sql_readers_*` count pooled connections here, of both pools.
    metrics: SqlMetrics,
    /// When this node last committed a write.
    last_write: Mutex<Option<Instant>>,
    /// What each statement text touches, learned from EXPLAIN once; cleared when the
    /// schema changes through keel.
    touched: Mutex<HashMap<String, Touched>>,
    /// Stops the pools' probes when the backend goes away.
    _probes: DropGuard,
}

/// A pooled connection, counted in `keel_sql_readers_in_use` while a statement holds it
/// and no longer once it is back in the pool (also when its request was dropped
/// mid-call). Counted here, not from the pool's status, which counts requests still
/// waiting for a connection as users too.
struct Connection<'a> {
    client: Option<deadpool_postgres::Object>,
    backend: &'a PgSqlBackend,
}

impl std::ops::Deref for Connection<'_> {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &Self::Target {
        self.client.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Connection<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.client.as_mut().expect("held until dropped")
    }
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        drop(self.client.take());
        self.backend.metrics.readers_in_use.dec();
        self.backend.count_idle();
    }
}

/// Most statement texts whose tables are remembered.
const TOUCHED_CACHE: usize = 1024;

fn pool(url: &str, key: &str, settings: &PgSettings) -> Result<Pool, SqlError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|error| SqlError::Internal(format!("{key} is not a PostgreSQL URL: {error}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(settings.pool_timeout);
    }
    // A vanished server must fail calls in seconds, not after TCP retransmissions.
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(10));
    }
    config.application_name("keel-sql");
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.pool_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(settings.pool_timeout))
        .create_timeout(Some(settings.pool_timeout))
        .recycle_timeout(Some(settings.pool_timeout))
        .build()
        .map_err(|error| SqlError::Internal(format!("cannot build the {key} pool: {error}")))
}

/// A PostgreSQL error as the API reports it: a lost or refused connection is
/// `Unavailable`; anything PostgreSQL answered keeps its SQLSTATE.
pub(crate) fn pg(error: tokio_postgres::Error) -> SqlError {
    let Some(db) = error.as_db_error() else {
        // A value that does not convert to its parameter's type never left keel.
        // (tokio-postgres's error kinds are private; its message is the only sign.)
        if error.to_string().starts_with("error serializing parameter") {
            let cause = StdError::source(&error).map(ToString::to_string);
            return SqlError::BadParams(match cause {
                Some(cause) => format!("{error}: {cause}"),
                None => error.to_string(),
            });
        }
        // The cause (refused, timed out, reset) is in the source, not the message.
        return match StdError::source(&error) {
            Some(cause) => SqlError::Unavailable(format!("PostgreSQL: {error}: {cause}")),
            None => SqlError::Unavailable(format!("PostgreSQL: {error}")),
        };
    };
    let code = db.code().code();
    match code {
        // 08: connection exception, 53: insufficient resources, 57P: shutting down.
        _ if code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") => {
            SqlError::Unavailable(format!("PostgreSQL: {}", db.message()))
        }
        "25006" => SqlError::NotReadOnly,
        "42601" if db.message().contains("multiple commands") => SqlError::MultipleStatements,
        _ => SqlError::Postgres {
            sqlstate: code.to_owned(),
            message: db.message().to_owned(),
        },
    }
}

fn pool_error(error: PgPoolError) -> SqlError {
    match error {
        PgPoolError::Pool(deadpool_postgres::PoolError::Backend(error)) => pg(error),
        other => SqlError::Unavailable(format!("PostgreSQL: {other}")),
    }
}

/// The errors that say PostgreSQL could not be reached (its dependency's failures).
fn unreachable(error: &SqlError) -> bool {
    match error {
        SqlError::Unavailable(_) => true,
        SqlError::Batch { source, .. } => unreachable(source),
        _ => false,
    }
}

/// The statement-level errors that depend on the limits.
fn with_limits(error: tokio_postgres::Error, limits: &SqlLimits) -> SqlError {
    match error.code() {
        Some(code) if code.code() == "57014" => SqlError::Timeout(limits.statement_timeout),
        _ => pg(error),
    }
}

impl PgSqlBackend {
    /// Builds the pools and checks that the primary (and the replica) answer, so a
    /// keel pointed at an unreachable PostgreSQL stops at start instead of serving 503s.
    /// Every call on the primary reports to `primary`, on the replica to `replica`
    /// (required with `sql.replica`).
    pub async fn open(
        settings: PgSettings,
        metrics: SqlMetrics,
        primary: Dependency,
        replica: Option<Dependency>,
    ) -> Result<PgSqlBackend, SqlError> {
        let primary = Arc::new(PgPool::new(
            pool(&settings.url, "sql.url", &settings)?,
            primary,
        ));
        let replica = match (&settings.replica, replica) {
            (Some(url), Some(dependency)) => Some(Arc::new(PgPool::new(
                pool(url, "sql.replica", &settings)?,
                dependency,
            ))),
            (Some(_), None) => {
                return Err(SqlError::Internal(
                    "sql.replica needs its dependency".to_owned(),
                ));
            }
            (None, _) => None,
        };
        for (key, pool) in std::iter::once(("sql.url", &primary))
            .chain(replica.as_ref().map(|pool| ("sql.replica", pool)))
        {
            let client = pool
                .get()
                .await
                .map_err(|error| SqlError::Unavailable(format!("{key}: {}", pool_error(error))))?;
            let answered = client.simple_query("SELECT 1").await;
            pool.report(&answered, |_| true);
            answered.map_err(|error| SqlError::Unavailable(format!("{key}: {}", pg(error))))?;
        }
        let stop = CancellationToken::new();
        for pool in std::iter::once(&primary).chain(replica.as_ref()) {
            tokio::spawn(pool.clone().probe(stop.clone()));
        }
        Ok(PgSqlBackend {
            primary,
            replica,
            settings,
            metrics,
            last_write: Mutex::new(None),
            touched: Mutex::new(HashMap::new()),
            _probes: stop.drop_guard(),
        })
    }

    fn pools(&self) -> impl Iterator<Item = &Arc<PgPool>> {
        std::iter::once(&self.primary).chain(self.replica.as_ref())
    }

    /// The replica unless this node wrote within `sql.read_your_writes`.
    fn read_pool(&self) -> &PgPool {
        match &self.replica {
            Some(replica) => {
                let last = *self.last_write.lock().expect("last write lock");
                let recent = last.is_some_and(|at| at.elapsed() < self.settings.read_your_writes);
                if recent { &self.primary } else { replica }
            }
            None => &self.primary,
        }
    }

    /// Runs `call` on a connection from `pool` and tells the pool's dependency whether
    /// PostgreSQL answered.
    async fn on<T>(
        &self,
        pool: &PgPool,
        call: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, SqlError>,
    ) -> Result<T, SqlError> {
        let mut client = self.connection(pool).await?;
        let outcome = call(&mut client).await;
        pool.report(&outcome, unreachable);
        outcome
    }

    /// A connection from `pool`, its wait and the pools' use recorded.
    async fn connection(&self, pool: &PgPool) -> Result<Connection<'_>, SqlError> {
        let waited = Instant::now();
        let client = pool.get().await.map_err(pool_error);
        self.metrics
            .reader_wait_seconds
            .observe(waited.elapsed().as_secs_f64());
        let client = client?;
        self.metrics.readers_in_use.inc();
        self.count_idle();
        Ok(Connection {
            client: Some(client),
            backend: self,
        })
    }

    /// `keel_sql_readers_idle`: the pools' open connections that no statement holds.
    fn count_idle(&self) {
        let open: usize = self.pools().map(|pool| pool.pool().status().size).sum();
        let idle = open as i64 - self.metrics.readers_in_use.get();
        self.metrics.readers_idle.set(idle.max(0));
    }

    fn wrote(&self) {
        *self.last_write.lock().expect("last write lock") = Some(Instant::now());
    }

    fn remembered(&self, sql: &str) -> Option<Touched> {
        self.touched.lock().expect("touched lock").get(sql).cloned()
    }

    fn remember(&self, sql: &str, touched: &Touched) {
        let mut cache = self.touched.lock().expect("touched lock");
        if touched.changes_schema {
            // What other statements touch may have changed with the schema.
            cache.clear();
            return;
        }
        if cache.len() >= TOUCHED_CACHE {
            cache.clear();
        }
        cache.insert(sql.to_owned(), touched.clone());
    }

    /// Runs statements on the primary in one transaction, committed before it returns.
    /// With `batch`, a failure is `SqlError::Batch` naming its statement.
    async fn write_all(
        &self,
        statements: Vec<Statement>,
        limits: SqlLimits,
        batch: bool,
    ) -> Result<(Vec<ResultSet>, Touched), SqlError> {
        self.on(&self.primary, async |client| {
            let txn = client.transaction().await.map_err(pg)?;
            set_timeout(&txn, &limits).await?;
            let mut results = Vec::with_capacity(statements.len());
            let mut touched = Touched::default();
            for (index, statement) in statements.iter().enumerate() {
                let outcome = async {
                    refuse_session_changes(&statement.sql)?;
                    let (text, values) = translate(&statement.sql, &statement.params)?;
                    let key = format!("w:{}", statement.sql);
                    let learned = match self.remembered(&key) {
                        Some(known) => known,
                        None => {
                            let learned = written_by(&txn, &text, &values).await?;
                            self.remember(&key, &learned);
                            learned
                        }
                    };
                    let result = run(&txn, &text, &values, &limits, true).await?;
                    Ok::<_, SqlError>((result, learned))
                }
                .await;
                match outcome {
                    Ok((result, learned)) => {
                        touched.tables_written.extend(learned.tables_written);
                        touched.changes_schema |= learned.changes_schema;
                        results.push(result);
                    }
                    Err(error) if batch => {
                        return Err(SqlError::Batch {
                            index,
                            committed: 0,
                            source: Box::new(error),
                        });
                    }
                    Err(error) => return Err(error),
                }
            }
            txn.commit().await.map_err(pg)?;
            self.wrote();
            if touched.changes_schema {
                self.touched.lock().expect("touched lock").clear();
            }
            Ok((results, touched))
        })
        .await
    }
}

async fn set_timeout(
    txn: &deadpool_postgres::Transaction<'_>,
    limits: &SqlLimits,
) -> Result<(), SqlError> {
    txn.batch_execute(&format!(
        "SET LOCAL statement_timeout = {}",
        limits.statement_timeout.as_millis().max(1)
    ))
    .await
    .map_err(pg)
}

/// Statements that would end keel's transaction or change a pooled session for the
/// requests after this one.
fn refuse_session_changes(sql: &str) -> Result<(), SqlError> {
    let words: Vec<String> = first_words(sql, 2);
    let first = words.first().map(String::as_str).unwrap_or("");
    let second = words.get(1).map(String::as_str).unwrap_or("");
    match first {
        "begin" | "start" | "commit" | "end" | "rollback" | "abort" | "savepoint" | "release"
        | "prepare"
            if first != "prepare" || second == "transaction" =>
        {
            Err(SqlError::NotAllowed(
                "transactions are managed by keel: use /v1/sql/batch with \"transaction\": true"
                    .to_owned(),
            ))
        }
        "set" if second != "local" => Err(SqlError::NotAllowed(
            "SET outlives the request on a pooled connection; use SET LOCAL".to_owned(),
        )),
        "reset" | "discard" | "listen" | "unlisten" | "load" => Err(SqlError::NotAllowed(format!(
            "{} is not allowed on a pooled connection",
            first.to_uppercase()
        ))),
        _ => Ok(()),
    }
}

/// The first `n` words of the text, lowercase, after comments.
fn first_words(sql: &str, n: usize) -> Vec<String> {
    let rest = super::after_leading_comments(sql);
    rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| !word.is_empty())
        .take(n)
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Prepares, binds and runs one statement, collecting rows within the limits.
async fn run(
    txn: &deadpool_postgres::Transaction<'_>,
    text: &str,
    values: &[Param],
    limits: &SqlLimits,
    writes: bool,
) -> Result<ResultSet, SqlError> {
    let started = Instant::now();
    let prepared = txn
        .prepare(text)
        .await
        .map_err(|e| with_limits(e, limits))?;
    check_count(prepared.params().len(), values.len())?;
    let columns: Vec<String> = prepared
        .columns()
        .iter()
        .map(|column| column.name().to_owned())
        .collect();
    let bound: Vec<Bound<'_>> = values.iter().map(|value| Bound(&value.0)).collect();
    let stream = txn
        .query_raw(&prepared, bound.iter().map(|b| b as &(dyn ToSql + Sync)))
        .await
        .map_err(|e| with_limits(e, limits))?;
    pin_mut!(stream);
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = stream
        .try_next()
        .await
        .map_err(|e| with_limits(e, limits))?
    {
        if rows.len() as u64 >= limits.max_rows {
            return Err(SqlError::TooManyRows(limits.max_rows));
        }
        let mut cells = Vec::with_capacity(columns.len());
        for (index, column) in columns.iter().enumerate() {
            let Cell(cell, size) =
                row.try_get::<_, Cell>(index)
                    .map_err(|error| SqlError::Postgres {
                        sqlstate: "0A000".to_owned(),
                        message: format!(
                            "column {column:?}: {error}; cast it in the query (for example ::text)"
                        ),
                    })?;
            bytes += size;
            cells.push(cell);
        }
        if bytes > limits.max_result_bytes {
            return Err(SqlError::ResultTooLarge(limits.max_result_bytes));
        }
        rows.push(Value::Array(cells));
    }
    let affected = stream.rows_affected().unwrap_or(0);
    Ok(ResultSet {
        columns,
        rows,
        rows_affected: if writes { affected } else { 0 },
        // PostgreSQL has no "last rowid"; `RETURNING id` says it exactly.
        last_insert_id: None,
        time_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

fn check_count(expected: usize, given: usize) -> Result<(), SqlError> {
    if expected == given {
        Ok(())
    } else {
        Err(SqlError::BadParams(format!(
            "the statement takes {expected} parameters, {given} were given"
        )))
    }
}

/// The plan of a statement, as PostgreSQL's JSON.
async fn explain(
    txn: &deadpool_postgres::Transaction<'_>,
    options: &str,
    text: &str,
    values: &[Param],
) -> Result<Value, tokio_postgres::Error> {
    let bound: Vec<Bound<'_>> = values.iter().map(|value| Bound(&value.0)).collect();
    let params: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|b| b as &(dyn ToSql + Sync)).collect();
    let row = txn
        .query_one(&format!("EXPLAIN ({options}) {text}"), &params)
        .await?;
    row.try_get::<_, Value>(0)
}

/// Every `Schema.Relation Name` in a plan; with `modified_only`, only ModifyTable targets.
fn relations(plan: &Value, modified_only: bool, out: &mut BTreeSet<String>) {
    match plan {
        Value::Object(node) => {
            let modifies = node.get("Node Type").and_then(Value::as_str) == Some("ModifyTable");
            if (!modified_only || modifies)
                && let Some(name) = node.get("Relation Name").and_then(Value::as_str)
            {
                let schema = node.get("Schema").and_then(Value::as_str).unwrap_or("");
                out.insert(qualified(schema, name));
            }
            for child in node.values() {
                relations(child, modified_only, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                relations(item, modified_only, out);
            }
        }
        _ => {}
    }
}

fn qualified(schema: &str, table: &str) -> String {
    if schema.is_empty() {
        table.to_ascii_lowercase()
    } else {
        format!("{schema}.{table}").to_ascii_lowercase()
    }
}

/// The tables a read scans, from its plan.
async fn read_by(
    txn: &deadpool_postgres::Transaction<'_>,
    text: &str,
    values: &[Param],
) -> Result<Touched, SqlError> {
    let plan = explain(txn, "VERBOSE, FORMAT JSON", text, values)
        .await
        .map_err(pg)?;
    let mut touched = Touched::default();
    relations(&plan, false, &mut touched.tables_read);
    Ok(touched)
}

/// The tables a write changes: its plan's ModifyTable targets, or "everything" when
/// the planner cannot say (utility statements) or the targets write elsewhere
/// (triggers, cascading foreign keys). Runs under a savepoint: a failing EXPLAIN must
/// not abort the transaction the statement runs in.
async fn written_by(
    txn: &deadpool_postgres::Transaction<'_>,
    text: &str,
    values: &[Param],
) -> Result<Touched, SqlError> {
    let mut touched = Touched::default();
    txn.batch_execute("SAVEPOINT keel_explain")
        .await
        .map_err(pg)?;
    let plan = match explain(txn, "VERBOSE, FORMAT JSON", text, values).await {
        Ok(plan) => {
            txn.batch_execute("RELEASE keel_explain")
                .await
                .map_err(pg)?;
            plan
        }
        Err(error) => {
            txn.batch_execute("ROLLBACK TO keel_explain; RELEASE keel_explain")
                .await
                .map_err(pg)?;
            if error.as_db_error().is_none() {
                return Err(pg(error));
            }
            touched.changes_schema = true;
            return Ok(touched);
        }
    };
    relations(&plan, true, &mut touched.tables_written);
    // No table modified in the plan, yet sent as a write: a function it calls may write
    // (`SELECT archive_posts()`), which no plan shows.
    if touched.tables_written.is_empty() {
        touched.changes_schema = true;
    }
    for table in &touched.tables_written {
        let (schema, name) = table.split_once('.').unwrap_or(("", table));
        // RI_FKey_check_* and the no-action/restrict ones only read; any other trigger
        // (user triggers, ON DELETE CASCADE / SET NULL) writes tables the plan omits.
        let writers: i64 = txn
            .query_one(
                "SELECT count(*) FROM pg_trigger t \
                 JOIN pg_class c ON c.oid = t.tgrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_proc p ON p.oid = t.tgfoid \
                 WHERE n.nspname = $1 AND c.relname = $2 AND p.proname NOT IN \
                 ('RI_FKey_check_ins', 'RI_FKey_check_upd', 'RI_FKey_noaction_del', \
                  'RI_FKey_noaction_upd', 'RI_FKey_restrict_del', 'RI_FKey_restrict_upd')",
                &[&schema, &name],
            )
            .await
            .map_err(pg)?
            .get(0);
        if writers > 0 {
            touched.changes_schema = true;
        }
    }
    Ok(touched)
}

/// Why the site's migrations could not be applied on PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum PgMigrationError {
    #[error(
        "sql migration {version:04}_{name} changed after it was applied (recorded {recorded}, now {current})"
    )]
    Changed {
        version: u32,
        name: String,
        recorded: String,
        current: String,
    },
    #[error("sql migration {version:04}_{name} is applied but its file is missing")]
    Missing { version: u32, name: String },
    #[error("sql migration {version:04}_{name} failed: {source}")]
    Failed {
        version: u32,
        name: String,
        source: SqlError,
    },
    #[error("sql migrations: {0}")]
    Database(SqlError),
}

impl PgSqlBackend {
    /// Applies the site's migrations in order, each once, in its own transaction,
    /// recorded with its SHA-256 in `keel_migrations` of the connection's schema (the
    /// first of its `search_path`). An advisory lock orders nodes starting together.
    pub async fn apply_migrations(
        &self,
        migrations: &[crate::storage::Migration],
    ) -> Result<usize, PgMigrationError> {
        let database = PgMigrationError::Database;
        let mut client = self.connection(&self.primary).await.map_err(database)?;
        client
            .batch_execute(
                "SELECT pg_advisory_lock(hashtextextended('keel_sql_migrations', 0)); \
                 CREATE TABLE IF NOT EXISTS keel_migrations ( \
                     version    integer PRIMARY KEY, \
                     name       text NOT NULL, \
                     checksum   text NOT NULL, \
                     applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .map_err(|e| database(pg(e)))?;
        let outcome = async {
            let applied: Vec<(i32, String, String)> = client
                .query(
                    "SELECT version, name, checksum FROM keel_migrations ORDER BY version",
                    &[],
                )
                .await
                .map_err(|e| database(pg(e)))?
                .iter()
                .map(|row| (row.get(0), row.get(1), row.get(2)))
                .collect();
            for (version, name, recorded) in &applied {
                let version = *version as u32;
                match migrations.iter().find(|m| m.version == version) {
                    None => {
                        return Err(PgMigrationError::Missing {
                            version,
                            name: name.clone(),
                        });
                    }
                    Some(migration) if migration.checksum() != *recorded => {
                        return Err(PgMigrationError::Changed {
                            version,
                            name: name.clone(),
                            recorded: recorded.clone(),
                            current: migration.checksum(),
                        });
                    }
                    Some(_) => {}
                }
            }
            let mut count = 0;
            for migration in migrations {
                if applied
                    .iter()
                    .any(|(v, _, _)| *v as u32 == migration.version)
                {
                    continue;
                }
                let failed = |source| PgMigrationError::Failed {
                    version: migration.version,
                    name: migration.name.clone(),
                    source,
                };
                let txn = client.transaction().await.map_err(|e| database(pg(e)))?;
                txn.batch_execute(&migration.sql)
                    .await
                    .map_err(|e| failed(pg(e)))?;
                txn.execute(
                    "INSERT INTO keel_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    &[
                        &(migration.version as i32),
                        &migration.name,
                        &migration.checksum(),
                    ],
                )
                .await
                .map_err(|e| database(pg(e)))?;
                txn.commit().await.map_err(|e| failed(pg(e)))?;
                count += 1;
            }
            Ok(count)
        }
        .await;
        let _ = client
            .batch_execute("SELECT pg_advisory_unlock(hashtextextended('keel_sql_migrations', 0))")
            .await;
        self.touched.lock().expect("touched lock").clear();
        outcome
    }
}

impl PgSqlBackend {
    /// Each migration file's state against `keel_migrations`, as `keel migrate --status`
    /// shows it (the same states as on SQLite).
    pub async fn migration_status(
        &self,
        migrations: &[crate::storage::Migration],
    ) -> Result<Vec<(u32, String, crate::storage::MigrationState)>, PgMigrationError> {
        use crate::storage::MigrationState;
        let database = PgMigrationError::Database;
        let client = self.connection(&self.primary).await.map_err(database)?;
        let exists: bool = client
            .query_one("SELECT to_regclass('keel_migrations') IS NOT NULL", &[])
            .await
            .map_err(|e| database(pg(e)))?
            .get(0);
        let applied: Vec<(u32, String, String)> = if exists {
            client
                .query("SELECT version, name, checksum FROM keel_migrations", &[])
                .await
                .map_err(|e| database(pg(e)))?
                .iter()
                .map(|row| (row.get::<_, i32>(0) as u32, row.get(1), row.get(2)))
                .collect()
        } else {
            Vec::new()
        };
        let mut status: Vec<(u32, String, MigrationState)> = migrations
            .iter()
            .map(|migration| {
                let state = match applied.iter().find(|(v, _, _)| *v == migration.version) {
                    None => MigrationState::Pending,
                    Some((_, _, checksum)) if *checksum != migration.checksum() => {
                        MigrationState::Changed
                    }
                    Some(_) => MigrationState::Applied,
                };
                (migration.version, migration.name.clone(), state)
            })
            .collect();
        for (version, name, _) in &applied {
            if !migrations.iter().any(|m| m.version == *version) {
                status.push((*version, name.clone(), MigrationState::Missing));
            }
        }
        status.sort_by_key(|(version, _, _)| *version);
        Ok(status)
    }
}

#[async_trait::async_trait]
impl SqlBackend for PgSqlBackend {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn run_read(
        &self,
        statement: Statement,
        limits: SqlLimits,
        want_tables: bool,
    ) -> Result<(ResultSet, Touched), SqlError> {
        refuse_session_changes(&statement.sql)?;
        let (text, values) = translate(&statement.sql, &statement.params)?;
        self.on(self.read_pool(), async |client| {
            let txn = client
                .build_transaction()
                .read_only(true)
                .start()
                .await
                .map_err(pg)?;
            set_timeout(&txn, &limits).await?;
            let key = format!("r:{}", statement.sql);
            let touched = match (want_tables, self.remembered(&key)) {
                (false, _) => Touched::default(),
                (true, Some(known)) => known,
                (true, None) => {
                    let learned = read_by(&txn, &text, &values).await?;
                    self.remember(&key, &learned);
                    learned
                }
            };
            let result = run(&txn, &text, &values, &limits, false).await?;
            // Rolled back, not committed: nothing a read did (a SET) outlives it.
            txn.rollback().await.map_err(pg)?;
            Ok((result, touched))
        })
        .await
    }

    async fn run_write(
        &self,
        statement: Statement,
        limits: SqlLimits,
    ) -> Result<(ResultSet, Touched), SqlError> {
        let (mut results, touched) = self.write_all(vec![statement], limits, false).await?;
        Ok((results.pop().expect("one result"), touched))
    }

    async fn run_transaction(
        &self,
        statements: Vec<Statement>,
        limits: SqlLimits,
    ) -> Result<(Vec<ResultSet>, Touched), SqlError> {
        self.write_all(statements, limits, true).await
    }

    async fn analyze(&self, sql: String) -> Result<Analysis, SqlError> {
        self.on(&self.primary, async |client| {
            super::analyze::analyze_postgres(client, sql).await
        })
        .await
    }

    /// ANALYZE refreshes the planner's statistics; VACUUM is autovacuum's job.
    async fn maintenance(&self) -> Result<Value, SqlError> {
        self.on(&self.primary, async |client| {
            client.batch_execute("ANALYZE").await.map_err(pg)?;
            Ok(json!({ "analyze": true }))
        })
        .await
    }

    async fn backup(&self, _destination: std::path::PathBuf) -> Result<bool, SqlError> {
        Ok(false)
    }

    async fn statement_stats(
        &self,
        sort: SortBy,
        limit: usize,
    ) -> Result<Option<StatsReport>, SqlError> {
        self.on(&self.primary, async |client| {
            pg_stat_statements(client, sort, limit).await
        })
        .await
    }
}

/// Marks keel's own queries of the statistics, so they are not listed among them.
const STATS_MARK: &str = "/* keel stats */";

/// What keel itself sends around every statement (transactions, their timeout, the
/// EXPLAIN that learns a statement's tables) and to read the statistics: left out of
/// pg_stat_statements' figures, where it would otherwise fill the top of every list.
const KEEL_PLUMBING: &[&str] = &[
    "/* keel stats */%",
    "BEGIN%",
    "START TRANSACTION%",
    "COMMIT%",
    "ROLLBACK%",
    "SAVEPOINT keel_%",
    "RELEASE keel_%",
    "SET LOCAL statement_timeout%",
    "EXPLAIN (VERBOSE, FORMAT JSON)%",
];

/// The busiest statements of this database by `pg_stat_statements`, when the extension
/// is installed in it and loaded (`shared_preload_libraries`); else `None`. Its
/// statements are PostgreSQL's normalized texts (`$1` for constants), its figures the
/// server's for this database: every node's and every other client's, since the last
/// `pg_stat_statements_reset()`.
async fn pg_stat_statements(
    client: &deadpool_postgres::Object,
    sort: SortBy,
    limit: usize,
) -> Result<Option<StatsReport>, SqlError> {
    let installed = client
        .query_opt(
            &format!(
                "{STATS_MARK} SELECT n.nspname::text FROM pg_extension e \
                 JOIN pg_namespace n ON n.oid = e.extnamespace \
                 WHERE e.extname = 'pg_stat_statements'"
            ),
            &[],
        )
        .await
        .map_err(pg)?;
    let Some(schema) = installed.map(|row| row.get::<_, String>(0)) else {
        return Ok(None);
    };
    let order = match sort {
        SortBy::Total => "total_ms",
        SortBy::Mean => "mean_ms",
        SortBy::Calls => "calls",
    };
    let rows = client
        .query(
            &format!(
                "{STATS_MARK} SELECT query, calls, rows, total_ms, \
                        total_ms / greatest(calls, 1) AS mean_ms, \
                        min_ms, max_ms, count(*) OVER () \
                 FROM (SELECT query, sum(calls)::int8 AS calls, sum(rows)::int8 AS rows, \
                              sum(total_exec_time) AS total_ms, \
                              min(min_exec_time) AS min_ms, max(max_exec_time) AS max_ms \
                       FROM \"{}\".pg_stat_statements \
                       WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                         AND NOT query ILIKE ANY ($1) \
                       GROUP BY query) s \
                 ORDER BY {order} DESC LIMIT $2",
                schema.replace('"', "\"\"")
            ),
            &[&KEEL_PLUMBING, &(limit as i64)],
        )
        .await;
    let rows = match rows {
        Ok(rows) => rows,
        // Installed but not loaded (55000), or not readable by keel's role: keel's own.
        Err(error) if error.as_db_error().is_some() => {
            tracing::debug!(%error, "pg_stat_statements is installed but unreadable");
            return Ok(None);
        }
        Err(error) => return Err(pg(error)),
    };
    let tracked = rows.first().map_or(0, |row| row.get::<_, i64>(7) as usize);
    let statements = rows
        .iter()
        .map(|row| StatementStats {
            statement: row.get::<_, Option<String>>(0).unwrap_or_default(),
            calls: row.get::<_, i64>(1) as u64,
            rows: row.get::<_, i64>(2) as u64,
            errors: None,
            total_ms: row.get(3),
            mean_ms: row.get(4),
            min_ms: row.get(5),
            max_ms: row.get(6),
            p95_ms: None,
            last_seen: None,
        })
        .collect();
    Ok(Some(StatsReport {
        source: "pg_stat_statements",
        statements,
        tracked,
    }))
}

/// The API's parameters in PostgreSQL's form: `:name` and `?` become `$n`, `$n` stays.
/// Returns the text to prepare and the values in `$n` order. Strings, quoted
/// identifiers, comments, dollar-quoted bodies and `::` casts are left alone.
pub fn translate(sql: &str, params: &Params) -> Result<(String, Vec<Param>), SqlError> {
    let (out, names) = placeholders(sql, matches!(params, Params::Positional(_)));
    match params {
        Params::None => {
            if !names.is_empty() {
                return Err(SqlError::BadParams(format!(
                    "missing parameter :{}",
                    names[0]
                )));
            }
            Ok((out, Vec::new()))
        }
        Params::Positional(values) => {
            if !names.is_empty() {
                return Err(SqlError::BadParams(
                    "the statement has named parameters; pass params as an object".to_owned(),
                ));
            }
            Ok((out, values.clone()))
        }
        Params::Named(values) => {
            let mut ordered = Vec::with_capacity(names.len());
            for name in &names {
                let value = values
                    .iter()
                    .find(|(given, _)| given == name)
                    .map(|(_, value)| value.clone())
                    .ok_or_else(|| SqlError::BadParams(format!("missing parameter :{name}")))?;
                ordered.push(value);
            }
            let unknown: Vec<&str> = values
                .iter()
                .filter(|(given, _)| !names.contains(given))
                .map(|(given, _)| given.as_str())
                .collect();
            if !unknown.is_empty() {
                return Err(SqlError::BadParams(format!(
                    "unknown parameters: {}",
                    unknown.join(", ")
                )));
            }
            Ok((out, ordered))
        }
    }
}

/// The text with `:name` (and, when `questions`, `?`) rewritten to `$n`, and the names
/// in `$n` order.
pub(crate) fn placeholders(sql: &str, questions_are_params: bool) -> (String, Vec<String>) {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 8);
    let mut names: Vec<String> = Vec::new();
    let mut questions = 0usize;
    let positional = questions_are_params;
    let mut i = 0;
    let mut copied = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\'' => {
                // An E'' string escapes with backslashes.
                let escapes = i > 0 && matches!(bytes[i - 1], b'E' | b'e');
                i += 1;
                while i < bytes.len() {
                    if escapes && bytes[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if bytes[i] == b'\'' {
                        if bytes.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += 1;
                }
                i += 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < bytes.len() {
                    if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'$' if i == 0 || !ident(bytes[i - 1]) => {
                // `$1` stays; `$tag$ ... $tag$` is a string.
                let mut end = i + 1;
                while end < bytes.len() && ident(bytes[end]) {
                    end += 1;
                }
                let tag = &sql[i..end];
                if bytes.get(end) == Some(&b'$')
                    && !tag[1..].starts_with(|c: char| c.is_ascii_digit())
                {
                    let delimiter = &sql[i..=end];
                    match sql[end + 1..].find(delimiter) {
                        Some(at) => i = end + 1 + at + delimiter.len(),
                        None => i = bytes.len(),
                    }
                } else {
                    i = end;
                }
            }
            b':' if bytes.get(i + 1) == Some(&b':') => i += 2,
            b':' if bytes
                .get(i + 1)
                .is_some_and(|n| n.is_ascii_alphabetic() || *n == b'_')
                && (i == 0 || !ident(bytes[i - 1]) || bytes[i - 1].is_ascii_whitespace()) =>
            {
                let mut end = i + 1;
                while end < bytes.len() && ident(bytes[end]) {
                    end += 1;
                }
                let name = &sql[i + 1..end];
                let number = match names.iter().position(|known| known == name) {
                    Some(at) => at + 1,
                    None => {
                        names.push(name.to_owned());
                        names.len()
                    }
                };
                out.push_str(&sql[copied..i]);
                out.push_str(&format!("${number}"));
                copied = end;
                i = end;
            }
            b'?' if positional => {
                questions += 1;
                out.push_str(&sql[copied..i]);
                out.push_str(&format!("${questions}"));
                i += 1;
                copied = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[copied.min(sql.len())..]);
    (out, names)
}

type BoxError = Box<dyn StdError + Sync + Send>;

fn text_like(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
    ) || ty.name() == "citext"
        || matches!(ty.kind(), Kind::Enum(_))
}

/// A parameter bound to whatever type PostgreSQL inferred for its `$n`: the JSON value
/// is converted to that type, or refused with the type named.
#[derive(Debug)]
struct Bound<'a>(&'a SqliteValue);

impl ToSql for Bound<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        match self.0 {
            SqliteValue::Null => Ok(IsNull::Yes),
            SqliteValue::Integer(integer) => match *ty {
                Type::BOOL => (*integer != 0).to_sql(ty, out),
                Type::INT2 => i16::try_from(*integer)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*integer)?.to_sql(ty, out),
                Type::INT8 => integer.to_sql(ty, out),
                Type::OID => u32::try_from(*integer)?.to_sql(ty, out),
                Type::FLOAT4 => (*integer as f32).to_sql(ty, out),
                Type::FLOAT8 => (*integer as f64).to_sql(ty, out),
                _ => text_to_sql(&integer.to_string(), ty, out),
            },
            SqliteValue::Real(real) => match *ty {
                Type::FLOAT4 => (*real as f32).to_sql(ty, out),
                Type::FLOAT8 => real.to_sql(ty, out),
                _ => text_to_sql(&real.to_string(), ty, out),
            },
            SqliteValue::Text(text) => text_to_sql(text, ty, out),
            SqliteValue::Blob(bytes) => match *ty {
                Type::BYTEA => bytes.as_slice().to_sql(ty, out),
                _ => Err(format!("a base64 value binds only to bytea, not {ty}").into()),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Text (or a number written as text) as a value of `ty`.
fn text_to_sql(text: &str, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
    let bad = || -> BoxError { format!("{text:?} is not a valid {ty}").into() };
    match *ty {
        _ if text_like(ty) => {
            out.put_slice(text.as_bytes());
            Ok(IsNull::No)
        }
        Type::BOOL => match text.to_ascii_lowercase().as_str() {
            "true" | "t" | "1" | "yes" | "on" => true.to_sql(ty, out),
            "false" | "f" | "0" | "no" | "off" => false.to_sql(ty, out),
            _ => Err(bad()),
        },
        Type::INT2 => text.parse::<i16>().map_err(|_| bad())?.to_sql(ty, out),
        Type::INT4 => text.parse::<i32>().map_err(|_| bad())?.to_sql(ty, out),
        Type::INT8 => text.parse::<i64>().map_err(|_| bad())?.to_sql(ty, out),
        Type::FLOAT4 => text.parse::<f32>().map_err(|_| bad())?.to_sql(ty, out),
        Type::FLOAT8 => text.parse::<f64>().map_err(|_| bad())?.to_sql(ty, out),
        Type::NUMERIC => numeric_to_sql(text, out).ok_or_else(bad),
        // A string for a json parameter is the JSON document itself.
        Type::JSON => {
            serde_json::from_str::<Value>(text).map_err(|_| bad())?;
            out.put_slice(text.as_bytes());
            Ok(IsNull::No)
        }
        Type::JSONB => {
            serde_json::from_str::<Value>(text).map_err(|_| bad())?;
            out.put_u8(1);
            out.put_slice(text.as_bytes());
            Ok(IsNull::No)
        }
        Type::TIMESTAMPTZ => {
            let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|_| bad())?;
            out.put_i64(micros_since_2000(at.naive_utc()));
            Ok(IsNull::No)
        }
        Type::TIMESTAMP => {
            let at = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
                .or_else(|_| chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f"))
                .map_err(|_| bad())?;
            out.put_i64(micros_since_2000(at));
            Ok(IsNull::No)
        }
        Type::DATE => {
            let day = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| bad())?;
            let days = (day - epoch_2000().date()).num_days();
            out.put_i32(i32::try_from(days).map_err(|_| bad())?);
            Ok(IsNull::No)
        }
        Type::UUID => {
            let hex: String = text.chars().filter(|c| *c != '-').collect();
            if hex.len() != 32 {
                return Err(bad());
            }
            for pair in 0..16 {
                out.put_u8(
                    u8::from_str_radix(&hex[pair * 2..pair * 2 + 2], 16).map_err(|_| bad())?,
                );
            }
            Ok(IsNull::No)
        }
        _ => Err(format!(
            "cannot bind a JSON value to a {ty} parameter; cast it in the query ($1::text::{ty})"
        )
        .into()),
    }
}

fn epoch_2000() -> chrono::NaiveDateTime {
    chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
        .expect("date")
        .and_hms_opt(0, 0, 0)
        .expect("time")
}

fn micros_since_2000(at: chrono::NaiveDateTime) -> i64 {
    (at - epoch_2000()).num_microseconds().unwrap_or(i64::MAX)
}

/// NUMERIC's binary form from decimal text: base-10000 digits around the point.
fn numeric_to_sql(text: &str, out: &mut BytesMut) -> Option<IsNull> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let whole = whole.trim_start_matches('0');
    // Pad the whole part on the left and the fraction on the right to groups of 4.
    let whole_pad = (4 - whole.len() % 4) % 4;
    let padded_whole = format!("{}{whole}", "0".repeat(whole_pad));
    let fraction_pad = (4 - fraction.len() % 4) % 4;
    let padded_fraction = format!("{fraction}{}", "0".repeat(fraction_pad));
    let mut groups: Vec<i16> = padded_whole
        .as_bytes()
        .chunks(4)
        .chain(padded_fraction.as_bytes().chunks(4))
        .map(|chunk| std::str::from_utf8(chunk).ok()?.parse::<i16>().ok())
        .collect::<Option<_>>()?;
    let mut weight = (padded_whole.len() / 4) as i16 - 1;
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    out.put_i16(groups.len() as i16);
    out.put_i16(weight);
    out.put_u16(if negative && !groups.is_empty() {
        0x4000
    } else {
        0
    });
    out.put_u16(fraction.len() as u16);
    for group in groups {
        out.put_i16(group);
    }
    Some(IsNull::No)
}

/// NUMERIC's binary form as decimal text (exact; JSON numbers would round).
fn numeric_text(raw: &[u8]) -> Option<String> {
    let word = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes(raw.get(at..at + 2)?.try_into().ok()?))
    };
    let count = word(0)? as usize;
    let weight = word(2)? as i16 as i32;
    let sign = word(4)?;
    let scale = word(6)? as usize;
    match sign {
        0xC000 => return Some("NaN".to_owned()),
        0xD000 => return Some("Infinity".to_owned()),
        0xF000 => return Some("-Infinity".to_owned()),
        _ => {}
    }
    let groups: Vec<u16> = (0..count).map(|g| word(8 + g * 2)).collect::<Option<_>>()?;
    let group = |index: i32| -> u16 {
        usize::try_from(index)
            .ok()
            .and_then(|i| groups.get(i))
            .copied()
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for index in 0..=weight {
            if index == 0 {
                text.push_str(&group(index).to_string());
            } else {
                text.push_str(&format!("{:04}", group(index)));
            }
        }
    }
    if scale > 0 {
        text.push('.');
        let mut fraction = String::new();
        let mut index = weight + 1;
        while fraction.len() < scale {
            fraction.push_str(&format!("{:04}", group(index)));
            index += 1;
        }
        fraction.truncate(scale);
        text.push_str(&fraction);
    }
    Some(text)
}

/// One result cell as JSON and roughly how many bytes it holds.
struct Cell(Value, usize);

impl<'a> FromSql<'a> for Cell {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Cell, BoxError> {
        let cell = match *ty {
            Type::BOOL => Cell(json!(bool::from_sql(ty, raw)?), 1),
            Type::INT2 => Cell(json!(i16::from_sql(ty, raw)?), 8),
            Type::INT4 => Cell(json!(i32::from_sql(ty, raw)?), 8),
            Type::INT8 => Cell(json!(i64::from_sql(ty, raw)?), 8),
            Type::OID => Cell(json!(u32::from_sql(ty, raw)?), 8),
            Type::FLOAT4 => Cell(json!(f32::from_sql(ty, raw)?), 8),
            Type::FLOAT8 => Cell(json!(f64::from_sql(ty, raw)?), 8),
            Type::JSON | Type::JSONB => Cell(Value::from_sql(ty, raw)?, raw.len()),
            Type::BYTEA => {
                let mut object = Map::new();
                object.insert(
                    "base64".to_owned(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(raw)),
                );
                Cell(Value::Object(object), raw.len())
            }
            Type::NUMERIC => Cell(
                Value::String(numeric_text(raw).ok_or("a malformed numeric")?),
                raw.len(),
            ),
            Type::TIMESTAMPTZ | Type::TIMESTAMP => {
                let micros = i64::from_sql(&Type::INT8, raw)?;
                let at = epoch_2000() + chrono::Duration::microseconds(micros);
                let text = if *ty == Type::TIMESTAMPTZ {
                    at.and_utc()
                        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                } else {
                    at.format("%Y-%m-%dT%H:%M:%S%.f").to_string()
                };
                Cell(Value::String(text), 8)
            }
            Type::DATE => {
                let days = i32::from_sql(&Type::INT4, raw)?;
                let day = epoch_2000().date() + chrono::Duration::days(days.into());
                Cell(Value::String(day.to_string()), 4)
            }
            Type::UUID => {
                let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
                let text = format!(
                    "{}-{}-{}-{}-{}",
                    &hex[0..8],
                    &hex[8..12],
                    &hex[12..16],
                    &hex[16..20],
                    &hex[20..32]
                );
                Cell(Value::String(text), 16)
            }
            _ if text_like(ty) => Cell(
                Value::String(String::from_utf8_lossy(raw).into_owned()),
                raw.len(),
            ),
            _ => return Err(format!("type {ty} has no JSON form in keel").into()),
        };
        Ok(cell)
    }

    fn from_sql_null(_: &Type) -> Result<Cell, BoxError> {
        Ok(Cell(Value::Null, 4))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::value::params_from_json;

    fn translated(sql: &str, params: Value) -> (String, usize) {
        let params = params_from_json(Some(&params)).unwrap();
        let (text, values) = translate(sql, &params).unwrap();
        (text, values.len())
    }

    #[test]
    fn parameters_become_dollar_numbers_outside_strings_and_casts() {
        assert_eq!(
            translated(
                "SELECT * FROM t WHERE a = :a AND b = :b OR c = :a",
                json!({"a": 1, ":b": 2})
            ),
            (
                "SELECT * FROM t WHERE a = $1 AND b = $2 OR c = $1".to_owned(),
                2
            )
        );
        assert_eq!(
            translated(
                "SELECT ':x', \":y\", a::text, $$ :z $$ FROM t -- :w\nWHERE a = :v",
                json!({"v": 1})
            ),
            (
                "SELECT ':x', \":y\", a::text, $$ :z $$ FROM t -- :w\nWHERE a = $1".to_owned(),
                1
            )
        );
        assert_eq!(
            translated("SELECT ? , ?", json!([1, 2])),
            ("SELECT $1 , $2".to_owned(), 2)
        );
        assert_eq!(
            translated("SELECT $1::int", json!([1])),
            ("SELECT $1::int".to_owned(), 1)
        );
        let named = params_from_json(Some(&json!({"a": 1, "zzz": 2}))).unwrap();
        assert!(matches!(
            translate("SELECT :a", &named),
            Err(SqlError::BadParams(detail)) if detail.contains("zzz")
        ));
        assert!(translate("SELECT :a", &Params::None).is_err());
    }

    #[test]
    fn numerics_round_trip_through_the_binary_form() {
        for text in [
            "0",
            "1",
            "-1.5",
            "12345.6789",
            "0.0001",
            "100000000",
            "-0.000123",
        ] {
            let mut out = BytesMut::new();
            numeric_to_sql(text, &mut out).unwrap();
            let back = numeric_text(&out).unwrap();
            assert_eq!(
                back.parse::<f64>().unwrap(),
                text.parse::<f64>().unwrap(),
                "{text}"
            );
        }
        let mut out = BytesMut::new();
        numeric_to_sql("12.50", &mut out).unwrap();
        assert_eq!(numeric_text(&out).unwrap(), "12.50");
        assert!(numeric_to_sql("1e5", &mut BytesMut::new()).is_none());
    }

    #[test]
    fn session_changes_are_refused() {
        assert!(refuse_session_changes("COMMIT").is_err());
        assert!(refuse_session_changes(" /* x */ set search_path = x").is_err());
        assert!(refuse_session_changes("-- note\n  /* a */ -- b\nRESET ALL").is_err());
        assert!(refuse_session_changes("-- RESET ALL\nSELECT 1").is_ok());
        assert!(refuse_session_changes("SET LOCAL work_mem = '1MB'").is_ok());
        assert!(refuse_session_changes("SELECT 1").is_ok());
        assert!(refuse_session_changes("PREPARE p AS SELECT 1").is_ok());
    }
}
