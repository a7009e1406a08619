//! Start-up and shutdown of `keel serve`, told in order. Each step logs one line, so
//! the log of a start reads like this function.
//!
//! Order matters: the data directory is locked before any port is bound (a second keel
//! stops at once and says why), the api listener is up before storage opens (so
//! `/healthz` answers and `/readyz` says "starting"), and on shutdown listeners stop
//! before storage closes (no request can reach a closed database).

mod backup;
mod reload;
mod systemd;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use backup::{BACKUP_FILES, Backup, BackupError, BackupReport};

use crate::auth::Authenticator;
use crate::backends::{self, BackendError, PostgresDependencies};
use crate::cache::loader::Namespaces;
use crate::cache::warm::CacheWarm;
use crate::cache::{Cache, CacheMetrics, Limits};
use crate::config::{
    Config, ConfigSources, QueueConfig, QueueDefinition, ScheduleConfig, SqlConfig,
};
use crate::gateway::{Gateway, GatewayMetrics};
use crate::http::{self, ApiState, Services};
use crate::listener::{HttpOptions, Listener, ListenerError, serve_http};
use crate::observe::{
    BuildInfo, Dependency, DependencyState, History, LogHandle, Metrics, Readiness,
};
use crate::queue::{Clock, ProcessorRegistry, Queue, QueueMetrics, SystemClock, Wakeups};
use crate::ratelimit::{RateLimitMetrics, SharedLimits};
use crate::resp::{ParseLimits, RespContext, RespMetrics, serve_resp};
use crate::sql::{
    MaintenanceProcessor, PgSettings, PgSqlBackend, QueryLoader, Settings as SqliteSettings, Sql,
    SqlBackend, SqlMetrics, SqliteBackend,
};
use crate::storage::{Storage, StorageError};

/// Opens the queue store, syncs schedules and starts the queue's background work.
async fn start_queue(
    config: &Config,
    storage: &Storage,
    metrics: &Metrics,
    namespaces: &Namespaces,
    sql: &Sql,
    postgres: &PostgresDependencies,
    shutdown: &CancellationToken,
) -> Result<Queue, AppError> {
    let queue_config = with_builtin_jobs(&config.queue, &config.sql);
    let queue_metrics = QueueMetrics::new(metrics.registry());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let wakeups = Arc::new(Wakeups::default());
    let store = backends::open_queue_store(
        config,
        storage,
        clock.clone(),
        wakeups.clone(),
        queue_metrics.clone(),
        postgres.queue.as_ref(),
    )
    .await?;
    let queue = Queue::new(
        store,
        clock,
        wakeups,
        queue_metrics,
        &queue_config,
        shutdown.clone(),
    );
    let mut processors = ProcessorRegistry::with_builtins(&queue);
    let warm_namespaces = namespaces.clone();
    processors.register("cache.warm", move |processor| match processor {
        crate::config::Processor::CacheWarm { namespace } => Some(Arc::new(CacheWarm {
            namespaces: warm_namespaces.clone(),
            namespace: namespace.clone(),
        })
            as Arc<dyn crate::queue::Processor>),
        _ => None,
    });
    let maintained = sql.clone();
    processors.register("sql.maintenance", move |_| {
        Some(Arc::new(MaintenanceProcessor {
            sql: maintained.clone(),
        }) as Arc<dyn crate::queue::Processor>)
    });
    queue
        .start(&queue_config, &processors)
        .await
        .map_err(|error| AppError::Runtime(format!("queue: {error}")))?;
    tracing::info!(backend = queue.store().kind(), "queue ready");
    Ok(queue)
}

/// The queue configuration plus keel's own recurring jobs: the nightly SQL maintenance
/// (its queue and schedule are added unless `sql.maintenance_cron = ""`).
fn with_builtin_jobs(queue: &QueueConfig, sql: &SqlConfig) -> QueueConfig {
    let mut queue = queue.clone();
    if sql.maintenance_cron.is_empty() {
        return queue;
    }
    queue
        .queues
        .entry(SQL_MAINTENANCE_QUEUE.to_owned())
        .or_insert_with(|| QueueDefinition {
            processor: Some(crate::config::Processor::SqlMaintenance {}),
            ..QueueDefinition::default()
        });
    if !queue
        .schedules
        .iter()
        .any(|schedule| schedule.name.as_deref() == Some(SQL_MAINTENANCE_QUEUE))
    {
        queue.schedules.push(ScheduleConfig {
            name: Some(SQL_MAINTENANCE_QUEUE.to_owned()),
            queue: Some(SQL_MAINTENANCE_QUEUE.to_owned()),
            cron: Some(sql.maintenance_cron.clone()),
            timezone: "UTC".to_owned(),
            job: None,
            payload: None,
            catch_up: crate::config::CatchUp::One,
        });
    }
    queue
}

