//! Scaled out: keel nodes sharing one Redis as the cache's L2 and for rate limits.
//! Needs `KEEL_TEST_REDIS_URL` (scripts/test sets it); without it these tests say they
//! are skipped, or fail when `KEEL_REQUIRE_EXTERNAL=1`.
//!
//! The Redis may be shared with anything else: every test uses a random prefix and
//! removes only its own keys. Outages are made with a TCP proxy this test runs and
//! cuts; the shared Redis is never stopped.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::support::{DEADLINE, Keel, TestServer, get, request, resp_config, scratch};

pub(crate) fn redis_url() -> Option<String> {
    match std::env::var("KEEL_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("KEEL_REQUIRE_EXTERNAL").as_deref() == Ok("1") => {
            panic!("KEEL_REQUIRE_EXTERNAL=1 but KEEL_TEST_REDIS_URL is not set")
        }
        _ => {
            eprintln!("skipped: set KEEL_TEST_REDIS_URL to run the scaled-out tests");
            None
        }
    }
}

pub(crate) fn unique_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("keelit:{}:{nanos:x}:", std::process::id())
}

/// Removes every key under `prefix`, and only those.
pub(crate) fn remove_prefix(url: &str, prefix: &str) {
    let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut redis)
        .unwrap();
    for key in keys {
        let _: i64 = redis::cmd("UNLINK").arg(key).query(&mut redis).unwrap();
    }
}

/// Deletes the test's keys however the test ends.
pub(crate) struct Cleanup(pub(crate) String, pub(crate) String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_prefix(&self.0, &self.1);
    }
}

/// `host:port` and the rest (`/0`) of a redis:// URL.
pub(crate) fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("redis://").expect("a redis:// URL");
    match rest.split_once('/') {
        Some((host, db)) => (host.to_owned(), format!("/{db}")),
        None => (rest.to_owned(), String::new()),
    }
}

fn node_config(dir: &std::path::Path, l2: &str, prefix: &str, extra: &str) -> String {
    resp_config(
        dir,
        &format!(
            "[cache]\nl2 = \"{l2}\"\nredis_prefix = \"{prefix}\"\n\
             # Long, so only the invalidation messages can explain an eviction.\n\
             l1_max_age = \"10m\"\n{extra}"
        ),
    )
}

fn resp(addr: SocketAddr) -> redis::Connection {
    redis::Client::open(format!("redis://{addr}/"))
        .unwrap()
        .get_connection_with_timeout(DEADLINE)
        .unwrap()
}

/// Polls `check` every 5 ms until it holds; fails after `within`.
pub(crate) fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(crate) fn value(addr: SocketAddr, key: &str) -> Option<String> {
    let reply = get(addr, &format!("/v1/cache/{key}"));
    match reply.status {
        200 => Some(reply.body),
        404 => None,
        other => panic!("GET {key}: {other} {}", reply.body),
    }
}

