//! The SQL data API against a real keel: types, parameters, batches, read-path
//! refusals, timeouts, concurrency, cached named queries, statistics, the analyzer,
//! migrations and backup/restore.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Keel, Reply, base_config, get, keel_output, request, scratch};

pub fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
    request(addr, "POST", path, &body.to_string())
}

pub fn execute(addr: SocketAddr, sql: &str, params: Value) -> Value {
    let reply = post(
        addr,
        "/v1/sql/execute",
        json!({"sql": sql, "params": params}),
    );
    assert_eq!(reply.status, 200, "{sql}: {}", reply.body);
    reply.json()
}

pub fn query(addr: SocketAddr, sql: &str, params: Value) -> Value {
    let reply = post(addr, "/v1/sql/query", json!({"sql": sql, "params": params}));
    assert_eq!(reply.status, 200, "{sql}: {}", reply.body);
    reply.json()
}

fn count(addr: SocketAddr, table: &str) -> i64 {
    query(addr, &format!("SELECT count(*) FROM {table}"), json!([]))["rows"][0][0]
        .as_i64()
        .unwrap()
}

const SQL_TUNING: &str = "[sql]\nstatement_timeout = \"300ms\"\nmaintenance_cron = \"\"\n";

fn start(dir: &Path, extra: &str) -> (Keel, SocketAddr) {
    Keel::start(dir, &(base_config(dir) + SQL_TUNING + extra))
}

#[test]
fn values_round_trip_and_parameters_stay_data() {
    let dir = scratch();
    let (_keel, addr) = start(dir.path(), "");
    execute(
        addr,
        "CREATE TABLE kinds (i INTEGER, r REAL, t TEXT, n TEXT, b BLOB)",
        json!([]),
    );
    let inserted = execute(
        addr,
        "INSERT INTO kinds VALUES (?, ?, ?, ?, ?)",
        json!([-9007199254740993i64, 2.5, "tëxt\n\"quoted\"", null, {"base64": "AP8A"}]),
    );
    assert_eq!(inserted["rows_affected"], 1);
    assert_eq!(inserted["last_insert_id"], 1);
    let rows = query(addr, "SELECT i, r, t, n, b FROM kinds", json!([]));
    assert_eq!(rows["columns"], json!(["i", "r", "t", "n", "b"]));
    assert_eq!(
        rows["rows"][0],
        json!([-9007199254740993i64, 2.5, "tëxt\n\"quoted\"", null, {"base64": "AP8A"}])
    );

    // Named parameters, and an injection attempt that stays a value.
    let evil = "x'); DROP TABLE kinds; --";
    execute(
        addr,
        "INSERT INTO kinds (t) VALUES (:t)",
        json!({"t": evil}),
    );
    let found = query(
        addr,
        "SELECT count(*) FROM kinds WHERE t = @t",
        json!({"@t": evil}),
    );
    assert_eq!(found["rows"][0][0], 1);
    assert_eq!(count(addr, "kinds"), 2, "the table is still there");

    let missing = post(
        addr,
        "/v1/sql/query",
        json!({"sql": "SELECT :a, :b", "params": {"a": 1}}),
    );
    assert_eq!(missing.json()["code"], "bad_params");
    let extra = post(
        addr,
        "/v1/sql/query",
        json!({"sql": "SELECT ?", "params": [1, 2]}),
    );
    assert_eq!(extra.json()["code"], "bad_params");
}

#[test]
fn a_failing_batch_rolls_back_everything() {
    let dir = scratch();
    let (_keel, addr) = start(dir.path(), "");
    execute(
        addr,
        "CREATE TABLE ledger (id INTEGER PRIMARY KEY, amount INTEGER NOT NULL)",
        json!([]),
    );
    let failed = post(
        addr,
        "/v1/sql/batch",
        json!({"transaction": true, "statements": [
            {"sql": "INSERT INTO ledger (amount) VALUES (?)", "params": [10]},
            {"sql": "INSERT INTO ledger (amount) VALUES (?)", "params": [-10]},
            {"sql": "INSERT INTO ledger (amount) VALUES (?)", "params": [null]},
        ]}),
    );
    assert_eq!(failed.status, 409, "{}", failed.body);
    let problem = failed.json();
    assert_eq!(problem["code"], "constraint_violation");
    assert_eq!(problem["index"], 2);
    assert_eq!(problem["sqlite_error"], "SQLITE_CONSTRAINT_NOTNULL");
    assert_eq!(count(addr, "ledger"), 0, "nothing of the batch stayed");

    let ok = post(
        addr,
        "/v1/sql/batch",
        json!({"statements": [
            {"sql": "INSERT INTO ledger (amount) VALUES (1)"},
            {"sql": "UPDATE ledger SET amount = amount + 1"},
        ]}),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        query(addr, "SELECT amount FROM ledger", json!([]))["rows"],
        json!([[2]])
    );
}

