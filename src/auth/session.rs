//! Dashboard sessions: a random cookie value standing for a token for a while, with a
//! CSRF secret the page must echo on every request that changes something.
//!
//! In memory only (a restart logs everyone out), bounded by count (the oldest session
//! goes first) and by idle time. A session holds the hash of its token, not the
//! token, and is checked against the token store on every use, so revoking the token
//! ends its sessions.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prometheus::IntGauge;

use super::token::{TokenHash, random_bytes};

/// Sessions kept at most; a login beyond this ends the oldest session.
pub const MAX_SESSIONS: usize = 10_000;
/// A session unused for this long is over.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(12 * 3600);
/// Expired sessions are swept at most this often (they are refused on use regardless).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What a session stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The token's hash, or `None` for a login with the static password.
    pub token_hash: Option<TokenHash>,
    pub csrf: String,
}

struct Entry {
    session: Session,
    last_used: Instant,
    /// Tells a live entry from a stale `order` slot of an earlier one with the same id.
    serial: u64,
}

#[derive(Default)]
struct Table {
    /// By SHA-256 of the cookie value, so memory holds nothing a client could present.
    entries: HashMap<[u8; 32], Entry>,
    /// Creation order, for evicting the oldest; may hold ids of ended sessions.
    order: VecDeque<([u8; 32], u64)>,
    next_serial: u64,
    last_sweep: Option<Instant>,
}

pub(super) struct Sessions {
    table: Mutex<Table>,
    max: usize,
    idle: Duration,
    gauge: IntGauge,
}

impl Sessions {
    pub(super) fn new(max: usize, idle: Duration, gauge: IntGauge) -> Sessions {
        Sessions {
            table: Mutex::new(Table::default()),
            max,
            idle,
            gauge,
        }
    }

    /// Starts a session; returns the cookie value and the session.
    pub(super) fn create(&self, token_hash: Option<TokenHash>) -> (String, Session) {
        let cookie = URL_SAFE_NO_PAD.encode(random_bytes::<32>());
        let session = Session {
            token_hash,
            csrf: URL_SAFE_NO_PAD.encode(random_bytes::<32>()),
        };
        let id = digest(cookie.as_bytes());
        let now = Instant::now();
        let mut table = self.lock();
        self.sweep(&mut table, now);
        while table.entries.len() >= self.max {
            let Some((old, serial)) = table.order.pop_front() else {
                break;
            };
            if table
                .entries
                .get(&old)
                .is_some_and(|entry| entry.serial == serial)
            {
                table.entries.remove(&old);
            }
        }
        table.next_serial += 1;
        let serial = table.next_serial;
        table.entries.insert(
            id,
            Entry {
                session: session.clone(),
                last_used: now,
                serial,
            },
        );
        table.order.push_back((id, serial));
        // Slots of sessions that ended otherwise would pile up in `order`; compact it
        // when they outnumber the live ones.
        if table.order.len() > 2 * self.max.max(table.entries.len()) {
            let Table { entries, order, .. } = &mut *table;
            order.retain(|(id, serial)| {
                entries.get(id).is_some_and(|entry| entry.serial == *serial)
            });
        }
        self.gauge.set(table.entries.len() as i64);
        (cookie, session)
    }

    /// The session a cookie names, if it is live; marks it used.
    pub(super) fn get(&self, cookie: &str) -> Option<Session> {
        let id = digest(cookie.as_bytes());
        let now = Instant::now();
        let mut table = self.lock();
        self.sweep(&mut table, now);
        let entry = table.entries.get_mut(&id)?;
        if now.duration_since(entry.last_used) >= self.idle {
            table.entries.remove(&id);
            self.gauge.set(table.entries.len() as i64);
            return None;
        }
        entry.last_used = now;
        Some(entry.session.clone())
    }

    pub(super) fn remove(&self, cookie: &str) {
        let id = digest(cookie.as_bytes());
        let mut table = self.lock();
        table.entries.remove(&id);
        self.gauge.set(table.entries.len() as i64);
    }

    /// Ends every session of a token (it was revoked).
    pub(super) fn remove_token(&self, token_hash: &TokenHash) {
        let mut table = self.lock();
        table
            .entries
            .retain(|_, entry| entry.session.token_hash.as_ref() != Some(token_hash));
        self.gauge.set(table.entries.len() as i64);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }

    fn sweep(&self, table: &mut Table, now: Instant) {
        if table
            .last_sweep
            .is_some_and(|last| now.duration_since(last) < SWEEP_EVERY)
        {
            return;
        }
        table.last_sweep = Some(now);
        let idle = self.idle;
        table
            .entries
            .retain(|_, entry| now.duration_since(entry.last_used) < idle);
        self.gauge.set(table.entries.len() as i64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(super) fn digest(bytes: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(max: usize, idle: Duration) -> Sessions {
        Sessions::new(max, idle, IntGauge::new("g", "g").unwrap())
    }

    #[test]
    fn sessions_are_bounded_and_the_oldest_goes_first() {
        let sessions = sessions(3, IDLE_TIMEOUT);
        let cookies: Vec<String> = (0..5).map(|_| sessions.create(None).0).collect();
        assert_eq!(sessions.len(), 3);
        assert!(sessions.get(&cookies[0]).is_none());
        assert!(sessions.get(&cookies[1]).is_none());
        assert!(sessions.get(&cookies[4]).is_some());
        sessions.remove(&cookies[4]);
        assert!(sessions.get(&cookies[4]).is_none());
        assert_eq!(sessions.gauge.get(), 2);
    }

    #[test]
    fn idle_sessions_expire_and_revocation_ends_a_tokens_sessions() {
        let expired = sessions(10, Duration::ZERO);
        let (cookie, _) = expired.create(None);
        assert!(expired.get(&cookie).is_none());

        let sessions = sessions(10, IDLE_TIMEOUT);
        let (a, session) = sessions.create(Some([1; 32]));
        let (b, _) = sessions.create(Some([2; 32]));
        assert_eq!(sessions.get(&a), Some(session));
        sessions.remove_token(&[1; 32]);
        assert!(sessions.get(&a).is_none());
        assert!(sessions.get(&b).is_some());
    }
}
