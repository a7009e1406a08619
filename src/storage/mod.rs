//! The storage home: the data directory, its lock, and the database files in it.
//!
//! Layout of `data_dir`:
//! - `keel.lock`: held (flock) for the life of the process; holds the pid.
//! - `keel.sqlite`: keel's own schema (top-level `migrations/`), WAL.
//! - `data.sqlite`: the SQL data API's database (`sql.url`), WAL.
//! - `cache.redb`: the L2 cache, opened by `backends` for the cache subsystem; a file of
//!   its own so cache writes never queue behind job commits.
//! - `queue.redb`: the job queue.
//! - `tokens.json`, `auth.key`, `tokens.lock`, `admin.token`: owned by `auth` (its
//!   `TokenStore`), and used without the lock above so `keel token` works next to a
//!   running keel.
//!
//! Opening is blocking work (fsync, migrations); callers run it off the async threads.

mod home;
mod migrate;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use crate::config::Config;

pub use home::{DataDir, create_private_dir};
pub use migrate::{
    Migration, MigrationState, apply_migrations, keel_migrations, migration_status,
    migrations_in_dir,
};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "data directory {path} is in use by another keel ({holder}); stop it or choose another data_dir"
    )]
    InUse { path: PathBuf, holder: String },
    #[error("cannot open {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot open {path}: {source}")]
    Redb {
        path: PathBuf,
        source: Box<redb::DatabaseError>,
    },
    #[error(
        "migration {version} ({name}) was changed after it was applied to {path}: \
         recorded checksum {recorded}, now {current}. Applied migrations must never change; \
         restore the original file or restore the database from a backup"
    )]
    MigrationChanged {
        path: PathBuf,
        version: u32,
        name: String,
        recorded: String,
        current: String,
    },
    #[error(
        "{path} has migration {version} ({name}) applied, which this keel does not know: was it opened by a newer keel?"
    )]
    UnknownMigration {
        path: PathBuf,
        version: u32,
        name: String,
    },
    #[error("migration {version} ({name}) failed on {path}: {source}")]
    MigrationFailed {
        path: PathBuf,
        version: u32,
        name: String,
        source: rusqlite::Error,
    },
    #[error("cannot read migrations from {path}: {source}")]
    MigrationsDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: migration files are named NNNN_name.sql (a number, then a name)")]
    MigrationName { path: PathBuf },
    #[error("{path} has two migrations numbered {version}")]
    MigrationDuplicate { path: PathBuf, version: u32 },
    #[error(
        "sql.url is not a SQLite database: this works on SQLite only (back up PostgreSQL with its own tools)"
    )]
    NotSqlite,
}

/// Everything opened in the data directory. Dropping it closes the files and releases
/// the lock, in that order (fields drop in declaration order).
pub struct Storage {
    /// Keel's own tables. A std `Mutex`: statements are short and run on blocking threads.
    pub meta: Arc<Mutex<Connection>>,
    /// `None` when `sql.url` is PostgreSQL.
    pub data_sqlite_path: Option<PathBuf>,
    pub queue_db: Arc<redb::Database>,
    /// Last, so the lock is released only after every file above is closed.
    pub data_dir: DataDir,
}

impl Storage {
    /// Locks the data directory. Cheap, and done first so a second keel stops before it
    /// binds any port.
    pub fn lock(config: &Config) -> Result<DataDir, StorageError> {
        DataDir::open(&config.data_dir)
    }

    /// Opens every database and applies keel's migrations. Blocking.
    pub fn open(data_dir: DataDir, config: &Config) -> Result<Storage, StorageError> {
        let meta_path = data_dir.path().join("keel.sqlite");
        let mut meta = open_sqlite(&meta_path)?;
        apply_migrations(&mut meta, &meta_path, &keel_migrations())?;
        tracing::info!(path = %meta_path.display(), "keel schema up to date");

        let url = config.sql.url.expose();
        let data_sqlite_path = if url.starts_with("postgres://") || url.starts_with("postgresql://")
        {
            None
        } else {
            let path = sqlite_path(data_dir.path(), url)?;
            drop(open_sqlite(&path)?);
            tracing::info!(path = %path.display(), "sql database opened");
            Some(path)
        };

        let queue_db = open_redb(&data_dir.path().join("queue.redb"))?;
        tracing::info!("queue store opened");
        Ok(Storage {
            meta: Arc::new(Mutex::new(meta)),
            data_sqlite_path,
            queue_db,
            data_dir,
        })
    }
}

/// One database file of the data directory and its size on disk.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredFile {
    pub name: String,
    pub path: PathBuf,
    /// `None` when the file does not exist (a layer that is off, PostgreSQL instead of
    /// SQLite).
    pub bytes: Option<u64>,
    /// The write-ahead log beside a SQLite file, which holds commits not yet
    /// checkpointed into it.
    pub wal_bytes: Option<u64>,
}

/// The sizes of the databases in `data_dir` (the layout above), read from the file
/// system now. `sql_url` places `data.sqlite`.
pub fn stored_files(data_dir: &Path, sql_url: &str) -> Vec<StoredFile> {
    let size = |path: &Path| std::fs::metadata(path).ok().map(|meta| meta.len());
    let mut files = vec![
        (data_dir.join("keel.sqlite"), true),
        (data_dir.join("cache.redb"), false),
        (data_dir.join("queue.redb"), false),
    ];
    if let Ok(path) = sqlite_path(data_dir, sql_url) {
        files.insert(1, (path, true));
    }
    files
        .into_iter()
        .map(|(path, sqlite)| {
            let mut wal = path.clone().into_os_string();
            wal.push("-wal");
            StoredFile {
                name: path
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                bytes: size(&path),
                wal_bytes: if sqlite { size(Path::new(&wal)) } else { None },
                path,
            }
        })
        .collect()
}

/// `sqlite://data.sqlite` is relative to the data directory; `sqlite:///abs/path` is not.
pub fn sqlite_path(data_dir: &Path, url: &str) -> Result<PathBuf, StorageError> {
    let rest = url
        .strip_prefix("sqlite://")
        .ok_or(StorageError::NotSqlite)?;
    let path = Path::new(rest);
    Ok(if path.is_absolute() {
        path.to_owned()
    } else {
        data_dir.join(path)
    })
}

/// Opens a SQLite file in WAL mode with the settings keel relies on everywhere.
pub fn open_sqlite(path: &Path) -> Result<Connection, StorageError> {
    let wrap = |source| StorageError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let connection = Connection::open(path).map_err(wrap)?;
    connection
        .execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .map_err(wrap)?;
    connection
        .busy_timeout(std::time::Duration::from_secs(5))
        .map_err(wrap)?;
    Ok(connection)
}

fn open_redb(path: &Path) -> Result<Arc<redb::Database>, StorageError> {
    // redb's page cache defaults to 1 GiB; the queue's working set is far smaller.
    redb::Database::builder()
        .set_cache_size(32 << 20)
        .create(path)
        .map(Arc::new)
        .map_err(|source| StorageError::Redb {
            path: path.to_owned(),
            source: Box::new(source),
        })
}
