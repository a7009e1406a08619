//! `/v1/cache/...`: the cache over REST. Values are raw bytes in and out; JSON bodies
//! (mget, mset) carry values as UTF-8 text or, with `"encoding": "base64"`, as base64.
//!
//! Keys are taken from the raw request path and percent-decoded to bytes, so any key a
//! RESP client can write is reachable here. `stats`, `mget`, `mset`, `invalidate` and
//! keys under `ns/` are routes of their own.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiState, json_body};
use crate::cache::{Entry, Mutation, Pattern, Target, expires_in, now_ms};
use crate::config::Span;

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/cache/stats", get(stats))
        .route("/v1/cache/mget", post(mget))
        .route("/v1/cache/mset", post(mset))
        .route("/v1/cache/invalidate", post(invalidate))
        .route("/v1/cache/ns/{namespace}/{*key}", get(get_or_load))
        .route(
            "/v1/cache/{*key}",
            get(get_key).put(put_key).delete(delete_key),
        )
}

/// The key from the raw path, percent-decoded to bytes.
fn key_from(uri: &Uri) -> Result<Vec<u8>, ApiError> {
    let raw = uri.path().strip_prefix("/v1/cache/").unwrap_or_default();
    if raw.is_empty() {
        return Err(ApiError::bad_request(
            "missing_key",
            "the path must name a key: /v1/cache/{key}",
        ));
    }
    Ok(percent_encoding::percent_decode_str(raw).collect())
}

fn value_response(entry: Entry, extra: &[(&'static str, HeaderValue)]) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(at) = entry.expires_at {
        headers.insert(
            "x-keel-ttl-ms",
            HeaderValue::from(at.saturating_sub(now_ms())),
        );
    }
    if let Some(tags) = entry
        .tags
        .as_ref()
        .and_then(|tags| HeaderValue::from_str(&tags.join(",")).ok())
    {
        headers.insert("x-keel-tags", tags);
    }
    for (name, value) in extra {
        headers.insert(*name, value.clone());
    }
    (headers, entry.value).into_response()
}

async fn get_key(State(state): State<ApiState>, uri: Uri) -> Result<Response, ApiError> {
    let key = key_from(&uri)?;
    let cache = &state.services()?.cache;
    match cache.get(&key).await? {
        Some(entry) => Ok(value_response(entry, &[])),
        None => Err(ApiError::not_found("no such key")),
    }
}

#[derive(Deserialize)]
struct PutParams {
    ttl: Option<String>,
    tags: Option<String>,
}

fn expiry_from(ttl: Option<&str>) -> Result<Option<u64>, ApiError> {
    let Some(ttl) = ttl else { return Ok(None) };
    let span: Span = ttl
        .parse()
        .map_err(|message: String| ApiError::bad_request("bad_ttl", message))?;
    if span.0.is_zero() {
        return Err(ApiError::bad_request(
            "bad_ttl",
            "ttl must be longer than 0s",
        ));
    }
    Ok(Some(expires_in(span.0)))
}

fn tags_from(tags: impl IntoIterator<Item = String>) -> Option<std::sync::Arc<[String]>> {
    let tags: Vec<String> = tags
        .into_iter()
        .map(|tag| tag.trim().to_owned())
        .filter(|tag| !tag.is_empty())
        .collect();
    (!tags.is_empty()).then(|| tags.into())
}

async fn put_key(
    State(state): State<ApiState>,
    uri: Uri,
    Query(params): Query<PutParams>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let key = key_from(&uri)?;
    let value = body?;
    let entry = Entry {
        value,
        expires_at: expiry_from(params.ttl.as_deref())?,
        tags: tags_from(
            params
                .tags
                .unwrap_or_default()
                .split(',')
                .map(str::to_owned),
        ),
    };
    state.services()?.cache.set(&key, entry).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_key(State(state): State<ApiState>, uri: Uri) -> Result<StatusCode, ApiError> {
    let key = key_from(&uri)?;
    let existed = state
        .services()?
        .cache
        .mutate(&key, |current| Mutation::Delete(current.is_some()))
        .await?;
    if existed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("no such key"))
    }
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Encoding {
    #[default]
    Utf8,
    Base64,
}

fn decode_value(value: &str, encoding: Encoding) -> Result<Bytes, ApiError> {
    match encoding {
        Encoding::Utf8 => Ok(Bytes::copy_from_slice(value.as_bytes())),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(value)
            .map(Bytes::from)
            .map_err(|error| ApiError::bad_request("bad_base64", error.to_string())),
    }
}

fn encode_value(value: &[u8], encoding: Encoding) -> Result<Value, ApiError> {
    match encoding {
        Encoding::Utf8 => std::str::from_utf8(value)
            .map(|text| Value::String(text.to_owned()))
            .map_err(|_| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "not_utf8",
                    "a value is not UTF-8; ask with \"encoding\": \"base64\"",
                )
            }),
        Encoding::Base64 => Ok(Value::String(
            base64::engine::general_purpose::STANDARD.encode(value),
        )),
    }
}

