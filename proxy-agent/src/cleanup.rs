//! Slow work on a thread of its own, so the async runtime's workers never wait for it (each
//! walks the whole conntrack map, or visits every network namespace of the host):
//! - every `--conntrack-gc-interval`, a collection pass over the packet path's conntrack map:
//!   expired entries are deleted, and the entries by state are counted for the metrics
//!   ([`crate::conntrack::collect`]);
//!
//! and after a sync removed backends:
//! - kube-proxy's conntrack cleanup: the packet path's UDP flows to (and replies from) removed
//!   backends are forgotten, so a client's next datagram picks a live one (the datapath also
//!   re-balances a flow whose backend is gone; this removes the stale entries);
//! - connected UDP sockets the socket path pinned to a removed backend are destroyed, so their
//!   applications reconnect to a live one ([`crate::sockets`]).
//!
//! Only UDP has flows and connected sockets to clean: TCP connections to a removed pod fail on
//! their own, as with kube-proxy.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use proxy_common::{
    BACKEND_MAP, Backend, CT_DIR_FORWARD, CT_MAP, CtKey, CtTimeouts, CtValue, PROTO_UDP,
    SockRevNatKey,
};
use tracing::{debug, info, warn};

use crate::{
    conntrack,
    maps::{MapsError, open_pinned, open_sock_rev_nat},
    metrics::Metrics,
};

/// How the conntrack collector runs.
#[derive(Clone, Copy, Debug)]
pub struct Gc {
    pub interval: Duration,
    pub timeouts: CtTimeouts,
}

/// The cleanup thread's mailbox.
pub struct Cleaner {
    removed: mpsc::Sender<Vec<Backend>>,
}

impl Cleaner {
    /// Starts the cleanup thread for the datapath pinned in `bpffs_dir`. Its first collection
    /// pass comes soon after start: what expired while no agent ran is collected then.
    pub fn start(bpffs_dir: PathBuf, gc: Gc, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let (removed, jobs) = mpsc::channel::<Vec<Backend>>();
        std::thread::Builder::new()
            .name("cleanup".into())
            .spawn(move || {
                let mut next_gc = Instant::now() + gc.interval.min(Duration::from_secs(1));
                loop {
                    // Collection first when it is due: a steady stream of jobs never starves it.
                    let wait = next_gc.saturating_duration_since(Instant::now());
                    let job = if wait.is_zero() {
                        Err(mpsc::RecvTimeoutError::Timeout)
                    } else {
                        jobs.recv_timeout(wait)
                    };
                    match job {
                        Ok(mut backends) => {
                            // Whatever queued up meanwhile is one walk.
                            while let Ok(more) = jobs.try_recv() {
                                backends.extend(more);
                            }
                            clean(&bpffs_dir, &backends);
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            collect(&bpffs_dir, &gc, &metrics);
                            next_gc = Instant::now() + gc.interval;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(Cleaner { removed })
    }

    /// Backends a sync deleted; returns at once.
    pub fn removed(&self, backends: &[Backend]) {
        let udp: Vec<Backend> = (backends.iter())
            .filter(|b| b.proto == PROTO_UDP)
            .copied()
            .collect();
        if !udp.is_empty() {
            // The thread only ends with the process.
            let _ = self.removed.send(udp);
        }
    }
}

/// One conntrack collection pass, recorded in the metrics.
fn collect(bpffs_dir: &Path, gc: &Gc, metrics: &Metrics) {
    let started = Instant::now();
    let pass = conntrack::open(bpffs_dir)
        .and_then(|mut ct| conntrack::collect(&mut ct, &gc.timeouts, conntrack::now_s()));
    match pass {
        Ok(pass) => {
            metrics.record_conntrack(&pass);
            debug!(
                entries = pass.entries,
                collected = pass.collected,
                elapsed_us = started.elapsed().as_micros() as u64,
                "conntrack collected"
            );
        }
        Err(e) => warn!(error = %e, "conntrack collection failed; will retry"),
    }
}

/// What one cleanup did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// Conntrack entries deleted.
    pub flows: usize,
    /// Connected UDP sockets destroyed.
    pub sockets: usize,
}

/// Cleans what `removed` backends left. A backend a later sync has added again (a pod ready
/// again, an address reused) before this ran is live: its flows and sockets are left alone.
pub fn clean(bpffs_dir: &Path, removed: &[Backend]) -> Cleaned {
    let mut done = Cleaned::default();
    let backends: HashMap<MapData, u32, Backend> =
        match open_pinned(bpffs_dir, BACKEND_MAP, Map::HashMap) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot read the backends; nothing is cleaned");
                return done;
            }
        };
    let live: HashSet<Backend> = backends.iter().flatten().map(|(_, b)| b).collect();
    let removed: Vec<Backend> = (removed.iter())
        .filter(|b| !live.contains(b))
        .copied()
        .collect();
    if removed.is_empty() {
        return done;
    }
    match forget_udp_flows(bpffs_dir, &removed, &backends) {
        Ok(n) => {
            done.flows = n;
            if n > 0 {
                info!(entries = n, "forgot UDP flows to removed backends");
            }
        }
        Err(e) => {
            warn!(error = %e, "could not clean conntrack; stale flows are re-balanced by the datapath");
        }
    }
    let translated = match open_sock_rev_nat(bpffs_dir) {
        Ok(m) => m,
        Err(e) => {
            warn!(error = %e, "cannot read the socket reverse-NAT map; stale UDP sockets are kept");
            return done;
        }
    };
    let lookup = move |k: &SockRevNatKey| translated.get(k, 0).is_ok();
    match crate::sockets::destroy_udp_sockets_to(&removed, lookup) {
        Ok(n) => {
            done.sockets = n;
            if n > 0 {
                info!(
                    sockets = n,
                    "terminated connected UDP sockets to removed backends"
                );
            }
        }
        Err(e) => warn!(error = %e, "could not terminate stale connected UDP sockets"),
    }
    done
}

/// Deletes the UDP flows whose backend side is one of `removed`, unless the entry's backend
/// id names that backend in `backends` again; returns how many entries.
fn forget_udp_flows(
    bpffs_dir: &Path,
    removed: &[Backend],
    backends: &HashMap<MapData, u32, Backend>,
) -> Result<usize, MapsError> {
    let mut conntrack: HashMap<MapData, CtKey, CtValue> =
        open_pinned(bpffs_dir, CT_MAP, Map::LruHashMap)?;
    let gone = |addr: u32, port: u16| {
        removed
            .iter()
            .any(|b| b.addr_be == addr && b.port_be == port)
    };
    let mut stale = Vec::new();
    for kv in conntrack.iter() {
        let (k, v) = kv.map_err(|source| MapsError::Read {
            map: CT_MAP,
            source,
        })?;
        let (addr, port) = match v.dir {
            CT_DIR_FORWARD => (v.addr_be, v.port_be),
            _ => (k.saddr_be, k.sport_be),
        };
        if k.proto != PROTO_UDP || !gone(addr, port) {
            continue;
        }
        // A flow made since, to the same address added again, names its live backend.
        let live = backends
            .get(&v.backend_id, 0)
            .is_ok_and(|b| b.addr_be == addr && b.port_be == port);
        if !live {
            stale.push(k);
        }
    }
    for k in &stale {
        // Gone already (LRU eviction, or the other direction's delete) is fine.
        let _ = conntrack.remove(k);
    }
    Ok(stale.len())
}
