//! Command-line definitions (clap derive). The app settings' flags are `config::Layer`'s
//! (one definition for the flag and the config key); their values are taken as strings and
//! validated in `config`, together with the config file, so both report problems the same way.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Layer;

#[derive(Debug, Parser)]
#[command(name = "herdsman", version, about = "Runs N copies of a server on shared sockets, with zero-downtime rolling reloads", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an app: bind (or inherit) its sockets and supervise its workers.
    ///
    /// Also a container entrypoint: as PID 1 (or, standalone, as a child subreaper) it reaps
    /// the orphans workers leave behind; SIGTERM/SIGINT stop it gracefully (exit 0);
    /// `--metrics` serves the probes `GET /ready` and `GET /live` (docs/containers.md).
    Run(Box<RunArgs>),
    /// Validate a config file: exit 0, or print every problem and exit 78.
    CheckConfig {
        /// The TOML app config to check.
        file: PathBuf,
    },
    /// Install an app as systemd units: config, socket address, enable and start (like pm2 startup + save).
    Init(Box<InitArgs>),
    /// Stop, disable and delete an app installed with `init`.
    Remove(RemoveArgs),
    /// Restart an app installed with `init` (its socket stays open: connections wait, none is refused).
    Restart(ServiceArgs),
    /// Stop an app installed with `init`: service and socket (connections are refused until `start`).
    Stop(ServiceArgs),
    /// Start an app installed with `init`: socket and service.
    Start(ServiceArgs),
    /// Write man pages and shell completions into DIR (used by packaging).
    #[command(hide = true)]
    Generate {
        /// Output directory.
        dir: PathBuf,
    },
    /// Show one app: a header and a table of its workers.
    Status {
        /// App name or control socket path (optional when one app runs).
        target: Option<String>,
        /// Machine-readable output (see docs/control.md for the schema).
        #[arg(long)]
        json: bool,
    },
    /// Show the workers' recent output lines, like pm2 logs (standalone: the supervisor's ring; under systemd: the journal).
    Logs {
        /// App name or control socket path (optional when one app runs).
        target: Option<String>,
        /// Keep printing new lines as workers write them (until interrupted).
        #[arg(short, long)]
        follow: bool,
        /// How many recent lines to print first.
        #[arg(short = 'n', long, value_name = "N", default_value_t = crate::logs::DEFAULT_LINES)]
        lines: usize,
        /// Only this worker's lines (its id, as in `status`).
        #[arg(long, value_name = "ID")]
        worker: Option<usize>,
        /// Only lines since TIME: a duration ago (10m, 2h), an RFC 3339 time in UTC, or @UNIX_SECONDS.
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// One JSON object per line: ts, app, worker, pid, generation, stream, line.
        #[arg(long)]
        json: bool,
    },
    /// Print the app's metrics (Prometheus text, herdsman's and its workers') through the control socket.
    Metrics {
        /// App name or control socket path (optional when one app runs).
        target: Option<String>,
    },
    /// List every app running on this host, one line each.
    List {
        /// Machine-readable output: an array of status objects.
        #[arg(long)]
        json: bool,
    },
    /// Rolling reload; waits for the end of the roll-out and fails if it failed.
    Reload {
        /// App name or control socket path (optional when one app runs).
        target: Option<String>,
        /// Return once the reload is requested, without waiting for the roll-out.
        #[arg(long, conflicts_with = "wait")]
        no_wait: bool,
        /// Wait for the end of the roll-out (the default).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long.
        #[arg(long, value_name = "DUR", default_value = "15m")]
        timeout: String,
    },
    /// Re-execute the supervisor in place from a new binary (same pid, every worker and socket kept).
    Upgrade {
        /// App name or control socket path (optional when one app runs).
        target: Option<String>,
        /// The herdsman binary to re-execute (default: the path the supervisor was started from).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Give up waiting after this long.
        #[arg(long, value_name = "DUR", default_value = "1m")]
        timeout: String,
    },
    /// Read an upgrade state on stdin and report whether this binary can take it over.
    #[command(hide = true)]
    UpgradeCheck,
    /// The unit's ExecStopPost= helper: kill what is left in UNIT's cgroup unless systemd
    /// restarts the service (then the next herdsman re-adopts the workers).
    #[command(hide = true)]
    StopPost {
        /// The unit (`%n`): this process must be in its cgroup.
        unit: String,
    },
    /// Set (N), add (+N) or remove (-N) workers; waits until done.
    Scale {
        /// [TARGET] N|+N|-N
        #[arg(num_args = 1..=2, required = true, allow_negative_numbers = true, value_name = "ARGS")]
        args: Vec<String>,
        /// Return once the change is requested.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this long.
        #[arg(long, value_name = "DUR", default_value = "5m")]
        timeout: String,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML app config; command-line flags override it.
    #[arg(short, long, value_name = "FILE", conflicts_with = "from_pm2")]
    pub config: Option<PathBuf>,
    /// App name (default: config file stem, else the command's basename; for an interpreter like
    /// node, python3, ruby, bun or deno, its script's stem: `node app.js` is `app`).
    #[arg(short, long, value_name = "NAME")]
    pub name: Option<String>,
    #[command(flatten)]
    pub app: Layer,
    /// Control socket path.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    #[command(flatten)]
    pub pm2: Pm2Args,
    /// Standalone output: "text", or "json" for one JSON object per line (herdsman's events and worker lines; for container log collectors). No effect under journald. Config `log_format` [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// The worker command and its arguments.
    #[arg(last = true, value_name = "COMMAND", conflicts_with = "from_pm2")]
    pub command: Vec<String>,
}

