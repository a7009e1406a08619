//! The job queue under `kill -9`: enqueuers and workers run against keel while it is
//! killed at a random moment, round after round on one data dir. A 201 means the job
//! was fsynced and a 200 ack means its completion was, so after the last restart every
//! acknowledged job must be there, completed, with its payload, and no job acked with a
//! 200 may have run again.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::support::{DEADLINE, Keel, base_config, parse_reply, scratch};

const ROUNDS: usize = 20;
const ENQUEUERS: usize = 4;
const WORKERS: usize = 4;
const QUEUE: &str = "crash";
/// How long the last start may take to finish every job; leases cut by the last kill
/// run out after 3 s.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);
/// Pause after a refused connection (keel is down), so a client does not spin.
const BACKOFF: Duration = Duration::from_millis(5);

#[test]
fn queue_survives_kill_9_during_enqueue_and_ack() {
    let started = Instant::now();
    let dir = scratch();
    let config = base_config(dir.path());
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut next_seq = [0u64; ENQUEUERS];
    let mut round_logs = Vec::with_capacity(ROUNDS);
    let mut starts = 0;

    for round in 0..ROUNDS {
        let (mut keel, addr) = Keel::start(dir.path(), &config);
        starts += 1;
        let stop = Arc::new(AtomicBool::new(false));
        let enqueuers: Vec<JoinHandle<u64>> = (0..ENQUEUERS)
            .map(|client| {
                let (stop, ledger, seq) = (stop.clone(), ledger.clone(), next_seq[client]);
                std::thread::spawn(move || enqueuer(addr, client, seq, round, &stop, &ledger))
            })
            .collect();
        let workers = spawn_workers(addr, round, &stop, &ledger);

        std::thread::sleep(kill_delay());
        keel.signal("KILL");
        let status = keel
            .wait_exit(DEADLINE)
            .unwrap_or_else(|| panic!("round {round}: keel outlived SIGKILL"));
        stop.store(true, Ordering::Relaxed);
        for (client, handle) in enqueuers.into_iter().enumerate() {
            next_seq[client] = handle.join().expect("enqueuer thread");
        }
        for handle in workers {
            handle.join().expect("worker thread");
        }
        assert_eq!(
            status.signal(),
            Some(9),
            "round {round}: keel ended by itself ({status}), not by the kill; log:\n{}",
            keel.log_text()
        );
        round_logs.push(keel.log_text());
    }

    // The last start is not killed: workers finish everything that is left.
    let (keel, addr) = Keel::start(dir.path(), &config);
    starts += 1;
    let stop = Arc::new(AtomicBool::new(false));
    let workers = spawn_workers(addr, ROUNDS, &stop, &ledger);
    let drain_deadline = Instant::now() + DRAIN_DEADLINE;
    let mut counts = queue_counts(addr);
    while pending(&counts) > 0 && Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_millis(100));
        counts = queue_counts(addr);
    }
    stop.store(true, Ordering::Relaxed);
    for handle in workers {
        handle.join().expect("worker thread");
    }
    assert_eq!(
        pending(&counts),
        0,
        "jobs still pending after {DRAIN_DEADLINE:?}: {counts}; log tail:\n{}",
        tail(&keel.log_text(), 40)
    );
    let counts = queue_counts(addr);
    let ledger = Arc::try_unwrap(ledger)
        .ok()
        .expect("every client thread has ended")
        .into_inner()
        .unwrap();

    let completed = list_completed(addr);
    let mut lost = Vec::new();
    let mut lost_acks = Vec::new();
    let mut phantoms = Vec::new();

    // Payloads by the id their 201 gave; more than one means an id was handed out twice
    // (an enqueue the store forgot, and its id reused).
    let mut by_id: HashMap<u64, Vec<&Value>> = HashMap::new();
    for (id, payload, _) in &ledger.acknowledged {
        by_id.entry(*id).or_default().push(payload);
    }
    for (id, payloads) in &by_id {
        if payloads.len() > 1 {
            phantoms.push(format!(
                "id {id} was given by a 201 to each of {}",
                join(payloads)
            ));
        }
    }

    // 1. Every acknowledged enqueue is there, completed, with its payload.
    let jobs = fetch_jobs(addr, by_id.keys().copied().collect());
    for (id, payload, round) in &ledger.acknowledged {
        let problem = match &jobs[id] {
            Err(status) => Some(format!("GET answered {status}")),
            Ok(job) if job["state"] != "completed" || job["payload"] != *payload => {
                Some(format!("state {} payload {}", job["state"], job["payload"]))
            }
            Ok(_) => None,
        };
        if let Some(problem) = problem {
            lost.push(format!(
                "job {id} {payload} (201 in round {round}): {problem}; {}",
                ledger.deliveries_of(*id)
            ));
        }
    }

    // 2. Every 200 ack stuck: the job was acked once, and is completed by the attempt
    //    that was acked, so it did not come back and run again.
    for (&id, acks) in &ledger.acked_ok {
        let job = completed.get(&id);
        match acks[..] {
            [(attempt, _)] if job.is_some_and(|job| job["attempts_made"] == attempt) => {}
            _ => {
                let acks: Vec<String> = acks
                    .iter()
                    .map(|(attempt, round)| format!("attempt {attempt} in round {round}"))
                    .collect();
                lost_acks.push(format!(
                    "job {id} acked 200 at {}, now {}; {}",
                    acks.join(" and "),
                    job.map_or_else(
                        || "not completed".to_owned(),
                        |job| format!(
                            "completed at attempt {} (last error {})",
                            job["attempts_made"], job["last_error"]
                        )
                    ),
                    ledger.deliveries_of(id)
                ));
            }
        }
    }

    // 3. Nothing completed or ran that was never enqueued: every job is an acknowledged
    //    one with its payload, or one whose enqueue had no answer.
    let unknown: HashSet<String> = ledger.unknown.iter().map(Value::to_string).collect();
    // `None` when `payload` under `id` is one the clients enqueued, else why not.
    let unexplained = |id: u64, payload: &Value| match by_id.get(&id) {
        Some(payloads) if payloads.contains(&payload) => None,
        Some(payloads) => Some(format!(
            "but the 201 for id {id} was for {}",
            join(payloads)
        )),
        None if unknown.contains(&payload.to_string()) => None,
        None => Some("which no 201 named and no unanswered enqueue sent".to_owned()),
    };
    for (&id, job) in &completed {
        if let Some(why) = unexplained(id, &job["payload"]) {
            phantoms.push(format!(
                "completed job {id} carries {}, {why}",
                job["payload"]
            ));
        }
    }
    for (&id, deliveries) in &ledger.deliveries {
        for (attempt, payload, round) in deliveries {
            if let Some(why) = unexplained(id, payload) {
                phantoms.push(format!(
                    "job {id} delivered (attempt {attempt}, round {round}) carries {payload}, {why}"
                ));
            }
        }
    }
    let completed_count = counts["completed"].as_u64().unwrap_or(0);
    let acknowledged = ledger.acknowledged.len() as u64;
    let unknown_count = ledger.unknown.len() as u64;
    if completed_count < acknowledged || completed_count > acknowledged + unknown_count {
        phantoms.push(format!(
            "completed count {completed_count} is outside [{acknowledged}, {}]",
            acknowledged + unknown_count
        ));
    }
    if completed.len() as u64 != completed_count {
        phantoms.push(format!(
            "GET /v1/queues says {completed_count} completed, the listing has {}",
            completed.len()
        ));
    }
    if counts["dead"] != 0 || counts["failed"] != 0 {
        phantoms.push(format!("jobs failed or died: {counts}"));
    }

    let duplicate_deliveries: usize = ledger
        .deliveries
        .values()
        .map(|deliveries| deliveries.len() - 1)
        .sum();
    let acked_refusals: Vec<String> = ledger
        .ack_refused
        .iter()
        .map(|(code, count)| format!("{code}:{count}"))
        .collect();
    eprintln!(
        "queue crash test: rounds={ROUNDS} restarts={} acknowledged={acknowledged} \
         unknown={unknown_count} acked={} lost={} duplicate_deliveries={duplicate_deliveries} \
         lost_acks={} completed={completed_count} refused={} ack_unknown={} \
         ack_refused=[{}] elapsed={:.1}s",
        starts - 1,
        ledger.acked_ok.len(),
        lost.len(),
        lost_acks.len(),
        ledger.refused,
        ledger.ack_unknown,
        acked_refusals.join(","),
        started.elapsed().as_secs_f64(),
    );

    let mut anomalies = ledger.anomalies;
    let failures = [
        ("lost jobs", &mut lost),
        ("lost acks", &mut lost_acks),
        ("jobs that match no enqueue", &mut phantoms),
        ("unexpected answers", &mut anomalies),
    ];
    let failed = failures.iter().any(|(_, list)| !list.is_empty());
    for (what, list) in failures {
        list.sort();
        if !list.is_empty() {
            eprintln!("{what} ({}):", list.len());
        }
        for failure in list.iter().take(20) {
            eprintln!("  {failure}");
        }
        if list.len() > 20 {
            eprintln!("  ... and {} more", list.len() - 20);
        }
    }
    if failed {
        // Round N's log is the start that recovered from round N-1's kill.
        for (round, log) in round_logs.iter().enumerate() {
            for line in log.lines().filter(|line| !line.contains(" INFO ")) {
                eprintln!("round {round}: {line}");
            }
        }
        eprintln!("last start's log tail:\n{}", tail(&keel.log_text(), 40));
    }
    assert!(
        acknowledged > 0 && !ledger.acked_ok.is_empty(),
        "the clients did work: {acknowledged} enqueued, {} acked",
        ledger.acked_ok.len()
    );
    assert!(
        !failed,
        "{} acknowledged jobs lost, {} 200 acks lost, {} jobs that match no enqueue, {} unexpected \
         answers (listed above)",
        lost.len(),
        lost_acks.len(),
        phantoms.len(),
        anomalies.len()
    );
}

