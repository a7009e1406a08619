//! The one place API errors become HTTP: `application/problem+json` (RFC 9457) with a
//! stable `code` clients can match on. Internal details are logged, never sent.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, machine-readable: `not_found`, `payload_too_large`, ...
    pub code: &'static str,
    pub detail: String,
    /// Extension members of the problem (RFC 9457 §3.2), e.g. SQLite's error code.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Seconds for a `Retry-After` header: set when the condition is expected to pass.
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
    #[serde(flatten)]
    extra: &'a serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: detail.into(),
            extra: serde_json::Map::new(),
            retry_after: None,
        }
    }

    /// Asks the client to try again after `seconds` (`Retry-After`).
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// Adds an extension member to the problem.
    pub fn with(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(name.to_owned(), value.into());
        self
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// Logs the cause and answers without it.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            kind: format!("urn:keel:problem:{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            detail: &self.detail,
            code: self.code,
            extra: &self.extra,
        };
        let mut response = (self.status, Json(problem)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::BytesRejection) -> Self {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "bad_body"
        };
        ApiError::new(status, code, rejection.body_text())
    }
}

impl From<crate::cache::CacheError> for ApiError {
    fn from(error: crate::cache::CacheError) -> Self {
        use crate::cache::CacheError;
        match &error {
            CacheError::TooManyTags => ApiError::bad_request("bad_tags", error.to_string()),
            CacheError::KeyTooLarge { .. } => {
                ApiError::bad_request("key_too_large", error.to_string())
            }
            CacheError::ValueTooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "value_too_large",
                error.to_string(),
            ),
            CacheError::Unavailable(_) => {
                tracing::warn!(%error, "cache write refused");
                // The Redis breaker probes about once a second.
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cache_unavailable",
                    error.to_string(),
                )
                .retry_after(1)
            }
            CacheError::Store(_) | CacheError::Closed => {
                tracing::error!(%error, "cache unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cache_unavailable",
                    "the cache's storage is unavailable",
                )
            }
        }
    }
}

impl From<crate::cache::loader::LoadError> for ApiError {
    fn from(error: crate::cache::loader::LoadError) -> Self {
        use crate::cache::loader::LoadError;
        let (status, code) = match &error {
            LoadError::UnknownNamespace(_) => (StatusCode::NOT_FOUND, "unknown_namespace"),
            LoadError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            LoadError::Failed(_) => (StatusCode::BAD_GATEWAY, "loader_failed"),
            LoadError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "loader_timeout"),
            LoadError::TooLarge => (StatusCode::BAD_GATEWAY, "loader_too_large"),
        };
        ApiError::new(status, code, error.to_string())
    }
}

impl From<crate::queue::QueueError> for ApiError {
    fn from(error: crate::queue::QueueError) -> Self {
        use crate::queue::QueueError;
        match &error {
            QueueError::Invalid { code, .. } => ApiError::bad_request(code, error.to_string()),
            QueueError::PayloadTooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                error.to_string(),
            ),
            QueueError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "job_not_found", error.to_string())
            }
            QueueError::ScheduleNotFound(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                "schedule_not_found",
                error.to_string(),
            ),
            QueueError::LeaseLost { .. } => {
                ApiError::new(StatusCode::CONFLICT, "lease_lost", error.to_string())
            }
            QueueError::Unavailable(_) => {
                tracing::warn!(%error, "queue storage unreachable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "queue_unavailable",
                    "the queue's storage cannot be reached; try again",
                )
                .retry_after(1)
            }
            QueueError::Storage(_) | QueueError::Closed => {
                tracing::error!(%error, "queue unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "queue_unavailable",
                    "the queue's storage is unavailable",
                )
            }
        }
    }
}

