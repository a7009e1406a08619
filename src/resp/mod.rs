//! Redis-protocol access to the cache (RESP2, and RESP3 after `HELLO 3`), on the resp
//! listener. The only module besides `http/` that knows a wire format: `frame.rs`
//! parses requests and encodes replies, `commands.rs` maps commands onto the `Cache`
//! handle, `server.rs` runs connections.

mod commands;
mod frame;
mod server;

pub use commands::RespContext;
pub use frame::{ParseLimits, ProtocolError, Reply, RequestParser, parse_command};
pub use server::{RespMetrics, serve_resp};
