//! The SQL data API's shared behaviour, one suite run against both backends: as
//! `sql_backends::sqlite::*` on the embedded SQLite and `sql_backends::postgres::*` with
//! `sql.url` on PostgreSQL. SQLite-only behaviour (types, pragmas, backup) stays in
//! `sql.rs`.
//!
//! PostgreSQL runs read `KEEL_TEST_POSTGRES_URL`; unset, they print SKIPPED and pass,
//! or fail under `KEEL_REQUIRE_EXTERNAL=1`. Each uses a schema of its own
//! (`keel_test_sql_<random>`, through `search_path`), dropped at the end.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{DEADLINE, Keel, POSTGRES_UP, base_config, get, keel_output, metric, scratch};

// The REST helpers are the SQLite suite's own.
use crate::sql::{execute, post, query};

/// `KEEL_TEST_POSTGRES_URL`, or `None` after saying the test is skipped (a failure under
/// `KEEL_REQUIRE_EXTERNAL=1`).
fn postgres_url() -> Option<String> {
    match std::env::var("KEEL_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("KEEL_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
                "KEEL_TEST_POSTGRES_URL is required (KEEL_REQUIRE_EXTERNAL=1; scripts/test sets it)"
            );
            eprintln!("SKIPPED: KEEL_TEST_POSTGRES_URL is not set (scripts/test sets it)");
            None
        }
    }
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// A schema of this test's own, dropped when the test ends (also after a failure).
struct TestSchema {
    url: String,
    name: String,
}

impl TestSchema {
    fn new(url: &str) -> TestSchema {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!(
            "keel_test_sql_{}_{:x}",
            std::process::id(),
            nanos & 0xffff_ffff_ffff
        );
        let schema = TestSchema {
            url: url.to_owned(),
            name,
        };
        schema.run(&format!("CREATE SCHEMA {}", schema.name));
        schema
    }

    fn run(&self, sql: &str) {
        block_on(async {
            let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .expect("connect to KEEL_TEST_POSTGRES_URL");
            tokio::spawn(connection);
            client.batch_execute(sql).await.expect(sql);
        });
    }

    /// `sql.url` with this schema first on the search path.
    fn url(&self) -> String {
        with_search_path(&self.url, &self.name)
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let name = self.name.clone();
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
        }));
        if dropped.is_err() && !std::thread::panicking() {
            panic!("could not drop the test schema {name}");
        }
    }
}

fn with_search_path(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-csearch_path%3D{schema}")
}

/// The database a test runs on; holds the PostgreSQL schema until the test ends.
enum Db {
    Sqlite,
    Postgres(TestSchema),
}

impl Db {
    fn sqlite() -> Option<Db> {
        Some(Db::Sqlite)
    }

    fn postgres() -> Option<Db> {
        postgres_url().map(|url| Db::Postgres(TestSchema::new(&url)))
    }

    fn start(&self, dir: &Path, extra: &str) -> (Keel, SocketAddr) {
        let url = match self {
            Db::Sqlite => String::new(),
            Db::Postgres(schema) => format!("url = {:?}\npool_size = 4\n", schema.url()),
        };
        let config = base_config(dir)
            + "[sql]\nstatement_timeout = \"1s\"\nmaintenance_cron = \"\"\n"
            + &url
            + extra;
        Keel::start(dir, &config)
    }

    fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }
}

/// Each test once per backend: `sqlite::name` and `postgres::name`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { if let Some(db) = super::Db::sqlite() { super::$name(db) } })*
        }
        mod postgres {
            $(#[test] fn $name() { if let Some(db) = super::Db::postgres() { super::$name(db) } })*
        }
    };
}

on_both!(
    statements_parameters_and_batches,
    the_read_path_refuses_writes,
    cached_named_queries_are_invalidated_by_writes,
    the_analyzer_proposes_a_proved_index,
);

