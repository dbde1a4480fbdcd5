//! The programs' slow-path log (aya-log), forwarded into the agent's own log.
//!
//! The programs write a record where they count a slow-path event (a refusal, a missing
//! backend, a failed map or packet write) into aya-log's ring buffer, if the level in the
//! pinned `PROXY_LOG_V1` asks for it (`--bpf-log-level`, off by default; changed on a running
//! agent with `proxy-agent bpf-log-level`, no reload). A thread of its own reads the ring
//! buffer (never a tokio worker: a burst of records is formatted and written there) and
//! emits each record as a tracing event of target [`TARGET`] with structured fields. A full
//! ring buffer drops records in the kernel: a program never waits for this reader.
//!
//! A record's message is `EVENT key=value ...` (see proxy-ebpf's `log.rs`); its aya-log
//! target is the program's name.

use std::{
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use aya::{
    Ebpf,
    maps::{Array, Map, MapData},
};
use aya_log::EbpfLogger;
use proxy_common::{
    Counter, LOG_DEBUG, LOG_ERROR, LOG_INFO, LOG_LEVEL_MAP, LOG_OFF, LOG_WARN, LogLevel,
};

use crate::maps::{self, MapsError};

/// The tracing target of forwarded records (`RUST_LOG` directives name it: `bpf=off`).
pub const TARGET: &str = "bpf";

/// How verbose the programs' log is: the most verbose level they write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Level {
    /// Nothing (the default).
    #[default]
    Off,
    /// Errors only (no event is one yet: as quiet as off).
    Error,
    /// Failed map writes, a missing backend, a packet dropped after a failed rewrite.
    Warn,
    /// Also connects refused on the socket path (no endpoints, no local endpoints).
    Info,
    /// Also the packet path's refusals and drops, which happen per packet.
    Debug,
}

impl Level {
    /// The value in `PROXY_LOG_V1`.
    pub fn raw(self) -> u32 {
        match self {
            Level::Off => LOG_OFF,
            Level::Error => LOG_ERROR,
            Level::Warn => LOG_WARN,
            Level::Info => LOG_INFO,
            Level::Debug => LOG_DEBUG,
        }
    }

