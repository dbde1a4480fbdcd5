//! The one way the packet path reads and writes a packet. It counts the writes done, so a
//! failure ([`Failed`], from any read or write) is judged in one place, [`Packet::verdict`]:
//! before the first write the packet is as it came and is passed on (what we cannot parse is
//! not ours to judge); after it, the packet may be half-rewritten and is dropped and counted,
//! never forwarded (Cilium's `DROP_WRITE_ERROR`).

use core::mem::size_of;

use aya_ebpf::{
    Global,
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    cty::c_long,
    programs::TcContext,
};
use proxy_common::Counter;

use crate::maps::count;

/// Let the next program or the stack decide (TCX_NEXT; "unspec" on clsact).
pub const PASS: i32 = TC_ACT_UNSPEC;
pub const DROP: i32 = TC_ACT_SHOT;

/// Makes the n-th packet write fail as a helper would (0: never), so a test can show what a
/// failure part way does. The agent always loads 0: it is read-only data, so the verifier
/// knows it and prunes the checks.
#[unsafe(no_mangle)]
static PROXY_FAULT_AT_WRITE: Global<u32> = Global::new(0);

/// A read or write of the packet failed.
pub struct Failed;

pub struct Packet<'a> {
    ctx: &'a TcContext,
    /// Writes that succeeded.
    writes: u32,
}

impl<'a> Packet<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a TcContext) -> Self {
        Packet { ctx, writes: 0 }
    }

    /// The verdict for a packet whose handling failed (see the module's doc).
    #[inline(always)]
    pub fn verdict(&self, _: Failed) -> i32 {
        if self.writes == 0 {
            PASS
        } else {
            count(Counter::TcRewriteFailedDropped);
            DROP
        }
    }

    /// Whether a write succeeded (a failure from here on drops the packet).
    #[inline(always)]
    pub fn written(&self) -> bool {
        self.writes != 0
    }

    #[inline(always)]
    pub fn len(&self) -> usize {
        self.ctx.len() as usize
    }

    /// The interface the packet arrived on.
    #[inline(always)]
    pub fn ifindex(&self) -> u32 {
        // SAFETY: the kernel hands a valid __sk_buff to this program type.
        unsafe { (*self.ctx.skb.skb).ifindex }
    }

    /// Where a `T` at `offset` lies in the packet's linear data, if it lies there (headers
    /// almost always do), for reading. Read afresh each time: a helper that changes the packet
    /// moves it.
    #[inline(always)]
    fn linear<T>(&self, offset: usize) -> Option<*mut T> {
        let (start, end) = (self.ctx.data(), self.ctx.data_end());
        // At least 2 bytes: LLVM turns `p + 1 > end` into `p >= end`, which the verifier does
        // not take as a bound. (A last odd byte is read through the helper instead.)
        if start + offset + size_of::<T>().max(2) > end {
            return None;
        }
        Some((start + offset) as *mut T)
    }

    /// Reads a `T` at `offset`: directly, or through the helper when it is not in the linear
    /// data.
    #[inline(always)]
    pub fn load<T: Copy>(&self, offset: usize) -> Result<T, Failed> {
        match self.linear::<T>(offset) {
            // SAFETY: in bounds of the packet's data, checked above (read unaligned: IP
            // addresses sit at 2-byte offsets).
            Some(p) => Ok(unsafe { p.read_unaligned() }),
            None => self.ctx.load(offset).map_err(|_| Failed),
        }
    }

    /// Writes through the helper, never directly: a program that writes packet memory
    /// directly makes the kernel unclone every cloned packet before it runs (most of a TCP
    /// sender's are clones), translated or not.
    #[inline(always)]
    pub fn store<T>(&mut self, offset: usize, v: &T) -> Result<(), Failed> {
        self.before_write()?;
        let r = self.ctx.store(offset, v, 0);
        self.after_write(r)
    }

    /// Replaces `from` with `to` (4 bytes) in the IP checksum at `offset`.
    #[inline(always)]
    pub fn l3_csum_replace(&mut self, offset: usize, from: u32, to: u32) -> Result<(), Failed> {
        self.before_write()?;
        let r = self
            .ctx
            .l3_csum_replace(offset, u64::from(from), u64::from(to), 4);
        self.after_write(r)
    }

    /// Replaces `from` with `to` in the L4 checksum at `offset`; `flags` as the helper's
    /// (size in the low bits, `BPF_F_PSEUDO_HDR`, `BPF_F_MARK_MANGLED_0`).
    #[inline(always)]
    pub fn l4_csum_replace(
        &mut self,
        offset: usize,
        from: u32,
        to: u32,
        flags: u64,
    ) -> Result<(), Failed> {
        self.before_write()?;
        let r = self
            .ctx
            .l4_csum_replace(offset, u64::from(from), u64::from(to), flags);
        self.after_write(r)
    }

    /// Grows (or shrinks) the packet by `len_diff` bytes after the MAC header.
    #[inline(always)]
    pub fn adjust_room_mac(&mut self, len_diff: i32) -> Result<(), Failed> {
        self.before_write()?;
        let mode = aya_ebpf::bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC;
        let r = self.ctx.adjust_room(len_diff, mode, 0);
        self.after_write(r)
    }

    #[inline(always)]
    fn before_write(&self) -> Result<(), Failed> {
        if self.writes + 1 == PROXY_FAULT_AT_WRITE.load() {
            return Err(Failed);
        }
        Ok(())
    }

    #[inline(always)]
    fn after_write(&mut self, r: Result<(), c_long>) -> Result<(), Failed> {
        r.map_err(|_| Failed)?;
        self.writes += 1;
        Ok(())
    }
}
