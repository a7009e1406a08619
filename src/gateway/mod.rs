//! The gateway: a reverse proxy on `listeners.gateway` with routes, upstream pools
//! (balancing, health checks, circuit breakers), retries, correct forwarding and
//! limits. The [`Gateway`] handle holds the current route table; SIGHUP swaps in a new
//! one while requests in flight finish on the table they started with.

pub mod cache_policy;
pub mod compress;
mod connections;
mod metrics;
mod proxy;
mod response_cache;
mod route;
mod upstream;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use ipnet::IpNet;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::config::GatewayConfig;
use crate::ratelimit::{Limiter, LimiterConfig, RateLimitMetrics};
use response_cache::{PurgeTarget, RouteCache};

pub use metrics::GatewayMetrics;
pub use route::{Route, RouteTable};
pub use upstream::{Pool, ServerStatus};

/// One generation of the gateway's configuration, in use until the next reload.
pub struct Table {
    pub routes: RouteTable,
    pub pools: BTreeMap<String, Arc<Pool>>,
    trusted_proxies: Vec<IpNet>,
    /// Stops this generation's health checks when it is replaced.
    retired: CancellationToken,
}

impl Table {
    fn build(
        config: &GatewayConfig,
        metrics: &GatewayMetrics,
        limits: &RateLimitMetrics,
        cache: Option<&Cache>,
    ) -> Table {
        let pools: BTreeMap<String, Arc<Pool>> = config
            .upstreams
            .iter()
            .map(|(name, upstream)| {
                (
                    name.clone(),
                    Arc::new(Pool::from_config(name, upstream, metrics)),
                )
            })
            .collect();
        let routes = config
            .routes
            .iter()
            .enumerate()
            .filter_map(|(index, route)| {
                let pool = pools.get(route.upstream.as_deref()?)?.clone();
                let name = route
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("route-{index}"));
                let limiter = route.rate_limit.as_ref().and_then(|limit| {
                    let built = LimiterConfig::from_route(limit)
                        .and_then(|config| Limiter::new(&name, &config, limits));
                    match built {
                        Ok(limiter) => Some(Arc::new(limiter)),
                        Err(error) => {
                            tracing::error!(route = name, %error, "rate limit not applied");
                            None
                        }
                    }
                });
                let mut built = Route::new(index, route, pool, limiter, metrics.for_route(&name));
                built.cache = match (&route.cache, cache) {
                    (Some(config), Some(cache)) => Some(Arc::new(RouteCache::new(
                        config,
                        route.compress,
                        cache.clone(),
                    ))),
                    _ => None,
                };
                Some(built)
            })
            .collect();
        Table {
            routes: RouteTable::new(routes),
            pools,
            trusted_proxies: config.trusted_proxies.clone(),
            retired: CancellationToken::new(),
        }
    }
}

/// The gateway's handle. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    table: RwLock<Arc<Table>>,
    metrics: GatewayMetrics,
    /// The series of requests no route matched.
    unmatched: Arc<metrics::RouteMetrics>,
    limits: RateLimitMetrics,
    cache: Option<Cache>,
    shutdown: CancellationToken,
}

#[derive(Debug, Serialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub servers: Vec<ServerStatus>,
}

