//! One proxied request: refuse what must not be forwarded (ambiguous framing, oversize
//! URIs and bodies), pick a route and a server, rewrite the headers a proxy owns, send
//! with retries where they are safe, and pass the response back streaming.
//!
//! Retries: a connection that could not be established never reached the server, so
//! the request goes to another one; other failures are retried only for idempotent
//! methods without a body, within a retry budget (a fifth of recent requests), so a
//! sick pool is not hammered twice as hard.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::connections::{PooledBody, SendError};
use super::metrics::RouteMetrics;
use super::route::Route;
use super::{Gateway, Table};
use crate::listener::{AmbiguousFraming, ConnectionTls};
use crate::ratelimit::{Decision, Key, Limiter};

/// Longest request target forwarded (414 beyond), as NGINX's default large buffer.
const MAX_URI_BYTES: usize = 8 * 1024;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const VIA_VALUE: &str = "1.1 keel";

/// An answer the gateway gives itself, as problem+json; framing errors also close the
/// connection, since what follows on it cannot be trusted.
pub(super) fn refuse(
    status: StatusCode,
    code: &'static str,
    detail: impl Into<String>,
    close: bool,
) -> Response {
    let mut response = crate::http::ApiError::new(status, code, detail).into_response();
    if close {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Request smuggling guards: both framings at once, repeated or malformed lengths, and
/// transfer codings other than a final `chunked`.
fn framing_problem(headers: &HeaderMap) -> Option<&'static str> {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    let first_length = lengths.next();
    if first_length.is_some() && codings.peek().is_some() {
        return Some("both Content-Length and Transfer-Encoding");
    }
    if lengths.next().is_some() {
        return Some("more than one Content-Length");
    }
    if let Some(length) = first_length
        && (length.is_empty() || !length.as_bytes().iter().all(u8::is_ascii_digit))
    {
        return Some("a malformed Content-Length");
    }
    let mut seen = 0;
    for value in codings {
        for coding in value.to_str().unwrap_or("\u{0}").split(',') {
            seen += 1;
            if seen > 1 || !coding.trim().eq_ignore_ascii_case("chunked") {
                return Some("a transfer coding other than chunked");
            }
        }
    }
    None
}

/// Removes hop-by-hop headers, including those the Connection header names.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.contains_key(header::CONNECTION) {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

fn is_trusted(table: &Table, address: IpAddr) -> bool {
    table
        .trusted_proxies
        .iter()
        .any(|network| network.contains(&address))
}

/// The client's address: the peer, unless the peer is a trusted proxy, then the
/// rightmost address in X-Forwarded-For that is not a trusted proxy.
/// Removes keel's own dashboard session from `Cookie` headers, so an upstream app never
/// sees (and can never replay) an operator's session.
fn strip_session_cookie(headers: &mut HeaderMap) {
    let name = crate::auth::SESSION_COOKIE.as_bytes();
    let carries_session = headers.get_all(header::COOKIE).iter().any(|value| {
        value
            .as_bytes()
            .windows(name.len() + 1)
            .any(|w| w.starts_with(name) && w[name.len()] == b'=')
    });
    if !carries_session {
        return;
    }
    let prefix = format!("{}=", crate::auth::SESSION_COOKIE);
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && !pair.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if let Ok(value) = HeaderValue::from_str(&kept.join("; "))
        && !kept.is_empty()
    {
        headers.insert(header::COOKIE, value);
    }
}

pub(super) fn client_address(table: &Table, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    if !is_trusted(table, peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|entry| entry.trim().parse().ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .find(|address| !is_trusted(table, *address))
        .unwrap_or(peer)
}

fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(&X_REQUEST_ID)
        .filter(|value| !value.is_empty() && value.len() <= 200)
        .cloned()
        .unwrap_or_else(|| {
            let id = format!(
                "{:016x}{:016x}",
                crate::queue::random_u64(),
                crate::queue::random_u64()
            );
            HeaderValue::from_str(&id).expect("hex is a valid header value")
        })
}

/// The host the client asked for, lowercased, without a port.
fn request_host(request: &Request) -> String {
    let raw = match request.uri().host() {
        Some(host) => host.to_owned(),
        None => request
            .headers()
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    };
    let without_port = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        match raw.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => raw.as_str(),
        }
    };
    without_port.to_ascii_lowercase()
}

