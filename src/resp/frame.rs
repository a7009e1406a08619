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
    RequestParser::default().parse(buf, limits)
}

/// A parser that remembers how far it got in an incomplete command, so a large command
/// arriving in many reads is scanned once, not once per read. The buffer it is given
/// must only grow at the end between calls until a command completes.
#[derive(Debug, Default)]
pub struct RequestParser {
    /// Arguments of the command in progress.
    args: Vec<Range<usize>>,
    /// Where parsing resumes: after the last complete argument, or how far an inline
    /// line was searched for its end.
    resume_at: usize,
    /// Arguments still expected by the multibulk in progress.
    expected: Option<usize>,
}

impl RequestParser {
    pub fn parse(
        &mut self,
        buf: &[u8],
        limits: &ParseLimits,
    ) -> Result<Option<Parsed>, ProtocolError> {
        let outcome = match buf.first() {
            None => Ok(None),
            Some(b'*') => self.parse_multibulk(buf, limits),
            Some(_) => self.parse_inline(buf, limits),
        };
        if !matches!(outcome, Ok(None)) {
            *self = RequestParser::default();
        }
        outcome
    }

    fn parse_multibulk(
        &mut self,
        buf: &[u8],
        limits: &ParseLimits,
    ) -> Result<Option<Parsed>, ProtocolError> {
        if self.expected.is_none() {
            let Some(line_end) = find_crlf(buf, 1) else {
                return if buf.len() > 32 {
                    Err(ProtocolError("invalid multibulk length"))
                } else {
                    Ok(None)
                };
            };
            let count =
                parse_length(&buf[1..line_end]).ok_or(ProtocolError("invalid multibulk length"))?;
            if count > limits.max_args as i64 {
                return Err(ProtocolError("invalid multibulk length"));
            }
            self.resume_at = line_end + 2;
            if count <= 0 {
                return Ok(Some(Parsed {
                    args: Vec::new(),
                    consumed: self.resume_at,
                }));
            }
            self.expected = Some(count as usize);
            self.args = Vec::with_capacity((count as usize).min(1024));
        }
        let mut at = self.resume_at;
        while self.args.len() < self.expected.unwrap_or(0) {
            match buf.get(at) {
                None => break,
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
            let length = parse_length(&buf[at + 1..header_end])
                .ok_or(ProtocolError("invalid bulk length"))?;
            if length < 0 || length as usize > limits.max_bulk {
                return Err(ProtocolError("invalid bulk length"));
            }
            let start = header_end + 2;
            let end = start + length as usize;
            if buf.len() < end + 2 {
                break;
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError("expected CRLF after bulk string"));
            }
            self.args.push(start..end);
            at = end + 2;
            self.resume_at = at;
        }
        if Some(self.args.len()) == self.expected {
            return Ok(Some(Parsed {
                args: std::mem::take(&mut self.args),
                consumed: self.resume_at,
            }));
        }
        Ok(None)
    }

    fn parse_inline(
        &mut self,
        buf: &[u8],
        limits: &ParseLimits,
    ) -> Result<Option<Parsed>, ProtocolError> {
        let from = self.resume_at.min(buf.len());
        let Some(newline) = buf[from..]
            .iter()
            .position(|&byte| byte == b'\n')
            .map(|at| from + at)
        else {
            self.resume_at = buf.len();
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
    fn resuming_gives_the_same_commands_as_parsing_at_once() {
        let full = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\nPING\r\n";
        for chunk in 1..8 {
            let mut parser = RequestParser::default();
            let mut commands = Vec::new();
            let mut start = 0;
            for end in (chunk..=full.len())
                .step_by(chunk)
                .chain(std::iter::once(full.len()))
            {
                while let Some(parsed) = parser.parse(&full[start..end], &LIMITS).unwrap() {
                    let slice = &full[start..end];
                    commands.push(
                        parsed
                            .args
                            .iter()
                            .map(|r| slice[r.clone()].to_vec())
                            .collect::<Vec<_>>(),
                    );
                    start += parsed.consumed;
                }
            }
            assert_eq!(
                commands,
                vec![
                    vec![b"SET".to_vec(), b"k".to_vec(), b"hello".to_vec()],
                    vec![b"PING".to_vec()]
                ]
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
