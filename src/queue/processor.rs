//! Built-in processors: jobs a site needs no worker code for. A queue with
//! `processor = {...}` is worked in-process by `concurrency` runners that reserve, run
//! and ack or fail exactly like a REST worker would (same leases, same retries).
//!
//! The registry maps a processor kind to a factory, so subsystems plug theirs in
//! (`cache.warm` from the cache, `sql.maintenance` from SQL) without this module
//! knowing them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use super::{Job, Queue, ReserveRequest};
use crate::config::{Processor as ProcessorConfig, QueueConfig};

/// Runs one job. `Ok` acks with the value as result; `Err` fails with the text.
#[async_trait]
pub trait Processor: Send + Sync + 'static {
    async fn process(&self, job: &Job) -> Result<Value, String>;
}

type Factory = Box<dyn Fn(&ProcessorConfig) -> Option<Arc<dyn Processor>> + Send + Sync>;

/// Processor kinds by name (`webhook`, `cleanup`, and what other subsystems register).
#[derive(Default)]
pub struct ProcessorRegistry {
    factories: HashMap<&'static str, Factory>,
}

impl ProcessorRegistry {
    /// The kinds the queue itself provides.
    pub fn with_builtins(queue: &Queue) -> ProcessorRegistry {
        let mut registry = ProcessorRegistry::default();
        registry.register("webhook", |config| match config {
            ProcessorConfig::Webhook {
                url,
                timeout,
                method,
                headers,
            } => Some(Arc::new(Webhook::new(
                url,
                method.as_deref(),
                headers,
                timeout.map_or(Duration::from_secs(30), |t| t.0),
            )) as Arc<dyn Processor>),
            _ => None,
        });
        let cleanup_queue = queue.clone();
        registry.register("cleanup", move |_| {
            Some(Arc::new(Cleanup {
                queue: cleanup_queue.clone(),
            }) as Arc<dyn Processor>)
        });
        registry
    }

    pub fn register(
        &mut self,
        kind: &'static str,
        factory: impl Fn(&ProcessorConfig) -> Option<Arc<dyn Processor>> + Send + Sync + 'static,
    ) {
        self.factories.insert(kind, Box::new(factory));
    }

    fn build(&self, config: &ProcessorConfig) -> Option<Arc<dyn Processor>> {
        self.factories.get(kind_of(config))?(config)
    }
}

fn kind_of(config: &ProcessorConfig) -> &'static str {
    match config {
        ProcessorConfig::Webhook { .. } => "webhook",
        ProcessorConfig::CacheWarm { .. } => "cache.warm",
        ProcessorConfig::SqlMaintenance { .. } => "sql.maintenance",
        ProcessorConfig::Cleanup { .. } => "cleanup",
    }
}

/// Starts `concurrency` runners for every queue that has a processor.
pub(super) fn start(queue: &Queue, config: &QueueConfig, registry: &ProcessorRegistry) {
    for (name, definition) in &config.queues {
        let Some(processor_config) = &definition.processor else {
            continue;
        };
        let Some(processor) = registry.build(processor_config) else {
            tracing::error!(
                queue = name,
                kind = kind_of(processor_config),
                "this processor is not available in this build; the queue waits for REST workers"
            );
            continue;
        };
        let timeout = match processor_config {
            ProcessorConfig::Webhook { timeout, .. } => timeout.map(|t| t.0),
            _ => None,
        };
        for _ in 0..definition.concurrency.max(1) {
            tokio::spawn(run(queue.clone(), name.clone(), processor.clone(), timeout));
        }
        tracing::info!(
            queue = name,
            kind = kind_of(processor_config),
            concurrency = definition.concurrency,
            "processor started"
        );
    }
}