pub(super) async fn handle(gateway: Gateway, request: Request) -> Response {
    let started = Instant::now();
    let table = gateway.table();
    let mut limited = None;
    let (route_metrics, mut response) = proxy(&gateway, &table, request, &mut limited).await;
    let status = response.status();
    if let Some(Limited {
        limiter,
        key,
        decision,
        failures_only,
    }) = limited
    {
        // Login routes count only what failed; the headers tell the client where it stands.
        let decision = if failures_only && status.as_u16() >= 400 {
            limiter.record_failure(key)
        } else {
            decision
        };
        limiter.write_headers(&decision, response.headers_mut());
    }
    route_metrics.class(status.as_u16()).inc();
    route_metrics
        .seconds
        .observe(started.elapsed().as_secs_f64());
    let counter = route_metrics.bytes_out.clone();
    response.map(|body| Body::new(counted(body, counter)))
}

/// A body that adds the size of every data frame passing through to `counter`, and
/// keeps the inner body's size hint (a known length stays a Content-Length).
fn counted(body: Body, counter: prometheus::IntCounter) -> Counted {
    Counted {
        inner: body,
        counter,
    }
}

pub(super) struct Counted {
    inner: Body,
    counter: prometheus::IntCounter,
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counter.inc_by(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request a rate limit let through, and what its response must report.
struct Limited {
    limiter: Arc<Limiter>,
    key: Key,
    decision: Decision,
    failures_only: bool,
}

async fn proxy(
    gateway: &Gateway,
    table: &Arc<Table>,
    request: Request,
    limited: &mut Option<Limited>,
) -> (Arc<RouteMetrics>, Response) {
    let metrics = &gateway.inner.metrics;
    let unrouted = || gateway.inner.unmatched.clone();
    let ambiguous = request
        .extensions()
        .get::<AmbiguousFraming>()
        .is_some_and(|flag| flag.0)
        .then_some("both Content-Length and Transfer-Encoding");
    if let Some(problem) = ambiguous.or_else(|| framing_problem(request.headers())) {
        metrics.rejected.with_label_values(&["framing"]).inc();
        return (
            unrouted(),
            refuse(
                StatusCode::BAD_REQUEST,
                "bad_framing",
                format!("refused: {problem}"),
                true,
            ),
        );
    }
    let target_length = request
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len());
    if target_length > MAX_URI_BYTES {
        metrics.rejected.with_label_values(&["uri_too_long"]).inc();
        return (
            unrouted(),
            refuse(
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                format!("the request target is longer than {MAX_URI_BYTES} bytes"),
                false,
            ),
        );
    }
    let host = request_host(&request);
    let path = request.uri().path();
    let Some(route) = table.routes.find(&host, path) else {
        metrics.rejected.with_label_values(&["no_route"]).inc();
        return (
            unrouted(),
            refuse(
                StatusCode::NOT_FOUND,
                "no_route",
                format!("no gateway route for {host}{path}"),
                false,
            ),
        );
    };
    let route_name = route.metrics.clone();
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > route.max_body_bytes) {
        metrics
            .rejected
            .with_label_values(&["body_too_large"])
            .inc();
        return (
            route_name,
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is larger than {} bytes", route.max_body_bytes),
                true,
            ),
        );
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([127, 0, 0, 1]), |info| info.0.ip());
    let tls = request
        .extensions()
        .get::<ConnectionTls>()
        .is_some_and(|tls| tls.0);
    let client = client_address(table, peer, request.headers());
    if let Some(limiter) = &route.limiter {
        let key = limiter.key_for(client, request.headers(), &route.name);
        let failures_only = route
            .config
            .rate_limit
            .as_ref()
            .is_some_and(|limit| limit.count == crate::config::RateLimitCount::Failures);
        // Login mode counts on this node only: its peek/record pair is not one atomic
        // step that a shared script could take.
        let decision = if failures_only {
            limiter.peek(key)
        } else {
            limiter.check_shared(key).await
        };
        if !decision.is_allowed() {
            metrics.rejected.with_label_values(&["rate_limited"]).inc();
            let mut response = refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests; see Retry-After",
                false,
            );
            limiter.write_headers(&decision, response.headers_mut());
            return (route_name, response);
        }
        *limited = Some(Limited {
            limiter: limiter.clone(),
            key,
            decision,
            failures_only,
        });
    }

    let (mut parts, body) = request.into_parts();
    // A body-less request can be sent again as it is; one with a body cannot.
    let empty_body =
        declared_length.unwrap_or(0) == 0 && !parts.headers.contains_key(header::TRANSFER_ENCODING);
    let accept_encoding = if route.config.compress {
        parts.headers.get(header::ACCEPT_ENCODING).cloned()
    } else {
        None
    };
    // The response cache reads the client's own headers (Vary, validators); a
    // pass-through route forwards them without keeping a copy.
    let mut headers = if route.cache.is_some() {
        parts.headers.clone()
    } else {
        std::mem::take(&mut parts.headers)
    };
    strip_hop_by_hop(&mut headers);
    strip_session_cookie(&mut headers);
    let trusted_peer = is_trusted(table, peer);
    // From an untrusted peer the forwarded headers are replaced, not extended: an
    // upstream that trusts the leftmost address cannot be fooled (Caddy, Traefik).
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(previous) if trusted_peer => format!("{previous}, {peer}"),
        _ => peer.to_string(),
    };
    headers.insert(
        X_FORWARDED_FOR,
        HeaderValue::from_str(&forwarded_for).expect("addresses are valid header text"),
    );
    if !trusted_peer || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        );
    }
    if (!trusted_peer || !headers.contains_key(&X_FORWARDED_HOST))
        && let Ok(value) = HeaderValue::from_str(&host)
    {
        headers.insert(X_FORWARDED_HOST, value);
    }
    // HTTP/2 clients name the host in the URI, not in a Host header; the upstream
    // speaks HTTP/1.1 and needs one.
    if !headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, value);
    }
    let id = request_id(&headers);
    headers.insert(X_REQUEST_ID, id.clone());
    append_via(&mut headers);

    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |target| target.as_str());
    let upstream_target = route.upstream_path(path_and_query);
    let outgoing = Outgoing {
        method: parts.method.clone(),
        headers,
        target: upstream_target,
        body: (!empty_body).then(|| {
            let counter = route.metrics.bytes_in.clone();
            Body::new(http_body_util::Limited::new(
                counted(body, counter),
                route.max_body_bytes as usize,
            ))
        }),
    };
    if let Some(cache) = &route.cache {
        let scheme = if tls { "https" } else { "http" };
        let response = cache
            .serve(gateway, table, route, &parts, scheme, &host, outgoing, &id)
            .await;
        return (route_name, response);
    }
    let response = match send_upstream(gateway, route, outgoing).await {
        Ok(response) => downstream(response, &id),
        Err(refusal) => refusal,
    };
    (
        route_name,
        super::compress_for(route, accept_encoding.as_ref(), response),
    )
}

