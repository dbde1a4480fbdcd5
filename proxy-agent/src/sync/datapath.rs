//! Where the sync writes: the pinned BPF maps ([`crate::maps::PinnedMaps`]), or a fake in
//! tests.

use proxy_common::{AffinityMatchKey, Backend, RevNat, ServiceKey, ServiceValue};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{op} on map {map} failed: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map} is full ({capacity} entries): {what}")]
    Full {
        map: &'static str,
        capacity: u32,
        what: String,
    },
}

/// A run of writes that stopped at a failure.
#[derive(Debug)]
pub struct Partial {
    /// How many of the run's entries were written (in order) before `error`.
    pub written: usize,
    pub error: DatapathError,
}

pub trait Datapath {
    fn update_backend(&mut self, id: u32, backend: Backend) -> Result<(), DatapathError>;
    /// Writes `backends[i]` under `ids[i]`, in order. The pinned maps write the run with one
    /// syscall (`BPF_MAP_UPDATE_BATCH`): a Service's backends and slots are most of a cold
    /// start's writes.
    fn update_backends(&mut self, ids: &[u32], backends: &[Backend]) -> Result<(), Partial> {
        for (i, (id, b)) in ids.iter().zip(backends).enumerate() {
            self.update_backend(*id, *b)
                .map_err(|error| Partial { written: i, error })?;
        }
        Ok(())
    }
    /// Like [`Self::update_backends`], for service-map entries (a frontend's slots).
    fn update_services(
        &mut self,
        keys: &[ServiceKey],
        values: &[ServiceValue],
    ) -> Result<(), Partial> {
        for (i, (k, v)) in keys.iter().zip(values).enumerate() {
            self.update_service(*k, *v)
                .map_err(|error| Partial { written: i, error })?;
        }
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError>;
    fn update_service(&mut self, key: ServiceKey, value: ServiceValue)
    -> Result<(), DatapathError>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), DatapathError>;
    fn update_rev_nat(&mut self, id: u16, value: RevNat) -> Result<(), DatapathError>;
    fn delete_rev_nat(&mut self, id: u16) -> Result<(), DatapathError>;
    fn update_vip(&mut self, vip_be: u32, frontends: u32) -> Result<(), DatapathError>;
    fn delete_vip(&mut self, vip_be: u32) -> Result<(), DatapathError>;
    fn update_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), DatapathError>;
    fn delete_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), DatapathError>;
    /// Makes Maglev table `table` (1-based) equal to `entries` (one per table entry; all 0
    /// clears it), writing only the entries that differ; returns how many did.
    fn write_maglev_table(&mut self, table: u16, entries: &[u32]) -> Result<usize, DatapathError>;
    /// Maglev table `table` of `size` entries as the programs read it (empty if unknown).
    fn maglev_table(&self, table: u16, size: u32) -> Vec<u32>;
}
