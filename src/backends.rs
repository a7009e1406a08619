//! The one place that chooses between embedded and external implementations of the
//! subsystems' storage seams, from the configuration. Every option is listed even where
//! this build cannot provide it yet, so the error can say what to use instead.

use std::path::Path;
use std::sync::Arc;

use crate::cache::{CacheStore, RedbCacheStore, RedisCacheStore};
use crate::config::{Config, QueueBackend};
use crate::observe::{Dependency, Metrics, Readiness};
use crate::queue::pg_store::{PgQueueStore, PgSettings};
use crate::queue::redb_store::RedbQueueStore;
use crate::queue::{Clock, QueueMetrics, QueueStore, RetentionPolicies, Wakeups};
use crate::storage::Storage;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cache.l2: {0}")]
    CacheStore(String),
    #[error("queue store: {0}")]
    QueueStore(String),
    #[error("{key} = {value:?} is not available yet in this keel; use {instead}")]
    Unsupported {
        key: &'static str,
        value: String,
        instead: &'static str,
    },
}

/// The PostgreSQL servers keel calls, one [`Dependency`] each (breaker, metrics,
/// `/readyz` entry) shared by everything that calls it: `postgres` for `sql.url` and
/// the queue on the same URL, `postgres_replica` for `sql.replica`, `postgres_queue`
/// when `queue.url` names another database than `sql.url`. Optional in `/readyz`, like
/// Redis: a node whose PostgreSQL is away still serves the cache and the gateway, so
/// a load balancer must not take every node out.
pub struct PostgresDependencies {
    pub sql: Option<Dependency>,
    pub replica: Option<Dependency>,
    pub queue: Option<Dependency>,
}

impl PostgresDependencies {
    pub fn new(config: &Config, metrics: &Metrics, readiness: &Readiness) -> PostgresDependencies {
        let dependency = |name| Dependency::new(name, true, metrics, readiness);
        let sql_url = config.sql_postgres_url();
        let sql = sql_url.map(|_| dependency("postgres"));
        let replica = config
            .sql
            .replica
            .as_ref()
            .filter(|_| sql.is_some())
            .map(|_| dependency("postgres_replica"));
        let queue = match (config.queue.backend, config.queue_postgres_url()) {
            (QueueBackend::Postgres, Some((_, queue_url))) => Some(match (&sql, sql_url) {
                (Some(shared), Some(url)) if url.expose() == queue_url.expose() => shared.clone(),
                (Some(_), _) => dependency("postgres_queue"),
                (None, _) => dependency("postgres"),
            }),
            _ => None,
        };
        PostgresDependencies {
            sql,
            replica,
            queue,
        }
    }
}

/// The cache's L2: none, redb in the data directory, or Redis (`redis`, the
/// dependency its calls report to, is required then). Redis is not contacted here:
/// keel starts, and serves L1, while it is away.
pub fn open_cache_store(
    config: &Config,
    data_dir: &Path,
    redis: Option<&Dependency>,
) -> Result<Option<Arc<dyn CacheStore>>, BackendError> {
    match config.cache.l2.as_str() {
        "none" => Ok(None),
        "redb" => {
            let path = data_dir.join("cache.redb");
            let store = RedbCacheStore::open(&path, config.cache.l2_page_cache_bytes.0 as usize)
                .map_err(|error| BackendError::CacheStore(error.to_string()))?;
            Ok(Some(Arc::new(store)))
        }
        url if url.starts_with("redis://") => {
            let dependency = redis.ok_or_else(|| {
                BackendError::CacheStore("a Redis L2 needs the redis dependency".to_owned())
            })?;
            let client = crate::redis_client::RedisClient::new(url, dependency.clone())
                .map_err(|error| BackendError::CacheStore(error.to_string()))?;
            Ok(Some(Arc::new(RedisCacheStore::new(
                Arc::new(client),
                &config.cache.redis_prefix,
                config.cache.l1_max_age.0,
            ))))
        }
        other => Err(BackendError::Unsupported {
            key: "cache.l2",
            value: other.to_owned(),
            instead: "\"redb\", \"none\" or a redis:// URL",
        }),
    }
}

/// The job queue's store: redb (`queue.redb`, opened with the other embedded files),
/// or PostgreSQL when scaled out, its calls reported to `postgres` (required then).
/// PostgreSQL must answer within a few seconds: start-up fails with the reason rather
/// than waiting for it.
pub async fn open_queue_store(
    config: &Config,
    storage: &Storage,
    clock: Arc<dyn Clock>,
    wakeups: Arc<Wakeups>,
    metrics: QueueMetrics,
    postgres: Option<&Dependency>,
) -> Result<Arc<dyn QueueStore>, BackendError> {
    match config.queue.backend {
        QueueBackend::Redb => {
            let store = RedbQueueStore::open(
                storage.queue_db.clone(),
                &storage.data_dir.path().join("queue.redb"),
                clock,
                wakeups,
                metrics,
                RetentionPolicies::from_config(&config.queue),
            )
            .map_err(|error| BackendError::QueueStore(error.to_string()))?;
            Ok(Arc::new(store))
        }
        QueueBackend::Postgres => {
            let (key, url) = config.queue_postgres_url().ok_or_else(|| {
                BackendError::QueueStore("queue.backend = \"postgres\" needs queue.url".to_owned())
            })?;
            let dependency = postgres.ok_or_else(|| {
                BackendError::QueueStore(
                    "a PostgreSQL queue needs the postgres dependency".to_owned(),
                )
            })?;
            let settings = PgSettings {
                url: url.expose().to_owned(),
                schema: config.queue.schema.clone(),
                pool_size: config.queue.pool_size as usize,
                dependency: dependency.clone(),
            };
            let store = PgQueueStore::open(
                settings,
                clock,
                wakeups,
                metrics,
                RetentionPolicies::from_config(&config.queue),
            )
            .await
            .map_err(|error| {
                BackendError::QueueStore(format!(
                    "PostgreSQL at {key} = {:?} (schema {:?}): {error}",
                    url.redacted(),
                    config.queue.schema
                ))
            })?;
            Ok(Arc::new(store))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::BuildInfo;

    fn names(toml: &str) -> [Option<&'static str>; 3] {
        let config = crate::config::parse_str(Path::new("keel.toml"), toml).unwrap();
        let dependencies = PostgresDependencies::new(
            &config,
            &Metrics::new(BuildInfo::CURRENT),
            &Readiness::default(),
        );
        [
            dependencies.sql.as_ref().map(Dependency::name),
            dependencies.replica.as_ref().map(Dependency::name),
            dependencies.queue.as_ref().map(Dependency::name),
        ]
    }

    #[test]
    fn one_dependency_per_postgresql_server() {
        let db = "postgres://keel@db/keel";
        assert_eq!(names(""), [None, None, None]);
        assert_eq!(
            names(&format!(
                "[queue]\nbackend = \"postgres\"\nurl = \"{db}\"\n"
            )),
            [None, None, Some("postgres")]
        );
        // The queue on sql.url shares its server's breaker, whether named or implied.
        let sql = format!("[sql]\nurl = \"{db}\"\nreplica = \"postgres://keel@replica/keel\"\n");
        assert_eq!(
            names(&format!("{sql}[queue]\nbackend = \"postgres\"\n")),
            [Some("postgres"), Some("postgres_replica"), Some("postgres")]
        );
        assert_eq!(
            names(&format!(
                "{sql}[queue]\nbackend = \"postgres\"\nurl = \"postgres://keel@jobs/keel\"\n"
            )),
            [
                Some("postgres"),
                Some("postgres_replica"),
                Some("postgres_queue")
            ]
        );
    }
}