/// An upstream's answer; its body holds the connection until it has been read.
pub(super) type UpstreamResponse = hyper::Response<PooledBody>;

/// A request on its way to an upstream server.
pub(super) struct Outgoing {
    pub method: Method,
    pub headers: HeaderMap,
    /// Path and query as the upstream sees them.
    pub target: String,
    /// `None`: no body, so the request can be sent again as it is.
    pub body: Option<Body>,
}

/// Sends to a server of the route's pool, with the retries that are safe: to another
/// server when the connection could not be made, or for idempotent requests without a
/// body. `Err` is the gateway's own answer (502, 503, 504, 413).
pub(super) async fn send_upstream(
    gateway: &Gateway,
    route: &Route,
    mut outgoing: Outgoing,
) -> Result<UpstreamResponse, Response> {
    let metrics = &gateway.inner.metrics;
    let idempotent = matches!(
        outgoing.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    let empty_body = outgoing.body.is_none();
    let limit = route.max_body_bytes;
    let pool = &route.pool;
    pool.earn_retry();
    let mut tried: Vec<usize> = Vec::new();
    loop {
        let Some((index, lease)) = pool.pick(&tried) else {
            metrics.rejected.with_label_values(&["no_upstream"]).inc();
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_upstream",
                format!("no healthy server in upstream {}", pool.name),
                false,
            ));
        };
        tried.push(index);
        let server = lease.server;
        let mut builder = hyper::Request::builder()
            .method(outgoing.method.clone())
            .uri(outgoing.target.as_str())
            .version(hyper::Version::HTTP_11);
        if let Some(request_headers) = builder.headers_mut() {
            // Kept for another attempt only when one can follow.
            let last_attempt = !empty_body || tried.len() >= pool.servers.len();
            *request_headers = if last_attempt {
                std::mem::take(&mut outgoing.headers)
            } else {
                outgoing.headers.clone()
            };
            if !request_headers.contains_key(header::HOST)
                && let Ok(host) = HeaderValue::from_str(&server.address)
            {
                request_headers.insert(header::HOST, host);
            }
        }
        let body = outgoing.body.take().unwrap_or_else(Body::empty);
        let request = builder.body(body).map_err(|error| {
            refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                error.to_string(),
                false,
            )
        })?;
        let upstream_name = pool.name.as_str();
        let sent =
            tokio::time::timeout(pool.response_timeout, server.connections.send(request)).await;
        match sent {
            Ok(Ok(response)) => {
                let server_fault = matches!(response.status().as_u16(), 502..=504);
                if server_fault {
                    server.outcomes.failed.inc();
                    lease.failed();
                } else {
                    server.outcomes.ok.inc();
                    lease.succeeded();
                }
                return Ok(response);
            }
            Ok(Err(error)) => {
                lease.failed();
                let connect = error.is_connect();
                server.outcomes.failed.inc();
                if body_over_limit(&error) {
                    return Err(refuse(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("the body is larger than {limit} bytes"),
                        true,
                    ));
                }
                tracing::debug!(%error, server = server.address, connect, "upstream request failed");
                // A failed connect never reached the server: always worth another. Any
                // other failure may have; only idempotent, body-less requests are sent
                // again, and only within the pool's retry budget.
                let retry = empty_body && (connect || (idempotent && pool.spend_retry()));
                if retry && tried.len() < pool.servers.len() {
                    continue;
                }
                return Err(refuse(
                    StatusCode::BAD_GATEWAY,
                    "upstream_failed",
                    format!("upstream {upstream_name} did not answer properly"),
                    false,
                ));
            }
            Err(_) => {
                lease.failed();
                server.outcomes.timeout.inc();
                if idempotent
                    && empty_body
                    && tried.len() < pool.servers.len()
                    && pool.spend_retry()
                {
                    continue;
                }
                return Err(refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "upstream {upstream_name} did not answer within {:?}",
                        pool.response_timeout
                    ),
                    false,
                ));
            }
        }
    }
}

