//! Issue 15: the metrics endpoint. Real scrapes over HTTP of a real supervisor with real
//! workers, parsed with the reference parsers (Python's `prometheus_client` for 0.0.4 and
//! OpenMetrics, `promtool check metrics`); counters that move when things happen; worker
//! pages merged, hung or garbage ones skipped and counted; supervision never waits for a
//! scrape.

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const LONG: Duration = Duration::from_secs(60);

fn wait_ready(control: &Path, n: u64) -> Value {
    wait_for(LONG, &format!("{n} ready worker(s)"), || try_status(control).filter(|s| s["ready"] == n))
}

/// `GET /metrics` with an optional `Accept`; (content type, body).
fn scrape(addr: &str, accept: Option<&str>) -> (String, String) {
    let mut c = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    c.set_read_timeout(Some(LONG)).unwrap();
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(c, "GET /metrics HTTP/1.1\r\nHost: t\r\n{accept}Connection: close\r\n\r\n").unwrap();
    let mut all = String::new();
    c.read_to_string(&mut all).expect("read the page");
    let (head, body) = all.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let ctype = head.lines().find_map(|l| l.strip_prefix("Content-Type: ")).unwrap_or_default().to_string();
    (ctype, body.to_string())
}

/// The page parsed by the reference parser: every sample.
fn parse(body: &str, format: &str) -> Vec<Value> {
    let script = format!("{}/tests/support/parse_metrics.py", env!("CARGO_MANIFEST_DIR"));
    let python =
        reference_python().expect("python3 with prometheus_client (apt install python3-prometheus-client)");
    let mut p = Command::new(python)
        .arg(script)
        .arg(format)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the {format} parser rejected the page: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

/// A python3 that has the reference parser, `prometheus_client`: the first on PATH (which may
/// be a pyenv one without it), else Debian's, where python3-prometheus-client puts it.
fn reference_python() -> Option<&'static str> {
    static FOUND: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        ["python3", SYSTEM_PYTHON].into_iter().find(|py| {
            Command::new(py)
                .args(["-c", "import prometheus_client"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    })
}

/// The reference parsers are build dependencies (`<!nocheck>` in debian/control; CI installs
/// them with `apt-get build-dep`), so the package build and CI always run the tests that use
/// them. Without them (a newcomer's `cargo test`) such a test says so and returns: true.
fn without_reference_parsers(test: &str) -> bool {
    let mut missing = Vec::new();
    if Command::new("promtool").arg("--version").output().is_err() {
        missing.push("promtool");
    }
    if reference_python().is_none() {
        missing.push("python3 with prometheus_client");
    }
    if missing.is_empty() {
        return false;
    }
    needs(
        test,
        &format!("needs {} (apt install prometheus python3-prometheus-client)", missing.join(" and ")),
    );
    true
}

fn promtool(body: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of sample `name` with exactly these labels.
fn value(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s["name"] == name
                && s["labels"].as_object().is_some_and(|l| {
                    l.len() == labels.len()
                        && labels.iter().all(|(k, v)| l.get(*k).and_then(Value::as_str) == Some(v))
                })
        })
        .and_then(|s| s["value"].as_f64())
}

type App = MetricsApp;

impl App {
    fn samples(&self) -> Vec<Value> {
        let (ctype, body) = scrape(&self.addr, None);
        assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
        parse(&body, "text")
    }

    /// Scrapes until `cond` holds on the parsed samples.
    fn wait(&self, what: &str, cond: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        wait_for(LONG, what, || {
            let s = self.samples();
            cond(&s).then_some(s)
        })
    }

    fn pid(&self, slot: u64) -> i32 {
        let s = try_status(&self.control).unwrap();
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == slot && w["state"] == "ready")
            .and_then(|w| w["pid"].as_i64())
            .expect("a ready worker in the slot") as i32
    }
}

