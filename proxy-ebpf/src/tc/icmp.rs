//! ICMP on the packet path: nothing answers for a ClusterIP (it is not a host), and errors a
//! backend (or a router on the way) sends about a translated flow are made to speak of the VIP.

use network_types::icmp::{Icmpv4Hdr, Icmpv4Type};
use proxy_common::Counter;

use super::{
    conntrack::{self, Tuple},
    packet::{DROP, Failed, PASS, Packet},
    parse::{
        IP_CSUM_OFF, IP_MIN_HLEN, IP_SADDR_OFF, IPH_CSUM, IPH_DADDR, IPH_PROTO, IPH_SADDR, Ipv4,
        L4_DPORT, L4_SPORT, PROTO_TCP, PROTO_UDP, header_len,
    },
};
use crate::{lb, maps::count};

const ICMP_DEST_UNREACH: u8 = Icmpv4Type::DestinationUnreachable as u8;
/// (network-types names no "time exceeded".)
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_CSUM: usize = core::mem::offset_of!(Icmpv4Hdr, check);

/// An ICMP packet: dropped when it is to a ClusterIP; an error about a translated flow is
/// rewritten back to the VIP; anything else passes.
#[inline(always)]
pub fn handle(pkt: &mut Packet, ip: &Ipv4) -> Result<i32, Failed> {
    if lb::is_vip(ip.daddr) {
        count(Counter::IcmpToVipDropped);
        return Ok(DROP);
    }
    if ip.fragment {
        return Ok(PASS);
    }
    error_to_vip(pkt, ip.l4, ip.saddr)
}

/// An ICMP error about a translated flow quotes the client's packet as it left the node: to
/// the backend. The client only knows VIP:port, so rewrite the quoted destination (and the
/// outer source, when the backend itself answers) back to it, fixing the quoted IP checksum
/// and the ICMP checksum.
#[inline(always)]
fn error_to_vip(pkt: &mut Packet, icmp: usize, outer_saddr: u32) -> Result<i32, Failed> {
    let ty: u8 = pkt.load(icmp)?;
    if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED {
        return Ok(PASS);
    }
    let inner = icmp + Icmpv4Hdr::LEN;
    let inner_ihl = header_len(pkt.load(inner)?);
    if inner_ihl < IP_MIN_HLEN {
        return Ok(PASS);
    }
    let proto: u8 = pkt.load(inner + IPH_PROTO)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(PASS);
    }
    let client: u32 = pkt.load(inner + IPH_SADDR)?;
    let backend: u32 = pkt.load(inner + IPH_DADDR)?;
    let l4 = inner + inner_ihl;
    let cport: u16 = pkt.load(l4 + L4_SPORT)?;
    let bport: u16 = pkt.load(l4 + L4_DPORT)?;
    let old_inner_csum: u16 = pkt.load(inner + IPH_CSUM)?;
    // The quoted packet went client -> backend: the flow's reply is backend -> client.
    let quoted = Tuple {
        saddr: client,
        sport: cport,
        daddr: backend,
        dport: bport,
        proto,
    };
    let reply = quoted.reply_from(backend, bport);
    let Some(v) = conntrack::reply(&reply, conntrack::now_s()) else {
        return Ok(PASS);
    };
    let icmp_csum = icmp + ICMP_CSUM;
    // Quoted IP header: destination and its checksum; both are covered by the ICMP checksum.
    pkt.store(inner + IPH_DADDR, &v.addr_be)?;
    pkt.l3_csum_replace(inner + IPH_CSUM, backend, v.addr_be)?;
    let new_inner_csum: u16 = pkt.load(inner + IPH_CSUM)?;
    pkt.l4_csum_replace(icmp_csum, backend, v.addr_be, 4)?;
    pkt.l4_csum_replace(
        icmp_csum,
        u32::from(old_inner_csum),
        u32::from(new_inner_csum),
        2,
    )?;
    // Quoted destination port.
    pkt.store(l4 + L4_DPORT, &v.port_be)?;
    pkt.l4_csum_replace(icmp_csum, u32::from(bport), u32::from(v.port_be), 2)?;
    // The backend itself answered: the error comes from the VIP, as the client expects.
    if outer_saddr == backend {
        pkt.store(IP_SADDR_OFF, &v.addr_be)?;
        pkt.l3_csum_replace(IP_CSUM_OFF, backend, v.addr_be)?;
    }
    count(Counter::TcReversed);
    Ok(PASS)
}
