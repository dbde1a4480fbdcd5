//! Session affinity's matches and Maglev tables: written before the master that uses them,
//! removed after it stops; a restart writes nothing; a table change moves few entries; full
//! table capacity falls back to random choice; a failure anywhere leaves a valid view.
use super::*;
use crate::model::Algorithm;

const MAGLEV: ChoiceConfig = ChoiceConfig {
    algorithm: Algorithm::Maglev,
    maglev_size: 251,
    maglev_tables: 4,
};

fn backends(n: usize) -> Vec<(String, u16)> {
    (1..=n).map(|i| (format!("10.1.0.{i}"), 8080)).collect()
}

fn desired_n(f: Frontend, bs: &[(String, u16)]) -> Desired {
    let refs: Vec<(&str, u16)> = bs.iter().map(|(ip, p)| (ip.as_str(), *p)).collect();
    desired(&[(f, &refs)])
}

/// ClientIP -> None with new backends (found by the syncer's properties): the old master,
/// which still has affinity, reads the new slots until the commit, so their backends are
/// usable under it first; its matches go after the commit.
#[test]
fn affinity_turned_off_with_new_backends_keeps_the_old_masters_view_whole() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    let f = fe("10.96.0.10", 80);
    s.sync(&with_affinity(desired(&[(f, &[("10.1.0.1", 8080)])]), 60));
    ops(&mut s);
    // (The fake checks a reader's view at every write.)
    s.sync(&desired(&[(f, &[("10.1.0.2", 8080)])]));
    assert_eq!(
        ops(&mut s),
        vec![
            Op::Backend(2),
            Op::Match(2),
            Op::Slot(1),
            Op::Master(1),
            Op::DelMatch(1),
            Op::DelMatch(2),
            Op::DelBackend(1)
        ]
    );
    assert!(s.dp.maps.affinity_match.is_empty());
}

#[test]
fn affinity_matches_come_before_the_master_and_go_after_it() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    let f = fe("10.96.0.10", 80);
    let none = desired(&[(f, &[("10.1.0.1", 8080), ("10.1.0.2", 8080)])]);
    s.sync(&none);
    ops(&mut s);
    // None -> ClientIP: the usable backends, then the master with its timeout.
    s.sync(&with_affinity(none.clone(), 2));
    assert_eq!(ops(&mut s), vec![Op::Match(1), Op::Match(2), Op::Master(2)]);
    assert_eq!(
        s.dp.maps.services[&service_key(&f, 0)].affinity_timeout_s,
        2
    );
    // A backend goes: the master first, then its match, then the backend.
    let one = with_affinity(desired(&[(f, &[("10.1.0.1", 8080)])]), 2);
    s.sync(&one);
    assert_eq!(
        ops(&mut s),
        vec![
            Op::Master(1),
            Op::DelSlot(2),
            Op::DelMatch(2),
            Op::DelBackend(2)
        ]
    );
    // ClientIP -> None: the master first, then the matches.
    s.sync(&desired(&[(f, &[("10.1.0.1", 8080)])]));
    assert_eq!(ops(&mut s), vec![Op::Master(1), Op::DelMatch(1)]);
    assert!(s.dp.maps.affinity_match.is_empty());
    // Deleted with affinity on: master first, matches after.
    s.sync(&one);
    ops(&mut s);
    s.sync(&Desired::default());
    let o = ops(&mut s);
    let master = o.iter().position(|op| *op == Op::DelMaster).unwrap();
    let matched = o.iter().position(|op| *op == Op::DelMatch(1)).unwrap();
    assert!(master < matched, "{o:?}");
    assert_eq!(s.dp.maps, MapState::default());
    assert_eq!(s.state(), &s.dp.maps);
}