/// What the clients saw, shared by all of them.
#[derive(Default)]
struct Ledger {
    /// 201 answers: (id, payload, round).
    acknowledged: Vec<(u64, Value, usize)>,
    /// Payloads whose enqueue reached keel but got no whole 201: they may exist.
    unknown: Vec<Value>,
    /// Requests whose connection was refused: they never reached keel.
    refused: u64,
    /// Every job a reserve handed out: id → (attempts_made, payload, round).
    deliveries: HashMap<u64, Vec<(u64, Value, usize)>>,
    /// 200 acks: id → (attempts_made of the delivery acked, round) for each; one is right.
    acked_ok: HashMap<u64, Vec<(u64, usize)>>,
    /// Acks sent without a whole answer.
    ack_unknown: u64,
    /// Acks refused, by problem code (or `not_sent`).
    ack_refused: BTreeMap<String, u64>,
    /// Answers a correct keel never gives.
    anomalies: Vec<String>,
}

/// Enqueues single jobs `{"client": client, "seq": n}` from `seq` on until `stop`;
/// returns the next sequence number.
fn enqueuer(
    addr: SocketAddr,
    client: usize,
    mut seq: u64,
    round: usize,
    stop: &AtomicBool,
    ledger: &Mutex<Ledger>,
) -> u64 {
    let path = format!("/v1/queues/{QUEUE}/jobs");
    while !stop.load(Ordering::Relaxed) {
        let payload = json!({ "client": client, "seq": seq });
        seq += 1;
        let body = json!({ "name": "crash", "payload": payload, "attempts": 1000 });
        let outcome = call(addr, "POST", &path, &body.to_string());
        let mut ledger = ledger.lock().unwrap();
        match outcome {
            Outcome::NotSent => {
                ledger.refused += 1;
                drop(ledger);
                std::thread::sleep(BACKOFF);
            }
            Outcome::Unknown(_) => ledger.unknown.push(payload),
            Outcome::Reply(201, answer)
                if answer["state"] == "waiting" && answer["duplicate"] == false =>
            {
                let Some(id) = answer["id"].as_u64() else {
                    ledger
                        .anomalies
                        .push(format!("201 without an id: {answer}"));
                    ledger.unknown.push(payload);
                    continue;
                };
                ledger.acknowledged.push((id, payload, round));
            }
            Outcome::Reply(status, answer) => {
                ledger
                    .anomalies
                    .push(format!("enqueue of {payload} answered {status} {answer}"));
                ledger.unknown.push(payload);
            }
        }
    }
    seq
}

