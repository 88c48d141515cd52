//! The metrics' counters across an in-place upgrade (see `crate::upgrade`): a scrape after the
//! upgrade continues every counter instead of resetting it.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::model::HistogramState;
use super::{Metrics, Reason};

#[derive(Debug, Serialize, Deserialize)]
pub struct MetricsState {
    pub restarts: Vec<(usize, u64)>,
    pub exits: Vec<(usize, String, u64)>,
    pub reloads: [u64; 2],
    pub reload_seconds: HistogramState,
    pub start_seconds: HistogramState,
    pub scrape_errors: Vec<(usize, u64)>,
    /// Live workers' metrics sockets: (pid, slot, path).
    pub sockets: Vec<(i32, usize, PathBuf)>,
    pub cpu_gone: Vec<(usize, u64)>,
    pub cpu_seen: Vec<(i32, usize, u64)>,
    pub slots: Vec<usize>,
    pub seq: u64,
}

impl Metrics {
    pub fn export(&self) -> MetricsState {
        let s = self.state();
        MetricsState {
            restarts: s.restarts.iter().map(|(k, v)| (*k, *v)).collect(),
            exits: s.exits.iter().map(|((slot, r), v)| (*slot, r.label().to_string(), *v)).collect(),
            reloads: s.reloads,
            reload_seconds: s.reload_seconds.export(),
            start_seconds: s.start_seconds.export(),
            scrape_errors: s.scrape_errors.iter().map(|(k, v)| (*k, *v)).collect(),
            sockets: s.sockets.iter().map(|(pid, (slot, p))| (*pid, *slot, p.clone())).collect(),
            cpu_gone: s.cpu_gone.iter().map(|(k, v)| (*k, *v)).collect(),
            cpu_seen: s.cpu_seen.iter().map(|(pid, (slot, t))| (*pid, *slot, *t)).collect(),
            slots: s.slots.iter().copied().collect(),
            seq: self.0.seq.load(Ordering::Relaxed),
        }
    }

    /// The handle of a new image: the previous image's counters, its workers' sockets kept.
    pub fn resume(dir: Option<PathBuf>, sockets: Vec<(String, OwnedFd)>, st: MetricsState) -> Metrics {
        let m = Metrics::empty(dir, sockets);
        {
            let mut s = m.state();
            s.restarts = st.restarts.into_iter().collect();
            for (slot, reason, v) in st.exits {
                if let Some(r) = Reason::ALL.into_iter().find(|r| r.label() == reason) {
                    s.exits.insert((slot, r), v);
                }
            }
            s.reloads = st.reloads;
            s.reload_seconds.import(st.reload_seconds);
            s.start_seconds.import(st.start_seconds);
            s.scrape_errors = st.scrape_errors.into_iter().collect();
            s.sockets = st.sockets.into_iter().map(|(pid, slot, p)| (pid, (slot, p))).collect();
            s.cpu_gone = st.cpu_gone.into_iter().collect();
            s.cpu_seen = st.cpu_seen.into_iter().map(|(pid, slot, t)| (pid, (slot, t))).collect();
            s.slots = st.slots.into_iter().collect();
        }
        m.0.seq.store(st.seq, Ordering::Relaxed);
        m
    }
}
