//! The TC program on crafted packets (BPF_PROG_TEST_RUN): no traffic, no interfaces, only the
//! program, its pinned maps (written by the agent's real sync path) and bytes in and out.
//! Privileged (loads eBPF): run with `cargo xtask test`.

use std::net::Ipv4Addr;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use proxy_agent::{
    loader,
    maps::PinnedMaps,
    model::{BackendAddr, Desired, Frontend, FrontendSpec, Proto, ServiceRef},
    sync::Syncer,
};
use proxy_common::Counter;
use proxy_tests::{
    host::{BpffsDir, require_root},
    unique,
};

const PASS: u32 = u32::MAX; // TC_NEXT / unspec (-1)
const SHOT: u32 = 2;
const REDIRECT: u32 = 7;

const CLIENT: [u8; 4] = [10, 1, 0, 2];
const VIP: [u8; 4] = [10, 96, 0, 10];
const EMPTY_VIP: [u8; 4] = [10, 96, 0, 11];
const BACKEND: [u8; 4] = [10, 1, 0, 5];
/// The pod that replaces BACKEND in the Service.
const NEXT_BACKEND: [u8; 4] = [10, 1, 0, 6];

use proxy_tests::packets::{ACK, FIN, RST, SYN, csum, packet, pseudo, syn_ack, with_flags};

struct Parsed {
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
}

/// Parses a packet and asserts both checksums verify, as a receiving kernel would.
fn parse_checked(p: &[u8]) -> Parsed {
    let ihl = usize::from(p[14] & 0x0f) * 4;
    let ip = &p[14..14 + ihl];
    assert_eq!(csum(ip, 0), 0, "IP checksum");
    let proto = ip[9];
    let (src, dst) = (
        ip[12..16].try_into().unwrap(),
        ip[16..20].try_into().unwrap(),
    );
    let l4 = &p[14 + ihl..];
    let udp_unchecked = proto == 17 && l4[6..8] == [0, 0];
    if !udp_unchecked {
        assert_eq!(
            csum(l4, pseudo(src, dst, proto, l4.len())),
            0,
            "L4 checksum"
        );
    }
    Parsed {
        src,
        dst,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
    }
}

/// `web`: TCP 80 and UDP 53 on `VIP` to `backend`; the empty Service's frontends on EMPTY_VIP.
fn desired(backend: [u8; 4]) -> Desired {
    let svc = ServiceRef {
        namespace: "default".into(),
        name: "web".into(),
    };
    let mut desired = Desired::default();
    for (vip, port, proto, backends) in [
        (
            VIP,
            80,
            Proto::Tcp,
            vec![BackendAddr {
                ip: backend.into(),
                port: 8080,
            }],
        ),
        (
            VIP,
            53,
            Proto::Udp,
            vec![BackendAddr {
                ip: backend.into(),
                port: 5353,
            }],
        ),
        (EMPTY_VIP, 80, Proto::Tcp, vec![]),
        (EMPTY_VIP, 80, Proto::Udp, vec![]),
    ] {
        desired.frontends.insert(
            Frontend {
                vip: Ipv4Addr::from(vip),
                port,
                proto,
            },
            FrontendSpec {
                service: svc.clone(),
                backends,
                no_local_endpoints: false,
                affinity_timeout_s: 0,
                algorithm: None,
                about: Default::default(),
            },
        );
    }
    desired
}

struct Harness {
    maps: PinnedMaps,
    ebpf: aya::Ebpf,
    pins: BpffsDir,
}

impl Harness {
    fn new() -> Harness {
        require_root();
        let pins = BpffsDir::new(&unique("tc"));
        let mut ebpf = loader::load(&pins.path).expect("object loads");
        let prog: &mut SchedClassifier = ebpf
            .program_mut(loader::TC_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("the verifier accepts the TC program");
        // The agent's real writer programs the maps.
        let maps = PinnedMaps::open(&pins.path).unwrap();
        let state = maps.dump().unwrap();
        let mut syncer = Syncer::new(maps, state);
        assert!(syncer.sync(&desired(BACKEND)).errors.is_empty());
        Harness {
            maps: PinnedMaps::open(&pins.path).unwrap(),
            ebpf,
            pins,
        }
    }

    /// The Services again, with `backend` as every frontend's one backend, through a new
    /// writer (as a restarted agent would).
    fn set_backend(&self, backend: [u8; 4]) {
        let maps = PinnedMaps::open(&self.pins.path).unwrap();
        let state = maps.dump().unwrap();
        let mut syncer = Syncer::new(maps, state);
        assert!(syncer.sync(&desired(backend)).errors.is_empty());
    }

    fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        run_on(&self.ebpf, input)
    }

