//! Back-off, scaling, stopping, timeouts, health replacements, rollbacks, stop messages.

use super::*;

#[tokio::test]
async fn back_off_doubles_per_quick_failure_and_resets_after_a_good_run() {
    let mut s = sim(1, "");
    let mut pid = s.spawned()[0].0;
    for expected in [100u64, 200, 400] {
        s.exit(pid, 3);
        let spawns = s.spawned().len();
        s.advance(Duration::from_millis(expected - 1));
        assert_eq!(s.spawned().len(), spawns, "restarted before its {expected} ms back-off");
        s.advance(Duration::from_millis(1));
        assert_eq!(s.spawned().len(), spawns + 1, "not restarted after its {expected} ms back-off");
        pid = s.spawned().last().unwrap().0;
    }
    // A good run (ready for reset_after) forgives: the next crash restarts at once.
    s.ready(pid);
    s.advance(s.sup.core.settings.backoff.reset_after);
    let spawns = s.spawned().len();
    s.exit(pid, 3);
    assert_eq!(s.spawned().len(), spawns + 1, "a crash after a good run waits for nothing");
    assert_eq!(s.status().workers[0].restarts, 4);
}

#[tokio::test]
async fn scaling_up_during_a_roll_out_starts_the_new_slots_on_the_new_generation() {
    let mut s = sim(2, "");
    s.all_ready();
    let mut rx = s.reload();
    let (tx, mut scaled) = oneshot::channel::<Result<usize, ScaleError>>();
    s.sup.on_control(Control::Scale { scale: Scale::To(3), wait: false, reply: Some(tx) });
    s.settle();
    assert_eq!(scaled.try_recv().ok(), Some(Ok(3)));
    assert_eq!(s.spawned().iter().filter(|p| p.1 == 1).count(), 2, "no new slot on the old generation");
    s.finish_rollout();
    assert!(answer(&mut rx).is_some_and(|o| o.ok));
    let serving = s.serving();
    assert_eq!(serving.len(), 3, "{serving:?}");
    assert!(serving.iter().all(|w| w.2 == 2), "{serving:?}");
}

#[tokio::test]
async fn a_stop_during_a_roll_out_fails_the_reload_stops_old_and_new_workers_and_never_says_ready_again() {
    let mut s = sim(2, "");
    s.all_ready();
    let old: Vec<i32> = s.serving().iter().map(|w| w.1).collect();
    let mut rx = s.reload();
    let new = s.spawned().last().unwrap().0;
    let before = s.told().len();
    s.sup.on_control(Control::Stop);
    s.settle();
    let outcome = answer(&mut rx).expect("answered");
    assert!(!outcome.ok);
    for pid in &old {
        assert_eq!(s.signalled(*pid), [Signal::SIGTERM], "old worker {pid} drains");
    }
    // The roll-out's pending new worker served nothing yet: killed, not drained.
    assert_eq!(s.signalled(new), [Signal::SIGKILL]);
    let told: Vec<String> = s.told()[before..].to_vec();
    assert!(told.iter().any(|m| m.starts_with("STOPPING=1")), "{told:?}");
    assert!(!told.iter().any(|m| m == "READY=1"), "READY=1 after STOPPING=1: {told:?}");
    for (pid, _) in s.spawned() {
        s.exit(pid, 0);
    }
    assert!(s.sup.core.stopping && s.sup.core.pool.workers().is_empty(), "the loop would end now");
}

#[tokio::test]
async fn a_worker_not_ready_in_time_is_killed_and_its_slot_backs_off() {
    let mut s = sim(1, "ready_timeout = \"2s\"");
    let pid = s.spawned()[0].0;
    s.advance(Duration::from_secs(2));
    assert_eq!(s.signalled(pid), [Signal::SIGKILL]);
    s.exit(pid, -1);
    assert_eq!(s.status().workers[0].state, WorkerState::Backoff);
    assert!(s.status().status.contains("restarting in"), "{}", s.status().status);
}

