//! Upstream pools: the servers behind a route, how one is picked (smooth weighted
//! round-robin or least connections), and whether one may be used at all: active
//! health checks (rise/fall) and a per-server circuit breaker fed by real requests
//! (closed → open after `max_fails` consecutive failures → one half-open probe after
//! `open_for` → closed on success).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::connections::Connections;
use super::metrics::GatewayMetrics;
use crate::config::{Balance, HealthCheckConfig, UpstreamConfig, parse_server};

const RETRY_BUDGET_PER_REQUEST: f64 = 0.1;
const RETRY_BUDGET_MAX: f64 = 10.0;

fn now_ms() -> u64 {
    crate::cache::now_ms()
}

/// One server of a pool and everything known about it.
pub struct Server {
    pub address: String,
    pub weight: u32,
    /// Requests in flight (least_conn).
    active: AtomicU64,
    /// From active health checks; servers start healthy.
    healthy: AtomicBool,
    /// Consecutive health-check results in the current direction.
    streak: AtomicU32,
    /// Consecutive request failures (circuit breaker).
    failures: AtomicU32,
    /// Unix ms until which the circuit is open; 0 = closed.
    open_until: AtomicU64,
    /// Set while the single half-open probe is in flight.
    probing: AtomicBool,
    requests: AtomicU64,
    failed: AtomicU64,
    /// Keep-alive connections to it.
    pub(super) connections: Arc<Connections>,
    /// `keel_gateway_upstream_requests_total` by outcome, resolved once.
    pub(super) outcomes: Outcomes,
}

/// One server's request counters by outcome.
pub(super) struct Outcomes {
    pub ok: prometheus::IntCounter,
    pub failed: prometheus::IntCounter,
    pub timeout: prometheus::IntCounter,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    pub address: String,
    pub weight: u32,
    pub healthy: bool,
    /// `closed`, `open` or `half_open`.
    pub circuit: &'static str,
    pub active: u64,
    pub requests: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
}

