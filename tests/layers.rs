//! The crate-root doc's layer table (src/lib.rs) is true of the source: every
//! top-level module is in the table, imports only its own layer or those
//! below, and the module imports have no cycle.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// (layer index from the top, modules) from the table in lib.rs.
fn layers() -> BTreeMap<String, usize> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("read src/lib.rs");
    let mut rows = lib
        .lines()
        .map(|l| l.trim_start_matches("//!").trim())
        .skip_while(|l| !l.starts_with("layer "))
        .skip(1)
        .take_while(|l| !l.starts_with("```"));
    let mut layer_of = BTreeMap::new();
    let mut n = 0;
    for row in rows.by_ref() {
        let mut words = row.split_whitespace();
        let _name = words.next();
        for module in words {
            layer_of.insert(module.to_owned(), n);
        }
        n += 1;
    }
    assert!(n >= 3, "layer table not found in src/lib.rs");
    layer_of
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (None for lib.rs / main.rs).
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_owned();
    (name != "lib" && name != "main").then_some(name)
}

/// Every `crate::name` a file mentions in code (in `use` lines and paths
/// alike); comments, doc links among them, are not imports.
fn imports(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let text = code.as_str();
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // e.g. `$crate::` or `telespool_crate::`
        }
        let rest = &text[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read source file");
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(imports(&text).into_iter().filter(|d| *d != module));
    }
    graph
}

#[test]
fn every_module_imports_only_its_own_layer_or_those_below() {
    let layer_of = layers();
    let graph = graph();
    let mut problems = Vec::new();
    for (module, deps) in &graph {
        let Some(&own) = layer_of.get(module) else {
            problems.push(format!(
                "src/{module} is not in the layer table of src/lib.rs"
            ));
            continue;
        };
        for dep in deps {
            match layer_of.get(dep) {
                Some(&layer) if layer < own => problems.push(format!(
                    "{module} imports {dep}, which is in a layer above it"
                )),
                _ => {}
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn module_imports_have_no_cycle() {
    let graph = graph();
    // Depth-first search with colours; report one cycle's path.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        path.push(node.to_owned());
        for dep in graph.get(node).into_iter().flatten() {
            if !graph.contains_key(dep) {
                continue;
            }
            match state.get(dep.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == dep).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(dep.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(cycle) = visit(dep, graph, state, path) {
                        return Some(cycle);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(cycle) = visit(node, &graph, &mut state, &mut Vec::new()) {
                panic!("import cycle: {}", cycle.join(" -> "));
            }
        }
    }
}

#[test]
fn the_import_scan_sees_paths_and_use_lines() {
    let text = "use crate::config::Config;\nlet x = crate::metrics::Metrics::new();\n$crate::nope\n/// see [`crate::app::run`]";
    let found = imports(text);
    assert!(found.contains("config") && found.contains("metrics"));
    assert!(!found.contains("nope") && !found.contains("app"));
}
