//! Response compression for the gateway: which coding a client gets (`Accept-Encoding`),
//! whether a response is worth compressing, the header changes that go with it, and the
//! encoders: one-shot for the cache's per-coding variants, streaming for bodies that
//! pass through.
//!
//! Not here: decompression. The gateway never decodes what an upstream encoded; such a
//! response passes through as it came ([`should_compress`] says no).
//!
//! How the proxy core uses it: if [`should_compress`], call [`apply_headers`] with the
//! coding [`negotiate`] picked (even `Identity`, for the `Vary`), and wrap the body with
//! [`encode_body`] (or serve a variant built once with [`encode`]).

use std::io::{self, Write};
use std::pin::Pin;

use async_compression::Level;
use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Either, StreamBody};
use hyper::StatusCode;
use hyper::body::{Body, Frame};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokio::io::AsyncRead;
use tokio_util::io::{ReaderStream, StreamReader};

use super::cache_policy::CacheControl;

/// The error type of bodies [`encode_body`] accepts.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

// Levels for a proxy, which compresses on the request path and pays in latency and CPU
// on every response (or every miss, for cached variants). Each sits near its codec's
// knee, past which a level costs several times the CPU for a few percent of size:
// - gzip 5: nearly the ratio of the default 6 for noticeably less CPU;
// - brotli 4: about as fast as gzip 6 and smaller on text; brotli's default 11 is
//   around a hundred times slower and belongs to assets compressed ahead of time;
// - zstd 3: zstd's own default, fast at both ends.
const GZIP_LEVEL: u32 = 5;
const BROTLI_QUALITY: i32 = 4;
const ZSTD_LEVEL: i32 = 3;

/// Brotli and zstd look back 2^19 bytes (512 KiB) while streaming, not their defaults
/// (4 MiB, and 2 MiB at zstd 3), which bounds each stream's encoder memory. Responses
/// seldom repeat themselves at longer distances. One-shot encoding needs no bound: its
/// memory is bounded by the input.
const STREAM_WINDOW_LOG: u32 = 19;

/// The largest chunk the streaming encoder hands on at once.
const STREAM_CHUNK_BYTES: usize = 16 * 1024;

/// What `CompressPolicy::default` compresses: text, and the structured formats that are
/// text underneath. Images (but SVG), audio, video and archives are compressed already.
pub const DEFAULT_CONTENT_TYPES: [&str; 15] = [
    "text/",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/xhtml+xml",
    "application/rss+xml",
    "application/atom+xml",
    "application/ld+json",
    "application/manifest+json",
    "application/problem+json",
    "application/x-ndjson",
    "application/wasm",
    "image/svg+xml",
    "font/ttf",
    "font/otf",
];

/// A content coding (RFC 9110 §8.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coding {
    Identity,
    Gzip,
    Brotli,
    Zstd,
}

impl Coding {
    /// Among equally acceptable codings: brotli compresses text best, zstd nearly as
    /// well and faster, gzip is understood everywhere.
    const PREFERENCE: [Coding; 3] = [Coding::Brotli, Coding::Zstd, Coding::Gzip];