    /// The TC program again, on the same pinned maps, with its n-th packet write failing as
    /// a helper would (the object's test hook `PROXY_FAULT_AT_WRITE`).
    fn with_failing_write(&self, n: u32) -> aya::Ebpf {
        let mut l = aya::EbpfLoader::new();
        for m in proxy_common::MAPS {
            l.map_pin_path(m.name, self.pins.path.join(m.name));
        }
        let mut ebpf = l
            .override_global("PROXY_FAULT_AT_WRITE", &n, true)
            .load(loader::EBPF_OBJECT)
            .expect("object loads");
        let prog: &mut SchedClassifier = ebpf
            .program_mut(loader::TC_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("the verifier accepts the TC program");
        ebpf
    }

    /// The conntrack map, as the program sees it.
    fn conntrack(
        &self,
    ) -> aya::maps::HashMap<aya::maps::MapData, proxy_common::CtKey, proxy_common::CtValue> {
        let md = aya::maps::MapData::from_pin(self.pins.path.join(proxy_common::CT_MAP)).unwrap();
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(md)).unwrap()
    }

    fn counter(&self, c: Counter) -> u64 {
        self.maps
            .counters()
            .unwrap()
            .into_iter()
            .find(|(k, _)| *k == c)
            .unwrap()
            .1
    }
}

