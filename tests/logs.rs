//! `herdsman logs` against a running standalone supervisor (its ring of recent worker lines,
//! over the control socket), and `run --log-format json`. Assertions read `--json` output and
//! the protocol's replies, not wording.

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use support::*;

/// The ring's bounds (`herdsman::logs`), as the docs state them.
const RING_LINES: usize = 10_000;
const RING_BYTES: usize = 4 << 20;
const ENTRY_OVERHEAD: usize = 128;
const LINE_BYTES: usize = 4096;

/// `herdsman run` of `workers` copies of a Python one-liner (unbuffered output).
fn start(dir: &TempDir, workers: usize, script: &str, extra: &[&str]) -> Herdsman {
    let mut run = Run::new(dir, workers).arg("--ready").arg("alive:0s");
    for a in extra {
        run = run.arg(a);
    }
    let h = run.arg("--").arg("python3").arg("-u").arg("-c").arg(script).start();
    h.wait_started();
    h
}

/// `herdsman logs CONTROL --json ARGS`: the records.
fn logs(h: &Herdsman, args: &[&str]) -> Vec<Value> {
    let control = h.control().unwrap();
    let out = Command::new(BIN)
        .arg("logs")
        .arg(&control)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "logs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn lines_of(records: &[Value]) -> Vec<String> {
    records.iter().map(|r| r["line"].as_str().unwrap().to_string()).collect()
}

/// Waits until the last line in the ring is `last`.
fn wait_last(h: &Herdsman, last: &str) {
    wait_for(STARTUP, &format!("{last:?} in the ring"), || {
        (lines_of(&logs(h, &["-n", "1"])).last().map(String::as_str) == Some(last)).then_some(())
    });
}