    /// The token in `Accept-Encoding` and `Content-Encoding`.
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Identity => "identity",
            Coding::Gzip => "gzip",
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
        }
    }

    /// A coding token, case-insensitively; `x-gzip` is gzip (RFC 9110 §8.4.1.3).
    pub fn parse(token: &str) -> Option<Coding> {
        let token = token.trim();
        [Coding::Identity, Coding::Gzip, Coding::Brotli, Coding::Zstd]
            .into_iter()
            .find(|coding| token.eq_ignore_ascii_case(coding.as_str()))
            .or_else(|| token.eq_ignore_ascii_case("x-gzip").then_some(Coding::Gzip))
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The coding to answer with, from the request's `Accept-Encoding` and the codings the
/// route enables (RFC 9110 §12.5.3).
///
/// The highest q-value wins; `q=0` forbids a coding; `*` stands for every coding not
/// listed; ties go to brotli, then zstd, then gzip. A coding beats identity unless
/// identity is listed with a higher q. No header means identity, and so does a header
/// that accepts nothing enabled, even `identity;q=0`: a response in a coding the client
/// did not ask for is worse than an uncompressed one. Malformed members (a bad q-value,
/// a parameter without `=`, bytes that are not a token) are skipped.
pub fn negotiate(accept_encoding: Option<&HeaderValue>, enabled: &[Coding]) -> Coding {
    let Some(accept_encoding) = accept_encoding else {
        return Coding::Identity;
    };
    // q-values in thousandths; the first member for a coding counts.
    let mut listed: [Option<u16>; 4] = [None; 4];
    let mut any: Option<u16> = None;
    for member in accept_encoding.as_bytes().split(|&byte| byte == b',') {
        let Some((token, q)) = accept_member(member) else {
            continue;
        };
        if token == "*" {
            any = any.or(Some(q));
        } else if let Some(coding) = Coding::parse(token) {
            let slot = &mut listed[coding.index()];
            *slot = slot.or(Some(q));
        }
    }
    let mut best: Option<(Coding, u16)> = None;
    for coding in Coding::PREFERENCE {
        if !enabled.contains(&coding) {
            continue;
        }
        let q = listed[coding.index()].or(any).unwrap_or(0);
        if q > 0 && best.is_none_or(|(_, best_q)| q > best_q) {
            best = Some((coding, q));
        }
    }
    match best {
        Some((coding, q))
            if listed[Coding::Identity.index()].is_none_or(|identity| q >= identity) =>
        {
            coding
        }
        _ => Coding::Identity,
    }
}

/// One `Accept-Encoding` member: the coding token and its q-value in thousandths.
fn accept_member(member: &[u8]) -> Option<(&str, u16)> {
    let member = std::str::from_utf8(member).ok()?.trim();
    let mut parts = member.split(';');
    let token = parts.next()?.trim();
    let is_token = !token.is_empty()
        && token
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte));
    if !is_token {
        return None;
    }
    let mut q = 1000;
    for parameter in parts {
        let (name, value) = parameter.split_once('=')?;
        if name.trim().eq_ignore_ascii_case("q") {
            q = qvalue(value.trim())?;
        }
    }
    Some((token, q))
}

/// RFC 9110 §12.4.2: `0`, `0.5`, `0.125`, `1`, `1.000`; at most three decimals.
fn qvalue(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    match whole {
        "0" => {
            let digits = fraction.bytes().map(|digit| u16::from(digit - b'0'));
            Some(
                digits
                    .zip([100, 10, 1])
                    .map(|(digit, scale)| digit * scale)
                    .sum(),
            )
        }
        "1" if fraction.bytes().all(|digit| digit == b'0') => Some(1000),
        _ => None,
    }
}

/// A route's compression settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressPolicy {
    /// Smaller bodies go out as they are: the coding's framing and the CPU cost more
    /// than the bytes saved.
    pub min_bytes: usize,
    /// Media-type prefixes worth compressing (`text/` covers every text type), compared
    /// case-insensitively against the `Content-Type` without its parameters.
    pub content_types: Vec<String>,
    pub enabled: Vec<Coding>,
}

impl Default for CompressPolicy {
    fn default() -> Self {
        CompressPolicy {
            min_bytes: 1024,
            content_types: DEFAULT_CONTENT_TYPES.map(str::to_owned).to_vec(),
            enabled: Coding::PREFERENCE.to_vec(),
        }
    }
}

/// Whether a response is worth compressing for some client. Not when: the route enables
/// no coding; the status has no body to compress or names a byte range (1xx, 204, 206,
/// 304) or the response carries `Content-Range`; it already has a `Content-Encoding`
/// (never twice); `Cache-Control: no-transform`; its `Content-Type` is missing or not in
/// the policy; its length (`known_len`, else `Content-Length`) is below `min_bytes`.
/// An unknown length (a streamed body) is compressed.
pub fn should_compress(
    policy: &CompressPolicy,
    status: StatusCode,
    response_headers: &HeaderMap,
    known_len: Option<u64>,
) -> bool {
    if !policy
        .enabled
        .iter()
        .any(|coding| *coding != Coding::Identity)
    {
        return false;
    }
    if status.is_informational()
        || matches!(
            status,
            StatusCode::NO_CONTENT | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
        )
        || response_headers.contains_key(header::CONTENT_RANGE)
    {
        return false;
    }
    let encoded = response_headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .any(|coding| {
            let coding = coding.trim_ascii();
            !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity")
        });
    if encoded || CacheControl::parse(response_headers).no_transform {
        return false;
    }
    let Some(content_type) = response_headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let essence = content_type
        .as_bytes()
        .split(|&byte| byte == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let listed = policy.content_types.iter().any(|prefix| {
        essence
            .get(..prefix.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(prefix.as_bytes()))
    });
    if !listed {
        return false;
    }
    let length = known_len.or_else(|| {
        response_headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse().ok())
    });
    length.is_none_or(|length| length >= policy.min_bytes as u64)
}

