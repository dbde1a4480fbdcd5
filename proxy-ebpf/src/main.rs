//! Socket-level ClusterIP load balancing: cgroup/connect4, sendmsg4, recvmsg4, getpeername4.
//!
//! The forward hooks (connect4, sendmsg4) rewrite ClusterIP:port to a backend IP:targetPort
//! before the kernel routes anything, so a translated socket never carries the VIP on the wire.
//! The reverse hooks (recvmsg4, getpeername4) make the socket report the ClusterIP:port again.
//! Rules (../shared/DESIGN.md): never break a connect because of an internal miss (translate or
//! proceed); a Service with no usable endpoint fails fast; O(1) lookups only.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_redirect, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};
use proxy_common::{
    BACKEND_MAP_ENTRIES, Backend, COUNTERS_MAP_ENTRIES, CT_DIR_FORWARD, CT_DIR_REPLY,
    CT_MAP_ENTRIES, Counter, CtKey, CtValue, PROTO_TCP, PROTO_UDP, REV_NAT_MAP_ENTRIES, RevNat,
    SOCK_REV_NAT_MAP_ENTRIES, SOCK_SLOT_MAP_ENTRIES, SVC_FLAG_NO_LOCAL_ENDPOINTS, SVC_MAP_ENTRIES,
    ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue, SockSlot, VIP_MAP_ENTRIES,
};

// Map names are the ABI names in proxy-common (checked by the agent's ABI test).
#[btf_map]
static PROXY_SVC_V1: HashMap<ServiceKey, ServiceValue, { SVC_MAP_ENTRIES as usize }> =
    HashMap::new();
#[btf_map]
static PROXY_BE_V1: HashMap<u32, Backend, { BACKEND_MAP_ENTRIES as usize }> = HashMap::new();
#[btf_map]
static PROXY_RNAT_V1: HashMap<u16, RevNat, { REV_NAT_MAP_ENTRIES as usize }> = HashMap::new();
#[btf_map]
static PROXY_SKNAT_V1: LruHashMap<
    SockRevNatKey,
    SockRevNatValue,
    { SOCK_REV_NAT_MAP_ENTRIES as usize },
> = LruHashMap::new();
#[btf_map]
static PROXY_SKSLOT_V1: Array<SockSlot, { SOCK_SLOT_MAP_ENTRIES as usize }> = Array::new();
#[btf_map]
static PROXY_VIP_V1: HashMap<u32, u32, { VIP_MAP_ENTRIES as usize }> = HashMap::new();
#[btf_map]
static PROXY_CT_V1: LruHashMap<CtKey, CtValue, { CT_MAP_ENTRIES as usize }> = LruHashMap::new();
#[btf_map]
static PROXY_CNT_V1: PerCpuArray<u64, { COUNTERS_MAP_ENTRIES as usize }> = PerCpuArray::new();

const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const BPF_ANY: u64 = 0;

