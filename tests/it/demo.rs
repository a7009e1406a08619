//! `keel demo`: one command gives a working site, the commands it prints work exactly
//! as printed, and Ctrl-C stops it cleanly and removes its temporary directory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{DEADLINE, KEEL, request, scratch};

/// A running demo and what it printed.
struct Demo {
    child: Child,
    printed: Vec<String>,
}

impl Demo {
    fn start(tmp: &std::path::Path, extra: &[&str]) -> Demo {
        let child = Command::new(KEEL)
            .args([
                "demo",
                "--bind",
                "127.0.0.1:0",
                "--resp-bind",
                "127.0.0.1:0",
                "--gateway-bind",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("TMPDIR", tmp)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn keel demo");
        // Owned by `Demo` from here on, so a failed wait below still kills the child.
        let mut demo = Demo {
            child,
            printed: Vec::new(),
        };
        let stdout = demo.child.stdout.take().expect("piped stdout");
        // Lines arrive on a channel, so the deadline holds even if the demo stalls.
        let (lines_tx, lines_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines_rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!("the demo did not finish printing; got {:#?}", demo.printed)
            });
            let done = line.contains("Press Ctrl-C");
            demo.printed.push(line);
            if done {
                return demo;
            }
        }
    }

    fn field(&self, label: &str) -> String {
        self.printed
            .iter()
            .find_map(|line| line.trim().strip_prefix(label))
            .unwrap_or_else(|| panic!("no {label:?} line in {:#?}", self.printed))
            .trim()
            .to_owned()
    }

    fn command(&self, program: &str) -> String {
        self.printed
            .iter()
            .map(|line| line.trim())
            .find(|line| line.starts_with(program))
            .unwrap_or_else(|| panic!("no {program} command in {:#?}", self.printed))
            .to_owned()
    }