fn body_over_limit(error: &SendError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = cause.source();
    }
    false
}

pub(super) fn append_via(headers: &mut HeaderMap) {
    let Some(previous) = headers.get(header::VIA).and_then(|v| v.to_str().ok()) else {
        headers.insert(header::VIA, HeaderValue::from_static(VIA_VALUE));
        return;
    };
    if let Ok(value) = HeaderValue::from_str(&format!("{previous}, {VIA_VALUE}")) {
        headers.insert(header::VIA, value);
    }
}

/// The upstream's response as the client gets it: hop-by-hop headers dropped, Via and
/// the request id added, the body streamed.
pub(super) fn downstream(response: UpstreamResponse, id: &HeaderValue) -> Response {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    append_via(&mut parts.headers);
    parts.headers.insert(X_REQUEST_ID, id.clone());
    Response::from_parts(parts, Body::new(body.map_err(axum::Error::new)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        assert!(framing_problem(&headers(&[("content-length", "5")])).is_none());
        assert!(framing_problem(&headers(&[("transfer-encoding", "chunked")])).is_none());
        assert!(
            framing_problem(&headers(&[
                ("content-length", "5"),
                ("transfer-encoding", "chunked")
            ]))
            .is_some()
        );
        assert!(
            framing_problem(&headers(&[
                ("content-length", "5"),
                ("content-length", "5")
            ]))
            .is_some()
        );
        assert!(framing_problem(&headers(&[("content-length", "+5")])).is_some());
        assert!(framing_problem(&headers(&[("transfer-encoding", "gzip, chunked")])).is_some());
        assert!(framing_problem(&headers(&[("transfer-encoding", "identity")])).is_some());
    }

    #[test]
    fn the_dashboard_session_cookie_never_reaches_an_upstream() {
        let mut map = headers(&[("cookie", "a=1; keel_session=secret; b=2")]);
        strip_session_cookie(&mut map);
        assert_eq!(map.get("cookie").unwrap(), "a=1; b=2");
        let mut map = headers(&[("cookie", "keel_session=secret")]);
        strip_session_cookie(&mut map);
        assert!(map.get("cookie").is_none());
        let mut map = headers(&[("cookie", "keel_sessionx=1")]);
        strip_session_cookie(&mut map);
        assert_eq!(map.get("cookie").unwrap(), "keel_sessionx=1");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut map = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut map);
        assert_eq!(map.len(), 1);
        assert!(map.contains_key("x-kept"));
    }
}
