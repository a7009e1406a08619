//! Routes about the process itself: liveness, readiness, metrics, what is running
//! (`/v1/system`), and configuration validation. `/` is the dashboard (`dashboard`);
//! the JSON index of the api is `/v1`.

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
        .route("/v1", get(index))
        .route("/v1/system", get(system))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/config/validate", post(validate_config))
        .route("/v1/metrics/history", get(history))
        .route("/v1/metrics/stream", get(stream))
}

#[derive(serde::Deserialize)]
struct HistoryQuery {
    resolution: Option<String>,
}

/// The key series at 1 s (last 15 minutes) or 10 s (last 24 hours) resolution.
async fn history(
    State(state): State<ApiState>,
    axum::extract::Query(query): axum::extract::Query<HistoryQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let history = &state.services()?.history;
    let fine = match query.resolution.as_deref().unwrap_or("1s") {
        "1s" => true,
        "10s" => false,
        other => {
            return Err(ApiError::bad_request(
                "bad_resolution",
                format!("{other:?}: resolution is 1s or 10s"),
            ));
        }
    };
    Ok(Json(json!({
        "series": crate::observe::History::series(),
        "points": history.points(fine),
    })))
}

/// New 1 s points as server-sent events, one `point` event per second.
async fn stream(
    State(state): State<ApiState>,
) -> Result<
    axum::response::sse::Sse<
        impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    ApiError,
> {
    let receiver = state.services()?.history.subscribe();
    let events = futures_util::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(point) => {
                    let event = axum::response::sse::Event::default()
                        .event("point")
                        .json_data(&point)
                        .unwrap_or_default();
                    return Some((Ok(event), receiver));
                }
                // A slow client skips points rather than holding memory for them.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(axum::response::sse::Sse::new(events).keep_alive(axum::response::sse::KeepAlive::default()))
}

async fn index() -> Json<serde_json::Value> {
    let build = BuildInfo::CURRENT;
    Json(json!({
        "name": "keel",
        "version": build.version,
        "commit": build.commit,
        "endpoints": ["/healthz", "/readyz", "/metrics", "/v1/system", "/v1/config/validate"],
        "dashboard": "/",
    }))
}

/// What is running: build, uptime, the data directory's databases and their sizes, and
/// the effective configuration with secrets redacted (the serialization `keel
/// check-config` prints).
async fn system(State(state): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let config = state.config.borrow().clone();
    let build = BuildInfo::CURRENT;
    let uptime = state.metrics.uptime();
    let started_at = std::time::SystemTime::now()
        .checked_sub(uptime)
        .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|since| since.as_millis() as u64);
    let data_dir = config.data_dir.clone();
    let sql_url = config.sql.url.expose().to_owned();
    let files =
        tokio::task::spawn_blocking(move || crate::storage::stored_files(&data_dir, &sql_url))
            .await
            .map_err(ApiError::internal)?;
    let summary = serde_json::to_value(&*config).map_err(ApiError::internal)?;
    Ok(Json(json!({
        "version": build.version,
        "commit": build.commit,
        "profile": build.profile,
        "pid": std::process::id(),
        "started_at": started_at,
        "uptime_seconds": uptime.as_secs_f64(),
        "data_dir": config.data_dir,
        "storage": files,
        "auth_enabled": state.auth.is_enabled(),
        "config": summary,
    })))
}

/// Alive: the process answers. Says nothing about storage.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready: every dependency is open, or down but one keel can serve without (degraded,
/// named in the body). 503 with the same body shape otherwise, so a load balancer and
/// an operator read the same answer.
async fn readyz(State(state): State<ApiState>) -> Response {
    let ready = state.readiness.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "degraded": state.readiness.is_degraded(),
        "dependencies": state.readiness.snapshot(),
    });
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
