//! `cargo xtask bench`: data plane and control plane, side by side with the physical limit
//! (no translation) and with kube-proxy's iptables and nftables rules, in one run on one
//! machine. Prints tables and writes a JSON result and an SVG plot. Never a timed test: the
//! numbers are reported, not asserted.

pub mod choice_cost;
pub mod controlplane;
pub mod dataplane;
pub mod kernel_cost;
pub mod kube_proxy;
pub mod load;
pub mod packet_cost;
pub mod report;
pub mod servers;
pub mod workload;
