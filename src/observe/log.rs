//! Logging through `tracing` to stderr (journald reads it), as text or JSON lines.
//!
//! The level is behind a reload handle so SIGHUP can change it without a restart; the
//! format is fixed at start because switching writers under running tasks would tear
//! lines.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Registry, reload};

use crate::config::{LogFormat, LogLevel};

/// Changes the log level of the running process.
#[derive(Clone)]
pub struct LogHandle {
    filter: Option<reload::Handle<Targets, Registry>>,
}

impl LogHandle {
    /// A handle that changes nothing, for code paths that run without a subscriber.
    pub fn detached() -> Self {
        LogHandle { filter: None }
    }

    pub fn set_level(&self, level: LogLevel) {
        if let Some(filter) = &self.filter
            && let Err(error) = filter.reload(targets(level))
        {
            tracing::error!(%error, "cannot change the log level");
        }
    }
}

/// Keel's own events at the configured level; libraries (hyper, rustls, redb...) at no
/// more than `info`, since their debug output would drown ours.
fn targets(level: LogLevel) -> Targets {
    let keel = match level {
        LogLevel::Trace => LevelFilter::TRACE,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Error => LevelFilter::ERROR,
    };
    Targets::new()
        .with_target("keel", keel)
        .with_default(keel.min(LevelFilter::INFO))
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init_logging(level: LogLevel, format: LogFormat) -> LogHandle {
    let (filter, handle) = reload::Layer::new(targets(level));
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    match installed {
        Ok(()) => LogHandle {
            filter: Some(handle),
        },
        // A subscriber is already installed (tests running several apps in one process).
        Err(_) => LogHandle::detached(),
    }
}