fn run_on(ebpf: &aya::Ebpf, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
    let prog: &SchedClassifier = ebpf
        .program(loader::TC_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    let r = prog.test_run(opts).expect("test run");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn tcp_to_a_vip_is_translated_and_the_reply_reversed_with_valid_checksums() {
    let h = Harness::new();
    let (rc, out) = h.run(&packet(6, CLIENT, 40000, VIP, 80, 0, 0, true));
    assert_eq!(rc, PASS);
    let p = parse_checked(&out);
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (CLIENT, 40000, BACKEND, 8080)
    );

    let (rc, out) = h.run(&syn_ack(packet(
        6, BACKEND, 8080, CLIENT, 40000, 0, 0, true,
    )));
    assert_eq!(rc, PASS);
    let p = parse_checked(&out);
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (VIP, 80, CLIENT, 40000),
        "the client sees the VIP"
    );
    assert_eq!(h.counter(Counter::TcTranslated), 1);
    assert_eq!(h.counter(Counter::TcReversed), 1);

    // IP options: the ports are found after them, and both checksums stay valid.
    let (rc, out) = h.run(&packet(6, CLIENT, 40001, VIP, 80, 0, 2, true));
    assert_eq!(rc, PASS);
    let p = parse_checked(&out);
    assert_eq!((p.dst, p.dport), (BACKEND, 8080));
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn udp_with_and_without_a_checksum() {
    let h = Harness::new();
    let (_, out) = h.run(&packet(17, CLIENT, 33333, VIP, 53, 0, 0, true));
    let p = parse_checked(&out);
    assert_eq!((p.dst, p.dport), (BACKEND, 5353));
    let (_, out) = h.run(&packet(17, CLIENT, 33334, VIP, 53, 0, 0, false));
    let p = parse_checked(&out);
    assert_eq!((p.dst, p.dport), (BACKEND, 5353));
    let ihl = 20;
    assert_eq!(
        out[14 + ihl + 6..14 + ihl + 8],
        [0, 0],
        "a zero UDP checksum stays zero"
    );
    let (_, out) = h.run(&packet(17, BACKEND, 5353, CLIENT, 33333, 0, 0, true));
    let p = parse_checked(&out);
    assert_eq!((p.src, p.sport), (VIP, 53));
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn icmp_to_a_vip_is_dropped_and_counted() {
    let h = Harness::new();
    let (rc, _) = h.run(&packet(1, CLIENT, 0, VIP, 0, 0, 0, true));
    assert_eq!(rc, SHOT);
    assert_eq!(h.counter(Counter::IcmpToVipDropped), 1);
    // ICMP elsewhere is not ours.
    let (rc, _) = h.run(&packet(1, CLIENT, 0, BACKEND, 0, 0, 0, true));
    assert_eq!(rc, PASS);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn no_endpoints_fragments_and_other_traffic() {
    let h = Harness::new();
    // A Service without endpoints: kube-proxy's REJECT, an ICMP port unreachable from the
    // VIP back to the client, out of the interface the packet came in on.
    // (UDP's payload makes an odd length: the checksum's last-byte case.)
    for (proto, options) in [(6u8, 0usize), (17, 0), (6, 3)] {
        let input = packet(proto, CLIENT, 40000, EMPTY_VIP, 80, 0, options, true);
        let (rc, out) = h.run(&input);
        assert_eq!(rc, REDIRECT);
        assert_eq!(out[0..6], input[6..12], "back to the sender's MAC");
        let ip = &out[14..34];
        assert_eq!(csum(ip, 0), 0, "IP checksum");
        assert_eq!(
            (ip[0], ip[9], &ip[12..16], &ip[16..20]),
            (0x45, 1, &EMPTY_VIP[..], &CLIENT[..])
        );
        let icmp = &out[34..];
        assert_eq!((icmp[0], icmp[1]), (3, 3), "destination/port unreachable");
        assert_eq!(csum(icmp, 0), 0, "ICMP checksum");
        assert_eq!(&icmp[8..], &input[14..], "quotes the original packet");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, out.len() - 14);
    }
    assert_eq!(h.counter(Counter::TcNoEndpointsRejected), 3);

    // Fragments (first with MF, and a later one) pass byte for byte.
    for frag in [0x2000u16, 0x0010] {
        let input = packet(17, CLIENT, 33333, VIP, 53, frag, 0, true);
        let (rc, out) = h.run(&input);
        assert_eq!((rc, &out), (PASS, &input));
    }
    assert_eq!(h.counter(Counter::FragmentPassed), 2);

    // Not a frontend (other port, other address): untouched.
    for input in [
        packet(6, CLIENT, 40000, VIP, 81, 0, 0, true),
        packet(6, CLIENT, 40000, BACKEND, 8080, 0, 0, true),
    ] {
        let (rc, out) = h.run(&input);
        assert_eq!((rc, &out), (PASS, &input));
    }
}

/// An ICMP port unreachable from `from` to `to`, quoting `original` (an IP packet) as a kernel
/// does: its IP header and 8 bytes.
fn icmp_error(from: [u8; 4], to: [u8; 4], original: &[u8]) -> Vec<u8> {
    let ihl = usize::from(original[0] & 0x0f) * 4;
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&original[..ihl + 8]);
    let c = csum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45u8, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&from);
    ip.extend_from_slice(&to);
    let c = csum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    p.extend(ip);
    p.extend(icmp);
    p
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn icmp_errors_about_a_translated_flow_come_back_from_the_vip() {
    let h = Harness::new();
    // The client's datagram, as it left the node (translated to the backend).
    let (_, sent) = h.run(&packet(17, CLIENT, 33333, VIP, 53, 0, 0, true));
    assert_eq!(parse_checked(&sent).dst, BACKEND);
    // The backend has no listener: its kernel answers port unreachable, quoting that.
    let (rc, out) = h.run(&icmp_error(BACKEND, CLIENT, &sent[14..]));
    assert_eq!(rc, PASS);
    let ip = &out[14..34];
    assert_eq!(csum(ip, 0), 0, "outer IP checksum");
    assert_eq!(
        (&ip[12..16], &ip[16..20]),
        (&VIP[..], &CLIENT[..]),
        "from the VIP"
    );
    let icmp = &out[34..];
    assert_eq!(csum(icmp, 0), 0, "ICMP checksum");
    let inner = &icmp[8..28];
    assert_eq!(csum(inner, 0), 0, "quoted IP checksum");
    assert_eq!(
        (&inner[12..16], &inner[16..20]),
        (&CLIENT[..], &VIP[..]),
        "quotes the packet the client sent"
    );
    assert_eq!(
        u16::from_be_bytes([icmp[30], icmp[31]]),
        53,
        "quoted destination port"
    );
    // An error about a flow we never translated is left alone.
    let other = packet(17, CLIENT, 44444, BACKEND, 5353, 0, 0, true);
    let input = icmp_error(BACKEND, CLIENT, &other[14..]);
    let (rc, out) = h.run(&input);
    assert_eq!((rc, &out), (PASS, &input));
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_full_conntrack_map_evicts_old_flows_instead_of_failing_new_ones() {
    use proxy_common::{CT_MAP_ENTRIES, CtKey, CtValue};
    let h = Harness::new();
    let mut ct = h.conntrack();
    // Fill it with unrelated flows.
    for i in 0..CT_MAP_ENTRIES {
        let k = CtKey::new(i, 1, 1, 1, 6);
        ct.insert(k, CtValue::default(), 0).unwrap();
    }
    let (rc, out) = h.run(&packet(6, CLIENT, 40000, VIP, 80, 0, 0, true));
    assert_eq!(rc, PASS);
    assert_eq!(
        parse_checked(&out).dst,
        BACKEND,
        "a new flow is still translated"
    );
    assert_eq!(h.counter(Counter::CtUpdateFailed), 0);
    let fwd = CtKey::new(
        u32::from_ne_bytes(CLIENT),
        40000u16.to_be(),
        u32::from_ne_bytes(VIP),
        80u16.to_be(),
        6,
    );
    assert!(
        ct.get(&fwd, 0).is_ok(),
        "the new flow is tracked (an old one was evicted)"
    );
    // And its reply is reversed.
    let (_, out) = h.run(&syn_ack(packet(
        6, BACKEND, 8080, CLIENT, 40000, 0, 0, true,
    )));
    assert_eq!(parse_checked(&out).src, VIP);
}

/// Every rewrite the packet path makes, failing at each of its writes in turn: a failure at
/// the first write leaves the packet as it came and passes it; a failure at any later one
/// drops it and counts it (never forwarded half-rewritten); with no failure the packet is
/// rewritten as usual.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_packet_is_never_forwarded_half_rewritten() {
    use proxy_common::{CT_DIR_REPLY, CT_UDP, CtKey, CtValue};
    let h = Harness::new();
    // A translated UDP flow's reply state, as the program records it (its own run below would
    // fail too): backend:5353 -> client:33333 answers for VIP:53.
    let mut ct = h.conntrack();
    let reply = CtKey::new(
        u32::from_ne_bytes(BACKEND),
        5353u16.to_be(),
        u32::from_ne_bytes(CLIENT),
        33333u16.to_be(),
        17,
    );
    let vip = (u32::from_ne_bytes(VIP), 53u16.to_be());
    let now = proxy_agent::conntrack::now_s();
    let value = CtValue::new(vip.0, vip.1, 1, 1, CT_DIR_REPLY, CT_UDP, now);
    ct.insert(reply, value, 0).unwrap();
    let (_, sent) = h.run(&packet(17, CLIENT, 33333, VIP, 53, 0, 0, true));
    let cases = [
        ("DNAT", packet(6, CLIENT, 40000, VIP, 80, 0, 0, true), PASS),
        (
            "reverse NAT",
            packet(17, BACKEND, 5353, CLIENT, 33333, 0, 0, true),
            PASS,
        ),
        (
            "REJECT",
            packet(6, CLIENT, 40000, EMPTY_VIP, 80, 0, 0, true),
            REDIRECT,
        ),
        ("ICMP error", icmp_error(BACKEND, CLIENT, &sent[14..]), PASS),
    ];
    for (what, input, ok) in cases {
        let (_, rewritten) = h.run(&input);
        assert_ne!(rewritten, input, "{what}: rewritten when nothing fails");
        let mut writes = None;
        for n in 1..=16 {
            let dropped = h.counter(Counter::TcRewriteFailedDropped);
            let (rc, out) = run_on(&h.with_failing_write(n), &input);
            let counted = h.counter(Counter::TcRewriteFailedDropped) - dropped;
            if n == 1 {
                assert_eq!(
                    (rc, &out, counted),
                    (PASS, &input, 0),
                    "{what}: first write fails"
                );
            } else if rc == SHOT {
                assert_eq!(counted, 1, "{what}: write {n} fails: dropped and counted");
            } else {
                assert_eq!((rc, counted), (ok, 0), "{what}: write {n} is past the last");
                assert!(
                    out == rewritten,
                    "{what}: write {n} failed and the packet went on half-rewritten"
                );
                writes = Some(n - 1);
                break;
            }
        }
        let writes = writes.unwrap_or_else(|| panic!("{what}: more than 15 writes"));
        assert!(
            writes >= 3,
            "{what}: {writes} writes, so failures part way were tried"
        );
    }
}

/// The conntrack key of a packet from `src`:`sport` to `dst`:`dport`.
fn ct_key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> proxy_common::CtKey {
    proxy_common::CtKey::new(
        u32::from_ne_bytes(src),
        sport.to_be(),
        u32::from_ne_bytes(dst),
        dport.to_be(),
        proto,
    )
}

/// The conntrack entry of a packet from `src`:`sport` to `dst`:`dport`.
fn ct_entry(
    h: &Harness,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    proto: u8,
) -> Option<proxy_common::CtValue> {
    h.conntrack()
        .get(&ct_key(src, sport, dst, dport, proto), 0)
        .ok()
}

/// The states of a TCP flow's two entries: (the client's, the backend's).
fn states(h: &Harness, sport: u16) -> (Option<u8>, Option<u8>) {
    (
        ct_entry(h, CLIENT, sport, VIP, 80, 6).map(|v| v.state),
        ct_entry(h, BACKEND, 8080, CLIENT, sport, 6).map(|v| v.state),
    )
}

/// A TCP connection's life moves both its entries through its states: opened by the client's
/// SYN, established by the client's ACK of the handshake, still established when one side has
/// sent a FIN (a half-close), closing once both have; a reset closes both directions at once.
/// A SYN-ACK sent again after the handshake (the client's ACK was lost) is still the flow's.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_tcp_flow_moves_its_entries_through_their_states() {
    use proxy_common::{CT_CLOSING, CT_ESTABLISHED, CT_SYN};
    let h = Harness::new();
    let client = |flags| with_flags(packet(6, CLIENT, 41000, VIP, 80, 0, 0, true), flags);
    let backend = |flags| with_flags(packet(6, BACKEND, 8080, CLIENT, 41000, 0, 0, true), flags);
    let steps = [
        (client(SYN), (Some(CT_SYN), Some(CT_SYN))),
        (backend(SYN | ACK), (Some(CT_SYN), Some(CT_SYN))),
        (client(ACK), (Some(CT_ESTABLISHED), Some(CT_ESTABLISHED))),
        (
            backend(SYN | ACK),
            (Some(CT_ESTABLISHED), Some(CT_ESTABLISHED)),
        ),
        (backend(ACK), (Some(CT_ESTABLISHED), Some(CT_ESTABLISHED))),
        (
            client(FIN | ACK),
            (Some(CT_ESTABLISHED), Some(CT_ESTABLISHED)),
        ),
        (backend(ACK), (Some(CT_ESTABLISHED), Some(CT_ESTABLISHED))),
        (backend(FIN | ACK), (Some(CT_CLOSING), Some(CT_CLOSING))),
    ];
    for (i, (input, want)) in steps.into_iter().enumerate() {
        let (rc, out) = h.run(&input);
        assert_eq!(rc, PASS, "step {i}");
        let p = parse_checked(&out);
        assert!(p.dst == BACKEND || p.src == VIP, "step {i}: translated");
        assert_eq!(states(&h, 41000), want, "step {i}");
    }
    // A reset from either side closes both.
    let client = |flags| with_flags(packet(6, CLIENT, 41001, VIP, 80, 0, 0, true), flags);
    for p in [
        client(SYN),
        syn_ack(packet(6, BACKEND, 8080, CLIENT, 41001, 0, 0, true)),
        client(ACK),
    ] {
        h.run(&p);
    }
    h.run(&with_flags(
        packet(6, BACKEND, 8080, CLIENT, 41001, 0, 0, true),
        RST,
    ));
    assert_eq!(states(&h, 41001), (Some(CT_CLOSING), Some(CT_CLOSING)));
}

