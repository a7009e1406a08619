//! RFC 9111 shared-cache rules for the gateway's response cache, as pure functions over
//! header maps and Unix-millisecond times: whether a request may use the cache, the keys
//! an entry lives under, whether and for how long a response may be stored, how a stored
//! entry is revalidated or answers a client's conditional request, and the byte layout
//! an entry is stored in.
//!
//! Not here: the clock (every function takes `now_ms`), the store, coalescing of misses,
//! purging, and the `Age` / `X-Cache` response headers. The proxy core owns those.
//!
//! How the proxy core uses it:
//! - [`request_mode`] first. `Bypass` goes straight to the upstream and stores nothing.
//! - [`primary_key`], then the stored entry's [`Freshness::vary`] through
//!   [`variant_key`], find the entry; [`state`] says whether it may answer as it is.
//! - A stale entry, or a `Revalidate` request, sends [`conditional_headers`] upstream;
//!   a 304 goes through [`refresh_after_304`].
//! - A response from upstream goes through [`storability`]; `Ok` says how long it is
//!   fresh and which tags purge it.
//! - A hit answers 304 instead of the body when [`client_not_modified`] says so.
//!
//! One body per URL: the gateway compresses per client (`gateway::compress`), so an entry
//! holds the identity body and `Vary: Accept-Encoding` does not split the cache. That is
//! only sound if the body really is identity, so [`storability`] refuses responses that
//! carry a `Content-Encoding`: the proxy core asks the upstream for identity on
//! cacheable requests.

use std::time::Duration;

use bytes::Bytes;
use chrono::NaiveDateTime;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};

/// At most this many purge tags per response, each at most [`MAX_TAG_BYTES`]. A response
/// over either bound is not stored: dropping tags would leave an entry that a purge by
/// the dropped tag cannot reach, and serving stale content after a purge is worse than a
/// miss.
pub const MAX_TAGS: usize = 64;
pub const MAX_TAG_BYTES: usize = 256;

/// At most this many `Vary` header names per response. Each one lengthens every variant
/// key; an upstream that varies on more is not cached.
pub const MAX_VARY: usize = 16;

/// The largest delta-seconds value RFC 9111 §1.2.2 asks a cache to handle; larger ones
/// are taken as this.
const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// Statuses stored at all: those RFC 9110 §15.1 calls heuristically cacheable, minus
/// 206 (the cache keeps whole bodies only). Other statuses, even with an explicit
/// `max-age`, always go to the upstream: a cached 302 or 500 is rarely what an operator
/// wants, and stale-if-error covers upstream failures.
const STORABLE_STATUSES: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");
const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");

/// A route's cache settings (the `cache = { ... }` of a gateway route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePolicy {
    /// Freshness for responses that give none (no `s-maxage`, `max-age` or `Expires`).
    pub ttl: Duration,
    /// Stale windows for responses whose `Cache-Control` names none. A response's own
    /// `stale-while-revalidate` / `stale-if-error` wins over these.
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    /// Query parameters that never change the response (`utm_source`, ...): dropped
    /// from the key, so they do not split the cache.
    pub ignore_query: Vec<String>,
    /// Store responses to requests with `Authorization` (the route's upstream does not
    /// personalise by it).
    pub cache_authorized: bool,
    /// Store responses with `Set-Cookie`. The caller strips `Set-Cookie` from what it
    /// stores unless this is set; with it set, every client gets the stored cookie.
    pub cache_set_cookie: bool,
    /// Larger bodies are not stored. [`storability`] checks `Content-Length`; the caller
    /// enforces it while reading a body without one.
    pub max_body_bytes: usize,
}

/// What the cache may do for a request, before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestMode {
    /// Go to the upstream and store nothing. The reason is for logs and metrics.
    Bypass(&'static str),
    /// The client asked for an end-to-end check (`no-cache`, `max-age=0`): a stored
    /// entry may answer only after the upstream validated it; the answer may be stored.
    Revalidate,
    Normal,
}

/// Whether the cache may serve `method` with these request headers.
///
/// Only GET and HEAD use the cache. `Authorization` bypasses unless the route allows
/// it, since the response is likely personal. `Range` bypasses: the cache keeps whole
/// bodies, and a range request leading a coalesced miss would bring back a 206 that
/// none of its followers asked for. `Cache-Control: no-store` bypasses; `no-cache` and
/// `max-age=0` revalidate.
///
/// Request `max-age=N` for N > 0, `max-stale`, `min-fresh`, `only-if-cached` and
/// `Pragma` are not honoured: they would let any client shape what the cache serves
/// to everyone, and RFC 9111 lets a shared cache ignore them.
pub fn request_mode(method: &Method, headers: &HeaderMap, policy: &RoutePolicy) -> RequestMode {
    if method != Method::GET && method != Method::HEAD {
        return RequestMode::Bypass("method");
    }
    if headers.contains_key(header::AUTHORIZATION) && !policy.cache_authorized {
        return RequestMode::Bypass("authorization");
    }
    if headers.contains_key(header::RANGE) {
        return RequestMode::Bypass("range");
    }
    let cache_control = CacheControl::parse(headers);
    if cache_control.no_store {
        return RequestMode::Bypass("no-store");
    }
    if cache_control.no_cache || cache_control.max_age == Some(0) {
        return RequestMode::Revalidate;
    }
    RequestMode::Normal
}

/// The key of everything stored for one URL: `GET https://example.com/path?a=1&b=2`.
///
/// HEAD shares GET's entry (a stored GET answers a HEAD; a HEAD response is never
/// stored, see [`storability`]). The scheme is part of the key because an upstream may
/// answer `http` with a redirect to `https`: sharing the entry would loop. The host is
/// lowercased without the scheme's default port; the path is kept as it came. The query
/// is normalized:
/// - parameters named in the route's `ignore_query` are dropped;
/// - the rest are sorted by name, stably, so repeated parameters keep their order
///   (`a=1&a=2` and `a=2&a=1` differ for most frameworks, so they stay apart);
/// - percent-encoding is made canonical per RFC 3986 §6.2.2: `%41` and `A` match,
///   hex digits are upper case, characters that may not appear raw are encoded (a
///   stray `%` too); an encoded reserved character (`%2B`) stays distinct from the raw
///   one (`+`);
/// - an empty query is no query.
///
/// A purge by URL builds the same key with `Method::GET`.
pub fn primary_key(
    method: &Method,
    scheme: &str,
    host: &str,
    path: &str,
    query: Option<&str>,
    policy: &RoutePolicy,
) -> String {
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    let scheme = scheme.to_ascii_lowercase();
    let mut key =
        String::with_capacity(method.as_str().len() + scheme.len() + host.len() + path.len() + 8);
    key.push_str(method.as_str());
    key.push(' ');
    key.push_str(&scheme);
    key.push_str("://");
    key.push_str(&normalize_host(&scheme, host));
    key.push_str(path);
    if let Some(query) = query.and_then(|query| normalize_query(query, &policy.ignore_query)) {
        key.push('?');
        key.push_str(&query);
    }
    key
}

/// The key of one variant: `primary` plus the request's values of the response's `Vary`
/// headers (a stored entry's [`Freshness::vary`]). With no `Vary` it is `primary`.
///
/// Each value is normalized so equivalent requests share a variant: repeated field
/// lines are joined with commas (RFC 9110 §5.3), list members are trimmed and empty ones
/// dropped. Case is kept (most header values are case-sensitive). An absent header and
/// an empty one are different variants.
///
/// `Accept-Encoding` is skipped even if passed: the gateway stores one identity body and
/// compresses per client, so it never splits the cache (see the module docs).
pub fn variant_key(primary: &str, vary: &[HeaderName], request_headers: &HeaderMap) -> String {
    let mut names: Vec<&HeaderName> = vary
        .iter()
        .filter(|name| **name != header::ACCEPT_ENCODING)
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    let mut key = primary.to_owned();
    for name in names {
        // A newline never appears in a primary key, a header name or a header value.
        key.push('\n');
        key.push_str(name.as_str());
        let mut values = request_headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            continue;
        }
        key.push(':');
        let mut first = true;
        for value in values {
            for member in value.as_bytes().split(|&byte| byte == b',') {
                let member = member.trim_ascii();
                if member.is_empty() {
                    continue;
                }
                if !first {
                    key.push(',');
                }
                first = false;
                push_escaped(&mut key, member);
            }
        }
    }
    key
}

