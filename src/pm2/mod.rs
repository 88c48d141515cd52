//! `--from-pm2 FILE`: a PM2 ecosystem file as herdsman apps, for `herdsman init` (every
//! selected app installed exactly as `herdsman init NAME ... -- COMMAND` installs one) and
//! `herdsman run` (one app, `--only APP`, standalone).
//!
//! Theory of operation: the file is read into JSON ([`read`]: `node` evaluates a `.js`/`.cjs`
//! file in a child process with a timeout; `.json` and `.yaml` are parsed here). Each object of
//! its `apps` (or of a bare array) is mapped ([`map`]) to an app name and a settings
//! [`Layer`], the same raw form the command-line flags and the TOML file have, so the settings
//! are validated by `config` and written by `init` like any others. The command-line flags then
//! apply to every selected app as they would over a config file, with two PM2 readings:
//! `--env NAME` (no `=`) selects the ecosystem's `env_NAME`, and `--listen APP=ADDR` gives one
//! app its address. An app's address is that, else `:PORT` when its environment has `PORT`,
//! else none (`run` then learns it from the first worker's own bind). Every key herdsman does
//! not map is one line on stderr saying what herdsman does instead: nothing is dropped
//! silently. The mapping table is docs/pm2.md.

mod map;
mod read;
mod value;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

pub use crate::cli::Pm2Args;
use crate::cli::{InitArgs, RunArgs};
use crate::config::{self, Layer};
use crate::exit::{self, Failure};
use crate::init;

pub use read::NODE_TIMEOUT;

/// An app of the file, mapped, with the flags applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Selected {
    pub name: String,
    /// Every setting, the command included (not the name).
    pub layer: Layer,
}

/// `herdsman run --from-pm2 FILE --only APP`: the run arguments of that app (the arguments
/// unchanged without `--from-pm2`). Prints a line per key herdsman does not map.
pub fn run_args(mut args: RunArgs) -> Result<RunArgs, Failure> {
    let config = |message: String| init::fail(exit::CONFIG, message);
    let Some(file) = args.pm2.from_pm2.take() else {
        return if args.pm2.only.is_empty() { Ok(args) } else { Err(only_alone()) };
    };
    let only = std::mem::take(&mut args.pm2.only);
    let (mut apps, notes) = load(&file, &only, &args.app, NODE_TIMEOUT).map_err(config)?;
    if only.len() != 1 {
        let names: Vec<&str> = apps.iter().map(|a| a.name.as_str()).collect();
        return Err(config(format!(
            "run --from-pm2 runs one app: name it with --only APP ({} has: {}); install them all with `herdsman init --from-pm2`",
            file.display(),
            names.join(", ")
        )));
    }
    print_notes(&notes);
    let mut app = apps.remove(0);
    args.name = args.name.or(Some(app.name));
    args.command = std::mem::take(&mut app.layer.command);
    args.app = app.layer;
    Ok(args)
}

/// `herdsman init --from-pm2 FILE [--only APP,…]`: every selected app installed by
/// [`init::init`], after every one of them was checked (so a bad second app installs nothing).
pub fn init(a: &InitArgs, cpus: std::num::NonZeroUsize, sudo_user: Option<&str>) -> Result<(), Failure> {
    let config = |message: String| init::fail(exit::CONFIG, message);
    let Some(file) = &a.pm2.from_pm2 else { return Err(only_alone()) };
    let (apps, notes) = load(file, &a.pm2.only, &a.app, NODE_TIMEOUT).map_err(config)?;
    print_notes(&notes);
    for app in &apps {
        let name = &app.name;
        if app.layer.listen.is_empty() {
            return Err(config(format!(
                "app {name}: no address for herdsman@{name}.socket: add --listen {name}=ADDR (like {name}=127.0.0.1:3000), or PORT to its env in {}",
                file.display()
            )));
        }
        let path = a.config_dir.join(format!("{name}.toml"));
        if path.exists() && !a.force && !a.dry_run {
            return Err(init::fail(
                exit::FAILURE,
                format!(
                    "app {name} already exists ({}); pass --force to overwrite it (nothing was installed)",
                    path.display()
                ),
            ));
        }
        let layer = Layer { name: Some(name.clone()), ..app.layer.clone() };
        let s = config::load(None, &layer, cpus).map_err(|p| {
            let lines: Vec<String> = p.0.iter().map(|l| format!("app {name}: {l}")).collect();
            config(lines.join("\n"))
        })?;
        // The program, found as `init` will look for it (our PATH, then the app's env).
        if let Some(program) = s.command.first().filter(|p| !p.contains('/')) {
            let mut env: Vec<(String, String)> = std::env::vars().collect();
            env.extend(s.env.iter().cloned());
            crate::program::resolve(program, &env, s.cwd.as_deref())
                .map_err(|e| config(format!("app {name}: {e}")))?;
        }
    }
    for app in apps {
        let mut layer = app.layer;
        let command = std::mem::take(&mut layer.command);
        let one =
            InitArgs { name: Some(app.name), app: layer, command, pm2: Pm2Args::default(), ..a.clone() };
        init::init(&one, cpus, sudo_user)?;
    }
    Ok(())
}

