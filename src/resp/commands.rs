//! The commands: each turns arguments into calls on the `Cache` handle and a `Reply`.
//! Replies, error prefixes and texts follow Redis wherever a client could notice.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;

use super::frame::Reply;
use crate::auth::{AuthError, Authenticator, Principal, Role, Scope};
use crate::cache::{Cache, CacheError, Entry, Mutation, Pattern, now_ms};

/// The version keel reports to clients that check it (features follow Redis 7).
const REDIS_VERSION: &str = "7.2.0";
/// KEYS answers at most this many keys; SCAN is the way to walk more.
const KEYS_LIMIT: usize = 1_000_000;
/// Open SCAN cursors remembered at most; the oldest is forgotten first.
const CURSORS: usize = 10_000;

const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
const NOT_FLOAT: &str = "ERR value is not a valid float";
const SYNTAX: &str = "ERR syntax error";

/// Shared by every RESP connection.
pub struct RespContext {
    pub cache: Cache,
    pub auth: Authenticator,
    pub started: Instant,
    pub next_client_id: AtomicU64,
    pub connected: AtomicU64,
    cursors: Mutex<Cursors>,
}

impl RespContext {
    pub fn new(cache: Cache, auth: Authenticator) -> RespContext {
        RespContext {
            cache,
            auth,
            started: Instant::now(),
            next_client_id: AtomicU64::new(1),
            connected: AtomicU64::new(0),
            cursors: Mutex::new(Cursors::default()),
        }
    }
}

/// SCAN cursors: Redis cursors are numbers, keel's position is the last key returned,
/// so each open cursor number maps to a key.
#[derive(Default)]
struct Cursors {
    next: u64,
    positions: HashMap<u64, Bytes>,
    order: VecDeque<u64>,
}

impl Cursors {
    fn open(&mut self, after: Bytes) -> u64 {
        self.next += 1;
        let cursor = self.next;
        self.positions.insert(cursor, after);
        self.order.push_back(cursor);
        while self.order.len() > CURSORS {
            if let Some(old) = self.order.pop_front() {
                self.positions.remove(&old);
            }
        }
        cursor
    }
}

/// One connection's state.
pub(super) struct Session {
    pub(super) id: u64,
    pub(super) peer: SocketAddr,
    pub(super) name: Option<Bytes>,
    pub(super) resp3: bool,
    pub(super) authenticated: bool,
    /// Who authenticated on this connection, checked again on every command so a
    /// revoked token stops working on connections already open.
    pub(super) principal: Option<std::sync::Arc<Principal>>,
}

/// Whether the connection goes on after the reply.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    Close,
}

fn arity(name: &[u8]) -> Reply {
    Reply::error(format!(
        "ERR wrong number of arguments for '{}' command",
        String::from_utf8_lossy(name).to_lowercase()
    ))
}

pub(super) fn store_error(error: CacheError) -> Reply {
    match error {
        CacheError::KeyTooLarge { .. }
        | CacheError::ValueTooLarge { .. }
        | CacheError::TooManyTags => Reply::error(format!("ERR {error}")),
        CacheError::Unavailable(_) => {
            tracing::warn!(%error, "cache write refused");
            Reply::error(format!("ERR {error}; retry later"))
        }
        other => {
            tracing::error!(error = %other, "cache unavailable");
            Reply::error("ERR cache storage unavailable")
        }
    }
}

/// Integers as Redis reads them: optional `-`, digits, no spaces or `+`.
fn parse_int(arg: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(arg).ok()?;
    if text.is_empty() || text.starts_with('+') || text.len() > 20 {
        return None;
    }
    text.parse().ok()
}

fn parse_float(arg: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(arg).ok()?;
    if text.is_empty() || text.trim() != text {
        return None;
    }
    text.parse::<f64>().ok().filter(|value| value.is_finite())
}

fn format_float(value: f64) -> String {
    let text = format!("{value}");
    if text == "-0" { "0".to_owned() } else { text }
}

macro_rules! try_reply {
    ($result:expr) => {
        match $result {
            Ok(value) => value,
            Err(reply) => return (reply, Flow::Continue),
        }
    };
}

fn upper(name: &[u8]) -> ([u8; 24], usize) {
    let mut buffer = [0u8; 24];
    let length = name.len().min(24);
    for (slot, byte) in buffer.iter_mut().zip(name) {
        *slot = byte.to_ascii_uppercase();
    }
    (buffer, if name.len() > 24 { 0 } else { length })
}

/// Whether a command only reads (or changes nothing in the cache).
pub(super) fn is_read(name: &[u8]) -> bool {
    let (buffer, length) = upper(name);
    is_read_command(&buffer[..length])
}