#[test]
fn the_read_path_refuses_writes_and_escapes() {
    let dir = scratch();
    let (_keel, addr) = start(dir.path(), "");
    execute(addr, "CREATE TABLE t (x)", json!([]));
    let refused = [
        ("DELETE FROM t", "not_read_only"),
        ("WITH gone AS (SELECT 1) DELETE FROM t", "not_read_only"),
        ("EXPLAIN DELETE FROM t", "not_read_only"),
        ("ATTACH DATABASE '/tmp/keel-evil.db' AS evil", "not_allowed"),
        ("PRAGMA journal_mode = DELETE", "not_read_only"),
        ("PRAGMA user_version = 7", "not_read_only"),
        ("PRAGMA shrink_memory", "not_allowed"),
        ("SELECT load_extension('/tmp/evil.so')", "not_allowed"),
        ("VACUUM INTO '/tmp/keel-copy.db'", "not_allowed"),
        ("SELECT 1; DELETE FROM t", "multiple_statements"),
        ("SELEC 1", "sql_error"),
    ];
    for (sql, code) in refused {
        let reply = post(addr, "/v1/sql/query", json!({"sql": sql}));
        assert_eq!(reply.json()["code"], code, "{sql}: {}", reply.body);
        assert!(
            reply.status >= 400 && reply.status < 500,
            "{sql}: {}",
            reply.status
        );
    }
    assert!(!Path::new("/tmp/keel-copy.db").exists());
    // Reading pragmas stay allowed; multiple statements are refused on execute too.
    assert_eq!(
        query(addr, "PRAGMA table_info(t)", json!([]))["rows"][0][1],
        "x"
    );
    let two = post(
        addr,
        "/v1/sql/execute",
        json!({"sql": "INSERT INTO t VALUES (1); DROP TABLE t"}),
    );
    assert_eq!(two.json()["code"], "multiple_statements");
    let begin = post(addr, "/v1/sql/execute", json!({"sql": "BEGIN"}));
    assert_eq!(begin.json()["code"], "not_allowed");
    assert_eq!(count(addr, "t"), 0);
}

#[test]
fn a_runaway_query_is_stopped_and_the_server_goes_on() {
    let dir = scratch();
    let (_keel, addr) = start(dir.path(), "");
    let runaway = "WITH RECURSIVE forever(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM forever) SELECT count(*) FROM forever";
    let reply = post(addr, "/v1/sql/query", json!({"sql": runaway}));
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert_eq!(reply.json()["code"], "statement_timeout");
    assert_eq!(query(addr, "SELECT 42", json!([]))["rows"], json!([[42]]));

    std::fs::create_dir_all(dir.path().join("second")).unwrap();
    let limited = Keel::start(
        &dir.path().join("second"),
        &(base_config(&dir.path().join("second")) + "[sql]\nmax_rows = 10\n"),
    );
    let too_many = post(
        limited.1,
        "/v1/sql/query",
        json!({"sql": "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c LIMIT 11) SELECT n FROM c"}),
    );
    assert_eq!(too_many.status, 413);
    assert_eq!(too_many.json()["code"], "too_many_rows");
}

#[test]
fn concurrent_writers_and_readers_never_see_busy() {
    let dir = scratch();
    let (_keel, addr) = start(dir.path(), "");
    execute(
        addr,
        "CREATE TABLE events (id INTEGER PRIMARY KEY, worker INTEGER, n INTEGER)",
        json!([]),
    );
    let until = Instant::now() + Duration::from_secs(2);
    let mut threads = Vec::new();
    for worker in 0..8 {
        threads.push(std::thread::spawn(move || {
            let mut written = 0;
            while Instant::now() < until {
                let reply = post(addr, "/v1/sql/execute", json!({"sql": "INSERT INTO events (worker, n) VALUES (?, ?)", "params": [worker, written]}));
                assert_eq!(reply.status, 200, "writer {worker}: {}", reply.body);
                written += 1;
            }
            written
        }));
        threads.push(std::thread::spawn(move || {
            let mut reads = 0;
            while Instant::now() < until {
                let reply = post(addr, "/v1/sql/query", json!({"sql": "SELECT count(*), max(n) FROM events WHERE worker = ?", "params": [worker]}));
                assert_eq!(reply.status, 200, "reader {worker}: {}", reply.body);
                reads += 1;
            }
            reads
        }));
    }
    let totals: Vec<i64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let written: i64 = totals.iter().step_by(2).sum();
    assert!(written > 0);
    assert_eq!(
        count(addr, "events"),
        written,
        "every acknowledged insert is there"
    );
}