fn spawn_workers(
    addr: SocketAddr,
    round: usize,
    stop: &Arc<AtomicBool>,
    ledger: &Arc<Mutex<Ledger>>,
) -> Vec<JoinHandle<()>> {
    (0..WORKERS)
        .map(|index| {
            let (stop, ledger) = (stop.clone(), ledger.clone());
            // Half the workers ack one job per request, half a whole reserve at once.
            let batch = index % 2 == 1;
            std::thread::spawn(move || worker(addr, batch, round, &stop, &ledger))
        })
        .collect()
}

/// Reserves up to 8 jobs at a time and acks each, until `stop`.
fn worker(addr: SocketAddr, batch: bool, round: usize, stop: &AtomicBool, ledger: &Mutex<Ledger>) {
    let reserve_path = format!("/v1/queues/{QUEUE}/reserve");
    let reserve_body = r#"{"max": 8, "lease": "3s", "wait": "200ms"}"#;
    while !stop.load(Ordering::Relaxed) {
        let jobs = match call(addr, "POST", &reserve_path, reserve_body) {
            Outcome::NotSent => {
                std::thread::sleep(BACKOFF);
                continue;
            }
            Outcome::Unknown(_) => continue,
            Outcome::Reply(200, mut answer) => match answer["jobs"].take() {
                Value::Array(jobs) => jobs,
                other => {
                    let mut ledger = ledger.lock().unwrap();
                    ledger.anomalies.push(format!("reserve answered {other}"));
                    continue;
                }
            },
            Outcome::Reply(status, answer) => {
                let mut ledger = ledger.lock().unwrap();
                ledger
                    .anomalies
                    .push(format!("reserve answered {status} {answer}"));
                continue;
            }
        };
        // (id, lease token, attempts_made)
        let mut leased = Vec::with_capacity(jobs.len());
        {
            let mut ledger = ledger.lock().unwrap();
            for job in jobs {
                let (Some(id), Some(token), Some(attempt)) = (
                    job["id"].as_u64(),
                    job["lease_token"].as_str(),
                    job["attempts_made"].as_u64(),
                ) else {
                    ledger
                        .anomalies
                        .push(format!("reserved job without id/lease: {job}"));
                    continue;
                };
                if job["state"] != "active" || job["queue"] != QUEUE {
                    ledger.anomalies.push(format!("reserved job {job}"));
                }
                leased.push((id, token.to_owned(), attempt));
                ledger.deliveries.entry(id).or_default().push((
                    attempt,
                    job["payload"].clone(),
                    round,
                ));
            }
        }
        if batch {
            ack_batch(addr, &leased, round, ledger);
        } else {
            for (id, token, attempt) in &leased {
                let body = json!({ "lease_token": token }).to_string();
                let outcome = call(addr, "POST", &format!("/v1/jobs/{id}/ack"), &body);
                let mut ledger = ledger.lock().unwrap();
                match outcome {
                    Outcome::Reply(200, answer) if answer["state"] == "completed" => {
                        ledger.acked(*id, *attempt, round);
                    }
                    Outcome::Reply(409, answer) if answer["code"].is_string() => {
                        let code = answer["code"].as_str().unwrap_or_default().to_owned();
                        *ledger.ack_refused.entry(code).or_default() += 1;
                    }
                    other => ledger.ack_outcome(*id, other),
                }
            }
        }
    }
}

