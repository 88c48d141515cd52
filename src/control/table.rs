//! Human output of `status` and `list`: aligned columns, human units (`53.9 MB`, `2h`).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::protocol::{Snapshot, WorkerState};

/// `42s`, `7m`, `2h`, `3d`.
pub(crate) fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `812 kB`, `53.9 MB`, `1.2 GB` (powers of 1000, like PM2).
pub(crate) fn bytes(n: u64) -> String {
    let n = n as f64;
    if n < 1e6 {
        format!("{:.0} kB", n / 1e3)
    } else if n < 1e9 {
        format!("{:.1} MB", n / 1e6)
    } else {
        format!("{:.1} GB", n / 1e9)
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Lays out rows with every column as wide as its widest cell.
pub(crate) fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub(crate) fn status(s: &Snapshot) -> String {
    let mut out = format!(
        "{} · pid {} · {}/{} ready · generation {} · {} · balance {} · herdsman {} · upgrades {}\n",
        s.name,
        s.pid,
        s.ready,
        s.desired,
        s.generation,
        s.sockets.join(", "),
        match &s.routing {
            Some(r) => format!("{} ({r})", s.balance),
            None => s.balance.clone(),
        },
        s.version,
        s.upgrades
    );
    match &s.last_reload {
        Some(lr) => {
            let ago = age(now_unix().saturating_sub(lr.at) as f64);
            let err = lr.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            out.push_str(&format!("last reload: {} {ago} ago{err}\n", lr.result));
        }
        None => out.push_str("last reload: never\n"),
    }
    if let Some(m) = &s.metrics {
        out.push_str(&format!("metrics: http://{m}/metrics\n").replace("http://unix:", "unix:"));
    }
    if let Some(w) = &s.watch {
        let pending = if w.pending { " · changes pending" } else { "" };
        let last = w.trigger.as_deref().map(|t| format!(" (last: {t})")).unwrap_or_default();
        out.push_str(&format!("watch: {} · {} reload(s){last}{pending}\n", w.paths.join(", "), w.reloads));
    }
    let mut rows = vec![
        ["ID", "PID", "GEN", "STATE", "RECV", "QUEUE", "RESTARTS", "UPTIME", "CPU", "MEM"]
            .map(String::from)
            .to_vec(),
    ];
    for w in &s.workers {
        rows.push(vec![
            w.id.to_string(),
            w.pid.map_or("-".into(), |p| p.to_string()),
            w.generation.to_string(),
            w.state.to_string(),
            if w.pid.is_some() { if w.receiving { "yes" } else { "no" }.into() } else { "-".into() },
            if w.pid.is_some() { w.accept_queue.to_string() } else { "-".into() },
            w.restarts.to_string(),
            if w.pid.is_some() { age(w.uptime_s) } else { "-".into() },
            if w.pid.is_some() { format!("{:.1}%", w.cpu_percent) } else { "-".into() },
            if w.pid.is_some() { bytes(w.rss_bytes) } else { "-".into() },
        ]);
    }
    out.push_str(&columns(&rows));
    // Slots waiting to start again: why, how often in a row, and when.
    for w in s.workers.iter().filter(|w| w.state == WorkerState::Backoff) {
        let why = w.last_error.as_deref().unwrap_or("failed");
        let when = w
            .restart_in_ms
            .map(|ms| format!(", next start in {:.1}s", ms as f64 / 1000.0))
            .unwrap_or_default();
        out.push_str(&format!("worker {}: {why} (failure {} in a row{when})\n", w.id, w.failures));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_human() {
        assert_eq!(bytes(53_900_000), "53.9 MB");
        assert_eq!(bytes(812_000), "812 kB");
        assert_eq!(age(7200.0), "2h");
        assert_eq!(age(42.9), "42s");
    }

    #[test]
    fn a_slot_in_back_off_says_why_how_often_and_when() {
        let s: Snapshot = serde_json::from_value(serde_json::json!({
            "name": "web", "pid": 1, "sockets": ["127.0.0.1:8080"], "generation": 1, "desired": 1,
            "ready": 0, "status": "0/1 ready", "last_reload": null, "balance": "shared",
            "version": "0.1.0", "upgrades": 0, "upgrading": false,
            "workers": [{"id": 0, "pid": null, "generation": 1, "state": "backoff", "restarts": 5,
                "failures": 5, "last_error": "exited with status 3 before it was ready; last output: boom",
                "restart_in_ms": 1600, "uptime_s": 0.0, "cpu_percent": 0.0, "rss_bytes": 0}]
        }))
        .unwrap();
        let t = status(&s);
        assert!(
            t.ends_with(
                "worker 0: exited with status 3 before it was ready; last output: boom (failure 5 in a row, next start in 1.6s)\n"
            ),
            "{t}"
        );
    }

    #[test]
    fn columns_align() {
        let t = columns(&[vec!["ID".into(), "PID".into()], vec!["10".into(), "4".into()]]);
        assert_eq!(t, "ID  PID\n10  4\n");
    }
}
