//! kube-proxy's REJECT on the packet path: the packet becomes an ICMP port unreachable from
//! the VIP, sent back out of the interface it came in on, so the client sees ECONNREFUSED at
//! once, for TCP and UDP alike.

use aya_ebpf::helpers::bpf_redirect;
use network_types::{
    icmp::{Icmpv4Hdr, Icmpv4Type},
    ip::Ipv4Hdr,
};

use proxy_common::Counter;

use super::{
    csum::{fold, halves, sum_words},
    packet::{DROP, Failed, Packet},
    parse::{ETH_HLEN, Ipv4, PROTO_ICMP},
};
use crate::maps::count;

/// Largest packet answered (the whole packet is quoted; see [`port_unreachable`]).
const MAX_QUOTE: usize = 512;
/// What REJECT puts in front of the quoted packet.
const ADDED: usize = Ipv4Hdr::LEN + Icmpv4Hdr::LEN;
const MAC_LEN: usize = 6;
const ICMP_DEST_UNREACH: u8 = Icmpv4Type::DestinationUnreachable as u8;
const ICMP_PORT_UNREACH: u8 = 3;
const TTL: u8 = 64;
/// Version 4, a header of 5 words (no options).
const VERSION_IHL: u8 = 0x45;

/// Answers the packet with an ICMP port unreachable from its destination. The whole original
/// packet is quoted (RFC 1812 allows more than the minimum 8 bytes): trimming is not possible
/// here, because a locally sent packet is usually CHECKSUM_PARTIAL and the kernel refuses to
/// cut it before its checksum field. Packets larger than [`MAX_QUOTE`] are dropped instead (a
/// first SYN or a DNS query is small).
#[inline(always)]
pub fn port_unreachable(pkt: &mut Packet, ip: &Ipv4) -> Result<i32, Failed> {
    let quoted = pkt.len().saturating_sub(ETH_HLEN);
    if !(ADDED..=MAX_QUOTE).contains(&quoted) {
        count(Counter::TcNoEndpointsRejected);
        return Ok(DROP);
    }
    // A fixed-size load: load_bytes clamps its length, which the verifier cannot bound.
    let macs: [u8; 2 * MAC_LEN] = pkt.load(0)?;
    // Room for the new IP and ICMP headers, between Ethernet and the old IP header.
    pkt.adjust_room_mac(ADDED as i32)?;
    let mut eth = [0u8; 2 * MAC_LEN];
    eth[..MAC_LEN].copy_from_slice(&macs[MAC_LEN..]);
    eth[MAC_LEN..].copy_from_slice(&macs[..MAC_LEN]);
    pkt.store(0, &eth)?;

    // The IP header as 32-bit words in memory order (the checksum is summed as it lies):
    // the VIP answers the client.
    let tot_len = ((ADDED + quoted) as u16).to_be_bytes();
    let mut iph: [u32; 5] = [
        u32::from_ne_bytes([VERSION_IHL, 0, tot_len[0], tot_len[1]]),
        0, // id, flags, fragment offset
        u32::from_ne_bytes([TTL, PROTO_ICMP, 0, 0]),
        ip.daddr,
        ip.saddr,
    ];
    let check = fold(sum_words(&iph)).to_ne_bytes();
    iph[2] = u32::from_ne_bytes([TTL, PROTO_ICMP, check[0], check[1]]);
    pkt.store(ETH_HLEN, &iph)?;

    // The ICMP checksum covers its header and the quoted packet.
    let icmp_off = ETH_HLEN + Ipv4Hdr::LEN;
    let base = icmp_off + Icmpv4Hdr::LEN;
    let type_code = u32::from(u16::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_PORT_UNREACH]));
    let words = quoted / 4;
    let mut sum = type_code;
    let mut i = 0;
    while i < MAX_QUOTE / 4 {
        if i >= words {
            break;
        }
        sum += halves(pkt.load(base + i * 4)?);
        i += 1;
    }
    let tail = base + words * 4;
    if quoted % 4 >= 2 {
        sum += u32::from(pkt.load::<u16>(tail)?);
    }
    if quoted % 2 == 1 {
        // A last odd byte is the low byte of a zero-padded word (memory order).
        sum += u32::from(pkt.load::<u8>(tail + ((quoted % 4) & 2))?);
    }
    let icmp: [u32; 2] = [type_code | (u32::from(fold(sum)) << 16), 0];
    pkt.store(icmp_off, &icmp)?;
    // Counted once the answer is whole (a failure part way is counted as that).
    count(Counter::TcNoEndpointsRejected);
    // SAFETY: plain helper call; back out of the interface the packet arrived on.
    Ok(unsafe { bpf_redirect(pkt.ifindex(), 0) } as i32)
}