fn statements_parameters_and_batches(db: Db) {
    let dir = scratch();
    let (_keel, addr) = db.start(dir.path(), "");
    execute(
        addr,
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, price FLOAT)",
        json!([]),
    );
    let inserted = execute(
        addr,
        "INSERT INTO items (id, name, price) VALUES (?, ?, ?)",
        json!([1, "it's \"quoted\"", 2.5]),
    );
    assert_eq!(inserted["rows_affected"], 1);
    execute(
        addr,
        "INSERT INTO items (id, name, price) VALUES (:id, :name, NULL)",
        json!({"id": 2, ":name": "two"}),
    );
    let rows = query(
        addr,
        "SELECT id, name, price FROM items WHERE id >= :low ORDER BY id",
        json!({"low": 1}),
    );
    assert_eq!(rows["columns"], json!(["id", "name", "price"]));
    assert_eq!(
        rows["rows"],
        json!([[1, "it's \"quoted\"", 2.5], [2, "two", null]])
    );
    // A parameter is data, never SQL.
    let injected = query(
        addr,
        "SELECT count(*) FROM items WHERE name = ?",
        json!(["x' OR '1'='1"]),
    );
    assert_eq!(injected["rows"], json!([[0]]));

    // All or nothing: the second statement fails, the first is rolled back.
    let failed = post(
        addr,
        "/v1/sql/batch",
        json!({"statements": [
            {"sql": "INSERT INTO items (id, name) VALUES (3, 'three')"},
            {"sql": "INSERT INTO items (id, name) VALUES (1, 'duplicate')"},
        ]}),
    );
    assert_eq!(failed.status, 409, "{}", failed.body);
    assert_eq!(failed.json()["code"], "constraint_violation");
    assert_eq!(failed.json()["index"], 1);
    let alone = post(
        addr,
        "/v1/sql/batch",
        json!({"statements": [{"sql": "INSERT INTO items (id, name) VALUES (1, 'again')"}]}),
    );
    assert_eq!(alone.json()["index"], 0, "{}", alone.body);
    assert_eq!(
        query(addr, "SELECT count(*) FROM items", json!([]))["rows"],
        json!([[2]])
    );

    let two = post(addr, "/v1/sql/query", json!({"sql": "SELECT 1; SELECT 2"}));
    assert_eq!(two.json()["code"], "multiple_statements", "{}", two.body);
    let missing = post(
        addr,
        "/v1/sql/query",
        json!({"sql": "SELECT * FROM items WHERE id = :id", "params": {}}),
    );
    assert_eq!(missing.json()["code"], "bad_params", "{}", missing.body);
    let unknown = post(
        addr,
        "/v1/sql/query",
        json!({"sql": "SELECT * FROM items WHERE id = :id", "params": {"id": 1, "other": 2}}),
    );
    assert_eq!(unknown.json()["code"], "bad_params", "{}", unknown.body);
    let syntax = post(addr, "/v1/sql/query", json!({"sql": "SELEC 1"}));
    assert_eq!(syntax.status, 400, "{}", syntax.body);
    assert_eq!(syntax.json()["code"], "sql_error");

    // A runaway statement stops at sql.statement_timeout and the server goes on.
    let runaway = if db.is_postgres() {
        "SELECT pg_sleep(5)"
    } else {
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT max(i) FROM n"
    };
    let started = Instant::now();
    let stopped = post(addr, "/v1/sql/query", json!({"sql": runaway}));
    assert_eq!(
        stopped.json()["code"],
        "statement_timeout",
        "{}",
        stopped.body
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(
        query(addr, "SELECT count(*) FROM items", json!([]))["rows"],
        json!([[2]])
    );
    // Answered requests hold no connection, and the gauge says so once they are back.
    assert_eq!(metric(addr, "keel_sql_readers_in_use"), Some(0.0));
}

