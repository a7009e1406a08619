//! Whole-process load for the durable job queue, and its PostgreSQL peer.
//!
//! Not a criterion bench: a standalone tokio program that drives a running keel's queue
//! routes over keep-alive HTTP/1.1 connections, or runs the same end-to-end workload on
//! PostgreSQL with the classic `FOR UPDATE SKIP LOCKED` claim. `scripts/bench queue`
//! starts a release keel and runs every subcommand; by hand:
//!
//! ```text
//! cargo bench --bench queue_load -- enqueue --url http://127.0.0.1:PORT [--clients 32] [--per-request 1] [--seconds 10]
//! cargo bench --bench queue_load -- e2e --url URL[,URL...] [--jobs 100000] [--workers 8] [--reserve 32] [--enqueuers 8]
//! cargo bench --bench queue_load -- pickup --url URL [--rate 1000] [--seconds 10] [--workers 4] [--reserve 32]
//! cargo bench --bench queue_load -- pg-e2e [--pg "host=127.0.0.1 user=postgres dbname=keel_bench"] [--jobs 100000]
//! ```
//!
//! Every figure is printed as one line for people, then all of a run's figures as one
//! JSON line prefixed `RESULT ` for scripts. Exit status 1 when a request fails or the
//! end-to-end check (every enqueued id acked exactly once) does not hold.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "\
usage: queue_load SUBCOMMAND [OPTIONS]

  enqueue --url URL [--clients 32] [--per-request 1] [--seconds 10] [--queue NAME]
      durable enqueue throughput: jobs/s, requests/s, request latency p50/p99
  e2e --url URL[,URL...] [--jobs 100000] [--workers 8] [--reserve 32] [--enqueuers 8]
      [--per-request 100] [--timeout 600] [--queue NAME]
      enqueue JOBS in batches while WORKERS reserve (wait 1s) and batch-ack them;
      jobs/s from the first enqueue to the last ack, every id acked exactly once;
      with several URLs (nodes sharing one PostgreSQL queue) enqueuers and workers
      take the nodes in turn
  pickup --url URL [--rate 1000] [--seconds 10] [--workers 4] [--reserve 32]
      [--max-in-flight 256] [--queue NAME]
      single-job enqueues paced at RATE/s while WORKERS long-poll reserve (wait 5s);
      pickup latency = reserve response arrival - enqueue 201 arrival, p50/p99/max
  pg-e2e [--pg \"host=127.0.0.1 user=postgres dbname=keel_bench\"] [--jobs 100000]
      [--workers 8] [--reserve 32] [--enqueuers 8] [--per-request 100] [--poll-ms 10]
      [--timeout 600]
      the e2e workload on PostgreSQL (table jobs, UPDATE .. FOR UPDATE SKIP LOCKED);
      drops and recreates table jobs, so it runs only in database keel_bench

URL is keel's api listener, e.g. http://127.0.0.1:8080.";

fn main() -> ExitCode {
    // `cargo bench` appends `--bench` to a harness-less bench's arguments.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| arg != "--bench")
        .collect();
    let Some((command, rest)) = args.split_first() else {
        // Plain `cargo bench` runs every bench target; without a server there is nothing to do.
        eprintln!("{USAGE}");
        return ExitCode::SUCCESS;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("queue_load: cannot start the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match command.as_str() {
            "enqueue" => enqueue(Opts::parse(rest, "url clients per-request seconds queue")?).await,
            "e2e" => {
                let options = "url jobs workers reserve enqueuers per-request timeout queue";
                e2e(Opts::parse(rest, options)?).await
            }
            "pickup" => {
                let options = "url rate seconds workers reserve max-in-flight queue";
                pickup(Opts::parse(rest, options)?).await
            }
            "pg-e2e" => {
                let options = "pg jobs workers reserve enqueuers per-request poll-ms timeout";
                pg_e2e(Opts::parse(rest, options)?).await
            }
            "help" | "-h" | "--help" => {
                println!("{USAGE}");
                Ok(true)
            }
            other => Err(anyhow!("unknown subcommand `{other}`\n\n{USAGE}")),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE, // figures printed, but the run's checks failed
        Err(error) => {
            eprintln!("queue_load {command}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

struct Opts {
    values: HashMap<String, String>,
}

impl Opts {
    /// `--name value` or `--name=value`, each name one of the space-separated `allowed`.
    fn parse(args: &[String], allowed: &str) -> Result<Self> {
        let mut values = HashMap::new();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                bail!("unexpected argument `{arg}`\n\n{USAGE}");
            };
            let (name, value) = match flag.split_once('=') {
                Some((name, value)) => (name.to_owned(), value.to_owned()),
                None => {
                    let value = iter
                        .next()
                        .with_context(|| format!("--{flag} needs a value"))?;
                    (flag.to_owned(), value.clone())
                }
            };
            if !allowed.split_whitespace().any(|known| known == name) {
                let known: Vec<_> = allowed.split_whitespace().collect();
                bail!(
                    "unknown option --{name}; this subcommand takes --{}",
                    known.join(", --")
                );
            }
            values.insert(name, value);
        }
        Ok(Self { values })
    }

    fn string(&self, name: &str, default: Option<&str>) -> Result<String> {
        match (self.values.get(name), default) {
            (Some(value), _) => Ok(value.clone()),
            (None, Some(default)) => Ok(default.to_owned()),
            (None, None) => bail!("--{name} is required\n\n{USAGE}"),
        }
    }

    fn number(&self, name: &str, default: u64, min: u64, max: u64) -> Result<u64> {
        let Some(raw) = self.values.get(name) else {
            return Ok(default);
        };
        let value: u64 = raw
            .replace('_', "")
            .parse()
            .with_context(|| format!("--{name} {raw}: not a whole number"))?;
        if !(min..=max).contains(&value) {
            bail!("--{name} {value}: must be between {min} and {max}");
        }
        Ok(value)
    }

    fn queue(&self, mode: &str) -> Result<String> {
        // A fresh queue per run, so runs against one server never see each other's jobs.
        let default = format!(
            "bench-{mode}-{}-{}",
            std::process::id(),
            unix_micros() / 1_000_000
        );
        let queue = self.string("queue", Some(&default))?;
        if queue.is_empty()
            || !queue
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            bail!("--queue {queue:?}: use letters, digits and - _ . : only");
        }
        Ok(queue)
    }
}

// ---------------------------------------------------------------------------------------
// Keel's REST contract, as typed bodies (no serde_json::Value on the hot paths)
// ---------------------------------------------------------------------------------------

#[derive(Serialize)]
struct NewJob<'a, P> {
    name: &'a str,
    payload: P,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct SeqPayload {
    seq: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct PickupPayload {
    /// Unix microseconds when the enqueue request was sent.
    #[serde(default)]
    sent_us: u64,
}

#[derive(Deserialize)]
struct Enqueued {
    id: u64,
    #[serde(default)]
    duplicate: bool,
}

#[derive(Deserialize)]
struct EnqueuedMany {
    jobs: Vec<Enqueued>,
}

#[derive(Serialize)]
struct ReserveRequest<'a> {
    max: u64,
    lease: &'a str,
    wait: &'a str,
}

#[derive(Deserialize)]
#[serde(bound(deserialize = "P: Deserialize<'de> + Default"))]
struct Reserved<P> {
    jobs: Vec<ReservedJob<P>>,
}

#[derive(Deserialize)]
#[serde(bound(deserialize = "P: Deserialize<'de> + Default"))]
struct ReservedJob<P> {
    id: u64,
    lease_token: String,
    #[serde(default)]
    payload: P,
}

#[derive(Serialize)]
struct AckBatch<'a> {
    jobs: Vec<AckItem<'a>>,
}

#[derive(Serialize)]
struct AckItem<'a> {
    id: u64,
    lease_token: &'a str,
    result: (),
}

#[derive(Deserialize)]
struct AckResults {
    results: Vec<AckResult>,
}

#[derive(Deserialize)]
struct AckResult {
    id: u64,
    ok: bool,
    #[serde(default)]
    code: Option<String>,
}

#[derive(Deserialize)]
struct Problem {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    detail: Option<String>,
}

// ---------------------------------------------------------------------------------------
// HTTP client: one keep-alive pool per process, URIs built once
// ---------------------------------------------------------------------------------------

#[derive(Clone)]
struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    base: Arc<str>,
}

