//! herdsman's benchmark suite. `bench/run.sh` is the entry point; see docs/benchmarks.md.
//!
//! Subcommands:
//!   all [--quick] [--out DIR] [--only throughput,reload,cost,recovery,scaling,balance]
//!                                   run the sections, write DIR/benchmarks.md + DIR/bench-*.svg
//!   report RESULTS.json DIR         regenerate the report and plots from saved results
//!   launch --listen ADDR -w N -- CMD   the "limit": bind, fork N workers with the fd at 3, wait
//!   worker                          tiny instantly-ready worker (fd 3, READY=1)
//!   probe FILE                      writes CLOCK_MONOTONIC at main() (exec latency)
//!   load ADDR SECS THREADS ka|close one standalone load run, prints a summary

mod balance;
mod launcher;
mod load;
mod notes;
mod plot;
mod procfs;
mod report;
mod servers;
mod suites;
mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use procfs::loadavg;
use report::{Meta, Results};
use servers::Ctx;
use suites::log;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(|s| s.as_str()) {
        Some("launch") => launcher::launch(&args[1..]),
        Some("worker") => launcher::worker(),
        Some("probe") => launcher::probe(&args[1]),
        Some("load") => standalone_load(&args[1..]),
        Some("report") => {
            let r: Results = serde_json::from_str(&std::fs::read_to_string(&args[1]).expect("results file"))
                .expect("json");
            write_report(&r, Path::new(&args[2]));
            0
        }
        Some("all") => all(&args[1..]),
        _ => {
            eprintln!("usage: herdsman-bench all [--quick] [--out DIR] | report RESULTS DIR | launch | worker | load");
            2
        }
    };
    std::process::exit(code);
}

fn standalone_load(a: &[String]) -> i32 {
    let secs: u64 = a[1].parse().expect("load URL SECS THREADS ka|close: SECS a number");
    let threads: usize = a[2].parse().expect("load URL SECS THREADS ka|close: THREADS a number");
    let recs = load::run(&a[0], threads, a[3] == "ka", Duration::from_secs(secs), &load::Opts::default());
    let mut lat: Vec<f64> =
        recs.iter().filter(|r| !r.outcome.failed()).map(|r| r.lat_us as f64 / 1000.0).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let failed = recs.iter().filter(|r| r.outcome.failed()).count();
    println!(
        "{} requests ({:.0}/s), {failed} failed, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        recs.len(),
        recs.len() as f64 / secs as f64,
        util::pct(&lat, 50.0),
        util::pct(&lat, 99.0),
        lat.last().copied().unwrap_or(0.0)
    );
    0
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if s.is_empty() {
                s = String::from_utf8_lossy(&o.stderr).trim().to_string();
            }
            s
        })
        .unwrap_or_default()
}

