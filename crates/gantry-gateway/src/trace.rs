//! W3C Trace Context (`traceparent`): a valid incoming header keeps its trace id and gets a new
//! parent id (the gateway is a hop); an absent or invalid one is replaced by a new trace.

use std::fmt::Write;

use crate::rand::next_u64;

/// The `traceparent` to send upstream, and the trace id (for logs).
pub struct TraceContext {
    pub header: String,
    pub trace_id: String,
}

fn is_hex_lower(s: &str) -> bool {
    s.bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Parse `version-traceid-parentid-flags`; returns (trace id, flags) when valid.
fn parse(h: &str) -> Option<(&str, &str)> {
    let mut parts = h.trim().split('-');
    let (v, t, p, f) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; future versions may add more (kept compatible).
    if v.len() != 2 || !is_hex_lower(v) || v == "ff" || (v == "00" && parts.next().is_some()) {
        return None;
    }
    if t.len() != 32 || !is_hex_lower(t) || t.bytes().all(|c| c == b'0') {
        return None;
    }
    if p.len() != 16 || !is_hex_lower(p) || p.bytes().all(|c| c == b'0') {
        return None;
    }
    if f.len() != 2 || !is_hex_lower(f) {
        return None;
    }
    Some((t, f))
}

fn span_id() -> String {
    let mut id = next_u64();
    if id == 0 {
        id = 1;
    }
    format!("{id:016x}")
}

pub fn propagate(incoming: Option<&str>) -> TraceContext {
    match incoming.and_then(parse) {
        Some((trace, flags)) => {
            let mut header = String::with_capacity(55);
            let _ = write!(header, "00-{trace}-{}-{flags}", span_id());
            TraceContext {
                header,
                trace_id: trace.to_string(),
            }
        }
        None => {
            let trace_id = format!("{:016x}{:016x}", next_u64(), next_u64() | 1);
            TraceContext {
                header: format!("00-{trace_id}-{}-01", span_id()),
                trace_id,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_trace_id_and_replaces_parent() {
        let inc = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = propagate(Some(inc));
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(t.header.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(t.header.ends_with("-01"));
        assert!(!t.header.contains("00f067aa0ba902b7"));
        assert_eq!(t.header.len(), 55);
    }

    #[test]
    fn invalid_or_missing_starts_a_new_trace() {
        for bad in [
            None,
            Some("garbage"),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
        ] {
            let t = propagate(bad);
            assert_eq!(t.trace_id.len(), 32);
            assert!(parse(&t.header).is_some(), "{}", t.header);
            if let Some(b) = bad {
                assert!(!b.contains(&t.trace_id));
            }
        }
    }
}
