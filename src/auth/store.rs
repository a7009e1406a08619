//! The token file, `<data_dir>/tokens.json`: names, roles, scopes and keyed hashes,
//! never a token itself.
//!
//! `keel token ...` runs as a process of its own while `keel serve` holds the data
//! directory's lock, so this file lives outside that lock: writers (the CLI, the REST
//! routes) serialise on `tokens.lock` (flock), write a temporary file, fsync it and
//! rename it over the old one, so a reader sees the old file or the new one, never half.
//! A running keel notices a new file by its inode, size and mtime, checked at most once
//! a second on use, so a revocation takes effect within about a second everywhere.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::token::{
    Principal, Role, Scope, TokenHash, TokenHasher, default_name, generate_token, normalize_scopes,
    random_bytes, valid_name,
};

const TOKENS_FILE: &str = "tokens.json";
const LOCK_FILE: &str = "tokens.lock";
const KEY_FILE: &str = "auth.key";

/// The file is re-checked on use at most this often (milliseconds).
const RECHECK_MS: u64 = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum TokenStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid token file: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path} must hold exactly 32 bytes; remove it to make a new key (every token then stops working)"
    )]
    BadKey { path: PathBuf },
    #[error("invalid token name {0:?}: use 1 to 64 characters of A-Z a-z 0-9 _ . -")]
    BadName(String),
    #[error("a token named {0:?} exists already")]
    NameTaken(String),
    #[error("no token named {0:?}")]
    NotFound(String),
}

/// What may be shown about a token: everything but secret material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub scopes: Vec<Scope>,
    /// RFC 3339, UTC.
    pub created: String,
}

/// One line of the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredToken {
    name: String,
    role: Role,
    #[serde(default)]
    scopes: Vec<Scope>,
    created: String,
    /// HMAC-SHA256 of the token under `auth.key`, in hex.
    hash: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    version: u32,
    tokens: Vec<StoredToken>,
}

/// Which version of the file a snapshot was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    mtime_ns: i128,
}

#[derive(Default)]
struct Snapshot {
    stamp: Option<FileStamp>,
    by_hash: HashMap<TokenHash, Arc<Principal>>,
    infos: Vec<TokenInfo>,
}

/// The tokens of one data directory. Lookups are one hash and one map probe; the file
/// is read again only when it changed.
pub struct TokenStore {
    dir: PathBuf,
    hasher: TokenHasher,
    snapshot: RwLock<Snapshot>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last look at the file.
    last_check: AtomicU64,
}

impl TokenStore {
    /// Opens (creating the directory and the hashing key when missing) the store in
    /// `dir`. Blocking.
    pub fn open(dir: &Path) -> Result<TokenStore, TokenStoreError> {
        let io = |source| TokenStoreError::Io {
            path: dir.to_owned(),
            source,
        };
        crate::storage::create_private_dir(dir).map_err(io)?;
        let key = load_or_create_key(&dir.join(KEY_FILE))?;
        let store = TokenStore {
            dir: dir.to_owned(),
            hasher: TokenHasher::new(&key),
            snapshot: RwLock::new(Snapshot::default()),
            epoch: Instant::now(),
            last_check: AtomicU64::new(0),
        };
        store.reload()?;
        Ok(store)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(TOKENS_FILE)
    }

    /// The principal a presented token stands for, if it is a current token.
    pub fn authenticate(&self, token: &[u8]) -> Option<Arc<Principal>> {
        self.resolve(&self.hasher.hash(token))
    }

    /// The principal of a token known by its hash (a session's), if still current.
    pub fn resolve(&self, hash: &TokenHash) -> Option<Arc<Principal>> {
        self.refresh_if_due();
        self.read().by_hash.get(hash).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.refresh_if_due();
        self.read().infos.is_empty()
    }

    /// Every token, as the file says right now.
    pub fn list(&self) -> Result<Vec<TokenInfo>, TokenStoreError> {
        self.reload()?;
        Ok(self.read().infos.clone())
    }