/// Sets the headers of a response compressed with `coding`: `Content-Encoding`, no
/// `Content-Length` (the encoded length is not known up front), `Vary: Accept-Encoding`
/// merged into any `Vary` there is, a strong `ETag` made weak (the encoded bytes differ
/// from the identity ones a strong tag promises), and no `Accept-Ranges`,
/// `Content-Digest` or `Repr-Digest` (ranges and digests of the identity bytes do not
/// hold for the encoded ones).
///
/// Call it with `Identity` too whenever [`should_compress`] said yes: it then only adds
/// the `Vary`, which a cache downstream needs to keep this client's identity response
/// from another client that accepts gzip.
pub fn apply_headers(headers: &mut HeaderMap, coding: Coding) {
    merge_vary(headers);
    if coding == Coding::Identity {
        return;
    }
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(coding.as_str()),
    );
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ACCEPT_RANGES);
    headers.remove(HeaderName::from_static("content-digest"));
    headers.remove(HeaderName::from_static("repr-digest"));
    let weak = headers
        .get(header::ETAG)
        .filter(|etag| etag.as_bytes().starts_with(b"\""))
        .and_then(|etag| HeaderValue::from_bytes(&[b"W/", etag.as_bytes()].concat()).ok());
    if let Some(weak) = weak {
        headers.insert(header::ETAG, weak);
    }
}

fn merge_vary(headers: &mut HeaderMap) {
    let mut merged: Vec<u8> = Vec::new();
    for value in headers.get_all(header::VARY) {
        for member in value.as_bytes().split(|&byte| byte == b',') {
            let member = member.trim_ascii();
            if member == b"*" || member.eq_ignore_ascii_case(b"accept-encoding") {
                // `*` varies on everything already.
                return;
            }
            if !member.is_empty() {
                merged.extend_from_slice(member);
                merged.extend_from_slice(b", ");
            }
        }
    }
    merged.extend_from_slice(b"Accept-Encoding");
    // Every byte came from a valid header value, so this cannot fail.
    if let Ok(value) = HeaderValue::from_bytes(&merged) {
        headers.insert(header::VARY, value);
    }
}

/// `input` encoded with `coding`, at the proxy's levels (see the constants above), for
/// the cache's per-coding variants. `Identity` copies.
pub fn encode(coding: Coding, input: &[u8]) -> Vec<u8> {
    // Encoding into a Vec has no I/O to fail, and the parameters are valid constants;
    // an error here is a bug in the codec.
    const INFALLIBLE: &str = "in-memory compression with valid parameters cannot fail";
    match coding {
        Coding::Identity => input.to_vec(),
        Coding::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(input.len() / 2 + 64),
                flate2::Compression::new(GZIP_LEVEL),
            );
            encoder.write_all(input).expect(INFALLIBLE);
            encoder.finish().expect(INFALLIBLE)
        }
        Coding::Brotli => {
            let params = brotli::enc::BrotliEncoderParams {
                quality: BROTLI_QUALITY,
                size_hint: input.len(),
                ..Default::default()
            };
            let mut output = Vec::with_capacity(input.len() / 2 + 64);
            brotli::BrotliCompress(&mut &input[..], &mut output, &params).expect(INFALLIBLE);
            output
        }
        Coding::Zstd => zstd::bulk::compress(input, ZSTD_LEVEL).expect(INFALLIBLE),
    }
}