struct Endpoints {
    enqueue: Uri,
    reserve: Uri,
    ack: Uri,
}

impl Api {
    fn new(url: &str, pool: usize) -> Result<Self> {
        let base = url.trim_end_matches('/');
        let uri: Uri = base
            .parse()
            .with_context(|| format!("--url {url}: not a URL"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            bail!("--url {url}: need http://HOST:PORT (keel's api listener, plain HTTP)");
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(pool)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Ok(Self {
            client,
            base: base.into(),
        })
    }

    fn uri(&self, path: &str) -> Result<Uri> {
        format!("{}{path}", self.base)
            .parse()
            .with_context(|| format!("bad path {path}"))
    }

    fn endpoints(&self, queue: &str) -> Result<Endpoints> {
        Ok(Endpoints {
            enqueue: self.uri(&format!("/v1/queues/{queue}/jobs"))?,
            reserve: self.uri(&format!("/v1/queues/{queue}/reserve"))?,
            ack: self.uri("/v1/jobs/ack")?,
        })
    }

    /// One request; the body of a response with status `expect`, or an error that says
    /// what keel answered (the problem+json `code` when there is one).
    async fn call(
        &self,
        method: Method,
        uri: &Uri,
        body: Bytes,
        expect: StatusCode,
    ) -> Result<Bytes> {
        let request = Request::builder()
            .method(method.clone())
            .uri(uri.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(body))?;
        let response = self.client.request(request).await.map_err(|error| {
            let hint = if error.is_connect() {
                format!(
                    "nothing answers at {}; start `keel serve` with listeners.api.bind on that \
                     address or pass --url",
                    self.base
                )
            } else {
                format!("{method} {uri} failed")
            };
            anyhow::Error::new(error).context(hint)
        })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{method} {uri}: reading the response"))?
            .to_bytes();
        if status == expect {
            return Ok(bytes);
        }
        let what = match serde_json::from_slice::<Problem>(&bytes) {
            Ok(problem) => format!(
                "{} {}",
                problem.code.as_deref().unwrap_or("(no code)"),
                problem.detail.or(problem.title).unwrap_or_default()
            ),
            Err(_) => String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned(),
        };
        let hint = if matches!(
            status,
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
        ) {
            " (does this keel have the queue routes?)"
        } else {
            ""
        };
        bail!("{method} {uri}: {status} (expected {expect}): {what}{hint}")
    }

    async fn post(&self, uri: &Uri, body: Bytes, expect: StatusCode) -> Result<Bytes> {
        self.call(Method::POST, uri, body, expect).await
    }

    /// Fails early, with a clear message, when nothing listens or keel is not ready.
    async fn preflight(&self) -> Result<()> {
        self.call(
            Method::GET,
            &self.uri("/readyz")?,
            Bytes::new(),
            StatusCode::OK,
        )
        .await
        .map(drop)
    }
}

fn to_bytes<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("bench bodies serialize"))
}

// ---------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as u64)
}

/// p50/p99/max in milliseconds of microsecond samples.
#[derive(Clone, Copy, Default)]
struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Latency {
    fn of(mut micros: Vec<u64>) -> Self {
        if micros.is_empty() {
            return Self::default();
        }
        micros.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * micros.len() as f64).ceil() as usize).clamp(1, micros.len());
            micros[rank - 1] as f64 / 1000.0
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: micros[micros.len() - 1] as f64 / 1000.0,
        }
    }
}

fn result_line(value: serde_json::Value) {
    println!("RESULT {value}");
}

/// Every id enqueued, acked exactly once, nothing else acked.
struct Verification {
    expected: u64,
    enqueued: u64,
    acked: u64,
    duplicate_enqueued: u64,
    duplicate_acked: u64,
    never_acked: u64,
    acked_not_enqueued: u64,
}