/// Runs one command on `cache` (the connection's handle).
pub(super) async fn execute(
    context: &RespContext,
    cache: &Cache,
    session: &mut Session,
    args: &[Bytes],
) -> (Reply, Flow) {
    let Some(name) = args.first() else {
        return (Reply::error("ERR empty command"), Flow::Continue);
    };
    let (buffer, length) = upper(name);
    let command = &buffer[..length];

    if let Some(principal) = &session.principal
        && !context.auth.still_valid(principal)
    {
        session.principal = None;
        session.authenticated = false;
    }
    if !session.authenticated && !matches!(command, b"AUTH" | b"HELLO" | b"QUIT") {
        return (
            Reply::error("NOAUTH Authentication required."),
            Flow::Continue,
        );
    }
    if session
        .principal
        .as_ref()
        .is_some_and(|principal| principal.role == Role::Readonly)
        && !is_read_command(command)
    {
        return (
            Reply::error("NOPERM this token is read-only"),
            Flow::Continue,
        );
    }
    let reply = match command {
        b"GET" => {
            if args.len() != 2 {
                return (arity(name), Flow::Continue);
            }
            match cache.get(&args[1]).await {
                Ok(Some(entry)) => Reply::Bulk(entry.value),
                Ok(None) => Reply::Null,
                Err(error) => store_error(error),
            }
        }
        b"SET" => try_reply!(set(cache, args).await),
        b"PING" => match args.len() {
            1 => Reply::Simple("PONG"),
            2 => Reply::Bulk(args[1].clone()),
            _ => arity(name),
        },
        b"MGET" => {
            if args.len() < 2 {
                return (arity(name), Flow::Continue);
            }
            let mut values = Vec::with_capacity(args.len() - 1);
            for key in &args[1..] {
                values.push(match cache.get(key).await {
                    Ok(Some(entry)) => Reply::Bulk(entry.value),
                    Ok(None) => Reply::Null,
                    Err(error) => return (store_error(error), Flow::Continue),
                });
            }
            Reply::Array(values)
        }
        b"MSET" => {
            if args.len() < 3 || args.len().is_multiple_of(2) {
                return (arity(name), Flow::Continue);
            }
            for pair in args[1..].chunks(2) {
                if let Err(error) = cache
                    .set(&pair[0], Entry::new(Bytes::copy_from_slice(&pair[1])))
                    .await
                {
                    return (store_error(error), Flow::Continue);
                }
            }
            Reply::Ok
        }
        b"INCR" | b"DECR" => {
            if args.len() != 2 {
                return (arity(name), Flow::Continue);
            }
            incr_by(cache, &args[1], if command == b"INCR" { 1 } else { -1 }).await
        }
        b"INCRBY" | b"DECRBY" => {
            if args.len() != 3 {
                return (arity(name), Flow::Continue);
            }
            let Some(delta) = parse_int(&args[2]) else {
                return (Reply::error(NOT_INTEGER), Flow::Continue);
            };
            let delta = if command == b"DECRBY" {
                match delta.checked_neg() {
                    Some(delta) => delta,
                    None => return (Reply::error("ERR decrement would overflow"), Flow::Continue),
                }
            } else {
                delta
            };
            incr_by(cache, &args[1], delta).await
        }
        b"INCRBYFLOAT" => {
            if args.len() != 3 {
                return (arity(name), Flow::Continue);
            }
            let Some(delta) = parse_float(&args[2]) else {
                return (Reply::error(NOT_FLOAT), Flow::Continue);
            };
            incr_by_float(cache, &args[1], delta).await
        }
        b"DEL" | b"UNLINK" => {
            if args.len() < 2 {
                return (arity(name), Flow::Continue);
            }
            let mut deleted = 0;
            for key in &args[1..] {
                match cache.delete(key).await {
                    Ok(existed) => deleted += i64::from(existed),
                    Err(error) => return (store_error(error), Flow::Continue),
                }
            }
            Reply::Integer(deleted)
        }
        b"EXISTS" => {
            if args.len() < 2 {
                return (arity(name), Flow::Continue);
            }
            let mut found = 0;
            for key in &args[1..] {
                match cache.get(key).await {
                    Ok(entry) => found += i64::from(entry.is_some()),
                    Err(error) => return (store_error(error), Flow::Continue),
                }
            }
            Reply::Integer(found)
        }
        b"SETNX" => {
            if args.len() != 3 {
                return (arity(name), Flow::Continue);
            }
            let value = Bytes::copy_from_slice(&args[2]);
            match cache
                .mutate(&args[1], |current| match current {
                    Some(_) => Mutation::Keep(0),
                    None => Mutation::Put(Entry::new(value.clone()), 1),
                })
                .await
            {
                Ok(stored) => Reply::Integer(stored),
                Err(error) => store_error(error),
            }
        }
        b"SETEX" | b"PSETEX" => {
            if args.len() != 4 {
                return (arity(name), Flow::Continue);
            }
            let Some(amount) = parse_int(&args[2]) else {
                return (Reply::error(NOT_INTEGER), Flow::Continue);
            };
            let unit = if command == b"SETEX" { 1000 } else { 1 };
            let Some(expires_at) = expiry_in(amount, unit) else {
                return (invalid_expire(name), Flow::Continue);
            };
            let entry = Entry {
                value: Bytes::copy_from_slice(&args[3]),
                expires_at: Some(expires_at),
                tags: None,
            };
            match cache.set(&args[1], entry).await {
                Ok(()) => Reply::Ok,
                Err(error) => store_error(error),
            }
        }
        b"GETDEL" => {
            if args.len() != 2 {
                return (arity(name), Flow::Continue);
            }
            match cache
                .mutate(&args[1], |current| {
                    Mutation::Delete(current.map(|entry| entry.value.clone()))
                })
                .await
            {
                Ok(Some(value)) => Reply::Bulk(value),
                Ok(None) => Reply::Null,
                Err(error) => store_error(error),
            }
        }
        b"GETEX" => try_reply!(getex(cache, args).await),
        b"APPEND" => {
            if args.len() != 3 {
                return (arity(name), Flow::Continue);
            }
            let suffix = &args[2];
            match cache
                .mutate(&args[1], |current| {
                    let mut value = current
                        .map(|entry| entry.value.to_vec())
                        .unwrap_or_default();
                    value.extend_from_slice(suffix);
                    let length = value.len() as i64;
                    Mutation::Put(Entry::replacing(current, value.into()), length)
                })
                .await
            {
                Ok(length) => Reply::Integer(length),
                Err(error) => store_error(error),
            }
        }
        b"STRLEN" => {
            if args.len() != 2 {
                return (arity(name), Flow::Continue);
            }
            match cache.get(&args[1]).await {
                Ok(entry) => Reply::Integer(entry.map_or(0, |entry| entry.value.len() as i64)),
                Err(error) => store_error(error),
            }
        }
        b"EXPIRE" | b"PEXPIRE" | b"EXPIREAT" | b"PEXPIREAT" => {
            try_reply!(expire(cache, command, args).await)
        }
        b"TTL" | b"PTTL" => {
            if args.len() != 2 {
                return (arity(name), Flow::Continue);
            }
            match cache.get(&args[1]).await {
                Ok(None) => Reply::Integer(-2),
                Ok(Some(Entry {
                    expires_at: None, ..
                })) => Reply::Integer(-1),
                Ok(Some(Entry {
                    expires_at: Some(at),
                    ..
                })) => {
                    let remaining = at.saturating_sub(now_ms()) as i64;
                    Reply::Integer(if command == b"TTL" {
                        (remaining + 500) / 1000
                    } else {
                        remaining
                    })
                }
                Err(error) => store_error(error),
            }
        }
        b"PERSIST" => {
            if args.len() != 2 {
                return (arity(name), Flow::Continue);
            }
            match cache
                .mutate(&args[1], |current| match current {
                    Some(entry) if entry.expires_at.is_some() => Mutation::Put(
                        Entry {
                            expires_at: None,
                            ..entry.clone()
                        },
                        1,
                    ),
                    _ => Mutation::Keep(0),
                })
                .await
            {
                Ok(changed) => Reply::Integer(changed),
                Err(error) => store_error(error),
            }
        }
        b"TYPE" => {
            if args.len() != 2 {
                return (arity(name), Flow::Continue);
            }
            match cache.get(&args[1]).await {
                Ok(Some(_)) => Reply::Simple("string"),
                Ok(None) => Reply::Simple("none"),
                Err(error) => store_error(error),
            }
        }
        b"KEYS" => {
            if args.len() != 2 {
                return (arity(name), Flow::Continue);
            }
            match cache.keys(&Pattern::new(&args[1]), KEYS_LIMIT).await {
                Ok(keys) => Reply::Array(keys.into_iter().map(Reply::Bulk).collect()),
                Err(error) => store_error(error),
            }
        }
        b"SCAN" => try_reply!(scan(context, args).await),
        b"DBSIZE" => match cache.key_count().await {
            Ok(count) => Reply::Integer(count as i64),
            Err(error) => store_error(error),
        },
        b"FLUSHDB" | b"FLUSHALL" => {
            let mode_ok = args.len() == 1
                || (args.len() == 2
                    && (args[1].eq_ignore_ascii_case(b"ASYNC")
                        || args[1].eq_ignore_ascii_case(b"SYNC")));
            if !mode_ok {
                return (Reply::error(SYNTAX), Flow::Continue);
            }
            match cache.clear().await {
                Ok(()) => Reply::Ok,
                Err(error) => store_error(error),
            }
        }
        b"ECHO" => {
            if args.len() != 2 {
                return (arity(name), Flow::Continue);
            }
            Reply::Bulk(args[1].clone())
        }
        b"SELECT" => {
            if args.len() != 2 {
                return (arity(name), Flow::Continue);
            }
            match parse_int(&args[1]) {
                Some(0) => Reply::Ok,
                Some(_) => Reply::error("ERR DB index is out of range"),
                None => Reply::error(NOT_INTEGER),
            }
        }
        b"AUTH" => auth(context, session, args),
        b"HELLO" => try_reply!(hello(context, session, args)),
        b"CLIENT" => client(session, args),
        b"COMMAND" => command_stub(args),
        b"CONFIG" => config(args),
        b"INFO" => info(context).await,
        b"QUIT" => return (Reply::Ok, Flow::Close),
        _ => {
            let mut message = format!(
                "ERR unknown command '{}', with args beginning with: ",
                String::from_utf8_lossy(name)
            );
            for arg in args[1..].iter().take(8) {
                message.push_str(&format!(
                    "'{}' ",
                    String::from_utf8_lossy(&arg[..arg.len().min(128)])
                ));
            }
            Reply::Error(message)
        }
    };
    (reply, Flow::Continue)
}