#[test]
fn two_nodes_share_the_l2_and_invalidate_each_others_l1() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix();
    let _cleanup = Cleanup(url.clone(), prefix.clone());
    let (dir_a, dir_b) = (scratch(), scratch());
    let (a, api_a) = Keel::start(dir_a.path(), &node_config(dir_a.path(), &url, &prefix, ""));
    let (_b, api_b) = Keel::start(dir_b.path(), &node_config(dir_b.path(), &url, &prefix, ""));
    // Subscribing clears L1 (messages may have been missed); wait for it on both, so
    // that clear cannot pass for an invalidation message below.
    for api in [api_a, api_b] {
        eventually(DEADLINE, "subscribed", || {
            get(api, "/metrics").body.lines().any(|line| {
                line.starts_with("keel_cache_remote_invalidations_total ") && !line.ends_with(" 0")
            })
        });
    }

    // A SET through RESP on A is readable on B.
    let mut on_a = resp(a.resp_addr());
    let () = redis::cmd("SET")
        .arg("k:1")
        .arg("one")
        .query(&mut on_a)
        .unwrap();
    eventually(DEADLINE, "B reads A's SET", || {
        value(api_b, "k:1").as_deref() == Some("one")
    });

    // B now holds each key in L1; A invalidates by key, pattern and tag, and each
    // leaves B's L1 within 100 ms.
    for (key, tags) in [("k:2", ""), ("p:1", ""), ("t:1", "?tags=red")] {
        let put = request(api_a, "PUT", &format!("/v1/cache/{key}{tags}"), "v");
        assert_eq!(put.status, 204, "{}", put.body);
        eventually(DEADLINE, "B reads A's PUT", || value(api_b, key).is_some());
    }
    for (body, key) in [
        (r#"{"keys":["k:2"]}"#, "k:2"),
        (r#"{"pattern":"p:*"}"#, "p:1"),
        (r#"{"tags":["red"]}"#, "t:1"),
    ] {
        let invalidated = request(api_a, "POST", "/v1/cache/invalidate", body);
        assert_eq!(invalidated.status, 200, "{}", invalidated.body);
        assert_eq!(invalidated.json()["invalidated"], 1, "{body}");
        eventually(Duration::from_millis(100), body, || {
            value(api_b, key).is_none()
        });
    }
    assert_eq!(value(api_b, "k:1").as_deref(), Some("one"));
}

/// A TCP proxy in front of a server (Redis, PostgreSQL) that the test can cut and
/// restore, as a network failure would: cut closes the listener (new connections are
/// refused) and resets every relayed connection on both sides; restore listens on the
/// same port again. The real server is never touched.
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    up: watch::Sender<bool>,
    /// Whether the listener is open.
    listening: Arc<AtomicBool>,
    /// Relayed connections not yet closed or reset.
    relays: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl Proxy {
    pub(crate) fn start(target: String) -> Proxy {
        let runtime = crate::support::server_runtime();
        let first = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = first.local_addr().unwrap();
        let (up, watching) = watch::channel(true);
        let listening = Arc::new(AtomicBool::new(true));
        let relays = Arc::new(AtomicUsize::new(0));
        let (listening_state, live) = (listening.clone(), relays.clone());
        runtime.spawn(async move {
            let mut state = watching.clone();
            let mut listener = Some(first);
            loop {
                let current = match listener.take() {
                    Some(listener) => listener,
                    None => {
                        if state.wait_for(|up| *up).await.is_err() {
                            return;
                        }
                        // Tokio sets SO_REUSEADDR, and reset connections leave no
                        // TIME_WAIT behind, so the port is free again at once.
                        match tokio::net::TcpListener::bind(addr).await {
                            Ok(listener) => {
                                listening_state.store(true, Ordering::SeqCst);
                                listener
                            }
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        }
                    }
                };
                loop {
                    tokio::select! {
                        accepted = current.accept() => {
                            if let Ok((inbound, _)) = accepted {
                                live.fetch_add(1, Ordering::SeqCst);
                                tokio::spawn(relay(
                                    inbound,
                                    target.clone(),
                                    watching.clone(),
                                    live.clone(),
                                ));
                            }
                        }
                        _ = state.wait_for(|up| !*up) => break,
                    }
                }
                drop(current); // cut: refuse connections until restored
                listening_state.store(false, Ordering::SeqCst);
            }
        });
        Proxy {
            addr,
            up,
            listening,
            relays,
            _runtime: runtime,
        }
    }

    /// Restores, or cuts and returns once the cut is complete: nothing listens and
    /// every relayed connection has been reset, so whatever a client sends next fails.
    pub(crate) fn set_up(&self, up: bool) {
        self.up.send_replace(up);
        if !up {
            eventually(DEADLINE, "the proxy cut every connection", || {
                !self.listening.load(Ordering::SeqCst) && self.relays.load(Ordering::SeqCst) == 0
            });
        }
    }
}

/// Counts a relayed connection down when its relay ends, after both sockets closed.
struct Relayed(Arc<AtomicUsize>);

impl Drop for Relayed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Copies both ways until either side closes, or resets both when the proxy is cut.
async fn relay(
    inbound: tokio::net::TcpStream,
    target: String,
    mut state: watch::Receiver<bool>,
    live: Arc<AtomicUsize>,
) {
    // Declared before the sockets, so dropped after them (parameters would outlive it).
    let _relayed = Relayed(live);
    let mut inbound = inbound;
    if !*state.borrow_and_update() {
        let _ = inbound.set_zero_linger();
        return;
    }
    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
        let _ = inbound.set_zero_linger();
        return;
    };
    let cut = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
        _ = state.wait_for(|up| !*up) => true,
    };
    if cut {
        // SO_LINGER 0: dropping sends RST, as a broken network path would surface.
        let _ = inbound.set_zero_linger();
        let _ = outbound.set_zero_linger();
    }
}

