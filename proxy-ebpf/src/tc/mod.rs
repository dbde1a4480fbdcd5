//! The packet path: TC ingress on the node's pod-facing interfaces.
//!
//! Client -> VIP:port packets arriving from a pod are rewritten to a backend before routing
//! (DNAT) and tracked ([`conntrack`]); the backend's replies, seen on the backend's interface,
//! are rewritten back to VIP:port. The routing decision then follows the new addresses.
//! A packet we cannot parse passes as it came; one we began to rewrite and could not finish is
//! dropped and counted ([`packet`]).

mod conntrack;
mod csum;
mod icmp;
mod nat;
mod packet;
mod parse;
mod reject;

use aya_ebpf::programs::TcContext;
use proxy_common::{AFFINITY_CLIENT_IP, CT_DIR_REPLY, Counter, CtValue, ServiceKey, tuple_hash};

use self::{
    conntrack::{Tracked, Tuple},
    nat::End,
    packet::{DROP, Failed, PASS, Packet},
    parse::{Ipv4, L4, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
};
use crate::{
    lb::{self, Flow, NoBackend, Selection},
    log::{event, host, proto_name},
    maps::count,
};

/// The program's name, as its log records' target.
const PROGRAM: &str = "proxy_tc";

/// One packet's verdict.
#[inline(always)]
pub fn packet(ctx: &TcContext) -> Result<i32, i32> {
    let mut pkt = Packet::new(ctx);
    handle(&mut pkt).map_err(|failed| pkt.verdict(failed))
}

#[inline(always)]
fn handle(pkt: &mut Packet) -> Result<i32, Failed> {
    let Some(ip) = parse::ipv4(pkt)? else {
        return Ok(PASS);
    };
    if ip.proto == PROTO_ICMP {
        let r = icmp::handle(pkt, &ip);
        if r.is_err() && pkt.written() {
            let (src, dst) = (u32::from_be(ip.saddr), u32::from_be(ip.daddr));
            event!(
                Warn,
                PROGRAM,
                "tc_rewrite_failed_dropped source={:i} destination={:i}/icmp",
                src,
                dst
            );
        }
        return r;
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return Ok(PASS);
    }
    // Fragments (first or not): only the first carries ports; pass them all unharmed.
    if ip.fragment {
        if lb::is_vip(ip.daddr) {
            count(Counter::FragmentPassed);
        }
        return Ok(PASS);
    }
    let l4 = parse::l4(pkt, ip.proto, ip.l4)?;
    let r = translate(pkt, &ip, &l4);
    // A failure after the first write drops the packet (`Packet::verdict`): say which.
    if r.is_err() && pkt.written() {
        let (src, sport) = host(ip.saddr, l4.sport);
        let (dst, dport) = host(ip.daddr, l4.dport);
        event!(
            Warn,
            PROGRAM,
            "tc_rewrite_failed_dropped source={:i}:{} destination={:i}:{}/{}",
            src,
            sport,
            dst,
            dport,
            proto_name(ip.proto)
        );
    }
    r
}

/// A TCP or UDP packet: a tracked flow's, a new one to a frontend, or none of ours.
#[inline(always)]
fn translate(pkt: &mut Packet, ip: &Ipv4, l4: &L4) -> Result<i32, Failed> {
    let tuple = Tuple {
        saddr: ip.saddr,
        sport: l4.sport,
        daddr: ip.daddr,
        dport: l4.dport,
        proto: ip.proto,
    };

    let now = conntrack::now_s();
    match conntrack::track(&tuple, l4.flags, now) {
        // A backend's reply to a translated flow: back from VIP:port.
        Tracked::Rewrite(v) if v.dir == CT_DIR_REPLY => {
            nat::rewrite(pkt, ip, l4, End::Source, v.addr_be, v.port_be)?;
            count(Counter::TcReversed);
            return Ok(PASS);
        }
        // A translated flow's packet: to its backend.
        Tracked::Rewrite(v) => return forward(pkt, ip, l4, &v),
        Tracked::Leave => return Ok(PASS),
        Tracked::New => {}
    }

    let svc = ServiceKey::master(ip.daddr, l4.dport, ip.proto);
    let Some(master) = lb::lookup_service(svc) else {
        conntrack::forget_replaced(&tuple, l4.flags);
        return Ok(PASS);
    };
    // The client is the source address.
    let flow = Flow {
        client_kind: AFFINITY_CLIENT_IP,
        client: u64::from(ip.saddr),
        hash: tuple_hash(ip.saddr, l4.sport, ip.daddr, l4.dport, ip.proto),
    };
    let target = match lb::select_backend(svc, &master, &flow) {
        Selection::Backend(chosen) => {
            conntrack::create(&tuple, l4.flags, &chosen, master.rev_nat_id, now)
        }
        Selection::Reject(NoBackend::NoLocal) => {
            count(Counter::TcNoLocalEndpointsDropped);
            // Per packet (a client retransmits): debug.
            let (vip, port, client, cport) = frontend_and_client(&tuple);
            event!(
                Debug,
                PROGRAM,
                "tc_no_local_endpoints_dropped frontend={:i}:{}/{} client={:i}:{}",
                vip,
                port,
                proto_name(tuple.proto),
                client,
                cport
            );
            return Ok(DROP);
        }
        Selection::Reject(NoBackend::Refused) => {
            let verdict = reject::port_unreachable(pkt, ip)?;
            let (vip, port, client, cport) = frontend_and_client(&tuple);
            event!(
                Debug,
                PROGRAM,
                "tc_no_endpoints_rejected frontend={:i}:{}/{} client={:i}:{}",
                vip,
                port,
                proto_name(tuple.proto),
                client,
                cport
            );
            return Ok(verdict);
        }
        Selection::Missing => {
            let (vip, port, client, cport) = frontend_and_client(&tuple);
            event!(
                Warn,
                PROGRAM,
                "backend_missing frontend={:i}:{}/{} client={:i}:{}",
                vip,
                port,
                proto_name(tuple.proto),
                client,
                cport
            );
            return Ok(PASS);
        }
    };
    forward(pkt, ip, l4, &target)
}

/// A new flow's frontend and client, in host order, for its log records.
#[inline(always)]
pub fn frontend_and_client(t: &Tuple) -> (u32, u16, u32, u16) {
    let (vip, port) = host(t.daddr, t.dport);
    let (client, cport) = host(t.saddr, t.sport);
    (vip, port, client, cport)
}

/// Rewrites a client's packet to its flow's backend.
#[inline(always)]
fn forward(pkt: &mut Packet, ip: &Ipv4, l4: &L4, target: &CtValue) -> Result<i32, Failed> {
    nat::rewrite(
        pkt,
        ip,
        l4,
        End::Destination,
        target.addr_be,
        target.port_be,
    )?;
    count(Counter::TcTranslated);
    Ok(PASS)
}
