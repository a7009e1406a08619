//! The response cache of a route, stored through the cache subsystem (both layers), with
//! RFC 9111 semantics from `cache_policy`.
//!
//! Keys in the shared cache:
//! - `gw:v:{primary}`: the header names the response varies on (absent: none);
//! - `gw:r:{variant}`: the stored response (identity body);
//! - `gw:r:{variant}\u{1}{coding}`: the same body encoded for clients that accept it,
//!   made once and kept with the entry, so a hit is never compressed twice.
//!
//! Every entry is tagged `gw:u:{hash of the primary key}` (purge by URL) and
//! `gw:t:{tag}` for each `Cache-Tag` / `Surrogate-Key` (purge by tag); purge by prefix
//! is a range over `gw:r:`. Concurrent misses of one variant wait for a single upstream
//! request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use super::cache_policy::{
    CacheState, RequestMode, RoutePolicy, StoredResponse, age_seconds, client_not_modified,
    conditional_headers, primary_key, refresh_after_304, request_mode, state, storability,
    variant_key,
};
use super::compress::{self, Coding, CompressPolicy};
use super::proxy::{Outgoing, append_via, downstream, send_upstream, strip_hop_by_hop};
use super::route::Route;
use super::{Gateway, Table};
use crate::cache::{Cache, Entry, Pattern, Target};
use crate::config::RouteCacheConfig;

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// An entry with validators outlives its stale windows by this much: a 304 can renew it.
const KEEP_FOR_REVALIDATION: u64 = 3_600_000;
/// At most this long in the cache, whatever the upstream says.
const MAX_STORE: u64 = 86_400_000;

/// Headers that belong to one exchange, not to a stored response.
const NOT_STORED: [HeaderName; 3] = [header::AGE, header::DATE, X_CACHE];

type Waiters = Vec<oneshot::Sender<Option<Arc<StoredResponse>>>>;

pub struct RouteCache {
    policy: RoutePolicy,
    compress: Option<CompressPolicy>,
    cache: Cache,
    in_flight: Mutex<HashMap<String, Waiters>>,
}

fn now_ms() -> u64 {
    crate::cache::now_ms()
}

/// A stable hash of a primary key for the URL tag (tags are bounded in size).
pub(super) fn url_tag(primary: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, primary.as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("gw:u:{hex}")
}

