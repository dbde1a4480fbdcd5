//! What the running kernel offers the datapath, found by trying it (distributions backport,
//! so a version number says little): each probe loads a two- or four-instruction program, or
//! asks a question the kernel answers only if it knows the feature. Nothing is attached.
//! [`plan`] turns the answers into the program variants the agent loads (a pure function, so
//! every combination is unit-tested).

use std::{fmt, io, os::fd::FromRawFd as _};

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_func_id, bpf_prog_type};
use proxy_common::RejectMode;

/// Each feature the datapath uses or can do without.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Feature {
    /// cgroup sock_addr programs on connect4 (4.17): the socket path. Required.
    SockAddr,
    /// The recvmsg4 hook (5.2): UDP replies report the ClusterIP. Required.
    Recvmsg,
    /// The getpeername4 hook (5.8): `getpeername` reports the ClusterIP.
    Getpeername,
    /// `bpf_set_retval` in sock_addr programs (5.18): a refused connect fails with the errno
    /// that says why.
    SetRetval,
    /// TCX (6.6): the packet path attached through a link, pinned across restarts.
    Tcx,
    /// `bpf_get_netns_cookie` in sock_addr programs (5.7). Probed for the features to come
    /// (per-namespace policy); no program uses it yet.
    NetnsCookie,
    /// sock_diag `SOCK_DESTROY` (CONFIG_INET_DIAG_DESTROY): connected UDP sockets to a removed
    /// backend are closed.
    SockDestroy,
}

impl Feature {
    pub const ALL: [Feature; 7] = [
        Feature::SockAddr,
        Feature::Recvmsg,
        Feature::Getpeername,
        Feature::SetRetval,
        Feature::Tcx,
        Feature::NetnsCookie,
        Feature::SockDestroy,
    ];

    /// The name in logs, metrics and `proxy-agent status`.
    pub const fn name(self) -> &'static str {
        match self {
            Feature::SockAddr => "sock_addr_connect4",
            Feature::Recvmsg => "recvmsg4",
            Feature::Getpeername => "getpeername4",
            Feature::SetRetval => "bpf_set_retval",
            Feature::Tcx => "tcx",
            Feature::NetnsCookie => "bpf_get_netns_cookie",
            Feature::SockDestroy => "sock_destroy",
        }
    }

    /// The first upstream kernel with it (for messages; the probes decide).
    pub const fn since(self) -> &'static str {
        match self {
            Feature::SockAddr => "4.17",
            Feature::Recvmsg => "5.2",
            Feature::Getpeername => "5.8",
            Feature::SetRetval => "5.18",
            Feature::Tcx => "6.6",
            Feature::NetnsCookie => "5.7",
            Feature::SockDestroy => "4.5 with CONFIG_INET_DIAG_DESTROY",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// The probes' answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Features {
    present: [bool; Feature::ALL.len()],
    /// A probe that failed for another reason than the kernel not knowing the feature: its
    /// errno (EPERM: not allowed to load programs).
    failed: [Option<i32>; Feature::ALL.len()],
}

impl Features {
    /// Every feature present (tests; and what a kernel recent enough has).
    pub fn all() -> Self {
        Features {
            present: [true; Feature::ALL.len()],
            failed: [None; Feature::ALL.len()],
        }
    }

    pub fn has(&self, f: Feature) -> bool {
        self.present[f.index()]
    }

    pub fn with(mut self, f: Feature, present: bool) -> Self {
        self.present[f.index()] = present;
        self
    }

    /// The errno of a probe that could not tell (see [`Features::failed`]).
    pub fn failed(&self, f: Feature) -> Option<i32> {
        self.failed[f.index()]
    }

    /// Asks the running kernel.
    pub fn probe() -> Self {
        raise_memlock();
        let mut f = Features::default();
        for feature in Feature::ALL {
            match probe(feature) {
                Ok(()) => f.present[feature.index()] = true,
                Err(e) => f.failed[feature.index()] = unexpected(feature, &e),
            }
        }
        f
    }
}

impl fmt::Display for Features {
    /// `name=yes|no ...` on one line.
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, f) in Feature::ALL.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            match (self.has(*f), self.failed(*f)) {
                (true, _) => write!(out, "{sep}{}=yes", f.name())?,
                (false, None) => write!(out, "{sep}{}=no", f.name())?,
                (false, Some(errno)) => write!(
                    out,
                    "{sep}{}=unknown({})",
                    f.name(),
                    io::Error::from_raw_os_error(errno)
                )?,
            }
        }
        Ok(())
    }
}

/// How the packet-path program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcAttach {
    /// A TCX link, pinned: it stays while the agent is away and is replaced atomically.
    Tcx,
    /// A clsact qdisc and a cls_bpf filter at a fixed priority and handle, replaced in place.
    Clsact,
}

