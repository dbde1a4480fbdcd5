//! The socket hooks (cgroup sock_addr). The forward hooks (connect4, sendmsg4) rewrite
//! ClusterIP:port to a backend IP:targetPort before the kernel routes anything, so a
//! translated socket never carries the VIP on the wire. The reverse hooks (recvmsg4,
//! getpeername4) make the socket report the ClusterIP:port again.
//! Rules (../shared/DESIGN.md): never break a connect because of an internal miss (translate
//! or proceed); a Service with no usable endpoint fails fast; O(1) lookups only.

use aya_ebpf::{
    Global,
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    AFFINITY_CLIENT_NETNS, Counter, PROTO_TCP, PROTO_UDP, RejectMode, ServiceKey, SockRevNatKey,
    SockRevNatValue, SockSlot, cookie_hash,
};

use crate::{
    lb::{self, Flow, NoBackend, Selection},
    log::{event, host, proto_name},
    maps::{PROXY_RNAT_V1, PROXY_SKNAT_V1, PROXY_SKSLOT_V1, count},
};

/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    Connect,
    Sendmsg,
}

impl Forward {
    /// The program's name, as its log records' target (a constant in each program: the hook
    /// is known where the forward code is inlined).
    #[inline(always)]
    fn program(self) -> &'static str {
        match self {
            Forward::Connect => "proxy_connect4",
            Forward::Sendmsg => "proxy_sendmsg4",
        }
    }
}

/// Picks a backend for ClusterIP:port and rewrites the socket address to it.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, hook: Forward) -> Result<i32, i32> {
    // SAFETY: the kernel hands a valid bpf_sock_addr to this program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(ALLOW);
    }
    let vip_be = sa.user_ip4;
    // user_port holds the port in network byte order in its low 16 bits.
    let port_be = sa.user_port as u16;
    let svc = ServiceKey::master(vip_be, port_be, proto);
    let master = lb::lookup_service(svc).ok_or(ALLOW)?;
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let mut flow = Flow {
        client_kind: 0,
        client: 0,
        hash: cookie_hash(cookie),
    };
    // The client is the pod: its network namespace (host-network pods share the node's).
    if master.affinity_timeout_s != 0 && PROXY_NETNS_COOKIE.load() != 0 {
        flow.client_kind = AFFINITY_CLIENT_NETNS;
        // SAFETY: plain helper call on this program's context.
        flow.client = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    }
    let chosen = match lb::select_backend(svc, &master, &flow) {
        Selection::Backend(c) => c,
        Selection::Reject(why) => return Ok(reject(hook, why, vip_be, port_be, proto)),
        Selection::Missing => {
            let (vip, port) = host(vip_be, port_be);
            event!(
                Warn,
                hook.program(),
                "backend_missing frontend={:i}:{}/{}",
                vip,
                port,
                proto_name(proto)
            );
            return Ok(ALLOW);
        }
    };
    let backend = chosen.backend;

    // Record the reverse mapping before rewriting, so a reply can never arrive unmapped.
    let peer = SockRevNatKey::new(cookie, backend.addr_be, backend.port_be);
    let rev = SockRevNatValue {
        vip_be,
        port_be,
        rev_nat_id: master.rev_nat_id,
    };
    if hook == Forward::Connect && proto == PROTO_TCP {
        record_tcp(peer, rev);
    } else if PROXY_SKNAT_V1.insert(peer, rev, BPF_ANY.into()).is_err() {
        // UDP: an unconnected socket may talk to many frontends, so one entry per peer.
        count(Counter::SockRevNatUpdateFailed);
        let (vip, port) = host(vip_be, port_be);
        let (addr, bport) = host(backend.addr_be, backend.port_be);
        event!(
            Warn,
            hook.program(),
            "sock_rev_nat_update_failed frontend={:i}:{}/{} backend={:i}:{}",
            vip,
            port,
            proto_name(proto),
            addr,
            bport
        );
    }

    sa.user_ip4 = backend.addr_be;
    sa.user_port = u32::from(backend.port_be);
    count(match hook {
        Forward::Connect => Counter::ConnectTranslated,
        Forward::Sendmsg => Counter::SendmsgTranslated,
    });
    Ok(ALLOW)
}

