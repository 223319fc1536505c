//! The extension's src/ is layered: each folder is a layer, and a module imports only from its
//! own layer or the layers below it, without an import cycle between modules
//! (docs/architecture.md, "Layers"). This test reads every `crate::` path in src/ and fails on
//! an upward import or a cycle, naming it, so the structure stays as it was made.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first.
const LAYERS: &[&str] = &["base", "log", "apply", "schema", "api", "runtime"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| module == *l || module.starts_with(&format!("{l}::")))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `apply/mod.rs` is module `apply`, `apply/rows.rs` is `apply::rows`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).filter(|p| p != "mod").collect();
    parts.join("::")
}

/// The modules a file refers to by `crate::` paths, resolved to the longest known module.
fn references(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // Drop line comments, where paths are only words.
    let code: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let path: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':' || *c == '{').collect();
        let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty() && !s.starts_with('{')).collect();
        for n in (1..=segments.len()).rev() {
            let candidate = segments[..n].join("::");
            if modules.contains(&candidate) {
                out.insert(candidate);
                break;
            }
        }
        // `use crate::apply::{decide, exceptions}`: the braces name modules too.
        if let Some(brace) = path.find('{') {
            let base = path[..brace].trim_end_matches(':');
            let after = &rest[brace + 1..];
            let inner: String = after.chars().take_while(|c| *c != '}').collect();
            for item in inner.split(',') {
                let item = item.trim().split("::").next().unwrap_or("").trim();
                let candidate = format!("{base}::{item}");
                if modules.contains(&candidate) {
                    out.insert(candidate);
                }
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    files
        .iter()
        .map(|f| {
            let module = module_of(&src, f);
            let refs = references(&std::fs::read_to_string(f).unwrap(), &modules);
            let refs = refs.into_iter().filter(|r| *r != module).collect();
            (module, refs)
        })
        .collect()
}

fn upward_imports(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut bad = Vec::new();
    for (module, refs) in g {
        if module == "lib" {
            continue;
        }
        let Some(from) = layer_of(module) else {
            bad.push(format!("{module} is in no layer (src/ holds only the folders {LAYERS:?} and lib.rs)"));
            continue;
        };
        for r in refs {
            if let Some(to) = layer_of(r) {
                if to > from {
                    bad.push(format!("{module} (layer {}) imports {r} (layer {}), a layer above it", LAYERS[from], LAYERS[to]));
                }
            }
        }
    }
    bad
}

/// A cycle among modules, as the path that closes it, if there is one. A module's own children
/// (`apply::rows` in `apply`) may refer to their parent: they are part of it.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(m: &str, g: &BTreeMap<String, BTreeSet<String>>, state: &mut BTreeMap<String, u8>, stack: &mut Vec<String>) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for r in g.get(m).into_iter().flatten() {
            if m.starts_with(&format!("{r}::")) {
                continue; // a child naming its parent
            }
            match state.get(r.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|s| s == r).unwrap();
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(r.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(r, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in g.keys() {
        if m != "lib" && state.get(m).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(m, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn imports_only_go_down_and_close_no_cycle() {
    let g = graph();
    assert!(g.len() > 20, "read only {} modules of src/", g.len());
    let bad = upward_imports(&g);
    assert!(bad.is_empty(), "upward imports:\n{}", bad.join("\n"));
    if let Some(cycle) = find_cycle(&g) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_check_catches_what_it_is_for() {
    let mut g = BTreeMap::new();
    g.insert("base::wire".to_string(), BTreeSet::from(["apply::decide".to_string()]));
    g.insert("apply::decide".to_string(), BTreeSet::new());
    assert_eq!(upward_imports(&g).len(), 1, "an upward import is reported");
    let mut g = BTreeMap::new();
    g.insert("apply::a".to_string(), BTreeSet::from(["apply::b".to_string()]));
    g.insert("apply::b".to_string(), BTreeSet::from(["apply::a".to_string()]));
    assert!(find_cycle(&g).is_some(), "a cycle within a layer is reported");
    let mut g = BTreeMap::new();
    g.insert("apply".to_string(), BTreeSet::from(["apply::rows".to_string()]));
    g.insert("apply::rows".to_string(), BTreeSet::from(["apply".to_string()]));
    assert!(find_cycle(&g).is_none(), "a child may name its parent");
    let modules = BTreeSet::from(["apply".to_string(), "apply::decide".to_string(), "base::wire".to_string(), "base".to_string()]);
    let refs = references("use crate::apply::{decide, x};\nlet y = crate::base::wire::Op::Insert; // crate::log::z", &modules);
    assert_eq!(refs, BTreeSet::from(["apply".to_string(), "apply::decide".to_string(), "base::wire".to_string()]));
}
