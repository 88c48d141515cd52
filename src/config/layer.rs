//! [`Layer`]: every setting once, optional and as written. clap reads it (the app flags of `run`
//! and `init`), serde reads it (the TOML file, and the in-place upgrade's state), and `init`
//! writes it back as TOML. [`super::validate`] turns layers into [`super::Settings`].
//!
//! A field is a setting: its name is the TOML key (kebab-cased, the flag), its doc comment the
//! flag's help, its serde attribute the TOML types the file may use for it (each of those
//! functions is below, with the exact message for a wrong type). A setting that is not a flag
//! of both commands is `#[arg(skip)]`: `name`, `control` and the command are `run`'s own
//! arguments (`init` takes the name and the command differently, and no control path),
//! `control_group` is `init`'s flag, the back-off keys exist only in the file.
//!
//! A file is read one key at a time, so that a bad key does not hide the next one: every key
//! is deserialized on its own (unknown ones and wrong types become problems), then the good
//! keys together.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::problem::{ConfigError, Place, Problem, Problems};

/// The raw settings from one source: the command line or a config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Layer {
    #[arg(skip)]
    #[serde(deserialize_with = "string")]
    pub name: Option<String>,
    #[arg(skip)]
    #[serde(deserialize_with = "strings", skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Number of workers: N > 0; 0, "auto" or "max" = one per CPU; -K = CPUs minus K.
    #[arg(short, long, value_name = "COUNT", allow_hyphen_values = true)]
    #[serde(with = "count")]
    pub workers: Option<String>,
    /// Bind this socket when not socket-activated: HOST:PORT, :PORT (all addresses, IPv4 and IPv6),
    /// [V6]:PORT or unix:/path. Repeatable.
    #[arg(short, long, value_name = "ADDR")]
    #[serde(deserialize_with = "strings", skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<String>,
    /// Extra environment for workers. Repeatable. With --from-pm2, `--env NAME` merges the ecosystem's env_NAME.
    #[arg(short, long, value_name = "KEY=VALUE")]
    #[serde(with = "env", skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Workers' working directory.
    #[arg(long, value_name = "DIR")]
    #[serde(deserialize_with = "path")]
    pub cwd: Option<PathBuf>,
    /// Readiness: "auto" (listen for a worker that binds herdsman's address itself, else alive:1s), "listen" (the worker calls listen() on herdsman's socket; 1 s after its bind if it never does), "notify" (worker sends READY=1) or "alive:DURATION" [default: auto].
    #[arg(long, value_name = "MODE")]
    #[serde(deserialize_with = "string")]
    pub ready: Option<String>,
    /// How long a new worker may take to become ready [default: 60s].
    #[arg(long, value_name = "DUR")]
    #[serde(deserialize_with = "string")]
    pub ready_timeout: Option<String>,
    /// Signal asking a worker to drain and exit, or "message": PM2's 'shutdown' message over a Node worker's IPC channel [default: SIGTERM].
    #[arg(long, value_name = "SIG")]
    #[serde(deserialize_with = "string")]
    pub stop_signal: Option<String>,
    /// How long a worker may drain before SIGKILL [default: 30s].
    #[arg(long, value_name = "DUR")]
    #[serde(deserialize_with = "string")]
    pub stop_timeout: Option<String>,
    /// New workers started at a time during a rolling reload; the next starts once one is ready [default: 1].
    #[arg(long, value_name = "N")]
    #[serde(with = "integer")]
    pub reload_batch: Option<String>,
    /// During a reload, at most this many new workers run at once beside the old ones (starting, or ready and waiting out --min-ready); 1 replaces one worker after the other [default: no limit].
    #[arg(long, value_name = "N")]
    // Left out when unset, so an image that predates the key can still read an upgrade state.
    #[serde(with = "integer", skip_serializing_if = "Option::is_none")]
    pub reload_surge: Option<String>,
    /// During a reload, a new worker must stay ready (and running) this long before its old worker is stopped [default: 1s].
    #[arg(long, value_name = "DUR")]
    #[serde(deserialize_with = "string")]
    pub min_ready: Option<String>,
    /// After a failed reload: "rollback" the slots already moved to the previous generation, or "keep" them [default: rollback].
    #[arg(long, value_name = "MODE")]
    #[serde(deserialize_with = "string")]
    pub on_failure: Option<String>,
    /// How connections reach workers: "shared" (one socket), "steer" (a socket per worker; only ready, non-draining ones receive) or "sticky" (steer, by client address) [default: shared].
    #[arg(long, value_name = "MODE")]
    #[serde(deserialize_with = "string")]
    pub balance: Option<String>,
    /// A worker that binds herdsman's port itself (an unchanged app: `listen(8000)`) gets herdsman's socket instead: "auto" (where the kernel and sandbox allow it), "on" (fail the start if they do not) or "off" [default: auto].
    #[arg(long, value_name = "MODE")]
    #[serde(deserialize_with = "string")]
    pub bind_intercept: Option<String>,
    /// Per-worker watchdog: workers get WATCHDOG_USEC and must send WATCHDOG=1 this often; a hung one is replaced.
    #[arg(long, value_name = "DUR")]
    #[serde(deserialize_with = "string")]
    pub watchdog: Option<String>,
    /// Replace (gracefully) a worker whose memory (RSS summed over its process group) stays above this, e.g. 512M.
    #[arg(long, value_name = "SIZE")]
    #[serde(deserialize_with = "string")]
    pub max_memory: Option<String>,
    #[arg(skip)]
    #[serde(deserialize_with = "string")]
    pub backoff_initial: Option<String>,
    #[arg(skip)]
    #[serde(deserialize_with = "string")]
    pub backoff_max: Option<String>,
    #[arg(skip)]
    #[serde(deserialize_with = "string")]
    pub backoff_reset: Option<String>,
    #[arg(skip)]
    #[serde(deserialize_with = "path")]
    pub control: Option<PathBuf>,
    #[arg(skip)]
    #[serde(deserialize_with = "string")]
    pub control_group: Option<String>,
    /// Run workers as this user (name or uid): its primary and supplementary groups, HOME, USER, LOGNAME. Needs root.
    #[arg(long, value_name = "USER")]
    #[serde(deserialize_with = "string")]
    pub user: Option<String>,
    /// Override the workers' primary group (name or gid).
    #[arg(long, value_name = "GROUP")]
    #[serde(deserialize_with = "string")]
    pub group: Option<String>,
    /// Serve Prometheus/OpenMetrics `GET /metrics`, and the probes `GET /ready` and `GET /live`, on
    /// HOST:PORT, [V6]:PORT or unix:/path (default: off).
    #[arg(long, value_name = "ADDR")]
    #[serde(deserialize_with = "string")]
    pub metrics: Option<String>,
    /// For development: a rolling reload when files under PATH change (after 500 ms without changes, 5 s at most; never during a roll-out). Without PATH: the current directory. Repeatable.
    #[arg(long, value_name = "PATH", num_args = 0.., default_missing_value = ".")]
    #[serde(deserialize_with = "strings", skip_serializing_if = "Vec::is_empty")]
    pub watch: Vec<String>,
    /// Changes to paths matching GLOB do not count for --watch: a name (`*.tmp`, `dist`) or a path from the watched directory (`assets/**`); .git, node_modules, target, __pycache__, swap files and *.log never count. Repeatable.
    #[arg(long, value_name = "GLOB")]
    #[serde(deserialize_with = "strings", skip_serializing_if = "Vec::is_empty")]
    pub watch_ignore: Vec<String>,
    /// `run`'s `--log-format` (a flag of `run` only: under journald it changes nothing).
    #[arg(skip)]
    #[serde(deserialize_with = "string", skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
}

