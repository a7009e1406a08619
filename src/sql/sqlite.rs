//! The SQLite backend: one writer connection on a thread of its own, fed by a queue,
//! and a pool of reader connections. WAL lets readers run while the writer writes.
//!
//! Writes group-commit like the job queue: the writer takes every write waiting,
//! runs each inside its own savepoint of one transaction (a failing statement rolls
//! back alone), commits once and answers them all. So 32 concurrent single-row INSERTs
//! cost one fsync, not 32.
//!
//! Every API statement passes an authorizer. On readers it allows reading and nothing
//! else (no ATTACH, no writable PRAGMA, no load_extension), and `query_only` backs it
//! up; on the writer it refuses what would break the writer (ATTACH, BEGIN/COMMIT,
//! journal changes). The same authorizer records which tables a statement reads and
//! writes: that is how cached named queries learn what invalidates them.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::analyze::Analysis;
use super::value::{Param, Params, cell_to_json};
use super::{ResultSet, SqlBackend, SqlError, SqlLimits, SqlMetrics, Statement, Touched};
use crate::config::SqlSynchronous;

/// What the authorizer learned about one statement when it was prepared.
#[derive(Debug, Clone, Default)]
pub struct StatementInfo {
    pub readonly: bool,
    pub tables_read: BTreeSet<String>,
    pub tables_written: BTreeSet<String>,
    /// CREATE, DROP or ALTER: cached results of any query may be wrong now.
    pub changes_schema: bool,
}

/// The authorizer's shared state for one connection.
#[derive(Default)]
struct Guard {
    /// While set, keel itself is running a statement and nothing is refused.
    trusted: AtomicBool,
    read_only: bool,
    /// Filled while a statement is being prepared for the first time.
    recording: Mutex<Option<StatementInfo>>,
    /// Why the last refusal happened, for the error message.
    refused: Mutex<Option<String>>,
    /// Unix ms after which the running statement is interrupted; 0: none.
    deadline: AtomicU64,
}

/// Pragmas that only read: these take a table or index name as their argument...
const READ_PRAGMAS_WITH_ARGUMENT: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
];
/// ...and these read only without one (with a value they would set something).
const READ_PRAGMAS: &[&str] = &[
    "compile_options",
    "collation_list",
    "function_list",
    "pragma_list",
    "database_list",
    "user_version",
    "schema_version",
    "page_count",
    "page_size",
    "freelist_count",
    "journal_mode",
];
const WRITER_REFUSED_PRAGMAS: &[&str] = &[
    "journal_mode",
    "locking_mode",
    "writable_schema",
    "query_only",
    "synchronous",
    "temp_store_directory",
];

impl Guard {
    fn decide(&self, context: &AuthContext<'_>) -> Result<(), String> {
        use AuthAction::*;
        if self.trusted.load(Ordering::Relaxed) {
            return Ok(());
        }
        match &context.action {
            Attach { .. } | Detach { .. } => Err("ATTACH and DETACH are not allowed".to_owned()),
            Function { function_name } if function_name.eq_ignore_ascii_case("load_extension") => {
                Err("load_extension is not allowed".to_owned())
            }
            Transaction { .. } | Savepoint { .. } => Err(
                "transactions are managed by keel: use /v1/sql/batch with \"transaction\": true"
                    .to_owned(),
            ),
            Pragma {
                pragma_name,
                pragma_value,
            } => {
                let name = pragma_name.to_ascii_lowercase();
                if self.read_only {
                    let reads = READ_PRAGMAS_WITH_ARGUMENT.contains(&name.as_str())
                        || (pragma_value.is_none() && READ_PRAGMAS.contains(&name.as_str()));
                    if reads {
                        Ok(())
                    } else {
                        Err(format!("PRAGMA {name} is not allowed on the read path"))
                    }
                } else if WRITER_REFUSED_PRAGMAS.contains(&name.as_str()) && pragma_value.is_some()
                {
                    Err(format!("PRAGMA {name} is managed by keel"))
                } else {
                    Ok(())
                }
            }
            Read { .. } | Select | Function { .. } | Recursive => Ok(()),
            _ if self.read_only => Err("this statement writes; use /v1/sql/execute".to_owned()),
            _ => Ok(()),
        }
    }

