//! Rolling reloads: the canary, overlap, the safety rule, coalescing, aborts.

use super::*;

#[tokio::test]
async fn ready_is_told_once_every_slot_is_ready() {
    let mut s = sim(2, "");
    let pids = s.spawned();
    assert_eq!(pids.len(), 2);
    s.ready(pids[0].0);
    assert!(!s.told().iter().any(|m| m == "READY=1"), "READY=1 before every slot was ready");
    s.ready(pids[1].0);
    assert_eq!(s.told().iter().filter(|m| *m == "READY=1").count(), 1);
    assert_eq!(s.status().ready, 2);
}

#[tokio::test]
async fn a_reload_never_stops_an_old_worker_before_its_replacement_held_min_ready() {
    let mut s = sim(2, "");
    s.all_ready();
    let old: Vec<i32> = s.serving().iter().map(|w| w.1).collect();
    let mut rx = s.reload();
    let new = *s.spawned().last().unwrap();
    assert_eq!(new.1, 2, "one new worker of generation 2 (reload_batch = 1)");
    assert_eq!(s.spawned().len(), 3);
    s.ready(new.0);
    s.advance(s.sup.core.settings.min_ready - Duration::from_millis(1));
    assert!(old.iter().all(|p| s.signalled(*p).is_empty()), "an old worker was stopped within min_ready");
    s.advance(Duration::from_millis(1));
    let stopped: Vec<i32> = old.iter().copied().filter(|p| s.signalled(*p) == [Signal::SIGTERM]).collect();
    assert_eq!(stopped.len(), 1, "exactly one old worker stopped once its replacement held");
    s.finish_rollout();
    let outcome = answer(&mut rx).expect("the reload was answered");
    assert!(outcome.ok && outcome.generation == 2, "{outcome:?}");
    assert!(s.serving().iter().all(|w| w.2 == 2));
    assert!(old.iter().all(|p| s.effects().contains(&Effect::Reap { pid: *p })));
}

#[tokio::test]
async fn the_first_slot_is_a_canary_then_the_next_slots_new_worker_starts_while_the_previous_one_holds_min_ready_and_no_old_worker_stops_before_its_own_replacement_held()
 {
    let mut s = sim(4, "");
    s.all_ready();
    let old = s.of_generation(1);
    let mut rx = s.reload();
    let min_ready = s.sup.core.settings.min_ready;
    let half = min_ready / 2;
    assert_eq!(s.of_generation(2).len(), 1, "one new worker starting at a time (reload_batch = 1)");
    // The canary: slot 0's new worker is ready and holds alone.
    s.ready(s.of_generation(2)[0]);
    assert_eq!(s.of_generation(2).len(), 1, "nothing else starts while the canary holds");
    s.advance(min_ready - Duration::from_millis(1));
    assert!(
        old.iter().all(|p| s.signalled(*p).is_empty()),
        "an old worker stopped within the canary's min_ready"
    );
    s.advance(Duration::from_millis(1));
    assert_eq!(s.signalled(old[0]), [Signal::SIGTERM], "the canary held: slot 0's old worker drains");
    assert_eq!(s.of_generation(2).len(), 2, "slot 1's new worker starts once the canary moved");
    // Slot 1's new worker is ready: slot 2's starts at once, while slot 1's holds.
    s.ready(s.of_generation(2)[1]);
    assert_eq!(
        s.of_generation(2).len(),
        3,
        "the next slot's new worker waits for the previous one's min_ready"
    );
    assert!(s.signalled(old[1]).is_empty(), "slot 1's old worker stopped before its replacement held");
    s.advance(half);
    s.ready(s.of_generation(2)[2]);
    assert_eq!(s.of_generation(2).len(), 4);
    assert!(old[1..].iter().all(|p| s.signalled(*p).is_empty()), "an old worker stopped within min_ready");
    // Slot 1's new worker held: only slot 1's old worker is stopped.
    s.advance(half);
    let stopped: Vec<i32> = old.iter().copied().filter(|p| !s.signalled(*p).is_empty()).collect();
    assert_eq!(stopped, [old[0], old[1]]);
    s.finish_rollout();
    assert!(answer(&mut rx).is_some_and(|o| o.ok && o.generation == 2));
    assert!(s.serving().iter().all(|w| w.2 == 2), "{:?}", s.serving());
    assert_eq!(s.stopped_early(&old), Vec::<i32>::new());
    assert!(old.iter().all(|p| s.signalled(*p) == [Signal::SIGTERM]), "every old worker drained once");
}

