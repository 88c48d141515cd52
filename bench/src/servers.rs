//! Starting, reloading and stopping the contenders: the limit launcher, herdsman, PM2.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::load::wait_serving;
use crate::procfs::*;
use crate::util::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    Limit,
    Herdsman,
    Pm2,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Limit => "limit",
            Kind::Herdsman => "herdsman",
            Kind::Pm2 => "PM2",
        }
    }
}

/// What the workers run.
#[derive(Clone, Debug)]
pub enum App {
    /// bench/apps/node-app.js; warm_ms > 0 with mode "gate" or "defer".
    Node { warm_ms: u64, mode: &'static str },
    /// The bench binary's own tiny worker (instantly ready), optional times file.
    Tiny { times: Option<PathBuf> },
}

#[allow(dead_code)]
pub struct Ctx {
    pub quick: bool,
    pub root: PathBuf,
    pub herdsman: PathBuf,
    pub me: PathBuf,
    pub node_app: PathBuf,
    pub pm2: PathBuf,
    pub pm2_home: PathBuf,
    pub work: PathBuf,
    port: AtomicU16,
}

impl Ctx {
    pub fn new(quick: bool, root: PathBuf, work: PathBuf) -> Ctx {
        let pm2_home = work.join("pm2-home");
        std::fs::create_dir_all(&pm2_home).expect("cannot create PM2_HOME in the work directory");
        Ctx {
            quick,
            herdsman: root.join("target/release/herdsman"),
            me: std::env::current_exe().expect("the bench knows its own path"),
            node_app: root.join("bench/apps/node-app.js"),
            pm2: root.join("bench/.deps/node_modules/.bin/pm2"),
            pm2_home,
            work,
            root,
            port: AtomicU16::new(18100 + (std::process::id() % 500) as u16 * 10),
        }
    }

    pub fn next_port(&self) -> u16 {
        self.port.fetch_add(1, Ordering::SeqCst)
    }

    pub fn pm2_cmd(&self) -> Command {
        let mut c = Command::new(&self.pm2);
        c.env("PM2_HOME", &self.pm2_home).stdin(Stdio::null());
        c
    }

    /// Runs a pm2 command quietly; Ok(stdout).
    pub fn pm2_run(&self, args: &[&str]) -> Result<String, String> {
        let out = self.pm2_cmd().args(args).output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "pm2 {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn pm2_daemon_pid(&self) -> Option<i32> {
        read_file(&self.pm2_home.join("pm2.pid")).trim().parse().ok()
    }