#[test]
fn a_maglev_table_is_written_before_its_master_and_cleared_after() {
    let mut s = Syncer::with_choice(Fake::default(), MapState::default(), MAGLEV);
    let f = fe("10.96.0.10", 80);
    s.sync(&desired_n(f, &backends(3)));
    let o = ops(&mut s);
    let table = o.iter().position(|op| *op == Op::Table(1, false)).unwrap();
    let master = o.iter().position(|op| *op == Op::Master(3)).unwrap();
    assert!(table < master, "{o:?}");
    assert_eq!(s.dp.maps.services[&service_key(&f, 0)].maglev_table, 1);
    assert_eq!(s.dp.tables[&1].len(), 251);
    // Shrink: table (without the backend), master, then the slot and the backend.
    s.sync(&desired_n(f, &backends(2)));
    assert_eq!(
        ops(&mut s),
        vec![
            Op::Table(1, false),
            Op::Master(2),
            Op::DelSlot(3),
            Op::DelBackend(3)
        ]
    );
    // The Service asks for random: master without the table, then the table is cleared.
    let mut random = desired_n(f, &backends(2));
    random.frontends.get_mut(&f).unwrap().algorithm = Some(Algorithm::Random);
    s.sync(&random);
    assert_eq!(ops(&mut s), vec![Op::Master(2), Op::Table(1, true)]);
    assert!(s.dp.tables.is_empty());
    // Back to Maglev, then deleted: master first, table cleared after.
    s.sync(&desired_n(f, &backends(2)));
    ops(&mut s);
    s.sync(&Desired::default());
    let o = ops(&mut s);
    assert_eq!(o[0], Op::DelMaster, "{o:?}");
    assert!(o.iter().any(|op| matches!(op, Op::Table(_, true))), "{o:?}");
    assert!(s.dp.tables.is_empty() && s.dp.maps == MapState::default());
}

/// A restarted agent reads the maps and tables back and writes nothing; the tables of the
/// second run are the first's.
#[test]
fn a_restart_writes_nothing() {
    let f = fe("10.96.0.10", 80);
    let g = fe("10.96.0.11", 53);
    let mut d = desired_n(f, &backends(7));
    d.frontends
        .extend(with_affinity(desired_n(g, &backends(3)), 60).frontends);
    let mut s = Syncer::with_choice(Fake::default(), MapState::default(), MAGLEV);
    s.sync(&d);
    let fake = Fake {
        maps: s.dp.maps.clone(),
        tables: s.dp.tables.clone(),
        ..Fake::default()
    };
    let tables = fake.tables.clone();
    let mut again = Syncer::with_choice(fake, s.dp.maps.clone(), MAGLEV);
    let r = again.sync(&d);
    assert_eq!((r.updates, r.deletes), (0, 0));
    assert!(ops(&mut again).is_empty());
    assert_eq!(again.dp.tables, tables);
}

/// Removing one of 10 backends rewrites about a tenth of the table; adding one, about an
/// eleventh; and the datapath's table names each backend within one entry of its share.
#[test]
fn a_backend_change_moves_its_share_of_the_table() {
    let cfg = ChoiceConfig {
        maglev_size: 16381,
        ..MAGLEV
    };
    let f = fe("10.96.0.10", 80);
    let mut s = Syncer::with_choice(Fake::default(), MapState::default(), cfg);
    s.sync(&desired_n(f, &backends(10)));
    let before = s.dp.tables[&1].clone();
    let moved = |a: &[u32], b: &[u32]| a.iter().zip(b).filter(|(x, y)| x != y).count() as f64;
    let mut nine = backends(10);
    nine.remove(4);
    s.sync(&desired_n(f, &nine));
    let after = s.dp.tables[&1].clone();
    let ratio = moved(&before, &after) / 16381.0;
    assert!((0.09..=0.12).contains(&ratio), "removal moved {ratio}");
    s.sync(&desired_n(f, &backends(11)));
    let ratio = moved(&after, &s.dp.tables[&1]) / 16381.0;
    // 10.1.0.5 comes back and 10.1.0.11 is new: two members join nine.
    assert!(
        (2.0 / 11.0 * 0.95..=2.0 / 11.0 * 1.2).contains(&ratio),
        "{ratio}"
    );
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for id in &s.dp.tables[&1] {
        *counts.entry(*id).or_default() += 1;
    }
    let (lo, hi) = (
        counts.values().min().unwrap(),
        counts.values().max().unwrap(),
    );
    assert!(counts.len() == 11 && hi - lo <= 1, "{counts:?}");
    assert_tables_settled(&s);
}

