//! Internet checksums computed here (the IP header's; REJECT's ICMP message), on 16-bit words
//! as they lie in memory (little-endian on the BPF target): folded and inverted, a result is
//! stored back the same way, so no byte swapping is needed (RFC 1071's byte-order
//! independence). The L4 checksums of rewritten packets go through the kernel's helpers,
//! which know whether the packet's checksum is still to be completed by the device.

/// A ones' complement sum, folded to 16 bits and inverted: a checksum.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The two 16-bit words of a 32-bit one, summed.
#[inline(always)]
pub fn halves(w: u32) -> u32 {
    (w & 0xffff) + (w >> 16)
}

#[inline(always)]
pub fn sum_words(words: &[u32]) -> u32 {
    words.iter().map(|w| halves(*w)).sum()
}

/// `check` updated for a 32-bit word of what it covers changing from `from` to `to`
/// (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    fold(u32::from(!check) + halves(!from) + halves(to))
}
