//! `herdsman init` and `herdsman remove`: turn a command line into a systemd-managed app
//! (PM2's `startup` + `save`), and undo it.
//!
//! `init` writes `/etc/herdsman/NAME.toml` (the validated settings), a drop-in giving
//! `herdsman@NAME.socket` its address(es), and, when the stop timeout is longer than the
//! unit's default allows, a drop-in raising `TimeoutStopSec=`; then `daemon-reload` and
//! `enable --now` of the socket and the service.
//!
//! Workers run as `--user` (default: the user who ran `sudo`, `SUDO_USER`; else root, with a
//! warning). The config may hold secrets (`--env`), so it is written 0640 root:(the worker's
//! group), or 0600 without a worker user, atomically: an exclusive temp file (never through a
//! symlink), fsync, rename, fsync of the directory. Every value that goes into a unit file is
//! checked for control characters (a newline would start a new directive) and has `%` escaped
//! as `%%` (systemd's specifier character).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cli::{InitArgs, RemoveArgs};
use crate::config::{self, Layer, ListenAddr, Settings};
use crate::exit;

/// The service unit's `TimeoutStopSec=` covers a stop timeout up to this.
const UNIT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub use crate::exit::Failure;

/// A failure said in a text of one or more lines.
pub(crate) fn fail(code: i32, message: impl Into<String>) -> Failure {
    Failure::text(code, &message.into())
}

/// A file to write: path, contents, mode, and the group to give it (`None`: ours).
struct File {
    path: PathBuf,
    text: String,
    mode: u32,
    group: Option<u32>,
}

struct Plan {
    files: Vec<File>,
    commands: Vec<Vec<String>>,
}

pub(crate) fn socket_dropin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("herdsman@{name}.socket.d")).join("listen.conf")
}

fn service_dropin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("herdsman@{name}.service.d")).join("stop-timeout.conf")
}

fn steer_dropin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("herdsman@{name}.service.d")).join("steer.conf")
}

/// `--balance steer` routes with an eBPF program: the service needs CAP_BPF and the `bpf`
/// system call, which the unit's defaults leave out; CAP_SETPCAP lets herdsman drop CAP_BPF
/// from every worker's bounding set (and both from its own once the program is attached).
const STEER_DROPIN: &str = "# Written by `herdsman init --balance steer`: steering loads an eBPF SK_REUSEPORT\n\
# program (maps of the app's own sockets): receiving workers take turns. Without CAP_BPF or\n\
# bpf() herdsman spreads connections by a hash, and says so at start. CAP_SETPCAP: herdsman\n\
# drops CAP_BPF and CAP_SETPCAP from every worker's bounding set (also a worker run as root),\n\
# and from all of its own sets once the program is attached (Linux 6.5 and later).\n\
[Service]\n\
CapabilityBoundingSet=CAP_BPF CAP_SETPCAP\n\
SystemCallFilter=bpf\n";

pub(crate) fn units(name: &str) -> [String; 2] {
    [format!("herdsman@{name}.socket"), format!("herdsman@{name}.service")]
}

/// Renders the validated settings as the app's config file: every setting in the form it reads
/// back, but the worker count as requested (`auto` stays `auto`) and the user and group as given.
fn render_config(s: &Settings, workers: Option<&str>, user: Option<&str>, group: Option<&str>) -> String {
    let mut layer = Layer::from(s);
    if let Some(w) = workers.and_then(|w| config::values::workers(w).ok()) {
        layer.workers = Some(w.to_string());
    }
    layer.user = user.map(String::from);
    layer.group = group.map(String::from);
    let body = layer.to_toml();
    format!(
        "# herdsman app {name}: written by `herdsman init`; edit, then `systemctl reload herdsman@{name}`.\n\
         # `listen` is used only when the app runs without systemd: under systemd the socket unit\n\
         # herdsman@{name}.socket owns the address (drop-in herdsman@{name}.socket.d/listen.conf).\n{body}",
        name = s.name
    )
}

/// A value for a unit file: no control characters (a newline would start a new directive, a
/// trailing backslash would continue the line), `%` escaped as `%%`.
fn unit_value(value: &str, what: &str) -> Result<String, Failure> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(fail(
            exit::CONFIG,
            format!(
                "{what} {value:?} contains the control character {c:?}, which cannot go into a systemd unit file; use a value without control characters"
            ),
        ));
    }
    if value.ends_with('\\') {
        return Err(fail(
            exit::CONFIG,
            format!(
                "{what} {value:?} ends with a backslash, which continues the line in a systemd unit file; remove it"
            ),
        ));
    }
    Ok(value.replace('%', "%%"))
}