#[test]
fn the_page_parses_with_the_reference_parsers_and_has_every_series_from_the_start() {
    if without_reference_parsers(
        "the_page_parses_with_the_reference_parsers_and_has_every_series_from_the_start",
    ) {
        return;
    }
    let app = App::start("metrics-page", 2, |r| r.worker_env("TW_METRICS", "ok"));
    let (_, body) = scrape(&app.addr, None);
    promtool(&body);
    let s = parse(&body, "text");
    let types: Vec<(String, String)> = s
        .iter()
        .map(|x| (x["family"].as_str().unwrap().to_string(), x["type"].as_str().unwrap().to_string()))
        .collect();
    for (fam, ty) in [
        ("herdsman_build_info", "gauge"),
        ("herdsman_generation", "gauge"),
        ("herdsman_workers", "gauge"),
        ("herdsman_desired_workers", "gauge"),
        ("herdsman_worker_restarts", "counter"),
        ("herdsman_worker_exits", "counter"),
        ("herdsman_reloads", "counter"),
        ("herdsman_reload_duration_seconds", "histogram"),
        ("herdsman_worker_start_seconds", "histogram"),
        ("herdsman_worker_resident_memory_bytes", "gauge"),
        ("herdsman_worker_cpu_seconds", "counter"),
        ("herdsman_worker_scrape_errors", "counter"),
        ("herdsman_listen_queue_length", "gauge"),
        ("herdsman_listen_queue_limit", "gauge"),
    ] {
        assert!(types.contains(&(fam.to_string(), ty.to_string())), "no {ty} {fam} in:\n{body}");
    }
    assert_eq!(value(&s, "herdsman_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));
    assert_eq!(value(&s, "herdsman_generation", &[]), Some(1.0));
    assert_eq!(value(&s, "herdsman_desired_workers", &[]), Some(2.0));
    assert_eq!(value(&s, "herdsman_workers", &[("state", "ready")]), Some(2.0));
    assert_eq!(value(&s, "herdsman_workers", &[("state", "starting")]), Some(0.0));
    assert_eq!(value(&s, "herdsman_workers", &[("state", "draining")]), Some(0.0));
    for w in ["0", "1"] {
        assert_eq!(value(&s, "herdsman_worker_restarts_total", &[("worker", w)]), Some(0.0), "{body}");
        for reason in ["exit", "signal", "watchdog", "memory"] {
            let l = [("worker", w), ("reason", reason)];
            assert_eq!(value(&s, "herdsman_worker_exits_total", &l), Some(0.0), "{body}");
        }
        assert!(value(&s, "herdsman_worker_resident_memory_bytes", &[("worker", w)]).unwrap() > 0.0);
        assert!(value(&s, "herdsman_worker_cpu_seconds_total", &[("worker", w)]).is_some());
        assert_eq!(value(&s, "herdsman_worker_scrape_errors_total", &[("worker", w)]), Some(0.0));
        // The worker's own families, merged: its labels plus worker="ID".
        assert_eq!(value(&s, "tw_requests_total", &[("path", "/"), ("worker", w)]), Some(7.0), "{body}");
        assert_eq!(value(&s, "tw_latency_seconds_count", &[("worker", w)]), Some(4.0));
    }
    assert_eq!(value(&s, "herdsman_reloads_total", &[("result", "ok")]), Some(0.0));
    assert_eq!(value(&s, "herdsman_reloads_total", &[("result", "failed")]), Some(0.0));
    assert_eq!(value(&s, "herdsman_worker_start_seconds_count", &[]), Some(2.0));
    let q = s.iter().find(|x| x["name"] == "herdsman_listen_queue_limit").expect("a listen queue limit");
    assert!(q["labels"]["socket"].as_str().unwrap().starts_with("unix:"), "{q}");
    assert!(q["value"].as_f64().unwrap() >= 1.0);
    assert_eq!(body.matches("# TYPE tw_requests_total counter").count(), 1, "one TYPE per family:\n{body}");
    // herdsman's own families come first.
    assert!(body.find("tw_requests_total").unwrap() > body.find("herdsman_listen_queue_limit").unwrap());

    // OpenMetrics when asked for, valid for the strict parser.
    let (ctype, om) = scrape(&app.addr, Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"));
    assert!(ctype.starts_with("application/openmetrics-text; version=1.0.0"), "{ctype}");
    assert!(om.ends_with("# EOF\n"));
    let s = parse(&om, "openmetrics");
    assert_eq!(value(&s, "herdsman_worker_restarts_total", &[("worker", "0")]), Some(0.0), "{om}");
    assert_eq!(value(&s, "tw_requests_total", &[("path", "/"), ("worker", "1")]), Some(7.0), "{om}");

    // The same page through the control socket.
    let out = Command::new(BIN).arg("metrics").arg(&app.control).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let s = parse(&text, "text");
    assert_eq!(value(&s, "tw_worker_pid", &[("worker", "0")]), Some(app.pid(0) as f64));

    // status shows the address.
    let out = Command::new(BIN).arg("status").arg(&app.control).output().unwrap();
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(human.contains(&format!("metrics: http://{}/metrics", app.addr)), "{human}");
    drop(app.h);
}

#[test]
fn counters_move_for_a_killed_worker_a_failed_and_a_good_reload_and_the_socket_file_goes() {
    if without_reference_parsers(
        "counters_move_for_a_killed_worker_a_failed_and_a_good_reload_and_the_socket_file_goes",
    ) {
        return;
    }
    let dir_flag = TempDir::new("metrics-break");
    let broken = dir_flag.path("broken");
    let app = App::start("metrics-moves", 2, |r| {
        r.worker_env("TW_METRICS", "ok").worker_env("TW_BREAK_FILE", broken.to_str().unwrap())
    });
    let first = app.samples();
    assert_eq!(
        value(&first, "herdsman_worker_exits_total", &[("worker", "0"), ("reason", "signal")]),
        Some(0.0)
    );

    // A SIGKILLed worker: an exit by signal, a restart, and its socket file removed.
    let info = app.h.distinct_workers(2);
    let w0 = info.iter().find(|w| w["worker_id"] == 0).unwrap();
    let sock = w0["env"]["HERDSMAN_METRICS_SOCKET"].as_str().expect("HERDSMAN_METRICS_SOCKET").to_string();
    assert!(sock.contains("metrics-"), "{sock}");
    let other = info.iter().find(|w| w["worker_id"] == 1).unwrap();
    assert_ne!(other["env"]["HERDSMAN_METRICS_SOCKET"], w0["env"]["HERDSMAN_METRICS_SOCKET"]);
    wait_for(LONG, "the worker to bind its metrics socket", || Path::new(&sock).exists().then_some(()));
    let pid = w0["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let s = app.wait("a signal exit and a restart of worker 0", |s| {
        value(s, "herdsman_worker_exits_total", &[("worker", "0"), ("reason", "signal")]) == Some(1.0)
            && value(s, "herdsman_worker_restarts_total", &[("worker", "0")]) == Some(1.0)
    });
    assert_eq!(value(&s, "herdsman_worker_restarts_total", &[("worker", "1")]), Some(0.0));
    assert!(!Path::new(&sock).exists(), "the dead worker's socket file {sock} is still there");
    wait_ready(&app.control, 2);

    // A failed reload.
    std::fs::write(&broken, "x").unwrap();
    let out = Command::new(BIN).arg("reload").arg(&app.control).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    // Scrapes within a second share one page: wait for one built after the reload.
    let s = app.wait("the failed reload counted", |s| {
        value(s, "herdsman_reloads_total", &[("result", "failed")]) == Some(1.0)
    });
    assert_eq!(value(&s, "herdsman_reloads_total", &[("result", "ok")]), Some(0.0));
    assert_eq!(value(&s, "herdsman_reload_duration_seconds_count", &[]), Some(1.0));

    // A good reload.
    std::fs::remove_file(&broken).unwrap();
    let out = Command::new(BIN).arg("reload").arg(&app.control).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = app.wait("the good reload counted", |s| {
        value(s, "herdsman_reloads_total", &[("result", "ok")]) == Some(1.0)
    });
    assert_eq!(value(&s, "herdsman_reload_duration_seconds_count", &[]), Some(2.0));
    // The failed reload used generation 2: the good one runs 3, as `status` says.
    let status_gen = try_status(&app.control).unwrap()["generation"].as_f64();
    assert_eq!(value(&s, "herdsman_generation", &[]), status_gen);
    assert_eq!(status_gen, Some(3.0));
    // The replaced workers exited after the stop signal: normal exits, not restarts.
    let s = app.wait("the old workers' exits", |s| {
        ["0", "1"].iter().all(|w| {
            value(s, "herdsman_worker_exits_total", &[("worker", w), ("reason", "exit")]) >= Some(1.0)
        })
    });
    assert_eq!(value(&s, "herdsman_worker_restarts_total", &[("worker", "1")]), Some(0.0));
}

#[test]
fn a_watchdog_replacement_is_counted_as_such() {
    if without_reference_parsers("a_watchdog_replacement_is_counted_as_such") {
        return;
    }
    let dir = TempDir::new("metrics-wd-flag");
    let hang = dir.path("hang");
    let app = App::start("metrics-wd", 2, |r| {
        r.arg("--watchdog")
            .arg("1s")
            .worker_env("TW_WATCHDOG", "1")
            .worker_env("TW_FAULT_WORKER", "1")
            .worker_env("TW_HANG_AFTER_MS", "1500")
            .worker_env("TW_HANG_ONCE_FILE", hang.to_str().unwrap())
    });
    app.wait("a watchdog exit of worker 1", |s| {
        value(s, "herdsman_worker_exits_total", &[("worker", "1"), ("reason", "watchdog")]) == Some(1.0)
            && value(s, "herdsman_worker_exits_total", &[("worker", "1"), ("reason", "signal")]) == Some(0.0)
    });
}

#[test]
fn a_memory_replacement_is_counted_as_such() {
    if without_reference_parsers("a_memory_replacement_is_counted_as_such") {
        return;
    }
    let dir = TempDir::new("metrics-mem-flag");
    let alloc = dir.path("alloc");
    let app = App::start("metrics-mem", 1, |r| {
        r.arg("--max-memory")
            .arg("100M")
            .worker_env("TW_ALLOC_MB", "200")
            .worker_env("TW_ALLOC_ONCE_FILE", alloc.to_str().unwrap())
    });
    app.wait("a memory exit of worker 0", |s| {
        value(s, "herdsman_worker_exits_total", &[("worker", "0"), ("reason", "memory")]) == Some(1.0)
    });
}

#[test]
fn a_worker_hanging_on_its_metrics_socket_costs_the_scrape_only_its_timeout() {
    if without_reference_parsers("a_worker_hanging_on_its_metrics_socket_costs_the_scrape_only_its_timeout") {
        return;
    }
    let app = App::start("metrics-hang", 2, |r| {
        r.worker_env("TW_METRICS", "hang").worker_env("TW_METRICS_ONLY", "1")
    });
    // While scrapes wait on the hung worker, supervision goes on: status answers and a
    // killed worker is replaced.
    let addr = app.addr.clone();
    let scraper = std::thread::spawn(move || {
        let started = Instant::now();
        let (_, body) = scrape(&addr, None);
        (started.elapsed(), body)
    });
    let pid = app.pid(0);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for(LONG, "worker 0 replaced", || {
        try_status(&app.control).filter(|s| s["ready"] == 2 && s["workers"][0]["pid"] != pid)
    });
    let (took, body) = scraper.join().unwrap();
    // Generous: the worker timeout is 2 s; the bound only proves the scrape did not wait for
    // the hung worker (which never answers).
    assert!(took < Duration::from_secs(30), "scrape took {took:?}");
    let s = parse(&body, "text");
    let s = if value(&s, "herdsman_worker_scrape_errors_total", &[("worker", "1")]) >= Some(1.0) {
        s
    } else {
        // Scrapes within a second share one page: wait for one built after the count.
        app.wait("the hung worker's scrape error counted", |s| {
            value(s, "herdsman_worker_scrape_errors_total", &[("worker", "1")]) >= Some(1.0)
        })
    };
    assert!(value(&s, "herdsman_worker_scrape_errors_total", &[("worker", "1")]) >= Some(1.0), "{body}");
    // Worker 0 was killed during that scrape: under load its page was still being read then,
    // and failed once (seen inside dpkg-buildpackage); never more.
    let errors0 = value(&s, "herdsman_worker_scrape_errors_total", &[("worker", "0")]);
    assert!(matches!(errors0, Some(n) if n <= 1.0), "{errors0:?}\n{body}");
    assert!(value(&s, "tw_worker_pid", &[("worker", "1")]).is_none());
}

#[test]
fn garbage_from_a_worker_is_skipped_and_counted() {
    if without_reference_parsers("garbage_from_a_worker_is_skipped_and_counted") {
        return;
    }
    let app = App::start("metrics-garbage", 2, |r| {
        r.worker_env("TW_METRICS", "garbage").worker_env("TW_METRICS_ONLY", "0")
    });
    let (_, body) = scrape(&app.addr, None);
    promtool(&body);
    let s = parse(&body, "text");
    assert_eq!(value(&s, "herdsman_worker_scrape_errors_total", &[("worker", "0")]), Some(1.0), "{body}");
    assert_eq!(value(&s, "herdsman_worker_scrape_errors_total", &[("worker", "1")]), Some(0.0));
    assert!(value(&s, "tw_worker_pid", &[("worker", "1")]).is_some());
    assert!(value(&s, "tw_worker_pid", &[("worker", "0")]).is_none());
    assert!(!body.contains("html"));
    // Counted once per page built (requests within a second of a build share its page).
    app.wait("a second skipped page counted", |s| {
        value(s, "herdsman_worker_scrape_errors_total", &[("worker", "0")]) == Some(2.0)
    });
}

#[test]
fn a_slow_scraper_does_not_stall_supervision() {
    if without_reference_parsers("a_slow_scraper_does_not_stall_supervision") {
        return;
    }
    let app = App::start("metrics-slow", 1, |r| r);
    // Connections that never send a request, and one that never reads its page.
    let idle: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(&app.addr).unwrap()).collect();
    let mut lazy = TcpStream::connect(&app.addr).unwrap();
    lazy.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let pid = app.pid(0);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for(LONG, "worker 0 replaced", || {
        try_status(&app.control).filter(|s| s["ready"] == 1 && s["workers"][0]["pid"] != pid)
    });
    // Another scraper is still served (a page built within the last second is shared: wait
    // for one built after the restart).
    app.wait("the restart counted", |s| {
        value(s, "herdsman_worker_restarts_total", &[("worker", "0")]) == Some(1.0)
    });
    drop(idle);
}

#[test]
fn a_bad_metrics_address_is_a_config_error() {
    let out = Command::new(BIN)
        .args(["run", "--listen", "127.0.0.1:0", "--metrics", "nowhere", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--metrics") && err.contains("127.0.0.1:9464"), "{err}");
    let dir = TempDir::new("metrics-badcfg");
    let cfg = dir.path("app.toml");
    std::fs::write(
        &cfg,
        "command = [\"true\"]\nlisten = [\"127.0.0.1:0\"]\nmetrics = \"unix:relative.sock\"\n",
    )
    .unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key `metrics`"), "{err}");
}

#[test]
fn a_config_may_not_set_herdsman_metrics_socket() {
    let out = Command::new(BIN)
        .args(["run", "--listen", "127.0.0.1:0", "-e", "HERDSMAN_METRICS_SOCKET=/tmp/x", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HERDSMAN_METRICS_SOCKET"));
}

// Issue 22 (items 3, 6, 7): what a worker can put in herdsman's runtime directory or on its
// page must not make herdsman read, delete or publish anything else.

/// A world-readable scratch directory with a copy of the test worker (a worker running as
/// `nobody` may not be able to enter the checkout) and a runtime directory of its own
/// (`RUNTIME_DIRECTORY`: the worker sockets' and notify socket's home).
struct Stage {
    _dir: TempDir,
    worker: String,
    runtime: std::path::PathBuf,
}

impl Stage {
    fn new(tag: &str) -> Stage {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new(tag);
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        let worker = dir.path("worker.py");
        std::fs::copy(worker_py(), &worker).unwrap();
        std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o644)).unwrap();
        let runtime = dir.path("rt");
        std::fs::create_dir(&runtime).unwrap();
        Stage { worker: worker.display().to_string(), runtime, _dir: dir }
    }

    /// `run` with this runtime directory and, as root, its workers running as `nobody`.
    fn run(&self, run: Run) -> Run {
        // herdsman and so its workers start here: `nobody` may not enter the checkout.
        let run = run.env("RUNTIME_DIRECTORY", self.runtime.to_str().unwrap()).cwd(&self._dir.0);
        let run = if nix::unistd::geteuid().is_root() { run.arg("--user").arg("nobody") } else { run };
        run.arg("--").arg("/usr/bin/python3").arg(&self.worker)
    }

    /// The directory of the sockets of `nobody`'s workers.
    fn nobody_dir(&self) -> std::path::PathBuf {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("user nobody");
        self.runtime.join(format!("metrics-u{}", nobody.uid))
    }
}

fn skip_unless_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    needs(test, "needs root (its worker runs as nobody)");
    true
}

/// A unix socket only root may use, answering every connection with a metrics page (and
/// counting them), as a root-only service would.
struct Secret {
    path: std::path::PathBuf,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _dir: TempDir,
}

impl Secret {
    fn serve() -> Secret {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("metrics-secret");
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path("secret.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = connections.clone();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => req.extend_from_slice(&b[..k]),
                    }
                }
                let body = "# TYPE root_secret gauge\nroot_secret 42\n";
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Secret { path, connections, _dir: dir }
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn a_worker_linking_its_metrics_socket_to_a_root_only_socket_gets_nothing_published() {
    if skip_unless_root("a_worker_linking_its_metrics_socket...") {
        return;
    }
    let secret = Secret::serve();
    let stage = Stage::new("metrics-link");
    // Worker 0 puts a symbolic link to the root-only socket where its socket should be.
    let app = App::start("metrics-link", 2, |r| {
        stage.run(
            r.worker_env("TW_METRICS", "link")
                .worker_env("TW_METRICS_ONLY", "0")
                .worker_env("TW_METRICS_LINK", secret.path.to_str().unwrap()),
        )
    });
    let s = app.wait("worker 0's page refused (or the secret published)", |s| {
        value(s, "herdsman_worker_scrape_errors_total", &[("worker", "0")]) >= Some(1.0)
            || s.iter().any(|x| x["name"] == "root_secret")
    });
    assert!(!s.iter().any(|x| x["name"] == "root_secret"), "a root-only socket was published: {s:?}");
    assert_eq!(secret.connections(), 0, "herdsman connected to the root-only socket");
    // The honest worker's page is still merged.
    assert!(value(&s, "tw_worker_pid", &[("worker", "1")]).is_some());
}

#[test]
fn a_private_worker_socket_is_read_without_dac_override_and_given_back() {
    use std::os::unix::fs::MetadataExt;
    if skip_unless_root("a_private_worker_socket...") {
        return;
    }
    if without_reference_parsers("a_private_worker_socket_is_read_without_dac_override_and_given_back") {
        return;
    }
    // herdsman as root without CAP_DAC_OVERRIDE (as the shipped unit): the worker's 0700 socket
    // can only be reached by taking the file (CAP_CHOWN), which herdsman gives back.
    let stage = Stage::new("metrics-private");
    let dir = TempDir::new("metrics-private-app");
    let run = stage.run(
        Run::new(&dir, 1)
            .arg("--metrics")
            .arg("127.0.0.1:0")
            .arg("--ready")
            .arg("notify")
            .worker_env("TW_NOTIFY", "1")
            .worker_env("TW_METRICS", "private"),
    );
    let mut cmd = Command::new("setpriv");
    cmd.args(["--inh-caps=-dac_override,-dac_read_search,-fowner"])
        .args(["--bounding-set=-dac_override,-dac_read_search,-fowner", BIN])
        .args(&run.args);
    for (k, v) in &run.env {
        cmd.env(k, v);
    }
    if let Some(cwd) = &run.cwd {
        cmd.current_dir(cwd);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.env_remove("NOTIFY_SOCKET").env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
    let mut child = cmd.spawn().unwrap();
    let stderr = capture(child.stderr.take().unwrap(), true);
    let stdout = capture(child.stdout.take().unwrap(), false);
    let h = Herdsman { child: Some(child), stderr, stdout, addr: run.addr };
    let control = dir.path("control.sock");
    let st = wait_ready(&control, 1);
    let addr = st["metrics"].as_str().unwrap().to_string();
    let sock = wait_for(LONG, "the worker's socket", || {
        std::fs::read_dir(stage.nobody_dir())
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "sock"))
    });
    let s = wait_for(LONG, "worker 0's page", || {
        let s = parse(&scrape(&addr, None).1, "text");
        value(&s, "tw_worker_pid", &[("worker", "0")]).is_some().then_some(s)
    });
    assert_eq!(value(&s, "herdsman_worker_scrape_errors_total", &[("worker", "0")]), Some(0.0));
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(
        (m.uid(), m.mode() & 0o777),
        (nobody.uid.as_raw(), 0o700),
        "the worker's socket changed hands"
    );
    drop(h);
}

/// `nobody`'s `metrics-uUID/` in the stage's runtime directory, made as herdsman makes it
/// (root's, group nogroup, 0770: the worker may put anything in it).
fn planted_dir(stage: &Stage) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = stage.nobody_dir();
    std::fs::create_dir(&d).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    std::os::unix::fs::chown(&d, None, Some(nobody.gid.as_raw())).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o770)).unwrap();
    d
}

