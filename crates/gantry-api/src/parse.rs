//! What every endpoint group shares: strict body and query parsing into typed requests.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use serde::de::DeserializeOwned;

use crate::ApiError;

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Parse a JSON body, naming the offending field on error.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::bad_request("expected a JSON request body"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::bad_request(format!("invalid JSON body: {}", e.inner()))
        } else {
            ApiError::bad_request(format!("invalid JSON body at {path}: {}", e.inner()))
        }
    })?;
    // One JSON document: anything after it but whitespace is refused, not ignored.
    de.end().map_err(|e| {
        ApiError::bad_request(format!(
            "invalid JSON body: unexpected data after the JSON value ({e})"
        ))
    })?;
    Ok(value)
}

pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))
}

/// Whether a query string asks for secret values: any `reveal` parameter, decoded as the
/// handlers decode it, that is not `false` (what is not clearly a no is treated as asking, so
/// no spelling gets secrets past the `config:reveal` check).
pub(crate) fn wants_reveal(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "reveal" && v != "false")
    })
}

/// A point in time as the API takes it: unix milliseconds, an RFC 3339 time, or a duration ago
/// (`10m`).
pub(crate) fn time_ms(s: &str) -> Option<u64> {
    if let Ok(ms) = s.parse::<u64>() {
        return Some(ms);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Some(
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        );
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Some(gantry_model::unix_ms().saturating_sub(d.as_millis() as u64));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::wants_reveal;

    #[test]
    fn every_spelling_of_reveal_is_seen() {
        for q in [
            "reveal=true",
            "reveal=%74rue",
            "r%65veal=true",
            "x=1&reveal=true",
            "reveal=false&reveal=true",
            "reveal",
            "reveal=1",
            "reveal=TRUE",
        ] {
            assert!(wants_reveal(Some(q)), "{q}");
        }
        for q in ["reveal=false", "revealed=true", "x=reveal", ""] {
            assert!(!wants_reveal(Some(q)), "{q}");
        }
        assert!(!wants_reveal(None));
    }
}
