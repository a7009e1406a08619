//! `/v1/gateway/...`: the gateway's routes, upstream health and counters, and purge.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{ApiError, ApiState, json_body};
use crate::gateway::{PurgeError, PurgeRequest};

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/gateway/routes", get(route_list))
        .route("/v1/gateway/upstreams", get(upstreams))
        .route("/v1/gateway/purge", post(purge))
}

async fn purge(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let gateway = &state.services()?.gateway;
    let request: PurgeRequest = json_body(body, "bad_purge")?;
    match gateway.purge(request).await {
        Ok(removed) => Ok(Json(json!({ "purged": removed }))),
        Err(PurgeError::Invalid(detail)) => Err(ApiError::bad_request("bad_purge", detail)),
        Err(PurgeError::NoCache) => Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "no_cache",
            "the gateway has no cache",
        )),
        Err(PurgeError::Cache(error)) => Err(error.into()),
    }
}

async fn upstreams(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let gateway = &state.services()?.gateway;
    Ok(Json(json!({ "upstreams": gateway.upstreams() })))
}

async fn route_list(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let gateway = &state.services()?.gateway;
    Ok(Json(json!({ "routes": gateway.routes() })))
}