impl Verification {
    fn check(expected: u64, mut enqueued: Vec<u64>, mut acked: Vec<u64>) -> Self {
        let duplicates = |ids: &mut Vec<u64>| {
            ids.sort_unstable();
            let before = ids.len();
            ids.dedup();
            (before - ids.len()) as u64
        };
        let (enqueued_count, acked_count) = (enqueued.len() as u64, acked.len() as u64);
        let duplicate_enqueued = duplicates(&mut enqueued);
        let duplicate_acked = duplicates(&mut acked);
        let (mut never_acked, mut acked_not_enqueued) = (0, 0);
        let (mut e, mut a) = (enqueued.iter().peekable(), acked.iter().peekable());
        loop {
            match (e.peek(), a.peek()) {
                (Some(x), Some(y)) if x == y => {
                    e.next();
                    a.next();
                }
                (Some(x), Some(y)) if x < y => {
                    never_acked += 1;
                    e.next();
                }
                (Some(_), Some(_)) | (None, Some(_)) => {
                    acked_not_enqueued += 1;
                    a.next();
                }
                (Some(_), None) => {
                    never_acked += 1;
                    e.next();
                }
                (None, None) => break,
            }
        }
        Self {
            expected,
            enqueued: enqueued_count,
            acked: acked_count,
            duplicate_enqueued,
            duplicate_acked,
            never_acked,
            acked_not_enqueued,
        }
    }

    fn ok(&self) -> bool {
        self.enqueued == self.expected
            && self.acked == self.expected
            && self.duplicate_enqueued == 0
            && self.duplicate_acked == 0
            && self.never_acked == 0
            && self.acked_not_enqueued == 0
    }

    fn print(&self, mode: &str) {
        if self.ok() {
            println!(
                "{mode}: verified: {} ids enqueued, each acked exactly once, no duplicates",
                self.enqueued
            );
        } else {
            println!(
                "{mode}: VERIFICATION FAILED: expected {}, enqueued {} ({} duplicate ids), acked {} \
                 ({} duplicate acks), {} never acked, {} acked but never enqueued",
                self.expected,
                self.enqueued,
                self.duplicate_enqueued,
                self.acked,
                self.duplicate_acked,
                self.never_acked,
                self.acked_not_enqueued
            );
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "ok": self.ok(),
            "enqueued": self.enqueued,
            "acked": self.acked,
            "duplicate_enqueued": self.duplicate_enqueued,
            "duplicate_acked": self.duplicate_acked,
            "never_acked": self.never_acked,
            "acked_not_enqueued": self.acked_not_enqueued,
        })
    }
}

/// Awaits every task; the first error wins. A task that fails cancels `stop` itself
/// (see `guarded`), so the others wind down instead of running to their timeout.
async fn join_all<T>(handles: Vec<JoinHandle<Result<T>>>) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(handles.len());
    let mut first_error = None;
    for handle in handles {
        match handle.await {
            Ok(Ok(value)) => out.push(value),
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(join) => {
                first_error.get_or_insert(anyhow!("a bench task panicked: {join}"));
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(out),
    }
}

fn guarded<T: Send + 'static>(
    stop: &CancellationToken,
    task: impl Future<Output = Result<T>> + Send + 'static,
) -> JoinHandle<Result<T>> {
    let stop = stop.clone();
    tokio::spawn(async move {
        let result = task.await;
        if result.is_err() {
            stop.cancel();
        }
        result
    })
}

/// Counts acked jobs; the ack that reaches `target` records the end time and stops the run.
struct Progress {
    target: AtomicU64,
    acked: AtomicU64,
    started: Instant,
    finished_us: AtomicU64,
    done: CancellationToken,
}

impl Progress {
    fn new(target: u64, started: Instant) -> Arc<Self> {
        Arc::new(Self {
            target: AtomicU64::new(target),
            acked: AtomicU64::new(0),
            started,
            finished_us: AtomicU64::new(0),
            done: CancellationToken::new(),
        })
    }

    // SeqCst: `add` and `set_target` each write one counter and read the other, so at
    // least one of them sees both writes and finishes the run.
    fn add(&self, count: u64) {
        let total = self.acked.fetch_add(count, Ordering::SeqCst) + count;
        if count > 0 && total >= self.target.load(Ordering::SeqCst) {
            self.finish();
        }
    }

    fn set_target(&self, target: u64) {
        self.target.store(target, Ordering::SeqCst);
        if self.acked.load(Ordering::SeqCst) >= target {
            self.finish();
        }
    }

    fn finish(&self) {
        let now = self.started.elapsed().as_micros() as u64;
        let _ =
            self.finished_us
                .compare_exchange(0, now.max(1), Ordering::AcqRel, Ordering::Acquire);
        self.done.cancel();
    }

    fn seconds(&self) -> f64 {
        self.finished_us.load(Ordering::Acquire) as f64 / 1e6
    }
}

// ---------------------------------------------------------------------------------------
// enqueue: durable enqueue throughput
// ---------------------------------------------------------------------------------------