impl Server {
    fn new(
        pool: &str,
        address: String,
        weight: u32,
        config: &UpstreamConfig,
        metrics: &GatewayMetrics,
    ) -> Server {
        let labels = [pool, address.as_str()];
        let outcome = |outcome: &str| {
            metrics
                .upstream_requests
                .with_label_values(&[pool, address.as_str(), outcome])
        };
        Server {
            connections: Arc::new(Connections::new(
                address.clone(),
                config.connect_timeout.0,
                config.idle_timeout.0,
                metrics.upstream_idle.with_label_values(&labels),
            )),
            outcomes: Outcomes {
                ok: outcome("ok"),
                failed: outcome("failed"),
                timeout: outcome("timeout"),
            },
            address,
            weight,
            active: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    fn circuit(&self, now: u64) -> &'static str {
        match self.open_until.load(Ordering::Acquire) {
            0 => "closed",
            until if now < until => "open",
            _ => "half_open",
        }
    }

    /// Whether a request may go here now. A half-open circuit lets exactly one probe
    /// through; `probe` is set when this request is that probe.
    fn admits(&self, now: u64) -> Option<bool> {
        if !self.healthy.load(Ordering::Acquire) {
            return None;
        }
        match self.open_until.load(Ordering::Acquire) {
            0 => Some(false),
            until if now < until => None,
            _ => self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .ok()
                .map(|_| true),
        }
    }

    pub fn status(&self) -> ServerStatus {
        ServerStatus {
            address: self.address.clone(),
            weight: self.weight,
            healthy: self.healthy.load(Ordering::Acquire),
            circuit: self.circuit(now_ms()),
            active: self.active.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failed.load(Ordering::Relaxed),
            consecutive_failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

/// A server picked for one request. Report the outcome with `succeeded`/`failed`;
/// dropping it unreported counts as neither (the client went away).
pub struct Lease<'a> {
    pub server: &'a Server,
    probe: bool,
    pool: &'a Pool,
    reported: bool,
}

impl Lease<'_> {
    pub fn succeeded(mut self) {
        self.reported = true;
        self.server.failures.store(0, Ordering::Release);
        self.server.open_until.store(0, Ordering::Release);
        self.server.probing.store(false, Ordering::Release);
    }

    /// The server did not answer properly (connect error, timeout, 5xx from it).
    pub fn failed(mut self) {
        self.reported = true;
        self.server.failed.fetch_add(1, Ordering::Relaxed);
        let failures = self.server.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if self.probe || failures >= self.pool.max_fails {
            let until = now_ms() + self.pool.open_for.as_millis() as u64;
            self.server.open_until.store(until, Ordering::Release);
            tracing::warn!(server = self.server.address, failures, "circuit open");
        }
        self.server.probing.store(false, Ordering::Release);
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.server.active.fetch_sub(1, Ordering::AcqRel);
        if !self.reported && self.probe {
            self.server.probing.store(false, Ordering::Release);
        }
    }
}

pub struct Pool {
    pub name: String,
    pub servers: Vec<Server>,
    balance: Balance,
    max_fails: u32,
    open_for: Duration,
    pub response_timeout: Duration,
    pub health: Option<HealthCheckConfig>,
    /// Smooth weighted round-robin state: the current weight of each server.
    current: Mutex<Vec<i64>>,
    /// Retries of requests that may have reached a server: each request earns a tenth
    /// of one, up to ten in hand (Finagle's budget), so retries add at most ~10 %.
    retry_budget: Mutex<f64>,
}

impl Pool {
    pub fn from_config(name: &str, config: &UpstreamConfig, metrics: &GatewayMetrics) -> Pool {
        let servers: Vec<Server> = config
            .servers
            .iter()
            .filter_map(|entry| parse_server(entry).ok())
            .map(|(address, weight)| Server::new(name, address, weight, config, metrics))
            .collect();
        Pool {
            name: name.to_owned(),
            current: Mutex::new(vec![0; servers.len()]),
            retry_budget: Mutex::new(RETRY_BUDGET_MAX),
            servers,
            balance: config.balance,
            max_fails: config.max_fails.max(1),
            open_for: config.open_for.0,
            response_timeout: config.response_timeout.0,
            health: config.health.clone(),
        }
    }

    /// Every request deposits into the retry budget.
    pub fn earn_retry(&self) {
        let mut budget = self.retry_budget.lock().unwrap_or_else(|p| p.into_inner());
        *budget = (*budget + RETRY_BUDGET_PER_REQUEST).min(RETRY_BUDGET_MAX);
    }

    /// Takes one retry from the budget, if there is one.
    pub fn spend_retry(&self) -> bool {
        let mut budget = self.retry_budget.lock().unwrap_or_else(|p| p.into_inner());
        if *budget >= 1.0 {
            *budget -= 1.0;
            true
        } else {
            false
        }
    }

    /// Picks a server that is healthy, has its circuit closed (or is the half-open
    /// probe) and is not in `tried`. `None`: nothing usable.
    pub fn pick(&self, tried: &[usize]) -> Option<(usize, Lease<'_>)> {
        let now = now_ms();
        let mut admitted: Vec<(usize, bool)> = Vec::with_capacity(self.servers.len());
        for (index, server) in self.servers.iter().enumerate() {
            if tried.contains(&index) {
                continue;
            }
            // A half-open probe is claimed only if this server is chosen below.
            let open = server.open_until.load(Ordering::Acquire);
            if !server.healthy.load(Ordering::Acquire) || (open != 0 && now < open) {
                continue;
            }
            admitted.push((index, open != 0));
        }
        if admitted.is_empty() {
            return None;
        }
        let index = match self.balance {
            Balance::RoundRobin => self.weighted_round_robin(&admitted),
            Balance::LeastConn => admitted
                .iter()
                .map(|(index, _)| *index)
                .min_by_key(|index| {
                    let server = &self.servers[*index];
                    // Compare active/weight without division: scale by the others' weight.
                    (server.active.load(Ordering::Relaxed) * 1000) / u64::from(server.weight)
                })
                .expect("not empty"),
        };
        let server = &self.servers[index];
        let probe = match server.admits(now) {
            Some(probe) => probe,
            // Lost the half-open race to another request: try the others.
            None => {
                let mut tried = tried.to_vec();
                tried.push(index);
                return self.pick(&tried);
            }
        };
        server.active.fetch_add(1, Ordering::AcqRel);
        server.requests.fetch_add(1, Ordering::Relaxed);
        Some((
            index,
            Lease {
                server,
                probe,
                pool: self,
                reported: false,
            },
        ))
    }

    /// nginx's smooth weighted round-robin over the admitted servers.
    fn weighted_round_robin(&self, admitted: &[(usize, bool)]) -> usize {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let total: i64 = admitted
            .iter()
            .map(|(index, _)| i64::from(self.servers[*index].weight))
            .sum();
        let mut best = admitted[0].0;
        for (index, _) in admitted {
            current[*index] += i64::from(self.servers[*index].weight);
            if current[*index] > current[best] {
                best = *index;
            }
        }
        current[best] -= total;
        best
    }

    /// One health-check result for a server, applied with rise/fall hysteresis.
    pub fn health_result(&self, index: usize, ok: bool) {
        let Some(health) = &self.health else { return };
        let server = &self.servers[index];
        let healthy = server.healthy.load(Ordering::Acquire);
        if ok == healthy {
            server.streak.store(0, Ordering::Release);
            return;
        }
        let streak = server.streak.fetch_add(1, Ordering::AcqRel) + 1;
        let needed = if ok { health.rise } else { health.fall };
        if streak >= needed {
            server.healthy.store(ok, Ordering::Release);
            server.streak.store(0, Ordering::Release);
            if ok {
                // Back in service: forget the failures that ejected it.
                server.failures.store(0, Ordering::Release);
                server.open_until.store(0, Ordering::Release);
            }
            tracing::warn!(
                upstream = self.name,
                server = server.address,
                healthy = ok,
                "health check changed the server's state"
            );
        }
    }

    pub fn statuses(&self) -> Vec<ServerStatus> {
        self.servers.iter().map(Server::status).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(servers: &[&str], balance: Balance) -> Pool {
        let config = UpstreamConfig {
            servers: servers.iter().map(|s| (*s).to_owned()).collect(),
            balance,
            health: Some(HealthCheckConfig {
                path: "/healthz".to_owned(),
                interval: crate::config::Span(Duration::from_secs(1)),
                rise: 2,
                fall: 2,
                expect_status: 200,
            }),
            connect_timeout: crate::config::Span(Duration::from_secs(1)),
            response_timeout: crate::config::Span(Duration::from_secs(1)),
            idle_timeout: crate::config::Span(Duration::from_secs(1)),
            max_fails: 2,
            open_for: crate::config::Span(Duration::from_secs(60)),
        };
        let metrics = GatewayMetrics::new(&prometheus::Registry::new());
        Pool::from_config("app", &config, &metrics)
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_proportional() {
        let pool = pool(&["a:1 weight=3", "b:1", "c:1"], Balance::RoundRobin);
        let picks: Vec<String> = (0..10)
            .map(|_| {
                let (_, lease) = pool.pick(&[]).unwrap();
                let address = lease.server.address.clone();
                lease.succeeded();
                address
            })
            .collect();
        assert_eq!(picks[..5], ["a:1", "b:1", "a:1", "c:1", "a:1"]);
        assert_eq!(picks.iter().filter(|p| *p == "a:1").count(), 6);
    }

    #[test]
    fn least_conn_prefers_the_idle_server() {
        let pool = pool(&["a:1", "b:1"], Balance::LeastConn);
        let (first, _busy) = pool.pick(&[]).unwrap();
        let (second, _) = pool.pick(&[]).unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn failures_open_the_circuit_and_a_probe_closes_it() {
        let pool = pool(&["a:1", "b:1"], Balance::RoundRobin);
        for _ in 0..2 {
            let (_, lease) = pool.pick(&[1]).unwrap();
            lease.failed();
        }
        assert_eq!(pool.servers[0].status().circuit, "open");
        // Only b is used now.
        for _ in 0..4 {
            let (index, lease) = pool.pick(&[]).unwrap();
            assert_eq!(index, 1);
            lease.succeeded();
        }
        // The circuit's time is up: one probe goes to a, a second request does not.
        pool.servers[0].open_until.store(1, Ordering::Release);
        let (_, probe) = pool.pick(&[1]).unwrap();
        assert!(
            pool.pick(&[1]).is_none(),
            "only one half-open probe at a time"
        );
        probe.succeeded();
        assert_eq!(pool.servers[0].status().circuit, "closed");
    }

    #[test]
    fn health_checks_eject_and_readmit_with_hysteresis() {
        let pool = pool(&["a:1", "b:1"], Balance::RoundRobin);
        pool.health_result(0, false);
        assert!(
            pool.servers[0].status().healthy,
            "one failure is not enough"
        );
        pool.health_result(0, false);
        assert!(!pool.servers[0].status().healthy);
        assert!(pool.pick(&[1]).is_none());
        pool.health_result(0, true);
        pool.health_result(0, true);
        assert!(pool.servers[0].status().healthy);
        assert!(pool.pick(&[1]).is_some());
    }
}
