//! Interpretation written next to the figures (conditional on what was measured).

use std::fmt::Write;

use crate::report::Results;
use crate::servers::Kind;
use crate::util::mmm;

pub fn notes(r: &Results) -> String {
    let mut s = String::from("## Findings and caveats\n\n");
    let ratio = |kind: Kind, ka: bool| {
        r.tput.rows.iter().find(|x| x.kind == kind && x.keep_alive == ka).map(|x| mmm(&x.ratio).med)
    };
    if let (Some(hk), Some(hc)) = (ratio(Kind::Herdsman, true), ratio(Kind::Herdsman, false)) {
        let _ = writeln!(
            s,
            "* **Data path.** herdsman reaches {hk:.2}× the limit with keep-alive and {hc:.2}× with a \
             new connection per request: it is not in the data path, so any difference from 1.00 is \
             run-to-run noise on a 2-core machine shared with the load generator (see the min–max)."
        );
    }
    if let (Some(pk), Some(pc)) = (ratio(Kind::Pm2, true), ratio(Kind::Pm2, false)) {
        let _ = writeln!(
            s,
            "* **PM2 cluster mode** reaches {pk:.2}× (keep-alive) and {pc:.2}× (new connection per \
             request) of the limit: its primary process accepts every connection and passes it to a \
             worker over IPC, and that primary competes for the same 2 cores. (Reference figures from \
             the issue: 0.87× and 0.49×.){}",
            if pk >= 0.95 {
                " With keep-alive the primary accepts each of wrk's connections only once and the \
                 worker then serves it directly, so here PM2 comes close to the limit; the hand-over \
                 cost shows with a new connection per request."
            } else {
                ""
            }
        );
    }
    let cell = |kind: Kind, app: &str, n: usize, ka: bool| {
        r.reloads.cells.iter().find(|c| c.kind == kind && c.app == app && c.n == n && c.keep_alive == ka)
    };
    if let Some(c) = cell(Kind::Pm2, "instant", 2, true) {
        let _ = writeln!(
            s,
            "* **`pm2 reload`, keep-alive**: {:.1} failed requests per reload with 2 workers ({:.1} \
             without the client's retry){}. PM2 sends SIGINT to the old worker once the new one is \
             ready. PM2's failures after the retry are requests that got no answer at all within the \
             client's 10 s timeout (see the failure kinds): connections the primary handed to a worker \
             that was already closing. (They are counted as failed, not in the latency columns.)",
            mmm(&c.failed).med,
            mmm(&c.failed_noretry).med,
            cell(Kind::Pm2, "instant", 8, true)
                .map(|c8| format!(", {:.1} ({:.1}) with 8", mmm(&c8.failed).med, mmm(&c8.failed_noretry).med))
                .unwrap_or_default()
        );
    }
    for ka in [true, false] {
        if let (Some(h), Some(p)) =
            (cell(Kind::Herdsman, "warm 1 s, gate", 2, ka), cell(Kind::Pm2, "warm 1 s, gate", 2, ka))
        {
            let _ = writeln!(
                s,
                "* **Warming app that accepts before it is warm ({})**: herdsman {:.1} failed per \
                 reload, PM2 {:.1}. {}",
                if ka { "keep-alive" } else { "new connection per request" },
                mmm(&h.failed).med,
                mmm(&p.failed).med,
                if mmm(&h.failed).med > 0.0 {
                    "herdsman is not in the data path: a new worker that has adopted the shared socket \
                     takes its share of new connections from the kernel and answers 503 while it warms; \
                     `--ready notify` only keeps the old workers alive meanwhile, it cannot keep \
                     connections away from the new one. The herdsman idiom is to warm up *before* \
                     adopting fd 3 (the socket is listening all along, so nothing is refused) — see the \
                     *defer* rows."
                } else {
                    "With keep-alive a client only opens a new connection when its old one is closed, \
                     i.e. when an old worker drains, which both supervisors do only after the new \
                     worker reported ready: the warming worker sees (almost) no request."
                }
            );
        }
    }
    if let (Some(h), Some(p)) =
        (cell(Kind::Herdsman, "warm 1 s, defer", 2, false), cell(Kind::Pm2, "warm 1 s, defer", 2, false))
    {
        let _ = writeln!(
            s,
            "* **Warming app that defers accepting (new connection per request)**: herdsman {:.1}, PM2 \
             {:.1} failed per reload.",
            mmm(&h.failed).med,
            mmm(&p.failed).med
        );
    }
    if let (Some(h), Some(p)) =
        (cell(Kind::Herdsman, "instant", 2, true), cell(Kind::Pm2, "instant", 2, true))
    {
        let _ = writeln!(
            s,
            "* **Roll-out time** (instant app, 2 workers): herdsman {:.2} s, `pm2 reload` {:.2} s \
             (both measured around the CLI command; `pm2` itself is a Node process that takes \
             ~0.2–0.3 s to start).",
            mmm(&h.reload_s).med,
            mmm(&p.reload_s).med
        );
    }
    let sc = &r.scaling;
    let per = |n: usize| {
        sc.rows.iter().find(|x| x.n == n).map(|x| (mmm(&x.cpu_us_per_worker).med, mmm(&x.step_ms).med))
    };
    if let (Some((c64, s64)), Some(big)) =
        (per(64), sc.rows.iter().filter(|x| !x.cpu_us_per_worker.is_empty()).map(|x| x.n).max())
    {
        if let Some((cb, sb)) = per(big).filter(|_| big > 64) {
            let _ = writeln!(
                s,
                "* **Cost per replaced worker grows with N.** Supervisor CPU per replaced worker is {c64:.0} µs \
                 at N=64 and {cb:.0} µs at N={big}; the roll-out step {s64:.2} → {sb:.2} ms. Some work done \
                 at every roll-out step is proportional to the number of workers (a whole reload is then \
                 slightly super-linear in N), which is also why the straight-line fit has a negative \
                 intercept. Where the several hundred µs of supervisor CPU per worker go was not profiled \
                 here (candidates: forking the supervisor, setting up pipes and the pidfd, reading /proc \
                 for the status line); for scale, a bare fork+exec of the same binary from a small Rust \
                 process takes {:.2} ms of wall time on this VM. The ≤ 1 ms target lands on the edge: it \
                 depends on how much of the fork+exec one counts as the worker's own start.",
                sc.bare_exec_ms.med
            );
        }
    }
    if let Some(row) = r.cost.rows.iter().find(|x| x.kind == Kind::Herdsman) {
        if row.idle_rss > 4.0 * 1024.0 * 1024.0 {
            let _ = writeln!(
                s,
                "* **RSS.** herdsman's RSS with {} workers is {:.1} MiB, of which {:.1} MiB is private; \
                 the rest are pages shared with other processes (libc, the dynamic loader, the \
                 binary's text mapped by the CLI too). RSS grows slowly with N (see the scaling table).",
                r.cost.n,
                row.idle_rss / 1048576.0,
                row.idle_uss / 1048576.0
            );
        }
    }
    let _ = writeln!(
        s,
        "* **Throughput noise.** This is a small VM on a shared host: the same contender's req/s varies \
         by tens of percent between slices a few seconds apart (see min–max), much more than the \
         2 % the data-path target asks to resolve. The interleaved slices and the median of \
         per-cycle ratios are there to cancel that; read the ratios with their ranges."
    );
    let _ = writeln!(
        s,
        "* **Readiness from Node.** Node core has no unix datagram sockets, so the app sends READY=1 \
         with `systemd-notify --ready` run as a child, which herdsman accepts because it comes from \
         the worker's process group. The helper is kept alive for 2 s (`sh -c 'systemd-notify \
         --ready; sleep 2'`) as a precaution: herdsman maps the sender's pid to its process group \
         when it reads the datagram, so a helper that has already exited *and been reaped* by then \
         could not be mapped and its READY=1 would be ignored. Without the linger, 12 of 12 \
         start-ups of 4 workers still worked here (the window is small), but it is a race."
    );
    let _ = writeln!(
        s,
        "* **Load generator on the same 2 cores.** The servers, the supervisor and the client share \
         two cores, so reload windows also show CPU contention from the starting worker (Node \
         start-up is ~100 ms of CPU); latency maxima of a few tens of ms are scheduling, not \
         supervision."
    );
    s
}

