//! The fuzz corpus (`fuzz/corpus/{path,host}/`) replayed through the fuzz targets' entry points:
//! every input keeps its properties, and the hand-written seeds, named `ok-` or `refused-`, are
//! still accepted or refused.

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8]) -> bool) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let e = e.expect("a directory entry");
        let name = e.file_name().to_string_lossy().into_owned();
        let accepted = run(&std::fs::read(e.path()).expect("a corpus file"));
        if name.starts_with("ok-") {
            assert!(accepted, "{target}/{name}: refused");
        } else if name.starts_with("refused-") {
            assert!(!accepted, "{target}/{name}: accepted");
        }
        seen += 1;
    }
    assert!(seen >= 5, "{}: the seeds are missing", dir.display());
}

#[test]
fn paths() {
    replay("path", gantry_gateway::fuzzing::path);
}

#[test]
fn hosts() {
    replay("host", gantry_gateway::fuzzing::host);
}