/// One route as configured, with its counters since start.
#[derive(Debug, Serialize)]
pub struct RouteStatus {
    pub name: String,
    pub host: Option<String>,
    pub path_prefix: String,
    pub upstream: String,
    /// What replaces the prefix before forwarding (`""` for `strip_prefix`).
    pub rewrite: Option<String>,
    pub max_body_bytes: u64,
    pub compress: bool,
    pub cache: Option<crate::config::RouteCacheConfig>,
    pub rate_limit: Option<crate::config::RouteRateLimitConfig>,
    pub requests: BTreeMap<&'static str, u64>,
    /// Response-cache lookups by result (`hit`, `miss`, `stale`, ...); empty without a
    /// cache.
    pub cache_results: BTreeMap<String, u64>,
    /// Requests the route's rate limit refused; `None` without one.
    pub rate_limited: Option<u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Gateway {
    pub fn new(
        config: &GatewayConfig,
        metrics: GatewayMetrics,
        limits: RateLimitMetrics,
        cache: Option<Cache>,
        shutdown: CancellationToken,
    ) -> Gateway {
        let gateway = Gateway {
            inner: Arc::new(Inner {
                table: RwLock::new(Arc::new(Table::build(
                    config,
                    &metrics,
                    &limits,
                    cache.as_ref(),
                ))),
                unmatched: metrics.for_route("unmatched"),
                metrics,
                limits,
                cache,
                shutdown,
            }),
        };
        gateway.start_background(&gateway.table());
        gateway
    }

    pub fn table(&self) -> Arc<Table> {
        self.inner
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies a new configuration: new requests use it at once; requests in flight
    /// finish on the table they started with; the old health checks stop.
    pub fn reload(&self, config: &GatewayConfig) {
        let next = Arc::new(Table::build(
            config,
            &self.inner.metrics,
            &self.inner.limits,
            self.inner.cache.as_ref(),
        ));
        self.start_background(&next);
        let previous = std::mem::replace(
            &mut *self.inner.table.write().unwrap_or_else(|p| p.into_inner()),
            next,
        );
        previous.retired.cancel();
        tracing::info!(
            routes = config.routes.len(),
            upstreams = config.upstreams.len(),
            "gateway configuration applied"
        );
    }

    /// The service the gateway listener serves: every request goes to the proxy, with
    /// no router in between (the route table is the gateway's own).
    pub fn service(
        &self,
    ) -> impl tower::Service<
        axum::extract::Request,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
        Future = impl Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static {
        let gateway = self.clone();
        tower::service_fn(move |request| {
            let gateway = gateway.clone();
            async move { Ok(proxy::handle(gateway, request).await) }
        })
    }

    pub fn upstreams(&self) -> Vec<UpstreamStatus> {
        self.table()
            .pools
            .values()
            .map(|pool| UpstreamStatus {
                name: pool.name.clone(),
                servers: pool.statuses(),
            })
            .collect()
    }

    /// The routes in matching order (most specific host, then longest prefix, first).
    pub fn routes(&self) -> Vec<RouteStatus> {
        self.table()
            .routes
            .routes()
            .iter()
            .map(|route| RouteStatus {
                name: route.name.clone(),
                host: route.config.host.clone(),
                path_prefix: route.prefix.clone(),
                upstream: route.pool.name.clone(),
                rewrite: route.rewrite.clone(),
                max_body_bytes: route.max_body_bytes,
                compress: route.config.compress,
                cache: route.config.cache.clone(),
                rate_limit: route.config.rate_limit.clone(),
                requests: route.metrics.requests_by_class(),
                cache_results: self.inner.metrics.cache_results_of(&route.name),
                rate_limited: route.limiter.as_ref().map(|limiter| limiter.rejected()),
                bytes_in: route.metrics.bytes_in.get(),
                bytes_out: route.metrics.bytes_out.get(),
            })
            .collect()
    }

    /// Health checks and the rate limiters' sweeper of one table, until it is retired.
    fn start_background(&self, table: &Arc<Table>) {
        let limiters: Vec<_> = table
            .routes
            .routes()
            .iter()
            .filter_map(|route| route.limiter.clone())
            .collect();
        if !limiters.is_empty() {
            let (stop, shutdown) = (table.retired.clone(), self.inner.shutdown.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(10));
                loop {
                    tokio::select! {
                        _ = every.tick() => limiters.iter().for_each(|limiter| limiter.sweep()),
                        _ = stop.cancelled() => return,
                        _ = shutdown.cancelled() => return,
                    }
                }
            });
        }
        for pool in table.pools.values() {
            let Some(health) = pool.health.clone() else {
                continue;
            };
            let pool = pool.clone();
            let stop = table.retired.clone();
            let shutdown = self.inner.shutdown.clone();
            let metrics = self.inner.metrics.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(health.interval.0);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = every.tick() => {}
                        _ = stop.cancelled() => return,
                        _ = shutdown.cancelled() => return,
                    }
                    let mut probes = tokio::task::JoinSet::new();
                    for (index, server) in pool.servers.iter().enumerate() {
                        let connections = server.connections.clone();
                        let host = server.address.clone();
                        let path = health.path.clone();
                        let timeout = health
                            .interval
                            .0
                            .min(pool.response_timeout)
                            .max(Duration::from_millis(100));
                        let probe = async move {
                            let ok = match hyper::Request::get(path)
                                .header(hyper::header::HOST, host)
                                .header(hyper::header::USER_AGENT, "keel-health-check")
                                .body(axum::body::Body::empty())
                            {
                                Ok(request) => matches!(
                                    tokio::time::timeout(timeout, probe_status(&connections, request)).await,
                                    Ok(Some(status)) if status == health.expect_status
                                ),
                                Err(_) => false,
                            };
                            (index, ok)
                        };
                        probes.spawn(probe);
                    }
                    while let Some(Ok((index, ok))) = probes.join_next().await {
                        pool.health_result(index, ok);
                        let server = &pool.servers[index];
                        metrics
                            .upstream_healthy
                            .with_label_values(&[pool.name.as_str(), server.address.as_str()])
                            .set(i64::from(server.status().healthy));
                    }
                }
            });
        }
    }
}

/// The status of one health-check exchange, its body read so the connection is reused.
async fn probe_status(
    connections: &Arc<connections::Connections>,
    request: hyper::Request<axum::body::Body>,
) -> Option<u16> {
    use http_body_util::BodyExt;
    let response = connections.send(request).await.ok()?;
    let status = response.status().as_u16();
    response.into_body().collect().await.ok()?;
    Some(status)
}