impl From<crate::sql::SqlError> for ApiError {
    fn from(error: crate::sql::SqlError) -> Self {
        use crate::sql::SqlError;
        let detail = error.to_string();
        match error {
            SqlError::BadParams(_) => ApiError::bad_request("bad_params", detail),
            SqlError::NotReadOnly => ApiError::bad_request("not_read_only", detail),
            SqlError::NotAllowed(_) => ApiError::new(StatusCode::FORBIDDEN, "not_allowed", detail),
            SqlError::MultipleStatements => ApiError::bad_request("multiple_statements", detail),
            SqlError::Timeout(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "statement_timeout",
                detail,
            ),
            SqlError::TooManyRows(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_many_rows", detail)
            }
            SqlError::ResultTooLarge(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "result_too_large", detail)
            }
            SqlError::Sqlite { code, name, .. } => {
                let (status, stable) = match code & 0xff {
                    19 => (StatusCode::CONFLICT, "constraint_violation"),
                    5 | 6 => (StatusCode::SERVICE_UNAVAILABLE, "database_busy"),
                    20 | 25 => (StatusCode::BAD_REQUEST, "sql_error"),
                    1 => (StatusCode::BAD_REQUEST, "sql_error"),
                    8 => (StatusCode::FORBIDDEN, "read_only"),
                    _ => (StatusCode::INTERNAL_SERVER_ERROR, "sqlite_error"),
                };
                ApiError::new(status, stable, detail)
                    .with("sqlite_code", code)
                    .with("sqlite_error", name)
            }
            SqlError::WritesDisabled => {
                ApiError::new(StatusCode::FORBIDDEN, "writes_disabled", detail)
            }
            SqlError::UnknownQuery(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_query", detail)
            }
            SqlError::Batch {
                index,
                committed,
                source,
            } => {
                let mut inner = ApiError::from(*source);
                inner.detail = detail;
                inner.with("index", index).with("committed", committed)
            }
            SqlError::Postgres { ref sqlstate, .. } => {
                let (status, stable) = match sqlstate.get(..2).unwrap_or("") {
                    "23" => (StatusCode::CONFLICT, "constraint_violation"),
                    "40" | "55" => (StatusCode::SERVICE_UNAVAILABLE, "database_busy"),
                    "42" if sqlstate == "42501" => (StatusCode::FORBIDDEN, "not_allowed"),
                    "22" | "42" | "0A" | "2B" | "P0" => (StatusCode::BAD_REQUEST, "sql_error"),
                    "25" => (StatusCode::FORBIDDEN, "read_only"),
                    _ => (StatusCode::INTERNAL_SERVER_ERROR, "postgres_error"),
                };
                let sqlstate = sqlstate.clone();
                ApiError::new(status, stable, detail).with("sqlstate", sqlstate)
            }
            // PostgreSQL unreachable: the same request may work in a moment.
            SqlError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "sql_unavailable", detail)
                    .retry_after(1)
            }
            SqlError::Closed => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "sql_unavailable", detail)
            }
            SqlError::Internal(_) => ApiError::internal(detail),
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(error: crate::auth::AuthError) -> Self {
        use crate::auth::{AuthError, Forbidden, Role};
        let detail = error.to_string();
        match error {
            AuthError::Missing | AuthError::SessionEnded => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", detail)
            }
            AuthError::Invalid => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", detail)
            }
            AuthError::Csrf => ApiError::new(StatusCode::FORBIDDEN, "csrf_failed", detail),
            AuthError::Forbidden(forbidden) => {
                let problem = ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail);
                match forbidden {
                    Forbidden::Role(role) => problem.with("required_role", role.as_str()),
                    Forbidden::Scope(scope) => problem.with("required_scope", scope.as_str()),
                    Forbidden::ReadOnly => problem.with("required_role", Role::Operator.as_str()),
                }
            }
            AuthError::TooManyFailures(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_failures", detail)
            }
            AuthError::RateLimited(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", detail)
            }
            AuthError::Disabled => ApiError::new(StatusCode::CONFLICT, "auth_disabled", detail),
        }
    }
}

impl From<crate::auth::TokenStoreError> for ApiError {
    fn from(error: crate::auth::TokenStoreError) -> Self {
        use crate::auth::TokenStoreError;
        match &error {
            TokenStoreError::BadName(_) => {
                ApiError::bad_request("bad_token_name", error.to_string())
            }
            TokenStoreError::NameTaken(_) => {
                ApiError::new(StatusCode::CONFLICT, "token_exists", error.to_string())
            }
            TokenStoreError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "token_not_found", error.to_string())
            }
            TokenStoreError::Io { .. }
            | TokenStoreError::Corrupt { .. }
            | TokenStoreError::BadKey { .. } => ApiError::internal(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueError;

    #[test]
    fn an_unreachable_queue_store_is_503_with_retry_after() {
        let response = ApiError::from(QueueError::Unavailable("connection refused".to_owned()))
            .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        // A storage failure is 503 too, but not a "try again in a second".
        let response = ApiError::from(QueueError::Storage("disk".to_owned())).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }
}
