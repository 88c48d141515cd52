//! Reading an ecosystem file into JSON, whatever it is written in: `.js`/`.cjs`/`.mjs` are
//! programs, evaluated by `node` in a child process (bounded by a timeout, its own process
//! group killed at the deadline); `.json` is read as JSON; `.yaml`/`.yml` as YAML 1.2 (the
//! core schema PM2's own YAML reader uses: `yes` is a string, not a boolean).

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long `node` may take to evaluate an ecosystem file.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// Marks the line of `node`'s output that holds the answer: whatever the file itself prints
/// (a `console.log` at load) comes before it.
const MARK: &str = "\u{1}herdsman-pm2\u{1}";

/// Requires the file (an ES module through `import()`), prints `module.exports` as JSON after
/// [`MARK`] and exits at once (a file that leaves a timer or a socket open would keep node up);
/// an error is one line after the mark on stderr.
const EVALUATE: &str = r#"
const MARK = '\u0001herdsman-pm2\u0001';
const file = process.argv[1];
const fail = (e) => {
  const m = e && e.message ? e.message : String(e);
  process.stderr.write('\n' + MARK + m.split('\n')[0] + '\n');
  process.exit(1);
};
const unwrap = (m) => (m && m[Symbol.toStringTag] === 'Module' && 'default' in m ? m.default : m);
const done = (v) => {
  try {
    const json = JSON.stringify(unwrap(v) === undefined ? null : unwrap(v));
    process.stdout.write('\n' + MARK + json + '\n');
    process.exit(0);
  } catch (e) {
    fail(e);
  }
};
try {
  done(require(file));
} catch (e) {
  if (e && e.code === 'ERR_REQUIRE_ESM') {
    import(require('url').pathToFileURL(file).href).then(done, fail);
  } else {
    fail(e);
  }
}
"#;

/// The file's content as JSON. `Err`: one line saying what went wrong and what to do.
pub fn read(path: &Path, timeout: Duration) -> Result<Value, String> {
    let file = path.display();
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "js" | "cjs" | "mjs" => node("node", path, timeout),
        "json" | "yaml" | "yml" => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {file}: {e}"))?;
            if ext == "json" {
                serde_json::from_str(&text).map_err(|e| format!("{file} is not valid JSON: {e}; fix it"))
            } else {
                yaml(&text).map_err(|e| format!("{file} is not valid YAML: {e}; fix it"))
            }
        }
        _ => Err(format!(
            "{file}: not an ecosystem file herdsman reads; name it ecosystem.config.js (or .cjs), ecosystem.json or ecosystem.yaml"
        )),
    }
}

/// Evaluates a JavaScript ecosystem file with `program` (`node`, from `PATH`), in our working
/// directory and environment, as `pm2 start ecosystem.config.js` does.
fn node(program: &str, path: &Path, timeout: Duration) -> Result<Value, String> {
    use std::os::unix::process::CommandExt as _;
    let file = path.display();
    if !path.is_file() {
        return Err(format!("cannot read {file}: no such file"));
    }
    let abs = std::path::absolute(path).map_err(|e| format!("cannot read {file}: {e}"))?;
    let mut child = Command::new(program)
        .arg("-e")
        .arg(EVALUATE)
        .arg(&abs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: at the deadline the whole group goes, with whatever the file started.
        .process_group(0)
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "reading {file} needs node, which is not installed (or not on PATH); install Node.js, or convert the file once where node is: node -p 'JSON.stringify(require(\"./{name}\"))' > ecosystem.json",
                    name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
                )
            } else {
                format!("cannot run node to read {file}: {e}")
            }
        })?;
    let (tx, rx) = std::sync::mpsc::channel();
    for (stream, r) in [
        (0, child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>)),
        (1, child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>)),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                // At most 16 MiB: an ecosystem file is small.
                let _ = r.by_ref().take(16 << 20).read_to_end(&mut buf);
            }
            let _ = tx.send((stream, buf));
        });
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => break None,
        }
    };
    let Some(status) = status else {
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        return Err(format!(
            "node did not finish evaluating {file} within {}s (stopped); make the file only export the apps (no server, prompt or wait at load)",
            timeout.as_secs_f64()
        ));
    };
    // The output, read to its end (or as far as it got, if something the file started still
    // holds the pipes).
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let end = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok((0, b)) => out = b,
            Ok((_, b)) => err = b,
            Err(_) => break,
        }
    }
    let (out, err) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    let answer = |text: &str| {
        text.rfind(MARK).map(|i| text[i + MARK.len()..].lines().next().unwrap_or("").to_string())
    };
    if !status.success() {
        let why = answer(&err)
            .or_else(|| err.lines().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_string()))
            .unwrap_or_else(|| format!("node exited with {status}"));
        return Err(format!("{file} failed to load in node: {why}; fix the file"));
    }
    let json = answer(&out)
        .ok_or_else(|| format!("node printed no apps for {file}; check that it sets module.exports"))?;
    serde_json::from_str(&json)
        .map_err(|e| format!("node's answer for {file} is not JSON ({e}); report this"))
}