    /// The level a `PROXY_LOG_V1` value means (None: no level of this agent's).
    pub fn from_raw(raw: u32) -> Option<Level> {
        [
            Level::Off,
            Level::Error,
            Level::Warn,
            Level::Info,
            Level::Debug,
        ]
        .into_iter()
        .find(|l| l.raw() == raw)
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Off => "off",
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BpfLogError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("{map}: {op}: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{path}: holds log level {raw}, which this agent does not know")]
    Unknown { path: PathBuf, raw: u32 },
    #[error("the eBPF object has no log ring buffer: {0}")]
    Logger(#[source] aya_log::Error),
    #[error("starting the log reader thread: {0}")]
    Thread(#[source] io::Error),
}

fn open(dir: &Path) -> Result<Array<MapData, LogLevel>, BpfLogError> {
    Ok(maps::open_pinned(dir, LOG_LEVEL_MAP, Map::Array)?)
}

/// The level pinned in `dir` (what the programs log at now).
pub fn read_level(dir: &Path) -> Result<Level, BpfLogError> {
    let raw = open(dir)?
        .get(&0, 0)
        .map_err(|source| BpfLogError::Map {
            map: LOG_LEVEL_MAP,
            op: "lookup",
            source,
        })?
        .level;
    Level::from_raw(raw).ok_or_else(|| BpfLogError::Unknown {
        path: dir.join(LOG_LEVEL_MAP),
        raw,
    })
}

/// Sets the level the programs pinned in `dir` log at: they read it on their next event.
pub fn write_level(dir: &Path, level: Level) -> Result<(), BpfLogError> {
    let value = LogLevel { level: level.raw() };
    open(dir)?
        .set(0, value, 0)
        .map_err(|source| BpfLogError::Map {
            map: LOG_LEVEL_MAP,
            op: "update",
            source,
        })
}

/// A record as the agent logs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub level: tracing::Level,
    /// The program that wrote it (the record's target).
    pub program: String,
    /// The counter counted beside it (`no_endpoints_rejected`, ...), or the first word.
    pub event: String,
    /// What happened: the counter's help, or the record's text for an event this agent
    /// does not know.
    pub message: String,
    /// `VIP:port/proto`.
    pub frontend: Option<String>,
    pub client: Option<String>,
    pub backend: Option<String>,
    /// A dropped packet's addresses (`IP[:port]`, the destination with `/proto`).
    pub source: Option<String>,
    pub destination: Option<String>,
}

/// Maps a record (`target`, `level`, its formatted text) to what is logged.
pub fn forwarded(target: &str, level: log::Level, text: &str) -> Forwarded {
    let mut words = text.split(' ').filter(|w| !w.is_empty());
    let event = words.next().unwrap_or_default().to_string();
    let mut f = Forwarded {
        level: match level {
            log::Level::Error => tracing::Level::ERROR,
            log::Level::Warn => tracing::Level::WARN,
            log::Level::Info => tracing::Level::INFO,
            log::Level::Debug => tracing::Level::DEBUG,
            log::Level::Trace => tracing::Level::TRACE,
        },
        program: target.to_string(),
        message: String::new(),
        frontend: None,
        client: None,
        backend: None,
        source: None,
        destination: None,
        event,
    };
    let mut rest = Vec::new();
    for word in words {
        let slot = match word.split_once('=') {
            Some(("frontend", v)) => Some((&mut f.frontend, v)),
            Some(("client", v)) => Some((&mut f.client, v)),
            Some(("backend", v)) => Some((&mut f.backend, v)),
            Some(("source", v)) => Some((&mut f.source, v)),
            Some(("destination", v)) => Some((&mut f.destination, v)),
            _ => None,
        };
        match slot {
            Some((slot, v)) => *slot = Some(v.to_string()),
            None => rest.push(word),
        }
    }
    f.message = match Counter::ALL.iter().find(|c| c.name() == f.event) {
        Some(c) => c.help().to_string(),
        None => text.to_string(),
    };
    if !rest.is_empty() && f.message != text {
        f.message = format!("{}: {}", f.message, rest.join(" "));
    }
    f
}

/// Emits `f` as a tracing event of target [`TARGET`].
pub fn emit(f: &Forwarded) {
    // Addresses unquoted in the text form (`frontend=10.96.0.10:80/tcp`); absent: no field.
    fn shown(v: &Option<String>) -> Option<tracing::field::DisplayValue<&str>> {
        v.as_deref().map(tracing::field::display)
    }
    macro_rules! at {
        ($level:expr) => {
            tracing::event!(
                target: TARGET,
                $level,
                program = %f.program,
                event = %f.event,
                frontend = shown(&f.frontend),
                client = shown(&f.client),
                backend = shown(&f.backend),
                source = shown(&f.source),
                destination = shown(&f.destination),
                "{}",
                f.message
            )
        };
    }
    match f.level {
        tracing::Level::ERROR => at!(tracing::Level::ERROR),
        tracing::Level::WARN => at!(tracing::Level::WARN),
        tracing::Level::INFO => at!(tracing::Level::INFO),
        tracing::Level::DEBUG => at!(tracing::Level::DEBUG),
        _ => at!(tracing::Level::TRACE),
    }
}

/// aya-log's records into [`emit`].
struct Forwarder;

impl log::Log for Forwarder {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        emit(&forwarded(record.target(), record.level(), &text));
    }

    fn flush(&self) {}
}

/// The thread reading the programs' ring buffer; stopped and joined on drop. It holds the
/// ring buffer's descriptor, which programs loaded after it (the packet path's, as
/// interfaces appear) refer to: keep it for as long as the agent runs.
pub struct Reader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long the reader waits for records before it looks at its stop flag again.
const POLL_MS: i32 = 200;

