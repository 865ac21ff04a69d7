//! Cheap checks that keep the tree honest, run as ordinary tests.

use std::fs;
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn all_rust_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["crates", "xtask", "tests", "fuzz"] {
        rust_files(&workspace_root().join(dir), &mut files);
    }
    assert!(files.len() > 5, "the tidy check must see the tree");
    files
}

#[test]
fn every_rust_file_starts_with_a_module_doc_line() {
    let offenders: Vec<_> = all_rust_files()
        .into_iter()
        .filter(|path| !fs::read_to_string(path).unwrap().starts_with("//!"))
        .collect();
    assert!(offenders.is_empty(), "files without a leading `//!` line: {offenders:?}");
}

#[test]
fn no_ignored_tests_and_no_trailing_whitespace() {
    let ignore = ["#[", "ignore]"].concat();
    for path in all_rust_files() {
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&ignore), "{} ignores a test: a test runs or is deleted", path.display());
        for (n, line) in text.lines().enumerate() {
            assert!(line.trim_end() == line, "{}:{} has trailing whitespace", path.display(), n + 1);
        }
    }
}
