//! The access log: one JSON line per request on stderr (when `[gateway] access_log = true`).

use std::time::Duration;

use crate::context::Ctx;

/// One JSON line per request on stderr (when `[gateway] access_log = true`).
pub(crate) fn write(
    ctx: &Ctx,
    route: &str,
    upstream: &str,
    status: u16,
    bytes: u64,
    upstream_time: Option<Duration>,
    complete: bool,
) {
    use std::io::Write;
    let line = serde_json::json!({
        "ts_ms": gantry_model::unix_ms(),
        "type": "access",
        "request_id": ctx.request_id.to_str().unwrap_or(""),
        "trace_id": std::str::from_utf8(&ctx.trace_id).unwrap_or(""),
        "method": ctx.method.as_str(),
        "protocol": format!("{:?}", ctx.version),
        "host": ctx.host.as_deref().unwrap_or(""),
        "path": ctx.path,
        "route": route,
        "upstream": upstream,
        "status": status,
        "bytes": bytes,
        "complete": complete,
        "upstream_ms": upstream_time.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        "duration_ms": ctx.start.elapsed().as_secs_f64() * 1000.0,
        "client": ctx.client.ip().to_string(),
    });
    let mut err = std::io::stderr().lock();
    let _ = serde_json::to_writer(&mut err, &line);
    let _ = err.write_all(b"\n");
}