fn all(a: &[String]) -> i32 {
    let quick = a.iter().any(|x| x == "--quick");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is inside the checkout")
        .to_path_buf();
    let out = a.iter().position(|x| x == "--out").map(|i| PathBuf::from(&a[i + 1])).unwrap_or_else(|| {
        if quick {
            root.join("bench/results/quick")
        } else {
            root.join("docs")
        }
    });
    let only: Vec<String> = a
        .iter()
        .position(|x| x == "--only")
        .map(|i| a[i + 1].split(',').map(String::from).collect())
        .unwrap_or_default();
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let work = std::env::temp_dir().join(format!("herdsman-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("cannot create the output directory");
    let ctx = Ctx::new(quick, root.clone(), work.clone());
    for p in [&ctx.herdsman, &ctx.pm2] {
        if !p.exists() {
            eprintln!("missing {}: run bench/run.sh", p.display());
            return 1;
        }
    }
    let t0 = Instant::now();
    let cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2");
    let meta = Meta {
        date: sh("date -u '+%Y-%m-%d %H:%M UTC'"),
        cpu: cpu.trim().to_string(),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        mem: sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo"),
        kernel: sh("uname -r"),
        os: sh(". /etc/os-release && echo \"$PRETTY_NAME\""),
        virt: sh("systemd-detect-virt 2>/dev/null || echo unknown"),
        node: sh("node --version"),
        pm2: sh(&format!("node -p \"require('{}/bench/.deps/node_modules/pm2/package.json').version\"", root.display())),
        wrk: sh("wrk -v 2>&1 | head -1 | cut -d' ' -f1-2"),
        rustc: sh("rustc --version | cut -d' ' -f1-2"),
        commit: sh(&format!(
            "cd '{}' && git rev-parse --short HEAD && (git diff --quiet HEAD -- src Cargo.toml || echo '(+ local changes)')",
            root.display()
        ))
        .replace('\n', " "),
        load_before: loadavg(),
        load_after: String::new(),
        quick,
        minutes: 0.0,
        notes: vec![],
    };
    log(&format!(
        "{} run, results to {}; load average {}",
        if quick { "quick" } else { "full" },
        out.display(),
        meta.load_before
    ));
    let mut r = Results { meta, ..Default::default() };
    let cpus = r.meta.cpus;
    let mut ns = vec![2, cpus];
    ns.sort();
    ns.dedup();
    if want("throughput") {
        r.tput = suites::throughput(&ctx, &ns);
    }
    if want("reload") {
        r.reloads = suites::reloads(&ctx);
    }
    if want("cost") {
        r.cost = suites::cost(&ctx);
    }
    if want("recovery") {
        r.recovery = suites::recovery(&ctx);
    }
    if want("scaling") {
        r.scaling = suites::scaling(&ctx);
    }
    if want("balance") {
        // N = 2 (the core count here: one worker per core) and 4 (oversubscribed: per-worker
        // queues matter most when a worker waits for a core).
        r.balance = balance::balance(&ctx, &[2, 4]);
    }
    if ctx.pm2_daemon_pid().is_some() {
        let _ = ctx.pm2_run(&["kill"]);
    }
    r.meta.load_after = loadavg();
    r.meta.minutes = t0.elapsed().as_secs_f64() / 60.0;
    let results_dir = if quick { root.join("bench/results/quick") } else { root.join("bench/results") };
    std::fs::create_dir_all(&results_dir).expect("cannot create the output directory");
    // A partial run (--only) keeps its own raw results next to the full run's.
    let rp = if only.is_empty() {
        results_dir.join("results.json")
    } else {
        results_dir.join(format!("results-{}.json", only.join("+")))
    };
    std::fs::write(&rp, serde_json::to_string_pretty(&r).expect("the results serialize"))
        .expect("cannot write the results");
    write_report(&r, &out);
    let _ = std::fs::remove_dir_all(&work);
    log(&format!(
        "done in {:.1} min: {} and {}",
        r.meta.minutes,
        out.join("benchmarks.md").display(),
        rp.display()
    ));
    for t in report::targets(&r).into_iter().chain(report::balance_targets(&r.balance)) {
        log(&format!("target: {} — {} — {}", t.0, t.1, if t.2 { "met" } else { "NOT met" }));
    }
    0
}

/// Writes DIR/benchmarks.md and the plots of the sections that were measured. Results with
/// only the balance section (`--only balance`) replace that section of an existing
/// DIR/benchmarks.md and leave the rest of the page (another run's figures) alone.
fn write_report(r: &Results, out: &Path) {
    std::fs::create_dir_all(out).expect("cannot create the output directory");
    let md = out.join("benchmarks.md");
    let only_balance = r.tput.rows.is_empty()
        && r.reloads.cells.is_empty()
        && r.cost.rows.is_empty()
        && r.recovery.rows.is_empty()
        && r.scaling.rows.is_empty();
    let page = match std::fs::read_to_string(&md) {
        Ok(old) if only_balance && !r.balance.is_empty() => report::splice_balance(&old, r),
        _ => report::markdown(r),
    };
    std::fs::write(&md, page).expect("cannot write the results");
    if !r.tput.rows.is_empty() {
        std::fs::write(out.join("bench-throughput.svg"), plot::throughput(&r.tput))
            .expect("cannot write the results");
    }
    if !r.reloads.timelines.is_empty() {
        std::fs::write(out.join("bench-reload.svg"), plot::timelines(&r.reloads.timelines))
            .expect("cannot write the results");
    }
    if !r.scaling.rows.is_empty() {
        std::fs::write(out.join("bench-scaling.svg"), plot::scaling(&r.scaling))
            .expect("cannot write the results");
    }
    if !r.balance.is_empty() {
        std::fs::write(out.join("bench-balance.svg"), plot::balance(&r.balance))
            .expect("cannot write the results");
    }
}