/// The keys a config file may contain: [`Layer`]'s fields, in order, as serde names them.
pub fn keys() -> &'static [&'static str] {
    /// A deserializer that only records the field list a struct asks for.
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Fields<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("fields recorded"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = Layer::deserialize(Fields(&mut fields));
    fields
}

/// A config file's layer, with what the validation needs to know about the file itself.
#[derive(Debug, Clone, Default)]
pub struct FileLayer {
    /// The path as given, for messages.
    pub path: PathBuf,
    /// The keys whose values could be read.
    pub layer: Layer,
    /// The keys that are in the file but could not be read (each is a problem already).
    pub unreadable: BTreeSet<String>,
}

impl FileLayer {
    /// Where a problem with `key` of this file is.
    pub fn key(&self, key: &str) -> Place {
        Place::Key { file: self.path.display().to_string(), key: key.to_string() }
    }
}

/// Reads a config file: its layer, and every problem with its keys (unknown keys, wrong types).
/// `Err`: the file cannot be read or is not TOML at all.
pub fn read(path: &Path) -> Result<(FileLayer, Vec<Problem>), Problems> {
    let file = Place::File(path.display().to_string());
    let text = std::fs::read_to_string(path)
        .map_err(|e| Problem::new(file.clone(), ConfigError::Unreadable(e.to_string())))?;
    let table = text.parse::<toml::Table>().map_err(|e| {
        let line = e.span().map(|s| text[..s.start].lines().count().max(1));
        let message = e.message().trim().replace('\n', " ");
        Problem::new(file.clone(), ConfigError::InvalidToml { line, message })
    })?;
    Ok(from_table(path, table))
}

/// The layer of a parsed file (see [`read`]). Problems: unknown keys first, then wrong types
/// in the order of [`keys`].
pub fn from_table(path: &Path, table: toml::Table) -> (FileLayer, Vec<Problem>) {
    let mut file = FileLayer { path: path.to_path_buf(), ..FileLayer::default() };
    let (mut unknown, mut wrong) = (Vec::new(), Vec::new());
    let mut good = toml::Table::new();
    for (key, value) in table {
        let Some(index) = keys().iter().position(|k| *k == key) else {
            unknown.push(Problem::new(file.key(&key), ConfigError::UnknownKey));
            file.unreadable.insert(key);
            continue;
        };
        let one = toml::Table::from_iter([(key.clone(), value)]);
        match deserialize(&one) {
            Ok(_) => good.extend(one),
            Err(e) => {
                // Several lines for a table with several bad entries (`env`).
                let place = file.key(&key);
                wrong.extend(
                    e.lines().map(|l| (index, Problem::new(place.clone(), ConfigError::WrongType(l.into())))),
                );
                file.unreadable.insert(key);
            }
        }
    }
    wrong.sort_by_key(|(index, _)| *index);
    let mut problems: Vec<Problem> = unknown.into_iter().chain(wrong.into_iter().map(|(_, p)| p)).collect();
    // Every key was read alone already; together they cannot fail (but would be reported).
    match deserialize(&good) {
        Ok(layer) => file.layer = layer,
        Err(e) => problems.push(Problem::new(
            Place::File(path.display().to_string()),
            ConfigError::WrongType(e.replace('\n', "; ")),
        )),
    }
    (file, problems)
}

/// Deserializes a layer from (part of) a file. Through TOML text rather than from the table
/// itself: only the document deserializer keeps dates apart from strings.
fn deserialize(table: &toml::Table) -> Result<Layer, String> {
    let text = toml::to_string(table).map_err(|e| e.to_string())?;
    toml::from_str(&text).map_err(|e| e.message().to_string())
}

impl Layer {
    /// The layer as the body of a config file.
    pub fn to_toml(&self) -> String {
        // Through a table: its keys are sorted, which keeps the file's order stable.
        toml::Table::try_from(self).and_then(|t| toml::to_string(&t)).unwrap_or_default()
    }
}

// The TOML types each kind of setting accepts, and the message for any other type. A JSON
// `null` (an unset setting in the upgrade state) reads as unset.

fn value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<toml::Value>, D::Error> {
    Option::<toml::Value>::deserialize(d)
}

/// A string.
fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match value(d)? {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(D::Error::custom(format!("expected a string, got {}", other.type_str()))),
    }
}