fn invalid_expire(name: &[u8]) -> Reply {
    Reply::error(format!(
        "ERR invalid expire time in '{}' command",
        String::from_utf8_lossy(name).to_lowercase()
    ))
}

/// An absolute expiry `amount × unit_ms` from now; `None` when not positive or too far.
fn expiry_in(amount: i64, unit_ms: i64) -> Option<u64> {
    if amount <= 0 {
        return None;
    }
    let delta = amount.checked_mul(unit_ms)?;
    (now_ms() as i64).checked_add(delta).map(|at| at as u64)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Keep,
    Clear,
    At(u64),
}

/// Parses `EX s | PX ms | EXAT ts | PXAT ts` at `args[index]`; returns the expiry and
/// how many arguments it used.
fn parse_expiry(
    args: &[Bytes],
    index: usize,
    command: &[u8],
) -> Result<Option<(u64, usize)>, Reply> {
    let option = &args[index];
    let unit: Option<(i64, bool)> = if option.eq_ignore_ascii_case(b"EX") {
        Some((1000, false))
    } else if option.eq_ignore_ascii_case(b"PX") {
        Some((1, false))
    } else if option.eq_ignore_ascii_case(b"EXAT") {
        Some((1000, true))
    } else if option.eq_ignore_ascii_case(b"PXAT") {
        Some((1, true))
    } else {
        None
    };
    let Some((unit, absolute)) = unit else {
        return Ok(None);
    };
    let Some(value) = args.get(index + 1) else {
        return Err(Reply::error(SYNTAX));
    };
    let amount = parse_int(value).ok_or_else(|| Reply::error(NOT_INTEGER))?;
    let at = if absolute {
        if amount <= 0 {
            return Err(invalid_expire(command));
        }
        amount.checked_mul(unit).map(|at| at as u64)
    } else {
        expiry_in(amount, unit)
    };
    at.map(|at| Some((at, 2)))
        .ok_or_else(|| invalid_expire(command))
}