/// What the cache keeps about a stored response besides its bytes. Times are Unix
/// milliseconds; the `*_until` times may lie before `stored_at` when the upstream's
/// `Age` already used up the freshness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freshness {
    pub stored_at: u64,
    /// The upstream's `Age` when stored (non-zero when the upstream is itself a cache);
    /// [`age_seconds`] adds the time since.
    pub initial_age_secs: u64,
    /// Until then the entry answers without asking the upstream.
    pub fresh_until: u64,
    /// Until then a stale entry answers at once while a revalidation runs.
    pub stale_while_revalidate_until: u64,
    /// Until then a stale entry may answer when the upstream fails (5xx or unreachable).
    pub stale_if_error_until: u64,
    /// The upstream sent `must-revalidate`, `proxy-revalidate` or `no-cache`: once stale,
    /// the entry never answers unvalidated; an unreachable upstream means 504. The stale
    /// windows above are then empty.
    pub must_revalidate: bool,
    /// A valid entity tag as received (`"x"` or `W/"x"`).
    pub etag: Option<String>,
    /// `Last-Modified` as received, when it is a valid HTTP-date.
    pub last_modified: Option<String>,
    /// Purge tags from `Cache-Tag` and `Surrogate-Key`, deduplicated, in order.
    pub tags: Vec<String>,
    /// The response's `Vary` names, lowercase, sorted, deduplicated, without
    /// `accept-encoding`.
    pub vary: Vec<HeaderName>,
}

/// Whether, and for how long, a response may be stored. `Err` carries the reason it may
/// not (for logs and metrics).
///
/// Not storable: a response to anything but GET (a HEAD response has no body and would
/// empty GET's entry); a status outside the heuristically cacheable set; request
/// `no-store` or `Authorization` (unless the route allows it); response `no-store`,
/// `private` (also the field-qualified form), `Vary: *`, `Set-Cookie` (unless the route
/// allows it), a `Content-Encoding`, a `Content-Length` over the route's limit, purge
/// tags or `Vary` names over their bounds; and a response that could never be used
/// (no freshness, no stale window and no validator).
///
/// The freshness lifetime is the first of `s-maxage`, `max-age`, `Expires` − `Date`
/// (an invalid `Expires` means already stale; no `Date` means now), and the route's
/// `ttl`. `no-cache` stores with a lifetime of 0, so every use revalidates. An invalid
/// `max-age` or `s-maxage` means 0; a repeated directive counts once, the first time.
/// The upstream's `Age` is taken off the lifetime. The apparent age from `Date` is not:
/// it would only measure the clock skew between the upstream and this host.
///
/// Stale windows come from the response's `stale-while-revalidate` / `stale-if-error`,
/// else from the route. `must-revalidate`, `proxy-revalidate` and `no-cache` forbid
/// both. `s-maxage` implies `proxy-revalidate` (RFC 9111 §5.2.2.10) for the route's
/// windows, but windows the response grants next to it apply: `s-maxage=1,
/// stale-while-revalidate=59` is a common way of asking a CDN for exactly that.
pub fn storability(
    method: &Method,
    status: StatusCode,
    response_headers: &HeaderMap,
    request_headers: &HeaderMap,
    policy: &RoutePolicy,
    now_ms: u64,
) -> Result<Freshness, &'static str> {
    if method != Method::GET {
        return Err("method");
    }
    if !STORABLE_STATUSES.contains(&status.as_u16()) {
        return Err("status");
    }
    if CacheControl::parse(request_headers).no_store {
        return Err("request no-store");
    }
    if request_headers.contains_key(header::AUTHORIZATION) && !policy.cache_authorized {
        return Err("authorization");
    }
    let cache_control = CacheControl::parse(response_headers);
    if cache_control.no_store {
        return Err("no-store");
    }
    if cache_control.private {
        return Err("private");
    }
    if response_headers.contains_key(header::SET_COOKIE) && !policy.cache_set_cookie {
        return Err("set-cookie");
    }
    let encoded = response_headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .any(|coding| {
            let coding = coding.trim_ascii();
            !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity")
        });
    if encoded {
        return Err("content-encoding");
    }
    let too_large = first_str(response_headers, &header::CONTENT_LENGTH)
        .and_then(|length| length.trim().parse::<u64>().ok())
        .is_some_and(|length| length > policy.max_body_bytes as u64);
    if too_large {
        return Err("body too large");
    }
    let vary = vary_names(response_headers)?;
    let tags = purge_tags(response_headers)?;
    let etag = first_str(response_headers, &header::ETAG)
        .map(str::trim)
        .filter(|etag| valid_etag(etag))
        .map(str::to_owned);
    let last_modified = first_str(response_headers, &header::LAST_MODIFIED)
        .map(str::trim)
        .filter(|date| parse_http_date(date).is_some())
        .map(str::to_owned);

    let lifetime_ms = if cache_control.no_cache {
        0
    } else if let Some(seconds) = cache_control.s_maxage.or(cache_control.max_age) {
        seconds * 1000
    } else if let Some(expires) = response_headers.get(header::EXPIRES) {
        let date = first_str(response_headers, &header::DATE)
            .and_then(parse_http_date)
            .unwrap_or(now_ms);
        let expires = expires.to_str().ok().and_then(parse_http_date);
        expires.map_or(0, |expires| expires.saturating_sub(date))
    } else {
        duration_ms(policy.ttl)
    };
    let initial_age_secs = first_str(response_headers, &header::AGE)
        .and_then(delta_seconds)
        .unwrap_or(0);
    let born_at = now_ms.saturating_sub(initial_age_secs * 1000);
    let fresh_until = born_at.saturating_add(lifetime_ms);

    let must_revalidate =
        cache_control.must_revalidate || cache_control.proxy_revalidate || cache_control.no_cache;
    let route_windows = cache_control.s_maxage.is_none();
    let window = |granted: Option<u64>, route: Option<Duration>| -> u64 {
        if must_revalidate {
            return 0;
        }
        match granted {
            Some(seconds) => seconds * 1000,
            None if route_windows => route.map_or(0, duration_ms),
            None => 0,
        }
    };
    let stale_while_revalidate_until = fresh_until.saturating_add(window(
        cache_control.stale_while_revalidate,
        policy.stale_while_revalidate,
    ));
    let stale_if_error_until =
        fresh_until.saturating_add(window(cache_control.stale_if_error, policy.stale_if_error));

    let usable_after_now = fresh_until
        .max(stale_while_revalidate_until)
        .max(stale_if_error_until)
        > now_ms;
    if !usable_after_now && etag.is_none() && last_modified.is_none() {
        return Err("never reusable");
    }
    Ok(Freshness {
        stored_at: now_ms,
        initial_age_secs,
        fresh_until,
        stale_while_revalidate_until,
        stale_if_error_until,
        must_revalidate,
        etag,
        last_modified,
        tags,
        vary,
    })
}

/// Where a stored entry stands at `now_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheState {
    Fresh,
    /// Serve it, and revalidate in the background.
    StaleWhileRevalidate,
    /// Serve it only if the upstream fails; otherwise revalidate first.
    StaleIfError,
    /// Revalidate (it may still have validators) or fetch anew.
    Expired,
}

pub fn state(freshness: &Freshness, now_ms: u64) -> CacheState {
    if now_ms < freshness.fresh_until {
        CacheState::Fresh
    } else if now_ms < freshness.stale_while_revalidate_until {
        CacheState::StaleWhileRevalidate
    } else if now_ms < freshness.stale_if_error_until {
        CacheState::StaleIfError
    } else {
        CacheState::Expired
    }
}

/// The value of the `Age` header for a stored entry: the upstream's age when stored
/// plus the whole seconds since.
pub fn age_seconds(freshness: &Freshness, now_ms: u64) -> u64 {
    freshness
        .initial_age_secs
        .saturating_add(now_ms.saturating_sub(freshness.stored_at) / 1000)
}

/// Headers that make a revalidation conditional: both validators when the entry has
/// both, as RFC 9110 §13.1 asks of caches (a server that understands `If-None-Match`
/// ignores `If-Modified-Since`). The caller drops the client's own conditional headers
/// from a revalidation it makes on the cache's behalf.
pub fn conditional_headers(freshness: &Freshness) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::with_capacity(2);
    if let Some(value) = freshness
        .etag
        .as_deref()
        .and_then(|etag| HeaderValue::from_str(etag).ok())
    {
        headers.push((header::IF_NONE_MATCH, value));
    }
    if let Some(value) = freshness
        .last_modified
        .as_deref()
        .and_then(|date| HeaderValue::from_str(date).ok())
    {
        headers.push((header::IF_MODIFIED_SINCE, value));
    }
    headers
}

/// The result of [`refresh_after_304`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refreshed {
    /// The stored response with the 304's headers merged in and freshness recomputed:
    /// what the client gets.
    pub response: StoredResponse,
    /// `Err(reason)` when the merged headers forbid storing (the 304 said `no-store`,
    /// say): serve `response` this once and drop the entry.
    pub store: Result<(), &'static str>,
}

