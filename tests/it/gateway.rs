//! The gateway in front of real upstream HTTP servers started by the test on
//! 127.0.0.1:0: balancing, health checks and failover, forwarding headers, framing
//! attacks, limits and slow clients, and a route change by SIGHUP.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{DEADLINE, Keel, Reply, base_config, get, parse_reply, scratch};

/// A real upstream: answers `name` on every path, echoes the forwarding headers it
/// got, and `/healthz` with 200 while healthy. It can be stopped and started again on
/// the same port.
struct Upstream {
    addr: SocketAddr,
    name: &'static str,
    hits: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<HashMap<String, String>>>>,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Upstream {
    fn start(name: &'static str) -> Upstream {
        // Its own runtime (not TestServer's): it stops and starts again on one port.
        let runtime = crate::support::server_runtime();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let mut upstream = Upstream {
            addr,
            name,
            hits: Arc::new(AtomicUsize::new(0)),
            healthy: Arc::new(AtomicBool::new(true)),
            seen: Arc::new(Mutex::new(Vec::new())),
            runtime,
            stop: None,
        };
        upstream.serve(listener);
        upstream
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (name, hits, healthy, seen) = (
            self.name,
            self.hits.clone(),
            self.healthy.clone(),
            self.seen.clone(),
        );
        let app = axum::Router::new()
            .route(
                "/healthz",
                axum::routing::get(move || {
                    let healthy = healthy.load(Ordering::SeqCst);
                    async move {
                        if healthy {
                            axum::http::StatusCode::OK
                        } else {
                            axum::http::StatusCode::SERVICE_UNAVAILABLE
                        }
                    }
                }),
            )
            .fallback(move |request: axum::extract::Request| {
                use axum::response::IntoResponse;
                let hits = hits.clone();
                let seen = seen.clone();
                async move {
                    let count = hits.fetch_add(1, Ordering::SeqCst) + 1;
                    let mut headers: HashMap<String, String> = request
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                        .collect();
                    headers.insert(":path".to_owned(), request.uri().to_string());
                    if request.uri().path().starts_with("/c/") {
                        seen.lock().unwrap().push(headers);
                        return cacheable(name, count, request).await;
                    }
                    let status = if request.uri().path().contains("fail") {
                        axum::http::StatusCode::UNAUTHORIZED
                    } else {
                        axum::http::StatusCode::OK
                    };
                    seen.lock().unwrap().push(headers);
                    let body = axum::body::to_bytes(request.into_body(), usize::MAX)
                        .await
                        .map(|b| b.len())
                        .unwrap_or(0);
                    (
                        status,
                        [
                            ("x-upstream", name),
                            ("connection", "x-private"),
                            ("x-private", "secret"),
                        ],
                        format!("{name} {body}"),
                    )
                        .into_response()
                }
            });
        self.runtime.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        self.stop = Some(stop);
    }

    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Wait until the port refuses connections.
        let started = Instant::now();
        while TcpStream::connect(self.addr).is_ok() {
            assert!(started.elapsed() < DEADLINE, "upstream did not stop");
        }
    }

    fn revive(&mut self) {
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .unwrap();
        self.serve(listener);
    }
}

/// `/c/...` answers for the cache tests: the query sets the response's Cache-Control
/// (`cc`), Cache-Tag (`tag`), Vary (`vary`), ETag (`etag`, with 304 on a match) and
/// Set-Cookie (`cookie`); `slow` in the path waits 300 ms. The body names the upstream,
/// the request count and the X-Lang header.
async fn cacheable(
    name: &str,
    count: usize,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| {
            (
                k.to_owned(),
                v.replace("%20", " ")
                    .replace("%3D", "=")
                    .replace("%2C", ",")
                    .replace("%22", "\""),
            )
        })
        .collect();
    let slow = request.uri().path().contains("slow");
    let request = request.map(|_| ());
    if slow {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut headers = axum::http::HeaderMap::new();
    headers.insert("content-type", "text/plain".parse().unwrap());
    let pairs = [
        ("cc", "cache-control"),
        ("tag", "cache-tag"),
        ("vary", "vary"),
        ("etag", "etag"),
        ("cookie", "set-cookie"),
    ];
    for (param, header) in pairs {
        if let Some(value) = query.get(param) {
            headers.insert(header, value.parse().unwrap());
        }
    }
    if let (Some(etag), Some(presented)) =
        (query.get("etag"), request.headers().get("if-none-match"))
        && presented.to_str().unwrap_or("") == etag
    {
        return (axum::http::StatusCode::NOT_MODIFIED, headers).into_response();
    }
    let lang = request
        .headers()
        .get("x-lang")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let filler = if query.contains_key("big") {
        "z".repeat(4000)
    } else {
        String::new()
    };
    (headers, format!("{name} {count} {lang} {filler}")).into_response()
}

