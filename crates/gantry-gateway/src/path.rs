//! Request path normalization, done before matching so that a route's prefix cannot be escaped
//! (`/public/../admin`, `/public/%2e%2e/admin`, `/public//admin`).
//!
//! Rules: percent-encoded unreserved characters are decoded (`%2e` → `.`, `%41` → `A`); an
//! encoded `/`, `\` or control character is rejected (its meaning differs between servers);
//! a raw `\` or control character is rejected; `//` collapses to `/`; `.` segments go and `..`
//! removes the previous segment, and climbing above the root is rejected. The normalized path is
//! also what is forwarded, so the instance sees exactly what was matched.
//!
//! Hosts are checked here too: a `Host` (or HTTP/2 `:authority`) is `uri-host [":" port]`
//! (RFC 9110 §7.2, RFC 3986 §3.2.2), and anything else is refused before routing, as RFC 9112
//! §3.2 asks (nginx: "client sent invalid host header").

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    EncodedSeparator,
    ControlCharacter,
    BadEscape,
    AboveRoot,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "request target must be an absolute path",
            PathError::EncodedSeparator => "encoded '/' or '\\' in the path is not allowed",
            PathError::ControlCharacter => "control characters or '\\' in the path are not allowed",
            PathError::BadEscape => "malformed percent-encoding in the path",
            PathError::AboveRoot => "path climbs above the root with '..'",
        }
    }
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Bytes of a registered name (RFC 3986 `reg-name`: unreserved, sub-delims, `%` of an escape).
const fn host_chars() -> [bool; 256] {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        c += 1;
    }
    t
}

static HOST_CHARS: [bool; 256] = host_chars();

/// Is `a` a valid `Host` value: a registered name (unreserved, sub-delims and percent-escapes),
/// an IPv4 address or a bracketed IPv6 literal, with an optional port of 1-5 digits up to 65535?
/// Empty values, spaces, userinfo (`@`) and unclosed brackets are not. (One pass, a table
/// lookup a byte: every request's host goes through it.)
pub fn valid_host(a: &[u8]) -> bool {
    let mut i = 0;
    if a.first() == Some(&b'[') {
        let Some(end) = a.iter().position(|c| *c == b']') else {
            return false;
        };
        let literal = std::str::from_utf8(&a[1..end])
            .ok()
            .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok());
        if literal.is_none() {
            return false;
        }
        i = end + 1;
    } else {
        while i < a.len() && HOST_CHARS[a[i] as usize] {
            i += 1;
        }
        if i == 0 {
            return false;
        }
    }
    if i == a.len() {
        return true;
    }
    a[i] == b':' && valid_port(&a[i + 1..])
}

/// A byte of a registered name (or an IPv4 address).
pub fn is_host_char(c: u8) -> bool {
    HOST_CHARS[c as usize]
}

/// A port: 1 to 5 digits, at most 65535.
pub fn valid_port(port: &[u8]) -> bool {
    if port.is_empty() || port.len() > 5 {
        return false;
    }
    let mut n = 0u32;
    for d in port {
        if !d.is_ascii_digit() {
            return false;
        }
        n = n * 10 + u32::from(d - b'0');
    }
    n <= 65_535
}

/// Normalize a request path (without query). Borrowed when nothing changes (the common case).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Fast path: no escapes, no empty or dot segments, nothing forbidden.
    let mut clean = true;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' => {
                clean = false;
                break;
            }
            b'\\' | 0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            b'/' => {
                if matches!(b.get(i + 1), Some(b'/') | Some(b'.')) {
                    clean = false;
                    break;
                }
            }
            _ => {}
        }
    }
    if clean {
        return Ok(Cow::Borrowed(path));
    }

    // Decode escapes of unreserved characters; keep other escapes as they are.
    let mut decoded: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            ) else {
                return Err(PathError::BadEscape);
            };
            let v = h * 16 + l;
            if v == b'/' || v == b'\\' {
                return Err(PathError::EncodedSeparator);
            }
            if v < 0x20 || v == 0x7f {
                return Err(PathError::ControlCharacter);
            }
            if is_unreserved(v) {
                decoded.push(v);
            } else {
                // Canonical uppercase escape.
                decoded.push(b'%');
                decoded.push(b[i + 1].to_ascii_uppercase());
                decoded.push(b[i + 2].to_ascii_uppercase());
            }
            i += 3;
        } else {
            if c == b'\\' || c < 0x20 || c == 0x7f {
                return Err(PathError::ControlCharacter);
            }
            decoded.push(c);
            i += 1;
        }
    }

    // Remove dot segments and empty segments.
    let trailing_slash =
        decoded.ends_with(b"/") || decoded.ends_with(b"/.") || decoded.ends_with(b"/..");
    let mut segs: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|&c| c == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                if segs.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segs {
        out.push('/');
        // Only ASCII bytes were produced above (non-ASCII input stays as raw UTF-8 bytes of a
        // valid &str, so the segments are valid UTF-8 too).
        out.push_str(std::str::from_utf8(s).map_err(|_| PathError::BadEscape)?);
    }
    if out.is_empty() || (trailing_slash && !segs.is_empty()) {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p).map(|c| c.into_owned())
    }

    #[test]
    fn clean_paths_are_borrowed() {
        assert!(matches!(normalize("/api/v1/items"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("/"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("/a.b/c"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn hosts() {
        for ok in [
            "example.com",
            "Example.COM:8080",
            "127.0.0.1",
            "127.0.0.1:65535",
            "[::1]",
            "[::1]:80",
            "[2001:db8::7]:443",
            "a-b_c~d.e",
            "xn--bcher-kva.example",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a:99999",
            "a:65536",
            "a:",
            ":80",
            "[::1",
            "[::1]x",
            "[nope]",
            "[::1]:",
            "user@host",
            "a/b",
            "a\tb",
            "a:8o",
            "a:123456",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn dot_segments_and_slashes() {
        assert_eq!(n("/public/../admin").unwrap(), "/admin");
        assert_eq!(n("/public/./x").unwrap(), "/public/x");
        assert_eq!(n("/public//admin").unwrap(), "/public/admin");
        assert_eq!(n("//admin").unwrap(), "/admin");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/a/").unwrap(), "/a/");
        assert_eq!(n("/a/b/../../").unwrap(), "/");
        assert_eq!(n("/..").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/a/../..").unwrap_err(), PathError::AboveRoot);
    }

    #[test]
    fn escapes() {
        assert_eq!(n("/public/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(n("/public/%2E%2E/admin").unwrap(), "/admin");
        assert_eq!(n("/%61pi").unwrap(), "/api");
        assert_eq!(n("/a%20b").unwrap(), "/a%20b");
        assert_eq!(n("/a%2fb").unwrap_err(), PathError::EncodedSeparator);
        assert_eq!(n("/a%2Fb").unwrap_err(), PathError::EncodedSeparator);
        assert_eq!(n("/a%5cb").unwrap_err(), PathError::EncodedSeparator);
        assert_eq!(n("/a%00").unwrap_err(), PathError::ControlCharacter);
        assert_eq!(n("/a%zz").unwrap_err(), PathError::BadEscape);
        assert_eq!(n("/a%4").unwrap_err(), PathError::BadEscape);
        assert_eq!(n("/a\\b").unwrap_err(), PathError::ControlCharacter);
        assert_eq!(n("a/b").unwrap_err(), PathError::NotAbsolute);
    }
}
