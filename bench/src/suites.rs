//! The six benchmark sections. Every section alternates contenders (A/B/A/B) and repeats.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::load::{self, answer_pid, Load, Outcome, Rec};
use crate::procfs::*;
use crate::servers::*;
use crate::util::*;

pub fn log(msg: &str) {
    eprintln!("[bench {}] {msg}", chrono_now());
}

fn chrono_now() -> String {
    let s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

// ---------------------------------------------------------------------------------------------
// 1 + 2: throughput (wrk), limit vs herdsman vs PM2

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct TputRow {
    pub n: usize,
    pub keep_alive: bool,
    pub kind: Kind,
    pub rps: Vec<f64>,
    /// req/s divided by the limit's req/s in the same round.
    pub ratio: Vec<f64>,
    /// wrk's socket errors + non-2xx answers, per run.
    pub errors: Vec<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Tput {
    pub wrk_args: String,
    pub secs: u64,
    pub rounds: usize,
    pub rows: Vec<TputRow>,
}

pub fn wrk(addr: &str, keep_alive: bool, secs: u64, conns: usize) -> Result<(f64, f64), String> {
    let mut c = Command::new("wrk");
    c.args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s")]);
    if !keep_alive {
        c.args(["-H", "Connection: close"]);
    }
    let out =
        c.arg(format!("http://{addr}/")).stdin(Stdio::null()).output().map_err(|e| format!("wrk: {e}"))?;
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let rps = s
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("wrk output: {s}"))?;
    let mut errors = 0.0;
    for l in s.lines() {
        let l = l.trim();
        if let Some(r) = l.strip_prefix("Socket errors:") {
            errors +=
                r.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<f64>().ok()).sum::<f64>();
        }
        if let Some(r) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += r.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok((rps, errors))
}

pub const WRK_CONNS: usize = 32;

pub fn throughput(ctx: &Ctx, ns: &[usize]) -> Tput {
    // All three contenders run side by side (idle ones cost nothing) and wrk visits them in
    // short slices, rotating the order every cycle (L H P, H P L, P L H, ...): drift and
    // other load on the machine hit every contender alike, and each ratio compares slices
    // measured seconds apart.
    let (cycles, secs) = if ctx.quick { (2, 2) } else { (8, 3) };
    let kinds = [Kind::Limit, Kind::Herdsman, Kind::Pm2];
    let mut rows: Vec<TputRow> = Vec::new();
    for &n in ns {
        log(&format!("throughput N={n}: starting limit, herdsman and PM2 side by side"));
        let servers: Vec<Server> = kinds
            .iter()
            .filter_map(|k| match start(ctx, *k, &App::Node { warm_ms: 0, mode: "gate" }, n) {
                Ok(s) => Some(s),
                Err(e) => {
                    log(&format!("  start failed: {e}"));
                    None
                }
            })
            .collect();
        for s in &servers {
            let _ = wrk(&s.addr, true, 1, WRK_CONNS); // warm-up (JIT, connections)
            let _ = wrk(&s.addr, false, 1, WRK_CONNS);
        }
        for cycle in 0..cycles {
            for keep_alive in [true, false] {
                let mut got: BTreeMap<u8, f64> = BTreeMap::new();
                let mut line = String::new();
                for i in 0..servers.len() {
                    let s = &servers[(i + cycle) % servers.len()];
                    match wrk(&s.addr, keep_alive, secs, WRK_CONNS) {
                        Ok((rps, errors)) => {
                            line += &format!(" {} {rps:.0}", s.kind.name());
                            got.insert(s.kind as u8, rps);
                            let row = row_for(&mut rows, n, keep_alive, s.kind);
                            row.rps.push(rps);
                            row.errors.push(errors);
                        }
                        Err(e) => log(&format!("  wrk failed: {e}")),
                    }
                }
                log(&format!(
                    "  cycle {}/{cycles} {}:{line} req/s",
                    cycle + 1,
                    if keep_alive { "keep-alive" } else { "new conn" }
                ));
                if let Some(limit) = got.get(&(Kind::Limit as u8)).copied() {
                    for kind in kinds {
                        if let Some(r) = got.get(&(kind as u8)) {
                            row_for(&mut rows, n, keep_alive, kind).ratio.push(r / limit);
                        }
                    }
                }
            }
        }
        drop(servers);
    }
    Tput { wrk_args: format!("wrk -t1 -c{WRK_CONNS} -d{secs}s"), secs, rounds: cycles, rows }
}

fn row_for(rows: &mut Vec<TputRow>, n: usize, keep_alive: bool, kind: Kind) -> &mut TputRow {
    if let Some(i) = rows.iter().position(|r| r.n == n && r.keep_alive == keep_alive && r.kind == kind) {
        return &mut rows[i];
    }
    rows.push(TputRow { n, keep_alive, kind, rps: vec![], ratio: vec![], errors: vec![] });
    rows.last_mut().expect("a row was just pushed")
}

// ---------------------------------------------------------------------------------------------
// 3: reload under load

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ReloadCell {
    pub kind: Kind,
    pub app: String,
    pub n: usize,
    pub keep_alive: bool,
    pub reloads: usize,
    pub requests: u64,
    /// Failed requests per reload (after the one idempotent retry of a stale keep-alive request).
    pub failed: Vec<f64>,
    /// Failed requests per reload if stale keep-alive requests are not retried (wrk's view).
    pub failed_noretry: Vec<f64>,
    /// Failures outside the reload windows (whole run).
    pub steady_failed: u64,
    pub by_kind: BTreeMap<String, u64>,
    pub steady_p50: Vec<f64>,
    pub steady_p99: Vec<f64>,
    pub steady_max: Vec<f64>,
    pub reload_p50: Vec<f64>,
    pub reload_p99: Vec<f64>,
    pub reload_max: Vec<f64>,
    pub reload_s: Vec<f64>,
    pub errors: Vec<String>,
}

impl ReloadCell {
    pub fn new(kind: Kind, app: &str, n: usize, keep_alive: bool) -> ReloadCell {
        ReloadCell {
            kind,
            app: app.to_string(),
            n,
            keep_alive,
            reloads: 0,
            requests: 0,
            failed: vec![],
            failed_noretry: vec![],
            steady_failed: 0,
            by_kind: BTreeMap::new(),
            steady_p50: vec![],
            steady_p99: vec![],
            steady_max: vec![],
            reload_p50: vec![],
            reload_p99: vec![],
            reload_max: vec![],
            reload_s: vec![],
            errors: vec![],
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Timeline {
    pub title: String,
    pub kind: Kind,
    pub windows: Vec<(f64, f64)>,
    /// (bucket start s, p50 ms, max ms, ok, failed)
    pub buckets: Vec<(f64, f64, f64, u32, u32)>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Reloads {
    pub threads: usize,
    pub reps: usize,
    pub per_run: usize,
    pub tail_s: f64,
    pub cells: Vec<ReloadCell>,
    pub timelines: Vec<Timeline>,
}

pub const TAIL_S: f64 = 1.5;

pub struct RunOut {
    pub recs: Vec<Rec>,
    pub windows: Vec<(f64, f64)>,
    pub errors: Vec<String>,
}

#[allow(clippy::too_many_arguments)]
pub fn reload_run(
    ctx: &Ctx,
    kind: Kind,
    balance: Option<&str>,
    app: &App,
    n: usize,
    keep_alive: bool,
    reloads: usize,
    threads: usize,
) -> Result<RunOut, String> {
    let srv = start_balanced(ctx, kind, app, n, balance, None)?;
    sleep_ms(300);
    let steady = if ctx.quick { 1000 } else { 2000 };
    let gap = (TAIL_S * 1000.0) as u64 + 500;
    let load = Load::start(&srv.addr, threads, keep_alive, Duration::from_secs(600));
    sleep_ms(steady);
    let mut windows = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..reloads {
        let s = load.now();
        if let Err(e) = srv.reload(ctx) {
            log(&format!("  reload error: {e}"));
            errors.push(e);
        }
        windows.push((s, load.now()));
        sleep_ms(gap);
    }
    let recs = load.finish();
    drop(srv);
    Ok(RunOut { recs, windows, errors })
}

/// (p50, p99, max); zeros for an empty sample (JSON has no NaN; callers check counts).
pub fn lat_stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (pct(&v, 50.0), pct(&v, 99.0), v.last().copied().unwrap_or(f64::NAN))
}

pub fn analyse(cell: &mut ReloadCell, out: &RunOut) {
    let win = |t: f64| out.windows.iter().position(|(s, e)| t >= *s && t <= e + TAIL_S);
    let nw = out.windows.len();
    let mut failed = vec![0f64; nw];
    let mut failed_nr = vec![0f64; nw];
    let mut lat_w: Vec<Vec<f64>> = vec![vec![]; nw];
    let mut lat_s = Vec::new();
    for r in &out.recs {
        let t = r.t_us as f64 / 1e6;
        cell.requests += 1;
        if r.outcome != Outcome::Ok {
            *cell.by_kind.entry(r.outcome.name().to_string()).or_default() += 1;
        }
        let lat = r.lat_us as f64 / 1000.0;
        match win(t) {
            Some(i) => {
                if r.outcome.failed() {
                    failed[i] += 1.0;
                }
                if r.outcome != Outcome::Ok {
                    failed_nr[i] += 1.0;
                }
                if !r.outcome.failed() {
                    lat_w[i].push(lat);
                }
            }
            None => {
                if r.outcome.failed() {
                    cell.steady_failed += 1;
                }
                if !r.outcome.failed() && t > 0.3 {
                    lat_s.push(lat);
                }
            }
        }
    }
    cell.failed.extend(&failed);
    cell.failed_noretry.extend(&failed_nr);
    for (i, l) in lat_w.into_iter().enumerate() {
        let (p50, p99, max) = lat_stats(l);
        cell.reload_p50.push(p50);
        cell.reload_p99.push(p99);
        cell.reload_max.push(max);
        cell.reload_s.push(out.windows[i].1 - out.windows[i].0);
    }
    let (p50, p99, max) = lat_stats(lat_s);
    cell.steady_p50.push(p50);
    cell.steady_p99.push(p99);
    cell.steady_max.push(max);
    cell.reloads += nw;
    cell.errors.extend(out.errors.iter().cloned());
}

fn timeline(title: &str, kind: Kind, out: &RunOut) -> Timeline {
    let b = 0.1;
    let end = out.recs.last().map(|r| r.t_us as f64 / 1e6).unwrap_or(0.0);
    let nb = (end / b).ceil() as usize + 1;
    let mut lat: Vec<Vec<f64>> = vec![vec![]; nb];
    let mut fail = vec![0u32; nb];
    for r in &out.recs {
        let i = ((r.t_us as f64 / 1e6) / b) as usize;
        if r.outcome.failed() {
            fail[i] += 1;
        } else {
            lat[i].push(r.lat_us as f64 / 1000.0);
        }
    }
    let buckets = lat
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let ok = l.len() as u32;
            let (p50, _, max) = lat_stats(l);
            (i as f64 * b, p50, max, ok, fail[i])
        })
        .collect();
    Timeline { title: title.to_string(), kind, windows: out.windows.clone(), buckets }
}

pub fn reloads(ctx: &Ctx) -> Reloads {
    let threads = 8;
    let (reps, per_run) = if ctx.quick { (1, 1) } else { (2, 3) };
    // (app label, app, n, modes)
    let mut plan: Vec<(&str, App, usize, Vec<bool>)> = vec![
        ("instant", App::Node { warm_ms: 0, mode: "gate" }, 2, vec![true, false]),
        ("warm 1 s, gate", App::Node { warm_ms: 1000, mode: "gate" }, 2, vec![true, false]),
    ];
    if !ctx.quick {
        plan.insert(1, ("instant", App::Node { warm_ms: 0, mode: "gate" }, 8, vec![true, false]));
        plan.push(("warm 1 s, defer", App::Node { warm_ms: 1000, mode: "defer" }, 2, vec![true, false]));
    } else {
        plan[1].3 = vec![false];
    }
    let mut cells: Vec<ReloadCell> = Vec::new();
    let mut timelines = Vec::new();
    for rep in 0..reps {
        for (label, app, n, modes) in &plan {
            for &ka in modes {
                let kinds =
                    if rep % 2 == 0 { [Kind::Herdsman, Kind::Pm2] } else { [Kind::Pm2, Kind::Herdsman] };
                for kind in kinds {
                    let mode = if ka { "keep-alive" } else { "new conn" };
                    log(&format!(
                        "reload under load rep {}/{reps}: {} {label} N={n} {mode}",
                        rep + 1,
                        kind.name()
                    ));
                    let out = match reload_run(ctx, kind, None, app, *n, ka, per_run, threads) {
                        Ok(o) => o,
                        Err(e) => {
                            log(&format!("  failed: {e}"));
                            continue;
                        }
                    };
                    let i = match cells
                        .iter()
                        .position(|c| c.kind == kind && c.app == *label && c.n == *n && c.keep_alive == ka)
                    {
                        Some(i) => i,
                        None => {
                            cells.push(ReloadCell::new(kind, label, *n, ka));
                            cells.len() - 1
                        }
                    };
                    analyse(&mut cells[i], &out);
                    let c = &cells[i];
                    log(&format!(
                        "  {} requests, failed per reload {:?} (no retry {:?}), reload took {:?} s",
                        out.recs.len(),
                        &c.failed[c.failed.len() - out.windows.len()..],
                        &c.failed_noretry[c.failed_noretry.len() - out.windows.len()..],
                        &c.reload_s[c.reload_s.len() - out.windows.len()..]
                            .iter()
                            .map(|s| (s * 100.0).round() / 100.0)
                            .collect::<Vec<_>>()
                    ));
                    if rep == 0
                        && *n == 2
                        && ((*label == "instant" && ka) || (label.starts_with("warm 1 s, gate") && !ka))
                    {
                        let title = format!("{} · {label} app · N={n} · {mode}", kind.name());
                        timelines.push(timeline(&title, kind, &out));
                    }
                }
            }
        }
    }
    Reloads { threads, reps, per_run, tail_s: TAIL_S, cells, timelines }
}

// ---------------------------------------------------------------------------------------------
// 4: supervisor cost

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CostRow {
    pub kind: Kind,
    pub idle_rss: f64,
    /// private (unshared) memory
    #[serde(default)]
    pub idle_uss: f64,
    pub idle_cpu_pct: f64,
    pub churn_reloads: usize,
    pub churn_cpu_pct: Vec<f64>,
    pub churn_cpu_ms_per_reload: Vec<f64>,
    pub churn_peak_rss: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Cost {
    pub n: usize,
    pub idle_s: u64,
    pub rows: Vec<CostRow>,
    pub status_cli_ms: Mmm,
    pub status_cli_p99_ms: f64,
    pub status_direct_ms: Mmm,
    pub pm2_jlist_ms: Mmm,
}

pub fn cost(ctx: &Ctx) -> Cost {
    let n = 8;
    let idle_s = if ctx.quick { 10 } else { 60 };
    let app = App::Node { warm_ms: 0, mode: "gate" };
    log(&format!("supervisor cost: starting herdsman and PM2 with {n} workers each"));
    let h = match start(ctx, Kind::Herdsman, &app, n) {
        Ok(s) => s,
        Err(e) => {
            log(&format!("  {e}"));
            return Cost::default();
        }
    };
    let p = start(ctx, Kind::Pm2, &app, n).ok();
    sleep_ms(3000);
    let both: Vec<&Server> = std::iter::once(&h).chain(p.iter()).collect();
    log(&format!("  idle for {idle_s} s (both at once, nothing else running)"));
    let c0: Vec<u64> = both.iter().map(|s| cpu_ns(s.pid)).collect();
    let t0 = Instant::now();
    let mut rss_max = vec![0u64; both.len()];
    while t0.elapsed() < Duration::from_secs(idle_s) {
        sleep_ms(1000);
        for (i, s) in both.iter().enumerate() {
            rss_max[i] = rss_max[i].max(rss_bytes(s.pid));
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    let mut rows: Vec<CostRow> = both
        .iter()
        .enumerate()
        .map(|(i, s)| CostRow {
            kind: s.kind,
            idle_rss: rss_max[i] as f64,
            idle_uss: uss_bytes(s.pid) as f64,
            idle_cpu_pct: (cpu_ns(s.pid) - c0[i]) as f64 / (dt * 1e9) * 100.0,
            churn_reloads: 0,
            churn_cpu_pct: vec![],
            churn_cpu_ms_per_reload: vec![],
            churn_peak_rss: 0.0,
        })
        .collect();
    for r in &rows {
        log(&format!(
            "  {} idle: RSS {} (private {}), CPU {:.4} % of a core",
            r.kind.name(),
            fmt_bytes(r.idle_rss),
            fmt_bytes(r.idle_uss),
            r.idle_cpu_pct
        ));
    }

    // Status latency while both are up.
    let k = if ctx.quick { 10 } else { 40 };
    let mut cli = Vec::new();
    for _ in 0..k {
        let t = Instant::now();
        let _ = Command::new(&ctx.herdsman)
            .args([
                "status",
                h.control
                    .as_ref()
                    .expect("a herdsman server has a control socket")
                    .to_str()
                    .expect("a UTF-8 path"),
                "--json",
            ])
            .stdout(Stdio::null())
            .status();
        cli.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut direct = Vec::new();
    for _ in 0..(k * 5) {
        let t = Instant::now();
        let _ = control_status(h.control.as_ref().expect("a herdsman server has a control socket"));
        direct.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut jlist = Vec::new();
    if p.is_some() {
        for _ in 0..(if ctx.quick { 3 } else { 10 }) {
            let t = Instant::now();
            let _ = ctx.pm2_run(&["jlist"]);
            jlist.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let mut sorted = cli.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    log(&format!(
        "  herdsman status --json: {:.2} ms median; protocol only {:.3} ms; pm2 jlist {:.0} ms",
        mmm(&cli).med,
        mmm(&direct).med,
        mmm(&jlist).med
    ));

    // Reload churn: back-to-back reloads, alternating contenders.
    let (rounds, per) = if ctx.quick { (1, 2) } else { (2, 4) };
    for round in 0..rounds {
        let order: Vec<usize> =
            if round % 2 == 0 { (0..both.len()).collect() } else { (0..both.len()).rev().collect() };
        for i in order {
            let s = both[i];
            log(&format!("  churn round {}/{rounds}: {} × {per} reloads", round + 1, s.kind.name()));
            let stop = Arc::new(AtomicBool::new(false));
            let peak = Arc::new(AtomicU64::new(0));
            let sampler = {
                let (stop, peak, pid) = (stop.clone(), peak.clone(), s.pid);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        peak.fetch_max(rss_bytes(pid), Ordering::SeqCst);
                        sleep_ms(20);
                    }
                })
            };
            let c0 = cpu_ns(s.pid);
            let t0 = Instant::now();
            for _ in 0..per {
                if let Err(e) = s.reload(ctx) {
                    log(&format!("  reload error: {e}"));
                }
            }
            let dt = t0.elapsed().as_secs_f64();
            let dc = (cpu_ns(s.pid) - c0) as f64;
            stop.store(true, Ordering::SeqCst);
            let _ = sampler.join();
            let r = &mut rows[i];
            r.churn_reloads += per;
            r.churn_cpu_pct.push(dc / (dt * 1e9) * 100.0);
            r.churn_cpu_ms_per_reload.push(dc / 1e6 / per as f64);
            r.churn_peak_rss = r.churn_peak_rss.max(peak.load(Ordering::SeqCst) as f64);
            log(&format!(
                "    CPU {:.2} % of a core, {:.2} ms per reload, peak RSS {}",
                dc / (dt * 1e9) * 100.0,
                dc / 1e6 / per as f64,
                fmt_bytes(r.churn_peak_rss)
            ));
        }
    }
    drop(p);
    drop(h);
    Cost {
        n,
        idle_s,
        rows,
        status_cli_ms: mmm(&cli),
        status_cli_p99_ms: pct(&sorted, 99.0),
        status_direct_ms: mmm(&direct),
        pm2_jlist_ms: mmm(&jlist),
    }
}

// ---------------------------------------------------------------------------------------------
// 5: recovery after kill -9

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct RecoveryRow {
    pub kind: Kind,
    pub spawn_ms: Vec<f64>,
    pub serve_ms: Vec<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Recovery {
    pub n: usize,
    pub rows: Vec<RecoveryRow>,
}

pub fn recovery(ctx: &Ctx) -> Recovery {
    let n = 4;
    let kills = if ctx.quick { 1 } else { 3 };
    let app = App::Node { warm_ms: 0, mode: "gate" };
    let mut rows = vec![
        RecoveryRow { kind: Kind::Herdsman, spawn_ms: vec![], serve_ms: vec![] },
        RecoveryRow { kind: Kind::Pm2, spawn_ms: vec![], serve_ms: vec![] },
    ];
    log("recovery: herdsman and PM2 with 4 workers");
    let servers: Vec<Option<Server>> =
        vec![start(ctx, Kind::Herdsman, &app, n).ok(), start(ctx, Kind::Pm2, &app, n).ok()];
    sleep_ms(1000);
    for k in 0..kills {
        for (i, s) in servers.iter().enumerate() {
            let Some(s) = s else { continue };
            let pids = s.worker_pids();
            let Some(&victim) = pids.get(k % pids.len().max(1)) else { continue };
            let before = children(s.pid);
            let t0 = Instant::now();
            kill(victim, libc::SIGKILL);
            let newpid = wait_until(Duration::from_secs(10), 1, || {
                children(s.pid).into_iter().find(|p| !before.contains(p) && *p != victim)
            });
            let Some(newpid) = newpid else {
                log(&format!("  {}: no replacement within 10 s", s.kind.name()));
                continue;
            };
            let spawn = t0.elapsed().as_secs_f64() * 1000.0;
            let served =
                wait_until(Duration::from_secs(10), 1, || match load::get(&s.addr, Duration::from_secs(2)) {
                    Ok((200, body)) if answer_pid(&body) == Some(newpid) => Some(()),
                    _ => None,
                });
            let serve = t0.elapsed().as_secs_f64() * 1000.0;
            log(&format!("  {} kill -9 {victim}: replacement {newpid} spawned after {spawn:.1} ms, served after {serve:.1} ms", s.kind.name()));
            rows[i].spawn_ms.push(spawn);
            if served.is_some() {
                rows[i].serve_ms.push(serve);
            }
            sleep_ms(1500);
        }
    }
    drop(servers);
    Recovery { n, rows }
}

// ---------------------------------------------------------------------------------------------
// 6: scaling with N (herdsman, tiny instantly-ready worker)

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ScaleRow {
    pub n: usize,
    pub startup_s: Vec<f64>,
    pub startup_cpu_ms: Vec<f64>,
    pub rss: f64,
    pub idle_cpu_pct: f64,
    pub reload_s: Vec<f64>,
    /// reload duration / N
    pub step_ms: Vec<f64>,
    /// the worker's own main() → READY=1, median over the reload's workers
    pub own_ms: Vec<f64>,
    /// READY=1 of worker i → main() of worker i+1 (notify handling, stopping the old worker,
    /// fork + exec of the next one), median
    pub gap_ms: Vec<f64>,
    /// step − own − bare exec latency: the supervisor's own part per worker
    pub overhead_ms: Vec<f64>,
    pub cpu_us_per_worker: Vec<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Scaling {
    pub bare_exec_ms: Mmm,
    pub rows: Vec<ScaleRow>,
    /// Least-squares fit of reload duration (ms) = fixed + per_worker × N over every reload.
    #[serde(default)]
    pub fit_fixed_ms: f64,
    #[serde(default)]
    pub fit_per_worker_ms: f64,
    /// Median of the worker's own main() → READY=1 over every replaced worker.
    #[serde(default)]
    pub own_ms: f64,
    /// fit_per_worker − own − bare fork+exec.
    #[serde(default)]
    pub supervisor_per_worker_ms: f64,
    /// Fit of supervisor CPU per reload (µs) = fixed + per_worker × N.
    #[serde(default)]
    pub cpu_fit_fixed_us: f64,
    #[serde(default)]
    pub cpu_fit_per_worker_us: f64,
}

/// Least squares y = a + b x: (a, b).
pub fn linfit(pts: &[(f64, f64)]) -> (f64, f64) {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return (0.0, 0.0);
    }
    let (sx, sy) = pts.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let b = sxy / sxx;
    (my - b * mx, b)
}

fn bare_exec_ms(ctx: &Ctx) -> Mmm {
    let f = ctx.work.join("probe.t");
    let mut v = Vec::new();
    for _ in 0..30 {
        let t0 = mono_ns();
        let ok =
            Command::new(&ctx.me).arg("probe").arg(&f).stdin(Stdio::null()).status().map(|s| s.success());
        if ok.unwrap_or(false) {
            if let Ok(t1) = read_file(&f).trim().parse::<u64>() {
                v.push((t1 - t0) as f64 / 1e6);
            }
        }
    }
    mmm(&v)
}

pub fn scaling(ctx: &Ctx) -> Scaling {
    let bare = bare_exec_ms(ctx);
    log(&format!("scaling: bare fork+exec of the tiny worker {:.3} ms (median)", bare.med));
    let sizes: Vec<(usize, usize, usize)> = if ctx.quick {
        vec![(1, 1, 2), (8, 1, 2), (64, 1, 1)]
    } else {
        vec![(1, 2, 3), (8, 2, 3), (64, 2, 3), (256, 2, 1)]
    };
    let mut rows = Vec::new();
    let mut own_all = Vec::new();
    for (n, starts, reloads) in sizes {
        let mut row = ScaleRow {
            n,
            startup_s: vec![],
            startup_cpu_ms: vec![],
            rss: 0.0,
            idle_cpu_pct: 0.0,
            reload_s: vec![],
            step_ms: vec![],
            own_ms: vec![],
            gap_ms: vec![],
            overhead_ms: vec![],
            cpu_us_per_worker: vec![],
        };
        for st in 0..starts {
            let times = ctx.work.join(format!("times-{n}-{st}.txt"));
            let _ = std::fs::remove_file(&times);
            log(&format!("scaling N={n}: start {}/{starts}", st + 1));
            let srv = match start(ctx, Kind::Herdsman, &App::Tiny { times: Some(times.clone()) }, n) {
                Ok(s) => s,
                Err(e) => {
                    log(&format!("  {e}"));
                    continue;
                }
            };
            row.startup_s.push(srv.startup.as_secs_f64());
            row.startup_cpu_ms.push(cpu_ns(srv.pid) as f64 / 1e6);
            sleep_ms(500);
            let c0 = cpu_ns(srv.pid);
            sleep_ms(2000);
            row.idle_cpu_pct = (cpu_ns(srv.pid) - c0) as f64 / 2e9 * 100.0;
            row.rss = row.rss.max(rss_bytes(srv.pid) as f64);
            log(&format!(
                "  all {n} ready in {:.3} s, supervisor CPU {:.1} ms, RSS {}",
                srv.startup.as_secs_f64(),
                cpu_ns(srv.pid) as f64 / 1e6,
                fmt_bytes(rss_bytes(srv.pid) as f64)
            ));
            if st > 0 {
                // Reloads on the first start only.
                continue;
            }
            for r in 0..reloads {
                let gen = r as u64 + 2;
                let c0 = cpu_ns(srv.pid);
                let t0 = Instant::now();
                if let Err(e) = srv.reload_direct() {
                    log(&format!("  reload error: {e}"));
                    continue;
                }
                let dur = t0.elapsed().as_secs_f64();
                let dc = (cpu_ns(srv.pid) - c0) as f64;
                // The last worker appends its line just after READY=1: give it a moment.
                sleep_ms(100);
                // Worker timestamps of this generation.
                let mut w: Vec<(u64, u64)> = read_file(&times)
                    .lines()
                    .filter_map(|l| {
                        let f: Vec<u64> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
                        (f.len() == 4 && f[1] == gen).then(|| (f[2], f[3]))
                    })
                    .collect();
                w.sort();
                let own: Vec<f64> = w.iter().map(|(m, r)| (r - m) as f64 / 1e6).collect();
                own_all.extend(own.iter().copied());
                let gaps: Vec<f64> = w.windows(2).map(|p| (p[1].0 as f64 - p[0].1 as f64) / 1e6).collect();
                let step = dur * 1000.0 / n as f64;
                let own_mean = own.iter().sum::<f64>() / own.len().max(1) as f64;
                row.reload_s.push(dur);
                row.step_ms.push(step);
                row.own_ms.push(mmm(&own).med);
                if !gaps.is_empty() {
                    row.gap_ms.push(mmm(&gaps).med);
                }
                row.overhead_ms.push(step - own_mean - bare.med);
                row.cpu_us_per_worker.push(dc / 1e3 / n as f64);
                log(&format!(
                    "  reload {}: {:.3} s, {step:.3} ms per worker (worker's own {:.3} ms, gap {:.3} ms), supervisor CPU {:.0} µs per worker",
                    r + 1,
                    dur,
                    mmm(&own).med,
                    mmm(&gaps).med,
                    dc / 1e3 / n as f64
                ));
                sleep_ms(200);
            }
        }
        rows.push(row);
    }
    let pts: Vec<(f64, f64)> =
        rows.iter().flat_map(|r| r.reload_s.iter().map(move |d| (r.n as f64, d * 1000.0))).collect();
    let (fixed, per) = linfit(&pts);
    let cpts: Vec<(f64, f64)> = rows
        .iter()
        .flat_map(|r| r.cpu_us_per_worker.iter().map(move |c| (r.n as f64, c * r.n as f64)))
        .collect();
    let (cfixed, cper) = linfit(&cpts);
    let own = mmm(&own_all).med;
    log(&format!(
        "  fit: reload = {fixed:.2} ms + {per:.3} ms × N (worker's own {own:.3} ms, bare exec {:.3} ms); supervisor CPU = {cfixed:.0} µs + {cper:.0} µs × N",
        bare.med
    ));
    Scaling {
        bare_exec_ms: bare,
        rows,
        fit_fixed_ms: fixed,
        fit_per_worker_ms: per,
        own_ms: own,
        supervisor_per_worker_ms: per - own - bare.med,
        cpu_fit_fixed_us: cfixed,
        cpu_fit_per_worker_us: cper,
    }
}
