//! The api listener's per-request overhead in process: routing plus the metrics
//! middleware, for a trivial route (`/healthz`) and the readiness route, without
//! sockets. Run with `cargo bench --bench api`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use criterion::{Criterion, criterion_group, criterion_main};
use keel::auth::Authenticator;
use keel::config::Config;
use keel::http::{ApiState, router};
use keel::observe::{BuildInfo, DependencyState, Metrics, Readiness};
use tower::ServiceExt;

fn api(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let readiness = Readiness::new(&["storage"]);
    readiness.set("storage", DependencyState::Ready);
    let (_config_tx, config) = tokio::sync::watch::channel(Arc::new(Config::default()));
    let app = router(ApiState {
        metrics: Arc::new(Metrics::new(BuildInfo::CURRENT)),
        readiness,
        auth: Authenticator::default(),
        config,
        services: Default::default(),
    });

    for path in ["/healthz", "/readyz"] {
        c.bench_function(&format!("GET {path}"), |b| {
            b.to_async(&runtime).iter(|| {
                let app = app.clone();
                async move {
                    let request = Request::get(path).body(Body::empty()).unwrap();
                    let response = app.oneshot(request).await.unwrap();
                    assert!(response.status().is_success());
                }
            })
        });
    }
}

criterion_group!(benches, api);
criterion_main!(benches);