fn the_read_path_refuses_writes(db: Db) {
    let dir = scratch();
    let (_keel, addr) = db.start(dir.path(), "");
    execute(
        addr,
        "CREATE TABLE notes (id INTEGER, body TEXT)",
        json!([]),
    );
    execute(addr, "INSERT INTO notes VALUES (1, 'kept')", json!([]));
    for write in [
        "INSERT INTO notes VALUES (2, 'sneaked')",
        "DELETE FROM notes",
        "UPDATE notes SET body = 'changed'",
    ] {
        let refused = post(addr, "/v1/sql/query", json!({"sql": write}));
        assert_eq!(refused.status, 400, "{write}: {}", refused.body);
        assert_eq!(refused.json()["code"], "not_read_only", "{write}");
    }
    if db.is_postgres() {
        // PostgreSQL's own READ ONLY transaction decides, not the text: a write hidden
        // in a CTE or a function is refused as well.
        for write in [
            "WITH gone AS (DELETE FROM notes RETURNING id) SELECT count(*) FROM gone",
            "SELECT nextval('notes_seq')",
        ] {
            if write.contains("nextval") {
                execute(addr, "CREATE SEQUENCE notes_seq", json!([]));
            }
            let refused = post(addr, "/v1/sql/query", json!({"sql": write}));
            assert_eq!(
                refused.json()["code"],
                "not_read_only",
                "{write}: {}",
                refused.body
            );
        }
        let session = post(
            addr,
            "/v1/sql/query",
            json!({"sql": "SET search_path = public"}),
        );
        assert_eq!(session.json()["code"], "not_allowed", "{}", session.body);
    }
    assert_eq!(
        query(addr, "SELECT id, body FROM notes", json!([]))["rows"],
        json!([[1, "kept"]])
    );
}

const BLOG: &str = r#"
[sql.queries.user_posts]
sql = "SELECT p.id, p.title, u.name FROM posts p JOIN users u ON u.id = p.user_id WHERE p.user_id = :user ORDER BY p.id"
cache_ttl = "1m"
[sql.queries.user_names]
sql = "SELECT name FROM users ORDER BY id"
cache_ttl = "1m"
"#;

fn cached_named_queries_are_invalidated_by_writes(db: Db) {
    let dir = scratch();
    let (_keel, addr) = db.start(dir.path(), BLOG);
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
    assert_eq!(
        get(addr, "/v1/sql/q/user_posts?user=1").header("x-cache"),
        Some("HIT")
    );
    assert_eq!(
        get(addr, "/v1/sql/q/user_names").header("x-cache"),
        Some("MISS")
    );

    // A write to a table only the first query reads leaves the second one cached.
    execute(
        addr,
        "UPDATE posts SET title = 'edited' WHERE id = 1",
        json!([]),
    );
    assert_eq!(
        get(addr, "/v1/sql/q/user_names").header("x-cache"),
        Some("HIT")
    );
    let edited = get(addr, "/v1/sql/q/user_posts?user=1");
    assert_eq!(edited.header("x-cache"), Some("MISS"));
    assert_eq!(edited.json()["rows"], json!([[1, "edited", "ada"]]));

    // A write to the joined table, in a batch.
    let batch = post(
        addr,
        "/v1/sql/batch",
        json!({"statements": [{"sql": "UPDATE users SET name = 'lovelace' WHERE id = 1"}]}),
    );
    assert_eq!(batch.status, 200, "{}", batch.body);
    let renamed = get(addr, "/v1/sql/q/user_posts?user=1");
    assert_eq!(renamed.json()["rows"], json!([[1, "edited", "lovelace"]]));
    assert_eq!(
        get(addr, "/v1/sql/q/user_names").json()["rows"],
        json!([["lovelace"]])
    );

    // A read right after an acknowledged write never returns the old result.
    for round in 0..20 {
        get(addr, "/v1/sql/q/user_posts?user=1");
        execute(
            addr,
            "UPDATE posts SET title = ? WHERE id = 1",
            json!([format!("v{round}")]),
        );
        let seen = get(addr, "/v1/sql/q/user_posts?user=1").json();
        assert_eq!(seen["rows"][0][1], format!("v{round}"));
    }
}

