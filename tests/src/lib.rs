//! Test harness for the privileged tests and `cargo xtask demo`.
//!
//! Safety rules (../shared/DESIGN.md), enforced here so no test has to remember them:
//! - every test gets its own cgroup (under the cgroup2 mount, never the root), network
//!   namespaces, veths (created inside those namespaces, never in the root one) and bpffs
//!   directory, and each is removed by a guard on drop, also when the test fails;
//! - clients run inside the test cgroup *and* a test netns, so an untranslated connect to a
//!   VIP can never leave the machine;
//! - every wait is bounded in count and time.

pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod chaos;
pub mod client;
pub mod cluster;
pub mod demo;
pub mod host;
pub mod packets;
pub mod servers;

use std::sync::atomic::{AtomicU32, Ordering};

/// A short name unique to this process and call, for namespaces, cgroups and bpffs dirs.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "pxt{}{}{}",
        std::process::id() % 100_000,
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    )
}
