//! Keep-alive HTTP/1.1 connections to one upstream server, driven by the request that
//! uses them.
//!
//! hyper's pooled client gives every connection a task of its own and hands each
//! request and response across to it through channels; a proxy pays that hop twice per
//! request. Here a connection has no task: the request future polls it until the
//! response head arrives, then the response body polls it while the client reads. When
//! the body has ended, the connection goes back to the idle list (newest first, so the
//! busy set stays warm and the rest age out). A connection is idle only between two
//! exchanges, so nothing needs to watch it; a checkout polls it once, which notices a
//! close by the server, and drops it if it has idled longer than `idle_timeout`.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// At most this many idle connections are kept per server (NGINX's `keepalive`).
pub(super) const MAX_IDLE: usize = 256;

type Conn = Connection<TokioIo<TcpStream>, Body>;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    /// No connection could be made: the request never reached the server.
    #[error("connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    /// The connection broke or the response was malformed; the request may have
    /// reached the server.
    #[error(transparent)]
    Exchange(#[from] hyper::Error),
}

impl SendError {
    pub(super) fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. })
    }
}

struct Idle {
    sender: SendRequest<Body>,
    connection: Conn,
    since: Instant,
}

/// The idle connections to one server and how new ones are made.
pub(super) struct Connections {
    address: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Oldest at the front, newest at the back.
    idle: Mutex<VecDeque<Idle>>,
    /// This server's `keel_gateway_upstream_idle_connections`, so the bound is visible.
    idle_gauge: prometheus::IntGauge,
}

impl Connections {
    pub(super) fn new(
        address: String,
        connect_timeout: Duration,
        idle_timeout: Duration,
        idle_gauge: prometheus::IntGauge,
    ) -> Connections {
        Connections {
            address,
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(VecDeque::new()),
            idle_gauge,
        }
    }

    /// Sends `request` (origin-form target, Host header set by the caller) and returns
    /// the response; its body keeps the connection, which goes back to the idle list
    /// once the body has been read to its end.
    pub(super) async fn send(
        self: &Arc<Self>,
        request: hyper::Request<Body>,
    ) -> Result<hyper::Response<PooledBody>, SendError> {
        let (mut request, request_sent) = track_body(request);
        loop {
            let (mut idle, reused) = match self.checkout().await {
                Some(idle) => (idle, true),
                None => (self.connect().await?, false),
            };
            let mut exchange = std::pin::pin!(idle.sender.try_send_request(request));
            let mut closed = false;
            let outcome = poll_fn(|cx| {
                if !closed && Pin::new(&mut idle.connection).poll(cx).is_ready() {
                    closed = true;
                }
                exchange.as_mut().poll(cx)
            })
            .await;
            match outcome {
                Ok(response) => {
                    let (parts, incoming) = response.into_parts();
                    let body = PooledBody {
                        incoming,
                        idle: (!closed).then_some(idle),
                        owner: self.clone(),
                        ended: false,
                        request_sent: request_sent.clone(),
                    };
                    return Ok(hyper::Response::from_parts(parts, body));
                }
                Err(mut error) => match error.take_message() {
                    // A reused connection the server had closed before it took the
                    // request: nothing was sent, so a fresh connection may carry it.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Exchange(error.into_error())),
                },
            }
        }
    }

    /// The newest idle connection that is still open, ready and not past its idle time.
    async fn checkout(&self) -> Option<Idle> {
        loop {
            let mut idle = {
                let mut list = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                let idle = list.pop_back()?;
                self.idle_gauge.dec();
                idle
            };
            if idle.since.elapsed() >= self.idle_timeout {
                // Everything older sits below it in the list: let it all go.
                let stale: VecDeque<Idle> =
                    std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
                self.idle_gauge.sub(stale.len() as i64);
                continue;
            }
            // One poll lets the connection finish the last exchange or notice a close.
            let ready = poll_fn(|cx| {
                if Pin::new(&mut idle.connection).poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                match idle.sender.poll_ready(cx) {
                    Poll::Ready(result) => Poll::Ready(result.is_ok()),
                    Poll::Pending => Poll::Ready(false),
                }
            })
            .await;
            if ready {
                return Some(idle);
            }
        }
    }