fn the_analyzer_proposes_a_proved_index(db: Db) {
    let dir = scratch();
    let (_keel, addr) = db.start(dir.path(), "");
    execute(
        addr,
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER, status TEXT)",
        json!([]),
    );
    execute(
        addr,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) \
         INSERT INTO orders (id, customer, status) SELECT i, i % 1000, 'open' FROM n",
        json!([]),
    );
    let reply = post(
        addr,
        "/v1/sql/analyze",
        json!({"sql": "SELECT id FROM orders WHERE customer = :customer"}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let analysis = reply.json();
    assert_eq!(analysis["findings"][0]["kind"], "full_scan", "{analysis}");
    let proposal = &analysis["proposal"];
    assert_eq!(proposal["columns"], json!(["customer"]), "{analysis}");
    assert_eq!(proposal["improves"], true, "{analysis}");
    assert!(
        !proposal["plan_before"].as_array().unwrap().is_empty()
            && !proposal["plan_after"].as_array().unwrap().is_empty(),
        "{analysis}"
    );
    // A write is not analyzed.
    let write = post(
        addr,
        "/v1/sql/analyze",
        json!({"sql": "DELETE FROM orders WHERE customer = 1"}),
    );
    assert_eq!(write.json()["code"], "not_read_only", "{}", write.body);
    // The trial index was rolled back: the same analysis proposes it again.
    let again = post(
        addr,
        "/v1/sql/analyze",
        json!({"sql": "SELECT id FROM orders WHERE customer = :customer"}),
    )
    .json();
    assert_eq!(again["proposal"]["columns"], json!(["customer"]), "{again}");
}

#[test]
fn keel_stops_at_start_when_the_sql_postgres_is_unreachable() {
    crate::support::assert_stops_at_start(
        "[sql]\nurl = \"postgres://keel@127.0.0.1:{port}/keel\"\npool_timeout = \"1s\"\n",
        "sql.url",
    );
}

/// Reads go to `sql.replica`, and to the primary for `sql.read_your_writes` after this
/// node wrote. The "replica" here is the same database with another schema first on its
/// search path, holding other rows, so the answer says which server read.
#[test]
fn postgres_reads_go_to_the_replica_except_right_after_a_write() {
    let Some(url) = postgres_url() else { return };
    let primary = TestSchema::new(&url);
    let replica = TestSchema::new(&url);
    for (schema, who) in [(&primary, "primary"), (&replica, "replica")] {
        schema.run(&format!(
            "CREATE TABLE {0}.who (name text); INSERT INTO {0}.who VALUES ('{who}')",
            schema.name
        ));
    }
    let dir = scratch();
    let config = base_config(dir.path())
        + &format!(
            "[sql]\nurl = {:?}\nreplica = {:?}\nread_your_writes = \"1h\"\nmaintenance_cron = \"\"\n",
            primary.url(),
            replica.url()
        );
    let (_keel, addr) = Keel::start(dir.path(), &config);
    let who = || query(addr, "SELECT name FROM who", json!([]))["rows"][0][0].clone();
    assert_eq!(who(), "replica");
    // A write through the read path fails on the replica's READ ONLY transaction.
    let refused = post(addr, "/v1/sql/query", json!({"sql": "DELETE FROM who"}));
    assert_eq!(refused.json()["code"], "not_read_only", "{}", refused.body);
    assert_eq!(who(), "replica");
    execute(addr, "CREATE TABLE marks (id integer)", json!([]));
    // Within read_your_writes (1 h here) this node reads from the primary.
    assert_eq!(who(), "primary");
}

/// Polls `check` until it holds: the outage and the recovery are noticed by the pool
/// on its next use, not at a known instant.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn postgres_outage_answers_503_with_retry_after_and_recovers() {
    let Some(url) = postgres_url() else { return };
    let schema = TestSchema::new(&url);
    // postgres://USER@HOST:PORT/DB...: the proxy takes HOST:PORT's place.
    let (scheme_user, rest) = url.split_once('@').expect("a URL with USER@");
    let (authority, path) = rest.split_once('/').expect("a URL with /DB");
    let proxy = crate::scaled::Proxy::start(authority.to_owned());
    let via_proxy = with_search_path(
        &format!("{scheme_user}@{}/{path}", proxy.addr),
        &schema.name,
    );
    let dir = scratch();
    let config = base_config(dir.path())
        + &format!(
            "[sql]\nurl = {:?}\npool_timeout = \"1s\"\nmaintenance_cron = \"\"\n",
            via_proxy
        );
    let (_keel, addr) = Keel::start(dir.path(), &config);
    execute(addr, "CREATE TABLE t (id integer)", json!([]));
    execute(addr, "INSERT INTO t VALUES (1)", json!([]));
    assert_eq!(
        get(addr, "/readyz").json()["dependencies"]["postgres"]["state"],
        "ready"
    );
    assert_eq!(metric(addr, POSTGRES_UP), Some(1.0));

    proxy.set_up(false);
    eventually("SQL answers 503 while PostgreSQL is unreachable", || {
        let reply = post(
            addr,
            "/v1/sql/query",
            json!({"sql": "SELECT count(*) FROM t"}),
        );
        if reply.status != 503 {
            return false;
        }
        assert_eq!(reply.json()["code"], "sql_unavailable", "{}", reply.body);
        assert_eq!(reply.header("retry-after"), Some("1"));
        true
    });
    let write = post(
        addr,
        "/v1/sql/execute",
        json!({"sql": "INSERT INTO t VALUES (2)"}),
    );
    assert_eq!(write.status, 503, "{}", write.body);
    // PostgreSQL is optional in /readyz, as Redis is: the node still serves the rest,
    // so a load balancer must keep it.
    eventually("/readyz names postgres degraded", || {
        let ready = get(addr, "/readyz");
        assert_eq!(ready.status, 200, "{}", ready.body);
        ready.json()["dependencies"]["postgres"]["state"] == "degraded"
    });
    assert_eq!(metric(addr, POSTGRES_UP), Some(0.0));

    proxy.set_up(true);
    eventually("SQL answers again once PostgreSQL is back", || {
        post(
            addr,
            "/v1/sql/query",
            json!({"sql": "SELECT count(*) FROM t"}),
        )
        .status
            == 200
    });
    assert_eq!(
        query(addr, "SELECT count(*) FROM t", json!([]))["rows"],
        json!([[1]])
    );
    eventually("/readyz names postgres ready", || {
        get(addr, "/readyz").json()["dependencies"]["postgres"]["state"] == "ready"
    });
    assert_eq!(metric(addr, POSTGRES_UP), Some(1.0));
    let errors = metric(
        addr,
        "keel_dependency_errors_total{dependency=\"postgres\"}",
    );
    assert!(errors.is_some_and(|errors| errors > 0.0), "{errors:?}");
}

