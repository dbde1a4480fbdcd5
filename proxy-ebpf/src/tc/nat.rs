//! Rewriting one end (address and port) of a TCP/UDP packet, with both checksums fixed
//! incrementally: the IP header's, and the L4 one, whose pseudo-header covers the address.

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};

use super::{
    csum,
    packet::{Failed, Packet},
    parse::{IP_CSUM_OFF, Ipv4, L4, L4_DPORT, L4_SPORT, PROTO_UDP},
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
    // The IP checksum is computed here and written with the address, in one write: it lies
    // just before the addresses (checksum, source, destination).
    let (old_addr, port_off, old_port) = match end {
        End::Source => (ip.saddr, l4.off + L4_SPORT, l4.sport),
        End::Destination => (ip.daddr, l4.off + L4_DPORT, l4.dport),
    };
    let check = csum::replace4(ip.csum, old_addr, addr).to_ne_bytes();
    match end {
        End::Source => {
            let [a, b, c, d] = addr.to_ne_bytes();
            pkt.store(IP_CSUM_OFF, &[check[0], check[1], a, b, c, d])?;
        }
        End::Destination => {
            let ([s0, s1, s2, s3], [d0, d1, d2, d3]) = (ip.saddr.to_ne_bytes(), addr.to_ne_bytes());
            let bytes = [check[0], check[1], s0, s1, s2, s3, d0, d1, d2, d3];
            pkt.store(IP_CSUM_OFF, &bytes)?;
        }
    }
    pkt.store(port_off, &port)?;
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