/// The name of network interface `index`, for `BindToDevice=`.
fn interface_name(index: u32) -> Option<String> {
    let all = nix::net::if_::if_nameindex().ok()?;
    all.iter().find(|i| i.index() == index).map(|i| i.name().to_string_lossy().into_owned())
}

fn render_socket(s: &Settings) -> Result<String, Failure> {
    let mut out = format!(
        "# Written by `herdsman init {}`: the app's listening address(es).\n[Socket]\nListenStream=\n",
        s.name
    );
    let mut device = None;
    let mut dual_stack = false;
    for l in &s.listen {
        let addr = match l {
            // systemd (252) cannot parse a scope in ListenStream= ("[fe80::1%2]:80"): the
            // address goes without it and the socket is bound to the interface instead.
            ListenAddr::Tcp(std::net::SocketAddr::V6(a)) if a.scope_id() != 0 => {
                if s.listen.len() > 1 {
                    return Err(fail(
                        exit::CONFIG,
                        format!(
                            "--listen: {l} has an interface scope, which binds every socket of the app to that interface (BindToDevice=); give it as the only --listen"
                        ),
                    ));
                }
                let name = interface_name(a.scope_id()).ok_or_else(|| {
                    fail(
                        exit::CONFIG,
                        format!("--listen: {l}: no network interface with index {} here; use an existing interface's index (ip link)", a.scope_id()),
                    )
                })?;
                device = Some(unit_value(&name, "--listen: interface name")?);
                format!("[{}]:{}", a.ip(), a.port())
            }
            ListenAddr::Tcp(a) => a.to_string(),
            // A bare port: systemd binds [::]:PORT dual-stack (BindIPv6Only=both below), or
            // 0.0.0.0:PORT where the system has no IPv6.
            ListenAddr::AnyAddress(port) => {
                dual_stack = true;
                port.to_string()
            }
            ListenAddr::Unix(p) => p.display().to_string(),
        };
        // Steered: one socket per worker, twice over (old and new worker of each slot during a
        // reload), all held by systemd so their queues survive a restart of the service.
        for _ in 0..steer_sockets(s) {
            let _ = writeln!(out, "ListenStream={}", unit_value(&addr, "--listen: address")?);
        }
    }
    if s.balance != config::Balance::Shared {
        let _ = writeln!(
            out,
            "# --balance {}: every ListenStream= above is its own socket in one SO_REUSEPORT group.\nReusePort=yes",
            s.balance
        );
    }
    if dual_stack {
        let _ = writeln!(
            out,
            "# :PORT means every address of both families, whatever net.ipv6.bindv6only says.\nBindIPv6Only=both"
        );
    }
    if let Some(dev) = device {
        let _ = writeln!(out, "# The address's interface scope.\nBindToDevice={dev}");
    }
    Ok(out)
}

/// How many sockets per address the socket unit holds: 1, or with steering two per worker
/// (herdsman opens more itself if a scale-up needs them).
fn steer_sockets(s: &Settings) -> usize {
    if s.balance == config::Balance::Shared { 1 } else { (2 * s.workers.get()).min(256) }
}

fn plan_init(a: &InitArgs, s: &Settings, user: Option<&str>) -> Result<Plan, Failure> {
    // The config may hold secrets (--env): readable by root and the worker's group only.
    let (mode, group) = match &s.user {
        Some(u) => (0o640, Some(u.gid)),
        None => (0o600, None),
    };
    let config = render_config(s, a.app.workers.as_deref(), user, a.app.group.as_deref());
    let unit = |path, text| File { path, text, mode: 0o644, group: None };
    let mut files = vec![
        File { path: a.config_dir.join(format!("{}.toml", s.name)), text: config, mode, group },
        unit(socket_dropin(&a.unit_dir, &s.name), render_socket(s)?),
    ];
    if s.stop_timeout > UNIT_STOP_TIMEOUT {
        let secs = (s.stop_timeout + Duration::from_secs(15)).as_secs();
        files.push(unit(
            service_dropin(&a.unit_dir, &s.name),
            format!("# Written by `herdsman init`: stop_timeout plus a margin.\n[Service]\nTimeoutStopSec={secs}s\n"),
        ));
    }
    if s.balance == config::Balance::Steer {
        files.push(unit(steer_dropin(&a.unit_dir, &s.name), STEER_DROPIN.to_string()));
    }
    let [sock, svc] = units(&s.name);
    let commands = if a.no_start {
        vec![]
    } else {
        vec![
            vec!["systemctl".into(), "daemon-reload".into()],
            vec!["systemctl".into(), "enable".into(), "--now".into(), sock, svc],
        ]
    };
    Ok(Plan { files, commands })
}