#[test]
fn a_link_a_worker_planted_in_its_socket_directory_is_not_followed_at_start() {
    if skip_unless_root("a_link_a_worker_planted...") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let stage = Stage::new("metrics-plant");
    // A root-only directory holding a file named like a dead supervisor's worker socket, and a
    // link to it where a worker of the last run could put one.
    let secret = TempDir::new("metrics-plant-secret");
    std::fs::set_permissions(&secret.0, std::fs::Permissions::from_mode(0o700)).unwrap();
    let victim = secret.path("metrics-2147483000-0-0.sock");
    drop(std::os::unix::net::UnixListener::bind(&victim).unwrap());
    let d = planted_dir(&stage);
    std::os::unix::fs::symlink(&secret.0, d.join("metrics-u1")).unwrap();
    let app = App::start("metrics-plant", 1, |r| stage.run(r.worker_env("TW_METRICS", "ok")));
    wait_ready(&app.control, 1);
    assert!(std::fs::symlink_metadata(&victim).is_ok(), "herdsman removed a file in a root-only directory");
    assert!(std::fs::symlink_metadata(d.join("metrics-u1")).is_err(), "the planted link is still there");
}

#[test]
fn links_to_dot_in_a_workers_socket_directory_do_not_hang_the_start() {
    if skip_unless_root("links_to_dot...") {
        return;
    }
    let stage = Stage::new("metrics-dots");
    let d = planted_dir(&stage);
    for name in ["metrics-u1", "metrics-u2", "metrics-u3"] {
        std::os::unix::fs::symlink(".", d.join(name)).unwrap();
    }
    let app = App::start("metrics-dots", 1, |r| stage.run(r.worker_env("TW_METRICS", "ok")));
    let s = app.wait("worker 0's page", |s| value(s, "tw_worker_pid", &[("worker", "0")]).is_some());
    assert_eq!(value(&s, "herdsman_worker_scrape_errors_total", &[("worker", "0")]), Some(0.0));
}