/// The shared test server does not preload pg_stat_statements (`pg_stat_statements.rs`
/// runs a server that does): the statistics are keel's own, as on SQLite.
#[test]
fn postgres_statistics_are_keels_own_without_pg_stat_statements() {
    let Some(db) = Db::postgres() else { return };
    let dir = scratch();
    let (_keel, addr) = db.start(dir.path(), "");
    execute(addr, "CREATE TABLE s (id integer PRIMARY KEY)", json!([]));
    for id in 1..=3 {
        query(addr, "SELECT id FROM s WHERE id = ?", json!([id]));
    }
    let stats = get(addr, "/v1/sql/stats?sort=calls").json();
    assert_eq!(stats["source"], "keel", "{stats}");
    let top = &stats["statements"][0];
    assert_eq!(top["statement"], "SELECT id FROM s WHERE id=?");
    assert_eq!(top["calls"], 3);
    assert_eq!(top["errors"], 0);
}

#[test]
fn postgres_migrations_use_their_dialect_folder_and_apply_once_by_serve_or_migrate() {
    let Some(url) = postgres_url() else { return };
    let schema = TestSchema::new(&url);
    let dir = scratch();
    let migrations = dir.path().join("migrations");
    std::fs::create_dir_all(migrations.join("postgres")).unwrap();
    // The SQLite file would fail on PostgreSQL (AUTOINCREMENT): the folder is used instead.
    std::fs::write(
        migrations.join("0001_items.sql"),
        "CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT);",
    )
    .unwrap();
    std::fs::write(
        migrations.join("postgres/0001_items.sql"),
        "CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text);\n\
         INSERT INTO items (name) VALUES ('seeded');",
    )
    .unwrap();
    let config = base_config(dir.path())
        + &format!(
            "[sql]\nurl = {:?}\nmigrations_dir = {:?}\nmaintenance_cron = \"\"\n",
            schema.url(),
            migrations
        );
    let config_file = dir.path().join("keel.toml");
    std::fs::write(&config_file, &config).unwrap();
    let config_arg = config_file.to_string_lossy().into_owned();
    let status = keel_output(&["migrate", "--status", "-c", &config_arg], &[]);
    let listing = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        listing.contains("0001 items") && listing.contains("pending"),
        "{listing}"
    );
    let applied = keel_output(&["migrate", "-c", &config_arg], &[]);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert!(String::from_utf8_lossy(&applied.stdout).contains("applied"));
    {
        let (_keel, addr) = Keel::start(dir.path(), &config);
        assert_eq!(
            query(addr, "SELECT name FROM items", json!([]))["rows"],
            json!([["seeded"]])
        );
        let recorded = query(addr, "SELECT version, name FROM keel_migrations", json!([]));
        assert_eq!(recorded["rows"], json!([[1, "items"]]));
    }
    // Started again: nothing applied twice.
    let (_keel, addr) = Keel::start(dir.path(), &config);
    assert_eq!(
        query(addr, "SELECT count(*) FROM items", json!([]))["rows"],
        json!([[1]])
    );
}