#[inline(always)]
fn count(reason: Counter) {
    if let Some(slot) = PROXY_CNT_V1.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot is only touched by programs running on this CPU.
        unsafe { *slot += 1 };
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Forward {
    Connect,
    Sendmsg,
}

/// Picks a backend for ClusterIP:port and rewrites the socket address to it.
#[inline(always)]
fn forward(ctx: &SockAddrContext, hook: Forward) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr to this program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    let vip_be = sa.user_ip4;
    // user_port holds the port in network byte order in its low 16 bits.
    let port_be = sa.user_port as u16;
    let mut key = ServiceKey {
        vip_be,
        port_be,
        slot: 0,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: values are copied out at once; the writer replaces entries, never mutates them.
    let master = match unsafe { PROXY_SVC_V1.get(key) } {
        Some(v) => *v,
        None => return ALLOW,
    };
    if master.count == 0 {
        let errno = if master.flags & SVC_FLAG_NO_LOCAL_ENDPOINTS != 0 {
            count(Counter::NoLocalEndpointsRejected);
            EHOSTUNREACH
        } else {
            count(Counter::NoEndpointsRejected);
            ECONNREFUSED
        };
        // SAFETY: plain helper call; connect4/sendmsg4 may set the syscall's return value.
        unsafe { bpf_set_retval(-errno) };
        return REJECT;
    }
    // SAFETY: plain helper call.
    let pick = unsafe { bpf_get_prandom_u32() } % u32::from(master.count);
    key.slot = pick as u16 + 1;
    let backend_id = match unsafe { PROXY_SVC_V1.get(key) } {
        Some(v) => v.backend_id,
        None => {
            count(Counter::BackendMissing);
            return ALLOW;
        }
    };
    let backend = match unsafe { PROXY_BE_V1.get(backend_id) } {
        Some(b) => *b,
        None => {
            count(Counter::BackendMissing);
            return ALLOW;
        }
    };

    // Record the reverse mapping before rewriting, so a reply can never arrive unmapped.
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rev = SockRevNatValue {
        vip_be,
        port_be,
        rev_nat_id: master.rev_nat_id,
    };
    if hook == Forward::Connect && proto == PROTO_TCP {
        record_tcp(cookie, &backend, rev);
    } else {
        // UDP: an unconnected socket may talk to many frontends, so one entry per peer.
        let rkey = SockRevNatKey {
            cookie,
            addr_be: backend.addr_be,
            port_be: backend.port_be,
            _pad: 0,
        };
        if PROXY_SKNAT_V1.insert(rkey, rev, BPF_ANY).is_err() {
            count(Counter::SockRevNatUpdateFailed);
        }
    }

    sa.user_ip4 = backend.addr_be;
    sa.user_port = u32::from(backend.port_be);
    count(match hook {
        Forward::Connect => Counter::ConnectTranslated,
        Forward::Sendmsg => Counter::SendmsgTranslated,
    });
    ALLOW
}

/// A TCP socket has one peer, so its reverse mapping is one plain store into the array slot
/// its cookie selects: no hashing, no lock, no eviction work. An LRU insert here cost about 2 %
/// of the connection rate (the bench's interleaved socket-vs-direct windows), mostly in cache
/// misses on its 262144 cold elements. Cookies are handed out in increasing order (per-CPU
/// batches), so a slot is reused only some 262144 cookies later: an entry lives about as long
/// as in an LRU of the same size. The reader checks the cookie, so a reused slot is a miss.
#[inline(always)]
fn record_tcp(cookie: u64, backend: &Backend, rev: SockRevNatValue) {
    if let Some(slot) = PROXY_SKSLOT_V1.get_ptr_mut(SockSlot::index(cookie)) {
        // SAFETY: an array value pointer from the kernel, valid for this program run.
        unsafe {
            *slot = SockSlot {
                cookie,
                addr_be: backend.addr_be,
                port_be: backend.port_be,
                _pad: 0,
                rev,
            }
        };
    }
}

/// Rewrites a backend address that this socket reached through a ClusterIP back to it.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, counter: Counter) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr to this program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (addr_be, port_be) = (sa.user_ip4, sa.user_port as u16);
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let slot = if sa.protocol as u8 == PROTO_TCP {
        PROXY_SKSLOT_V1
            .get(SockSlot::index(cookie))
            .filter(|s| s.cookie == cookie && s.addr_be == addr_be && s.port_be == port_be)
            .map(|s| s.rev)
    } else {
        None
    };
    let rval = match slot {
        Some(rev) => rev,
        None => {
            // UDP; or a TCP socket an earlier version of these programs recorded there.
            let rkey = SockRevNatKey {
                cookie,
                addr_be,
                port_be,
                _pad: 0,
            };
            // SAFETY: copied out at once.
            match unsafe { PROXY_SKNAT_V1.get(rkey) } {
                Some(v) => *v,
                None => return ALLOW,
            }
        }
    };
    // Only while the frontend still exists with that address: a stale entry must not make a
    // socket claim to talk to a VIP that has since been reassigned.
    match unsafe { PROXY_RNAT_V1.get(rval.rev_nat_id) } {
        Some(rn) if rn.vip_be == rval.vip_be && rn.port_be == rval.port_be => {}
        _ => return ALLOW,
    }
    sa.user_ip4 = rval.vip_be;
    sa.user_port = u32::from(rval.port_be);
    count(counter);
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn proxy_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Forward::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn proxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Forward::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn proxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Counter::RecvmsgReversed)
}

#[cgroup_sock_addr(getpeername4)]
pub fn proxy_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Counter::GetpeernameReversed)
}

