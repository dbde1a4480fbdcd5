//! Loads the embedded eBPF object, pins its maps and links under the bpffs directory, and
//! attaches the socket programs to a cgroup v2 directory. Pinned links keep the datapath
//! working while the agent is stopped or restarting; `cleanup` is the only way to remove it.
//!
//! Layout under `--bpffs-dir`: `<MAP_NAME>` for each map, `links/<program>` for each link.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink, links::PinnedLink},
};
use proxy_common::{
    CT_TIMEOUTS_GLOBAL, CtTimeouts, MAGLEV_MAP, MAGLEV_SIZE_GLOBAL, MAPS, NETNS_COOKIE_GLOBAL,
    REJECT_MODE_GLOBAL, RejectMode,
};

use crate::capacity::Capacity;
use crate::maps::{self, MapsError};

/// The eBPF object built by build.rs (aligned: the ELF parser reads it in place).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy.bpf.o"));

/// Socket programs, by function name in proxy-ebpf.
pub const TC_PROGRAM: &str = "proxy_tc";
pub const PROGRAMS: [&str; 4] = [
    "proxy_connect4",
    "proxy_sendmsg4",
    "proxy_recvmsg4",
    GETPEERNAME_PROGRAM,
];
const GETPEERNAME_PROGRAM: &str = "proxy_getpeername4";

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/proxy";
const BPFFS_ROOT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(
        "this proxy-agent was built with AYA_BUILD_SKIP=1 and holds no eBPF programs; \
         rebuild it without AYA_BUILD_SKIP to load the datapath"
    )]
    NoPrograms,
    #[error(
        "loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); run as root"
    )]
    NotRoot,
    #[error(
        "the kernel has no BTF (/sys/kernel/btf/vmlinux is missing); a kernel built with CONFIG_DEBUG_INFO_BTF=y is required"
    )]
    NoBtf,
    #[error("no cgroup v2 hierarchy is mounted (looked for a cgroup2 entry in /proc/mounts)")]
    NoCgroup2,
    #[error("{0} is not a cgroup v2 directory")]
    NotCgroup2(PathBuf),
    #[error("bpffs is not available at {path}: {detail}")]
    Bpffs { path: PathBuf, detail: String },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {detail}")]
    Program { name: &'static str, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An error and its sources on one line (aya's errors keep the errno in the source).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn statfs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statfs is plain data: all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into the struct we own; the path is NUL-terminated.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Where cgroup v2 is mounted (on hybrid hosts it is not /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf, LoaderError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(io_err(Path::new("/proc/mounts")))?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .ok_or(LoaderError::NoCgroup2)
}

/// Whether `object` holds programs (an agent built with `AYA_BUILD_SKIP=1` embeds none).
pub fn check_object(object: &[u8]) -> Result<(), LoaderError> {
    if object.is_empty() {
        return Err(LoaderError::NoPrograms);
    }
    Ok(())
}

/// Everything `run` needs from the host, checked up front with a clear error each.
pub fn preflight(cgroup: &Path) -> Result<(), LoaderError> {
    check_object(EBPF_OBJECT)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LoaderError::NotRoot);
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(LoaderError::NoBtf);
    }
    match statfs_type(cgroup) {
        Ok(CGROUP2_SUPER_MAGIC) => Ok(()),
        Ok(_) => Err(LoaderError::NotCgroup2(cgroup.to_path_buf())),
        Err(source) => Err(LoaderError::Io {
            path: cgroup.to_path_buf(),
            source,
        }),
    }
}

/// Makes sure `dir` exists on a bpffs, mounting bpffs at /sys/fs/bpf if nothing is there.
pub fn ensure_bpffs_dir(dir: &Path) -> Result<(), LoaderError> {
    let root = Path::new(BPFFS_ROOT);
    if dir.starts_with(root) && statfs_type(root).ok() != Some(BPF_FS_MAGIC) {
        let (src, fstype) = (c"bpf", c"bpf");
        let target = CString::new(BPFFS_ROOT).expect("no NUL");
        // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(LoaderError::Bpffs {
                path: root.to_path_buf(),
                detail: format!("mounting bpffs failed: {}", io::Error::last_os_error()),
            });
        }
    }
    // Checked before anything is created: a path off bpffs must not leave directories behind.
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(root);
    if statfs_type(existing).ok() != Some(BPF_FS_MAGIC) {
        return Err(LoaderError::Bpffs {
            path: dir.to_path_buf(),
            detail: "not on a bpf filesystem".into(),
        });
    }
    fs::create_dir_all(dir.join("links")).map_err(io_err(dir))?;
    match statfs_type(dir) {
        Ok(BPF_FS_MAGIC) => Ok(()),
        Ok(_) => Err(LoaderError::Bpffs {
            path: dir.to_path_buf(),
            detail: "not on a bpf filesystem".into(),
        }),
        Err(e) => Err(LoaderError::Bpffs {
            path: dir.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// What the programs are loaded with: their load-time constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Conntrack lifetimes per state (the `--conntrack-*` flags).
    pub ct_timeouts: CtTimeouts,
    /// How refusals reach applications (what the kernel offers: [`crate::features::plan`]).
    pub reject: RejectMode,
    /// Maglev table size and count (`--maglev-table-size`, `--maglev-tables`).
    pub maglev_size: u32,
    pub maglev_tables: u16,
    /// Whether the socket hooks may call `bpf_get_netns_cookie` (session affinity).
    pub netns_cookie: bool,
    /// The maps' capacities (the `--max-*` flags).
    pub capacity: Capacity,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ct_timeouts: CtTimeouts::DEFAULT,
            reject: RejectMode::Errno,
            maglev_size: proxy_common::MAGLEV_DEFAULT_TABLE_SIZE,
            maglev_tables: proxy_common::MAGLEV_DEFAULT_TABLES as u16,
            netns_cookie: true,
            capacity: Capacity::default(),
        }
    }
}