    fn record(&self, context: &AuthContext<'_>) {
        use AuthAction::*;
        let mut recording = self.recording.lock().expect("guard lock");
        let Some(info) = recording.as_mut() else {
            return;
        };
        // Tables in the temp schema (the advisor's) and sqlite_* internals do not count.
        let table = |name: &str| (!name.starts_with("sqlite_")).then(|| name.to_owned());
        match &context.action {
            Read { table_name, .. } => info.tables_read.extend(table(table_name)),
            Insert { table_name } | Delete { table_name } | Update { table_name, .. } => {
                info.tables_written.extend(table(table_name))
            }
            CreateTable { .. }
            | CreateIndex { .. }
            | CreateView { .. }
            | CreateTrigger { .. }
            | DropTable { .. }
            | DropIndex { .. }
            | DropView { .. }
            | DropTrigger { .. }
            | AlterTable { .. } => info.changes_schema = true,
            _ => {}
        }
    }
}

/// A connection with its guard and what it knows about the statements it prepared.
pub struct Conn {
    connection: Connection,
    guard: Arc<Guard>,
    infos: HashMap<String, StatementInfo>,
}

/// Most prepared statements (and their infos) one connection keeps.
const STATEMENT_CACHE: usize = 256;

impl Conn {
    fn open(path: &Path, read_only: bool, settings: &Settings) -> Result<Conn, SqlError> {
        let flags = if read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI
        } else {
            OpenFlags::default()
        };
        let mut connection = Connection::open_with_flags(path, flags).map_err(SqlError::from)?;
        let synchronous = match settings.synchronous {
            SqlSynchronous::Full => "FULL",
            SqlSynchronous::Normal => "NORMAL",
        };
        if read_only {
            connection.execute_batch("PRAGMA query_only = ON; PRAGMA foreign_keys = ON;")?;
        } else {
            connection.execute_batch(&format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
                 PRAGMA foreign_keys = ON; PRAGMA auto_vacuum = INCREMENTAL;"
            ))?;
        }
        connection.busy_timeout(settings.busy_timeout)?;
        connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let guard = Arc::new(Guard {
            read_only,
            ..Guard::default()
        });
        let deciding = guard.clone();
        connection.authorizer(Some(move |context: AuthContext<'_>| {
            deciding.record(&context);
            match deciding.decide(&context) {
                Ok(()) => Authorization::Allow,
                Err(reason) => {
                    *deciding.refused.lock().expect("guard lock") = Some(reason);
                    Authorization::Deny
                }
            }
        }))?;
        let watching = guard.clone();
        connection.progress_handler(
            1000,
            Some(move || {
                let deadline = watching.deadline.load(Ordering::Relaxed);
                deadline != 0 && crate::cache::now_ms() >= deadline
            }),
        )?;
        Ok(Conn {
            connection,
            guard,
            infos: HashMap::new(),
        })
    }

    /// Runs `work` with nothing refused: keel's own statements.
    pub fn trusted<T>(&mut self, work: impl FnOnce(&Connection) -> T) -> T {
        self.guard.trusted.store(true, Ordering::Relaxed);
        let out = work(&self.connection);
        self.guard.trusted.store(false, Ordering::Relaxed);
        out
    }

    pub fn raw(&self) -> &Connection {
        &self.connection
    }

    /// What the statement reads and writes, learned from the authorizer the first time
    /// this connection prepares it.
    pub fn info(&mut self, sql: &str) -> Result<StatementInfo, SqlError> {
        if let Some(info) = self.infos.get(sql) {
            return Ok(info.clone());
        }
        // Trusted while recording: this prepare learns what the statement touches and
        // whether it is one statement; the policy applies when it is prepared to run.
        *self.guard.recording.lock().expect("guard lock") = Some(StatementInfo::default());
        self.guard.trusted.store(true, Ordering::Relaxed);
        let prepared = self
            .connection
            .prepare(sql)
            .map(|statement| statement.readonly());
        self.guard.trusted.store(false, Ordering::Relaxed);
        let recorded = self.guard.recording.lock().expect("guard lock").take();
        let readonly = prepared.map_err(|error| self.refusal(error))?;
        let mut info = recorded.unwrap_or_default();
        info.readonly = readonly;
        if self.infos.len() >= STATEMENT_CACHE {
            self.infos.clear();
        }
        self.infos.insert(sql.to_owned(), info.clone());
        Ok(info)
    }

    /// The schema changed: what this connection learned about statements may be wrong.
    pub fn forget_statements(&mut self) {
        self.infos.clear();
        self.connection.flush_prepared_statement_cache();
    }

    /// A prepare that failed: if the authorizer refused something, say what and why
    /// (SQLite reports a refused function as a plain SQLITE_ERROR).
    fn refusal(&self, error: rusqlite::Error) -> SqlError {
        let refused = self.guard.refused.lock().expect("guard lock").take();
        match (refused, &error) {
            // rusqlite prepares the tail to find a second statement; its refusal is moot.
            (_, rusqlite::Error::MultipleStatement) => SqlError::MultipleStatements,
            (Some(reason), _) => SqlError::NotAllowed(reason),
            (None, _) => SqlError::from(error),
        }
    }

    /// Prepares, binds and runs one statement, collecting rows within the limits.
    pub fn run(
        &mut self,
        statement: &Statement,
        limits: &SqlLimits,
        read_path: bool,
    ) -> Result<(ResultSet, StatementInfo), SqlError> {
        let started = Instant::now();
        let sql = statement.sql.as_str();
        if read_path && first_keyword_is(sql, "VACUUM") {
            return Err(SqlError::NotAllowed(
                "VACUUM is not allowed on the read path".to_owned(),
            ));
        }
        let info = self.info(sql)?;
        if read_path && !info.readonly {
            return Err(SqlError::NotReadOnly);
        }
        self.guard.deadline.store(
            crate::cache::now_ms() + limits.statement_timeout.as_millis() as u64,
            Ordering::Relaxed,
        );
        let outcome = self.execute(sql, &statement.params, limits, &info);
        self.guard.deadline.store(0, Ordering::Relaxed);
        let mut result = outcome.map_err(|error| match error {
            SqlError::Sqlite { code, .. } if code == rusqlite::ffi::SQLITE_INTERRUPT => {
                SqlError::Timeout(limits.statement_timeout)
            }
            other => other,
        })?;
        result.time_ms = started.elapsed().as_secs_f64() * 1000.0;
        if info.changes_schema {
            self.forget_statements();
        }
        Ok((result, info))
    }

    fn execute(
        &self,
        sql: &str,
        params: &Params,
        limits: &SqlLimits,
        info: &StatementInfo,
    ) -> Result<ResultSet, SqlError> {
        let mut prepared = self
            .connection
            .prepare_cached(sql)
            .map_err(|error| self.refusal(error))?;
        bind(&mut prepared, params)?;
        let columns: Vec<String> = prepared.column_names().map(str::to_owned).collect();
        let width = columns.len();
        let mut rows = Vec::new();
        let mut bytes = 0usize;
        {
            let mut cursor = prepared.raw_query();
            while let Some(row) = cursor.next()? {
                if rows.len() as u64 >= limits.max_rows {
                    return Err(SqlError::TooManyRows(limits.max_rows));
                }
                let mut cells = Vec::with_capacity(width);
                for index in 0..width {
                    let (cell, size) = cell_to_json(row.get_ref(index)?);
                    bytes += size;
                    cells.push(cell);
                }
                if bytes > limits.max_result_bytes {
                    return Err(SqlError::ResultTooLarge(limits.max_result_bytes));
                }
                rows.push(Value::Array(cells));
            }
        }
        let writes = !info.readonly;
        Ok(ResultSet {
            columns,
            rows,
            rows_affected: if writes { self.connection.changes() } else { 0 },
            last_insert_id: writes.then(|| self.connection.last_insert_rowid()),
            time_ms: 0.0,
        })
    }
}

