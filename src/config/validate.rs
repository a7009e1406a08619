//! Checks of meaning that types alone cannot express: references between sections,
//! ranges, URL schemes, cron expressions, and the rule that keel never listens beyond
//! loopback without authentication.
//!
//! Every check appends to one list, so an operator sees all problems in one run.

use std::net::SocketAddr;
use std::time::Duration;

use super::schema::{Config, Loader, Processor};

type Problems = Vec<(String, String)>;

/// Queue names are used in URLs, metrics labels and storage keys.
pub fn valid_queue_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

pub(super) fn check(config: &Config) -> Problems {
    let mut problems = Vec::new();
    let mut problem = |path: &str, message: String| problems.push((path.to_owned(), message));

    if config.version != 1 {
        problem(
            "version",
            format!(
                "unsupported configuration version {}; this keel reads version 1",
                config.version
            ),
        );
    }
    if config.data_dir.as_os_str().is_empty() {
        problem("data_dir", "must not be empty".to_owned());
    }
    check_listeners(config, &mut problem);
    check_cache(config, &mut problem);
    check_queue(config, &mut problem);
    check_gateway(config, &mut problem);
    check_sql(config, &mut problem);
    if let Some(shared) = &config.ratelimit.shared
        && !is_redis_url(shared.expose())
    {
        problem("ratelimit.shared", "must be a redis:// URL".to_owned());
    } else if let Some(shared) = &config.ratelimit.shared
        && let Some(error) = redis_url_problem(shared.expose())
    {
        problem("ratelimit.shared", error);
    }
    if config.ratelimit.redis_prefix.is_empty()
        || config
            .ratelimit
            .redis_prefix
            .chars()
            .any(char::is_whitespace)
    {
        problem(
            "ratelimit.redis_prefix",
            format!(
                "{:?} must be non-empty and without spaces",
                config.ratelimit.redis_prefix
            ),
        );
    }
    problems
}

fn check_listeners(config: &Config, problem: &mut impl FnMut(&str, String)) {
    let listeners = &config.listeners;
    if listeners.api.bind.0.is_none() {
        problem(
            "listeners.api.bind",
            "the api listener cannot be disabled; give it an address".to_owned(),
        );
    }
    for (path, value) in [
        (
            "listeners.api.max_connections",
            listeners.api.max_connections,
        ),
        (
            "listeners.resp.max_connections",
            listeners.resp.max_connections,
        ),
        (
            "listeners.gateway.max_connections",
            listeners.gateway.max_connections,
        ),
        ("listeners.api.max_headers", listeners.api.max_headers),
    ] {
        if value == 0 {
            problem(path, "must be at least 1".to_owned());
        }
    }
    if config.runtime.worker_threads > super::schema::MAX_WORKER_THREADS {
        problem(
            "runtime.worker_threads",
            format!(
                "must be at most {} (0: one per CPU core)",
                super::schema::MAX_WORKER_THREADS
            ),
        );
    }
    if listeners.api.header_read_timeout.0.is_zero() {
        problem(
            "listeners.api.header_read_timeout",
            "must be longer than 0s".to_owned(),
        );
    }
    if listeners.gateway.tls_bind.0.is_some() && listeners.gateway.certificates.is_empty() {
        problem(
            "listeners.gateway.certificates",
            "tls_bind is set, so at least one certificate is needed".to_owned(),
        );
    }

    // Unset `auth.enabled` turns authentication on beyond loopback (tokens are created
    // at start); only an explicit `false` leaves such a listener open, and that is refused.
    let auth = &config.auth;
    if auth.enabled == Some(false) {
        for (path, bind) in [
            ("listeners.api.bind", listeners.api.bind.0),
            ("listeners.resp.bind", listeners.resp.bind.0),
        ] {
            if let Some(addr) = bind
                && !addr.ip().is_loopback()
            {
                problem(
                    path,
                    format!(
                        "{addr} is reachable beyond this machine and auth.enabled = false; \
                         remove auth.enabled (authentication then turns on by itself), or bind to 127.0.0.1"
                    ),
                );
            }
        }
    }
    for (path, rate) in [
        ("auth.token_rate_limit", auth.token_rate_limit),
        ("auth.failure_rate_limit", auth.failure_rate_limit),
    ] {
        if rate.count == 0 {
            problem(path, "must allow at least one request".to_owned());
        }
    }
}

