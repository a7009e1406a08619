//! Limiters on governor's `FakeRelativeClock`: time moves only when a test says so.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use hyper::HeaderMap;
use hyper::header::{HeaderValue, RETRY_AFTER};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::RouteRateLimitConfig;

fn rate(text: &str) -> Rate {
    text.parse().unwrap()
}

fn config(rate_text: &str, burst: u32) -> LimiterConfig {
    LimiterConfig {
        burst: Some(burst),
        ..LimiterConfig::new(KeyKind::Ip, rate(rate_text))
    }
}

fn fake_limiter(
    name: &str,
    config: &LimiterConfig,
) -> (Limiter<FakeRelativeClock>, FakeRelativeClock) {
    let clock = FakeRelativeClock::default();
    let metrics = RateLimitMetrics::new(&Registry::new());
    let limiter = Limiter::with_clock(name, config, &metrics, clock.clone()).unwrap();
    (limiter, clock)
}

fn ip(n: u32) -> Key {
    Key::ip(IpAddr::V4(Ipv4Addr::from_bits(n)))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn field(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|value| value.to_str().unwrap().to_owned())
        .collect()
}

#[test]
fn burst_then_rejection_then_recovery() {
    // One unit per 100 ms, three at once.
    let (limiter, clock) = fake_limiter("api", &config("10/s", 3));
    let key = ip(1);

    let first = limiter.check(key);
    assert_eq!(first.outcome, Outcome::Allowed);
    assert_eq!((first.limit, first.remaining), (3, 2));
    assert_eq!(first.reset, ms(100), "full again one interval later");
    assert_eq!(first.retry_after, None);
    assert_eq!(limiter.check(key).remaining, 1);
    let last = limiter.check(key);
    assert!(last.is_allowed());
    assert_eq!(last.remaining, 0);
    assert_eq!(last.reset, ms(100), "out of quota: reset is the next unit");

    let rejected = limiter.check(key);
    assert_eq!(rejected.outcome, Outcome::Limited);
    assert_eq!(rejected.remaining, 0);
    assert_eq!(rejected.retry_after, Some(ms(100)));
    assert_eq!(limiter.metrics.rejected_limit.get(), 1);

    clock.advance(ms(50));
    assert_eq!(limiter.check(key).retry_after, Some(ms(50)));
    clock.advance(ms(50));
    let recovered = limiter.check(key);
    assert!(recovered.is_allowed());
    assert_eq!(recovered.remaining, 0);

    clock.advance(secs(10));
    let refilled = limiter.check(key);
    assert_eq!(
        refilled.remaining, 2,
        "a long pause refills the whole burst, no more"
    );
    assert_eq!(refilled.reset, ms(100));

    // Other keys have their own buckets.
    assert_eq!(limiter.check(ip(2)).remaining, 2);
}

#[test]
fn default_burst_is_the_rate_count() {
    let (limiter, _clock) = fake_limiter("api", &LimiterConfig::new(KeyKind::Ip, rate("4/s")));
    let decisions: Vec<_> = (0..5).map(|_| limiter.check(ip(1)).outcome).collect();
    assert_eq!(
        decisions,
        [
            Outcome::Allowed,
            Outcome::Allowed,
            Outcome::Allowed,
            Outcome::Allowed,
            Outcome::Limited
        ]
    );
}

