//! Sync against a fake datapath that applies each operation to an in-memory copy of the maps
//! and, after every single operation, checks what a reader (the eBPF programs) could see.
use std::{collections::BTreeMap, net::Ipv4Addr};

use proxy_common::{
    BACKEND_MAP, Backend, RevNat, SVC_FLAG_NO_LOCAL_ENDPOINTS, ServiceKey, ServiceValue,
};

use super::*;
use crate::{
    capacity::Capacity,
    model::{BackendAddr, FrontendSpec, Proto, ServiceRef},
};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Backend(u32),
    DelBackend(u32),
    Slot(u16),
    DelSlot(u16),
    Master(u16),
    DelMaster,
    RevNat(u16),
    DelRevNat(u16),
    Vip(u32),
    DelVip,
    Match(u32),
    DelMatch(u32),
    /// A Maglev table written (its id, and whether it was cleared).
    Table(u16, bool),
}

#[derive(Default)]
pub(crate) struct Fake {
    maps: MapState,
    /// Maglev tables by id (all entries, as the programs read them).
    tables: BTreeMap<u16, Vec<u32>>,
    ops: Vec<Op>,
    /// Fail the operation with this index (0-based, counted over the fake's lifetime).
    fail_at: Option<usize>,
    calls: usize,
    /// Refuse a new entry beyond these capacities, as the kernel does (E2BIG); unlimited
    /// when None.
    capacity: Option<Capacity>,
}

