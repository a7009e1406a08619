//! Start-up, readiness, metrics, signals, the data-dir lock and migrations, on the real
//! binary (and the router in process for the state before storage is open).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use keel::auth::Authenticator;
use keel::config::Config;
use keel::http::{ApiState, router};
use keel::observe::{BuildInfo, DependencyState, Metrics, Readiness};
use tower::ServiceExt;

use crate::support::{DEADLINE, Keel, base_config, get, parse_reply, request, scratch};

#[test]
fn healthz_readyz_and_metrics_answer_once_started() {
    let dir = scratch();
    let (_keel, addr) = Keel::start(dir.path(), &base_config(dir.path()));

    let health = get(addr, "/healthz");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");

    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json()["ready"], true);
    assert_eq!(ready.json()["dependencies"]["storage"]["state"], "ready");

    let missing = get(addr, "/no/such/route");
    assert_eq!(missing.status, 404);
    assert_eq!(
        missing.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(missing.json()["code"], "not_found");

    let metrics = get(addr, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let samples = parse_prometheus(&metrics.body);
    for name in [
        "keel_build_info",
        "keel_uptime_seconds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "keel_http_requests_total",
        "keel_http_request_duration_seconds_bucket",
    ] {
        assert!(
            samples.iter().any(|(sample, _)| sample.starts_with(name)),
            "{name} missing from:\n{}",
            metrics.body
        );
    }
    let healthz_count = samples
        .iter()
        .find(|(sample, _)| {
            sample.starts_with("keel_http_requests_total{route=\"/healthz\",status=\"2xx\"}")
        })
        .map(|(_, value)| *value);
    assert_eq!(healthz_count, Some(1.0), "{}", metrics.body);
    let unmatched = samples
        .iter()
        .any(|(sample, _)| sample.contains("route=\"unmatched\",status=\"4xx\""));
    assert!(
        unmatched,
        "unknown paths are counted under one label, not by raw path"
    );
}

/// A strict reading of the Prometheus text format: every line is a comment, blank, or
/// `name{labels} value` with a float value.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels in {line:?}");
        }
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        samples.push((series.to_owned(), value));
    }
    samples
}

#[tokio::test]
async fn readyz_is_503_until_storage_is_ready() {
    let readiness = Readiness::new(&["storage"]);
    let (_config_tx, config) = tokio::sync::watch::channel(Arc::new(Config::default()));
    let state = ApiState {
        metrics: Arc::new(Metrics::new(BuildInfo::CURRENT)),
        readiness: readiness.clone(),
        auth: Authenticator::default(),
        config,
        services: Default::default(),
    };
    let app = router(state);
    let call = |app: axum::Router| async move {
        let request = axum::http::Request::get("/readyz")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        )
    };

    let (status, body) = call(app.clone()).await;
    assert_eq!(status, 503);
    assert_eq!(body["ready"], false);
    assert_eq!(body["dependencies"]["storage"]["state"], "starting");

    readiness.set("storage", DependencyState::Failed("disk on fire".into()));
    let (status, body) = call(app.clone()).await;
    assert_eq!(status, 503);
    assert_eq!(body["dependencies"]["storage"]["detail"], "disk on fire");

    readiness.set("storage", DependencyState::Ready);
    let (status, body) = call(app).await;
    assert_eq!(status, 200);
    assert_eq!(body["ready"], true);
}

#[test]
fn runtime_worker_threads_sets_the_runtime_size() {
    let dir = scratch();
    let config = base_config(dir.path()) + "[runtime]\nworker_threads = 1\n";
    let (keel, api) = Keel::start(dir.path(), &config);
    let log = keel.wait_for_log("keel starting");
    assert!(
        log.lines()
            .any(|line| line.contains("keel starting") && line.ends_with(" worker_threads=1")),
        "{log}"
    );
    assert_eq!(get(api, "/healthz").status, 200);
}

#[test]
fn sigterm_completes_the_request_in_flight_then_exits_0() {
    let dir = scratch();
    let (mut keel, addr) = Keel::start(dir.path(), &base_config(dir.path()));

    // `Expect: 100-continue` makes the server say when the handler starts reading the
    // body: from then on the request is in flight.
    let body = "[log]\nlevel = \"debug\"\n";
    let (first, rest) = body.split_at(6);
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "POST /v1/config/validate HTTP/1.1\r\nHost: keel\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue"),
        "{:?}",
        String::from_utf8_lossy(&interim)
    );
    stream.write_all(first.as_bytes()).unwrap();

    keel.signal("TERM");
    keel.wait_for_log("stopped accepting");
    assert!(
        TcpStream::connect(addr).is_err(),
        "new connections are refused while draining"
    );

    stream.write_all(rest.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let reply = parse_reply(&raw);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["valid"], true);

    let status = keel
        .wait_exit(Duration::from_secs(5))
        .expect("exit within 5 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "log:\n{}", keel.log_text());
}

