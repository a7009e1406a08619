//! One Redis server keel talks to (the cache's L2, shared rate limits): a lazily
//! connected `ConnectionManager` (it reconnects by itself), every call gated by the
//! `redis` [`Dependency`]'s circuit breaker, and a probe task that notices when Redis
//! comes back without waiting for traffic.
//!
//! Keel must start and serve from L1 while Redis is away, so nothing here connects at
//! construction: the first call (or the probe) does.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::observe::Dependency;

/// Bounds every connect and every reply, so a Redis that stops answering turns into
/// errors (and an open breaker) within a second instead of hung requests.
const TIMEOUT: Duration = Duration::from_secs(1);
/// How often the probe pings: also how quickly a returning Redis is noticed.
const PROBE_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RedisCallError(pub String);

pub struct RedisClient {
    client: redis::Client,
    manager: OnceCell<ConnectionManager>,
    dependency: Dependency,
}

/// Whether an error means Redis (or the way to it) is failing, as opposed to a bad
/// command: only the former counts against the breaker.
fn is_outage(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
        )
}

/// A call that failed on a broken connection, worth one retry: the connection manager
/// answers the first call after an outage with its last failed reconnect's error and
/// only then reconnects. Not a timeout: retrying a slow Redis only doubles the wait.
pub fn is_stale_connection(error: &redis::RedisError) -> bool {
    error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal()
}

impl RedisClient {
    /// Parses the URL; connects on first use.
    pub fn new(url: &str, dependency: Dependency) -> Result<RedisClient, RedisCallError> {
        let client = redis::Client::open(url).map_err(|error| RedisCallError(error.to_string()))?;
        Ok(RedisClient {
            client,
            manager: OnceCell::new(),
            dependency,
        })
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    pub fn dependency(&self) -> &Dependency {
        &self.dependency
    }

    /// A connection for one call, or an error at once while the breaker is open.
    pub async fn connection(&self) -> Result<ConnectionManager, RedisCallError> {
        self.dependency
            .allow()
            .map_err(|error| RedisCallError(error.to_string()))?;
        self.manager().await
    }

    /// The manager, connecting it the first time. Callers have passed the breaker.
    async fn manager(&self) -> Result<ConnectionManager, RedisCallError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1);
        match self
            .manager
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config))
            .await
        {
            Ok(manager) => Ok(manager.clone()),
            Err(error) => {
                self.dependency.failure(&error);
                Err(RedisCallError(format!("redis: {error}")))
            }
        }
    }

    /// Reports a call's outcome to the breaker and turns the error into ours.
    pub fn record<T>(&self, result: redis::RedisResult<T>) -> Result<T, RedisCallError> {
        match result {
            Ok(value) => {
                self.dependency.success();
                Ok(value)
            }
            Err(error) if is_outage(&error) => {
                self.dependency.failure(&error);
                Err(RedisCallError(format!("redis: {error}")))
            }
            Err(error) => {
                self.dependency.success();
                Err(RedisCallError(format!("redis: {error}")))
            }
        }
    }

    /// Runs one command through the breaker.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, RedisCallError> {
        let mut connection = self.connection().await?;
        self.record(command.query_async(&mut connection).await)
    }

    /// Pings on a timer until `stop`: marks the dependency up at start and notices
    /// outages and returns without traffic. While the breaker is open the ping is its
    /// one probe per cool-down.
    pub async fn probe(self: std::sync::Arc<Self>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(PROBE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if self.dependency.allow().is_err() {
                continue;
            }
            // `allow` let this ping through (as the probe, when half-open); asking
            // again through `connection` would be refused, so go to the manager.
            let outcome = match self.manager().await {
                Ok(mut connection) => {
                    let ping = redis::cmd("PING");
                    let mut pong = ping.query_async::<String>(&mut connection).await;
                    if pong.as_ref().is_err_and(is_stale_connection) {
                        // Else the stale error fails the probe and keeps the breaker
                        // open for another cool-down although Redis is back.
                        pong = ping.query_async::<String>(&mut connection).await;
                    }
                    self.record(pong).map(drop)
                }
                Err(error) => Err(error),
            };
            if let Err(error) = outcome {
                tracing::debug!(%error, "redis probe failed");
            }
        }
    }
}
