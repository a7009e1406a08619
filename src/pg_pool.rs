//! A pool of connections to one PostgreSQL server (the queue's store, the SQL backend's
//! primary or replica) whose every call reports to that server's [`Dependency`]: its
//! circuit breaker, `keel_dependency_up`, `keel_dependency_errors_total` and its
//! `/readyz` entry.
//!
//! While the breaker is open a call is refused at once, instead of each request
//! waiting out `pool_timeout` on a server that is gone. The probe task lets one
//! `SELECT 1` through per cool-down, so a server that comes back is noticed within
//! about a second without waiting for traffic; while calls report anyway it stays quiet.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, Pool, PoolError, TimeoutType};
use tokio_util::sync::CancellationToken;

use crate::observe::{Dependency, Unavailable};

/// How often the probe asks, unless calls reported meanwhile: also how quickly a
/// returning server is noticed once the breaker's cool-down is over.
const PROBE_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum PgPoolError {
    /// The breaker is open: nothing was sent.
    #[error(transparent)]
    Open(#[from] Unavailable),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

pub struct PgPool {
    pool: Pool,
    dependency: Dependency,
}

impl PgPool {
    pub fn new(pool: Pool, dependency: Dependency) -> PgPool {
        PgPool { pool, dependency }
    }

    /// The deadpool itself, for its status.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A connection, or an error at once while the breaker is open. Failing to connect
    /// counts against the server; a wait for a free connection that timed out counts
    /// neither way: the server was not asked (the pool is busy, not the server down).
    pub async fn get(&self) -> Result<Object, PgPoolError> {
        self.dependency.allow()?;
        match self.pool.get().await {
            Ok(client) => Ok(client),
            Err(error @ PoolError::Timeout(TimeoutType::Wait)) => Err(error.into()),
            Err(error) => {
                self.dependency.failure(&error);
                Err(error.into())
            }
        }
    }

    /// Reports what a call on a connection from [`PgPool::get`] said about the server:
    /// `unreachable` picks the errors that mean it could not be reached; any other
    /// outcome, an error PostgreSQL answered included, shows it is up.
    pub fn report<T, E: Display>(&self, outcome: &Result<T, E>, unreachable: fn(&E) -> bool) {
        match outcome {
            Err(error) if unreachable(error) => self.dependency.failure(error),
            _ => self.dependency.success(),
        }
    }

    /// Asks `SELECT 1` on a timer until `stop`, when no call reported since the last
    /// tick: notices an outage without traffic, and while the breaker is open it is the
    /// one probe per cool-down that closes it again.
    pub async fn probe(self: Arc<Self>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(PROBE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if self.dependency.reported_within(PROBE_EVERY) {
                continue;
            }
            let Ok(client) = self.get().await else {
                continue;
            };
            let outcome = client.simple_query("SELECT 1").await;
            // Any error here is the connection's: `SELECT 1` itself cannot fail.
            self.report(&outcome, |_| true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{BuildInfo, DependencyState, Metrics, Readiness};
    use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};

    /// A pool of `size` connections to 127.0.0.1:`port`.
    fn pool_to(port: u16, size: usize) -> Pool {
        let config: tokio_postgres::Config = format!("postgres://keel@127.0.0.1:{port}/keel")
            .parse()
            .unwrap();
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_millis(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_busy_pool_is_not_a_down_server() {
        let nothing_listens = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let metrics = Metrics::new(BuildInfo::CURRENT);
        let readiness = Readiness::default();
        let postgres = Dependency::new("postgres", true, &metrics, &readiness);
        let (up, errors) = metrics.dependency("postgres");

        // No connection ever free: every wait times out, and none counts either way.
        let busy = PgPool::new(pool_to(nothing_listens, 0), postgres.clone());
        for _ in 0..5 {
            let waited = busy.get().await;
            assert!(
                matches!(
                    waited,
                    Err(PgPoolError::Pool(PoolError::Timeout(TimeoutType::Wait)))
                ),
                "{waited:?}"
            );
        }
        assert!(postgres.is_up());
        assert_eq!(errors.get(), 0);

        // Connecting fails: each counts, the third opens the breaker, and from then on
        // a call is refused without connecting.
        let down = PgPool::new(pool_to(nothing_listens, 1), postgres.clone());
        for _ in 0..3 {
            let connected = down.get().await;
            assert!(
                matches!(connected, Err(PgPoolError::Pool(PoolError::Backend(_)))),
                "{connected:?}"
            );
        }
        assert!(matches!(down.get().await, Err(PgPoolError::Open(_))));
        assert_eq!((up.get(), errors.get()), (0, 3));
        assert!(matches!(
            &readiness.snapshot()["postgres"],
            DependencyState::Degraded(detail) if detail.starts_with("unreachable")
        ));
    }
}