/// A client that has connected through a VIP, then connects straight to the backend on the
/// same source port (the tuple the backend sees is the same): its connection is its own. The
/// backend's SYN-ACK is not rewritten to come from the VIP (it would be refused), whether the
/// earlier flow ended with a reset or its end was never seen; a SYN from the backend's side on
/// a tracked tuple is left alone too.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_direct_connection_on_a_tracked_tuple_is_left_alone() {
    let h = Harness::new();
    for (sport, ended_with_rst) in [(42000u16, true), (42001, false)] {
        h.run(&packet(6, CLIENT, sport, VIP, 80, 0, 0, true));
        h.run(&syn_ack(packet(
            6, BACKEND, 8080, CLIENT, sport, 0, 0, true,
        )));
        h.run(&with_flags(
            packet(6, CLIENT, sport, VIP, 80, 0, 0, true),
            ACK,
        ));
        h.run(&with_flags(
            packet(6, BACKEND, 8080, CLIENT, sport, 0, 0, true),
            ACK,
        ));
        if ended_with_rst {
            h.run(&with_flags(
                packet(6, CLIENT, sport, VIP, 80, 0, 0, true),
                RST,
            ));
        }
        let passed = h.counter(Counter::TcOtherFlowPassed);
        // Now straight to the pod, from the same port.
        let syn = packet(6, CLIENT, sport, BACKEND, 8080, 0, 0, true);
        let (rc, out) = h.run(&syn);
        assert_eq!(
            (rc, &out),
            (PASS, &syn),
            "{sport}: the direct SYN is not ours"
        );
        let answer = syn_ack(packet(6, BACKEND, 8080, CLIENT, sport, 0, 0, true));
        let (rc, out) = h.run(&answer);
        assert_eq!(
            (rc, &out),
            (PASS, &answer),
            "{sport}: its SYN-ACK stays from the pod"
        );
        assert_eq!(h.counter(Counter::TcOtherFlowPassed), passed + 1);
        assert!(
            ct_entry(&h, BACKEND, 8080, CLIENT, sport, 6).is_none(),
            "{sport}: the stale reply entry is gone"
        );
        let rest = with_flags(packet(6, BACKEND, 8080, CLIENT, sport, 0, 0, true), ACK);
        let (_, out) = h.run(&rest);
        assert_eq!(out, rest, "{sport}: and the connection's later packets too");
    }
    // A connection the backend opens towards a client's tracked port is not a reply either.
    h.run(&packet(6, CLIENT, 42002, VIP, 80, 0, 0, true));
    let syn = packet(6, BACKEND, 8080, CLIENT, 42002, 0, 0, true);
    let (rc, out) = h.run(&syn);
    assert_eq!((rc, &out), (PASS, &syn));
}