async fn set(cache: &Cache, args: &[Bytes]) -> Result<Reply, Reply> {
    if args.len() < 3 {
        return Err(arity(&args[0]));
    }
    let (mut nx, mut xx, mut get, mut keep_ttl) = (false, false, false, false);
    let mut expires_at = None;
    let mut index = 3;
    while index < args.len() {
        let option = &args[index];
        if let Some((at, used)) = parse_expiry(args, index, b"set")? {
            if expires_at.is_some() || keep_ttl {
                return Err(Reply::error(SYNTAX));
            }
            expires_at = Some(at);
            index += used;
            continue;
        }
        if option.eq_ignore_ascii_case(b"NX") && !xx {
            nx = true;
        } else if option.eq_ignore_ascii_case(b"XX") && !nx {
            xx = true;
        } else if option.eq_ignore_ascii_case(b"GET") {
            get = true;
        } else if option.eq_ignore_ascii_case(b"KEEPTTL") && expires_at.is_none() {
            keep_ttl = true;
        } else {
            return Err(Reply::error(SYNTAX));
        }
        index += 1;
    }
    let value = Bytes::copy_from_slice(&args[2]);
    if !(nx || xx || get || keep_ttl) {
        return Ok(
            match cache
                .set(
                    &args[1],
                    Entry {
                        value,
                        expires_at,
                        tags: None,
                    },
                )
                .await
            {
                Ok(()) => Reply::Ok,
                Err(error) => store_error(error),
            },
        );
    }
    let outcome = cache
        .mutate(&args[1], |current| {
            let old = current.map(|entry| entry.value.clone());
            if (nx && current.is_some()) || (xx && current.is_none()) {
                return Mutation::Keep((false, old));
            }
            let expires_at = if keep_ttl {
                current.and_then(|entry| entry.expires_at)
            } else {
                expires_at
            };
            Mutation::Put(
                Entry {
                    value: value.clone(),
                    expires_at,
                    tags: None,
                },
                (true, old),
            )
        })
        .await;
    Ok(match outcome {
        Ok((_, old)) if get => old.map_or(Reply::Null, Reply::Bulk),
        Ok((true, _)) => Reply::Ok,
        Ok((false, _)) => Reply::Null,
        Err(error) => store_error(error),
    })
}

