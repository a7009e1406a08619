//! The job queue over REST against a real keel (lifecycle, operations, bad input,
//! webhook processor, schedules), and with `queue.backend = "postgres"`. The store's
//! behaviour with a hand-moved clock (backoff, delays, leases, schedules across a
//! restart) is the conformance suite in `src/queue/conformance.rs`, run against every
//! backend.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{DEADLINE, Keel, TestServer, base_config, get, request, scratch};

// --- over REST, against a real keel -------------------------------------------------

fn post(addr: SocketAddr, path: &str, body: Value) -> crate::support::Reply {
    request(addr, "POST", path, &body.to_string())
}

#[test]
fn rest_lifecycle_paging_and_queue_operations() {
    let dir = scratch();
    let (_keel, addr) = Keel::start(dir.path(), &base_config(dir.path()));

    let one = post(
        addr,
        "/v1/queues/jobs.rest/jobs",
        json!({"name": "welcome", "payload": {"to": "a@b"}}),
    );
    assert_eq!(one.status, 201, "{}", one.body);
    let id = one.json()["id"].as_u64().unwrap();
    let many = post(
        addr,
        "/v1/queues/jobs.rest/jobs",
        json!([{"payload": 1}, {"payload": 2}, {"payload": 3}, {"payload": 4}]),
    );
    assert_eq!(many.status, 201);
    assert_eq!(many.json()["jobs"].as_array().unwrap().len(), 4);

    // Paging through waiting jobs, two at a time.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => {
                format!("/v1/queues/jobs.rest/jobs?state=waiting&limit=2&cursor={cursor}")
            }
            None => "/v1/queues/jobs.rest/jobs?state=waiting&limit=2".to_owned(),
        };
        let page = get(addr, &path).json();
        seen.extend(
            page["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|job| job["id"].as_u64().unwrap()),
        );
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    assert!(seen.windows(2).all(|pair| pair[0] < pair[1]));

    let reserved = post(
        addr,
        "/v1/queues/jobs.rest/reserve",
        json!({"max": 1, "lease": "30s"}),
    )
    .json();
    let job = &reserved["jobs"][0];
    assert_eq!(job["id"].as_u64(), Some(id));
    assert_eq!(job["payload"], json!({"to": "a@b"}));
    let token = job["lease_token"].as_str().unwrap().to_owned();
    let progress = post(
        addr,
        &format!("/v1/jobs/{id}/progress"),
        json!({"lease_token": token, "progress": {"pct": 40}}),
    );
    assert_eq!(progress.status, 200, "{}", progress.body);
    let beat = post(
        addr,
        &format!("/v1/jobs/{id}/heartbeat"),
        json!({"lease_token": token, "lease": "1m"}),
    );
    assert_eq!(beat.status, 200);
    let wrong = post(
        addr,
        &format!("/v1/jobs/{id}/ack"),
        json!({"lease_token": "not-it"}),
    );
    assert_eq!(wrong.status, 409);
    assert_eq!(wrong.json()["code"], "lease_lost");
    let acked = post(
        addr,
        &format!("/v1/jobs/{id}/ack"),
        json!({"lease_token": token, "result": {"sent": true}}),
    );
    assert_eq!(acked.status, 200, "{}", acked.body);
    let done = get(addr, &format!("/v1/jobs/{id}")).json();
    assert_eq!(done["state"], "completed");
    assert_eq!(done["result"], json!({"sent": true}));
    assert_eq!(done["progress"], json!({"pct": 40}));

    // Fail with attempts left: retried later.
    let reserved = post(addr, "/v1/queues/jobs.rest/reserve", json!({"max": 2})).json();
    let jobs = reserved["jobs"].as_array().unwrap().clone();
    let (a, b) = (&jobs[0], &jobs[1]);
    let failed = post(
        addr,
        &format!("/v1/jobs/{}/fail", a["id"]),
        json!({"lease_token": a["lease_token"], "error": "boom"}),
    )
    .json();
    assert_eq!(failed["state"], "failed");
    assert!(failed["run_at"].as_u64().is_some());
    let batch = post(
        addr,
        "/v1/jobs/ack",
        json!({"jobs": [
            {"id": b["id"], "lease_token": b["lease_token"]},
            {"id": b["id"], "lease_token": b["lease_token"]},
        ]}),
    )
    .json();
    assert_eq!(batch["results"][0]["ok"], true);
    assert_eq!(
        batch["results"][1]["ok"], false,
        "the second ack of one lease is refused"
    );
    assert_eq!(batch["results"][1]["code"], "lease_lost");

    // Pause: reserve gives nothing; resume: it does.
    assert_eq!(
        post(addr, "/v1/queues/jobs.rest/pause", json!({})).status,
        200
    );
    let paused = post(addr, "/v1/queues/jobs.rest/reserve", json!({"max": 5})).json();
    assert!(paused["jobs"].as_array().unwrap().is_empty());
    let stats = get(addr, "/v1/queues").json();
    assert_eq!(stats["queues"][0]["paused"], true);
    assert_eq!(stats["queues"][0]["waiting"], 2);
    assert_eq!(stats["queues"][0]["completed"], 2);
    assert_eq!(stats["queues"][0]["failed"], 1);
    assert_eq!(
        post(addr, "/v1/queues/jobs.rest/resume", json!({})).status,
        200
    );
    let resumed = post(addr, "/v1/queues/jobs.rest/reserve", json!({"max": 1})).json();
    let last = resumed["jobs"][0]["id"].as_u64().unwrap();

    // Delete one, drain the rest.
    assert_eq!(
        request(addr, "DELETE", &format!("/v1/jobs/{last}"), "").status,
        204
    );
    assert_eq!(get(addr, &format!("/v1/jobs/{last}")).status, 404);
    let drained = post(addr, "/v1/queues/jobs.rest/drain", json!({})).json();
    assert_eq!(drained["removed"], 2, "one waiting and one retrying job");
    let stats = get(addr, "/v1/queues").json();
    assert_eq!(stats["queues"][0]["waiting"], 0);
    assert_eq!(stats["queues"][0]["failed"], 0);
}