#[derive(Deserialize)]
struct MgetRequest {
    keys: Vec<String>,
    #[serde(default)]
    encoding: Encoding,
}

/// `{"keys": [...]}` → `{"values": [value or null, ...]}` in request order.
async fn mget(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let request: MgetRequest = json_body(body, "bad_json")?;
    let cache = &state.services()?.cache;
    let mut values = Vec::with_capacity(request.keys.len());
    for key in &request.keys {
        values.push(match cache.get(key.as_bytes()).await? {
            Some(entry) => encode_value(&entry.value, request.encoding)?,
            None => Value::Null,
        });
    }
    Ok(Json(json!({ "values": values })))
}

#[derive(Deserialize)]
struct MsetItem {
    key: String,
    value: String,
    ttl: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Deserialize)]
struct MsetRequest {
    items: Vec<MsetItem>,
    #[serde(default)]
    encoding: Encoding,
}

/// Every item is checked before any is stored, so a bad item stores nothing.
async fn mset(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let request: MsetRequest = json_body(body, "bad_json")?;
    let cache = &state.services()?.cache;
    let mut entries = Vec::with_capacity(request.items.len());
    for item in request.items {
        let entry = Entry {
            value: decode_value(&item.value, request.encoding)?,
            expires_at: expiry_from(item.ttl.as_deref())?,
            tags: tags_from(item.tags),
        };
        cache.validate(item.key.as_bytes(), &entry)?;
        entries.push((item.key, entry));
    }
    let stored = entries.len();
    // One wait for Redis (with a shared L2) for all the items, not one per item.
    let writes = cache.pipelined();
    for (key, entry) in entries {
        writes.set(key.as_bytes(), entry).await?;
    }
    writes.take_unconfirmed().confirmed().await?;
    Ok(Json(json!({ "stored": stored })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateRequest {
    #[serde(default)]
    keys: Vec<String>,
    pattern: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// Invalidates by `keys`, `pattern` or `tags` (any combination); answers how many went.
async fn invalidate(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let request: InvalidateRequest = json_body(body, "bad_json")?;
    if request.keys.is_empty() && request.pattern.is_none() && request.tags.is_empty() {
        return Err(ApiError::bad_request(
            "nothing_to_invalidate",
            "give keys, a pattern or tags",
        ));
    }
    let cache = &state.services()?.cache;
    let started = Instant::now();
    let mut invalidated = 0;
    let deletes = cache.pipelined();
    for key in &request.keys {
        invalidated += usize::from(deletes.delete(key.as_bytes()).await?);
    }
    deletes.take_unconfirmed().confirmed().await?;
    if let Some(pattern) = &request.pattern {
        invalidated += cache
            .invalidate(Target::Pattern(Pattern::new(pattern.as_bytes())))
            .await?;
    }
    if !request.tags.is_empty() {
        invalidated += cache.invalidate(Target::Tags(request.tags)).await?;
    }
    Ok(Json(
        json!({ "invalidated": invalidated, "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0 }),
    ))
}

async fn get_or_load(
    State(state): State<ApiState>,
    Path((namespace, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (entry, source) = state
        .services()?
        .namespaces
        .get_or_load(&namespace, &key)
        .await?;
    let source = match source {
        crate::cache::loader::Source::Cache => HeaderValue::from_static("HIT"),
        crate::cache::loader::Source::Loader => HeaderValue::from_static("MISS"),
    };
    Ok(value_response(entry, &[("x-cache", source)]))
}

async fn stats(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let services = state.services()?;
    let stats = services.cache.stats().await;
    Ok(Json(
        json!({ "l1": stats.l1, "l2": stats.l2, "namespaces": services.namespaces.names() }),
    ))
}