async fn enqueue(opts: Opts) -> Result<bool> {
    let url = opts.string("url", None)?;
    let clients = opts.number("clients", 32, 1, 4096)?;
    let per_request = opts.number("per-request", 1, 1, 10_000)?;
    let seconds = opts.number("seconds", 10, 1, 3600)?;
    let queue = opts.queue("enqueue")?;
    let api = Api::new(&url, clients as usize)?;
    api.preflight().await?;
    let endpoints = Arc::new(api.endpoints(&queue)?);

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let stop = CancellationToken::new();
    let mut handles = Vec::new();
    for client in 0..clients {
        let (api, endpoints) = (api.clone(), endpoints.clone());
        // One body per client, built before the clock matters: the harness only sends.
        let body = if per_request == 1 {
            to_bytes(&NewJob {
                name: "enqueue",
                payload: SeqPayload { seq: client },
            })
        } else {
            let jobs: Vec<_> = (0..per_request)
                .map(|n| NewJob {
                    name: "enqueue",
                    payload: SeqPayload {
                        seq: client * per_request + n,
                    },
                })
                .collect();
            to_bytes(&jobs)
        };
        let stop_here = stop.clone();
        handles.push(guarded(&stop, async move {
            let mut latencies = Vec::with_capacity(4096);
            let (mut jobs, mut duplicates) = (0u64, 0u64);
            while Instant::now() < deadline && !stop_here.is_cancelled() {
                let sent = Instant::now();
                let response = api
                    .post(&endpoints.enqueue, body.clone(), StatusCode::CREATED)
                    .await?;
                latencies.push(sent.elapsed().as_micros() as u64);
                if per_request == 1 {
                    let one: Enqueued =
                        serde_json::from_slice(&response).context("enqueue response")?;
                    jobs += 1;
                    duplicates += u64::from(one.duplicate);
                } else {
                    let many: EnqueuedMany =
                        serde_json::from_slice(&response).context("enqueue response")?;
                    if many.jobs.len() as u64 != per_request {
                        bail!(
                            "sent {per_request} jobs, keel answered for {}",
                            many.jobs.len()
                        );
                    }
                    jobs += per_request;
                    duplicates += many.jobs.iter().filter(|job| job.duplicate).count() as u64;
                }
            }
            Ok((latencies, jobs, duplicates))
        }));
    }
    let results = join_all(handles).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let (mut latencies, mut jobs, mut duplicates) = (Vec::new(), 0, 0);
    for (client_latencies, client_jobs, client_duplicates) in results {
        latencies.extend(client_latencies);
        jobs += client_jobs;
        duplicates += client_duplicates;
    }
    let requests = latencies.len() as u64;
    let latency = Latency::of(latencies);
    let (jobs_per_s, requests_per_s) = (jobs as f64 / elapsed, requests as f64 / elapsed);
    let setup =
        format!("{clients} clients, {per_request} job(s)/request, {elapsed:.1} s, queue {queue}");
    println!("enqueue: {jobs_per_s:.0} jobs/s ({setup})");
    println!("enqueue: {requests_per_s:.0} requests/s");
    println!(
        "enqueue: request latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latency.p50, latency.p99, latency.max
    );
    if duplicates > 0 {
        println!(
            "enqueue: keel flagged {duplicates} jobs as duplicates (the bench sends no deduplication key)"
        );
    }
    result_line(json!({
        "mode": "enqueue",
        "queue": queue,
        "clients": clients,
        "per_request": per_request,
        "seconds": elapsed,
        "jobs": jobs,
        "requests": requests,
        "jobs_per_s": jobs_per_s,
        "requests_per_s": requests_per_s,
        "p50_ms": latency.p50,
        "p99_ms": latency.p99,
        "max_ms": latency.max,
        "duplicates": duplicates,
        "ok": duplicates == 0,
    }));
    Ok(duplicates == 0)
}

// ---------------------------------------------------------------------------------------
// e2e: enqueue N jobs while workers reserve and batch-ack them
// ---------------------------------------------------------------------------------------

/// Work shared by the enqueuers: request bodies built up front, claimed by index.
struct Batches<B> {
    bodies: Vec<B>,
    next: AtomicU64,
}

impl<B> Batches<B> {
    fn claim(&self) -> Option<&B> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        self.bodies.get(index)
    }
}

fn batch_sizes(jobs: u64, per_request: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..jobs.div_ceil(per_request)).map(move |batch| {
        let first = batch * per_request;
        (first, per_request.min(jobs - first))
    })
}

