//! The cache over REST, its two layers, invalidation, and get-or-load with a real HTTP
//! loader server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    DEADLINE, Keel, TestServer, base_config, get, parse_reply, request, request_bytes, resp_config,
    scratch,
};

#[test]
fn rest_round_trips_binary_values_with_ttl_and_tags() {
    let dir = scratch();
    let (_keel, addr) = Keel::start(dir.path(), &base_config(dir.path()));

    let value: &[u8] = b"\x00binary\r\nvalue\xff";
    let put = request_bytes(
        addr,
        "PUT",
        "/v1/cache/user%3A1?ttl=1m&tags=users,vip",
        value,
    );
    assert_eq!(put.status, 204, "{}", put.body);
    let got = get(addr, "/v1/cache/user:1");
    assert_eq!(got.status, 200);
    assert_eq!(got.raw_body, value);
    assert_eq!(got.header("content-type"), Some("application/octet-stream"));
    assert_eq!(got.header("x-keel-tags"), Some("users,vip"));
    let ttl: u64 = got.header("x-keel-ttl-ms").unwrap().parse().unwrap();
    assert!((55_000..=60_000).contains(&ttl), "{ttl}");

    let mset = request(
        addr,
        "POST",
        "/v1/cache/mset",
        r#"{"items":[{"key":"a","value":"1"},{"key":"b","value":"AAE=","tags":["t"]}],"encoding":"base64"}"#,
    );
    assert_eq!(mset.status, 400, "\"1\" is not base64: nothing is stored");
    let mset = request(
        addr,
        "POST",
        "/v1/cache/mset",
        r#"{"items":[{"key":"a","value":"1"},{"key":"b","value":"two","ttl":"10s"}]}"#,
    );
    assert_eq!(mset.json()["stored"], 2);
    let mget = request(
        addr,
        "POST",
        "/v1/cache/mget",
        r#"{"keys":["a","b","nope"]}"#,
    );
    assert_eq!(mget.json()["values"], serde_json::json!(["1", "two", null]));
    let utf8 = request(addr, "POST", "/v1/cache/mget", r#"{"keys":["user:1"]}"#);
    assert_eq!(utf8.status, 422);
    assert_eq!(utf8.json()["code"], "not_utf8");
    let b64 = request(
        addr,
        "POST",
        "/v1/cache/mget",
        r#"{"keys":["user:1"],"encoding":"base64"}"#,
    );
    assert_eq!(b64.json()["values"][0], "AGJpbmFyeQ0KdmFsdWX/");

    assert_eq!(request(addr, "DELETE", "/v1/cache/a", "").status, 204);
    assert_eq!(request(addr, "DELETE", "/v1/cache/a", "").status, 404);
    let missing = get(addr, "/v1/cache/a");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["code"], "not_found");

    let forever = request(
        addr,
        "PUT",
        "/v1/cache/forever?ttl=100000000000000000s",
        "v",
    );
    assert_eq!(
        forever.status, 204,
        "an absurd TTL saturates instead of wrapping into the past"
    );
    assert_eq!(get(addr, "/v1/cache/forever").body, "v");
    let bad_ttl = request(addr, "PUT", "/v1/cache/x?ttl=-5s", "v");
    assert_eq!(
        (bad_ttl.status, bad_ttl.json()["code"].as_str()),
        (400, Some("bad_ttl"))
    );
    let long_key = format!("/v1/cache/{}", "k".repeat(70 * 1024));
    let too_long = request(addr, "GET", &long_key, "");
    assert!(
        too_long.status == 400 || too_long.status == 414 || too_long.status == 431,
        "{}",
        too_long.status
    );

    let stats = get(addr, "/v1/cache/stats").json();
    assert_eq!(stats["l2"]["kind"], "redb");
    assert!(stats["l1"]["hits"].as_u64().unwrap() >= 2);
    assert!(stats["l1"]["bytes"].as_u64().unwrap() > 0);
}