    /// Makes a token and stores its hash. The token is returned once and kept nowhere.
    pub fn create(
        &self,
        role: Role,
        scopes: Vec<Scope>,
        name: Option<String>,
    ) -> Result<(TokenInfo, String), TokenStoreError> {
        let name = name.unwrap_or_else(|| default_name(role));
        if !valid_name(&name) {
            return Err(TokenStoreError::BadName(name));
        }
        let token = generate_token();
        let info = TokenInfo {
            name: name.clone(),
            role,
            scopes: normalize_scopes(scopes),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let stored = StoredToken {
            name: info.name.clone(),
            role,
            scopes: info.scopes.clone(),
            created: info.created.clone(),
            hash: hex(&self.hasher.hash(token.as_bytes())),
        };
        self.modify(|file| {
            if file.tokens.iter().any(|token| token.name == name) {
                return Err(TokenStoreError::NameTaken(name.clone()));
            }
            file.tokens.push(stored);
            Ok(())
        })?;
        Ok((info, token))
    }

    /// Removes the token named `name`; returns what it was, with the hash its sessions
    /// are known by.
    pub fn revoke(&self, name: &str) -> Result<(TokenInfo, TokenHash), TokenStoreError> {
        let mut removed = None;
        self.modify(|file| {
            let index = file
                .tokens
                .iter()
                .position(|token| token.name == name)
                .ok_or_else(|| TokenStoreError::NotFound(name.to_owned()))?;
            removed = Some(file.tokens.remove(index));
            Ok(())
        })?;
        let removed = removed.expect("set by the closure on success");
        let hash = unhex(&removed.hash).unwrap_or_default();
        Ok((info_of(&removed), hash))
    }

    /// Read-modify-write under `tokens.lock`, so two writers (a CLI and the server)
    /// never lose each other's change.
    fn modify(
        &self,
        change: impl FnOnce(&mut TokenFile) -> Result<(), TokenStoreError>,
    ) -> Result<(), TokenStoreError> {
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| TokenStoreError::Io {
                path: lock_path.clone(),
                source,
            })?;
        owned_like_dir(&self.dir, &lock_path);
        lock.lock().map_err(|source| TokenStoreError::Io {
            path: lock_path.clone(),
            source,
        })?;
        let path = self.path();
        let mut file = read_file(&path)?
            .map(|(file, _)| file)
            .unwrap_or(TokenFile {
                version: 1,
                tokens: Vec::new(),
            });
        change(&mut file)?;
        write_atomically(&self.dir, &path, &file)?;
        // Dropping `lock` releases it; reload first so this process sees its own write.
        self.reload()?;
        drop(lock);
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.snapshot.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn refresh_if_due(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_check.load(Ordering::Relaxed);
        if now.saturating_sub(last) < RECHECK_MS
            || self
                .last_check
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Err(error) = self.reload() {
            // The last good snapshot stays in force: the writers never leave a broken
            // file, so this is a hand edit gone wrong, and locking every client out for
            // it would be worse than keeping the tokens of a minute ago.
            tracing::error!(%error, "cannot re-read the token file; keeping the tokens read before");
        }
    }

    /// Reads the file again if it is not the one the snapshot came from.
    fn reload(&self) -> Result<(), TokenStoreError> {
        let path = self.path();
        let stamp = stamp_of(&path)?;
        if stamp.is_some() && stamp == self.read().stamp {
            return Ok(());
        }
        let snapshot = match read_file(&path)? {
            None => Snapshot::default(),
            Some((file, stamp)) => {
                let mut by_hash = HashMap::with_capacity(file.tokens.len());
                for token in &file.tokens {
                    let Some(hash) = unhex(&token.hash) else {
                        tracing::warn!(name = %token.name, "token with a malformed hash ignored");
                        continue;
                    };
                    by_hash.insert(
                        hash,
                        Arc::new(Principal {
                            name: token.name.clone(),
                            role: token.role,
                            scopes: normalize_scopes(token.scopes.clone()),
                            token_hash: Some(hash),
                        }),
                    );
                }
                Snapshot {
                    stamp: Some(stamp),
                    by_hash,
                    infos: file.tokens.iter().map(info_of).collect(),
                }
            }
        };
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = snapshot;
        Ok(())
    }
}

fn info_of(token: &StoredToken) -> TokenInfo {
    TokenInfo {
        name: token.name.clone(),
        role: token.role,
        scopes: normalize_scopes(token.scopes.clone()),
        created: token.created.clone(),
    }
}

fn stamp_of(path: &Path) -> Result<Option<FileStamp>, TokenStoreError> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(Some(FileStamp {
            inode: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenStoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The file and the stamp of what was read (taken from the open file, so a rename
/// between stat and read cannot pair one version's stamp with another's content).
fn read_file(path: &Path) -> Result<Option<(TokenFile, FileStamp)>, TokenStoreError> {
    let io = |source| TokenStoreError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io(error)),
    };
    let meta = file.metadata().map_err(io)?;
    let stamp = FileStamp {
        inode: meta.ino(),
        len: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    };
    let mut text = Vec::new();
    file.read_to_end(&mut text).map_err(io)?;
    let parsed = serde_json::from_slice(&text).map_err(|source| TokenStoreError::Corrupt {
        path: path.to_owned(),
        source,
    })?;
    Ok(Some((parsed, stamp)))
}

/// Temporary file (created 0600), fsync, rename, fsync of the directory: after a crash
/// the file is the old one or the new one.
fn write_atomically(dir: &Path, path: &Path, file: &TokenFile) -> Result<(), TokenStoreError> {
    let temp = dir.join(format!("{TOKENS_FILE}.tmp.{}", std::process::id()));
    let io = |source| TokenStoreError::Io {
        path: temp.clone(),
        source,
    };
    let _ = std::fs::remove_file(&temp);
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io)?;
    let mut text = serde_json::to_vec_pretty(file).expect("token file serializes");
    text.push(b'\n');
    out.write_all(&text).map_err(io)?;
    out.sync_all().map_err(io)?;
    drop(out);
    owned_like_dir(dir, &temp);
    std::fs::rename(&temp, path).map_err(io)?;
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| TokenStoreError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// The install's hashing key: made once, 0600 from creation on. Written to a temporary
/// file and hard-linked into place, which fails if another process got there first, so
/// no reader ever sees a key file that is still being written.
fn load_or_create_key(path: &Path) -> Result<Vec<u8>, TokenStoreError> {
    let io = |source| TokenStoreError::Io {
        path: path.to_owned(),
        source,
    };
    if !path.exists() {
        let temp = path.with_extension(format!("tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&temp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io)?;
        file.write_all(&random_bytes::<32>()).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        if let Some(dir) = path.parent() {
            owned_like_dir(dir, &temp);
        }
        let linked = std::fs::hard_link(&temp, path);
        let _ = std::fs::remove_file(&temp);
        match linked {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::AlreadyExists => {}
            Err(error) => return Err(io(error)),
        }
    }
    let key = std::fs::read(path).map_err(io)?;
    if key.len() != 32 {
        return Err(TokenStoreError::BadKey {
            path: path.to_owned(),
        });
    }
    Ok(key)
}

/// `sudo keel token create` runs as root while keel serves as its own user: a 0600 file
/// owned by root would be unreadable to the server. Files therefore take the data
/// directory's owner. Without the privilege to change owners (not root), the file keeps
/// ours, which is then already the right one or the operator's mistake to see.
fn owned_like_dir(dir: &Path, file: &Path) {
    let (Ok(dir_meta), Ok(file_meta)) = (std::fs::metadata(dir), std::fs::metadata(file)) else {
        return;
    };
    if (dir_meta.uid(), dir_meta.gid()) != (file_meta.uid(), file_meta.gid()) {
        let _ = std::os::unix::fs::chown(file, Some(dir_meta.uid()), Some(dir_meta.gid()));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<TokenHash> {
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (index, slot) in hash.iter_mut().enumerate() {
        *slot = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tokens_are_found_by_hash_and_stored_only_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        assert!(store.is_empty());
        let (info, token) = store
            .create(
                Role::Operator,
                vec![Scope::Sql, Scope::Cache, Scope::Sql],
                Some("ops".into()),
            )
            .unwrap();
        assert!(token.starts_with("keel_") && token.len() == 48, "{token}");
        assert_eq!(info.scopes, vec![Scope::Cache, Scope::Sql]);
        let principal = store.authenticate(token.as_bytes()).unwrap();
        assert_eq!(
            (principal.name.as_str(), principal.role),
            ("ops", Role::Operator)
        );
        assert!(store.authenticate(b"keel_guess").is_none());

        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(
            !text.contains(&token[5..]),
            "the file holds no token: {text}"
        );
        for file in [TOKENS_FILE, KEY_FILE] {
            let mode = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }

        assert!(matches!(
            store.create(Role::Admin, vec![], Some("ops".into())),
            Err(TokenStoreError::NameTaken(_))
        ));
        assert!(matches!(
            store.create(Role::Admin, vec![], Some("no spaces".into())),
            Err(TokenStoreError::BadName(_))
        ));
        let (_, generated) = store.create(Role::Readonly, vec![], None).unwrap();
        assert_eq!(store.list().unwrap().len(), 2);
        assert!(store.list().unwrap()[1].name.starts_with("readonly-"));

        store.revoke("ops").unwrap();
        assert!(store.authenticate(token.as_bytes()).is_none());
        assert!(matches!(
            store.revoke("ops"),
            Err(TokenStoreError::NotFound(_))
        ));
        assert!(store.authenticate(generated.as_bytes()).is_some());
    }

    #[test]
    fn a_second_store_on_the_same_directory_sees_changes_and_shares_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let server = TokenStore::open(dir.path()).unwrap();
        let cli = TokenStore::open(dir.path()).unwrap();
        let (_, token) = cli.create(Role::Admin, vec![], Some("a".into())).unwrap();
        // Force the re-check instead of waiting for the once-a-second look.
        server.reload().unwrap();
        assert!(server.authenticate(token.as_bytes()).is_some());
        cli.revoke("a").unwrap();
        server.reload().unwrap();
        assert!(server.authenticate(token.as_bytes()).is_none());
    }

    #[test]
    fn hex_round_trips() {
        let hash: TokenHash = std::array::from_fn(|index| index as u8 * 7);
        assert_eq!(unhex(&hex(&hash)), Some(hash));
        assert_eq!(unhex("zz"), None);
    }
}