/// Updates a stored response from the 304 that validated it (RFC 9111 §4.3.4, §3.2):
/// each header the 304 carries replaces the stored one of that name, except
/// `Content-Length`, `Content-Encoding`, `Content-Range` and `Transfer-Encoding` (they
/// describe the body the cache holds, which a 304 does not change), hop-by-hop headers
/// and the ones its `Connection` names, `Age` (the 304's own age counts for freshness,
/// the proxy writes `Age`), and `Set-Cookie` unless the route stores cookies. Freshness
/// is then computed anew from the merged headers, as for a response received now.
pub fn refresh_after_304(
    stored: &StoredResponse,
    not_modified_headers: &HeaderMap,
    policy: &RoutePolicy,
    now_ms: u64,
) -> Refreshed {
    let connection_named: Vec<String> = not_modified_headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .filter_map(|name| std::str::from_utf8(name.trim_ascii()).ok())
        .map(str::to_ascii_lowercase)
        .collect();
    let kept_from_store = |name: &HeaderName| {
        const NOT_UPDATED: [HeaderName; 13] = [
            header::CONTENT_LENGTH,
            header::CONTENT_ENCODING,
            header::CONTENT_RANGE,
            header::TRANSFER_ENCODING,
            header::CONNECTION,
            HeaderName::from_static("keep-alive"),
            HeaderName::from_static("proxy-connection"),
            header::TE,
            header::TRAILER,
            header::UPGRADE,
            header::PROXY_AUTHENTICATE,
            header::PROXY_AUTHORIZATION,
            header::AGE,
        ];
        NOT_UPDATED.contains(name)
            || connection_named.iter().any(|named| named == name.as_str())
            || (*name == header::SET_COOKIE && !policy.cache_set_cookie)
    };

    let mut headers = stored.headers.clone();
    for name in not_modified_headers.keys() {
        if kept_from_store(name) {
            continue;
        }
        headers.retain(|(stored_name, _)| !stored_name.eq_ignore_ascii_case(name.as_str()));
        for value in not_modified_headers.get_all(name) {
            headers.push((name.as_str().to_owned(), value.as_bytes().to_vec()));
        }
    }

    let mut merged = header_map(&headers);
    merged.remove(header::AGE);
    if let Some(age) = not_modified_headers.get(header::AGE) {
        merged.insert(header::AGE, age.clone());
    }
    let recomputed = StatusCode::from_u16(stored.status)
        .map_err(|_| "status")
        .and_then(|status| {
            storability(
                &Method::GET,
                status,
                &merged,
                &HeaderMap::new(),
                policy,
                now_ms,
            )
        });
    let (freshness, store) = match recomputed {
        Ok(freshness) => (freshness, Ok(())),
        Err(reason) => {
            let freshness = Freshness {
                stored_at: now_ms,
                initial_age_secs: 0,
                fresh_until: now_ms,
                stale_while_revalidate_until: now_ms,
                stale_if_error_until: now_ms,
                must_revalidate: true,
                ..stored.freshness.clone()
            };
            (freshness, Err(reason))
        }
    };
    Refreshed {
        response: StoredResponse {
            status: stored.status,
            headers,
            body: stored.body.clone(),
            freshness,
        },
        store,
    }
}

/// Whether a client's conditional GET or HEAD can be answered 304 from a stored entry
/// (RFC 9110 §13.1.2, §13.1.3, §13.2.2). `If-None-Match`, when present, decides alone:
/// `*` matches, otherwise any listed tag that equals the entry's ETag by weak
/// comparison. Without it, `If-Modified-Since` (one valid HTTP-date) matches when the
/// entry's `Last-Modified`, or else the time it was stored (RFC 9111 §4.3.2), is not
/// later.
pub fn client_not_modified(request_headers: &HeaderMap, freshness: &Freshness) -> bool {
    let mut if_none_match = request_headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .peekable();
    if if_none_match.peek().is_some() {
        let stored = freshness.etag.as_deref().map(opaque_tag);
        return if_none_match.any(|value| {
            let value = value.as_bytes().trim_ascii();
            if value == b"*" {
                return true;
            }
            stored.is_some_and(|stored| {
                EntityTags::new(value).any(|tag| opaque_tag_bytes(tag) == stored.as_bytes())
            })
        });
    }
    let mut if_modified_since = request_headers.get_all(header::IF_MODIFIED_SINCE).iter();
    let (Some(value), None) = (if_modified_since.next(), if_modified_since.next()) else {
        return false;
    };
    let Some(since) = value.to_str().ok().and_then(parse_http_date) else {
        return false;
    };
    let modified = freshness
        .last_modified
        .as_deref()
        .and_then(parse_http_date)
        .unwrap_or(freshness.stored_at);
    modified <= since
}

/// A stored response: what the cache keeps under a variant key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    /// End-to-end headers as received; the caller strips hop-by-hop headers and, unless
    /// the route stores cookies, `Set-Cookie` before storing.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The identity body.
    pub body: Bytes,
    pub freshness: Freshness,
}

/// The first byte of [`StoredResponse::encode`]'s layout; bump it on any change.
const LAYOUT_VERSION: u8 = 1;

const FLAG_MUST_REVALIDATE: u8 = 1;
const FLAG_ETAG: u8 = 1 << 1;
const FLAG_LAST_MODIFIED: u8 = 1 << 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the stored response ends early")]
    Truncated,
    #[error("the stored response has layout version {0}; this keel reads {LAYOUT_VERSION}")]
    Version(u8),
    #[error("the stored response has an invalid {0}")]
    Invalid(&'static str),
    #[error("the stored response has {0} bytes after its end")]
    TrailingBytes(usize),
}

impl StoredResponse {
    /// Layout (integers little-endian): version `u8`, status `u16`, stored_at,
    /// initial_age_secs, fresh_until, stale_while_revalidate_until,
    /// stale_if_error_until as `u64`, flags `u8` (must_revalidate, has etag, has
    /// last_modified), then etag and last_modified when flagged, the tags, the vary
    /// names, the headers as name and value, each string `u32` length + bytes and each
    /// list `u32` count first; the body as `u64` length + bytes, and nothing after.
    pub fn encode(&self) -> Vec<u8> {
        let freshness = &self.freshness;
        let strings: usize = freshness
            .tags
            .iter()
            .map(|tag| 4 + tag.len())
            .sum::<usize>()
            + freshness
                .vary
                .iter()
                .map(|name| 4 + name.as_str().len())
                .sum::<usize>()
            + self
                .headers
                .iter()
                .map(|(name, value)| 8 + name.len() + value.len())
                .sum::<usize>()
            + freshness.etag.as_ref().map_or(0, |etag| 4 + etag.len())
            + freshness
                .last_modified
                .as_ref()
                .map_or(0, |date| 4 + date.len());
        let mut out = Vec::with_capacity(64 + strings + self.body.len());
        out.push(LAYOUT_VERSION);
        out.extend_from_slice(&self.status.to_le_bytes());
        for time in [
            freshness.stored_at,
            freshness.initial_age_secs,
            freshness.fresh_until,
            freshness.stale_while_revalidate_until,
            freshness.stale_if_error_until,
        ] {
            out.extend_from_slice(&time.to_le_bytes());
        }
        let mut flags = 0;
        if freshness.must_revalidate {
            flags |= FLAG_MUST_REVALIDATE;
        }
        if freshness.etag.is_some() {
            flags |= FLAG_ETAG;
        }
        if freshness.last_modified.is_some() {
            flags |= FLAG_LAST_MODIFIED;
        }
        out.push(flags);
        if let Some(etag) = &freshness.etag {
            put_bytes(&mut out, etag.as_bytes());
        }
        if let Some(date) = &freshness.last_modified {
            put_bytes(&mut out, date.as_bytes());
        }
        put_count(&mut out, freshness.tags.len());
        for tag in &freshness.tags {
            put_bytes(&mut out, tag.as_bytes());
        }
        put_count(&mut out, freshness.vary.len());
        for name in &freshness.vary {
            put_bytes(&mut out, name.as_str().as_bytes());
        }
        put_count(&mut out, self.headers.len());
        for (name, value) in &self.headers {
            put_bytes(&mut out, name.as_bytes());
            put_bytes(&mut out, value);
        }
        out.extend_from_slice(&(self.body.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Never panics, and never allocates more than the input's size, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<StoredResponse, DecodeError> {
        let mut reader = Reader { rest: bytes };
        let version = reader.u8()?;
        if version != LAYOUT_VERSION {
            return Err(DecodeError::Version(version));
        }
        let status = reader.u16()?;
        let stored_at = reader.u64()?;
        let initial_age_secs = reader.u64()?;
        let fresh_until = reader.u64()?;
        let stale_while_revalidate_until = reader.u64()?;
        let stale_if_error_until = reader.u64()?;
        let flags = reader.u8()?;
        if flags & !(FLAG_MUST_REVALIDATE | FLAG_ETAG | FLAG_LAST_MODIFIED) != 0 {
            return Err(DecodeError::Invalid("flags"));
        }
        let etag = if flags & FLAG_ETAG != 0 {
            Some(reader.string("etag")?)
        } else {
            None
        };
        let last_modified = if flags & FLAG_LAST_MODIFIED != 0 {
            Some(reader.string("last-modified")?)
        } else {
            None
        };
        let count = reader.count()?;
        let mut tags = Vec::with_capacity(count);
        for _ in 0..count {
            tags.push(reader.string("tag")?);
        }
        let count = reader.count()?;
        let mut vary = Vec::with_capacity(count);
        for _ in 0..count {
            let name = HeaderName::from_bytes(reader.bytes()?)
                .map_err(|_| DecodeError::Invalid("vary name"))?;
            vary.push(name);
        }
        let count = reader.count()?;
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            let name = reader.string("header name")?;
            headers.push((name, reader.bytes()?.to_vec()));
        }
        let body_len = reader.u64()?;
        let body = reader.take(usize::try_from(body_len).map_err(|_| DecodeError::Truncated)?)?;
        if !reader.rest.is_empty() {
            return Err(DecodeError::TrailingBytes(reader.rest.len()));
        }
        Ok(StoredResponse {
            status,
            headers,
            body: Bytes::copy_from_slice(body),
            freshness: Freshness {
                stored_at,
                initial_age_secs,
                fresh_until,
                stale_while_revalidate_until,
                stale_if_error_until,
                must_revalidate: flags & FLAG_MUST_REVALIDATE != 0,
                etag,
                last_modified,
                tags,
                vary,
            },
        })
    }
}

fn put_count(out: &mut Vec<u8>, count: usize) {
    // Counts are bounded far below u32 (tags, vary names, headers of one response).
    out.extend_from_slice(&(count as u32).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Strings are header names and values, far below 4 GiB.
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if len > self.rest.len() {
            return Err(DecodeError::Truncated);
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }

    /// A list count, checked against what is left (every item takes at least 4 bytes),
    /// so a corrupt count cannot make the decoder reserve gigabytes.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let count = self.u32()? as usize;
        if count > self.rest.len() / 4 {
            return Err(DecodeError::Truncated);
        }
        Ok(count)
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let bytes = self.bytes()?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Invalid(what))
    }
}