/// `--only` without `--from-pm2`.
fn only_alone() -> Failure {
    init::fail(exit::USAGE, "--only selects apps of an ecosystem file: add --from-pm2 FILE, or remove --only")
}

/// `(key, what herdsman does instead)`.
type Note = (String, String);

fn print_notes(notes: &[String]) {
    for n in notes {
        crate::errln!("herdsman: {n}");
    }
}

/// The flags, read the PM2 way.
#[derive(Debug, Default)]
struct Flags {
    /// `--env NAME`.
    env_name: Option<String>,
    /// `--env KEY=VALUE` entries.
    env: Vec<String>,
    /// `--listen [APP=]ADDR`.
    listen: Vec<(Option<String>, String)>,
    /// Every other flag.
    rest: Layer,
}

fn split_flags(flags: &Layer) -> Result<Flags, String> {
    let mut f = Flags { rest: flags.clone(), ..Flags::default() };
    for e in std::mem::take(&mut f.rest.env) {
        if e.contains('=') {
            f.env.push(e);
        } else if let Some(prev) = f.env_name.replace(e.clone()) {
            return Err(format!(
                "--env {prev} and --env {e}: give one PM2 environment (the file's env_NAME), or KEY=VALUE"
            ));
        }
    }
    for l in std::mem::take(&mut f.rest.listen) {
        // An address has no '=' before a ':', '/' or '[' (`unix:/run/a=b` is an address).
        match l.split_once('=') {
            Some((app, addr)) if !app.is_empty() && !app.contains([':', '/', '[']) => {
                f.listen.push((Some(app.to_string()), addr.to_string()));
            }
            _ => f.listen.push((None, l)),
        }
    }
    Ok(f)
}

/// Reads `file`, maps its apps, keeps those `only` names (all when empty), and applies the
/// flags. Also the lines to print: one per key herdsman does not map.
fn load(
    file: &Path,
    only: &[String],
    flags: &Layer,
    timeout: Duration,
) -> Result<(Vec<Selected>, Vec<String>), String> {
    let f = split_flags(flags)?;
    let shown = file.display();
    let value = read::read(file, timeout)?;
    let (entries, top_notes) = entries(&value).map_err(|e| format!("{shown}: {e}"))?;
    let mut notes: Vec<String> = top_notes.into_iter().map(|(k, n)| format!("{shown}: `{k}`: {n}")).collect();
    let base = map::base_dir(file);
    let mut apps: Vec<map::App> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let which = match entry.get("name") {
            Some(Value::String(n)) => format!("app {n}"),
            _ => format!("apps[{i}]"),
        };
        let app =
            map::app(i, entry, f.env_name.as_deref(), &base).map_err(|e| format!("{shown}: {which}: {e}"))?;
        if apps.iter().any(|a| a.name == app.name) {
            return Err(format!("{shown}: two apps are named {}; give each its own name", app.name));
        }
        apps.push(app);
    }
    if apps.is_empty() {
        return Err(format!("{shown}: no apps; add one to `apps`"));
    }
    let names = || apps.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ");
    if let Some(missing) = only.iter().find(|o| !apps.iter().any(|a| &a.name == *o)) {
        return Err(format!(
            "--only {missing}: {shown} has no app {missing} (its apps: {}); fix --only",
            names()
        ));
    }
    let chosen: Vec<map::App> =
        apps.iter().filter(|a| only.is_empty() || only.contains(&a.name)).cloned().collect();
    for (app, addr) in &f.listen {
        match app {
            Some(a) if !chosen.iter().any(|c| &c.name == a) => {
                return Err(format!(
                    "--listen {a}={addr}: no app {a} selected (the apps: {}); fix the name",
                    names()
                ));
            }
            None if chosen.len() != 1 => {
                return Err(format!(
                    "--listen {addr}: which app? with several apps write --listen APP={addr} (the apps: {})",
                    names()
                ));
            }
            _ => {}
        }
    }
    let mut selected = Vec::new();
    for app in chosen {
        for (key, note) in &app.notes {
            let note = note.replace("NAME", &app.name);
            notes.push(format!("{shown}: app {}: `{key}`: {note}", app.name));
        }
        let mut layer = app.layer;
        // The flags' KEY=VALUE entries over the app's own.
        for e in &f.env {
            let key = e.split('=').next().unwrap_or_default();
            layer.env.retain(|have| have.split('=').next() != Some(key));
            layer.env.push(e.clone());
        }
        layer.listen = f
            .listen
            .iter()
            .filter(|(a, _)| a.as_ref().is_none_or(|a| *a == app.name))
            .map(|(_, addr)| addr.clone())
            .collect();
        if layer.listen.is_empty() {
            if let Some(port) = layer.env.iter().find_map(|e| e.strip_prefix("PORT=")) {
                let ok = port.trim().parse::<u16>().is_ok_and(|p| p > 0);
                if !ok {
                    return Err(format!(
                        "{shown}: app {}: PORT={port:?} is not a port number; fix it, or give --listen {}=ADDR",
                        app.name, app.name
                    ));
                }
                layer.listen.push(format!(":{}", port.trim()));
            }
        }
        let layer = overlay(&layer, &f.rest)?;
        selected.push(Selected { name: app.name, layer });
    }
    Ok((selected, notes))
}