#[test]
fn the_runtime_directory_is_left_empty_at_exit() {
    if skip_unless_root("the_runtime_directory_is_left_empty_at_exit") {
        return;
    }
    let stage = Stage::new("metrics-exit");
    let mut app = App::start("metrics-exit", 2, |r| stage.run(r.worker_env("TW_METRICS", "ok")));
    let d = stage.nobody_dir();
    wait_for(LONG, "both workers' sockets", || (std::fs::read_dir(&d).ok()?.count() == 2).then_some(()));
    // What a worker may leave behind.
    std::os::unix::fs::symlink("/", d.join("junk")).unwrap();
    assert_eq!(app.h.stop().code(), Some(0));
    let left: Vec<_> = std::fs::read_dir(&stage.runtime).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left in the runtime directory: {left:?}");
}

/// A worker page that tries to break or forge the merged page: its own `exported_worker`
/// beside `worker`, Prometheus's `__*` labels, series rendered with herdsman's prefix, the
/// same series twice, and names another family of the page already has.
const FORGED_PAGE: &str = "\
# HELP forged Forged.
# TYPE forged gauge
forged{worker=\"a\"} 1
forged{exported_worker=\"a\"} 2
forged{worker=\"b\",exported_worker=\"c\"} 3
forged{__name__=\"herdsman_generation\"} 4
forged{__meta_x=\"1\",path=\"/\"} 5
# HELP herdsman_worker_restarts_total Forged.
# TYPE herdsman_worker_restarts_total untyped
herdsman_worker_restarts_total{worker=\"0\"} 99
# HELP herdsman Forged.
# TYPE herdsman counter
herdsman 1
# HELP herdsman_build_info Forged.
# TYPE herdsman_build_info gauge
herdsman_build_info{version=\"forged\"} 1
# HELP dup Twice.
# TYPE dup gauge
dup 1
dup 2
# HELP lat Latency.
# TYPE lat histogram
lat_bucket{le=\"+Inf\"} 1
lat_sum 1
lat_count 1
# HELP lat_sum Forged.
# TYPE lat_sum gauge
lat_sum 3
";

/// No two samples of `samples` are the same series.
fn assert_no_duplicates(samples: &[Value], page: &str) {
    let mut seen = std::collections::BTreeSet::new();
    for s in samples {
        let key = (s["name"].to_string(), s["labels"].to_string());
        assert!(seen.insert(key), "a series appears twice: {s}\n{page}");
    }
}

#[test]
fn a_forged_worker_page_neither_breaks_nor_forges_the_merged_page() {
    if without_reference_parsers("a_forged_worker_page_neither_breaks_nor_forges_the_merged_page") {
        return;
    }
    let stage = Stage::new("metrics-forged");
    let page = stage._dir.path("page.prom");
    std::fs::write(&page, FORGED_PAGE).unwrap();
    std::fs::set_permissions(&page, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let app = App::start("metrics-forged", 2, |r| {
        stage.run(
            r.worker_env("TW_METRICS", "file")
                .worker_env("TW_METRICS_ONLY", "0")
                .worker_env("TW_METRICS_FILE", page.to_str().unwrap()),
        )
    });
    let (_, body) = scrape(&app.addr, None);
    promtool(&body);
    let s = parse(&body, "text");
    assert_no_duplicates(&s, &body);
    // herdsman's own series are its own.
    let ours: Vec<&Value> =
        s.iter().filter(|x| x["name"].as_str().unwrap().starts_with("herdsman")).collect();
    assert!(ours.iter().all(|x| x["labels"].get("exported_worker").is_none()), "{body}");
    assert_eq!(value(&s, "herdsman_worker_restarts_total", &[("worker", "0")]), Some(0.0), "{body}");
    assert_eq!(value(&s, "herdsman_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));
    assert!(value(&s, "herdsman_build_info", &[("version", "forged"), ("worker", "0")]).is_none(), "{body}");
    assert!(!body.contains("herdsman_total"), "{body}");
    // No label of Prometheus's own.
    assert!(
        s.iter().all(|x| x["labels"].as_object().unwrap().keys().all(|k| !k.starts_with("__"))),
        "{body}"
    );
    // The worker's `worker` label is renamed past its own `exported_worker`: the first of two
    // series that come out the same stays.
    assert_eq!(value(&s, "forged", &[("exported_worker", "a"), ("worker", "0")]), Some(1.0), "{body}");
    let both = [("exported_exported_worker", "b"), ("exported_worker", "c"), ("worker", "0")];
    assert_eq!(value(&s, "forged", &both), Some(3.0), "{body}");
    assert_eq!(value(&s, "dup", &[("worker", "0")]), Some(1.0), "{body}");
    assert_eq!(value(&s, "lat_sum", &[("worker", "0")]), Some(1.0), "{body}");
    // The honest worker's page is all there.
    assert_eq!(value(&s, "tw_requests_total", &[("path", "/"), ("worker", "1")]), Some(7.0), "{body}");
    assert_eq!(value(&s, "herdsman_worker_scrape_errors_total", &[("worker", "0")]), Some(0.0), "{body}");

    let (_, om) = scrape(&app.addr, Some("application/openmetrics-text;version=1.0.0"));
    let s = parse(&om, "openmetrics");
    assert_no_duplicates(&s, &om);
    assert_eq!(value(&s, "forged", &[("exported_worker", "a"), ("worker", "0")]), Some(1.0), "{om}");
    assert_eq!(value(&s, "tw_requests_total", &[("path", "/"), ("worker", "1")]), Some(7.0), "{om}");
}

#[test]
fn a_runtime_directory_herdsman_made_is_gone_after_exit() {
    if skip_unless_root("a_runtime_directory_herdsman_made_is_gone_after_exit") {
        return;
    }
    // No RUNTIME_DIRECTORY: root's default, /run/herdsman/NAME, which herdsman makes.
    let stage = Stage::new("metrics-rundir");
    let name = format!("metrics-rundir-{}", std::process::id());
    let runtime = std::path::Path::new("/run/herdsman").join(&name);
    let _ = std::fs::remove_dir_all(&runtime);
    let dir = TempDir::new("metrics-rundir-app");
    let run = Run::new(&dir, 2)
        .arg("--name")
        .arg(&name)
        .arg("--ready")
        .arg("notify")
        .worker_env("TW_NOTIFY", "1")
        .worker_env("TW_METRICS", "ok")
        .arg("--user")
        .arg("nobody")
        .arg("--")
        .arg("/usr/bin/python3")
        .arg(&stage.worker);
    let mut args = run.args.clone();
    // (Run::new names every app `t`: this one has its own name, hence its own directory.)
    let at = args.iter().position(|a| a == "--name").unwrap();
    args.drain(at..at + 2);
    // Started in the stage: `nobody` may not enter the checkout.
    let mut h = Herdsman::spawn_in(&args, &[], run.addr, Some(&stage._dir.0));
    wait_ready(&dir.path("control.sock"), 2);
    let sockets =
        runtime.join(format!("metrics-u{}", nix::unistd::User::from_name("nobody").unwrap().unwrap().uid));
    wait_for(LONG, "both workers' sockets", || {
        (std::fs::read_dir(&sockets).ok()?.count() == 2).then_some(())
    });
    assert_eq!(h.stop().code(), Some(0));
    let left: Vec<_> =
        std::fs::read_dir(&runtime).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(!runtime.exists(), "{} is still there, with {left:?}", runtime.display());
}

#[test]
fn other_sockets_in_the_runtime_directory_are_left_alone_at_start_and_exit() {
    // What another supervisor sharing the directory has there: its control socket and its
    // workers' notify socket. Only worker metrics sockets are herdsman's to clean up.
    let stage = Stage::new("metrics-others");
    let control = stage.runtime.join("control.sock");
    let _control = std::os::unix::net::UnixListener::bind(&control).unwrap();
    let notify = stage.runtime.join(format!("notify-{}.sock", std::process::id()));
    let _notify = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    let mut app = App::start("metrics-others", 1, |r| stage.run(r.worker_env("TW_METRICS", "ok")));
    assert!(control.exists() && notify.exists(), "removed at start");
    assert_eq!(app.h.stop().code(), Some(0));
    assert!(control.exists() && notify.exists(), "removed at exit");
}