    /// Starts the PM2 daemon (once); returns its pid.
    pub fn pm2_daemon(&self) -> i32 {
        if let Some(p) = self.pm2_daemon_pid().filter(|p| alive(*p)) {
            return p;
        }
        self.pm2_run(&["ping"]).expect("pm2 ping");
        wait_until(Duration::from_secs(10), 50, || self.pm2_daemon_pid().filter(|p| alive(*p)))
            .expect("pm2 daemon")
    }
}

#[allow(dead_code)]
pub struct Server {
    pub kind: Kind,
    pub addr: String,
    /// Supervisor pid (launcher, herdsman, PM2 daemon).
    pub pid: i32,
    pub n: usize,
    child: Option<Child>,
    pub control: Option<PathBuf>,
    /// (pm2 binary, PM2_HOME, app name)
    pm2: Option<(PathBuf, PathBuf, String)>,
    pub log: PathBuf,
    /// Time from start to every worker ready (herdsman: control socket; others: serving).
    pub startup: Duration,
}

fn app_cmd(ctx: &Ctx, app: &App) -> (Vec<String>, Vec<(String, String)>) {
    match app {
        App::Node { warm_ms, mode } => (
            vec!["node".into(), ctx.node_app.display().to_string()],
            vec![("WARM_MS".into(), warm_ms.to_string()), ("WARM_MODE".into(), mode.to_string())],
        ),
        App::Tiny { times } => (
            vec![ctx.me.display().to_string(), "worker".into()],
            times.iter().map(|t| ("BENCH_TIMES".to_string(), t.display().to_string())).collect(),
        ),
    }
}

pub fn start(ctx: &Ctx, kind: Kind, app: &App, n: usize) -> Result<Server, String> {
    start_balanced(ctx, kind, app, n, None, None)
}

/// Like [`start`]; for herdsman, `balance` = `Some("shared" | "steer" | "sticky")` adds
/// `--balance MODE` (ignored for the limit and PM2).
pub fn start_balanced(
    ctx: &Ctx,
    kind: Kind,
    app: &App,
    n: usize,
    balance: Option<&str>,
    metrics: Option<&str>,
) -> Result<Server, String> {
    let port = ctx.next_port();
    let addr = format!("127.0.0.1:{port}");
    let log = ctx.work.join(format!("{}-{port}.log", kind.name()));
    let (cmd, env) = app_cmd(ctx, app);
    let t0 = Instant::now();
    match kind {
        Kind::Limit | Kind::Herdsman => {
            let mut c;
            let mut control = None;
            if kind == Kind::Limit {
                c = Command::new(&ctx.me);
                c.args(["launch", "--listen", &addr, "-w", &n.to_string(), "--"]);
                for (k, v) in &env {
                    c.env(k, v);
                }
            } else {
                let sock = ctx.work.join(format!("control-{port}.sock"));
                c = Command::new(&ctx.herdsman);
                c.args(["run", "--name", &format!("bench{port}"), "--listen", &addr, "-w", &n.to_string()])
                    .args(["--ready", "notify", "--ready-timeout", "30s", "--stop-timeout", "5s"])
                    // The reload figures measure the hand-over itself; the default min_ready
                    // adds a fixed 1 s hold per batch on top (docs/guarantees.md).
                    .args(["--min-ready", "0s"])
                    .args(balance.iter().flat_map(|b| ["--balance", b]))
                    .args(metrics.iter().flat_map(|m| ["--metrics", m]))
                    .arg("--control")
                    .arg(&sock);
                for (k, v) in &env {
                    c.arg("-e").arg(format!("{k}={v}"));
                }
                c.arg("--");
                c.env_remove("NOTIFY_SOCKET").env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
                control = Some(sock);
            }
            c.args(&cmd);
            let f = std::fs::File::create(&log).map_err(|e| e.to_string())?;
            c.stdin(Stdio::null())
                .stdout(f.try_clone().map_err(|e| e.to_string())?)
                .stderr(f)
                .process_group(0);
            let child = c.spawn().map_err(|e| format!("spawn {}: {e}", kind.name()))?;
            let pid = child.id() as i32;
            let mut s = Server {
                kind,
                addr: addr.clone(),
                pid,
                n,
                child: Some(child),
                control,
                pm2: None,
                log,
                startup: Duration::ZERO,
            };
            let ok = if kind == Kind::Herdsman {
                let sock = s.control.clone().expect("a herdsman server has a control socket");
                wait_until(Duration::from_secs(60), 2, || {
                    control_status(&sock).ok().filter(|st| st["ready"].as_u64() == Some(n as u64)).map(|_| ())
                })
                .is_some()
            } else {
                true
            };
            s.startup = t0.elapsed();
            // sticky routes every request from 127.0.0.1 to one worker: one answer is all a
            // single client address can see (herdsman already reported all N ready).
            let distinct = if balance == Some("sticky") { 1 } else { n.min(4) };
            let serving =
                matches!(app, App::Tiny { .. }) || wait_serving(&addr, distinct, Duration::from_secs(30));
            if !ok || !serving {
                let msg = format!("{} did not start: {}", kind.name(), tail(&s.log, 15));
                s.stop();
                return Err(msg);
            }
            Ok(s)
        }
        Kind::Pm2 => {
            let daemon = ctx.pm2_daemon();
            let name = format!("bench{port}");
            let mut envs = serde_json::Map::new();
            envs.insert("PORT".into(), Value::from(port.to_string()));
            for (k, v) in &env {
                envs.insert(k.clone(), Value::from(v.clone()));
            }
            let eco = serde_json::json!({"apps": [{
                "name": name,
                "script": cmd[1],
                "exec_mode": "cluster",
                "instances": n,
                "wait_ready": true,
                "listen_timeout": 30000,
                "kill_timeout": 5000,
                "autorestart": true,
                "merge_logs": true,
                "out_file": "/dev/null",
                "error_file": log.display().to_string(),
                "env": envs,
            }]});
            let eco_path = ctx.work.join(format!("{name}.json"));
            std::fs::write(&eco_path, eco.to_string()).map_err(|e| e.to_string())?;
            ctx.pm2_run(&["start", eco_path.to_str().ok_or("the work directory is not UTF-8")?])?;
            let mut s = Server {
                kind,
                addr: addr.clone(),
                pid: daemon,
                n,
                child: None,
                control: None,
                pm2: Some((ctx.pm2.clone(), ctx.pm2_home.clone(), name)),
                log,
                startup: Duration::ZERO,
            };
            if !wait_serving(&addr, n.min(4), Duration::from_secs(60)) {
                s.stop();
                return Err("PM2 app did not serve".into());
            }
            s.startup = t0.elapsed();
            Ok(s)
        }
    }
}

pub fn tail(p: &Path, n: usize) -> String {
    let s = read_file(p);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One request to herdsman's control socket; returns the final reply.
pub fn control(sock: &Path, req: &str) -> Result<Value, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(600))).ok();
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    s.write_all(b"\n").map_err(|e| e.to_string())?;
    let r = BufReader::new(s);
    for line in r.lines() {
        let line = line.map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
        if v["type"] != "progress" {
            return Ok(v);
        }
    }
    Err("control connection closed".into())
}