/// The queue and schedule of the built-in SQL maintenance job.
pub const SQL_MAINTENANCE_QUEUE: &str = "keel.sql.maintenance";

/// Applies the site's migrations, then opens the SQL backend: SQLite on `data.sqlite`,
/// or PostgreSQL when `sql.url` says so (unreachable: start-up stops, naming the key).
async fn open_sql(
    config: &Config,
    storage: &Storage,
    metrics: &Metrics,
    cache: &Cache,
    postgres: &PostgresDependencies,
) -> Result<Sql, AppError> {
    let sql_config = config.sql.clone();
    let sql_metrics = SqlMetrics::new(metrics.registry());
    let backend: Arc<dyn SqlBackend> = match storage.data_sqlite_path.clone() {
        Some(path) => {
            let backend_metrics = sql_metrics.clone();
            let backend =
                tokio::task::spawn_blocking(move || -> Result<SqliteBackend, AppError> {
                    if let Some(dir) = &sql_config.migrations_dir {
                        let migrations = crate::storage::migrations_in_dir(dir)?;
                        let mut connection = crate::storage::open_sqlite(&path)?;
                        crate::storage::apply_migrations(&mut connection, &path, &migrations)?;
                        tracing::info!(dir = %dir.display(), count = migrations.len(), "sql migrations applied");
                    }
                    SqliteBackend::open(
                        SqliteSettings {
                            path,
                            readers: sql_config.readers as usize,
                            synchronous: sql_config.synchronous,
                            busy_timeout: sql_config.busy_timeout.0,
                        },
                        backend_metrics,
                    )
                    .map_err(|error| AppError::Runtime(format!("sql: {error}")))
                })
                .await
                .map_err(|panic| AppError::Runtime(format!("opening SQL panicked: {panic}")))??;
            Arc::new(backend)
        }
        None => Arc::new(open_postgres_sql(&sql_config, sql_metrics.clone(), postgres).await?),
    };
    let sql = Sql::new(backend, &config.sql, Some(cache.clone()), sql_metrics);
    tracing::info!(backend = sql.backend_kind(), readers = config.sql.readers, queries = ?sql.query_names(), "sql ready");
    Ok(sql)
}

/// The PostgreSQL backend and the site's migrations on it: `migrations_dir/postgres/`
/// when that folder exists (dialect-specific files), else `migrations_dir` itself.
async fn open_postgres_sql(
    sql: &SqlConfig,
    metrics: SqlMetrics,
    postgres: &PostgresDependencies,
) -> Result<PgSqlBackend, AppError> {
    let primary = postgres
        .sql
        .clone()
        .ok_or_else(|| AppError::Runtime("sql: no postgres dependency".to_owned()))?;
    let backend = PgSqlBackend::open(
        PgSettings {
            url: sql.url.expose().to_owned(),
            replica: sql.replica.as_ref().map(|url| url.expose().to_owned()),
            pool_size: sql.pool_size as usize,
            pool_timeout: sql.pool_timeout.0,
            read_your_writes: sql.read_your_writes.0,
        },
        metrics,
        primary,
        postgres.replica.clone(),
    )
    .await
    .map_err(|error| {
        AppError::Runtime(format!(
            "sql: PostgreSQL is unreachable ({error}); check sql.url and sql.replica"
        ))
    })?;
    if let Some(dir) = &sql.migrations_dir {
        let dialect = dir.join("postgres");
        let dir = if dialect.is_dir() {
            dialect
        } else {
            dir.clone()
        };
        let migrations = crate::storage::migrations_in_dir(&dir)?;
        let applied = backend
            .apply_migrations(&migrations)
            .await
            .map_err(|error| AppError::Runtime(format!("sql.migrations_dir: {error}")))?;
        tracing::info!(dir = %dir.display(), count = migrations.len(), applied, "sql migrations applied on PostgreSQL");
    }
    tracing::info!(
        replica = sql.replica.is_some(),
        pool_size = sql.pool_size,
        "sql on PostgreSQL"
    );
    Ok(backend)
}

/// Why `keel serve` stopped with an error; the CLI maps each to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration names something unusable (a certificate that does not load).
    #[error(transparent)]
    Config(ListenerError),
    #[error(transparent)]
    Listener(ListenerError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Runtime(String),
}