impl Fake {
    fn step(&mut self, op: Op) -> Result<(), DatapathError> {
        let n = self.calls;
        self.calls += 1;
        if self.fail_at == Some(n) {
            return Err(DatapathError::Map {
                map: "fake",
                op: "update",
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        self.ops.push(op);
        Ok(())
    }

    /// E2BIG when `map` is at its capacity and `new` adds an entry to it.
    fn room(&self, map: &'static str, len: usize, new: bool) -> Result<(), DatapathError> {
        let cap = (self.capacity.as_ref()).and_then(|c| c.of(map));
        if new && cap.is_some_and(|cap| len >= cap as usize) {
            return Err(DatapathError::Map {
                map,
                op: "update",
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        Ok(())
    }

    /// The reader invariant: every master's slots 1..=count exist and name existing backends,
    /// and its rev-NAT entry exists and holds its address.
    fn check_reader_view(&self) {
        for (k, v) in &self.maps.services {
            if k.slot != 0 {
                continue;
            }
            for slot in 1..=v.count {
                let sk = ServiceKey { slot, ..*k };
                let s = self
                    .maps
                    .services
                    .get(&sk)
                    .unwrap_or_else(|| panic!("torn: {k:?} slot {slot} missing"));
                assert!(
                    self.maps.backends.contains_key(&s.backend_id),
                    "torn: backend {} missing",
                    s.backend_id
                );
            }
            let rn = self
                .maps
                .rev_nat
                .get(&v.rev_nat_id)
                .expect("torn: rev-NAT missing");
            assert_eq!((rn.vip_be, rn.port_be), (k.vip_be, k.port_be));
            // A Maglev table names only backends that exist (between the table and the master
            // it may still name the old master's, which exist until after the commit).
            if v.maglev_table != 0 {
                let table = (self.tables.get(&v.maglev_table))
                    .unwrap_or_else(|| panic!("torn: table {} missing", v.maglev_table));
                assert!(
                    table.iter().all(|id| self.maps.backends.contains_key(id)),
                    "torn: table {} names a missing backend",
                    v.maglev_table
                );
            }
            // Affinity: every usable backend is known usable, and every match names a backend.
            if v.affinity_timeout_s != 0 {
                for slot in 1..=v.count {
                    let id = self.maps.services[&ServiceKey { slot, ..*k }].backend_id;
                    let m = proxy_common::AffinityMatchKey::new(id, v.rev_nat_id);
                    assert!(self.maps.affinity_match.contains(&m), "torn: {m:?} missing");
                }
            }
        }
        for m in &self.maps.affinity_match {
            assert!(self.maps.backends.contains_key(&m.backend_id), "{m:?}");
        }
    }
}

impl Datapath for Fake {
    fn update_backend(&mut self, id: u32, b: Backend) -> Result<(), DatapathError> {
        let new = !self.maps.backends.contains_key(&id);
        self.room(BACKEND_MAP, self.maps.backends.len(), new)?;
        self.step(Op::Backend(id))?;
        self.maps.backends.insert(id, b);
        self.check_reader_view();
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        self.step(Op::DelBackend(id))?;
        self.maps.backends.remove(&id);
        self.check_reader_view();
        Ok(())
    }
    fn update_service(&mut self, k: ServiceKey, v: ServiceValue) -> Result<(), DatapathError> {
        let new = !self.maps.services.contains_key(&k);
        self.room(proxy_common::SVC_MAP, self.maps.services.len(), new)?;
        self.step(if k.slot == 0 {
            Op::Master(v.count)
        } else {
            Op::Slot(k.slot)
        })?;
        self.maps.services.insert(k, v);
        self.check_reader_view();
        Ok(())
    }
    fn delete_service(&mut self, k: ServiceKey) -> Result<(), DatapathError> {
        self.step(if k.slot == 0 {
            Op::DelMaster
        } else {
            Op::DelSlot(k.slot)
        })?;
        self.maps.services.remove(&k);
        self.check_reader_view();
        Ok(())
    }
    fn update_rev_nat(&mut self, id: u16, v: RevNat) -> Result<(), DatapathError> {
        let new = !self.maps.rev_nat.contains_key(&id);
        self.room(proxy_common::REV_NAT_MAP, self.maps.rev_nat.len(), new)?;
        self.step(Op::RevNat(id))?;
        self.maps.rev_nat.insert(id, v);
        self.check_reader_view();
        Ok(())
    }
    fn delete_rev_nat(&mut self, id: u16) -> Result<(), DatapathError> {
        self.step(Op::DelRevNat(id))?;
        self.maps.rev_nat.remove(&id);
        self.check_reader_view();
        Ok(())
    }
    fn update_vip(&mut self, vip: u32, n: u32) -> Result<(), DatapathError> {
        self.step(Op::Vip(n))?;
        self.maps.vips.insert(vip, n);
        self.check_reader_view();
        Ok(())
    }
    fn delete_vip(&mut self, vip: u32) -> Result<(), DatapathError> {
        self.step(Op::DelVip)?;
        self.maps.vips.remove(&vip);
        self.check_reader_view();
        Ok(())
    }
    fn update_affinity_match(
        &mut self,
        key: proxy_common::AffinityMatchKey,
    ) -> Result<(), DatapathError> {
        let new = !self.maps.affinity_match.contains(&key);
        let len = self.maps.affinity_match.len();
        self.room(proxy_common::AFFINITY_MATCH_MAP, len, new)?;
        self.step(Op::Match(key.backend_id))?;
        self.maps.affinity_match.insert(key);
        self.check_reader_view();
        Ok(())
    }
    fn delete_affinity_match(
        &mut self,
        key: proxy_common::AffinityMatchKey,
    ) -> Result<(), DatapathError> {
        self.step(Op::DelMatch(key.backend_id))?;
        self.maps.affinity_match.remove(&key);
        self.check_reader_view();
        Ok(())
    }
    fn write_maglev_table(&mut self, table: u16, entries: &[u32]) -> Result<usize, DatapathError> {
        let old = self.tables.get(&table).cloned().unwrap_or_default();
        let changed = if old.len() == entries.len() {
            old.iter().zip(entries).filter(|(a, b)| a != b).count()
        } else {
            entries.iter().filter(|e| **e != 0).count()
        };
        if changed == 0 {
            return Ok(0);
        }
        self.step(Op::Table(table, entries.iter().all(|e| *e == 0)))?;
        if entries.iter().all(|e| *e == 0) {
            self.tables.remove(&table);
        } else {
            self.tables.insert(table, entries.to_vec());
        }
        self.check_reader_view();
        Ok(changed)
    }
    fn maglev_table(&self, table: u16, size: u32) -> Vec<u32> {
        (self.tables.get(&table).cloned()).unwrap_or_else(|| vec![0; size as usize])
    }
}

fn fe(vip: &str, port: u16) -> Frontend {
    Frontend {
        vip: vip.parse().unwrap(),
        port,
        proto: Proto::Tcp,
    }
}

fn desired(entries: &[(Frontend, &[(&str, u16)])]) -> Desired {
    let mut d = Desired::default();
    for (f, bs) in entries {
        d.frontends.insert(
            *f,
            FrontendSpec {
                service: ServiceRef {
                    namespace: "default".into(),
                    name: "svc".into(),
                },
                backends: bs
                    .iter()
                    .map(|(ip, port)| BackendAddr {
                        ip: ip.parse().unwrap(),
                        port: *port,
                    })
                    .collect(),
                no_local_endpoints: false,
                affinity_timeout_s: 0,
                algorithm: None,
                about: Default::default(),
            },
        );
    }
    d
}

/// `d` with ClientIP affinity of `timeout_s` on every frontend.
fn with_affinity(mut d: Desired, timeout_s: u32) -> Desired {
    for spec in d.frontends.values_mut() {
        spec.affinity_timeout_s = timeout_s;
    }
    d
}

/// Once a sync is done, each Maglev table names exactly its frontend's backends.
fn assert_tables_settled(s: &Syncer<Fake>) {
    for (k, v) in &s.dp.maps.services {
        if k.slot != 0 || v.maglev_table == 0 {
            continue;
        }
        let slots: std::collections::BTreeSet<u32> = (1..=v.count)
            .map(|slot| s.dp.maps.services[&ServiceKey { slot, ..*k }].backend_id)
            .collect();
        let named: std::collections::BTreeSet<u32> =
            s.dp.tables[&v.maglev_table].iter().copied().collect();
        assert_eq!(named, slots, "table {} of {k:?}", v.maglev_table);
    }
    // The mirror knows what every table holds (its backends are kept while it does).
    for (t, entries) in &s.dp.tables {
        let content = s.mirror.table_content(*t).map(|c| c.ids.clone());
        assert_eq!(
            content,
            Some(mirror::TableContent::of(entries, None).ids),
            "table {t}"
        );
    }
}

fn ops(s: &mut Syncer<Fake>) -> Vec<Op> {
    assert_tables_settled(s);
    std::mem::take(&mut s.dp.ops)
}

/// Maps reduced to what a reader resolves (ids are the writer's business).
fn view(m: &MapState) -> BTreeMap<ServiceKey, (u16, Vec<Backend>)> {
    m.services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| {
            let bs = (1..=v.count)
                .map(|i| m.backends[&m.services[&ServiceKey { slot: i, ..*k }].backend_id])
                .collect();
            (*k, (v.flags, bs))
        })
        .collect()
}

mod choice;
mod commit_order;
mod failures;
mod properties;
mod scope_and_churn;
