//! `gantry top`: live figures per service (traffic over the last minute, from the gateway) and
//! per instance (CPU, memory, open files, restarts), refreshed every interval.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use serde_json::Value;

use crate::client::{CliError, Client};
use crate::table;

/// One poll: instances (with their usage) and the gateway's traffic windows.
struct Frame {
    at: std::time::Instant,
    instances: Vec<Value>,
    traffic: Value,
}

async fn poll(c: &Client) -> Result<Frame, CliError> {
    let instances = c.get("/v1/instances").await?;
    let traffic = c.get("/v1/traffic").await?;
    Ok(Frame {
        at: std::time::Instant::now(),
        instances: instances.as_array().cloned().unwrap_or_default(),
        traffic,
    })
}

fn cpu_seconds(i: &Value) -> Option<f64> {
    i["usage"]["cpu_seconds"].as_f64()
}

/// CPU use between two polls, per instance id, in percent of one core.
fn cpu_percent(prev: &Frame, now: &Frame) -> BTreeMap<String, f64> {
    let dt = now.at.duration_since(prev.at).as_secs_f64();
    let before: BTreeMap<&str, f64> = prev
        .instances
        .iter()
        .filter_map(|i| Some((i["id"].as_str()?, cpu_seconds(i)?)))
        .collect();
    now.instances
        .iter()
        .filter_map(|i| {
            let id = i["id"].as_str()?;
            let d = cpu_seconds(i)? - before.get(id)?;
            (dt > 0.0).then(|| (id.to_string(), (d / dt * 100.0).max(0.0)))
        })
        .collect()
}

fn mib(bytes: f64) -> String {
    format!("{:.1}M", bytes / (1024.0 * 1024.0))
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

/// The figures as JSON (`--json`): services and instances.
fn json_of(now: &Frame, cpu: &BTreeMap<String, f64>) -> Value {
    let instances: Vec<Value> = now
        .instances
        .iter()
        .map(|i| {
            let id = i["id"].as_str().unwrap_or("");
            serde_json::json!({
                "service": i["service"],
                "instance": id,
                "version": i["version"],
                "state": i["state"],
                "cpu_percent": cpu.get(id),
                "memory_bytes": i["usage"]["memory_bytes"],
                "open_fds": i["usage"]["open_fds"],
                "restarts": i["restarts"],
            })
        })
        .collect();
    serde_json::json!({
        "window_seconds": now.traffic["window_seconds"],
        "services": now.traffic["services"],
        "instances": instances,
    })
}

fn print_frame(now: &Frame, cpu: &BTreeMap<String, f64>) {
    let services: BTreeMap<String, &Value> = now.traffic["services"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|s| Some((s["service"].as_str()?.to_string(), s)))
                .collect()
        })
        .unwrap_or_default();
    // Every supervised service, and every service with traffic.
    let mut names: Vec<String> = now
        .instances
        .iter()
        .filter_map(|i| i["service"].as_str().map(str::to_string))
        .chain(services.keys().cloned())
        .collect();
    names.sort();
    names.dedup();
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|name| {
            let mine: Vec<&Value> = now
                .instances
                .iter()
                .filter(|i| i["service"] == name.as_str())
                .collect();
            let healthy = mine.iter().filter(|i| i["state"] == "healthy").count();
            let cpu_sum: Option<f64> = mine
                .iter()
                .filter_map(|i| cpu.get(i["id"].as_str()?))
                .copied()
                .reduce(|a, b| a + b);
            let mem: Option<f64> = mine
                .iter()
                .filter_map(|i| i["usage"]["memory_bytes"].as_f64())
                .reduce(|a, b| a + b);
            let t = services.get(name);
            let f = |k: &str| t.and_then(|t| t[k].as_f64());
            vec![
                name.clone(),
                if mine.is_empty() {
                    "-".into()
                } else {
                    format!("{healthy}/{}", mine.len())
                },
                opt(f("requests_per_second"), |v| format!("{v:.1}")),
                opt(f("error_rate"), |v| format!("{:.1}%", v * 100.0)),
                opt(f("p50_ms"), |v| format!("{v:.1}ms")),
                opt(f("p99_ms"), |v| format!("{v:.1}ms")),
                opt(cpu_sum, |v| format!("{v:.1}%")),
                opt(mem, mib),
            ]
        })
        .collect();
    table::print(
        &[
            "SERVICE", "HEALTHY", "REQ/S", "ERRORS", "P50", "P99", "CPU", "MEMORY",
        ],
        &rows,
    );
    println!();
    let rows: Vec<Vec<String>> = now
        .instances
        .iter()
        .map(|i| {
            let id = i["id"].as_str().unwrap_or("").to_string();
            let u = &i["usage"];
            vec![
                i["service"].as_str().unwrap_or("").to_string(),
                id.clone(),
                i["version"].as_str().unwrap_or("").to_string(),
                i["state"].as_str().unwrap_or("").to_string(),
                opt(cpu.get(&id).copied(), |v| format!("{v:.1}%")),
                opt(u["memory_bytes"].as_f64(), mib),
                opt(u["open_fds"].as_f64(), |v| format!("{v:.0}")),
                opt(u["processes"].as_f64(), |v| format!("{v:.0}")),
                i["restarts"].to_string(),
            ]
        })
        .collect();
    table::print(
        &[
            "SERVICE", "INSTANCE", "VERSION", "STATE", "CPU", "MEMORY", "FILES", "PROCS",
            "RESTARTS",
        ],
        &rows,
    );
}

/// Refresh every `interval` until interrupted; with `once`, one frame (CPU over the first
/// interval) and exit.
pub async fn top(c: &Client, interval: Duration, once: bool, json: bool) -> Result<(), CliError> {
    let interval = interval.clamp(Duration::from_millis(200), Duration::from_secs(3600));
    let clear = !once && !json && std::io::stdout().is_terminal();
    let mut prev = poll(c).await?;
    loop {
        tokio::time::sleep(interval).await;
        let now = poll(c).await?;
        let cpu = cpu_percent(&prev, &now);
        if clear {
            print!("\x1b[H\x1b[2J");
        }
        if json {
            println!("{}", json_of(&now, &cpu));
        } else {
            if !once {
                println!(
                    "gantry top: every {:?}, traffic over the last {}s (Ctrl-C to stop)\n",
                    interval,
                    now.traffic["window_seconds"].as_f64().unwrap_or(60.0)
                );
            }
            print_frame(&now, &cpu);
        }
        if std::io::stdout().flush().is_err() || once {
            return Ok(());
        }
        prev = now;
    }
}