pub(crate) fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn run_command(cmd: &[String]) -> Result<(), Failure> {
    let status = Command::new(&cmd[0])
        .args(&cmd[1..])
        .status()
        .map_err(|e| fail(exit::FAILURE, format!("cannot run {}: {e}", cmd.join(" "))))?;
    if status.success() {
        Ok(())
    } else {
        Err(fail(exit::FAILURE, format!("`{}` failed ({status}); see journalctl -xe", cmd.join(" "))))
    }
}

/// Writes `f` atomically: a new temp file next to it (`O_EXCL|O_NOFOLLOW`: never an existing
/// file or a symlink), mode and group set before any byte is written, fsync, rename over the
/// target (which replaces a symlink there instead of following it), fsync of the directory.
fn write_file(f: &File) -> Result<(), Failure> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = &f.path;
    let io = |e: std::io::Error| fail(exit::FAILURE, format!("cannot write {}: {e}", path.display()));
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(f.mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(|e| fail(exit::FAILURE, format!("cannot create {}: {e}", tmp.display())))?;
    let written = (|| {
        out.set_permissions(std::fs::Permissions::from_mode(f.mode))?;
        if let Some(g) = f.group {
            std::os::unix::fs::fchown(&out, None, Some(g))?;
        }
        out.write_all(f.text.as_bytes())?;
        out.sync_all()?;
        drop(out);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// `sudo_user` is `SUDO_USER` (read by `main`): the default worker user when `--user` is not
/// given.
pub fn init(a: &InitArgs, cpus: std::num::NonZeroUsize, sudo_user: Option<&str>) -> Result<(), Failure> {
    let name = config::values::name(a.name.as_deref().unwrap_or_default())
        .map_err(|e| fail(exit::CONFIG, format!("NAME: {e}")))?;
    if a.app.listen.is_empty() {
        return Err(fail(
            exit::CONFIG,
            "init needs --listen ADDR: the address the app's socket unit listens on",
        ));
    }
    let mut command = a.command.clone();
    // Pin the program to an absolute path: the service runs with systemd's PATH, not yours.
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.extend(a.app.env.iter().filter_map(|e| config::values::env_pair(e).ok()));
    let cwd = match &a.app.cwd {
        Some(c) => std::path::absolute(c).unwrap_or_else(|_| c.clone()),
        None => {
            std::env::current_dir().map_err(|e| fail(exit::FAILURE, format!("current directory: {e}")))?
        }
    };
    if let Some(first) = command.first_mut() {
        if !first.contains('/') {
            *first = crate::program::resolve(first, &env, Some(&cwd))
                .map_err(|e| fail(exit::CONFIG, e.to_string()))?;
        }
    }
    // Workers run as --user, else as the user who ran sudo; root only when neither is known
    // (then nothing is written, and the workers run as the supervisor: root under the shipped
    // unit, the service user under a User=/DynamicUser= drop-in).
    let user = a.app.user.clone().or_else(|| {
        sudo_user.map(str::trim).filter(|u| !u.is_empty() && *u != "root" && *u != "0").map(String::from)
    });
    let layer =
        Layer { name: Some(name.clone()), command, cwd: Some(cwd), user: user.clone(), ..a.app.clone() };
    let mut settings = config::load(None, &layer, cpus).map_err(|p| fail(exit::CONFIG, p.to_string()))?;
    if let Some(g) = &a.control_group {
        if !matches!(nix::unistd::Group::from_name(g), Ok(Some(_))) {
            return Err(fail(exit::CONFIG, format!("--control-group: no such group {g:?}; create it first")));
        }
        settings.control_group = Some(g.clone());
    }
    let config_path = a.config_dir.join(format!("{name}.toml"));
    if config_path.exists() && !a.force && !a.dry_run {
        return Err(fail(
            exit::FAILURE,
            format!("app {name} already exists ({}); pass --force to overwrite it", config_path.display()),
        ));
    }
    let plan = plan_init(a, &settings, user.as_deref())?;
    let root_warning = || {
        if user.is_none() {
            eprintln!(
                "herdsman: warning: no --user (and no SUDO_USER): the workers of {name} run as root under the shipped unit; choose a user with --user www-data"
            );
        }
        if let Some(w) = metrics_warning(&name, settings.metrics.as_ref()) {
            eprintln!("herdsman: warning: {w}");
        }
    };
    if a.dry_run {
        for f in &plan.files {
            println!("would write {} (mode {:04o}):\n{}", f.path.display(), f.mode, indent(&f.text));
        }
        for c in &plan.commands {
            println!("would run: {}", c.join(" "));
        }
        root_warning();
        return Ok(());
    }
    if !plan.commands.is_empty() && !systemd_running() {
        return Err(fail(
            exit::FAILURE,
            "systemd is not running here (no /run/systemd/system); use `herdsman run`, or --no-start to only write the files",
        ));
    }
    let was_active = !plan.commands.is_empty() && is_active(&units(&name)[1]);
    for f in &plan.files {
        write_file(f)?;
        println!("wrote {}", f.path.display());
    }
    // A drop-in an earlier init wrote (with --force) that these settings no longer need goes.
    // A changed balance needs `systemctl restart` (the capability set and the sockets).
    for stale in [service_dropin(&a.unit_dir, &name), steer_dropin(&a.unit_dir, &name)] {
        if !plan.files.iter().any(|f| f.path == stale) && std::fs::remove_file(&stale).is_ok() {
            println!("removed {}", stale.display());
        }
    }
    for c in &plan.commands {
        run_command(c)?;
    }
    if was_active {
        // Already running (--force): roll the workers onto the new config without downtime.
        run_command(&["systemctl".into(), "reload".into(), units(&name)[1].clone()])?;
        println!(
            "reloaded the running app; a changed listen address needs `systemctl restart herdsman@{name}.socket`"
        );
    }
    let addrs: Vec<String> = settings.listen.iter().map(ToString::to_string).collect();
    println!(
        "app {name}: {} worker(s) on {}\n  status: herdsman status {name}\n  deploy: systemctl reload herdsman@{name}\n  logs:   herdsman logs {name} -f",
        settings.workers,
        addrs.join(", ")
    );
    root_warning();
    Ok(())
}

/// `--metrics :PORT` serves the (unauthenticated) metrics page on every address of every
/// network: say so, and what to write instead.
fn metrics_warning(name: &str, metrics: Option<&config::ListenAddr>) -> Option<String> {
    let Some(config::ListenAddr::AnyAddress(port)) = metrics else { return None };
    Some(format!(
        "--metrics :{port} serves {name}'s metrics page, unauthenticated, on every network this host is on; use --metrics 127.0.0.1:{port} (or unix:/run/herdsman/{name}/metrics.sock) unless a firewall keeps the port in"
    ))
}

fn is_active(unit: &str) -> bool {
    Command::new("systemctl").args(["is-active", "--quiet", unit]).status().is_ok_and(|s| s.success())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

pub fn remove(a: &RemoveArgs) -> Result<(), Failure> {
    let name = config::values::name(&a.name).map_err(|e| fail(exit::CONFIG, format!("NAME: {e}")))?;
    let files = [
        a.config_dir.join(format!("{name}.toml")),
        socket_dropin(&a.unit_dir, &name),
        service_dropin(&a.unit_dir, &name),
        steer_dropin(&a.unit_dir, &name),
    ];
    let present: Vec<&PathBuf> = files.iter().filter(|p| p.exists()).collect();
    if present.is_empty() {
        return Err(fail(exit::FAILURE, format!("no app {name} here (no {})", files[0].display())));
    }
    let [sock, svc] = units(&name);
    if !a.yes {
        println!("would stop and disable {svc} and {sock}, then delete:");
        for p in &present {
            println!("  {}", p.display());
        }
        return Err(fail(exit::FAILURE, "nothing done: pass --yes to remove the app"));
    }
    if systemd_running() {
        run_command(&["systemctl".into(), "disable".into(), "--now".into(), svc, sock])?;
    }
    for p in present {
        std::fs::remove_file(p)
            .map_err(|e| fail(exit::FAILURE, format!("cannot delete {}: {e}", p.display())))?;
        println!("deleted {}", p.display());
        if let Some(dir) = p.parent().filter(|d| d.extension().is_some_and(|e| e == "d")) {
            let _ = std::fs::remove_dir(dir);
        }
    }
    if systemd_running() {
        run_command(&["systemctl".into(), "daemon-reload".into()])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use crate::scratch::Scratch;

    fn args(dir: &Path, extra: &[&str]) -> InitArgs {
        use clap::Parser;
        let (cfg, units) = (dir.join("etc").display().to_string(), dir.join("units").display().to_string());
        let mut argv = vec!["herdsman", "init", "web", "--listen", "127.0.0.1:8080", "--no-start"];
        argv.extend_from_slice(&["--config-dir", &cfg, "--unit-dir", &units, "-e", "SECRET=hunter2"]);
        argv.extend_from_slice(extra);
        argv.extend_from_slice(&["--", "/bin/sh", "-c", "exit 0"]);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Init(a) => *a,
            other => panic!("{other:?}"),
        }
    }

    fn cpus() -> std::num::NonZeroUsize {
        std::num::NonZeroUsize::MIN
    }

    fn written(dir: &Path) -> (toml::Table, std::fs::Metadata) {
        let path = dir.join("etc/web.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        (text.parse().unwrap(), std::fs::symlink_metadata(&path).unwrap())
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn metrics_on_every_network_gets_a_warning_loopback_and_unix_do_not() {
        let any = config::ListenAddr::AnyAddress(9464);
        let w = metrics_warning("web", Some(&any)).unwrap();
        assert!(w.contains("every network") && w.contains("127.0.0.1:9464"), "{w}");
        let lo = config::ListenAddr::Tcp("127.0.0.1:9464".parse().unwrap());
        assert_eq!(metrics_warning("web", Some(&lo)), None);
        assert_eq!(metrics_warning("web", Some(&config::ListenAddr::Unix("/run/m.sock".into()))), None);
        assert_eq!(metrics_warning("web", None), None);
    }

    #[test]
    fn init_writes_the_metrics_address_into_the_app_config() {
        let dir = Scratch::new("init-metrics");
        init(&args(dir.path(), &["--metrics", "[::1]:9464"]), cpus(), None).map_err(|f| f.message()).unwrap();
        let (t, _) = written(dir.path());
        assert_eq!(t.get("metrics").and_then(|v| v.as_str()), Some("[::1]:9464"), "{t}");
        let s = config::load(Some(&dir.path().join("etc/web.toml")), &Default::default(), cpus()).unwrap();
        assert_eq!(s.metrics, Some(config::ListenAddr::Tcp("[::1]:9464".parse().unwrap())));
        let bad = init(&args(dir.path(), &["--force", "--metrics", "9464"]), cpus(), None).unwrap_err();
        assert_eq!(bad.code, crate::exit::CONFIG);
        assert!(bad.message().contains("--metrics"), "{}", bad.message());
    }

    #[test]
    fn init_balance_steer_gives_the_service_cap_bpf_and_reuseport_sockets() {
        let dir = Scratch::new("init-steer");
        init(&args(dir.path(), &["--balance", "steer", "-w", "2"]), cpus(), None)
            .map_err(|f| f.message())
            .unwrap();
        let units = dir.path().join("units");
        let sock = std::fs::read_to_string(units.join("herdsman@web.socket.d/listen.conf")).unwrap();
        assert_eq!(sock.matches("ListenStream=127.0.0.1:8080").count(), 4, "{sock}");
        assert!(sock.contains("ReusePort=yes"), "{sock}");
        let steer = std::fs::read_to_string(units.join("herdsman@web.service.d/steer.conf")).unwrap();
        assert!(
            steer.contains("\n[Service]\nCapabilityBoundingSet=CAP_BPF CAP_SETPCAP\nSystemCallFilter=bpf\n"),
            "{steer}"
        );
        // sticky routes by address with a classic program: no capability.
        init(&args(dir.path(), &["--force", "--balance", "sticky"]), cpus(), None)
            .map_err(|f| f.message())
            .unwrap();
        assert!(!units.join("herdsman@web.service.d/steer.conf").exists());
    }

    #[test]
    fn init_defaults_the_worker_user_to_sudo_user_and_gives_the_config_to_its_group() {
        if !is_root() {
            return crate::scratch::needs(
                "init_defaults_the_worker_user_to_sudo_user_and_gives_the_config_to_its_group",
                "resolving another worker user needs root",
            );
        }
        let dir = Scratch::new("init-sudo");
        init(&args(dir.path(), &[]), cpus(), Some("nobody")).map_err(|f| f.message()).unwrap();
        let (t, meta) = written(dir.path());
        assert_eq!(t.get("user").and_then(|v| v.as_str()), Some("nobody"), "{t}");
        assert!(t.get("group").is_none(), "{t}");
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!((meta.uid(), meta.gid()), (0, nobody.gid.as_raw()));
    }

    #[test]
    fn init_user_and_group_flags_win_over_sudo_user() {
        if !is_root() {
            return crate::scratch::needs(
                "init_user_and_group_flags_win_over_sudo_user",
                "resolving another worker user needs root",
            );
        }
        let dir = Scratch::new("init-flags");
        init(&args(dir.path(), &["--user", "nobody", "--group", "daemon"]), cpus(), Some("daemon"))
            .map_err(|f| f.message())
            .unwrap();
        let (t, meta) = written(dir.path());
        assert_eq!(t.get("user").and_then(|v| v.as_str()), Some("nobody"), "{t}");
        assert_eq!(t.get("group").and_then(|v| v.as_str()), Some("daemon"), "{t}");
        let daemon = nix::unistd::Group::from_name("daemon").unwrap().unwrap();
        assert_eq!(meta.gid(), daemon.gid.as_raw());
        // What init wrote loads back to the same worker identity.
        let s = config::load(Some(&dir.path().join("etc/web.toml")), &Default::default(), cpus()).unwrap();
        assert_eq!(s.user.map(|u| (u.user, u.gid)), Some(("nobody".to_string(), daemon.gid.as_raw())));
    }

    #[test]
    fn init_without_sudo_user_writes_no_user_and_a_private_config() {
        let dir = Scratch::new("init-root");
        for sudo in [None, Some(""), Some("root")] {
            init(&args(dir.path(), &["--force"]), cpus(), sudo).map_err(|f| f.message()).unwrap();
            let (t, meta) = written(dir.path());
            assert!(t.get("user").is_none() && t.get("group").is_none(), "{sudo:?}: {t}");
            assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "the config holds --env secrets");
        }
    }

    #[test]
    fn init_control_group_is_written_and_an_unknown_one_refused() {
        let dir = Scratch::new("init-ctlgroup");
        // `root` (gid 0) exists everywhere.
        init(&args(dir.path(), &["--control-group", "root"]), cpus(), None).map_err(|f| f.message()).unwrap();
        let (t, _) = written(dir.path());
        assert_eq!(t.get("control_group").and_then(|v| v.as_str()), Some("root"), "{t}");
        let s = config::load(Some(&dir.path().join("etc/web.toml")), &Default::default(), cpus()).unwrap();
        assert_eq!(s.control_group.as_deref(), Some("root"));
        let f = init(&args(dir.path(), &["--force", "--control-group", "no-such-group-xyz"]), cpus(), None)
            .expect_err("must fail");
        assert_eq!(f.code, exit::CONFIG);
        assert!(f.message().contains("--control-group: no such group"), "{}", f.message());
    }

    #[test]
    fn unknown_init_user_is_a_config_error() {
        let dir = Scratch::new("init-nouser");
        let f = init(&args(dir.path(), &[]), cpus(), Some("no-such-user-xyz")).expect_err("must fail");
        assert_eq!(f.code, exit::CONFIG);
        assert!(f.message().contains("--user: no such user"), "{}", f.message());
        assert!(!dir.path().join("etc/web.toml").exists());
    }

    #[test]
    fn unit_values_reject_control_characters_and_escape_specifiers() {
        assert_eq!(unit_value("/run/a%b.sock", "x").ok().unwrap(), "/run/a%%b.sock");
        for bad in ["/run/a\nExecStartPre=/bin/sh", "/run/a\r", "/run/\u{7f}", "/run/a\\"] {
            let f = unit_value(bad, "--listen: address").expect_err(bad);
            assert_eq!(f.code, exit::CONFIG);
            assert!(!f.message().contains('\n'), "one line: {}", f.message());
        }
    }

    #[test]
    fn config_write_never_follows_symlinks_and_leaves_no_temp_file() {
        let dir = Scratch::new("init-symlink");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let target = dir.path().join("web.toml");
        // A symlink planted at the target is replaced, not written through.
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        let f = File { path: target.clone(), text: "x = 1\n".into(), mode: 0o600, group: None };
        write_file(&f).map_err(|f| f.message()).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "x = 1\n");
        let entries: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(entries.len(), 2, "no temp file left: {entries:?}");
        // A symlink planted at the temp name makes the write fail instead of following it.
        let tmp = dir.path().join(format!(".web.toml.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        assert!(write_file(&f).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }
}