/// PostgreSQL's types through the API: each JSON value converted to the type PostgreSQL
/// inferred for its parameter, and each column back to JSON.
#[test]
fn postgres_values_round_trip_by_type() {
    let Some(db) = Db::postgres() else { return };
    let dir = scratch();
    let (_keel, addr) = db.start(dir.path(), "");
    execute(
        addr,
        "CREATE TABLE kinds (i2 smallint, i4 integer, i8 bigint, f4 real, f8 double precision, \
         n numeric(12, 4), b boolean, t text, v varchar(10), j jsonb, js json, by bytea, \
         ts timestamptz, tn timestamp, d date, u uuid)",
        json!([]),
    );
    let params = json!([
        7, -70000, -9007199254740993i64, 1.5, 2.25, "12345.6789", true, "tëxt", "short",
        "{\"a\": [1, 2]}", "[true]", {"base64": "AP8A"}, "2026-11-26T05:00:00.123Z",
        "2026-11-26T05:00:00", "2026-11-26", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    ]);
    let inserted = execute(
        addr,
        "INSERT INTO kinds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        params,
    );
    assert_eq!(inserted["rows_affected"], 1);
    let row = query(addr, "SELECT * FROM kinds", json!([]));
    assert_eq!(
        row["rows"][0],
        json!([
            7, -70000, -9007199254740993i64, 1.5, 2.25, "12345.6789", true, "tëxt", "short",
            {"a": [1, 2]}, [true], {"base64": "AP8A"}, "2026-11-26T05:00:00.123Z",
            "2026-11-26T05:00:00", "2026-11-26", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        ]),
        "{row}"
    );
    // Numbers bind to numeric and text to numbers; NULL to anything.
    let matched = query(
        addr,
        "SELECT count(*) FROM kinds WHERE n = :n AND i4 = :i AND b = :b AND t IS DISTINCT FROM :none",
        json!({"n": 12345.6789, "i": "-70000", "b": "true", "none": null}),
    );
    assert_eq!(matched["rows"], json!([[1]]));
    // RETURNING is how an inserted id comes back.
    execute(
        addr,
        "CREATE TABLE ids (id serial PRIMARY KEY, x text)",
        json!([]),
    );
    let returned = execute(
        addr,
        "INSERT INTO ids (x) VALUES (?) RETURNING id",
        json!(["a"]),
    );
    assert_eq!(returned["rows"], json!([[1]]));
    assert_eq!(returned["last_insert_id"], Value::Null);
    // A value that does not fit its parameter's type is the client's error.
    let overflow = post(
        addr,
        "/v1/sql/query",
        json!({"sql": "SELECT count(*) FROM kinds WHERE i2 = ?", "params": [100000]}),
    );
    assert_eq!(overflow.status, 400, "{}", overflow.body);
    // A type without a JSON form names the column and the cast.
    let interval = post(
        addr,
        "/v1/sql/query",
        json!({"sql": "SELECT interval '1 day' AS span"}),
    );
    assert_eq!(interval.status, 400, "{}", interval.body);
    assert!(interval.body.contains("span"), "{}", interval.body);
}

