//! The fuzz corpus (`fuzz/corpus/<target>/`) replayed through the fuzz targets' entry points:
//! every input the fuzzer kept or found keeps its properties, and the hand-written seeds, named
//! for what they must do (`request-`, `refused-`, ...), still do it.

use std::path::PathBuf;

use gantry_http::fuzzing::{self, HeadOutcome};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.expect("a directory entry");
            let data = std::fs::read(e.path()).expect("a corpus file");
            (e.file_name().to_string_lossy().into_owned(), data)
        })
        .collect();
    out.sort();
    assert!(out.len() >= 5, "{}: the seeds are missing", dir.display());
    out
}

/// The expectation a seed's name gives, if any: the prefix before the first `-`.
fn expectation(name: &str) -> Option<&str> {
    name.split_once('-').map(|(p, _)| p)
}

#[test]
fn request_heads() {
    for (name, data) in corpus("request_head") {
        let got = fuzzing::request_head(&data);
        let want = match expectation(&name) {
            Some("request") => HeadOutcome::Request,
            Some("handoff") => HeadOutcome::Handoff,
            Some("refused") => HeadOutcome::Refused,
            Some("incomplete") => HeadOutcome::Incomplete,
            _ => continue,
        };
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn response_heads() {
    for (name, data) in corpus("response_head") {
        let got = fuzzing::response_head(&data);
        match expectation(&name) {
            Some("status") => assert!(got.is_some(), "{name}: refused"),
            Some("none") => assert_eq!(got, None, "{name}: accepted"),
            _ => {}
        }
    }
}

#[test]
fn chunked_bodies() {
    for (name, data) in corpus("chunked") {
        let ended = fuzzing::chunked(&data);
        match expectation(&name) {
            Some("end") => assert!(ended, "{name}: did not end"),
            Some("error") => assert!(!ended, "{name}: ended"),
            _ => {}
        }
    }
}