#[test]
fn values_over_the_limit_are_refused_with_413() {
    let dir = scratch();
    let config = format!(
        "{}[cache]\nmax_value_bytes = \"1KiB\"\n",
        base_config(dir.path())
    );
    let (_keel, addr) = Keel::start(dir.path(), &config);
    let reply = request_bytes(addr, "PUT", "/v1/cache/big", &[b'x'; 2048]);
    assert_eq!(reply.status, 413);
    assert_eq!(reply.json()["code"], "value_too_large");
    assert_eq!(get(addr, "/v1/cache/big").status, 404);

    // Tags are bounded so every entry stays encodable in L2.
    let many: Vec<String> = (0..65).map(|index| format!("t{index}")).collect();
    let reply = request(
        addr,
        "PUT",
        &format!("/v1/cache/tagged?tags={}", many.join(",")),
        "v",
    );
    assert_eq!(
        (reply.status, reply.json()["code"].as_str()),
        (400, Some("bad_tags"))
    );
    let long = "x".repeat(2000);
    let reply = request(addr, "PUT", &format!("/v1/cache/tagged?tags={long}"), "v");
    assert_eq!(
        (reply.status, reply.json()["code"].as_str()),
        (400, Some("bad_tags"))
    );
    let body = format!(
        r#"{{"items":[{{"key":"ok","value":"v"}},{{"key":"bad","value":"v","tags":["{long}"]}}]}}"#
    );
    assert_eq!(request(addr, "POST", "/v1/cache/mset", &body).status, 400);
    assert_eq!(
        get(addr, "/v1/cache/ok").status,
        404,
        "a bad item stores nothing"
    );
    assert_eq!(get(addr, "/v1/cache/tagged").status, 404);
}

