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
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use proxy_common::{
    BACKEND_MAP_ENTRIES, Backend, COUNTERS_MAP_ENTRIES, Counter, PROTO_TCP, PROTO_UDP,
    REV_NAT_MAP_ENTRIES, RevNat, SOCK_REV_NAT_MAP_ENTRIES, SVC_FLAG_NO_LOCAL_ENDPOINTS,
    SVC_MAP_ENTRIES, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue,
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
    let rkey = SockRevNatKey {
        cookie,
        addr_be: backend.addr_be,
        port_be: backend.port_be,
        _pad: 0,
    };
    let rval = SockRevNatValue {
        vip_be,
        port_be,
        rev_nat_id: master.rev_nat_id,
    };
    if PROXY_SKNAT_V1.insert(rkey, rval, BPF_ANY).is_err() {
        count(Counter::SockRevNatUpdateFailed);
    }

    sa.user_ip4 = backend.addr_be;
    sa.user_port = u32::from(backend.port_be);
    count(match hook {
        Forward::Connect => Counter::ConnectTranslated,
        Forward::Sendmsg => Counter::SendmsgTranslated,
    });
    ALLOW
}

/// Rewrites a backend address that this socket reached through a ClusterIP back to it.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, counter: Counter) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr to this program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rkey = SockRevNatKey {
        cookie,
        addr_be: sa.user_ip4,
        port_be: sa.user_port as u16,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let rval = match unsafe { PROXY_SKNAT_V1.get(rkey) } {
        Some(v) => *v,
        None => return ALLOW,
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
