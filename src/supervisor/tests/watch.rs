//! `--watch` reloads, learned sockets and bind interception in the loop.

use super::*;

/// A sim with `--watch` on (the watcher thread is not started: the test sends the changes).
fn watching(workers: usize) -> Sim {
    let mut s = sim(workers, &format!("watch = [{:?}]", std::env::temp_dir().display().to_string()));
    s.all_ready();
    s
}

impl Sim {
    fn change(&mut self, path: &str) {
        self.sup.on_control(Control::Changed(crate::watch::Changed::for_test(path)));
        self.settle();
    }

    /// The highest generation spawned so far.
    fn last_generation(&self) -> u64 {
        self.spawned().iter().map(|(_, g)| *g).max().unwrap_or(0)
    }
}

#[tokio::test]
async fn a_burst_of_file_changes_is_one_reload_once_the_files_are_quiet() {
    use crate::supervisor::watch::QUIET;
    let mut s = watching(2);
    for i in 0..50 {
        s.change(&format!("/app/f{i}.js"));
        s.advance(Duration::from_millis(9));
    }
    assert_eq!(s.last_generation(), 1, "a reload began during the burst");
    assert!(s.status().watch.unwrap().pending);
    s.advance(QUIET - Duration::from_millis(10));
    assert_eq!(s.last_generation(), 1, "a reload began before the files were quiet for {QUIET:?}");
    s.advance(Duration::from_millis(1));
    assert_eq!(s.last_generation(), 2, "no reload once the files were quiet");
    s.finish_rollout();
    s.advance(Duration::from_secs(60));
    let st = s.status();
    let w = st.watch.unwrap();
    assert_eq!((w.reloads, w.pending, w.trigger.as_deref()), (1, false, Some("/app/f0.js")));
    assert_eq!((st.generation, s.last_generation()), (2, 2));
    assert_eq!(st.last_reload.unwrap().result, "ok");
}

#[tokio::test]
async fn changes_during_a_rollout_make_one_reload_after_it_and_do_not_interrupt_it() {
    let mut s = watching(2);
    let mut rx = s.reload();
    // The roll-out's first new worker is starting; changes keep coming for longer than the
    // quiet period and the longest wait.
    for i in 0..30 {
        s.change(&format!("/app/during{i}.js"));
        s.advance(Duration::from_millis(300));
    }
    assert_eq!(s.last_generation(), 2, "a reload began (or was queued and began) during the roll-out");
    assert!(s.serving().iter().any(|w| w.2 == 1), "the roll-out in progress was cut short");
    s.rollout_until(|s| s.last_generation() == 3);
    assert_eq!(answer(&mut rx).map(|o| o.ok), Some(true), "the roll-out in progress did not complete");
    assert_eq!(s.status().generation, 2);
    s.finish_rollout();
    s.advance(Duration::from_secs(60));
    let st = s.status();
    assert_eq!((st.generation, s.last_generation()), (3, 3), "one follow-up reload, not more");
    let w = st.watch.unwrap();
    assert_eq!((w.reloads, w.pending, w.trigger.as_deref()), (1, false, Some("/app/during0.js")));
}

#[tokio::test]
async fn files_that_never_stop_changing_reload_after_the_longest_wait() {
    use crate::supervisor::watch::MAX_WAIT;
    let mut s = watching(1);
    let step = Duration::from_millis(100);
    let mut waited = Duration::ZERO;
    while s.last_generation() == 1 {
        s.change("/app/busy.js");
        s.advance(step);
        waited += step;
        assert!(waited <= MAX_WAIT, "no reload within {MAX_WAIT:?} of the first change");
    }
    assert_eq!(waited, MAX_WAIT);
}

