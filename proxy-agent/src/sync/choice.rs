//! What the writer needs for backend choice beyond random: the node's algorithm and Maglev
//! table geometry, table ids (one table per Maglev frontend), and the Maglev lookup table of
//! a frontend's backends (built by [`crate::maglev`]).

use proxy_common::{Backend, MAGLEV_DEFAULT_TABLE_SIZE, MAGLEV_DEFAULT_TABLES};

use crate::{
    maglev::{self, Member},
    model::{Algorithm, FrontendSpec},
};

/// The node's backend-choice settings (its flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChoiceConfig {
    /// For Services without their own (`--lb-algorithm`).
    pub algorithm: Algorithm,
    /// Entries per Maglev table, a prime (`--maglev-table-size`).
    pub maglev_size: u32,
    /// How many frontends can have a table (`--maglev-tables`).
    pub maglev_tables: u16,
}

impl Default for ChoiceConfig {
    fn default() -> Self {
        ChoiceConfig {
            algorithm: Algorithm::Random,
            maglev_size: MAGLEV_DEFAULT_TABLE_SIZE,
            maglev_tables: MAGLEV_DEFAULT_TABLES as u16,
        }
    }
}

impl ChoiceConfig {
    pub fn algorithm_of(&self, spec: &FrontendSpec) -> Algorithm {
        spec.algorithm.unwrap_or(self.algorithm)
    }
}

/// Maglev table ids, 1..=tables (0 in a master is "none"). Handed out round the range, so a
/// table freed by a deleted frontend is the last to be reused: a program that read the old
/// master a moment before would otherwise read another frontend's table.
#[derive(Debug)]
pub struct TableIds {
    next: u16,
}

impl Default for TableIds {
    fn default() -> Self {
        TableIds { next: 1 }
    }
}

impl TableIds {
    /// A free id (`taken` says which are in use), or None when all `tables` are.
    pub fn allocate(&mut self, tables: u16, taken: impl Fn(u16) -> bool) -> Option<u16> {
        for _ in 0..tables {
            let id = self.next;
            self.next = if id >= tables { 1 } else { id + 1 };
            if !taken(id) {
                return Some(id);
            }
        }
        None
    }
}

/// The Maglev table of a frontend whose slots hold `ids` for `backends` (in slot order): each
/// entry a backend id. Backends are hashed by address and port, never by id, so every node
/// builds the same fresh table for the same endpoints; `previous` (the table as the maps hold
/// it, backend ids) is kept as far as balance allows ([`maglev::update`]), so a change moves
/// only the changed backends' share, and an unchanged set writes nothing.
pub fn maglev_table(ids: &[u32], backends: &[Backend], size: u32, previous: &[u32]) -> Vec<u32> {
    let keys: Vec<[u8; 6]> = (backends.iter())
        .map(|b| {
            let mut k = [0; 6];
            k[..4].copy_from_slice(&b.addr_be.to_ne_bytes());
            k[4..].copy_from_slice(&b.port_be.to_ne_bytes());
            k
        })
        .collect();
    let members: Vec<Member<'_>> = (keys.iter())
        .map(|k| Member {
            id: k.as_slice(),
            weight: 1,
        })
        .collect();
    let index: foldhash::HashMap<u32, u32> = (ids.iter().enumerate())
        .map(|(i, id)| (*id, i as u32))
        .collect();
    let previous: Vec<u32> = (previous.iter())
        .map(|id| index.get(id).copied().unwrap_or(u32::MAX))
        .collect();
    (maglev::update(&members, size, &previous).into_iter())
        .map(|i| ids[i as usize])
        .collect()
}
