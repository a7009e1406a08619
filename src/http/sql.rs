//! `/v1/sql/...`: statements, batches, named queries, statistics and the analyzer.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiState, json_body};
use crate::sql::{SortBy, Sql, Statement, params_from_json};

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/sql/query", post(query))
        .route("/v1/sql/execute", post(execute))
        .route("/v1/sql/batch", post(batch))
        .route("/v1/sql/q/{name}", get(named))
        .route("/v1/sql/stats", get(stats))
        .route("/v1/sql/stats/reset", post(reset_stats))
        .route("/v1/sql/slow", get(slow))
        .route("/v1/sql/analyze", post(analyze))
}

fn sql_of(state: &ApiState) -> Result<&Sql, ApiError> {
    Ok(&state.services()?.sql)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatementBody {
    sql: String,
    #[serde(default)]
    params: Option<Value>,
}

impl StatementBody {
    fn into_statement(self) -> Result<Statement, ApiError> {
        Ok(Statement {
            params: params_from_json(self.params.as_ref())?,
            sql: self.sql,
        })
    }
}

async fn query(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let sql = sql_of(&state)?;
    let body: StatementBody = json_body(body, "bad_statement")?;
    Ok(Json(json!(sql.query(body.into_statement()?).await?)))
}

async fn execute(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let sql = sql_of(&state)?;
    let body: StatementBody = json_body(body, "bad_statement")?;
    Ok(Json(json!(sql.execute(body.into_statement()?).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    statements: Vec<StatementBody>,
    #[serde(default = "yes")]
    transaction: bool,
}

fn yes() -> bool {
    true
}

async fn batch(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let sql = sql_of(&state)?;
    let body: BatchBody = json_body(body, "bad_statement")?;
    let statements = body
        .statements
        .into_iter()
        .map(StatementBody::into_statement)
        .collect::<Result<Vec<_>, _>>()?;
    let results = sql.batch(statements, body.transaction).await?;
    Ok(Json(json!({ "results": results })))
}

async fn named(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let sql = sql_of(&state)?;
    let (body, cached) = sql.named(&name, params).await?;
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "x-cache",
        HeaderValue::from_static(if cached { "HIT" } else { "MISS" }),
    );
    Ok(response)
}

#[derive(Deserialize)]
struct StatsQuery {
    sort: Option<String>,
    limit: Option<usize>,
}

async fn stats(
    State(state): State<ApiState>,
    Query(query): Query<StatsQuery>,
) -> Result<Json<Value>, ApiError> {
    let sql = sql_of(&state)?;
    let sort = match query.sort.as_deref().unwrap_or("total") {
        "total" => SortBy::Total,
        "mean" => SortBy::Mean,
        "calls" => SortBy::Calls,
        other => {
            return Err(ApiError::bad_request(
                "bad_sort",
                format!("{other:?}: sort is total, mean or calls"),
            ));
        }
    };
    let report = sql
        .stats(sort, query.limit.unwrap_or(100).min(10_000))
        .await;
    Ok(Json(json!(report)))
}

async fn reset_stats(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    sql_of(&state)?.reset_stats();
    Ok(Json(json!({ "reset": true })))
}

async fn slow(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "slow": sql_of(&state)?.slow_queries() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnalyzeBody {
    sql: String,
}

async fn analyze(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let sql = sql_of(&state)?;
    let body: AnalyzeBody = json_body(body, "bad_statement")?;
    Ok(Json(json!(sql.analyze(body.sql).await?)))
}
