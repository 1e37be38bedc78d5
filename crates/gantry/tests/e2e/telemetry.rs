//! Telemetry checked by tools we did not write: `promtool check metrics` (Debian's
//! `prometheus`) lints `/metrics`, and a real Prometheus scrapes Gantry and answers queries
//! over what it scraped (up, a rate, a histogram quantile, the metadata of the families).

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// A process this test started, killed (by PID) when the test ends however it ends.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn encode_query(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A PromQL instant query's result vector.
fn query(prom: std::net::SocketAddr, q: &str) -> Vec<Value> {
    let r = http(
        prom,
        "GET",
        &format!("/api/v1/query?query={}", encode_query(q)),
        &[],
        None,
        Duration::from_secs(5),
    );
    match r {
        Ok(r) if r.status == 200 => r.json()["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn scalar(v: &[Value]) -> Option<f64> {
    v.first()?["value"][1].as_str()?.parse().ok()
}

#[test]
fn promtool_passes_the_metrics_and_a_real_prometheus_scrapes_them() {
    let g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
[[services.web.routes]]
path_prefix = "/web"
strip_prefix = true
"#,
    );
    g.wait_healthy("web", 1, Duration::from_secs(20));
    for i in 0..20 {
        assert_eq!(g.get(&format!("/web/ok/{i}")).status, 200);
    }

    // Without an Accept header (as promtool's users fetch it): the 0.0.4 text, which promtool
    // passes without a single complaint, help text on every family included.
    let auth = format!("Bearer {}", g.token);
    let r = http(
        g.admin,
        "GET",
        "/metrics",
        &[("authorization", &auth)],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(r
        .body
        .contains("# TYPE gantry_gateway_requests_total counter"));
    assert!(!r.body.contains("# EOF"));
    // Every histogram ends with the +Inf bucket histogram_quantile needs.
    assert!(
        r.body
            .contains("gantry_gateway_request_duration_seconds_bucket{le=\"+Inf\"")
            && !r.body.contains("e308"),
        "{}",
        r.body
    );
    // Each running instance's CPU, memory, open files and restarts.
    let web = g.instances("web")[0].clone();
    let series = |family: &str| -> f64 {
        let prefix = format!("{family}{{");
        r.body
            .lines()
            .find(|l| l.starts_with(&prefix) && l.contains("instance=\"web-1\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {family} for web-1 in\n{}", r.body))
    };
    // Present (its value is counted in clock ticks without a cgroup: a quiet service may not
    // have used one yet; the unit test checks a busy process's figure).
    let cpu = series("gantry_supervisor_instance_cpu_seconds_total");
    assert!(cpu.is_finite(), "{cpu}");
    assert!(series("gantry_supervisor_instance_memory_bytes") > 1e6);
    assert!(series("gantry_supervisor_instance_open_fds") >= 3.0);
    assert!(series("gantry_supervisor_instance_processes") >= 1.0);
    assert_eq!(series("gantry_supervisor_instance_restarts_total"), 0.0);
    // The same figures on the instance in the API.
    let usage = &web["usage"];
    assert!(
        usage["memory_bytes"].as_u64() > Some(1_000_000) && usage["open_fds"].as_u64() >= Some(3),
        "{web}"
    );
    let (ok, said) = promtool_check(&r.body);
    assert!(ok && said.trim().is_empty(), "promtool: {said}");
    // OpenMetrics to a scraper that ranks it first.
    let r = http(
        g.admin,
        "GET",
        "/metrics",
        &[
            ("authorization", &auth),
            (
                "accept",
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            ),
        ],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(
        r.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(r.body.contains("# TYPE gantry_gateway_requests counter"));
    assert!(r.body.ends_with("# EOF\n"));

    // A real Prometheus scrapes the admin API every second, with the admin token.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, &g.token).unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: gantry\n    authorization:\n      credentials_file: {}\n    static_configs:\n      - targets: ['{}']\n",
            token.display(),
            g.admin
        ),
    )
    .unwrap();
    let port = free_port();
    let prom_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prom = Owned(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's prometheus package; scripts/test installs it)"),
    );
    let prom_log =
        || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    let up = wait_for(
        "Prometheus to scrape gantry",
        Duration::from_secs(60),
        || scalar(&query(prom_addr, "up{job=\"gantry\"}")).filter(|&v| v == 1.0),
    );
    assert_eq!(up, 1.0);

    // Steady traffic while the rate and the quantile are asked for.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, gw) = (stop.clone(), g.gateway);
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 5_000 {
                let _ = http(gw, "GET", "/web/ok", &[], None, Duration::from_secs(2));
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let rate = wait_for("a request rate", Duration::from_secs(30), || {
        scalar(&query(
            prom_addr,
            "sum(rate(gantry_gateway_requests_total[5s]))",
        ))
        .filter(|&v| v > 1.0)
    });
    let p99 = wait_for("a p99 from the histogram", Duration::from_secs(30), || {
        scalar(&query(
            prom_addr,
            "histogram_quantile(0.99, sum by (le) (rate(gantry_gateway_request_duration_seconds_bucket[5s])))",
        ))
        .filter(|v| v.is_finite())
    });
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    // At most one request per 10 ms goes out: the rate says so, the quantile is a duration.
    assert!(rate < 150.0, "rate {rate}");
    assert!(p99 > 0.0 && p99 < 2.0, "p99 {p99}s");

    // `gantry top`: the same live figures per service and instance.
    let out = g.cli(&["top", "--once", "--json", "--interval", "0.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top: Value = serde_json::from_slice(&out.stdout).unwrap();
    let web_traffic = top["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "web")
        .unwrap_or_else(|| panic!("{top}"));
    assert!(
        web_traffic["requests_per_second"].as_f64() > Some(0.0),
        "{top}"
    );
    let web1 = &top["instances"][0];
    assert_eq!(web1["instance"], "web-1");
    assert!(
        web1["cpu_percent"].as_f64().is_some_and(|c| c >= 0.0),
        "{top}"
    );
    assert!(web1["memory_bytes"].as_u64() > Some(1_000_000), "{top}");
    let out = g.cli(&["top", "--once", "--interval", "0.3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("REQ/S") && text.contains("web-1") && text.contains("MEMORY"),
        "{text}"
    );
    assert!(!g.cli(&["top", "--interval", "0"]).status.success());

    // The metadata API knows the families, with their types and help.
    let meta = http(
        prom_addr,
        "GET",
        "/api/v1/metadata",
        &[],
        None,
        Duration::from_secs(5),
    )
    .unwrap()
    .json();
    let family = |names: &[&str]| -> Value {
        names
            .iter()
            .find_map(|n| meta["data"][n][0].as_object().cloned())
            .map(Value::Object)
            .unwrap_or_else(|| panic!("{names:?} not in the metadata: {meta}\n{}", prom_log()))
    };
    let requests = family(&["gantry_gateway_requests", "gantry_gateway_requests_total"]);
    assert_eq!(requests["type"], "counter");
    assert!(!requests["help"].as_str().unwrap().is_empty());
    let duration = family(&["gantry_gateway_request_duration_seconds"]);
    assert_eq!(duration["type"], "histogram");
    assert!(!duration["help"].as_str().unwrap().is_empty());
}

const TALKER: &str = r#"
import json, sys, time
for i in range(200):
    print(f"INFO line {i:04d}")
print(json.dumps({"level": "error", "msg": "payment failed", "request_id": "r-9", "order": 7}))
print("WARN disk nearly full")
print("saw r-9 on the way out")
print(json.dumps({"level": "info", "msg": "fine", "order": 8}))
sys.stdout.flush()
n = 0
while n < 100000:
    print(f"tick {n}")
    n += 1
    time.sleep(0.002)
"#;

fn log_lines(g: &Gantry, query: &str) -> Vec<Value> {
    let r = g.admin_call("GET", &format!("/v1/logs?{query}"), None);
    assert_eq!(r.status, 200, "{query}: {}", r.body);
    r.body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn texts(v: &[Value]) -> Vec<String> {
    v.iter()
        .filter_map(|l| l["line"].as_str().map(str::to_string))
        .collect()
}

fn stored_lines(g: &Gantry) -> u64 {
    g.metrics()
        .lines()
        .find_map(|l| l.strip_prefix("gantry_logs_stored_lines_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[test]
fn logs_are_searched_on_disk_and_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("talker.py");
    std::fs::write(&script, TALKER).unwrap();
    let mut g = Gantry::start(&format!(
        "[logs]\nmax_bytes = 8192\n\n[services.talker]\ncommand = [\"python3\", \"-u\", \"{}\"]\n",
        script.display()
    ));
    wait_for("the talker's lines", Duration::from_secs(30), || {
        (log_lines(&g, "service=talker&grep=tick").len() > 100).then_some(())
    });

    // Memory holds 8 KiB; the first lines come from disk.
    let numbered = log_lines(&g, "service=talker&grep=%5EINFO%20line");
    assert_eq!(numbered.len(), 200);
    assert_eq!(numbered[0]["line"], "INFO line 0000");
    assert_eq!(numbered[0]["level"], "info");
    assert_eq!(
        texts(&log_lines(
            &g,
            "service=talker&grep=line%2001%5B0-9%5D%7B2%7D%24"
        ))
        .len(),
        100
    );
    assert_eq!(
        texts(&log_lines(&g, "service=talker&level=warn")),
        [
            r#"{"level": "error", "msg": "payment failed", "request_id": "r-9", "order": 7}"#,
            "WARN disk nearly full"
        ]
    );
    let json = log_lines(&g, "service=talker&field=order=7");
    assert_eq!(json.len(), 1);
    assert_eq!(json[0]["fields"]["msg"], "payment failed");
    assert_eq!(
        log_lines(&g, "service=talker&field=order=7&field=level=info").len(),
        0
    );
    assert_eq!(log_lines(&g, "request_id=r-9").len(), 2);
    let last3 = log_lines(&g, "service=talker&grep=%5EINFO&tail=3");
    assert_eq!(
        texts(&last3),
        ["INFO line 0197", "INFO line 0198", "INFO line 0199"]
    );
    let tick50 = log_lines(&g, "service=talker&grep=%5Etick%2050%24");
    let t = tick50[0]["ts_ms"].as_u64().unwrap();
    let before = log_lines(&g, &format!("service=talker&until={t}"));
    let before_text = texts(&before);
    assert!(
        before_text.contains(&"INFO line 0000".to_string())
            && !before_text.contains(&"tick 50".to_string())
            && before.iter().all(|l| l["ts_ms"].as_u64() < Some(t)),
        "{before_text:?}"
    );
    // A limit says when more lines matched.
    let limited = log_lines(&g, "service=talker&limit=5");
    assert_eq!(limited.len(), 6);
    assert_eq!(limited[0]["truncated"], true);
    // The newest five; from a start, the first five.
    assert!(limited[5]["line"].as_str().unwrap().starts_with("tick"));
    let first = log_lines(&g, "service=talker&limit=5&since=0");
    assert_eq!(first[0]["truncated"], true);
    assert_eq!(first[1]["line"], "INFO line 0000");
    // An explicit tail is not a truncation.
    assert!(log_lines(&g, "service=talker&tail=2")
        .iter()
        .all(|l| l.get("truncated").is_none()));
    // Bad queries are named.
    for (q, says) in [
        ("level=loud", "level"),
        ("grep=%28", "grep"),
        ("field=order", "KEY=VALUE"),
        ("since=yesterday-ish", "since"),
        ("colour=red", "unknown query parameter"),
    ] {
        let r = g.admin_call("GET", &format!("/v1/logs?{q}"), None);
        assert!(
            r.status == 400 && r.body.contains(says),
            "{q}: {} {}",
            r.status,
            r.body
        );
    }
    let r = g.admin_call("GET", "/v1/logs?service=nobody", None);
    assert_eq!(r.status, 404, "{}", r.body);

    // The CLI: flags map onto the query.
    let out = g.cli(&["logs", "talker", "--grep", "^INFO line 000[0-4]$", "--json"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 5);
    let out = g.cli(&["logs", "talker", "--level", "error"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("payment failed") && !text.contains("WARN"),
        "{text}"
    );
    let out = g.cli(&["logs", "--field", "nokey"]);
    assert!(!out.status.success());

    // kill -9 while the talker writes: every line stored before the kill is there after.
    let stored = wait_for("lines on disk", Duration::from_secs(20), || {
        let n = stored_lines(&g);
        (n > 300).then_some(n)
    });
    g.kill();
    g.launch();
    let after = log_lines(&g, "service=talker&since=0&limit=100000");
    let seqs: Vec<u64> = after
        .iter()
        .filter_map(|l| l["seq"].as_u64())
        .filter(|&s| s <= stored)
        .collect();
    assert_eq!(seqs.len() as u64, stored, "lines lost after kill -9");
    assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]) && seqs[0] == 1);
}

fn history(g: &Gantry, path: &str) -> Value {
    let r = g.admin_call("GET", path, None);
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

#[test]
fn the_metrics_history_answers_promql_and_outlives_a_restart() {
    let mut g = Gantry::start(
        r#"
[metrics]
step = "500ms"

[services.web]
command = ["{TESTSVC}"]
[[services.web.routes]]
path_prefix = "/web"
strip_prefix = true
"#,
    );
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let started_ms = gantry_now_ms();
    // Steady traffic (counted) while the history is asked.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let traffic = {
        let (stop, sent, gw) = (stop.clone(), sent.clone(), g.gateway);
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                let r = http(gw, "GET", "/web/ok", &[], None, Duration::from_secs(2));
                if r.is_ok_and(|r| r.status == 200) {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let q = |expr: &str| format!("/v1/metrics/query?query={}", encode_query(expr));
    let rate = wait_for("a rate from the history", Duration::from_secs(20), || {
        let v = history(
            &g,
            &q("sum(rate(gantry_gateway_requests_total{service=\"web\"}[2s]))"),
        );
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|&r| r > 1.0)
    });
    assert!(rate < 150.0, "{rate}");
    let (v, p99) = wait_for("a p99 from the history", Duration::from_secs(20), || {
        let v = history(
            &g,
            &q("histogram_quantile(0.99, sum by (le) (rate(gantry_gateway_request_duration_seconds_bucket{service=\"web\"}[2s])))"),
        );
        let p99 = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|p| p.is_finite())?;
        Some((v, p99))
    });
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    assert!(p99 > 0.0 && p99 < 2.0, "{v}");
    assert_eq!(v["status"], "success");
    assert_eq!(v["data"]["resultType"], "vector");
    // A range: one point per step (once the history holds 3 s).
    while gantry_now_ms() < started_ms + 4000 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let now = gantry_now_ms();
    let range = history(
        &g,
        &format!(
            "/v1/metrics/query_range?query={}&start={}&end={}&step=1s",
            encode_query("gantry_supervisor_instance_memory_bytes{instance=\"web-1\"}"),
            now - 3000,
            now
        ),
    );
    assert_eq!(range["data"]["resultType"], "matrix");
    let points = range["data"]["result"][0]["values"]
        .as_array()
        .unwrap()
        .len();
    assert!(points >= 3, "{range}");
    let names = history(&g, "/v1/metrics/names");
    assert!(names["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n == "gantry_gateway_requests_total"));
    // Bad queries are named; what is not supported says so.
    for (path, says) in [
        (q("sum("), "PromQL"),
        (q("topk(3, up)"), "topk"),
        (
            "/v1/metrics/query_range?query=up&start=10&end=5".to_string(),
            "start <= end",
        ),
        ("/v1/metrics/query?query=up&time=never".to_string(), "time"),
    ] {
        let r = g.admin_call("GET", &path, None);
        assert!(
            r.status == 400 && r.body.contains(says),
            "{path}: {} {}",
            r.status,
            r.body
        );
    }
    // The CLI.
    let out = g.cli(&["query", "sum(gantry_supervisor_instance_processes)"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("VALUE"), "{text}");
    let out = g.cli(&[
        "query",
        "gantry_tsdb_series",
        "--range",
        "5s",
        "--step",
        "1s",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("POINTS"), "{text}");

    // After a restart the samples taken before it are still there: the last one (taken after
    // the traffic ended) counts every request it sent.
    let sent = sent.load(Ordering::Relaxed) as f64;
    std::thread::sleep(Duration::from_millis(600));
    let before = gantry_now_ms();
    g.stop();
    g.launch();
    let range = history(
        &g,
        &format!(
            "/v1/metrics/query_range?query={}&start={}&end={}&step=1s",
            encode_query("sum(gantry_gateway_requests_total{service=\"web\"})"),
            before - 4000,
            before
        ),
    );
    let values = range["data"]["result"][0]["values"].as_array().unwrap();
    assert!(values.len() >= 3, "{range}");
    let last: f64 = values.last().unwrap()[1].as_str().unwrap().parse().unwrap();
    assert_eq!(last, sent, "{range}");
}

fn gantry_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
