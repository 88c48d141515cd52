//! The `herdsman` binary: parses arguments, reads the environment once, maps errors to exit
//! codes (see `herdsman::exit`). Everything else lives in the library.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use herdsman::cli::{Cli, Command, RunArgs};
use herdsman::config::{self, Layer, Settings};
use herdsman::control::{client, paths, server};
use herdsman::listeners::{Activation, Listeners};
use herdsman::logging::Sink;
use herdsman::notify::{self, Notifier};
use herdsman::output::Output;
use herdsman::requests::Control;
use herdsman::steer::{SteerError, Steering};
use herdsman::supervisor::{self, World};
use herdsman::{exit, spawn, sys};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

fn main() -> ExitCode {
    sys::ensure_stdio_open();
    // The new image of an in-place upgrade: its state, not argv, says what to do.
    if let Some(fd) = var_opt(herdsman::upgrade::STATE_VAR) {
        return resume(&fd);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            herdsman::errln!("herdsman: {first} (see herdsman --help)");
            return code(exit::USAGE);
        }
    };
    match cli.command {
        Command::Run(args) => run(*args),
        Command::CheckConfig { file } => check_config(&file),
        Command::Status { target, json } => client_result(client::status(target.as_deref(), json, &env())),
        Command::Init(a) => init_result(herdsman::init::init(&a, cpus(), var_opt("SUDO_USER").as_deref())),
        Command::Remove(a) => init_result(herdsman::init::remove(&a)),
        Command::Generate { dir } => match herdsman::generate::write_all(&dir) {
            Ok(()) => code(exit::OK),
            Err(e) => {
                herdsman::errln!("herdsman: cannot write to {}: {e}", dir.display());
                code(exit::FAILURE)
            }
        },
        Command::Upgrade { target, binary, timeout } => match duration_arg(&timeout) {
            Ok(t) => client_result(client::upgrade(target.as_deref(), binary.as_deref(), t, &env())),
            Err(c) => c,
        },
        Command::UpgradeCheck => upgrade_check(),
        Command::Metrics { target } => client_result(client::metrics(target.as_deref(), &env())),
        Command::List { json } => client_result(client::list(json, &env())),
        Command::Reload { target, no_wait, wait: _, timeout } => match duration_arg(&timeout) {
            Ok(t) => client_result(client::reload(target.as_deref(), !no_wait, t, &env())),
            Err(c) => c,
        },
        Command::Scale { args, no_wait, timeout } => {
            let (target, workers) = match args.as_slice() {
                [w] => (None, w.as_str()),
                [t, w] => (Some(t.as_str()), w.as_str()),
                _ => unreachable!("clap enforces 1..=2 values"),
            };
            match duration_arg(&timeout) {
                Ok(t) => client_result(client::scale(target, workers, !no_wait, t, &env())),
                Err(c) => c,
            }
        }
    }
}

fn init_result(r: Result<(), herdsman::init::Failure>) -> ExitCode {
    match r {
        Ok(()) => code(exit::OK),
        Err(f) => {
            for line in f.message.lines() {
                herdsman::errln!("herdsman: {line}");
            }
            code(f.code)
        }
    }
}

