//! Keel: one binary for a site's backend — cache, job queue, reverse proxy, SQL data
//! API, metrics and dashboard — on embedded storage, or on PostgreSQL and Redis when
//! scaled out.
//!
//! # Layout
//! - `cli`: the command line; maps outcomes to exit codes. The only module that prints.
//! - `app`: start-up and shutdown in order, signals, SIGHUP reload, systemd notify.
//! - `config`: the configuration contract, its layering (file, `KEEL_*`, flags) and
//!   validation with key paths and lines.
//! - `listener`: bound sockets with TLS, connection limits and graceful shutdown.
//! - `auth`: who may call the api (the admin secret today; tokens later).
//! - `http`: the api listener's router and the problem+json error mapping.
//! - `dashboard`: the browser dashboard's files (`web/`), embedded and served at `/`.
//! - `observe`: Prometheus registry, logging, readiness.
//! - `ratelimit`: keyed rate limits for gateway routes, the api and queues.
//! - `storage`: the data directory, its lock, database files and migrations.
//!
//! See ARCHITECTURE.md for the invariants that hold between them.

pub mod app;
pub mod auth;
pub mod backends;
pub mod cache;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod gateway;
pub mod http;
pub mod listener;
pub mod observe;
pub mod pg_pool;
pub mod queue;
pub mod ratelimit;
pub mod redis_client;
pub mod resp;
pub mod sql;
pub mod storage;
