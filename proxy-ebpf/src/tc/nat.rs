//! Rewriting one end (address and port) of a TCP/UDP packet, with both checksums fixed
//! incrementally: the IP header's, and the L4 one, whose pseudo-header covers the address.

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};

use super::{
    packet::{Failed, Packet},
    parse::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, Ipv4, L4, L4_DPORT, L4_SPORT, PROTO_UDP},
};

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy)]
pub enum End {
    /// A reply's source: the backend becomes the VIP again.
    Source,
    /// A request's destination: the VIP becomes the backend.
    Destination,
}

/// Rewrites `end` of the packet to `addr`:`port` (network order). Everything it needs was read
/// by the parser, so a failure here is a failure of a write (see [`Packet`]).
#[inline(always)]
pub fn rewrite(
    pkt: &mut Packet,
    ip: &Ipv4,
    l4: &L4,
    end: End,
    addr: u32,
    port: u16,
) -> Result<(), Failed> {
    let (addr_off, old_addr, port_off, old_port) = match end {
        End::Source => (IP_SADDR_OFF, ip.saddr, l4.off + L4_SPORT, l4.sport),
        End::Destination => (IP_DADDR_OFF, ip.daddr, l4.off + L4_DPORT, l4.dport),
    };
    pkt.store(addr_off, &addr)?;
    pkt.store(port_off, &port)?;
    pkt.l3_csum_replace(IP_CSUM_OFF, old_addr, addr)?;
    // UDP may carry no checksum (0): leave it so.
    if !l4.no_csum {
        // A UDP checksum that comes out as 0 must be written as 0xffff (0 means "none").
        let mangled = if ip.proto == PROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        let pseudo = u64::from(BPF_F_PSEUDO_HDR);
        pkt.l4_csum_replace(l4.csum_off, old_addr, addr, pseudo | mangled | 4)?;
        pkt.l4_csum_replace(
            l4.csum_off,
            u32::from(old_port),
            u32::from(port),
            mangled | 2,
        )?;
    }
    Ok(())
}
