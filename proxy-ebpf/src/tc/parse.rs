//! Where things are in a packet: named header offsets, and the parsing of Ethernet + IPv4 +
//! the TCP/UDP ports. Addresses and ports stay in network byte order, as the maps hold them.

use core::mem::offset_of;

use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use super::packet::{Failed, Packet};

pub const ETH_HLEN: usize = EthHdr::LEN;
const ETH_TYPE_OFF: usize = offset_of!(EthHdr, ether_type);
/// The IPv4 header follows Ethernet (no VLAN tags on a pod's veth).
pub const IP_OFF: usize = ETH_HLEN;
pub const IP_MIN_HLEN: usize = Ipv4Hdr::LEN;
const IP_VIHL_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, vihl);
const IP_FRAGS_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, frags);
const IP_PROTO_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, proto);
pub const IP_CSUM_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, check);
pub const IP_SADDR_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, src_addr);
pub const IP_DADDR_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, dst_addr);
// The rewrite writes the checksum and the addresses as one run of bytes.
const _: () = assert!(IP_SADDR_OFF == IP_CSUM_OFF + 2 && IP_DADDR_OFF == IP_SADDR_OFF + 4);
/// Offsets inside an IPv4 header (for a quoted one, in ICMP errors).
pub const IPH_PROTO: usize = offset_of!(Ipv4Hdr, proto);
pub const IPH_CSUM: usize = offset_of!(Ipv4Hdr, check);
pub const IPH_SADDR: usize = offset_of!(Ipv4Hdr, src_addr);
pub const IPH_DADDR: usize = offset_of!(Ipv4Hdr, dst_addr);

/// "More fragments" and the fragment offset (RFC 791): either set means a fragment.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// Ports are where TCP and UDP both keep them.
pub const L4_SPORT: usize = offset_of!(TcpHdr, source);
pub const L4_DPORT: usize = offset_of!(TcpHdr, dest);
const _: () = assert!(L4_SPORT == offset_of!(UdpHdr, src) && L4_DPORT == offset_of!(UdpHdr, dst));
const TCP_CSUM: usize = offset_of!(TcpHdr, check);
/// The flags byte (CWR ECE URG ACK PSH RST SYN FIN) is the one before the window.
const TCP_FLAGS: usize = offset_of!(TcpHdr, window) - 1;
const _: () = assert!(TCP_FLAGS == 13);
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
const UDP_CSUM: usize = offset_of!(UdpHdr, check);

pub const PROTO_ICMP: u8 = IpProto::Icmp as u8;
pub const PROTO_TCP: u8 = IpProto::Tcp as u8;
pub const PROTO_UDP: u8 = IpProto::Udp as u8;
const _: () = assert!(PROTO_TCP == proxy_common::PROTO_TCP && PROTO_UDP == proxy_common::PROTO_UDP);

/// The length in bytes of an IPv4 header from its first byte (version, then IHL in 32-bit
/// words).
#[inline(always)]
pub fn header_len(vihl: u8) -> usize {
    usize::from(vihl & 0x0f) * 4
}

/// The IPv4 header of a packet.
pub struct Ipv4 {
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    /// The header's checksum, as it lies in memory.
    pub csum: u16,
    /// Where the L4 header begins (IP options are skipped by honouring IHL).
    pub l4: usize,
    /// A fragment, first or not (only the first carries ports).
    pub fragment: bool,
}

/// The IPv4 header, or None for another protocol or a header we do not understand.
#[inline(always)]
pub fn ipv4(pkt: &Packet) -> Result<Option<Ipv4>, Failed> {
    if pkt.load::<u16>(ETH_TYPE_OFF)? != EtherType::Ipv4 as u16 {
        return Ok(None);
    }
    let vihl: u8 = pkt.load(IP_VIHL_OFF)?;
    let ihl = header_len(vihl);
    if vihl >> 4 != 4 || ihl < IP_MIN_HLEN {
        return Ok(None);
    }
    let frags = u16::from_be(pkt.load::<u16>(IP_FRAGS_OFF)?);
    Ok(Some(Ipv4 {
        proto: pkt.load(IP_PROTO_OFF)?,
        saddr: pkt.load(IP_SADDR_OFF)?,
        daddr: pkt.load(IP_DADDR_OFF)?,
        csum: pkt.load(IP_CSUM_OFF)?,
        l4: IP_OFF + ihl,
        fragment: frags & (IP_MF | IP_OFFSET) != 0,
    }))
}

/// A TCP or UDP header's ports and checksum.
pub struct L4 {
    pub off: usize,
    pub sport: u16,
    pub dport: u16,
    pub csum_off: usize,
    /// A UDP datagram sent without a checksum (0), which stays so.
    pub no_csum: bool,
    /// TCP's flags ([`TCP_FIN`], [`TCP_SYN`], [`TCP_RST`], [`TCP_ACK`]); 0 for UDP.
    pub flags: u8,
}

/// The ports and checksum of a TCP or UDP header at `off`.
#[inline(always)]
pub fn l4(pkt: &Packet, proto: u8, off: usize) -> Result<L4, Failed> {
    let csum_off = off
        + if proto == PROTO_TCP {
            TCP_CSUM
        } else {
            UDP_CSUM
        };
    // Read now, so nothing the rewrite needs is missing once it has begun.
    let csum: u16 = pkt.load(csum_off)?;
    Ok(L4 {
        off,
        sport: pkt.load(off + L4_SPORT)?,
        dport: pkt.load(off + L4_DPORT)?,
        csum_off,
        no_csum: proto == PROTO_UDP && csum == 0,
        flags: if proto == PROTO_TCP {
            pkt.load(off + TCP_FLAGS)?
        } else {
            0
        },
    })
}
