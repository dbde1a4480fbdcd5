//! Map layout changes between agent versions. A layout change bumps the `_V<n>` of the map's
//! name (proxy-common), so a directory can hold pins of another version of one of this agent's
//! maps:
//! - an older one (an upgrade): its entries are carried into the new map ([`CARRIES`]) before
//!   anything uses the new map, and its pin is removed once the programs that used it are
//!   replaced ([`retire`]);
//! - a newer one (a downgrade): this agent does not know its layout, nor what the programs
//!   attached with it expect, so it refuses to start ([`refuse_newer`]) before it pins or
//!   attaches anything, and the running datapath keeps serving.
//!
//! The order of an upgrade (`run`): refuse a downgrade, load (the new maps are created and
//! pinned beside the old ones), carry (the new maps now hold what the old ones do), attach the
//! new programs (they replace the old ones in place), carry again what the programs write
//! (the old programs ran until then), remove the old pins, then the first sync (it brings the
//! new maps to the source, with no old program left to read a map it changes).

use std::{
    io,
    path::{Path, PathBuf},
};

use proxy_common::{CtTimeouts, MAPS};
use thiserror::Error;

use crate::{conntrack, maps::MapsError};

/// A pin name's base and version: `PROXY_BE_V2` is `("PROXY_BE", 2)`. None for a name that
/// is not one of this project's maps.
pub fn version(name: &str) -> Option<(&str, u32)> {
    let (base, v) = name.rsplit_once("_V")?;
    let digits = !v.is_empty() && v.len() <= 9 && v.bytes().all(|b| b.is_ascii_digit());
    if !(base.starts_with("PROXY_") && base.len() > "PROXY_".len() && digits) {
        return None;
    }
    Some((base, v.parse().ok()?))
}

/// The pins in a directory that are another version of one of `ours`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Versions {
    /// Older versions: to carry over and remove.
    pub older: Vec<String>,
    /// Newer versions, each with this agent's name for the map.
    pub newer: Vec<(String, &'static str)>,
}

/// Sorts `pins` against `ours` (pure; names that are not versioned maps are ignored).
pub fn classify<'a>(pins: impl IntoIterator<Item = &'a str>, ours: &[&'static str]) -> Versions {
    let mut found = Versions::default();
    for pin in pins {
        let Some((base, v)) = version(pin) else {
            continue;
        };
        let Some((mine, mine_v)) = (ours.iter())
            .filter_map(|o| Some((*o, version(o)?)))
            .find(|(_, (b, _))| *b == base)
            .map(|(o, (_, v))| (o, v))
        else {
            continue;
        };
        match v.cmp(&mine_v) {
            std::cmp::Ordering::Less => found.older.push(pin.to_string()),
            std::cmp::Ordering::Greater => found.newer.push((pin.to_string(), mine)),
            std::cmp::Ordering::Equal => {}
        }
    }
    found.older.sort();
    found.newer.sort();
    found
}

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error(
        "{}: a newer agent ran here (a downgrade): this agent does not know the layout of {}; start the newer version again, or stop it and run `proxy-agent cleanup` before starting this one (translation stops until this one is up)",
        dir.display(),
        newer.iter().map(|(pin, ours)| format!("pinned map {pin}, whose version is above this agent's {ours}")).collect::<Vec<_>>().join(", ")
    )]
    Newer {
        dir: PathBuf,
        newer: Vec<(String, &'static str)>,
    },
    #[error("reading {}: {source}", dir.display())]
    List {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("carrying {from} over into the new layout: {source}")]
    Carry {
        from: &'static str,
        #[source]
        source: MapsError,
    },
}

