//! The house rules ARCHITECTURE.md states, checked: every source file is on
//! its code map, and a module it calls **pure** (and the whole protocol
//! crate) does no I/O, reads no clock and uses no runtime, database, HTTP or
//! MQTT crate outside its tests. Reads files only; no build, no root.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

fn architecture() -> String {
    std::fs::read_to_string(repo().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md")
}

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("a source dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

const CRATES: [&str; 7] = [
    "agent/src",
    "controller/src",
    "protocol/src",
    "agent/registry/src",
    "agent/regex-lite-as-regex/src",
    "agent/nc-sched/src",
    "tests/src",
];

/// What a pure module must not touch (outside `#[cfg(test)]`).
const IMPURE: [&str; 13] = [
    "std::fs",
    "std::net",
    "std::process",
    "std::thread",
    "SystemTime::now",
    "Instant::now",
    "tokio",
    "rusqlite",
    "axum",
    "rumqttc",
    "ureq",
    "libc::",
    "nix::",
];

/// The files a code map entry (`name`, `name.rs` or `dir/name.rs`) names, in `section`.
fn mentioned(map: &str, base: &Path, file: &Path) -> bool {
    let rel = file.strip_prefix(base).expect("under its crate").to_string_lossy().into_owned();
    let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if matches!(stem.as_str(), "mod" | "lib" | "main") {
        return true; // the crate or directory is the entry
    }
    [format!("`{stem}`"), format!("`{stem}.rs`"), rel.clone(), format!("`{}`", rel.trim_end_matches(".rs"))]
        .iter()
        .any(|c| map.contains(c.as_str()))
}

#[test]
fn every_source_file_is_on_the_code_map() {
    let map = architecture();
    let root = repo();
    let mut missing = Vec::new();
    for krate in CRATES {
        let base = root.join(krate);
        for file in sources(&base) {
            if !mentioned(&map, &base, &file) {
                missing.push(file.strip_prefix(&root).expect("in the repo").display().to_string());
            }
        }
    }
    assert!(missing.is_empty(), "ARCHITECTURE.md's code map does not mention: {missing:?}");
}

/// (file, what it uses) for every module ARCHITECTURE.md calls pure.
fn impurities() -> Vec<(String, Vec<&'static str>)> {
    let root = repo();
    let mut section = None;
    let mut found = Vec::new();
    let mut check = |path: PathBuf| {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Code before its tests, without comments (docs may name what the module avoids).
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or("")
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let hits: Vec<&str> = IMPURE.iter().copied().filter(|p| code.contains(p)).collect();
        found.push((path.strip_prefix(&root).expect("in the repo").display().to_string(), hits));
    };
    for line in architecture().lines() {
        if let Some(rest) = line.strip_prefix("### `") {
            section = rest.split('/').next().map(|c| format!("{c}/src"));
        }
        let mut rest = line;
        while let Some(at) = rest.find("` — **pure**") {
            let name = rest[..at].rsplit('`').next().unwrap_or("");
            rest = &rest[at + 1..];
            let Some(dir) = &section else { continue };
            let base = root.join(dir);
            let candidates = if name.ends_with(".rs") {
                vec![base.join(name)]
            } else {
                vec![base.join(format!("{name}.rs")), base.join(name).join("mod.rs")]
            };
            let path = candidates
                .iter()
                .find(|p| p.is_file())
                .unwrap_or_else(|| panic!("ARCHITECTURE.md calls `{name}` pure, but {dir} has no such module"));
            check(path.clone());
        }
    }
    // The protocol crate: no I/O at all (but the OS random source).
    for file in sources(&root.join("protocol/src")) {
        check(file);
    }
    found
}

#[test]
fn modules_called_pure_do_no_io_and_read_no_clock() {
    let all = impurities();
    assert!(all.len() >= 10, "too few pure modules found: {all:?}");
    let dirty: Vec<_> = all.into_iter().filter(|(_, hits)| !hits.is_empty()).collect();
    assert!(dirty.is_empty(), "modules ARCHITECTURE.md calls pure use: {dirty:?}");
}