/// Sets the last-seen time of the entry of `src`:`sport` -> `dst`:`dport` `ago` seconds back.
fn age(h: &Harness, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8, ago: u32) {
    let key = ct_key(src, sport, dst, dport, proto);
    let mut ct = h.conntrack();
    let mut v = ct.get(&key, 0).expect("the entry exists");
    // (Wrapping, as the programs compare: a machine up for less than `ago` still works.)
    v.seen_s = proxy_agent::conntrack::now_s().wrapping_sub(ago);
    ct.insert(key, v, 0).unwrap();
}

/// An entry older than its state's lifetime is not used: a TCP flow idle for longer than its
/// established lifetime, and a UDP flow idle for longer than UDP's, lose their reply
/// translation; a flow seen just within its lifetime keeps it.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn an_expired_entry_is_not_used() {
    use proxy_common::CtTimeouts;
    let h = Harness::new();
    let lifetime = CtTimeouts::DEFAULT;
    // TCP, established both ways.
    h.run(&packet(6, CLIENT, 43000, VIP, 80, 0, 0, true));
    h.run(&syn_ack(packet(
        6, BACKEND, 8080, CLIENT, 43000, 0, 0, true,
    )));
    h.run(&with_flags(
        packet(6, CLIENT, 43000, VIP, 80, 0, 0, true),
        ACK,
    ));
    let reply = with_flags(packet(6, BACKEND, 8080, CLIENT, 43000, 0, 0, true), ACK);
    assert_eq!(parse_checked(&h.run(&reply).1).src, VIP);
    age(
        &h,
        BACKEND,
        8080,
        CLIENT,
        43000,
        6,
        lifetime.established_s - 5,
    );
    assert_eq!(
        parse_checked(&h.run(&reply).1).src,
        VIP,
        "within its lifetime"
    );
    age(
        &h,
        BACKEND,
        8080,
        CLIENT,
        43000,
        6,
        lifetime.established_s + 5,
    );
    let (rc, out) = h.run(&reply);
    assert_eq!((rc, &out), (PASS, &reply), "expired: not translated");
    // UDP, idle both ways for longer than its lifetime.
    h.run(&packet(17, CLIENT, 43001, VIP, 53, 0, 0, true));
    let answer = packet(17, BACKEND, 5353, CLIENT, 43001, 0, 0, true);
    age(&h, BACKEND, 5353, CLIENT, 43001, 17, lifetime.udp_s - 5);
    assert_eq!(
        parse_checked(&h.run(&answer).1).src,
        VIP,
        "within its lifetime"
    );
    for (src, sport, dst, dport) in [(BACKEND, 5353, CLIENT, 43001), (CLIENT, 43001, VIP, 53)] {
        age(&h, src, sport, dst, dport, 17, lifetime.udp_s + 5);
    }
    let (rc, out) = h.run(&answer);
    assert_eq!((rc, &out), (PASS, &answer), "the UDP flow expired");
    // The client's next datagram is a new flow: translated again, its entries fresh.
    assert_eq!(
        parse_checked(&h.run(&packet(17, CLIENT, 43001, VIP, 53, 0, 0, true)).1).dst,
        BACKEND
    );
    assert_eq!(parse_checked(&h.run(&answer).1).src, VIP);
}

