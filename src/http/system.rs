//! Routes about the process itself: liveness, readiness, metrics, and configuration
//! validation.

use std::path::Path;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::{ApiError, ApiState};
use crate::config::{self, Origin};
use crate::observe::BuildInfo;

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/config/validate", post(validate_config))
}

async fn index() -> Json<serde_json::Value> {
    let build = BuildInfo::CURRENT;
    Json(json!({
        "name": "keel",
        "version": build.version,
        "commit": build.commit,
        "endpoints": ["/healthz", "/readyz", "/metrics", "/v1/config/validate"],
    }))
}

/// Alive: the process answers. Says nothing about storage.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready: every dependency is open. 503 with the same body shape until then, so a load
/// balancer and an operator read the same answer.
async fn readyz(State(state): State<ApiState>) -> Response {
    let ready = state.readiness.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({ "ready": ready, "dependencies": state.readiness.snapshot() });
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Checks a configuration file sent as the body, exactly as `keel check-config` would
/// (without environment overrides): every problem, with key path and line.
async fn validate_config(
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = body?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("bad_encoding", "the configuration must be UTF-8"))?;
    Ok(Json(match config::parse_str(Path::new("request"), text) {
        Ok(_) => json!({ "valid": true, "problems": [] }),
        Err(errors) => {
            let problems: Vec<_> = errors
                .0
                .iter()
                .map(|problem| {
                    let line = match problem.origin {
                        Origin::File { line, .. } => line,
                        _ => None,
                    };
                    json!({ "path": problem.path, "line": line, "message": problem.message })
                })
                .collect();
            json!({ "valid": false, "problems": problems })
        }
    }))
}