/// The `Cache-Control` directives the gateway acts on, from every field line of the
/// header. A directive given twice counts the first time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct CacheControl {
    pub(super) no_store: bool,
    pub(super) no_cache: bool,
    pub(super) private: bool,
    pub(super) must_revalidate: bool,
    pub(super) proxy_revalidate: bool,
    pub(super) no_transform: bool,
    /// Seconds. An invalid value is 0: stale, rather than guessed at.
    pub(super) max_age: Option<u64>,
    pub(super) s_maxage: Option<u64>,
    /// Seconds. An invalid value is ignored.
    pub(super) stale_while_revalidate: Option<u64>,
    pub(super) stale_if_error: Option<u64>,
}

impl CacheControl {
    pub(super) fn parse(headers: &HeaderMap) -> CacheControl {
        let mut parsed = CacheControl::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let mut rest = value.as_bytes();
            while let Some((name, argument)) = next_directive(&mut rest) {
                parsed.apply(name, argument);
            }
        }
        parsed
    }

    fn apply(&mut self, name: &[u8], argument: Option<&[u8]>) {
        let seconds = || {
            argument
                .and_then(|argument| std::str::from_utf8(argument).ok())
                .and_then(delta_seconds)
        };
        let is = |directive: &str| name.eq_ignore_ascii_case(directive.as_bytes());
        if is("no-store") {
            self.no_store = true;
        } else if is("no-cache") {
            // The field-qualified form (`no-cache="Set-Cookie"`) is treated as the plain
            // one: revalidating every time is always allowed.
            self.no_cache = true;
        } else if is("private") {
            self.private = true;
        } else if is("must-revalidate") {
            self.must_revalidate = true;
        } else if is("proxy-revalidate") {
            self.proxy_revalidate = true;
        } else if is("no-transform") {
            self.no_transform = true;
        } else if is("max-age") {
            self.max_age = self.max_age.or(Some(seconds().unwrap_or(0)));
        } else if is("s-maxage") {
            self.s_maxage = self.s_maxage.or(Some(seconds().unwrap_or(0)));
        } else if is("stale-while-revalidate") {
            self.stale_while_revalidate = self.stale_while_revalidate.or_else(seconds);
        } else if is("stale-if-error") {
            self.stale_if_error = self.stale_if_error.or_else(seconds);
        }
    }
}

/// Splits the next `name[=token|"quoted"]` off a Cache-Control field value. Commas inside
/// a quoted argument do not end it; a quoted argument is returned without its quotes.
fn next_directive<'a>(rest: &mut &'a [u8]) -> Option<(&'a [u8], Option<&'a [u8]>)> {
    loop {
        let trimmed = rest.trim_ascii_start();
        let trimmed = trimmed.strip_prefix(b",").unwrap_or(trimmed);
        if trimmed.len() == rest.len() {
            break;
        }
        *rest = trimmed;
    }
    if rest.is_empty() {
        return None;
    }
    let name_end = rest
        .iter()
        .position(|&byte| byte == b'=' || byte == b',')
        .unwrap_or(rest.len());
    let name = rest[..name_end].trim_ascii();
    *rest = &rest[name_end..];
    let Some(after) = rest.strip_prefix(b"=") else {
        return Some((name, None));
    };
    let after = after.trim_ascii_start();
    if let Some(quoted) = after.strip_prefix(b"\"") {
        let mut at = 0;
        while at < quoted.len() && quoted[at] != b'"' {
            at += if quoted[at] == b'\\' { 2 } else { 1 };
        }
        let end = at.min(quoted.len());
        *rest = quoted.get(end + 1..).unwrap_or_default();
        return Some((name, Some(&quoted[..end])));
    }
    let end = after
        .iter()
        .position(|&byte| byte == b',')
        .unwrap_or(after.len());
    *rest = &after[end..];
    Some((name, Some(after[..end].trim_ascii())))
}

/// RFC 9111 §1.2.2 delta-seconds: digits only; too large means 2^31.
fn delta_seconds(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some(
        text.parse::<u64>()
            .map_or(MAX_DELTA_SECONDS, |seconds| seconds.min(MAX_DELTA_SECONDS)),
    )
}

/// An HTTP-date (RFC 9110 §5.6.7) in any of its three forms, as Unix milliseconds.
/// Dates before 1970 are `None`, which callers treat like an invalid date.
fn parse_http_date(text: &str) -> Option<u64> {
    const FORMATS: [&str; 3] = [
        "%a, %d %b %Y %H:%M:%S GMT",
        "%A, %d-%b-%y %H:%M:%S GMT",
        "%a %b %e %H:%M:%S %Y",
    ];
    let text = text.trim();
    FORMATS
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .and_then(|date| u64::try_from(date.and_utc().timestamp_millis()).ok())
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn first_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn vary_names(headers: &HeaderMap) -> Result<Vec<HeaderName>, &'static str> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        for member in value.as_bytes().split(|&byte| byte == b',') {
            let member = member.trim_ascii();
            if member.is_empty() {
                continue;
            }
            if member == b"*" {
                return Err("vary *");
            }
            let name = HeaderName::from_bytes(member).map_err(|_| "invalid vary")?;
            if name != header::ACCEPT_ENCODING && !names.contains(&name) {
                if names.len() == MAX_VARY {
                    return Err("too many vary names");
                }
                names.push(name);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Ok(names)
}

/// Tags from `Cache-Tag` (comma-separated, as Cloudflare) and `Surrogate-Key`
/// (space-separated, as Fastly); either separator is accepted in both.
fn purge_tags(headers: &HeaderMap) -> Result<Vec<String>, &'static str> {
    let mut tags: Vec<String> = Vec::new();
    let values = headers
        .get_all(CACHE_TAG)
        .iter()
        .chain(headers.get_all(SURROGATE_KEY).iter());
    for value in values {
        let members = value
            .as_bytes()
            .split(|&byte| byte == b',' || byte.is_ascii_whitespace())
            .filter(|tag| !tag.is_empty());
        for tag in members {
            if tag.len() > MAX_TAG_BYTES {
                return Err("cache tag too long");
            }
            let tag = std::str::from_utf8(tag).map_err(|_| "cache tag not utf-8")?;
            if !tags.iter().any(|known| known == tag) {
                if tags.len() == MAX_TAGS {
                    return Err("too many cache tags");
                }
                tags.push(tag.to_owned());
            }
        }
    }
    Ok(tags)
}

/// `"opaque"` or `W/"opaque"` with RFC 9110 §8.8.3 etagc characters (visible ASCII but
/// `"`; obs-text is not kept, it cannot round-trip through `HeaderValue::to_str`).
fn valid_etag(etag: &str) -> bool {
    let quoted = etag.strip_prefix("W/").unwrap_or(etag);
    quoted.len() >= 2
        && quoted.starts_with('"')
        && quoted.ends_with('"')
        && quoted[1..quoted.len() - 1]
            .bytes()
            .all(|byte| byte == b'!' || (b'#'..=b'~').contains(&byte))
}

/// The tag without its weakness marker, for weak comparison.
fn opaque_tag(etag: &str) -> &str {
    etag.strip_prefix("W/").unwrap_or(etag)
}

fn opaque_tag_bytes(etag: &[u8]) -> &[u8] {
    etag.strip_prefix(b"W/").unwrap_or(etag)
}

/// The entity tags of an `If-None-Match` list, with their quotes. Commas inside a tag do
/// not split it; parsing stops at the first malformed member.
struct EntityTags<'a> {
    rest: &'a [u8],
}

