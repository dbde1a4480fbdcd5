//! The slow-path log: records through aya-log's ring buffer, which the agent reads and
//! forwards into its own log (`--bpf-log-level`). Off unless the agent wrote a level into
//! `PROXY_LOG_V1`; the level is read only where an event is also counted (a refusal, a
//! failed write), never on a connect or packet that translates normally. A full ring buffer
//! drops the record: a program never waits for the reader.
//!
//! A record's message is `EVENT key=value ...`: the event is the name of the counter
//! counted beside it (the agent shows its help as the message), the fields are the
//! frontend (`VIP:port/proto`) and the addresses involved. Its target names the program.

use aya_log_ebpf::macro_support::Level;

use crate::maps::PROXY_LOG_V1;

/// Whether records at `level` are wanted now (the agent's level is at least it).
#[inline(always)]
pub fn enabled(level: Level) -> bool {
    PROXY_LOG_V1
        .get(0)
        .is_some_and(|l| l.level >= u32::from(level as u8))
}

/// `"tcp"`, `"udp"`: the protocol as a frontend is written (`10.96.0.10:80/tcp`).
#[inline(always)]
pub fn proto_name(proto: u8) -> &'static str {
    if proto == proxy_common::PROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

/// Host-order copies of an address and a port in network order, for aya-log's `{:i}` and `{}`.
#[inline(always)]
pub fn host(addr_be: u32, port_be: u16) -> (u32, u16) {
    (u32::from_be(addr_be), u16::from_be(port_be))
}

/// Logs an event at level `$level` (`Error`, `Warn`, `Info`, `Debug`) from program
/// `$program` (its record's target), if the agent's level asks for it: the check comes
/// first, so with logging off no record is built.
macro_rules! event {
    ($level:ident, $program:expr, $($fmt:tt)+) => {
        if $crate::log::enabled(aya_log_ebpf::macro_support::Level::$level) {
            aya_log_ebpf::log!(
                &(),
                target: $program,
                aya_log_ebpf::macro_support::Level::$level,
                $($fmt)+
            );
        }
    };
}
pub(crate) use event;