const FOLLOWED: &str = r#"
[sql.queries.through_view]
sql = "SELECT v FROM va ORDER BY id"
cache_ttl = "1m"
[sql.queries.other]
sql = "SELECT v FROM b ORDER BY id"
cache_ttl = "1m"
"#;

/// The tables PostgreSQL's planner names: a view is followed to its table, and a write
/// whose effects the plan cannot show (a trigger writing another table, a function)
/// drops every cached result.
#[test]
fn postgres_cache_follows_views_and_distrusts_triggers_and_functions() {
    let Some(db) = Db::postgres() else { return };
    let dir = scratch();
    let (_keel, addr) = db.start(dir.path(), FOLLOWED);
    execute(addr, "CREATE TABLE a (id integer, v text)", json!([]));
    execute(addr, "CREATE TABLE b (id integer, v text)", json!([]));
    execute(addr, "CREATE VIEW va AS SELECT id, v FROM a", json!([]));
    execute(addr, "INSERT INTO a VALUES (1, 'a1')", json!([]));
    execute(addr, "INSERT INTO b VALUES (1, 'b1')", json!([]));
    let cached = |name: &str| {
        let reply = get(addr, &format!("/v1/sql/q/{name}"));
        assert_eq!(reply.status, 200, "{}", reply.body);
        (
            reply.header("x-cache").unwrap().to_owned(),
            reply.json()["rows"].clone(),
        )
    };
    cached("through_view");
    cached("other");
    assert_eq!(cached("through_view").0, "HIT");
    execute(addr, "UPDATE a SET v = 'a2'", json!([]));
    assert_eq!(cached("through_view"), ("MISS".to_owned(), json!([["a2"]])));
    assert_eq!(cached("other").0, "HIT");

    execute(
        addr,
        "CREATE FUNCTION mirror() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN UPDATE b SET v = NEW.v; RETURN NEW; END $$",
        json!([]),
    );
    execute(
        addr,
        "CREATE TRIGGER mirrored AFTER UPDATE ON a FOR EACH ROW EXECUTE FUNCTION mirror()",
        json!([]),
    );
    cached("other");
    assert_eq!(cached("other").0, "HIT");
    execute(addr, "UPDATE a SET v = 'a3'", json!([]));
    assert_eq!(cached("other"), ("MISS".to_owned(), json!([["a3"]])));

    execute(
        addr,
        "CREATE FUNCTION reset_b() RETURNS integer LANGUAGE sql AS \
         $$ UPDATE b SET v = 'reset'; SELECT 1 $$",
        json!([]),
    );
    cached("other");
    assert_eq!(cached("other").0, "HIT");
    execute(addr, "SELECT reset_b()", json!([]));
    assert_eq!(cached("other"), ("MISS".to_owned(), json!([["reset"]])));
}
