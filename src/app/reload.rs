//! SIGHUP: read the configuration again, apply what can change while running, and say
//! clearly what waits for a restart. A configuration with errors changes nothing.

use std::sync::Arc;

use crate::config::{self, Config, ConfigSources};
use crate::listener::ReloadableCert;
use crate::observe::LogHandle;

/// Keys applied without a restart. Each subsystem adds its own as it learns to reload.
const LIVE_KEYS: &[&str] = &["log.level"];
/// Whole sections applied without a restart: the gateway's routes, upstreams and limits.
const LIVE_SECTIONS: &[&str] = &["gateway."];

fn is_live(path: &str) -> bool {
    LIVE_KEYS.contains(&path)
        || LIVE_SECTIONS
            .iter()
            .any(|section| path.starts_with(section))
}

/// Returns the configuration now in force, or `None` when the new one was refused.
pub(super) fn reload(
    sources: &ConfigSources,
    current: &Config,
    log: &LogHandle,
    certificates: &[Arc<ReloadableCert>],
) -> Option<Config> {
    for certificate in certificates {
        match certificate.reload() {
            Ok(()) => {
                tracing::info!(cert = %certificate.files().cert.display(), "certificate reloaded")
            }
            Err(error) => {
                tracing::error!(%error, "certificate not reloaded; the previous one stays in service")
            }
        }
    }
    let next = match config::load(sources) {
        Ok(next) => next,
        Err(errors) => {
            for problem in &errors.0 {
                tracing::error!(%problem, "configuration not reloaded");
            }
            return None;
        }
    };
    let changed = config::changed_paths(current, &next);
    if changed.is_empty() {
        tracing::info!("configuration unchanged");
        return Some(next);
    }
    if current.log.level != next.log.level {
        log.set_level(next.log.level);
        tracing::info!(level = ?next.log.level, "log level changed");
    }
    let pending: Vec<&String> = changed.iter().filter(|path| !is_live(path)).collect();
    for path in &pending {
        tracing::warn!(key = %path, "changed in the configuration file; takes effect after a restart");
    }
    // Keys that need a restart keep their running values, so the next SIGHUP compares
    // against what is really in force.
    let mut in_force = current.clone();
    in_force.log.level = next.log.level;
    in_force.gateway = next.gateway.clone();
    Some(in_force)
}