async fn getex(cache: &Cache, args: &[Bytes]) -> Result<Reply, Reply> {
    if args.len() < 2 {
        return Err(arity(&args[0]));
    }
    let mut change = Expiry::Keep;
    let mut index = 2;
    while index < args.len() {
        if let Some((at, used)) = parse_expiry(args, index, b"getex")? {
            if change != Expiry::Keep {
                return Err(Reply::error(SYNTAX));
            }
            change = Expiry::At(at);
            index += used;
        } else if args[index].eq_ignore_ascii_case(b"PERSIST") && change == Expiry::Keep {
            change = Expiry::Clear;
            index += 1;
        } else {
            return Err(Reply::error(SYNTAX));
        }
    }
    let outcome = cache
        .mutate(&args[1], |current| {
            let Some(entry) = current else {
                return Mutation::Keep(None);
            };
            let value = Some(entry.value.clone());
            match change {
                Expiry::Keep => Mutation::Keep(value),
                Expiry::Clear => Mutation::Put(
                    Entry {
                        expires_at: None,
                        ..entry.clone()
                    },
                    value,
                ),
                Expiry::At(at) => Mutation::Put(
                    Entry {
                        expires_at: Some(at),
                        ..entry.clone()
                    },
                    value,
                ),
            }
        })
        .await;
    Ok(match outcome {
        Ok(Some(value)) => Reply::Bulk(value),
        Ok(None) => Reply::Null,
        Err(error) => store_error(error),
    })
}

async fn incr_by(cache: &Cache, key: &[u8], delta: i64) -> Reply {
    let outcome = cache
        .mutate(key, |current| {
            let base = match current {
                None => 0,
                Some(entry) => match parse_int(&entry.value) {
                    Some(value) => value,
                    None => return Mutation::Keep(Err(NOT_INTEGER)),
                },
            };
            let Some(next) = base.checked_add(delta) else {
                return Mutation::Keep(Err("ERR increment or decrement would overflow"));
            };
            let entry = Entry::replacing(current, Bytes::from(next.to_string()));
            Mutation::Put(entry, Ok(next))
        })
        .await;
    match outcome {
        Ok(Ok(value)) => Reply::Integer(value),
        Ok(Err(message)) => Reply::error(message),
        Err(error) => store_error(error),
    }
}

async fn incr_by_float(cache: &Cache, key: &[u8], delta: f64) -> Reply {
    let outcome = cache
        .mutate(key, |current| {
            let base = match current {
                None => 0.0,
                Some(entry) => match parse_float(&entry.value) {
                    Some(value) => value,
                    None => return Mutation::Keep(Err(NOT_FLOAT)),
                },
            };
            let next = base + delta;
            if !next.is_finite() {
                return Mutation::Keep(Err("ERR increment would produce NaN or Infinity"));
            }
            let text = format_float(next);
            let entry = Entry::replacing(current, Bytes::from(text.clone()));
            Mutation::Put(entry, Ok(text))
        })
        .await;
    match outcome {
        Ok(Ok(text)) => Reply::bulk(text),
        Ok(Err(message)) => Reply::error(message),
        Err(error) => store_error(error),
    }
}