const BLOG: &str = r#"
[sql.queries.user_posts]
sql = "SELECT p.id, p.title, u.name FROM posts p JOIN users u ON u.id = p.user_id WHERE p.user_id = :user ORDER BY p.id"
cache_ttl = "1m"
[sql.queries.one_user]
sql = "SELECT id, name FROM users WHERE id = :key"
[cache.namespaces.users]
loader = { query = "one_user" }
ttl = "1m"
"#;

#[test]
fn cached_named_queries_are_invalidated_by_writes_to_any_table_they_read() {
    let dir = scratch();
    let (_keel, addr) = start(dir.path(), BLOG);
    execute(
        addr,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
        json!([]),
    );
    execute(
        addr,
        "CREATE TABLE posts (id INTEGER PRIMARY KEY, user_id INTEGER, title TEXT)",
        json!([]),
    );
    execute(addr, "INSERT INTO users VALUES (1, 'ada')", json!([]));
    execute(addr, "INSERT INTO posts VALUES (1, 1, 'first')", json!([]));

    let first = get(addr, "/v1/sql/q/user_posts?user=1");
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(first.json()["rows"], json!([[1, "first", "ada"]]));
    let second = get(addr, "/v1/sql/q/user_posts?user=1");
    assert_eq!(second.header("x-cache"), Some("HIT"));

    // A write to the joined table.
    execute(
        addr,
        "UPDATE users SET name = 'lovelace' WHERE id = 1",
        json!([]),
    );
    let after_user = get(addr, "/v1/sql/q/user_posts?user=1");
    assert_eq!(after_user.header("x-cache"), Some("MISS"));
    assert_eq!(after_user.json()["rows"], json!([[1, "first", "lovelace"]]));

    // A write to the main table, in a batch.
    let batch = post(
        addr,
        "/v1/sql/batch",
        json!({"statements": [{"sql": "INSERT INTO posts VALUES (2, 1, 'second')"}]}),
    );
    assert_eq!(batch.status, 200);
    let after_post = get(addr, "/v1/sql/q/user_posts?user=1");
    assert_eq!(after_post.json()["rows"].as_array().unwrap().len(), 2);

    // Writes and reads interleaved: a read right after an acknowledged write never
    // returns the old result.
    for round in 0..30 {
        get(addr, "/v1/sql/q/user_posts?user=1");
        execute(
            addr,
            "UPDATE posts SET title = ? WHERE id = 1",
            json!([format!("v{round}")]),
        );
        let seen = get(addr, "/v1/sql/q/user_posts?user=1").json();
        assert_eq!(seen["rows"][0][1], format!("v{round}"));
    }

    assert_eq!(get(addr, "/v1/sql/q/nope").json()["code"], "unknown_query");
    assert_eq!(
        get(addr, "/v1/sql/q/user_posts?user=1&extra=2").json()["code"],
        "bad_params"
    );

    // The named query as a cache loader.
    let loaded = get(addr, "/v1/cache/ns/users/1");
    assert_eq!(loaded.status, 200, "{}", loaded.body);
    let body: Value = serde_json::from_slice(&loaded.raw_body).unwrap();
    assert_eq!(body["rows"], json!([[1, "lovelace"]]));
    assert_eq!(get(addr, "/v1/cache/ns/users/99").status, 404);
}

#[test]
fn statistics_after_a_known_workload() {
    let dir = scratch();
    let (_keel, addr) = start(
        dir.path(),
        "[sql]\nslow_query_ms = 100000\n".trim_start_matches("[sql]\n"),
    );
    execute(
        addr,
        "CREATE TABLE s (id INTEGER PRIMARY KEY, v TEXT)",
        json!([]),
    );
    for id in 1..=5 {
        execute(addr, "INSERT INTO s VALUES (?, 'x')", json!([id]));
    }
    assert_eq!(post(addr, "/v1/sql/stats/reset", json!({})).status, 200);
    for id in 1..=5 {
        query(addr, &format!("SELECT v FROM s WHERE id = {id}"), json!([]));
    }
    query(addr, "SELECT v FROM s WHERE id > ?", json!([0]));
    let stats = get(addr, "/v1/sql/stats?sort=calls").json();
    assert_eq!(stats["source"], "keel");
    let top = &stats["statements"][0];
    assert_eq!(top["statement"], "SELECT v FROM s WHERE id=?");
    assert_eq!(top["calls"], 5);
    assert_eq!(top["rows"], 5);
    assert!(top["max_ms"].as_f64().unwrap() >= top["min_ms"].as_f64().unwrap());
    assert_eq!(
        stats["statements"][1]["statement"],
        "SELECT v FROM s WHERE id>?"
    );
    assert_eq!(stats["statements"][1]["rows"], 5);
    assert_eq!(stats["tracked"], 2);
    assert_eq!(
        get(addr, "/v1/sql/stats?sort=weird").json()["code"],
        "bad_sort"
    );
}

