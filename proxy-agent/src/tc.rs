//! Attaches the packet-path program (TC ingress) to the interfaces named by `--tc-interface`
//! (names or globs), now and as they appear: a netlink (RTMGRP_LINK) watch wakes the agent on
//! every link change. TCX links are pinned at `links/tc_<ifname>`, so the packet path, like the
//! socket path, keeps working while the agent is away; a pin whose interface is gone is
//! removed. Kernels without TCX (< 6.6) get a clsact qdisc and a cls_bpf filter instead, at
//! this agent's own priority and handle ([`CLSACT_PRIORITY`]): it lives as long as the
//! interface, and the next agent replaces its program in place, with no gap and no second
//! filter. `cleanup` removes those filters from every interface of the namespace.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    features::TcAttach,
    loader::{self, LoaderError, TC_PROGRAM, chain},
};

#[derive(Debug, thiserror::Error)]
pub enum TcError {
    #[error("--tc-interface {pattern:?} is not a valid name or glob: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
    #[error("loading {TC_PROGRAM}: {0}")]
    Load(String),
}

/// The cls_bpf filter's priority (a number no other loader is likely to pick: a filter there
/// is taken to be ours and replaced) and handle.
pub const CLSACT_PRIORITY: u16 = 0x7078;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 1);

pub struct TcAttacher {
    patterns: Vec<glob::Pattern>,
    how: TcAttach,
    dir: PathBuf,
    loaded: bool,
    /// Interfaces attached, by name -> ifindex (a re-created interface gets a new index).
    attached: BTreeMap<String, u32>,
}

/// The interfaces of this network namespace (if_nameindex asks the kernel, unlike /sys, which
/// may belong to another namespace).
pub fn interfaces() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push((
                CStr::from_ptr((*p).if_name).to_string_lossy().into_owned(),
                (*p).if_index,
            ));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// bpffs refuses names with a dot (VLAN interfaces have them).
fn pin_name(ifname: &str) -> String {
    format!("tc_{}", ifname.replace('.', "_"))
}