/// A flow's two entries live as long as the flow: a connection idle for longer than the
/// handshake's lifetime right after its handshake still has its reply translation (the reply
/// entry saw no packet of its own since the SYN-ACK), and a half-closed one keeps both
/// directions for longer than the closing lifetime while the other side still sends.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_flow_keeps_both_entries_while_idle_or_half_closed() {
    use proxy_common::{CT_ESTABLISHED, CtTimeouts};
    let h = Harness::new();
    let lifetime = CtTimeouts::DEFAULT;
    let client = |sport, flags| with_flags(packet(6, CLIENT, sport, VIP, 80, 0, 0, true), flags);
    let backend =
        |sport, flags| with_flags(packet(6, BACKEND, 8080, CLIENT, sport, 0, 0, true), flags);
    // Idle after the handshake.
    for p in [
        client(44000, SYN),
        backend(44000, SYN | ACK),
        client(44000, ACK),
    ] {
        h.run(&p);
    }
    age(&h, BACKEND, 8080, CLIENT, 44000, 6, lifetime.syn_s + 5);
    age(&h, CLIENT, 44000, VIP, 80, 6, lifetime.syn_s + 5);
    let (_, out) = h.run(&backend(44000, ACK));
    assert_eq!(parse_checked(&out).src, VIP, "idle after the handshake");
    // Half-closed by the client; the backend answers after a pause.
    for p in [
        client(44001, SYN),
        backend(44001, SYN | ACK),
        client(44001, ACK),
    ] {
        h.run(&p);
    }
    h.run(&client(44001, FIN | ACK));
    assert_eq!(
        states(&h, 44001),
        (Some(CT_ESTABLISHED), Some(CT_ESTABLISHED))
    );
    age(&h, BACKEND, 8080, CLIENT, 44001, 6, lifetime.closing_s + 5);
    age(&h, CLIENT, 44001, VIP, 80, 6, lifetime.closing_s + 5);
    let (_, out) = h.run(&backend(44001, ACK));
    assert_eq!(parse_checked(&out).src, VIP, "the backend still sends");
    let (_, out) = h.run(&client(44001, ACK));
    assert_eq!(
        parse_checked(&out).dst,
        BACKEND,
        "the client's ACKs keep their backend"
    );
}