// ---- The packet path: TC ingress on the node's pod-facing interfaces ---------------------
//
// Client -> VIP:port packets arriving from a pod are rewritten to a backend before routing
// (DNAT), and recorded in PROXY_CT_V1 twice: a forward entry (so the flow keeps its backend)
// and a reply entry keyed by the backend's reply, which the same program, on the backend's
// interface, rewrites back to VIP:port. The routing decision then follows the new addresses.

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_ICMP: u8 = 1;
/// Let the next program or the stack decide (TCX_NEXT; "unspec" on clsact).
const TC_PASS: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SADDR_OFF: usize = ETH_HLEN + 12;
const IP_DADDR_OFF: usize = ETH_HLEN + 16;

#[classifier]
pub fn proxy_tc(ctx: TcContext) -> i32 {
    // A packet we cannot parse is not ours to judge.
    try_tc(&ctx).unwrap_or(TC_PASS)
}

/// Rewrites one address and port (source or destination), fixing the IP checksum and the
/// L4 checksum (whose pseudo-header covers the address).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    ctx: &TcContext,
    proto: u8,
    csum_off: usize,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    // UDP may carry no checksum (0): leave it so.
    let no_l4_csum = proto == PROTO_UDP && ctx.load::<u16>(csum_off)? == 0;
    if !no_l4_csum {
        let mangled = if proto == PROTO_UDP {
            BPF_F_MARK_MANGLED_0
        } else {
            0
        };
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_addr),
            u64::from(new_addr),
            BPF_F_PSEUDO_HDR | mangled | 4,
        )?;
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(new_port),
            mangled | 2,
        )?;
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(new_addr), 4)?;
    ctx.store(addr_off, &new_addr, 0)?;
    ctx.store(port_off, &new_port, 0)?;
    Ok(())
}

/// Ones' complement sum of 16-bit words, read as they lie in memory (little-endian on the
/// BPF target): folded and inverted, the result is stored back the same way, so no byte
/// swapping is needed (RFC 1071's byte-order independence).
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn sum_words(words: &[u32]) -> u32 {
    let mut sum = 0u32;
    for w in words {
        sum += (w & 0xffff) + (w >> 16);
    }
    sum
}

/// Largest packet [`reject`] answers (it quotes the whole packet; see there).
const REJECT_MAX_QUOTE: usize = 512;

/// kube-proxy's REJECT: turns the packet into an ICMP port unreachable from the VIP and sends
/// it back out of the interface it came in on; the client sees ECONNREFUSED at once, for TCP
/// and UDP alike. The whole original packet is quoted (RFC 1812 allows more than the minimum
/// 8 bytes): trimming is not possible here, because a locally sent packet is usually
/// CHECKSUM_PARTIAL and the kernel refuses to cut it before its checksum field. Packets
/// larger than [`REJECT_MAX_QUOTE`] are dropped instead (a first SYN or a DNS query is small).
#[inline(always)]
fn reject(ctx: &TcContext, saddr: u32, daddr: u32) -> Result<i32, i64> {
    let quoted = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    if !(28..=REJECT_MAX_QUOTE).contains(&quoted) {
        return Ok(TC_ACT_SHOT);
    }
    // A fixed-size load: load_bytes clamps its length, which the verifier cannot bound.
    let macs: [u8; 12] = ctx.load(0)?;
    // Room for the new IP (20) and ICMP (8) headers, between Ethernet and the old IP header.
    ctx.adjust_room(28, BPF_ADJ_ROOM_MAC, 0)?;
    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&macs[6..]);
    eth[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &eth, 0)?;

    // IP header, as 32-bit words in memory order: the VIP answers the client.
    let tot_len = u32::from(((28 + quoted) as u16).to_be());
    let mut ip: [u32; 5] = [
        0x45 | (tot_len << 16),
        0,
        64 | (u32::from(IPPROTO_ICMP) << 8),
        daddr,
        saddr,
    ];
    ip[2] |= u32::from(fold(sum_words(&ip))) << 16;
    ctx.store(ETH_HLEN, &ip, 0)?;

    // ICMP destination unreachable (3), port unreachable (3); checksum over the message.
    let icmp_off = ETH_HLEN + 20;
    let base = icmp_off + 8;
    let words = quoted / 4;
    let mut sum: u32 = 3 | (3 << 8);
    let mut i = 0;
    while i < REJECT_MAX_QUOTE / 4 {
        if i >= words {
            break;
        }
        let w: u32 = ctx.load(base + i * 4)?;
        sum += (w & 0xffff) + (w >> 16);
        i += 1;
    }
    let tail = base + words * 4;
    if quoted % 4 >= 2 {
        sum += u32::from(ctx.load::<u16>(tail)?);
    }
    if quoted % 2 == 1 {
        // A last odd byte is the low byte of a zero-padded word (memory order).
        sum += u32::from(ctx.load::<u8>(tail + ((quoted % 4) & 2))?);
    }
    let icmp: [u32; 2] = [3 | (3 << 8) | (u32::from(fold(sum)) << 16), 0];
    ctx.store(icmp_off, &icmp, 0)?;
    // SAFETY: plain helper call; ifindex is the interface the packet arrived on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// An ICMP error a backend (or a router on the way) sends about a translated flow quotes the