/// A path, written as a string.
fn path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    string(d).map(|s| s.map(PathBuf::from))
}

/// An array of strings.
fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let expected = "expected an array of strings";
    match value(d)? {
        None => Ok(Vec::new()),
        Some(toml::Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                toml::Value::String(s) => Ok(s),
                other => Err(D::Error::custom(format!("{expected}, found {} in it", other.type_str()))),
            })
            .collect(),
        Some(other) => Err(D::Error::custom(format!("{expected}, got {}", other.type_str()))),
    }
}

/// A worker count: an integer (`4`, `-2`) or a string (`"auto"`).
mod count {
    use super::*;

    /// As an integer when it reads back as the same text, else as the string.
    pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        match v.as_deref().map(|t| (t, t.parse::<i64>())) {
            Some((t, Ok(n))) if n.to_string() == t => s.serialize_i64(n),
            _ => v.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        match value(d)? {
            None => Ok(None),
            Some(toml::Value::Integer(n)) => Ok(Some(n.to_string())),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(other) => {
                Err(D::Error::custom(format!("expected a number or \"auto\", got {}", other.type_str())))
            }
        }
    }
}

/// An integer (`reload_batch`, `reload_surge`).
mod integer {
    use super::*;

    /// As the integer a flag's text (`2`, `02`, ` 2`) reads as; text that is no integer (an
    /// invalid flag, which never reaches a running app's upgrade state) as the string.
    pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        match v.as_deref().map(|t| t.trim().parse::<i64>()) {
            Some(Ok(n)) => s.serialize_i64(n),
            _ => v.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        match value(d)? {
            None => Ok(None),
            Some(toml::Value::Integer(n)) => Ok(Some(n.to_string())),
            Some(other) => {
                Err(D::Error::custom(format!("expected a positive integer, got {}", other.type_str())))
            }
        }
    }
}