    fn api(&self) -> SocketAddr {
        let url = self.field("Dashboard:");
        url.trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("dashboard address")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shell(command: &str) -> String {
    let output = Command::new("sh")
        .args(["-c", command])
        .output()
        .expect("run sh");
    assert!(
        output.status.success(),
        "{command} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn authorized_get(addr: SocketAddr, path: &str, token: &str) -> serde_json::Value {
    let reply = crate::support::request_with_headers(
        addr,
        "GET",
        path,
        &[("authorization", &format!("Bearer {token}"))],
        "",
    );
    assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
    reply.json()
}

#[test]
fn the_demo_runs_every_subsystem_and_its_printed_commands_work() {
    let tmp = scratch();
    let mut demo = Demo::start(tmp.path(), &[]);
    let token = demo.field("Admin token:");
    assert!(token.starts_with("keel_"), "printed token {token:?}");
    let api = demo.api();

    // The three example commands, run exactly as printed.
    let through_gateway = shell(&demo.command("curl -i"));
    assert!(
        through_gateway.starts_with("HTTP/1.1 200"),
        "{through_gateway}"
    );
    assert!(through_gateway.contains("\"id\":1"), "{through_gateway}");
    let from_resp = shell(&demo.command("redis-cli"));
    assert_eq!(from_resp.trim(), "Hello from keel");
    let enqueued = shell(&demo.command("curl -H"));
    let job: serde_json::Value = serde_json::from_str(&enqueued).expect("enqueue answers JSON");
    assert!(job["id"].is_string() || job["id"].is_number(), "{enqueued}");

    // Without a token the api refuses; the dashboard page itself is open.
    assert_eq!(request(api, "GET", "/v1/queues", "").status, 401);

    // The traffic and the failing webhook give the Queues page completed and dead jobs,
    // the SQL page the unindexed statement.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let queues = authorized_get(api, "/v1/queues", &token);
        let email = queues["queues"]
            .as_array()
            .and_then(|queues| queues.iter().find(|queue| queue["queue"] == "email"))
            .cloned()
            .unwrap_or_default();
        let stats = authorized_get(api, "/v1/sql/stats", &token);
        let scanned = stats["statements"].as_array().is_some_and(|statements| {
            statements.iter().any(|statement| {
                statement["statement"]
                    .as_str()
                    .is_some_and(|text| text.contains("author_email"))
            })
        });
        if email["dead"].as_u64() > Some(0) && email["completed"].as_u64() > Some(0) && scanned {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no dead + completed email jobs and SQL stats in time: {email} / {stats}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    grafana_dashboard_names_only_exposed_metrics(api);

    let data_dir = demo.field("Data dir:");
    let data_dir = data_dir.split(" (").next().unwrap().to_owned();
    assert!(std::path::Path::new(&data_dir).join("data.sqlite").exists());
    let status = Command::new("kill")
        .args(["-INT", &demo.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + DEADLINE;
    let exit = loop {
        if let Some(exit) = demo.child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the demo did not stop at Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "demo exit status {exit}");
    assert!(
        !std::path::Path::new(&data_dir).exists(),
        "the temporary data dir {data_dir} is still there"
    );
}

#[test]
fn a_demo_with_a_data_dir_keeps_it_and_can_run_without_traffic() {
    let tmp = scratch();
    let data = tmp.path().join("site");
    let data_arg = data.display().to_string();
    let mut demo = Demo::start(tmp.path(), &["--data", &data_arg, "--no-traffic"]);
    let token = demo.field("Admin token:");
    let api = demo.api();
    let stats = authorized_get(api, "/v1/sql/stats", &token);
    // No traffic: nothing but what the demo's seeding did has run.
    assert_eq!(
        stats["statements"].as_array().map(Vec::len),
        Some(0),
        "{stats}"
    );
    demo.child.kill().unwrap();
    demo.child.wait().unwrap();
    assert!(data.join("data.sqlite").exists());
    assert!(data.join("keel.toml").exists());

    // A second run reuses the directory: migrations are already applied, data is kept.
    let demo = Demo::start(tmp.path(), &["--data", &data_arg, "--no-traffic"]);
    let query = serde_json::json!({"sql": "SELECT count(*) AS n FROM posts"}).to_string();
    let reply = crate::support::request_with_headers(
        demo.api(),
        "POST",
        "/v1/sql/query",
        &[
            (
                "authorization",
                &format!("Bearer {}", demo.field("Admin token:")),
            ),
            ("content-type", "application/json"),
        ],
        &query,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.contains("10000"), "{}", reply.body);
}

/// Every metric the packaged Grafana dashboard queries is one `/metrics` exposes (the
/// demo's traffic gives every labelled family a child, so each has a `# TYPE` line).
fn grafana_dashboard_names_only_exposed_metrics(api: SocketAddr) {
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/grafana-dashboard.json"),
    )
    .expect("packaging/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let mut expressions = Vec::new();
    collect_expressions(&dashboard, &mut expressions);
    assert!(expressions.len() >= 10, "too few queries: {expressions:?}");
    let mut named = std::collections::BTreeSet::new();
    for expression in &expressions {
        for prefix in ["keel_", "process_"] {
            for (start, _) in expression.match_indices(prefix) {
                let name: String = expression[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(&name)
                    .to_owned();
                named.insert(family);
            }
        }
    }
    let deadline = Instant::now() + DEADLINE;
    loop {
        let exposed = request(api, "GET", "/metrics", "").body;
        let missing: Vec<_> = named
            .iter()
            .filter(|name| !exposed.contains(&format!("# TYPE {name} ")))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the Grafana dashboard names metrics /metrics does not expose: {missing:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn collect_expressions(value: &serde_json::Value, into: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => into.push(expr.clone()),
                    _ => collect_expressions(value, into),
                }
            }
        }
        serde_json::Value::Array(items) => items
            .iter()
            .for_each(|item| collect_expressions(item, into)),
        _ => {}
    }
}
