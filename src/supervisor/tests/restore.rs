//! The in-place upgrade's round trip, in-process: the core serialized as an upgrade writes it
//! (mid roll-out, with a health replacement starting and a back-off pending), restored into a
//! fresh driver on a fake host through the same path as a new image (`Resumed::take`, the
//! descriptors by name), then both fed the same inputs: they must decide the same.

use std::collections::BTreeMap;

use super::*;
use crate::supervisor::Core;
use crate::supervisor::handover::Resumed;

impl Sim {
    /// A supervisor that took this one's state over: its core through JSON, its workers'
    /// descriptors (stand-ins) by name, on a fake host at the same clock and pid counter.
    fn restored(&mut self) -> Sim {
        let bytes = serde_json::to_vec(&self.sup.core).unwrap();
        let core: Core = serde_json::from_slice(&bytes).unwrap();
        let mut fds: BTreeMap<String, OwnedFd> =
            self.sup.fd_table().into_iter().map(|(name, _)| (name, devnull())).collect();
        let resumed = Resumed::take(core, BTreeMap::new(), &mut fds, None, 0).unwrap();
        assert!(fds.is_empty(), "descriptors nobody took: {:?}", fds.keys().collect::<Vec<_>>());
        let dir = self._dir.with_extension("restored");
        std::fs::create_dir_all(&dir).unwrap();
        let (now, next_pid) = (self.host.clock.get(), self.host.next_pid.get());
        sim_with(self.sup.core.settings.clone(), dir, Some(resumed), now, next_pid)
    }
}

fn snapshot(s: &Sim) -> serde_json::Value {
    serde_json::to_value(s.status()).unwrap()
}

#[tokio::test]
async fn a_core_restored_mid_roll_out_with_a_replacement_and_a_back_off_pending_decides_the_same() {
    let mut s = sim(4, "watchdog = \"10s\"\nbackoff_reset = \"1m\"");
    s.all_ready();
    // The canary moved slot 0; slot 1's new worker is starting (and stays so for now).
    let (_reload, old, canary, candidate) = s.reload_past_the_canary();
    // Slot 2's worker stops pinging: it is replaced (not by the roll-out: it is no candidate).
    for _ in 0..11 {
        for pid in [old[1], old[3], canary] {
            s.ping(pid);
        }
        s.advance(Duration::from_secs(1));
        // Read what the manager was told, so that nothing waits in the notifier's backlog.
        s.told();
    }
    let replacement = *s.spawned().last().map(|(p, _)| p).unwrap();
    assert_eq!(s.status().workers.iter().filter(|w| w.state == WorkerState::StartingReplacement).count(), 1);
    // Slot 3's worker fails: its slot backs off.
    s.exit(old[3], 1);
    assert!(s.status().workers.iter().any(|w| w.state == WorkerState::Backoff), "{:?}", s.status().workers);

    // Each spec is written once; everything else names it by generation.
    let doc = serde_json::to_value(&s.sup.core).unwrap();
    let generations: Vec<u64> =
        doc["specs"].as_array().unwrap().iter().map(|spec| spec["generation"].as_u64().unwrap()).collect();
    assert_eq!(generations, [1, 2]);
    assert!(doc["pool"]["workers"].as_object().unwrap().values().all(|w| w["spec"].is_u64()), "{doc}");
    s.told();
    let mut r = s.restored();
    s.sup.reconcile();
    assert!(r.effects().is_empty(), "the restored supervisor acted on its own: {:?}", r.effects());
    assert_eq!(snapshot(&r), snapshot(&s));
    let split = s.effects().len();
    let told = (s.told().len(), r.told().len());

    let inputs = |s: &mut Sim| {
        s.advance(Duration::from_millis(500));
        s.ready(replacement);
        s.exit(old[2], -1);
        s.all_ready_now();
        s.ready(candidate);
        s.finish_rollout();
    };
    inputs(&mut s);
    inputs(&mut r);
    assert_eq!(s.effects()[split..], r.effects()[..], "different commands after the restore");
    let (s_told, r_told) = (s.told()[told.0..].to_vec(), r.told()[told.1..].to_vec());
    assert_eq!(s_told, r_told, "different messages to the service manager");
    assert_eq!(snapshot(&r), snapshot(&s));
    assert_eq!(s.status().generation, 2, "the roll-out did not finish: {:?}", s.status().workers);
    assert_eq!(serde_json::to_value(&r.sup.core).unwrap(), serde_json::to_value(&s.sup.core).unwrap());
}
