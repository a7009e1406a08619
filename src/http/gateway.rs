//! `/v1/gateway/...`: the gateway's upstream health and counters.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{ApiError, ApiState};

pub(super) fn routes() -> Router<ApiState> {
    Router::new().route("/v1/gateway/upstreams", get(upstreams))
}

async fn upstreams(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let gateway = &state.services()?.gateway;
    Ok(Json(json!({ "upstreams": gateway.upstreams() })))
}