/// The pool's lock; a panic elsewhere never makes the pool unusable.
fn lock(pool: &Mutex<Vec<Conn>>) -> std::sync::MutexGuard<'_, Vec<Conn>> {
    pool.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn first_keyword_is(sql: &str, keyword: &str) -> bool {
    let rest = super::after_leading_comments(sql);
    rest.get(..keyword.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(keyword))
}

fn bind(statement: &mut rusqlite::CachedStatement<'_>, params: &Params) -> Result<(), SqlError> {
    let expected = statement.parameter_count();
    match params {
        Params::None if expected == 0 => Ok(()),
        Params::None => Err(SqlError::BadParams(format!(
            "the statement takes {expected} parameters and none were given"
        ))),
        Params::Positional(values) => {
            if values.len() != expected {
                return Err(SqlError::BadParams(format!(
                    "the statement takes {expected} parameters, {} were given",
                    values.len()
                )));
            }
            for (index, value) in values.iter().enumerate() {
                statement.raw_bind_parameter(index + 1, value)?;
            }
            Ok(())
        }
        Params::Named(values) => {
            let mut used = 0;
            for index in 1..=expected {
                let Some(name) = statement.parameter_name(index) else {
                    return Err(SqlError::BadParams(
                        "the statement has positional parameters; pass params as an array"
                            .to_owned(),
                    ));
                };
                let bare = name[1..].to_owned();
                let value: &Param = values
                    .iter()
                    .find(|(given, _)| *given == bare)
                    .map(|(_, value)| value)
                    .ok_or_else(|| SqlError::BadParams(format!("missing parameter {name}")))?;
                statement.raw_bind_parameter(index, value)?;
                used += 1;
            }
            if used != values.len() {
                let unknown: Vec<&str> = values
                    .iter()
                    .filter(|(given, _)| {
                        !(1..=expected).any(|index| {
                            statement
                                .parameter_name(index)
                                .is_some_and(|name| &name[1..] == given)
                        })
                    })
                    .map(|(given, _)| given.as_str())
                    .collect();
                return Err(SqlError::BadParams(format!(
                    "unknown parameters: {}",
                    unknown.join(", ")
                )));
            }
            Ok(())
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub path: PathBuf,
    pub readers: usize,
    pub synchronous: SqlSynchronous,
    pub busy_timeout: Duration,
}

/// One write for the writer: runs inside the shared transaction under a savepoint, or
/// alone between transactions.
/// How a grouped write is answered once the commit's outcome is known.
type Answer = Box<dyn FnOnce(bool) + Send>;
/// A grouped write: runs under its savepoint, says whether it succeeded and how to answer.
type GroupedWork = Box<dyn FnOnce(&mut Conn) -> (bool, Answer) + Send>;

enum WriteOp {
    /// Returns whether the work succeeded (its savepoint is released, else rolled back)
    /// and how to answer once the commit is known.
    Grouped(GroupedWork),
    Alone(Box<dyn FnOnce(&mut Conn) + Send>),
}

/// Most writes one transaction takes.
const MAX_GROUP: usize = 256;

pub struct SqliteBackend {
    readers: Arc<Mutex<Vec<Conn>>>,
    reader_slots: Arc<Semaphore>,
    writes: mpsc::Sender<WriteOp>,
    settings: Settings,
    metrics: SqlMetrics,
}

impl SqliteBackend {
    pub fn open(settings: Settings, metrics: SqlMetrics) -> Result<SqliteBackend, SqlError> {
        let mut writer = Conn::open(&settings.path, false, &settings)?;
        let readers = (0..settings.readers.max(1))
            .map(|_| Conn::open(&settings.path, true, &settings))
            .collect::<Result<Vec<_>, _>>()?;
        let (writes, inbox) = mpsc::channel::<WriteOp>(4096);
        let depth = metrics.writer_queue.clone();
        std::thread::Builder::new()
            .name("keel-sql-writer".to_owned())
            .spawn(move || write_loop(&mut writer, inbox, depth))
            .map_err(|error| SqlError::Internal(format!("cannot start the SQL writer: {error}")))?;
        metrics.readers_idle.set(readers.len() as i64);
        Ok(SqliteBackend {
            reader_slots: Arc::new(Semaphore::new(readers.len())),
            readers: Arc::new(Mutex::new(readers)),
            writes,
            settings,
            metrics,
        })
    }

    pub fn path(&self) -> &Path {
        &self.settings.path
    }

    /// Runs `work` on a reader connection from the pool (waiting for one if all are busy).
    ///
    /// The blocking task owns the slot and puts the connection back itself, so a caller
    /// that goes away (a client hanging up) can never take a connection with it.
    pub async fn with_reader<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Conn) -> T + Send + 'static,
    ) -> Result<T, SqlError> {
        let waited = Instant::now();
        let slot = self
            .reader_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SqlError::Closed)?;
        self.metrics
            .reader_wait_seconds
            .observe(waited.elapsed().as_secs_f64());
        let pool = self.readers.clone();
        let metrics = self.metrics.clone();
        let settings = self.settings.clone();
        tokio::task::spawn_blocking(move || {
            let taken = lock(&pool).pop();
            let mut conn = match taken {
                Some(conn) => conn,
                None => Conn::open(&settings.path, true, &settings)?,
            };
            metrics.readers_in_use.inc();
            metrics.readers_idle.dec();
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&mut conn)));
            metrics.readers_in_use.dec();
            metrics.readers_idle.inc();
            match out {
                Ok(out) => {
                    lock(&pool).push(conn);
                    drop(slot);
                    Ok(out)
                }
                Err(_) => {
                    // A connection a panic went through is not trusted again.
                    drop(conn);
                    if let Ok(fresh) = Conn::open(&settings.path, true, &settings) {
                        lock(&pool).push(fresh);
                    }
                    drop(slot);
                    Err(SqlError::Internal(
                        "a read panicked; see the server log".to_owned(),
                    ))
                }
            }
        })
        .await
        .map_err(|error| SqlError::Internal(format!("a read task failed: {error}")))?
    }

    /// Runs `work` inside the writer's next transaction, under its own savepoint: an
    /// `Err` rolls back this work alone. Answers after the commit.
    pub async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Conn) -> Result<T, SqlError> + Send + 'static,
    ) -> Result<T, SqlError> {
        let (reply, answer) = oneshot::channel();
        let op = WriteOp::Grouped(Box::new(move |conn| {
            let outcome = work(conn);
            let succeeded = outcome.is_ok();
            let answer: Answer = Box::new(move |committed: bool| {
                let outcome = match outcome {
                    Ok(_) if !committed => Err(SqlError::Internal(
                        "the transaction could not be committed".to_owned(),
                    )),
                    other => other,
                };
                let _ = reply.send(outcome);
            });
            (succeeded, answer)
        }));
        self.metrics.writer_queue.inc();
        self.writes.send(op).await.map_err(|_| SqlError::Closed)?;
        answer.await.map_err(|_| SqlError::Closed)?
    }

    /// Runs `work` on the writer connection between transactions (keel's own work:
    /// maintenance, the advisor's trial index, backups).
    pub async fn alone<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Conn) -> T + Send + 'static,
    ) -> Result<T, SqlError> {
        let (reply, answer) = oneshot::channel();
        let op = WriteOp::Alone(Box::new(move |conn| {
            let _ = reply.send(work(conn));
        }));
        self.metrics.writer_queue.inc();
        self.writes.send(op).await.map_err(|_| SqlError::Closed)?;
        answer.await.map_err(|_| SqlError::Closed)
    }
}

