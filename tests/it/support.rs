//! Starting real keel processes on 127.0.0.1:0 and talking to them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const KEEL: &str = env!("CARGO_BIN_EXE_keel");
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A scratch directory with a data dir inside; removed on drop.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("keel-it-")
        .tempdir()
        .expect("temp dir")
}

/// The base configuration every test starts from: loopback, an ephemeral api port, the
/// resp listener off, and the data dir inside `dir`.
pub fn base_config(dir: &Path) -> String {
    format!(
        "data_dir = {:?}\n[lifecycle]\ndrain_timeout = \"10s\"\n[listeners.api]\nbind = \"127.0.0.1:0\"\n[listeners.resp]\nbind = \"\"\n",
        dir.join("data").display().to_string()
    )
}

/// `base_config` with the RESP listener on an ephemeral port, plus `extra` TOML.
pub fn resp_config(dir: &Path, extra: &str) -> String {
    base_config(dir).replace(
        "[listeners.resp]\nbind = \"\"",
        "[listeners.resp]\nbind = \"127.0.0.1:0\"",
    ) + extra
}

/// Runs `keel ARGS` to completion.
pub fn keel_output(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(KEEL);
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run keel")
}

/// Lines a child wrote to stderr, shared with the thread that reads them.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// A running `keel serve`.
pub struct Keel {
    child: Child,
    log: Arc<Log>,
    pub config_path: PathBuf,
}

impl Keel {
    /// Starts `keel serve --config <dir>/keel.toml` with `config` written there.
    pub fn spawn(dir: &Path, config: &str) -> Keel {
        Keel::spawn_with_env(dir, config, &[])
    }

    pub fn spawn_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Keel {
        let config_path = dir.join("keel.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut command = Command::new(KEEL);
        command
            .args(["serve", "--config"])
            .arg(&config_path)
            .env_remove("STATE_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keel");
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().expect("piped stderr");
        let reader_log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                reader_log.lines.lock().unwrap().push(line);
                reader_log.grew.notify_all();
            }
        });
        Keel {
            child,
            log,
            config_path,
        }
    }

    /// Starts keel and waits until it says it is ready.
    pub fn start(dir: &Path, config: &str) -> (Keel, SocketAddr) {
        let keel = Keel::spawn(dir, config);
        let addr = keel.api_addr();
        keel.wait_for_log("keel ready");
        (keel, addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first log line containing `needle`; panics with the whole log at the deadline.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().find(|line| line.contains(needle)) {
                return line.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "no log line with {needle:?} within {DEADLINE:?}; log:\n{}",
                lines.join("\n")
            );
            lines = self.log.grew.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lines.lock().unwrap().join("\n")
    }

    /// The api address, read from the "api listener bound" log line.
    pub fn api_addr(&self) -> SocketAddr {
        self.bound_addr("api listener bound")
    }

    /// The RESP address (the config must give `listeners.resp.bind`).
    pub fn resp_addr(&self) -> SocketAddr {
        self.bound_addr("resp listener bound")
    }

    /// The gateway address (the config must have routes and `listeners.gateway.bind`).
    pub fn gateway_addr(&self) -> SocketAddr {
        self.bound_addr("gateway listener bound")
    }

    fn bound_addr(&self, needle: &str) -> SocketAddr {
        let line = self.wait_for_log(needle);
        let start = line.find("addr=").expect("addr field") + "addr=".len();
        let addr = line[start..].split_whitespace().next().unwrap();
        addr.parse()
            .unwrap_or_else(|_| panic!("bad address in {line:?}"))
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread drain the last lines.
                std::thread::sleep(Duration::from_millis(20));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Keel {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.1 exchange with `Connection: close`.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub raw_body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.body))
    }
}

pub fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    request_bytes(addr, method, path, body.as_bytes())
}

pub fn request_bytes(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    read_reply(&mut stream)
}

/// `request` with extra header lines (`Authorization`, `Content-Type`, ...).
pub fn request_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    read_reply(&mut stream)
}

/// The value of one series of keel's `/metrics`, named as exposed (`name{labels}`).
pub fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    get(addr, "/metrics")
        .body
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `keel_dependency_up{dependency="postgres"}`: 1 while keel reaches PostgreSQL.
pub const POSTGRES_UP: &str = "keel_dependency_up{dependency=\"postgres\"}";

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, "")
}

/// Reads a whole response from a connection the server will close.
pub fn read_reply(stream: &mut impl Read) -> Reply {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    parse_reply(&raw)
}

pub fn parse_reply(raw: &[u8]) -> Reply {
    let head_end = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let raw_body = raw[head_end + 4..].to_vec();
    let mut lines = head.lines();
    let status_line = lines.next().unwrap();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&raw_body).into_owned(),
        raw_body,
    }
}

/// The runtime a test's own HTTP server runs on, apart from the test thread.
pub fn server_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// An axum app served on 127.0.0.1:0 by a runtime of its own: a real HTTP server for
/// keel to talk to (loaders, webhooks, upstreams). It stops when dropped.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl TestServer {
    pub fn start(app: axum::Router) -> TestServer {
        let runtime = server_runtime();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move { axum::serve(listener, app).await });
        TestServer {
            addr,
            _runtime: runtime,
        }
    }
}

/// Starts keel with `extra` config naming a database on a port nothing listens on
/// (`{port}` in `extra`), and checks it exits 1 at once, naming `key`, never ready.
pub fn assert_stops_at_start(extra: &str, key: &str) {
    let dir = scratch();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = base_config(dir.path()) + &extra.replace("{port}", &port.to_string());
    let started = Instant::now();
    let mut keel = Keel::spawn(dir.path(), &config);
    let status = keel
        .wait_exit(DEADLINE)
        .expect("keel exits instead of waiting");
    assert_eq!(status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(15));
    let log = keel.log_text();
    assert!(log.contains(key), "{log}");
    assert!(!log.contains("keel ready"), "{log}");
}
