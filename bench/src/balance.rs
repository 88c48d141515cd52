//! Section 7: `--balance shared | steer | sticky` side by side with the limit and PM2 (issue 12).
//!
//! Three measurements, every contender with the same Node app and the same N:
//!  1. data path: req/s against the limit, keep-alive and a new connection per request, with
//!     wrk (one client address, 127.0.0.1) and with the in-repo client bound to several loopback
//!     source addresses (what `sticky` needs to spread at all);
//!  2. failed requests per rolling reload of the warming app (listens first, 503 while warming)
//!     under the reload section's load;
//!  3. a CPU-bound endpoint (`/work?ms=2`) under a fixed concurrency: requests per worker
//!     (min/max) and p50/p99/max latency.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::load::{self, Opts};
use crate::procfs::loadavg;
use crate::servers::*;
use crate::suites::{analyse, lat_stats, log, reload_run, wrk, ReloadCell, TAIL_S, WRK_CONNS};
use crate::util::*;

/// One contender of the balance section.
#[derive(Clone, Copy, Debug)]
pub struct Contender {
    pub label: &'static str,
    pub kind: Kind,
    /// herdsman's `--balance` value.
    pub balance: Option<&'static str>,
    /// herdsman with `--metrics`, scraped every [`SCRAPE_EVERY`] while it is measured (data
    /// path only): what a Prometheus scrape costs the app.
    pub metrics: bool,
}

const fn c(label: &'static str, kind: Kind, balance: Option<&'static str>, metrics: bool) -> Contender {
    Contender { label, kind, balance, metrics }
}

pub const CONTENDERS: [Contender; 7] = [
    c("limit", Kind::Limit, None, false),
    // The limit measured again as a contender (data path only): its ratio to the limit is
    // the measurement's own noise, the yardstick for every other ratio.
    c("limit again", Kind::Limit, None, false),
    c("shared", Kind::Herdsman, Some("shared"), false),
    c("steer", Kind::Herdsman, Some("steer"), false),
    c("sticky", Kind::Herdsman, Some("sticky"), false),
    c("metrics", Kind::Herdsman, Some("shared"), true),
    c("PM2", Kind::Pm2, None, false),
];

/// How often the `metrics` contender is scraped while it is measured (Prometheus' usual
/// interval is 15 s to 1 min: this is 15–60 times harsher).
pub const SCRAPE_EVERY: Duration = Duration::from_secs(1);

