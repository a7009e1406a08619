//! Get-or-load: cache namespaces whose misses are filled by a loader (an HTTP URL
//! template now; a named SQL query through the same `Loader` trait later).
//!
//! However many requests miss the same key at once, the loader is called once: the
//! first miss starts a load in its own task (so a client that disconnects cannot cancel
//! it for the others) and later misses wait for its result. Loader errors are handed to
//! every waiter and not cached, unless the namespace sets `negative_ttl`. With
//! `refresh_ahead`, a read after that fraction of the TTL starts a background reload, so
//! a hot key is replaced before it expires and its readers never see a miss.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;

use super::{Cache, CacheMetrics, Entry, expires_in, now_ms};
use crate::config::{CacheConfig, Loader as LoaderConfig};

/// How long a loader call may take unless the namespace says otherwise.
pub const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Remembered loader errors at most (`negative_ttl`), so a key scan cannot grow it.
const NEGATIVE_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("no cache namespace {0:?} is configured")]
    UnknownNamespace(String),
    #[error("the loader has no value for this key")]
    NotFound,
    #[error("the loader failed: {0}")]
    Failed(String),
    #[error("the loader did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the loaded value is larger than cache.max_value_bytes")]
    TooLarge,
}

/// Produces the value for a key of a namespace.
#[async_trait]
pub trait Loader: Send + Sync + 'static {
    async fn load(&self, key: &str) -> Result<Bytes, LoadError>;
}

/// `GET` on a URL template with `{key}` replaced by the percent-encoded key: 200 is the
/// value, 404 is "no value", anything else is a failure carrying the status.
pub struct HttpLoader {
    template: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    max_bytes: usize,
}

impl HttpLoader {
    pub fn new(template: &str, max_bytes: usize) -> HttpLoader {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        HttpLoader {
            template: template.to_owned(),
            client,
            max_bytes,
        }
    }
}

#[async_trait]
impl Loader for HttpLoader {
    async fn load(&self, key: &str) -> Result<Bytes, LoadError> {
        let encoded =
            percent_encoding::utf8_percent_encode(key, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        let url = self.template.replace("{key}", &encoded);
        let uri: hyper::Uri = url
            .parse()
            .map_err(|error| LoadError::Failed(format!("bad loader URL {url:?}: {error}")))?;
        let response = self
            .client
            .get(uri)
            .await
            .map_err(|error| LoadError::Failed(format!("{url}: {error}")))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), self.max_bytes)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<http_body_util::LengthLimitError>() {
                    LoadError::TooLarge
                } else {
                    LoadError::Failed(error.to_string())
                }
            })?
            .to_bytes();
        match status.as_u16() {
            200 => Ok(body),
            404 => Err(LoadError::NotFound),
            code => {
                let excerpt = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                Err(LoadError::Failed(format!(
                    "{url} answered {code}: {excerpt}"
                )))
            }
        }
    }
}

struct Namespace {
    name: String,
    loader: Arc<dyn Loader>,
    ttl: Option<Duration>,
    refresh_ahead: Option<f64>,
    negative_ttl: Option<Duration>,
    timeout: Duration,
}

type Waiters = Vec<oneshot::Sender<Result<Entry, LoadError>>>;

struct Inner {
    cache: Cache,
    namespaces: HashMap<String, Arc<Namespace>>,
    /// Loads in flight by cache key, with the misses waiting for each.
    in_flight: Mutex<HashMap<Bytes, Waiters>>,
    negative: quick_cache::sync::Cache<Bytes, (LoadError, u64)>,
    metrics: CacheMetrics,
}

/// The configured namespaces over one cache. Cheap to clone.
#[derive(Clone)]
pub struct Namespaces {
    inner: Arc<Inner>,
}

/// Whether a value came from the cache or from the loader just now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Loader,
}