async fn e2e(opts: Opts) -> Result<bool> {
    let url = opts.string("url", None)?;
    let jobs = opts.number("jobs", 100_000, 1, 100_000_000)?;
    let workers = opts.number("workers", 8, 1, 1024)?;
    let reserve = opts.number("reserve", 32, 1, 10_000)?;
    let enqueuers = opts.number("enqueuers", 8, 1, 1024)?;
    let per_request = opts.number("per-request", 100, 1, 10_000)?;
    let timeout = opts.number("timeout", 600, 1, 86_400)?;
    let queue = opts.queue("e2e")?;
    // One client per node; enqueuer and worker `i` talk to node `i % nodes`.
    let mut nodes = Vec::new();
    for url in url.split(',') {
        let api = Api::new(url, (workers + enqueuers) as usize)?;
        api.preflight().await?;
        let endpoints = Arc::new(api.endpoints(&queue)?);
        nodes.push((api, endpoints));
    }

    let batches = Arc::new(Batches {
        bodies: batch_sizes(jobs, per_request)
            .map(|(first, count)| {
                let jobs: Vec<_> = (first..first + count)
                    .map(|seq| NewJob {
                        name: "e2e",
                        payload: SeqPayload { seq },
                    })
                    .collect();
                (count, to_bytes(&jobs))
            })
            .collect(),
        next: AtomicU64::new(0),
    });
    let reserve_body = to_bytes(&ReserveRequest {
        max: reserve,
        lease: "30s",
        wait: "1s",
    });

    let started = Instant::now();
    let progress = Progress::new(jobs, started);
    let stop = progress.done.clone();
    let enqueued_us = Arc::new(AtomicU64::new(0));
    let mut enqueue_handles = Vec::new();
    for index in 0..enqueuers as usize {
        let (api, endpoints) = &nodes[index % nodes.len()];
        let (api, endpoints, batches, enqueued_us) = (
            api.clone(),
            endpoints.clone(),
            batches.clone(),
            enqueued_us.clone(),
        );
        let stop_here = stop.clone();
        enqueue_handles.push(guarded(&stop, async move {
            let mut ids = Vec::new();
            while let Some((count, body)) = batches.claim() {
                if stop_here.is_cancelled() {
                    break;
                }
                let response = api
                    .post(&endpoints.enqueue, body.clone(), StatusCode::CREATED)
                    .await?;
                let many: EnqueuedMany =
                    serde_json::from_slice(&response).context("enqueue response")?;
                if many.jobs.len() as u64 != *count {
                    bail!("sent {count} jobs, keel answered for {}", many.jobs.len());
                }
                ids.extend(many.jobs.iter().map(|job| job.id));
            }
            enqueued_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::AcqRel);
            Ok(ids)
        }));
    }
    let mut worker_handles = Vec::new();
    for index in 0..workers as usize {
        let (api, endpoints) = &nodes[index % nodes.len()];
        let (api, endpoints, progress, body) = (
            api.clone(),
            endpoints.clone(),
            progress.clone(),
            reserve_body.clone(),
        );
        worker_handles.push(guarded(&stop, async move {
            let mut stats = WorkerStats::default();
            loop {
                let response = tokio::select! {
                    _ = progress.done.cancelled() => break,
                    response = api.post(&endpoints.reserve, body.clone(), StatusCode::OK) => response?,
                };
                let reserved: Reserved<serde::de::IgnoredAny> =
                    serde_json::from_slice(&response).context("reserve response")?;
                stats.reserve_calls += 1;
                if reserved.jobs.is_empty() {
                    continue;
                }
                let acked = ack_batch(&api, &endpoints.ack, &reserved.jobs, &mut stats).await?;
                progress.add(acked);
            }
            Ok(stats)
        }));
    }

    let timed_out = tokio::select! {
        _ = progress.done.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_secs(timeout)) => true,
    };
    stop.cancel();
    let enqueued_ids: Vec<u64> = join_all(enqueue_handles)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let stats = WorkerStats::merge(join_all(worker_handles).await?);
    if timed_out {
        println!(
            "e2e: TIMED OUT after {timeout} s with {} of {jobs} jobs acked",
            progress.acked.load(Ordering::Acquire)
        );
    }
    let seconds = if timed_out {
        timeout as f64
    } else {
        progress.seconds()
    };
    let enqueue_seconds = enqueued_us.load(Ordering::Acquire) as f64 / 1e6;
    let jobs_per_s = if timed_out {
        0.0
    } else {
        jobs as f64 / seconds
    };
    let per_reserve = stats.reserved as f64 / stats.reserve_calls.max(1) as f64;
    println!(
        "e2e: {jobs_per_s:.0} jobs/s end to end ({jobs} jobs in {seconds:.2} s; {enqueuers} enqueuers x \
         {per_request}/request, {workers} workers x reserve {reserve} + batch ack; queue {queue})"
    );
    println!(
        "e2e: enqueue side done after {enqueue_seconds:.2} s ({:.0} jobs/s while workers ran)",
        jobs as f64 / enqueue_seconds.max(1e-6)
    );
    println!(
        "e2e: {} reserve calls, {per_reserve:.1} jobs per call on average, {} ack failures",
        stats.reserve_calls, stats.ack_failures
    );
    let verification = Verification::check(jobs, enqueued_ids, stats.acked_ids);
    verification.print("e2e");
    let ok = !timed_out && verification.ok() && stats.ack_failures == 0;
    result_line(json!({
        "mode": "e2e",
        "queue": queue,
        "jobs": jobs,
        "enqueuers": enqueuers,
        "per_request": per_request,
        "workers": workers,
        "nodes": nodes.len(),
        "reserve": reserve,
        "seconds": seconds,
        "jobs_per_s": jobs_per_s,
        "enqueue_seconds": enqueue_seconds,
        "reserve_calls": stats.reserve_calls,
        "jobs_per_reserve": per_reserve,
        "ack_failures": stats.ack_failures,
        "ack_failure_codes": stats.failure_codes,
        "timed_out": timed_out,
        "verification": verification.json(),
        "ok": ok,
    }));
    Ok(ok)
}

#[derive(Default)]
struct WorkerStats {
    reserve_calls: u64,
    reserved: u64,
    ack_failures: u64,
    failure_codes: HashMap<String, u64>,
    acked_ids: Vec<u64>,
}

impl WorkerStats {
    fn merge(all: Vec<Self>) -> Self {
        let mut total = Self::default();
        for one in all {
            total.reserve_calls += one.reserve_calls;
            total.reserved += one.reserved;
            total.ack_failures += one.ack_failures;
            for (code, count) in one.failure_codes {
                *total.failure_codes.entry(code).or_default() += count;
            }
            total.acked_ids.extend(one.acked_ids);
        }
        total
    }
}

/// Acks every reserved job in one batch request; returns how many keel accepted.
async fn ack_batch<P>(
    api: &Api,
    uri: &Uri,
    jobs: &[ReservedJob<P>],
    stats: &mut WorkerStats,
) -> Result<u64> {
    stats.reserved += jobs.len() as u64;
    let body = to_bytes(&AckBatch {
        jobs: jobs
            .iter()
            .map(|job| AckItem {
                id: job.id,
                lease_token: &job.lease_token,
                result: (),
            })
            .collect(),
    });
    let response = api.post(uri, body, StatusCode::OK).await?;
    let results: AckResults = serde_json::from_slice(&response).context("batch ack response")?;
    if results.results.len() != jobs.len() {
        bail!(
            "acked {} jobs, keel answered for {}",
            jobs.len(),
            results.results.len()
        );
    }
    let mut accepted = 0;
    for result in results.results {
        if result.ok {
            accepted += 1;
            stats.acked_ids.push(result.id);
        } else {
            stats.ack_failures += 1;
            *stats
                .failure_codes
                .entry(result.code.unwrap_or_else(|| "(no code)".to_owned()))
                .or_default() += 1;
        }
    }
    Ok(accepted)
}

// ---------------------------------------------------------------------------------------
// pickup: paced single-job enqueues, long-polling workers, pickup latency
// ---------------------------------------------------------------------------------------

struct Sent {
    id: u64,
    sent_us: u64,
    acked_us: u64,
}

struct Picked {
    id: u64,
    arrived_us: u64,
    sent_us: u64,
}