/// The plain listener when `redirect_http` is on: every request gets a 308 to the same
/// host and target on the HTTPS port.
pub fn redirect_router(https_port: u16) -> Router {
    Router::new().fallback(move |request: axum::extract::Request| async move {
        let host = request
            .headers()
            .get(hyper::header::HOST)
            .and_then(|value| value.to_str().ok())
            .map(|host| {
                host.rsplit_once(':')
                    .map_or(host, |(name, _)| name)
                    .to_owned()
            })
            .unwrap_or_else(|| "localhost".to_owned());
        let target = request
            .uri()
            .path_and_query()
            .map_or("/", |target| target.as_str());
        let location = if https_port == 443 {
            format!("https://{host}{target}")
        } else {
            format!("https://{host}:{https_port}{target}")
        };
        (
            hyper::StatusCode::PERMANENT_REDIRECT,
            [(hyper::header::LOCATION, location)],
        )
    })
}

/// Compression of a response that passes through (not from the cache): streamed, when
/// the route compresses, the client accepts it and the response is worth it.
fn compress_for(
    route: &Route,
    accept_encoding: Option<&hyper::header::HeaderValue>,
    response: axum::response::Response,
) -> axum::response::Response {
    if !route.config.compress {
        return response;
    }
    let policy = compress::CompressPolicy::default();
    let known = response
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse().ok());
    if !compress::should_compress(&policy, response.status(), response.headers(), known) {
        return response;
    }
    let coding = compress::negotiate(accept_encoding, &policy.enabled);
    let (mut parts, body) = response.into_parts();
    compress::apply_headers(&mut parts.headers, coding);
    if coding == compress::Coding::Identity {
        return axum::response::Response::from_parts(parts, body);
    }
    axum::response::Response::from_parts(
        parts,
        axum::body::Body::new(compress::encode_body(coding, body)),
    )
}

/// What `POST /v1/gateway/purge` names.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    pub url: Option<String>,
    pub prefix: Option<String>,
    pub tag: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("{0}")]
    Invalid(String),
    #[error("the gateway has no cache")]
    NoCache,
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

impl Gateway {
    /// Removes cached responses by URL (all its variants and encodings), by URL prefix
    /// or by tag (`Cache-Tag` / `Surrogate-Key`), from both cache layers.
    pub async fn purge(&self, request: PurgeRequest) -> Result<usize, PurgeError> {
        let cache = self.inner.cache.as_ref().ok_or(PurgeError::NoCache)?;
        let target = match (request.url, request.prefix, request.tag) {
            (Some(url), None, None) => {
                let (scheme, host, path, query) = split_url(&url)?;
                let table = self.table();
                let policy = table
                    .routes
                    .find(&host, &path)
                    .and_then(|route| route.cache.as_ref())
                    .map(|cache| cache.policy().clone())
                    .ok_or_else(|| PurgeError::Invalid(format!("no cached route serves {url}")))?;
                PurgeTarget::Primary(cache_policy::primary_key(
                    &hyper::Method::GET,
                    &scheme,
                    &host,
                    &path,
                    query.as_deref(),
                    &policy,
                ))
            }
            (None, Some(prefix), None) => {
                let (scheme, host, path, _) = split_url(&prefix)?;
                PurgeTarget::Prefix(format!("GET {scheme}://{host}{path}"))
            }
            (None, None, Some(tag))
                if !tag.is_empty() && tag.len() <= cache_policy::MAX_TAG_BYTES =>
            {
                PurgeTarget::Tag(tag)
            }
            _ => {
                return Err(PurgeError::Invalid(
                    "give exactly one of url, prefix or tag".to_owned(),
                ));
            }
        };
        Ok(RouteCache::purge(cache, target).await?)
    }
}

/// `https://host[:port]/path?query` → (scheme, host without default port, path, query).
fn split_url(url: &str) -> Result<(String, String, String, Option<String>), PurgeError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| PurgeError::Invalid(format!("{url:?} is not a URL")))?;
    let scheme = uri
        .scheme_str()
        .filter(|scheme| matches!(*scheme, "http" | "https"))
        .ok_or_else(|| PurgeError::Invalid(format!("{url:?} must start with http:// or https://")))?
        .to_owned();
    let host = uri
        .host()
        .ok_or_else(|| PurgeError::Invalid(format!("{url:?} has no host")))?
        .to_ascii_lowercase();
    let host = match uri.port_u16() {
        Some(port) if !((scheme == "http" && port == 80) || (scheme == "https" && port == 443)) => {
            format!("{host}:{port}")
        }
        _ => host,
    };
    Ok((
        scheme,
        host,
        uri.path().to_owned(),
        uri.query().map(str::to_owned),
    ))
}
