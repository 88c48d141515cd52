//! PM2's values as herdsman's: the kinds of JSON a key may hold, times in milliseconds,
//! `instances`, argument strings split as a shell would, environment values. Each `Err` is one
//! line naming the key and the fix.

use serde_json::Value;

use crate::config::values;

/// What kind of JSON value `v` is, for messages.
pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value as the file wrote it, for messages.
pub(super) fn shown(v: &Value) -> String {
    let text = v.to_string();
    if text.len() > 40 { format!("{}…", text.chars().take(40).collect::<String>()) } else { text }
}

/// `args`-like values: a string (split as a shell would, without expansions) or an array.
pub(super) fn args(v: Option<&Value>, key: &str) -> Result<Vec<String>, String> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => split(s).map_err(|e| format!("`{key}`: {e}")),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                other => Err(format!("`{key}` must hold strings, found {} in it", kind(other))),
            })
            .collect(),
        Some(other) => Err(format!("`{key}` must be a string or an array of strings, got {}", kind(other))),
    }
}

/// Splits a command line into words: whitespace separates, '…' and "…" quote, \ escapes.
pub(super) fn split(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let (mut word, mut in_word) = (String::new(), false);
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' | '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some(q) if q == c => break,
                        Some('\\') if c == '"' => word.extend(chars.next()),
                        Some(other) => word.push(other),
                        None => return Err(format!("unclosed {c} in {s:?}; close the quote")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            other => {
                in_word = true;
                word.push(other);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// `instances`: `max`, `-1` (CPUs minus one), `0` (one per CPU), N, or the same as a string,
/// as herdsman's worker count.
pub(super) fn instances(v: &Value) -> Result<String, String> {
    let bad = || {
        format!(
            "`instances` must be a number of workers, \"max\" or -1 (one per CPU, minus one), got {}; fix it",
            shown(v)
        )
    };
    let n = match v {
        Value::String(s) if s.trim().eq_ignore_ascii_case("max") => return Ok("max".into()),
        Value::String(s) => s.trim().parse::<i64>().map_err(|_| bad())?,
        Value::Number(n) => match n.as_i64() {
            Some(i) => i,
            None => match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 1e9 => f as i64,
                _ => return Err(bad()),
            },
        },
        _ => return Err(bad()),
    };
    let text = if n == 0 { "max".to_string() } else { n.to_string() };
    values::workers(&text).map_err(|e| format!("`instances`: {e}"))?;
    Ok(text)
}

/// A PM2 time: milliseconds (a number, or a string of digits); a string with a unit (`5s`)
/// as herdsman reads it. As herdsman's duration text.
pub(super) fn millis(v: &Value, key: &str) -> Result<String, String> {
    let bad = || format!("`{key}` must be milliseconds (like 3000), got {}; fix it", shown(v));
    let text = match v {
        Value::Number(n) => match n.as_u64() {
            Some(ms) => format!("{ms}ms"),
            None => match n.as_f64() {
                Some(f) if f >= 0.0 && f.fract() == 0.0 => format!("{}ms", f as u64),
                _ => return Err(bad()),
            },
        },
        Value::String(s) if !s.trim().is_empty() && s.trim().bytes().all(|b| b.is_ascii_digit()) => {
            format!("{}ms", s.trim())
        }
        Value::String(s) => s.trim().to_string(),
        _ => return Err(bad()),
    };
    match values::duration(&text) {
        Ok(d) if d.is_zero() => {
            Err(format!("`{key}` must be more than 0 ms; remove it for herdsman's default"))
        }
        Ok(_) => Ok(text),
        Err(_) => Err(bad()),
    }
}

/// A boolean key (`null` and absent: false).
pub(super) fn flag(v: Option<&Value>, key: &str) -> Result<bool, String> {
    match v {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(format!("`{key}` must be true or false, got {}", shown(other))),
    }
}

/// `uid`/`gid`: a name or a number.
pub(super) fn id(v: &Value, key: &str) -> Result<String, String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Value::Number(n) if n.is_u64() => Ok(n.to_string()),
        other => Err(format!("`{key}` must be a name or a number, got {}", shown(other))),
    }
}

/// An environment value: a string, or a number or boolean written as PM2 passes it.
pub(super) fn env_value(table: &str, key: &str, v: &Value) -> Result<String, String> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => {
            return Err(format!(
                "`{table}.{key}` must be a string, a number or a boolean, got {}",
                kind(other)
            ));
        }
    };
    if !values::env_key_ok(key) {
        return Err(format!("`{table}`: {key:?} is not a variable name; rename it"));
    }
    values::env_entry(key, &text).map_err(|e| format!("`{table}.{key}`: {e}"))?;
    Ok(text)
}
