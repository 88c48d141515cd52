//! The dependency rule of `docs/architecture.md`, checked: no import cycle among the top-level
//! modules of `src/`.
//!
//! A small scanner, not a parser: a module's dependencies are the first path segment after
//! every `crate::` (and each name of a `crate::{…}` group) in its files, outside comments,
//! string and character literals and `#[cfg(test)]` items; `tests.rs` files, files declared
//! by `#[cfg(test)] mod x;`, `lib.rs` and `main.rs` are not read. A top-level module is a
//! `mod` declared in `src/lib.rs`; a file belongs to the first component of its path under
//! `src/`. When a cycle is found, the test prints every strongly connected group of modules
//! with the edges inside it and the files each edge comes from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `from module -> to module -> files (relative to src/) that make the edge`.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

#[test]
fn no_import_cycle_among_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(graph.len() > 10, "the scanner found too few modules in {}: {graph:?}", src.display());
    let knots = knots(&graph);
    assert!(knots.is_empty(), "import cycles among src/'s top-level modules:\n{}", describe(&graph, &knots));
}

#[test]
fn the_scanner_ignores_comments_strings_and_test_items_and_reads_groups() {
    let modules: BTreeSet<String> =
        ["a", "b", "c", "d", "e", "f", "g"].iter().map(|s| s.to_string()).collect();
    let text = r##"
        // use crate::a;
        /* crate::b /* nested crate::b */ crate::b */
        const S: &str = "crate::c // not a comment";
        const R: &str = r#"crate::c "quoted""#;
        const C: char = '"';
        fn f<'x>(v: &'x str) -> crate::d::T { crate::{e, f::{G, H}}::x() }
        #[cfg(test)]
        #[allow(unused)]
        mod tests { use crate::g; fn h() { { crate::g::x() } } }
        #[cfg(test)]
        fn helper() -> crate::g::Y { todo!() }
    "##;
    let (used, test_mods) = scan(text, &modules);
    assert_eq!(used, ["d", "e", "f"].iter().map(|s| s.to_string()).collect::<BTreeSet<_>>());
    assert!(test_mods.contains("tests"), "{test_mods:?}");
    let (_, test_mods) = scan("#[cfg(test)]\nmod golden;\npub mod real;", &modules);
    assert_eq!(test_mods, ["golden".to_string()].into_iter().collect());
}

#[test]
fn a_cycle_is_reported_with_its_edges_and_files() {
    let mut g = Graph::new();
    let mut edge = |a: &str, b: &str, file: &str| {
        g.entry(a.into()).or_default().entry(b.into()).or_default().insert(file.into());
    };
    edge("config", "spawn", "config/problem.rs");
    edge("spawn", "config", "spawn.rs");
    edge("spawn", "sys", "spawn.rs");
    let k = knots(&g);
    assert_eq!(k, vec![vec!["config".to_string(), "spawn".to_string()]]);
    let text = describe(&g, &k);
    assert!(text.contains("config -> spawn (config/problem.rs)"), "{text}");
}

/// The graph of `src/`'s top-level modules.
fn module_graph(src: &Path) -> Graph {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let modules = declared_modules(&lib);
    let mut graph = Graph::new();
    let mut files = Vec::new();
    walk(src, &mut files);
    files.sort();
    // Files declared only for tests: `#[cfg(test)] mod x;` in `dir/…` excludes `dir/x.rs`
    // and `dir/x/`.
    let mut test_only: Vec<PathBuf> = Vec::new();
    let mut scanned = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("a source file");
        let (used, test_mods) = scan(&text, &modules);
        let dir = module_dir(file);
        test_only.extend(test_mods.iter().flat_map(|m| [dir.join(format!("{m}.rs")), dir.join(m)]));
        scanned.push((file.clone(), used));
    }
    for (file, used) in scanned {
        let rel = file.strip_prefix(src).expect("below src/");
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let skipped = name == "tests.rs"
            || rel == Path::new("lib.rs")
            || rel == Path::new("main.rs")
            || test_only.iter().any(|t| file.starts_with(t));
        if skipped {
            continue;
        }
        let first = rel.components().next().and_then(|c| c.as_os_str().to_str()).unwrap_or("");
        let top = first.trim_end_matches(".rs").to_string();
        let node = graph.entry(top.clone()).or_default();
        for to in used.into_iter().filter(|m| *m != top) {
            node.entry(to).or_default().insert(rel.display().to_string());
        }
    }
    graph
}