/// How a refusal reaches the application, set by the agent from what the kernel offers (a
/// [`RejectMode`]). Read-only data: the verifier knows the value and skips the branches not
/// taken, so a kernel without `bpf_set_retval` never sees the call.
#[unsafe(no_mangle)]
static PROXY_REJECT_MODE: Global<u32> = Global::new(RejectMode::Errno as u32);

/// Whether the kernel lets these hooks call `bpf_get_netns_cookie` (set at load time from the
/// probe; read-only, so without it the verifier never sees the call and affinity is off on
/// the socket path).
#[unsafe(no_mangle)]
static PROXY_NETNS_COOKIE: Global<u32> = Global::new(1);

/// No backend for frontend `vip:port/proto`: the syscall fails at once with the errno that
/// says why (or, with the packet path and no `bpf_set_retval`, goes on untranslated for the
/// TC program to refuse).
#[inline(always)]
fn reject(hook: Forward, why: NoBackend, vip_be: u32, port_be: u16, proto: u8) -> i32 {
    let mode = PROXY_REJECT_MODE.load();
    let (vip, port) = host(vip_be, port_be);
    let errno = match why {
        NoBackend::NoLocal => {
            count(Counter::NoLocalEndpointsRejected);
            event!(
                Info,
                hook.program(),
                "no_local_endpoints_rejected frontend={:i}:{}/{}",
                vip,
                port,
                proto_name(proto)
            );
            EHOSTUNREACH
        }
        NoBackend::Refused if mode == RejectMode::PacketPath as u32 => return ALLOW,
        NoBackend::Refused => {
            count(Counter::NoEndpointsRejected);
            event!(
                Info,
                hook.program(),
                "no_endpoints_rejected frontend={:i}:{}/{}",
                vip,
                port,
                proto_name(proto)
            );
            ECONNREFUSED
        }
    };
    if mode == RejectMode::Errno as u32 {
        // SAFETY: plain helper call; connect4/sendmsg4 may set the syscall's return value.
        unsafe { bpf_set_retval(-errno) };
    }
    REJECT
}

/// A TCP socket has one peer, so its reverse mapping is one plain store into the array slot
/// its cookie selects: no hashing, no lock, no eviction work (an LRU insert per connect cost
/// measurably more; see the README's benchmarks). Cookies are handed out in increasing order
/// (per-CPU batches), so a slot is reused only some `SOCK_SLOT_MAP_ENTRIES` cookies later: an
/// entry lives about as long as in an LRU of the same size. The reader checks the cookie, so a
/// reused slot is a miss.
#[inline(always)]
fn record_tcp(peer: SockRevNatKey, rev: SockRevNatValue) {
    if let Some(slot) = PROXY_SKSLOT_V1.get_ptr_mut(SockSlot::index(peer.cookie)) {
        // SAFETY: an array value pointer from the kernel, valid for this program run.
        unsafe { *slot = SockSlot::new(peer, rev) };
    }
}

/// Rewrites a backend address that this socket reached through a ClusterIP back to it.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, counter: Counter) -> Result<i32, i32> {
    // SAFETY: the kernel hands a valid bpf_sock_addr to this program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let peer = SockRevNatKey::new(cookie, sa.user_ip4, sa.user_port as u16);
    let slot = if sa.protocol as u8 == PROTO_TCP {
        PROXY_SKSLOT_V1
            .get(SockSlot::index(cookie))
            .filter(|s| s.holds(&peer))
            .map(|s| s.rev)
    } else {
        None
    };
    // UDP; or a TCP socket an earlier version of these programs recorded there.
    // SAFETY: copied out at once.
    let rev = slot.or_else(|| unsafe { PROXY_SKNAT_V1.get(peer) }.copied());
    let rev = rev.ok_or(ALLOW)?;
    // Only while the frontend still exists with that address: a stale entry must not make a
    // socket claim to talk to a VIP that has since been reassigned.
    // SAFETY: copied out at once.
    match unsafe { PROXY_RNAT_V1.get(rev.rev_nat_id) } {
        Some(rn) if rn.vip_be == rev.vip_be && rn.port_be == rev.port_be => {}
        _ => return Ok(ALLOW),
    }
    sa.user_ip4 = rev.vip_be;
    sa.user_port = u32::from(rev.port_be);
    count(counter);
    Ok(ALLOW)
}
