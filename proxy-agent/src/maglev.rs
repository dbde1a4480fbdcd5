//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI'16, section 3.4), as Cilium (`pkg/maglev`) and Katran build them.
//!
//! A Service frontend's table has `m` entries (`m` prime), each naming one of its backends; the
//! datapath picks the entry `hash(flow) % m`. Maglev tables give each backend an almost equal
//! share of the entries, and when a backend comes or goes little more than its own share (`1/N`)
//! of the entries changes owner (the excess grows with `N/m`); [`update`] moves exactly the
//! changed backends' share by starting from the table in place.
//!
//! A fresh table is the same on every node and for every agent version with the same
//! backends: [`build`] is a pure function of the members' ids, weights and `m`. Tables that
//! [`update`] changed depend on the history of changes, so two nodes may differ by a few
//! shares; a ClusterIP's flows are balanced on their client's node, so that is where a flow's
//! table lives. The
//! definition: a member's preference list is `(offset + j * skip) % m` for `j` = 0, 1, ...,
//! with `offset = h1(id) % m` and `skip = h2(id) % (m - 1) + 1`, where `h1` and `h2` are
//! SipHash-2-4 of the id's bytes (nothing else hashed) under `OFFSET_KEY` and `SKIP_KEY`;
//! members then fill the table round-robin in order of their ids (see [`build`]). Not std's
//! `DefaultHasher`, whose algorithm may change between Rust releases.

use siphasher::sip::SipHasher24;

/// Cilium's default table size, a prime.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;
/// Largest table size accepted (a prime; keep tables within u32 math and sane memory).
pub const MAX_TABLE_SIZE: u32 = 131071;
/// Smallest table size accepted. Tiny tables balance badly; this only refuses the degenerate.
const MIN_TABLE_SIZE: u32 = 7;

/// Key of the hash that gives a member's first preferred entry (its permutation's offset).
/// An arbitrary fixed value.
///
/// Part of the table's definition: changing it (or [`SKIP_KEY`], or the hash function) moves
/// every table, so nodes running different agent versions would disagree on backends.
const OFFSET_KEY: [u64; 2] = [0x6d61_676c_6576_2d6f, 0x9e37_79b9_7f4a_7c15];
/// Key of the hash that gives a member's step through the table (its permutation's skip).
/// Different from [`OFFSET_KEY`] so that offset and skip are independent. Part of the table's
/// definition, like [`OFFSET_KEY`].
const SKIP_KEY: [u64; 2] = [0x6d61_676c_6576_2d73, 0xc2b2_ae3d_27d4_eb4f];

/// Marks a table entry no member has taken yet (member indices are below `u32::MAX`).
const EMPTY: u32 = u32::MAX;

/// Why a table size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableSizeError {
    #[error(
        "Maglev table size {0} is not a prime: it must be a prime in {min}..={max} (default {default})",
        min = MIN_TABLE_SIZE,
        max = MAX_TABLE_SIZE,
        default = DEFAULT_TABLE_SIZE
    )]
    NotPrime(u32),
    #[error(
        "Maglev table size {0} is out of range: it must be a prime in {min}..={max} (default {default})",
        min = MIN_TABLE_SIZE,
        max = MAX_TABLE_SIZE,
        default = DEFAULT_TABLE_SIZE
    )]
    OutOfRange(u32),
}

/// Validates a table size: prime, in 7..=MAX_TABLE_SIZE.
///
/// Prime because each member walks the table in steps of `skip` (1..m): only with `m` prime is
/// every such walk a permutation of all `m` entries.
pub fn validate_table_size(m: u32) -> Result<u32, TableSizeError> {
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&m) {
        return Err(TableSizeError::OutOfRange(m));
    }
    if !is_prime(m) {
        return Err(TableSizeError::NotPrime(m));
    }
    Ok(m)
}

/// Whether `n` is prime (trial division: table sizes are small and validated once).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    // Every prime above 3 is 6k ± 1.
    let n = u64::from(n);
    let mut i = 5u64;
    while i * i <= n {
        if n.is_multiple_of(i) || n.is_multiple_of(i + 2) {
            return false;
        }
        i += 6;
    }
    true
}

/// A backend as the builder sees it: a stable identity (bytes that are the same on every
/// node and across agent restarts, e.g. the backend's IP and port) and a weight (> 0).
///
/// Ids should be distinct: members with equal ids get the same permutation, and which of them
/// wins a contested entry then depends on their order in the caller's slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    pub id: &'a [u8],
    pub weight: u32,
}

