//! Scaled out for real: several `keel serve` processes on loopback sharing one PostgreSQL
//! (the queue) and one Redis (the cache's L2 and the shared rate limits), as PRODUCT.md's
//! "Scaled out" promises: each job runs once across nodes, a cron tick fires once, an
//! invalidation on one node evicts L1 on all, a global limit holds across nodes, and
//! outages of either server lose nothing that was acknowledged.
//!
//! Needs `KEEL_TEST_POSTGRES_URL` and `KEEL_TEST_REDIS_URL` (scripts/test sets both);
//! without them the tests say they are skipped, or fail under `KEEL_REQUIRE_EXTERNAL=1`.
//! Each test has its own PostgreSQL schema (dropped at the end) and its own Redis key
//! prefix (only those keys are deleted); the shared servers are never stopped, and the
//! outages are cuts of TCP proxies the test runs between the nodes and the servers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::queue::{TestSchema, postgres_url};
use crate::scaled::{Cleanup, Proxy, eventually, redis_url, split_url, unique_prefix, value};
use crate::support::{
    DEADLINE, Keel, POSTGRES_UP, Reply, TestServer, base_config, get, metric, parse_reply, request,
    scratch,
};

/// Both servers' URLs, or `None` (skipped) when either is not configured.
fn externals() -> Option<(String, String)> {
    let postgres = postgres_url();
    let redis = redis_url();
    Some((postgres?, redis?))
}

fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
    request(addr, "POST", path, &body.to_string())
}

/// `url` (postgres://user@host:port/db) with its host and port replaced by `addr`.
fn postgres_via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let user = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"))
        .unwrap_or_default();
    format!("{scheme}://{user}{addr}/{path}")
}

/// A node's configuration: the queue in `schema` on `postgres`, the cache's L2 and the
/// shared limits on `redis` under `prefix`, plus `extra` TOML.
fn node_config(
    dir: &std::path::Path,
    postgres: &str,
    schema: &TestSchema,
    redis: &str,
    prefix: &str,
    extra: &str,
) -> String {
    base_config(dir)
        + &format!(
            "[queue]\nbackend = \"postgres\"\nurl = {postgres:?}\nschema = {:?}\npool_size = 8\n\
             [cache]\nl2 = {redis:?}\nredis_prefix = \"{prefix}c:\"\n{extra}\
             [ratelimit]\nshared = {redis:?}\nredis_prefix = \"{prefix}rl:\"\n",
            schema.name
        )
}

/// One HTTP/1.1 exchange that cannot hang: connecting, sending and reading are all
/// bounded by `limit` in total. `Err` says what happened instead of an answer; a 503
/// is an answer.
fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    limit: Duration,
) -> Result<Reply, String> {
    let started = Instant::now();
    let left = || {
        limit
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1))
    };
    let mut stream =
        TcpStream::connect_timeout(&addr, limit).map_err(|error| format!("connect: {error}"))?;
    stream.set_write_timeout(Some(left())).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .map_err(|error| format!("send: {error}"))?;
    let mut raw = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        stream.set_read_timeout(Some(left())).unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buffer[..n]),
            Err(error) => return Err(format!("no answer after {:?}: {error}", started.elapsed())),
        }
        if started.elapsed() > limit {
            return Err(format!("no whole answer within {limit:?}"));
        }
    }
    if !raw.windows(4).any(|window| window == b"\r\n\r\n") {
        return Err(format!(
            "closed without an answer after {:?}",
            started.elapsed()
        ));
    }
    Ok(parse_reply(&raw))
}

/// The ids of the jobs in `state` in `queue`, all pages.
fn job_ids(addr: SocketAddr, queue: &str, state: &str) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = get(
            addr,
            &format!("/v1/queues/{queue}/jobs?state={state}&limit=1000{cursor}"),
        );
        assert_eq!(page.status, 200, "{}", page.body);
        let page = page.json();
        ids.extend(
            page["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|job| job["id"].as_u64().unwrap()),
        );
        match page["cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return ids,
        }
    }
}