impl Settings {
    /// Elements of the Maglev map: every table end to end, two entries an element.
    pub fn maglev_entries(&self) -> u32 {
        proxy_common::maglev_map_entries(u32::from(self.maglev_tables), self.maglev_size)
    }
}

/// [`load_with`] the default [`Settings`].
pub fn load(dir: &Path) -> Result<Ebpf, LoaderError> {
    load_with(dir, &Settings::default())
}

/// Loads the object with its maps pinned in `dir` (reusing existing pins after checking their
/// layout). Programs are loaded into the kernel when they are attached.
pub fn load_with(dir: &Path, settings: &Settings) -> Result<Ebpf, LoaderError> {
    check_object(EBPF_OBJECT)?;
    ensure_bpffs_dir(dir)?;
    // Before anything is touched: pins of other capacities than the flags ask for are
    // refused (the Maglev map alone is replaced when its geometry changes: its tables are
    // rewritten by the first sync; its kind and sizes are checked here all the same).
    let layouts = || maps::layouts(settings.capacity, settings.maglev_entries());
    maps::check_layouts(dir, layouts(), |name| name == MAGLEV_MAP)?;
    if crate::maglev_map::retire_if_resized(dir, settings.maglev_entries())? {
        tracing::info!("the Maglev table geometry changed: a new map replaces the old one");
    }
    let mut loader = EbpfLoader::new();
    let pins: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (m.name, dir.join(m.name))).collect();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    for layout in layouts() {
        loader.map_max_entries(layout.name, layout.max_entries);
    }
    let ebpf = loader
        .override_global(CT_TIMEOUTS_GLOBAL, &settings.ct_timeouts, true)
        .override_global(REJECT_MODE_GLOBAL, &(settings.reject as u32), true)
        .override_global(MAGLEV_SIZE_GLOBAL, &settings.maglev_size, true)
        .override_global(NETNS_COOKIE_GLOBAL, &u32::from(settings.netns_cookie), true)
        .load(EBPF_OBJECT)
        .map_err(|e| LoaderError::Load(Box::new(e)))?;
    // Before any program of this load is attached: entries written for another table size
    // are cleared.
    let mut tables = crate::maglev_map::MaglevTables::open(dir)?;
    if tables.prepare(settings.maglev_size) {
        tracing::info!(
            size = settings.maglev_size,
            "the Maglev table size changed: tables cleared, rewritten by the first sync"
        );
    }
    Ok(ebpf)
}

/// Pins `link` at `dir/links/name`, replacing (and so detaching) what was pinned there, with
/// no gap: the new link is pinned first, then renamed over the old pin.
pub fn pin_link(dir: &Path, name: &str, link: FdLink) -> Result<(), LoaderError> {
    let final_path = dir.join("links").join(name);
    // bpffs refuses names with a dot.
    let tmp = dir.join("links").join(format!("{name}_next"));
    let _ = fs::remove_file(&tmp);
    link.pin(&tmp).map_err(|e| LoaderError::Io {
        path: tmp.clone(),
        source: io::Error::other(chain(&e)),
    })?;
    fs::rename(&tmp, &final_path).map_err(io_err(&final_path))
}