/// One member's state while the table fills.
struct Walker {
    /// Index into the caller's slice, the value written into the table.
    index: u32,
    /// The member's permutation is `(offset + j * skip) % m`; `next` is the entry for the next
    /// `j` not yet looked at, kept instead of `j` so each step is one addition.
    next: usize,
    skip: usize,
    weight: u64,
    /// Weight gained and not yet spent on entries; below the largest weight between rounds.
    credit: u64,
}

/// The lookup table of size m (m a validated prime): entry i is an index into `members`.
///
/// Deterministic: depends only on the members' ids and weights and on `m`, not on the members'
/// order (they are sorted by id inside; the indices returned are into the caller's slice).
/// Empty `members`, or no member with a weight above 0, gives an empty Vec. Members with
/// weight 0 never appear. Balance is good when `m` is much larger than the number of members
/// (Maglev's authors suggest `m` > 100 × N).
///
/// Weights extend the paper's round-robin fill the simple deterministic way: each round every
/// member gains `weight` credit and takes its next preferred empty entry if it holds at least
/// `max_weight` credit, paying that much. A member's share thus tends to `weight / sum`, and
/// with equal weights this is exactly the paper's algorithm. Credit starts at
/// `max_weight - weight`, so every member takes an entry in the first round: a backend with a
/// small weight still gets some traffic whenever `m` >= N.
///
/// # Panics
///
/// If `m` is not a valid table size (see [`validate_table_size`]), or if `members` has
/// `u32::MAX` or more elements.
pub fn build(members: &[Member<'_>], m: u32) -> Vec<u32> {
    if let Err(e) = validate_table_size(m) {
        panic!("maglev::build: {e}");
    }
    // Indices are stored as u32, and u32::MAX marks empty entries.
    assert!(
        u32::try_from(members.len()).is_ok_and(|n| n < EMPTY),
        "maglev::build: too many members"
    );

    let mut order: Vec<usize> = (0..members.len())
        .filter(|&i| members[i].weight > 0)
        .collect();
    if order.is_empty() {
        return Vec::new();
    }
    // Stable, so equal ids (a caller's mistake) at least keep a defined order.
    order.sort_by(|&a, &b| members[a].id.cmp(members[b].id));

    let max_weight = order
        .iter()
        .map(|&i| u64::from(members[i].weight))
        .max()
        .unwrap_or(1);
    let m64 = u64::from(m);
    let offset_hasher = SipHasher24::new_with_keys(OFFSET_KEY[0], OFFSET_KEY[1]);
    let skip_hasher = SipHasher24::new_with_keys(SKIP_KEY[0], SKIP_KEY[1]);
    let mut walkers: Vec<Walker> = order
        .iter()
        .map(|&i| {
            let member = &members[i];
            let offset = offset_hasher.hash(member.id) % m64;
            let skip = skip_hasher.hash(member.id) % (m64 - 1) + 1;
            let weight = u64::from(member.weight);
            Walker {
                // Both conversions are lossless: `i` < u32::MAX (asserted), and offset, skip < m.
                index: i as u32,
                next: offset as usize,
                skip: skip as usize,
                weight,
                credit: max_weight - weight,
            }
        })
        .collect();

    let m = m as usize;
    let mut table = vec![EMPTY; m];
    let mut filled = 0usize;
    // The max-weight member takes an entry every round, so m rounds always fill the table.
    'rounds: for _ in 0..m {
        for w in &mut walkers {
            w.credit += w.weight;
            // Credit was below max_weight and grew by at most max_weight: one entry at most.
            if w.credit < max_weight {
                continue;
            }
            w.credit -= max_weight;
            // Terminates: m is prime and 0 < skip < m, so the walk visits every entry, and one is
            // still empty. Positions stay below m, so `pos + skip` < 2m never overflows.
            let mut pos = w.next;
            while table[pos] != EMPTY {
                pos += w.skip;
                if pos >= m {
                    pos -= m;
                }
            }
            table[pos] = w.index;
            w.next = pos + w.skip;
            if w.next >= m {
                w.next -= m;
            }
            filled += 1;
            if filled == m {
                break 'rounds;
            }
        }
    }
    debug_assert_eq!(filled, m);
    table
}