#[tokio::test]
async fn a_new_worker_that_fails_while_holding_ends_the_ones_started_meanwhile_and_no_old_worker_of_theirs_is_stopped()
 {
    // `on_failure = "keep"`: the canary's slot stays moved, the rest must be untouched.
    let mut s = sim(3, "on_failure = \"keep\"");
    s.all_ready();
    let old = s.of_generation(1);
    let mut rx = s.reload();
    s.ready(s.of_generation(2)[0]);
    s.advance(s.sup.core.settings.min_ready);
    assert_eq!(s.signalled(old[0]), [Signal::SIGTERM], "the canary moved");
    s.exit(old[0], 0);
    s.ready(s.of_generation(2)[1]);
    let new = s.of_generation(2);
    assert_eq!(new.len(), 3, "slot 2's new worker started while slot 1's holds");
    // Slot 1's new worker dies within min_ready (slot 2's starts).
    s.exit(new[1], 1);
    let outcome = answer(&mut rx).expect("answered at once");
    assert!(!outcome.ok && outcome.message.contains("within min_ready"), "{outcome:?}");
    assert_eq!(s.signalled(new[2]), [Signal::SIGKILL], "the starting new worker is killed");
    assert!(old[1..].iter().all(|p| s.signalled(*p).is_empty()), "an old worker was stopped");
    s.exit(new[2], -1);
    s.advance(Duration::from_secs(5));
    let serving: Vec<i32> = s.serving().iter().map(|w| w.1).collect();
    assert_eq!(serving[0], new[0], "kept: the canary serves slot 0");
    assert_eq!(&serving[1..], &old[1..]);
    assert_eq!(s.of_generation(2).len(), 3, "nothing more of the new generation starts");
    assert_eq!(s.status().last_reload.map(|l| l.result), Some("failed".to_string()));
}

#[tokio::test]
async fn a_canary_that_fails_while_holding_alone_fails_the_reload_with_every_old_worker_untouched() {
    let mut s = sim(3, "");
    s.all_ready();
    let old = s.of_generation(1);
    let mut rx = s.reload();
    let canary = s.of_generation(2)[0];
    s.ready(canary);
    s.advance(s.sup.core.settings.min_ready / 2);
    assert_eq!(s.of_generation(2).len(), 1, "nothing else started while the canary holds");
    s.exit(canary, 1);
    let outcome = answer(&mut rx).expect("answered at once");
    assert!(
        !outcome.ok && outcome.message.contains("every worker keeps running the previous code"),
        "{outcome:?}"
    );
    assert!(old.iter().all(|p| s.signalled(*p).is_empty()), "an old worker was stopped");
    s.advance(Duration::from_secs(5));
    assert_eq!(s.serving().iter().map(|w| w.1).collect::<Vec<_>>(), old);
}

#[tokio::test]
async fn a_failure_after_overlapping_slots_moved_rolls_back_and_the_app_ends_on_one_generation() {
    let mut s = sim(4, "");
    s.all_ready();
    let old = s.of_generation(1);
    let mut rx = s.reload();
    // The canary moves slot 0; its old worker drains and exits.
    s.ready(s.of_generation(2)[0]);
    s.advance(s.sup.core.settings.min_ready);
    assert_eq!(s.signalled(old[0]), [Signal::SIGTERM]);
    s.exit(old[0], 0);
    s.ready(s.of_generation(2)[1]);
    s.ready(s.of_generation(2)[2]);
    let new = s.of_generation(2);
    assert_eq!(new.len(), 4);
    // Slot 1's new worker dies while holding; slot 2's holds, slot 3's starts.
    s.exit(new[1], 1);
    assert!(answer(&mut rx).is_none(), "answered before the rollback ran");
    assert_eq!(s.signalled(new[2]), [Signal::SIGTERM], "holding: drains");
    assert_eq!(s.signalled(new[3]), [Signal::SIGKILL], "starting: killed");
    s.exit(new[2], -1);
    s.exit(new[3], -1);
    s.finish_rollout();
    let outcome = answer(&mut rx).expect("answered after the rollback");
    assert!(
        !outcome.ok && outcome.message.contains("rolled back 1 worker(s) to generation 1"),
        "{outcome:?}"
    );
    let serving = s.serving();
    assert_eq!(serving.len(), 4, "{serving:?}");
    assert!(serving.iter().all(|w| w.2 == 1), "the app ends on one generation: {serving:?}");
    assert_eq!(&serving[1..].iter().map(|w| w.1).collect::<Vec<_>>(), &old[1..], "slots 1-3 never moved");
    assert_eq!(s.stopped_early(&old), Vec::<i32>::new());
    assert_eq!(
        s.stopped_early(&new[..1]),
        Vec::<i32>::new(),
        "the rolled-back worker held its replacement too"
    );
    let last = s.status().last_reload.expect("a last reload");
    assert_eq!((last.result.as_str(), last.rollback.as_deref()), ("failed", Some("ok")));
}