/// `body` encoded with `coding` as it streams, in bounded memory: the encoder holds its
/// window and at most one input chunk and one output chunk. Whenever the upstream
/// pauses, what was encoded so far is flushed, so server-sent events and long polls
/// reach the client as they happen. Trailers are dropped. `Identity` passes the body
/// through. An error from `body` ends the stream: as it is for `Identity`, otherwise
/// inside an `io::Error` (`io::Error::get_ref` gives it back), as is an encoder error.
pub fn encode_body<B>(
    coding: Coding,
    body: B,
) -> impl Body<Data = Bytes, Error = BoxError> + Send + 'static
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if coding == Coding::Identity {
        return Either::Left(body);
    }
    // StreamReader reads through io::Error; the body's own error rides inside it.
    let data = body
        .map_err(|error| io::Error::other(error.into()))
        .into_data_stream();
    let reader = StreamReader::new(data);
    let encoder: Pin<Box<dyn AsyncRead + Send>> = match coding {
        // Identity returned above.
        Coding::Gzip | Coding::Identity => Box::pin(GzipEncoder::with_quality(
            reader,
            Level::Precise(GZIP_LEVEL as i32),
        )),
        Coding::Brotli => Box::pin(BrotliEncoder::with_params(
            reader,
            async_compression::brotli::EncoderParams::default()
                .quality(Level::Precise(BROTLI_QUALITY))
                .window_size(STREAM_WINDOW_LOG as i32),
        )),
        Coding::Zstd => Box::pin(ZstdEncoder::with_quality_and_params(
            reader,
            Level::Precise(ZSTD_LEVEL),
            &[async_compression::zstd::CParameter::window_log(
                STREAM_WINDOW_LOG,
            )],
        )),
    };
    let frames = ReaderStream::with_capacity(encoder, STREAM_CHUNK_BYTES)
        .map(|chunk| chunk.map(Frame::data));
    Either::Right(StreamBody::new(frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::convert::Infallible;
    use std::io::Read;
    use std::pin::pin;
    use std::time::Duration;

    use proptest::prelude::*;

    const ALL: [Coding; 3] = [Coding::Brotli, Coding::Zstd, Coding::Gzip];
    const CODINGS: [Coding; 4] = [Coding::Identity, Coding::Gzip, Coding::Brotli, Coding::Zstd];

    fn pick(accept_encoding: &str, enabled: &[Coding]) -> Coding {
        negotiate(
            Some(&HeaderValue::from_str(accept_encoding).unwrap()),
            enabled,
        )
    }

    /// Decodes with the codecs' own readers; on a truncated stream, returns what decoded
    /// before the end.
    fn decode(coding: Coding, bytes: &[u8]) -> Vec<u8> {
        let mut reader: Box<dyn Read + '_> = match coding {
            Coding::Identity => Box::new(bytes),
            Coding::Gzip => Box::new(flate2::read::GzDecoder::new(bytes)),
            Coding::Brotli => Box::new(brotli::Decompressor::new(bytes, 4096)),
            Coding::Zstd => Box::new(zstd::stream::read::Decoder::new(bytes).unwrap()),
        };
        let mut out = Vec::new();
        let mut buffer = [0; 256];
        while let Ok(read @ 1..) = reader.read(&mut buffer) {
            out.extend_from_slice(&buffer[..read]);
        }
        out
    }

    fn text(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut line = 0u64;
        while out.len() < len {
            // Varied enough that no window sees only repeats.
            line += 1;
            let hash = line.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
            out.extend_from_slice(
                format!("{{\"id\":{line},\"name\":\"user {hash:x}\"}}\n").as_bytes(),
            );
        }
        out.truncate(len);
        out
    }

    // ---- negotiation ----

    #[test]
    fn coding_tokens() {
        assert_eq!(
            CODINGS.map(Coding::as_str),
            ["identity", "gzip", "br", "zstd"]
        );
        for coding in CODINGS {
            assert_eq!(Coding::parse(coding.as_str()), Some(coding));
        }
        assert_eq!(Coding::parse("GZip"), Some(Coding::Gzip));
        assert_eq!(Coding::parse("x-gzip"), Some(Coding::Gzip));
        assert_eq!(Coding::parse("deflate"), None);
        assert_eq!(Coding::parse("*"), None);
    }

    #[test]
    fn negotiation_table() {
        let table: &[(&str, Coding)] = &[
            ("gzip", Coding::Gzip),
            ("gzip, deflate, br", Coding::Brotli),
            ("gzip, deflate, br, zstd", Coding::Brotli),
            ("zstd, gzip", Coding::Zstd),
            ("br;q=0.5, gzip;q=0.8", Coding::Gzip),
            ("gzip;q=0.8, zstd;q=0.8", Coding::Zstd),
            ("br;q=0.001", Coding::Brotli),
            ("gzip;q=0, *", Coding::Brotli),
            ("br;q=0, zstd;q=0, *", Coding::Gzip),
            ("*", Coding::Brotli),
            ("*;q=0", Coding::Identity),
            ("*;q=0.5, gzip", Coding::Gzip),
            ("gzip;q=0", Coding::Identity),
            ("deflate", Coding::Identity),
            ("identity", Coding::Identity),
            ("", Coding::Identity),
            // Nothing enabled is acceptable: identity anyway, not a 406.
            ("identity;q=0", Coding::Identity),
            ("gzip, identity;q=0", Coding::Gzip),
            ("gzip;q=0.5, identity", Coding::Identity),
            ("gzip;q=0.5, identity;q=0.5", Coding::Gzip),
            ("GZIP;Q=1.000", Coding::Gzip),
            ("x-gzip", Coding::Gzip),
            ("gzip ; q=0.5", Coding::Gzip),
            ("gzip;level=9;q=0.5", Coding::Gzip),
            // The first member for a coding counts.
            ("gzip;q=0, gzip", Coding::Identity),
            // Malformed members are skipped, never fatal.
            ("gzip;q=2, br;q=abc, zstd;q=0.0001", Coding::Identity),
            ("gzip;q=2, br", Coding::Brotli),
            ("gzip;q=1.5, zstd;q=-1, br;q=", Coding::Identity),
            ("gzip;foo, br;q=0.1", Coding::Brotli),
            (",,, ;;; =, gzip", Coding::Gzip),
            ("g zip, \"br\", zstd", Coding::Zstd),
            ("br;q=0.5;q=0", Coding::Identity),
        ];
        for (accept_encoding, expected) in table {
            assert_eq!(
                pick(accept_encoding, &ALL),
                *expected,
                "{accept_encoding:?}"
            );
        }
        assert_eq!(negotiate(None, &ALL), Coding::Identity);
        let obs_text = HeaderValue::from_bytes(b"gz\xffip, zstd").unwrap();
        assert_eq!(negotiate(Some(&obs_text), &ALL), Coding::Zstd);
    }

    #[test]
    fn negotiation_honours_what_the_route_enables() {
        let everything = "br, zstd, gzip";
        assert_eq!(pick(everything, &[Coding::Gzip]), Coding::Gzip);
        assert_eq!(
            pick(everything, &[Coding::Gzip, Coding::Zstd]),
            Coding::Zstd
        );
        assert_eq!(pick(everything, &[]), Coding::Identity);
        assert_eq!(pick(everything, &[Coding::Identity]), Coding::Identity);
        assert_eq!(pick("br", &[Coding::Gzip]), Coding::Identity);
    }

    #[test]
    fn qvalues() {
        assert_eq!(qvalue("1"), Some(1000));
        assert_eq!(qvalue("1."), Some(1000));
        assert_eq!(qvalue("1.000"), Some(1000));
        assert_eq!(qvalue("0"), Some(0));
        assert_eq!(qvalue("0.5"), Some(500));
        assert_eq!(qvalue("0.05"), Some(50));
        assert_eq!(qvalue("0.125"), Some(125));
        for invalid in ["", "1.001", "0.1234", "2", ".5", "0,5", "0.x", "+1", "01"] {
            assert_eq!(qvalue(invalid), None, "{invalid:?}");
        }
    }

    proptest! {
        #[test]
        fn negotiation_never_panics(accept_encoding in "[ -~]{0,80}") {
            if let Ok(value) = HeaderValue::from_str(&accept_encoding) {
                let coding = negotiate(Some(&value), &ALL);
                prop_assert!(CODINGS.contains(&coding));
            }
        }
    }

    // ---- should_compress ----

    fn compressible() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        headers
    }

    fn with(mut headers: HeaderMap, name: HeaderName, value: &'static str) -> HeaderMap {
        headers.insert(name, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn compresses_listed_types_above_the_minimum() {
        let policy = CompressPolicy::default();
        let check = |headers: &HeaderMap, len: Option<u64>| {
            should_compress(&policy, StatusCode::OK, headers, len)
        };
        assert!(check(&compressible(), Some(2000)));
        assert!(check(&compressible(), Some(1024)));
        assert!(!check(&compressible(), Some(1023)));
        assert!(
            check(&compressible(), None),
            "a streamed body of unknown length"
        );
        let short = with(compressible(), header::CONTENT_LENGTH, "100");
        assert!(!check(&short, None));
        assert!(
            check(&short, Some(5000)),
            "the known length wins over the header"
        );
        for content_type in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/problem+json",
            "image/svg+xml",
            "text/css",
        ] {
            let headers = with(HeaderMap::new(), header::CONTENT_TYPE, content_type);
            assert!(check(&headers, None), "{content_type}");
        }
        for content_type in [
            "image/png",
            "application/octet-stream",
            "video/mp4",
            "textual/x",
        ] {
            let headers = with(HeaderMap::new(), header::CONTENT_TYPE, content_type);
            assert!(!check(&headers, None), "{content_type}");
        }
        assert!(!check(&HeaderMap::new(), None), "no content type");
    }

    #[test]
    fn never_compresses_twice_or_against_the_origin() {
        let policy = CompressPolicy::default();
        let check = |headers: &HeaderMap| should_compress(&policy, StatusCode::OK, headers, None);
        assert!(!check(&with(
            compressible(),
            header::CONTENT_ENCODING,
            "gzip"
        )));
        assert!(!check(&with(
            compressible(),
            header::CONTENT_ENCODING,
            "identity, br"
        )));
        assert!(check(&with(
            compressible(),
            header::CONTENT_ENCODING,
            "identity"
        )));
        assert!(!check(&with(
            compressible(),
            header::CACHE_CONTROL,
            "public, No-Transform"
        )));
        assert!(check(&with(
            compressible(),
            header::CACHE_CONTROL,
            "public, max-age=60"
        )));
        assert!(!check(&with(
            compressible(),
            header::CONTENT_RANGE,
            "bytes 0-9/100"
        )));
    }

    #[test]
    fn statuses_without_a_whole_body_are_not_compressed() {
        let policy = CompressPolicy::default();
        for status in [101, 103, 204, 206, 304] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(
                !should_compress(&policy, status, &compressible(), None),
                "{status}"
            );
        }
        for status in [200, 201, 404, 500] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(
                should_compress(&policy, status, &compressible(), None),
                "{status}"
            );
        }
        let disabled = CompressPolicy {
            enabled: vec![Coding::Identity],
            ..CompressPolicy::default()
        };
        assert!(!should_compress(
            &disabled,
            StatusCode::OK,
            &compressible(),
            None
        ));
    }

    // ---- headers ----

    #[test]
    fn headers_of_an_encoded_response() {
        let mut headers = compressible();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5000"));
        headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        headers.insert("content-digest", HeaderValue::from_static("sha-256=:x:"));
        apply_headers(&mut headers, Coding::Brotli);
        assert_eq!(headers[header::CONTENT_ENCODING], "br");
        assert_eq!(headers[header::VARY], "Accept-Encoding");
        assert_eq!(headers[header::ETAG], "W/\"v1\"");
        for removed in ["content-length", "accept-ranges", "content-digest"] {
            assert!(!headers.contains_key(removed), "{removed}");
        }
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");

        let mut weak = with(HeaderMap::new(), header::ETAG, "W/\"v1\"");
        apply_headers(&mut weak, Coding::Gzip);
        assert_eq!(weak[header::ETAG], "W/\"v1\"");
    }

    #[test]
    fn vary_is_merged_once() {
        let vary_after = |existing: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for value in existing {
                headers.append(header::VARY, HeaderValue::from_static(value));
            }
            apply_headers(&mut headers, Coding::Gzip);
            let values: Vec<_> = headers.get_all(header::VARY).iter().cloned().collect();
            values
        };
        assert_eq!(vary_after(&["Origin"]), ["Origin, Accept-Encoding"]);
        assert_eq!(
            vary_after(&["Origin", "Cookie,"]),
            ["Origin, Cookie, Accept-Encoding"]
        );
        assert_eq!(
            vary_after(&["origin, accept-encoding"]),
            ["origin, accept-encoding"]
        );
        assert_eq!(vary_after(&["*"]), ["*"]);
    }

    #[test]
    fn identity_only_adds_vary() {
        let mut headers = with(compressible(), header::CONTENT_LENGTH, "5000");
        headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        apply_headers(&mut headers, Coding::Identity);
        assert_eq!(headers[header::VARY], "Accept-Encoding");
        assert_eq!(headers[header::CONTENT_LENGTH], "5000");
        assert_eq!(headers[header::ETAG], "\"v1\"");
        assert!(!headers.contains_key(header::CONTENT_ENCODING));
    }

    // ---- encoders ----

    #[test]
    fn one_shot_round_trips() {
        let input = text(100_000);
        for coding in CODINGS {
            let encoded = encode(coding, &input);
            assert_eq!(decode(coding, &encoded), input, "{coding:?}");
            if coding != Coding::Identity {
                assert!(
                    encoded.len() < input.len() / 3,
                    "{coding:?}: {}",
                    encoded.len()
                );
            }
            assert_eq!(
                decode(coding, &encode(coding, b"")),
                b"",
                "{coding:?} empty"
            );
        }
    }

    fn chunked(chunks: Vec<Bytes>) -> impl Body<Data = Bytes, Error = Infallible> + Send + 'static {
        StreamBody::new(futures_util::stream::iter(
            chunks.into_iter().map(|chunk| Ok(Frame::data(chunk))),
        ))
    }

    #[tokio::test]
    async fn streaming_round_trips_multi_chunk_bodies() {
        let input = Bytes::from(text(200_000));
        let chunks: Vec<Bytes> = input.chunks(7_000).map(Bytes::copy_from_slice).collect();
        for coding in CODINGS {
            let mut body = pin!(encode_body(coding, chunked(chunks.clone())));
            let mut encoded = Vec::new();
            let mut frames = 0;
            while let Some(frame) = body.frame().await {
                let data = frame.unwrap().into_data().unwrap();
                if coding != Coding::Identity {
                    assert!(data.len() <= STREAM_CHUNK_BYTES);
                }
                encoded.extend_from_slice(&data);
                frames += 1;
            }
            assert!(frames > 1, "{coding:?}");
            assert_eq!(decode(coding, &encoded), input, "{coding:?}");
        }
        for coding in CODINGS {
            let empty = encode_body(coding, chunked(Vec::new()))
                .collect()
                .await
                .unwrap();
            assert_eq!(decode(coding, &empty.to_bytes()), b"", "{coding:?}");
        }
    }

    #[tokio::test]
    async fn a_pause_upstream_flushes_what_was_encoded() {
        for coding in CODINGS {
            let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(1);
            let upstream = futures_util::stream::unfold(receiver, |mut receiver| async move {
                let chunk = receiver.recv().await?;
                Some((Ok::<_, Infallible>(Frame::data(chunk)), receiver))
            });
            let mut body = pin!(encode_body(coding, StreamBody::new(upstream)));
            let event = b"data: first event\n\n";
            sender.send(Bytes::from_static(event)).await.unwrap();
            let mut received = Vec::new();
            let first_event = async {
                while decode(coding, &received) != event {
                    let frame = body.frame().await.unwrap().unwrap();
                    received.extend_from_slice(&frame.into_data().unwrap());
                }
            };
            tokio::time::timeout(Duration::from_secs(10), first_event)
                .await
                .unwrap_or_else(|_| panic!("{coding:?}: the event waited for more input"));
            sender
                .send(Bytes::from_static(b"data: second\n\n"))
                .await
                .unwrap();
            drop(sender);
            while let Some(frame) = body.frame().await {
                received.extend_from_slice(&frame.unwrap().into_data().unwrap());
            }
            assert_eq!(
                decode(coding, &received),
                b"data: first event\n\ndata: second\n\n",
                "{coding:?}"
            );
        }
    }

    #[tokio::test]
    async fn upstream_errors_reach_the_caller() {
        for coding in CODINGS {
            let upstream = futures_util::stream::iter([
                Ok(Frame::data(Bytes::from_static(b"partial"))),
                Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "upstream reset",
                )),
            ]);
            let error = encode_body(coding, StreamBody::new(upstream))
                .collect()
                .await
                .map(|_| ())
                .unwrap_err();
            assert!(
                error.to_string().contains("upstream reset"),
                "{coding:?}: {error}"
            );
        }
    }
}