fn check_cache(config: &Config, problem: &mut impl FnMut(&str, String)) {
    let cache = &config.cache;
    if cache.l1_max_bytes.0 < 1 << 20 {
        problem(
            "cache.l1_max_bytes",
            format!("{} is too small; give at least 1MiB", cache.l1_max_bytes),
        );
    }
    if !matches!(cache.l2.as_str(), "none" | "redb") && !is_redis_url(&cache.l2) {
        problem(
            "cache.l2",
            format!(
                "{:?} is not a cache layer; use \"none\", \"redb\" or a redis:// URL",
                cache.l2
            ),
        );
    } else if let Some(error) = redis_url_problem(&cache.l2) {
        problem("cache.l2", error);
    }
    if cache.redis_prefix.is_empty() || cache.redis_prefix.chars().any(char::is_whitespace) {
        problem(
            "cache.redis_prefix",
            format!(
                "{:?} must be non-empty and without spaces",
                cache.redis_prefix
            ),
        );
    }
    if cache.l1_max_age.0.is_zero() {
        problem(
            "cache.l1_max_age",
            "must be above 0 (with a shared L2, L1 entries are re-read after it)".to_owned(),
        );
    }
    if cache.max_key_bytes.0 == 0 || cache.max_value_bytes.0 == 0 {
        problem(
            "cache.max_value_bytes",
            "key and value limits must be above 0".to_owned(),
        );
    }
    for (name, namespace) in &cache.namespaces {
        let path = format!("cache.namespaces.{name}");
        match &namespace.loader {
            None => problem(
                &format!("{path}.loader"),
                "a namespace needs a loader ({ http = \"...\" } or { query = \"...\" })".to_owned(),
            ),
            Some(Loader::Http(url)) => {
                if !is_http_url(url) {
                    problem(
                        &format!("{path}.loader.http"),
                        format!("{url:?} must be an http:// or https:// URL"),
                    );
                } else if !url.contains("{key}") {
                    problem(
                        &format!("{path}.loader.http"),
                        format!("{url:?} must contain {{key}} where the key goes"),
                    );
                }
            }
            Some(Loader::Query(query)) => {
                if !config.sql.queries.contains_key(query) {
                    problem(
                        &format!("{path}.loader.query"),
                        format!("no [sql.queries.{query}] is defined"),
                    );
                }
            }
        }
        if let Some(fraction) = namespace.refresh_ahead {
            if !(fraction > 0.0 && fraction < 1.0) {
                problem(
                    &format!("{path}.refresh_ahead"),
                    format!("{fraction} must be between 0 and 1 (e.g. 0.8)"),
                );
            } else if namespace.ttl.is_none() {
                problem(
                    &format!("{path}.refresh_ahead"),
                    "refresh_ahead needs a ttl to be a fraction of".to_owned(),
                );
            }
        }
        if namespace.ttl.is_some_and(|ttl| ttl.0.is_zero()) {
            problem(
                &format!("{path}.ttl"),
                "must be longer than 0s (leave it out for no expiry)".to_owned(),
            );
        }
    }
}