async fn expire(cache: &Cache, command: &[u8], args: &[Bytes]) -> Result<Reply, Reply> {
    if args.len() < 3 {
        return Err(arity(&args[0]));
    }
    let amount = parse_int(&args[2]).ok_or_else(|| Reply::error(NOT_INTEGER))?;
    let (nx, xx, gt, lt) = {
        let mut flags = (false, false, false, false);
        for option in &args[3..] {
            if option.eq_ignore_ascii_case(b"NX") {
                flags.0 = true;
            } else if option.eq_ignore_ascii_case(b"XX") {
                flags.1 = true;
            } else if option.eq_ignore_ascii_case(b"GT") {
                flags.2 = true;
            } else if option.eq_ignore_ascii_case(b"LT") {
                flags.3 = true;
            } else {
                return Err(Reply::error(format!(
                    "ERR Unsupported option {}",
                    String::from_utf8_lossy(option)
                )));
            }
        }
        flags
    };
    if nx && (xx || gt || lt) {
        return Err(Reply::error(
            "ERR NX and XX, GT or LT options at the same time are not compatible",
        ));
    }
    if gt && lt {
        return Err(Reply::error(
            "ERR GT and LT options at the same time are not compatible",
        ));
    }
    let now = now_ms() as i64;
    let at: i64 = match command {
        b"EXPIRE" => amount.checked_mul(1000).and_then(|ms| ms.checked_add(now)),
        b"PEXPIRE" => amount.checked_add(now),
        b"EXPIREAT" => amount.checked_mul(1000),
        _ => Some(amount),
    }
    .ok_or_else(|| invalid_expire(command))?;
    let outcome = cache
        .mutate(&args[1], |current| {
            let Some(entry) = current else {
                return Mutation::Keep(0);
            };
            let existing = entry.expires_at.map(|at| at as i64);
            let allowed = (!nx || existing.is_none())
                && (!xx || existing.is_some())
                && (!gt || existing.is_some_and(|old| at > old))
                && (!lt || existing.is_none_or(|old| at < old));
            if !allowed {
                return Mutation::Keep(0);
            }
            if at <= now {
                // A time in the past deletes the key, as in Redis.
                return Mutation::Delete(1);
            }
            Mutation::Put(
                Entry {
                    expires_at: Some(at as u64),
                    ..entry.clone()
                },
                1,
            )
        })
        .await;
    Ok(match outcome {
        Ok(changed) => Reply::Integer(changed),
        Err(error) => store_error(error),
    })
}

async fn scan(context: &RespContext, args: &[Bytes]) -> Result<Reply, Reply> {
    if args.len() < 2 {
        return Err(arity(&args[0]));
    }
    let cursor: u64 = std::str::from_utf8(&args[1])
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| Reply::error("ERR invalid cursor"))?;
    let mut pattern = None;
    let mut count = 10usize;
    let mut only_strings = true;
    let mut index = 2;
    while index < args.len() {
        let value = args.get(index + 1).ok_or_else(|| Reply::error(SYNTAX))?;
        if args[index].eq_ignore_ascii_case(b"MATCH") {
            pattern = Some(Pattern::new(value));
        } else if args[index].eq_ignore_ascii_case(b"COUNT") {
            count = parse_int(value)
                .filter(|count| *count > 0)
                .ok_or_else(|| Reply::error(SYNTAX))?
                .min(100_000) as usize;
        } else if args[index].eq_ignore_ascii_case(b"TYPE") {
            only_strings = value.eq_ignore_ascii_case(b"string");
        } else {
            return Err(Reply::error(SYNTAX));
        }
        index += 2;
    }
    let after = if cursor == 0 {
        None
    } else {
        let cursors = context
            .cursors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Some(
            cursors
                .positions
                .get(&cursor)
                .cloned()
                .ok_or_else(|| Reply::error("ERR invalid cursor"))?,
        )
    };
    let (keys, more) = context
        .cache
        .scan(after.as_deref(), count)
        .await
        .map_err(store_error)?;
    let next = match (more, keys.last()) {
        (true, Some(last)) => context
            .cursors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .open(last.clone()),
        _ => 0,
    };
    let keys = keys
        .into_iter()
        .filter(|key| only_strings && pattern.as_ref().is_none_or(|pattern| pattern.matches(key)))
        .map(Reply::Bulk)
        .collect();
    Ok(Reply::Array(vec![
        Reply::text(&next.to_string()),
        Reply::Array(keys),
    ]))
}

fn auth(context: &RespContext, session: &mut Session, args: &[Bytes]) -> Reply {
    // `AUTH <user> <token>`: the user name is ignored, as clients send `default` or
    // whatever their URL holds; the token alone says who this is.
    let password = match args.len() {
        2 => &args[1],
        3 => &args[2],
        _ => return arity(&args[0]),
    };
    if !context.auth.is_enabled() {
        return Reply::error(
            "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
        );
    }
    match authenticate(context, session, password) {
        Ok(()) => Reply::Ok,
        Err(reply) => reply,
    }
}

