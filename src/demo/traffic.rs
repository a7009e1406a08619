//! Light built-in traffic so every dashboard chart moves: about fifteen requests a second
//! through the gateway and the api, an email job a second (some of them bound to fail),
//! SQL statements, cache loads, and every fifteen seconds a burst that trips the
//! gateway's rate limit.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::app::rand_u32;
use super::site::{POSTS, UNINDEXED_QUERY, USERS};

/// Requests in flight at most; a slow keel slows the generator instead of piling up.
const MAX_IN_FLIGHT: usize = 64;
const TICK: Duration = Duration::from_millis(100);

/// Where the generator sends its requests.
#[derive(Clone)]
pub(super) struct Targets {
    pub(super) api: String,
    pub(super) gateway: String,
    pub(super) token: Option<String>,
}

#[derive(Clone)]
pub(super) struct Sender {
    client: Client<HttpConnector, Full<Bytes>>,
    targets: Arc<Targets>,
    in_flight: Arc<Semaphore>,
}

impl Sender {
    pub(super) fn new(targets: Targets) -> Sender {
        Sender {
            client: Client::builder(TokioExecutor::new()).build_http(),
            targets: Arc::new(targets),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// Sends traffic until `stop` is cancelled.
    pub(super) async fn run(self, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut tick: u64 = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            tick += 1;
            self.tick(tick);
        }
    }

    /// What the printed example commands and the dashboard's first look need; awaited
    /// before the demo prints anything.
    pub(super) async fn seed(&self) {
        self.api(
            Method::PUT,
            "/v1/cache/demo:hello",
            Some(Bytes::from_static(b"Hello from keel")),
        )
        .await;
        // A few jobs that can never succeed: the Queues page has dead jobs within seconds.
        for n in 0..3 {
            self.enqueue_email(&format!("nobody{n}@bounce.example"))
                .await;
        }
    }

    fn tick(&self, tick: u64) {
        let post = 1 + rand_u32() % 200; // a hot set, so the response cache hits
        self.spawn_gateway(format!("/api/posts/{post}"));
        if tick.is_multiple_of(2) {
            self.spawn_gateway(format!("/api/posts?page={}", rand_u32() % 20));
        }
        if tick.is_multiple_of(3) {
            let user = 1 + rand_u32() % USERS;
            self.spawn_gateway(format!("/api/users/{user}/posts"));
        }
        if tick.is_multiple_of(5) {
            let user = 1 + rand_u32() % 300;
            self.spawn_api(Method::GET, format!("/v1/cache/ns/users/{user}"), None);
        }
        if tick.is_multiple_of(7) {
            let user = 1 + rand_u32() % USERS;
            self.spawn_api(
                Method::GET,
                format!("/v1/sql/q/posts_by_user?user_id={user}"),
                None,
            );
        }
        if tick.is_multiple_of(10) {
            self.spawn_api(Method::GET, "/v1/sql/q/popular_posts".to_owned(), None);
            let n = rand_u32();
            let to = if n.is_multiple_of(8) {
                format!("user{}@bounce.example", n % 100)
            } else {
                format!("user{}@example.com", 1 + n % USERS)
            };
            let sender = self.clone();
            tokio::spawn(async move { sender.enqueue_email(&to).await });
        }
        if tick.is_multiple_of(20) {
            let email = format!("user{}@example.com", 1 + rand_u32() % USERS);
            let body = json!({ "sql": UNINDEXED_QUERY, "params": { "email": email } });
            self.spawn_api(
                Method::POST,
                "/v1/sql/query".to_owned(),
                Some(body.to_string().into()),
            );
        }
        if tick.is_multiple_of(30) {
            let email = format!("user{}@example.com", 1 + rand_u32() % USERS);
            self.spawn_gateway(format!("/api/search?author_email={email}"));
        }
        if tick.is_multiple_of(40) {
            let key = format!("/v1/cache/demo:visits:{}?ttl=5m", rand_u32() % 50);
            let value = Bytes::from(tick.to_string());
            self.spawn_api(Method::PUT, key, Some(value));
        }
        if tick.is_multiple_of(50) {
            self.spawn_gateway("/api/slow".to_owned());
        }
        if tick.is_multiple_of(150) {
            // More than the route's burst at once: the rate-limit chart moves.
            for _ in 0..60 {
                let post = 1 + rand_u32() % POSTS;
                self.spawn_gateway(format!("/api/posts/{post}"));
            }
        }
    }

    async fn enqueue_email(&self, to: &str) {
        let job = json!({
            "name": "welcome",
            "payload": { "to": to, "template": "welcome" },
            "attempts": 3,
            "backoff": { "type": "fixed", "delay": "1s" },
        });
        self.api(
            Method::POST,
            "/v1/queues/email/jobs",
            Some(job.to_string().into()),
        )
        .await;
    }

    fn spawn_gateway(&self, path: String) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            return;
        };
        let sender = self.clone();
        tokio::spawn(async move {
            let uri = format!("{}{path}", sender.targets.gateway);
            sender.send(Method::GET, &uri, None, false).await;
            drop(permit);
        });
    }

    fn spawn_api(&self, method: Method, path: String, body: Option<Bytes>) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            return;
        };
        let sender = self.clone();
        tokio::spawn(async move {
            sender.api(method, &path, body).await;
            drop(permit);
        });
    }

    async fn api(&self, method: Method, path: &str, body: Option<Bytes>) {
        let uri = format!("{}{path}", self.targets.api);
        self.send(method, &uri, body, true).await;
    }

    /// One request; failures are expected (rate limits, the slow route's timeouts, a
    /// keel shutting down) and only logged at debug level.
    async fn send(&self, method: Method, uri: &str, body: Option<Bytes>, authorized: bool) {
        let is_post = method == Method::POST;
        let mut request = Request::builder().method(method).uri(uri);
        if is_post {
            request = request.header("content-type", "application/json");
        }
        if let (true, Some(token)) = (authorized, &self.targets.token) {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let Ok(request) = request.body(Full::new(body.unwrap_or_default())) else {
            return;
        };
        match self.client.request(request).await {
            Ok(response) => {
                let status = response.status();
                // Read the body so the connection returns to the pool.
                let _ = response.into_body().collect().await;
                tracing::debug!(target: "keel::demo", %status, uri, "demo traffic");
            }
            Err(error) => tracing::debug!(target: "keel::demo", %error, uri, "demo traffic failed"),
        }
    }
}