/// One node whose Redis is reached through a [`Proxy`] the test can cut, ready with
/// Redis; its keys are removed from Redis when it is dropped.
struct NodeBehindProxy {
    // Dropped in this order: the node stops before its proxy, data dir and keys go.
    keel: Keel,
    proxy: Proxy,
    _dir: tempfile::TempDir,
    _cleanup: Cleanup,
    api: SocketAddr,
    url: String,
    prefix: String,
}

impl NodeBehindProxy {
    fn start() -> Option<NodeBehindProxy> {
        let url = redis_url()?;
        let prefix = unique_prefix();
        let cleanup = Cleanup(url.clone(), prefix.clone());
        let (target, db) = split_url(&url);
        let proxy = Proxy::start(target);
        let dir = scratch();
        let via_proxy = format!("redis://{}{db}", proxy.addr);
        let (keel, api) = Keel::start(
            dir.path(),
            &node_config(dir.path(), &via_proxy, &prefix, ""),
        );
        eventually(DEADLINE, "ready with Redis", || {
            get(api, "/readyz").status == 200
        });
        Some(NodeBehindProxy {
            url,
            prefix,
            proxy,
            keel,
            api,
            _dir: dir,
            _cleanup: cleanup,
        })
    }
}

#[test]
fn redis_outage_keeps_l1_reads_refuses_writes_and_recovers() {
    let Some(node) = NodeBehindProxy::start() else {
        return;
    };
    let NodeBehindProxy {
        url,
        prefix,
        proxy,
        keel,
        api,
        ..
    } = &node;
    let api = *api;
    assert_eq!(request(api, "PUT", "/v1/cache/warm", "hot").status, 204);
    assert_eq!(value(api, "warm").as_deref(), Some("hot"));

    proxy.set_up(false);
    // Reads from L1 keep answering throughout.
    // Redis is optional: /readyz stays 200 (the node still serves L1, the queue, SQL,
    // the gateway) and names it as degraded.
    eventually(DEADLINE, "/readyz reports redis degraded", || {
        assert_eq!(value(api, "warm").as_deref(), Some("hot"));
        let ready = get(api, "/readyz");
        assert_eq!(ready.status, 200, "{}", ready.body);
        let body = ready.json();
        body["degraded"] == true && body["dependencies"]["redis"]["state"] == "degraded"
    });
    assert!(
        get(api, "/readyz").json()["dependencies"]["redis"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("unreachable")
    );
    let refused = request(api, "PUT", "/v1/cache/other", "x");
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["code"], "cache_unavailable");
    assert!(refused.json()["detail"].as_str().unwrap().contains("redis"));
    assert_eq!(refused.header("retry-after"), Some("1"));
    let invalidate = request(api, "POST", "/v1/cache/invalidate", r#"{"keys":["warm"]}"#);
    assert_eq!(invalidate.status, 503, "{}", invalidate.body);
    let mut client = resp(keel.resp_addr());
    let error = redis::cmd("SET")
        .arg("other")
        .arg("x")
        .query::<()>(&mut client)
        .unwrap_err();
    assert!(error.to_string().contains("cache unavailable"), "{error}");
    let metrics = get(api, "/metrics").body;
    assert!(
        metrics.contains("keel_dependency_up{dependency=\"redis\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("keel_dependency_errors_total{dependency=\"redis\"}"));
    assert_eq!(value(api, "warm").as_deref(), Some("hot"));

    proxy.set_up(true);
    eventually(DEADLINE, "recovery", || {
        get(api, "/readyz").json()["dependencies"]["redis"]["state"] == "ready"
            && request(api, "PUT", "/v1/cache/other", "y").status == 204
    });
    let metrics = get(api, "/metrics").body;
    assert!(metrics.contains("keel_dependency_up{dependency=\"redis\"} 1"));
    eventually(DEADLINE, "the write reached Redis", || {
        let mut redis = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let stored: Option<Vec<u8>> = redis::cmd("GET")
            .arg(format!("{prefix}c:other"))
            .query(&mut redis)
            .unwrap();
        stored.is_some_and(|bytes| bytes.ends_with(b"y"))
    });
}

/// The stored bytes of `key` in Redis under `prefix` (the entry's encoding ends with the
/// value), read around keel.
fn in_redis(url: &str, prefix: &str, key: &str) -> Option<Vec<u8>> {
    let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
    redis::cmd("GET")
        .arg(format!("{prefix}c:{key}"))
        .query(&mut redis)
        .unwrap()
}

/// With Redis as L2 a write is answered only once Redis stored it. Pipelined writes
/// are answered in order, after Redis stored them. Right after a cut, before the
/// breaker has seen enough failures to open, a RESP SET and a REST PUT get the error,
/// not an acknowledgement, and the node does not serve the values Redis never got.
/// Once Redis is back, writes succeed again.
#[test]
fn a_write_redis_did_not_store_is_answered_as_an_error_and_not_served() {
    let Some(node) = NodeBehindProxy::start() else {
        return;
    };
    let NodeBehindProxy {
        url,
        prefix,
        proxy,
        keel,
        api,
        ..
    } = &node;
    let api = *api;
    let mut client = resp(keel.resp_addr());
    let (ok, counter, read): (String, i64, String) = redis::pipe()
        .cmd("SET")
        .arg("resp")
        .arg("old")
        .cmd("INCR")
        .arg("counter")
        .cmd("GET")
        .arg("resp")
        .query(&mut client)
        .unwrap();
    assert_eq!((ok.as_str(), counter, read.as_str()), ("OK", 1, "old"));
    assert_eq!(request(api, "PUT", "/v1/cache/rest", "old").status, 204);
    for key in ["resp", "rest"] {
        assert!(in_redis(url, prefix, key).is_some_and(|stored| stored.ends_with(b"old")));
    }

    proxy.set_up(false);
    let error = redis::cmd("SET")
        .arg("resp")
        .arg("new")
        .query::<()>(&mut client)
        .unwrap_err();
    assert!(error.to_string().contains("cache unavailable"), "{error}");
    let refused = request(api, "PUT", "/v1/cache/rest", "new");
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["code"], "cache_unavailable");
    assert!(refused.json()["detail"].as_str().unwrap().contains("redis"));
    assert_eq!(refused.header("retry-after"), Some("1"));
    // The node forgot both keys: neither the refused value nor the one it replaced is
    // served from L1, and Redis cannot be asked.
    for key in ["resp", "rest"] {
        let read = get(api, &format!("/v1/cache/{key}"));
        assert_eq!(read.status, 503, "{key}: {}", read.body);
    }
    let read = redis::cmd("GET")
        .arg("resp")
        .query::<Option<String>>(&mut client);
    assert!(read.is_err(), "{read:?}");
    for key in ["resp", "rest"] {
        assert!(
            in_redis(url, prefix, key).is_some_and(|stored| stored.ends_with(b"old")),
            "{key}: Redis holds the value before the cut"
        );
    }

    proxy.set_up(true);
    eventually(DEADLINE, "REST writes succeed again", || {
        request(api, "PUT", "/v1/cache/rest", "newer").status == 204
    });
    let () = redis::cmd("SET")
        .arg("resp")
        .arg("newer")
        .query(&mut client)
        .unwrap();
    for key in ["resp", "rest"] {
        assert_eq!(value(api, key).as_deref(), Some("newer"));
        assert!(in_redis(url, prefix, key).is_some_and(|stored| stored.ends_with(b"newer")));
    }
}

#[test]
fn a_shared_rate_limit_holds_across_two_nodes() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix();
    let _cleanup = Cleanup(url.clone(), prefix.clone());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let upstream = TestServer::start(axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { "ok" }
    }));
    // 40/s with a burst of 40, keyed globally: two nodes together admit 40 at once
    // and 40 a second after that, not twice as many.
    let extra = format!(
        "[ratelimit]\nshared = \"{url}\"\nredis_prefix = \"{prefix}rl:\"\n\
         [listeners.gateway]\nbind = \"127.0.0.1:0\"\n\
         [gateway.upstreams.app]\nservers = [\"{}\"]\n\
         [[gateway.routes]]\nname = \"limited\"\npath_prefix = \"/\"\nupstream = \"app\"\n\
         rate_limit = {{ key = \"global\", rate = \"40/s\", burst = 40 }}\n",
        upstream.addr
    );
    let (dir_a, dir_b) = (scratch(), scratch());
    let config = |dir: &std::path::Path| crate::support::base_config(dir) + &extra;
    let (a, _) = Keel::start(dir_a.path(), &config(dir_a.path()));
    let (b, _) = Keel::start(dir_b.path(), &config(dir_b.path()));
    let gateways = [a.gateway_addr(), b.gateway_addr()];

    // Four clients, two per node, for 1.5 s: the limit admits the burst plus 1.5 s of
    // the rate, 100, whatever each node sees alone.
    let (admitted, elapsed, statuses) = hammer_gateways(&gateways, 4, Duration::from_millis(1500));
    let expected = 40.0 + 40.0 * elapsed;
    assert!(
        statuses.contains(&429),
        "the limit was reached: {statuses:?}"
    );
    assert!(
        (admitted - expected).abs() <= expected * 0.1,
        "admitted {admitted}, expected {expected:.0} ± 10 %"
    );
    assert_eq!(hits.load(Ordering::SeqCst) as f64, admitted);
}

/// Sends `GET /x` from `clients` threads spread over `gateways` for `window`; returns how
/// many were admitted (200), the seconds the window really lasted, and every status seen.
pub fn hammer_gateways(
    gateways: &[SocketAddr],
    clients: usize,
    window: Duration,
) -> (f64, f64, HashSet<u16>) {
    let running = Arc::new(AtomicBool::new(true));
    let admitted = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|index| {
            let (running, admitted) = (running.clone(), admitted.clone());
            let gateway = gateways[index % gateways.len()];
            std::thread::spawn(move || {
                let mut statuses = HashSet::new();
                while running.load(Ordering::SeqCst) {
                    let status = get(gateway, "/x").status;
                    if status == 200 {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                    statuses.insert(status);
                }
                statuses
            })
        })
        .collect();
    // The measuring window itself, not a wait for something to happen.
    while started.elapsed() < window {
        std::thread::sleep(Duration::from_millis(10));
    }
    running.store(false, Ordering::SeqCst);
    let elapsed = started.elapsed().as_secs_f64();
    let mut statuses = HashSet::new();
    for thread in threads {
        statuses.extend(thread.join().unwrap());
    }
    (admitted.load(Ordering::SeqCst) as f64, elapsed, statuses)
}
