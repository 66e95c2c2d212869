//! Layering: imports between top-level modules of `src/` form no cycle, so a feature folder can
//! be read (and changed) by following arrows that point one way only. Cycles inside one feature
//! folder are allowed; a cycle that crosses folders fails with the path that closes it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Top-level module a source file belongs to: `src/foo.rs` and `src/foo/**` are `foo`.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    // The crate root only declares modules and re-exports the entry points.
    (name != "lib" && name != "main").then(|| name.to_owned())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Drops `//` comments (line and doc) and string literals so prose naming `crate::x` is not an
/// import. Block comments are not used in this code base.
fn strip_comments_and_strings(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = '\0';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if in_str {
                if c == '"' && prev != '\\' {
                    in_str = false;
                }
                prev = if prev == '\\' && c == '\\' { '\0' } else { c };
                continue;
            }
            if c == '/' && chars.peek() == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\'' {
                in_str = true;
                prev = '\0';
                continue;
            }
            out.push(c);
            prev = c;
        }
        out.push('\n');
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Top-level modules named by every `crate::…` path in `code`, including each first-level
/// item of a `crate::{a::x, b}` group.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        // `devgate_crate::` or `$crate::` are not ours.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let trimmed = rest.trim_start();
        if let Some(group) = trimmed.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if depth == 1 && item_start && !c.is_whitespace() => {
                        let name = ident_at(&group[i..]);
                        if !name.is_empty() {
                            found.insert(name.to_owned());
                        }
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident_at(trimmed);
            if !name.is_empty() {
                found.insert(name.to_owned());
            }
        }
    }
    found
}

/// Module graph: top-level module → top-level modules it imports (self-edges dropped).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = top_module(src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read source file");
        let deps = crate_paths(&strip_comments_and_strings(&text));
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(deps.into_iter().filter(|d| *d != module));
    }
    graph
}

/// One cycle in `graph`, as the list of modules that closes it, if there is any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack
                    .iter()
                    .position(|n| n == node)
                    .expect("open node on stack");
                let mut cycle = stack[from..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn layering_parser_reads_groups_and_paths() {
    let code = strip_comments_and_strings(
        "use crate::{\n    auth::{Scope, Scopes},\n    db::StoreError,\n    kv,\n};\n\
         // crate::commented::Out\n\
         let s = \"crate::quoted\";\n\
         fn f(x: &crate::identity::TenantId) {}\n\
         macro_rules! m { () => { $crate::macro_path } }\n",
    );
    let found: Vec<_> = crate_paths(&code).into_iter().collect();
    assert_eq!(found, ["auth", "db", "identity", "kv"]);
}

#[test]
fn layering_finds_a_planted_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    graph.entry("c".into()).or_default().insert("a".into());
    graph.entry("d".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    graph.get_mut("c").expect("c").clear();
    assert_eq!(find_cycle(&graph), None);
}

#[test]
fn layering_no_import_cycle_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    // The scan must see the code base, not an empty folder.
    assert!(
        graph.contains_key("api_keys") && graph.contains_key("db"),
        "{graph:?}"
    );
    assert!(
        graph["api_keys"].contains("db"),
        "api_keys → db is a known edge: {graph:?}"
    );
    // The shared identity types stay a leaf: importing them ties no folders together.
    assert!(
        graph["identity"].is_empty(),
        "identity must import nothing of devgate: {:?}",
        graph["identity"]
    );
    if let Some(cycle) = find_cycle(&graph) {
        let edges: Vec<String> = graph
            .iter()
            .map(|(m, deps)| {
                format!(
                    "{m} → {}",
                    deps.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            })
            .collect();
        panic!(
            "import cycle across top-level modules: {}\n{}",
            cycle.join(" → "),
            edges.join("\n")
        );
    }
}
