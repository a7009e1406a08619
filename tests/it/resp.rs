//! The RESP listener with real clients: the `redis` crate, redis-cli and Python's redis
//! package (redis-py 8 opens with HELLO 3).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use redis::{Commands, Value};

use crate::support::{DEADLINE, Keel, resp_config, scratch};

fn client(addr: SocketAddr) -> redis::Connection {
    let client = redis::Client::open(format!("redis://{addr}/")).unwrap();
    client.get_connection_with_timeout(DEADLINE).unwrap()
}

fn cmd_err(con: &mut redis::Connection, command: &mut redis::Cmd) -> String {
    match command.query::<Value>(con) {
        Err(error) => format!(
            "{} {}",
            error.code().unwrap_or(""),
            error.detail().unwrap_or("")
        )
        .trim()
        .to_owned(),
        Ok(Value::ServerError(error)) => {
            format!("{} {}", error.code(), error.details().unwrap_or(""))
                .trim()
                .to_owned()
        }
        Ok(other) => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn string_commands_behave_like_redis() {
    let dir = scratch();
    let (keel, _) = Keel::start(dir.path(), &resp_config(dir.path(), ""));
    let mut con = client(keel.resp_addr());

    assert_eq!(
        redis::cmd("PING").query::<String>(&mut con).unwrap(),
        "PONG"
    );
    assert_eq!(
        redis::cmd("ECHO")
            .arg("hi")
            .query::<String>(&mut con)
            .unwrap(),
        "hi"
    );
    assert_eq!(
        redis::cmd("SELECT")
            .arg(0)
            .query::<String>(&mut con)
            .unwrap(),
        "OK"
    );
    assert_eq!(
        cmd_err(&mut con, redis::cmd("SELECT").arg(1)),
        "ERR DB index is out of range"
    );

    let _: () = con.set("k", "v").unwrap();
    assert_eq!(con.get::<_, String>("k").unwrap(), "v");
    assert_eq!(con.get::<_, Option<String>>("missing").unwrap(), None);
    assert_eq!(
        cmd_err(&mut con, &mut redis::cmd("GET")),
        "ERR wrong number of arguments for 'get' command"
    );

    // SET options.
    assert_eq!(
        redis::cmd("SET")
            .arg("k")
            .arg("w")
            .arg("NX")
            .query::<Option<String>>(&mut con)
            .unwrap(),
        None
    );
    assert_eq!(
        redis::cmd("SET")
            .arg("new")
            .arg("1")
            .arg("XX")
            .query::<Option<String>>(&mut con)
            .unwrap(),
        None
    );
    assert_eq!(
        redis::cmd("SET")
            .arg("k")
            .arg("w")
            .arg("GET")
            .query::<Option<String>>(&mut con)
            .unwrap(),
        Some("v".into())
    );
    assert_eq!(
        cmd_err(
            &mut con,
            redis::cmd("SET").arg("k").arg("v").arg("EX").arg(0)
        ),
        "ERR invalid expire time in 'set' command"
    );
    assert_eq!(
        cmd_err(
            &mut con,
            redis::cmd("SET").arg("k").arg("v").arg("EX").arg("soon")
        ),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        cmd_err(
            &mut con,
            redis::cmd("SET").arg("k").arg("v").arg("NX").arg("XX")
        ),
        "ERR syntax error"
    );
    let _: () = redis::cmd("SET")
        .arg("t")
        .arg("v")
        .arg("EX")
        .arg(100)
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("t")
        .arg("v2")
        .arg("KEEPTTL")
        .query(&mut con)
        .unwrap();
    let ttl: i64 = con.ttl("t").unwrap();
    assert!((99..=100).contains(&ttl), "KEEPTTL kept {ttl}");

    // TTL family.
    assert_eq!(con.ttl::<_, i64>("missing").unwrap(), -2);
    assert_eq!(con.ttl::<_, i64>("k").unwrap(), -1);
    assert_eq!(
        redis::cmd("EXPIRE")
            .arg("k")
            .arg(50)
            .query::<i64>(&mut con)
            .unwrap(),
        1
    );
    assert_eq!(
        redis::cmd("EXPIRE")
            .arg("k")
            .arg(10)
            .arg("GT")
            .query::<i64>(&mut con)
            .unwrap(),
        0
    );
    let pttl: i64 = con.pttl("k").unwrap();
    assert!((49_000..=50_000).contains(&pttl), "{pttl}");
    assert_eq!(
        redis::cmd("PERSIST")
            .arg("k")
            .query::<i64>(&mut con)
            .unwrap(),
        1
    );
    assert_eq!(con.ttl::<_, i64>("k").unwrap(), -1);
    assert_eq!(
        redis::cmd("EXPIRE")
            .arg("k")
            .arg(-1)
            .query::<i64>(&mut con)
            .unwrap(),
        1
    );
    assert_eq!(
        con.exists::<_, i64>("k").unwrap(),
        0,
        "a past expiry deletes the key"
    );
    let _: () = redis::cmd("PSETEX")
        .arg("short")
        .arg(50)
        .arg("x")
        .query(&mut con)
        .unwrap();
    let deadline = std::time::Instant::now() + DEADLINE;
    while con.exists::<_, i64>("short").unwrap() == 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "PSETEX 50 never expired"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        cmd_err(&mut con, redis::cmd("SETEX").arg("k").arg(0).arg("v")),
        "ERR invalid expire time in 'setex' command"
    );
    let _: () = redis::cmd("SET").arg("g").arg("v").query(&mut con).unwrap();
    assert_eq!(
        redis::cmd("GETEX")
            .arg("g")
            .arg("EX")
            .arg(30)
            .query::<String>(&mut con)
            .unwrap(),
        "v"
    );
    assert!(con.ttl::<_, i64>("g").unwrap() > 0);
    assert_eq!(
        redis::cmd("GETEX")
            .arg("g")
            .arg("PERSIST")
            .query::<String>(&mut con)
            .unwrap(),
        "v"
    );
    assert_eq!(con.ttl::<_, i64>("g").unwrap(), -1);
    assert_eq!(
        redis::cmd("GETDEL")
            .arg("g")
            .query::<String>(&mut con)
            .unwrap(),
        "v"
    );
    assert_eq!(con.get::<_, Option<String>>("g").unwrap(), None);

    // Counters.
    assert_eq!(con.incr::<_, _, i64>("n", 1).unwrap(), 1);
    assert_eq!(
        redis::cmd("INCRBY")
            .arg("n")
            .arg(41)
            .query::<i64>(&mut con)
            .unwrap(),
        42
    );
    assert_eq!(
        redis::cmd("DECR").arg("n").query::<i64>(&mut con).unwrap(),
        41
    );
    assert_eq!(
        redis::cmd("DECRBY")
            .arg("n")
            .arg(1)
            .query::<i64>(&mut con)
            .unwrap(),
        40
    );
    assert_eq!(
        redis::cmd("INCRBYFLOAT")
            .arg("n")
            .arg("0.5")
            .query::<String>(&mut con)
            .unwrap(),
        "40.5"
    );
    assert_eq!(
        cmd_err(&mut con, redis::cmd("INCR").arg("n")),
        "ERR value is not an integer or out of range"
    );
    let _: () = con.set("big", i64::MAX).unwrap();
    assert_eq!(
        cmd_err(&mut con, redis::cmd("INCR").arg("big")),
        "ERR increment or decrement would overflow"
    );
    assert_eq!(
        cmd_err(&mut con, redis::cmd("INCRBY").arg("n").arg("x")),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        cmd_err(&mut con, redis::cmd("INCRBYFLOAT").arg("n").arg("abc")),
        "ERR value is not a valid float"
    );

    // Multi-key and strings.
    let _: () = redis::cmd("MSET")
        .arg("a")
        .arg("1")
        .arg("b")
        .arg("2")
        .query(&mut con)
        .unwrap();
    assert_eq!(
        cmd_err(&mut con, redis::cmd("MSET").arg("a")),
        "ERR wrong number of arguments for 'mset' command"
    );
    let values: Vec<Option<String>> = redis::cmd("MGET")
        .arg("a")
        .arg("b")
        .arg("nope")
        .query(&mut con)
        .unwrap();
    assert_eq!(values, vec![Some("1".into()), Some("2".into()), None]);
    assert_eq!(
        redis::cmd("SETNX")
            .arg("a")
            .arg("x")
            .query::<i64>(&mut con)
            .unwrap(),
        0
    );
    assert_eq!(
        redis::cmd("SETNX")
            .arg("c")
            .arg("x")
            .query::<i64>(&mut con)
            .unwrap(),
        1
    );
    assert_eq!(
        redis::cmd("APPEND")
            .arg("c")
            .arg("yz")
            .query::<i64>(&mut con)
            .unwrap(),
        3
    );
    assert_eq!(
        redis::cmd("STRLEN")
            .arg("c")
            .query::<i64>(&mut con)
            .unwrap(),
        3
    );
    assert_eq!(
        redis::cmd("EXISTS")
            .arg("a")
            .arg("b")
            .arg("a")
            .arg("zz")
            .query::<i64>(&mut con)
            .unwrap(),
        3
    );
    assert_eq!(
        redis::cmd("TYPE")
            .arg("a")
            .query::<String>(&mut con)
            .unwrap(),
        "string"
    );
    assert_eq!(
        redis::cmd("TYPE")
            .arg("zz")
            .query::<String>(&mut con)
            .unwrap(),
        "none"
    );
    assert_eq!(
        redis::cmd("DEL")
            .arg("a")
            .arg("zz")
            .query::<i64>(&mut con)
            .unwrap(),
        1
    );
    assert_eq!(
        redis::cmd("UNLINK")
            .arg("b")
            .query::<i64>(&mut con)
            .unwrap(),
        1
    );

    // Keyspace.
    let _: () = redis::cmd("FLUSHALL").query(&mut con).unwrap();
    for index in 0..25 {
        let _: () = con.set(format!("user:{index}"), index).unwrap();
    }
    let _: () = con.set("other", 1).unwrap();
    assert_eq!(redis::cmd("DBSIZE").query::<i64>(&mut con).unwrap(), 26);
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("user:1*").query(&mut con).unwrap();
    keys.sort();
    assert_eq!(keys.len(), 11, "{keys:?}");
    let mut scanned: Vec<String> = con
        .scan_match("user:*")
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    scanned.sort();
    scanned.dedup();
    assert_eq!(scanned.len(), 25);
    assert_eq!(
        cmd_err(&mut con, redis::cmd("SCAN").arg(987654)),
        "ERR invalid cursor"
    );

    // Connection commands clients send.
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("tester")
        .query(&mut con)
        .unwrap();
    assert_eq!(
        redis::cmd("CLIENT")
            .arg("GETNAME")
            .query::<String>(&mut con)
            .unwrap(),
        "tester"
    );
    assert!(
        redis::cmd("CLIENT")
            .arg("ID")
            .query::<i64>(&mut con)
            .unwrap()
            > 0
    );
    assert!(
        redis::cmd("CLIENT")
            .arg("INFO")
            .query::<String>(&mut con)
            .unwrap()
            .contains("name=tester")
    );
    assert!(
        redis::cmd("COMMAND")
            .arg("COUNT")
            .query::<i64>(&mut con)
            .unwrap()
            > 30
    );
    let _: Value = redis::cmd("COMMAND").arg("DOCS").query(&mut con).unwrap();
    let save: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query(&mut con)
        .unwrap();
    assert_eq!(save, vec!["save".to_owned(), String::new()]);
    let appendonly: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query(&mut con)
        .unwrap();
    assert_eq!(appendonly, vec!["appendonly".to_owned(), "no".to_owned()]);
    assert!(
        redis::cmd("INFO")
            .query::<String>(&mut con)
            .unwrap()
            .contains("redis_version:")
    );
    assert!(
        cmd_err(&mut con, redis::cmd("LPUSH").arg("l").arg("x"))
            .starts_with("ERR unknown command 'LPUSH'")
    );
    assert_eq!(
        redis::cmd("PING").query::<String>(&mut con).unwrap(),
        "PONG",
        "the connection survives errors"
    );
}

#[test]
fn a_pipeline_of_1000_commands_and_binary_values() {
    let dir = scratch();
    let (keel, _) = Keel::start(dir.path(), &resp_config(dir.path(), ""));
    let mut con = client(keel.resp_addr());

    let mut pipe = redis::pipe();
    for index in 0..1000 {
        pipe.set(format!("p:{index}"), format!("value-{index}"))
            .ignore();
    }
    let _: () = pipe.query(&mut con).unwrap();
    let mut pipe = redis::pipe();
    for index in 0..1000 {
        pipe.get(format!("p:{index}"));
    }
    let values: Vec<String> = pipe.query(&mut con).unwrap();
    assert_eq!(values.len(), 1000);
    assert!(
        values
            .iter()
            .enumerate()
            .all(|(index, value)| *value == format!("value-{index}"))
    );

    let binary: Vec<u8> = b"a\r\nb\0c\r\n\x00\xff$3\r\n".to_vec();
    let binary_key: Vec<u8> = b"key\0with\r\nbytes".to_vec();
    let _: () = con.set(&binary_key, &binary).unwrap();
    assert_eq!(con.get::<_, Vec<u8>>(&binary_key).unwrap(), binary);
    assert_eq!(
        redis::cmd("STRLEN")
            .arg(&binary_key)
            .query::<usize>(&mut con)
            .unwrap(),
        binary.len()
    );
}

#[test]
fn auth_is_required_when_configured_and_refused_when_not() {
    let dir = scratch();
    let (keel, _) = Keel::start(
        dir.path(),
        &resp_config(dir.path(), "[auth]\npassword = \"s3cret\"\n"),
    );
    let mut con = client(keel.resp_addr());
    assert_eq!(
        cmd_err(&mut con, redis::cmd("GET").arg("k")),
        "NOAUTH Authentication required."
    );
    assert_eq!(
        cmd_err(&mut con, redis::cmd("AUTH").arg("wrong")),
        "WRONGPASS invalid username-password pair or user is disabled."
    );
    assert_eq!(
        redis::cmd("AUTH")
            .arg("s3cret")
            .query::<String>(&mut con)
            .unwrap(),
        "OK"
    );
    let _: () = con.set("k", "v").unwrap();
    // A client that authenticates in the URL, as applications do.
    let mut authed = redis::Client::open(format!("redis://:s3cret@{}/", keel.resp_addr()))
        .unwrap()
        .get_connection()
        .unwrap();
    assert_eq!(authed.get::<_, String>("k").unwrap(), "v");

    let open = scratch();
    let (keel, _) = Keel::start(open.path(), &resp_config(open.path(), ""));
    let mut con = client(keel.resp_addr());
    assert!(
        cmd_err(&mut con, redis::cmd("AUTH").arg("x")).contains("without any password configured")
    );
}

/// Sends raw bytes and returns what came back before the server closed or went quiet.
fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

#[test]
fn protocol_violations_get_an_error_and_a_closed_connection() {
    let dir = scratch();
    let config = resp_config(
        dir.path(),
        "[cache]\nmax_value_bytes = \"1KiB\"\nmax_key_bytes = \"1KiB\"\n",
    );
    let (keel, _) = Keel::start(dir.path(), &config);
    let addr = keel.resp_addr();
    let cases: &[(&[u8], &str)] = &[
        (
            b"*1\r\n$5000\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*99999999999\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n*1\r\n$1\r\na\r\n",
            "-ERR Protocol error: expected '$', got something else\r\n",
        ),
        (
            b"*1\r\n$1\r\nabc\r\n",
            "-ERR Protocol error: expected CRLF after bulk string\r\n",
        ),
    ];
    for (input, expected) in cases {
        let answer = raw_exchange(addr, input);
        assert_eq!(
            String::from_utf8_lossy(&answer),
            *expected,
            "for {:?}",
            String::from_utf8_lossy(input)
        );
    }
    let inline = raw_exchange(addr, format!("{}\r\n", "x".repeat(70 * 1024)).as_bytes());
    assert!(
        String::from_utf8_lossy(&inline).starts_with("-ERR Protocol error: too big inline request")
    );
    let mut con = client(addr);
    assert_eq!(
        redis::cmd("PING").query::<String>(&mut con).unwrap(),
        "PONG"
    );
}

/// 64 random byte streams against one keel (starting one per case would dominate the
/// run); after each, the server still answers PING on a new connection. The keel is
/// this test's own, so it stops with the test (a `static` one outlived the run).
#[test]
fn random_bytes_never_kill_the_server() {
    use proptest::collection::vec;
    use proptest::prelude::any;
    use proptest::test_runner::{Config, TestRunner};

    let dir = scratch();
    let (keel, _) = Keel::start(dir.path(), &resp_config(dir.path(), ""));
    let addr = keel.resp_addr();
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    runner
        .run(&vec(vec(any::<u8>(), 0..512), 1..8), |chunks| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            for chunk in &chunks {
                if stream.write_all(chunk).is_err() {
                    break;
                }
            }
            let mut sink = [0u8; 4096];
            while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
            let mut con = client(addr);
            proptest::prop_assert_eq!(
                redis::cmd("PING").query::<String>(&mut con).unwrap(),
                "PONG"
            );
            Ok(())
        })
        .unwrap();
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Tools installed by scripts/test; outside it, say what is skipped.
fn require(tool: &str) -> bool {
    if have(tool) {
        return true;
    }
    assert!(
        std::env::var("KEEL_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
        "{tool} is required (KEEL_REQUIRE_EXTERNAL=1)"
    );
    eprintln!("SKIPPED: {tool} is not installed (scripts/test installs it)");
    false
}

#[test]
fn redis_cli_talks_to_keel() {
    if !require("redis-cli") {
        return;
    }
    let dir = scratch();
    let (keel, _) = Keel::start(dir.path(), &resp_config(dir.path(), ""));
    let port = keel.resp_addr().port().to_string();
    let cli = |args: &[&str]| {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_owned()
    };
    assert_eq!(cli(&["PING"]), "PONG");
    assert_eq!(cli(&["SET", "greeting", "hello world"]), "OK");
    assert_eq!(cli(&["GET", "greeting"]), "hello world");
    assert_eq!(cli(&["TTL", "greeting"]), "-1");
    assert_eq!(cli(&["TTL", "missing"]), "-2");
    assert_eq!(
        cli(&["INCR", "greeting"]),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(cli(&["-3", "GET", "greeting"]), "hello world");

    // --pipe speaks raw RESP from stdin, as bulk loaders do.
    let mut commands = String::new();
    for index in 0..1000 {
        commands.push_str(&format!(
            "*3\r\n$3\r\nSET\r\n${}\r\nbulk:{index}\r\n$1\r\nx\r\n",
            format!("bulk:{index}").len()
        ));
    }
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port, "--pipe"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(commands.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains("errors: 0, replies: 1000"), "{report}");
    assert_eq!(cli(&["DBSIZE"]), "1001");
}

#[test]
fn python_redis_8_speaks_resp3_to_keel() {
    let has_module = Command::new("python3")
        .args(["-c", "import redis"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !has_module {
        assert!(
            std::env::var("KEEL_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
            "python3 with redis is required"
        );
        eprintln!("SKIPPED: Python's redis package is not installed (scripts/test installs it)");
        return;
    }
    let dir = scratch();
    let (keel, _) = Keel::start(dir.path(), &resp_config(dir.path(), ""));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/resp_client.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(keel.resp_addr().port().to_string())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("python redis ok"));
}