#[test]
fn header_fields_follow_the_draft() {
    let (limiter, _clock) = fake_limiter("api", &config("100/s", 200));
    let mut headers = HeaderMap::new();
    let decision = limiter.check(ip(1));
    limiter.write_headers(&decision, &mut headers);
    assert_eq!(field(&headers, "ratelimit-policy"), [r#""api";q=200;w=2"#]);
    assert_eq!(field(&headers, "ratelimit"), [r#""api";r=199;t=1"#]);
    assert!(
        headers.get(RETRY_AFTER).is_none(),
        "only rejections carry Retry-After"
    );

    for _ in 0..199 {
        assert!(limiter.check(ip(1)).is_allowed());
    }
    let rejected = limiter.check(ip(1));
    assert_eq!(rejected.retry_after, Some(ms(10)));
    let mut headers = HeaderMap::new();
    limiter.write_headers(&rejected, &mut headers);
    assert_eq!(field(&headers, "ratelimit"), [r#""api";r=0;t=1"#]);
    assert_eq!(
        field(&headers, "retry-after"),
        ["1"],
        "10 ms rounds up to a whole second"
    );

    // Slow rates: the window is the refill time of the whole burst.
    let (login, _clock) = fake_limiter("login", &config("5/m", 5));
    let mut headers = HeaderMap::new();
    login.write_headers(&login.check(ip(1)), &mut headers);
    assert_eq!(field(&headers, "ratelimit-policy"), [r#""login";q=5;w=60"#]);
    assert_eq!(field(&headers, "ratelimit"), [r#""login";r=4;t=12"#]);
}

#[test]
fn header_fields_of_several_limiters_combine() {
    let (route, _c1) = fake_limiter("route", &config("1/m", 1));
    let (global, _c2) = fake_limiter("global", &config("1/s", 1));
    route.check(ip(1));
    global.check(ip(1));
    let mut headers = HeaderMap::new();
    route.write_headers(&route.check(ip(1)), &mut headers);
    global.write_headers(&global.check(ip(1)), &mut headers);
    assert_eq!(
        field(&headers, "ratelimit-policy"),
        [r#""route";q=1;w=60"#, r#""global";q=1;w=1"#]
    );
    assert_eq!(
        field(&headers, "ratelimit"),
        [r#""route";r=0;t=60"#, r#""global";r=0;t=1"#]
    );
    assert_eq!(
        field(&headers, "retry-after"),
        ["60"],
        "the longest wait wins"
    );

    // A name that needs escaping stays a valid structured-field string.
    assert_eq!(sf_string("a\"b\\c é"), r#""a\"b\\c ?""#);
    let (odd, _clock) = fake_limiter("/api \"v1\"", &config("1/s", 1));
    let mut headers = HeaderMap::new();
    odd.write_headers(&odd.check(ip(1)), &mut headers);
    assert_eq!(
        headers.get("ratelimit-policy"),
        Some(&HeaderValue::from_static(r#""/api \"v1\"";q=1;w=1"#))
    );
}

#[test]
fn a_full_table_sends_new_keys_to_the_shared_overflow_bucket() {
    let (limiter, clock) = fake_limiter(
        "api",
        &LimiterConfig {
            max_keys: 3,
            ..config("1/s", 1)
        },
    );
    for n in 1..=3 {
        assert!(limiter.check(ip(n)).is_allowed());
    }
    assert_eq!(limiter.metrics.bucket_keys.get(), 3);

    // The sweep this forces frees nothing (every bucket is busy), so key 4 and key 5
    // share one bucket: the first gets its unit, the second does not.
    assert!(limiter.check(ip(4)).is_allowed());
    assert_eq!(limiter.check(ip(5)).outcome, Outcome::Limited);
    assert_eq!(limiter.metrics.bucket_overflow.get(), 2);
    assert_eq!(limiter.buckets.table.len(), 3, "memory did not grow");
    assert_eq!(limiter.metrics.bucket_keys.get(), 3);
    // Tracked keys keep their own buckets.
    assert_eq!(limiter.check(ip(1)).outcome, Outcome::Limited);

    // Once the tracked keys are idle, a new key sweeps them out and gets its own bucket.
    clock.advance(secs(2));
    assert!(limiter.check(ip(6)).is_allowed());
    assert_eq!(limiter.metrics.bucket_overflow.get(), 2);
    assert_eq!(limiter.buckets.table.len(), 1);
    assert_eq!(limiter.metrics.bucket_keys.get(), 1);
}

#[test]
fn concurrent_new_keys_never_exceed_max_keys() {
    let (limiter, _clock) = fake_limiter(
        "api",
        &LimiterConfig {
            max_keys: 1_000,
            ..config("1/s", 1)
        },
    );
    std::thread::scope(|scope| {
        for thread in 0..4 {
            let limiter = &limiter;
            scope.spawn(move || {
                for n in 0..5_000 {
                    limiter.check(ip(thread * 100_000 + n));
                }
            });
        }
    });
    assert_eq!(limiter.buckets.table.len(), 1_000);
    assert_eq!(limiter.metrics.bucket_keys.get(), 1_000);
    assert_eq!(limiter.metrics.bucket_overflow.get(), 19_000);
}

#[test]
fn sweep_drops_idle_keys_and_keeps_busy_ones() {
    // One unit per 100 ms, ten at once: a bucket refills within a second.
    let (limiter, clock) = fake_limiter("api", &config("10/s", 10));
    for n in 0..100 {
        limiter.check(ip(n));
    }
    clock.advance(ms(1_100));
    for _ in 0..5 {
        limiter.check(ip(0));
    }
    limiter.sweep();
    assert_eq!(
        limiter.buckets.table.len(),
        1,
        "only key 0 is still draining"
    );
    assert_eq!(limiter.metrics.bucket_keys.get(), 1);
    assert_eq!(limiter.check(ip(0)).remaining, 4, "its state survived");

    clock.advance(secs(2));
    limiter.sweep();
    assert_eq!(limiter.buckets.table.len(), 0);
    assert_eq!(limiter.metrics.bucket_keys.get(), 0);
}

#[test]
fn the_penalty_box_bans_longer_each_time_and_forgets() {
    let (limiter, clock) = fake_limiter(
        "api",
        &LimiterConfig {
            penalty: Some(PenaltyPolicy {
                after: 2,
                within: secs(10),
                ban: secs(10),
                max_ban: secs(25),
            }),
            ..config("1/s", 1)
        },
    );
    let key = ip(7);
    // Uses the bucket, then offends twice: the second rejection starts a ban.
    let offend = |expected_ban: Duration| {
        assert!(limiter.check(key).is_allowed());
        assert_eq!(limiter.check(key).outcome, Outcome::Limited);
        let banned = limiter.check(key);
        assert_eq!(banned.outcome, Outcome::Banned);
        assert_eq!(banned.retry_after, Some(expected_ban));
        assert_eq!(banned.reset, expected_ban);
        assert_eq!(banned.remaining, 0);
    };

    offend(secs(10));
    assert_eq!(limiter.metrics.bans.get(), 1);
    clock.advance(secs(4));
    let during = limiter.check(key);
    assert_eq!(during.outcome, Outcome::Banned);
    assert_eq!(
        during.retry_after,
        Some(secs(6)),
        "Retry-After is what is left of the ban"
    );
    assert_eq!(limiter.metrics.rejected_banned.get(), 1);
    assert!(
        limiter.check(ip(8)).is_allowed(),
        "other keys are not affected"
    );

    clock.advance(secs(6));
    offend(secs(20));
    clock.advance(secs(20));
    offend(secs(25)); // 40 s, capped at max_ban
    assert_eq!(limiter.metrics.bans.get(), 3);

    // The ban ended at 55 s; the record stays max_ban longer to remember the count.
    clock.advance(secs(30));
    limiter.sweep();
    assert_eq!(limiter.metrics.penalty_keys.get(), 1);
    clock.advance(secs(21));
    limiter.sweep();
    assert_eq!(limiter.metrics.penalty_keys.get(), 0, "expired ban dropped");
    offend(secs(10));
}

#[test]
fn strikes_outside_the_window_do_not_add_up() {
    let (limiter, clock) = fake_limiter(
        "api",
        &LimiterConfig {
            penalty: Some(PenaltyPolicy {
                after: 2,
                within: secs(5),
                ban: secs(60),
                max_ban: secs(60),
            }),
            ..config("1/m", 1)
        },
    );
    limiter.check(ip(1));
    assert_eq!(limiter.check(ip(1)).outcome, Outcome::Limited);
    clock.advance(secs(6));
    assert_eq!(limiter.check(ip(1)).outcome, Outcome::Limited);
    clock.advance(secs(1));
    assert_eq!(limiter.check(ip(1)).outcome, Outcome::Banned);
    // Idle past the window and with no ban behind them, strike records go at a sweep.
    limiter.check(ip(2));
    limiter.check(ip(2));
    clock.advance(secs(6));
    limiter.sweep();
    assert_eq!(limiter.metrics.penalty_keys.get(), 1, "only the banned key");
}

#[test]
fn login_mode_counts_only_failures() {
    // Three failures per key, one back every 12 s.
    let (limiter, clock) = fake_limiter("login", &config("5/m", 3));
    let key = ip(9);
    for _ in 0..10 {
        let peeked = limiter.peek(key);
        assert!(peeked.is_allowed(), "successful logins use nothing");
        assert_eq!(peeked.remaining, 3);
    }
    assert_eq!(
        limiter.buckets.table.len(),
        0,
        "a peek leaves nothing behind"
    );

    assert_eq!(limiter.record_failure(key).remaining, 2);
    assert_eq!(limiter.peek(key).remaining, 2);
    limiter.record_failure(key);
    let last = limiter.record_failure(key);
    assert!(last.is_allowed());
    assert_eq!(last.remaining, 0);

    let refused = limiter.peek(key);
    assert_eq!(refused.outcome, Outcome::Limited);
    assert_eq!(refused.retry_after, Some(secs(12)));
    assert_eq!(
        limiter.peek(key).outcome,
        Outcome::Limited,
        "still nothing used"
    );

    clock.advance(secs(12));
    let again = limiter.peek(key);
    assert!(again.is_allowed());
    assert_eq!(again.remaining, 1);
}

#[test]
fn key_kinds_parse_and_name_what_is_wrong() {
    assert_eq!("ip".parse(), Ok(KeyKind::Ip));
    assert_eq!("route".parse(), Ok(KeyKind::Route));
    assert_eq!("global".parse(), Ok(KeyKind::Global));
    let header: KeyKind = "header:X-Api-Key".parse().unwrap();
    assert_eq!(
        header,
        KeyKind::Header(HeaderName::from_static("x-api-key"))
    );
    assert_eq!(header.to_string(), "header:x-api-key");

    let unknown = "cookie".parse::<KeyKind>().unwrap_err();
    assert_eq!(unknown, KeyKindError::Unknown("cookie".to_owned()));
    assert_eq!(
        unknown.to_string(),
        r#"rate limit key "cookie" must be ip, header:NAME, route or global"#
    );
    for bad in ["header:", "header:x api key", "header:é"] {
        assert_eq!(
            bad.parse::<KeyKind>(),
            Err(KeyKindError::BadHeader(bad.to_owned()))
        );
    }
    assert!(matches!(
        "IP".parse::<KeyKind>(),
        Err(KeyKindError::Unknown(_))
    ));
}

#[test]
fn header_keys_fall_back_to_the_client_ip() {
    let kind: KeyKind = "header:x-api-key".parse().unwrap();
    let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let mut headers = HeaderMap::new();
    assert_eq!(kind.key_for(client, &headers, "/api"), Key::ip(client));
    headers.insert("x-api-key", HeaderValue::from_static(""));
    assert_eq!(
        kind.key_for(client, &headers, "/api"),
        Key::ip(client),
        "an empty header is no key"
    );

    headers.insert("x-api-key", HeaderValue::from_static("k-1"));
    let with_key = kind.key_for(client, &headers, "/api");
    assert_eq!(with_key, Key::hashed(b"k-1"));
    assert_ne!(with_key, Key::ip(client));
    let elsewhere = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    assert_eq!(
        kind.key_for(elsewhere, &headers, "/other"),
        with_key,
        "the key follows the header, not the address or route"
    );
    headers.insert("x-api-key", HeaderValue::from_static("k-2"));
    assert_ne!(kind.key_for(client, &headers, "/api"), with_key);

    assert_eq!(
        KeyKind::Route.key_for(client, &headers, "/api"),
        KeyKind::Route.key_for(elsewhere, &HeaderMap::new(), "/api")
    );
    assert_ne!(
        KeyKind::Route.key_for(client, &headers, "/api"),
        KeyKind::Route.key_for(client, &headers, "/other")
    );
    assert_eq!(
        KeyKind::Global.key_for(client, &headers, "/api"),
        Key::GLOBAL
    );
}

#[test]
fn ipv6_clients_count_by_their_64() {
    let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
    let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
    let other: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
    assert_eq!(Key::ip(a.into()), Key::ip(b.into()));
    assert_ne!(Key::ip(a.into()), Key::ip(other.into()));
    let mapped: Ipv6Addr = "::ffff:192.0.2.1".parse().unwrap();
    assert_eq!(
        Key::ip(mapped.into()),
        Key::ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)))
    );
    assert_eq!(std::mem::size_of::<Key>(), 16, "what a tracked key costs");
}

#[test]
fn configuration_is_checked() {
    let route = RouteRateLimitConfig {
        key: "header:x-api-key".to_owned(),
        rate: rate("100/s"),
        burst: None,
        count: Default::default(),
        max_keys: None,
        penalty: None,
    };
    let config = LimiterConfig::from_route(&route).unwrap();
    assert_eq!(
        config.key,
        KeyKind::Header(HeaderName::from_static("x-api-key"))
    );
    assert_eq!(config.max_keys, DEFAULT_MAX_KEYS);
    let bad_key = RouteRateLimitConfig {
        key: "cookie".to_owned(),
        ..route.clone()
    };
    assert_eq!(
        LimiterConfig::from_route(&bad_key).unwrap_err(),
        LimiterError::Key(KeyKindError::Unknown("cookie".to_owned()))
    );

    let metrics = RateLimitMetrics::new(&Registry::new());
    let build = |config: LimiterConfig| Limiter::new("t", &config, &metrics).err();
    assert_eq!(build(config.clone()), None);
    assert_eq!(
        build(LimiterConfig {
            burst: Some(0),
            ..config.clone()
        }),
        Some(LimiterError::ZeroBurst)
    );
    assert_eq!(
        build(LimiterConfig {
            rate: Rate {
                count: u32::MAX,
                per: Duration::from_secs(1)
            },
            ..config.clone()
        }),
        Some(LimiterError::RateTooFast {
            count: u32::MAX,
            per: Duration::from_secs(1)
        })
    );
    assert_eq!(
        build(LimiterConfig {
            rate: rate("1/d"),
            burst: Some(10_000),
            ..config.clone()
        }),
        Some(LimiterError::WindowTooLong { burst: 10_000 })
    );
    assert_eq!(
        build(LimiterConfig {
            max_keys: 0,
            ..config.clone()
        }),
        Some(LimiterError::ZeroMaxKeys)
    );
    let penalty = PenaltyPolicy {
        after: 3,
        within: secs(10),
        ban: secs(60),
        max_ban: secs(30),
    };
    assert_eq!(
        build(LimiterConfig {
            penalty: Some(penalty),
            ..config.clone()
        }),
        Some(LimiterError::Penalty("max_ban must be at least ban"))
    );
    assert_eq!(
        build(LimiterConfig {
            penalty: Some(PenaltyPolicy {
                after: 0,
                ..penalty
            }),
            ..config
        }),
        Some(LimiterError::Penalty("after must be at least 1"))
    );
}

#[test]
fn the_registry_sweeps_every_limiter() {
    let clock = FakeRelativeClock::default();
    let metrics = RateLimitMetrics::new(&Registry::new());
    let limits = RateLimits::new();
    for name in ["api", "/shop"] {
        limits.insert(
            Limiter::with_clock(name, &config("10/s", 10), &metrics, clock.clone()).unwrap(),
        );
    }
    let api = limits.get("api").unwrap();
    let shop = limits.get("/shop").unwrap();
    assert!(limits.get("queue").is_none());
    api.check(ip(1));
    shop.check(ip(2));
    clock.advance(secs(2));
    limits.sweep_all();
    assert_eq!(api.buckets.table.len(), 0);
    assert_eq!(shop.buckets.table.len(), 0);

    assert!(limits.remove("api").is_some());
    assert!(limits.get("api").is_none());
}

#[tokio::test]
async fn the_sweeper_sweeps_until_shutdown() {
    let clock = FakeRelativeClock::default();
    let limits = RateLimits::new();
    let limiter = limits.insert(
        Limiter::with_clock(
            "api",
            &config("10/s", 10),
            &RateLimitMetrics::new(&Registry::new()),
            clock.clone(),
        )
        .unwrap(),
    );
    limiter.check(ip(1));
    clock.advance(secs(2));
    let shutdown = CancellationToken::new();
    let sweeper = limits.spawn_sweeper(ms(5), shutdown.clone());
    let deadline = tokio::time::Instant::now() + secs(5);
    while limiter.buckets.table.len() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweeper never swept"
        );
        tokio::time::sleep(ms(5)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(secs(5), sweeper)
        .await
        .expect("the sweeper stops on shutdown")
        .unwrap();
}

/// The memory a tracked key costs. Run alone, so other tests do not move the RSS:
/// `cargo test --lib ratelimit::tests::memory_per_key -- --ignored --nocapture`
#[test]
// Ignored because it reads the whole process's RSS: tests running beside it in the
// same process would move the figure. Run by `KEEL_BENCH_RATELIMIT_MEMORY=1 scripts/bench gateway`.
#[ignore = "measures process RSS; run alone"]
#[allow(clippy::print_stdout)] // The figure is this test's output.
fn memory_per_key() {
    const KEYS: u32 = 1_000_000;
    let metrics = RateLimitMetrics::new(&Registry::new());
    let limiter = Limiter::new(
        "memory",
        &LimiterConfig {
            max_keys: 2 * KEYS as usize,
            ..config("1/s", 10)
        },
        &metrics,
    )
    .unwrap();
    let before = resident_bytes();
    for n in 0..KEYS {
        limiter.check(ip(n));
    }
    let after = resident_bytes();
    assert_eq!(limiter.buckets.table.len(), KEYS as usize);
    let per_key = (after - before) as f64 / f64::from(KEYS);
    println!(
        "{KEYS} keys: RSS grew {:.1} MiB, {per_key:.1} bytes per key",
        (after - before) as f64 / (1 << 20) as f64
    );
    assert!(per_key < 100.0, "{per_key} bytes per key");
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}
