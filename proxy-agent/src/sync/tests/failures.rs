//! Failed writes, restarts from the maps, crash leftovers and full maps.
use super::*;

/// Backends written by an update that failed (at the second backend of the run, or at the
/// first slot, after both backends) are not left in the maps once their frontend is gone.
#[test]
fn backends_written_by_a_failed_update_are_removed_once_unused() {
    let f = fe("10.96.0.10", 80);
    let d = desired(&[(f, &[("10.1.0.2", 8080), ("10.1.0.3", 8080)])]);
    for (fail_at, written) in [
        (1, &[Op::Backend(1)][..]),
        (2, &[Op::Backend(1), Op::Backend(2)]),
    ] {
        let mut s = Syncer::new(Fake::default(), MapState::default());
        s.dp.fail_at = Some(fail_at);
        let failed = s.sync(&d);
        assert_eq!(failed.errors.len(), 1);
        assert!(
            s.dp.ops.starts_with(written),
            "fail at {fail_at}: {written:?} were written"
        );
        assert_eq!(s.state(), &s.dp.maps);
        s.dp.fail_at = None;
        let after = s.sync(&Desired::default());
        assert_eq!(
            s.dp.maps,
            MapState::default(),
            "fail at {fail_at}: nothing is left behind"
        );
        assert!(
            failed.removed_backends.is_empty() && after.removed_backends.is_empty(),
            "fail at {fail_at}: never used, so no flows or sockets to clean"
        );
    }
}

#[test]
fn a_failed_write_keeps_the_old_state_and_the_next_sync_converges() {
    let f = fe("10.96.0.10", 80);
    let before = desired(&[(f, &[("10.1.0.1", 8080)])]);
    let after = desired(&[(f, &[("10.1.0.2", 8080), ("10.1.0.3", 8080)])]);
    // Fail each operation of the update in turn: the reader view stays valid (checked by the
    // fake on every op), the mirror matches the maps, and a retry converges.
    for fail in 0..8 {
        let mut s = Syncer::new(Fake::default(), MapState::default());
        s.sync(&before);
        let base = s.dp.calls;
        s.dp.fail_at = Some(base + fail);
        let r = s.sync(&after);
        assert_eq!(s.state(), &s.dp.maps, "fail at {fail}: mirror equals maps");
        if !r.errors.is_empty() {
            let m = s.dp.maps.services[&service_key(&f, 0)];
            assert!(m.count >= 1, "fail at {fail}: the old master keeps serving");
        }
        s.dp.fail_at = None;
        let r = s.sync(&after);
        assert!(r.errors.is_empty());
        let mut fresh = Syncer::new(Fake::default(), MapState::default());
        fresh.sync(&after);
        assert_eq!(
            view(&s.dp.maps),
            view(&fresh.dp.maps),
            "fail at {fail}: converged"
        );
    }
}

#[test]
fn restart_from_the_maps_rewrites_nothing_and_removes_stale_entries() {
    let (a, b) = (fe("10.96.0.10", 80), fe("10.96.0.11", 53));
    let mut s = Syncer::new(Fake::default(), MapState::default());
    s.sync(&desired(&[
        (a, &[("10.1.0.1", 8080)]),
        (b, &[("10.1.0.2", 53)]),
    ]));
    let maps = s.dp.maps.clone();

    let mut restarted = Syncer::new(
        Fake {
            maps: maps.clone(),
            ..Default::default()
        },
        maps,
    );
    restarted.sync(&desired(&[(a, &[("10.1.0.1", 8080)])]));
    assert_eq!(
        ops(&mut restarted),
        vec![
            Op::DelMaster,
            Op::DelVip,
            Op::DelSlot(1),
            Op::DelRevNat(2),
            Op::DelBackend(2)
        ]
    );
}

#[test]
fn restart_after_a_crash_mid_update_cleans_orphans() {
    let f = fe("10.96.0.10", 80);
    let mut maps = MapState::default();
    // A writer died after writing a backend, a slot and a rev-NAT, before the master.
    maps.backends.insert(7, Backend::new(1, 1, 6));
    maps.services.insert(
        service_key(&f, 1),
        ServiceValue {
            backend_id: 7,
            ..Default::default()
        },
    );
    maps.rev_nat.insert(3, rev_nat_value(&f));
    maps.vips.insert(u32::from(f.vip).to_be(), 1);
    let mut s = Syncer::new(
        Fake {
            maps: maps.clone(),
            ..Default::default()
        },
        maps,
    );
    s.sync(&Desired::default());
    assert_eq!(s.dp.maps, MapState::default());
}

/// A syncer whose backend map holds [`BACKENDS`] (the `--max-backends` flag).
fn small() -> Syncer<Fake> {
    Syncer::new(Fake::default(), MapState::default()).with_capacity(Capacity {
        backends: BACKENDS,
        ..Capacity::default()
    })
}
const BACKENDS: u32 = 16;