#[test]
fn the_advisor_turns_a_scan_into_a_search() {
    let dir = scratch();
    let (_keel, addr) = Keel::start(
        dir.path(),
        &(base_config(dir.path()) + "[sql]\nmaintenance_cron = \"\"\n"),
    );
    execute(
        addr,
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER, status TEXT, total REAL)",
        json!([]),
    );
    execute(
        addr,
        "INSERT INTO orders (customer, status, total) \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 100000) \
         SELECT i % 1000, CASE i % 3 WHEN 0 THEN 'paid' ELSE 'open' END, i * 1.5 FROM n",
        json!([]),
    );
    assert_eq!(count(addr, "orders"), 100_000);
    let analysis = post(
        addr,
        "/v1/sql/analyze",
        json!({"sql": "SELECT id, total FROM orders WHERE customer = ? AND total > ? ORDER BY total"}),
    )
    .json();
    assert!(
        analysis["plan"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("SCAN orders"),
        "{analysis}"
    );
    assert_eq!(analysis["findings"][0]["kind"], "full_scan", "{analysis}");
    let proposal = &analysis["proposal"];
    assert_eq!(
        proposal["columns"],
        json!(["customer", "total"]),
        "{analysis}"
    );
    assert_eq!(proposal["improves"], true);
    let after = proposal["plan_after"][0]["detail"].as_str().unwrap();
    assert!(after.starts_with("SEARCH orders USING"), "{after}");
    // The trial index was rolled back.
    let indexes = query(
        addr,
        "SELECT count(*) FROM sqlite_master WHERE type = 'index'",
        json!([]),
    );
    assert_eq!(indexes["rows"], json!([[0]]));
    // A write cannot be analyzed on the read path.
    let write = post(
        addr,
        "/v1/sql/analyze",
        json!({"sql": "DELETE FROM orders"}),
    );
    assert_eq!(write.json()["code"], "not_read_only");
}

#[test]
fn migrations_apply_once_and_a_changed_file_stops_start_up() {
    let dir = scratch();
    let migrations = dir.path().join("migrations");
    std::fs::create_dir_all(&migrations).unwrap();
    std::fs::write(
        migrations.join("0001_users.sql"),
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);",
    )
    .unwrap();
    std::fs::write(
        migrations.join("0002_seed.sql"),
        "INSERT INTO users (name) VALUES ('root');",
    )
    .unwrap();
    let config = base_config(dir.path())
        + &format!(
            "[sql]\nmigrations_dir = {:?}\nmaintenance_cron = \"\"\n",
            migrations.display().to_string()
        );
    let config_path = dir.path().join("keel.toml");
    std::fs::write(&config_path, &config).unwrap();
    let config_arg = config_path.display().to_string();

    let status = keel_output(&["migrate", "--status", "-c", &config_arg], &[]);
    let listing = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        listing.contains("0001 users") && listing.contains("pending"),
        "{listing}"
    );
    let applied = keel_output(&["migrate", "-c", &config_arg], &[]);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert!(!String::from_utf8_lossy(&applied.stdout).contains("pending"));

    {
        // Start-up applies nothing twice: one seeded row.
        let (_keel, addr) = Keel::start(dir.path(), &config);
        assert_eq!(count(addr, "users"), 1);
    }
    std::fs::write(
        migrations.join("0001_users.sql"),
        "CREATE TABLE users (id INTEGER PRIMARY KEY);",
    )
    .unwrap();
    let status = keel_output(&["migrate", "--status", "-c", &config_arg], &[]);
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("CHANGED"));
    let mut keel = Keel::spawn(dir.path(), &config);
    let exit = keel
        .wait_exit(crate::support::DEADLINE)
        .expect("start-up stops");
    assert!(!exit.success());
    assert!(
        keel.log_text().contains("was changed after it was applied"),
        "{}",
        keel.log_text()
    );
}

