//! Terminates connected UDP sockets that the socket path pinned to a backend that is gone
//! (kube-proxy gets the same effect by flushing conntrack: the next datagram is NATed anew). A
//! connected UDP socket was rewritten once, at connect(), so only destroying it makes the
//! application reconnect, and connect4 then picks a live backend.
//!
//! sock_diag (`SOCK_DESTROY`, CONFIG_INET_DIAG_DESTROY) works on one network namespace at a
//! time, so a thread visits each namespace of the host. Only sockets this datapath translated
//! are touched: their cookie and backend are in the socket reverse-NAT map.
//! (aya-ebpf 0.2 cannot express a socket iterator calling `bpf_sock_destroy`, the in-kernel
//! way; sock_diag is what `ss -K` uses.)

use std::{
    collections::BTreeSet,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use proxy_common::{Backend, PROTO_UDP, SockRevNatKey};

use crate::netlink::{self, Netlink};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// A connected UDP socket is in TCP_ESTABLISHED (1).
const UDP_CONNECTED_STATES: u32 = 1 << 1;

/// `struct inet_diag_sockid` (all network order but `if` and `cookie`).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

const _: () = assert!(size_of::<SockId>() == 48 && size_of::<Request>() == 56);

fn message(ty: u16, flags: u16, req: &Request) -> Vec<u8> {
    // SAFETY: Request is repr(C) plain integers without padding (size asserted above).
    let payload = unsafe {
        std::slice::from_raw_parts((req as *const Request).cast::<u8>(), size_of::<Request>())
    };
    netlink::message(ty, flags, payload)
}

/// Connected UDP sockets of this network namespace whose peer is one of `peers`.
fn connected_udp_to(peers: &[Backend]) -> io::Result<Vec<SockId>> {
    let diag = Netlink::open(libc::NETLINK_SOCK_DIAG)?;
    let req = Request {
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_UDP as u8,
        states: UDP_CONNECTED_STATES,
        ..Default::default()
    };
    diag.send(&message(
        SOCK_DIAG_BY_FAMILY,
        (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        &req,
    ))?;
    let mut out = Vec::new();
    diag.read(|payload| {
        // struct inet_diag_msg: family, state, timer, retrans, then the sockid.
        if payload.len() < 4 + size_of::<SockId>() {
            return;
        }
        // SAFETY: the kernel's inet_diag_msg holds a SockId at offset 4; read unaligned.
        let id: SockId = unsafe { std::ptr::read_unaligned(payload[4..].as_ptr().cast()) };
        if peers
            .iter()
            .any(|b| b.addr_be == id.dst[0] && b.port_be == id.dport)
        {
            out.push(id);
        }
    })?;
    Ok(out)
}

fn destroy(id: &SockId) -> io::Result<()> {
    let diag = Netlink::open(libc::NETLINK_SOCK_DIAG)?;
    let req = Request {
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_UDP as u8,
        states: u32::MAX,
        id: *id,
        ..Default::default()
    };
    diag.send(&message(
        SOCK_DESTROY,
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        &req,
    ))?;
    diag.read(|_| {})
}

/// Whether this kernel destroys sockets on request (CONFIG_INET_DIAG_DESTROY): asks it to
/// destroy a UDP socket that does not exist, which such a kernel answers with ENOENT (one
/// without answers EOPNOTSUPP).
pub fn can_destroy() -> io::Result<()> {
    let nobody = SockId {
        // INET_DIAG_NOCOOKIE: match by address only (all zero: no socket).
        cookie: [u32::MAX; 2],
        ..Default::default()
    };
    match destroy(&nobody) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Every distinct network namespace of the host (by inode), as a path to open.
fn namespaces() -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"))
        .collect();
    candidates.extend(
        std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    );
    for p in candidates {
        if let Ok(m) = std::fs::metadata(&p)
            && seen.insert((m.dev(), m.ino()))
        {
            out.push(p);
        }
    }
    out
}

/// Destroys, in every network namespace, the connected UDP sockets to `removed` backends for
/// which `translated` says this datapath made the connection (socket cookie + backend).
/// Returns how many were destroyed. Runs on a thread of its own (setns changes the thread).
pub fn destroy_udp_sockets_to(
    removed: &[Backend],
    translated: impl Fn(&SockRevNatKey) -> bool + Send + 'static,
) -> io::Result<usize> {
    let udp: Vec<Backend> = removed
        .iter()
        .filter(|b| b.proto == PROTO_UDP)
        .copied()
        .collect();
    if udp.is_empty() {
        return Ok(0);
    }
    std::thread::spawn(move || {
        let mut destroyed = 0;
        for ns in namespaces() {
            let Ok(f) = File::open(&ns) else { continue };
            // SAFETY: a namespace fd; CLONE_NEWNET moves only this thread.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                continue;
            }
            let Ok(ids) = connected_udp_to(&udp) else {
                continue;
            };
            for id in ids {
                let cookie = u64::from(id.cookie[0]) | (u64::from(id.cookie[1]) << 32);
                let key = SockRevNatKey::new(cookie, id.dst[0], id.dport);
                if translated(&key) && destroy(&id).is_ok() {
                    destroyed += 1;
                }
            }
        }
        destroyed
    })
    .join()
    .map_err(|_| io::Error::other("socket cleanup thread panicked"))
}