impl From<StatementInfo> for Touched {
    fn from(info: StatementInfo) -> Touched {
        Touched {
            tables_read: info.tables_read,
            tables_written: info.tables_written,
            changes_schema: info.changes_schema,
        }
    }
}

#[async_trait::async_trait]
impl SqlBackend for SqliteBackend {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn run_read(
        &self,
        statement: Statement,
        limits: SqlLimits,
        _want_tables: bool,
    ) -> Result<(ResultSet, Touched), SqlError> {
        // The authorizer records the tables anyway; there is nothing to save.
        let (result, info) = self
            .with_reader(move |conn| conn.run(&statement, &limits, true))
            .await??;
        Ok((result, info.into()))
    }

    async fn run_write(
        &self,
        statement: Statement,
        limits: SqlLimits,
    ) -> Result<(ResultSet, Touched), SqlError> {
        let (result, info) = self
            .write(move |conn| conn.run(&statement, &limits, false))
            .await?;
        Ok((result, info.into()))
    }

    async fn run_transaction(
        &self,
        statements: Vec<Statement>,
        limits: SqlLimits,
    ) -> Result<(Vec<ResultSet>, Touched), SqlError> {
        self.write(move |conn| {
            let mut results = Vec::with_capacity(statements.len());
            let mut touched = Touched::default();
            for (index, statement) in statements.iter().enumerate() {
                let (result, info) =
                    conn.run(statement, &limits, false)
                        .map_err(|error| SqlError::Batch {
                            index,
                            committed: 0,
                            source: Box::new(error),
                        })?;
                touched.tables_written.extend(info.tables_written);
                touched.changes_schema |= info.changes_schema;
                results.push(result);
            }
            Ok((results, touched))
        })
        .await
    }

