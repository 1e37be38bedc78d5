//! Telemetry shared by every component: the Prometheus metrics registry, per-thread request
//! statistics with rolling windows (`stats`), the store of instance output (logs), and the
//! set-up of Gantry's own structured logs (tracing).
//!
//! Architecture invariant: components create their metric handles once, at build time, through
//! [`Metrics::register`]; the request path only touches those handles (atomics), never the
//! registry. Metric names follow `gantry_<component>_<thing>_<unit>`.
#![forbid(unsafe_code)]

pub mod exposition;
pub mod logs;
pub mod stats;

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::registry::Registry;

pub use exposition::Format;
pub use logs::{
    level_of, Level, LogFilter, LogLine, LogStore, LogStream, LOG_STREAM, MAX_LINE_BYTES,
};
pub use prometheus_client;

/// The process-wide metrics registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            registry: Arc::new(Mutex::new(Registry::with_prefix("gantry"))),
        }
    }

    /// Register metrics of one component under `gantry_<component>_`.
    pub fn register<R>(&self, component: &str, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut reg = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        f(reg.sub_registry_with_prefix(component))
    }

    /// Every registered metric in OpenMetrics text.
    pub fn encode(&self) -> String {
        let reg = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }

    /// Every registered metric in the format a scraper asked for.
    pub fn encode_as(&self, format: Format) -> String {
        match format {
            Format::OpenMetrics => self.encode(),
            Format::Text => exposition::openmetrics_to_text(&self.encode()),
        }
    }
}

/// Set up Gantry's own logs on stderr: `json` for machines, compact text for people.
/// `RUST_LOG` overrides `default_filter`.
pub fn init_tracing(json: bool, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org).
    let ansi = !json
        && std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second initialisation (tests) is not an error worth reporting.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.compact().with_target(false).try_init()
    };
}