/// When a backend leaves the Service (its pod terminating, or scaled away), its established
/// TCP connections stay on it, as kube-proxy's conntrack keeps them: the pod finishes what it
/// serves. A handshake it never answered moves to a live backend when its SYN is sent again,
/// and so does a UDP flow (kube-proxy forgets those).
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_removed_backend_keeps_its_connections_and_loses_its_new_flows() {
    let h = Harness::new();
    let client = |sport, flags| with_flags(packet(6, CLIENT, sport, VIP, 80, 0, 0, true), flags);
    // 44000: established. 44001: a SYN the backend has not answered yet.
    h.run(&client(44000, SYN));
    h.run(&syn_ack(packet(
        6, BACKEND, 8080, CLIENT, 44000, 0, 0, true,
    )));
    h.run(&client(44000, ACK));
    h.run(&client(44001, SYN));
    h.run(&packet(17, CLIENT, 44002, VIP, 53, 0, 0, true));
    h.set_backend(NEXT_BACKEND);
    // Seen more than a second ago: the next packet checks the flow's backend.
    for (sport, proto, port) in [(44000, 6, 80), (44001, 6, 80), (44002, 17, 53)] {
        age(&h, CLIENT, sport, VIP, port, proto, 3);
    }
    for flags in [ACK, FIN | ACK] {
        let p = parse_checked(&h.run(&client(44000, flags)).1);
        assert_eq!(
            p.dst, BACKEND,
            "the connection stays on its pod (flags {flags:#x})"
        );
    }
    let answer = with_flags(packet(6, BACKEND, 8080, CLIENT, 44000, 0, 0, true), ACK);
    assert_eq!(
        parse_checked(&h.run(&answer).1).src,
        VIP,
        "its answers still from the VIP"
    );
    let p = parse_checked(&h.run(&client(44001, SYN)).1);
    assert_eq!(p.dst, NEXT_BACKEND, "the unanswered handshake moves");
    let p = parse_checked(&h.run(&packet(17, CLIENT, 44002, VIP, 53, 0, 0, true)).1);
    assert_eq!(p.dst, NEXT_BACKEND, "the UDP flow moves");
}

