//! The rate limiter's cost per request in process: `check` on one hot key (admitted and
//! rejected), round-robin over 100,000 tracked keys, a login-mode `peek`, the header
//! fields, and one sweep of a full default table; plus governor's own keyed limiter on
//! one hot key as the baseline. Run with `cargo bench --bench ratelimit`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use governor::{Quota, RateLimiter};
use hyper::HeaderMap;
use keel::config::Rate;
use keel::ratelimit::{DEFAULT_MAX_KEYS, Key, KeyKind, Limiter, LimiterConfig, RateLimitMetrics};
use prometheus::Registry;

const KEYS: u32 = 100_000;

fn limiter(metrics: &RateLimitMetrics, count: u32, per: Duration, burst: u32) -> Limiter {
    let config = LimiterConfig {
        burst: Some(burst),
        ..LimiterConfig::new(KeyKind::Ip, Rate { count, per })
    };
    Limiter::new("bench", &config, metrics).unwrap()
}

fn ip(n: u32) -> Key {
    Key::ip(IpAddr::V4(Ipv4Addr::from_bits(n)))
}

fn ratelimit(c: &mut Criterion) {
    let metrics = RateLimitMetrics::new(&Registry::new());
    // A quota no run can use up, so every check is admitted and writes its bucket.
    let generous = || {
        limiter(
            &metrics,
            1_000_000_000,
            Duration::from_secs(1),
            1_000_000_000,
        )
    };

    let hot = generous();
    c.bench_function("check, one hot key, admitted", |b| {
        b.iter(|| black_box(hot.check(black_box(ip(1)))))
    });

    let spent = limiter(&metrics, 1, Duration::from_secs(3600), 1);
    spent.check(ip(1));
    c.bench_function("check, one hot key, rejected", |b| {
        b.iter(|| black_box(spent.check(black_box(ip(1)))))
    });

    let many = generous();
    for n in 0..KEYS {
        many.check(ip(n));
    }
    let mut n = 0;
    c.bench_function("check, 100k tracked keys round-robin", |b| {
        b.iter(|| {
            n = (n + 1) % KEYS;
            black_box(many.check(black_box(ip(n))))
        })
    });

    c.bench_function("peek, one hot key", |b| {
        b.iter(|| black_box(hot.peek(black_box(ip(1)))))
    });

    let decision = hot.check(ip(1));
    c.bench_function("write_headers", |b| {
        b.iter(|| {
            let mut headers = HeaderMap::new();
            hot.write_headers(black_box(&decision), &mut headers);
            headers
        })
    });

    // Every bucket drains for an hour, so a sweep walks them all and drops none.
    let full = limiter(&metrics, 1, Duration::from_secs(3600), 1);
    for n in 0..DEFAULT_MAX_KEYS as u32 {
        full.check(ip(n));
    }
    c.bench_function("sweep, 100k busy keys", |b| b.iter(|| full.sweep()));

    let quota = Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap());
    let baseline = RateLimiter::keyed(quota);
    c.bench_function("governor keyed (baseline), one hot key", |b| {
        b.iter(|| black_box(baseline.check_key(black_box(&ip(1)))))
    });
}

criterion_group!(benches, ratelimit);
criterion_main!(benches);