/// Acks a whole reserve with one `POST /v1/jobs/ack`.
fn ack_batch(
    addr: SocketAddr,
    leased: &[(u64, String, u64)],
    round: usize,
    ledger: &Mutex<Ledger>,
) {
    if leased.is_empty() {
        return;
    }
    let jobs: Vec<Value> = leased
        .iter()
        .map(|(id, token, _)| json!({ "id": id, "lease_token": token }))
        .collect();
    let body = json!({ "jobs": jobs }).to_string();
    let outcome = call(addr, "POST", "/v1/jobs/ack", &body);
    let mut ledger = ledger.lock().unwrap();
    let Outcome::Reply(200, answer) = outcome else {
        ledger.ack_outcome(leased[0].0, outcome);
        return;
    };
    let results = answer["results"].as_array().cloned().unwrap_or_default();
    if results.len() != leased.len() {
        ledger
            .anomalies
            .push(format!("{} acks answered with {answer}", leased.len()));
    }
    for ((id, _, attempt), result) in leased.iter().zip(results) {
        if result["id"].as_u64() != Some(*id) {
            ledger
                .anomalies
                .push(format!("ack of {id} answered as {result}"));
        } else if result["ok"] == true {
            ledger.acked(*id, *attempt, round);
        } else {
            let code = result["code"].as_str().unwrap_or("no_code").to_owned();
            *ledger.ack_refused.entry(code).or_default() += 1;
        }
    }
}