fn check_queue(config: &Config, problem: &mut impl FnMut(&str, String)) {
    let queue = &config.queue;
    for (name, definition) in &queue.queues {
        let path = format!("queue.queues.{name}");
        if !valid_queue_name(name) {
            problem(
                &path,
                "queue names are 1 to 128 of A-Z a-z 0-9 _ . : -".to_owned(),
            );
        }
        if definition.concurrency == 0 {
            problem(
                &format!("{path}.concurrency"),
                "must be at least 1".to_owned(),
            );
        }
        match &definition.processor {
            Some(Processor::Webhook { url, .. }) if !url.starts_with("http://") => {
                problem(
                    &format!("{path}.processor.webhook.url"),
                    format!(
                        "{url:?} must be an http:// URL (https webhooks are not supported yet)"
                    ),
                );
            }
            Some(Processor::Webhook {
                method, headers, ..
            }) => {
                if let Some(method) = method
                    && !matches!(
                        method.to_ascii_uppercase().as_str(),
                        "POST" | "PUT" | "PATCH" | "GET" | "DELETE"
                    )
                {
                    problem(
                        &format!("{path}.processor.webhook.method"),
                        format!("{method:?} is not one of POST, PUT, PATCH, GET, DELETE"),
                    );
                }
                for (name, value) in headers {
                    if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                        || hyper::header::HeaderValue::from_str(value).is_err()
                    {
                        problem(
                            &format!("{path}.processor.webhook.headers.{name}"),
                            "not a valid HTTP header name and value".to_owned(),
                        );
                    }
                }
            }
            Some(Processor::CacheWarm { namespace })
                if !config.cache.namespaces.contains_key(namespace) =>
            {
                problem(
                    &format!("{path}.processor.cache.warm.namespace"),
                    format!("no [cache.namespaces.{namespace}] is defined"),
                );
            }
            _ => {}
        }
    }
    if queue.backend == crate::config::QueueBackend::Postgres {
        match config.queue_postgres_url() {
            None => problem(
                "queue.url",
                "queue.backend = \"postgres\" needs queue.url = \"postgres://USER@HOST/DB\" \
                 (or sql.url in PostgreSQL)"
                    .to_owned(),
            ),
            Some((key, url))
                if !url.expose().starts_with("postgres://")
                    && !url.expose().starts_with("postgresql://") =>
            {
                problem(
                    key,
                    "must start with postgres:// or postgresql://".to_owned(),
                )
            }
            Some(_) => {}
        }
    }
    if !crate::queue::pg_store::valid_schema(&queue.schema) {
        problem(
            "queue.schema",
            format!(
                "{:?}: 1 to 48 of a-z 0-9 _, not starting with a digit",
                queue.schema
            ),
        );
    }
    if !(1..=1000).contains(&queue.pool_size) {
        problem(
            "queue.pool_size",
            format!("{} is not between 1 and 1000", queue.pool_size),
        );
    }
    if !(1..=1000).contains(&queue.default_attempts) {
        problem(
            "queue.default_attempts",
            format!("{} is not between 1 and 1000", queue.default_attempts),
        );
    }
    if queue.default_lease.0.is_zero() || queue.default_lease.0 > Duration::from_secs(86_400) {
        problem(
            "queue.default_lease",
            "must be longer than 0 and at most 1d".to_owned(),
        );
    }
    if queue.max_payload_bytes.0 == 0 || queue.max_payload_bytes.0 > 64 << 20 {
        problem(
            "queue.max_payload_bytes",
            "must be between 1 byte and 64MiB".to_owned(),
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (index, schedule) in queue.schedules.iter().enumerate() {
        let path = format!("queue.schedules[{index}]");
        match &schedule.name {
            None => problem(
                &format!("{path}.name"),
                "a schedule needs a name".to_owned(),
            ),
            Some(name) if !seen.insert(name.clone()) => {
                problem(
                    &format!("{path}.name"),
                    format!("{name:?} is already the name of another schedule"),
                );
            }
            Some(_) => {}
        }
        match &schedule.queue {
            None => problem(
                &format!("{path}.queue"),
                "a schedule needs a queue".to_owned(),
            ),
            Some(name) if !valid_queue_name(name) => {
                problem(
                    &format!("{path}.queue"),
                    "queue names are 1 to 128 of A-Z a-z 0-9 _ . : -".to_owned(),
                );
            }
            Some(_) => {}
        }
        match &schedule.cron {
            None => problem(
                &format!("{path}.cron"),
                "a schedule needs a cron expression".to_owned(),
            ),
            Some(cron) => {
                if let Err(error) = parse_cron(cron) {
                    problem(
                        &format!("{path}.cron"),
                        format!("{cron:?}: {error} (six fields, seconds first: \"0 0 2 * * *\")"),
                    );
                }
            }
        }
        if schedule.timezone.parse::<chrono_tz::Tz>().is_err() {
            problem(
                &format!("{path}.timezone"),
                format!(
                    "{:?} is not an IANA time zone such as \"UTC\" or \"Europe/Paris\"",
                    schedule.timezone
                ),
            );
        }
    }
}

/// Cron expressions with a leading seconds field, as `[[queue.schedules]]` takes them.
pub fn parse_cron(expression: &str) -> Result<croner::Cron, croner::errors::CronError> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(expression)
}

fn check_gateway(config: &Config, problem: &mut impl FnMut(&str, String)) {
    let gateway = &config.gateway;
    for (name, upstream) in &gateway.upstreams {
        let path = format!("gateway.upstreams.{name}");
        if upstream.servers.is_empty() {
            problem(
                &format!("{path}.servers"),
                "an upstream needs at least one server".to_owned(),
            );
        }
        for (index, server) in upstream.servers.iter().enumerate() {
            if let Err(message) = parse_server(server) {
                problem(&format!("{path}.servers[{index}]"), message);
            }
        }
        if upstream.max_fails == 0 {
            problem(
                &format!("{path}.max_fails"),
                "must be at least 1".to_owned(),
            );
        }
        if let Some(health) = &upstream.health {
            if !health.path.starts_with('/') {
                problem(
                    &format!("{path}.health.path"),
                    "must start with /".to_owned(),
                );
            }
            if health.rise == 0 || health.fall == 0 {
                problem(
                    &format!("{path}.health"),
                    "rise and fall must be at least 1".to_owned(),
                );
            }
            if health.interval.0.is_zero() {
                problem(
                    &format!("{path}.health.interval"),
                    "must be longer than 0s".to_owned(),
                );
            }
            if !(100..=599).contains(&health.expect_status) {
                problem(
                    &format!("{path}.health.expect_status"),
                    "must be an HTTP status (100 to 599)".to_owned(),
                );
            }
        }
    }
    for (index, route) in gateway.routes.iter().enumerate() {
        let path = format!("gateway.routes[{index}]");
        match &route.upstream {
            None => problem(
                &format!("{path}.upstream"),
                "a route needs an upstream".to_owned(),
            ),
            Some(name) if !gateway.upstreams.contains_key(name) => {
                problem(
                    &format!("{path}.upstream"),
                    format!("no [gateway.upstreams.{name}] is defined"),
                );
            }
            Some(_) => {}
        }
        if let Some(rewrite) = &route.rewrite_prefix
            && !rewrite.starts_with('/')
        {
            problem(
                &format!("{path}.rewrite_prefix"),
                format!("{rewrite:?} must start with /"),
            );
        }
        if !route.path_prefix.starts_with('/') {
            problem(
                &format!("{path}.path_prefix"),
                format!("{:?} must start with /", route.path_prefix),
            );
        }
        if let Some(host) = &route.host {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if bare.is_empty() || bare.contains(['*', '/', ' ', ':']) {
                problem(
                    &format!("{path}.host"),
                    format!("{host:?} must be a host name, optionally starting with *."),
                );
            }
        }
        if let Some(limit) = &route.rate_limit {
            let key_ok = matches!(limit.key.as_str(), "ip" | "route" | "global")
                || limit
                    .key
                    .strip_prefix("header:")
                    .is_some_and(|name| !name.is_empty());
            if !key_ok {
                problem(
                    &format!("{path}.rate_limit.key"),
                    format!("{:?} must be ip, header:NAME, route or global", limit.key),
                );
            }
            if limit.burst == Some(0) {
                problem(
                    &format!("{path}.rate_limit.burst"),
                    "must be at least 1".to_owned(),
                );
            }
        }
    }
}

fn check_sql(config: &Config, problem: &mut impl FnMut(&str, String)) {
    let sql = &config.sql;
    let url = sql.url.expose();
    if !(url.starts_with("sqlite://") || is_postgres_url(url)) || url == "sqlite://" {
        problem(
            "sql.url",
            "must be sqlite://PATH or a postgres:// URL".to_owned(),
        );
    }
    if let Some(replica) = &sql.replica
        && !is_postgres_url(replica.expose())
    {
        problem("sql.replica", "must be a postgres:// URL".to_owned());
    }
    if !(1..=1024).contains(&sql.pool_size) {
        problem(
            "sql.pool_size",
            format!("{} must be between 1 and 1024", sql.pool_size),
        );
    }
    if sql.pool_timeout.0.is_zero() {
        problem("sql.pool_timeout", "must be longer than 0".to_owned());
    }
    if sql.replica.is_some() && !is_postgres_url(url) {
        problem(
            "sql.replica",
            "a replica needs sql.url on PostgreSQL".to_owned(),
        );
    }
    if !(1..=256).contains(&sql.readers) {
        problem(
            "sql.readers",
            format!("{} must be between 1 and 256", sql.readers),
        );
    }
    if sql.statement_timeout.0.is_zero() {
        problem("sql.statement_timeout", "must be longer than 0".to_owned());
    }
    if sql.max_rows == 0 {
        problem("sql.max_rows", "must be at least 1".to_owned());
    }
    if sql.max_result_bytes.0 == 0 {
        problem("sql.max_result_bytes", "must be at least 1 byte".to_owned());
    }
    if !(1..=100_000).contains(&sql.stats_max_statements) {
        problem(
            "sql.stats_max_statements",
            format!("{} must be between 1 and 100000", sql.stats_max_statements),
        );
    }
    if !sql.maintenance_cron.is_empty()
        && let Err(error) = parse_cron(&sql.maintenance_cron)
    {
        problem(
            "sql.maintenance_cron",
            format!(
                "{:?}: {error} (six fields, seconds first)",
                sql.maintenance_cron
            ),
        );
    }
    for (name, query) in &sql.queries {
        if query
            .sql
            .as_deref()
            .is_none_or(|text| text.trim().is_empty())
        {
            problem(
                &format!("sql.queries.{name}.sql"),
                "a named query needs its SQL".to_owned(),
            );
        }
    }
}

fn is_http_url(url: &str) -> bool {
    url.strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .is_some_and(|rest| !rest.is_empty())
}

fn is_redis_url(url: &str) -> bool {
    url.strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .is_some_and(|rest| !rest.is_empty())
}

/// Why the Redis client would refuse a redis:// URL (a bad port, `rediss://` in a
/// build without TLS for Redis); `None` for anything else.
fn redis_url_problem(url: &str) -> Option<String> {
    if !is_redis_url(url) {
        return None;
    }
    if url.starts_with("rediss://") {
        return Some("rediss:// (TLS) is not supported by this keel; use redis://".to_owned());
    }
    redis::Client::open(url)
        .err()
        .map(|error| format!("not a usable Redis URL: {error}"))
}

fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// An upstream server entry: `HOST:PORT` or `HOST:PORT weight=N` (N from 1 to 100).
pub fn parse_server(entry: &str) -> Result<(String, u32), String> {
    let mut parts = entry.split_whitespace();
    let address = parts.next().unwrap_or_default();
    if !is_host_port(address) {
        return Err(format!(
            "{entry:?} is not HOST:PORT (optionally followed by weight=N)"
        ));
    }
    let mut weight = 1;
    for option in parts {
        match option.strip_prefix("weight=").map(str::parse::<u32>) {
            Some(Ok(value)) if (1..=100).contains(&value) => weight = value,
            _ => {
                return Err(format!(
                    "{entry:?}: {option:?} is not weight=N with N from 1 to 100"
                ));
            }
        }
    }
    Ok((address.to_owned(), weight))
}

fn is_host_port(server: &str) -> bool {
    if server.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match server.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                && port.parse::<u16>().is_ok_and(|port| port > 0)
        }
        None => false,
    }
}
