//! Online backup: a consistent copy of keel's durable files while it runs.
//!
//! - `data.sqlite` and `keel.sqlite` through SQLite's online backup API (the SQL copy is
//!   taken on the writer connection, between write transactions);
//! - `queue.redb` copied by the queue's writer thread between two commits.
//!
//! The cache's `cache.redb` is not copied: it is a cache, and a restored keel refills it.
//! Each file is consistent on its own; they are taken one after the other, not at one
//! instant (a job enqueued between the SQL copy and the queue copy is in the latter).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use serde::Serialize;

use crate::queue::Queue;
use crate::sql::Sql;

/// The files a backup holds, as `keel restore` expects them.
pub const BACKUP_FILES: [&str; 3] = ["data.sqlite", "keel.sqlite", "queue.redb"];

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {message}")]
    Destination { path: PathBuf, message: String },
    #[error("backing up {file} failed: {message}")]
    Copy { file: &'static str, message: String },
}

#[derive(Clone)]
pub struct Backup {
    pub meta: Arc<Mutex<Connection>>,
    pub sql: Sql,
    pub queue: Queue,
}

#[derive(Debug, Serialize)]
pub struct BackupReport {
    pub dir: PathBuf,
    pub files: Vec<(String, u64)>,
}

impl Backup {
    /// Writes the backup into `dir`, which must be absolute and empty or absent.
    pub async fn write_to(&self, dir: &Path) -> Result<BackupReport, BackupError> {
        let destination = |message: String| BackupError::Destination {
            path: dir.to_owned(),
            message,
        };
        if !dir.is_absolute() {
            return Err(destination(
                "the backup directory must be an absolute path".to_owned(),
            ));
        }
        if dir.exists()
            && std::fs::read_dir(dir)
                .map_err(|e| destination(e.to_string()))?
                .next()
                .is_some()
        {
            return Err(destination("the backup directory is not empty".to_owned()));
        }
        std::fs::create_dir_all(dir).map_err(|e| destination(e.to_string()))?;

        // false: the SQL data is in PostgreSQL, backed up with PostgreSQL's own tools.
        self.sql
            .backup(dir.join("data.sqlite"))
            .await
            .map_err(|e| BackupError::Copy {
                file: "data.sqlite",
                message: e.to_string(),
            })?;
        let meta = self.meta.clone();
        let target = dir.join("keel.sqlite");
        tokio::task::spawn_blocking(move || {
            meta.lock().expect("meta lock").backup(
                rusqlite::MAIN_DB,
                &target,
                None::<fn(rusqlite::backup::Progress)>,
            )
        })
        .await
        .map_err(|e| BackupError::Copy {
            file: "keel.sqlite",
            message: e.to_string(),
        })?
        .map_err(|e| BackupError::Copy {
            file: "keel.sqlite",
            message: e.to_string(),
        })?;
        self.queue
            .store()
            .backup(&dir.join("queue.redb"))
            .await
            .map_err(|e| BackupError::Copy {
                file: "queue.redb",
                message: e.to_string(),
            })?;
        let files = BACKUP_FILES
            .iter()
            .map(|file| {
                let size = std::fs::metadata(dir.join(file)).map_or(0, |m| m.len());
                ((*file).to_owned(), size)
            })
            .collect();
        tracing::info!(dir = %dir.display(), "backup written");
        Ok(BackupReport {
            dir: dir.to_owned(),
            files,
        })
    }
}