/// The versions in `dir` next to this agent's maps (none if there is no `dir`).
pub fn versions(dir: &Path) -> Result<Versions, MigrateError> {
    let list = |source| MigrateError::List {
        dir: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Versions::default()),
        entries => entries.map_err(list)?,
    };
    for entry in entries {
        names.push(
            entry
                .map_err(list)?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    let ours: Vec<&'static str> = MAPS.iter().map(|m| m.name).collect();
    Ok(classify(names.iter().map(String::as_str), &ours))
}

/// Refuses a directory that holds a newer version of one of this agent's maps.
pub fn refuse_newer(dir: &Path) -> Result<(), MigrateError> {
    let found = versions(dir)?;
    if found.newer.is_empty() {
        return Ok(());
    }
    Err(MigrateError::Newer {
        dir: dir.to_path_buf(),
        newer: found.newer,
    })
}

/// What a carry needs besides the directory.
#[derive(Clone, Copy, Debug)]
pub struct CarryContext {
    pub timeouts: CtTimeouts,
    /// The datapath's clock ([`conntrack::now_s`]).
    pub now_s: u32,
}

/// When a carry runs (see the module's order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// After load, before the new programs are attached.
    BeforeAttach,
    /// After the new programs are attached.
    AfterAttach,
}

/// A converter from an older layout into the current map.
pub struct Carry {
    /// The older map's name.
    pub from: &'static str,
    /// The programs write the map (state, such as conntrack): carried again after the new
    /// programs are attached, for what the old ones wrote meanwhile, and best effort (a flow
    /// not carried is balanced anew). A map the agent writes (from the source) is carried
    /// once, and a failure stops the start: the new maps would not agree with the old ones on
    /// the ids the state maps hold.
    pub programs_write: bool,
    /// Copies the older map's entries the current one does not hold; returns how many.
    pub run: fn(&Path, &CarryContext) -> Result<usize, MapsError>,
}

/// Every layout change this agent migrates from. A layout change adds its line here with the
/// older layout in proxy-common (`retired`).
pub const CARRIES: &[Carry] = &[
    Carry {
        from: conntrack::CT_V1,
        programs_write: true,
        run: carry_conntrack_v1,
    },
    #[cfg(feature = "abi-next")]
    Carry {
        from: "PROXY_BE_V1",
        programs_write: false,
        run: carry_backends_v1,
    },
];

fn carry_conntrack_v1(dir: &Path, c: &CarryContext) -> Result<usize, MapsError> {
    conntrack::carry_over(dir, &c.timeouts, c.now_s)
}

/// The rehearsal's change: `PROXY_BE_V1` -> `PROXY_BE_V2`, ids kept (slots, conntrack and
/// affinity entries name backends by id).
#[cfg(feature = "abi-next")]
fn carry_backends_v1(dir: &Path, _: &CarryContext) -> Result<usize, MapsError> {
    use aya::maps::{HashMap, Map, MapData, MapError};
    use proxy_common::{BACKEND_MAP, Backend, be_v1};

    // (`carry` runs this only when the old map is pinned.)
    const FROM: &str = "PROXY_BE_V1";
    let old: HashMap<MapData, u32, be_v1::Backend> =
        crate::maps::open_pinned(dir, FROM, Map::HashMap)?;
    let mut new: HashMap<MapData, u32, Backend> =
        crate::maps::open_pinned(dir, BACKEND_MAP, Map::HashMap)?;
    let mut carried = 0;
    for kv in old.iter() {
        let (id, b) = kv.map_err(|source| MapsError::Read { map: FROM, source })?;
        // BPF_NOEXIST: an id already there was carried by an earlier start of this version
        // (killed before it removed the old pin), or written by its sync, which only runs
        // once the old pin is gone (or could not be removed), so it is the newer.
        match new.insert(id, Backend::new(b.addr_be, b.port_be, b.proto), 1) {
            Ok(()) => carried += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            // A full map (a smaller --max-backends) or no memory: the new map would not
            // hold what the slots name.
            Err(MapError::SyscallError(e)) => {
                return Err(MapsError::Syscall {
                    map: BACKEND_MAP,
                    op: "carrying a backend into",
                    source: e.io_error,
                });
            }
            Err(source) => {
                return Err(MapsError::Read {
                    map: BACKEND_MAP,
                    source,
                });
            }
        }
    }
    Ok(carried)
}

