//! Crafted packets (Ethernet + IPv4 + TCP/UDP/ICMP, checksums valid) for the TC program's
//! tests and its per-packet benchmark, both through `BPF_PROG_TEST_RUN`.

/// The Internet checksum of `data` (big-endian words), starting from the sum `initial`.
pub fn csum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sum of the IPv4 pseudo-header, for TCP/UDP checksums.
pub fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum()
}

/// Ethernet + IPv4 (with `options` words of IP options) + TCP/UDP/ICMP, checksums valid.
#[allow(
    clippy::too_many_arguments,
    reason = "a packet literal reads best positionally"
)]
pub fn packet(
    proto: u8,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    frag: u16,
    options: usize,
    udp_csum: bool,
) -> Vec<u8> {
    let mut l4 = match proto {
        6 => {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&sport.to_be_bytes());
            t[2..4].copy_from_slice(&dport.to_be_bytes());
            t[4..8].copy_from_slice(&1234u32.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = 0x02; // SYN
            t[14..16].copy_from_slice(&64240u16.to_be_bytes());
            t.extend_from_slice(b"payload!");
            t
        }
        17 => {
            let mut u = vec![0u8; 8];
            u[0..2].copy_from_slice(&sport.to_be_bytes());
            u[2..4].copy_from_slice(&dport.to_be_bytes());
            u.extend_from_slice(b"dns query");
            let len = u.len() as u16;
            u[4..6].copy_from_slice(&len.to_be_bytes());
            u
        }
        _ => vec![8, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'], // ICMP echo request
    };
    let csum_off = match proto {
        6 => Some(16),
        17 if udp_csum => Some(6),
        1 => Some(2),
        _ => None,
    };
    if let Some(off) = csum_off {
        let init = if proto == 1 {
            0
        } else {
            pseudo(src, dst, proto, l4.len())
        };
        let c = csum(&l4, init);
        l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
    }
    let ihl = 20 + options * 4;
    let mut ip = vec![0u8; ihl];
    ip[0] = 0x40 | (ihl / 4) as u8;
    ip[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    for o in ip[20..].iter_mut() {
        *o = 1; // NOP options
    }
    let c = csum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut eth = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    eth.extend(ip);
    eth.extend(l4);
    eth
}

/// TCP flags (the byte before the window).
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// The TCP packet `p` (as [`packet`] makes it: a SYN) with other flags, its checksum valid.
pub fn with_flags(mut p: Vec<u8>, flags: u8) -> Vec<u8> {
    let ihl = usize::from(p[14] & 0x0f) * 4;
    let l4 = 14 + ihl;
    p[l4 + 13] = flags;
    p[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
    let (src, dst) = (p[26..30].try_into().unwrap(), p[30..34].try_into().unwrap());
    let c = csum(&p[l4..], pseudo(src, dst, 6, p.len() - l4));
    p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    p
}

/// A backend's answer to a SYN.
pub fn syn_ack(p: Vec<u8>) -> Vec<u8> {
    with_flags(p, SYN | ACK)
}