    async fn connect(&self) -> Result<Idle, SendError> {
        let failed = |reason: String| SendError::Connect {
            address: self.address.clone(),
            reason,
        };
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.address.as_str()),
        )
        .await
        .map_err(|_| failed(format!("timed out after {:?}", self.connect_timeout)))?
        .map_err(|error| failed(error.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|error| failed(error.to_string()))?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| failed(error.to_string()))?;
        Ok(Idle {
            sender,
            connection,
            since: Instant::now(),
        })
    }

    /// Keeps a connection for the next request, and closes the oldest ones that have
    /// idled past `idle_timeout`: the newest carry the traffic, so the extra
    /// connections of a burst would otherwise linger until the next burst.
    fn give_back(&self, mut idle: Idle) {
        idle.since = Instant::now();
        let mut closing = Vec::new();
        {
            let mut list = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            while list
                .front()
                .is_some_and(|oldest| oldest.since.elapsed() >= self.idle_timeout)
            {
                closing.extend(list.pop_front());
                self.idle_gauge.dec();
            }
            if list.len() < MAX_IDLE {
                list.push_back(idle);
                self.idle_gauge.inc();
            } else {
                closing.push(idle);
            }
        }
        drop(closing);
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        let left = self.idle.get_mut().map_or(0, |list| list.len());
        self.idle_gauge.sub(left as i64);
    }
}

/// The request with its body (if it has one) wrapped to tell when the connection has
/// let go of it: written to its end, or given up.
fn track_body(request: hyper::Request<Body>) -> (hyper::Request<Body>, Option<Arc<AtomicBool>>) {
    use hyper::body::Body as _;
    if request.body().is_end_stream() {
        return (request, None);
    }
    let sent = Arc::new(AtomicBool::new(false));
    let flag = sent.clone();
    // The flag goes up when the body (and the closure holding it) is dropped.
    let raised = SentOnDrop(flag);
    let request = request.map(|inner| {
        Body::new(http_body_util::BodyExt::map_frame(inner, move |frame| {
            let _ = &raised;
            frame
        }))
    });
    (request, Some(sent))
}

/// Raises a request body's flag when dropped: the connection drops the body once it has
/// written the last byte (or failed), without always polling it to its end.
struct SentOnDrop(Arc<AtomicBool>);

impl Drop for SentOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// An upstream response body. Reading it drives its connection; once it has ended the
/// connection is reused, and if it is dropped before that the connection is closed (what
/// is left of this response would otherwise be read as the next one).
pub(super) struct PooledBody {
    incoming: Incoming,
    idle: Option<Idle>,
    owner: Arc<Connections>,
    /// A chunked body only says it has ended by yielding `None`.
    ended: bool,
    /// Set once the connection has let go of the request body; `None`: there was none.
    request_sent: Option<Arc<AtomicBool>>,
}