#[tokio::test]
async fn a_failed_watch_reload_is_reported_and_not_retried_until_the_next_change() {
    let mut s = watching(1);
    s.host.broken.set(true);
    s.change("/app/broken.js");
    s.advance(Duration::from_secs(1));
    let st = s.status();
    assert_eq!(st.last_reload.as_ref().map(|r| r.result.as_str()), Some("failed"), "{:?}", st.last_reload);
    assert_eq!(st.watch.as_ref().map(|w| (w.reloads, w.pending)), Some((1, false)));
    s.advance(Duration::from_secs(60));
    assert_eq!(s.status().watch.unwrap().reloads, 1, "the failed reload was retried without a change");
    s.host.broken.set(false);
    s.change("/app/fixed.js");
    s.advance(Duration::from_secs(1));
    s.finish_rollout();
    let st = s.status();
    assert_eq!((st.generation, st.last_reload.unwrap().result.as_str()), (3, "ok"));
}

/// Review finding: the socket herdsman bound for the first worker's own bind (no `--listen`)
/// was dropped when that worker died before its `Bound` event reached the loop; the address
/// must survive (`status` shows it) and the next worker must get it (at fd 3).
#[tokio::test]
async fn a_learned_socket_survives_the_worker_that_bound_it_dying_first() {
    let mut s = sim(1, "");
    let first = s.spawned()[0].0;
    s.exit(first, 1);
    let l = crate::listeners::Listeners::bind_learned("127.0.0.1:0".parse().unwrap(), 0).unwrap();
    let addr = l.addr.clone();
    let served: std::net::SocketAddr = addr.parse().unwrap();
    let seen = crate::intercept::Seen::Bound { asked: served, served, learned: Some(l) };
    s.sup.on_event(Event::Intercepted { pid: first, seen });
    s.settle();
    assert_eq!(s.status().learned_sockets, vec![addr.clone()]);
    s.advance(Duration::from_secs(60)); // past the restart back-off
    let next = s.spawned().last().unwrap().0;
    assert_ne!(next, first);
    let given: Vec<String> = s
        .sup
        .outside
        .fds_of(next)
        .iter()
        .filter_map(|&fd| {
            let a = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrIn>(fd).ok()?;
            Some(a.to_string())
        })
        .collect();
    assert!(given.contains(&addr), "the next worker's sockets {given:?} lack the learned {addr}");
}

/// Counts the events logged at WARN or above by worker `pid` (those with `worker_pid = pid`).
struct WarnCount {
    pid: i64,
    count: Arc<std::sync::atomic::AtomicUsize>,
}

/// `worker_pid`, as an event's own field or its (worker) span's.
struct Pid(Option<i64>);

impl tracing::field::Visit for Pid {
    fn record_i64(&mut self, f: &tracing::field::Field, v: i64) {
        if f.name() == "worker_pid" {
            self.0 = Some(v);
        }
    }
    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

impl<S> tracing_subscriber::Layer<S> for WarnCount
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut pid = Pid(None);
        attrs.record(&mut pid);
        if let (Some(p), Some(span)) = (pid.0, ctx.span(id)) {
            span.extensions_mut().insert(p);
        }
    }

    fn on_event(&self, ev: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut pid = Pid(None);
        ev.record(&mut pid);
        if let Some(scope) = ctx.event_scope(ev) {
            for span in scope {
                pid.0 = pid.0.or_else(|| span.extensions().get::<i64>().copied());
            }
        }
        if *ev.metadata().level() <= tracing::Level::WARN && pid.0 == Some(self.pid) {
            self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Review finding: a worker looping on binds that cannot be inspected logged one line per
/// bind; now the first, then a count at 10, 100, 1000 (and its total at its exit).
#[tokio::test]
async fn a_worker_looping_on_failing_binds_does_not_flood_the_log() {
    use tracing_subscriber::layer::SubscriberExt;
    let mut s = sim(1, "");
    let pid = s.spawned()[0].0;
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let subscriber =
        tracing_subscriber::registry().with(WarnCount { pid: i64::from(pid), count: count.clone() });
    tracing::subscriber::with_default(subscriber, || {
        for _ in 0..1500 {
            let seen = crate::intercept::Seen::Failed("cannot read the worker's memory (EPERM)".into());
            s.sup.on_event(Event::Intercepted { pid, seen });
        }
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 4, "the first, then at 10, 100, 1000");
        s.exit(pid, 1);
    });
    assert_eq!(
        count.load(std::sync::atomic::Ordering::SeqCst),
        6,
        "and the total at its exit (beside the exit's own line)"
    );
}