impl<'a> EntityTags<'a> {
    fn new(value: &'a [u8]) -> EntityTags<'a> {
        EntityTags { rest: value }
    }
}

impl<'a> Iterator for EntityTags<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let start = self
            .rest
            .iter()
            .position(|&byte| byte != b',' && !byte.is_ascii_whitespace())?;
        let rest = &self.rest[start..];
        let opaque_at = if rest.starts_with(b"W/") { 2 } else { 0 };
        if rest.get(opaque_at) != Some(&b'"') {
            self.rest = &[];
            return None;
        }
        let Some(close) = rest[opaque_at + 1..].iter().position(|&byte| byte == b'"') else {
            self.rest = &[];
            return None;
        };
        let end = opaque_at + 1 + close + 1;
        self.rest = &rest[end..];
        Some(&rest[..end])
    }
}

fn normalize_host(scheme: &str, host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return host,
    };
    if let Some((name, port)) = host.rsplit_once(':') {
        // `[::1]:80` has a port; `::1` (unbracketed, invalid but seen) does not.
        let is_port = !port.is_empty()
            && port.bytes().all(|byte| byte.is_ascii_digit())
            && (!name.contains(':') || name.ends_with(']'));
        if is_port && port.parse::<u32>() == Ok(default_port) {
            return name.to_owned();
        }
    }
    host
}

fn normalize_query(query: &str, ignore: &[String]) -> Option<String> {
    let ignored: Vec<String> = ignore
        .iter()
        .map(|name| canonical_component(name))
        .collect();
    let mut params: Vec<(String, Option<String>)> = query
        .split('&')
        .filter(|param| !param.is_empty())
        .map(|param| match param.split_once('=') {
            Some((name, value)) => (canonical_component(name), Some(canonical_component(value))),
            None => (canonical_component(param), None),
        })
        .filter(|(name, _)| !ignored.contains(name))
        .collect();
    if params.is_empty() {
        return None;
    }
    // Stable: repeated names keep their order.
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::with_capacity(query.len());
    for (index, (name, value)) in params.iter().enumerate() {
        if index > 0 {
            out.push('&');
        }
        out.push_str(name);
        if let Some(value) = value {
            out.push('=');
            out.push_str(value);
        }
    }
    Some(out)
}

/// RFC 3986 §6.2.2 normalization of one query name or value: an escape of an unreserved
/// character is decoded, other escapes get upper-case hex, and characters that may not
/// appear raw in a query are escaped, a `%` that starts no valid escape among them (it
/// can only mean itself). Reserved characters (`+`, `=`, `;`, ...) stay as they are,
/// raw or escaped, since decoding one could change the meaning.
fn canonical_component(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        if byte == b'%'
            && let (Some(high), Some(low)) = (
                bytes.get(at + 1).and_then(|&digit| hex_value(digit)),
                bytes.get(at + 2).and_then(|&digit| hex_value(digit)),
            )
        {
            let decoded = high << 4 | low;
            if is_unreserved(decoded) {
                out.push(decoded as char);
            } else {
                push_percent(&mut out, decoded);
            }
            at += 3;
            continue;
        }
        if is_unreserved(byte) || b"!$&'()*+,;=:@/?".contains(&byte) {
            out.push(byte as char);
        } else {
            push_percent(&mut out, byte);
        }
        at += 1;
    }
    out
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|value| value as u8)
}

fn push_percent(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[usize::from(byte >> 4)] as char);
    out.push(HEX[usize::from(byte & 0xf)] as char);
}

/// Visible ASCII as is (but `%`), anything else escaped, so distinct byte strings stay
/// distinct in a UTF-8 key.
fn push_escaped(out: &mut String, bytes: &[u8]) {
    for &byte in bytes {
        if (byte.is_ascii_graphic() && byte != b'%') || byte == b' ' {
            out.push(byte as char);
        } else {
            push_percent(out, byte);
        }
    }
}

