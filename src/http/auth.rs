//! Authentication on the api: the middleware every route passes (bearer token or
//! session cookie, route authorization, CSRF, rate limits) and the `/v1/auth/...`
//! routes (login, session, logout, token management for admins).
//!
//! Responses never carry a token except the one answer that creates it; login does
//! not echo the token it was given.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, ApiState, json_body};
use crate::auth::{
    AuthError, Authenticated, Authenticator, Presented, Principal, Role, SESSION_COOKIE, Scope,
};
use crate::listener::ConnectionTls;

const CSRF_HEADER: &str = "x-csrf-token";

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/auth/login", post(login))
        .route("/v1/auth/logout", post(logout))
        .route("/v1/auth/session", get(session))
        .route("/v1/auth/tokens", get(list_tokens).post(create_token))
        .route("/v1/auth/tokens/{name}", delete(revoke_token))
}

/// Every request passes here: open routes go straight on; the rest need a bearer
/// token or a session cookie, the route's role and scope, a CSRF header for cookie
/// writes, and the token's rate limit. The outcome rides along as an extension.
pub(super) async fn require_auth(
    State(auth): State<Authenticator>,
    mut request: Request,
    next: Next,
) -> Response {
    if !auth.is_enabled() {
        return next.run(request).await;
    }
    let client = client_ip(&request);
    let headers = request.headers();
    let presented = Presented {
        bearer: bearer(headers),
        cookie: session_cookie(headers),
        csrf: headers.get(CSRF_HEADER).map(HeaderValue::as_bytes),
    };
    let method = request.method().as_str();
    let path = request.uri().path();
    match auth.check_request(method, path, client, presented) {
        Ok(Some(authenticated)) => {
            request.extensions_mut().insert(authenticated);
            next.run(request).await
        }
        Ok(None) => next.run(request).await,
        Err(error) => refusal(&auth, error),
    }
}

/// A refusal as problem+json, with the header fields its status calls for.
fn refusal(auth: &Authenticator, error: AuthError) -> Response {
    let mut response = ApiError::from(error).into_response();
    let headers = response.headers_mut();
    if response_status_is_401(&error) {
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"keel\""),
        );
    }
    auth.write_limit_headers(&error, headers);
    response
}

fn response_status_is_401(error: &AuthError) -> bool {
    matches!(
        error,
        AuthError::Missing | AuthError::Invalid | AuthError::SessionEnded
    )
}

/// The peer's address (the api listener never trusts X-Forwarded-For); in-process
/// tests without a socket count as loopback.
fn client_ip(request: &Request) -> IpAddr {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |info| info.0.ip())
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == SESSION_COOKIE && !value.is_empty()).then_some(value)
        })
}

fn session_json(principal: &Principal, csrf: &str) -> serde_json::Value {
    json!({
        "name": principal.name,
        "role": principal.role,
        "scopes": principal.scopes,
        "csrf": csrf,
        "auth_enabled": true,
    })
}

fn disabled_session() -> serde_json::Value {
    json!({
        "name": null,
        "role": "admin",
        "scopes": [],
        "csrf": "",
        "auth_enabled": false,
    })
}

/// No cache may keep an answer that carries a secret.
fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Deserialize)]
struct LoginBody {
    token: String,
}

async fn login(State(state): State<ApiState>, request: Request) -> Result<Response, Response> {
    if !state.auth.is_enabled() {
        return Ok(Json(disabled_session()).into_response());
    }
    let client = client_ip(&request);
    let tls = request
        .extensions()
        .get::<ConnectionTls>()
        .is_some_and(|tls| tls.0);
    let body = axum::body::to_bytes(request.into_body(), 64 * 1024)
        .await
        .map_err(|_| {
            ApiError::bad_request("bad_body", "the body is not a login").into_response()
        })?;
    // The parser's message could quote the body, and the body is a token: say only
    // what shape is wanted.
    let body: LoginBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request("bad_login", r#"the body must be {"token": "..."}"#).into_response()
    })?;
    let (cookie, session, principal) = state
        .auth
        .login(body.token.as_bytes(), client)
        .map_err(|error| refusal(&state.auth, error))?;
    tracing::info!(name = %principal.name, %client, "dashboard login");
    let mut response = no_store(Json(session_json(&principal, &session.csrf)).into_response());
    let cookie = format!(
        "{SESSION_COOKIE}={cookie}; HttpOnly; SameSite=Strict; Path=/{}",
        if tls { "; Secure" } else { "" }
    );
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("base64url is a valid header value"),
    );
    Ok(response)
}

/// Ends the session the cookie names and tells the browser to drop the cookie.
/// Exempt from CSRF: a forged logout could only log a user out, and the cookie's
/// SameSite=Strict keeps other sites from sending it anyway.
async fn logout(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(cookie) = session_cookie(&headers) {
        state.auth.logout(cookie);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("keel_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    response
}

async fn session(
    State(state): State<ApiState>,
    authenticated: Option<axum::Extension<Authenticated>>,
) -> Response {
    if !state.auth.is_enabled() {
        return Json(disabled_session()).into_response();
    }
    match authenticated {
        Some(axum::Extension(authenticated)) => {
            let csrf = authenticated
                .session
                .as_ref()
                .map_or("", |session| session.csrf.as_str());
            no_store(Json(session_json(&authenticated.principal, csrf)).into_response())
        }
        // The middleware lets no unauthenticated request through to here.
        None => refusal(&state.auth, AuthError::Missing),
    }
}

async fn list_tokens(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let auth = state.auth.clone();
    let tokens = tokio::task::spawn_blocking(move || {
        let store = auth.store().ok_or(ApiError::from(AuthError::Disabled))?;
        store.list().map_err(ApiError::from)
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(json!({ "tokens": tokens })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    role: Role,
    #[serde(default)]
    scopes: Vec<Scope>,
    name: Option<String>,
}

async fn create_token(
    State(state): State<ApiState>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body: CreateBody = json_body(body, "bad_token_request")?;
    let auth = state.auth.clone();
    let (info, token) = tokio::task::spawn_blocking(move || {
        let store = auth.store().ok_or(ApiError::from(AuthError::Disabled))?;
        store
            .create(body.role, body.scopes, body.name)
            .map_err(ApiError::from)
    })
    .await
    .map_err(ApiError::internal)??;
    tracing::info!(name = %info.name, role = %info.role, "token created");
    let answer = json!({
        "name": info.name,
        "role": info.role,
        "scopes": info.scopes,
        "created": info.created,
        "token": token,
    });
    Ok(no_store(
        (StatusCode::CREATED, Json(answer)).into_response(),
    ))
}

async fn revoke_token(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let auth = state.auth.clone();
    let revoked = tokio::task::spawn_blocking(move || auth.revoke_token(&name))
        .await
        .map_err(ApiError::internal)??;
    match revoked {
        Some(info) => {
            tracing::info!(name = %info.name, "token revoked");
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(AuthError::Disabled.into()),
    }
}
