//! A cached value and its metadata, and the byte layout L2 stores it in.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Milliseconds since the Unix epoch: the clock TTLs are kept in, so they survive
/// restarts and mean the same on every node.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// The absolute expiry `ttl` from now; absurdly long TTLs saturate instead of wrapping
/// into the past.
pub fn expires_in(ttl: std::time::Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    /// Absolute expiry, Unix milliseconds; `None` lives until evicted or deleted.
    pub expires_at: Option<u64>,
    /// Shared, because most entries have none and copies of an entry share them.
    pub tags: Option<Arc<[String]>>,
}

impl Entry {
    pub fn new(value: Bytes) -> Entry {
        Entry {
            value,
            expires_at: None,
            tags: None,
        }
    }

    /// A new value that keeps `current`'s expiry and tags, as INCR and APPEND do.
    pub fn replacing(current: Option<&Entry>, value: Bytes) -> Entry {
        Entry {
            value,
            expires_at: current.and_then(|entry| entry.expires_at),
            tags: current.and_then(|entry| entry.tags.clone()),
        }
    }

    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    pub fn tags(&self) -> &[String] {
        self.tags.as_deref().unwrap_or(&[])
    }

    /// Layout: `expires_at: u64 LE` (0 = none), `tag count: u16 LE`, each tag as
    /// `len: u16 LE` + UTF-8, then the value to the end.
    pub fn encode(&self) -> Vec<u8> {
        let tags = self.tags();
        let tag_bytes: usize = tags.iter().map(|tag| 2 + tag.len()).sum();
        let mut out = Vec::with_capacity(10 + tag_bytes + self.value.len());
        out.extend_from_slice(&self.expires_at.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&(tags.len() as u16).to_le_bytes());
        for tag in tags {
            out.extend_from_slice(&(tag.len() as u16).to_le_bytes());
            out.extend_from_slice(tag.as_bytes());
        }
        out.extend_from_slice(&self.value);
        out
    }

    /// The expiry and tag count from an encoded entry's header, without copying it.
    pub fn peek_header(bytes: &[u8]) -> Option<(Option<u64>, usize)> {
        let expires_at = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let tags = u16::from_le_bytes(bytes.get(8..10)?.try_into().ok()?) as usize;
        Some(((expires_at != 0).then_some(expires_at), tags))
    }

    /// `None` for bytes this layout cannot have produced.
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let expires_at = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let count = u16::from_le_bytes(bytes.get(8..10)?.try_into().ok()?) as usize;
        let mut at = 10;
        let mut tags = Vec::with_capacity(count);
        for _ in 0..count {
            let len = u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?) as usize;
            tags.push(String::from_utf8(bytes.get(at + 2..at + 2 + len)?.to_vec()).ok()?);
            at += 2 + len;
        }
        Some(Entry {
            value: Bytes::copy_from_slice(bytes.get(at..)?),
            expires_at: (expires_at != 0).then_some(expires_at),
            tags: (!tags.is_empty()).then(|| tags.into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let entry = Entry {
            value: Bytes::from_static(b"a\r\n\0b"),
            expires_at: Some(1234),
            tags: Some(vec!["x".to_owned(), "yz".to_owned()].into()),
        };
        assert_eq!(Entry::decode(&entry.encode()), Some(entry));
        let plain = Entry::new(Bytes::new());
        assert_eq!(Entry::decode(&plain.encode()), Some(plain));
        assert_eq!(Entry::decode(&[1, 2, 3]), None);
    }
}
