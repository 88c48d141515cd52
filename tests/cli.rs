//! Bad input on the command line, in the config file and in the environment: one clear line
//! per problem, the documented exit code, never a panic.

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Output, Stdio};

use support::{BIN, TempDir};

const USAGE: i32 = 2;
const CONFIG: i32 = 78;

fn herdsman(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).stdin(Stdio::null()).env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn assert_one_line_error(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{err}");
    assert!(lines[0].starts_with("herdsman: "), "{err}");
    assert!(lines[0].contains(needle), "{needle:?} not in {err:?}");
}

#[test]
fn bad_command_line_values_each_give_one_line_and_the_config_code() {
    let cases: &[(&[&str], &str)] = &[
        (&["-w", "lots"], "--workers: invalid worker count \"lots\""),
        (&["--ready", "soon"], "--ready: invalid readiness mode"),
        (&["--ready-timeout", "forever"], "--ready-timeout: invalid duration"),
        (&["--stop-signal", "SIGNOPE"], "--stop-signal: unknown or unusable signal"),
        (&["--stop-signal", "KILL"], "--stop-signal: unknown or unusable signal"),
        (&["--listen", "nowhere"], "--listen: invalid listen address \"nowhere\" (no port)"),
        (&["--listen", "unix:relative.sock"], "--listen: invalid unix socket address"),
        (&["-e", "=x"], "--env: invalid environment entry"),
        (&["--name", "a/b"], "--name: invalid app name"),
        (&["--cwd", "/nonexistent-dir"], "--cwd: working directory /nonexistent-dir does not exist"),
        (&["--reload-batch", "0"], "--reload-batch: invalid value \"0\""),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["run", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "true"]);
        assert_one_line_error(&herdsman(&args, &[]), CONFIG, needle);
    }
}

#[test]
fn stop_signal_message_for_a_program_that_is_not_node_is_a_configuration_error() {
    let out = herdsman(&["run", "--listen", "127.0.0.1:0", "--stop-signal", "message", "--", "true"], &[]);
    assert_one_line_error(&out, CONFIG, "--stop-signal / stop_signal: `message` (PM2's shutdown message)");
    assert_one_line_error(&out, CONFIG, "\"true\" is not node or nodejs");
}

#[test]
fn usage_errors_get_one_line_and_the_usage_code() {
    assert_one_line_error(
        &herdsman(&["run", "--frobnicate"], &[]),
        USAGE,
        "unexpected argument '--frobnicate'",
    );
    assert_one_line_error(&herdsman(&["launch"], &[]), USAGE, "unrecognized subcommand");
    assert_one_line_error(&herdsman(&["run", "--workers"], &[]), USAGE, "a value is required");
}

#[test]
fn a_missing_command_or_socket_is_a_configuration_error() {
    assert_one_line_error(&herdsman(&["run", "--listen", "127.0.0.1:0"], &[]), CONFIG, "no command to run");
    // Without bind interception nothing could tell herdsman the app's address.
    assert_one_line_error(
        &herdsman(&["run", "--bind-intercept", "off", "--", "true"], &[]),
        CONFIG,
        "no socket to serve",
    );
    // Steered sockets are bound before a worker starts: the address cannot be learned.
    assert_one_line_error(
        &herdsman(&["run", "--balance", "steer", "--", "true"], &[]),
        CONFIG,
        "needs --listen",
    );
    assert_one_line_error(
        &herdsman(&["run", "--listen", "127.0.0.1:0", "--", "no-such-program-xyz"], &[]),
        CONFIG,
        "command not found: no-such-program-xyz",
    );
}

