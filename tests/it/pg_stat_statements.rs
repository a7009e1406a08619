//! `/v1/sql/stats` from PostgreSQL's `pg_stat_statements`. The extension reports only
//! when it is in `shared_preload_libraries`, which the shared test server does not set
//! (and is never reconfigured), so this test runs a PostgreSQL of its own: `initdb` into
//! a temporary directory, `postgres` on a free loopback port with the extension
//! preloaded and its unix socket in that directory, stopped when the test ends. As root
//! (CI), both run as `nobody`: PostgreSQL refuses to run as root.
//!
//! Without PostgreSQL's server binaries the test says it is skipped, or fails under
//! `KEEL_REQUIRE_EXTERNAL=1`. The fallback to keel's own figures, on the shared server
//! without the extension, is in `sql_backends.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::sql::{execute, query};
use crate::support::{DEADLINE, Keel, base_config, get, scratch};

/// PostgreSQL's `bin` directory: the newest of Debian's `/usr/lib/postgresql/*/bin`, else
/// the directory on `PATH` that holds `initdb`.
fn server_binaries() -> Option<PathBuf> {
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin);
    debian.or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
    })
}

fn output(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().expect(program);
    assert!(output.status.success(), "{program} {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// A PostgreSQL server of this test's own, stopped (fast shutdown) when dropped.
struct PrivatePostgres {
    server: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl PrivatePostgres {
    fn start(settings: &[&str]) -> Option<PrivatePostgres> {
        let Some(bin) = server_binaries() else {
            assert!(
                std::env::var("KEEL_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
                "KEEL_REQUIRE_EXTERNAL=1 but PostgreSQL's initdb is not installed"
            );
            eprintln!("SKIPPED: no initdb (PostgreSQL's server binaries) on this machine");
            return None;
        };
        let dir = scratch();
        // initdb and postgres refuse to run as root: then they run as nobody, in a
        // directory that is nobody's.
        let nobody = (output("id", &["-u"]) == "0").then(|| {
            (
                output("id", &["-u", "nobody"]),
                output("id", &["-g", "nobody"]),
            )
        });
        if let Some((uid, gid)) = &nobody {
            let path = dir.path().to_str().expect("a UTF-8 temp path");
            output("chown", &["-R", &format!("{uid}:{gid}"), path]);
        }
        let command = |program: &str| match &nobody {
            Some((uid, gid)) => {
                let mut command = Command::new("setpriv");
                command
                    .args([
                        &format!("--reuid={uid}"),
                        &format!("--regid={gid}"),
                        "--clear-groups",
                    ])
                    .arg(bin.join(program));
                command
            }
            None => Command::new(bin.join(program)),
        };
        let data = dir.path().join("data");
        let initdb = command("initdb")
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg("-D")
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(initdb.status.success(), "initdb: {initdb:?}");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
        let mut server = command("postgres");
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]);
        for setting in settings {
            server.args(["-c", setting]);
        }
        let server = server
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let mut postgres = PrivatePostgres { server, port, dir };
        postgres.wait_until_it_answers();
        Some(postgres)
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn wait_until_it_answers(&mut self) {
        let started = Instant::now();
        while run(&self.url("postgres"), "SELECT 1").is_err() {
            if let Some(status) = self.server.try_wait().unwrap() {
                panic!("postgres exited ({status}): {}", self.log());
            }
            assert!(
                started.elapsed() < DEADLINE,
                "postgres did not answer within {DEADLINE:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: backends end, the postmaster exits.
        let _ = Command::new("kill")
            .args(["-INT", &self.server.id().to_string()])
            .status();
        let started = Instant::now();
        while started.elapsed() < DEADLINE {
            if !matches!(self.server.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Runs `sql` on its own connection to `url`.
fn run(url: &str, sql: &str) -> Result<(), tokio_postgres::Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client.batch_execute(sql).await
        })
}

fn stats(addr: SocketAddr, query: &str) -> Value {
    let reply = get(addr, &format!("/v1/sql/stats?{query}"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

fn find<'a>(stats: &'a Value, needle: &str) -> Option<&'a Value> {
    stats["statements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["statement"].as_str().unwrap().contains(needle))
}

#[test]
fn stats_come_from_pg_stat_statements_of_keels_database_when_it_is_loaded() {
    let Some(postgres) = PrivatePostgres::start(&["shared_preload_libraries=pg_stat_statements"])
    else {
        return;
    };
    run(
        &postgres.url("postgres"),
        "CREATE EXTENSION pg_stat_statements",
    )
    .unwrap();
    run(&postgres.url("postgres"), "CREATE DATABASE elsewhere").unwrap();
    let dir = scratch();
    let config = base_config(dir.path())
        + &format!(
            "[sql]\nurl = {:?}\npool_size = 4\nmaintenance_cron = \"\"\n",
            postgres.url("postgres")
        );
    let (_keel, addr) = Keel::start(dir.path(), &config);
    execute(
        addr,
        "CREATE TABLE t (id integer PRIMARY KEY, v text)",
        json!([]),
    );
    execute(
        addr,
        "INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')",
        json!([]),
    );
    for id in 1..=5 {
        query(addr, "SELECT v FROM t WHERE id = :id", json!({"id": id}));
    }
    // Another database on the same server: not keel's, so not in its figures.
    for _ in 0..3 {
        run(&postgres.url("elsewhere"), "SELECT 'not keel' AS elsewhere").unwrap();
    }

    let by_calls = stats(addr, "sort=calls");
    assert_eq!(by_calls["source"], "pg_stat_statements", "{by_calls}");
    let select = find(&by_calls, "FROM t WHERE id = $1").expect("the select is listed");
    assert_eq!(select["calls"], 5, "{select}");
    assert_eq!(select["rows"], 3, "{select}");
    let (total, mean) = (
        select["total_ms"].as_f64().unwrap(),
        select["mean_ms"].as_f64().unwrap(),
    );
    assert!((mean * 5.0 - total).abs() <= total * 1e-9, "{select}");
    assert!(select["max_ms"].as_f64().unwrap() >= select["min_ms"].as_f64().unwrap());
    // What pg_stat_statements does not keep is null, not made up.
    for absent in ["errors", "p95_ms", "last_seen"] {
        assert_eq!(select[absent], Value::Null, "{absent}: {select}");
    }
    assert!(
        find(&by_calls, "not keel").is_none(),
        "another database's statement: {by_calls}"
    );
    // keel's own transaction plumbing would fill the top of every list.
    for plumbing in [
        "START TRANSACTION",
        "ROLLBACK",
        "COMMIT",
        "SET LOCAL statement_timeout",
    ] {
        assert!(
            find(&by_calls, plumbing).is_none(),
            "{plumbing}: {by_calls}"
        );
    }
    let listed = by_calls["statements"].as_array().unwrap().len();
    assert!(by_calls["tracked"].as_u64().unwrap() >= listed as u64);

    let one = stats(addr, "sort=total&limit=1");
    assert_eq!(one["statements"].as_array().unwrap().len(), 1, "{one}");
    assert!(one["tracked"].as_u64().unwrap() >= 1, "{one}");
    // Nor are keel's own reads of the statistics.
    let again = stats(addr, "sort=calls");
    for own in ["pg_extension", ".pg_stat_statements"] {
        assert!(find(&again, own).is_none(), "{own}: {again}");
    }
}