/// Checks a token (or the password) for this connection: it must reach the cache.
fn authenticate(
    context: &RespContext,
    session: &mut Session,
    password: &[u8],
) -> Result<(), Reply> {
    match context.auth.authenticate(password, session.peer.ip()) {
        Ok(principal) if !principal.has_scope(Scope::Cache) => {
            Err(Reply::error("NOPERM this token has no access to the cache"))
        }
        Ok(principal) => {
            session.authenticated = true;
            session.principal = Some(principal);
            Ok(())
        }
        Err(AuthError::TooManyFailures(decision)) => Err(Reply::error(format!(
            "ERR too many failed authentications from this address; retry in {} s",
            decision.retry_after.unwrap_or_default().as_secs().max(1)
        ))),
        Err(_) => Err(Reply::error(
            "WRONGPASS invalid username-password pair or user is disabled.",
        )),
    }
}

/// Commands a read-only token may run: those that change no key. Anything not named
/// here counts as a write, so a command added later is refused until it is listed.
fn is_read_command(command: &[u8]) -> bool {
    matches!(
        command,
        b"GET"
            | b"MGET"
            | b"EXISTS"
            | b"TTL"
            | b"PTTL"
            | b"TYPE"
            | b"STRLEN"
            | b"KEYS"
            | b"SCAN"
            | b"DBSIZE"
            | b"PING"
            | b"ECHO"
            | b"SELECT"
            | b"INFO"
            | b"AUTH"
            | b"HELLO"
            | b"CLIENT"
            | b"COMMAND"
            | b"CONFIG"
            | b"QUIT"
    )
}

fn hello(context: &RespContext, session: &mut Session, args: &[Bytes]) -> Result<Reply, Reply> {
    let mut resp3 = session.resp3;
    let mut index = 1;
    if let Some(version) = args.get(1) {
        match parse_int(version) {
            Some(2) => resp3 = false,
            Some(3) => resp3 = true,
            Some(_) => return Err(Reply::error("NOPROTO unsupported protocol version")),
            None => {
                return Err(Reply::error(
                    "ERR Protocol version is not an integer or out of range",
                ));
            }
        }
        index = 2;
    }
    let mut name = None;
    while index < args.len() {
        if args[index].eq_ignore_ascii_case(b"AUTH") && index + 2 < args.len() {
            if context.auth.is_enabled() {
                authenticate(context, session, &args[index + 2])?;
            }
            index += 3;
        } else if args[index].eq_ignore_ascii_case(b"SETNAME") && index + 1 < args.len() {
            name = Some(args[index + 1].clone());
            index += 2;
        } else {
            return Err(Reply::error(format!(
                "ERR Syntax error in HELLO option '{}'",
                String::from_utf8_lossy(&args[index])
            )));
        }
    }
    if !session.authenticated {
        return Err(Reply::error(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
        ));
    }
    session.resp3 = resp3;
    if name.is_some() {
        session.name = name;
    }
    Ok(Reply::Map(vec![
        (Reply::text("server"), Reply::text("redis")),
        (Reply::text("version"), Reply::text(REDIS_VERSION)),
        (
            Reply::text("proto"),
            Reply::Integer(if resp3 { 3 } else { 2 }),
        ),
        (Reply::text("id"), Reply::Integer(session.id as i64)),
        (Reply::text("mode"), Reply::text("standalone")),
        (Reply::text("role"), Reply::text("master")),
        (Reply::text("modules"), Reply::Array(Vec::new())),
    ]))
}

fn client_info(session: &Session) -> String {
    let name = session
        .name
        .as_deref()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    format!(
        "id={} addr={} name={} db=0 resp={} lib-name=keel\n",
        session.id,
        session.peer,
        name,
        if session.resp3 { 3 } else { 2 }
    )
}

fn client(session: &mut Session, args: &[Bytes]) -> Reply {
    let Some(sub) = args.get(1) else {
        return arity(&args[0]);
    };
    let (buffer, length) = upper(sub);
    match (&buffer[..length], args.len()) {
        (b"SETNAME", 3) => {
            if args[2].iter().any(|byte| *byte == b' ' || *byte == b'\n') {
                return Reply::error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                );
            }
            session.name = (!args[2].is_empty()).then(|| args[2].clone());
            Reply::Ok
        }
        (b"GETNAME", 2) => session.name.clone().map_or(Reply::Null, Reply::Bulk),
        (b"ID", 2) => Reply::Integer(session.id as i64),
        (b"INFO", 2) => Reply::text(&client_info(session)),
        (b"SETINFO", 4) => Reply::Ok,
        (b"SETNAME" | b"GETNAME" | b"ID" | b"INFO" | b"SETINFO", _) => Reply::error(format!(
            "ERR wrong number of arguments for 'client|{}' command",
            String::from_utf8_lossy(sub).to_lowercase()
        )),
        _ => Reply::error(format!(
            "ERR unknown subcommand '{}'. Try CLIENT HELP.",
            String::from_utf8_lossy(sub)
        )),
    }
}

