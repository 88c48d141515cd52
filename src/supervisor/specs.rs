//! Specs in a serialized core: each written once, in the core's `specs` table; every
//! reference to one (the pool's, a slot's, a worker's, a roll-out's) as its generation, which
//! names one spec (a reload pins a new generation; nothing else makes a spec).
//!
//! Reading: the table comes first in the core's document and its reader keeps it (per
//! thread) for the references that follow; a reference to a generation not in the table is an
//! error naming it. Sharing (`Arc`) is restored as it was: one `Arc` per generation.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serializer};

use crate::spawn::Spec;

thread_local! {
    /// The table of the core being read.
    static TABLE: RefCell<BTreeMap<u64, Arc<Spec>>> = const { RefCell::new(BTreeMap::new()) };
}

/// The core's table of specs: in memory a marker, on the wire every spec in use, once.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Table;

impl Table {
    /// Writes `specs` (every spec the core refers to) as the table.
    pub(super) fn write<S: Serializer>(specs: Vec<Arc<Spec>>, s: S) -> Result<S::Ok, S::Error> {
        let mut by_generation: BTreeMap<u64, &Spec> = BTreeMap::new();
        for spec in &specs {
            by_generation.entry(spec.generation).or_insert(spec);
        }
        s.collect_seq(by_generation.values())
    }
}

impl<'de> Deserialize<'de> for Table {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Table, D::Error> {
        let specs = Vec::<Spec>::deserialize(d)?;
        TABLE.with(|t| {
            *t.borrow_mut() = specs.into_iter().map(|s| (s.generation, Arc::new(s))).collect();
        });
        Ok(Table)
    }
}

fn lookup<E: serde::de::Error>(generation: u64) -> Result<Arc<Spec>, E> {
    TABLE
        .with(|t| t.borrow().get(&generation).cloned())
        .ok_or_else(|| E::custom(format!("the spec of generation {generation} is not in the state's table")))
}

/// `#[serde(with = "specs::shared")]`: an `Arc<Spec>` as its generation.
pub mod shared {
    use super::*;

    pub fn serialize<S: Serializer>(spec: &Arc<Spec>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(spec.generation)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Spec>, D::Error> {
        lookup(u64::deserialize(d)?)
    }
}

/// `#[serde(with = "specs::slots")]`: a roll-out's pending slots, `(slot, generation)`.
pub(super) mod slots {
    use super::*;

    pub fn serialize<S: Serializer>(v: &VecDeque<(usize, Arc<Spec>)>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|(slot, spec)| (*slot, spec.generation)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VecDeque<(usize, Arc<Spec>)>, D::Error> {
        Vec::<(usize, u64)>::deserialize(d)?.into_iter().map(|(slot, g)| Ok((slot, lookup(g)?))).collect()
    }
}

/// `#[serde(with = "specs::moved")]`: a roll-out's moved slots, `(slot, pid, generation)`.
pub(super) mod moved {
    use super::*;

    /// A moved slot: the slot, the worker that took over, the spec it replaced.
    type Moved = (usize, i32, Arc<Spec>);

    pub fn serialize<S: Serializer>(v: &[Moved], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|(slot, pid, spec)| (*slot, *pid, spec.generation)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Moved>, D::Error> {
        Vec::<(usize, i32, u64)>::deserialize(d)?
            .into_iter()
            .map(|(slot, pid, g)| Ok((slot, pid, lookup(g)?)))
            .collect()
    }
}
