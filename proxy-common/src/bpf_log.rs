//! The programs' log level: how verbose their slow-path log (aya-log) is, written by the
//! agent into [`crate::LOG_LEVEL_MAP`] and read by the programs on their slow paths only, so
//! a change takes effect at once, without reloading them.

use core::mem::size_of;

/// The level in [`crate::LOG_LEVEL_MAP`]'s one element: a record is written when its level is
/// at most this one. The numbers are aya-log's (`aya_log_common::Level`), with 0 for off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LogLevel {
    pub level: u32,
}
const _: () = assert!(size_of::<LogLevel>() == 4);

/// Nothing is logged (the default; also what an element the agent never wrote reads as).
pub const LOG_OFF: u32 = 0;
pub const LOG_ERROR: u32 = 1;
pub const LOG_WARN: u32 = 2;
pub const LOG_INFO: u32 = 3;
pub const LOG_DEBUG: u32 = 4;