impl Ledger {
    fn acked(&mut self, id: u64, attempt: u64, round: usize) {
        self.acked_ok.entry(id).or_default().push((attempt, round));
    }

    fn deliveries_of(&self, id: u64) -> String {
        let deliveries: Vec<String> = self
            .deliveries
            .get(&id)
            .into_iter()
            .flatten()
            .map(|(attempt, payload, round)| {
                format!("attempt {attempt} in round {round} carried {payload}")
            })
            .collect();
        format!("delivered: [{}]", deliveries.join(", "))
    }

    /// An ack that did not come back 200 or with a refusal code.
    fn ack_outcome(&mut self, id: u64, outcome: Outcome) {
        match outcome {
            Outcome::NotSent => *self.ack_refused.entry("not_sent".to_owned()).or_default() += 1,
            Outcome::Unknown(_) => self.ack_unknown += 1,
            Outcome::Reply(status, answer) => self
                .anomalies
                .push(format!("ack of {id} answered {status} {answer}")),
        }
    }
}

/// What one HTTP exchange came to.
enum Outcome {
    /// The connection was refused: the request never reached keel.
    NotSent,
    /// Sent, but no whole response came back: it may or may not have taken effect.
    Unknown(String),
    /// A whole response: status and JSON body (`null` when empty).
    Reply(u16, Value),
}

/// One `Connection: close` exchange that never panics on a dying server.
fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> Outcome {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return Outcome::NotSent;
    };
    let _ = stream.set_read_timeout(Some(DEADLINE));
    let _ = stream.set_write_timeout(Some(DEADLINE));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if let Err(error) = stream.write_all(request.as_bytes()) {
        return Outcome::Unknown(format!("write: {error}"));
    }
    let mut raw = Vec::new();
    // On an error `raw` keeps what arrived: a reset after the whole answer still counts.
    let read_error = stream.read_to_end(&mut raw).err();
    match whole_reply(&raw) {
        Some((status, body)) => Outcome::Reply(status, body),
        None => Outcome::Unknown(match read_error {
            Some(error) => format!("read: {error}"),
            None => format!("incomplete response: {:?}", String::from_utf8_lossy(&raw)),
        }),
    }
}