async fn pickup(opts: Opts) -> Result<bool> {
    let url = opts.string("url", None)?;
    let rate = opts.number("rate", 1000, 1, 1_000_000)?;
    let seconds = opts.number("seconds", 10, 1, 3600)?;
    let workers = opts.number("workers", 4, 1, 1024)?;
    let reserve = opts.number("reserve", 32, 1, 10_000)?;
    let max_in_flight = opts.number("max-in-flight", 256, 1, 100_000)?;
    let queue = opts.queue("pickup")?;
    let api = Api::new(&url, (workers + max_in_flight) as usize)?;
    api.preflight().await?;
    let endpoints = Arc::new(api.endpoints(&queue)?);
    let reserve_body = to_bytes(&ReserveRequest {
        max: reserve,
        lease: "30s",
        wait: "5s",
    });

    let started = Instant::now();
    let planned = rate * seconds;
    // The target is raised to the real count once sending stops (some sends may fail).
    let progress = Progress::new(u64::MAX, started);
    let stop = CancellationToken::new();
    let mut worker_handles = Vec::new();
    for _ in 0..workers {
        let (api, endpoints, progress, body) = (
            api.clone(),
            endpoints.clone(),
            progress.clone(),
            reserve_body.clone(),
        );
        let stop_here = stop.clone();
        worker_handles.push(guarded(&stop, async move {
            let mut stats = WorkerStats::default();
            let mut picked = Vec::new();
            loop {
                let response = tokio::select! {
                    _ = progress.done.cancelled() => break,
                    _ = stop_here.cancelled() => break,
                    response = api.post(&endpoints.reserve, body.clone(), StatusCode::OK) => response?,
                };
                let arrived_us = unix_micros();
                let reserved: Reserved<PickupPayload> =
                    serde_json::from_slice(&response).context("reserve response")?;
                stats.reserve_calls += 1;
                if reserved.jobs.is_empty() {
                    continue;
                }
                picked.extend(reserved.jobs.iter().map(|job| Picked {
                    id: job.id,
                    arrived_us,
                    sent_us: job.payload.sent_us,
                }));
                let acked = ack_batch(&api, &endpoints.ack, &reserved.jobs, &mut stats).await?;
                progress.add(acked);
            }
            Ok((stats, picked))
        }));
    }

    // Pacing: every tick sends the jobs that are due by now, each on its own task, at most
    // max_in_flight at once; a slow server shows as an achieved rate below the target.
    let sent = Arc::new(Mutex::new(Vec::with_capacity(planned as usize)));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight as usize));
    let throttled = Arc::new(AtomicBool::new(false));
    let mut senders = tokio::task::JoinSet::new();
    let period = Duration::from_secs(1)
        .div_f64(rate as f64)
        .max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let send_started = Instant::now();
    let mut issued = 0u64;
    let mut send_error = None;
    while issued < planned && !stop.is_cancelled() {
        ticks.tick().await;
        let due = ((send_started.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(planned);
        while issued < due {
            let permit = match in_flight.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    throttled.store(true, Ordering::Relaxed);
                    in_flight.clone().acquire_owned().await?
                }
            };
            issued += 1;
            let (api, endpoints, sent) = (api.clone(), endpoints.clone(), sent.clone());
            senders.spawn(async move {
                let sent_us = unix_micros();
                let body = to_bytes(&NewJob {
                    name: "pickup",
                    payload: PickupPayload { sent_us },
                });
                let response = api
                    .post(&endpoints.enqueue, body, StatusCode::CREATED)
                    .await;
                let acked_us = unix_micros();
                drop(permit);
                let one: Enqueued =
                    serde_json::from_slice(&response?).context("enqueue response")?;
                sent.lock().expect("sent log").push(Sent {
                    id: one.id,
                    sent_us,
                    acked_us,
                });
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(done) = senders.try_join_next() {
            if let Err(error) = done.map_err(anyhow::Error::from).and_then(|sent| sent) {
                send_error.get_or_insert(error);
                stop.cancel();
            }
        }
    }
    while let Some(done) = senders.join_next().await {
        if let Err(error) = done.map_err(anyhow::Error::from).and_then(|sent| sent) {
            send_error.get_or_insert(error);
            stop.cancel();
        }
    }
    let send_seconds = send_started.elapsed().as_secs_f64();
    let sent = std::mem::take(&mut *sent.lock().expect("sent log"));
    let enqueued = sent.len() as u64;
    progress.set_target(enqueued);
    let timed_out = tokio::select! {
        _ = progress.done.cancelled() => false,
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_secs(30)) => true,
    };
    stop.cancel();
    let worker_results = join_all(worker_handles).await;
    if let Some(error) = send_error {
        return Err(error);
    }
    let (stats, picked): (Vec<_>, Vec<_>) = worker_results?.into_iter().unzip();
    let stats = WorkerStats::merge(stats);
    let picked: Vec<Picked> = picked.into_iter().flatten().collect();

    let acked_at: HashMap<u64, u64> = sent.iter().map(|s| (s.id, s.acked_us)).collect();
    let (mut from_ack, mut from_send, mut before_ack, mut unknown) =
        (Vec::new(), Vec::new(), 0u64, 0u64);
    for pick in &picked {
        match acked_at.get(&pick.id) {
            Some(&acked_us) => {
                // The reserve answer can be read before the enqueuer read its 201.
                if pick.arrived_us < acked_us {
                    before_ack += 1;
                }
                from_ack.push(pick.arrived_us.saturating_sub(acked_us));
            }
            None => unknown += 1,
        }
        from_send.push(pick.arrived_us.saturating_sub(pick.sent_us));
    }
    let enqueue_latency = Latency::of(
        sent.iter()
            .map(|s| s.acked_us.saturating_sub(s.sent_us))
            .collect(),
    );
    let pickup = Latency::of(from_ack);
    let pickup_from_send = Latency::of(from_send);
    let achieved = enqueued as f64 / send_seconds;
    println!(
        "pickup: {enqueued} single-job enqueues at {achieved:.0}/s (target {rate}/s for {seconds} s{}), \
         {workers} workers long-polling reserve {reserve}, wait 5s; queue {queue}",
        if throttled.load(Ordering::Relaxed) {
            format!("; {max_in_flight} in flight at times")
        } else {
            String::new()
        }
    );
    println!(
        "pickup: latency (reserve response - enqueue 201) p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pickup.p50, pickup.p99, pickup.max
    );
    println!(
        "pickup: latency from enqueue send p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pickup_from_send.p50, pickup_from_send.p99, pickup_from_send.max
    );
    println!(
        "pickup: enqueue request latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        enqueue_latency.p50, enqueue_latency.p99, enqueue_latency.max
    );
    if before_ack > 0 {
        println!(
            "pickup: {before_ack} jobs reached a worker before their enqueue's 201 was read (counted as 0 ms)"
        );
    }
    let verification = Verification::check(
        enqueued,
        sent.iter().map(|s| s.id).collect(),
        stats.acked_ids,
    );
    if timed_out {
        println!("pickup: TIMED OUT: jobs still unacked 30 s after the last enqueue");
    }
    verification.print("pickup");
    let ok = !timed_out && verification.ok() && stats.ack_failures == 0 && unknown == 0;
    result_line(json!({
        "mode": "pickup",
        "queue": queue,
        "rate": rate,
        "achieved_rate": achieved,
        "seconds": seconds,
        "workers": workers,
        "reserve": reserve,
        "enqueued": enqueued,
        "picked": picked.len(),
        "p50_ms": pickup.p50,
        "p99_ms": pickup.p99,
        "max_ms": pickup.max,
        "from_send_p50_ms": pickup_from_send.p50,
        "from_send_p99_ms": pickup_from_send.p99,
        "from_send_max_ms": pickup_from_send.max,
        "enqueue_p50_ms": enqueue_latency.p50,
        "enqueue_p99_ms": enqueue_latency.p99,
        "picked_before_ack": before_ack,
        "ack_failures": stats.ack_failures,
        "timed_out": timed_out,
        "verification": verification.json(),
        "ok": ok,
    }));
    Ok(ok)
}

// ---------------------------------------------------------------------------------------
// pg-e2e: the durable peer, PostgreSQL with FOR UPDATE SKIP LOCKED
// ---------------------------------------------------------------------------------------

const PG_DATABASE: &str = "keel_bench";
const PG_QUEUE: &str = "bench";

const PG_SCHEMA: &str = "
DROP TABLE IF EXISTS jobs;
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    queue text NOT NULL,
    payload jsonb NOT NULL,
    state text NOT NULL DEFAULT 'waiting',
    priority int NOT NULL DEFAULT 0,
    run_at timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz,
    attempts int NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_waiting ON jobs (queue, priority DESC, id) WHERE state = 'waiting';
";

const PG_CLAIM: &str = "
UPDATE jobs SET state = 'active', locked_until = now() + interval '30 seconds', attempts = attempts + 1
WHERE id IN (
    SELECT id FROM jobs
    WHERE queue = $1 AND state = 'waiting' AND run_at <= now()
    ORDER BY priority DESC, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING id, payload";

const PG_ACK: &str = "UPDATE jobs SET state = 'completed', locked_until = NULL WHERE id = ANY($1) AND state = 'active'";

/// One multi-row INSERT for `rows` jobs: `$1` is the queue, `$2..` the payloads.
fn pg_insert(rows: u64) -> String {
    let mut sql = String::from(
        "INSERT INTO jobs (queue, payload, state, priority, run_at, attempts, created_at) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "($1, ${}, 'waiting', 0, now(), 0, now())",
            row + 2
        ));
    }
    sql.push_str(" RETURNING id");
    sql
}