/// The first document of a YAML text, as JSON.
fn yaml(text: &str) -> Result<Value, String> {
    let docs = yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
    docs.first().map_or(Ok(Value::Null), to_json)
}

fn to_json(y: &yaml_rust2::Yaml) -> Result<Value, String> {
    use yaml_rust2::Yaml;
    Ok(match y {
        Yaml::Real(s) => {
            let f: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
            serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
        }
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect::<Result<_, _>>()?),
        Yaml::Hash(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let key = match k {
                    Yaml::String(s) | Yaml::Real(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("a key must be a string, got {other:?}")),
                };
                out.insert(key, to_json(v)?);
            }
            Value::Object(out)
        }
        Yaml::Alias(_) => return Err("aliases are not supported; write the value out".into()),
        Yaml::Null | Yaml::BadValue => Value::Null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::scratch::Scratch;

    fn have_node() -> bool {
        let ok = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("SKIP: needs node");
        }
        ok
    }

    #[test]
    fn yaml_reads_as_json_with_numbers_strings_and_nesting() {
        let v = yaml("apps:\n  - name: api\n    instances: 4\n    max: 1.5\n    ok: yes\n    wait_ready: true\n    env: {PORT: 8080}\n").unwrap();
        assert_eq!(
            v,
            serde_json::json!({"apps": [{"name": "api", "instances": 4, "max": 1.5, "ok": "yes", "wait_ready": true, "env": {"PORT": 8080}}]})
        );
        assert!(yaml("a: [1, 2").is_err());
        assert_eq!(yaml("a: &x 1\nb: *x\n").unwrap(), serde_json::json!({"a": 1, "b": 1}), "anchors resolve");
    }

    #[test]
    fn json_and_unknown_extensions() {
        let dir = Scratch::new("pm2-json");
        let ok = dir.file("e.json", r#"{"apps": [{"name": "a", "script": "a.js"}]}"#);
        assert_eq!(read(&ok, NODE_TIMEOUT).unwrap()["apps"][0]["name"], "a");
        let bad = dir.file("bad.json", "{apps: 1}");
        let e = read(&bad, NODE_TIMEOUT).unwrap_err();
        assert!(e.contains("not valid JSON") && !e.contains('\n'), "{e}");
        let e = read(&dir.file("e.toml", ""), NODE_TIMEOUT).unwrap_err();
        assert!(e.contains("ecosystem.config.js"), "{e}");
        let js = dir.file("ecosystem.config.js", "module.exports = [];");
        let e = node("/nonexistent/node", &js, NODE_TIMEOUT).unwrap_err();
        assert!(e.contains("needs node, which is not installed") && !e.contains('\n'), "{e}");
        let e = read(&dir.path().join("missing.json"), NODE_TIMEOUT).unwrap_err();
        assert!(e.starts_with("cannot read"), "{e}");
    }

    #[test]
    fn node_evaluates_module_exports_a_bare_array_and_an_es_module() {
        if !have_node() {
            return;
        }
        let dir = Scratch::new("pm2-node");
        let cjs = dir.file(
            "ecosystem.config.js",
            "console.log('noise');\nmodule.exports = { apps: [{ name: 'a', script: 'a.js', instances: process.env.HOME ? 2 : 1, f() {} }] };\nsetInterval(() => {}, 1000);\n",
        );
        let v = read(&cjs, NODE_TIMEOUT).unwrap();
        assert_eq!(v, serde_json::json!({"apps": [{"name": "a", "script": "a.js", "instances": 2}]}));
        let arr = dir.file("arr.cjs", "module.exports = [{ name: 'b', script: 'b.js' }];");
        assert_eq!(read(&arr, NODE_TIMEOUT).unwrap()[0]["name"], "b");
        let esm = dir.file("e.mjs", "export default { apps: [{ name: 'c', script: 'c.js' }] };");
        assert_eq!(read(&esm, NODE_TIMEOUT).unwrap()["apps"][0]["name"], "c");
    }

    #[test]
    fn a_throwing_file_or_a_hanging_one_is_one_line_naming_the_file() {
        if !have_node() {
            return;
        }
        let dir = Scratch::new("pm2-throw");
        let throws = dir.file("t.config.js", "throw new Error('no DB_URL\\nsecond line');");
        let e = read(&throws, NODE_TIMEOUT).unwrap_err();
        assert!(e.contains("t.config.js failed to load in node: no DB_URL;"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let syntax = dir.file("s.config.js", "module.exports = {");
        let e = read(&syntax, NODE_TIMEOUT).unwrap_err();
        assert!(e.contains("failed to load in node") && !e.contains('\n'), "{e}");
        let hangs = dir.file("h.config.js", "while (true) {}");
        let t0 = Instant::now();
        let e = read(&hangs, Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("did not finish") && !e.contains('\n'), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }
}