#[tokio::test]
async fn a_new_version_that_dies_before_it_is_ready_starts_one_new_worker_only() {
    let mut s = sim(4, "");
    s.all_ready();
    let mut rx = s.reload();
    s.exit(s.of_generation(2)[0], 3);
    assert!(answer(&mut rx).is_some_and(|o| !o.ok));
    s.advance(Duration::from_secs(5));
    assert_eq!(s.of_generation(2).len(), 1, "a crash-looping version costs one start, not one per slot");
}

#[tokio::test]
async fn reload_surge_caps_the_new_workers_running_at_once() {
    for surge in [1usize, 2] {
        let mut s = sim(4, &format!("reload_surge = {surge}"));
        s.all_ready();
        let old = s.of_generation(1);
        let mut rx = s.reload();
        // The canary first, alone.
        s.ready(s.of_generation(2)[0]);
        s.advance(s.sup.core.settings.min_ready);
        for i in 1..=surge {
            s.ready(s.of_generation(2)[i]);
        }
        assert_eq!(s.of_generation(2).len(), 1 + surge, "reload_surge = {surge}: more new workers at once");
        s.advance(s.sup.core.settings.min_ready);
        assert_eq!(
            s.of_generation(2).len(),
            (2 + surge).min(4),
            "reload_surge = {surge}: the next starts once one moved"
        );
        s.finish_rollout();
        assert!(answer(&mut rx).is_some_and(|o| o.ok));
        assert_eq!(s.stopped_early(&old), Vec::<i32>::new());
    }
}

/// A small deterministic generator for [`the_safety_rule_holds_on_any_schedule`].
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

#[tokio::test]
async fn the_safety_rule_holds_on_any_schedule() {
    // Many schedules of readiness, time, old workers exiting and new workers failing (before
    // or while holding, or after they took over): no worker is ever told to stop before a
    // later worker of its slot held min_ready, and every reload ends with one generation.
    for seed in 0..200u64 {
        let mut g = Lcg(seed);
        let workers = 1 + g.below(5);
        let batch = 1 + g.below(2);
        let mut s = sim(workers, &format!("reload_batch = {batch}"));
        s.all_ready();
        let mut rx = s.reload();
        let mut outcome = None;
        // Workers that served as their slot's active worker (the rule is about them: a new
        // worker that never took over may be stopped when the roll-out aborts).
        let mut active = std::collections::BTreeSet::new();
        for _ in 0..400 {
            let st = s.status();
            active.extend(st.workers.iter().filter(|w| w.state == WorkerState::Ready).filter_map(|w| w.pid));
            outcome = outcome.or_else(|| answer(&mut rx));
            if outcome.is_some() {
                break;
            }
            let pick = |states: &[WorkerState], g: &mut Lcg| {
                let c: Vec<i32> =
                    st.workers.iter().filter(|w| states.contains(&w.state)).filter_map(|w| w.pid).collect();
                (!c.is_empty()).then(|| c[g.below(c.len())])
            };
            match g.below(10) {
                0..=3 => match pick(&[WorkerState::StartingNew], &mut g) {
                    Some(pid) => s.ready(pid),
                    None => s.advance(Duration::from_millis(100 * (1 + g.below(10)) as u64)),
                },
                4..=6 => s.advance(Duration::from_millis(100 * (1 + g.below(10)) as u64)),
                7 => {
                    if let Some(pid) = pick(&[WorkerState::Stopping], &mut g) {
                        s.exit(pid, 0);
                    }
                }
                8 if g.below(3) == 0 => {
                    let new = s.of_generation(2);
                    let alive: Vec<i32> =
                        new.into_iter().filter(|p| st.workers.iter().any(|w| w.pid == Some(*p))).collect();
                    if !alive.is_empty() {
                        s.exit(alive[g.below(alive.len())], 1);
                    }
                }
                _ => {}
            }
        }
        s.finish_rollout();
        let outcome = outcome.or_else(|| answer(&mut rx)).unwrap_or_else(|| panic!("seed {seed}: no answer"));
        let active: Vec<i32> = active.into_iter().collect();
        assert_eq!(s.stopped_early(&active), Vec::<i32>::new(), "seed {seed}");
        // Slots whose worker failed outside a roll-out restart after their back-off.
        s.advance(Duration::from_secs(31));
        s.all_ready_now();
        let generations: std::collections::BTreeSet<u64> = s.serving().iter().map(|w| w.2).collect();
        assert_eq!(generations.len(), 1, "seed {seed}: {outcome:?} ended on {:?}", s.serving());
        let want = if outcome.ok { 2 } else { 1 };
        assert!(
            generations.contains(&want) || !outcome.ok,
            "seed {seed}: {outcome:?} ended on {generations:?}"
        );
        assert_eq!(s.serving().len(), workers, "seed {seed}");
    }
}