#[test]
fn garbage_socket_activation_variables_are_rejected_clearly() {
    // LISTEN_PID is checked against herdsman's own pid, which we cannot know before it starts:
    // a wrong LISTEN_PID means "not for us" (like sd_listen_fds), so without --listen it is
    // the no-socket error.
    assert_one_line_error(
        &herdsman(&["run", "--", "true"], &[("LISTEN_FDS", "2"), ("LISTEN_PID", "1")]),
        CONFIG,
        "LISTEN_PID=\"1\" is not this process",
    );
    // For our own pid, run through sh so LISTEN_PID=$$ is exact (exec keeps the pid).
    for (fds, needle) in [
        ("abc", "LISTEN_FDS=\"abc\" is not a positive number"),
        ("0", "LISTEN_FDS=\"0\""),
        ("1", "fd 3 is unusable"),
    ] {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("LISTEN_FDS={fds} LISTEN_PID=$$ exec {BIN} run -- true 3<&-"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_one_line_error(&out, CONFIG, needle);
    }
}

#[test]
fn an_empty_command_in_the_config_file_is_a_configuration_error_not_a_panic() {
    // `command = []` used to pass validation, then panic (exit 101) looking up command[0].
    let dir = TempDir::new("emptycmd");
    let file = dir.path("web.toml");
    std::fs::write(&file, "command = []\n").unwrap();
    assert_one_line_error(
        &herdsman(&["check-config", file.to_str().unwrap()], &[]),
        CONFIG,
        "no command to run",
    );
    let out = herdsman(&["run", "-c", file.to_str().unwrap(), "--listen", "127.0.0.1:0"], &[]);
    assert_one_line_error(&out, CONFIG, "no command to run");
}

#[test]
fn check_config_lists_every_problem_and_accepts_a_good_file() {
    let dir = TempDir::new("checkcfg");
    let bad = dir.path("bad.toml");
    std::fs::write(
        &bad,
        "command = \"python3 app.py\"\nworkers = \"many\"\ncolour = \"blue\"\nstop_timeout = 5\nenv = { PORT = 8080 }\n",
    )
    .unwrap();
    let out = herdsman(&["check-config", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(CONFIG));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in
        ["key `command`", "key `workers`", "key `colour`: unknown key", "key `stop_timeout`", "key `env`"]
    {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
    assert_eq!(err.lines().count(), 5, "one line per problem:\n{err}");

    let syntax = dir.path("syntax.toml");
    std::fs::write(&syntax, "workers = [\n").unwrap();
    assert_one_line_error(
        &herdsman(&["check-config", syntax.to_str().unwrap()], &[]),
        CONFIG,
        "invalid TOML",
    );

    assert_one_line_error(
        &herdsman(&["check-config", "/nonexistent.toml"], &[]),
        CONFIG,
        "cannot read config file",
    );

    let example = format!("{}/examples/herdsman.toml", env!("CARGO_MANIFEST_DIR"));
    let out = herdsman(&["check-config", &example], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (app web"));
}

#[test]
fn init_writes_the_app_refuses_to_overwrite_and_dry_run_changes_nothing() {
    let dir = TempDir::new("init");
    let (cfg, units) = (dir.path("etc"), dir.path("units"));
    let base = |extra: &[&str]| {
        let mut a = vec![
            "init",
            "web",
            "--listen",
            "127.0.0.1:8080",
            "-w",
            "3",
            "--stop-timeout",
            "1m",
            "-e",
            "NODE_ENV=production",
            "--config-dir",
            cfg.to_str().unwrap(),
            "--unit-dir",
            units.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--", "sh", "-c", "exit 0"]);
        herdsman(&a, &[])
    };
    let out = base(&["--dry-run"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("would run: systemctl enable --now herdsman@web.socket herdsman@web.service")
    );
    assert!(!cfg.exists(), "--dry-run writes nothing");

    let out = base(&["--no-start"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let toml = std::fs::read_to_string(cfg.join("web.toml")).unwrap();
    assert!(toml.contains("workers = 3") && toml.contains("NODE_ENV = \"production\""), "{toml}");
    let sock = std::fs::read_to_string(units.join("herdsman@web.socket.d/listen.conf")).unwrap();
    assert!(sock.contains("ListenStream=\nListenStream=127.0.0.1:8080"), "{sock}");
    let stop = std::fs::read_to_string(units.join("herdsman@web.service.d/stop-timeout.conf")).unwrap();
    assert!(stop.contains("TimeoutStopSec=75s"), "{stop}");
    // The written config is valid as it stands.
    let check = herdsman(&["check-config", cfg.join("web.toml").to_str().unwrap()], &[]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    assert_one_line_error(&base(&["--no-start"]), 1, "app web already exists");
    assert!(base(&["--no-start", "--force"]).status.success());

    let rm = |yes: bool| {
        let mut a = vec![
            "remove",
            "web",
            "--config-dir",
            cfg.to_str().unwrap(),
            "--unit-dir",
            units.to_str().unwrap(),
        ];
        if yes {
            a.push("--yes");
        }
        herdsman(&a, &[])
    };
    let out = rm(false);
    assert_eq!(out.status.code(), Some(1));
    assert!(cfg.join("web.toml").exists(), "remove without --yes deletes nothing");
    let out = rm(true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!cfg.join("web.toml").exists() && !units.join("herdsman@web.socket.d").exists());
}

#[test]
fn unknown_worker_user_or_group_is_a_configuration_error_naming_the_key() {
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "true"]);
        herdsman(&args, &[])
    };
    assert_one_line_error(
        &run(&["--user", "no-such-user-xyz"]),
        CONFIG,
        "--user: no such user \"no-such-user-xyz\"",
    );
    assert_one_line_error(
        &run(&["--user", "nobody", "--group", "no-such-group-xyz"]),
        CONFIG,
        "--group: no such group \"no-such-group-xyz\"",
    );
    let dir = TempDir::new("badusercfg");
    let cfg = dir.path("app.toml");
    std::fs::write(&cfg, "user = \"no-such-user-xyz\"\n").unwrap();
    assert_one_line_error(&run(&["-c", cfg.to_str().unwrap()]), CONFIG, "key `user`: no such user");
    std::fs::write(&cfg, "group = \"no-such-group-xyz\"\n").unwrap();
    let out = herdsman(&["check-config", cfg.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(CONFIG));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key `group`: no such group"));
}

#[test]
fn a_non_root_supervisor_cannot_switch_to_another_user() {
    if !nix::unistd::geteuid().is_root() {
        return support::needs(
            "a_non_root_supervisor_cannot_switch_to_another_user",
            "needs root to become nobody",
        );
    }
    // Run herdsman itself as nobody (setpriv comes with util-linux).
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", BIN, "run", "--listen", "127.0.0.1:0"])
        .args(["--control", "/nonexistent/c.sock", "--user", "root", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_one_line_error(&out, CONFIG, "--user: cannot run workers as \"root\": only root can switch users");
}

/// `herdsman init web --no-start` into scratch dirs, with these extra arguments.
fn init_scratch(dir: &TempDir, extra: &[&str]) -> Output {
    let (cfg, units) = (dir.path("etc"), dir.path("units"));
    let mut a = vec!["init", "web", "--no-start", "--force"];
    a.extend_from_slice(&["--config-dir", cfg.to_str().unwrap(), "--unit-dir", units.to_str().unwrap()]);
    a.extend_from_slice(extra);
    a.extend_from_slice(&["--", "/bin/sh", "-c", "exit 0"]);
    herdsman(&a, &[])
}

#[test]
fn init_rejects_control_characters_in_unit_file_values() {
    let dir = TempDir::new("inject");
    let out = init_scratch(&dir, &["--listen", "unix:/run/x.sock\nExecStartPre=/bin/touch /tmp/pwned"]);
    assert_one_line_error(&out, CONFIG, "contains the control character");
    assert!(!dir.path("units").exists() && !dir.path("etc").exists(), "nothing written");
    let out = init_scratch(&dir, &["--listen", "unix:/run/x.sock\\", "--listen", "127.0.0.1:80"]);
    assert_one_line_error(&out, CONFIG, "ends with a backslash");
}

#[test]
fn init_escapes_percent_and_interface_scopes_so_systemd_accepts_the_drop_in() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        return support::needs(
            "init_escapes_percent_and_interface_scopes_so_systemd_accepts_the_drop_in",
            "systemd-analyze is not installed (apt install systemd)",
        );
    }
    let dir = TempDir::new("verify");
    let dropin = dir.path("units/herdsman@web.socket.d/listen.conf");
    let out = init_scratch(&dir, &["--listen", "unix:/run/a%n b.sock", "--listen", "127.0.0.1:8080"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&dropin).unwrap();
    assert!(text.contains("ListenStream=/run/a%%n b.sock\n"), "{text}");
    support::verify_units(&dir.path("units"));

    // A scoped link-local address (interface 1 = lo): systemd 252 cannot parse the scope in
    // ListenStream=, so it becomes BindToDevice=.
    let out = init_scratch(&dir, &["--listen", "[fe80::1%1]:8080"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&dropin).unwrap();
    assert!(text.contains("ListenStream=[fe80::1]:8080\n") && text.contains("BindToDevice=lo\n"), "{text}");
    support::verify_units(&dir.path("units"));

    let out = init_scratch(&dir, &["--listen", "[fe80::1%1]:8080", "--listen", "127.0.0.1:8080"]);
    assert_one_line_error(&out, CONFIG, "has an interface scope");
}

#[test]
fn a_tmp_runtime_dir_created_by_another_user_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        return support::needs(
            "a_tmp_runtime_dir_created_by_another_user_is_refused",
            "needs root to act as two users",
        );
    }
    // TMPDIR points herdsman's /tmp fallback at a scratch dir; "another user" is root.
    let dir = TempDir::new("tmpfallback");
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("user nobody");
    let planted = dir.path(&format!("herdsman-{}", nobody.uid));
    std::fs::create_dir(&planted).unwrap();
    std::fs::set_permissions(&planted, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let child = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", BIN, "run", "--listen", "127.0.0.1:0"])
        .args(["--", "/bin/true"])
        .env("TMPDIR", &dir.0)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("LISTEN_FDS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Without the check herdsman would start serving from the planted directory: bound the
    // wait, and kill it if it does not refuse.
    let mut child = child;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("herdsman started from a runtime directory another user created");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_one_line_error(&out, CONFIG, "XDG_RUNTIME_DIR");
    assert!(std::fs::read_dir(&planted).unwrap().next().is_none(), "nothing created inside it");
}