#[test]
fn a_backup_taken_while_running_restores_with_the_same_rows() {
    let dir = scratch();
    let config = base_config(dir.path()) + SQL_TUNING;
    let backup_dir = dir.path().join("backup");
    let job_id;
    {
        let (_keel, addr) = Keel::start(dir.path(), &config);
        execute(
            addr,
            "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT)",
            json!([]),
        );
        for id in 0..200 {
            execute(
                addr,
                "INSERT INTO items VALUES (?, ?)",
                json!([id, format!("v{id}")]),
            );
        }
        job_id = post(
            addr,
            "/v1/queues/kept/jobs",
            json!({"payload": {"keep": true}}),
        )
        .json()["id"]
            .as_u64()
            .unwrap();
        let config_path = dir.path().join("keel.toml");
        std::fs::write(&config_path, &config).unwrap();
        // The api port is ephemeral: point the CLI at the running one.
        let bind = format!("listeners.api.bind={addr}");
        let out = keel_output(
            &[
                "backup",
                "--out",
                &backup_dir.display().to_string(),
                "-c",
                &config_path.display().to_string(),
                "--set",
                &bind,
            ],
            &[],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let again = post(addr, "/v1/admin/backup", json!({"dir": backup_dir}));
        assert_eq!(
            again.json()["code"],
            "bad_backup_dir",
            "a backup never overwrites one"
        );
    }
    let restored = dir.path().join("restored");
    let restored_config = base_config(&restored) + SQL_TUNING;
    let restored_path = dir.path().join("restored.toml");
    std::fs::write(&restored_path, &restored_config).unwrap();
    let out = keel_output(
        &[
            "restore",
            "--from",
            &backup_dir.display().to_string(),
            "-c",
            &restored_path.display().to_string(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_keel, addr) = Keel::start(&restored, &restored_config);
    assert_eq!(
        query(addr, "PRAGMA integrity_check", json!([]))["rows"],
        json!([["ok"]])
    );
    assert_eq!(count(addr, "items"), 200);
    assert_eq!(
        query(addr, "SELECT v FROM items WHERE id = 199", json!([]))["rows"],
        json!([["v199"]])
    );
    let job = get(addr, &format!("/v1/jobs/{job_id}")).json();
    assert_eq!(job["payload"], json!({"keep": true}));
}

#[test]
fn maintenance_runs_as_a_queue_job() {
    let dir = scratch();
    let config = base_config(dir.path())
        + "[queue.queues.upkeep]\nprocessor = { \"sql.maintenance\" = {} }\n[sql]\nmaintenance_cron = \"\"\n";
    let (_keel, addr) = Keel::start(dir.path(), &config);
    let id = post(addr, "/v1/queues/upkeep/jobs", json!({})).json()["id"]
        .as_u64()
        .unwrap();
    let started = Instant::now();
    loop {
        let job = get(addr, &format!("/v1/jobs/{id}")).json();
        if job["state"] == "completed" {
            assert!(
                job["result"]["maintenance"]["checkpoint"].is_object(),
                "{job}"
            );
            break;
        }
        assert!(started.elapsed() < crate::support::DEADLINE, "{job}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The built-in nightly schedule exists unless disabled.
    let other = scratch();
    let (_default, addr) = Keel::start(other.path(), &base_config(other.path()));
    let schedules = get(addr, "/v1/schedules").json();
    assert_eq!(schedules["schedules"][0]["name"], "keel.sql.maintenance");
}

#[test]
fn a_client_hanging_up_mid_read_does_not_take_a_reader_with_it() {
    use std::io::Write;
    let dir = scratch();
    let (_keel, addr) = start(dir.path(), "readers = 1\n");
    let slow = json!({"sql": "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT count(*) FROM c"})
        .to_string();
    for _ in 0..3 {
        // Send a slow read and hang up before the answer.
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "POST /v1/sql/query HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{slow}",
            slow.len()
        )
        .unwrap();
        // Hang up once the read is running on the only reader.
        let started = Instant::now();
        while !get(addr, "/metrics")
            .body
            .contains("keel_sql_readers_in_use 1")
        {
            assert!(
                started.elapsed() < crate::support::DEADLINE,
                "the read never started"
            );
        }
        drop(stream);
    }
    // The only reader comes back every time: later reads are answered.
    for n in 0..5 {
        assert_eq!(query(addr, "SELECT ?", json!([n]))["rows"], json!([[n]]));
    }
    let metrics = get(addr, "/metrics").body;
    assert!(metrics.contains("keel_sql_readers_idle 1"), "{metrics}");
}
