//! The data directory and the lock that makes it one keel's.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::StorageError;

/// Creates `path` (and its parents) with mode 0700 when it is missing; an existing
/// directory keeps the mode its operator gave it.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    // The umask may have widened the mode; the data is private whatever it is.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// A locked data directory. The lock is an `flock` on `keel.lock`, so the kernel
/// releases it when the process dies however it dies: no stale-lock cleanup needed.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Holds the lock for as long as this value lives.
    _lock: File,
}

impl DataDir {
    pub fn open(path: &Path) -> Result<DataDir, StorageError> {
        let wrap = |source| StorageError::DataDir {
            path: path.to_owned(),
            source,
        };
        create_private_dir(path).map_err(wrap)?;
        let lock_path = path.join("keel.lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(wrap)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "pid unknown".to_owned(),
                    pid => format!("pid {pid}"),
                };
                return Err(StorageError::InUse {
                    path: path.to_owned(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(wrap(error)),
        }
        lock.set_len(0).map_err(wrap)?;
        lock.rewind().map_err(wrap)?;
        write!(lock, "{}", std::process::id()).map_err(wrap)?;
        lock.flush().map_err(wrap)?;
        Ok(DataDir {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