/// The program variants for this kernel and configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// How the socket programs refuse a Service with no usable endpoint.
    pub reject: RejectMode,
    /// Whether the getpeername4 program is loaded.
    pub getpeername: bool,
    pub tc_attach: TcAttach,
    /// Whether connected UDP sockets to removed backends can be closed.
    pub sock_destroy: bool,
}

/// A hard requirement the kernel lacks, or that could not be probed (its errno).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Missing {
    #[error(
        "this kernel lacks {} (Linux {} and later; the agent needs Linux 5.10 or a kernel with the same eBPF features backported)",
        .0.name(), .0.since()
    )]
    Absent(Feature),
    #[error("probing the kernel for {} failed: {}", .0.name(), io::Error::from_raw_os_error(*.1))]
    Unprobed(Feature, i32),
}

/// The variants to load, given what the kernel has and whether the packet path is attached
/// (`packet_path`: some `--tc-interface`).
pub fn plan(f: &Features, packet_path: bool) -> Result<Plan, Missing> {
    for required in [Feature::SockAddr, Feature::Recvmsg] {
        if !f.has(required) {
            return Err(match f.failed(required) {
                Some(errno) => Missing::Unprobed(required, errno),
                None => Missing::Absent(required),
            });
        }
    }
    let reject = if f.has(Feature::SetRetval) {
        RejectMode::Errno
    } else if packet_path {
        // The TC program answers an untranslated connect to a VIP with no endpoint with ICMP
        // port unreachable: ECONNREFUSED, as kube-proxy's REJECT.
        RejectMode::PacketPath
    } else {
        RejectMode::Eperm
    };
    Ok(Plan {
        reject,
        getpeername: f.has(Feature::Getpeername),
        tc_attach: if f.has(Feature::Tcx) {
            TcAttach::Tcx
        } else {
            TcAttach::Clsact
        },
        sock_destroy: f.has(Feature::SockDestroy),
    })
}

/// Kernels before 5.11 charge eBPF memory to the user's RLIMIT_MEMLOCK (every map the
/// pinned datapath holds counts), so a probe would fail with EPERM for want of room; aya raises
/// the limit only on its own calls. Root may raise it; if not, the probes say what failed.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we own.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

// Instructions, as the kernel reads them: opcode, registers (dst low nibble), offset, imm.
const fn insn(code: u8, dst: u8, imm: i32) -> [u8; 8] {
    let i = imm.to_le_bytes();
    [code, dst, 0, 0, i[0], i[1], i[2], i[3]]
}
const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// The errno of a probe failure that does not mean "absent" (the kernel answers an unknown
/// attach type, helper or command with EINVAL; a missing sock_diag destroy with EOPNOTSUPP).
fn unexpected(f: Feature, e: &io::Error) -> Option<i32> {
    let absent = match f {
        Feature::SockDestroy => &[libc::EOPNOTSUPP, libc::ENOENT, libc::EPROTONOSUPPORT][..],
        _ => &[libc::EINVAL, libc::E2BIG, 524 /* ENOTSUPP */][..],
    };
    e.raw_os_error().filter(|errno| !absent.contains(errno))
}

fn probe(f: Feature) -> io::Result<()> {
    let connect4 = bpf_attach_type::BPF_CGROUP_INET4_CONNECT;
    let allow = [insn(MOV64_IMM, 0, 1), insn(EXIT, 0, 0)];
    match f {
        Feature::SockAddr => load_sock_addr(connect4, &allow),
        Feature::Recvmsg => load_sock_addr(bpf_attach_type::BPF_CGROUP_UDP4_RECVMSG, &allow),
        Feature::Getpeername => {
            load_sock_addr(bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME, &allow)
        }
        Feature::SetRetval => load_sock_addr(
            connect4,
            &[
                insn(MOV64_IMM, 1, 0),
                insn(CALL, 0, bpf_func_id::BPF_FUNC_set_retval as i32),
                insn(MOV64_IMM, 0, 1),
                insn(EXIT, 0, 0),
            ],
        ),
        // r1 is the context already.
        Feature::NetnsCookie => load_sock_addr(
            connect4,
            &[
                insn(CALL, 0, bpf_func_id::BPF_FUNC_get_netns_cookie as i32),
                insn(MOV64_IMM, 0, 1),
                insn(EXIT, 0, 0),
            ],
        ),
        Feature::Tcx => query_tcx_lo(),
        Feature::SockDestroy => crate::sockets::can_destroy(),
    }
}