pub fn control_status(sock: &Path) -> Result<Value, String> {
    let v = control(sock, r#"{"v":1,"op":"status"}"#)?;
    Ok(v["status"].clone())
}

impl Server {
    /// Rolling reload through the user-facing command (`herdsman reload`, `pm2 reload`);
    /// returns when the command returns.
    pub fn reload(&self, ctx: &Ctx) -> Result<(), String> {
        match self.kind {
            Kind::Herdsman => {
                let out = Command::new(&ctx.herdsman)
                    .arg("reload")
                    .arg(self.control.as_ref().expect("a herdsman server has a control socket"))
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| e.to_string())?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!("herdsman reload: {}", String::from_utf8_lossy(&out.stderr)))
                }
            }
            Kind::Pm2 => {
                ctx.pm2_run(&["reload", &self.pm2.as_ref().expect("a PM2 server has its app").2]).map(|_| ())
            }
            Kind::Limit => Err("the limit launcher cannot reload".into()),
        }
    }

    /// Reload through the control protocol directly (no CLI process): isolates the supervisor.
    pub fn reload_direct(&self) -> Result<(), String> {
        let v = control(
            self.control.as_ref().expect("a herdsman server has a control socket"),
            r#"{"v":1,"op":"reload","wait":true}"#,
        )?;
        if v["ok"] == true {
            Ok(())
        } else {
            Err(format!("reload failed: {v}"))
        }
    }

    /// Worker pids: herdsman from its status; PM2 and the launcher: the supervisor's children.
    pub fn worker_pids(&self) -> Vec<i32> {
        match self.kind {
            Kind::Herdsman => {
                control_status(self.control.as_ref().expect("a herdsman server has a control socket"))
                    .map(|s| {
                        s["workers"]
                            .as_array()
                            .map(|w| w.iter().filter_map(|w| w["pid"].as_i64().map(|p| p as i32)).collect())
                            .unwrap_or_default()
                    })
                    .unwrap_or_default()
            }
            _ => children(self.pid),
        }
    }

    pub fn stop(&mut self) {
        if let Some((pm2, home, name)) = self.pm2.take() {
            let _ = Command::new(pm2)
                .env("PM2_HOME", home)
                .args(["delete", &name])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            return;
        }
        if let Some(mut child) = self.child.take() {
            let all = tree(self.pid);
            kill(self.pid, libc::SIGTERM);
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end && child.try_wait().ok().flatten().is_none() {
                sleep_ms(10);
            }
            let _ = child.kill();
            let _ = child.wait();
            // Workers live in their own process groups under herdsman: kill leftovers by pid.
            let left: Vec<i32> = all.into_iter().filter(|p| alive(*p)).collect();
            kill_all(&left);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
