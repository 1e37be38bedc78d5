//! Entry points for the fuzz targets (`fuzz/`) and their corpus replay tests: what the gateway
//! reads from a request before routing it (the path and the host), run on arbitrary input with
//! the properties it must keep checked (a failed check panics, which is what a fuzzer reports).
//! Not an API.

use crate::context::{strip_port, Host};
use crate::path::{normalize, valid_host};

/// Path normalization on `data`. Properties: no panic; a normalized path is absolute, has no
/// empty, `.` or `..` segment, no `\` or control byte and no escape of an unreserved character
/// left to decode (no route prefix can be escaped by what the instance decodes later), and
/// normalizing it again changes nothing. Returns whether the path was accepted.
pub fn path(data: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(p) = normalize(s) else {
        return false;
    };
    assert!(p.starts_with('/'), "{p:?} is not absolute");
    assert!(!p.contains("//"), "{p:?} has an empty segment");
    for seg in p.split('/').skip(1) {
        assert!(seg != "." && seg != "..", "{p:?} has a dot segment");
    }
    assert!(
        !p.bytes().any(|c| c == b'\\' || c < 0x20 || c == 0x7f),
        "{p:?} has a control byte"
    );
    let b = p.as_bytes();
    for (i, c) in b.iter().enumerate() {
        if *c == b'%' {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("an escape");
            let v = u8::from_str_radix(hex, 16).expect("a valid escape");
            assert!(
                !(v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~')),
                "{p:?} keeps an escaped unreserved character"
            );
            assert!(v != b'/' && v != b'\\', "{p:?} keeps an escaped separator");
        }
    }
    let again = normalize(&p).expect("a normalized path normalizes");
    assert_eq!(again, p, "normalization is not idempotent");
    true
}

/// The `Host` check on `data`, in its two forms: the one-pass reader every request goes through
/// (`Host::from_header`) and the general check (`valid_host`). Properties: no panic; they agree
/// on what is valid; the host read is the value lowercased, without its port.
pub fn host(data: &[u8]) -> bool {
    let read = Host::from_header(data);
    assert_eq!(
        read.is_some(),
        valid_host(data),
        "the two host checks disagree"
    );
    let Some(h) = read else {
        return false;
    };
    let s = std::str::from_utf8(data).expect("a valid host is ASCII");
    assert_eq!(
        h.as_deref(),
        Some(strip_port(s).to_ascii_lowercase().as_str()),
        "host read differently"
    );
    true
}