const KEYS: [&str; 7] = ["app", "generation", "line", "pid", "stream", "ts", "worker"];

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[test]
fn logs_n_prints_the_last_lines_with_worker_pid_generation_and_stream() {
    let dir = TempDir::new("logs-n");
    let trigger = dir.path("go");
    // stdout and stderr are two pipes read apart: the test orders them with a trigger.
    let script = format!(
        "import os, sys, time\nprint('oops', file=sys.stderr)\nwhile not os.path.exists({:?}): time.sleep(0.02)\nfor i in range(30): print('out', i)\nprint('end')\ntime.sleep(1000)",
        trigger.display().to_string()
    );
    let h = start(&dir, 1, &script, &[]);
    wait_last(&h, "oops");
    std::fs::write(&trigger, "").unwrap();
    wait_last(&h, "end");
    let st = h.status().unwrap();
    let records = logs(&h, &["-n", "5"]);
    assert_eq!(lines_of(&records), ["out 26", "out 27", "out 28", "out 29", "end"]);
    for r in &records {
        assert_eq!(keys(r), KEYS);
        assert_eq!(r["app"], "t");
        assert_eq!(r["worker"], st["workers"][0]["id"]);
        assert_eq!(r["pid"], st["workers"][0]["pid"]);
        assert_eq!(r["generation"], 1);
        assert_eq!(r["stream"], "stdout");
        assert!(r["ts"].as_str().unwrap().ends_with('Z'), "{r}");
    }
    let all = logs(&h, &["-n", "100"]);
    assert_eq!(all.len(), 32);
    assert_eq!((all[0]["line"].as_str(), all[0]["stream"].as_str()), (Some("oops"), Some("stderr")));
    // The default is 15 lines, as pm2's; the text form is `ID|APP | out|err | line`.
    assert_eq!(logs(&h, &[]).len(), 15);
    let out = Command::new(BIN).arg("logs").arg(h.control().unwrap()).args(["-n", "2"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let got: Vec<Vec<&str>> = text.lines().map(|l| l.splitn(3, " | ").collect()).collect();
    assert_eq!(got, [vec!["0|t", "out", "out 29"], vec!["0|t", "out", "end"]]);
    let out = Command::new(BIN).arg("logs").arg(h.control().unwrap()).args(["-n", "32"]).output().unwrap();
    let first = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
    assert_eq!(first.splitn(3, " | ").collect::<Vec<_>>(), ["0|t", "err", "oops"]);
}

#[test]
fn logs_worker_keeps_only_that_workers_lines() {
    let dir = TempDir::new("logs-worker");
    let script = "import os, time\nfor i in range(5): print('hello from', os.environ['HERDSMAN_WORKER_ID'], i)\ntime.sleep(1000)";
    let h = start(&dir, 2, script, &[]);
    wait_for(STARTUP, "both workers' lines", || (logs(&h, &["-n", "100"]).len() == 10).then_some(()));
    let one = logs(&h, &["--worker", "1", "-n", "100"]);
    assert_eq!(one.len(), 5);
    assert!(one.iter().all(|r| r["worker"] == 1 && r["line"].as_str().unwrap().starts_with("hello from 1 ")));
    assert!(logs(&h, &["--worker", "7"]).is_empty());
}

#[test]
fn logs_since_keeps_only_lines_read_at_or_after_the_time() {
    let dir = TempDir::new("logs-since");
    let trigger = dir.path("go");
    let script = format!(
        "import os, time\nprint('first')\nwhile not os.path.exists({:?}): time.sleep(0.02)\nprint('second')\ntime.sleep(1000)",
        trigger.display().to_string()
    );
    let h = start(&dir, 1, &script, &[]);
    wait_last(&h, "first");
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    std::fs::write(&trigger, "").unwrap();
    wait_last(&h, "second");
    assert_eq!(lines_of(&logs(&h, &["--since", &format!("@{t}")])), ["second"]);
    assert_eq!(lines_of(&logs(&h, &["--since", "1h"])), ["first", "second"]);
    assert!(logs(&h, &["--since", "@99999999999"]).is_empty());
    let bad =
        Command::new(BIN).arg("logs").arg(h.control().unwrap()).args(["--since", "bogus"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2), "a bad --since is a usage error");
}

#[test]
fn logs_follow_sees_a_line_printed_after_it_attached() {
    let dir = TempDir::new("logs-follow");
    let trigger = dir.path("go");
    let script = format!(
        "import os, time\nprint('before')\nwhile not os.path.exists({:?}): time.sleep(0.02)\nprint('after')\ntime.sleep(1000)",
        trigger.display().to_string()
    );
    let h = start(&dir, 1, &script, &[]);
    wait_last(&h, "before");
    let mut follower = Command::new(BIN)
        .arg("logs")
        .arg(h.control().unwrap())
        .args(["-f", "-n", "1", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = |rx: &std::sync::mpsc::Receiver<String>| -> Value {
        serde_json::from_str(&rx.recv_timeout(STARTUP).expect("a line from the follower")).unwrap()
    };
    // Its backlog came first: from here on it is subscribed.
    assert_eq!(line(&rx)["line"], "before");
    std::fs::write(&trigger, "").unwrap();
    let after = line(&rx);
    assert_eq!(after["line"], "after");
    assert_eq!(keys(&after), KEYS);
    // Following holds no request slot: other clients are served meanwhile.
    assert!(h.status().is_some());
    let _ = follower.kill();
    let _ = follower.wait();
}

#[test]
fn the_ring_is_bounded_by_lines_and_bytes_and_cuts_long_lines() {
    let dir = TempDir::new("logs-ring");
    let trigger = dir.path("go");
    let script = format!(
        "import os, time\nfor i in range(12000): print(i)\nprint('phase1')\nwhile not os.path.exists({:?}): time.sleep(0.02)\nfor i in range(1500): print('L%d:' % i + 'x' * 5000)\nprint('phase2')\ntime.sleep(1000)",
        trigger.display().to_string()
    );
    let h = start(&dir, 1, &script, &[]);
    wait_last(&h, "phase1");
    let all = logs(&h, &["-n", "100000"]);
    assert_eq!(all.len(), RING_LINES, "kept lines");
    assert_eq!(all[0]["line"], "2001", "the oldest go first");
    std::fs::write(&trigger, "").unwrap();
    wait_last(&h, "phase2");
    let all = logs(&h, &["-n", "100000"]);
    let bytes: usize = all.iter().map(|r| r["line"].as_str().unwrap().len() + ENTRY_OVERHEAD).sum();
    assert!(bytes <= RING_BYTES, "{bytes} bytes kept");
    assert!(all.len() >= RING_BYTES / (LINE_BYTES + 3 + ENTRY_OVERHEAD) - 1, "{} lines kept", all.len());
    let long = &all[all.len() - 2];
    let text = long["line"].as_str().unwrap();
    assert!(text.starts_with("L1499:") && text.ends_with('…'), "{}", &text[..20]);
    assert!(text.len() <= LINE_BYTES + '…'.len_utf8());
}

#[test]
fn a_follower_that_does_not_read_loses_lines_counted_and_stalls_nothing() {
    const TOTAL: usize = 20_000;
    let dir = TempDir::new("logs-slow");
    let trigger = dir.path("go");
    let ticking = dir.path("tick");
    // After the burst, once told to, a tick every 20 ms: lines that reach the follower with
    // the count of those it lost before them.
    let script = format!(
        "import os, time\nprint('hello')\nwhile not os.path.exists({:?}): time.sleep(0.02)\nfor i in range({TOTAL}): print(i, 'y' * 1000)\nprint('done')\nwhile not os.path.exists({:?}): time.sleep(0.02)\nwhile True:\n    print('tick')\n    time.sleep(0.02)",
        trigger.display().to_string(),
        ticking.display().to_string()
    );
    let h = start(&dir, 1, &script, &[]);
    wait_last(&h, "hello");
    // A raw follower: reads its backlog (one line: it is subscribed), then stops reading.
    let mut s = UnixStream::connect(h.control().unwrap()).unwrap();
    s.write_all(b"{\"v\":1,\"op\":\"logs\",\"follow\":true,\"lines\":1}\n").unwrap();
    s.set_read_timeout(Some(STARTUP)).unwrap();
    let mut r = BufReader::new(s);
    let mut next = || -> Value {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "the follower's connection closed");
        serde_json::from_str(&l).unwrap()
    };
    let first = next();
    assert_eq!((first["type"].as_str(), first["line"].as_str()), (Some("log"), Some("hello")));
    std::fs::write(&trigger, "").unwrap();
    // Every line reaches the ring, and the control socket answers, while it does not read.
    wait_last(&h, "done");
    assert!(h.status().is_some(), "status answers while a follower is stuck");
    // Now it reads: every line of the burst either reaches it or is counted as dropped.
    std::fs::write(&ticking, "").unwrap();
    let (mut got, mut dropped) = (0u64, 0u64);
    while got + dropped < TOTAL as u64 + 1 {
        let v = next();
        match v["type"].as_str().unwrap() {
            "logs_dropped" => dropped += v["dropped"].as_u64().unwrap(),
            "log" if v["line"] == "tick" => {}
            "log" => got += 1,
            other => panic!("unexpected reply {other}: {v}"),
        }
    }
    assert!(dropped > 0, "a follower that did not read lost nothing?");
    assert_eq!(got + dropped, TOTAL as u64 + 1, "lines after the burst counted twice?");
}

#[test]
fn log_format_json_writes_every_worker_line_and_event_as_a_json_object() {
    let dir = TempDir::new("logs-json");
    let script =
        "import sys, time\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\ntime.sleep(1000)";
    let mut h = start(&dir, 2, script, &["--log-format", "json"]);
    wait_for(STARTUP, "both workers' lines", || (logs(&h, &["-n", "100"]).len() == 4).then_some(()));
    h.stop();
    let parse = |text: String| -> Vec<Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    let out = parse(h.stdout());
    assert_eq!(out.len(), 2, "{out:?}");
    for r in &out {
        assert_eq!(keys(r), KEYS);
        assert_eq!((r["stream"].as_str(), r["line"].as_str()), (Some("stdout"), Some("to stdout")));
    }
    let err = parse(h.stderr());
    let workers: Vec<&Value> = err.iter().filter(|v| v["stream"] == "stderr").collect();
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().all(|r| keys(r) == KEYS && r["line"] == "to stderr"));
    let events: Vec<&Value> = err.iter().filter(|v| v["stream"] == "herdsman").collect();
    assert!(!events.is_empty());
    for e in &events {
        for k in ["ts", "app", "level", "message"] {
            assert!(e.get(k).is_some(), "no {k} in {e}");
        }
    }
    // An event about a worker carries its id and pid as numbers, as worker lines do.
    assert!(events.iter().any(|e| e["worker"].is_u64() && e["pid"].is_u64()), "{events:?}");
}
