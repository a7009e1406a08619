//! Schema migrations: numbered `.sql` files applied once each, in order, each in its own
//! transaction together with its record (version, name, checksum), so a crash leaves a
//! migration either fully applied and recorded or not at all.
//!
//! Keel's own migrations are embedded from the top-level `migrations/sqlite/`; the SQL
//! subsystem feeds users' migration folders through the same function.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::StorageError;

#[derive(Debug, Clone)]
pub struct Migration {
    pub version: u32,
    pub name: String,
    pub sql: String,
}

impl Migration {
    /// `0003_add_tokens.sql` → version 3, name `add_tokens`.
    pub fn from_file_name(file_name: &str, sql: String) -> Option<Migration> {
        let stem = file_name.strip_suffix(".sql")?;
        let (number, name) = stem.split_once('_').unwrap_or((stem, ""));
        Some(Migration {
            version: number.parse().ok()?,
            name: name.to_owned(),
            sql,
        })
    }

    pub fn checksum(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.sql.as_bytes());
        digest
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }
}

#[derive(rust_embed::RustEmbed)]
#[folder = "migrations/sqlite/"]
struct KeelMigrations;

/// Keel's own schema, in version order.
pub fn keel_migrations() -> Vec<Migration> {
    let mut migrations: Vec<Migration> = KeelMigrations::iter()
        .filter_map(|file_name| {
            let file = KeelMigrations::get(&file_name)?;
            let sql = String::from_utf8_lossy(&file.data).into_owned();
            Migration::from_file_name(&file_name, sql)
        })
        .collect();
    migrations.sort_by_key(|migration| migration.version);
    migrations
}

/// Applies what is missing and checks what was applied before.
pub fn apply_migrations(
    connection: &mut Connection,
    path: &Path,
    migrations: &[Migration],
) -> Result<(), StorageError> {
    let failed = |migration: &Migration, source| StorageError::MigrationFailed {
        path: path.to_owned(),
        version: migration.version,
        name: migration.name.clone(),
        source,
    };
    let bookkeeping = |source| StorageError::Sqlite {
        path: path.to_owned(),
        source,
    };
    connection
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS _keel_migrations (
                 version    INTEGER PRIMARY KEY,
                 name       TEXT NOT NULL,
                 checksum   TEXT NOT NULL,
                 applied_at INTEGER NOT NULL
             )",
        )
        .map_err(bookkeeping)?;

    let applied: Vec<(u32, String, String)> = {
        let mut statement = connection
            .prepare("SELECT version, name, checksum FROM _keel_migrations ORDER BY version")
            .map_err(bookkeeping)?;
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .and_then(|rows| rows.collect::<Result<_, _>>())
            .map_err(bookkeeping)?
    };
    for (version, name, recorded) in &applied {
        match migrations
            .iter()
            .find(|migration| migration.version == *version)
        {
            None => {
                return Err(StorageError::UnknownMigration {
                    path: path.to_owned(),
                    version: *version,
                    name: name.clone(),
                });
            }
            Some(migration) if migration.checksum() != *recorded => {
                return Err(StorageError::MigrationChanged {
                    path: path.to_owned(),
                    version: *version,
                    name: name.clone(),
                    recorded: recorded.clone(),
                    current: migration.checksum(),
                });
            }
            Some(_) => {}
        }
    }

    for migration in migrations {
        let transaction = connection.transaction().map_err(bookkeeping)?;
        // Checked again inside the transaction: another process may have applied it.
        let already: Option<u32> = transaction
            .query_row(
                "SELECT version FROM _keel_migrations WHERE version = ?1",
                [migration.version],
                |row| row.get(0),
            )
            .optional()
            .map_err(bookkeeping)?;
        if already.is_some() {
            continue;
        }
        transaction
            .execute_batch(&migration.sql)
            .map_err(|source| failed(migration, source))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs() as i64)
            .unwrap_or(0);
        transaction
            .execute(
                "INSERT INTO _keel_migrations (version, name, checksum, applied_at) VALUES (?1, ?2, ?3, ?4)",
                params![migration.version, migration.name, migration.checksum(), now],
            )
            .map_err(|source| failed(migration, source))?;
        transaction
            .commit()
            .map_err(|source| failed(migration, source))?;
        tracing::info!(version = migration.version, name = %migration.name, path = %path.display(), "migration applied");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(version: u32, sql: &str) -> Migration {
        Migration {
            version,
            name: format!("m{version}"),
            sql: sql.to_owned(),
        }
    }

    #[test]
    fn applies_once_and_detects_changes() {
        let mut connection = Connection::open_in_memory().unwrap();
        let path = Path::new(":memory:");
        let first = vec![
            migration(1, "CREATE TABLE a (x)"),
            migration(2, "CREATE TABLE b (y)"),
        ];
        apply_migrations(&mut connection, path, &first).unwrap();
        apply_migrations(&mut connection, path, &first).unwrap();

        let changed = vec![
            migration(1, "CREATE TABLE a (x, z)"),
            migration(2, "CREATE TABLE b (y)"),
        ];
        let error = apply_migrations(&mut connection, path, &changed).unwrap_err();
        assert!(
            matches!(error, StorageError::MigrationChanged { version: 1, .. }),
            "{error}"
        );

        let error = apply_migrations(&mut connection, path, &first[..1]).unwrap_err();
        assert!(
            matches!(error, StorageError::UnknownMigration { version: 2, .. }),
            "{error}"
        );
    }

    #[test]
    fn a_failing_migration_leaves_nothing_behind() {
        let mut connection = Connection::open_in_memory().unwrap();
        let path = Path::new(":memory:");
        let broken = vec![migration(
            1,
            "CREATE TABLE a (x); INSERT INTO nowhere VALUES (1);",
        )];
        assert!(apply_migrations(&mut connection, path, &broken).is_err());
        let tables: i64 = connection
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'a'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0);
    }

    #[test]
    fn file_names() {
        let parsed = Migration::from_file_name("0003_add_tokens.sql", String::new()).unwrap();
        assert_eq!((parsed.version, parsed.name.as_str()), (3, "add_tokens"));
        assert!(Migration::from_file_name("README.md", String::new()).is_none());
    }
}

