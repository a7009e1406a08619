#![allow(unreachable_pub)] // Helpers are `pub` for the sibling modules of this test binary.
#![allow(clippy::print_stderr)] // Tests say on stderr which external checks they skip.

//! One integration-test binary (it links once). Tests run the real `keel` binary, or the
//! library's router in process where a state cannot be reached from outside.

mod support;

mod auth;
mod cache;
mod config;
mod dashboard;
mod demo;
mod gateway;
mod lifecycle;
mod pg_stat_statements;
mod queue;
mod queue_crash;
mod resp;
mod scaled;
mod scaleout;
mod sql;
mod sql_backends;
mod tls;