/// A Redis glob that matches `literal` exactly as a prefix.
pub(super) fn escape_glob(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len() + 8);
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RouteCache {
    pub fn new(config: &RouteCacheConfig, compress: bool, cache: Cache) -> RouteCache {
        RouteCache {
            policy: RoutePolicy {
                ttl: config.ttl.0,
                stale_while_revalidate: config.stale_while_revalidate.map(|span| span.0),
                stale_if_error: config.stale_if_error.map(|span| span.0),
                ignore_query: config.ignore_query.clone(),
                cache_authorized: config.cache_authorized,
                cache_set_cookie: config.cache_set_cookie,
                max_body_bytes: config.max_body_bytes.0 as usize,
            },
            compress: compress.then(CompressPolicy::default),
            cache,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    pub fn policy(&self) -> &RoutePolicy {
        &self.policy
    }

    async fn vary_of(&self, primary: &str) -> Vec<HeaderName> {
        match self.cache.get(format!("gw:v:{primary}").as_bytes()).await {
            Ok(Some(entry)) => String::from_utf8_lossy(&entry.value)
                .split(',')
                .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
                .collect(),
            _ => Vec::new(),
        }
    }

    async fn load(&self, variant: &str) -> Option<StoredResponse> {
        let entry = self
            .cache
            .get(format!("gw:r:{variant}").as_bytes())
            .await
            .ok()??;
        StoredResponse::decode(&entry.value).ok()
    }

    /// Until when the cache keeps an entry.
    fn keep_until(stored: &StoredResponse) -> u64 {
        let freshness = &stored.freshness;
        let mut until = freshness
            .fresh_until
            .max(freshness.stale_while_revalidate_until)
            .max(freshness.stale_if_error_until);
        if freshness.etag.is_some() || freshness.last_modified.is_some() {
            until = until.max(freshness.fresh_until + KEEP_FOR_REVALIDATION);
        }
        until.min(freshness.stored_at + MAX_STORE)
    }

    fn tags(primary: &str, stored: &StoredResponse) -> Vec<String> {
        std::iter::once(url_tag(primary))
            .chain(
                stored
                    .freshness
                    .tags
                    .iter()
                    .map(|tag| format!("gw:t:{tag}")),
            )
            .collect()
    }

    async fn store(&self, primary: &str, variant: &str, stored: &StoredResponse) {
        let expires_at = Some(Self::keep_until(stored));
        let tags: Arc<[String]> = Self::tags(primary, stored).into();
        if !stored.freshness.vary.is_empty() {
            let names: Vec<&str> = stored
                .freshness
                .vary
                .iter()
                .map(HeaderName::as_str)
                .collect();
            let meta = Entry {
                value: Bytes::from(names.join(",")),
                expires_at,
                tags: Some(tags.clone()),
            };
            let _ = self
                .cache
                .set(format!("gw:v:{primary}").as_bytes(), meta)
                .await;
        }
        let entry = Entry {
            value: Bytes::from(stored.encode()),
            expires_at,
            tags: Some(tags),
        };
        if let Err(error) = self
            .cache
            .set(format!("gw:r:{variant}").as_bytes(), entry)
            .await
        {
            tracing::warn!(%error, "gateway: a response could not be cached");
        }
    }

    /// Answers a request of a cached route: from the cache when it may, else from the
    /// upstream (one request per variant however many wait), storing what may be stored.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn serve(
        &self,
        gateway: &Gateway,
        table: &Arc<Table>,
        route: &Route,
        parts: &Parts,
        scheme: &str,
        host: &str,
        outgoing: Outgoing,
        id: &HeaderValue,
    ) -> Response {
        let metrics = &gateway.inner.metrics;
        let result = |label: &str| {
            metrics
                .cache_results
                .with_label_values(&[route.name.as_str(), label])
                .inc();
        };
        let mode = request_mode(&parts.method, &parts.headers, &self.policy);
        if let RequestMode::Bypass(reason) = mode {
            result("bypass");
            tracing::trace!(reason, "gateway cache bypassed");
            let response = match send_upstream(gateway, route, outgoing).await {
                Ok(response) => downstream(response, id),
                Err(refusal) => refusal,
            };
            let mut response =
                super::compress_for(route, parts.headers.get(header::ACCEPT_ENCODING), response);
            response
                .headers_mut()
                .insert(X_CACHE, HeaderValue::from_static("BYPASS"));
            return response;
        }
        let primary = primary_key(
            &parts.method,
            scheme,
            host,
            parts.uri.path(),
            parts.uri.query(),
            &self.policy,
        );
        let vary = self.vary_of(&primary).await;
        let variant = variant_key(&primary, &vary, &parts.headers);
        let stored = self.load(&variant).await;
        let now = now_ms();
        if let Some(stored) = &stored
            && matches!(mode, RequestMode::Normal)
        {
            match state(&stored.freshness, now) {
                CacheState::Fresh => {
                    result("hit");
                    return self.respond(stored, "HIT", parts, &variant, id).await;
                }
                CacheState::StaleWhileRevalidate => {
                    result("stale");
                    self.revalidate_in_background(
                        gateway, table, route, &primary, &variant, &outgoing, stored,
                    );
                    return self.respond(stored, "STALE", parts, &variant, id).await;
                }
                CacheState::StaleIfError | CacheState::Expired => {}
            }
        }
        match self
            .fetch(
                gateway,
                route,
                &primary,
                &variant,
                outgoing,
                stored.as_ref(),
                id,
            )
            .await
        {
            Fetched::Stored(fresh, shared) => {
                result(if shared { "coalesced" } else { "miss" });
                self.respond(
                    &fresh,
                    if shared { "HIT" } else { "MISS" },
                    parts,
                    &variant,
                    id,
                )
                .await
            }
            Fetched::Passed(response) => {
                result("miss");
                let mut response = super::compress_for(
                    route,
                    parts.headers.get(header::ACCEPT_ENCODING),
                    response,
                );
                response
                    .headers_mut()
                    .insert(X_CACHE, HeaderValue::from_static("MISS"));
                response
            }
            Fetched::Failed(refusal) => {
                if let Some(stored) = &stored
                    && now_ms() < stored.freshness.stale_if_error_until
                {
                    result("stale");
                    return self.respond(stored, "STALE", parts, &variant, id).await;
                }
                refusal
            }
        }
    }

    /// The upstream request for a cache fill: GET, identity, and the cache's own
    /// validators instead of the client's.
    fn fill_request(outgoing: &Outgoing, stored: Option<&StoredResponse>) -> Outgoing {
        let mut headers = outgoing.headers.clone();
        for name in [
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_MATCH,
            header::IF_UNMODIFIED_SINCE,
            header::IF_RANGE,
            header::RANGE,
        ] {
            headers.remove(name);
        }
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if let Some(stored) = stored {
            for (name, value) in conditional_headers(&stored.freshness) {
                headers.insert(name, value);
            }
        }
        Outgoing {
            method: Method::GET,
            headers,
            target: outgoing.target.clone(),
            body: None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch(
        &self,
        gateway: &Gateway,
        route: &Route,
        primary: &str,
        variant: &str,
        outgoing: Outgoing,
        stored: Option<&StoredResponse>,
        id: &HeaderValue,
    ) -> Fetched {
        // Join the fill in flight for this variant, or lead one.
        let waiting = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            match in_flight.get_mut(variant) {
                Some(waiters) => {
                    let (tell, told) = oneshot::channel();
                    waiters.push(tell);
                    Some(told)
                }
                None => {
                    in_flight.insert(variant.to_owned(), Vec::new());
                    None
                }
            }
        };
        if let Some(told) = waiting {
            if let Ok(Some(fresh)) = told.await {
                return Fetched::Stored(fresh, true);
            }
            // The leader could not store it: ask the upstream on our own.
            return match send_upstream(gateway, route, outgoing).await {
                Ok(response) => Fetched::Passed(downstream(response, id)),
                Err(refusal) => Fetched::Failed(refusal),
            };
        }
        // Whatever happens to this request (its client may hang up mid-fill), the
        // guard takes the variant out of `in_flight`, so followers are never stranded.
        let guard = FillGuard {
            cache: self,
            variant,
            finished: false,
        };
        let filled = self
            .fill(gateway, route, primary, variant, outgoing, stored, id)
            .await;
        let shared = match &filled {
            Fetched::Stored(fresh, _) => Some(fresh.clone()),
            _ => None,
        };
        guard.finish(shared);
        filled
    }

    #[allow(clippy::too_many_arguments)]
    async fn fill(
        &self,
        gateway: &Gateway,
        route: &Route,
        primary: &str,
        variant: &str,
        outgoing: Outgoing,
        stored: Option<&StoredResponse>,
        id: &HeaderValue,
    ) -> Fetched {
        let request_headers = outgoing.headers.clone();
        let request = Self::fill_request(&outgoing, stored);
        drop(outgoing);
        let response = match send_upstream(gateway, route, request).await {
            Ok(response) => response,
            Err(refusal) => return Fetched::Failed(refusal),
        };
        let now = now_ms();
        if response.status() == StatusCode::NOT_MODIFIED
            && let Some(stored) = stored
        {
            let refreshed = refresh_after_304(stored, response.headers(), &self.policy, now);
            let fresh = Arc::new(refreshed.response);
            if refreshed.store.is_ok() {
                self.store(primary, variant, &fresh).await;
            }
            return Fetched::Stored(fresh, false);
        }
        let status = response.status();
        let freshness = match storability(
            &Method::GET,
            status,
            response.headers(),
            &request_headers,
            &self.policy,
            now,
        ) {
            Ok(freshness) if freshness.tags.len() < crate::cache::MAX_TAGS => freshness,
            _ => return Fetched::Passed(downstream(response, id)),
        };
        let length = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<usize>().ok());
        if length.is_none_or(|length| length > self.policy.max_body_bytes) {
            // Unknown or too large: streamed through, not stored.
            return Fetched::Passed(downstream(response, id));
        }
        let (mut head, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return Fetched::Failed(super::proxy::refuse(
                    StatusCode::BAD_GATEWAY,
                    "upstream_failed",
                    "the upstream's response body broke off",
                    false,
                ));
            }
        };
        strip_hop_by_hop(&mut head.headers);
        for name in NOT_STORED {
            head.headers.remove(name);
        }
        if !self.policy.cache_set_cookie {
            head.headers.remove(header::SET_COOKIE);
        }
        // The response says what it varies on: that decides where it is stored.
        let variant = variant_key(primary, &freshness.vary, &request_headers);
        let stored = Arc::new(StoredResponse {
            status: status.as_u16(),
            headers: head
                .headers
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                .collect(),
            body,
            freshness,
        });
        self.store(primary, &variant, &stored).await;
        Fetched::Stored(stored, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn revalidate_in_background(
        &self,
        gateway: &Gateway,
        table: &Arc<Table>,
        route: &Route,
        primary: &str,
        variant: &str,
        outgoing: &Outgoing,
        stored: &StoredResponse,
    ) {
        let Some(cache) = route.cache.clone() else {
            return;
        };
        let (gateway, table, primary, variant) = (
            gateway.clone(),
            table.clone(),
            primary.to_owned(),
            variant.to_owned(),
        );
        let outgoing = Outgoing {
            method: Method::GET,
            headers: outgoing.headers.clone(),
            target: outgoing.target.clone(),
            body: None,
        };
        let stored = stored.clone();
        let route_name = route.name.clone();
        let id = outgoing
            .headers
            .get(X_REQUEST_ID)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("revalidation"));
        tokio::spawn(async move {
            let Some(route) = table.routes.routes().iter().find(|r| r.name == route_name) else {
                return;
            };
            let _ = cache
                .fetch(
                    &gateway,
                    route,
                    &primary,
                    &variant,
                    outgoing,
                    Some(&stored),
                    &id,
                )
                .await;
        });
    }

    /// A stored response as this client gets it: a 304 when its validators match,
    /// else the body, encoded when the client accepts it and the route compresses.
    async fn respond(
        &self,
        stored: &StoredResponse,
        label: &'static str,
        parts: &Parts,
        variant: &str,
        id: &HeaderValue,
    ) -> Response {
        let mut headers = HeaderMap::new();
        for (name, value) in &stored.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                headers.append(name, value);
            }
        }
        headers.insert(
            header::AGE,
            HeaderValue::from(age_seconds(&stored.freshness, now_ms())),
        );
        headers.insert(X_CACHE, HeaderValue::from_static(label));
        headers.insert(X_REQUEST_ID, id.clone());
        append_via(&mut headers);
        let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
        if client_not_modified(&parts.headers, &stored.freshness) {
            for name in [
                header::CONTENT_LENGTH,
                header::CONTENT_TYPE,
                header::CONTENT_ENCODING,
            ] {
                headers.remove(name);
            }
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            *response.headers_mut() = headers;
            return response;
        }
        let mut body = stored.body.clone();
        if let Some(policy) = &self.compress
            && compress::should_compress(policy, status, &headers, Some(body.len() as u64))
        {
            let coding =
                compress::negotiate(parts.headers.get(header::ACCEPT_ENCODING), &policy.enabled);
            compress::apply_headers(&mut headers, coding);
            if coding != Coding::Identity {
                body = self.encoded(stored, variant, coding).await;
            }
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let body = if parts.method == Method::HEAD {
            Body::empty()
        } else {
            Body::from(body)
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }

    /// The body in `coding`, made once per stored response and kept beside it.
    async fn encoded(&self, stored: &StoredResponse, variant: &str, coding: Coding) -> Bytes {
        let key = format!("gw:r:{variant}\u{1}{}", coding.as_str());
        let stamp = stored.freshness.stored_at.to_le_bytes();
        if let Ok(Some(entry)) = self.cache.get(key.as_bytes()).await
            && entry.value.len() >= 8
            && entry.value[..8] == stamp
        {
            return entry.value.slice(8..);
        }
        let body = stored.body.clone();
        let encoded = tokio::task::spawn_blocking(move || compress::encode(coding, &body))
            .await
            .unwrap_or_default();
        // Stamped with the stored response's time, so a refreshed response is never
        // answered with an old encoding.
        let mut value = Vec::with_capacity(encoded.len() + 8);
        value.extend_from_slice(&stamp);
        value.extend_from_slice(&encoded);
        let entry = Entry {
            value: Bytes::from(value),
            expires_at: Some(Self::keep_until(stored)),
            tags: Some(Self::tags_of_variant(variant, stored).into()),
        };
        let _ = self.cache.set(key.as_bytes(), entry).await;
        Bytes::from(encoded)
    }

    fn tags_of_variant(variant: &str, stored: &StoredResponse) -> Vec<String> {
        let primary = variant.split('\n').next().unwrap_or(variant);
        Self::tags(primary, stored)
    }

    /// Purges by URL (every variant and encoding of it), by prefix or by tag.
    pub(super) async fn purge(
        cache: &Cache,
        target: PurgeTarget,
    ) -> Result<usize, crate::cache::CacheError> {
        match target {
            PurgeTarget::Primary(primary) => {
                cache
                    .invalidate(Target::Tags(vec![url_tag(&primary)]))
                    .await
            }
            PurgeTarget::Prefix(prefix) => {
                let mut removed = 0;
                for space in ["gw:r:", "gw:v:"] {
                    let pattern = format!("{space}{}*", escape_glob(&prefix));
                    removed += cache
                        .invalidate(Target::Pattern(Pattern::new(pattern.as_bytes())))
                        .await?;
                }
                Ok(removed)
            }
            PurgeTarget::Tag(tag) => {
                cache
                    .invalidate(Target::Tags(vec![format!("gw:t:{tag}")]))
                    .await
            }
        }
    }
}

/// The leader's claim on a variant's fill. Finishing tells the followers the result;
/// dropping it unfinished (the leader's request went away) lets them go ask the upstream.
struct FillGuard<'a> {
    cache: &'a RouteCache,
    variant: &'a str,
    finished: bool,
}

impl FillGuard<'_> {
    fn waiters(&self) -> Waiters {
        self.cache
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.variant)
            .unwrap_or_default()
    }

    fn finish(mut self, shared: Option<Arc<StoredResponse>>) {
        self.finished = true;
        for waiter in self.waiters() {
            let _ = waiter.send(shared.clone());
        }
    }
}

impl Drop for FillGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // The senders go with the entry: each follower sees its channel close.
            drop(self.waiters());
        }
    }
}

pub(super) enum PurgeTarget {
    /// A primary key (method, scheme, host, path, normalized query).
    Primary(String),
    /// The start of primary keys: `GET https://host/path`.
    Prefix(String),
    Tag(String),
}

enum Fetched {
    /// A stored (or refreshed) response; `true` when another request's fill made it.
    Stored(Arc<StoredResponse>, bool),
    /// Not storable: the upstream's response, streamed.
    Passed(Response),
    /// The upstream failed; the gateway's own answer.
    Failed(Response),
}
