//! Properties over random sequences of desired states, with writes failing at random points
//! and maps too small at random: what the example tests show one case at a time.
//!
//! - At every single write, a reader sees no torn frontend (the fake checks it).
//! - After each sync, the mirror is what the maps hold, and every frontend is either as
//!   desired or exactly as it was before the sync; only when a write failed part way may its
//!   old master read some new slots (each an old or a new backend) until the next sync.
//! - A sync with no failed write and nothing refused or pending leaves exactly the desired
//!   frontends;
//!   a restarted writer (a new syncer reading those maps) then writes nothing.
//! - Once nothing is desired, a sync that fails nothing leaves every map empty.
use proptest::prelude::*;

use super::*;
use crate::model::Algorithm;

const POOL: usize = 8;
const FRONTENDS: usize = 4;

#[derive(Clone, Debug)]
struct Wanted {
    backends: Vec<usize>,
    affinity: bool,
    maglev: bool,
}

#[derive(Clone, Debug)]
struct Step {
    frontends: Vec<Option<Wanted>>,
    /// Fail this sync's write with this index (counted from the sync's first).
    fail_at: Option<usize>,
}

fn wanted() -> impl Strategy<Value = Wanted> {
    (
        proptest::sample::subsequence((0..POOL).collect::<Vec<_>>(), 0..=POOL),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(backends, affinity, maglev)| Wanted {
            backends,
            affinity,
            maglev,
        })
}

fn step() -> impl Strategy<Value = Step> {
    (
        proptest::collection::vec(proptest::option::of(wanted()), FRONTENDS),
        proptest::option::weighted(0.3, 0..40usize),
    )
        .prop_map(|(frontends, fail_at)| Step { frontends, fail_at })
}

fn frontend(i: usize) -> Frontend {
    fe(&format!("10.96.0.{}", i + 1), 80)
}

fn backend(i: usize) -> BackendAddr {
    BackendAddr {
        ip: Ipv4Addr::new(10, 1, 0, i as u8 + 1),
        port: 8080,
    }
}

fn to_desired(step: &Step) -> Desired {
    let mut d = Desired::default();
    for (i, w) in step.frontends.iter().enumerate() {
        let Some(w) = w else { continue };
        d.frontends.insert(
            frontend(i),
            FrontendSpec {
                service: ServiceRef {
                    namespace: "default".into(),
                    name: format!("svc-{i}").into(),
                },
                backends: w.backends.iter().map(|b| backend(*b)).collect(),
                no_local_endpoints: false,
                affinity_timeout_s: if w.affinity { 10_800 } else { 0 },
                algorithm: w.maglev.then_some(Algorithm::Maglev),
                about: Default::default(),
            },
        );
    }
    d
}

/// Each frontend as a reader resolves it: its backends, sorted (slot order is the writer's).
fn resolved(m: &MapState) -> BTreeMap<ServiceKey, Vec<Backend>> {
    (view(m).into_iter())
        .map(|(k, (_, mut bs))| {
            bs.sort_unstable();
            (k, bs)
        })
        .collect()
}

fn wanted_of(d: &Desired) -> BTreeMap<ServiceKey, Vec<Backend>> {
    (d.frontends.iter())
        .map(|(f, spec)| {
            let mut bs: Vec<Backend> = (spec.backends.iter())
                .map(|b| backend_value(b, f.proto))
                .collect();
            bs.sort_unstable();
            (service_key(f, 0), bs)
        })
        .collect()
}

fn choice() -> ChoiceConfig {
    ChoiceConfig {
        algorithm: Algorithm::Random,
        maglev_size: 31,
        // Fewer tables than frontends: some fall back to random choice.
        maglev_tables: 2,
    }
}

fn restarted(s: &Syncer<Fake>, capacity: Capacity) -> Syncer<Fake> {
    let fake = Fake {
        maps: s.dp.maps.clone(),
        tables: s.dp.tables.clone(),
        capacity: Some(capacity),
        ..Fake::default()
    };
    Syncer::with_choice(fake, s.dp.maps.clone(), choice()).with_capacity(capacity)
}