impl From<ListenerError> for AppError {
    fn from(error: ListenerError) -> Self {
        match error {
            ListenerError::Tls { .. } => AppError::Config(error),
            ListenerError::Bind { .. } => AppError::Listener(error),
        }
    }
}

/// Where a started keel can be reached; handed to `announce` once it is ready.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub api: SocketAddr,
    pub api_tls: bool,
    pub resp: Option<SocketAddr>,
    pub gateway: Option<SocketAddr>,
    pub gateway_tls: Option<SocketAddr>,
}

/// Called once when keel is ready (`keel demo` prints its URLs here).
pub type Announce = Box<dyn FnOnce(&Endpoints) + Send>;

/// Everything `run` needs besides the configuration.
pub struct Launch {
    /// Kept to re-read the configuration on SIGHUP.
    pub sources: ConfigSources,
    pub log: LogHandle,
    pub announce: Option<Announce>,
}

pub async fn run(config: Config, launch: Launch) -> Result<(), AppError> {
    let build = BuildInfo::CURRENT;
    tracing::info!(
        version = build.version,
        commit = build.commit,
        profile = build.profile,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "keel starting"
    );

    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| AppError::Runtime(format!("SIGTERM handler: {e}")))?;
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|e| AppError::Runtime(format!("SIGINT handler: {e}")))?;
    let mut hangup = signal(SignalKind::hangup())
        .map_err(|e| AppError::Runtime(format!("SIGHUP handler: {e}")))?;

    let data_dir = Storage::lock(&config)?;
    tracing::info!(path = %data_dir.path().display(), "data directory locked");

    let metrics = Arc::new(Metrics::new(build));
    let readiness = Readiness::new(&["storage"]);
    // One `redis` dependency (breaker, metrics, `/readyz` entry) for every use of Redis.
    let redis_dependency = (config.cache.l2.starts_with("redis://")
        || config.ratelimit.shared.is_some())
    .then(|| Dependency::new("redis", true, &metrics, &readiness));
    let postgres = PostgresDependencies::new(&config, &metrics, &readiness);
    let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
    let shutdown = CancellationToken::new();

    let api_config = &config.listeners.api;
    let api_addr = api_config
        .bind
        .0
        .expect("validated: the api listener has an address");
    let api = Listener::bind(
        "api",
        api_addr,
        api_config.tls.as_ref(),
        &[b"h2", b"http/1.1"],
        api_config.max_connections,
    )
    .await?;
    let mut endpoints = Endpoints {
        api: api.local_addr(),
        api_tls: api.certificate().is_some(),
        resp: None,
        gateway: None,
        gateway_tls: None,
    };
    tracing::info!(addr = %endpoints.api, tls = endpoints.api_tls, "api listener bound");
    let mut certificates_to_reload: Vec<_> = api.certificate().into_iter().collect();
    let api_options = HttpOptions {
        header_read_timeout: api_config.header_read_timeout.0,
        max_headers: api_config.max_headers as usize,
        drain_timeout: config.lifecycle.drain_timeout.0,
        inspect_framing: false,
    };
    let services = Arc::new(OnceLock::new());
    let mut limit_metrics = RateLimitMetrics::new(metrics.registry());
    if let (Some(url), Some(dependency)) = (&config.ratelimit.shared, &redis_dependency) {
        let shared = SharedLimits::new(
            url.expose(),
            &config.ratelimit.redis_prefix,
            dependency.clone(),
            metrics.registry(),
        )
        .map_err(|error| AppError::Runtime(format!("ratelimit.shared: {error}")))?;
        tokio::spawn(shared.redis().clone().probe(shutdown.clone()));
        tracing::info!(url = %url.redacted(), "rate limits shared through Redis");
        limit_metrics = limit_metrics.with_shared(Arc::new(shared));
    }
    let auth =
        Authenticator::from_config(&config, data_dir.path(), metrics.registry(), &limit_metrics)
            .map_err(|error| AppError::Runtime(format!("authentication: {error}")))?;
    tracing::info!(enabled = auth.is_enabled(), "authentication configured");
    match auth.bootstrap_admin(data_dir.path()) {
        Ok(Some(path)) => tracing::info!(
            path = %path.display(),
            "no credentials configured yet: created the admin token; read it from this file"
        ),
        Ok(None) => {}
        Err(error) => return Err(AppError::Runtime(format!("authentication: {error}"))),
    }
    auth.spawn_sweeper(shutdown.clone());
    let router = http::router(ApiState {
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        auth: auth.clone(),
        config: config_rx,
        services: services.clone(),
    });
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(serve_http(api, router, api_options, shutdown.clone()));

    let opening = {
        let config = config.clone();
        let redis_dependency = redis_dependency.clone();
        tokio::task::spawn_blocking(move || -> Result<_, AppError> {
            let storage = Storage::open(data_dir, &config)?;
            let cache_store = backends::open_cache_store(
                &config,
                storage.data_dir.path(),
                redis_dependency.as_ref(),
            )?;
            Ok((storage, cache_store))
        })
    };
    let (storage, cache_store) = tokio::select! {
        opened = opening => match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(error)) => {
                readiness.set("storage", DependencyState::Failed(error.to_string()));
                stop_servers(&shutdown, &mut servers).await;
                return Err(error);
            }
            Err(panic) => {
                stop_servers(&shutdown, &mut servers).await;
                return Err(AppError::Runtime(format!("opening storage panicked: {panic}")));
            }
        },
        _ = terminate.recv() => return stop_early(&shutdown, &mut servers).await,
        _ = interrupt.recv() => return stop_early(&shutdown, &mut servers).await,
    };
    tracing::info!(
        l2 = cache_store.as_ref().map_or("none", |store| store.kind()),
        "storage ready"
    );

    let cache_metrics = CacheMetrics::new(metrics.registry());
    let cache = Cache::new(
        config.cache.l1_max_bytes.0,
        cache_store,
        Limits {
            max_key_bytes: config.cache.max_key_bytes.0,
            max_value_bytes: config.cache.max_value_bytes.0,
        },
        cache_metrics.clone(),
    );
    if let Err(error) = cache.trust_l1_if_l2_is_empty().await {
        tracing::warn!(%error, "cannot count L2 keys; every L1 miss will read L2");
    }
    let sql = match open_sql(&config, &storage, &metrics, &cache, &postgres).await {
        Ok(sql) => sql,
        Err(error) => {
            readiness.set("storage", DependencyState::Failed(error.to_string()));
            stop_servers(&shutdown, &mut servers).await;
            cache.close().await;
            return Err(error);
        }
    };
    let query_loaders = config
        .cache
        .namespaces
        .iter()
        .filter_map(|(name, namespace)| match &namespace.loader {
            Some(crate::config::Loader::Query(query)) => Some((
                name.clone(),
                Arc::new(QueryLoader {
                    sql: sql.clone(),
                    query: query.clone(),
                }) as Arc<dyn crate::cache::loader::Loader>,
            )),
            _ => None,
        })
        .collect::<HashMap<_, _>>();
    let namespaces = Namespaces::new(cache.clone(), &config.cache, query_loaders, cache_metrics);
    tracing::info!(l1_max_bytes = config.cache.l1_max_bytes.0, namespaces = ?namespaces.names(), "cache ready");
    let queue = match start_queue(
        &config,
        &storage,
        &metrics,
        &namespaces,
        &sql,
        &postgres,
        &shutdown,
    )
    .await
    {
        Ok(queue) => queue,
        Err(error) => {
            readiness.set("storage", DependencyState::Failed(error.to_string()));
            stop_servers(&shutdown, &mut servers).await;
            cache.close().await;
            return Err(error);
        }
    };
    let gateway = Gateway::new(
        &config.gateway,
        GatewayMetrics::new(metrics.registry()),
        limit_metrics,
        Some(cache.clone()),
        shutdown.clone(),
    );
    let _ = services.set(Services {
        cache: cache.clone(),
        namespaces,
        backup: Backup {
            meta: storage.meta.clone(),
            sql: sql.clone(),
            queue: queue.clone(),
        },
        queue,
        sql,
        gateway: gateway.clone(),
        history: {
            let history = History::new(metrics.registry().clone());
            history.spawn_sampler(shutdown.clone());
            history
        },
    });

    let gateway_config = &config.listeners.gateway;
    let gateway_options = HttpOptions {
        header_read_timeout: api_config.header_read_timeout.0,
        max_headers: api_config.max_headers as usize,
        drain_timeout: config.lifecycle.drain_timeout.0,
        inspect_framing: true,
    };
    let mut gateway_listeners = Vec::new();
    if !config.gateway.routes.is_empty() {
        if let Some(addr) = gateway_config.tls_bind.0 {
            gateway_listeners.push(("gateway tls", addr, gateway_config.certificates.as_slice()));
        }
        if let Some(addr) = gateway_config.bind.0 {
            gateway_listeners.push(("gateway", addr, &[][..]));
        }
    }
    let mut https_port = None;
    for (name, addr, certificates) in gateway_listeners {
        let listener = match Listener::bind_with_certificates(
            name,
            addr,
            certificates,
            &[b"h2", b"http/1.1"],
            gateway_config.max_connections,
        )
        .await
        {
            Ok(listener) => listener,
            Err(error) => {
                stop_servers(&shutdown, &mut servers).await;
                cache.close().await;
                return Err(error.into());
            }
        };
        let tls = !certificates.is_empty();
        tracing::info!(addr = %listener.local_addr(), tls, routes = config.gateway.routes.len(), "{name} listener bound");
        certificates_to_reload.extend(listener.certificates());
        let service = match (tls, https_port) {
            (true, _) => {
                https_port = Some(listener.local_addr().port());
                endpoints.gateway_tls = Some(listener.local_addr());
                tower::util::Either::Left(gateway.service())
            }
            (false, Some(port)) if gateway_config.redirect_http => {
                tower::util::Either::Right(crate::gateway::redirect_router(port))
            }
            (false, _) => tower::util::Either::Left(gateway.service()),
        };
        if !tls {
            endpoints.gateway = Some(listener.local_addr());
        }
        servers.spawn(serve_http(
            listener,
            service,
            gateway_options,
            shutdown.clone(),
        ));
    }

    let resp_config = &config.listeners.resp;
    if let Some(addr) = resp_config.bind.0 {
        let resp = Listener::bind(
            "resp",
            addr,
            resp_config.tls.as_ref(),
            &[],
            resp_config.max_connections,
        )
        .await;
        let resp = match resp {
            Ok(resp) => resp,
            Err(error) => {
                stop_servers(&shutdown, &mut servers).await;
                cache.close().await;
                return Err(error.into());
            }
        };
        tracing::info!(addr = %resp.local_addr(), tls = resp.certificate().is_some(), "resp listener bound");
        endpoints.resp = Some(resp.local_addr());
        certificates_to_reload.extend(resp.certificate());
        let max_bulk = config
            .cache
            .max_value_bytes
            .0
            .max(config.cache.max_key_bytes.0) as usize;
        let limits = ParseLimits {
            max_bulk,
            max_args: 1024 * 1024,
            max_inline: 64 * 1024,
        };
        let context = Arc::new(RespContext::new(cache.clone(), auth.clone()));
        let resp_metrics = RespMetrics::new(metrics.registry());
        servers.spawn(serve_resp(
            resp,
            context,
            limits,
            resp_metrics,
            shutdown.clone(),
            config.lifecycle.drain_timeout.0,
        ));
    }
    readiness.set("storage", DependencyState::Ready);

    systemd::notify_ready();
    let watchdog = systemd::spawn_watchdog(shutdown.clone());
    tracing::info!(api = %endpoints.api, "keel ready");
    if let Some(announce) = launch.announce {
        announce(&endpoints);
    }

    let mut current = config;
    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM received; shutting down"); break; }
            _ = interrupt.recv() => { tracing::info!("SIGINT received; shutting down"); break; }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP received; reloading configuration and certificates");
                if let Some(next) = reload::reload(&launch.sources, &current, &launch.log, &certificates_to_reload) {
                    let gateway_changed = !crate::config::changed_paths(&current, &next)
                        .iter()
                        .all(|path| !path.starts_with("gateway."));
                    current = next;
                    if gateway_changed {
                        gateway.reload(&current.gateway);
                    }
                    config_tx.send_replace(Arc::new(current.clone()));
                }
            }
        }
    }

    systemd::notify_stopping();
    stop_servers(&shutdown, &mut servers).await;
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    cache.close().await;
    tracing::info!("cache flushed");
    drop(storage);
    tracing::info!("storage closed; keel stopped");
    Ok(())
}

async fn stop_servers(shutdown: &CancellationToken, servers: &mut tokio::task::JoinSet<()>) {
    shutdown.cancel();
    while let Some(result) = servers.join_next().await {
        if let Err(error) = result {
            tracing::error!(%error, "a listener task failed");
        }
    }
    tracing::info!("listeners stopped");
}

async fn stop_early(
    shutdown: &CancellationToken,
    servers: &mut tokio::task::JoinSet<()>,
) -> Result<(), AppError> {
    tracing::info!("stop requested while opening storage");
    stop_servers(shutdown, servers).await;
    Ok(())
}

/// Used by `keel demo` and tests: how long to wait for a freshly started keel.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