/// The environment: a table of strings in the file (`env = { A = "1" }`), `KEY=VALUE` entries
/// on the command line (`-e A=1`), which is how the layer holds them.
mod env {
    use std::collections::BTreeMap;

    use super::*;

    pub fn serialize<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
        let mut table = BTreeMap::new();
        for entry in v {
            let (k, v) = entry
                .split_once('=')
                .ok_or_else(|| serde::ser::Error::custom(format!("invalid environment entry {entry:?}")))?;
            table.insert(k, v);
        }
        table.serialize(s)
    }

    /// Every bad entry is a line of the error (each becomes its own problem).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        let table = match value(d)? {
            None => return Ok(Vec::new()),
            Some(toml::Value::Table(t)) => t,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "expected a table like env = {{ NODE_ENV = \"production\" }}, got {}",
                    other.type_str()
                )));
            }
        };
        let mut entries = Vec::new();
        let mut bad = Vec::new();
        for (k, v) in table {
            match v {
                toml::Value::String(s) if crate::config::values::env_key_ok(&k) => {
                    entries.push(format!("{k}={s}"))
                }
                toml::Value::String(_) => bad.push(format!("invalid variable name {k:?}")),
                other => bad.push(format!("`{k}` must be a string (quote it), got {}", other.type_str())),
            }
        }
        if bad.is_empty() { Ok(entries) } else { Err(D::Error::custom(bad.join("\n"))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_keys_are_the_layer_fields_in_order() {
        // The TOML keys are public: this list may grow, never change.
        let keys = [
            "name",
            "command",
            "workers",
            "listen",
            "env",
            "cwd",
            "ready",
            "ready_timeout",
            "stop_signal",
            "stop_timeout",
            "reload_batch",
            "reload_surge",
            "min_ready",
            "on_failure",
            "balance",
            "bind_intercept",
            "watchdog",
            "max_memory",
            "backoff_initial",
            "backoff_max",
            "backoff_reset",
            "control",
            "control_group",
            "user",
            "group",
            "metrics",
            "watch",
            "watch_ignore",
            "log_format",
        ];
        assert_eq!(super::keys(), keys);
    }

    #[test]
    fn every_flag_is_its_key_in_kebab_case() {
        // `validate` names a flag after its key; clap names it after the field.
        let cmd = <Layer as clap::Args>::augment_args(clap::Command::new("t"));
        let flags: Vec<String> = cmd.get_arguments().filter_map(|a| a.get_long()).map(String::from).collect();
        assert!(flags.contains(&"reload-batch".to_string()), "{flags:?}");
        for flag in flags {
            assert!(keys().contains(&flag.replace('-', "_").as_str()), "--{flag} is no key");
        }
    }

    fn read_text(text: &str) -> (FileLayer, Vec<Problem>) {
        from_table(Path::new("app.toml"), text.parse().unwrap())
    }

    #[test]
    fn every_key_of_a_wrong_type_is_one_problem_naming_it() {
        for key in keys() {
            for (value, got) in [("true", "boolean"), ("1979-05-27", "datetime"), ("1.5", "float")] {
                let (file, problems) = read_text(&format!("{key} = {value}"));
                assert_eq!(problems.len(), 1, "{key} = {value}: {problems:?}");
                assert_eq!(problems[0].place, file.key(key));
                assert!(
                    matches!(&problems[0].error, ConfigError::WrongType(m) if m.contains(got)),
                    "{problems:?}"
                );
                assert!(file.unreadable.contains(*key) && file.layer == Layer::default());
            }
        }
    }

    #[test]
    fn a_file_layer_keeps_the_good_keys_and_lists_the_rest() {
        let (file, problems) = read_text(
            "workers = 3\nreload_batch = 2\nenv = { B = \"2\", A = 1, \"C=D\" = \"x\" }\ncolour = 1\nname = 5",
        );
        assert_eq!(
            (file.layer.workers.as_deref(), file.layer.reload_batch.as_deref()),
            (Some("3"), Some("2"))
        );
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "app.toml: key `colour`: unknown key; allowed keys are: name, command, workers, listen, env, cwd, ready, ready_timeout, stop_signal, stop_timeout, reload_batch, reload_surge, min_ready, on_failure, balance, bind_intercept, watchdog, max_memory, backoff_initial, backoff_max, backoff_reset, control, control_group, user, group, metrics, watch, watch_ignore, log_format",
                "app.toml: key `name`: expected a string, got integer",
                "app.toml: key `env`: `A` must be a string (quote it), got integer",
                "app.toml: key `env`: invalid variable name \"C=D\"",
            ]
        );
    }

    #[test]
    fn the_flags_layer_round_trips_through_the_upgrade_state() {
        let flags = Layer {
            name: Some("api".into()),
            command: vec!["node".into(), "app.js".into()],
            workers: Some("-2".into()),
            listen: vec![":8080".into(), "unix:/run/a.sock".into()],
            env: vec!["A=1".into(), "B=x=y".into()],
            cwd: Some("/srv".into()),
            reload_batch: Some("2".into()),
            max_memory: Some("512M".into()),
            control: Some("/run/c.sock".into()),
            user: Some("www-data".into()),
            ..Layer::default()
        };
        let json = serde_json::to_string(&flags).unwrap();
        assert_eq!(serde_json::from_str::<Layer>(&json).unwrap(), flags, "{json}");
        // A flag's text that reads as a number is kept as that number.
        let batch =
            Layer { reload_batch: Some(" 02".into()), workers: Some("03".into()), ..Layer::default() };
        let back: Layer = serde_json::from_str(&serde_json::to_string(&batch).unwrap()).unwrap();
        assert_eq!((back.reload_batch.as_deref(), back.workers.as_deref()), (Some("2"), Some("03")));
    }

    #[test]
    fn the_layer_is_written_as_toml_the_file_reads_back() {
        let layer = Layer {
            workers: Some("4".into()),
            reload_batch: Some("3".into()),
            env: vec!["Z=1".into(), "A=2".into()],
            listen: vec!["127.0.0.1:80".into()],
            ..Layer::default()
        };
        let text = layer.to_toml();
        assert_eq!(
            text,
            "listen = [\"127.0.0.1:80\"]\nreload_batch = 3\nworkers = 4\n\n[env]\nA = \"2\"\nZ = \"1\"\n"
        );
        let (file, problems) = read_text(&text);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(file.layer, Layer { env: vec!["A=2".into(), "Z=1".into()], ..layer });
    }
}