/// Pretends the backend map holds `n` backends (in the mirror only).
fn fill_backends(s: &mut Syncer<Fake>, n: u32) {
    for id in 1..=n {
        s.mirror.set_backend(id + 1_000_000, Backend::new(id, 0, 6));
    }
}

#[test]
fn a_full_map_refuses_the_frontend_and_keeps_the_rest() {
    let mut s = small();
    fill_backends(&mut s, BACKENDS - 1);
    let (ok, big) = (fe("10.96.0.10", 80), fe("10.96.0.11", 80));
    let r = s.sync(&desired(&[
        (ok, &[("10.1.0.1", 8080)]),
        (big, &[("10.1.0.2", 8080), ("10.1.0.3", 8080)]),
    ]));
    assert_eq!(r.errors.len(), 1);
    assert_eq!(r.errors[0].0, big);
    assert!(matches!(
        r.errors[0].1,
        DatapathError::Full {
            map: BACKEND_MAP,
            ..
        }
    ));
    assert!(s.dp.maps.services.contains_key(&service_key(&ok, 0)));
    assert!(!s.dp.maps.services.contains_key(&service_key(&big, 0)));
}

/// A frontend refused for want of room is not tried again at every sync (its retries back
/// off), is tried at once when its spec changes or a delete makes room, and a full map does
/// not count as being out of sync (a restart would not fix it); a failed syscall does.
#[test]
fn a_refused_frontend_backs_off_and_is_programmed_once_room_is_made() {
    use std::time::{Duration, Instant};
    let mut s = small();
    fill_backends(&mut s, BACKENDS - 2);
    let (a, big) = (fe("10.96.0.10", 80), fe("10.96.0.11", 80));
    let a_backends: &[(&str, u16)] = &[("10.1.0.1", 8080), ("10.1.0.2", 8080)];
    let both = desired(&[
        (a, a_backends),
        (big, &[("10.1.0.3", 8080), ("10.1.0.4", 8080)]),
    ]);
    let r = s.sync(&both);
    assert_eq!(r.errors.len(), 1);
    assert!(r.newly_refused.contains(&big) && r.in_sync());
    assert_eq!(s.refused_count(), 1);
    let retry = s.next_retry().expect("a retry is scheduled");
    assert!(retry > Instant::now());

    // Syncs before the retry is due do not try it again: no write, no error, nothing to log.
    let calls = s.dp.calls;
    for _ in 0..3 {
        let r = s.sync(&both);
        assert!(r.errors.is_empty() && r.newly_refused.is_empty());
        assert_eq!(r.deferred, 1);
    }
    assert_eq!(s.dp.calls, calls);
    // Nor does a change only people see (its endpoints' conditions, for `services`).
    let mut recounted = both.clone();
    recounted
        .frontends
        .get_mut(&big)
        .unwrap()
        .about
        .endpoints
        .not_ready = 3;
    let r = s.sync(&recounted);
    assert!(r.errors.is_empty() && r.newly_refused.is_empty() && r.deferred == 1);
    assert_eq!(s.dp.calls, calls);

    // Due: tried and refused again, which is not news; the next retry waits longer.
    let r = s.retry_refused(retry);
    assert_eq!(r.errors.len(), 1);
    assert!(r.newly_refused.is_empty());
    assert!(s.next_retry().unwrap() >= retry + Duration::from_secs(2));

    // Room (two pretend backends gone), but the retry fails on a syscall: it still moves
    // on (a timer due at once would spin), and the room stays for the next attempt.
    let due = s.next_retry().unwrap();
    for id in [1_000_001, 1_000_002] {
        s.mirror.remove_backend(id);
    }
    s.dp.fail_at = Some(s.dp.calls);
    let r = s.retry_refused(due);
    assert!(
        matches!(r.errors[..], [(_, DatapathError::Map { .. })]),
        "{:?}",
        r.errors
    );
    assert!(s.next_retry().unwrap() > due, "the retry moved on");
    s.dp.fail_at = None;
    fill_backends(&mut s, 2);

    // Another spec is tried at once, and its refusal is news.
    let big_backends: &[(&str, u16)] = &[("10.1.0.3", 8080), ("10.1.0.5", 8080)];
    let r = s.sync(&desired(&[(a, a_backends), (big, big_backends)]));
    assert_eq!(r.errors.len(), 1);
    assert!(r.newly_refused.contains(&big));

    // `a` removed: its backends make room, and `big` is programmed by the same sync.
    let r = s.sync(&desired(&[(big, big_backends)]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.no_longer_refused, vec![big]);
    assert!(s.dp.maps.services.contains_key(&service_key(&big, 0)));
    assert_eq!((s.refused_count(), s.next_retry()), (0, None));

    // A failed syscall is not a data problem: out of sync, retried at the next sync.
    s.dp.fail_at = Some(s.dp.calls);
    let r = s.sync(&desired(&[(big, &[("10.1.0.3", 8080)])]));
    assert_eq!(r.errors.len(), 1);
    assert!(!r.in_sync() && r.newly_refused.is_empty());
    assert_eq!(s.next_retry(), None);
}

/// A refused frontend whose Service is gone is forgotten.
#[test]
fn a_refused_frontend_no_longer_wanted_is_forgotten() {
    let mut s = small();
    fill_backends(&mut s, BACKENDS);
    let big = fe("10.96.0.11", 80);
    s.sync(&desired(&[(big, &[("10.1.0.3", 8080)])]));
    assert_eq!(s.refused_count(), 1);
    s.sync(&Desired::default());
    assert_eq!((s.refused_count(), s.next_retry()), (0, None));
}

/// The service map's and the rev-NAT map's capacities (`--max-services`, `--max-frontends`)
/// bound what is written as the backend map's does: a frontend that does not fit is refused
/// whole, before anything of it is written, and the ones before it stay.
#[test]
fn each_sized_map_refuses_the_frontend_that_does_not_fit() {
    let (a, b, c) = (
        fe("10.96.0.10", 80),
        fe("10.96.0.11", 80),
        fe("10.96.0.12", 80),
    );
    let two: &[(&str, u16)] = &[("10.1.0.1", 8080), ("10.1.0.2", 8080)];
    // a takes 3 service entries (master and two slots), b 3 more: 5 hold a only.
    let services = Capacity {
        services: 5,
        ..Capacity::default()
    };
    // Two frontends' rev-NAT entries: c is one too many.
    let frontends = Capacity {
        frontends: 2,
        ..Capacity::default()
    };
    for (capacity, fits, map) in [
        (services, &[a][..], proxy_common::SVC_MAP),
        (frontends, &[a, b], proxy_common::REV_NAT_MAP),
    ] {
        let mut s = Syncer::new(Fake::default(), MapState::default()).with_capacity(capacity);
        let r = s.sync(&desired(&[(a, two), (b, two), (c, two)]));
        let refused: Vec<_> = r.errors.iter().map(|(f, _)| *f).collect();
        let wanted: Vec<_> = [a, b, c]
            .into_iter()
            .filter(|f| !fits.contains(f))
            .collect();
        assert_eq!(refused, wanted, "{map}");
        for (_, e) in &r.errors {
            assert!(
                matches!(e, DatapathError::Full { map: m, .. } if *m == map),
                "{map}: {e}"
            );
        }
        assert!(r.in_sync(), "a full map is not out of sync");
        for f in [a, b, c] {
            let programmed = s.dp.maps.services.contains_key(&service_key(&f, 0));
            assert_eq!(programmed, fits.contains(&f), "{map}: {f}");
            // Never half-written: all of a frontend's slots, or none.
            let slots = (s.dp.maps.services.keys())
                .filter(|k| k.slot != 0 && k.vip_be == service_key(&f, 0).vip_be)
                .count();
            assert_eq!(slots, if programmed { 2 } else { 0 }, "{map}: {f}");
        }
    }
}

/// An update holds its new slots' affinity matches beside the old ones until its commit: the
/// plan counts them, so a map too full for both refuses the update whole (the frontend keeps
/// its backends) instead of failing a write at every sync. The fake refuses what the kernel
/// would (E2BIG).
#[test]
fn an_update_that_needs_more_affinity_matches_than_fit_is_refused_whole() {
    let capacity = Capacity {
        services: 12,
        ..Capacity::default()
    };
    let fake = Fake {
        capacity: Some(capacity),
        ..Fake::default()
    };
    let mut s = Syncer::new(fake, MapState::default()).with_capacity(capacity);
    let (a, b) = (fe("10.96.0.10", 80), fe("10.96.0.11", 80));
    let ips = [
        "10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6", "10.1.0.7",
        "10.1.0.8",
    ];
    let backends = |r: std::ops::Range<usize>| -> Vec<(&str, u16)> {
        ips[r].iter().map(|ip| (*ip, 8080)).collect()
    };
    let with = |fs: &[(Frontend, std::ops::Range<usize>)]| {
        let bs: Vec<(Frontend, Vec<(&str, u16)>)> =
            fs.iter().map(|(f, r)| (*f, backends(r.clone()))).collect();
        let refs: Vec<(Frontend, &[(&str, u16)])> =
            bs.iter().map(|(f, b)| (*f, b.as_slice())).collect();
        with_affinity(desired(&refs), 60)
    };
    // Both fit: 12 service entries, 10 matches.
    let r = s.sync(&with(&[(a, 0..5), (b, 0..5)]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // a moves to three new backends: 13 matches until its commit, one too many.
    let before = view(&s.dp.maps);
    let r = s.sync(&with(&[(a, 3..8), (b, 0..5)]));
    assert!(
        matches!(
            r.errors[..],
            [(f, DatapathError::Full { map: proxy_common::AFFINITY_MATCH_MAP, .. })] if f == a
        ),
        "{:?}",
        r.errors
    );
    assert!(r.in_sync());
    assert_eq!(view(&s.dp.maps), before, "a keeps its backends");
    // Room: b gone, a is programmed.
    let r = s.sync(&with(&[(a, 3..8)]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}