impl hyper::body::Body for PooledBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Some(idle) = this.idle.as_mut()
            && Pin::new(&mut idle.connection).poll(cx).is_ready()
        {
            this.idle = None;
        }
        let polled = Pin::new(&mut this.incoming).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An upstream may answer before it has read the whole request (an early 413,
        // NGINX's `return`): that connection is still sending, and is closed instead.
        let request_sent = self
            .request_sent
            .as_ref()
            .is_none_or(|sent| sent.load(Ordering::Acquire));
        if (self.ended || self.incoming.is_end_stream())
            && request_sent
            && let Some(idle) = self.idle.take()
        {
            self.owner.give_back(idle);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// How the test upstream frames its answers and whether it keeps the connection.
    #[derive(Clone, Copy)]
    enum Answer {
        Fixed,
        Chunked,
        /// Answers with a length, then closes the socket without saying so.
        FixedThenClose,
    }

    /// A real HTTP/1.1 server on 127.0.0.1:0 that counts the connections it accepts.
    async fn upstream(answer: Answer) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buffer = [0u8; 1024];
                    loop {
                        let Ok(read) = stream.read(&mut buffer).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        head.extend_from_slice(&buffer[..read]);
                        if !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            continue;
                        }
                        head.clear();
                        let reply: &[u8] = match answer {
                            Answer::Fixed | Answer::FixedThenClose => {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
                            }
                            Answer::Chunked => {
                                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                            }
                        };
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                        if let Answer::FixedThenClose = answer {
                            return;
                        }
                    }
                });
            }
        });
        (address, accepted)
    }

    fn connections(address: &str, idle_timeout: Duration) -> Arc<Connections> {
        Arc::new(Connections::new(
            address.to_owned(),
            Duration::from_secs(2),
            idle_timeout,
            prometheus::IntGauge::new("idle", "idle connections").unwrap(),
        ))
    }

    fn get(address: &str) -> hyper::Request<Body> {
        hyper::Request::get("/x")
            .header(hyper::header::HOST, address)
            .body(Body::empty())
            .unwrap()
    }

    async fn read_body(connections: &Arc<Connections>, address: &str) -> String {
        let response = connections.send(get(address)).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_has_been_read() {
        for answer in [Answer::Fixed, Answer::Chunked] {
            let (address, accepted) = upstream(answer).await;
            let connections = connections(&address, Duration::from_secs(60));
            for _ in 0..3 {
                assert_eq!(read_body(&connections, &address).await, "hello");
            }
            // A request body written to its end leaves the connection reusable too.
            let post = hyper::Request::post("/x")
                .header(hyper::header::HOST, &address)
                .body(Body::from("abcde"))
                .unwrap();
            let response = connections.send(post).await.unwrap();
            response.into_body().collect().await.unwrap();
            assert_eq!(read_body(&connections, &address).await, "hello");
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
            assert_eq!(connections.idle_gauge.get(), 1);
        }
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_the_connection() {
        let (address, accepted) = upstream(Answer::Chunked).await;
        let connections = connections(&address, Duration::from_secs(60));
        let response = connections.send(get(&address)).await.unwrap();
        assert_eq!(response.status(), 200);
        drop(response);
        assert_eq!(connections.idle_gauge.get(), 0);
        assert_eq!(read_body(&connections, &address).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_replaced() {
        let (address, accepted) = upstream(Answer::FixedThenClose).await;
        let connections = connections(&address, Duration::from_secs(60));
        assert_eq!(read_body(&connections, &address).await, "hello");
        // The server's FIN may or may not have arrived by the next checkout; either
        // way the request goes out on a fresh connection and succeeds.
        assert_eq!(read_body(&connections, &address).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_idle_past_its_timeout_is_not_reused() {
        let (address, accepted) = upstream(Answer::Fixed).await;
        let connections = connections(&address, Duration::ZERO);
        assert_eq!(read_body(&connections, &address).await, "hello");
        assert_eq!(read_body(&connections, &address).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(connections.idle_gauge.get(), 1, "only the newest is kept");

        // Two at once need two new connections (the idle one is past its time); when
        // the second comes back, the first has idled past the (zero) timeout and is
        // closed.
        let (first, second) = tokio::join!(
            connections.send(get(&address)),
            connections.send(get(&address))
        );
        let (first, second) = (first.unwrap(), second.unwrap());
        first.into_body().collect().await.unwrap();
        second.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        assert_eq!(connections.idle_gauge.get(), 1);
    }

    #[tokio::test]
    async fn an_early_answer_arrives_while_the_request_body_is_still_sent() {
        // The server answers as soon as it has the head, as NGINX does for `return`.
        let (address, _accepted) = upstream(Answer::Fixed).await;
        let connections = connections(&address, Duration::from_secs(60));
        let (sender, receiver) =
            tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
        let chunks = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|chunk| (chunk, receiver))
        });
        let body = Body::from_stream(chunks);
        let request = hyper::Request::post("/x")
            .header(hyper::header::HOST, &address)
            .header(hyper::header::CONTENT_LENGTH, "10")
            .body(body)
            .unwrap();
        sender
            .send(Ok(bytes::Bytes::from_static(b"01234")))
            .await
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), connections.send(request))
            .await
            .expect("the head arrives")
            .unwrap();
        let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
            .await
            .expect("the body arrives")
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"hello");
        assert_eq!(
            connections.idle_gauge.get(),
            0,
            "a connection still sending its request is not reused"
        );
        assert!(
            sender
                .send(Ok(bytes::Bytes::from_static(b"56789")))
                .await
                .is_err(),
            "the rest of the request body is not waited for"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = unused.local_addr().unwrap().to_string();
        drop(unused);
        let connections = connections(&address, Duration::from_secs(60));
        let Err(error) = connections.send(get(&address)).await else {
            panic!("nothing listens on {address}");
        };
        assert!(error.is_connect(), "{error}");
    }
}