impl TcAttacher {
    pub fn new(patterns: &[String], dir: &Path, how: TcAttach) -> Result<Self, TcError> {
        let patterns = patterns
            .iter()
            .map(|p| {
                glob::Pattern::new(p).map_err(|source| TcError::Pattern {
                    pattern: p.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(TcAttacher {
            patterns,
            how,
            dir: dir.to_path_buf(),
            loaded: false,
            attached: BTreeMap::new(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    fn wanted(&self, ifname: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(ifname))
    }

    /// Attaches to matching interfaces not attached yet; forgets the ones that went away.
    /// Returns whether some attach failed (the caller retries shortly).
    pub fn refresh(&mut self, ebpf: &mut Ebpf) -> Result<bool, TcError> {
        if self.patterns.is_empty() {
            return Ok(false);
        }
        let prog: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM)
            .ok_or_else(|| TcError::Load("missing from the object".into()))?
            .try_into()
            .map_err(|e| TcError::Load(chain(&e)))?;
        if !self.loaded {
            prog.load()
                .map_err(|e| TcError::Load(format!("verifier/load: {}", chain(&e))))?;
            self.loaded = true;
        }
        let present: BTreeMap<String, u32> = interfaces()
            .into_iter()
            .filter(|(n, _)| self.wanted(n))
            .collect();
        self.attached.retain(|name, index| {
            let keep = present.get(name) == Some(index);
            if !keep {
                info!(interface = %name, "interface gone; forgetting it");
            }
            keep
        });
        self.remove_stale_pins(&present);
        let mut failed = false;
        for (name, index) in present {
            if self.attached.contains_key(&name) {
                continue;
            }
            match attach(prog, &self.dir, &name, self.how) {
                Ok(()) => {
                    info!(interface = %name, "packet path attached (TC ingress)");
                    self.attached.insert(name, index);
                }
                // A new interface may not be ready, or may vanish between listing and
                // attaching: retried shortly, and on the next event.
                Err(e) => {
                    warn!(interface = %name, error = %e, "could not attach the packet path; will retry");
                    failed = true;
                }
            }
        }
        Ok(failed)
    }

    /// Pins of interfaces that no longer exist (their links are defunct).
    fn remove_stale_pins(&self, present: &BTreeMap<String, u32>) {
        let links = self.dir.join("links");
        let keep: Vec<String> = present.keys().map(|n| pin_name(n)).collect();
        let Ok(entries) = fs::read_dir(&links) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("tc_") && !keep.contains(&name) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

fn attach(
    prog: &mut SchedClassifier,
    dir: &Path,
    ifname: &str,
    how: TcAttach,
) -> Result<(), LoaderError> {
    let perr = |detail: String| LoaderError::Program {
        name: TC_PROGRAM,
        detail: format!("{ifname}: {detail}"),
    };
    match how {
        TcAttach::Tcx => {
            let pin = dir.join("links").join(pin_name(ifname));
            // The previous agent's link: its program swapped in place (BPF_LINK_UPDATE). A
            // second link beside it would run both programs on every packet until the old
            // pin went, and the second would see the first's translated SYN as a direct one
            // and forget its flow. A pin whose interface was re-created is defunct: the
            // update fails, and a new link replaces it.
            if let Ok(old) = PinnedLink::from_pin(&pin) {
                match replace_in_place(prog, ifname, old) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        warn!(interface = %ifname, error = %e, "pinned TCX link not reusable (interface re-created or renamed?); attaching a new one");
                    }
                }
            }
            let id = prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| perr(format!("tcx: {}", chain(&e))))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|e| perr(chain(&e)))?
                .try_into()
                .map_err(|e| perr(chain(&e)))?;
            loader::pin_link(dir, &pin_name(ifname), link)
        }
        TcAttach::Clsact => {
            // (Fails harmlessly when the interface has one.)
            let _ = tc::qdisc_add_clsact(ifname);
            // Our filter in place: its program replaced atomically. None yet: a new filter.
            let id = SchedClassifierLink::attached(
                ifname,
                TcAttachType::Ingress,
                CLSACT_PRIORITY,
                CLSACT_HANDLE,
                None,
            )
            .map_err(ProgramError::from)
            .and_then(|ours| prog.attach_to_link(ours))
            .or_else(|replace| {
                prog.attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: CLSACT_PRIORITY,
                        handle: CLSACT_HANDLE,
                        ..Default::default()
                    }),
                )
                .map_err(|e| {
                    perr(format!(
                        "clsact: replacing: {}; adding: {}",
                        chain(&replace),
                        chain(&e)
                    ))
                })
            })?;
            let link = prog.take_link(id).map_err(|e| perr(chain(&e)))?;
            std::mem::forget(link); // dropping it would detach the filter
            Ok(())
        }
    }
}

/// Swaps `prog` into the pinned TCX link `old`, which stays pinned (the handle aya keeps is
/// dropped: that only closes its fd). The pin is found by name: if its link turns out to be
/// on another device (an interface renamed while no agent ran), `ifname` still lacks the
/// program afterwards, and that is an error (the caller attaches a new link).
fn replace_in_place(
    prog: &mut SchedClassifier,
    ifname: &str,
    old: PinnedLink,
) -> Result<(), String> {
    let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|e| chain(&e))?;
    let id = prog.attach_to_link(link).map_err(|e| chain(&e))?;
    prog.take_link(id).map(drop).map_err(|e| chain(&e))?;
    let ours = prog.info().map_err(|e| chain(&e))?.id();
    let (_, running) =
        SchedClassifier::query_tcx(ifname, TcAttachType::Ingress).map_err(|e| chain(&e))?;
    if running.iter().any(|p| p.id() == ours) {
        Ok(())
    } else {
        Err(format!("the pinned link is not on {ifname}"))
    }
}

/// Removes this agent's cls_bpf filters (the clsact attachments) from every interface of the
/// namespace; returns the interfaces it removed one from.
pub fn remove_clsact_filters() -> Vec<String> {
    interfaces()
        .into_iter()
        .filter(|(name, _)| {
            tc::qdisc_detach_program(name, TcAttachType::Ingress, TC_PROGRAM).is_ok()
        })
        .map(|(name, _)| name)
        .collect()
}