#[test]
fn rest_bad_input_is_refused_with_a_code_and_nothing_is_stored() {
    let dir = scratch();
    let config = base_config(dir.path()) + "[queue]\nmax_payload_bytes = \"1KiB\"\n";
    let (_keel, addr) = Keel::start(dir.path(), &config);
    let cases = [
        (
            "/v1/queues/bad%20name/jobs",
            json!({}),
            400,
            "bad_queue_name",
        ),
        (
            "/v1/queues/q/jobs",
            json!({"payload": "x".repeat(2000)}),
            413,
            "payload_too_large",
        ),
        ("/v1/queues/q/jobs", json!({"delay": -5}), 400, "bad_job"),
        (
            "/v1/queues/q/jobs",
            json!({"backoff": {"type": "linear"}}),
            400,
            "bad_job",
        ),
        (
            "/v1/queues/q/jobs",
            json!({"attempts": 0}),
            400,
            "bad_attempts",
        ),
        ("/v1/queues/q/jobs", json!({"color": "red"}), 400, "bad_job"),
        (
            "/v1/queues/q/jobs",
            json!([{}, {"delay": "soon"}]),
            400,
            "bad_job",
        ),
        (
            "/v1/queues/q/reserve",
            json!({"max": 0}),
            400,
            "bad_reserve",
        ),
        (
            "/v1/jobs/1/ack",
            json!({"lease_token": "x"}),
            404,
            "job_not_found",
        ),
        (
            "/v1/schedules",
            json!({"name": "s", "queue": "q", "cron": "every day"}),
            400,
            "bad_schedule",
        ),
        (
            "/v1/schedules",
            json!({"name": "s", "queue": "q", "cron": "0 0 2 * * *", "timezone": "Mars/Base"}),
            400,
            "bad_schedule",
        ),
    ];
    for (path, body, status, code) in cases {
        let reply = post(addr, path, body.clone());
        assert_eq!(reply.status, status, "{path} {body}: {}", reply.body);
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(reply.json()["code"], code, "{path} {body}");
    }
    let malformed = request(addr, "POST", "/v1/queues/q/jobs", "{\"name\":");
    assert_eq!(malformed.json()["code"], "bad_json");
    assert_eq!(get(addr, "/v1/jobs/abc").json()["code"], "bad_job_id");
    assert_eq!(
        get(addr, "/v1/queues/q/jobs?state=sleeping").json()["code"],
        "bad_state"
    );

    let stats = get(addr, "/v1/queues").json();
    assert_eq!(
        stats["queues"],
        json!([]),
        "a refused request stores nothing"
    );
    let schedules = get(addr, "/v1/schedules").json();
    assert!(
        schedules["schedules"]
            .as_array()
            .unwrap()
            .iter()
            .all(|schedule| schedule["name"] != "s"),
        "{schedules}"
    );
}

