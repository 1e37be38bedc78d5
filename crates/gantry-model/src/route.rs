use serde::{Deserialize, Serialize};

/// One routing rule from the spec (or, later, the admin API), with every option resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Stable name used in metrics and logs, e.g. `catalog/0`.
    pub id: String,
    /// Target service.
    pub service: String,
    /// Exact host to match (lowercase, without port); `None` matches any host.
    pub host: Option<String>,
    /// Path prefix, matched on whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    pub path_prefix: String,
    /// Remove `path_prefix` from the path before forwarding.
    pub strip_prefix: bool,
    /// Whole-request timeout (until response headers), in milliseconds.
    pub timeout_ms: u64,
}