/// Wakes `wake` on every link change in this network namespace (a thread reading an
/// RTMGRP_LINK netlink socket; the messages themselves are not parsed: the attacher rescans).
pub fn watch_links(wake: Arc<Notify>) -> io::Result<()> {
    // SAFETY: plain socket calls on a descriptor we own; the sockaddr is zeroed then filled.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_nl is plain data: all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = libc::RTMGRP_LINK as u32;
    // SAFETY: binds our own descriptor to the address above, of the size given.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    std::thread::Builder::new().name("netlink-links".into()).spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: reading into our own buffer.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // ENOBUFS (a burst overflowed the socket) still means "something changed".
                if io::Error::last_os_error().raw_os_error() != Some(libc::ENOBUFS) {
                    warn!(error = %io::Error::last_os_error(), "netlink link watch stopped; periodic resync still attaches");
                    return;
                }
            }
            wake.notify_one();
        }
    })?;
    Ok(())
}

/// How `ifname` runs the packet-path program, as the kernel reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    /// Through a TCX link.
    pub tcx: bool,
    /// The priorities of cls_bpf filters running it (ours is [`CLSACT_PRIORITY`]).
    pub clsact_priorities: Vec<u16>,
}

/// Asks the kernel what runs [`TC_PROGRAM`] on the ingress of `ifname` (index `index`, as
/// [`interfaces`] lists it).
pub fn attachment(ifname: &str, index: u32) -> io::Result<Attachment> {
    let tcx = match SchedClassifier::query_tcx(ifname, TcAttachType::Ingress) {
        Ok((_, progs)) => progs.iter().any(|p| p.name_as_str() == Some(TC_PROGRAM)),
        // A kernel without TCX: nothing attached that way.
        Err(_) => false,
    };
    Ok(Attachment {
        tcx,
        clsact_priorities: clsact_filters(index)?,
    })
}

/// The priorities of the cls_bpf filters named [`TC_PROGRAM`] on the clsact ingress of
/// interface `index` (an RTM_GETTFILTER dump).
fn clsact_filters(index: u32) -> io::Result<Vec<u16>> {
    use crate::netlink::{self, Netlink};
    const RTM_GETTFILTER: u16 = 46;
    // TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
    const CLSACT_INGRESS: u32 = 0xffff_fff2;
    const TCA_OPTIONS: u16 = 2;
    const TCA_BPF_NAME: u16 = 7;
    // struct tcmsg: family, padding, ifindex, handle, parent, info.
    let mut tcmsg = [0u8; 20];
    tcmsg[4..8].copy_from_slice(&index.to_ne_bytes());
    tcmsg[12..16].copy_from_slice(&CLSACT_INGRESS.to_ne_bytes());
    let nl = Netlink::open(libc::NETLINK_ROUTE)?;
    nl.send(&netlink::message(
        RTM_GETTFILTER,
        (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        &tcmsg,
    ))?;
    let mut out = Vec::new();
    let result = nl.read(|payload| {
        let Some(info) = payload.get(16..20) else {
            return;
        };
        let priority = (u32::from_ne_bytes(info.try_into().expect("4 bytes")) >> 16) as u16;
        let named = attrs(&payload[20..])
            .filter(|(ty, _)| *ty & 0x3fff == TCA_OPTIONS)
            .flat_map(|(_, nested)| attrs(nested))
            .any(|(ty, name)| {
                ty == TCA_BPF_NAME && name.split(|b| *b == 0).next() == Some(TC_PROGRAM.as_bytes())
            });
        if named {
            out.push(priority);
        }
    });
    match result {
        Ok(()) => Ok(out),
        // No clsact qdisc on the interface: no filters.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Netlink attributes (`struct rtattr`: length, type, value; 4-byte aligned).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16::from_ne_bytes(buf.get(0..2)?.try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(buf.get(2..4)?.try_into().ok()?);
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some((ty, value))
    })
}