/// The status and JSON body of `raw` if it holds a whole response, else `None`.
fn whole_reply(raw: &[u8]) -> Option<(u16, Value)> {
    raw.windows(4).position(|window| window == b"\r\n\r\n")?;
    let reply = std::panic::catch_unwind(|| parse_reply(raw)).ok()?;
    if let Some(length) = reply.header("content-length")
        && length.parse::<usize>().ok()? != reply.raw_body.len()
    {
        return None;
    }
    let body = if reply.raw_body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&reply.raw_body).ok()?
    };
    Some((reply.status, body))
}

/// A `call` to the keel that is not being killed: anything but a reply is a failure.
fn expect_reply(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    match call(addr, method, path, body) {
        Outcome::Reply(status, body) => (status, body),
        Outcome::NotSent => panic!("{method} {path}: connection refused"),
        Outcome::Unknown(why) => panic!("{method} {path}: {why}"),
    }
}

/// The `crash` entry of `GET /v1/queues`.
fn queue_counts(addr: SocketAddr) -> Value {
    let (status, mut answer) = expect_reply(addr, "GET", "/v1/queues", "");
    assert_eq!(status, 200, "GET /v1/queues: {answer}");
    match answer["queues"].take() {
        Value::Array(queues) => queues
            .into_iter()
            .find(|queue| queue["queue"] == QUEUE)
            .unwrap_or_else(|| panic!("no {QUEUE:?} queue in GET /v1/queues")),
        other => panic!("GET /v1/queues: {other}"),
    }
}

/// Jobs not yet finished one way or the other.
fn pending(counts: &Value) -> u64 {
    ["waiting", "active", "delayed", "failed"]
        .iter()
        .map(|state| counts[state].as_u64().unwrap_or(0))
        .sum()
}

/// Every completed job of the queue, by id, from the paged listing.
fn list_completed(addr: SocketAddr) -> HashMap<u64, Value> {
    let mut jobs = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => {
                format!("/v1/queues/{QUEUE}/jobs?state=completed&limit=1000&cursor={cursor}")
            }
            None => format!("/v1/queues/{QUEUE}/jobs?state=completed&limit=1000"),
        };
        let (status, mut page) = expect_reply(addr, "GET", &path, "");
        assert_eq!(status, 200, "GET {path}: {page}");
        let Value::Array(listed) = page["jobs"].take() else {
            panic!("GET {path}: {page}");
        };
        for job in listed {
            let id = job["id"].as_u64().expect("job id");
            assert!(
                jobs.insert(id, job).is_none(),
                "job {id} listed twice as completed"
            );
        }
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return jobs,
        }
    }
}

/// A job as `GET /v1/jobs/{id}` showed it, or the status it answered.
type Fetched = Result<Value, u16>;

/// `GET /v1/jobs/{id}` for every id, on a few threads.
fn fetch_jobs(addr: SocketAddr, ids: Vec<u64>) -> HashMap<u64, Fetched> {
    let chunk = ids.len().div_ceil(WORKERS).max(1);
    let fetchers: Vec<JoinHandle<Vec<(u64, Fetched)>>> = ids
        .chunks(chunk)
        .map(|ids| {
            let ids = ids.to_vec();
            std::thread::spawn(move || {
                ids.into_iter()
                    .map(|id| {
                        let (status, job) =
                            expect_reply(addr, "GET", &format!("/v1/jobs/{id}"), "");
                        (id, if status == 200 { Ok(job) } else { Err(status) })
                    })
                    .collect()
            })
        })
        .collect();
    fetchers
        .into_iter()
        .flat_map(|fetcher| fetcher.join().expect("fetch thread"))
        .collect()
}

/// 150 to 600 ms, different every round.
fn kill_delay() -> Duration {
    let mut hasher = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    hasher.write_u128(nanos);
    Duration::from_millis(150 + hasher.finish() % 451)
}

/// Payloads as JSON, for messages.
fn join(payloads: &[&Value]) -> String {
    let shown: Vec<String> = payloads.iter().map(|payload| payload.to_string()).collect();
    shown.join(" and ")
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
