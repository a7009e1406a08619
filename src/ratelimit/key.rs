//! Who counts as one client: the `rate_limit.key` setting and the fixed-size [`Key`] it
//! derives from a request.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use hyper::HeaderMap;
use hyper::header::HeaderName;

/// What a limiter counts by: `ip`, `header:NAME`, `route` or `global`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// The client address the caller decided on (after its trusted-proxy rules).
    Ip,
    /// A request header such as an API key; requests without it count by their IP.
    Header(HeaderName),
    /// The route name: one bucket per route, shared by every client of it.
    Route,
    /// One bucket for everything that reaches the limiter.
    Global,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyKindError {
    #[error("rate limit key {0:?} must be ip, header:NAME, route or global")]
    Unknown(String),
    #[error("rate limit key {0:?} does not name a valid header (e.g. header:x-api-key)")]
    BadHeader(String),
}

impl FromStr for KeyKind {
    type Err = KeyKindError;

    fn from_str(text: &str) -> Result<KeyKind, KeyKindError> {
        match text {
            "ip" => Ok(KeyKind::Ip),
            "route" => Ok(KeyKind::Route),
            "global" => Ok(KeyKind::Global),
            _ => match text.strip_prefix("header:") {
                // `HeaderName` lower-cases, so `header:X-Api-Key` and `header:x-api-key` agree.
                Some(name) => HeaderName::from_bytes(name.as_bytes())
                    .map(KeyKind::Header)
                    .map_err(|_| KeyKindError::BadHeader(text.to_owned())),
                None => Err(KeyKindError::Unknown(text.to_owned())),
            },
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::Ip => f.write_str("ip"),
            KeyKind::Header(name) => write!(f, "header:{name}"),
            KeyKind::Route => f.write_str("route"),
            KeyKind::Global => f.write_str("global"),
        }
    }
}

impl KeyKind {
    /// The key a request counts against. `client` is the address the gateway settled on
    /// (it alone knows the trusted proxies); `X-Forwarded-For` is never read here.
    ///
    /// With `header:NAME`, a request that lacks the header, or sends it empty, counts
    /// against its client IP instead: leaving the header out must not escape the limit,
    /// and keyless clients behind one address share that address's bucket.
    pub fn key_for(&self, client: IpAddr, headers: &HeaderMap, route: &str) -> Key {
        match self {
            KeyKind::Ip => Key::ip(client),
            KeyKind::Header(name) => match headers.get(name) {
                Some(value) if !value.is_empty() => Key::hashed(value.as_bytes()),
                _ => Key::ip(client),
            },
            KeyKind::Route => Key::hashed(route.as_bytes()),
            KeyKind::Global => Key::GLOBAL,
        }
    }
}

/// One client as a limiter tracks it. Always 16 bytes, whatever the request carried, so a
/// tracked API key costs what a tracked IP costs and no header value is kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(Repr);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Repr {
    V4(u32),
    /// The /64 network of an IPv6 address.
    V6(u64),
    /// A keyed hash of a header value or route name.
    Digest(u64),
    Global,
}

impl Key {
    pub const GLOBAL: Key = Key(Repr::Global);

    /// IPv4 addresses count one by one (IPv4-mapped IPv6 addresses as their IPv4 address).
    /// IPv6 addresses count by their /64: that is what one subscriber or host is handed,
    /// so per-address keys would let a single client rotate through 2^64 fresh buckets.
    pub fn ip(addr: IpAddr) -> Key {
        match addr {
            IpAddr::V4(v4) => Key(Repr::V4(v4.to_bits())),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Key(Repr::V4(v4.to_bits())),
                None => Key(Repr::V6((v6.to_bits() >> 64) as u64)),
            },
        }
    }

    /// Any other identity (a header value, a user name, a queue name). The bytes are
    /// hashed with SHA-256, cut to 64 bits: the same on every node, so limits shared
    /// through Redis agree on the key, while a collision with a given victim's key still
    /// costs ~2^64 hashes to find (by chance they are ~n²/2^65).
    pub fn hashed(bytes: &[u8]) -> Key {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let first: [u8; 8] = digest.as_ref()[..8].try_into().expect("32 bytes");
        Key(Repr::Digest(u64::from_le_bytes(first)))
    }

    /// The key as text that means the same on every node: the name of its bucket in
    /// Redis for shared limits.
    pub(super) fn stable_id(&self) -> String {
        match self.0 {
            Repr::V4(v4) => format!("4:{v4:08x}"),
            Repr::V6(net) => format!("6:{net:016x}"),
            Repr::Digest(digest) => format!("h:{digest:016x}"),
            Repr::Global => "g".to_owned(),
        }
    }

    /// Well-spread bits that pick a store shard. Not a defence against crafted keys (the
    /// shard maps hash with SipHash themselves); skew only costs lock contention.
    pub(super) fn spread(&self) -> u64 {
        let bits = match self.0 {
            Repr::V4(v4) => u64::from(v4),
            Repr::V6(net) => net,
            Repr::Digest(digest) => digest,
            Repr::Global => 0,
        };
        bits.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}