fn gateway_config(dir: &std::path::Path, upstreams: &[&Upstream], extra: &str) -> String {
    let servers: Vec<String> = upstreams
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect();
    base_config(dir)
        + &format!(
            "[listeners.gateway]\nbind = \"127.0.0.1:0\"\n\
             [gateway]\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
             [gateway.upstreams.app]\nservers = [{}]\nmax_fails = 1\nopen_for = \"30s\"\nconnect_timeout = \"500ms\"\n\
             health = {{ path = \"/healthz\", interval = \"100ms\", rise = 2, fall = 2 }}\n\
             [[gateway.routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"app\"\nmax_body_bytes = \"1KiB\"\n\
             [[gateway.routes]]\nname = \"api\"\npath_prefix = \"/api\"\nstrip_prefix = true\nupstream = \"app\"\n{extra}",
            servers.join(", ")
        )
}

fn send(addr: SocketAddr, raw: &str) -> Reply {
    let mut stream = connect(addr);
    stream.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    parse_reply(&out)
}

fn start(dir: &std::path::Path, config: &str) -> (Keel, SocketAddr, SocketAddr) {
    let (keel, api) = Keel::start(dir, config);
    let gateway = keel.gateway_addr();
    (keel, api, gateway)
}

#[test]
fn requests_are_balanced_and_forwarded_with_the_right_headers() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let dir = scratch();
    let (_keel, api, gw) = start(dir.path(), &gateway_config(dir.path(), &[&a, &b], ""));
    let mut answers = HashMap::new();
    for _ in 0..10 {
        let reply = get(gw, "/hello?x=1");
        assert_eq!(reply.status, 200, "{}", reply.body);
        *answers
            .entry(reply.header("x-upstream").unwrap().to_owned())
            .or_insert(0) += 1;
        assert!(
            reply.header("x-private").is_none(),
            "Connection-named headers are dropped"
        );
        assert_eq!(reply.header("via"), Some("1.1 keel"));
        assert!(reply.header("x-request-id").is_some());
    }
    assert_eq!(answers.get("a"), Some(&5));
    assert_eq!(answers.get("b"), Some(&5));

    // Forwarded headers: a spoofed X-Forwarded-For from an untrusted peer is replaced.
    let reply = send(
        gw,
        "GET /api/items?q=1 HTTP/1.1\r\nHost: shop.test:8080\r\nX-Forwarded-For: 6.6.6.6\r\nX-Request-Id: abc-123\r\nConnection: close, x-drop\r\nX-Drop: 1\r\nKeep-Alive: timeout=5\r\n\r\n",
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-request-id"), Some("abc-123"));
    let seen = [&a, &b]
        .iter()
        .flat_map(|u| u.seen.lock().unwrap().clone())
        .find(|h| h.get(":path").is_some_and(|p| p.starts_with("/items")))
        .expect("the stripped path reached an upstream");
    assert_eq!(seen[":path"], "/items?q=1", "prefix stripped, query kept");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.test");
    assert_eq!(seen["x-request-id"], "abc-123");
    assert_eq!(seen["host"], "shop.test:8080", "Host is kept");
    assert!(!seen.contains_key("x-drop") && !seen.contains_key("keep-alive"));

    let upstreams = get(api, "/v1/gateway/upstreams").json();
    let servers = upstreams["upstreams"][0]["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2);
    assert!(
        servers
            .iter()
            .all(|s| s["healthy"] == true && s["circuit"] == "closed")
    );
}

#[test]
fn a_dead_upstream_is_ejected_without_failed_requests_and_readmitted_by_health_checks() {
    let (mut a, b) = (Upstream::start("a"), Upstream::start("b"));
    let dir = scratch();
    let (_keel, api, gw) = start(dir.path(), &gateway_config(dir.path(), &[&a, &b], ""));
    a.kill();
    for _ in 0..20 {
        let reply = get(gw, "/work");
        assert_eq!(
            reply.status, 200,
            "idempotent requests fail over: {}",
            reply.body
        );
        assert_eq!(reply.header("x-upstream"), Some("b"));
    }
    let a_addr = a.addr.to_string();
    let server = |api| {
        get(api, "/v1/gateway/upstreams").json()["upstreams"][0]["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["address"] == a_addr.as_str())
            .cloned()
            .unwrap()
    };
    let started = Instant::now();
    while server(api)["healthy"] != false {
        assert!(started.elapsed() < DEADLINE, "never marked unhealthy");
    }
    a.revive();
    let started = Instant::now();
    while server(api)["healthy"] != true {
        assert!(started.elapsed() < DEADLINE, "never readmitted");
    }
    let started = Instant::now();
    loop {
        if get(gw, "/work").header("x-upstream") == Some("a") {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "a never served again");
    }
    // With every server gone the answer is a clear 503/502.
    a.kill();
    drop(b);
    let reply = get(gw, "/work");
    assert!(
        matches!(reply.status, 502 | 503),
        "{} {}",
        reply.status,
        reply.body
    );
}

#[test]
fn framing_attacks_and_oversize_requests_are_refused() {
    let a = Upstream::start("a");
    let dir = scratch();
    let (_keel, _api, gw) = start(dir.path(), &gateway_config(dir.path(), &[&a], ""));
    let attacks = [
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 4\r\n\r\nabcd",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ];
    for attack in attacks {
        let reply = send(gw, attack);
        assert_eq!(reply.status, 400, "{attack:?}: {}", reply.body);
    }
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        0,
        "nothing ambiguous was forwarded"
    );

    let big = "x".repeat(2048);
    let reply = send(
        gw,
        &format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big}",
            big.len()
        ),
    );
    assert_eq!(reply.status, 413);
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(send(gw, &long).status, 414);
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let reply = send(
        gw,
        &format!("GET / HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n"),
    );
    assert_eq!(reply.status, 431);
    let ok = send(
        gw,
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body, "a 5");
}