/// Runs the carries of `phase` whose older map is pinned in `dir`; returns how many entries
/// each copied. A failing carry of state is logged and skipped; of a map the agent writes, it
/// is an error.
pub fn carry(
    dir: &Path,
    phase: Phase,
    context: &CarryContext,
) -> Result<Vec<(&'static str, usize)>, MigrateError> {
    let mut done = Vec::new();
    if phase == Phase::BeforeAttach {
        for old in versions(dir)?.older {
            if !CARRIES.iter().any(|c| c.from == old) {
                tracing::warn!(
                    from = old,
                    "a previous layout's map this version has no converter for: its entries are not carried over (the first sync rewrites what the agent writes; state the programs kept is lost)"
                );
            }
        }
    }
    for c in CARRIES {
        if (phase == Phase::AfterAttach && !c.programs_write) || !dir.join(c.from).exists() {
            continue;
        }
        match (c.run)(dir, context) {
            Ok(n) => done.push((c.from, n)),
            Err(e) if c.programs_write => {
                tracing::warn!(from = c.from, error = %e, "could not carry the previous layout's entries over");
            }
            Err(source) => {
                return Err(MigrateError::Carry {
                    from: c.from,
                    source,
                });
            }
        }
    }
    Ok(done)
}

/// Removes the pins of older versions of this agent's maps (once the programs that used them
/// are replaced). A map stays alive while a program still holds it, so an interface the new
/// TC program is not attached to yet keeps working with the old one.
pub fn retire(dir: &Path) -> Result<Vec<String>, MigrateError> {
    let older = versions(dir)?.older;
    for name in &older {
        let path = dir.join(name);
        if let Err(source) = std::fs::remove_file(&path)
            && source.kind() != io::ErrorKind::NotFound
        {
            return Err(MigrateError::Remove { path, source });
        }
    }
    Ok(older)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_names() {
        for (name, want) in [
            ("PROXY_BE_V1", Some(("PROXY_BE", 1))),
            ("PROXY_MAGLEV_V12", Some(("PROXY_MAGLEV", 12))),
            ("PROXY_CT_V", None),
            ("PROXY_CT_Vx", None),
            ("PROXY_V1", None),
            ("OTHER_BE_V1", None),
            ("links", None),
            (".lock", None),
            ("PROXY_BE_V99999999999", None),
        ] {
            assert_eq!(version(name), want, "{name}");
        }
    }

    /// kube-proxy has no map ABI; the cases are the ones an upgrade and a downgrade meet.
    #[test]
    fn pins_are_sorted_into_older_and_newer_versions() {
        let ours = ["PROXY_BE_V2", "PROXY_CT_V2", "PROXY_SVC_V1"];
        let cases: &[(&[&str], Versions)] = &[
            (&ours, Versions::default()),
            (
                &["PROXY_BE_V1", "PROXY_CT_V1", "PROXY_SVC_V1", "links"],
                Versions {
                    older: vec!["PROXY_BE_V1".into(), "PROXY_CT_V1".into()],
                    newer: vec![],
                },
            ),
            (
                &["PROXY_BE_V3", "PROXY_SVC_V2", "PROXY_CT_V2"],
                Versions {
                    older: vec![],
                    newer: vec![
                        ("PROXY_BE_V3".into(), "PROXY_BE_V2"),
                        ("PROXY_SVC_V2".into(), "PROXY_SVC_V1"),
                    ],
                },
            ),
            // A map this agent has no base for (removed, or added later) is neither.
            (&["PROXY_GONE_V1", "PROXY_NEW_V9"], Versions::default()),
        ];
        for (pins, want) in cases {
            assert_eq!(&classify(pins.iter().copied(), &ours), want, "{pins:?}");
        }
    }

    #[test]
    fn a_newer_version_is_refused_naming_both_maps() {
        let e = MigrateError::Newer {
            dir: "/sys/fs/bpf/proxy".into(),
            newer: vec![("PROXY_BE_V2".into(), "PROXY_BE_V1")],
        };
        let text = e.to_string();
        for part in [
            "PROXY_BE_V2",
            "PROXY_BE_V1",
            "downgrade",
            "proxy-agent cleanup",
        ] {
            assert!(text.contains(part), "{text}");
        }
    }

    #[test]
    fn every_carry_is_from_an_older_version_of_a_map_of_this_agent() {
        let ours: Vec<&'static str> = MAPS.iter().map(|m| m.name).collect();
        for c in CARRIES {
            let found = classify([c.from], &ours);
            assert_eq!(found.older, vec![c.from.to_string()], "{}", c.from);
        }
    }
}