/// A webhook target: `/ok` answers 200, `/fail` 500, `/slow` after 5 s. Counts calls.
struct HookServer {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    _server: TestServer,
}

fn hook_server() -> HookServer {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = axum::Router::new().route(
        "/{kind}",
        axum::routing::post(
            move |axum::extract::Path(kind): axum::extract::Path<String>, body: String| {
                let calls = counter.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    match kind.as_str() {
                        "ok" => (axum::http::StatusCode::OK, format!("got {body}")),
                        "slow" => {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            (axum::http::StatusCode::OK, String::new())
                        }
                        _ => (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            "mailer on fire".to_owned(),
                        ),
                    }
                }
            },
        ),
    );
    let server = TestServer::start(app);
    HookServer {
        addr: server.addr,
        calls,
        _server: server,
    }
}

fn wait_for_state(addr: SocketAddr, id: u64, wanted: &str) -> Value {
    let started = Instant::now();
    loop {
        let job = get(addr, &format!("/v1/jobs/{id}")).json();
        if job["state"] == wanted {
            return job;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "job {id} never became {wanted}: {job}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn webhook_processor_acks_2xx_and_fails_errors_and_timeouts() {
    let hooks = hook_server();
    let dir = scratch();
    let mut config = base_config(dir.path());
    for kind in ["ok", "fail", "slow"] {
        config += &format!(
            "[queue.queues.hook_{kind}]\nprocessor = {{ webhook = {{ url = \"http://{}/{kind}\", timeout = \"300ms\" }} }}\n",
            hooks.addr
        );
    }
    let (_keel, addr) = Keel::start(dir.path(), &config);
    let enqueue = |kind: &str| {
        post(
            addr,
            &format!("/v1/queues/hook_{kind}/jobs"),
            json!({"payload": {"n": 7}, "attempts": 1}),
        )
        .json()["id"]
            .as_u64()
            .unwrap()
    };
    let (ok, fail, slow) = (enqueue("ok"), enqueue("fail"), enqueue("slow"));

    let done = wait_for_state(addr, ok, "completed");
    assert_eq!(done["result"]["status"], 200);
    assert_eq!(done["result"]["body"], "got {\"n\":7}");
    let dead = wait_for_state(addr, fail, "dead");
    let error = dead["last_error"].as_str().unwrap();
    assert!(
        error.contains("500") && error.contains("mailer on fire"),
        "{error}"
    );
    let timed_out = wait_for_state(addr, slow, "dead");
    assert!(
        timed_out["last_error"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{timed_out}"
    );
    assert_eq!(hooks.calls.load(Ordering::SeqCst), 3);
}

#[test]
fn schedules_over_rest_enqueue_on_their_ticks() {
    let dir = scratch();
    let (_keel, addr) = Keel::start(dir.path(), &base_config(dir.path()));
    let created = post(
        addr,
        "/v1/schedules",
        json!({"name": "tick", "queue": "ticks", "cron": "* * * * * *", "payload": {"k": 1}}),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let listed = get(addr, "/v1/schedules").json();
    assert!(
        listed["schedules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|schedule| schedule["name"] == "tick" && schedule["cron"] == "* * * * * *"),
        "{listed}"
    );

    let started = Instant::now();
    let job = loop {
        let reserved = post(
            addr,
            "/v1/queues/ticks/reserve",
            json!({"max": 1, "wait": "2s"}),
        )
        .json();
        if let Some(job) = reserved["jobs"]
            .as_array()
            .and_then(|jobs| jobs.first().cloned())
        {
            break job;
        }
        assert!(started.elapsed() < DEADLINE, "the schedule never fired");
    };
    assert_eq!(job["name"], "tick");
    assert_eq!(job["payload"], json!({"k": 1}));
    let listed = get(addr, "/v1/schedules").json();
    let next = listed["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|schedule| schedule["name"] == "tick")
        .and_then(|schedule| schedule["next_run_at"].as_u64())
        .expect("next_run_at");
    let now = keel::cache::now_ms();
    assert!(
        next > job["created_at"].as_u64().unwrap() && next <= now + 1_000,
        "every second: the next run is within a second ({next}, now {now})"
    );
    assert_eq!(
        request(addr, "DELETE", "/v1/schedules/tick", "").status,
        204
    );
    assert_eq!(
        request(addr, "DELETE", "/v1/schedules/tick", "").json()["code"],
        "schedule_not_found"
    );
}

// --- with queue.backend = "postgres" ------------------------------------------------

/// `KEEL_TEST_POSTGRES_URL`, or `None` after saying the test is skipped (a failure under
/// `KEEL_REQUIRE_EXTERNAL=1`).
pub(crate) fn postgres_url() -> Option<String> {
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

/// A schema of this test's own, dropped when the test ends (also after a failure).
pub(crate) struct TestSchema {
    url: String,
    pub(crate) name: String,
}

impl TestSchema {
    pub(crate) fn new(url: &str) -> TestSchema {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        TestSchema {
            url: url.to_owned(),
            name: format!(
                "keel_it_{}_{:x}",
                std::process::id(),
                nanos & 0xffff_ffff_ffff
            ),
        }
    }

    fn queue_config(&self) -> String {
        format!(
            "[queue]\nbackend = \"postgres\"\nurl = {:?}\nschema = {:?}\npool_size = 4\n",
            self.url, self.name
        )
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let dropped = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(keel::queue::pg_store::PgQueueStore::drop_schema(
                &self.url, &self.name,
            ));
        if !std::thread::panicking() {
            dropped.expect("drop the test schema");
        }
    }
}

#[test]
fn two_keels_share_one_postgres_queue_over_rest() {
    let Some(url) = postgres_url() else { return };
    let schema = TestSchema::new(&url);
    let (dir_a, dir_b) = (scratch(), scratch());
    let (_a, addr_a) = Keel::start(
        dir_a.path(),
        &(base_config(dir_a.path()) + &schema.queue_config()),
    );
    let (_b, addr_b) = Keel::start(
        dir_b.path(),
        &(base_config(dir_b.path()) + &schema.queue_config()),
    );

    // A long-poll reserve on node b gets node a's job: woken by LISTEN/NOTIFY if it
    // parked first, or finding the job at once if not (the in-process suite proves the
    // wake-up itself: `scaled_out::a_commit_on_one_node_wakes_a_reserve_parked_on_another`).
    let parked = std::thread::spawn(move || {
        let started = Instant::now();
        let reply = post(
            addr_b,
            "/v1/queues/shared/reserve",
            json!({"max": 1, "wait": "30s"}),
        );
        (reply, started.elapsed())
    });
    let enqueued = post(
        addr_a,
        "/v1/queues/shared/jobs",
        json!({"name": "hello", "payload": {"n": 1}}),
    );
    assert_eq!(enqueued.status, 201, "{}", enqueued.body);
    let id = enqueued.json()["id"].as_u64().unwrap();
    let (reserved, waited) = parked.join().unwrap();
    assert_eq!(reserved.status, 200, "{}", reserved.body);
    let job = &reserved.json()["jobs"][0];
    assert_eq!(job["id"].as_u64(), Some(id));
    assert!(
        waited < Duration::from_secs(20),
        "woken, not timed out: {waited:?}"
    );

    // Acked on node b, visible as completed on node a.
    let acked = post(
        addr_b,
        &format!("/v1/jobs/{id}/ack"),
        json!({"lease_token": job["lease_token"], "result": {"ok": true}}),
    );
    assert_eq!(acked.status, 200, "{}", acked.body);
    let done = get(addr_a, &format!("/v1/jobs/{id}")).json();
    assert_eq!(done["state"], "completed");
    assert_eq!(done["result"], json!({"ok": true}));
    let stats = get(addr_a, "/v1/queues").json();
    let shared = stats["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|queue| queue["queue"] == "shared")
        .cloned()
        .unwrap_or_else(|| panic!("queue stats: {stats}"));
    assert_eq!(shared["completed"], 1, "{shared}");
}

#[test]
fn keel_stops_at_start_when_the_queue_postgres_is_unreachable() {
    crate::support::assert_stops_at_start(
        "[queue]\nbackend = \"postgres\"\nurl = \"postgres://keel@127.0.0.1:{port}/keel\"\n",
        "queue.url",
    );
}