/// The apps of the file's top level: `{ apps: [...] }` (PM2's `module.exports`), a bare array,
/// or one app object; and a note for every other top-level key.
fn entries(value: &Value) -> Result<(Vec<&Value>, Vec<Note>), String> {
    let mut notes = Vec::new();
    let apps = match value {
        Value::Array(items) => items.iter().collect(),
        Value::Object(obj) if obj.contains_key("apps") => {
            for key in obj.keys().filter(|k| *k != "apps") {
                let note = if key == "deploy" {
                    "herdsman does not deploy: switch the release, then `herdsman reload NAME` (see docs/fleet.md)"
                } else {
                    "unknown top-level key: ignored (herdsman reads `apps`)"
                };
                notes.push((key.clone(), note.to_string()));
            }
            match &obj["apps"] {
                Value::Array(items) => items.iter().collect(),
                one @ Value::Object(_) => vec![one],
                other => {
                    return Err(format!("`apps` must be an array of app objects, got {}", other_kind(other)));
                }
            }
        }
        Value::Object(obj) if obj.contains_key("script") => vec![value],
        other => {
            return Err(format!(
                "expected module.exports = {{ apps: [...] }} (or an array of apps), got {}; fix the file",
                other_kind(other)
            ));
        }
    };
    Ok((apps, notes))
}

fn other_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing (null)",
        Value::Object(_) => "an object without `apps`",
        other => value::kind(other),
    }
}