/// client's packet as it left the node: to the backend. The client only knows VIP:port, so
/// rewrite the quoted destination (and the outer source, when the backend itself answers)
/// back to it, fixing the quoted IP checksum and the ICMP checksum.
#[inline(always)]
fn icmp_error_to_vip(ctx: &TcContext, icmp: usize, outer_saddr: u32) -> Result<i32, i64> {
    let ty: u8 = ctx.load(icmp)?;
    if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED {
        return Ok(TC_PASS);
    }
    let inner = icmp + 8;
    let inner_ihl = usize::from(ctx.load::<u8>(inner)? & 0x0f) * 4;
    if inner_ihl < 20 {
        return Ok(TC_PASS);
    }
    let proto: u8 = ctx.load(inner + 9)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(TC_PASS);
    }
    let client: u32 = ctx.load(inner + 12)?;
    let backend: u32 = ctx.load(inner + 16)?;
    let l4 = inner + inner_ihl;
    let cport: u16 = ctx.load(l4)?;
    let bport: u16 = ctx.load(l4 + 2)?;
    let key = CtKey {
        saddr_be: backend,
        daddr_be: client,
        sport_be: bport,
        dport_be: cport,
        proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let Some(v) = (unsafe { PROXY_CT_V1.get(key) }).copied() else {
        return Ok(TC_PASS);
    };
    let icmp_csum = icmp + 2;
    // Quoted IP header: destination and its checksum; both are covered by the ICMP checksum.
    let old_inner_csum: u16 = ctx.load(inner + 10)?;
    ctx.l3_csum_replace(inner + 10, u64::from(backend), u64::from(v.addr_be), 4)?;
    let new_inner_csum: u16 = ctx.load(inner + 10)?;
    ctx.store(inner + 16, &v.addr_be, 0)?;
    ctx.l4_csum_replace(icmp_csum, u64::from(backend), u64::from(v.addr_be), 4)?;
    ctx.l4_csum_replace(
        icmp_csum,
        u64::from(old_inner_csum),
        u64::from(new_inner_csum),
        2,
    )?;
    // Quoted destination port.
    ctx.store(l4 + 2, &v.port_be, 0)?;
    ctx.l4_csum_replace(icmp_csum, u64::from(bport), u64::from(v.port_be), 2)?;
    // The backend itself answered: the error comes from the VIP, as the client expects.
    if outer_saddr == backend {
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(backend), u64::from(v.addr_be), 4)?;
        ctx.store(IP_SADDR_OFF, &v.addr_be, 0)?;
    }
    count(Counter::TcReversed);
    Ok(TC_PASS)
}