/// Records of the program's log ring buffer, mapped as the agent maps them.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<proxy_agent::bpf_log::Forwarded>>>);

impl log::Log for Captured {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        let f = proxy_agent::bpf_log::forwarded(r.target(), r.level(), &r.args().to_string());
        self.0.lock().unwrap().push(f);
    }
    fn flush(&self) {}
}

/// The packet path's slow-path events reach the log at their level only, with the frontend
/// and addresses as fields: a REJECT at debug, a packet dropped after a failed rewrite at
/// warn; nothing while the level is below theirs.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_packet_paths_slow_path_events_are_logged_at_their_level() {
    use proxy_agent::bpf_log::{Forwarded, Level, write_level};
    let mut h = Harness::new();
    // Two loads on the same pinned maps (and level), each with its own ring buffer: the
    // agent's, and one whose second packet write fails (a DNAT dropped part way).
    let mut failing = h.with_failing_write(2);
    let captured = Captured::default();
    let mut loggers = [&mut h.ebpf, &mut failing]
        .map(|e| aya_log::EbpfLogger::init_with_logger(e, captured.clone()).unwrap());
    let mut take = || -> Vec<Forwarded> {
        loggers.iter_mut().for_each(aya_log::EbpfLogger::flush);
        std::mem::take(&mut *captured.0.lock().unwrap())
    };
    let reject = packet(6, CLIENT, 40000, EMPTY_VIP, 80, 0, 0, true);
    let dnat = packet(6, CLIENT, 40001, VIP, 80, 0, 0, true);
    let run = || {
        assert_eq!(h.run(&reject).0, REDIRECT);
        assert_eq!(run_on(&failing, &dnat).0, SHOT);
    };

    write_level(&h.pins.path, Level::Off).unwrap();
    run();
    assert_eq!(take(), [], "logging off");
    write_level(&h.pins.path, Level::Info).unwrap();
    run();
    let got = take();
    let events: Vec<&str> = got.iter().map(|f| f.event.as_str()).collect();
    assert_eq!(events, ["tc_rewrite_failed_dropped"], "info: {got:?}");

    write_level(&h.pins.path, Level::Debug).unwrap();
    run();
    let got = take();
    let rejected = got.iter().find(|f| f.event == "tc_no_endpoints_rejected");
    let dropped = got.iter().find(|f| f.event == "tc_rewrite_failed_dropped");
    let (Some(rejected), Some(dropped), 2) = (rejected, dropped, got.len()) else {
        panic!("debug: {got:?}");
    };
    assert_eq!(
        (
            rejected.level.to_string().as_str(),
            rejected.program.as_str(),
            rejected.frontend.as_deref(),
            rejected.client.as_deref(),
        ),
        (
            "DEBUG",
            "proxy_tc",
            Some("10.96.0.11:80/tcp"),
            Some("10.1.0.2:40000"),
        ),
        "{rejected:?}"
    );
    assert_eq!(
        (
            dropped.level.to_string().as_str(),
            dropped.source.as_deref(),
            dropped.destination.as_deref(),
        ),
        ("WARN", Some("10.1.0.2:40001"), Some("10.96.0.10:80/tcp")),
        "{dropped:?}"
    );
}
