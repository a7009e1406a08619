//! The api listener's HTTP surface: the axum router, its shared state, and the layers
//! every route gets (request metrics, body limit, problem+json for unknown routes).
//!
//! Handlers turn requests into calls on subsystem handles and back; they hold no state
//! of their own. Wire formats stop here: subsystems never see axum types.

mod admin;
mod auth;
mod cache;
mod error;
mod gateway;
mod queue;
mod sql;
mod system;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::cache::Cache;
use crate::cache::loader::Namespaces;
use crate::config::Config;
use crate::observe::{Metrics, Readiness};
use crate::queue::Queue;
use crate::sql::Sql;

pub use error::ApiError;

/// What handlers share. Cheap to clone: every field is a handle.
#[derive(Clone)]
pub struct ApiState {
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
    pub auth: Authenticator,
    /// The live configuration; SIGHUP publishes a new one.
    pub config: watch::Receiver<Arc<Config>>,
    /// Set once storage is open; until then subsystem routes answer 503.
    pub services: Arc<OnceLock<Services>>,
}

/// The subsystem handles the routes call into.
pub struct Services {
    pub cache: Cache,
    pub namespaces: Namespaces,
    pub queue: Queue,
    pub sql: Sql,
    pub backup: crate::app::Backup,
    pub gateway: crate::gateway::Gateway,
    pub history: Arc<crate::observe::History>,
}

impl ApiState {
    fn services(&self) -> Result<&Services, ApiError> {
        self.services.get().ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "keel is starting; see /readyz",
            )
        })
    }
}

/// The whole api router.
pub fn router(state: ApiState) -> Router {
    let body_limit = state.config.borrow().listeners.api.max_body_bytes.0 as usize;
    let metrics = state.metrics.clone();
    Router::new()
        .merge(system::routes())
        .merge(cache::routes())
        .merge(queue::routes())
        .merge(sql::routes())
        .merge(admin::routes())
        .merge(gateway::routes())
        .merge(crate::dashboard::router())
        .merge(auth::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            state.auth.clone(),
            auth::require_auth,
        ))
        .layer(middleware::from_fn_with_state(metrics, track_request))
        .with_state(state)
}

/// Parses a JSON body. Malformed JSON is `bad_json`; well-formed JSON of the wrong
/// shape is `data_code`, with the path of the offending field in the detail.
fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
    data_code: &'static str,
) -> Result<T, ApiError> {
    let body = body?;
    let mut deserializer = serde_json::Deserializer::from_slice(&body);
    let parsed: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let code = match inner.classify() {
            serde_json::error::Category::Data => data_code,
            _ => "bad_json",
        };
        let detail = if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        };
        ApiError::bad_request(code, detail)
    })?;
    deserializer
        .end()
        .map_err(|error| ApiError::bad_request("bad_json", error.to_string()))?;
    Ok(parsed)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// Counts and times every request by its route pattern.
async fn track_request(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    // MatchedPath shares its text: cloning it costs no allocation per request.
    let route = request.extensions().get::<MatchedPath>().cloned();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = request.method().clone();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    metrics.observe_http(route, status, elapsed);
    tracing::debug!(%method, route, status, elapsed_us = elapsed.as_micros() as u64, "request");
    response
}