/// Loads a cgroup sock_addr program for `attach`; closes it at once.
fn load_sock_addr(attach: bpf_attach_type, insns: &[[u8; 8]]) -> io::Result<()> {
    let license = c"GPL";
    // SAFETY: bpf_attr is plain data: all-zero is its "no options" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing plain fields of the union's program-load member.
    unsafe {
        let load = &mut attr.__bindgen_anon_3;
        load.prog_type = bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR as u32;
        load.expected_attach_type = attach as u32;
        load.insn_cnt = insns.len() as u32;
        load.insns = insns.as_ptr() as u64;
        load.license = license.as_ptr() as u64;
    }
    // SAFETY: the kernel reads `insn_cnt` instructions and the license string, both alive.
    let fd = unsafe { crate::maps::bpf_fd(bpf_cmd::BPF_PROG_LOAD, &mut attr) }?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// Asks what is attached through TCX on `lo` (index 1 in every namespace): a kernel without
/// TCX does not know the attach type.
fn query_tcx_lo() -> io::Result<()> {
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // (No id buffer: count 0.)
    attr.query.__bindgen_anon_1.target_ifindex = 1;
    attr.query.attach_type = bpf_attach_type::BPF_TCX_INGRESS as u32;
    // SAFETY: no buffers for the kernel to write.
    unsafe { crate::maps::bpf_fd(bpf_cmd::BPF_PROG_QUERY, &mut attr) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe answers -> the variants: one row per kernel shape the agent meets.
    #[test]
    fn each_kernel_gets_the_variants_that_fit() {
        use Feature::*;
        let all = Features::all();
        let linux_5_10 = all.with(SetRetval, false).with(Tcx, false);
        let linux_6_1 = all.with(Tcx, false);
        let no_destroy = all.with(SockDestroy, false);
        let rows: [(&str, Features, bool, Result<Plan, Missing>); 8] = [
            (
                "6.6+",
                all,
                true,
                Ok(plan_of(RejectMode::Errno, true, TcAttach::Tcx, true)),
            ),
            (
                "6.6+, sockets only",
                all,
                false,
                Ok(plan_of(RejectMode::Errno, true, TcAttach::Tcx, true)),
            ),
            (
                "6.1",
                linux_6_1,
                true,
                Ok(plan_of(RejectMode::Errno, true, TcAttach::Clsact, true)),
            ),
            (
                "5.10 with the packet path",
                linux_5_10,
                true,
                Ok(plan_of(
                    RejectMode::PacketPath,
                    true,
                    TcAttach::Clsact,
                    true,
                )),
            ),
            (
                "5.10, sockets only",
                linux_5_10,
                false,
                Ok(plan_of(RejectMode::Eperm, true, TcAttach::Clsact, true)),
            ),
            (
                "5.4 (no getpeername hook)",
                linux_5_10.with(Getpeername, false),
                false,
                Ok(plan_of(RejectMode::Eperm, false, TcAttach::Clsact, true)),
            ),
            (
                "no CONFIG_INET_DIAG_DESTROY",
                no_destroy,
                true,
                Ok(plan_of(RejectMode::Errno, true, TcAttach::Tcx, false)),
            ),
            (
                "4.19 (no recvmsg hook)",
                all.with(Recvmsg, false),
                true,
                Err(Missing::Absent(Recvmsg)),
            ),
        ];
        for (kernel, features, packet_path, want) in rows {
            assert_eq!(plan(&features, packet_path), want, "{kernel}");
        }
        assert_eq!(
            plan(&Features::default(), true),
            Err(Missing::Absent(SockAddr)),
            "no eBPF at all"
        );
    }

    fn plan_of(
        reject: RejectMode,
        getpeername: bool,
        tc_attach: TcAttach,
        sock_destroy: bool,
    ) -> Plan {
        Plan {
            reject,
            getpeername,
            tc_attach,
            sock_destroy,
        }
    }

    /// The error names the feature, and where it comes from.
    #[test]
    fn a_missing_requirement_is_named() {
        let e = Missing::Absent(Feature::Recvmsg).to_string();
        assert!(
            e.contains("recvmsg4") && e.contains("5.2") && e.contains("5.10"),
            "{e}"
        );
        let e = Missing::Unprobed(Feature::SockAddr, libc::EPERM).to_string();
        assert!(
            e.contains("sock_addr_connect4") && e.contains("not permitted"),
            "{e}"
        );
    }

    /// One line for the log: every feature, yes or no.
    #[test]
    fn features_print_on_one_line() {
        let line = Features::all().with(Feature::Tcx, false).to_string();
        assert!(line.starts_with("sock_addr_connect4=yes "), "{line}");
        assert!(line.contains(" tcx=no "), "{line}");
        assert_eq!(line.split(' ').count(), Feature::ALL.len());
    }
}