impl Reader {
    /// Takes the ring buffer out of `ebpf` (after it is loaded, before its programs are) and
    /// starts reading it.
    pub fn start(ebpf: &mut Ebpf) -> Result<Reader, BpfLogError> {
        let mut logger =
            EbpfLogger::init_with_logger(ebpf, Forwarder).map_err(BpfLogError::Logger)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bpf-log".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd: logger.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, owned by this frame; the fd lives in `logger`.
                    unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
                    logger.flush();
                }
            })
            .map_err(BpfLogError::Thread)?;
        Ok(Reader {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `filter` (a `RUST_LOG` value) with forwarded records let through at every level, unless
/// it names [`TARGET`] itself: the programs' level (`--bpf-log-level`) decides what they
/// write, so a default `info` must not hide their debug records.
pub fn with_bpf_target(filter: &str) -> String {
    let names_it = filter.split(',').any(|d| {
        let target = d.split(['=', '[']).next().unwrap_or_default().trim();
        target == TARGET || target.starts_with("bpf::")
    });
    match (names_it, filter.trim().is_empty()) {
        (true, _) => filter.to_string(),
        (false, true) => format!("{TARGET}=trace"),
        (false, false) => format!("{filter},{TARGET}=trace"),
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum as _;

    use super::*;

    /// The flag's values, their map values and back; anything else is refused.
    #[test]
    fn levels_parse_and_round_trip() {
        for (s, level, raw) in [
            ("off", Level::Off, 0),
            ("error", Level::Error, 1),
            ("warn", Level::Warn, 2),
            ("info", Level::Info, 3),
            ("debug", Level::Debug, 4),
        ] {
            assert_eq!(Level::from_str(s, false), Ok(level), "{s}");
            assert_eq!(level.raw(), raw);
            assert_eq!(Level::from_raw(raw), Some(level));
            assert_eq!(level.name(), s);
        }
        for bad in ["trace", "verbose", "", "3"] {
            assert!(Level::from_str(bad, false).is_err(), "{bad:?}");
        }
        assert_eq!(Level::from_raw(5), None);
        assert_eq!(Level::default(), Level::Off);
        // aya-log's numbering, which the programs compare against.
        assert_eq!(Level::Info.raw(), u32::from(u8::from(aya_log::Level::Info)));
        assert_eq!(
            Level::Debug.raw(),
            u32::from(u8::from(aya_log::Level::Debug))
        );
    }

    /// A known event: its counter's help as the message, the addresses as fields.
    #[test]
    fn a_record_becomes_structured_fields() {
        let f = forwarded(
            "proxy_tc",
            log::Level::Warn,
            "ct_update_failed frontend=10.96.0.10:80/tcp client=10.0.0.2:40000 backend=10.0.1.5:8080",
        );
        assert_eq!(
            f,
            Forwarded {
                level: tracing::Level::WARN,
                program: "proxy_tc".into(),
                event: "ct_update_failed".into(),
                message: Counter::CtUpdateFailed.help().into(),
                frontend: Some("10.96.0.10:80/tcp".into()),
                client: Some("10.0.0.2:40000".into()),
                backend: Some("10.0.1.5:8080".into()),
                source: None,
                destination: None,
            }
        );
        let f = forwarded(
            "proxy_connect4",
            log::Level::Info,
            "no_endpoints_rejected frontend=10.96.0.11:80/tcp",
        );
        assert_eq!(f.level, tracing::Level::INFO);
        assert_eq!(f.message, Counter::NoEndpointsRejected.help());
        assert_eq!(f.frontend.as_deref(), Some("10.96.0.11:80/tcp"));
        assert_eq!(f.client, None);
    }

    /// Words that are no field follow the help; an unknown event keeps the record's text.
    #[test]
    fn unknown_events_and_words_are_kept() {
        let f = forwarded(
            "proxy_tc",
            log::Level::Debug,
            "tc_no_endpoints_rejected frontend=10.96.0.10:53/udp size=900",
        );
        assert_eq!(
            f.message,
            format!("{}: size=900", Counter::TcNoEndpointsRejected.help())
        );
        let f = forwarded("proxy_tc", log::Level::Error, "something new x=1");
        assert_eq!(
            (f.event.as_str(), f.message.as_str()),
            ("something", "something new x=1")
        );
        assert_eq!(forwarded("p", log::Level::Trace, "").event, "");
    }

    /// The filter lets forwarded records through unless it names their target.
    #[test]
    fn the_log_filter_passes_the_bpf_target() {
        assert_eq!(with_bpf_target("info"), "info,bpf=trace");
        assert_eq!(with_bpf_target(""), "bpf=trace");
        assert_eq!(
            with_bpf_target("info,proxy_agent=debug"),
            "info,proxy_agent=debug,bpf=trace"
        );
        assert_eq!(with_bpf_target("info,bpf=off"), "info,bpf=off");
        assert_eq!(with_bpf_target("bpf[x]=warn"), "bpf[x]=warn");
        assert_eq!(with_bpf_target("bpfoo=warn"), "bpfoo=warn,bpf=trace");
    }
}