/// The ticks in a node's "schedule fired" log lines.
fn fired_ticks(keel: &Keel) -> Vec<u64> {
    keel.log_text()
        .lines()
        .filter(|line| line.contains("schedule fired"))
        .filter_map(|line| {
            let at = line.find(" tick=")? + " tick=".len();
            let digits: String = line[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

const JOBS: usize = 30_000;
const ENQUEUE_BATCH: usize = 250;

/// Three nodes, one PostgreSQL, one Redis: 30,000 jobs enqueued across the nodes and
/// worked by REST workers on all three, each completed exactly once and delivered once;
/// meanwhile a cron schedule every second fires each tick once across the nodes. Then
/// an invalidation on one node is seen by reads on the other two within 100 ms, and a
/// global gateway limit holds within 10 % across the three.
#[test]
fn three_nodes_share_jobs_ticks_invalidations_and_limits() {
    let Some((postgres, redis)) = externals() else {
        return;
    };
    let schema = TestSchema::new(&postgres);
    let prefix = unique_prefix();
    let _cleanup = Cleanup(redis.clone(), prefix.clone());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let upstream = TestServer::start(axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { "ok" }
    }));
    // Long, so only the invalidation messages can explain an eviction from L1.
    let extra = format!(
        "l1_max_age = \"10m\"\n\
         [listeners.gateway]\nbind = \"127.0.0.1:0\"\n\
         [gateway.upstreams.app]\nservers = [\"{}\"]\n\
         [[gateway.routes]]\nname = \"limited\"\npath_prefix = \"/\"\nupstream = \"app\"\n\
         rate_limit = {{ key = \"global\", rate = \"50/s\", burst = 50 }}\n",
        upstream.addr
    );
    let dirs = [scratch(), scratch(), scratch()];
    let nodes: Vec<(Keel, SocketAddr)> = dirs
        .iter()
        .map(|dir| {
            let config = node_config(dir.path(), &postgres, &schema, &redis, &prefix, &extra);
            Keel::start(dir.path(), &config)
        })
        .collect();
    let apis: Vec<SocketAddr> = nodes.iter().map(|(_, api)| *api).collect();
    for &api in &apis {
        // Subscribing clears L1; wait for it so that clear cannot pass for an invalidation.
        eventually(DEADLINE, "subscribed to invalidations", || {
            get(api, "/metrics").body.lines().any(|line| {
                line.starts_with("keel_cache_remote_invalidations_total ") && !line.ends_with(" 0")
            })
        });
    }
    let started = Instant::now();

    // --- cron: every second, on all three nodes, fired once per tick ------------------
    let schedule = post(
        apis[0],
        "/v1/schedules",
        json!({"name": "every-second", "queue": "cron", "cron": "* * * * * *", "catch_up": "all"}),
    );
    assert!(
        schedule.status == 200 || schedule.status == 201,
        "{}",
        schedule.body
    );

    // --- 30,000 jobs: enqueued on all three, worked on all three ----------------------
    let acked = Arc::new(AtomicUsize::new(0));
    let enqueuers: Vec<_> = apis
        .iter()
        .enumerate()
        .map(|(node, &api)| {
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                let per_node = JOBS / 3;
                for first in (0..per_node).step_by(ENQUEUE_BATCH) {
                    let batch: Vec<Value> = (first..(first + ENQUEUE_BATCH).min(per_node))
                        .map(|n| json!({"name": "work", "payload": {"node": node, "n": n}}))
                        .collect();
                    let reply = post(api, "/v1/queues/work/jobs", Value::Array(batch));
                    assert_eq!(reply.status, 201, "{}", reply.body);
                    ids.extend(
                        reply.json()["jobs"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|job| job["id"].as_u64().unwrap()),
                    );
                }
                ids
            })
        })
        .collect();
    let workers: Vec<_> = (0..12)
        .map(|index| {
            let api = apis[index % 3];
            let acked = acked.clone();
            std::thread::spawn(move || {
                let (mut delivered, mut completed) = (Vec::new(), Vec::new());
                let deadline = Instant::now() + Duration::from_secs(180);
                while acked.load(Ordering::SeqCst) < JOBS {
                    assert!(Instant::now() < deadline, "workers not done in time");
                    let reserved = post(
                        api,
                        "/v1/queues/work/reserve",
                        json!({"max": 32, "lease": "60s", "wait": "1s"}),
                    );
                    assert_eq!(reserved.status, 200, "{}", reserved.body);
                    let jobs = reserved.json()["jobs"].as_array().unwrap().clone();
                    if jobs.is_empty() {
                        continue;
                    }
                    let acks: Vec<Value> = jobs
                        .iter()
                        .map(|job| {
                            delivered.push(job["id"].as_u64().unwrap());
                            json!({"id": job["id"], "lease_token": job["lease_token"], "result": null})
                        })
                        .collect();
                    let answer = post(api, "/v1/jobs/ack", json!({ "jobs": acks }));
                    assert_eq!(answer.status, 200, "{}", answer.body);
                    for result in answer.json()["results"].as_array().unwrap() {
                        assert_eq!(result["ok"], true, "{result}");
                        completed.push(result["id"].as_u64().unwrap());
                    }
                    acked.fetch_add(jobs.len(), Ordering::SeqCst);
                }
                (delivered, completed)
            })
        })
        .collect();
    let enqueued: Vec<u64> = enqueuers
        .into_iter()
        .flat_map(|enqueuer| enqueuer.join().unwrap())
        .collect();
    let (mut delivered, mut completed) = (Vec::new(), Vec::new());
    for worker in workers {
        let (one_delivered, one_completed) = worker.join().unwrap();
        delivered.extend(one_delivered);
        completed.extend(one_completed);
    }
    let jobs_took = started.elapsed();
    let enqueued_set: HashSet<u64> = enqueued.iter().copied().collect();
    assert_eq!(enqueued.len(), JOBS);
    assert_eq!(enqueued_set.len(), JOBS, "every enqueue got its own id");
    let duplicate_deliveries = delivered.len() - delivered.iter().collect::<HashSet<_>>().len();
    let duplicate_completions = completed.len() - completed.iter().collect::<HashSet<_>>().len();
    eprintln!(
        "three nodes: {JOBS} jobs enqueued and acked in {jobs_took:.1?}; \
         {duplicate_deliveries} duplicate deliveries, {duplicate_completions} duplicate completions"
    );
    assert_eq!(
        duplicate_deliveries, 0,
        "no crash, so no job is delivered twice"
    );
    assert_eq!(duplicate_completions, 0);
    assert_eq!(
        completed.iter().copied().collect::<HashSet<u64>>(),
        enqueued_set,
        "every job completed"
    );
    let stats = get(apis[2], "/v1/queues").json();
    let work = stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|queue| queue["queue"] == "work")
        .cloned()
        .unwrap();
    assert_eq!(work["completed"], JOBS, "{work}");

    // The cron ran meanwhile (and for at least 3 s): stop it, then count.
    eventually(DEADLINE, "3 ticks fired", || {
        job_ids(apis[1], "cron", "waiting").len() >= 3
    });
    let deleted = request(apis[1], "DELETE", "/v1/schedules/every-second", "");
    assert!(deleted.status < 300, "{}", deleted.body);
    let mut per_tick: BTreeMap<u64, usize> = BTreeMap::new();
    eventually(DEADLINE, "every fired tick logged", || {
        per_tick.clear();
        for (keel, _) in &nodes {
            for tick in fired_ticks(keel) {
                *per_tick.entry(tick).or_default() += 1;
            }
        }
        per_tick.values().sum::<usize>() == job_ids(apis[1], "cron", "waiting").len()
    });
    let by_node: Vec<usize> = nodes
        .iter()
        .map(|(keel, _)| fired_ticks(keel).len())
        .collect();
    eprintln!(
        "three nodes: {} cron ticks fired (by node: {by_node:?})",
        per_tick.len()
    );
    assert!(per_tick.len() >= 3, "{per_tick:?}");
    assert!(
        per_tick.values().all(|&count| count == 1),
        "each tick fires once across the nodes: {per_tick:?}"
    );
    let ticks: Vec<u64> = per_tick.keys().copied().collect();
    assert!(
        ticks.windows(2).all(|pair| pair[1] - pair[0] == 1000),
        "no tick skipped (catch_up = all): {ticks:?}"
    );

    // --- an invalidation on A reaches B's and C's L1 within 100 ms --------------------
    for (key, tags) in [("k:1", ""), ("p:1", ""), ("t:1", "?tags=red")] {
        let put = request(apis[0], "PUT", &format!("/v1/cache/{key}{tags}"), "v");
        assert_eq!(put.status, 204, "{}", put.body);
        for &api in &apis[1..] {
            eventually(DEADLINE, "B and C read A's PUT", || {
                value(api, key).is_some()
            });
        }
    }
    for (body, key) in [
        (r#"{"keys":["k:1"]}"#, "k:1"),
        (r#"{"pattern":"p:*"}"#, "p:1"),
        (r#"{"tags":["red"]}"#, "t:1"),
    ] {
        let invalidated = request(apis[0], "POST", "/v1/cache/invalidate", body);
        assert_eq!(invalidated.status, 200, "{}", invalidated.body);
        let answered = Instant::now();
        eventually(Duration::from_millis(100), body, || {
            value(apis[1], key).is_none() && value(apis[2], key).is_none()
        });
        eprintln!(
            "three nodes: {body} seen on B and C after {:?}",
            answered.elapsed()
        );
    }

    // --- 50/s (burst 50) keyed globally holds across the three gateways ---------------
    let gateways: Vec<SocketAddr> = nodes.iter().map(|(keel, _)| keel.gateway_addr()).collect();
    let (admitted, elapsed, statuses) =
        crate::scaled::hammer_gateways(&gateways, 6, Duration::from_secs(2));
    let expected = 50.0 + 50.0 * elapsed;
    eprintln!(
        "three nodes: global limit admitted {admitted} in {elapsed:.2} s (expected {expected:.0})"
    );
    assert!(
        statuses.contains(&429),
        "the limit was reached: {statuses:?}"
    );
    assert!(
        (admitted - expected).abs() <= expected * 0.1,
        "admitted {admitted}, expected {expected:.0} ± 10 %"
    );
    assert_eq!(hits.load(Ordering::SeqCst) as f64, admitted);
    eprintln!("three nodes: whole test {:.1?}", started.elapsed());
}

/// How long each outage lasts: 3 s in the suite; `KEEL_SCALEOUT_OUTAGE_SECS=10`
/// (`scripts/bench scaleout` sets it) runs the 10 s version.
fn outage() -> Duration {
    let seconds = std::env::var("KEEL_SCALEOUT_OUTAGE_SECS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(3);
    Duration::from_secs(seconds)
}

/// Every client request's limit: an answer (a 503 is one) must come within it.
const CLIENT_LIMIT: Duration = Duration::from_secs(15);
/// The lease workers take: short, so jobs whose ack an outage refused come back soon.
const LEASE: &str = "3s";

/// What the load saw, shared by its threads.
#[derive(Default)]
struct Observed {
    /// Enqueued jobs answered 2xx.
    enqueued: Vec<u64>,
    /// Every delivery of a job to a worker, in order (a job may be delivered again
    /// after its lease expired).
    delivered: Vec<(u64, Instant)>,
    /// Jobs whose ack answered ok, with when.
    completed: Vec<(u64, Instant)>,
    /// Cache writes answered 204: key, value, node, when.
    written: Vec<(String, String, usize, Instant)>,
    /// Cache writes refused (503): node, when.
    refused_writes: Vec<(usize, Instant)>,
    /// Requests that got no answer within `CLIENT_LIMIT` (or none at all).
    hung: Vec<String>,
    /// Answers by status, per kind of request.
    statuses: BTreeMap<(&'static str, u16), usize>,
}

impl Observed {
    fn answer(
        shared: &Mutex<Observed>,
        kind: &'static str,
        result: Result<Reply, String>,
    ) -> Option<Reply> {
        let mut observed = shared.lock().unwrap();
        match result {
            Ok(reply) => {
                *observed.statuses.entry((kind, reply.status)).or_default() += 1;
                Some(reply)
            }
            Err(error) => {
                observed.hung.push(format!("{kind}: {error}"));
                None
            }
        }
    }
}

/// Under a light steady load (enqueues, workers, cache writes and reads on two nodes),
/// Redis and then PostgreSQL are cut for `outage()` each. Nothing acknowledged is lost:
/// every job whose enqueue answered 2xx is completed exactly once (delivered again only
/// if its lease expired during the outage); every cache write answered 204 is readable
/// on both nodes afterwards, without exception; no request goes unanswered; both
/// recover within 5 s of the restore.
#[test]
fn outages_of_redis_and_postgres_lose_nothing_acknowledged() {
    let Some((postgres, redis)) = externals() else {
        return;
    };
    let schema = TestSchema::new(&postgres);
    let prefix = unique_prefix();
    let _cleanup = Cleanup(redis.clone(), prefix.clone());
    let (redis_target, db) = split_url(&redis);
    let redis_proxy = Proxy::start(redis_target);
    let postgres_target = {
        let (_, rest) = postgres.split_once("://").unwrap();
        let authority = rest.split('/').next().unwrap();
        authority.rsplit('@').next().unwrap().to_owned()
    };
    let postgres_proxy = Proxy::start(postgres_target);
    let redis_via = format!("redis://{}{db}", redis_proxy.addr);
    let postgres_via = postgres_via(&postgres, postgres_proxy.addr);
    let dirs = [scratch(), scratch()];
    let nodes: Vec<(Keel, SocketAddr)> = dirs
        .iter()
        .map(|dir| {
            let config = node_config(dir.path(), &postgres_via, &schema, &redis_via, &prefix, "");
            Keel::start(dir.path(), &config)
        })
        .collect();
    let apis: Vec<SocketAddr> = nodes.iter().map(|(_, api)| *api).collect();
    for &api in &apis {
        eventually(DEADLINE, "ready", || get(api, "/readyz").status == 200);
    }

    let observed = Arc::new(Mutex::new(Observed::default()));
    // Producers (enqueues, cache writes) stop first; workers once every job is done.
    let producing = Arc::new(AtomicBool::new(true));
    let running = Arc::new(AtomicBool::new(true));
    let mut load = Vec::new();
    // Enqueuer: 5 jobs every 20 ms, alternating nodes.
    {
        let (observed, running, apis) = (observed.clone(), producing.clone(), apis.clone());
        load.push(std::thread::spawn(move || {
            let mut round = 0usize;
            while running.load(Ordering::SeqCst) {
                let batch: Vec<Value> = (0..5)
                    .map(|n| json!({"payload": {"round": round, "n": n}, "attempts": 20}))
                    .collect();
                let body = Value::Array(batch).to_string();
                let result = exchange(
                    apis[round % 2],
                    "POST",
                    "/v1/queues/steady/jobs",
                    &body,
                    CLIENT_LIMIT,
                );
                if let Some(reply) = Observed::answer(&observed, "enqueue", result)
                    && reply.status == 201
                {
                    let ids = reply.json()["jobs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|job| job["id"].as_u64().unwrap())
                        .collect::<Vec<_>>();
                    observed.lock().unwrap().enqueued.extend(ids);
                }
                round += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    // Workers: one per node, reserve up to 32, batch ack; an ack refused is retried
    // until its lease has run out (then the job comes back to a worker).
    for &api in &apis {
        let (observed, running) = (observed.clone(), running.clone());
        load.push(std::thread::spawn(move || {
            while running.load(Ordering::SeqCst) {
                let result = exchange(
                    api,
                    "POST",
                    "/v1/queues/steady/reserve",
                    &json!({"max": 32, "lease": LEASE, "wait": "1s"}).to_string(),
                    CLIENT_LIMIT,
                );
                let Some(reply) = Observed::answer(&observed, "reserve", result) else {
                    continue;
                };
                if reply.status != 200 {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                let reserved_at = Instant::now();
                let jobs = reply.json()["jobs"].as_array().unwrap().clone();
                if jobs.is_empty() {
                    continue;
                }
                let mut pending: Vec<Value> = jobs
                    .iter()
                    .map(|job| json!({"id": job["id"], "lease_token": job["lease_token"]}))
                    .collect();
                observed.lock().unwrap().delivered.extend(
                    jobs.iter()
                        .map(|job| (job["id"].as_u64().unwrap(), reserved_at)),
                );
                while !pending.is_empty()
                    && reserved_at.elapsed() < Duration::from_secs(3)
                    && running.load(Ordering::SeqCst)
                {
                    let result = exchange(
                        api,
                        "POST",
                        "/v1/jobs/ack",
                        &json!({ "jobs": pending }).to_string(),
                        CLIENT_LIMIT,
                    );
                    let Some(reply) = Observed::answer(&observed, "ack", result) else {
                        continue;
                    };
                    if reply.status != 200 {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    let now = Instant::now();
                    let mut observed = observed.lock().unwrap();
                    for result in reply.json()["results"].as_array().unwrap() {
                        if result["ok"] == true {
                            observed
                                .completed
                                .push((result["id"].as_u64().unwrap(), now));
                        }
                    }
                    pending.clear(); // ok, or lease_lost: either way not ours any more
                }
            }
        }));
    }
    // Cache: a new key every 10 ms written on one node, the previous one read on the other.
    {
        let (observed, running, apis) = (observed.clone(), producing.clone(), apis.clone());
        load.push(std::thread::spawn(move || {
            let mut n = 0usize;
            while running.load(Ordering::SeqCst) {
                let (key, content) = (format!("w:{n}"), format!("v{n}"));
                let result = exchange(
                    apis[n % 2],
                    "PUT",
                    &format!("/v1/cache/{key}"),
                    &content,
                    CLIENT_LIMIT,
                );
                if let Some(reply) = Observed::answer(&observed, "cache write", result) {
                    let mut observed = observed.lock().unwrap();
                    match reply.status {
                        204 => observed.written.push((key, content, n % 2, Instant::now())),
                        503 => observed.refused_writes.push((n % 2, Instant::now())),
                        _ => {}
                    }
                }
                if n > 0 {
                    let result = exchange(
                        apis[(n + 1) % 2],
                        "GET",
                        &format!("/v1/cache/w:{}", n - 1),
                        "",
                        CLIENT_LIMIT,
                    );
                    Observed::answer(&observed, "cache read", result);
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }

    let started = Instant::now();
    eventually(DEADLINE, "the load runs", || {
        let observed = observed.lock().unwrap();
        observed.completed.len() >= 50 && observed.written.len() >= 50
    });

    // --- Redis away --------------------------------------------------------------------
    let redis_cut = Instant::now();
    redis_proxy.set_up(false);
    pause(outage());
    redis_proxy.set_up(true);
    let redis_restored = Instant::now();
    eventually(
        Duration::from_secs(5),
        "cache writes again on both nodes",
        || {
            apis.iter().all(|&api| {
                exchange(api, "PUT", "/v1/cache/probe", "p", CLIENT_LIMIT)
                    .is_ok_and(|reply| reply.status == 204)
            })
        },
    );
    let redis_recovery = redis_restored.elapsed();

    // --- PostgreSQL away ---------------------------------------------------------------
    let postgres_cut = Instant::now();
    postgres_proxy.set_up(false);
    // Each node names PostgreSQL degraded in /readyz, which stays 200 (the node still
    // serves its cache and gateway), and its gauge drops to 0.
    eventually(outage(), "postgres degraded on both nodes", || {
        apis.iter()
            .all(|&api| postgres_state(api) == "degraded" && metric(api, POSTGRES_UP) == Some(0.0))
    });
    pause(outage().saturating_sub(postgres_cut.elapsed()));
    postgres_proxy.set_up(true);
    let postgres_restored = Instant::now();
    eventually(
        Duration::from_secs(5),
        "enqueue and reserve again on both nodes",
        || {
            apis.iter().all(|&api| {
                let enqueued = exchange(api, "POST", "/v1/queues/probe/jobs", "{}", CLIENT_LIMIT)
                    .is_ok_and(|reply| reply.status == 201);
                enqueued
                    && exchange(
                        api,
                        "POST",
                        "/v1/queues/probe/reserve",
                        r#"{"max": 1}"#,
                        CLIENT_LIMIT,
                    )
                    .is_ok_and(|reply| reply.status == 200)
            })
        },
    );
    let postgres_recovery = postgres_restored.elapsed();
    for &api in &apis {
        assert_eq!(postgres_state(api), "ready");
        assert_eq!(metric(api, POSTGRES_UP), Some(1.0));
    }

    // A little more steady load after both, then stop enqueuing and let workers finish.
    pause(Duration::from_secs(1));
    producing.store(false, Ordering::SeqCst);
    let producers = [load.remove(0), load.pop().unwrap()];
    for thread in producers {
        thread.join().unwrap();
    }
    let enqueued: HashSet<u64> = {
        let observed = observed.lock().unwrap();
        observed.enqueued.iter().copied().collect()
    };
    // On the server: an ack whose answer an outage lost may have committed anyway.
    eventually(
        Duration::from_secs(30),
        "every acknowledged job completed",
        || {
            let completed: HashSet<u64> = job_ids(apis[0], "steady", "completed")
                .into_iter()
                .collect();
            enqueued.is_subset(&completed) || {
                pause(Duration::from_millis(100));
                false
            }
        },
    );
    running.store(false, Ordering::SeqCst);
    for thread in load {
        thread.join().unwrap();
    }
    let observed = Arc::try_unwrap(observed)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap();

    // Jobs: everything acknowledged completed, each once (on the server too).
    let mut completions: HashMap<u64, usize> = HashMap::new();
    for (id, _) in &observed.completed {
        *completions.entry(*id).or_default() += 1;
    }
    let twice: Vec<_> = completions.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "jobs completed twice: {twice:?}");
    let on_server: HashSet<u64> = job_ids(apis[0], "steady", "completed")
        .into_iter()
        .collect();
    let missing: Vec<_> = observed
        .enqueued
        .iter()
        .filter(|id| !on_server.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged jobs not completed: {missing:?}"
    );
    let mut deliveries: HashMap<u64, usize> = HashMap::new();
    for (id, _) in &observed.delivered {
        *deliveries.entry(*id).or_default() += 1;
    }
    let redelivered = deliveries.values().filter(|&&n| n > 1).count();
    // A job is delivered again only when its lease expired, and a lease only expires
    // here when an outage refused its ack: never after its ack was answered ok.
    let completed_at: HashMap<u64, Instant> = observed.completed.iter().copied().collect();
    let after_ack: Vec<_> = observed
        .delivered
        .iter()
        .filter(|(id, at)| completed_at.get(id).is_some_and(|done| done < at))
        .collect();
    assert!(
        after_ack.is_empty(),
        "delivered after an ok ack: {after_ack:?}"
    );

    // Cache: every write answered 204 reads back on both nodes, with no exception. With
    // Redis as L2 a write is answered only once Redis stored it, so those the cut caught
    // were answered 503 and none acknowledged is lost (docs/cache.md, "When Redis goes
    // away"). Each node has its own breaker.
    let first_refusal: Vec<Duration> = (0..2)
        .map(|node| {
            observed
                .refused_writes
                .iter()
                .find(|(by, at)| *by == node && *at >= redis_cut)
                .expect("writes were refused on each node during the Redis cut")
                .1
                .duration_since(redis_cut)
        })
        .collect();
    let mut lost = Vec::new();
    for chunk in observed.written.chunks(500) {
        let keys: Vec<&str> = chunk.iter().map(|(key, _, _, _)| key.as_str()).collect();
        for &api in &apis {
            let reply = post(
                api,
                "/v1/cache/mget",
                json!({"keys": keys, "encoding": "utf8"}),
            );
            assert_eq!(reply.status, 200, "{}", reply.body);
            let values = reply.json()["values"].as_array().unwrap().clone();
            for ((key, content, node, at), read) in chunk.iter().zip(values) {
                if read.as_str() == Some(content.as_str()) {
                    continue;
                }
                let since_cut = if *at >= redis_cut {
                    format!("{:?} after", at.duration_since(redis_cut))
                } else {
                    format!("{:?} before", redis_cut.duration_since(*at))
                };
                lost.push(format!(
                    "{key} (answered 204 on node {node} {since_cut} the cut, {:?} after \
                     the restore) read on {api}: {read}",
                    at.checked_duration_since(redis_restored),
                ));
            }
        }
    }

    eprintln!(
        "outages of {:?} each, whole test {:.1?}: {} jobs enqueued (2xx), {} completed, \
         {} delivered more than once (lease expired during an outage); {} cache writes \
         answered 204, {} of them lost; {} refused with 503, the first {:?} after the \
         Redis cut on each node; recovery after restore: Redis {:.0?}, PostgreSQL {:.0?}; \
         answers {:?}; hung requests {}",
        outage(),
        started.elapsed(),
        observed.enqueued.len(),
        completions.len(),
        redelivered,
        observed.written.len(),
        lost.len(),
        observed.refused_writes.len(),
        first_refusal,
        redis_recovery,
        postgres_recovery,
        observed.statuses,
        observed.hung.len(),
    );
    // A connection closed without an answer is usually a handler that panicked: show
    // the nodes' own account of it next to the requests that hit it.
    let panics: Vec<String> = nodes
        .iter()
        .flat_map(|(keel, _)| {
            keel.log_text()
                .lines()
                .filter(|line| line.contains("panicked"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        observed.hung.is_empty(),
        "requests without an answer: {:?}; panics in the nodes' logs: {panics:?}",
        observed.hung
    );
    assert!(lost.is_empty(), "acknowledged cache writes lost: {lost:?}");
    // While PostgreSQL is away a worker's reserve gets no jobs, not an error; only
    // enqueues and acks, which must not pretend, are refused.
    let reserve_errors: Vec<_> = observed
        .statuses
        .iter()
        .filter(|((kind, status), _)| *kind == "reserve" && *status != 200)
        .collect();
    assert!(
        reserve_errors.is_empty(),
        "reserve answered other than 200 with its jobs or none: {reserve_errors:?}"
    );
    assert!(
        observed
            .statuses
            .iter()
            .any(|((kind, status), _)| *kind == "enqueue" && *status == 503),
        "enqueues were refused during the PostgreSQL cut: {:?}",
        observed.statuses
    );
}

/// PostgreSQL's state in a node's `/readyz`, which must answer 200 whatever it is.
fn postgres_state(api: SocketAddr) -> String {
    let ready = exchange(api, "GET", "/readyz", "", CLIENT_LIMIT).expect("/readyz answers");
    assert_eq!(ready.status, 200, "{}", ready.body);
    ready.json()["dependencies"]["postgres"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Lets the load run on for `duration` (the outage itself, not synchronisation).
fn pause(duration: Duration) {
    std::thread::sleep(duration);
}
