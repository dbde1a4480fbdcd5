//! Attaches the packet-path program (TC ingress) to the interfaces named by `--tc-interface`
//! (names or globs), now and as they appear: a netlink (RTMGRP_LINK) watch wakes the agent on
//! every link change. TCX links are pinned at `links/tc_<ifname>`, so the packet path, like the
//! socket path, keeps working while the agent is away; a pin whose interface is gone is
//! removed. Kernels without TCX (< 6.6) get a clsact qdisc and a netlink filter instead, which
//! lives as long as the interface.

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
        LinkOrder, SchedClassifier, TcAttachType,
        links::FdLink,
        tc::{self, TcAttachOptions},
    },
};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::loader::{self, LoaderError, TC_PROGRAM, chain};

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

pub struct TcAttacher {
    patterns: Vec<glob::Pattern>,
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
    pub fn new(patterns: &[String], dir: &Path) -> Result<Self, TcError> {
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
            match attach(prog, &self.dir, &name) {
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

fn attach(prog: &mut SchedClassifier, dir: &Path, ifname: &str) -> Result<(), LoaderError> {
    let perr = |detail: String| LoaderError::Program {
        name: TC_PROGRAM,
        detail: format!("{ifname}: {detail}"),
    };
    match prog.attach_with_options(
        ifname,
        TcAttachType::Ingress,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    ) {
        Ok(id) => {
            let link: FdLink = prog
                .take_link(id)
                .map_err(|e| perr(chain(&e)))?
                .try_into()
                .map_err(|e| perr(chain(&e)))?;
            loader::pin_link(dir, &pin_name(ifname), link)
        }
        Err(tcx_err) => {
            // No TCX: a clsact qdisc and a netlink filter (not pinnable; it stays with the
            // interface).
            let _ = tc::qdisc_add_clsact(ifname);
            let id = prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(Default::default()),
                )
                .map_err(|e| perr(format!("tcx: {}; clsact: {}", chain(&tcx_err), chain(&e))))?;
            let link = prog.take_link(id).map_err(|e| perr(chain(&e)))?;
            std::mem::forget(link); // dropping it would detach the filter
            Ok(())
        }
    }
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
