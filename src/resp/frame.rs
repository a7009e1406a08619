//! RESP on the wire: a streaming request parser that never panics on any input, and the
//! reply encoder for RESP2 and RESP3.
//!
//! Requests are arrays of bulk strings (what every client sends) or inline commands
//! (what a person types into telnet). Anything else is a protocol error, answered as
//! Redis answers it, after which the connection is closed.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

/// Hard limits on what one request may make the server hold.
#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    /// Largest bulk string (a key or a value).
    pub max_bulk: usize,
    /// Most arguments in one command.
    pub max_args: usize,
    /// Longest inline command line.
    pub max_inline: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub &'static str);

/// A complete command: argument ranges into the first `consumed` bytes of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub args: Vec<Range<usize>>,
    pub consumed: usize,
}

/// Parses one command from the front of `buf`: `Ok(None)` means more bytes are needed.
pub fn parse_command(buf: &[u8], limits: &ParseLimits) -> Result<Option<Parsed>, ProtocolError> {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_multibulk(buf, limits),
        Some(_) => parse_inline(buf, limits),
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|pair| pair == b"\r\n")
        .map(|at| from + at)
}

/// A decimal integer as Redis writes lengths: optional `-`, digits, nothing else.
fn parse_length(digits: &[u8]) -> Option<i64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value: i64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(if negative { -value } else { value })
}

fn parse_multibulk(buf: &[u8], limits: &ParseLimits) -> Result<Option<Parsed>, ProtocolError> {
    let Some(line_end) = find_crlf(buf, 1) else {
        return if buf.len() > 32 {
            Err(ProtocolError("invalid multibulk length"))
        } else {
            Ok(None)
        };
    };
    let count = parse_length(&buf[1..line_end]).ok_or(ProtocolError("invalid multibulk length"))?;
    if count > limits.max_args as i64 {
        return Err(ProtocolError("invalid multibulk length"));
    }
    let mut at = line_end + 2;
    if count <= 0 {
        return Ok(Some(Parsed {
            args: Vec::new(),
            consumed: at,
        }));
    }
    let mut args = Vec::with_capacity((count as usize).min(1024));
    for _ in 0..count {
        match buf.get(at) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(_) => return Err(ProtocolError("expected '$', got something else")),
        }
        let Some(header_end) = find_crlf(buf, at + 1) else {
            return if buf.len() - at > 32 {
                Err(ProtocolError("invalid bulk length"))
            } else {
                Ok(None)
            };
        };
        let length =
            parse_length(&buf[at + 1..header_end]).ok_or(ProtocolError("invalid bulk length"))?;
        if length < 0 || length as usize > limits.max_bulk {
            return Err(ProtocolError("invalid bulk length"));
        }
        let start = header_end + 2;
        let end = start + length as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError("expected CRLF after bulk string"));
        }
        args.push(start..end);
        at = end + 2;
    }
    Ok(Some(Parsed { args, consumed: at }))
}

fn parse_inline(buf: &[u8], limits: &ParseLimits) -> Result<Option<Parsed>, ProtocolError> {
    let Some(newline) = buf.iter().position(|&byte| byte == b'\n') else {
        return if buf.len() > limits.max_inline {
            Err(ProtocolError("too big inline request"))
        } else {
            Ok(None)
        };
    };
    if newline > limits.max_inline {
        return Err(ProtocolError("too big inline request"));
    }
    let line_end = if newline > 0 && buf[newline - 1] == b'\r' {
        newline - 1
    } else {
        newline
    };
    let mut args = Vec::new();
    let mut at = 0;
    while at < line_end {
        while at < line_end && buf[at].is_ascii_whitespace() {
            at += 1;
        }
        let start = at;
        while at < line_end && !buf[at].is_ascii_whitespace() {
            at += 1;
        }
        if start < at {
            args.push(start..at);
        }
    }
    if args.len() > limits.max_args {
        return Err(ProtocolError("too big inline request"));
    }
    Ok(Some(Parsed {
        args,
        consumed: newline + 1,
    }))
}

