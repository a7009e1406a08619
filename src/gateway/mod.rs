//! The gateway: the reverse proxy in front of the site's upstreams.

pub mod cache_policy;
pub mod compress;
