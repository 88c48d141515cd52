//! The `--watch-ignore` patterns: a leaf module, so the configuration checks them and
//! [`crate::watch`] matches paths against them without the two depending on each other.

use std::path::Path;

/// A `--watch-ignore` pattern. Without a `/`, it is matched against every component of a
/// path below a watched directory (`*.tmp`, `dist`, `.cache`); with one, against the path
/// relative to the watched directory and its parents (`assets/**`, `config/local.json`); a
/// leading `/` matches the absolute path (`/srv/app/uploads`). `*` is any run of characters
/// but `/`, `?` one character but `/`, `**` any run including `/`; everything else is literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// A pattern as written, checked.
    pub fn parse(s: &str) -> Result<Glob, String> {
        let t = s.trim();
        if t.is_empty() || t == "/" {
            return Err(format!("empty pattern {s:?}; use a name like \"*.tmp\" or a path like \"dist/**\""));
        }
        if t.contains('\0') {
            return Err(format!("pattern {s:?} contains a NUL byte; remove it"));
        }
        Ok(Glob(t.trim_end_matches('/').to_string()))
    }

    /// Whether `path`, below the watched `root`, is ignored by this pattern.
    pub(crate) fn ignores(&self, root: &Path, path: &Path) -> bool {
        let pat = self.0.as_bytes();
        let bytes = |p: &Path| p.as_os_str().as_encoded_bytes().to_vec();
        if pat.starts_with(b"/") {
            return path.ancestors().any(|a| matches(pat, &bytes(a)));
        }
        let rel = path.strip_prefix(root).unwrap_or(path);
        if !pat.contains(&b'/') {
            return rel.components().any(|c| matches(pat, c.as_os_str().as_encoded_bytes()));
        }
        rel.ancestors().filter(|a| !a.as_os_str().is_empty()).any(|a| matches(pat, &bytes(a)))
    }
}

/// Glob matching (see [`Glob`]): `*` does not cross `/`, `**` does (and `**/` matches nothing).
fn matches(p: &[u8], s: &[u8]) -> bool {
    match p {
        [] => s.is_empty(),
        [b'*', b'*', rest @ ..] => {
            rest.strip_prefix(b"/").is_some_and(|r| matches(r, s))
                || (0..=s.len()).any(|i| matches(rest, &s[i..]))
        }
        [b'*', rest @ ..] => {
            for i in 0..=s.len() {
                if matches(rest, &s[i..]) {
                    return true;
                }
                if s.get(i) == Some(&b'/') {
                    break;
                }
            }
            false
        }
        [b'?', rest @ ..] => s.first().is_some_and(|c| *c != b'/') && matches(rest, &s[1..]),
        [c, rest @ ..] => s.first() == Some(c) && matches(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(p: &str) -> Glob {
        Glob::parse(p).unwrap()
    }

    #[test]
    fn globs_match_names_anywhere_and_paths_from_the_watched_directory() {
        let root = Path::new("/srv/app");
        let ignored = |g: &str, p: &str| glob(g).ignores(root, Path::new(p));
        assert!(ignored("*.tmp", "/srv/app/a/b/c.tmp"));
        assert!(!ignored("*.tmp", "/srv/app/a/b/c.tmpx"));
        assert!(ignored("dist", "/srv/app/dist/bundle.js"), "a directory's name ignores what is below it");
        assert!(!ignored("dist", "/srv/app/distant.js"));
        assert!(ignored("assets/**", "/srv/app/assets/img/a.png"));
        assert!(!ignored("assets/*", "/srv/app/lib/assets/a.png"), "a path pattern is anchored at the root");
        assert!(ignored("assets/*", "/srv/app/assets/img/a.png"), "its directory matches");
        assert!(ignored("**/gen/*.js", "/srv/app/a/gen/x.js"));
        assert!(ignored("**/gen/*.js", "/srv/app/gen/x.js"));
        assert!(ignored("/srv/app/uploads", "/srv/app/uploads/u1/f"));
        assert!(!ignored("/srv/app/uploads", "/srv/app/up"));
        assert!(ignored("?.swp", "/srv/app/a.swp") && !ignored("?.swp", "/srv/app/ab.swp"));
        assert!(!ignored("*.log", "/srv/app"), "the watched path itself is never ignored by a name");
        assert!(Glob::parse("").is_err() && Glob::parse("/").is_err() && Glob::parse("a\0").is_err());
    }
}