#[tokio::test]
async fn a_hung_worker_is_replaced_first_and_killed_once_its_replacement_is_ready() {
    let mut s = sim(1, "watchdog = \"1s\"");
    s.all_ready();
    let old = s.spawned()[0].0;
    s.advance(Duration::from_secs(2));
    let spawned = s.spawned();
    assert_eq!(spawned.len(), 2, "a replacement started");
    let new = spawned[1].0;
    assert!(s.signalled(old).is_empty(), "the hung worker was stopped before its replacement was ready");
    s.ready(new);
    assert_eq!(s.signalled(old).first(), Some(&Signal::SIGKILL));
    assert_eq!(s.serving().iter().map(|w| w.1).collect::<Vec<_>>(), [new]);
    s.exit(old, -1);
    assert_eq!(s.status().workers[0].restarts, 1);
}

#[tokio::test]
async fn scaling_down_retires_the_highest_slots_and_answers_once_they_are_gone() {
    let mut s = sim(3, "");
    s.all_ready();
    let top = s.serving().iter().find(|w| w.0 == 2).unwrap().1;
    let (tx, mut rx) = oneshot::channel::<Result<usize, ScaleError>>();
    s.sup.on_control(Control::Scale { scale: Scale::Remove(1), wait: true, reply: Some(tx) });
    s.settle();
    assert_eq!(s.signalled(top), [Signal::SIGTERM]);
    assert!(rx.try_recv().is_err(), "answered before the removed worker was gone");
    s.exit(top, 0);
    assert_eq!(rx.try_recv().ok(), Some(Ok(2)));
    let (tx, mut rx) = oneshot::channel::<Result<usize, ScaleError>>();
    s.sup.on_control(Control::Scale { scale: Scale::To(0), wait: true, reply: Some(tx) });
    assert_eq!(rx.try_recv().ok(), Some(Err(ScaleError::Zero { now: 2 })));
}

/// A reload of two slots whose second new worker fails after the first took over.
fn abort_after_one_moved(s: &mut Sim) -> (Vec<i32>, oneshot::Receiver<ReloadOutcome>) {
    s.all_ready();
    let old: Vec<i32> = s.serving().iter().map(|w| w.1).collect();
    let rx = s.reload();
    let first = s.spawned().last().unwrap().0;
    s.ready(first);
    s.advance(s.sup.core.settings.min_ready);
    assert_eq!(s.signalled(old[0]), [Signal::SIGTERM], "slot 0 moved");
    s.exit(old[0], 0);
    let second = s.spawned().last().unwrap().0;
    assert_ne!(second, first, "the second new worker started");
    s.exit(second, 1);
    (old, rx)
}

#[tokio::test]
async fn an_aborted_reload_rolls_the_moved_slots_back_through_a_readiness_gated_roll_out() {
    let mut s = sim(2, "");
    let (old, mut rx) = abort_after_one_moved(&mut s);
    assert!(answer(&mut rx).is_none(), "answered before the rollback ran");
    let back = *s.spawned().last().unwrap();
    assert_eq!(back.1, 1, "the rollback starts a worker of the old generation");
    assert!(s.signalled(old[1]).is_empty(), "the slot that never moved is left alone");
    s.finish_rollout();
    let outcome = answer(&mut rx).expect("answered after the rollback");
    assert!(!outcome.ok && outcome.generation == 1, "{outcome:?}");
    assert!(outcome.message.contains("rolled back 1 worker(s) to generation 1"), "{}", outcome.message);
    let last = s.status().last_reload.expect("a last reload");
    assert_eq!((last.result.as_str(), last.rollback.as_deref()), ("failed", Some("ok")));
    assert!(s.serving().iter().all(|w| w.2 == 1), "{:?}", s.serving());
    assert_eq!(s.serving().len(), 2);
}

