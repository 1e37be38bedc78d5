//! Shared types between Gantry's control plane and its data plane.
//!
//! Architecture invariant: this crate holds plain data (no I/O, no async, no locks). The gateway
//! depends on it and on nothing from the control plane; the control plane produces these values
//! and hands them over as immutable snapshots.
#![forbid(unsafe_code)]

mod deploy;
mod registry;
mod route;

pub use deploy::{
    BackoffSpec, Deployment, HealthSpec, OnConfigChange, Placement, ProbeKind, Resources,
    RestartPolicy, VersionDeployment, VersionSource,
};

pub use registry::{
    Check, CheckKind, Health, Instance, InstanceSource, RegistryEvent, RegistryEventKind,
    RegistrySnapshot, ServiceMap,
};
pub use route::{
    ActiveHealth, AuthMode, Backend, CachePolicy, CircuitBreakerPolicy, Forward, GatewayModel,
    HashOn, HeaderOps, LoadBalancer, Mirror, OutlierPolicy, PathMatch, RateLimit, RateLimitKey,
    Redirect, RetryPolicy, Rewrite, Route, RouteAction, RouteAuth, RouteMatch, Timeouts,
    UpstreamPolicy, UpstreamProtocol, UpstreamTls, ValueCondition, ValueMatch,
};

/// Milliseconds since the Unix epoch, the one wall-clock unit used in stored records and APIs.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Environment names the supervisor sets itself (`PORT`, `GANTRY_*`): not for the spec's `env`
/// nor for config keys.
pub fn is_reserved_env(key: &str) -> bool {
    key == "PORT" || key.starts_with("GANTRY_")
}

/// A portable environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_valid_env_name(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Gantry's own services on the gateway (the token service, the bus): only Gantry registers
/// their instances.
pub const BUILTIN_SERVICES: [&str; 2] = ["gantry-identity", "gantry-bus"];

pub fn is_builtin_service(name: &str) -> bool {
    BUILTIN_SERVICES.contains(&name)
}

/// Is `name` a valid service name: 1..=63 characters of `[a-z0-9-]`, starting with a letter and
/// not ending with `-` (a DNS label, so it can later be served over DNS and used in hostnames).
pub fn is_valid_service_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        assert!(is_valid_service_name("orders"));
        assert!(is_valid_service_name("orders-v2"));
        assert!(!is_valid_service_name(""));
        assert!(!is_valid_service_name("Orders"));
        assert!(!is_valid_service_name("2orders"));
        assert!(!is_valid_service_name("orders-"));
        assert!(!is_valid_service_name("or_ders"));
        assert!(!is_valid_service_name(&"a".repeat(64)));
    }
}