impl Namespaces {
    /// HTTP loaders come from the configuration; `extra` supplies the others (named SQL
    /// queries) by namespace name.
    pub fn new(
        cache: Cache,
        config: &CacheConfig,
        extra: HashMap<String, Arc<dyn Loader>>,
        metrics: CacheMetrics,
    ) -> Namespaces {
        let mut namespaces = HashMap::new();
        for (name, namespace) in &config.namespaces {
            let loader: Arc<dyn Loader> = match (&namespace.loader, extra.get(name)) {
                (_, Some(loader)) => loader.clone(),
                (Some(LoaderConfig::Http(template)), None) => {
                    Arc::new(HttpLoader::new(template, config.max_value_bytes.0 as usize))
                }
                (Some(LoaderConfig::Query(query)), None) => {
                    tracing::warn!(namespace = %name, %query, "query loaders need the SQL subsystem; namespace disabled");
                    continue;
                }
                (None, None) => continue,
            };
            namespaces.insert(
                name.clone(),
                Arc::new(Namespace {
                    name: name.clone(),
                    loader,
                    ttl: namespace.ttl.map(|ttl| ttl.0),
                    refresh_ahead: namespace.refresh_ahead,
                    negative_ttl: namespace.negative_ttl.map(|ttl| ttl.0),
                    timeout: namespace
                        .timeout
                        .map_or(DEFAULT_LOAD_TIMEOUT, |timeout| timeout.0),
                }),
            );
        }
        Namespaces {
            inner: Arc::new(Inner {
                cache,
                namespaces,
                in_flight: Mutex::new(HashMap::new()),
                negative: quick_cache::sync::Cache::new(NEGATIVE_ENTRIES),
                metrics,
            }),
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.namespaces.keys().cloned().collect();
        names.sort();
        names
    }

    /// The cache key a namespace stores `key` under: `NAMESPACE:KEY`, so
    /// `NAMESPACE:*` invalidates a whole namespace.
    pub fn cache_key(namespace: &str, key: &str) -> Bytes {
        Bytes::from(format!("{namespace}:{key}"))
    }

    pub async fn get_or_load(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<(Entry, Source), LoadError> {
        let inner = &self.inner;
        let ns = inner
            .namespaces
            .get(namespace)
            .cloned()
            .ok_or_else(|| LoadError::UnknownNamespace(namespace.to_owned()))?;
        let cache_key = Self::cache_key(namespace, key);
        match inner.cache.get(&cache_key).await {
            Ok(Some(entry)) => {
                if needs_refresh(&ns, &entry, now_ms()) {
                    self.start_load(&ns, key, &cache_key, None);
                }
                return Ok((entry, Source::Cache));
            }
            Ok(None) => {}
            Err(error) => return Err(LoadError::Failed(error.to_string())),
        }
        if let Some((error, until)) = inner.negative.get(&cache_key) {
            if until > now_ms() {
                return Err(error);
            }
            inner.negative.remove(&cache_key);
        }
        let (waiter, answer) = oneshot::channel();
        self.start_load(&ns, key, &cache_key, Some(waiter));
        let entry = answer
            .await
            .map_err(|_| LoadError::Failed("the load was abandoned".to_owned()))??;
        Ok((entry, Source::Loader))
    }

    /// Loads `key` through its namespace's loader and stores the result whether or not
    /// it is cached now (the `cache.warm` processor).
    pub async fn warm(&self, namespace: &str, key: &str) -> Result<(), LoadError> {
        let ns = self
            .inner
            .namespaces
            .get(namespace)
            .cloned()
            .ok_or_else(|| LoadError::UnknownNamespace(namespace.to_owned()))?;
        let cache_key = Self::cache_key(namespace, key);
        let (waiter, answer) = oneshot::channel();
        self.start_load(&ns, key, &cache_key, Some(waiter));
        answer
            .await
            .map_err(|_| LoadError::Failed("the load was abandoned".to_owned()))??;
        Ok(())
    }

    /// Joins the load in flight for the key, or starts one. A refresh (no waiter) that
    /// finds a load in flight does nothing.
    fn start_load(
        &self,
        ns: &Arc<Namespace>,
        key: &str,
        cache_key: &Bytes,
        waiter: Option<oneshot::Sender<Result<Entry, LoadError>>>,
    ) {
        {
            let mut in_flight = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(waiters) = in_flight.get_mut(cache_key) {
                if let Some(waiter) = waiter {
                    waiters.push(waiter);
                    self.inner.metrics.coalesced_waiters.inc();
                }
                return;
            }
            in_flight.insert(cache_key.clone(), waiter.into_iter().collect());
        }
        let namespaces = self.clone();
        let ns = ns.clone();
        let key = key.to_owned();
        let cache_key = cache_key.clone();
        tokio::spawn(async move { namespaces.load(ns, key, cache_key).await });
    }

    async fn load(&self, ns: Arc<Namespace>, key: String, cache_key: Bytes) {
        let inner = &self.inner;
        let started = Instant::now();
        let outcome = match tokio::time::timeout(ns.timeout, ns.loader.load(&key)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(LoadError::Timeout(ns.timeout)),
        };
        inner
            .metrics
            .loader_seconds
            .observe(started.elapsed().as_secs_f64());
        let label = if outcome.is_ok() { "ok" } else { "error" };
        inner
            .metrics
            .loader_calls
            .with_label_values(&[ns.name.as_str(), label])
            .inc();
        let result = match outcome {
            Ok(value) => {
                let entry = Entry {
                    value,
                    expires_at: ns.ttl.map(expires_in),
                    tags: None,
                };
                match inner.cache.set(&cache_key, entry.clone()).await {
                    Ok(()) => Ok(entry),
                    Err(error) => Err(LoadError::Failed(error.to_string())),
                }
            }
            Err(error) => {
                tracing::debug!(namespace = %ns.name, %key, %error, "loader failed");
                if let Some(negative_ttl) = ns.negative_ttl {
                    inner
                        .negative
                        .insert(cache_key.clone(), (error.clone(), expires_in(negative_ttl)));
                }
                Err(error)
            }
        };
        let waiters = inner
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&cache_key);
        for waiter in waiters.into_iter().flatten() {
            let _ = waiter.send(result.clone());
        }
    }
}

/// True once `refresh_ahead` of the entry's TTL has passed.
fn needs_refresh(ns: &Namespace, entry: &Entry, now: u64) -> bool {
    let (Some(fraction), Some(ttl), Some(expires_at)) =
        (ns.refresh_ahead, ns.ttl, entry.expires_at)
    else {
        return false;
    };
    let ttl_ms = ttl.as_millis() as f64;
    let remaining = expires_at.saturating_sub(now) as f64;
    remaining < ttl_ms * (1.0 - fraction)
}
