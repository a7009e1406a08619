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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
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
                let hits = hits.clone();
                let seen = seen.clone();
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let mut headers: HashMap<String, String> = request
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                        .collect();
                    headers.insert(":path".to_owned(), request.uri().to_string());
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
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
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