/// The directory a file's child modules live in (`a/mod.rs` -> `a/`, `a/b.rs` -> `a/b/`).
fn module_dir(file: &Path) -> PathBuf {
    let parent = file.parent().unwrap_or(Path::new("."));
    match file.file_stem().and_then(|s| s.to_str()) {
        Some("mod") | Some("lib") | Some("main") => parent.to_path_buf(),
        Some(stem) => parent.join(stem),
        None => parent.to_path_buf(),
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a source directory").flatten() {
        let p = entry.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The names of `mod x;` / `pub mod x;` lines of `lib.rs` (test-only ones included: they are
/// never read).
fn declared_modules(lib: &str) -> BTreeSet<String> {
    let code = strip(lib);
    code.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("pub ").map(str::trim_start).unwrap_or(l);
            let rest = rest.strip_prefix("pub(crate) ").unwrap_or(rest);
            rest.strip_prefix("mod ")?.strip_suffix(';').map(|n| n.trim().to_string())
        })
        .collect()
}

/// The top-level modules a file's code names, and the modules it declares `#[cfg(test)]`.
fn scan(text: &str, modules: &BTreeSet<String>) -> (BTreeSet<String>, BTreeSet<String>) {
    let (code, test_mods) = without_test_items(&strip(text));
    let mut used = BTreeSet::new();
    let b = code.as_bytes();
    let mut i = 0;
    while let Some(at) = code[i..].find("crate::") {
        let start = i + at;
        i = start + "crate::".len();
        // `crate` as a whole word (`$crate` counts: it is this crate).
        if start > 0 && is_ident(b[start - 1]) {
            continue;
        }
        if b.get(i) == Some(&b'{') {
            let end = matching(b, i).unwrap_or(b.len());
            for name in group_heads(&code[i + 1..end.saturating_sub(1).max(i + 1)]) {
                used.insert(name);
            }
            i = end;
        } else {
            let end = (i..b.len()).find(|&j| !is_ident(b[j])).unwrap_or(b.len());
            used.insert(code[i..end].to_string());
            i = end;
        }
    }
    used.retain(|m| modules.contains(m));
    (used, test_mods)
}

/// The first identifier of each comma-separated element of a `{…}` group, at depth 0.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut element = String::new();
    for c in group.chars().chain(std::iter::once(',')) {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                let head: String = element.trim().chars().take_while(|&c| is_ident(c as u8)).collect();
                if !head.is_empty() {
                    heads.push(head);
                }
                element.clear();
                continue;
            }
            _ => {}
        }
        if depth == 0 {
            element.push(c);
        }
    }
    heads
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The index after the `}` matching the `{` at `open`.
fn matching(b: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (j, &c) in b.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(j + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// The code without its `#[cfg(test)]` items (a block item to its matching brace, any other
/// to its `;`), and the names of the `#[cfg(test)] mod x;` declarations.
fn without_test_items(code: &str) -> (String, BTreeSet<String>) {
    const ATTR: &str = "#[cfg(test)]";
    let b = code.as_bytes();
    let mut out = String::new();
    let mut test_mods = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = code[i..].find(ATTR) {
        out.push_str(&code[i..i + at]);
        let mut j = i + at + ATTR.len();
        let mut item_start = j;
        let end = loop {
            match b.get(j) {
                None => break b.len(),
                Some(b'{') => break matching(b, j).unwrap_or(b.len()),
                Some(b';') => break j + 1,
                // Further attributes: skip them whole (they may hold `;` or braces in strings,
                // already blanked, but not braces of the item).
                Some(b'#') if b.get(j + 1) == Some(&b'[') => {
                    j = code[j..].find(']').map_or(b.len(), |k| j + k + 1);
                    item_start = j;
                }
                Some(_) => j += 1,
            }
        };
        let item = code[item_start..end].trim();
        let item = item.trim_start_matches("pub(crate) ").trim_start_matches("pub ");
        if let Some(name) = item.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
            test_mods.insert(name.trim().to_string());
        } else if let Some(rest) = item.strip_prefix("mod ") {
            let name: String = rest.chars().take_while(|&c| is_ident(c as u8)).collect();
            test_mods.insert(name);
        }
        i = end;
    }
    out.push_str(&code[i..]);
    (out, test_mods)
}

/// The code with comments removed and the insides of string and character literals blanked
/// (line breaks kept).
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && next == Some(b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == b'\n' {
                        out.push(b'\n');
                    }
                    i += 1;
                }
            }
        } else if c == b'r' && (next == Some(b'"') || next == Some(b'#')) && (i == 0 || !is_ident(b[i - 1])) {
            // A raw string: r"…", r#"…"#, …
            let hashes = b[i + 1..].iter().take_while(|&&h| h == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            out.extend_from_slice(b"\"\"");
            i += 2 + hashes;
            while i < b.len() && !b[i..].starts_with(&close) {
                if b[i] == b'\n' {
                    out.push(b'\n');
                }
                i += 1;
            }
            i += close.len();
        } else if c == b'"' {
            out.extend_from_slice(b"\"\"");
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if b.get(i) == Some(&b'\n') {
                    out.push(b'\n');
                }
                i += 1;
            }
            i += 1;
        } else if c == b'\'' {
            // A character literal ('x', '\n', '\u{…}') or a lifetime ('a).
            if next == Some(b'\\') {
                let close = b[i + 2..].iter().position(|&q| q == b'\'').map_or(b.len(), |k| i + 2 + k + 1);
                out.extend_from_slice(b"' '");
                i = close;
            } else if let Some(len) = text[i + 1..].chars().next().map(char::len_utf8)
                && b.get(i + 1 + len) == Some(&b'\'')
            {
                out.extend_from_slice(b"' '");
                i += len + 2;
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The strongly connected groups of more than one module (Tarjan), each sorted.
fn knots(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(lw));
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(iw));
            }
        }
        if s.low[v] == s.index[v] {
            let mut group = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                group.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if group.len() > 1 {
                group.sort();
                s.found.push(group);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found.sort();
    s.found
}

/// Each knot with the edges inside it and the files behind each edge.
fn describe(graph: &Graph, knots: &[Vec<String>]) -> String {
    let mut text = String::new();
    for knot in knots {
        text.push_str(&format!("  {}:\n", knot.join(", ")));
        for from in knot {
            for (to, files) in graph.get(from).into_iter().flatten() {
                if knot.contains(to) {
                    let files: Vec<&str> = files.iter().map(String::as_str).collect();
                    text.push_str(&format!("    {from} -> {to} ({})\n", files.join(", ")));
                }
            }
        }
    }
    text
}