#[test]
fn a_slow_header_client_is_cut_off_while_others_are_served() {
    let a = Upstream::start("a");
    let dir = scratch();
    let config = gateway_config(dir.path(), &[&a], "").replace(
        "[listeners.api]\n",
        "[listeners.api]\nheader_read_timeout = \"500ms\"\n",
    );
    let (_keel, _api, gw) = start(dir.path(), &config);
    let mut slow = TcpStream::connect(gw).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let started = Instant::now();
    assert_eq!(get(gw, "/other").status, 200, "others are served meanwhile");
    slow.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the slow client was disconnected"
    );
}

#[test]
fn sighup_changes_routes_with_requests_in_flight() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let dir = scratch();
    let (keel, _api, gw) = start(dir.path(), &gateway_config(dir.path(), &[&a], ""));
    assert_eq!(get(gw, "/x").header("x-upstream"), Some("a"));
    let running = Arc::new(AtomicBool::new(true));
    let failures = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (running, failures) = (running.clone(), failures.clone());
            std::thread::spawn(move || {
                while running.load(Ordering::SeqCst) {
                    if get(gw, "/x").status != 200 {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    let config = gateway_config(dir.path(), &[&b], "");
    std::fs::write(dir.path().join("keel.toml"), config).unwrap();
    keel.signal("HUP");
    let started = Instant::now();
    while get(gw, "/x").header("x-upstream") != Some("b") {
        assert!(
            started.elapsed() < DEADLINE,
            "the new route never took effect"
        );
    }
    running.store(false, Ordering::SeqCst);
    for thread in load {
        thread.join().unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "no request failed across the reload"
    );
}

#[test]
fn rate_limits_answer_429_with_their_headers_and_recover() {
    let a = Upstream::start("a");
    let dir = scratch();
    let extra = "[[gateway.routes]]\nname = \"limited\"\npath_prefix = \"/limited\"\nupstream = \"app\"\n\
                 rate_limit = { key = \"ip\", rate = \"5/s\", burst = 5 }\n\
                 [[gateway.routes]]\nname = \"login\"\npath_prefix = \"/login\"\nupstream = \"app\"\n\
                 rate_limit = { key = \"ip\", rate = \"2/m\", burst = 2, count = \"failures\" }\n";
    let (_keel, _api, gw) = start(dir.path(), &gateway_config(dir.path(), &[&a], extra));
    let request = |spoof: usize| {
        send(
            gw,
            &format!(
                "GET /limited HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.1.1.{spoof}\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    // A different spoofed X-Forwarded-For on each request: the peer is not trusted, so
    // the key stays the peer's address.
    for spoof in 0..5 {
        let reply = request(spoof);
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"limited\";q=5;w=1")
        );
        assert!(
            reply
                .header("ratelimit")
                .unwrap()
                .starts_with("\"limited\";r=")
        );
    }
    let refused = request(99);
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["code"], "rate_limited");
    assert!(
        refused
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert!(refused.header("ratelimit").unwrap().contains(";r=0"));
    let started = Instant::now();
    while request(0).status != 200 {
        assert!(started.elapsed() < DEADLINE, "the limit never recovered");
    }

    // Login mode: successes do not count, failures do.
    for _ in 0..5 {
        assert_eq!(get(gw, "/login/ok").status, 200);
    }
    assert_eq!(get(gw, "/login/fail").status, 401);
    assert_eq!(get(gw, "/login/fail").status, 401);
    assert_eq!(
        get(gw, "/login/fail").status,
        429,
        "two failures per minute"
    );
    assert_eq!(get(gw, "/login/ok").status, 429, "until the window passes");
}

/// A self-signed certificate for `name`, written as NAME.crt / NAME.key in `dir`.
fn self_signed(dir: &std::path::Path, name: &str) -> rustls::pki_types::CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    cert.der().clone()
}

#[test]
fn tls_picks_the_certificate_by_sni_and_plain_http_redirects() {
    use rustls::pki_types::ServerName;
    let a = Upstream::start("a");
    let dir = scratch();
    let certs: Vec<_> = ["a.test", "b.test"]
        .iter()
        .map(|name| self_signed(dir.path(), name))
        .collect();
    let file = |name: &str| dir.path().join(name).display().to_string();
    let config = gateway_config(dir.path(), &[&a], "").replace(
        "[listeners.gateway]\nbind = \"127.0.0.1:0\"\n",
        &format!(
            "[listeners.gateway]\nbind = \"127.0.0.1:0\"\ntls_bind = \"127.0.0.1:0\"\nredirect_http = true\n\
             certificates = [{{ cert = {:?}, key = {:?} }}, {{ cert = {:?}, key = {:?} }}]\n",
            file("a.test.crt"), file("a.test.key"), file("b.test.crt"), file("b.test.key")
        ),
    );
    let (keel, _api, plain) = start(dir.path(), &config);
    let tls_addr: SocketAddr = {
        let line = keel.wait_for_log("gateway tls listener bound");
        let start = line.find("addr=").unwrap() + 5;
        line[start..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs {
        roots.add(cert.clone()).unwrap();
    }
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    for (index, name) in ["a.test", "b.test"].iter().enumerate() {
        let connection =
            rustls::ClientConnection::new(client.clone(), ServerName::try_from(*name).unwrap())
                .unwrap();
        let mut stream =
            rustls::StreamOwned::new(connection, TcpStream::connect(tls_addr).unwrap());
        write!(
            stream,
            "GET /secure HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        let presented = stream.conn.peer_certificates().unwrap()[0].clone();
        assert_eq!(presented, certs[index], "{name} got its own certificate");
        let reply = parse_reply(&raw);
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.body, "a 0");
    }
    let seen = a.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["x-forwarded-proto"], "https");

    // HTTP/2 by ALPN: the host comes in the URI, and the upstream (HTTP/1.1) still
    // gets it as Host.
    let (status, body) = h2_get(client, tls_addr, "https://b.test/over-h2");
    assert_eq!((status, body.as_str()), (200, "a 0"));
    let seen = a.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen[":path"], "/over-h2");
    assert_eq!(seen["host"], "b.test");
    assert_eq!(seen["x-forwarded-host"], "b.test");

    let redirect = send(
        plain,
        "GET /page?x=1 HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(redirect.status, 308);
    assert_eq!(
        redirect.header("location"),
        Some(format!("https://shop.test:{}/page?x=1", tls_addr.port()).as_str())
    );
}

fn cache_config(dir: &std::path::Path, upstream: &Upstream) -> String {
    gateway_config(
        dir,
        &[upstream],
        "[[gateway.routes]]\nname = \"cached\"\npath_prefix = \"/c/\"\nupstream = \"app\"\ncompress = true\n\
         cache = { ttl = \"30s\" }\n",
    )
}

fn fetch(gw: SocketAddr, path: &str, extra: &str) -> Reply {
    send(
        gw,
        &format!("GET {path} HTTP/1.1\r\nHost: site.test\r\n{extra}Connection: close\r\n\r\n"),
    )
}

#[test]
fn responses_are_cached_revalidated_and_purged() {
    let a = Upstream::start("a");
    let dir = scratch();
    let (_keel, api, gw) = start(dir.path(), &cache_config(dir.path(), &a));
    let first = fetch(gw, "/c/page", "");
    assert_eq!(first.header("x-cache"), Some("MISS"), "{}", first.body);
    let second = fetch(gw, "/c/page", "");
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert_eq!(second.body, first.body, "the same stored response");
    assert!(second.header("age").is_some());
    assert_eq!(a.hits.load(Ordering::SeqCst), 1);
    // Ignored by nobody: a different query is a different entry.
    assert_eq!(fetch(gw, "/c/page?x=1", "").header("x-cache"), Some("MISS"));

    // Authorization bypasses; Set-Cookie is not stored; no-store is not stored.
    assert_eq!(
        fetch(gw, "/c/page", "Authorization: Bearer x\r\n").header("x-cache"),
        Some("BYPASS")
    );
    for path in ["/c/cookie?cookie=s%3D1", "/c/nostore?cc=no-store"] {
        assert_eq!(fetch(gw, path, "").header("x-cache"), Some("MISS"));
        assert_eq!(
            fetch(gw, path, "").header("x-cache"),
            Some("MISS"),
            "{path} was not stored"
        );
    }

    // Vary: one entry per X-Lang value.
    let en = fetch(gw, "/c/vary?vary=x-lang", "X-Lang: en\r\n");
    let fr = fetch(gw, "/c/vary?vary=x-lang", "X-Lang: fr\r\n");
    assert!(
        en.body.contains(" en ") && fr.body.contains(" fr "),
        "{} / {}",
        en.body,
        fr.body
    );
    assert_eq!(fr.header("x-cache"), Some("MISS"));
    let en_again = fetch(gw, "/c/vary?vary=x-lang", "X-Lang: en\r\n");
    assert_eq!(en_again.header("x-cache"), Some("HIT"));
    assert_eq!(en_again.body, en.body);

    // Stale while revalidating: served stale at once, refreshed behind it.
    let path = "/c/swr?cc=max-age%3D1%2C%20stale-while-revalidate%3D60";
    let original = fetch(gw, path, "");
    let started = Instant::now();
    let stale = loop {
        let reply = fetch(gw, path, "");
        if reply.header("x-cache") == Some("STALE") {
            break reply;
        }
        assert!(started.elapsed() < DEADLINE, "never went stale");
    };
    assert_eq!(stale.body, original.body);
    let started = Instant::now();
    loop {
        let reply = fetch(gw, path, "");
        if reply.body != original.body {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "never refreshed");
    }

    // ETag revalidation: once expired, the upstream answers 304 and keel keeps the body.
    let path = "/c/etag?cc=max-age%3D1&etag=%22v1%22";
    let original = fetch(gw, path, "");
    assert_eq!(original.header("etag"), Some("\"v1\""));
    let client_304 = fetch(gw, path, "If-None-Match: \"v1\"\r\n");
    assert_eq!(client_304.status, 304);
    let started = Instant::now();
    loop {
        let reply = fetch(gw, path, "");
        if reply.header("x-cache") == Some("MISS") {
            assert_eq!(reply.status, 200);
            assert_eq!(reply.body, original.body, "refreshed by a 304, same body");
            break;
        }
        assert!(started.elapsed() < DEADLINE, "never revalidated");
    }
    let revalidated = a
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|headers| headers.get("if-none-match").is_some_and(|v| v == "\"v1\""));
    assert!(revalidated, "keel asked with its validator");

    // Purge by tag and by URL.
    let tagged = "/c/tagged?tag=news";
    fetch(gw, tagged, "");
    assert_eq!(fetch(gw, tagged, "").header("x-cache"), Some("HIT"));
    let purge = crate::support::request(api, "POST", "/v1/gateway/purge", "{\"tag\": \"news\"}");
    assert_eq!(purge.status, 200, "{}", purge.body);
    assert_eq!(fetch(gw, tagged, "").header("x-cache"), Some("MISS"));
    assert_eq!(fetch(gw, "/c/page", "").header("x-cache"), Some("HIT"));
    let gw_url = "{\"url\": \"http://site.test/c/page\"}";
    let purge = crate::support::request(api, "POST", "/v1/gateway/purge", gw_url);
    assert_eq!(purge.status, 200, "{}", purge.body);
    assert_eq!(fetch(gw, "/c/page", "").header("x-cache"), Some("MISS"));
    let bad = crate::support::request(api, "POST", "/v1/gateway/purge", "{}");
    assert_eq!(bad.json()["code"], "bad_purge");
}

#[test]
fn concurrent_misses_make_one_upstream_request() {
    let a = Upstream::start("a");
    let dir = scratch();
    let (_keel, _api, gw) = start(dir.path(), &cache_config(dir.path(), &a));
    let threads: Vec<_> = (0..100)
        .map(|_| std::thread::spawn(move || fetch(gw, "/c/slow-report", "")))
        .collect();
    let replies: Vec<Reply> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(replies.iter().all(|r| r.status == 200));
    let bodies: std::collections::HashSet<&str> = replies.iter().map(|r| r.body.as_str()).collect();
    assert_eq!(bodies.len(), 1, "everyone got the one response");
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        1,
        "100 concurrent misses, 1 upstream request"
    );
}

#[test]
fn compression_follows_accept_encoding_and_is_cached_per_encoding() {
    use std::io::Read as _;
    let a = Upstream::start("a");
    let dir = scratch();
    let (_keel, _api, gw) = start(dir.path(), &cache_config(dir.path(), &a));
    let plain = fetch(gw, "/c/doc?big=1", "");
    assert!(plain.header("content-encoding").is_none());
    let gzip = fetch(gw, "/c/doc?big=1", "Accept-Encoding: gzip\r\n");
    assert_eq!(gzip.header("content-encoding"), Some("gzip"));
    assert!(
        gzip.header("vary")
            .unwrap()
            .to_ascii_lowercase()
            .contains("accept-encoding")
    );
    let mut decoded = String::new();
    flate2::read::GzDecoder::new(gzip.raw_body.as_slice())
        .read_to_string(&mut decoded)
        .unwrap();
    assert_eq!(decoded, plain.body);
    assert!(gzip.raw_body.len() < plain.raw_body.len() / 4);
    let refused = fetch(
        gw,
        "/c/doc?big=1",
        "Accept-Encoding: gzip;q=0, br;q=0, zstd;q=0\r\n",
    );
    assert!(refused.header("content-encoding").is_none());
    let br = fetch(gw, "/c/doc?big=1", "Accept-Encoding: br\r\n");
    assert_eq!(br.header("content-encoding"), Some("br"));
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        1,
        "one stored identity body serves every encoding"
    );
}

#[test]
fn nginx_as_the_upstream() {
    let Ok(nginx) = which("nginx") else {
        eprintln!("skipped: nginx is not installed (scripts/bench gateway installs it)");
        return;
    };
    let dir = scratch();
    let root = dir.path().join("nginx");
    std::fs::create_dir_all(root.join("html")).unwrap();
    std::fs::write(root.join("html/hello.json"), "{\"from\":\"nginx\"}").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = format!(
        "worker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\nevents {{ worker_connections 64; }}\n\
         http {{ access_log off; client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp; \
         uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;\n  server {{ listen 127.0.0.1:{port}; root {root}/html; \
         default_type application/json; location = /healthz {{ return 200 ok; }} \
         location = /early {{ client_max_body_size 0; return 200 early; }} }} }}\n",
        root = root.display()
    );
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::write(root.join("nginx.conf"), conf).unwrap();
    let mut child = std::process::Command::new(nginx)
        .args([
            "-p",
            &root.display().to_string(),
            "-c",
            &root.join("nginx.conf").display().to_string(),
            "-g",
            "daemon off;",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // SIGTERM lets the master stop its workers (SIGKILL would orphan them).
    let stop_nginx = |child: &mut std::process::Child| {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    };
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < DEADLINE, "nginx did not start");
    }
    let config = base_config(dir.path())
        + &format!(
            "[listeners.gateway]\nbind = \"127.0.0.1:0\"\n[gateway.upstreams.nginx]\nservers = [\"127.0.0.1:{port}\"]\n\
             health = {{ path = \"/healthz\", interval = \"200ms\" }}\n\
             [[gateway.routes]]\npath_prefix = \"/\"\nupstream = \"nginx\"\ncompress = true\ncache = {{ ttl = \"10s\" }}\n\
             [gateway.upstreams.unchecked]\nservers = [\"127.0.0.1:{port}\"]\n\
             [[gateway.routes]]\npath_prefix = \"/early\"\nupstream = \"unchecked\"\n"
        );
    let (_keel, _api, gw) = start(dir.path(), &config);
    let first = get(gw, "/hello.json");
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body, "{\"from\":\"nginx\"}");
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let second = get(gw, "/hello.json");
    if second.header("x-cache") != Some("HIT") {
        stop_nginx(&mut child);
        panic!(
            "nginx's response was not served from the cache: {:?}",
            second.headers
        );
    }
    let missing = get(gw, "/missing.json").status;
    let (early, upload_ended) = answer_while_uploading(gw, "/early", 64 << 20);
    let after = get(gw, "/hello.json").status;
    stop_nginx(&mut child);
    assert_eq!(missing, 404);
    assert!(
        early.starts_with("HTTP/1.1 200") && early.ends_with("early"),
        "{early}"
    );
    assert!(
        upload_ended,
        "the rest of the upload was neither read nor refused: the client hangs"
    );
    assert_eq!(after, 200, "the upstream connections are still usable");
}

