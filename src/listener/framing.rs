//! A look at HTTP/1 request heads as they arrive, before hyper parses them, for the one
//! smuggling signal hyper resolves silently: a head with both Content-Length and
//! Transfer-Encoding (hyper drops the length and lets chunked win). A proxy must not
//! forward such a request at all, so the gateway needs to know.
//!
//! The tracker follows the request framing (heads, fixed-length and chunked bodies) to
//! find each head, and queues one flag per head. Requests are dispatched in order, so
//! the request extension takes the flags in the same order. It stops tracking at the
//! first ambiguous head (that connection is closed after the 400), at an HTTP/2
//! preface, or when a head is larger than any hyper accepts.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const MAX_HEAD: usize = 64 * 1024;
const MAX_PENDING: usize = 1024;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Request extension: whether this request's head carried ambiguous framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmbiguousFraming(pub bool);

/// The flags of the heads seen on one connection, oldest first.
#[derive(Clone, Default)]
pub(super) struct HeadFlags(Arc<Mutex<VecDeque<bool>>>);

impl HeadFlags {
    /// The flag of the next request on this connection (false when unknown).
    pub(super) fn next(&self) -> AmbiguousFraming {
        AmbiguousFraming(
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
                .unwrap_or(false),
        )
    }

    fn push(&self, ambiguous: bool) -> bool {
        let mut flags = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if flags.len() >= MAX_PENDING {
            return false;
        }
        flags.push_back(ambiguous);
        true
    }
}

enum State {
    Head(Vec<u8>),
    Fixed(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers(Vec<u8>),
    Off,
}

struct Tracker {
    state: State,
    flags: HeadFlags,
    first: bool,
}

impl Tracker {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // The usual case, a whole head in one read, is looked at where it lies.
            if !self.first
                && matches!(&self.state, State::Head(buffer) if buffer.is_empty())
                && let Some(end) = find(bytes, b"\r\n\r\n")
            {
                self.state = self.after_head(&bytes[..end]);
                bytes = &bytes[end + 4..];
                continue;
            }
            match &mut self.state {
                State::Off => return,
                State::Head(_) | State::Trailers(_) => {
                    let (mut buffer, trailers) =
                        match std::mem::replace(&mut self.state, State::Off) {
                            State::Head(buffer) => (buffer, false),
                            State::Trailers(buffer) => (buffer, true),
                            _ => unreachable!("matched above"),
                        };
                    let before = buffer.len();
                    buffer.extend_from_slice(bytes);
                    if self.first {
                        // HTTP/2 has no such framing problem: stop at its preface.
                        let seen = buffer.len().min(H2_PREFACE.len());
                        if buffer[..seen] != H2_PREFACE[..seen] {
                            self.first = false;
                        } else if seen == H2_PREFACE.len() {
                            return;
                        }
                    }
                    // An empty trailer section is a lone CRLF; a head ends with an empty line.
                    let end = if trailers && buffer.starts_with(b"\r\n") {
                        Some((0, 2))
                    } else {
                        find(&buffer, b"\r\n\r\n").map(|end| (end, end + 4))
                    };
                    let Some((head_len, consumed)) = end else {
                        if buffer.len() <= MAX_HEAD {
                            self.state = if trailers {
                                State::Trailers(buffer)
                            } else {
                                State::Head(buffer)
                            };
                        }
                        return;
                    };
                    bytes = &bytes[(consumed - before).min(bytes.len())..];
                    self.state = if trailers {
                        State::Head(Vec::new())
                    } else {
                        self.after_head(&buffer[..head_len])
                    };
                }
                State::Fixed(remaining) => {
                    let take = (*remaining).min(bytes.len() as u64);
                    *remaining -= take;
                    bytes = &bytes[take as usize..];
                    if *remaining == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => {
                    let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
                        line.extend_from_slice(bytes);
                        if line.len() > 1024 {
                            self.state = State::Off;
                        }
                        return;
                    };
                    line.extend_from_slice(&bytes[..end]);
                    bytes = &bytes[end + 1..];
                    let text = String::from_utf8_lossy(line);
                    let digits = text.split(';').next().unwrap_or("").trim();
                    self.state = match u64::from_str_radix(digits, 16) {
                        Ok(0) => State::Trailers(Vec::new()),
                        Ok(size) => State::ChunkData(size),
                        Err(_) => State::Off,
                    };
                }
                State::ChunkData(remaining) => {
                    let take = (*remaining).min(bytes.len() as u64);
                    *remaining -= take;
                    bytes = &bytes[take as usize..];
                    if *remaining == 0 {
                        self.state = State::ChunkEnd(2);
                    }
                }
                State::ChunkEnd(left) => {
                    let take = usize::from(*left).min(bytes.len());
                    *left -= take as u8;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
            }
        }
    }

    /// Records the head's flag and says how its body is framed.
    fn after_head(&mut self, head: &[u8]) -> State {
        let text = String::from_utf8_lossy(head);
        let mut length: Option<u64> = None;
        let mut lengths = 0;
        let mut chunked = false;
        let mut codings = false;
        for line in text.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let name = name.trim();
            if name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                length = value.trim().parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                codings = true;
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            }
        }
        let ambiguous = lengths > 0 && codings;
        if !self.flags.push(ambiguous) || ambiguous {
            return State::Off;
        }
        match (chunked, length) {
            (true, _) => State::ChunkSize(Vec::new()),
            (false, Some(0) | None) => State::Head(Vec::new()),
            (false, Some(length)) => State::Fixed(length),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A stream whose incoming bytes pass the tracker on their way to hyper.
pub(super) struct Inspected<S> {
    inner: S,
    tracker: Tracker,
}

impl<S> Inspected<S> {
    pub(super) fn new(inner: S) -> (Inspected<S>, HeadFlags) {
        let flags = HeadFlags::default();
        (
            Inspected {
                inner,
                tracker: Tracker {
                    state: State::Head(Vec::new()),
                    flags: flags.clone(),
                    first: true,
                },
            },
            flags,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Inspected<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            this.tracker.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inspected<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags_of(chunks: &[&[u8]]) -> Vec<bool> {
        let (mut inspected, flags) = Inspected::new(tokio::io::empty());
        for chunk in chunks {
            inspected.tracker.feed(chunk);
        }
        let mut out = Vec::new();
        while let Some(flag) = flags.0.lock().unwrap().pop_front() {
            out.push(flag);
        }
        out
    }

    #[test]
    fn heads_are_found_across_bodies_and_reads() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
POST /d HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(flags_of(&[stream]), [false, false, false, true]);
        // The same bytes one at a time.
        let single: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(flags_of(&single), [false, false, false, true]);
    }

    #[test]
    fn chunked_trailers_and_http2_are_handled() {
        let trailers: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(flags_of(&[trailers]), [false, true]);
        assert!(flags_of(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).is_empty());
    }
}
