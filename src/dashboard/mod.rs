//! The browser dashboard: the files of `web/`, embedded in the binary and served on the
//! api listener (`/` is `index.html`, every other file at its own path). Plain ES
//! modules and CSS, no build step; the pages read the same `/v1` routes as any client.
//!
//! This module only serves bytes with the right headers. It holds no state, calls no
//! subsystem, and answers nothing it does not have: a route is registered per embedded
//! file, so an unknown path falls through to the api's problem+json 404.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

#[derive(rust_embed::RustEmbed)]
#[folder = "web/"]
struct WebFiles;

/// What every dashboard response carries. The policy allows scripts, styles, images
/// and fetches from keel itself only: no inline script, no other host, no framing.
const SECURITY_HEADERS: [(&str, &str); 4] = [
    (
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; \
         form-action 'self'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
];

/// The dashboard's routes: `/` and one per embedded file (the `web/` README excepted).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new().route(
        "/",
        get(|headers: HeaderMap| serve("index.html".to_owned(), headers)),
    );
    for path in WebFiles::iter().filter(|path| !path.ends_with(".md")) {
        let route = format!("/{path}");
        let path = path.into_owned();
        router = router.route(
            &route,
            get(move |headers: HeaderMap| serve(path.clone(), headers)),
        );
    }
    router
}

/// One embedded file. Every file is revalidated (`no-cache`) so a new binary is seen at
/// once; the content hash as ETag makes the revalidation a 304 without a body.
async fn serve(path: String, request_headers: HeaderMap) -> Response {
    let Some(file) = WebFiles::get(&path) else {
        // Unreachable: routes exist only for embedded files.
        return StatusCode::NOT_FOUND.into_response();
    };
    let etag = format!(
        "\"{}\"",
        file.metadata
            .sha256_hash()
            .iter()
            .take(16)
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    );
    let mut headers = HeaderMap::new();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    let unchanged = request_headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == etag));
    if unchanged {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&path)),
    );
    (headers, file.data.into_owned()).into_response()
}

/// The media type by extension, for the kinds of file `web/` holds.
fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, extension)| extension) {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_file_has_a_known_type() {
        let files: Vec<_> = WebFiles::iter()
            .filter(|path| !path.ends_with(".md"))
            .collect();
        assert!(files.iter().any(|path| path == "index.html"));
        for path in files {
            assert_ne!(
                content_type(&path),
                "application/octet-stream",
                "{path} would be served without a media type"
            );
        }
    }
}