const COMMANDS: &[&str] = &[
    "append",
    "auth",
    "client",
    "command",
    "config",
    "dbsize",
    "decr",
    "decrby",
    "del",
    "echo",
    "exists",
    "expire",
    "expireat",
    "flushall",
    "flushdb",
    "get",
    "getdel",
    "getex",
    "hello",
    "incr",
    "incrby",
    "incrbyfloat",
    "info",
    "keys",
    "mget",
    "mset",
    "persist",
    "pexpire",
    "pexpireat",
    "ping",
    "psetex",
    "pttl",
    "quit",
    "scan",
    "select",
    "set",
    "setex",
    "setnx",
    "strlen",
    "ttl",
    "type",
    "unlink",
];

/// Enough of COMMAND for clients that ask at connect time (redis-cli asks for DOCS).
fn command_stub(args: &[Bytes]) -> Reply {
    let Some(sub) = args.get(1) else {
        return Reply::Array(Vec::new());
    };
    let (buffer, length) = upper(sub);
    match &buffer[..length] {
        b"COUNT" => Reply::Integer(COMMANDS.len() as i64),
        b"DOCS" => Reply::Map(Vec::new()),
        b"LIST" => Reply::Array(COMMANDS.iter().map(|name| Reply::text(name)).collect()),
        b"INFO" => Reply::Array(args[2..].iter().map(|_| Reply::Null).collect()),
        _ => Reply::error(format!(
            "ERR unknown subcommand '{}'. Try COMMAND HELP.",
            String::from_utf8_lossy(sub)
        )),
    }
}

/// CONFIG GET answers what redis-benchmark and clients ask at start; keel's real
/// configuration lives in keel.toml, not here.
fn config(args: &[Bytes]) -> Reply {
    let Some(sub) = args.get(1) else {
        return arity(&args[0]);
    };
    if sub.eq_ignore_ascii_case(b"GET") {
        if args.len() < 3 {
            return Reply::error("ERR wrong number of arguments for 'config|get' command");
        }
        let mut pairs = Vec::new();
        for parameter in &args[2..] {
            let value = match parameter.to_ascii_lowercase().as_slice() {
                b"save" => "",
                b"appendonly" => "no",
                b"databases" => "1",
                _ => continue,
            };
            pairs.push((Reply::Bulk(parameter.clone()), Reply::text(value)));
        }
        return Reply::Map(pairs);
    }
    if sub.eq_ignore_ascii_case(b"SET")
        || sub.eq_ignore_ascii_case(b"RESETSTAT")
        || sub.eq_ignore_ascii_case(b"REWRITE")
    {
        return Reply::error("ERR keel is configured in keel.toml; CONFIG SET is not supported");
    }
    Reply::error(format!(
        "ERR unknown subcommand '{}'. Try CONFIG HELP.",
        String::from_utf8_lossy(sub)
    ))
}

async fn info(context: &RespContext) -> Reply {
    let stats = context.cache.stats().await;
    let keys = stats.l2.as_ref().map_or(stats.l1.entries, |l2| l2.entries);
    let text = format!(
        "# Server\r\nredis_version:{REDIS_VERSION}\r\nkeel_version:{}\r\nredis_mode:standalone\r\nuptime_in_seconds:{}\r\n\r\n\
         # Clients\r\nconnected_clients:{}\r\n\r\n\
         # Memory\r\nused_memory:{}\r\nmaxmemory:{}\r\n\r\n\
         # Stats\r\nkeyspace_hits:{}\r\nkeyspace_misses:{}\r\nevicted_keys:{}\r\n\r\n\
         # Keyspace\r\ndb0:keys={keys},expires=0,avg_ttl=0\r\n",
        env!("CARGO_PKG_VERSION"),
        context.started.elapsed().as_secs(),
        context.connected.load(Ordering::Relaxed),
        stats.l1.bytes.unwrap_or(0),
        stats.l1.capacity_bytes.unwrap_or(0),
        stats.l1.hits + stats.l2.as_ref().map_or(0, |l2| l2.hits),
        stats.l2.as_ref().map_or(stats.l1.misses, |l2| l2.misses),
        stats.l1.evictions.unwrap_or(0),
    );
    Reply::bulk(text)
}