/// Reading of the balance section (section 7), conditional on what was measured.
pub fn balance_notes(r: &Results) -> String {
    let b = &r.balance;
    let mut s = String::from("**Reading it.**\n\n");
    let ratio = |n: usize, ka: bool, client: &str, label: &str| {
        b.tput
            .iter()
            .find(|x| x.n == n && x.keep_alive == ka && x.client == client && x.label == label)
            .map(|x| mmm(&x.ratio).med)
    };
    let n0 = b.ns.first().copied().unwrap_or(2);
    // Every slice of a mode, over every N and client population (sticky: where its clients
    // spread evenly), as a geometric mean with its 95 % CI; "limit again" is the yardstick.
    let pooled = |label: &str, ka: bool, clients: &[&str]| {
        let g = crate::report::pooled(b, label, ka, clients);
        (g.n > 0).then(|| format!("{:.3}× (CI {:.3}–{:.3})", g.mean, g.lo, g.hi))
    };
    let all = &crate::balance::CLIENTS[..];
    if let (Some(ska), Some(snc), Some(aka), Some(anc)) = (
        pooled("steer", true, all),
        pooled("steer", false, all),
        pooled("limit again", true, all),
        pooled("limit again", false, all),
    ) {
        let _ = writeln!(
            s,
            "* **Data path.** The BPF program runs in the kernel once per SYN; after that a steered \
             connection is an ordinary accepted socket and herdsman is not in its path. Over every \
             slice (both N, all three client populations) steer reaches {ska} of the limit with \
             keep-alive and {snc} with a new connection per request; the limit measured against \
             itself gives {aka} and {anc}, the noise of one such figure. With keep-alive (the BPF \
             program runs once per connection) steer is at the limit. {}",
            if crate::report::pooled(b, "steer", false, all).lo >= 0.98 {
                "With a new connection per request it is at the limit too: the program gives each \
                 SYN to the receiving workers in turn, so no worker's queue grows while another's \
                 is empty, as long as requests cost about the same. What per-worker queues cost \
                 without that choice (the same N sockets in one `SO_REUSEPORT` group, the kernel's \
                 hash) is in *Per-worker queues* below."
            } else {
                "With a new connection per request it is below: every request is queued on the \
                 socket of the worker the program picked, which may be busy by the time it is \
                 accepted while another is idle, where one shared queue hands it to whichever worker \
                 accepts first — the price of per-worker queues, which `--balance steer` needs to \
                 keep connections away from workers that are not ready. *Per-worker queues* below \
                 measures that price without herdsman (the same N sockets in one `SO_REUSEPORT` \
                 group, no program)."
            }
        );
    }
    if let (Some(wk), Some(mk)) = (ratio(n0, true, "wrk", "sticky"), ratio(n0, true, "multi", "sticky")) {
        let _ = writeln!(
            s,
            "* **sticky with one client address** (wrk, everything from 127.0.0.1) is {wk:.2}× the limit \
             with keep-alive at N={n0}: every connection lands on the same worker, by design. From {} \
             addresses it is {mk:.2}×. Sticky's balance is only as good as the mix of client \
             addresses (many clients behind one NAT address are one client).",
            b.tput_sources.len()
        );
    }
    let rel = |l: &str, ka: bool| {
        b.reloads.iter().find(|x| x.label == l && x.cell.keep_alive == ka).map(|x| mmm(&x.cell.failed).med)
    };
    for ka in [false, true] {
        if let (Some(sh), Some(st), Some(sk)) = (rel("shared", ka), rel("steer", ka), rel("sticky", ka)) {
            let _ = writeln!(
                s,
                "* **Reload of the warming app, {}**: shared {sh:.1} failed per reload, steer {st:.1}, \
                 sticky {sk:.1}{}. {}",
                if ka { "keep-alive" } else { "new connection per request" },
                rel("PM2", ka).map(|p| format!(", PM2 {p:.1}")).unwrap_or_default(),
                if sh > 0.0 {
                    "With `shared` a new worker that adopts the socket takes its share of new connections \
                     at once and answers 503 while it warms; with steer/sticky its socket joins the \
                     routing only at READY=1, and an old worker's socket leaves the routing before the \
                     worker is told to stop."
                } else {
                    "With keep-alive a client opens a new connection only when its old one is closed, \
                     i.e. when an old worker drains — after its replacement reported ready — so even \
                     `shared` sends (almost) nothing to a warming worker; what remains are retried \
                     stale keep-alive requests (*no retry* column)."
                }
            );
        }
    }
    let cpu =
        |n: usize, l: &str, src: usize| b.cpu.iter().find(|c| c.n == n && c.label == l && c.sources == src);
    let many = b.cpu_sources.len();
    for &n in &b.ns {
        if let (Some(sh), Some(st)) = (cpu(n, "shared", many), cpu(n, "steer", many)) {
            let _ = writeln!(
                s,
                "* **CPU-bound, N={n}**: shared p99 {:.1} ms / max {:.1} ms, steer p99 {:.1} ms / max {:.1} ms{}; \
                 requests per worker min/max shared {:.2}, steer {:.2}{}. {}",
                sh.p99,
                sh.max,
                st.p99,
                st.max,
                cpu(n, "sticky", many)
                    .map(|k| format!(", sticky p99 {:.1} ms / max {:.1} ms", k.p99, k.max))
                    .unwrap_or_default(),
                sh.min_max,
                st.min_max,
                cpu(n, "sticky", many).map(|k| format!(", sticky {:.2}", k.min_max)).unwrap_or_default(),
                if st.p99 > sh.p99 * 1.1 && st.max < sh.max {
                    "By p99 steer's tail is longer (per-worker queues: a connection goes to the worker \
                     the program picks, which may be busy while another is idle), but the single largest \
                     latency was shared's — a max is one request and moves with whatever else ran on \
                     the machine. Cloudflare measured max 72.7 ms shared vs 144.6 ms with per-worker \
                     queues."
                } else if st.p99 > sh.p99 * 1.1 {
                    "Steer's tail is longer: one shared queue lets whichever worker is free take the next \
                     connection, while per-worker queues hold a connection for the worker the program \
                     picked when its SYN arrived (the one whose turn it was), which may be busy by the \
                     time it is accepted while another is idle — the effect Cloudflare measured (max \
                     72.7 ms shared vs 144.6 ms with per-worker queues)."
                } else if st.p99 < sh.p99 / 1.1 {
                    "Here steer's tail was *shorter* than shared's, the opposite of Cloudflare's \
                     measurement (max 72.7 ms shared vs 144.6 ms with per-worker queues). With a shared \
                     socket, which worker gets a connection depends on which one the kernel wakes (and \
                     on a loaded machine, which one is on a core), and that can be as uneven as the \
                     per-worker hash (see *per worker*); the cause was not investigated further."
                } else {
                    "Per-worker queues cost no tail latency here within ±10 % (Cloudflare measured max \
                     72.7 ms shared vs 144.6 ms with per-worker queues; the effect needs a worker that is \
                     busy while another idles)."
                }
            );
        }
        if let Some(k1) = cpu(n, "sticky", 1) {
            let _ = writeln!(
                s,
                "* **One client address, N={n}**: sticky serves everything from one worker (per worker {}), \
                 p99 {:.1} ms{}.",
                k1.per_worker.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" / "),
                k1.p99,
                cpu(n, "steer", 1)
                    .map(|s1| format!(
                        "; steer from one address still spreads over every worker (per worker {}, min/max {:.2})",
                        s1.per_worker.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" / "),
                        s1.min_max
                    ))
                    .unwrap_or_default()
            );
        }
    }
    let _ = writeln!(
        s,
        "* **Which mode.** `steer` when workers warm up after they start accepting or must not get \
         new work while draining (compare the failed requests per reload in 7.2) — with per-worker \
         queues, whose cost under uneven, CPU-heavy requests is the p99/max comparison in 7.3. `shared` when \
         requests vary a lot in cost and the app is ready when it accepts (or defers accepting \
         until warm): an idle worker can take the next connection. `sticky` only when a client \
         must keep reaching the same worker (in-process sessions, socket.io without a shared \
         adapter); its spread follows the client addresses."
    );
    s
}