fn var_opt(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// Sets up herdsman's own logging: structured journal entries when our stderr is the journal
/// (under systemd), else plain lines on stderr; either way through the non-blocking log queue
/// (see `herdsman::logging`). Returns the queue for worker lines when they go to the journal.
/// HERDSMAN_LOG=error|warn|info|debug|trace sets the verbosity. HERDSMAN_JOURNAL_SOCKET=PATH
/// sends everything to that native journal socket instead of /run/systemd/journal/socket,
/// whatever stderr is (for tests: a socket nobody reads stands in for a stalled journald).
fn logging(journal_stream: Option<&str>, journal_socket: Option<String>) -> Option<Sink> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = var_opt("HERDSMAN_LOG")
        .and_then(|l| l.parse::<tracing_subscriber::filter::LevelFilter>().ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::INFO);
    let journal = match journal_socket.filter(|s| !s.is_empty()) {
        Some(path) => Some(PathBuf::from(path)),
        None => herdsman::journal::stderr_is_journal(journal_stream)
            .then(|| PathBuf::from(herdsman::journal::SOCKET)),
    };
    if let Some(path) = journal {
        if let Ok(sink) = Sink::start(Some(path)) {
            let layer = herdsman::logging::JournalLayer::new(sink.clone());
            tracing_subscriber::registry().with(level).with(layer).init();
            return Some(sink);
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match Sink::start(None) {
        Ok(sink) => tracing_subscriber::fmt()
            .with_writer(sink.stderr_writer())
            .with_ansi(ansi)
            .with_target(false)
            .with_max_level(level)
            .init(),
        // No thread for the queue (resources exhausted at start): write directly, still
        // never panicking on an error.
        Err(_) => tracing_subscriber::fmt()
            .with_writer(|| IgnoreErrors(std::io::stderr()))
            .with_ansi(ansi)
            .with_target(false)
            .with_max_level(level)
            .init(),
    }
    None
}

/// A writer that reports success whatever happens (so `tracing` never prints its own error).
struct IgnoreErrors<W>(W);

impl<W: std::io::Write> std::io::Write for IgnoreErrors<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

fn env() -> paths::Env {
    paths::Env::from_process()
}

fn duration_arg(s: &str) -> Result<std::time::Duration, ExitCode> {
    config::values::duration(s).map_err(|e| {
        herdsman::errln!("herdsman: --timeout: {e}");
        code(exit::USAGE)
    })
}

fn client_result(r: Result<(), client::Failure>) -> ExitCode {
    match r {
        Ok(()) => code(exit::OK),
        Err(f) => {
            herdsman::errln!("herdsman: {}", f.message);
            code(f.code)
        }
    }
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(c as u8)
}

fn cpus() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

fn base_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .collect()
}

/// Loads the settings and checks that the command can be found.
fn load(file: Option<&PathBuf>, flags: &Layer) -> Result<Settings, config::Problems> {
    let s = config::load(file.map(PathBuf::as_path), flags, cpus())?;
    let mut env = base_env();
    env.extend(s.env.iter().cloned());
    spawn::resolve(&s.command[0], &env, s.cwd.as_deref())
        .map_err(|e| config::Problem::new(config::Place::Anywhere, e))?;
    Ok(s)
}

fn print_problems(p: &config::Problems) {
    for line in &p.0 {
        herdsman::errln!("herdsman: {line}");
    }
}

fn check_config(file: &PathBuf) -> ExitCode {
    match load(Some(file), &Layer::default()) {
        Ok(s) => {
            herdsman::outln!(
                "{}: ok (app {}, {} worker(s), command {:?})",
                file.display(),
                s.name,
                s.workers,
                s.command.join(" ")
            );
            code(exit::OK)
        }
        Err(p) => {
            print_problems(&p);
            code(exit::CONFIG)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let flags = args.layer();
    let settings = match load(args.config.as_ref(), &flags) {
        Ok(s) => s,
        Err(p) => {
            print_problems(&p);
            return code(exit::CONFIG);
        }
    };
    let journal = logging(var_opt("JOURNAL_STREAM").as_deref(), var_opt("HERDSMAN_JOURNAL_SOCKET"));
    if let Some(c) = kernel_and_limits() {
        return c;
    }

    let activation = Activation {
        listen_fds: var_opt("LISTEN_FDS"),
        listen_pid: var_opt("LISTEN_PID"),
        listen_fdnames: var_opt("LISTEN_FDNAMES"),
    };
    let steered = settings.balance != config::Balance::Shared;
    let listeners = match Listeners::open(&activation, std::process::id(), &settings.listen, steered) {
        Ok(l) => l,
        Err(e) => {
            herdsman::errln!("herdsman: {e}");
            return code(if e.is_config() { exit::CONFIG } else { exit::FAILURE });
        }
    };
    let steering = if steered {
        let copies = match listeners.copies() {
            Ok(c) => c,
            Err(e) => {
                herdsman::errln!("herdsman: cannot duplicate the listening sockets: {e}");
                return code(exit::FAILURE);
            }
        };
        match Steering::new(settings.balance, copies, settings.workers.get(), listeners.floor()) {
            Ok(s) => Some(s),
            Err(e) => {
                herdsman::errln!("herdsman: {e}");
                let config = matches!(e, SteerError::NotTcp { .. } | SteerError::NoReusePort { .. });
                return code(if config { exit::CONFIG } else { exit::FAILURE });
            }
        }
    } else {
        None
    };
    let paths_env = paths::Env::from_process();
    let default_control = paths::default_socket(&settings.name, &paths_env);
    if let Some(dir) = paths::fallback_dir(&paths_env) {
        if let Err(e) = paths::ensure_private_dir(&dir, paths_env.euid) {
            herdsman::errln!("herdsman: {e}");
            return code(if matches!(e, paths::PrivateDirError::NotOurs { .. }) {
                exit::CONFIG
            } else {
                exit::FAILURE
            });
        }
    }
    let control_path = settings.control.clone().unwrap_or(default_control);
    let group = settings
        .control_group
        .as_deref()
        .and_then(|g| nix::unistd::Group::from_name(g).ok().flatten())
        .map(|g| g.gid.as_raw());
    let control = match server::bind(&control_path, group) {
        Ok(b) => b,
        Err(e) => {
            herdsman::errln!("herdsman: {e}");
            return code(exit::FAILURE);
        }
    };
    let access = server::Access { uid: paths_env.euid, group };
    let metrics_bound = match settings.metrics.as_ref().map(herdsman::metrics::http::bind).transpose() {
        Ok(b) => b,
        Err(e) => {
            herdsman::errln!("herdsman: {e}");
            return code(exit::FAILURE);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    // Copies of the listening sockets, to read their queues (never their flags).
    let metrics = herdsman::metrics::Metrics::new(notify_dir(&settings), queue_copies(&listeners));
    // Where the next in-place upgrade re-executes from: this binary's installed path.
    let binary = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/bin/herdsman"));
    let parts = Parts {
        journal,
        listeners,
        steering,
        control,
        access,
        metrics_bound,
        metrics,
        notify: None,
        resume: None,
        config: args.config,
        overrides: flags,
        binary,
        argv: std::env::args().collect(),
    };
    serve(settings, parts, rt)
}

/// The workers' notify socket and metrics sockets live in the app's runtime directory (that
/// of the default control socket), whatever `--control` says.
fn notify_dir(settings: &Settings) -> Option<PathBuf> {
    paths::default_socket(&settings.name, &paths::Env::from_process()).parent().map(Path::to_path_buf)
}

fn queue_copies(listeners: &Listeners) -> Vec<(String, std::os::fd::OwnedFd)> {
    listeners.copies().unwrap_or_default().into_iter().map(|(addr, _, fd)| (addr, fd)).collect()
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
        herdsman::errln!("herdsman: cannot start the event loop: {e}");
        code(exit::FAILURE)
    })
}

/// What `run` (fresh) or `resume` (after an in-place upgrade) hands to [`serve`].
struct Parts {
    journal: Option<Sink>,
    listeners: Listeners,
    steering: Option<Steering>,
    control: server::Bound,
    access: server::Access,
    metrics_bound: Option<herdsman::metrics::http::Bound>,
    metrics: herdsman::metrics::Metrics,
    notify: Option<herdsman::notify::WorkerNotify>,
    resume: Option<supervisor::handover::Resumed>,
    config: Option<PathBuf>,
    /// The flags' layer, for reloads.
    overrides: Layer,
    binary: PathBuf,
    argv: Vec<String>,
}

/// Runs the loop with its control socket, metrics endpoint and signals until it stops.
fn serve(settings: Settings, p: Parts, rt: tokio::runtime::Runtime) -> ExitCode {
    let notifier = match Notifier::new(var_opt("NOTIFY_SOCKET").as_deref()) {
        Ok(n) => n,
        Err(e) => {
            herdsman::errln!("herdsman: NOTIFY_SOCKET is unusable ({e}); not notifying the service manager");
            Notifier::disabled()
        }
    };
    let watchdog = notify::watchdog_interval(
        var_opt("WATCHDOG_USEC").as_deref(),
        var_opt("WATCHDOG_PID").as_deref(),
        std::process::id(),
    );
    let reload_source: Option<supervisor::ReloadSource> = p.config.clone().map(|file| {
        let flags = p.overrides.clone();
        Box::new(move || load(Some(&file), &flags)) as supervisor::ReloadSource
    });
    let carry = (|| -> std::io::Result<herdsman::upgrade::Carry> {
        let control = std::os::fd::OwnedFd::from(p.control.listener.try_clone()?);
        Ok(herdsman::upgrade::Carry {
            binary: p.binary.clone(),
            config: p.config.clone(),
            overrides: p.overrides.clone(),
            argv: p.argv.clone(),
            env: base_env(),
            control: (control, p.control.path.clone(), p.control.made_dir(), p.access.uid, p.access.group),
            metrics_http: p.metrics_bound.as_ref().map(|b| b.carry()).transpose()?,
            check_timeout: var_opt("HERDSMAN_UPGRADE_CHECK_TIMEOUT")
                .and_then(|v| config::values::duration(&v).ok())
                .unwrap_or(herdsman::upgrade::CHECK_TIMEOUT),
        })
    })();
    let carry = match carry {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("in-place upgrades are unavailable: cannot keep copies of the sockets ({e})");
            None
        }
    };
    let Parts {
        journal, listeners, steering, control, access, metrics_bound, metrics, notify, resume, ..
    } = p;
    let notify_dir = notify_dir(&settings);
    let control_ref = &control;
    let metrics_ref = &metrics_bound;
    let result = rt.block_on(async move {
        let (tx, rx) = mpsc::channel(64);
        forward_signals(tx.clone())?;
        server::spawn(control_ref, tx.clone(), access, metrics.clone())?;
        if let Some(b) = metrics_ref {
            herdsman::metrics::http::serve(b, metrics.clone(), tx.clone())?;
        }
        let world = World {
            listeners,
            notifier,
            base_env: base_env(),
            output: journal.map(Output::journal).unwrap_or_else(Output::standalone),
            reload_source,
            watchdog,
            notify_dir,
            steering,
            metrics,
            carry,
            notify,
            resume,
        };
        supervisor::run(settings, world, rx).await
    });
    drop(control);
    drop(metrics_bound);
    // The last log lines are still in the log queue: let them out (bounded).
    herdsman::logging::flush(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => code(exit::OK),
        Err(e) => {
            herdsman::errln!("herdsman: {e:#}");
            code(exit::FAILURE)
        }
    }
}

/// The new image after an in-place upgrade (`HERDSMAN_UPGRADE_STATE` is set): takes over the
/// previous image's state and descriptors, all or nothing, then serves as `run` does.
fn resume(fd: &str) -> ExitCode {
    use herdsman::upgrade;
    let journal = logging(var_opt("JOURNAL_STREAM").as_deref(), var_opt("HERDSMAN_JOURNAL_SOCKET"));
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        tracing::error!("upgrade: the new image cannot take over ({what}: {e})");
        herdsman::errln!("herdsman: upgrade: the new image cannot take over ({what}: {e})");
        herdsman::logging::flush(std::time::Duration::from_secs(2));
        code(exit::FAILURE)
    };
    let state = (|| -> Result<upgrade::Handover, String> {
        let n: std::os::fd::RawFd =
            fd.trim().parse().map_err(|_| format!("{} is not a descriptor number", upgrade::STATE_VAR))?;
        let mut memfd = sys::HandedOver::adopt(&[n]).map_err(|e| e.to_string())?;
        let mut file = std::fs::File::from(memfd.take(n).map_err(|e| e.to_string())?);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| e.to_string())?;
        upgrade::parse(&bytes)
    })();
    let state = match state {
        Ok(s) => s,
        Err(e) => return fail("reading the state", &e),
    };
    if let Some(c) = kernel_and_limits() {
        return c;
    }
    sys::set_worker_fd_limit(state.worker_fd_limit);
    let mut fds = match sys::HandedOver::adopt(&state.fds) {
        Ok(f) => f,
        Err(e) => return fail("adopting the descriptors", &e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    let _entered = rt.enter();
    let settings = state.supervisor.settings.clone();
    let built = (|| -> std::io::Result<Parts> {
        let listeners = Listeners::adopt(state.listeners, &mut fds)?;
        let steering = state.steering.map(|s| Steering::adopt(s, &mut fds)).transpose()?;
        let notify = herdsman::notify::WorkerNotify::adopt(state.notify, &mut fds)?;
        let c = state.control;
        let control = server::Bound::adopt(fds.take(c.fd)?, c.path, c.made_dir)?;
        let metrics_bound = match state.metrics_http {
            Some(h) => Some(herdsman::metrics::http::Bound::adopt(fds.take(h.fd)?, h.unix, h.address)?),
            None => None,
        };
        let metrics = herdsman::metrics::Metrics::resume(
            notify_dir(&settings),
            queue_copies(&listeners),
            state.metrics,
        );
        let reply = state.reply.map(|r| fds.take(r)).transpose()?;
        let workers = state.supervisor.workers.len();
        let done = herdsman::control::protocol::UpgradeDone {
            version: upgrade::version().to_string(),
            from_version: state.from_version.clone(),
            pid: std::process::id(),
            upgrades: state.upgrades,
            took_ms: (upgrade::monotonic_ns() - state.exec_at_ns) as f64 / 1e6,
            workers,
        };
        let resumed = supervisor::handover::Resumed::take(
            state.supervisor,
            &mut fds,
            reply.map(|r| (r, done)),
            state.upgrades,
        )?;
        Ok(Parts {
            journal,
            listeners,
            steering,
            control,
            access: server::Access { uid: c.uid, group: c.group },
            metrics_bound,
            metrics,
            notify: Some(notify),
            resume: Some(resumed),
            config: state.config,
            overrides: state.overrides,
            binary: state.binary,
            argv: state.argv,
        })
    })();
    let parts = match built {
        Ok(p) => p,
        Err(e) => return fail("rebuilding from the state", &e),
    };
    if fds.left() > 0 {
        tracing::warn!("upgrade: {} handed-over descriptor(s) were not used and are closed", fds.left());
    }
    drop(fds);
    drop(_entered);
    serve(settings, parts, rt)
}

/// `herdsman upgrade-check`: the candidate side of an upgrade's check (see `upgrade`).
fn upgrade_check() -> ExitCode {
    match herdsman::upgrade::check_command(&mut std::io::stdin().lock()) {
        Ok(report) => {
            herdsman::outln!("{}", serde_json::to_string(&report).unwrap_or_default());
            code(exit::OK)
        }
        Err(e) => {
            herdsman::errln!("herdsman: {e}");
            code(exit::CONFIG)
        }
    }
}

/// Raises the soft fd limit, then checks that the kernel has what supervision needs (one line
/// and exit 71 if not).
fn kernel_and_limits() -> Option<ExitCode> {
    match sys::raise_fd_limit() {
        Ok((before, after)) if before != after => {
            tracing::debug!("raised the soft file descriptor limit from {before} to {after}")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the file descriptor limit: {e}"),
    }
    match sys::check_kernel() {
        Ok(k) if !k.close_range_cloexec => {
            tracing::debug!("close_range(CLOSE_RANGE_CLOEXEC) unavailable: closing worker fds one by one");
            None
        }
        Ok(_) => None,
        Err(e) => {
            herdsman::errln!("herdsman: {e}");
            Some(code(if e.is_unsupported() { exit::OS } else { exit::FAILURE }))
        }
    }
}

/// SIGHUP = reload, SIGTERM/SIGINT = stop, SIGTTIN/SIGTTOU = one worker more/less, SIGUSR2 =
/// in-place upgrade from the path herdsman was started from (as `herdsman upgrade`).
fn forward_signals(tx: mpsc::Sender<Control>) -> std::io::Result<()> {
    use herdsman::requests::{Scale, Waiter};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut ttin = signal(SignalKind::from_raw(libc::SIGTTIN))?;
    let mut ttou = signal(SignalKind::from_raw(libc::SIGTTOU))?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = hup.recv() => Control::Reload(Waiter::default()),
                _ = term.recv() => Control::Stop,
                _ = int.recv() => Control::Stop,
                _ = ttin.recv() => Control::Scale { scale: Scale::Add(1), wait: false, reply: None },
                _ = ttou.recv() => Control::Scale { scale: Scale::Remove(1), wait: false, reply: None },
                _ = usr2.recv() => Control::Upgrade { binary: None, reply: None, conn: None },
            };
            if tx.send(c).await.is_err() {
                break;
            }
        }
    });
    Ok(())
}
