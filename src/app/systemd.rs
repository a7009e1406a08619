//! The systemd notify protocol: READY=1, STOPPING=1, and watchdog pings. Every call is
//! a no-op when `NOTIFY_SOCKET` is not set.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub(super) fn notify_ready() {
    if let Err(error) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(%error, "cannot notify systemd of readiness");
    }
}

pub(super) fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Pings at half the watchdog interval. The ping comes from a task on the runtime, so a
/// runtime that stops scheduling tasks stops pinging and systemd restarts keel.
pub(super) fn spawn_watchdog(shutdown: CancellationToken) -> Option<JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()? / 2;
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = ticker.tick() => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
                () = shutdown.cancelled() => break,
            }
        }
    }))
}