fn header_map(headers: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    const NOW: u64 = 1_700_000_000_000;

    fn policy() -> RoutePolicy {
        RoutePolicy {
            ttl: Duration::from_secs(30),
            stale_while_revalidate: None,
            stale_if_error: None,
            ignore_query: vec!["utm_source".to_owned(), "fbclid".to_owned()],
            cache_authorized: false,
            cache_set_cookie: false,
            max_body_bytes: 1 << 20,
        }
    }

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

    fn http_date(ms: u64) -> String {
        chrono::DateTime::from_timestamp_millis(ms as i64)
            .unwrap()
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string()
    }

    fn store_with(
        policy: &RoutePolicy,
        status: u16,
        response: &[(&str, &str)],
        request: &[(&str, &str)],
    ) -> Result<Freshness, &'static str> {
        storability(
            &Method::GET,
            StatusCode::from_u16(status).unwrap(),
            &headers(response),
            &headers(request),
            policy,
            NOW,
        )
    }

    fn store(response: &[(&str, &str)]) -> Result<Freshness, &'static str> {
        store_with(&policy(), 200, response, &[])
    }

    fn key(host: &str, query: Option<&str>) -> String {
        primary_key(&Method::GET, "https", host, "/p", query, &policy())
    }

    // ---- request side ----

    #[test]
    fn only_get_and_head_use_the_cache() {
        let none = HeaderMap::new();
        assert_eq!(
            request_mode(&Method::GET, &none, &policy()),
            RequestMode::Normal
        );
        assert_eq!(
            request_mode(&Method::HEAD, &none, &policy()),
            RequestMode::Normal
        );
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            assert_eq!(
                request_mode(&method, &none, &policy()),
                RequestMode::Bypass("method")
            );
        }
    }

    #[test]
    fn authorization_bypasses_unless_the_route_allows_it() {
        let request = headers(&[("authorization", "Bearer x")]);
        assert_eq!(
            request_mode(&Method::GET, &request, &policy()),
            RequestMode::Bypass("authorization")
        );
        let allowed = RoutePolicy {
            cache_authorized: true,
            ..policy()
        };
        assert_eq!(
            request_mode(&Method::GET, &request, &allowed),
            RequestMode::Normal
        );
    }

    #[test]
    fn request_cache_control_bypasses_or_revalidates() {
        let mode = |value: &str| {
            request_mode(
                &Method::GET,
                &headers(&[("cache-control", value)]),
                &policy(),
            )
        };
        assert_eq!(mode("no-store"), RequestMode::Bypass("no-store"));
        assert_eq!(mode("No-Store, max-age=0"), RequestMode::Bypass("no-store"));
        assert_eq!(mode("no-cache"), RequestMode::Revalidate);
        assert_eq!(mode("max-age=0"), RequestMode::Revalidate);
        assert_eq!(mode("max-age=10"), RequestMode::Normal);
        assert_eq!(mode("max-stale=100"), RequestMode::Normal);
        let range = headers(&[("range", "bytes=0-10")]);
        assert_eq!(
            request_mode(&Method::GET, &range, &policy()),
            RequestMode::Bypass("range")
        );
    }

    // ---- keys ----

    #[test]
    fn primary_key_layout_and_head_sharing() {
        let get = primary_key(
            &Method::GET,
            "https",
            "Example.COM",
            "/a/B",
            Some("x=1"),
            &policy(),
        );
        assert_eq!(get, "GET https://example.com/a/B?x=1");
        let head = primary_key(
            &Method::HEAD,
            "https",
            "example.com",
            "/a/B",
            Some("x=1"),
            &policy(),
        );
        assert_eq!(head, get);
        let http = primary_key(
            &Method::GET,
            "http",
            "example.com",
            "/a/B",
            Some("x=1"),
            &policy(),
        );
        assert_ne!(
            http, get,
            "a redirect to https must not be served to https clients"
        );
    }

    #[test]
    fn default_ports_are_dropped_others_kept() {
        let key = |scheme: &str, host: &str| {
            primary_key(&Method::GET, scheme, host, "/", None, &policy())
        };
        assert_eq!(key("https", "example.com:443"), key("https", "example.com"));
        assert_eq!(key("http", "EXAMPLE.com:80"), "GET http://example.com/");
        assert_eq!(
            key("https", "example.com:80"),
            "GET https://example.com:80/"
        );
        assert_eq!(
            key("https", "example.com:8443"),
            "GET https://example.com:8443/"
        );
        assert_eq!(key("http", "[::1]:80"), "GET http://[::1]/");
        assert_eq!(key("http", "[::1]:8080"), "GET http://[::1]:8080/");
    }

    #[test]
    fn query_is_sorted_and_ignored_params_dropped() {
        assert_eq!(
            key("example.com", Some("b=2&utm_source=news&a=1&fbclid=x")),
            "GET https://example.com/p?a=1&b=2"
        );
        assert_eq!(
            key("example.com", Some("b=2&a=1")),
            key("example.com", Some("a=1&b=2"))
        );
        // Repeated names keep their order: frameworks differ on which one wins.
        assert_ne!(
            key("example.com", Some("a=1&a=2")),
            key("example.com", Some("a=2&a=1"))
        );
        assert_eq!(
            key("example.com", Some("z=0&a=2&a=1")),
            "GET https://example.com/p?a=2&a=1&z=0"
        );
    }

    #[test]
    fn empty_query_is_no_query() {
        let bare = key("example.com", None);
        assert_eq!(bare, "GET https://example.com/p");
        assert_eq!(key("example.com", Some("")), bare);
        assert_eq!(key("example.com", Some("&&")), bare);
        assert_eq!(key("example.com", Some("utm_source=x")), bare);
        // A bare name and an empty value may mean different things upstream.
        assert_ne!(
            key("example.com", Some("a")),
            key("example.com", Some("a="))
        );
    }

    #[test]
    fn percent_encoding_is_canonical() {
        let same =
            |a: &str, b: &str| assert_eq!(key("h", Some(a)), key("h", Some(b)), "{a} vs {b}");
        same("a=%41", "a=A");
        same("%61=1", "a=1");
        same("a=%7e%2d", "a=~-");
        same("a=%2f", "a=%2F");
        same("q=a b", "q=a%20b");
        same("q=é", "q=%C3%A9");
        same("utm%5Fsource=1&a=1", "a=1");
        // Reserved characters keep their meaning: `+` is a space to form decoders,
        // `%2B` a plus.
        assert_ne!(key("h", Some("q=a+b")), key("h", Some("q=a%2Bb")));
        assert_ne!(key("h", Some("q=a%26b")), key("h", Some("q=a&b")));
        assert_ne!(key("h", Some("q=a%3Db")), key("h", Some("q=a=b")));
        // A `%` that starts no escape means itself.
        assert_eq!(
            key("h", Some("q=%zz&r=%4")),
            "GET https://h/p?q=%25zz&r=%254"
        );
        same("q=%zz", "q=%25zz");
    }

    #[test]
    fn variant_key_normalizes_vary_values() {
        let vary = [HeaderName::from_static("accept-language")];
        let variant = |pairs: &[(&str, &str)]| variant_key("K", &vary, &headers(pairs));
        assert_eq!(
            variant(&[("accept-language", "en, fr")]),
            "K\naccept-language:en,fr"
        );
        assert_eq!(
            variant(&[("accept-language", "en,fr")]),
            variant(&[("accept-language", " en "), ("accept-language", "fr")])
        );
        assert_ne!(
            variant(&[("accept-language", "en")]),
            variant(&[("accept-language", "fr")])
        );
        assert_ne!(
            variant(&[("accept-language", "EN")]),
            variant(&[("accept-language", "en")])
        );
        // Absent and empty are different requests.
        assert_ne!(variant(&[]), variant(&[("accept-language", "")]));
        assert_eq!(
            variant_key("K", &[], &headers(&[("accept-language", "en")])),
            "K"
        );
    }

    #[test]
    fn variant_key_ignores_accept_encoding_and_name_order() {
        let request = headers(&[("accept-encoding", "gzip"), ("cookie", "a=1"), ("x-b", "2")]);
        let plain = headers(&[("cookie", "a=1"), ("x-b", "2")]);
        let names = [
            header::ACCEPT_ENCODING,
            HeaderName::from_static("x-b"),
            header::COOKIE,
        ];
        let reversed = [header::COOKIE, HeaderName::from_static("x-b")];
        assert_eq!(
            variant_key("K", &names, &request),
            variant_key("K", &reversed, &plain)
        );
        assert_eq!(variant_key("K", &[header::ACCEPT_ENCODING], &request), "K");
    }

    // ---- response side ----

    #[test]
    fn s_maxage_beats_max_age_beats_expires_beats_ttl() {
        let expires = http_date(NOW + 500_000);
        let both = store(&[
            ("cache-control", "max-age=10, s-maxage=100"),
            ("expires", &expires),
        ]);
        assert_eq!(both.unwrap().fresh_until, NOW + 100_000);
        let max_age = store(&[("cache-control", "max-age=10"), ("expires", &expires)]);
        assert_eq!(max_age.unwrap().fresh_until, NOW + 10_000);
        let only_expires = store(&[("expires", &expires)]);
        assert_eq!(only_expires.unwrap().fresh_until, NOW + 500_000);
        let route = store(&[("content-type", "text/plain")]);
        assert_eq!(route.unwrap().fresh_until, NOW + 30_000);
    }

    #[test]
    fn expires_counts_from_the_upstream_date() {
        // The upstream's clock is a day behind: Expires − Date is what counts.
        let date = NOW - 86_400_000;
        let fresh = store(&[
            ("date", &http_date(date)),
            ("expires", &http_date(date + 60_000)),
        ]);
        assert_eq!(fresh.unwrap().fresh_until, NOW + 60_000);
        // Expires before Date: already stale.
        let past = store(&[
            ("date", &http_date(date)),
            ("expires", &http_date(date - 1000)),
            ("etag", "\"v\""),
        ]);
        assert_eq!(past.unwrap().fresh_until, NOW);
    }

    #[test]
    fn invalid_expires_is_already_stale() {
        let with_validator = store(&[("expires", "0"), ("etag", "\"v\"")]).unwrap();
        assert_eq!(with_validator.fresh_until, NOW);
        assert_eq!(state(&with_validator, NOW), CacheState::Expired);
        // Without a validator or stale window it could never be used.
        assert_eq!(store(&[("expires", "0")]), Err("never reusable"));
        let mut opaque = HeaderMap::new();
        opaque.insert(header::EXPIRES, HeaderValue::from_bytes(b"\xff").unwrap());
        opaque.insert(header::ETAG, HeaderValue::from_static("\"v\""));
        let freshness = storability(
            &Method::GET,
            StatusCode::OK,
            &opaque,
            &HeaderMap::new(),
            &policy(),
            NOW,
        );
        assert_eq!(freshness.unwrap().fresh_until, NOW);
    }

    #[test]
    fn malformed_and_repeated_directives() {
        let fresh = |cache_control: &str| {
            store(&[("cache-control", cache_control), ("etag", "\"v\"")])
                .unwrap()
                .fresh_until
        };
        assert_eq!(
            fresh("max-age=abc"),
            NOW,
            "an invalid max-age is stale, not the route ttl"
        );
        assert_eq!(fresh("max-age=\"60\""), NOW + 60_000);
        assert_eq!(fresh("max-age=60, max-age=10"), NOW + 60_000);
        assert_eq!(fresh("MAX-AGE=60"), NOW + 60_000);
        assert_eq!(
            fresh("max-age=99999999999999999999"),
            NOW + MAX_DELTA_SECONDS * 1000
        );
        assert_eq!(
            fresh("community=\"UCI, max-age=5\", max-age=7"),
            NOW + 7_000,
            "a comma inside a quoted argument does not end it"
        );
    }

    #[test]
    fn no_cache_stores_but_always_revalidates() {
        let freshness =
            store(&[("cache-control", "no-cache, max-age=60"), ("etag", "\"v\"")]).unwrap();
        assert_eq!(freshness.fresh_until, NOW);
        assert!(freshness.must_revalidate);
        assert_eq!(state(&freshness, NOW), CacheState::Expired);
        assert_eq!(conditional_headers(&freshness).len(), 1);
        let qualified = store(&[
            ("cache-control", "no-cache=\"set-cookie\""),
            ("etag", "\"v\""),
        ]);
        assert_eq!(qualified.unwrap().fresh_until, NOW);
    }

    #[test]
    fn upstream_age_reduces_freshness() {
        let freshness = store(&[("cache-control", "max-age=100"), ("age", "30")]).unwrap();
        assert_eq!(freshness.fresh_until, NOW + 70_000);
        assert_eq!(freshness.initial_age_secs, 30);
        assert_eq!(age_seconds(&freshness, NOW), 30);
        assert_eq!(age_seconds(&freshness, NOW + 5_999), 35);
        // Older than its lifetime, with nothing to make it usable later.
        assert_eq!(
            store(&[("cache-control", "max-age=100"), ("age", "200")]),
            Err("never reusable")
        );
        let invalid_age = store(&[("cache-control", "max-age=100"), ("age", "-3")]).unwrap();
        assert_eq!(invalid_age.fresh_until, NOW + 100_000);
    }

    #[test]
    fn private_no_store_and_set_cookie_are_not_stored() {
        assert_eq!(store(&[("cache-control", "no-store")]), Err("no-store"));
        assert_eq!(
            store(&[("cache-control", "public, max-age=60, no-store")]),
            Err("no-store")
        );
        assert_eq!(store(&[("cache-control", "private")]), Err("private"));
        assert_eq!(
            store(&[("cache-control", "private=\"set-cookie\"")]),
            Err("private")
        );
        assert_eq!(store(&[("set-cookie", "a=1")]), Err("set-cookie"));
        let cookies = RoutePolicy {
            cache_set_cookie: true,
            ..policy()
        };
        assert!(store_with(&cookies, 200, &[("set-cookie", "a=1")], &[]).is_ok());
    }

    #[test]
    fn request_authorization_and_no_store_are_not_stored() {
        let authorized = [("authorization", "Bearer x")];
        assert_eq!(
            store_with(&policy(), 200, &[], &authorized),
            Err("authorization")
        );
        // The product rule: never, even if the response says public.
        let public = [("cache-control", "public, max-age=60")];
        assert_eq!(
            store_with(&policy(), 200, &public, &authorized),
            Err("authorization")
        );
        let allowed = RoutePolicy {
            cache_authorized: true,
            ..policy()
        };
        assert!(store_with(&allowed, 200, &[], &authorized).is_ok());
        let no_store = [("cache-control", "no-store")];
        assert_eq!(
            store_with(&policy(), 200, &[], &no_store),
            Err("request no-store")
        );
    }

    #[test]
    fn only_whole_get_responses_with_cacheable_statuses_are_stored() {
        for status in [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501] {
            assert!(store_with(&policy(), status, &[], &[]).is_ok(), "{status}");
        }
        for status in [201, 206, 302, 304, 307, 400, 403, 500, 502, 503] {
            let explicit = [("cache-control", "max-age=60")];
            assert_eq!(
                store_with(&policy(), status, &explicit, &[]),
                Err("status"),
                "{status}"
            );
        }
        let head = storability(
            &Method::HEAD,
            StatusCode::OK,
            &HeaderMap::new(),
            &HeaderMap::new(),
            &policy(),
            NOW,
        );
        assert_eq!(head, Err("method"));
    }

    #[test]
    fn encoded_and_oversized_bodies_are_not_stored() {
        assert_eq!(
            store(&[("content-encoding", "gzip")]),
            Err("content-encoding")
        );
        assert!(store(&[("content-encoding", "identity")]).is_ok());
        let limit = (1 << 20).to_string();
        let over = (1 << 20 | 1).to_string();
        assert!(store(&[("content-length", &limit)]).is_ok());
        assert_eq!(store(&[("content-length", &over)]), Err("body too large"));
    }

    #[test]
    fn vary_star_is_not_storable_and_names_are_normalized() {
        assert_eq!(store(&[("vary", "*")]), Err("vary *"));
        assert_eq!(store(&[("vary", "accept-language, *")]), Err("vary *"));
        assert_eq!(store(&[("vary", "bad name")]), Err("invalid vary"));
        let freshness = store(&[
            ("vary", "Accept-Encoding, X-B"),
            ("vary", "accept-language,x-b"),
        ])
        .unwrap();
        assert_eq!(
            freshness.vary,
            [
                HeaderName::from_static("accept-language"),
                HeaderName::from_static("x-b")
            ]
        );
        let many: Vec<String> = (0..=MAX_VARY).map(|index| format!("x-{index}")).collect();
        assert_eq!(
            store(&[("vary", &many.join(","))]),
            Err("too many vary names")
        );
    }

    #[test]
    fn stale_windows_from_the_response_win_over_the_route() {
        let route = RoutePolicy {
            stale_while_revalidate: Some(Duration::from_secs(5)),
            stale_if_error: Some(Duration::from_secs(50)),
            ..policy()
        };
        let from_route = store_with(&route, 200, &[("cache-control", "max-age=10")], &[]).unwrap();
        assert_eq!(from_route.stale_while_revalidate_until, NOW + 15_000);
        assert_eq!(from_route.stale_if_error_until, NOW + 60_000);
        let granted = [(
            "cache-control",
            "max-age=10, stale-while-revalidate=20, stale-if-error=0",
        )];
        let from_response = store_with(&route, 200, &granted, &[]).unwrap();
        assert_eq!(from_response.stale_while_revalidate_until, NOW + 30_000);
        assert_eq!(from_response.stale_if_error_until, NOW + 10_000);
        let forbidden = [(
            "cache-control",
            "max-age=10, must-revalidate, stale-if-error=60",
        )];
        let must = store_with(&route, 200, &forbidden, &[]).unwrap();
        assert!(must.must_revalidate);
        assert_eq!(must.stale_while_revalidate_until, NOW + 10_000);
        assert_eq!(must.stale_if_error_until, NOW + 10_000);
    }

    #[test]
    fn s_maxage_drops_route_windows_but_keeps_granted_ones() {
        let route = RoutePolicy {
            stale_while_revalidate: Some(Duration::from_secs(5)),
            ..policy()
        };
        let implied = store_with(&route, 200, &[("cache-control", "s-maxage=10")], &[]).unwrap();
        assert_eq!(implied.stale_while_revalidate_until, NOW + 10_000);
        assert!(!implied.must_revalidate);
        let vercel = [("cache-control", "s-maxage=1, stale-while-revalidate=59")];
        let granted = store_with(&route, 200, &vercel, &[]).unwrap();
        assert_eq!(granted.stale_while_revalidate_until, NOW + 60_000);
    }

    #[test]
    fn states_follow_the_windows() {
        let route = RoutePolicy {
            stale_while_revalidate: Some(Duration::from_secs(10)),
            stale_if_error: Some(Duration::from_secs(100)),
            ..policy()
        };
        let freshness = store_with(&route, 200, &[("cache-control", "max-age=10")], &[]).unwrap();
        assert_eq!(state(&freshness, NOW), CacheState::Fresh);
        assert_eq!(state(&freshness, NOW + 9_999), CacheState::Fresh);
        assert_eq!(
            state(&freshness, NOW + 10_000),
            CacheState::StaleWhileRevalidate
        );
        assert_eq!(
            state(&freshness, NOW + 19_999),
            CacheState::StaleWhileRevalidate
        );
        assert_eq!(state(&freshness, NOW + 20_000), CacheState::StaleIfError);
        assert_eq!(state(&freshness, NOW + 109_999), CacheState::StaleIfError);
        assert_eq!(state(&freshness, NOW + 110_000), CacheState::Expired);
        // Stale on arrival (Age past max-age) but inside the window.
        let aged = [("cache-control", "max-age=10"), ("age", "12")];
        let arrived_stale = store_with(&route, 200, &aged, &[]).unwrap();
        assert_eq!(state(&arrived_stale, NOW), CacheState::StaleWhileRevalidate);
    }

    #[test]
    fn purge_tags_are_collected_and_bounded() {
        let freshness = store(&[
            ("cache-tag", "post-1, posts,user-7"),
            ("surrogate-key", "posts  feed\tpost-1"),
        ])
        .unwrap();
        assert_eq!(freshness.tags, ["post-1", "posts", "user-7", "feed"]);

        let sixty_four: Vec<String> = (0..MAX_TAGS).map(|index| format!("t{index}")).collect();
        let stored = store(&[("cache-tag", &sixty_four.join(","))]).unwrap();
        assert_eq!(stored.tags.len(), MAX_TAGS);
        let with_repeats = format!("{},t0,t1", sixty_four.join(","));
        assert!(store(&[("cache-tag", &with_repeats)]).is_ok());
        let too_many = format!("{},t64", sixty_four.join(","));
        assert_eq!(
            store(&[("cache-tag", &too_many)]),
            Err("too many cache tags")
        );

        let longest = "x".repeat(MAX_TAG_BYTES);
        assert_eq!(
            store(&[("surrogate-key", &longest)]).unwrap().tags,
            [longest]
        );
        let too_long = "x".repeat(MAX_TAG_BYTES + 1);
        assert_eq!(
            store(&[("surrogate-key", &too_long)]),
            Err("cache tag too long")
        );
    }

    #[test]
    fn validators_are_kept_only_when_valid() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        let freshness = store(&[("etag", "W/\"a-1\""), ("last-modified", date)]).unwrap();
        assert_eq!(freshness.etag.as_deref(), Some("W/\"a-1\""));
        assert_eq!(freshness.last_modified.as_deref(), Some(date));
        let invalid = store(&[("etag", "a-1"), ("last-modified", "yesterday")]).unwrap();
        assert_eq!((invalid.etag, invalid.last_modified), (None, None));
        assert!(!valid_etag("\"a\"b\""));
        assert!(!valid_etag("\""));
        assert!(valid_etag("\"\""));
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        let expected = Some(784_111_777_000);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), expected);
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), expected);
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), expected);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37"), None);
        assert_eq!(parse_http_date("0"), None);
        assert_eq!(parse_http_date(""), None);
    }

    // ---- revalidation ----

    #[test]
    fn conditional_headers_carry_both_validators() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        let freshness = store(&[("etag", "\"v1\""), ("last-modified", date)]).unwrap();
        assert_eq!(
            conditional_headers(&freshness),
            [
                (header::IF_NONE_MATCH, HeaderValue::from_static("\"v1\"")),
                (header::IF_MODIFIED_SINCE, HeaderValue::from_static(date)),
            ]
        );
        assert!(conditional_headers(&store(&[]).unwrap()).is_empty());
    }

    fn stored_entry() -> StoredResponse {
        let received = [
            ("content-type", "text/plain"),
            ("cache-control", "max-age=10"),
            ("etag", "\"v1\""),
            ("content-length", "5"),
            ("x-old", "1"),
        ];
        StoredResponse {
            status: 200,
            headers: received
                .iter()
                .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
                .collect(),
            body: Bytes::from_static(b"hello"),
            freshness: store(&received).unwrap(),
        }
    }

    fn header_values<'a>(response: &'a StoredResponse, name: &str) -> Vec<&'a [u8]> {
        response
            .headers
            .iter()
            .filter(|(stored, _)| stored.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_slice())
            .collect()
    }

    #[test]
    fn refresh_after_304_merges_headers_and_recomputes_freshness() {
        let stored = stored_entry();
        let later = NOW + 50_000;
        let not_modified = headers(&[
            ("cache-control", "max-age=100"),
            ("etag", "\"v1\""),
            ("content-length", "0"),
            ("x-old", "2"),
            ("x-old", "3"),
            ("cache-tag", "fresh"),
            ("set-cookie", "a=1"),
            ("age", "5"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
        ]);
        let refreshed = refresh_after_304(&stored, &not_modified, &policy(), later);
        assert_eq!(refreshed.store, Ok(()));
        let response = &refreshed.response;
        assert_eq!(response.status, 200);
        assert_eq!(response.body, stored.body);
        assert_eq!(header_values(response, "cache-control"), [b"max-age=100"]);
        assert_eq!(header_values(response, "content-length"), [b"5"]);
        assert_eq!(header_values(response, "content-type"), [b"text/plain"]);
        assert_eq!(header_values(response, "x-old"), [b"2", b"3"]);
        for dropped in ["set-cookie", "age", "x-hop", "connection", "keep-alive"] {
            assert!(header_values(response, dropped).is_empty(), "{dropped}");
        }
        let freshness = &response.freshness;
        assert_eq!(freshness.stored_at, later);
        assert_eq!(freshness.fresh_until, later + 95_000);
        assert_eq!(freshness.tags, ["fresh"]);
        assert_eq!(age_seconds(freshness, later), 5);
        assert_eq!(state(freshness, later), CacheState::Fresh);
    }

    #[test]
    fn refresh_after_304_that_forbids_storing() {
        let stored = stored_entry();
        let not_modified = headers(&[("cache-control", "no-store"), ("x-new", "1")]);
        let refreshed = refresh_after_304(&stored, &not_modified, &policy(), NOW + 1);
        assert_eq!(refreshed.store, Err("no-store"));
        assert_eq!(header_values(&refreshed.response, "x-new"), [b"1"]);
        assert_eq!(
            state(&refreshed.response.freshness, NOW + 1),
            CacheState::Expired
        );
    }

    // ---- client conditional requests ----

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let freshness = store(&[("etag", "\"v1\"")]).unwrap();
        let matches =
            |value: &str| client_not_modified(&headers(&[("if-none-match", value)]), &freshness);
        assert!(matches("\"v1\""));
        assert!(matches("W/\"v1\""));
        assert!(matches("\"a\", W/\"v1\""));
        assert!(matches("*"));
        assert!(!matches("\"v2\""));
        assert!(!matches("v1"));
        assert!(!matches("\"v1"));
        let weak_stored = store(&[("etag", "W/\"v1\"")]).unwrap();
        assert!(client_not_modified(
            &headers(&[("if-none-match", "\"v1\"")]),
            &weak_stored
        ));
        let comma = store(&[("etag", "\"a,b\"")]).unwrap();
        assert!(client_not_modified(
            &headers(&[("if-none-match", "\"x\", \"a,b\"")]),
            &comma
        ));
        assert!(!client_not_modified(
            &headers(&[("if-none-match", "\"a\"")]),
            &comma
        ));
        let untagged = store(&[]).unwrap();
        assert!(client_not_modified(
            &headers(&[("if-none-match", "*")]),
            &untagged
        ));
        assert!(!client_not_modified(
            &headers(&[("if-none-match", "\"v1\"")]),
            &untagged
        ));
    }

    #[test]
    fn if_modified_since_only_without_if_none_match() {
        let modified = "Sun, 06 Nov 1994 08:49:37 GMT";
        let freshness = store(&[("etag", "\"v1\""), ("last-modified", modified)]).unwrap();
        let check = |pairs: &[(&str, &str)]| client_not_modified(&headers(pairs), &freshness);
        assert!(check(&[("if-modified-since", modified)]));
        assert!(check(&[(
            "if-modified-since",
            "Mon, 07 Nov 1994 08:49:37 GMT"
        )]));
        assert!(!check(&[(
            "if-modified-since",
            "Sat, 05 Nov 1994 08:49:37 GMT"
        )]));
        assert!(!check(&[("if-modified-since", "not a date")]));
        assert!(!check(&[
            ("if-modified-since", modified),
            ("if-modified-since", modified)
        ]));
        // If-None-Match decides alone when present.
        assert!(!check(&[
            ("if-none-match", "\"v2\""),
            ("if-modified-since", modified)
        ]));
        // No Last-Modified: the time the entry was stored stands in.
        let undated = store(&[]).unwrap();
        assert!(client_not_modified(
            &headers(&[("if-modified-since", &http_date(NOW))]),
            &undated
        ));
        assert!(!client_not_modified(
            &headers(&[("if-modified-since", &http_date(NOW - 1000))]),
            &undated
        ));
        assert!(!check(&[]));
    }

    // ---- storage layout ----

    #[test]
    fn stored_response_round_trips() {
        let mut stored = stored_entry();
        stored.freshness.tags = vec!["a".to_owned(), "ü".to_owned()];
        stored.freshness.vary = vec![header::COOKIE];
        stored.freshness.last_modified = Some("Sun, 06 Nov 1994 08:49:37 GMT".to_owned());
        stored.freshness.must_revalidate = true;
        stored.headers.push(("x-bin".to_owned(), vec![0x80, 0xff]));
        assert_eq!(StoredResponse::decode(&stored.encode()), Ok(stored.clone()));
        stored.body = Bytes::new();
        stored.freshness.etag = None;
        assert_eq!(StoredResponse::decode(&stored.encode()), Ok(stored));
    }

    #[test]
    fn decode_rejects_damaged_bytes() {
        let encoded = stored_entry().encode();
        for len in 0..encoded.len() {
            assert!(
                StoredResponse::decode(&encoded[..len]).is_err(),
                "prefix of {len} bytes"
            );
        }
        assert_eq!(StoredResponse::decode(&[]), Err(DecodeError::Truncated));
        let mut future = encoded.clone();
        future[0] = 2;
        assert_eq!(
            StoredResponse::decode(&future),
            Err(DecodeError::Version(2))
        );
        let mut trailing = encoded.clone();
        trailing.push(0);
        assert_eq!(
            StoredResponse::decode(&trailing),
            Err(DecodeError::TrailingBytes(1))
        );
        let mut flags = encoded;
        flags[43] |= 0x80;
        assert_eq!(
            StoredResponse::decode(&flags),
            Err(DecodeError::Invalid("flags"))
        );
    }

    fn arbitrary_stored() -> impl Strategy<Value = StoredResponse> {
        let freshness = (
            proptest::array::uniform5(any::<u64>()),
            any::<bool>(),
            proptest::option::of("(W/)?\"[!#-~]{0,12}\""),
            proptest::option::of(".{0,30}"),
            proptest::collection::vec(".{1,20}", 0..6),
            proptest::collection::vec("[a-z][a-z0-9-]{0,15}", 0..4),
        )
            .prop_map(
                |(times, must_revalidate, etag, last_modified, tags, vary)| Freshness {
                    stored_at: times[0],
                    initial_age_secs: times[1],
                    fresh_until: times[2],
                    stale_while_revalidate_until: times[3],
                    stale_if_error_until: times[4],
                    must_revalidate,
                    etag,
                    last_modified,
                    tags,
                    vary: vary
                        .iter()
                        .map(|name| HeaderName::from_bytes(name.as_bytes()).unwrap())
                        .collect(),
                },
            );
        (
            any::<u16>(),
            proptest::collection::vec(
                (
                    "[A-Za-z-]{1,16}",
                    proptest::collection::vec(any::<u8>(), 0..40),
                ),
                0..8,
            ),
            proptest::collection::vec(any::<u8>(), 0..600),
            freshness,
        )
            .prop_map(|(status, headers, body, freshness)| StoredResponse {
                status,
                headers,
                body: Bytes::from(body),
                freshness,
            })
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(stored in arbitrary_stored()) {
            prop_assert_eq!(StoredResponse::decode(&stored.encode()), Ok(stored));
        }

        #[test]
        fn decode_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = StoredResponse::decode(&bytes);
            let mut versioned = bytes;
            versioned.insert(0, LAYOUT_VERSION);
            let _ = StoredResponse::decode(&versioned);
        }

        #[test]
        fn decode_never_panics_on_damaged_encodings(
            stored in arbitrary_stored(),
            at in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut encoded = stored.encode();
            let index = at.index(encoded.len());
            encoded[index] = byte;
            let _ = StoredResponse::decode(&encoded);
        }

        #[test]
        fn query_normalization_is_idempotent(query in "[a-zA-Z0-9%&=+ ._~-]{0,40}") {
            let policy = policy();
            let once = primary_key(&Method::GET, "http", "h", "/", Some(&query), &policy);
            let normalized = once.split_once('?').map(|(_, query)| query.to_owned());
            let twice = primary_key(&Method::GET, "http", "h", "/", normalized.as_deref(), &policy);
            prop_assert_eq!(once, twice);
        }
    }
}