#[test]
fn sighup_changes_the_log_level() {
    let dir = scratch();
    let info = format!("{}[log]\nlevel = \"info\"\n", base_config(dir.path()));
    let (keel, addr) = Keel::start(dir.path(), &info);

    assert_eq!(get(addr, "/readyz").status, 200);
    std::fs::write(&keel.config_path, info.replace("\"info\"", "\"debug\"")).unwrap();
    keel.signal("HUP");
    keel.wait_for_log("log level changed");
    assert_eq!(get(addr, "/healthz").status, 200);

    let line = keel.wait_for_log("route=\"/healthz\"");
    assert!(line.contains("DEBUG"), "{line}");
    assert!(
        !keel.log_text().contains("route=\"/readyz\""),
        "the request before SIGHUP was logged at info level"
    );
}

#[test]
fn a_second_keel_on_the_same_data_dir_fails_naming_the_first() {
    let dir = scratch();
    let (first, _addr) = Keel::start(dir.path(), &base_config(dir.path()));

    let other = scratch();
    let mut second = Keel::spawn(other.path(), &base_config(dir.path()));
    let status = second
        .wait_exit(DEADLINE)
        .expect("the second keel stops by itself");
    assert_eq!(status.code(), Some(1));
    let log = second.log_text();
    assert!(log.contains("is in use by another keel"), "{log}");
    assert!(log.contains(&format!("pid {}", first.pid())), "{log}");
    assert!(
        !log.contains("api listener bound"),
        "the lock is taken before any port is bound:\n{log}"
    );
}

#[test]
fn a_changed_applied_migration_stops_start_up() {
    let dir = scratch();
    let config = base_config(dir.path());
    let (mut keel, _addr) = Keel::start(dir.path(), &config);
    keel.signal("TERM");
    assert_eq!(
        keel.wait_exit(DEADLINE).and_then(|status| status.code()),
        Some(0)
    );

    let database = dir.path().join("data").join("keel.sqlite");
    let connection = rusqlite::Connection::open(&database).unwrap();
    let recorded: String = connection
        .query_row(
            "SELECT checksum FROM _keel_migrations WHERE version = 1",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(recorded.len(), 64, "a SHA-256 checksum is recorded");
    connection
        .execute(
            "UPDATE _keel_migrations SET checksum = 'tampered' WHERE version = 1",
            [],
        )
        .unwrap();
    drop(connection);

    let mut restarted = Keel::spawn(dir.path(), &config);
    let status = restarted.wait_exit(DEADLINE).expect("start-up stops");
    assert_eq!(status.code(), Some(1));
    let log = restarted.log_text();
    assert!(
        log.contains("migration 1 (instance) was changed after it was applied"),
        "{log}"
    );
    assert!(!log.contains("keel ready"), "{log}");
}

#[test]
fn a_clean_restart_keeps_the_instance_and_applies_nothing_twice() {
    let dir = scratch();
    let config = base_config(dir.path());
    for round in 0..2 {
        let (mut keel, addr) = Keel::start(dir.path(), &config);
        assert_eq!(get(addr, "/readyz").status, 200);
        let applied = keel.log_text().matches("migration applied").count();
        assert_eq!(applied, if round == 0 { 1 } else { 0 }, "round {round}");
        keel.signal("INT");
        assert_eq!(
            keel.wait_exit(DEADLINE).and_then(|status| status.code()),
            Some(0)
        );
    }
    let connection =
        rusqlite::Connection::open(dir.path().join("data").join("keel.sqlite")).unwrap();
    let instances: i64 = connection
        .query_row("SELECT count(*) FROM keel_instance", [], |row| row.get(0))
        .unwrap();
    assert_eq!(instances, 1);
}

#[test]
fn a_config_posted_for_validation_gets_every_problem_with_its_line() {
    let dir = scratch();
    let (_keel, addr) = Keel::start(dir.path(), &base_config(dir.path()));
    let reply = request(
        addr,
        "POST",
        "/v1/config/validate",
        "[log]\nlevel = \"loud\"\n[cache]\nl2 = \"floppy\"\n",
    );
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["valid"], false);
    let problems = body["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{body}");
    assert_eq!(problems[0]["path"], "log.level");
    assert_eq!(problems[0]["line"], 2);
    assert_eq!(problems[1]["path"], "cache.l2");
}

