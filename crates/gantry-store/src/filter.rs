//! Key filters with JetStream subject wildcards: tokens are separated by `.`, `*` matches exactly
//! one token and `>` (last token only) matches one or more tokens.

use crate::{key_byte, StoreError};

/// A filter is a key whose tokens may be `*`, and whose last token may be `>`.
pub fn check_filter(filter: &str) -> Result<(), StoreError> {
    let bad = |why| {
        Err(StoreError::InvalidName {
            what: "key filter",
            name: filter.into(),
            why,
        })
    };
    if filter.is_empty() || filter.len() > 512 {
        return bad("expected 1-512 characters; use '>' for every key");
    }
    let tokens: Vec<&str> = filter.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        match *t {
            "" => return bad("a '.'-separated token is empty"),
            "*" => {}
            ">" if i + 1 == tokens.len() => {}
            ">" => return bad("'>' may only be the last token"),
            t if t.bytes().all(key_byte) => {}
            _ => {
                return bad("tokens are '*', a final '>', or characters of a-z, A-Z, 0-9 and -/_=")
            }
        }
    }
    Ok(())
}

/// Whether `key` matches the (valid) `filter`.
pub fn filter_matches(filter: &str, key: &str) -> bool {
    let mut keys = key.split('.');
    let mut filters = filter.split('.').peekable();
    loop {
        match (filters.next(), keys.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(f), Some(k)) if f == k => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The longest key prefix every match starts with: the literal tokens before the first wildcard,
/// each followed by `.`, or the whole filter when it has no wildcard.
pub fn literal_prefix(filter: &str) -> &str {
    let mut end = 0;
    for t in filter.split('.') {
        if t == "*" || t == ">" {
            return &filter[..end];
        }
        end += t.len() + 1;
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(filter_matches(">", "a"));
        assert!(filter_matches(">", "a.b.c"));
        assert!(filter_matches("a.>", "a.b"));
        assert!(filter_matches("a.>", "a.b.c"));
        assert!(!filter_matches("a.>", "a"));
        assert!(!filter_matches("a.>", "ab.c"));
        assert!(filter_matches("a.*", "a.b"));
        assert!(!filter_matches("a.*", "a.b.c"));
        assert!(!filter_matches("a.*", "a"));
        assert!(filter_matches("*.b", "x.b"));
        assert!(filter_matches("a.b", "a.b"));
        assert!(!filter_matches("a.b", "a.bc"));
        assert!(!filter_matches("a.b", "a.b.c"));
    }

    #[test]
    fn prefixes_and_validation() {
        assert_eq!(literal_prefix(">"), "");
        assert_eq!(literal_prefix("a.b.>"), "a.b.");
        assert_eq!(literal_prefix("a.*.c"), "a.");
        assert_eq!(literal_prefix("a.b"), "a.b");
        for ok in [">", "a", "a.*", "*.b.>", "svc-1.v=2"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a.", ".a", "a..b", "a.>.b", "a b", "a*", "x>"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }
}