/// The site's migrations: every `.sql` file of `dir`, in version order.
pub fn migrations_in_dir(dir: &Path) -> Result<Vec<Migration>, StorageError> {
    let unreadable = |source| StorageError::MigrationsDir {
        path: dir.to_owned(),
        source,
    };
    let mut migrations = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if !file_name.ends_with(".sql") {
            continue;
        }
        let sql = std::fs::read_to_string(entry.path()).map_err(unreadable)?;
        let migration = Migration::from_file_name(&file_name, sql)
            .ok_or_else(|| StorageError::MigrationName { path: entry.path() })?;
        if migrations
            .iter()
            .any(|known: &Migration| known.version == migration.version)
        {
            return Err(StorageError::MigrationDuplicate {
                path: dir.to_owned(),
                version: migration.version,
            });
        }
        migrations.push(migration);
    }
    migrations.sort_by_key(|migration| migration.version);
    Ok(migrations)
}

/// Where one migration stands against a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    Applied,
    Pending,
    /// Applied, but the file changed since.
    Changed,
    /// Applied, but no file has it any more.
    Missing,
}

/// Every migration known to the files or the database, with its state.
pub fn migration_status(
    connection: &Connection,
    migrations: &[Migration],
) -> rusqlite::Result<Vec<(u32, String, MigrationState)>> {
    let exists: bool = connection.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = '_keel_migrations'",
        [],
        |row| row.get(0),
    )?;
    let applied: Vec<(u32, String, String)> = if exists {
        let mut statement = connection
            .prepare("SELECT version, name, checksum FROM _keel_migrations ORDER BY version")?;
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let mut status: Vec<(u32, String, MigrationState)> = migrations
        .iter()
        .map(|migration| {
            let state = match applied
                .iter()
                .find(|(version, _, _)| *version == migration.version)
            {
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
        if !migrations
            .iter()
            .any(|migration| migration.version == *version)
        {
            status.push((*version, name.clone(), MigrationState::Missing));
        }
    }
    status.sort_by_key(|(version, _, _)| *version);
    Ok(status)
}