/// The client populations of the data-path table: wrk (127.0.0.1 only), the in-repo client
/// over pseudo-random addresses, and over consecutive ones (spread evenly over the slots).
pub const CLIENTS: [&str; 3] = ["wrk", "multi", "even"];

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct BTputRow {
    pub n: usize,
    pub keep_alive: bool,
    /// "wrk" (one client address) or "multi" (the in-repo client over `Balance::tput_sources`).
    pub client: String,
    pub label: String,
    pub rps: Vec<f64>,
    /// req/s divided by the limit's req/s in the same cycle.
    pub ratio: Vec<f64>,
    pub errors: Vec<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct BReload {
    pub label: String,
    pub cell: ReloadCell,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CpuRow {
    pub n: usize,
    pub label: String,
    /// Source addresses the clients were bound to ("127.0.0.1" = unbound, one client address).
    pub sources: usize,
    pub secs: f64,
    pub ok: u64,
    pub failed: u64,
    pub rps: f64,
    /// Successful requests per worker, largest first, padded with zeros to N.
    pub per_worker: Vec<u64>,
    /// min / max of `per_worker`.
    pub min_max: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Balance {
    pub ns: Vec<usize>,
    pub wrk_args: String,
    pub tput_secs: u64,
    pub tput_cycles: usize,
    pub multi_cycles: usize,
    pub multi_threads: usize,
    pub tput_sources: Vec<String>,
    /// The "even" population: consecutive addresses, as many as connections.
    #[serde(default)]
    pub even_sources: Vec<String>,
    /// Scrapes of the `metrics` contender (answered / failed) over the data-path runs.
    #[serde(default)]
    pub scrapes: (u64, u64),
    pub tput: Vec<BTputRow>,
    pub reload_app: String,
    pub reload_n: usize,
    pub reload_threads: usize,
    pub reload_per_run: usize,
    pub reload_tail_s: f64,
    pub reloads: Vec<BReload>,
    pub cpu_work_ms: f64,
    pub cpu_conc: usize,
    pub cpu_secs: f64,
    pub cpu_sources: Vec<String>,
    pub cpu: Vec<CpuRow>,
    /// (stage, 1/5/15-min load average when it started): how busy the machine was.
    #[serde(default)]
    pub loads: Vec<(String, String)>,
}

impl Balance {
    pub fn is_empty(&self) -> bool {
        self.tput.is_empty() && self.reloads.is_empty() && self.cpu.is_empty()
    }
}

/// `count` distinct pseudo-random addresses in 127.0.0.0/8 (fixed seed, never 127.0.0.1, last
/// octet 1..=254): "clients" whose addresses are not consecutive, as real clients' are not.
pub fn sources(count: usize, seed: u64) -> Vec<Ipv4Addr> {
    let mut x = seed;
    let mut out: Vec<Ipv4Addr> = Vec::new();
    while out.len() < count {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v = (x >> 33) as u32;
        let ip = Ipv4Addr::new(127, (v >> 16) as u8, (v >> 8) as u8, 1 + (v as u8 % 254));
        if ip != Ipv4Addr::new(127, 0, 0, 1) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

fn start_c(ctx: &Ctx, c: Contender, app: &App, n: usize) -> Option<(Server, Option<String>)> {
    let metrics = c.metrics.then(|| format!("127.0.0.1:{}", ctx.next_port()));
    match start_balanced(ctx, c.kind, app, n, c.balance, metrics.as_deref()) {
        Ok(s) => Some((s, metrics)),
        Err(e) => {
            log(&format!("  {} did not start: {e}", c.label));
            None
        }
    }
}

/// The in-repo client for `secs`: (ok req/s, failed requests).
fn multi(addr: &str, keep_alive: bool, secs: u64, threads: usize, src: &[Ipv4Addr]) -> (f64, f64) {
    let opts = Opts { sources: src.to_vec(), ..Default::default() };
    let recs = load::run(addr, threads, keep_alive, Duration::from_secs(secs), &opts);
    let ok = recs.iter().filter(|r| !r.outcome.failed()).count();
    (ok as f64 / secs as f64, (recs.len() - ok) as f64)
}

pub fn balance(ctx: &Ctx, ns: &[usize]) -> Balance {
    let quick = ctx.quick;
    let mut b = Balance {
        ns: ns.to_vec(),
        tput_secs: if quick { 2 } else { 4 },
        tput_cycles: if quick { 1 } else { 5 },
        multi_cycles: if quick { 1 } else { 3 },
        multi_threads: WRK_CONNS,
        reload_app: "warm 1 s, gate".into(),
        reload_n: 2,
        reload_threads: 8,
        reload_per_run: if quick { 1 } else { 3 },
        reload_tail_s: TAIL_S,
        cpu_work_ms: 2.0,
        cpu_conc: 8,
        cpu_secs: if quick { 3.0 } else { 8.0 },
        ..Default::default()
    };
    let tsrc = sources(16, 12);
    let esrc: Vec<Ipv4Addr> = (0..WRK_CONNS as u32).map(|i| Ipv4Addr::from(0x7f00_0002 + i)).collect();
    let csrc = sources(b.cpu_conc, 7);
    b.tput_sources = tsrc.iter().map(|a| a.to_string()).collect();
    b.even_sources = esrc.iter().map(|a| a.to_string()).collect();
    b.cpu_sources = csrc.iter().map(|a| a.to_string()).collect();
    b.wrk_args = format!("wrk -t1 -c{WRK_CONNS} -d{}s", b.tput_secs);
    let instant = App::Node { warm_ms: 0, mode: "gate" };

    // 1. Data path, every contender side by side, slices rotated every cycle.
    for &n in ns {
        b.loads.push((format!("data path N={n}"), loadavg()));
        log(&format!("balance N={n}: starting limit, herdsman shared/steer/sticky and PM2 side by side"));
        let servers: Vec<(Contender, Server, Option<String>)> = CONTENDERS
            .iter()
            .filter_map(|c| start_c(ctx, *c, &instant, n).map(|(s, m)| (*c, s, m)))
            .collect();
        for (_, s, _) in &servers {
            let _ = wrk(&s.addr, true, 1, WRK_CONNS);
            let _ = wrk(&s.addr, false, 1, WRK_CONNS);
        }
        for (client, cycles) in CLIENTS.into_iter().zip([b.tput_cycles, b.multi_cycles, b.multi_cycles]) {
            for cycle in 0..cycles {
                for keep_alive in [true, false] {
                    let mut got: BTreeMap<&str, f64> = BTreeMap::new();
                    let mut line = String::new();
                    for i in 0..servers.len() {
                        let (c, s, metrics) = &servers[(i + cycle) % servers.len()];
                        let scraper = metrics.as_deref().map(Scraper::start);
                        let res = match client {
                            "wrk" => wrk(&s.addr, keep_alive, b.tput_secs, WRK_CONNS),
                            "multi" => Ok(multi(&s.addr, keep_alive, b.tput_secs, b.multi_threads, &tsrc)),
                            _ => Ok(multi(&s.addr, keep_alive, b.tput_secs, b.multi_threads, &esrc)),
                        };
                        if let Some(sc) = scraper {
                            let (ok, failed) = sc.stop();
                            b.scrapes.0 += ok;
                            b.scrapes.1 += failed;
                        }
                        match res {
                            Ok((rps, errors)) => {
                                line += &format!(" {} {rps:.0}", c.label);
                                got.insert(c.label, rps);
                                let row = row_for(&mut b.tput, n, keep_alive, client, c.label);
                                row.rps.push(rps);
                                row.errors.push(errors);
                            }
                            Err(e) => log(&format!("  {client} failed: {e}")),
                        }
                    }
                    log(&format!(
                        "  N={n} {client} cycle {}/{cycles} {}:{line} req/s",
                        cycle + 1,
                        if keep_alive { "keep-alive" } else { "new conn" }
                    ));
                    if let Some(limit) = got.get("limit").copied() {
                        for (label, r) in &got {
                            row_for(&mut b.tput, n, keep_alive, client, label).ratio.push(r / limit);
                        }
                    }
                }
            }
        }
        drop(servers);
    }

    // 2. Reloads of the warming app (listens first, 503 while warming), the reload section's
    //    load (8 closed-loop clients from 127.0.0.1), one run of `reload_per_run` reloads each.
    let warm = App::Node { warm_ms: 1000, mode: "gate" };
    b.loads.push(("reloads".into(), loadavg()));
    for ka in [true, false] {
        for c in CONTENDERS.iter().filter(|c| c.kind != Kind::Limit && !c.metrics) {
            let mode = if ka { "keep-alive" } else { "new conn" };
            log(&format!("balance reload: {} {} N={} {mode}", c.label, b.reload_app, b.reload_n));
            let out = match reload_run(
                ctx,
                c.kind,
                c.balance,
                &warm,
                b.reload_n,
                ka,
                b.reload_per_run,
                b.reload_threads,
            ) {
                Ok(o) => o,
                Err(e) => {
                    log(&format!("  failed: {e}"));
                    continue;
                }
            };
            let mut cell = ReloadCell::new(c.kind, &b.reload_app, b.reload_n, ka);
            analyse(&mut cell, &out);
            log(&format!(
                "  {} requests, failed per reload {:?} (no retry {:?}), steady failed {}",
                out.recs.len(),
                cell.failed,
                cell.failed_noretry,
                cell.steady_failed
            ));
            b.reloads.push(BReload { label: c.label.to_string(), cell });
        }
    }

    // 3. CPU-bound endpoint, fixed concurrency, one contender at a time. Every contender gets
    //    the clients bound to `cpu_conc` distinct addresses; steer and sticky also from
    //    127.0.0.1 alone (what sticky does with one client address).
    let path = format!("/work?ms={}", b.cpu_work_ms);
    for &n in ns {
        b.loads.push((format!("CPU-bound N={n}"), loadavg()));
        let mut plan: Vec<(Contender, bool)> = CONTENDERS
            .iter()
            .filter(|c| !c.metrics && c.label != "limit again")
            .map(|c| (*c, true))
            .collect();
        plan.extend(
            CONTENDERS.iter().filter(|c| matches!(c.balance, Some("steer" | "sticky"))).map(|c| (*c, false)),
        );
        for (c, bound) in plan {
            let Some((s, _)) = start_c(ctx, c, &instant, n) else { continue };
            sleep_ms(300);
            let src: Vec<Ipv4Addr> = if bound { csrc.clone() } else { vec![] };
            let opts = Opts { path: path.clone(), sources: src, pids: true };
            // Warm-up (JIT), then the measured run.
            drop(load::run(&s.addr, b.cpu_conc, false, Duration::from_secs(1), &opts));
            let recs = load::run(&s.addr, b.cpu_conc, false, Duration::from_secs_f64(b.cpu_secs), &opts);
            drop(s);
            let mut counts: BTreeMap<i32, u64> = BTreeMap::new();
            let mut lat = Vec::new();
            let mut failed = 0;
            for r in &recs {
                if r.outcome.failed() {
                    failed += 1;
                } else {
                    *counts.entry(r.pid).or_default() += 1;
                    lat.push(r.lat_us as f64 / 1000.0);
                }
            }
            let mut per_worker: Vec<u64> = counts.values().copied().collect();
            per_worker.sort_by(|a, b| b.cmp(a));
            per_worker.resize(per_worker.len().max(n), 0);
            let min_max = match (per_worker.first(), per_worker.last()) {
                (Some(&mx), Some(&mn)) if mx > 0 => mn as f64 / mx as f64,
                _ => 0.0,
            };
            let ok = lat.len() as u64;
            let (p50, p99, max) = lat_stats(lat);
            let row = CpuRow {
                n,
                label: c.label.to_string(),
                sources: if bound { csrc.len() } else { 1 },
                secs: b.cpu_secs,
                ok,
                failed,
                rps: ok as f64 / b.cpu_secs,
                per_worker,
                min_max,
                p50,
                p99,
                max,
            };
            log(&format!(
                "  cpu N={n} {} ({} address(es)): {:.0} req/s, per worker {:?} (min/max {:.2}), p50 {:.1} p99 {:.1} max {:.1} ms, {} failed",
                row.label, row.sources, row.rps, row.per_worker, row.min_max, row.p50, row.p99, row.max, row.failed
            ));
            b.cpu.push(row);
        }
    }
    b.loads.push(("end".into(), loadavg()));
    b
}

fn row_for<'a>(
    rows: &'a mut Vec<BTputRow>,
    n: usize,
    keep_alive: bool,
    client: &str,
    label: &str,
) -> &'a mut BTputRow {
    if let Some(i) = rows
        .iter()
        .position(|r| r.n == n && r.keep_alive == keep_alive && r.client == client && r.label == label)
    {
        return &mut rows[i];
    }
    rows.push(BTputRow {
        n,
        keep_alive,
        client: client.to_string(),
        label: label.to_string(),
        rps: vec![],
        ratio: vec![],
        errors: vec![],
    });
    rows.last_mut().expect("a row was just pushed")
}

/// GET /metrics every [`SCRAPE_EVERY`] on a thread of its own until stopped.
struct Scraper {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl Scraper {
    fn start(addr: &str) -> Scraper {
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let addr = addr.to_string();
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            loop {
                match load::get_path(&addr, "/metrics", Duration::from_secs(5)) {
                    Ok(body)
                        if body.contains("herdsman_build_info") && body.contains("bench_requests_total") =>
                    {
                        ok += 1
                    }
                    _ => failed += 1,
                }
                if rx.recv_timeout(SCRAPE_EVERY).is_ok() {
                    return (ok, failed);
                }
            }
        });
        Scraper { stop, thread }
    }

    /// (answered, failed) scrapes.
    fn stop(self) -> (u64, u64) {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or_default()
    }
}
