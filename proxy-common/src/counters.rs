//! The datapath's counters: index into [`crate::COUNTERS_MAP`], stable name, meaning.

use crate::COUNTERS_MAP_ENTRIES;

/// One line per counter: `Variant = index, "name", "what it counts";`. The index is the ABI
/// (never reused), the name is what metrics, tables and JSON show, the text is the help.
macro_rules! counters {
    ($( $variant:ident = $index:literal, $name:literal, $help:literal; )*) => {
        /// Index into [`crate::COUNTERS_MAP`]: why a program did what it did.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Counter {
            $( #[doc = $help] $variant = $index, )*
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$( Counter::$variant ),*];

            /// Stable snake_case name, for tables, JSON and metrics.
            pub const fn name(self) -> &'static str {
                match self { $( Counter::$variant => $name, )* }
            }

            /// What it counts, in a sentence.
            pub const fn help(self) -> &'static str {
                match self { $( Counter::$variant => $help, )* }
            }
        }
    };
}

counters! {
    ConnectTranslated = 0, "connect_translated",
        "connect4 rewrote a ClusterIP:port to a backend";
    SendmsgTranslated = 1, "sendmsg_translated",
        "sendmsg4 rewrote a ClusterIP:port to a backend";
    RecvmsgReversed = 2, "recvmsg_reversed",
        "recvmsg4 rewrote a backend source back to the ClusterIP:port";
    GetpeernameReversed = 3, "getpeername_reversed",
        "getpeername4 reported the ClusterIP:port instead of the backend";
    NoEndpointsRejected = 4, "no_endpoints_rejected",
        "the Service has no usable endpoint: rejected with ECONNREFUSED";
    NoLocalEndpointsRejected = 5, "no_local_endpoints_rejected",
        "iTP=Local and no local endpoint: rejected with EHOSTUNREACH";
    BackendMissing = 6, "backend_missing",
        "a slot or backend the master promised was missing (a writer bug or a racing update): the connection proceeded untranslated";
    SockRevNatUpdateFailed = 7, "sock_rev_nat_update_failed",
        "the socket reverse-NAT entry could not be written";
    TcTranslated = 8, "tc_translated",
        "the packet path rewrote a packet to a VIP to its backend";
    TcReversed = 9, "tc_reversed",
        "the packet path rewrote a backend's reply back to the VIP";
    TcNoEndpointsRejected = 10, "tc_no_endpoints_rejected",
        "the packet path answered a packet to a Service with no usable endpoint with ICMP port unreachable (kube-proxy's REJECT)";
    IcmpToVipDropped = 11, "icmp_to_vip_dropped",
        "ICMP to a ClusterIP, dropped (a ClusterIP is not a host)";
    FragmentPassed = 12, "fragment_passed",
        "an IP fragment to a ClusterIP passed on untranslated (only whole packets are translated)";
    CtUpdateFailed = 13, "ct_update_failed",
        "a conntrack entry could not be written (the flow was still translated)";
    TcNoLocalEndpointsDropped = 14, "tc_no_local_endpoints_dropped",
        "iTP=Local with no local endpoint: dropped on the packet path (as kube-proxy does)";
    TcRewriteFailedDropped = 15, "tc_rewrite_failed_dropped",
        "the packet path began to rewrite a packet and could not finish: dropped, never forwarded half-rewritten";
    TcOtherFlowPassed = 16, "tc_other_flow_passed",
        "a packet on a tracked reply tuple that belongs to another flow (a connection opening from the backend, or a direct one to it on a reused tuple) passed untouched";
    AffinityReused = 17, "affinity_reused",
        "ClientIP session affinity sent a new connection to the backend its client last used";
    AffinityUpdateFailed = 18, "affinity_update_failed",
        "a session-affinity entry could not be written (the connection was still translated)";
}

const _: () = {
    let mut i = 0;
    while i < Counter::ALL.len() {
        // Index order, so ALL[i] is index i, and all fit in the map.
        assert!(Counter::ALL[i] as usize == i);
        i += 1;
    }
    assert!(Counter::ALL.len() <= COUNTERS_MAP_ENTRIES as usize);
};