async fn pg_connect(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("queue_load pg-e2e: connection: {error}");
        }
    });
    Ok(client)
}

/// Connects to keel_bench, creating the database when it does not exist yet.
async fn pg_open(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client> {
    match pg_connect(config).await {
        Ok(client) => Ok(client),
        Err(error)
            if error.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) =>
        {
            let mut admin = config.clone();
            admin.dbname("postgres");
            let client = pg_connect(&admin).await.context(
                "database keel_bench is missing and connecting to `postgres` to create it failed",
            )?;
            client
                .batch_execute(&format!("CREATE DATABASE {PG_DATABASE}"))
                .await
                .context("CREATE DATABASE keel_bench")?;
            eprintln!("queue_load pg-e2e: created database {PG_DATABASE}");
            Ok(pg_connect(config).await?)
        }
        Err(error) => Err(anyhow::Error::new(error)
            .context("cannot connect to PostgreSQL (is it running? `pg_isready -h 127.0.0.1`)")),
    }
}

async fn pg_e2e(opts: Opts) -> Result<bool> {
    let conninfo = opts.string("pg", Some("host=127.0.0.1 user=postgres dbname=keel_bench"))?;
    let jobs = opts.number("jobs", 100_000, 1, 100_000_000)?;
    let workers = opts.number("workers", 8, 1, 256)?;
    let reserve = opts.number("reserve", 32, 1, 10_000)?;
    let enqueuers = opts.number("enqueuers", 8, 1, 256)?;
    let per_request = opts.number("per-request", 100, 1, 10_000)?;
    let poll = Duration::from_millis(opts.number("poll-ms", 10, 0, 10_000)?);
    let timeout = opts.number("timeout", 600, 1, 86_400)?;
    let config: tokio_postgres::Config = conninfo
        .parse()
        .with_context(|| format!("--pg {conninfo:?}"))?;
    if config.get_dbname() != Some(PG_DATABASE) {
        bail!(
            "--pg {conninfo:?}: pg-e2e drops and recreates table `jobs`, so it runs only in database \
             {PG_DATABASE} (add dbname={PG_DATABASE})"
        );
    }

    let admin = pg_open(&config).await?;
    let version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
    let synchronous_commit: String = admin
        .query_one("SHOW synchronous_commit", &[])
        .await?
        .get(0);
    let fsync: String = admin.query_one("SHOW fsync", &[]).await?.get(0);
    admin
        .batch_execute(PG_SCHEMA)
        .await
        .context("creating table jobs")?;

    // Every connection is opened (and its statements prepared) before the clock starts,
    // as a pool would have them.
    let mut enqueue_clients = Vec::new();
    for _ in 0..enqueuers {
        let client = pg_connect(&config).await?;
        let full = client.prepare(&pg_insert(per_request)).await?;
        let last_rows = jobs % per_request;
        let last = if last_rows == 0 {
            None
        } else {
            Some(client.prepare(&pg_insert(last_rows)).await?)
        };
        enqueue_clients.push((client, full, last));
    }
    let mut worker_clients = Vec::new();
    for _ in 0..workers {
        let client = pg_connect(&config).await?;
        let claim = client.prepare(PG_CLAIM).await?;
        let ack = client.prepare(PG_ACK).await?;
        worker_clients.push((client, claim, ack));
    }
    let batches = Arc::new(Batches {
        bodies: batch_sizes(jobs, per_request)
            .map(|(first, count)| {
                let payloads: Vec<_> = (first..first + count)
                    .map(|seq| tokio_postgres::types::Json(SeqPayload { seq }))
                    .collect();
                (count, payloads)
            })
            .collect(),
        next: AtomicU64::new(0),
    });

    let started = Instant::now();
    let progress = Progress::new(jobs, started);
    let stop = progress.done.clone();
    let enqueued_us = Arc::new(AtomicU64::new(0));
    let mut enqueue_handles = Vec::new();
    for (client, full, last) in enqueue_clients {
        let (batches, enqueued_us, stop_here) =
            (batches.clone(), enqueued_us.clone(), stop.clone());
        enqueue_handles.push(guarded(&stop, async move {
            let mut ids = Vec::new();
            while let Some((count, payloads)) = batches.claim() {
                if stop_here.is_cancelled() {
                    break;
                }
                let statement = if *count == per_request {
                    &full
                } else {
                    last.as_ref().context("partial batch")?
                };
                let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    Vec::with_capacity(payloads.len() + 1);
                params.push(&PG_QUEUE);
                params.extend(
                    payloads
                        .iter()
                        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync)),
                );
                let rows = client.query(statement, &params).await.context("INSERT")?;
                if rows.len() as u64 != *count {
                    bail!(
                        "inserted {count} jobs, PostgreSQL returned {} ids",
                        rows.len()
                    );
                }
                ids.extend(rows.iter().map(|row| row.get::<_, i64>(0) as u64));
            }
            enqueued_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::AcqRel);
            Ok(ids)
        }));
    }
    let mut worker_handles = Vec::new();
    for (client, claim, ack) in worker_clients {
        let progress = progress.clone();
        worker_handles.push(guarded(&stop, async move {
            let mut stats = WorkerStats::default();
            let limit = reserve as i64;
            while !progress.done.is_cancelled() {
                let rows = client
                    .query(&claim, &[&PG_QUEUE, &limit])
                    .await
                    .context("claim")?;
                stats.reserve_calls += 1;
                if rows.is_empty() {
                    tokio::select! {
                        _ = progress.done.cancelled() => break,
                        _ = tokio::time::sleep(poll) => continue,
                    }
                }
                let mut ids = Vec::with_capacity(rows.len());
                for row in &rows {
                    let _payload: tokio_postgres::types::Json<SeqPayload> = row.get(1);
                    ids.push(row.get::<_, i64>(0));
                }
                stats.reserved += ids.len() as u64;
                let updated = client.execute(&ack, &[&ids]).await.context("ack")?;
                if updated != ids.len() as u64 {
                    stats.ack_failures += ids.len() as u64 - updated.min(ids.len() as u64);
                }
                stats.acked_ids.extend(ids.iter().map(|&id| id as u64));
                progress.add(updated);
            }
            Ok(stats)
        }));
    }

    let timed_out = tokio::select! {
        _ = progress.done.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_secs(timeout)) => true,
    };
    stop.cancel();
    let enqueued_ids: Vec<u64> = join_all(enqueue_handles)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let stats = WorkerStats::merge(join_all(worker_handles).await?);
    let completed: i64 = admin
        .query_one("SELECT count(*) FROM jobs WHERE state = 'completed'", &[])
        .await?
        .get(0);

    let seconds = if timed_out {
        timeout as f64
    } else {
        progress.seconds()
    };
    let jobs_per_s = if timed_out {
        0.0
    } else {
        jobs as f64 / seconds
    };
    let enqueue_seconds = enqueued_us.load(Ordering::Acquire) as f64 / 1e6;
    let per_claim = stats.reserved as f64 / stats.reserve_calls.max(1) as f64;
    if timed_out {
        println!(
            "pg-e2e: TIMED OUT after {timeout} s with {} of {jobs} jobs acked",
            progress.acked.load(Ordering::Acquire)
        );
    }
    println!(
        "pg-e2e: {jobs_per_s:.0} jobs/s end to end ({jobs} jobs in {seconds:.2} s; {enqueuers} enqueuers x \
         {per_request}-row INSERT, {workers} workers x claim {reserve} (SKIP LOCKED) + ANY() ack; \
         PostgreSQL {version}, synchronous_commit={synchronous_commit}, fsync={fsync})"
    );
    println!(
        "pg-e2e: enqueue side done after {enqueue_seconds:.2} s; {} claim queries, {per_claim:.1} jobs per claim \
         (empty claims poll every {} ms)",
        stats.reserve_calls,
        poll.as_millis()
    );
    let verification = Verification::check(jobs, enqueued_ids, stats.acked_ids);
    verification.print("pg-e2e");
    let ok = !timed_out && verification.ok() && stats.ack_failures == 0 && completed as u64 == jobs;
    if completed as u64 != jobs {
        println!("pg-e2e: table jobs has {completed} completed rows, expected {jobs}");
    }
    result_line(json!({
        "mode": "pg-e2e",
        "jobs": jobs,
        "enqueuers": enqueuers,
        "per_request": per_request,
        "workers": workers,
        "reserve": reserve,
        "seconds": seconds,
        "jobs_per_s": jobs_per_s,
        "enqueue_seconds": enqueue_seconds,
        "claim_queries": stats.reserve_calls,
        "jobs_per_claim": per_claim,
        "poll_ms": poll.as_millis() as u64,
        "ack_failures": stats.ack_failures,
        "completed_rows": completed,
        "server_version": version,
        "synchronous_commit": synchronous_commit,
        "fsync": fsync,
        "timed_out": timed_out,
        "verification": verification.json(),
        "ok": ok,
    }));
    Ok(ok)
}