/// More Maglev frontends than tables: the rest choose at random (reported), and get a table
/// once one is free.
#[test]
fn without_a_free_table_a_frontend_chooses_at_random() {
    let cfg = ChoiceConfig {
        maglev_tables: 1,
        ..MAGLEV
    };
    let (f, g) = (fe("10.96.0.10", 80), fe("10.96.0.11", 80));
    let mut both = desired_n(f, &backends(2));
    both.frontends.extend(desired_n(g, &backends(2)).frontends);
    let mut s = Syncer::with_choice(Fake::default(), MapState::default(), cfg);
    let r = s.sync(&both);
    assert!(r.errors.is_empty());
    assert_eq!(r.tables_full, vec![g]);
    let master = |s: &Syncer<Fake>, f| s.dp.maps.services[&service_key(&f, 0)];
    assert_eq!(
        (master(&s, f).maglev_table, master(&s, g).maglev_table),
        (1, 0)
    );
    assert_eq!(master(&s, g).count, 2, "programmed all the same");
    let r = s.sync(&desired_n(g, &backends(2)));
    assert!(r.tables_full.is_empty());
    assert_eq!(master(&s, g).maglev_table, 1);
}

/// Each write of an update fails in turn, for an update that turns affinity and Maglev on and
/// for one that changes a Maglev frontend's backends while another frontend's writes collect
/// backends: the view stays valid (the fake checks it after every operation: a table never
/// names a deleted backend), a failure leaves the mirror equal to the maps, and a retry
/// converges to what a fresh writer writes.
#[test]
fn a_failure_anywhere_keeps_a_valid_view_and_converges() {
    let (f, g) = (fe("10.96.0.10", 80), fe("10.96.0.11", 80));
    let random = ChoiceConfig {
        algorithm: Algorithm::Random,
        ..MAGLEV
    };
    let both = |fb: &[(String, u16)], gb: &[(String, u16)], maglev: bool, affinity: u32| {
        let mut d = with_affinity(desired_n(f, fb), affinity);
        d.frontends.extend(desired_n(g, gb).frontends);
        if maglev {
            for spec in d.frontends.values_mut() {
                spec.algorithm = Some(Algorithm::Maglev);
            }
        }
        d
    };
    let bs = backends(6);
    let cases = [
        // random, no affinity on f -> Maglev and affinity, f's backends changing
        (desired_n(f, &bs[..2]), both(&bs[1..4], &bs[4..5], true, 30)),
        // Maglev both: f drops two backends and takes one; g's change collects its old one
        // (with affinity, f's matches keep its old backends; without, only its table does)
        (
            both(&bs[..3], &bs[3..5], true, 30),
            both(&bs[2..4], &bs[4..6], true, 30),
        ),
        (
            both(&bs[..3], &bs[3..5], true, 0),
            both(&bs[2..4], &bs[4..6], true, 0),
        ),
    ];
    for (case, (before, after)) in cases.iter().enumerate() {
        let mut failed = 0;
        for fail in 0..40 {
            let mut s = Syncer::with_choice(Fake::default(), MapState::default(), random);
            s.sync(before);
            s.dp.fail_at = Some(s.dp.calls + fail);
            let r = s.sync(after);
            assert_eq!(s.state(), &s.dp.maps, "case {case} fail at {fail}");
            if r.errors.is_empty() {
                continue;
            }
            failed += 1;
            s.dp.fail_at = None;
            assert!(s.sync(after).errors.is_empty());
            assert_tables_settled(&s);
            let mut fresh = Syncer::with_choice(Fake::default(), MapState::default(), random);
            fresh.sync(after);
            assert_eq!(
                view(&s.dp.maps),
                view(&fresh.dp.maps),
                "case {case} fail at {fail}"
            );
            let m = s.dp.maps.services[&service_key(&f, 0)];
            let want = after.frontends[&f].affinity_timeout_s;
            assert_eq!(m.affinity_timeout_s, want, "case {case} fail at {fail}");
            assert_ne!(m.maglev_table, 0);
            let matches = (s.dp.maps.affinity_match.iter())
                .filter(|k| k.rev_nat_id == m.rev_nat_id)
                .count();
            let want = if want == 0 { 0 } else { m.count as usize };
            assert_eq!(matches, want, "case {case} fail at {fail}");
            assert_eq!(
                s.dp.maps.backends.len(),
                fresh.dp.maps.backends.len(),
                "case {case} fail at {fail}: nothing left behind"
            );
        }
        assert!(failed >= 10, "case {case}: only {failed} failures injected");
    }
}
