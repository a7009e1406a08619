//! The RESP listener: accepts connections and runs each one's read → parse → execute →
//! write loop. Replies to pipelined commands are written in one batch per read, which
//! is what makes pipelining fast; a client that stops reading its replies stops being
//! read from once its pending output passes `OUTPUT_FLUSH`.
//!
//! With a shared L2 (Redis) a write is answered only once Redis stored it. The commands
//! of one read do not wait for that one by one: each write is issued, and its reply
//! waits (`Unsettled`) until the read's commands have run, so a pipeline of writes
//! costs one round trip to Redis. A read settles the connection's writes before it
//! first, so it never answers with a write of its own that Redis may still refuse.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::commands::{Flow, RespContext, Session, execute, is_read, store_error};
use super::frame::{ParseLimits, Reply, RequestParser};
use crate::cache::Unconfirmed;
use crate::listener::Listener;

/// Output beyond this is written before more commands run.
const OUTPUT_FLUSH: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;

#[derive(Clone)]
pub struct RespMetrics {
    connections: IntGauge,
    commands: IntCounter,
    protocol_errors: IntCounter,
}

impl RespMetrics {
    pub fn new(registry: &Registry) -> RespMetrics {
        let metrics = RespMetrics {
            connections: IntGauge::new("keel_resp_connections", "Open RESP connections.")
                .expect("valid metric"),
            commands: IntCounter::new("keel_resp_commands_total", "RESP commands executed.")
                .expect("valid metric"),
            protocol_errors: IntCounter::new(
                "keel_resp_protocol_errors_total",
                "RESP connections closed for malformed or oversized input.",
            )
            .expect("valid metric"),
        };
        let _ = registry.register(Box::new(metrics.connections.clone()));
        let _ = registry.register(Box::new(metrics.commands.clone()));
        let _ = registry.register(Box::new(metrics.protocol_errors.clone()));
        metrics
    }
}

/// Serves until `shutdown`, then closes idle connections, lets each busy one finish its
/// current command, and waits up to `drain` for them.
pub async fn serve_resp(
    listener: Listener,
    context: Arc<RespContext>,
    limits: ParseLimits,
    metrics: RespMetrics,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let connection_shutdown = shutdown.clone();
    listener
        .serve(shutdown, drain, move |stream, peer| {
            let (context, metrics, shutdown) = (
                context.clone(),
                metrics.clone(),
                connection_shutdown.clone(),
            );
            async move {
                metrics.connections.inc();
                context.connected.fetch_add(1, Ordering::Relaxed);
                connection(stream, peer, &context, &limits, &metrics, &shutdown).await;
                context.connected.fetch_sub(1, Ordering::Relaxed);
                metrics.connections.dec();
            }
        })
        .await;
}

/// A reply whose command's writes a shared L2 has not confirmed yet, and the protocol
/// it is to be encoded in.
struct Unsettled {
    reply: Reply,
    resp3: bool,
    writes: Unconfirmed,
}

/// Encodes the waiting replies in order, each turned into the error if its writes were
/// not stored.
async fn settle(unsettled: &mut VecDeque<Unsettled>, output: &mut BytesMut) {
    for Unsettled {
        reply,
        resp3,
        writes,
    } in unsettled.drain(..)
    {
        let reply = match writes.confirmed().await {
            Ok(()) => reply,
            Err(error) => store_error(error),
        };
        reply.encode(resp3, output);
    }
}

async fn connection<IO>(
    mut stream: IO,
    peer: SocketAddr,
    context: &RespContext,
    limits: &ParseLimits,
    metrics: &RespMetrics,
    shutdown: &CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session {
        id: context.next_client_id.fetch_add(1, Ordering::Relaxed),
        peer,
        name: None,
        resp3: false,
        authenticated: !context.auth.is_enabled(),
        principal: None,
    };
    let cache = context.cache.pipelined();
    let mut unsettled = VecDeque::new();
    let mut parser = RequestParser::default();
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut output = BytesMut::with_capacity(READ_CHUNK);
    loop {
        loop {
            let parsed = match parser.parse(&input, limits) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break,
                Err(error) => {
                    metrics.protocol_errors.inc();
                    tracing::debug!(%peer, %error, "closing RESP connection");
                    settle(&mut unsettled, &mut output).await;
                    Reply::error(format!("ERR {error}")).encode(session.resp3, &mut output);
                    let _ = stream.write_all(&output).await;
                    return;
                }
            };
            let frame: Bytes = input.split_to(parsed.consumed).freeze();
            if parsed.args.is_empty() {
                continue;
            }
            let args: Vec<Bytes> = parsed
                .args
                .into_iter()
                .map(|range| frame.slice(range))
                .collect();
            metrics.commands.inc();
            if !unsettled.is_empty() && is_read(&args[0]) {
                settle(&mut unsettled, &mut output).await;
            }
            let (reply, flow) = execute(context, &cache, &mut session, &args).await;
            let writes = cache.take_unconfirmed();
            if writes.is_empty() && unsettled.is_empty() {
                reply.encode(session.resp3, &mut output);
            } else {
                unsettled.push_back(Unsettled {
                    reply,
                    resp3: session.resp3,
                    writes,
                });
            }
            if flow == Flow::Close {
                settle(&mut unsettled, &mut output).await;
                let _ = stream.write_all(&output).await;
                return;
            }
            if output.len() >= OUTPUT_FLUSH {
                if stream.write_all(&output).await.is_err() {
                    return;
                }
                output.clear();
            }
        }
        settle(&mut unsettled, &mut output).await;
        if !output.is_empty() {
            if stream.write_all(&output).await.is_err() {
                return;
            }
            output.clear();
        }
        if shutdown.is_cancelled() {
            return;
        }
        input.reserve(READ_CHUNK);
        tokio::select! {
            read = stream.read_buf(&mut input) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            () = shutdown.cancelled() => return,
        }
    }
}