/// One runner: one job at a time, leased for its timeout plus a margin.
async fn run(queue: Queue, name: String, processor: Arc<dyn Processor>, timeout: Option<Duration>) {
    let shutdown = queue.inner.shutdown.clone();
    let default_run = Duration::from_millis(queue.settings().default_lease_ms);
    while !shutdown.is_cancelled() {
        let request = ReserveRequest {
            max: 1,
            lease_ms: None,
            wait: Duration::from_secs(30),
        };
        let jobs = match queue.reserve(&name, request).await {
            Ok(jobs) => jobs,
            Err(error) => {
                tracing::warn!(queue = name, %error, "processor cannot reserve; retrying in 1s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        for job in jobs {
            let token = job.lease_token.clone().unwrap_or_default();
            // The lease ends first: stop the job a little before another runner may get it.
            let lease = Duration::from_millis(
                job.lease_deadline
                    .unwrap_or(0)
                    .saturating_sub(queue.now_ms()),
            );
            let limit = timeout
                .or(job.timeout.map(Duration::from_millis))
                .unwrap_or(default_run)
                .min(
                    lease
                        .saturating_sub(Duration::from_millis(100))
                        .max(Duration::from_millis(1)),
                );
            let outcome = match tokio::time::timeout(limit, processor.process(&job)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("timed out after {}ms", limit.as_millis())),
            };
            let answer = match outcome {
                Ok(result) => queue
                    .ack(vec![super::Ack {
                        id: job.id,
                        lease_token: token,
                        result: Some(result),
                    }])
                    .await
                    .and_then(|mut results| results.pop().expect("one ack, one result"))
                    .map(|_| ()),
                Err(error) => queue.fail(job.id, &token, &error).await.map(|_| ()),
            };
            if let Err(error) = answer {
                tracing::warn!(queue = name, job = job.id, %error, "processor could not record the outcome");
            }
        }
    }
}

/// Most of a webhook's response body kept as the job's result or error.
const EXCERPT_BYTES: usize = 1024;

/// Sends the payload to a URL: 2xx acks with the status and a body excerpt; any other
/// status, a connection error or the timeout fails the attempt with the same.
pub struct Webhook {
    url: String,
    method: hyper::Method,
    headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Webhook {
    pub fn new(
        url: &str,
        method: Option<&str>,
        headers: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> Webhook {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Webhook {
            url: url.to_owned(),
            method: method
                .and_then(|m| hyper::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
                .unwrap_or(hyper::Method::POST),
            headers: headers
                .iter()
                .filter_map(|(name, value)| {
                    Some((
                        hyper::header::HeaderName::from_bytes(name.as_bytes()).ok()?,
                        hyper::header::HeaderValue::from_str(value).ok()?,
                    ))
                })
                .collect(),
            timeout,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    async fn call(&self, job: &Job) -> Result<Value, String> {
        let body = serde_json::to_vec(&job.payload).map_err(|e| e.to_string())?;
        let mut request = hyper::Request::builder()
            .method(self.method.clone())
            .uri(&self.url)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("x-keel-job-id", job.id)
            .header("x-keel-attempt", job.attempts_made);
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("bad webhook request: {e}"))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("webhook request failed: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), 1 << 20)
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        let excerpt = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)]).into_owned();
        if status.is_success() {
            Ok(json!({ "status": status.as_u16(), "body": excerpt }))
        } else {
            Err(format!("HTTP {}: {excerpt}", status.as_u16()))
        }
    }
}

#[async_trait]
impl Processor for Webhook {
    async fn process(&self, job: &Job) -> Result<Value, String> {
        match tokio::time::timeout(self.timeout, self.call(job)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!(
                "webhook timed out after {}ms",
                self.timeout.as_millis()
            )),
        }
    }
}

/// Applies retention now: to the queue named in the payload (`{"queue": "email"}`),
/// or to every queue.
struct Cleanup {
    queue: Queue,
}

#[async_trait]
impl Processor for Cleanup {
    async fn process(&self, job: &Job) -> Result<Value, String> {
        let removed = match job.payload.get("queue").and_then(Value::as_str) {
            Some(name) => self.queue.store().retain(name).await,
            None => self.queue.retain_all().await,
        }
        .map_err(|e| e.to_string())?;
        Ok(json!({ "removed": removed }))
    }
}