impl RunArgs {
    /// The flags' layer: the app flags with `--name`, `--control` and the command.
    pub fn layer(&self) -> Layer {
        Layer {
            name: self.name.clone(),
            control: self.control.clone(),
            log_format: self.log_format.clone(),
            command: self.command.clone(),
            ..self.app.clone()
        }
    }
}

/// `herdsman init NAME [options] -- COMMAND...` (or `init --from-pm2 FILE [options]`)
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// App name: the instance of herdsman@NAME.service and /etc/herdsman/NAME.toml.
    #[arg(required_unless_present = "from_pm2", conflicts_with = "from_pm2")]
    pub name: Option<String>,
    #[command(flatten)]
    pub app: Layer,
    /// Overwrite an existing app's configuration.
    #[arg(long)]
    pub force: bool,
    /// Print what would be written and run, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Write the files but do not enable or start the units.
    #[arg(long)]
    pub no_start: bool,
    /// Let members of this group use `herdsman status/reload/scale NAME` (config `control_group`).
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,
    /// Where app configs live.
    #[arg(long, value_name = "DIR", default_value = "/etc/herdsman", hide = true)]
    pub config_dir: PathBuf,
    /// Where unit drop-ins are written.
    #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system", hide = true)]
    pub unit_dir: PathBuf,
    #[command(flatten)]
    pub pm2: Pm2Args,
    /// The worker command and its arguments.
    #[arg(
        last = true,
        value_name = "COMMAND",
        required_unless_present = "from_pm2",
        conflicts_with = "from_pm2"
    )]
    pub command: Vec<String>,
}

/// `herdsman remove NAME --yes`
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// App name.
    pub name: String,
    /// Really stop, disable and delete the app (without it, only say what would happen).
    #[arg(long)]
    pub yes: bool,
    #[arg(long, value_name = "DIR", default_value = "/etc/herdsman", hide = true)]
    pub config_dir: PathBuf,
    #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system", hide = true)]
    pub unit_dir: PathBuf,
}

/// `herdsman restart|stop|start NAME`
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// App name (as given to `herdsman init`).
    pub name: String,
    #[arg(long, value_name = "DIR", default_value = "/etc/herdsman", hide = true)]
    pub config_dir: PathBuf,
    #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system", hide = true)]
    pub unit_dir: PathBuf,
}

/// The flags of `run` and `init` that take the apps from an ecosystem file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Pm2Args {
    /// Take the app(s) from a PM2 ecosystem file (ecosystem.config.js or .cjs, evaluated by node;
    /// .json; .yaml). With it, `--env NAME` merges the file's env_NAME over env, and
    /// `--listen APP=ADDR` gives app APP its address (default: :PORT from its env).
    #[arg(long, value_name = "FILE")]
    pub from_pm2: Option<PathBuf>,
    /// With --from-pm2: only these apps (comma-separated names; `run` needs exactly one).
    #[arg(long, value_name = "APP,…", value_delimiter = ',')]
    pub only: Vec<String>,
}
