//! The job queue: the store and handle in process with a hand-moved clock (backoff,
//! delays, leases, schedules across a restart), and the REST surface of a real keel
//! (lifecycle, operations, bad input, webhook processor, schedules).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keel::config::{QueueConfig, QueueDefinition, Retention as RetentionConfig};
use keel::queue::redb_store::RedbQueueStore;
use keel::queue::{
    Ack, CatchUp, JobSpec, JobState, ManualClock, Queue, QueueError, QueueMetrics, ReserveRequest,
    RetentionPolicies, ScheduleSpec, Wakeups,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::support::{DEADLINE, Keel, TestServer, base_config, get, request, scratch};

// --- in process, with a manual clock -------------------------------------------------

/// 2027-01-15T10:00:30Z: half a minute past a minute boundary.
const START: u64 = 1_800_007_230_000;

struct Harness {
    queue: Queue,
    clock: Arc<ManualClock>,
}

fn open(dir: &Path, clock: Arc<ManualClock>, config: &QueueConfig) -> Harness {
    let path = dir.join("queue.redb");
    // A dropped store's writer thread lets go of the file a moment later.
    let started = Instant::now();
    let db = loop {
        match redb::Database::create(&path) {
            Ok(db) => break Arc::new(db),
            Err(error) if started.elapsed() < DEADLINE => {
                let _ = error;
                std::thread::yield_now();
            }
            Err(error) => panic!("reopen queue.redb: {error}"),
        }
    };
    let wakeups = Arc::new(Wakeups::default());
    let metrics = QueueMetrics::new(&prometheus::Registry::new());
    let store = RedbQueueStore::open(
        db,
        &path,
        clock.clone(),
        wakeups.clone(),
        metrics.clone(),
        RetentionPolicies::from_config(config),
    )
    .expect("open store");
    let queue = Queue::new(
        Arc::new(store),
        clock.clone(),
        wakeups,
        metrics,
        config,
        CancellationToken::new(),
    );
    Harness { queue, clock }
}

fn harness(dir: &Path) -> Harness {
    open(
        dir,
        Arc::new(ManualClock::new(START)),
        &QueueConfig::default(),
    )
}

fn spec(value: Value) -> JobSpec {
    serde_json::from_value(value).expect("job spec")
}

fn take(max: usize) -> ReserveRequest {
    ReserveRequest {
        max,
        lease_ms: None,
        wait: Duration::ZERO,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn failed_jobs_wait_out_their_backoff_then_die_after_the_last_attempt() {
    let dir = scratch();
    runtime().block_on(async {
        let Harness { queue, clock } = harness(dir.path());
        let job = json!({"attempts": 3, "backoff": {"type": "exponential", "delay": "1s"}});
        let id = queue.enqueue("mail", vec![spec(job)]).await.unwrap()[0].id;

        for (attempt, backoff) in [(1, 1_000u64), (2, 2_000)] {
            let leased = queue.reserve("mail", take(1)).await.unwrap();
            assert_eq!(leased[0].attempts_made, attempt);
            let token = leased[0].lease_token.clone().unwrap();
            let failed = queue.fail(id, &token, "smtp down").await.unwrap();
            assert!(!failed.dead);
            assert_eq!(failed.job.state, JobState::Failed);
            assert_eq!(failed.job.run_at, clock.now() + backoff);

            clock.advance(Duration::from_millis(backoff - 1));
            queue.run_due().await.unwrap();
            assert!(
                queue.reserve("mail", take(1)).await.unwrap().is_empty(),
                "too early"
            );
            clock.advance(Duration::from_millis(1));
            let report = queue.run_due().await.unwrap();
            assert_eq!(report.promoted, [("mail".to_owned(), 1)]);
        }
        let leased = queue.reserve("mail", take(1)).await.unwrap();
        let token = leased[0].lease_token.clone().unwrap();
        let failed = queue.fail(id, &token, "still down").await.unwrap();
        assert!(failed.dead);
        let job = queue.get(id).await.unwrap();
        assert_eq!(job.state, JobState::Dead);
        assert_eq!(job.last_error.as_deref(), Some("still down"));

        assert_eq!(queue.retry_dead("mail", None).await.unwrap(), 1);
        let again = queue.reserve("mail", take(1)).await.unwrap();
        assert_eq!(again[0].id, id);
        assert_eq!(
            again[0].attempts_made, 1,
            "a retried dead job gets fresh attempts"
        );
    });
}

#[test]
fn delayed_jobs_become_runnable_at_their_time_and_the_timer_knows_when() {
    let dir = scratch();
    runtime().block_on(async {
        let Harness { queue, clock } = harness(dir.path());
        let answer = queue
            .enqueue("later", vec![spec(json!({"delay": "5s"}))])
            .await
            .unwrap();
        assert_eq!(answer[0].state, JobState::Delayed);
        let report = queue.run_due().await.unwrap();
        assert_eq!(report.next_due, Some(START + 5_000));
        clock.advance(Duration::from_millis(4_999));
        queue.run_due().await.unwrap();
        assert!(queue.reserve("later", take(1)).await.unwrap().is_empty());
        clock.advance(Duration::from_millis(1));
        queue.run_due().await.unwrap();
        assert_eq!(queue.reserve("later", take(1)).await.unwrap().len(), 1);

        // run_at in the past is simply runnable.
        let past = queue
            .enqueue("later", vec![spec(json!({"run_at": 1_000}))])
            .await
            .unwrap();
        assert_eq!(past[0].state, JobState::Waiting);
    });
}

#[test]
fn reserve_takes_higher_priority_first_then_oldest() {
    let dir = scratch();
    runtime().block_on(async {
        let Harness { queue, .. } = harness(dir.path());
        let jobs = [("a", 0), ("b", 10), ("c", 0), ("d", -5), ("e", 10)];
        let specs = jobs
            .iter()
            .map(|(name, priority)| spec(json!({"name": name, "priority": priority})))
            .collect();
        queue.enqueue("p", specs).await.unwrap();
        let order: Vec<String> = queue
            .reserve("p", take(10))
            .await
            .unwrap()
            .into_iter()
            .map(|job| job.name)
            .collect();
        assert_eq!(order, ["b", "e", "a", "c", "d"]);
    });
}

#[test]
fn unique_keys_return_the_live_job_and_free_up_when_it_finishes_or_the_window_ends() {
    let dir = scratch();
    runtime().block_on(async {
        let Harness { queue, clock } = harness(dir.path());
        let first = queue
            .enqueue("u", vec![spec(json!({"unique_key": "user:1"}))])
            .await
            .unwrap()[0]
            .clone();
        let again = queue
            .enqueue("u", vec![spec(json!({"unique_key": "user:1"}))])
            .await
            .unwrap()[0]
            .clone();
        assert!(again.duplicate);
        assert_eq!(again.id, first.id);
        // Same key in one batch: the second is the first.
        let batch = queue
            .enqueue(
                "u",
                vec![
                    spec(json!({"unique_key": "user:2"})),
                    spec(json!({"unique_key": "user:2"})),
                ],
            )
            .await
            .unwrap();
        assert_eq!(batch[1].id, batch[0].id);
        assert!(batch[1].duplicate);

        let leased = queue.reserve("u", take(1)).await.unwrap();
        assert_eq!(leased[0].id, first.id);
        let token = leased[0].lease_token.clone().unwrap();
        ack(&queue, first.id, &token).await.unwrap();
        let after = queue
            .enqueue("u", vec![spec(json!({"unique_key": "user:1"}))])
            .await
            .unwrap();
        assert!(
            !after[0].duplicate,
            "a finished job no longer holds its key"
        );

        // A timed window holds the key even after the job finished, then lets go.
        let timed = json!({"unique_key": "report", "unique_for": "1m"});
        let one = queue.enqueue("t", vec![spec(timed.clone())]).await.unwrap();
        let two = queue.enqueue("t", vec![spec(timed.clone())]).await.unwrap();
        assert!(two[0].duplicate);
        clock.advance(Duration::from_secs(61));
        let three = queue.enqueue("t", vec![spec(timed)]).await.unwrap();
        assert!(!three[0].duplicate);
        assert_ne!(three[0].id, one[0].id);
    });
}

async fn ack(queue: &Queue, id: u64, token: &str) -> Result<(), QueueError> {
    let mut results = queue
        .ack(vec![Ack {
            id,
            lease_token: token.to_owned(),
            result: Some(json!("done")),
        }])
        .await?;
    results.pop().unwrap().map(|_| ())
}

#[test]
fn an_expired_lease_returns_the_job_and_the_old_token_cannot_ack() {
    let dir = scratch();
    runtime().block_on(async {
        let Harness { queue, clock } = harness(dir.path());
        let id = queue.enqueue("l", vec![spec(json!({}))]).await.unwrap()[0].id;
        let first = queue
            .reserve(
                "l",
                ReserveRequest {
                    lease_ms: Some(1_000),
                    ..take(1)
                },
            )
            .await
            .unwrap();
        let stale = first[0].lease_token.clone().unwrap();

        // A heartbeat moves the deadline.
        let beat = queue.heartbeat(id, &stale, Some(2_000)).await.unwrap();
        assert_eq!(beat.lease_deadline, Some(START + 2_000));
        clock.advance(Duration::from_millis(2_001));
        let report = queue.run_due().await.unwrap();
        assert_eq!(report.expired, [("l".to_owned(), 1, 0)]);
        assert_eq!(queue.get(id).await.unwrap().state, JobState::Waiting);

        let second = queue.reserve("l", take(1)).await.unwrap();
        assert_eq!(second[0].attempts_made, 2, "the expired lease counted");
        let fresh = second[0].lease_token.clone().unwrap();
        assert_ne!(fresh, stale);
        match ack(&queue, id, &stale).await {
            Err(QueueError::LeaseLost { .. }) => {}
            other => panic!("a stale token must be refused, got {other:?}"),
        }
        assert!(matches!(
            queue.progress(id, &stale, json!(50)).await,
            Err(QueueError::LeaseLost { .. })
        ));
        queue.progress(id, &fresh, json!(50)).await.unwrap();
        ack(&queue, id, &fresh).await.unwrap();
        let done = queue.get(id).await.unwrap();
        assert_eq!(done.state, JobState::Completed);
        assert_eq!(done.progress, Some(json!(50)));
        assert_eq!(done.result, Some(json!("done")));
    });
}

#[test]
fn retention_keeps_the_last_n_finished_jobs() {
    let dir = scratch();
    let mut config = QueueConfig::default();
    config.queues.insert(
        "r".to_owned(),
        QueueDefinition {
            remove_on_complete: Some(RetentionConfig {
                count: Some(2),
                age: None,
            }),
            ..QueueDefinition::default()
        },
    );
    runtime().block_on(async {
        let Harness { queue, .. } = open(dir.path(), Arc::new(ManualClock::new(START)), &config);
        let ids: Vec<u64> = queue
            .enqueue("r", (0..5).map(|_| spec(json!({}))).collect())
            .await
            .unwrap()
            .iter()
            .map(|answer| answer.id)
            .collect();
        for job in queue.reserve("r", take(5)).await.unwrap() {
            ack(&queue, job.id, job.lease_token.as_deref().unwrap())
                .await
                .unwrap();
        }
        let kept: Vec<u64> = queue
            .list("r", JobState::Completed, None, 100)
            .await
            .unwrap()
            .jobs
            .iter()
            .map(|job| job.id)
            .collect();
        assert_eq!(kept, ids[3..]);
        let stats = queue.stats().await.unwrap();
        assert_eq!(stats[0].counts.completed, 2);
        assert!(matches!(
            queue.get(ids[0]).await,
            Err(QueueError::NotFound(_))
        ));
    });
}

#[test]
fn a_waiting_reserve_is_woken_by_an_enqueue() {
    let dir = scratch();
    runtime().block_on(async {
        let Harness { queue, .. } = harness(dir.path());
        let waiter = {
            let queue = queue.clone();
            tokio::spawn(async move {
                queue
                    .reserve(
                        "w",
                        ReserveRequest {
                            wait: Duration::from_secs(30),
                            ..take(1)
                        },
                    )
                    .await
            })
        };
        // The reserve is parked (nothing to take yet) before the enqueue lands.
        tokio::task::yield_now().await;
        queue.enqueue("w", vec![spec(json!({}))]).await.unwrap();
        let jobs = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken long before its 30 s wait")
            .unwrap()
            .unwrap();
        assert_eq!(jobs.len(), 1);
    });
}

#[test]
fn a_schedule_fires_once_per_tick_across_a_restart_and_catches_up_by_its_rule() {
    let dir = scratch();
    let clock = Arc::new(ManualClock::new(START));
    let config = QueueConfig::default();
    let waiting = |queue: Queue, name: &'static str| async move {
        queue
            .stats()
            .await
            .unwrap()
            .into_iter()
            .find(|stats| stats.counts.queue == name)
            .map_or(0, |stats| stats.counts.waiting)
    };
    runtime().block_on(async {
        let Harness { queue, .. } = open(dir.path(), clock.clone(), &config);
        for (name, catch_up) in [
            ("one", CatchUp::One),
            ("all", CatchUp::All),
            ("none", CatchUp::None),
        ] {
            queue
                .put_schedule(ScheduleSpec {
                    name: name.to_owned(),
                    queue: name.to_owned(),
                    cron: "0 * * * * *".to_owned(),
                    timezone: "UTC".to_owned(),
                    job: None,
                    payload: json!({"from": name}),
                    catch_up,
                })
                .await
                .unwrap();
        }
        let next = queue.fire_due_schedules().await.unwrap();
        assert_eq!(next, Some(START + 30_000), "the next minute boundary");
        clock.advance(Duration::from_secs(30));
        queue.fire_due_schedules().await.unwrap();
        queue.fire_due_schedules().await.unwrap();
        for name in ["one", "all", "none"] {
            assert_eq!(
                waiting(queue.clone(), name).await,
                1,
                "{name}: one tick, one job"
            );
        }
        drop(queue);

        // Keel restarts on the same file; the tick that fired does not fire again.
        let Harness { queue, .. } = open(dir.path(), clock.clone(), &config);
        queue.fire_due_schedules().await.unwrap();
        assert_eq!(waiting(queue.clone(), "one").await, 1);
        drop(queue);

        // Down across three ticks, then back.
        clock.advance(Duration::from_secs(195));
        let Harness { queue, .. } = open(dir.path(), clock.clone(), &config);
        queue.fire_due_schedules().await.unwrap();
        assert_eq!(
            waiting(queue.clone(), "one").await,
            2,
            "one: once for all missed"
        );
        assert_eq!(
            waiting(queue.clone(), "all").await,
            4,
            "all: each missed tick"
        );
        assert_eq!(
            waiting(queue.clone(), "none").await,
            1,
            "none: missed ticks skipped"
        );
        let job = queue
            .list("one", JobState::Waiting, None, 10)
            .await
            .unwrap()
            .jobs
            .remove(0);
        assert_eq!(job.name, "one");
        assert_eq!(job.payload, json!({"from": "one"}));
    });
}

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
