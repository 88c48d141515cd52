//! `--from-pm2`: PM2 ecosystem files (tests/support/pm2/: two cluster apps with
//! `env_production`, as .js, .json and .yaml) run standalone and installed by `init`. Real
//! processes: the JavaScript file is evaluated by `node`, its apps are Node apps
//! (`process.send('ready')`); the JSON and YAML apps are the Python test worker (no node needed).

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::*;

fn fixture(name: &str) -> String {
    format!("{}/tests/support/pm2/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// True (after one SKIP line) when `node` is not installed.
fn no_node(test: &str) -> bool {
    let ok = have("node");
    if !ok {
        support::skip(test, "needs node (apt install nodejs)");
    }
    !ok
}

/// `herdsman run --from-pm2 FILE --only api --env production` on a unix socket in `dir`.
fn run_api(dir: &TempDir, file: &str, extra: &[&str]) -> Herdsman {
    let addr = Addr::Unix(dir.path("api.sock"));
    let mut args: Vec<String> =
        ["run", "--from-pm2", file, "--only", "api", "--env", "production", "--listen"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.push(format!("api={}", addr.listen_arg()));
    args.extend(["--control".to_string(), dir.path("control.sock").display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Herdsman::spawn(&args, &[], addr)
}

/// `herdsman ARGS` to its end: (exit code, stdout, stderr).
fn herdsman(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).env_remove("SUDO_USER").output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn canonical(p: &str) -> PathBuf {
    std::fs::canonicalize(p).unwrap()
}

#[test]
fn run_from_pm2_js_runs_the_apps_workers_with_env_production_and_wait_ready_as_notify() {
    if no_node("run_from_pm2_js_runs_the_apps_workers_with_env_production_and_wait_ready_as_notify") {
        return;
    }
    let dir = TempDir::new("pm2-js");
    let gate = dir.path("ready");
    let ready_file = format!("READY_FILE={}", gate.display());
    let mark = format!("EXIT_MARK={}", dir.path("exit").display());
    // A stop timeout no load can reach (the flag over the file's kill_timeout).
    let extra = ["-e", &ready_file, "-e", &mark, "--stop-timeout", "5m"];
    let mut h = run_api(&dir, &fixture("ecosystem.config.js"), &extra);
    // A worker answers (it listens), yet is not ready: `wait_ready` is `ready = notify`, and
    // only process.send('ready') (sent once the gate file exists) makes it ready.
    let v = wait_for(STARTUP, "a worker answering", || get(&h.addr).ok());
    assert_eq!(v["env"]["GREETING"], "hello from production", "env_production over env: {v}");
    assert_eq!(v["env"]["SHARED"], "base", "env kept: {v}");
    assert_eq!(v["env"]["NODE_ENV"], "production");
    assert_eq!(v["env"]["READY_FILE"], gate.display().to_string(), "-e applies too");
    assert_eq!(v["argv"], serde_json::json!(["--role", "api"]));
    assert_eq!(canonical(v["cwd"].as_str().unwrap()), canonical(&fixture("")), "cwd: the file's directory");
    let st = h.status().unwrap();
    assert_eq!(st["name"], "api");
    assert_eq!(st["desired"], 2, "instances: 2");
    let w = st["workers"].as_array().unwrap().iter().find(|w| w["pid"] == v["pid"]).unwrap().clone();
    assert_ne!(w["state"], "ready", "ready before process.send('ready'): {st}");
    std::fs::write(&gate, "").unwrap();
    h.wait_generation(1);
    let seen = h.distinct_workers(2);
    assert!(seen.iter().all(|s| s["env"]["GREETING"] == "hello from production"));
    // shutdown_with_message: each worker is told 'shutdown' and exits 0 by itself.
    let pids: Vec<String> = seen.iter().map(|s| s["pid"].to_string()).collect();
    h.signal(libc::SIGTERM);
    assert!(h.wait_exit(std::time::Duration::from_secs(60)).success(), "{}", h.stderr());
    for pid in pids {
        let told = std::fs::read_to_string(dir.path(&format!("exit.{pid}"))).unwrap_or_default();
        assert_eq!(told, "shutdown 0", "worker {pid}");
    }
}

#[test]
fn run_from_pm2_json_and_yaml_run_the_app_with_env_production_merged() {
    for file in ["ecosystem.json", "ecosystem.yaml"] {
        let dir = TempDir::new("pm2-data");
        let h = run_api(&dir, &fixture(file), &[]);
        h.wait_started();
        let st = h.status().unwrap();
        assert_eq!((st["name"].as_str(), st["desired"].as_u64()), (Some("api"), Some(2)), "{file}: {st}");
        let seen = h.distinct_workers(2);
        for v in &seen {
            assert_eq!(v["tag"], "production", "{file}: {v}");
            // wait_ready: the worker is told where to notify (TW_NOTIFY sends READY=1 there).
            assert!(v["notify_socket"].is_string(), "{file}: {v}");
            assert_eq!(canonical(v["cwd"].as_str().unwrap()), canonical(&fixture("")), "{file}");
        }
    }
}

#[test]
fn init_from_pm2_dry_run_prints_both_configs_and_one_line_per_unmapped_key() {
    let mut files = vec!["ecosystem.json", "ecosystem.yaml"];
    if !no_node("init_from_pm2_dry_run_prints_both_configs_and_one_line_per_unmapped_key (.js)") {
        files.push("ecosystem.config.js");
    }
    for file in files {
        let dir = TempDir::new("pm2-dry");
        let (etc, units) = (dir.path("etc"), dir.path("units"));
        let (code, out, err) = herdsman(&[
            "init",
            "--from-pm2",
            &fixture(file),
            "--env",
            "production",
            "--dry-run",
            "--config-dir",
            etc.to_str().unwrap(),
            "--unit-dir",
            units.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{file}: {err}");
        for app in ["api", "web"] {
            assert!(out.contains(&format!("would write {}/{app}.toml", etc.display())), "{file}: {out}");
            assert!(out.contains(&format!("herdsman@{app}.socket.d/listen.conf")), "{file}: {out}");
            assert!(
                out.contains(&format!("would run: systemctl enable --now herdsman@{app}.socket")),
                "{out}"
            );
        }
        // PORT from each app's env is its socket's address.
        assert!(out.contains("ListenStream=8931\n") && out.contains("ListenStream=8932\n"), "{file}: {out}");
        assert!(out.contains("name = \"api\"") && out.contains("workers = 2\n"), "{file}: {out}");
        assert!(out.contains("ready = \"notify\""), "{file}: {out}");
        assert!(out.contains("stop_timeout = \"5s\""), "kill_timeout 5000: {file}: {out}");
        assert!(out.contains("max_memory = \"307200K\""), "300M: {file}: {out}");
        // Every unmapped key of `web`: one line each, none for `api` (all of its keys map).
        let keys: &[&str] = if file.ends_with(".js") {
            &[
                "autorestart",
                "cron_restart",
                "ignore_watch",
                "max_restarts",
                "merge_logs",
                "out_file",
                "watch",
            ]
        } else {
            &["autorestart", "cron_restart", "watch"]
        };
        for key in keys {
            let lines = err.lines().filter(|l| l.contains(&format!("app web: `{key}`:"))).count();
            assert_eq!(lines, 1, "{file}: `{key}`: {err}");
        }
        assert!(!err.contains("app api: `"), "{file}: {err}");
        assert!(!etc.exists() && !units.exists(), "--dry-run wrote nothing");
    }
}

#[test]
fn init_from_pm2_installs_each_app_as_init_does() {
    let dir = TempDir::new("pm2-init");
    let (etc, units) = (dir.path("etc"), dir.path("units"));
    let base = [
        "init",
        "--from-pm2",
        &fixture("ecosystem.yaml"),
        "--no-start",
        "--config-dir",
        etc.to_str().unwrap(),
        "--unit-dir",
        units.to_str().unwrap(),
    ];
    let mut args = base.to_vec();
    args.extend(["--only", "api", "--listen", "api=127.0.0.1:8931"]);
    let (code, _, err) = herdsman(&args);
    assert_eq!(code, 0, "{err}");
    assert!(!etc.join("web.toml").exists(), "--only api");
    let sock = std::fs::read_to_string(units.join("herdsman@api.socket.d/listen.conf")).unwrap();
    assert!(sock.contains("ListenStream=127.0.0.1:8931\n"), "--listen APP=ADDR: {sock}");
    // What init wrote is a config herdsman runs: check-config reads it back.
    let (code, out, err) = herdsman(&["check-config", etc.join("api.toml").to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("app api, 2 worker(s)"), "{out}");
    let text = std::fs::read_to_string(etc.join("api.toml")).unwrap();
    assert!(text.contains("TW_TAG = \"development\""), "no --env: env alone: {text}");
    // Installed already: nothing is installed again, not even the other app, without --force.
    let (code, _, err) = herdsman(&base);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("app api already exists") && err.contains("--force"), "{err}");
    assert!(!etc.join("web.toml").exists(), "nothing installed: {err}");
    let mut args = base.to_vec();
    args.push("--force");
    let (code, _, err) = herdsman(&args);
    assert_eq!(code, 0, "{err}");
    assert!(etc.join("web.toml").exists() && etc.join("api.toml").exists());
}

#[test]
fn bad_ecosystem_input_is_one_line_naming_the_problem_and_exit_78() {
    let dir = TempDir::new("pm2-bad");
    let write = |name: &str, text: &str| {
        let p = dir.path(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let two = write("two.json", r#"[{"name": "a", "script": "a.py"}, {"name": "b", "script": "b.py"}]"#);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["run".into(), "--from-pm2".into(), two.clone()], "name it with --only APP"),
        (vec!["run".into(), "--from-pm2".into(), two.clone(), "--only".into(), "a,b".into()], "runs one app"),
        (
            vec!["run".into(), "--from-pm2".into(), two.clone(), "--only".into(), "c".into()],
            "has no app c (its apps: a, b)",
        ),
        (
            vec!["init".into(), "--from-pm2".into(), two.clone(), "--dry-run".into()],
            "no address for herdsman@a.socket",
        ),
        (
            vec![
                "run".into(),
                "--from-pm2".into(),
                write("noscript.json", r#"{"apps": [{"name": "a"}]}"#),
                "--only".into(),
                "a".into(),
            ],
            "app a: no `script`",
        ),
        (
            vec![
                "run".into(),
                "--from-pm2".into(),
                write("inst.yaml", "apps:\n  - name: a\n    script: a.py\n    instances: lots\n"),
                "--only".into(),
                "a".into(),
            ],
            "`instances` must be a number of workers",
        ),
        (
            vec![
                "run".into(),
                "--from-pm2".into(),
                write("num.json", r#"{"apps": [7]}"#),
                "--only".into(),
                "a".into(),
            ],
            "apps[0] is a number",
        ),
        (vec!["init".into(), "--from-pm2".into(), write("e.toml", "")], "name it ecosystem.config.js"),
        // The second app's program does not exist: the first is not installed either.
        (
            vec![
                "init".into(),
                "--from-pm2".into(),
                write(
                    "second.json",
                    r#"[{"name": "a", "script": "a.py", "env": {"PORT": 81}}, {"name": "b", "script": "b", "interpreter": "no-such-interpreter", "env": {"PORT": 82}}]"#,
                ),
                "--no-start".into(),
                "--config-dir".into(),
                dir.path("etc").display().to_string(),
                "--unit-dir".into(),
                dir.path("units").display().to_string(),
            ],
            "app b: command not found: no-such-interpreter",
        ),
    ];
    assert!(!dir.path("etc").exists() && !dir.path("units").exists(), "a bad app installs nothing");
    // A JavaScript file without node (not on PATH): one line saying so, what to do, exit 78.
    let js = write("ecosystem.config.js", "module.exports = { apps: [] };");
    let out = Command::new(BIN)
        .args(["init", "--from-pm2", &js, "--dry-run"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("needs node, which is not installed") && err.lines().count() == 1, "{err}");
    // --only without a file is a usage error.
    for cmd in [&["run", "--only", "a"][..], &["init", "web", "--only", "a", "--", "true"][..]] {
        let (code, _, err) = herdsman(cmd);
        assert_eq!(code, 2, "{cmd:?}: {err}");
        assert!(err.contains("add --from-pm2 FILE") && err.lines().count() == 1, "{err}");
    }
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = herdsman(&args);
        assert_eq!(code, 78, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.starts_with("herdsman: ") && err.contains(needle), "{args:?}: {needle}: {err}");
    }
}
