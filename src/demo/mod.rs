//! `keel demo`: a whole site in one command. A demo upstream app runs inside the same
//! process on its own port; the generated configuration puts the gateway (response
//! cache, rate limits), a cache namespace with an HTTP loader, queues with a webhook and
//! a cron schedule, and named SQL queries in front of it; built-in traffic keeps every
//! dashboard chart moving.
//!
//! The CLI owns the terminal and the exit code; this module prepares the site and, once
//! keel is ready, starts the app and the traffic.

mod app;
mod site;
mod traffic;

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use site::Addresses;

use crate::app::Endpoints;

/// What the demo is asked to do (from `keel demo`'s flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub api: String,
    pub resp: String,
    pub gateway: String,
    /// Keep state here instead of a temporary directory (reused across runs).
    pub data_dir: Option<PathBuf>,
    pub traffic: bool,
}

/// A prepared demo site: its files written, the app's port taken.
pub struct DemoSite {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// A directory the demo made for this run, removed when it ends.
    pub temporary: bool,
    app_listener: TcpListener,
    traffic: bool,
}

/// Where the running demo is; printed by the CLI.
pub struct RunningDemo {
    pub dashboard: String,
    pub gateway: Option<String>,
    pub resp: Option<std::net::SocketAddr>,
    pub app: std::net::SocketAddr,
    /// The admin token keel created on its first start with auth on.
    pub token: Option<String>,
}

impl DemoSite {
    /// Binds the app's port and writes the configuration and the seeding migration.
    pub fn prepare(options: &DemoOptions) -> io::Result<DemoSite> {
        let (dir, temporary) = match &options.data_dir {
            Some(dir) => (dir.clone(), false),
            None => (
                std::env::temp_dir().join(format!("keel-demo-{}", std::process::id())),
                true,
            ),
        };
        std::fs::create_dir_all(&dir)?;
        let dir = dir.canonicalize()?;
        let app_listener = TcpListener::bind("127.0.0.1:0")?;
        app_listener.set_nonblocking(true)?;
        let addresses = Addresses {
            api: options.api.clone(),
            resp: options.resp.clone(),
            gateway: options.gateway.clone(),
            app: app_listener.local_addr()?,
        };
        let config_path = site::write(&dir, &addresses)?;
        Ok(DemoSite {
            dir,
            config_path,
            temporary,
            app_listener,
            traffic: options.traffic,
        })
    }

    /// Starts the app, seeds what the printed commands use, and starts the traffic, on
    /// the current runtime, once keel is ready. App and traffic stop at Ctrl-C or
    /// SIGTERM, with keel.
    pub async fn start(self, endpoints: Endpoints) -> io::Result<RunningDemo> {
        let scheme = if endpoints.api_tls { "https" } else { "http" };
        let dashboard = format!("{scheme}://{}", endpoints.api);
        let gateway = endpoints.gateway.map(|addr| format!("http://{addr}"));
        let token = read_token(&self.dir);
        let app_addr = self.app_listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(self.app_listener)?;
        let stop = CancellationToken::new();
        tokio::spawn(stop_on_signal(stop.clone()));
        let router = app::DemoApp::new(self.dir.join("data.sqlite")).router();
        let app_stop = stop.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(app_stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "the demo app stopped");
            }
        });
        let targets = traffic::Targets {
            api: dashboard.clone(),
            gateway: gateway.clone().unwrap_or_default(),
            token: token.clone(),
        };
        let sender = traffic::Sender::new(targets);
        sender.seed().await;
        if self.traffic && gateway.is_some() {
            tokio::spawn(sender.run(stop));
        }
        Ok(RunningDemo {
            dashboard,
            gateway,
            resp: endpoints.resp,
            app: app_addr,
            token,
        })
    }
}

async fn stop_on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    stop.cancel();
}

fn read_token(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(crate::auth::admin_token_path(dir)).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_owned())
}
