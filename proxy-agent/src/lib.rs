//! proxy-agent: keeps the eBPF ClusterIP datapath's maps equal to the cluster's Services and
//! EndpointSlices. Data flows one way: source -> model -> sync -> maps -> programs.
pub mod agent;
pub mod bpf_log;
pub mod capacity;
pub mod cleanup;
pub mod conntrack;
pub mod debug;
pub mod features;
pub mod fuzzing;
pub mod inspect;
pub mod loader;
pub mod lock;
pub mod logging;
pub mod maglev;
pub mod maglev_map;
pub mod maps;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod netlink;
pub mod run;
pub mod sockets;
pub mod source;
pub mod status;
pub mod sync;
pub mod tc;
pub mod wake;