#[test]
fn with_a_password_the_v1_api_needs_it_and_probes_stay_open() {
    let dir = scratch();
    let config = format!(
        "{}[auth]\npassword = \"correct horse\"\n",
        base_config(dir.path())
    );
    let (keel, addr) = Keel::start(dir.path(), &config);
    assert!(
        !keel.log_text().contains("correct horse"),
        "the secret is never logged"
    );

    let missing = request(addr, "POST", "/v1/config/validate", "");
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["code"], "unauthenticated");
    assert!(
        missing
            .header("www-authenticate")
            .unwrap()
            .starts_with("Bearer")
    );

    let check = |token: &str| {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "POST /v1/config/validate HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        crate::support::read_reply(&mut stream)
    };
    let wrong = check("correct horse battery");
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["code"], "invalid_credentials");
    assert_eq!(check("correct horse").status, 200);

    assert_eq!(get(addr, "/healthz").status, 200);
    assert_eq!(get(addr, "/readyz").status, 200);
    assert_eq!(get(addr, "/metrics").status, 200);
}

#[test]
fn systemd_hears_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;

    let dir = scratch();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut keel = Keel::spawn_with_env(
        dir.path(),
        &base_config(dir.path()),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut heard = Vec::new();
    let receive_until = |wanted: &str, heard: &mut Vec<String>| {
        let mut buffer = [0u8; 512];
        while !heard.iter().any(|message| message.contains(wanted)) {
            let length = socket
                .recv(&mut buffer)
                .unwrap_or_else(|_| panic!("no {wanted} in {heard:?}"));
            heard.push(String::from_utf8_lossy(&buffer[..length]).into_owned());
        }
    };
    receive_until("READY=1", &mut heard);
    receive_until("WATCHDOG=1", &mut heard);
    keel.signal("TERM");
    receive_until("STOPPING=1", &mut heard);
    assert_eq!(
        keel.wait_exit(DEADLINE).and_then(|status| status.code()),
        Some(0)
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = scratch();
    let config = format!("{}[log]\nformat = \"json\"\n", base_config(dir.path()));
    let keel = Keel::spawn(dir.path(), &config);
    let line = keel.wait_for_log("keel ready");
    let event: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(event["level"], "INFO");
    assert_eq!(event["message"], "keel ready");
}

#[test]
fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let dir = scratch();
    let config = base_config(dir.path()).replace(
        "bind = \"127.0.0.1:0\"",
        "bind = \"127.0.0.1:0\"\nheader_read_timeout = \"1s\"",
    );
    let (_keel, addr) = Keel::start(dir.path(), &config);
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(DEADLINE)).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: ")
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let outcome = slow.read_to_end(&mut rest);
    assert!(
        outcome.is_ok() || started.elapsed() < DEADLINE,
        "the server closed the connection"
    );
    assert!(
        started.elapsed() < DEADLINE,
        "closed before the client's own deadline"
    );
    // The service is unaffected.
    assert_eq!(get(addr, "/healthz").status, 200);
}

#[test]
fn sighup_with_a_broken_file_keeps_the_running_configuration() {
    let dir = scratch();
    let (keel, addr) = Keel::start(dir.path(), &base_config(dir.path()));
    std::fs::write(&keel.config_path, "[log]\nlevel = \"loud\"\n").unwrap();
    keel.signal("HUP");
    let line = keel.wait_for_log("configuration not reloaded");
    assert!(line.contains("log.level"), "{line}");
    assert_eq!(get(addr, "/healthz").status, 200);
}

#[test]
fn the_history_records_the_key_series_and_streams_new_points() {
    use std::io::{BufRead, BufReader, Write};
    let dir = scratch();
    let (_keel, addr) = Keel::start(dir.path(), &base_config(dir.path()));
    // Traffic the requests series must see.
    for _ in 0..20 {
        assert_eq!(get(addr, "/healthz").status, 200);
    }
    let started = std::time::Instant::now();
    let history = loop {
        let history = get(addr, "/v1/metrics/history").json();
        if history["points"]
            .as_array()
            .is_some_and(|points| !points.is_empty())
        {
            break history;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no point was ever taken: {history}"
        );
    };
    let series: Vec<&str> = history["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap())
        .collect();
    assert!(series.contains(&"requests_per_sec") && series.contains(&"rss_bytes"));
    let point = &history["points"][0];
    assert_eq!(point["values"].as_array().unwrap().len(), series.len());
    let rss = point["values"][series.iter().position(|s| *s == "rss_bytes").unwrap()]
        .as_f64()
        .unwrap();
    assert!(rss > 1_000_000.0, "{rss}");
    assert_eq!(
        get(addr, "/v1/metrics/history?resolution=5m").json()["code"],
        "bad_resolution"
    );

    // The stream delivers the next point as a server-sent event.
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(stream, "GET /v1/metrics/stream HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut lines = BufReader::new(stream).lines();
    let event = lines
        .by_ref()
        .map(|line| line.unwrap())
        .find(|line| line.starts_with("event: point"));
    assert!(event.is_some(), "no point event arrived");
    let data = lines.next().unwrap().unwrap();
    assert!(data.starts_with("data: {\"at\":"), "{data}");
}
