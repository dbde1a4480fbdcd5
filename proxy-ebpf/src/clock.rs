//! The datapath's clock: `CLOCK_MONOTONIC` in seconds (the agent collects by the same).

use aya_ebpf::helpers::bpf_ktime_get_ns;

#[inline(always)]
pub fn now_s() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32
}