/// A reply, encoded per the connection's protocol version.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Ok,
    Simple(&'static str),
    Status(String),
    /// The whole error line after `-`, e.g. `ERR syntax error` or `WRONGTYPE ...`.
    Error(String),
    Integer(i64),
    Bulk(Bytes),
    Null,
    Array(Vec<Reply>),
    /// A map in RESP3; a flat array of pairs in RESP2.
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    pub fn error(message: impl Into<String>) -> Reply {
        Reply::Error(message.into())
    }

    pub fn bulk(bytes: impl Into<Bytes>) -> Reply {
        Reply::Bulk(bytes.into())
    }

    pub fn text(text: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(text.as_bytes()))
    }

    pub fn encode(&self, resp3: bool, out: &mut BytesMut) {
        match self {
            Reply::Ok => out.put_slice(b"+OK\r\n"),
            Reply::Simple(text) => line(out, b'+', text.as_bytes()),
            Reply::Status(text) => line(out, b'+', text.as_bytes()),
            Reply::Error(text) => line(out, b'-', sanitize(text).as_bytes()),
            Reply::Integer(value) => line(out, b':', itoa::Buffer::new().format(*value).as_bytes()),
            Reply::Bulk(bytes) => {
                line(
                    out,
                    b'$',
                    itoa::Buffer::new().format(bytes.len()).as_bytes(),
                );
                out.put_slice(bytes);
                out.put_slice(b"\r\n");
            }
            Reply::Null if resp3 => out.put_slice(b"_\r\n"),
            Reply::Null => out.put_slice(b"$-1\r\n"),
            Reply::Array(items) => {
                line(
                    out,
                    b'*',
                    itoa::Buffer::new().format(items.len()).as_bytes(),
                );
                for item in items {
                    item.encode(resp3, out);
                }
            }
            Reply::Map(pairs) => {
                if resp3 {
                    line(
                        out,
                        b'%',
                        itoa::Buffer::new().format(pairs.len()).as_bytes(),
                    );
                } else {
                    line(
                        out,
                        b'*',
                        itoa::Buffer::new().format(pairs.len() * 2).as_bytes(),
                    );
                }
                for (key, value) in pairs {
                    key.encode(resp3, out);
                    value.encode(resp3, out);
                }
            }
        }
    }
}

fn line(out: &mut BytesMut, prefix: u8, body: &[u8]) {
    out.reserve(body.len() + 3);
    out.put_u8(prefix);
    out.put_slice(body);
    out.put_slice(b"\r\n");
}

/// Simple strings and errors cannot carry CR or LF.
fn sanitize(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains(['\r', '\n']) {
        text.replace(['\r', '\n'], " ").into()
    } else {
        text.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ParseLimits = ParseLimits {
        max_bulk: 1024,
        max_args: 16,
        max_inline: 64,
    };

    fn args(buf: &[u8]) -> Vec<&[u8]> {
        let parsed = parse_command(buf, &LIMITS).unwrap().unwrap();
        parsed
            .args
            .iter()
            .map(|range| &buf[range.clone()])
            .collect()
    }

    #[test]
    fn multibulk_and_inline() {
        assert_eq!(
            args(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
            vec![&b"GET"[..], b"k"]
        );
        assert_eq!(args(b"*1\r\n$0\r\n\r\n"), vec![&b""[..]]);
        assert_eq!(args(b"PING  hello\r\n"), vec![&b"PING"[..], b"hello"]);
        assert_eq!(
            args(b"*2\r\n$4\r\na\r\nb\r\n$1\r\nx\r\n"),
            vec![&b"a\r\nb"[..], b"x"]
        );
    }

    #[test]
    fn incomplete_input_waits() {
        let full = b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n";
        for cut in 0..full.len() {
            assert_eq!(
                parse_command(&full[..cut], &LIMITS),
                Ok(None),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn limits_and_garbage_are_errors() {
        assert!(parse_command(b"*17\r\n", &LIMITS).is_err());
        assert!(parse_command(b"*1\r\n$1025\r\n", &LIMITS).is_err());
        assert!(parse_command(b"*1\r\n:5\r\n", &LIMITS).is_err());
        assert!(parse_command(b"*x\r\n", &LIMITS).is_err());
        assert!(parse_command(b"*1\r\n$-5\r\n", &LIMITS).is_err());
        assert!(parse_command(b"*1\r\n$1\r\nab\r\n", &LIMITS).is_err());
        assert!(parse_command(&[b'a'; 100], &LIMITS).is_err());
        assert!(
            parse_command(b"*1\r\n*1\r\n$1\r\na\r\n", &LIMITS).is_err(),
            "nested arrays are refused"
        );
    }

    #[test]
    fn replies_per_protocol() {
        let mut out = BytesMut::new();
        Reply::Null.encode(false, &mut out);
        Reply::Null.encode(true, &mut out);
        Reply::Map(vec![(Reply::text("a"), Reply::Integer(1))]).encode(false, &mut out);
        Reply::Map(vec![(Reply::text("a"), Reply::Integer(1))]).encode(true, &mut out);
        Reply::error("ERR bad\r\nthing").encode(false, &mut out);
        assert_eq!(
            &out[..],
            b"$-1\r\n_\r\n*2\r\n$1\r\na\r\n:1\r\n%1\r\n$1\r\na\r\n:1\r\n-ERR bad  thing\r\n"
        );
    }
}