/// POSTs `size` bytes to `path` from another thread and returns what comes back by the
/// time the answer's body ends in `early` (an upstream such as NGINX's `return`
/// answers before it has read the upload), and whether the upload then ended, by
/// being read or by the connection closing, within the deadline.
fn answer_while_uploading(gw: SocketAddr, path: &str, size: usize) -> (String, bool) {
    let mut stream = connect(gw);
    let mut writer = stream.try_clone().unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nhost: up\r\ncontent-length: {size}\r\n\r\n");
    let (ended, upload_ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let sent = (|| {
            writer.write_all(head.as_bytes())?;
            let zeros = vec![0u8; 64 << 10];
            for _ in 0..size / zeros.len() {
                writer.write_all(&zeros)?;
            }
            Ok::<_, std::io::Error>(())
        })();
        let _ = ended.send(sent.is_ok());
    });
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !answer.ends_with(b"early") {
        let Ok(read) = stream.read(&mut buffer) else {
            break;
        };
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..read]);
    }
    let finished = upload_ended.recv_timeout(DEADLINE).is_ok();
    drop(stream);
    (String::from_utf8_lossy(&answer).into_owned(), finished)
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .ok_or(())
}

#[test]
fn a_client_hanging_up_during_a_cache_fill_strands_nobody() {
    let a = Upstream::start("a");
    let dir = scratch();
    let (_keel, _api, gw) = start(dir.path(), &cache_config(dir.path(), &a));
    let mut leader = TcpStream::connect(gw).unwrap();
    leader
        .write_all(b"GET /c/slow-gone HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .unwrap();
    // Hang up once the fill is at the upstream (which takes 300 ms to answer).
    let started = Instant::now();
    while a.hits.load(Ordering::SeqCst) == 0 {
        assert!(started.elapsed() < DEADLINE, "the fill never started");
    }
    drop(leader);
    let reply = fetch(gw, "/c/slow-gone", "");
    assert_eq!(
        reply.status, 200,
        "the next request is answered: {}",
        reply.body
    );
}

#[test]
fn routes_are_listed_in_matching_order_with_settings_and_counters() {
    let a = Upstream::start("a");
    let dir = scratch();
    let extra = "[[gateway.routes]]\nname = \"cached\"\npath_prefix = \"/c/\"\nupstream = \"app\"\n\
                 cache = { ttl = \"30s\" }\n\
                 [[gateway.routes]]\nname = \"limited\"\npath_prefix = \"/limited\"\nupstream = \"app\"\n\
                 rate_limit = { key = \"ip\", rate = \"1/m\", burst = 1 }\n";
    let (_keel, api, gw) = start(dir.path(), &gateway_config(dir.path(), &[&a], extra));
    assert_eq!(fetch(gw, "/c/page", "").header("x-cache"), Some("MISS"));
    assert_eq!(fetch(gw, "/c/page", "").header("x-cache"), Some("HIT"));
    assert_eq!(get(gw, "/limited").status, 200);
    assert_eq!(get(gw, "/limited").status, 429);

    let listed = get(api, "/v1/gateway/routes");
    assert_eq!(listed.status, 200, "{}", listed.body);
    let routes = listed.json()["routes"].as_array().unwrap().clone();
    let names: Vec<&str> = routes.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["limited", "api", "cached", "app"],
        "longest prefix first"
    );
    let route = |name: &str| routes.iter().find(|r| r["name"] == name).unwrap().clone();

    let cached = route("cached");
    assert_eq!(cached["path_prefix"], "/c/");
    assert_eq!(cached["upstream"], "app");
    assert_eq!(cached["cache"]["ttl"], "30s");
    assert_eq!(cached["cache_results"]["miss"], 1);
    assert_eq!(cached["cache_results"]["hit"], 1);
    assert_eq!(cached["requests"]["2xx"], 2);
    assert!(cached["rate_limit"].is_null() && cached["rate_limited"].is_null());

    let limited = route("limited");
    assert_eq!(limited["rate_limit"]["rate"], "1/m");
    assert_eq!(limited["rate_limited"], 1);
    assert_eq!(limited["requests"]["4xx"], 1);
    assert!(
        limited["cache"].is_null() && limited["cache_results"] == serde_json::json!({}),
        "a route without a cache gets no cache series: {limited}"
    );
    assert_eq!(route("api")["rewrite"], "", "strip_prefix");
}