/// `base` with every setting `top` has replaced by `top`'s (as flags override a file).
/// Through TOML: a setting that is not set is not written, whatever settings `Layer` has.
fn overlay(base: &Layer, top: &Layer) -> Result<Layer, String> {
    let table = |l: &Layer| toml::Table::try_from(l).map_err(|e| format!("cannot apply the flags: {e}"));
    let mut merged = table(base)?;
    merged.extend(table(top)?);
    let text = toml::to_string(&merged).map_err(|e| format!("cannot apply the flags: {e}"))?;
    toml::from_str(&text).map_err(|e| format!("cannot apply the flags: {}", e.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::scratch::Scratch;

    const TWO: &str = r#"{"apps": [
        {"name": "api", "script": "api.js", "instances": 2, "exec_mode": "cluster",
         "env": {"PORT": "3000", "A": "1"}, "env_production": {"A": "2"}},
        {"name": "jobs", "script": "jobs.js", "instances": "max", "watch": true, "env": {}}
    ], "deploy": {}}"#;

    fn flags(args: &[&str]) -> Layer {
        use clap::Parser;
        let mut argv = vec!["herdsman", "run"];
        argv.extend_from_slice(args);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Run(a) => a.app,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flags_apply_to_every_app_env_name_selects_env_name_listen_app_names_one() {
        let dir = Scratch::new("pm2mod-flags");
        let file = dir.file("ecosystem.json", TWO);
        let f = flags(&[
            "--env",
            "production",
            "-e",
            "B=3",
            "--listen",
            "jobs=unix:/run/j.sock",
            "--stop-timeout",
            "9s",
        ]);
        let (apps, notes) = load(&file, &[], &f, NODE_TIMEOUT).unwrap();
        assert_eq!(apps.len(), 2);
        let (api, jobs) = (&apps[0].layer, &apps[1].layer);
        assert_eq!(api.env, ["A=2", "B=3", "PORT=3000"]);
        assert_eq!(api.listen, [":3000"], "PORT from the env");
        assert_eq!(jobs.listen, ["unix:/run/j.sock"]);
        assert_eq!((api.stop_timeout.as_deref(), jobs.stop_timeout.as_deref()), (Some("9s"), Some("9s")));
        assert_eq!((api.workers.as_deref(), jobs.workers.as_deref()), (Some("2"), Some("max")));
        assert_eq!(api.cwd.as_deref(), Some(dir.path()), "relative to the file");
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("`deploy`")), "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("app jobs: `watch`")), "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("app jobs: `env_production`")), "{notes:?}");
        // The flags override the file, like over a config file.
        let (apps, _) =
            load(&file, &["api".into()], &flags(&["-w", "5", "-e", "A=9"]), NODE_TIMEOUT).unwrap();
        assert_eq!(apps.len(), 1);
        assert_eq!(apps[0].layer.workers.as_deref(), Some("5"));
        assert_eq!(apps[0].layer.env, ["A=9", "PORT=3000"]);
    }

    #[test]
    fn bad_selections_and_flags_are_one_line_errors() {
        let dir = Scratch::new("pm2mod-errors");
        let file = dir.file("ecosystem.json", TWO);
        let err = |only: &[&str], args: &[&str]| {
            let only: Vec<String> = only.iter().map(|s| s.to_string()).collect();
            let e = load(&file, &only, &flags(args), NODE_TIMEOUT).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
            e
        };
        assert!(err(&["web"], &[]).contains("has no app web (its apps: api, jobs)"));
        assert!(err(&[], &["--listen", "127.0.0.1:80"]).contains("which app?"));
        assert!(err(&[], &["--listen", "web=127.0.0.1:80"]).contains("no app web"));
        assert!(err(&[], &["--env", "a", "--env", "b"]).contains("one PM2 environment"));
        let bad =
            dir.file("bad.json", r#"{"apps": [{"name": "x", "script": "x.js", "env": {"PORT": "http"}}]}"#);
        let e = load(&bad, &[], &Layer::default(), NODE_TIMEOUT).unwrap_err();
        assert!(e.contains("PORT=\"http\" is not a port"), "{e}");
        let dup =
            dir.file("dup.json", r#"[{"name": "x", "script": "x.js"}, {"name": "x", "script": "y.js"}]"#);
        assert!(
            load(&dup, &[], &Layer::default(), NODE_TIMEOUT).unwrap_err().contains("two apps are named x")
        );
        let none = dir.file("none.json", r#"{"apps": []}"#);
        assert!(load(&none, &[], &Layer::default(), NODE_TIMEOUT).unwrap_err().contains("no apps"));
        let odd = dir.file("odd.json", "42");
        let e = load(&odd, &[], &Layer::default(), NODE_TIMEOUT).unwrap_err();
        assert!(e.contains("module.exports = { apps: [...] }"), "{e}");
    }

    #[test]
    fn overlay_keeps_the_base_and_takes_what_the_top_sets() {
        let base = Layer {
            command: vec!["node".into(), "a.js".into()],
            workers: Some("max".into()),
            env: vec!["A=1".into()],
            max_memory: Some("300M".into()),
            ..Layer::default()
        };
        let top = Layer { workers: Some("3".into()), user: Some("nobody".into()), ..Layer::default() };
        let merged = overlay(&base, &top).unwrap();
        assert_eq!(merged, Layer { workers: Some("3".into()), user: Some("nobody".into()), ..base.clone() });
        assert_eq!(overlay(&base, &Layer::default()).unwrap(), base);
    }
}