/// Attaches the socket programs to `cgroup` and pins their links (`getpeername`: with the
/// getpeername4 program, which kernels before 5.8 have no hook for). An existing datapath in
/// `dir` is replaced without a gap; while both run, the old one translates first and the new
/// one then sees a backend address, which is not a frontend, so nothing is translated twice.
pub fn attach_sockets(
    ebpf: &mut Ebpf,
    dir: &Path,
    cgroup: &Path,
    getpeername: bool,
) -> Result<(), LoaderError> {
    let cgroup_dir = fs::File::open(cgroup).map_err(io_err(cgroup))?;
    for name in PROGRAMS {
        if name == GETPEERNAME_PROGRAM && !getpeername {
            continue;
        }
        let perr = |detail: String| LoaderError::Program { name, detail };
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| perr("missing from the object".into()))?
            .try_into()
            .map_err(|e| perr(chain(&e)))?;
        prog.load()
            .map_err(|e| perr(format!("verifier/load: {}", chain(&e))))?;
        let id = prog
            // bpf_link attachments to a cgroup always coexist with others (the kernel rejects
            // BPF_F_ALLOW_MULTI on BPF_LINK_CREATE): "Single" passes no flags.
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(|e| perr(format!("attach to {}: {}", cgroup.display(), chain(&e))))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| perr(chain(&e)))?
            .try_into()
            .map_err(|e| perr(chain(&e)))?;
        pin_link(dir, name, link)?;
    }
    Ok(())
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct Cleanup {
    pub links: Vec<PathBuf>,
    pub maps: Vec<PathBuf>,
}

/// Detaches the programs (by removing their pinned links) and removes the pinned maps.
pub fn cleanup(dir: &Path) -> Result<Cleanup, LoaderError> {
    let mut done = Cleanup::default();
    if !dir.exists() {
        return Ok(done);
    }
    let links = dir.join("links");
    if links.exists() {
        for entry in fs::read_dir(&links).map_err(io_err(&links))? {
            let path = entry.map_err(io_err(&links))?.path();
            // Unpinning the last reference of a link detaches its program.
            match PinnedLink::from_pin(&path) {
                Ok(l) => drop(l.unpin().map_err(io_err(&path))?),
                Err(_) => fs::remove_file(&path).map_err(io_err(&path))?,
            }
            done.links.push(path);
        }
        fs::remove_dir(&links).map_err(io_err(&links))?;
    }
    // Every version of every map (an older one an upgrade left, a newer one a downgrade
    // found); nothing else, so a directory holding other files is not removed.
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let name = entry.map_err(io_err(dir))?.file_name();
        if name.to_str().and_then(crate::migrate::version).is_some() {
            names.push(name);
        }
    }
    names.sort();
    for name in names {
        let path = dir.join(name);
        fs::remove_file(&path).map_err(io_err(&path))?;
        done.maps.push(path);
    }
    fs::remove_dir(dir).map_err(io_err(dir))?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use proxy_common::MAPS;

    use super::*;

    /// A --bpffs-dir off bpffs is refused before anything is created.
    #[test]
    fn a_directory_off_bpffs_is_refused_without_creating_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/pins");
        assert!(matches!(
            ensure_bpffs_dir(&dir),
            Err(LoaderError::Bpffs { .. })
        ));
        assert!(!tmp.path().join("a").exists());
    }

    /// The built object's maps have exactly the layout proxy-common declares.
    #[test]
    fn built_object_matches_the_map_abi() {
        check_object(EBPF_OBJECT).expect("an agent built with the eBPF programs");
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        for layout in MAPS {
            let map = obj
                .maps
                .get(layout.name)
                .unwrap_or_else(|| panic!("map {} missing from object", layout.name));
            assert_eq!(
                (
                    map.map_type(),
                    map.key_size(),
                    map.value_size(),
                    map.max_entries()
                ),
                (
                    layout.kind.bpf_map_type(),
                    layout.key_size,
                    layout.value_size,
                    layout.max_entries
                ),
                "map {}",
                layout.name
            );
        }
        // Besides the ABI's maps, only the programs' load-time constants (`.rodata`) and
        // aya-log's ring buffer (one per load, never pinned: the agent that loaded the
        // programs reads it).
        let mut others: Vec<&String> = obj
            .maps
            .keys()
            .filter(|n| !MAPS.iter().any(|m| m.name == *n))
            .collect();
        others.sort();
        assert_eq!(others, [".rodata", "AYA_LOGS"], "no map outside the ABI");
        const BPF_MAP_TYPE_RINGBUF: u32 = 27;
        assert_eq!(obj.maps["AYA_LOGS"].map_type(), BPF_MAP_TYPE_RINGBUF);
        for p in PROGRAMS.iter().chain([&TC_PROGRAM]) {
            assert!(obj.programs.contains_key(*p), "program {p} missing");
        }
    }

    /// An agent built without its programs says so, rather than failing somewhere in aya.
    #[test]
    fn an_object_without_programs_is_refused() {
        assert!(matches!(check_object(&[]), Err(LoaderError::NoPrograms)));
        assert!(
            LoaderError::NoPrograms
                .to_string()
                .contains("AYA_BUILD_SKIP"),
            "the error names the switch"
        );
    }
}