/// The table of `members` that keeps as much of `previous` as balance allows: `previous[i]`
/// is the index (into `members`) of entry `i`'s member, or anything out of range where that
/// member is gone. Entries of members still present stay theirs up to each member's share;
/// members over their share give up their least preferred entries; the entries left free go
/// to the members under their share, each taking its next preferred free entry in turn (the
/// paper's fill, over the free entries only). So a backend's removal moves only its own
/// entries and an addition only the new backend's share, where [`build`] from scratch would
/// move a few times more as N grows. With no usable `previous` (none, another size, or no
/// entry of a present member) this is [`build`].
///
/// Deterministic in (`previous`, members, `m`): an unchanged set gives `previous` back, so a
/// restarted agent that reads its tables back writes nothing. Tables of nodes that saw
/// different histories of changes may differ; a fresh table is the same everywhere.
///
/// # Panics
///
/// As [`build`].
pub fn update(members: &[Member<'_>], m: u32, previous: &[u32]) -> Vec<u32> {
    let fresh = || build(members, m);
    if previous.len() != m as usize {
        return fresh();
    }
    let mut order: Vec<usize> = (0..members.len())
        .filter(|&i| members[i].weight > 0)
        .collect();
    order.sort_by(|&a, &b| members[a].id.cmp(members[b].id));
    let n = members.len();
    let present = |i: u32| (i as usize) < n && members[i as usize].weight > 0;
    let mut table: Vec<u32> = (previous.iter())
        .map(|&i| if present(i) { i } else { EMPTY })
        .collect();
    let mut count = vec![0usize; n];
    for &i in &table {
        if i != EMPTY {
            count[i as usize] += 1;
        }
    }
    if order.is_empty() || count.iter().all(|&c| c == 0) {
        return fresh();
    }

    // Shares: m * weight / total, the remainder one each to the members with the largest
    // fraction, then the most entries already (fewest moves), then by id.
    let m_us = m as usize;
    let total: u128 = order.iter().map(|&i| u128::from(members[i].weight)).sum();
    let mut share = vec![0usize; n];
    let mut frac = vec![0u128; n];
    for &i in &order {
        let exact = u128::from(m) * u128::from(members[i].weight);
        share[i] = (exact / total) as usize;
        frac[i] = exact % total;
    }
    let left = m_us - order.iter().map(|&i| share[i]).sum::<usize>();
    let mut by_claim = order.clone();
    by_claim.sort_by(|&a, &b| frac[b].cmp(&frac[a]).then(count[b].cmp(&count[a])));
    for &i in by_claim.iter().take(left) {
        share[i] += 1;
    }

    let m64 = u64::from(m);
    let offset_hasher = SipHasher24::new_with_keys(OFFSET_KEY[0], OFFSET_KEY[1]);
    let skip_hasher = SipHasher24::new_with_keys(SKIP_KEY[0], SKIP_KEY[1]);
    let walk = |i: usize| {
        let id = members[i].id;
        (
            (offset_hasher.hash(id) % m64) as usize,
            (skip_hasher.hash(id) % (m64 - 1) + 1) as usize,
        )
    };

    // Members over their share give up the entries latest in their preference order: the
    // position j of entry p in a walk (offset + j * skip) % m is (p - offset) / skip mod m.
    for &i in &order {
        if count[i] <= share[i] {
            continue;
        }
        let (offset, skip) = walk(i);
        let inv = mod_pow(skip as u64, m64 - 2, m64);
        let mut held: Vec<(u64, usize)> = (table.iter().enumerate())
            .filter(|(_, e)| **e as usize == i)
            .map(|(p, _)| (((p + m_us - offset) as u64 % m64) * inv % m64, p))
            .collect();
        held.sort_unstable_by(|a, b| b.cmp(a));
        for &(_, p) in held.iter().take(count[i] - share[i]) {
            table[p] = EMPTY;
        }
        count[i] = share[i];
    }

    // The free entries, to the members under their share, round-robin in id order. Each
    // member's walk visits every entry once (m prime), so the loops are bounded by m each.
    let mut walkers: Vec<(usize, usize, usize)> = (order.iter())
        .filter(|&&i| count[i] < share[i])
        .map(|&i| {
            let (offset, skip) = walk(i);
            (i, offset, skip)
        })
        .collect();
    while !walkers.is_empty() {
        walkers.retain_mut(|(i, next, skip)| {
            let mut pos = *next;
            for _ in 0..m_us {
                if table[pos] == EMPTY {
                    break;
                }
                pos += *skip;
                if pos >= m_us {
                    pos -= m_us;
                }
            }
            debug_assert_eq!(table[pos], EMPTY);
            table[pos] = *i as u32;
            count[*i] += 1;
            *next = pos;
            count[*i] < share[*i]
        });
    }
    debug_assert!(table.iter().all(|&e| e != EMPTY));
    table
}

/// `base^exp mod m` (m < 2^32, so products fit in u64).
fn mod_pow(mut base: u64, mut exp: u64, m: u64) -> u64 {
    let mut acc = 1u64;
    base %= m;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = acc * base % m;
        }
        base = base * base % m;
        exp >>= 1;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backend-like ids: "10.<a>.<b>.<c>:8080".
    fn ids(n: usize, first: usize) -> Vec<Vec<u8>> {
        (first..first + n)
            .map(|i| format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255).into_bytes())
            .collect()
    }

    fn members(ids: &[Vec<u8>], weight: u32) -> Vec<Member<'_>> {
        ids.iter().map(|id| Member { id, weight }).collect()
    }

    /// Entries by member id, to compare tables built from different member lists.
    fn by_id<'a>(members: &[Member<'a>], table: &[u32]) -> Vec<&'a [u8]> {
        table.iter().map(|&i| members[i as usize].id).collect()
    }

    fn counts(n: usize, table: &[u32]) -> Vec<usize> {
        let mut c = vec![0usize; n];
        for &i in table {
            c[i as usize] += 1;
        }
        c
    }

    #[test]
    fn table_sizes() {
        for m in [7, 251, 16381, 65521, 65537, 131071] {
            assert!(is_prime(m), "{m}");
            assert_eq!(validate_table_size(m), Ok(m));
        }
        assert_eq!(
            validate_table_size(DEFAULT_TABLE_SIZE),
            Ok(DEFAULT_TABLE_SIZE)
        );
        assert_eq!(
            validate_table_size(16380),
            Err(TableSizeError::NotPrime(16380))
        );
        assert_eq!(
            validate_table_size(16383),
            Err(TableSizeError::NotPrime(16383))
        );
        for m in [0, 1, 2, 3, 4, 5, 6, 131072, 131101, u32::MAX] {
            assert_eq!(validate_table_size(m), Err(TableSizeError::OutOfRange(m)));
        }
        let msg = TableSizeError::NotPrime(16380).to_string();
        assert!(msg.contains("16380") && msg.contains("7..=131071") && msg.contains("16381"));
        let msg = TableSizeError::OutOfRange(4).to_string();
        assert!(msg.contains('4') && msg.contains("7..=131071") && msg.contains("16381"));
    }

    #[test]
    fn is_prime_matches_a_sieve() {
        let limit = 20_000usize;
        let mut sieve = vec![true; limit];
        sieve[0] = false;
        sieve[1] = false;
        for i in 2..limit {
            if sieve[i] {
                for j in (i * i..limit).step_by(i) {
                    sieve[j] = false;
                }
            }
        }
        for (n, &p) in sieve.iter().enumerate() {
            assert_eq!(is_prime(n as u32), p, "{n}");
        }
        assert!(is_prime(4_294_967_291)); // the largest u32 prime
        assert!(!is_prime(u32::MAX));
        assert!(!is_prime(65_521 * 65_537)); // a semiprime with both factors near the square root
    }

    #[test]
    fn balance() {
        let ids = ids(100, 1);
        let members = members(&ids, 1);
        let table = build(&members, DEFAULT_TABLE_SIZE);
        assert_eq!(table.len(), DEFAULT_TABLE_SIZE as usize);
        let c = counts(members.len(), &table);
        let (min, max) = (*c.iter().min().unwrap(), *c.iter().max().unwrap());
        let ideal = f64::from(DEFAULT_TABLE_SIZE) / 100.0;
        eprintln!(
            "balance: 100 members, m=16381: entries per member {min}..={max} (ideal {ideal})"
        );
        assert!(max - min <= 1, "{min}..={max}");
        for &n in &c {
            assert!((n as f64 - ideal).abs() <= ideal * 0.01, "{n} vs {ideal}");
        }
    }

    /// The most entries, as a multiple of 1/N, that one member joining or leaving N may move
    /// with m = 16381. The ideal is 1 (only the member's own share). Maglev's round-robin fill
    /// moves somewhat more, and the excess grows with N/m: for N up to 20 it stays within 1.2,
    /// for more members the bounds are looser. A builder that got the permutations or the fill
    /// order wrong moves most of the table and fails all of them.
    const DISRUPTION_BOUND: [(usize, f64); 4] = [(10, 1.2), (20, 1.2), (50, 1.8), (100, 2.7)];

    /// Fraction of the entries whose member (by id) differs between the two tables.
    fn moved(a: &[&[u8]], b: &[&[u8]]) -> f64 {
        assert_eq!(a.len(), b.len());
        let n = a.iter().zip(b).filter(|(x, y)| x != y).count();
        n as f64 / a.len() as f64
    }

    #[test]
    fn disruption_on_removal_from_scratch() {
        let m = DEFAULT_TABLE_SIZE;
        for (n, bound) in DISRUPTION_BOUND {
            let bound = bound / n as f64;
            let ids = ids(n, 1);
            let all = members(&ids, 1);
            let before = by_id(&all, &build(&all, m));
            for gone in [0, n / 3, n / 2, n - 1] {
                let rest: Vec<Member<'_>> = all
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != gone)
                    .map(|(_, &mb)| mb)
                    .collect();
                let after = by_id(&rest, &build(&rest, m));
                let gone_id = all[gone].id;
                // Every entry of the removed member moved.
                assert!(!after.contains(&gone_id));
                let ratio = moved(&before, &after);
                let own = before.iter().filter(|&&id| id == gone_id).count() as f64 / m as f64;
                eprintln!(
                    "removal: N={n:3} member {gone:3}: moved {ratio:.5} = {:.3}/N (its own {own:.5}, bound {bound:.5})",
                    ratio * n as f64,
                );
                assert!(ratio <= bound, "N={n} removing {gone}: {ratio}");
            }
        }
    }

    #[test]
    fn disruption_on_addition_from_scratch() {
        let m = DEFAULT_TABLE_SIZE;
        for (n, bound) in DISRUPTION_BOUND {
            let bound = bound / (n + 1) as f64;
            let ids = ids(n + 3, 1);
            let old = members(&ids[..n], 1);
            let before = by_id(&old, &build(&old, m));
            for extra in &ids[n..] {
                let mut new = old.clone();
                new.push(Member {
                    id: extra,
                    weight: 1,
                });
                let after = by_id(&new, &build(&new, m));
                let ratio = moved(&before, &after);
                // The new member's entries all moved to it; it must have got its share.
                let own = after.iter().filter(|&&id| id == &extra[..]).count() as f64 / m as f64;
                assert!(own >= 0.99 / (n + 1) as f64 && ratio >= own);
                eprintln!(
                    "addition: N={n:3} -> {}: moved {ratio:.5} = {:.3}/(N+1) (its own {own:.5}, bound {bound:.5})",
                    n + 1,
                    ratio * (n + 1) as f64
                );
                assert!(ratio <= bound, "N={n} adding {extra:?}: {ratio}");
            }
        }
    }

    /// `previous` for [`update`]: `before` (entries by id) as indices into `members`.
    fn as_previous(before: &[&[u8]], members: &[Member<'_>]) -> Vec<u32> {
        before
            .iter()
            .map(|id| (members.iter().position(|mb| mb.id == *id)).map_or(u32::MAX, |i| i as u32))
            .collect()
    }

    fn spread(n: usize, table: &[u32]) -> (usize, usize) {
        let c = counts(n, table);
        (*c.iter().min().unwrap(), *c.iter().max().unwrap())
    }

    /// The bound: a removal moves at most 1.2/N of the table, an addition at most
    /// 1.2/(N+1), for N = 10..100, and the table stays balanced (max - min <= 1).
    #[test]
    fn update_disruption_on_removal() {
        let m = DEFAULT_TABLE_SIZE;
        for n in [10, 20, 50, 100] {
            let ids = ids(n, 1);
            let all = members(&ids, 1);
            let before = by_id(&all, &build(&all, m));
            for gone in [0, n / 3, n / 2, n - 1] {
                let rest: Vec<Member<'_>> = (all.iter().enumerate())
                    .filter(|&(i, _)| i != gone)
                    .map(|(_, &mb)| mb)
                    .collect();
                let table = update(&rest, m, &as_previous(&before, &rest));
                let after = by_id(&rest, &table);
                assert!(!after.contains(&all[gone].id));
                let ratio = moved(&before, &after);
                eprintln!("update removal: N={n:3}: moved {:.3}/N", ratio * n as f64);
                assert!(ratio <= 1.2 / n as f64, "N={n} removing {gone}: {ratio}");
                let (lo, hi) = spread(rest.len(), &table);
                assert!(hi - lo <= 1, "N={n}: {lo}..{hi}");
            }
        }
    }

    #[test]
    fn update_disruption_on_addition() {
        let m = DEFAULT_TABLE_SIZE;
        for n in [10, 20, 50, 100] {
            let ids = ids(n + 3, 1);
            let old = members(&ids[..n], 1);
            let before = by_id(&old, &build(&old, m));
            for extra in &ids[n..] {
                let mut new = old.clone();
                new.push(Member {
                    id: extra,
                    weight: 1,
                });
                let table = update(&new, m, &as_previous(&before, &new));
                let after = by_id(&new, &table);
                let ratio = moved(&before, &after);
                eprintln!(
                    "update addition: N={n:3}: moved {:.3}/(N+1)",
                    ratio * (n + 1) as f64
                );
                assert!(ratio <= 1.2 / (n + 1) as f64, "N={n} adding: {ratio}");
                let (lo, hi) = spread(new.len(), &table);
                assert!(hi - lo <= 1, "N={n}: {lo}..{hi}");
            }
        }
    }

    /// An unchanged set gives the previous table back (a restarted agent writes nothing), a
    /// table of another size or of no present member is a fresh build, and a chain of changes
    /// stays balanced and valid.
    #[test]
    fn update_keeps_and_falls_back() {
        let m = DEFAULT_TABLE_SIZE;
        let ids = ids(30, 1);
        let all = members(&ids, 1);
        let table = build(&all, m);
        assert_eq!(update(&all, m, &table), table);
        assert_eq!(update(&all, m, &[]), table);
        assert_eq!(update(&all, m, &vec![u32::MAX; m as usize]), table);
        assert_eq!(update(&all, m, &table[1..]), table);
        // Remove 5, add 7 others, in one step; then again with weights.
        let mut next: Vec<Member<'_>> = all[5..].to_vec();
        let more = super::tests::ids(7, 100);
        next.extend(members(&more, 1));
        let prev = as_previous(&by_id(&all, &table), &next);
        let t2 = update(&next, m, &prev);
        assert_eq!(t2.len(), m as usize);
        let (lo, hi) = spread(next.len(), &t2);
        assert!(hi - lo <= 1, "{lo}..{hi}");
        assert_eq!(update(&next, m, &t2), t2);
        next[0].weight = 3;
        let t3 = update(&next, m, &t2);
        let c = counts(next.len(), &t3);
        let unit = m as f64 / (next.len() as f64 + 2.0);
        assert!((c[0] as f64 / unit - 3.0).abs() < 0.01, "{}", c[0]);
        assert_eq!(update(&next, m, &t3), t3);
    }

    #[test]
    fn deterministic_and_order_independent() {
        let m = 4093;
        let ids = ids(37, 100);
        let mut mixed = members(&ids, 1);
        for (i, mb) in mixed.iter_mut().enumerate() {
            mb.weight = 1 + (i as u32 % 3);
        }
        let table = build(&mixed, m);
        assert_eq!(table, build(&mixed, m));
        assert_eq!(table.len(), m as usize);
        assert!(table.iter().all(|&i| (i as usize) < mixed.len()));
        let c = counts(mixed.len(), &table);
        assert!(c.iter().all(|&n| n > 0), "{c:?}");

        let expected = by_id(&mixed, &table);
        let mut reversed = mixed.clone();
        reversed.reverse();
        assert_eq!(by_id(&reversed, &build(&reversed, m)), expected);
        // A shuffle that is not a plain reversal: stride 10 through 37 members.
        let shuffled: Vec<Member<'_>> = (0..mixed.len()).map(|i| mixed[i * 10 % 37]).collect();
        assert_eq!(by_id(&shuffled, &build(&shuffled, m)), expected);
    }

    #[test]
    fn every_member_appears_when_m_is_at_least_n() {
        let ids = ids(7, 0);
        let mut ms = members(&ids, 1);
        let c = counts(ms.len(), &build(&ms, 7));
        assert_eq!(c, vec![1; 7]);
        // Even with very uneven weights.
        ms[3].weight = u32::MAX;
        ms[5].weight = 1_000_000;
        let c = counts(ms.len(), &build(&ms, 7));
        assert_eq!(c, vec![1; 7]);
        let c = counts(ms.len(), &build(&ms, 251));
        assert!(c.iter().all(|&n| n > 0), "{c:?}");
        assert_eq!(c[3], 251 - 6, "{c:?}");
    }

    /// Pins the table's definition (hash function, keys, fill order): if this changes, every
    /// node running the new code disagrees with nodes running the old one.
    #[test]
    fn definition_is_stable() {
        // SipHash-2-4's reference vector (key 00..0f, empty message), so a siphasher release
        // that changed its output would fail here rather than silently move tables.
        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        assert_eq!(
            SipHasher24::new_with_key(&key).hash(&[]),
            0x726f_db47_dd0e_0e31
        );
        let ids = ids(5, 1);
        let ms = members(&ids, 1);
        let table = build(&ms, 13);
        assert_eq!(table, GOLDEN_13);
        let big = build(&ms, DEFAULT_TABLE_SIZE);
        let fingerprint = big
            .iter()
            .fold(0u64, |h, &i| h.wrapping_mul(31).wrapping_add(u64::from(i)));
        assert_eq!(fingerprint, GOLDEN_FINGERPRINT, "{fingerprint:#x}");
    }
    const GOLDEN_13: [u32; 13] = [0, 0, 2, 0, 2, 2, 3, 4, 1, 3, 1, 4, 1];
    const GOLDEN_FINGERPRINT: u64 = 0x43ec_b616_a7b4_3192;

    #[test]
    fn weights() {
        let m = DEFAULT_TABLE_SIZE;
        let ids = ids(20, 1);
        let mut ms = members(&ids, 1);
        for mb in ms.iter_mut().step_by(2) {
            mb.weight = 2;
        }
        let c = counts(ms.len(), &build(&ms, m));
        let heavy: Vec<usize> = c.iter().step_by(2).copied().collect();
        let light: Vec<usize> = c.iter().skip(1).step_by(2).copied().collect();
        eprintln!("weights 2:1, m={m}: heavy {heavy:?}, light {light:?}");
        // Sum of weights 30: a weight-1 member's share is m/30.
        let unit = f64::from(m) / 30.0;
        for &n in &heavy {
            assert!((n as f64 - 2.0 * unit).abs() <= 2.0 * unit * 0.02, "{n}");
        }
        for &n in &light {
            assert!((n as f64 - unit).abs() <= unit * 0.02, "{n}");
        }
        for (&h, &l) in heavy.iter().zip(&light) {
            let r = h as f64 / l as f64;
            assert!((r - 2.0).abs() <= 0.04, "{h}/{l}");
        }
    }

    #[test]
    fn zero_weight_never_appears() {
        let ids = ids(10, 1);
        let mut ms = members(&ids, 1);
        ms[0].weight = 0;
        ms[7].weight = 0;
        let table = build(&ms, 1021);
        assert!(table.iter().all(|&i| i != 0 && i != 7));
        let c = counts(ms.len(), &table);
        assert_eq!(c.iter().filter(|&&n| n > 0).count(), 8);
        // And dropping them changes nothing.
        let without: Vec<Member<'_>> = ms.iter().filter(|mb| mb.weight > 0).copied().collect();
        assert_eq!(by_id(&ms, &table), by_id(&without, &build(&without, 1021)));

        let none = members(&ids, 0);
        assert!(build(&none, 1021).is_empty());
    }

    #[test]
    fn edges() {
        assert!(build(&[], DEFAULT_TABLE_SIZE).is_empty());
        let one = [Member {
            id: b"10.0.0.1:80",
            weight: 3,
        }];
        let table = build(&one, DEFAULT_TABLE_SIZE);
        assert_eq!(table.len(), DEFAULT_TABLE_SIZE as usize);
        assert!(table.iter().all(|&i| i == 0));
        let table = build(&one, MAX_TABLE_SIZE);
        assert_eq!(table.len(), MAX_TABLE_SIZE as usize);
        assert!(table.iter().all(|&i| i == 0));
    }

    #[test]
    #[should_panic(expected = "not a prime")]
    fn build_refuses_a_bad_size() {
        build(&[], 16380);
    }
}
