//! The dashboard as served by a real keel (its files, their headers, what is not there),
//! and the system route its System page reads. The pages themselves are driven in a
//! browser by `scripts/test-browser`.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use crate::support::{DEADLINE, Keel, Reply, base_config, get, read_reply, scratch};

fn get_with(addr: SocketAddr, path: &str, headers: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: k\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    read_reply(&mut stream)
}

#[test]
fn the_dashboard_is_served_at_the_root_with_a_strict_policy() {
    let dir = scratch();
    let (_keel, addr) = Keel::start(dir.path(), &base_config(dir.path()));

    let index = get(addr, "/");
    assert_eq!(index.status, 200);
    assert_eq!(
        index.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(index.header("cache-control"), Some("no-cache"));
    let policy = index.header("content-security-policy").unwrap();
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{directive} in {policy}");
    }
    assert!(
        !policy.contains("unsafe"),
        "no unsafe-inline or unsafe-eval"
    );
    assert_eq!(index.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(index.header("x-frame-options"), Some("DENY"));
    assert!(
        !index.body.contains("<script>") && !index.body.contains("http"),
        "no inline script and no other host in index.html"
    );

    // Everything index.html names is served with its type and the same headers.
    for (path, media_type) in [
        ("/js/main.js", "text/javascript; charset=utf-8"),
        ("/app.css", "text/css; charset=utf-8"),
        ("/icon.svg", "image/svg+xml"),
    ] {
        assert!(index.body.contains(path), "index.html uses {path}");
        let file = get(addr, path);
        assert_eq!(file.status, 200, "{path}");
        assert_eq!(file.header("content-type"), Some(media_type), "{path}");
        assert_eq!(file.header("x-content-type-options"), Some("nosniff"));
        assert!(file.header("content-security-policy").is_some());
    }

    // Revalidation by content hash.
    let etag = index.header("etag").unwrap();
    let again = get_with(addr, "/", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!(again.status, 304);
    assert!(again.raw_body.is_empty());

    // Unknown paths stay problem+json 404s; the README of web/ is not served.
    for path in ["/nope.js", "/README.md", "/js/"] {
        let missing = get(addr, path);
        assert_eq!(missing.status, 404, "{path}");
        assert_eq!(
            missing.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(missing.json()["code"], "not_found");
    }

    // The api's JSON index moved to /v1.
    let api_index = get(addr, "/v1").json();
    assert_eq!(api_index["name"], "keel");
    assert_eq!(api_index["dashboard"], "/");
}

#[test]
fn system_reports_build_uptime_storage_and_the_redacted_configuration() {
    let dir = scratch();
    let config = format!(
        "{}[auth]\npassword = \"hunter2-system\"\n[sql]\nslow_query_ms = 7\n",
        base_config(dir.path())
    );
    let (_keel, addr) = Keel::start(dir.path(), &config);

    assert_eq!(get(addr, "/v1/system").status, 401, "behind auth like /v1");
    let reply = get_with(
        addr,
        "/v1/system",
        "Authorization: Bearer hunter2-system\r\n",
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        !reply.body.contains("hunter2"),
        "the secret never leaves: {}",
        reply.body
    );
    let system = reply.json();
    assert_eq!(system["version"], env!("CARGO_PKG_VERSION"));
    assert!(system["commit"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(system["uptime_seconds"].as_f64().unwrap() >= 0.0);
    let started = system["started_at"].as_u64().unwrap();
    assert!(started <= keel::cache::now_ms() && started > keel::cache::now_ms() - 600_000);
    assert_eq!(system["auth_enabled"], true);

    let data_dir = dir.path().join("data");
    assert_eq!(system["data_dir"], data_dir.display().to_string());
    let storage = system["storage"].as_array().unwrap();
    let names: Vec<&str> = storage
        .iter()
        .map(|file| file["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["keel.sqlite", "data.sqlite", "cache.redb", "queue.redb"]
    );
    for file in storage {
        assert!(
            file["bytes"].as_u64().unwrap() > 0,
            "every database exists and has a size: {file}"
        );
    }

    // The configuration as check-config serializes it: effective values, secrets blanked.
    assert_eq!(system["config"]["auth"]["password"], "<redacted>");
    assert_eq!(system["config"]["sql"]["slow_query_ms"], 7);
    assert_eq!(system["config"]["listeners"]["api"]["bind"], "127.0.0.1:0");
}