#[tokio::test]
async fn with_on_failure_keep_an_aborted_reload_leaves_the_moved_slots_on_the_new_generation() {
    let mut s = sim(2, "on_failure = \"keep\"");
    let (_, mut rx) = abort_after_one_moved(&mut s);
    let outcome = answer(&mut rx).expect("answered at once");
    assert!(outcome.message.contains("on_failure = keep"), "{}", outcome.message);
    let spawns = s.spawned().len();
    s.advance(Duration::from_secs(5));
    assert_eq!(s.spawned().len(), spawns, "nothing more starts");
    let generations: Vec<u64> = s.serving().iter().map(|w| w.2).collect();
    assert_eq!(generations, [2, 1]);
}

#[tokio::test]
async fn a_promoted_worker_that_dies_during_the_roll_out_aborts_it_and_its_slot_restarts_on_the_old_generation()
 {
    let mut s = sim(2, "");
    s.all_ready();
    let mut rx = s.reload();
    let first = s.spawned().last().unwrap().0;
    s.ready(first);
    s.advance(s.sup.core.settings.min_ready);
    let second = s.spawned().last().unwrap().0;
    s.exit(first, 1);
    let outcome = answer(&mut rx).expect("answered at once");
    assert!(!outcome.ok);
    assert!(outcome.message.contains("1 worker(s) restart on generation 1"), "{}", outcome.message);
    assert_eq!(s.signalled(second), [Signal::SIGKILL], "the pending new worker is killed");
    s.advance(Duration::from_millis(100));
    let restarted = *s.spawned().last().unwrap();
    assert_eq!(restarted.1, 1, "slot 0 restarts on the old generation");
    assert_eq!(s.status().last_reload.and_then(|l| l.rollback), Some("ok".to_string()));
}

#[tokio::test]
async fn a_hung_new_worker_is_killed_and_aborts_the_roll_out() {
    let mut s = sim(1, "watchdog = \"1s\"\nmin_ready = \"5s\"");
    s.all_ready();
    let old = s.spawned()[0].0;
    let mut rx = s.reload();
    let new = s.spawned().last().unwrap().0;
    s.ready(new);
    s.advance(Duration::from_millis(500));
    s.ping(old);
    s.advance(Duration::from_millis(600));
    assert_eq!(s.signalled(new), [Signal::SIGKILL], "the hung new worker is killed, not replaced");
    assert_eq!(s.spawned().len(), 2, "no replacement for a roll-out's worker");
    s.exit(new, -1);
    let outcome = answer(&mut rx).expect("the reload failed");
    assert!(!outcome.ok && outcome.message.contains("watchdog"), "{outcome:?}");
    assert!(s.signalled(old).is_empty(), "the old worker keeps serving");
}

#[tokio::test]
async fn a_worker_over_its_memory_limit_twice_in_a_row_is_replaced_then_stopped_gracefully() {
    let mut s = sim(1, "max_memory = \"100M\"");
    s.all_ready();
    let old = s.spawned()[0].0;
    s.host.rss.borrow_mut().insert(old, 200 << 20);
    s.advance(crate::supervisor::health::MEMORY_CHECK);
    assert_eq!(s.spawned().len(), 1, "replaced after one sample above the limit");
    s.advance(crate::supervisor::health::MEMORY_CHECK);
    assert_eq!(s.spawned().len(), 2, "a replacement started after the second");
    let new = s.spawned()[1].0;
    assert!(s.signalled(old).is_empty(), "stopped before its replacement was ready");
    s.ready(new);
    assert_eq!(s.signalled(old), [Signal::SIGTERM], "drains with the stop signal");
    assert_eq!(s.serving().iter().map(|w| w.1).collect::<Vec<_>>(), [new]);
}

#[tokio::test]
async fn a_replacement_that_dies_before_it_is_ready_gets_the_hung_worker_killed() {
    let mut s = sim(1, "watchdog = \"1s\"");
    s.all_ready();
    let old = s.spawned()[0].0;
    s.advance(Duration::from_secs(2));
    let new = s.spawned()[1].0;
    s.exit(new, 1);
    assert_eq!(s.signalled(old), [Signal::SIGKILL]);
    s.exit(old, -1);
    assert_eq!(s.status().workers[0].state, WorkerState::Backoff);
}