    async fn analyze(&self, sql: String) -> Result<Analysis, SqlError> {
        self.analyze_plan(sql).await
    }

    /// PRAGMA optimize, ANALYZE, incremental vacuum and a WAL checkpoint, on the writer
    /// between transactions.
    async fn maintenance(&self) -> Result<Value, SqlError> {
        self.alone(|conn| {
            conn.trusted(|c| -> Result<Value, SqlError> {
                c.execute_batch("PRAGMA optimize; ANALYZE; PRAGMA incremental_vacuum;")?;
                let (busy, log, checkpointed): (i64, i64, i64) =
                    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })?;
                Ok(serde_json::json!({ "checkpoint": { "busy": busy, "log_frames": log, "checkpointed": checkpointed } }))
            })
        })
        .await?
    }

    /// SQLite's online backup API on the writer (so no write is half in the copy)
    /// while readers keep running.
    async fn backup(&self, destination: PathBuf) -> Result<bool, SqlError> {
        self.alone(move |conn| {
            conn.raw()
                .backup(
                    rusqlite::MAIN_DB,
                    &destination,
                    None::<fn(rusqlite::backup::Progress)>,
                )
                .map_err(SqlError::from)
        })
        .await??;
        Ok(true)
    }
}

fn write_loop(conn: &mut Conn, mut inbox: mpsc::Receiver<WriteOp>, depth: prometheus::IntGauge) {
    let mut pending: Option<WriteOp> = None;
    loop {
        let first = match pending.take() {
            Some(op) => op,
            None => match inbox.blocking_recv() {
                Some(op) => op,
                None => return,
            },
        };
        depth.dec();
        let first = match first {
            WriteOp::Alone(work) => {
                work(conn);
                continue;
            }
            WriteOp::Grouped(work) => work,
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match inbox.try_recv() {
                Ok(WriteOp::Grouped(work)) => {
                    depth.dec();
                    group.push(work);
                }
                Ok(alone) => {
                    pending = Some(alone);
                    break;
                }
                Err(_) => break,
            }
        }
        let began = conn.trusted(|c| c.execute_batch("BEGIN IMMEDIATE"));
        if let Err(error) = began {
            tracing::error!(%error, "sql writer cannot begin a transaction");
            for work in group {
                // Each runs in autocommit mode instead; nothing is lost.
                let (_, answer) = work(conn);
                answer(true);
            }
            continue;
        }
        let mut answers = Vec::with_capacity(group.len());
        for work in group {
            let _ = conn.trusted(|c| c.execute_batch("SAVEPOINT keel_write"));
            let (succeeded, answer) = work(conn);
            let finish = if succeeded {
                "RELEASE keel_write"
            } else {
                "ROLLBACK TO keel_write; RELEASE keel_write"
            };
            if let Err(error) = conn.trusted(|c| c.execute_batch(finish)) {
                tracing::error!(%error, "sql savepoint could not be closed");
            }
            answers.push(answer);
        }
        let committed = match conn.trusted(|c| c.execute_batch("COMMIT")) {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, "sql commit failed; the group was rolled back");
                let _ = conn.trusted(|c| c.execute_batch("ROLLBACK"));
                false
            }
        };
        for answer in answers {
            answer(committed);
        }
    }
}