fn capacity() -> impl Strategy<Value = Capacity> {
    (
        prop_oneof![Just(12u32), Just(20), Just(ROOMY.services)],
        prop_oneof![Just(4u32), Just(ROOMY.backends)],
        prop_oneof![Just(2u32), Just(ROOMY.frontends)],
    )
        .prop_map(|(services, backends, frontends)| Capacity {
            services,
            backends,
            frontends,
            ..Capacity::default()
        })
}

/// Room for everything at once: every frontend with every backend (a master and a slot each),
/// and their affinity matches while one frontend changes all its backends (a match under its
/// new and its old id for each).
const ROOMY: Capacity = Capacity {
    services: (FRONTENDS * (POOL + 1) + 2 * POOL) as u32,
    backends: POOL as u32,
    frontends: FRONTENDS as u32,
    conntrack: 0,
    affinity: 0,
};

fn roomy(c: &Capacity) -> bool {
    (c.services, c.backends, c.frontends) == (ROOMY.services, ROOMY.backends, ROOMY.frontends)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn every_sync_leaves_each_frontend_as_desired_or_as_it_was(
        steps in proptest::collection::vec(step(), 1..10),
        capacity in capacity(),
    ) {
        // The fake refuses what the kernel would: a syncer that planned too little room
        // fails a write, which is not `in_sync`.
        let fake = Fake { capacity: Some(capacity), ..Fake::default() };
        let mut s = Syncer::with_choice(fake, MapState::default(), choice()).with_capacity(capacity);
        for (n, step) in steps.iter().enumerate() {
            let d = to_desired(step);
            let before = resolved(&s.dp.maps);
            s.dp.fail_at = step.fail_at.map(|k| s.dp.calls + k);
            let r = s.sync(&d);
            let failed = s.dp.fail_at.is_some_and(|k| k < s.dp.calls);
            s.dp.fail_at = None;
            prop_assert_eq!(s.state(), &s.dp.maps, "step {}: the mirror", n);
            let (now, want) = (resolved(&s.dp.maps), wanted_of(&d));
            let mut mixed = 0usize;
            let keys: std::collections::BTreeSet<_> =
                now.keys().chain(want.keys()).chain(before.keys()).collect();
            for k in keys {
                let (got, old, wanted) = (now.get(k), before.get(k), want.get(k));
                if got == wanted || got == old {
                    continue;
                }
                // Slots are rewritten in place before the master: a write failing part way
                // leaves the old master over some new slots, each naming a backend of the
                // old or the new set, until the next sync.
                let is_mixed = failed
                    && got.zip(old).is_some_and(|(g, o)| {
                        g.len() == o.len()
                            && g.iter().all(|b| o.contains(b) || wanted.is_some_and(|w| w.contains(b)))
                    });
                prop_assert!(
                    is_mixed,
                    "step {}: {:?} is {:?}, wanted {:?}, was {:?}", n, k, got, wanted, old
                );
                mixed += 1;
            }
            // One failed write stops one frontend's update: the others are whole.
            prop_assert!(mixed <= usize::from(failed), "step {}: {} frontends mixed", n, mixed);
            // Errors without a failed write are refusals (a map full), and only those.
            if !failed {
                prop_assert!(r.in_sync(), "step {}: {:?}", n, r.errors);
            }
            // Nothing is refused where everything fits.
            if roomy(&capacity) && !failed {
                prop_assert!(r.errors.is_empty() && r.deferred == 0, "step {}: {:?}", n, r.errors);
            }
            // (A Maglev frontend that found no table free tries again at the next sync: a
            // table another frontend freed later in this one is then free.)
            if !failed && r.errors.is_empty() && r.deferred == 0 && r.tables_full.is_empty() {
                prop_assert_eq!(&now, &want, "step {}: converged", n);
                assert_tables_settled(&s);
                let mut again = restarted(&s, capacity);
                let r = again.sync(&d);
                prop_assert_eq!((r.updates, r.deletes), (0, 0), "step {}: a restart wrote", n);
                prop_assert!(again.dp.ops.is_empty(), "step {}: {:?}", n, again.dp.ops);
            }
        }
        let r = s.sync(&Desired::default());
        prop_assert!(r.errors.is_empty(), "{:?}", r.errors);
        prop_assert_eq!(&s.dp.maps, &MapState::default());
        prop_assert!(s.dp.tables.is_empty(), "{:?}", s.dp.tables.keys());
    }
}