/// One GET over TLS with HTTP/2 negotiated by ALPN: (status, body).
fn h2_get(config: Arc<rustls::ClientConfig>, addr: SocketAddr, url: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let uri: hyper::Uri = url.parse().unwrap();
    let name = rustls::pki_types::ServerName::try_from(uri.host().unwrap().to_owned()).unwrap();
    let runtime = crate::support::server_runtime();
    runtime.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::get(uri)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
}

/// A client connection whose reads give up after the test deadline.
fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
}

/// keel's peak resident memory so far (VmHWM), in bytes.
fn peak_rss(keel: &Keel) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", keel.pid())).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn bodies_stream_both_ways_without_sitting_in_memory() {
    use futures_util::StreamExt;
    const SIZE: usize = 256 << 20;
    const CHUNK: usize = 64 << 10;
    // The upstream counts an upload as it arrives and makes a download as it is read.
    let app = axum::Router::new()
        .route(
            "/up",
            axum::routing::post(|body: axum::body::Body| async move {
                let mut stream = body.into_data_stream();
                let mut total = 0usize;
                while let Some(Ok(chunk)) = stream.next().await {
                    total += chunk.len();
                }
                total.to_string()
            }),
        )
        .route(
            "/down",
            axum::routing::get(|| async {
                let chunks = futures_util::stream::iter(
                    (0..SIZE / CHUNK)
                        .map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; CHUNK]))),
                );
                axum::body::Body::from_stream(chunks)
            }),
        );
    let upstream = crate::support::TestServer::start(app);
    let dir = scratch();
    let config = base_config(dir.path())
        + &format!(
            "[listeners.gateway]\nbind = \"127.0.0.1:0\"\n\
             [gateway.upstreams.big]\nservers = [\"{}\"]\n\
             [[gateway.routes]]\nname = \"big\"\npath_prefix = \"/\"\nupstream = \"big\"\nmax_body_bytes = \"1GiB\"\n",
            upstream.addr
        );
    let (keel, _api, gw) = start(dir.path(), &config);
    let before = peak_rss(&keel);

    let mut stream = connect(gw);
    write!(
        stream,
        "POST /up HTTP/1.1\r\nhost: big\r\ncontent-length: {SIZE}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let zeros = vec![0u8; CHUNK];
    for _ in 0..SIZE / CHUNK {
        stream.write_all(&zeros).unwrap();
    }
    let reply = crate::support::read_reply(&mut stream);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, SIZE.to_string(), "the upstream got every byte");

    // The download is counted as it arrives, never kept.
    let mut stream = connect(gw);
    write!(
        stream,
        "GET /down HTTP/1.1\r\nhost: big\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut received = 0usize;
    let mut buffer = vec![0u8; CHUNK];
    let mut tail = Vec::new();
    loop {
        let read = stream.read(&mut buffer).unwrap();
        if read == 0 {
            break;
        }
        received += read;
        tail.extend_from_slice(&buffer[..read]);
        let keep = tail.len().saturating_sub(8);
        tail.drain(..keep);
    }
    assert!(
        received > SIZE && tail.ends_with(b"0\r\n\r\n"),
        "the body came through whole and ended ({received} bytes with head and framing)"
    );
    let grown = peak_rss(&keel).saturating_sub(before);
    assert!(
        grown < (64 << 20),
        "keel's peak memory grew by {grown} bytes while 256 MiB passed each way"
    );
}