#[inline(always)]
fn try_tc(ctx: &TcContext) -> Result<i32, i64> {
    if u16::from_be(ctx.load::<u16>(12)?) != ETH_P_IP {
        return Ok(TC_PASS);
    }
    let ver_ihl: u8 = ctx.load(ETH_HLEN)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return Ok(TC_PASS);
    }
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6)?);
    let proto: u8 = ctx.load(ETH_HLEN + 9)?;
    // Addresses and ports stay in network byte order, as the maps hold them.
    let saddr: u32 = ctx.load(IP_SADDR_OFF)?;
    let daddr: u32 = ctx.load(IP_DADDR_OFF)?;

    if proto == IPPROTO_ICMP {
        // A ClusterIP is not a host: no echo replies, no errors from it.
        if unsafe { PROXY_VIP_V1.get(daddr) }.is_some() {
            count(Counter::IcmpToVipDropped);
            return Ok(TC_ACT_SHOT);
        }
        if frag & 0x3fff == 0 {
            return icmp_error_to_vip(ctx, ETH_HLEN + ihl, saddr);
        }
        return Ok(TC_PASS);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(TC_PASS);
    }
    // Fragments (MF set or an offset): only the first carries ports; pass them all unharmed.
    if frag & 0x3fff != 0 {
        if unsafe { PROXY_VIP_V1.get(daddr) }.is_some() {
            count(Counter::FragmentPassed);
        }
        return Ok(TC_PASS);
    }
    // IP options are skipped by honouring IHL.
    let l4 = ETH_HLEN + ihl;
    let sport: u16 = ctx.load(l4)?;
    let dport: u16 = ctx.load(l4 + 2)?;
    let csum_off = if proto == PROTO_TCP { l4 + 16 } else { l4 + 6 };

    // A backend's reply to a translated flow: back to VIP:port.
    let key = CtKey {
        saddr_be: saddr,
        daddr_be: daddr,
        sport_be: sport,
        dport_be: dport,
        proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    if let Some(v) = unsafe { PROXY_CT_V1.get(key) }.copied() {
        rewrite(
            ctx,
            proto,
            csum_off,
            IP_SADDR_OFF,
            saddr,
            v.addr_be,
            l4,
            sport,
            v.port_be,
        )?;
        count(Counter::TcReversed);
        return Ok(TC_PASS);
    }

    let svc = ServiceKey {
        vip_be: daddr,
        port_be: dport,
        slot: 0,
        proto,
        _pad: [0; 3],
    };
    let Some(master) = (unsafe { PROXY_SVC_V1.get(svc) }).copied() else {
        return Ok(TC_PASS);
    };
    let fkey = CtKey {
        dir: CT_DIR_FORWARD,
        ..key
    };
    // An established flow keeps its backend while that backend exists.
    let established = unsafe { PROXY_CT_V1.get(fkey) }.copied().filter(|v| {
        unsafe { PROXY_BE_V1.get(v.backend_id) }
            .is_some_and(|b| b.addr_be == v.addr_be && b.port_be == v.port_be)
    });
    let target = match established {
        Some(v) => v,
        None => {
            if master.count == 0 {
                if master.flags & SVC_FLAG_NO_LOCAL_ENDPOINTS != 0 {
                    count(Counter::TcNoLocalEndpointsDropped);
                    return Ok(TC_ACT_SHOT);
                }
                count(Counter::TcNoEndpointsRejected);
                return reject(ctx, saddr, daddr);
            }
            let pick = unsafe { bpf_get_prandom_u32() } % u32::from(master.count);
            let slot = ServiceKey {
                slot: pick as u16 + 1,
                ..svc
            };
            let Some(backend_id) = (unsafe { PROXY_SVC_V1.get(slot) }).map(|s| s.backend_id) else {
                count(Counter::BackendMissing);
                return Ok(TC_PASS);
            };
            let Some(b) = (unsafe { PROXY_BE_V1.get(backend_id) }).copied() else {
                count(Counter::BackendMissing);
                return Ok(TC_PASS);
            };
            let forward = CtValue {
                addr_be: b.addr_be,
                port_be: b.port_be,
                rev_nat_id: master.rev_nat_id,
                backend_id,
                _pad: 0,
            };
            let reply_key = CtKey {
                saddr_be: b.addr_be,
                daddr_be: saddr,
                sport_be: b.port_be,
                dport_be: sport,
                proto,
                dir: CT_DIR_REPLY,
                _pad: [0; 2],
            };
            let reply = CtValue {
                addr_be: daddr,
                port_be: dport,
                rev_nat_id: master.rev_nat_id,
                backend_id,
                _pad: 0,
            };
            // The reply entry first: a reply can never arrive before it.
            if PROXY_CT_V1.insert(reply_key, reply, BPF_ANY).is_err()
                || PROXY_CT_V1.insert(fkey, forward, BPF_ANY).is_err()
            {
                count(Counter::CtUpdateFailed);
            }
            forward
        }
    };
    rewrite(
        ctx,
        proto,
        csum_off,
        IP_DADDR_OFF,
        daddr,
        target.addr_be,
        l4 + 2,
        dport,
        target.port_be,
    )?;
    count(Counter::TcTranslated);
    Ok(TC_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
