//! W3C Trace Context (`traceparent`): a valid incoming header keeps its trace id and gets a new
//! parent id (the gateway is a hop); an absent or invalid one is replaced by a new trace.

use crate::rand::next_u64;

/// The `traceparent` to send upstream, and the trace id (for logs).
pub struct TraceContext {
    pub header: http::HeaderValue,
    pub trace_id: [u8; 32],
}

impl TraceContext {
    #[cfg(test)]
    pub fn trace_id_str(&self) -> &str {
        std::str::from_utf8(&self.trace_id).unwrap_or("")
    }
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

/// Two lowercase hex digits for each byte value.
const HEX2: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    t
};

/// `v` as 16 lowercase hex digits (a byte at a time: ids are made on every request).
pub(crate) fn hex_into(out: &mut [u8], v: u64) {
    for (pair, b) in out.chunks_exact_mut(2).zip(v.to_be_bytes()) {
        pair.copy_from_slice(&HEX2[b as usize]);
    }
}

pub fn propagate(incoming: Option<&str>) -> TraceContext {
    // 00-<32 trace>-<16 parent>-<2 flags>
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let mut trace_id = [0u8; 32];
    match incoming.and_then(parse) {
        Some((trace, flags)) => {
            trace_id.copy_from_slice(trace.as_bytes());
            buf[53..55].copy_from_slice(flags.as_bytes());
        }
        None => {
            hex_into(&mut trace_id[..16], next_u64());
            hex_into(&mut trace_id[16..], next_u64() | 1);
        }
    }
    buf[3..35].copy_from_slice(&trace_id);
    hex_into(&mut buf[36..52], next_u64() | 1);
    TraceContext {
        header: http::HeaderValue::from_bytes(&buf)
            .unwrap_or_else(|_| http::HeaderValue::from_static("")),
        trace_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digits() {
        let mut out = [0u8; 16];
        hex_into(&mut out, 0x0123_4567_89ab_cdef);
        assert_eq!(&out, b"0123456789abcdef");
        hex_into(&mut out, u64::MAX);
        assert_eq!(&out, b"ffffffffffffffff");
    }

    #[test]
    fn keeps_trace_id_and_replaces_parent() {
        let inc = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = propagate(Some(inc));
        let h = t.header.to_str().unwrap_or("");
        assert_eq!(t.trace_id_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(h.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(h.ends_with("-01"));
        assert!(!h.contains("00f067aa0ba902b7"));
        assert_eq!(h.len(), 55);
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
            let h = t.header.to_str().unwrap_or("");
            assert!(parse(h).is_some(), "{h}");
            if let Some(b) = bad {
                assert!(!b.contains(t.trace_id_str()));
            }
        }
    }
}
