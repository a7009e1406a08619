//! Authentication end to end: tokens by role and scope on every subsystem's routes,
//! RESP AUTH with the `redis` crate, the `keel token` CLI next to a running server,
//! dashboard sessions with CSRF, failure limits, and that no token ever shows up in a
//! log line or a response it should not be in.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use redis::Value;

use crate::support::{
    DEADLINE, Keel, Reply, base_config, keel_output, read_reply, resp_config, scratch,
};

/// One HTTP/1.1 exchange with extra header lines.
fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    read_reply(&mut stream)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn auth_config(dir: &Path, extra: &str) -> String {
    format!("{}[auth]\nenabled = true\n{extra}", base_config(dir))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The token keel wrote on its first start.
fn admin_token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("data/admin.token"))
        .expect("admin.token")
        .trim()
        .to_owned()
}

/// Creates a token over REST with the admin token; returns the new token.
fn create_token(addr: SocketAddr, admin: &str, body: &str) -> String {
    let reply = call(
        addr,
        "POST",
        "/v1/auth/tokens",
        &[("Authorization", &bearer(admin))],
        body,
    );
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    reply.json()["token"].as_str().unwrap().to_owned()
}

/// `(label, method, path, body)` of one representative route per subsystem and kind.
const ROUTES: &[(&str, &str, &str, &str)] = &[
    ("cache get", "GET", "/v1/cache/k", ""),
    ("cache put", "PUT", "/v1/cache/k", "v"),
    ("cache mget", "POST", "/v1/cache/mget", r#"{"keys":["k"]}"#),
    ("queue stats", "GET", "/v1/queues", ""),
    (
        "queue enqueue",
        "POST",
        "/v1/queues/q/jobs",
        r#"{"payload":{}}"#,
    ),
    (
        "sql query",
        "POST",
        "/v1/sql/query",
        r#"{"sql":"SELECT 1"}"#,
    ),
    (
        "sql execute",
        "POST",
        "/v1/sql/execute",
        r#"{"sql":"CREATE TABLE IF NOT EXISTS t (x)"}"#,
    ),
    ("gateway upstreams", "GET", "/v1/gateway/upstreams", ""),
    ("token list", "GET", "/v1/auth/tokens", ""),
    ("config validate", "POST", "/v1/config/validate", ""),
    ("metrics history", "GET", "/v1/metrics/history", ""),
    ("session", "GET", "/v1/auth/session", ""),
];

/// What each of `ROUTES` needs, in the same order.
enum Need {
    Read(&'static str),
    Write(&'static str),
    Admin,
    Any,
}

const NEEDS: &[Need] = &[
    Need::Read("cache"),
    Need::Write("cache"),
    Need::Read("cache"),
    Need::Read("queue"),
    Need::Write("queue"),
    Need::Read("sql"),
    Need::Write("sql"),
    Need::Read("gateway"),
    Need::Admin,
    Need::Admin,
    Need::Any,
    Need::Any,
];

#[test]
fn each_role_and_scope_reaches_exactly_its_routes() {
    let dir = scratch();
    let (keel, addr) = Keel::start(
        dir.path(),
        &auth_config(dir.path(), "metrics = \"token\"\n"),
    );
    let admin = admin_token(dir.path());
    assert!(
        keel.log_text()
            .contains(&dir.path().join("data/admin.token").display().to_string())
    );

    // Probes and the dashboard's page stay open; /metrics follows auth.metrics.
    for path in ["/healthz", "/readyz", "/"] {
        assert_eq!(call(addr, "GET", path, &[], "").status, 200, "{path}");
    }
    let metrics = call(addr, "GET", "/metrics", &[], "");
    assert_eq!(metrics.status, 401);
    let missing = call(addr, "GET", "/v1/cache/k", &[], "");
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["code"], "unauthenticated");
    assert_eq!(
        missing.header("www-authenticate"),
        Some("Bearer realm=\"keel\"")
    );
    let wrong = call(
        addr,
        "GET",
        "/v1/cache/k",
        &[("Authorization", "Bearer keel_nope")],
        "",
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["code"], "invalid_credentials");

    // Every role with every single scope, and with none (all subsystems): what each may
    // reach follows from the route's needs, written here from the spec, not the code.
    assert_eq!(NEEDS.len(), ROUTES.len());
    let mut matrix = Vec::new();
    for role in ["admin", "operator", "readonly"] {
        for scope in [
            None,
            Some("cache"),
            Some("queue"),
            Some("sql"),
            Some("gateway"),
        ] {
            let spec = match scope {
                Some(scope) => format!(r#"{{"role":"{role}","scopes":["{scope}"]}}"#),
                None => format!(r#"{{"role":"{role}"}}"#),
            };
            let expected: String = NEEDS
                .iter()
                .map(|need| {
                    let allowed = match *need {
                        Need::Any => true,
                        Need::Admin => role == "admin",
                        Need::Read(subsystem) => scope.is_none_or(|s| s == subsystem),
                        Need::Write(subsystem) => {
                            role != "readonly" && scope.is_none_or(|s| s == subsystem)
                        }
                    };
                    if allowed { 'y' } else { 'n' }
                })
                .collect();
            matrix.push((spec, expected));
        }
    }
    // Several scopes at once add up.
    matrix.push((
        r#"{"role":"operator","scopes":["sql","gateway"]}"#.to_owned(),
        "nnnnnyyynnyy".to_owned(),
    ));
    for (spec, expected) in &matrix {
        let token = create_token(addr, &admin, spec);
        let authorization = bearer(&token);
        for ((label, method, path, body), allowed) in ROUTES.iter().zip(expected.chars()) {
            let reply = call(
                addr,
                method,
                path,
                &[("Authorization", &authorization)],
                body,
            );
            if allowed == 'y' {
                assert!(
                    ![401, 403, 429].contains(&reply.status),
                    "{spec} should reach {label}: {} {}",
                    reply.status,
                    reply.body
                );
            } else {
                assert_eq!(
                    reply.status, 403,
                    "{spec} must not reach {label}: {}",
                    reply.body
                );
                let problem = reply.json();
                assert_eq!(problem["code"], "forbidden");
                assert!(
                    problem.get("required_role").is_some()
                        || problem.get("required_scope").is_some(),
                    "the refusal names what is missing: {problem}"
                );
            }
        }
    }
    // A queue token cannot run SQL, and says which scope it lacks.
    let queue = create_token(addr, &admin, r#"{"role":"operator","scopes":["queue"]}"#);
    let refused = call(
        addr,
        "POST",
        "/v1/sql/query",
        &[("Authorization", &bearer(&queue))],
        r#"{"sql":"SELECT 1"}"#,
    );
    assert_eq!(refused.json()["required_scope"], "sql");
    let readonly = create_token(addr, &admin, r#"{"role":"readonly","name":"ro"}"#);
    let write = call(
        addr,
        "PUT",
        "/v1/cache/k",
        &[("Authorization", &bearer(&readonly))],
        "v",
    );
    assert_eq!(write.status, 403);
    assert_eq!(write.json()["detail"], "this token is read-only");
    assert_eq!(
        call(
            addr,
            "GET",
            "/metrics",
            &[("Authorization", &bearer(&readonly))],
            ""
        )
        .status,
        200
    );

    // Listing shows no secret; revoking over REST takes effect at once.
    let list = call(
        addr,
        "GET",
        "/v1/auth/tokens",
        &[("Authorization", &bearer(&admin))],
        "",
    );
    assert!(
        !list.body.contains(&readonly) && !list.body.contains("hash"),
        "{}",
        list.body
    );
    let listed = list.json();
    let names: Vec<&str> = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|token| token["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"ro") && names.contains(&"admin"),
        "{names:?}"
    );
    let name = "ro";
    let revoked = call(
        addr,
        "DELETE",
        &format!("/v1/auth/tokens/{name}"),
        &[("Authorization", &bearer(&admin))],
        "",
    );
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    let gone = call(
        addr,
        "GET",
        "/v1/cache/k",
        &[("Authorization", &bearer(&readonly))],
        "",
    );
    assert_eq!(gone.status, 401);
}

#[test]
fn resp_auth_takes_tokens_and_enforces_scope_and_read_only() {
    let dir = scratch();
    let config = resp_config(dir.path(), "[auth]\nenabled = true\n");
    let (keel, addr) = Keel::start(dir.path(), &config);
    let admin = admin_token(dir.path());
    let readonly = create_token(addr, &admin, r#"{"role":"readonly","scopes":["cache"]}"#);
    let queue = create_token(addr, &admin, r#"{"role":"operator","scopes":["queue"]}"#);
    let resp = keel.resp_addr();
    let connect = |url: String| {
        redis::Client::open(url)
            .unwrap()
            .get_connection_with_timeout(DEADLINE)
    };
    let query = |con: &mut redis::Connection, command: &mut redis::Cmd| -> Result<Value, String> {
        match command.query::<Value>(con) {
            Ok(Value::ServerError(error)) => Err(format!(
                "{} {}",
                error.code(),
                error.details().unwrap_or("")
            )),
            Ok(value) => Ok(value),
            Err(error) => Err(format!(
                "{} {}",
                error.code().unwrap_or(""),
                error.detail().unwrap_or("")
            )),
        }
    };

    // AUTH <token>, from the URL's password.
    let mut con = connect(format!("redis://:{admin}@{resp}/")).unwrap();
    query(&mut con, redis::cmd("SET").arg("k").arg("v")).unwrap();

    // AUTH <user> <token>: the user name is ignored.
    let mut con = connect(format!("redis://anyone:{readonly}@{resp}/")).unwrap();
    assert_eq!(
        query(&mut con, redis::cmd("GET").arg("k")).unwrap(),
        Value::BulkString(b"v".to_vec())
    );
    query(&mut con, &mut redis::cmd("DBSIZE")).unwrap();
    assert_eq!(
        query(&mut con, redis::cmd("SET").arg("k").arg("w")).unwrap_err(),
        "NOPERM this token is read-only"
    );
    assert_eq!(
        query(&mut con, redis::cmd("DEL").arg("k")).unwrap_err(),
        "NOPERM this token is read-only"
    );

    // A token without the cache scope, and a wrong one, are refused.
    let mut con = connect(format!("redis://{resp}/")).unwrap();
    assert_eq!(
        query(&mut con, redis::cmd("GET").arg("k")).unwrap_err(),
        "NOAUTH Authentication required."
    );
    assert_eq!(
        query(&mut con, redis::cmd("AUTH").arg(&queue)).unwrap_err(),
        "NOPERM this token has no access to the cache"
    );
    assert!(
        query(&mut con, redis::cmd("AUTH").arg("keel_wrong"))
            .unwrap_err()
            .starts_with("WRONGPASS")
    );
    // HELLO 3 AUTH user token authenticates too.
    query(
        &mut con,
        redis::cmd("HELLO")
            .arg(3)
            .arg("AUTH")
            .arg("default")
            .arg(&admin),
    )
    .unwrap();
    query(&mut con, redis::cmd("SET").arg("k2").arg("v")).unwrap();
}

#[test]
fn the_token_cli_works_next_to_a_running_server_and_revocation_takes_effect() {
    let dir = scratch();
    let (keel, addr) = Keel::start(dir.path(), &auth_config(dir.path(), ""));
    let config = keel.config_path.to_str().unwrap().to_owned();
    let data = dir.path().join("data");
    for file in ["admin.token", "tokens.json", "auth.key"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }

    let created = keel_output(
        &[
            "token", "create", "--role", "operator", "--scope", "cache", "--name", "ci",
            "--config", &config,
        ],
        &[],
    );
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let token = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("keel_"), "{token}");
    assert!(String::from_utf8_lossy(&created.stderr).contains("only this once"));
    assert_eq!(mode(&data.join("tokens.json")), 0o600);

    // The server picks the new file up within a second.
    let authorization = bearer(&token);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = call(
            addr,
            "PUT",
            "/v1/cache/ci",
            &[("Authorization", &authorization)],
            "v",
        );
        if reply.status == 204 || reply.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new token never worked: {} {}",
            reply.status,
            reply.body
        );
    }

    let duplicate = keel_output(
        &[
            "token", "create", "--role", "admin", "--name", "ci", "--config", &config,
        ],
        &[],
    );
    assert_eq!(duplicate.status.code(), Some(2));

    let list = keel_output(&["token", "list", "--config", &config], &[]);
    let listing = String::from_utf8(list.stdout).unwrap();
    assert!(listing.contains("ci") && listing.contains("operator") && listing.contains("cache"));
    assert!(listing.contains("admin"));
    assert!(!listing.contains(&token) && !listing.contains(&admin_token(dir.path())));

    let revoke = keel_output(&["token", "revoke", "ci", "--config", &config], &[]);
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = call(
            addr,
            "GET",
            "/v1/cache/ci",
            &[("Authorization", &authorization)],
            "",
        );
        if reply.status == 401 {
            assert_eq!(reply.json()["code"], "invalid_credentials");
            break;
        }
        assert!(Instant::now() < deadline, "the revoked token still works");
    }
    let unknown = keel_output(&["token", "revoke", "ci", "--config", &config], &[]);
    assert_eq!(unknown.status.code(), Some(2));
}

/// The session cookie and the CSRF token of a login.
fn login(addr: SocketAddr, token: &str) -> (String, String, Reply) {
    let reply = call(
        addr,
        "POST",
        "/v1/auth/login",
        &[],
        &format!(r#"{{"token":"{token}"}}"#),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let set_cookie = reply.header("set-cookie").unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain HTTP: {set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let csrf = reply.json()["csrf"].as_str().unwrap().to_owned();
    (cookie, csrf, reply)
}

#[test]
fn dashboard_sessions_need_csrf_for_writes_and_never_leak_a_token() {
    let dir = scratch();
    let config =
        auth_config(dir.path(), "").replace("[lifecycle]", "[log]\nlevel = \"debug\"\n[lifecycle]");
    let (keel, addr) = Keel::start(dir.path(), &config);
    let admin = admin_token(dir.path());
    let operator = create_token(
        addr,
        &admin,
        r#"{"role":"operator","scopes":["cache"],"name":"dash"}"#,
    );
    let mut bodies = Vec::new();

    let wrong = call(
        addr,
        "POST",
        "/v1/auth/login",
        &[],
        r#"{"token":"keel_wrong"}"#,
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["code"], "invalid_credentials");
    bodies.push(wrong.body);
    let malformed = call(
        addr,
        "POST",
        "/v1/auth/login",
        &[],
        &format!("\"{operator}\""),
    );
    assert_eq!(malformed.status, 400);
    bodies.push(malformed.body);

    let (cookie, csrf, reply) = login(addr, &operator);
    let session = reply.json();
    assert_eq!(session["name"], "dash");
    assert_eq!(session["role"], "operator");
    assert_eq!(session["scopes"], serde_json::json!(["cache"]));
    assert_eq!(session["auth_enabled"], true);
    bodies.push(reply.body);

    let with_cookie = [("Cookie", cookie.as_str())];
    let current = call(addr, "GET", "/v1/auth/session", &with_cookie, "");
    assert_eq!(current.status, 200);
    assert_eq!(current.json()["csrf"], csrf.as_str());
    bodies.push(current.body);
    let read = call(addr, "GET", "/v1/cache/k", &with_cookie, "");
    assert_eq!(
        read.status, 404,
        "a cookie reads without CSRF: {}",
        read.body
    );
    bodies.push(read.body);

    let forged = call(addr, "PUT", "/v1/cache/k", &with_cookie, "v");
    assert_eq!(forged.status, 403);
    assert_eq!(forged.json()["code"], "csrf_failed");
    bodies.push(forged.body);
    let with_csrf = [("Cookie", cookie.as_str()), ("X-CSRF-Token", csrf.as_str())];
    let write = call(addr, "PUT", "/v1/cache/k", &with_csrf, "v");
    assert!(write.status < 300, "{} {}", write.status, write.body);
    bodies.push(write.body);
    let bearer_write = call(
        addr,
        "PUT",
        "/v1/cache/k",
        &[("Authorization", &bearer(&operator))],
        "w",
    );
    assert!(bearer_write.status < 300, "bearer requests need no CSRF");
    let scoped = call(
        addr,
        "POST",
        "/v1/sql/query",
        &with_csrf,
        r#"{"sql":"SELECT 1"}"#,
    );
    assert_eq!(scoped.status, 403);
    bodies.push(scoped.body);

    let logout = call(addr, "POST", "/v1/auth/logout", &with_cookie, "");
    assert_eq!(logout.status, 204);
    assert!(logout.header("set-cookie").unwrap().contains("Max-Age=0"));
    let after = call(addr, "GET", "/v1/auth/session", &with_cookie, "");
    assert_eq!(after.status, 401);
    bodies.push(after.body);

    // Revoking a token ends its sessions.
    let (cookie, _, reply) = login(addr, &operator);
    bodies.push(reply.body);
    let revoke = call(
        addr,
        "DELETE",
        "/v1/auth/tokens/dash",
        &[("Authorization", &bearer(&admin))],
        "",
    );
    assert_eq!(revoke.status, 204);
    let ended = call(
        addr,
        "GET",
        "/v1/auth/session",
        &[("Cookie", cookie.as_str())],
        "",
    );
    assert_eq!(ended.status, 401);
    bodies.push(ended.body);

    let metrics = call(addr, "GET", "/metrics", &[], "");
    assert!(
        metrics.body.contains("keel_auth_sessions"),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .contains("keel_auth_failures_total{reason=\"csrf\"} 1")
    );
    bodies.push(metrics.body);

    let log = keel.log_text();
    for token in [&admin, &operator] {
        assert!(!log.contains(token.as_str()), "a token in the log:\n{log}");
        for body in &bodies {
            assert!(
                !body.contains(token.as_str()),
                "a token in a response: {body}"
            );
        }
    }
    assert!(
        !log.contains(&cookie[cookie.find('=').unwrap() + 1..]),
        "a session in the log"
    );
}

#[test]
fn failed_authentications_are_limited_per_address() {
    let dir = scratch();
    let (keel, addr) = Keel::start(
        dir.path(),
        &auth_config(dir.path(), "failure_rate_limit = \"3/m\"\n"),
    );
    let admin = admin_token(dir.path());
    for _ in 0..3 {
        let reply = call(
            addr,
            "GET",
            "/v1/queues",
            &[("Authorization", "Bearer keel_guess")],
            "",
        );
        assert_eq!(reply.status, 401);
    }
    let limited = call(
        addr,
        "GET",
        "/v1/queues",
        &[("Authorization", "Bearer keel_guess")],
        "",
    );
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert_eq!(limited.json()["code"], "too_many_failures");
    assert!(limited.header("retry-after").is_some());
    // Even the right token waits now, and so does login.
    let right = call(
        addr,
        "GET",
        "/v1/queues",
        &[("Authorization", &bearer(&admin))],
        "",
    );
    assert_eq!(right.status, 429);
    let login = call(
        addr,
        "POST",
        "/v1/auth/login",
        &[],
        &format!(r#"{{"token":"{admin}"}}"#),
    );
    assert_eq!(login.status, 429);
    assert!(!login.body.contains(&admin));
    let metrics = call(addr, "GET", "/metrics", &[], "").body;
    assert!(
        metrics.contains("keel_auth_failures_total{reason=\"invalid\"} 3"),
        "{metrics}"
    );
    drop(keel);
}

#[test]
fn each_token_has_its_own_request_rate_limit() {
    let dir = scratch();
    let (_keel, addr) = Keel::start(
        dir.path(),
        &auth_config(dir.path(), "token_rate_limit = \"2/m\"\n"),
    );
    let admin = admin_token(dir.path());
    let authorization = bearer(&admin);
    let statuses: Vec<u16> = (0..3)
        .map(|_| {
            call(
                addr,
                "GET",
                "/v1/queues",
                &[("Authorization", &authorization)],
                "",
            )
            .status
        })
        .collect();
    assert_eq!(statuses, [200, 200, 429]);
    let limited = call(
        addr,
        "GET",
        "/v1/queues",
        &[("Authorization", &authorization)],
        "",
    );
    assert_eq!(limited.json()["code"], "rate_limited");
    assert!(limited.header("retry-after").is_some());
}

#[test]
fn without_auth_the_session_says_so() {
    let dir = scratch();
    let (_keel, addr) = Keel::start(dir.path(), &base_config(dir.path()));
    let session = call(addr, "GET", "/v1/auth/session", &[], "");
    assert_eq!(session.status, 200);
    assert_eq!(
        session.json(),
        serde_json::json!({"auth_enabled": false, "role": "admin", "scopes": [], "csrf": "", "name": null})
    );
    assert!(!dir.path().join("data/admin.token").exists());
}
