//! The route table: which route a request belongs to. A route names a host (exact, or
//! `*.example.com` for any subdomain) or none, and a path prefix. The most specific
//! host wins first (exact, then the longest wildcard, then none), then the longest
//! prefix, like NGINX's server-then-location selection.

use std::sync::Arc;

use crate::config::RouteConfig;

use super::upstream::Pool;

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

impl HostMatch {
    fn parse(host: Option<&str>) -> HostMatch {
        match host {
            None => HostMatch::Any,
            Some(host) => match host.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_ascii_lowercase()),
                None => HostMatch::Exact(host.to_ascii_lowercase()),
            },
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(exact) => host.eq_ignore_ascii_case(exact),
            HostMatch::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host
                        .get(host.len() - suffix.len()..)
                        .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
            }
        }
    }

    fn rank(&self) -> (u8, usize) {
        match self {
            HostMatch::Exact(_) => (2, 0),
            HostMatch::Suffix(suffix) => (1, suffix.len()),
            HostMatch::Any => (0, 0),
        }
    }
}

pub struct Route {
    pub name: String,
    host: HostMatch,
    pub prefix: String,
    pub pool: Arc<Pool>,
    /// What replaces the prefix before forwarding (`Some("/")`-like for strip).
    pub rewrite: Option<String>,
    pub max_body_bytes: u64,
    pub limiter: Option<Arc<crate::ratelimit::Limiter>>,
    pub cache: Option<Arc<super::response_cache::RouteCache>>,
    pub metrics: Arc<super::metrics::RouteMetrics>,
    pub config: RouteConfig,
}

impl Route {
    pub fn new(
        index: usize,
        config: &RouteConfig,
        pool: Arc<Pool>,
        limiter: Option<Arc<crate::ratelimit::Limiter>>,
        metrics: Arc<super::metrics::RouteMetrics>,
    ) -> Route {
        let rewrite = match (&config.rewrite_prefix, config.strip_prefix) {
            (Some(replacement), _) => Some(replacement.clone()),
            (None, true) => Some(String::new()),
            (None, false) => None,
        };
        Route {
            name: config
                .name
                .clone()
                .unwrap_or_else(|| format!("route-{index}")),
            host: HostMatch::parse(config.host.as_deref()),
            prefix: config.path_prefix.clone(),
            pool,
            rewrite,
            max_body_bytes: config.max_body_bytes.0,
            limiter,
            cache: None,
            metrics,
            config: config.clone(),
        }
    }

    /// The path (and query) sent upstream.
    pub fn upstream_path(&self, path_and_query: &str) -> String {
        match &self.rewrite {
            None => path_and_query.to_owned(),
            Some(replacement) => {
                let rest = path_and_query
                    .strip_prefix(self.prefix.as_str())
                    .unwrap_or(path_and_query);
                let joined = format!("{}{}", replacement.trim_end_matches('/'), rest);
                if joined.starts_with('/') {
                    joined
                } else {
                    format!("/{joined}")
                }
            }
        }
    }
}

pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> RouteTable {
        routes.sort_by(|a, b| {
            b.host
                .rank()
                .cmp(&a.host.rank())
                .then(b.prefix.len().cmp(&a.prefix.len()))
        });
        RouteTable { routes }
    }

    pub fn find(&self, host: &str, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|route| route.host.matches(host) && path.starts_with(route.prefix.as_str()))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use crate::gateway::GatewayMetrics;

    fn test_metrics() -> Arc<super::super::metrics::RouteMetrics> {
        super::super::GatewayMetrics::new(&prometheus::Registry::new()).for_route("test")
    }

    fn table(specs: &[(Option<&str>, &str)]) -> RouteTable {
        let metrics = GatewayMetrics::new(&prometheus::Registry::new());
        let pool = Arc::new(Pool::from_config(
            "app",
            &toml::from_str::<UpstreamConfig>("servers = [\"127.0.0.1:1\"]").unwrap(),
            &metrics,
        ));
        let routes = specs
            .iter()
            .enumerate()
            .map(|(index, (host, prefix))| {
                let mut config: RouteConfig = toml::from_str("upstream = \"app\"").unwrap();
                config.host = host.map(str::to_owned);
                config.path_prefix = (*prefix).to_owned();
                config.name = Some(format!("{}{}", host.unwrap_or("*"), prefix));
                Route::new(index, &config, pool.clone(), None, test_metrics())
            })
            .collect();
        RouteTable::new(routes)
    }

    #[test]
    fn most_specific_host_then_longest_prefix() {
        let table = table(&[
            (None, "/"),
            (None, "/api"),
            (None, "/api/v2"),
            (Some("*.example.com"), "/"),
            (Some("shop.example.com"), "/"),
        ]);
        let name = |host: &str, path: &str| table.find(host, path).map(|r| r.name.clone());
        assert_eq!(name("other.org", "/api/v2/x").as_deref(), Some("*/api/v2"));
        assert_eq!(name("other.org", "/api/v1").as_deref(), Some("*/api"));
        assert_eq!(name("other.org", "/").as_deref(), Some("*/"));
        assert_eq!(
            name("a.example.com", "/api").as_deref(),
            Some("*.example.com/")
        );
        assert_eq!(
            name("SHOP.example.com", "/x").as_deref(),
            Some("shop.example.com/")
        );
        assert_eq!(
            name("example.com", "/api").as_deref(),
            Some("*/api"),
            "a wildcard needs a subdomain"
        );
    }

    #[test]
    fn strip_and_rewrite_prefixes() {
        let metrics = GatewayMetrics::new(&prometheus::Registry::new());
        let pool = Arc::new(Pool::from_config(
            "app",
            &toml::from_str::<UpstreamConfig>("servers = [\"127.0.0.1:1\"]").unwrap(),
            &metrics,
        ));
        let mut config: RouteConfig =
            toml::from_str("upstream = \"app\"\npath_prefix = \"/api\"").unwrap();
        assert_eq!(
            Route::new(0, &config, pool.clone(), None, test_metrics()).upstream_path("/api/x?y=1"),
            "/api/x?y=1"
        );
        config.strip_prefix = true;
        assert_eq!(
            Route::new(0, &config, pool.clone(), None, test_metrics()).upstream_path("/api/x?y=1"),
            "/x?y=1"
        );
        assert_eq!(
            Route::new(0, &config, pool.clone(), None, test_metrics()).upstream_path("/api"),
            "/"
        );
        config.rewrite_prefix = Some("/v2/".to_owned());
        assert_eq!(
            Route::new(0, &config, pool, None, test_metrics()).upstream_path("/api/x"),
            "/v2/x"
        );
    }
}
