//! Wire format of the control socket: one JSON object per line, each carrying the protocol
//! version `v`. The client sends one [`Request`]; the server answers with zero or more
//! `progress` replies and then exactly one final reply.
//!
//! ```text
//! → {"v":1,"op":"reload","wait":true}
//! ← {"v":1,"type":"progress","message":"worker 1/4 ready (pid 4412, 0.31 s)"}
//! ← {"v":1,"type":"reload","ok":true,"generation":3,"message":"reload complete: ..."}
//! ```

use serde::{Deserialize, Serialize};

use crate::supervisor::{ReloadOutcome, Snapshot, UpgradeDone};

pub const VERSION: u32 = 1;
/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Status,
    Reload {
        #[serde(default = "yes")]
        wait: bool,
    },
    /// `workers` is `N`, `+N` or `-N`.
    Scale {
        workers: String,
        #[serde(default = "yes")]
        wait: bool,
    },
    /// The metrics page (Prometheus text 0.0.4), as `GET /metrics` serves it.
    Metrics,
    /// Re-execute the supervisor in place from `binary` (default: the path it was started
    /// from); answered by the new image.
    Upgrade {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<std::path::PathBuf>,
    },
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Progress { message: String },
    Status { status: Box<Snapshot> },
    Reload(ReloadOutcome),
    Scale { workers: usize },
    Metrics { text: String },
    Upgrade(UpgradeDone),
    Error { message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub reply: Reply,
}

impl Reply {
    pub fn line(self) -> String {
        let mut s = serde_json::to_string(&Envelope { v: VERSION, reply: self })
            .unwrap_or_else(|_| r#"{"v":1,"type":"error","message":"internal: unencodable reply"}"#.into());
        s.push('\n');
        s
    }
}

/// Parses one request line, with a message fit to send back when it is bad.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let req: Request = serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
    if req.v != VERSION {
        return Err(format!("unsupported protocol version {} (this herdsman speaks {VERSION})", req.v));
    }
    Ok(req)
}

/// `N`, `+N`, `-N` → a scale operation.
pub fn parse_scale(s: &str) -> Result<crate::supervisor::Scale, String> {
    use crate::supervisor::Scale;
    let t = s.trim();
    let num = |x: &str| {
        x.parse::<usize>()
            .map_err(|_| format!("invalid worker count {s:?}; use N, +N or -N (e.g. 4, +2, -1)"))
    };
    if let Some(n) = t.strip_prefix('+') {
        Ok(Scale::Add(num(n)?))
    } else if let Some(n) = t.strip_prefix('-') {
        Ok(Scale::Remove(num(n)?))
    } else {
        // Checked here too, so `herdsman scale 100000` fails before asking the supervisor.
        let n = num(t)?;
        if n > crate::config::values::MAX_WORKERS {
            return Err(crate::config::values::too_many_workers(n));
        }
        Ok(Scale::To(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::Scale;

    #[test]
    fn requests_round_trip_and_bad_ones_are_explained() {
        let r = parse_request(br#"{"v":1,"op":"reload"}"#).unwrap();
        assert_eq!(r.op, Op::Reload { wait: true });
        let r = parse_request(br#"{"v":1,"op":"scale","workers":"+2","wait":false}"#).unwrap();
        assert_eq!(r.op, Op::Scale { workers: "+2".into(), wait: false });
        assert!(parse_request(b"garbage").unwrap_err().starts_with("malformed request"));
        assert!(parse_request(br#"{"v":9,"op":"status"}"#).unwrap_err().contains("version 9"));
        assert!(parse_request(br#"{"v":1,"op":"explode"}"#).is_err());
        assert_eq!(parse_request(br#"{"v":1,"op":"metrics"}"#).unwrap().op, Op::Metrics);
    }

    #[test]
    fn scale_forms() {
        assert_eq!(parse_scale("4").unwrap(), Scale::To(4));
        assert_eq!(parse_scale("+2").unwrap(), Scale::Add(2));
        assert_eq!(parse_scale("-1").unwrap(), Scale::Remove(1));
        assert!(parse_scale("lots").is_err());
        assert!(parse_scale("5000").unwrap_err().contains("limit of 4096"));
    }

    #[test]
    fn replies_are_single_lines_with_the_version() {
        let line = Reply::Progress { message: "a\nb".into() }.line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.starts_with(r#"{"v":1,"type":"progress""#));
    }
}
