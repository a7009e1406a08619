//! Rate limiting for the gateway's routes, the api listener and queues.
//!
//! Who counts as one client: [`KeyKind`] from a route's `rate_limit.key`, and the
//! fixed-size [`Key`] it derives from a request. The client address is the caller's
//! decision (the gateway applies its trusted proxies); `X-Forwarded-For` is never read
//! here.

mod key;
#[cfg(test)]
mod tests;

pub use key::{Key, KeyKind, KeyKindError};
