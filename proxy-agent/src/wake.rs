//! The agent's wake-up: a source wakes it for each change it sees. Each wake-up also records
//! when it was asked for (`proxy_sync_proxy_rules_last_queued_timestamp_seconds`, kube-proxy's),
//! so a sync that hangs shows as a queued time newer than the last sync's.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

#[derive(Clone, Debug, Default)]
pub struct Wake {
    notify: Arc<Notify>,
    /// When the last wake-up was asked for, in seconds since the epoch.
    queued: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Wake {
    /// A wake-up that records its times in `queued`.
    pub fn recording(queued: Gauge<f64, std::sync::atomic::AtomicU64>) -> Self {
        Wake {
            notify: Arc::default(),
            queued,
        }
    }

    /// Asks for a sync (the agent syncs once for any number of these before it runs).
    pub fn wake(&self) {
        self.queued.set(unix_seconds(SystemTime::now()));
        self.notify.notify_one();
    }

    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// `t` in seconds since the epoch (0 before it).
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_up_records_when_it_was_asked_for() {
        let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let wake = Wake::recording(gauge.clone());
        let before = unix_seconds(SystemTime::now());
        wake.wake();
        assert!(gauge.get() >= before && gauge.get() > 0.0);
        // Stored: a later notified() returns at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), wake.notified())
            .await
            .unwrap();
    }
}