#[tokio::test]
async fn a_slot_that_cannot_start_backs_off_and_scale_wait_hears_why() {
    let mut s = sim(1, "");
    s.all_ready();
    s.host.broken.set(true);
    let mut rx = s.scale(Scale::To(2), true);
    match rx.try_recv() {
        Ok(Err(ScaleError::StartFailed { slot: 1, why })) => assert!(why.contains("/fake/app"), "{why}"),
        other => panic!("{other:?}"),
    }
    let st = s.status();
    assert_eq!(st.workers.iter().find(|w| w.id == 1).map(|w| w.state), Some(WorkerState::Backoff));
    s.host.broken.set(false);
    let spawns = s.spawned().len();
    s.advance(Duration::from_millis(100));
    assert_eq!(s.spawned().len(), spawns + 1, "it starts again after its back-off");
}

#[tokio::test]
async fn a_reload_batch_starts_that_many_new_workers_at_once_and_extends_the_managers_timeout_for_each() {
    let mut s = sim(4, "reload_batch = 2");
    s.all_ready();
    let before = s.told().len();
    let mut rx = s.reload();
    assert_eq!(s.spawned().iter().filter(|p| p.1 == 2).count(), 2);
    let extends = s.told()[before..].iter().filter(|m| m.starts_with("EXTEND_TIMEOUT_USEC=")).count();
    assert_eq!(extends, 2, "{:?}", &s.told()[before..]);
    s.finish_rollout();
    assert!(answer(&mut rx).is_some_and(|o| o.ok));
    assert_eq!(s.serving().iter().filter(|w| w.2 == 2).count(), 4);
}

#[tokio::test]
async fn a_reload_asked_for_while_stopping_is_refused() {
    let mut s = sim(1, "");
    s.all_ready();
    s.stop();
    let mut rx = s.reload();
    let outcome = answer(&mut rx).expect("answered at once");
    assert!(!outcome.ok && outcome.message.contains("stopping"), "{outcome:?}");
    assert_eq!(s.spawned().len(), 1, "nothing started");
}

#[tokio::test]
async fn a_second_stop_kills_the_remaining_workers_at_once() {
    let mut s = sim(1, "");
    s.all_ready();
    let pid = s.spawned()[0].0;
    s.stop();
    assert_eq!(s.signalled(pid), [Signal::SIGTERM]);
    s.stop();
    assert_eq!(s.signalled(pid), [Signal::SIGTERM, Signal::SIGKILL]);
}

#[tokio::test]
async fn a_node_workers_ready_message_counts_exactly_like_ready_1() {
    let mut s = sim(2, "");
    let pids = s.spawned();
    for (pid, _) in &pids {
        s.sup.on_event(Event::Channel { pid: *pid, msg: crate::ipc::Incoming::Ready });
        s.settle();
    }
    assert_eq!(s.status().ready, 2);
    assert_eq!(s.told().iter().filter(|m| *m == "READY=1").count(), 1);
}

#[tokio::test]
async fn stop_signal_message_sends_the_shutdown_message_instead_of_a_signal_then_sigkill_after_the_stop_timeout()
 {
    let mut s = sim_of(true, 1, "stop_signal = \"message\"\nstop_timeout = \"5s\"");
    s.all_ready();
    let pid = s.spawned()[0].0;
    s.sup.on_control(Control::Stop);
    s.settle();
    let messages: Vec<Effect> =
        s.effects().into_iter().filter(|e| matches!(e, Effect::Message { .. })).collect();
    assert_eq!(messages, vec![Effect::Message { pid, text: "shutdown".into() }]);
    assert_eq!(s.signalled(pid), [], "no signal with the message");
    s.advance(Duration::from_secs(5));
    assert_eq!(s.signalled(pid), [Signal::SIGKILL], "SIGKILL after the stop timeout, as with signals");
}