#[tokio::test]
async fn a_roll_out_tells_the_manager_reloading_with_its_monotonic_time_then_ready() {
    let mut s = sim(1, "");
    s.all_ready();
    let before = s.told().len();
    let _rx = s.reload();
    s.finish_rollout();
    let told: Vec<String> = s.told()[before..].to_vec();
    let reloading = told.iter().position(|m| m.contains("RELOADING=1")).expect("RELOADING=1");
    assert!(told[reloading].contains("MONOTONIC_USEC="), "{told:?}");
    let ready = told.iter().rposition(|m| m == "READY=1").expect("READY=1 after the roll-out");
    assert!(ready > reloading, "{told:?}");
}

#[tokio::test]
async fn reloads_asked_for_during_a_roll_out_coalesce_into_one_more_roll_out() {
    let mut s = sim(2, "");
    s.all_ready();
    let mut first = s.reload();
    let mut second = s.reload();
    let mut third = s.reload();
    let mut got_first = None;
    s.rollout_until(|_| {
        got_first = answer(&mut first);
        got_first.is_some()
    });
    assert_eq!(got_first.map(|o| (o.ok, o.generation)), Some((true, 2)));
    assert!(answer(&mut second).is_none(), "the queued reloads wait for their own roll-out");
    s.finish_rollout();
    assert_eq!(answer(&mut second).map(|o| (o.ok, o.generation)), Some((true, 3)));
    assert_eq!(answer(&mut third).map(|o| (o.ok, o.generation)), Some((true, 3)));
    let generations: Vec<u64> = s.spawned().iter().map(|p| p.1).collect();
    assert_eq!(generations, [1, 1, 2, 2, 3, 3], "exactly one more roll-out for both queued reloads");
}

#[tokio::test]
async fn a_new_worker_that_fails_aborts_the_roll_out_and_no_old_worker_is_stopped() {
    let mut s = sim(3, "");
    s.all_ready();
    let old: Vec<i32> = s.serving().iter().map(|w| w.1).collect();
    let mut rx = s.reload();
    let new = s.spawned().last().unwrap().0;
    s.ready(new);
    // It dies while holding (a late crash, within min_ready).
    s.exit(new, 1);
    let outcome = answer(&mut rx).expect("answered at once");
    assert!(!outcome.ok, "{outcome:?}");
    assert!(outcome.message.contains("within min_ready"), "{}", outcome.message);
    assert!(old.iter().all(|p| s.signalled(*p).is_empty()), "an old worker was stopped");
    assert_eq!(s.serving().iter().map(|w| w.1).collect::<Vec<_>>(), old);
    assert_eq!(s.status().last_reload.map(|l| l.result), Some("failed".to_string()));
}