#[test]
fn a_restart_keeps_l2_and_invalidation_reaches_both_layers() {
    let dir = scratch();
    let config = resp_config(dir.path(), "");
    let (mut keel, addr) = Keel::start(dir.path(), &config);
    for index in 0..50 {
        let tags = if index % 2 == 0 { "even" } else { "odd" };
        let put = request(
            addr,
            "PUT",
            &format!("/v1/cache/user:{index}?tags={tags}"),
            &format!("v{index}"),
        );
        assert_eq!(put.status, 204);
        assert_eq!(
            get(addr, &format!("/v1/cache/user:{index}")).status,
            200,
            "now in L1 as well"
        );
    }
    request(addr, "PUT", "/v1/cache/session:1", "keep");
    let by_pattern = request(
        addr,
        "POST",
        "/v1/cache/invalidate",
        r#"{"pattern":"user:1*"}"#,
    );
    assert_eq!(
        by_pattern.json()["invalidated"],
        11,
        "user:1 and user:10..19"
    );
    let by_tag = request(addr, "POST", "/v1/cache/invalidate", r#"{"tags":["even"]}"#);
    assert_eq!(
        by_tag.json()["invalidated"],
        20,
        "the 25 even users less the 5 already gone"
    );
    let survivors = |addr| {
        (0..50)
            .filter(|index| get(addr, &format!("/v1/cache/user:{index}")).status == 200)
            .count()
    };
    assert_eq!(survivors(addr), 50 - 11 - 20);

    keel.signal("TERM");
    assert_eq!(
        keel.wait_exit(DEADLINE).and_then(|status| status.code()),
        Some(0)
    );
    let (_keel, addr) = Keel::start(dir.path(), &config);
    assert_eq!(
        get(addr, "/v1/cache/session:1").body,
        "keep",
        "L2 survived the restart"
    );
    assert_eq!(
        survivors(addr),
        50 - 11 - 20,
        "invalidated keys are gone from L2 too"
    );
}

#[test]
fn l1_is_bounded_by_bytes_and_l2_answers_what_it_evicted() {
    let dir = scratch();
    let config = format!(
        "{}[cache]\nl1_max_bytes = \"1MiB\"\n",
        base_config(dir.path())
    );
    let (keel, addr) = Keel::start(dir.path(), &config);
    let value = "x".repeat(10 * 1024);
    for index in 0..300 {
        assert_eq!(
            request(addr, "PUT", &format!("/v1/cache/big:{index}"), &value).status,
            204
        );
    }
    // Reads look at writes still queued for L2 first; wait until L2 has them all, so
    // what L1 evicted is really answered by L2.
    let started = std::time::Instant::now();
    while get(addr, "/v1/cache/stats").json()["l2"]["queued_writes"] != 0 {
        assert!(started.elapsed() < DEADLINE, "L2 never caught up");
    }
    for index in 0..300 {
        let reply = get(addr, &format!("/v1/cache/big:{index}"));
        assert_eq!(
            (reply.status, reply.body.len()),
            (200, value.len()),
            "big:{index}"
        );
    }
    let stats = get(addr, "/v1/cache/stats").json();
    assert!(stats["l1"]["bytes"].as_u64().unwrap() <= 1 << 20, "{stats}");
    assert!(stats["l1"]["evictions"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["l2"]["hits"].as_u64().unwrap() > 0, "{stats}");
    let metrics = get(addr, "/metrics").body;
    assert!(
        metrics.contains("keel_cache_l1_evictions_total"),
        "{metrics}"
    );
    drop(keel);
}

#[test]
fn kill_9_during_writes_leaves_a_store_that_opens_and_holds_whole_values() {
    let dir = scratch();
    let config = resp_config(dir.path(), "");
    let (mut keel, _) = Keel::start(dir.path(), &config);
    let resp = keel.resp_addr();
    let api = keel.api_addr();
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer_progress = progress.clone();
    let writer = std::thread::spawn(move || {
        let mut con = redis::Client::open(format!("redis://{resp}/"))
            .unwrap()
            .get_connection()
            .unwrap();
        for index in 0.. {
            writer_progress.store(index, Ordering::Relaxed);
            let value = format!("{index:08}").repeat(64);
            if redis::cmd("SET")
                .arg(format!("w:{index}"))
                .arg(value)
                .query::<()>(&mut con)
                .is_err()
            {
                return index;
            }
        }
        unreachable!()
    });
    // Kill only once acknowledged writes are known to be on disk: two durable L2 commits
    // after the writer's first hundred (the first may have been under way already).
    let durable_commits = || {
        let metrics = get(api, "/metrics").body;
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("keel_cache_l2_durable_commits_total "))
            .and_then(|value| value.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + DEADLINE;
    while progress.load(Ordering::Relaxed) < 100 {
        assert!(Instant::now() < deadline, "the writer made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = durable_commits();
    while durable_commits() < before + 2 {
        assert!(
            Instant::now() < deadline,
            "no durable L2 commit within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    keel.signal("KILL");
    keel.wait_exit(DEADLINE).expect("killed");
    let written = writer.join().unwrap();
    assert!(written > 100, "the writer was busy: {written}");

    let (keel, _) = Keel::start(dir.path(), &config);
    let mut con = redis::Client::open(format!("redis://{}/", keel.resp_addr()))
        .unwrap()
        .get_connection()
        .unwrap();
    let mut present = 0;
    for index in 0..written {
        let value: Option<String> = redis::cmd("GET")
            .arg(format!("w:{index}"))
            .query(&mut con)
            .unwrap();
        if let Some(value) = value {
            assert_eq!(
                value,
                format!("{index:08}").repeat(64),
                "w:{index} is whole"
            );
            present += 1;
        }
    }
    assert!(
        present > 0,
        "writes older than the last durable commit survive ({written} written)"
    );
}

/// A loader origin: counts calls, answers after `delay`; key `missing` is a 404 and
/// key `broken` a 500.
struct Origin {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    _server: TestServer,
}

fn origin(delay: Duration) -> Origin {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = axum::Router::new().route(
        "/users/{key}",
        axum::routing::get(
            move |axum::extract::Path(key): axum::extract::Path<String>| {
                let calls = counter.clone();
                async move {
                    let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(delay).await;
                    match key.as_str() {
                        "missing" => (axum::http::StatusCode::NOT_FOUND, String::new()),
                        "broken" => (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            "origin on fire".to_owned(),
                        ),
                        _ => (axum::http::StatusCode::OK, format!("user {key} v{call}")),
                    }
                }
            },
        ),
    );
    let server = TestServer::start(app);
    Origin {
        addr: server.addr,
        calls,
        _server: server,
    }
}

fn loader_config(dir: &std::path::Path, origin: &Origin, extra: &str) -> String {
    format!(
        "{}[cache.namespaces.users]\nloader = {{ http = \"http://{}/users/{{key}}\" }}\nttl = \"1m\"\n{extra}",
        base_config(dir),
        origin.addr
    )
}

async fn fetch(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let reply = parse_reply(&raw);
    (reply.status, reply.body)
}

#[test]
fn a_thousand_concurrent_misses_call_the_loader_once() {
    let origin = origin(Duration::from_millis(500));
    let dir = scratch();
    let (_keel, addr) = Keel::start(dir.path(), &loader_config(dir.path(), &origin, ""));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let replies = runtime.block_on(async {
        let tasks: Vec<_> = (0..1000)
            .map(|_| tokio::spawn(fetch(addr, "/v1/cache/ns/users/42")))
            .collect();
        let mut replies = Vec::new();
        for task in tasks {
            replies.push(task.await.unwrap());
        }
        replies
    });
    assert!(
        replies
            .iter()
            .all(|(status, body)| *status == 200 && body == "user 42 v1"),
        "{:?}",
        &replies[..3]
    );
    assert_eq!(
        origin.calls.load(Ordering::SeqCst),
        1,
        "one loader call for 1000 misses"
    );
    let metrics = get(addr, "/metrics").body;
    let waiters: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("keel_cache_coalesced_waiters_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(waiters > 0.0, "{waiters}");
}

#[test]
fn loader_errors_are_returned_and_not_cached_unless_negative_ttl_says_so() {
    let origin = origin(Duration::ZERO);
    let dir = scratch();
    let (_keel, addr) = Keel::start(dir.path(), &loader_config(dir.path(), &origin, ""));
    let broken = get(addr, "/v1/cache/ns/users/broken");
    assert_eq!(
        (broken.status, broken.json()["code"].as_str()),
        (502, Some("loader_failed"))
    );
    assert!(
        broken.json()["detail"]
            .as_str()
            .unwrap()
            .contains("origin on fire")
    );
    assert_eq!(get(addr, "/v1/cache/ns/users/broken").status, 502);
    assert_eq!(
        origin.calls.load(Ordering::SeqCst),
        2,
        "errors are not cached"
    );
    assert_eq!(get(addr, "/v1/cache/ns/users/missing").status, 404);
    assert_eq!(
        get(addr, "/v1/cache/ns/nope/1").json()["code"],
        "unknown_namespace"
    );
    let first = get(addr, "/v1/cache/ns/users/7");
    assert_eq!(
        (first.body.as_str(), first.header("x-cache")),
        ("user 7 v4", Some("MISS"))
    );
    let second = get(addr, "/v1/cache/ns/users/7");
    assert_eq!(
        (second.body.as_str(), second.header("x-cache")),
        ("user 7 v4", Some("HIT"))
    );

    let negative = origin_with_negative();
    let dir = scratch();
    let (_keel, addr) = Keel::start(
        dir.path(),
        &loader_config(dir.path(), &negative, "negative_ttl = \"1m\"\n"),
    );
    assert_eq!(get(addr, "/v1/cache/ns/users/broken").status, 502);
    assert_eq!(get(addr, "/v1/cache/ns/users/broken").status, 502);
    assert_eq!(
        negative.calls.load(Ordering::SeqCst),
        1,
        "negative_ttl remembers the error"
    );
}

fn origin_with_negative() -> Origin {
    origin(Duration::ZERO)
}

#[test]
fn refresh_ahead_reloads_a_hot_key_before_it_expires() {
    let origin = origin(Duration::ZERO);
    let dir = scratch();
    let config = format!(
        "{}[cache.namespaces.users]\nloader = {{ http = \"http://{}/users/{{key}}\" }}\nttl = \"2s\"\nrefresh_ahead = 0.5\n",
        base_config(dir.path()),
        origin.addr
    );
    let (_keel, addr) = Keel::start(dir.path(), &config);
    let started = Instant::now();
    let first = get(addr, "/v1/cache/ns/users/hot");
    assert_eq!(
        (first.body.as_str(), first.header("x-cache")),
        ("user hot v1", Some("MISS"))
    );
    // Read like a busy client for three TTL halves: every read must hit, and a
    // background reload must replace the value before the first one would have expired.
    let mut refreshed_at = None;
    while started.elapsed() < Duration::from_secs(3) {
        let reply = get(addr, "/v1/cache/ns/users/hot");
        assert_eq!(
            reply.header("x-cache"),
            Some("HIT"),
            "a hot key never misses"
        );
        if refreshed_at.is_none() && reply.body != "user hot v1" {
            refreshed_at = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let refreshed_at = refreshed_at.expect("the value was reloaded");
    assert!(
        refreshed_at < Duration::from_secs(2),
        "reloaded at {refreshed_at:?}, before the 2 s TTL ran out"
    );
    assert!(origin.calls.load(Ordering::SeqCst) >= 2);
}
