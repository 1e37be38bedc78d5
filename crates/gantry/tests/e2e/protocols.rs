//! Protocols with clients we did not write: grpcio (gRPC over h2c: unary, server, client and
//! bidirectional streaming, trailers),
//! websockets (a socket held open across route reloads; over TLS), curl over HTTP/2 (prior
//! knowledge and TLS with ALPN), SNI certificate choice and certificate reload, HTTP/1.1 over TLS
//! with the plain port's framing rules (openssl s_client).
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

fn python(args: &[&str]) -> std::process::Output {
    Command::new("python3").args(args).output().unwrap()
}

#[test]
fn grpc_unary_and_streaming_through_the_gateway() {
    let g = Gantry::start(&format!(
        r#"
[services.grpc]
command = ["python3", "-u", "{}"]
replicas = 2
upstream = {{ protocol = "h2c" }}
[[services.grpc.routes]]
path_prefix = "/test.Echo"
"#,
        fixture("grpc_server.py")
    ));
    g.wait_healthy("grpc", 2, Duration::from_secs(30));
    let out = python(&[&fixture("grpc_client.py"), &g.gateway.to_string()]);
    assert!(
        out.status.success(),
        "grpc client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["unary"].as_str().unwrap().ends_with(":hello"), "{v}");
    assert!(v["unary"].as_str().unwrap().starts_with("grpc-"), "{v}");
    assert_eq!(v["stream"], serde_json::json!(["0", "1", "2", "3", "4"]));
    // Trailers made it through the gateway.
    assert_eq!(v["trailers"]["x-count"], "5");
    // A method the service lacks: the gRPC status (in trailers) reaches the client.
    assert_eq!(v["missing"], "UNIMPLEMENTED");
    // Client streaming, and a bidirectional stream whose answers come while it is open.
    assert_eq!(v["sum"], "10");
    assert_eq!(v["chat"], serde_json::json!(["re:a", "re:b", "re:c"]));
}

const WS: &str = r#"
[services.ws]
command = ["python3", "-u", "WS_ECHO"]
health = { type = "http", path = "/health" }
[[services.ws.routes]]
path_prefix = "/ws"
strip_prefix = true
"#;

#[test]
fn websocket_survives_route_reloads() {
    let spec = WS.replace("WS_ECHO", &fixture("ws_echo.py"));
    let g = Gantry::start(&spec);
    g.wait_healthy("ws", 1, Duration::from_secs(30));
    let mut client = Command::new("python3")
        .args([
            &fixture("ws_client.py"),
            &format!("ws://{}/ws/chat", g.gateway),
            "30",
            "0.1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    // Reload the routes several times while the socket is open.
    for i in 0..10 {
        let extra = format!("{spec}\n[[services.ws.routes]]\npath_prefix = \"/other{i}\"\n");
        let report = g.rewrite_and_reload(&extra);
        // The spec's routes and the bus's (`/_gantry/topics`).
        assert_eq!(report["routes"], 3);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = wait_for("websocket client", Duration::from_secs(30), || {
        client.try_wait().unwrap()
    })
    .code();
    let mut stdout = String::new();
    use std::io::Read;
    client
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert_eq!(out, Some(0), "client failed: {stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"open"));
    assert_eq!(lines.last(), Some(&"done"));
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("ws-1:m")).count(),
        30,
        "{stdout}"
    );
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn http2_prior_knowledge_to_an_http1_instance() {
    let g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
[[services.web.routes]]
path_prefix = "/"
"#,
    );
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let (ok, body, err) = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version}",
        &format!("http://{}/hello?x=1", g.gateway),
    ]);
    assert!(ok, "{err}");
    let (json, version) = body.rsplit_once('\n').unwrap();
    assert_eq!(version, "2");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["path"], "/hello");
    assert_eq!(v["query"], "x=1");
    // The HTTP/1.1 instance got a Host header made from :authority.
    assert_eq!(v["headers"]["host"], g.gateway.to_string());
}

/// The subject CN the server presents for `sni`.
fn served_cn(port: u16, sni: &str) -> String {
    let o = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            sni,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.lines()
        .find(|l| l.trim_start().starts_with("subject="))
        .map(|l| {
            l.rsplit("CN")
                .next()
                .unwrap_or("")
                .trim_start_matches([' ', '='])
                .to_string()
        })
        .unwrap_or_else(|| panic!("no certificate in: {out}"))
}

/// Start gantry on `services` with a TLS listener as well, serving `certificates` (a TOML array's
/// items, files in `dir`); `gateway` adds lines to `[gateway]`. Returns it and the TLS port.
fn start_with_tls(
    dir: tempfile::TempDir,
    services: &str,
    certificates: &str,
    gateway: &str,
) -> (Gantry, u16) {
    let tls_port = free_port();
    let spec = dir.path().join("gantry.toml");
    let text = spec_text(services)
        .replace("workers = 2", &format!("workers = 2\n{gateway}"))
        .replace(
            "[admin]",
            &format!(
                "[gateway.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncertificates = [{certificates}]\n\n[admin]"
            ),
        );
    std::fs::write(&spec, text).unwrap();
    (Gantry::start_at(dir, spec), tls_port)
}

#[test]
fn tls_with_sni_alpn_h2_and_certificate_reload() {
    let dir = tempfile::tempdir().unwrap();
    cert(dir.path(), "a", &["a.test"]);
    cert(dir.path(), "wild", &["*.b.test"]);
    let (g, tls_port) = start_with_tls(
        dir,
        "[services.web]\ncommand = [\"{TESTSVC}\"]\n[[services.web.routes]]\npath_prefix = \"/\"\n",
        "\n  { cert = \"a.pem\", key = \"a.key\", hosts = [\"a.test\"] },\n  { cert = \"wild.pem\", key = \"wild.key\", hosts = [\"*.b.test\"] },\n",
        "",
    );
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let cafile = |stem: &str| {
        g.dir
            .path()
            .join(format!("{stem}.pem"))
            .display()
            .to_string()
    };

    // HTTP/2 over TLS, negotiated by ALPN, with SNI choosing the certificate.
    let (ok, body, err) = curl(&[
        "--http2",
        "--cacert",
        &cafile("a"),
        "--resolve",
        &format!("a.test:{tls_port}:127.0.0.1"),
        "-w",
        "\n%{http_version}",
        &format!("https://a.test:{tls_port}/x"),
    ]);
    assert!(ok, "{err}");
    let (json, version) = body.rsplit_once('\n').unwrap();
    assert_eq!(version, "2");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
    // HTTP/1.1 over TLS on the same listener, wildcard certificate.
    let (ok, body, err) = curl(&[
        "--http1.1",
        "--cacert",
        &cafile("wild"),
        "--resolve",
        &format!("api.b.test:{tls_port}:127.0.0.1"),
        "-w",
        "\n%{http_version}",
        &format!("https://api.b.test:{tls_port}/y"),
    ]);
    assert!(ok, "{err}");
    assert!(body.ends_with("\n1.1"), "{body}");
    assert_eq!(served_cn(tls_port, "a.test"), "a.test");
    assert_eq!(served_cn(tls_port, "x.b.test"), "*.b.test");
    // Unknown names get the first certificate.
    assert_eq!(served_cn(tls_port, "unknown.test"), "a.test");

    // Replace a.test's certificate on disk: it is served without a restart.
    cert(g.dir.path(), "a", &["a.test", "renewed.a.test"]);
    wait_for("new certificate served", Duration::from_secs(10), || {
        let o = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{tls_port}"),
                "-servername",
                "a.test",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let pem = std::fs::read_to_string(g.dir.path().join("a.pem")).unwrap();
        let served = String::from_utf8_lossy(&o.stdout).into_owned();
        let first_line = pem.lines().nth(1).unwrap_or("").to_string();
        served.contains(&first_line).then_some(())
    });
    let (ok, _, err) = curl(&[
        "--cacert",
        &cafile("a"),
        "--resolve",
        &format!("a.test:{tls_port}:127.0.0.1"),
        &format!("https://a.test:{tls_port}/z"),
    ]);
    assert!(ok, "after reload: {err}");
}

/// Raw bytes to the TLS listener (`openssl s_client`); what came back before the server closed.
fn tls_raw(port: u16, bytes: &[u8]) -> String {
    use std::io::Write;
    let mut c = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-quiet", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-servername", "localhost", "-alpn", "http/1.1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(bytes).unwrap();
    let o = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn http1_over_tls_gets_the_same_framing_rules_pipelining_and_upgrades() {
    let dir = tempfile::tempdir().unwrap();
    cert(dir.path(), "local", &["localhost"]);
    let services = format!(
        "[services.web]\ncommand = [\"{{TESTSVC}}\"]\n[[services.web.routes]]\npath_prefix = \"/web\"\n{}",
        WS.replace("WS_ECHO", &fixture("ws_echo.py"))
    );
    let (g, tls_port) = start_with_tls(
        dir,
        &services,
        "{ cert = \"local.pem\", key = \"local.key\", hosts = [\"localhost\"] }",
        "",
    );
    g.wait_healthy("web", 1, Duration::from_secs(20));
    g.wait_healthy("ws", 1, Duration::from_secs(30));
    let ca = g.dir.path().join("local.pem").display().to_string();

    // Ambiguous framing is refused over TLS exactly as on the plain port: a JSON 400, and the
    // request smuggled behind it never runs.
    for (bad, why) in [
        (
            &b"POST /web HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /web/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            "both Content-Length and Transfer-Encoding",
        ),
        (
            b"POST /web HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\nhello",
            "invalid Content-Length",
        ),
        (b"GET /web HTTP/1.1\r\n\r\n", "without Host"),
        (b"GET /web HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n", "fold"),
    ] {
        let r = tls_raw(tls_port, bad);
        assert_eq!(raw_status(&r), 400, "{}: {r}", String::from_utf8_lossy(bad));
        assert!(!r.contains("\nHTTP/1.1 "), "one response only: {r}");
        assert!(r.contains("\"error\":\"malformed_request\""), "{r}");
        assert!(r.contains(why), "{why}: {r}");
    }
    let m = g.metrics();
    assert!(
        m.contains("gantry_gateway_rejected_requests_total{reason=\"malformed_request\"} 4"),
        "{m}"
    );
    // Pipelined requests on one TLS connection, answered in order, with https forwarding.
    let r = tls_raw(
        tls_port,
        b"GET /web/a HTTP/1.1\r\nHost: x\r\n\r\nGET /web/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.matches("HTTP/1.1 200").count(), 2, "{r}");
    let (a, b) = (
        r.find("\"path\":\"/web/a\"").unwrap(),
        r.find("\"path\":\"/web/b\"").unwrap(),
    );
    assert!(a < b, "{r}");
    assert!(r.contains("\"x-forwarded-proto\":\"https\""), "{r}");
    // A body behind `Expect: 100-continue` (curl waits for the go-ahead).
    let body = g.dir.path().join("upload.bin");
    std::fs::write(&body, "z".repeat(200_000)).unwrap();
    let (ok, out, err) = curl(&[
        "--http1.1",
        "--cacert",
        &ca,
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", body.display()),
        &format!("https://localhost:{tls_port}/web/upload"),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"content-length\":\"200000\""), "{out}");
    // A WebSocket over TLS: the upgrade is handed to hyper with the TLS session.
    let o = Command::new("python3")
        .args([
            &fixture("ws_client.py"),
            &format!("wss://localhost:{tls_port}/ws/chat"),
            "5",
            "0.05",
        ])
        .env("SSL_CERT_FILE", &ca)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ws-1:m")).count(),
        5,
        "{stdout}"
    );
}

#[test]
fn tls_to_upstream_instances() {
    let certs = tempfile::tempdir().unwrap();
    ca_and_leaf(certs.path(), "backend.test");
    let port = free_port();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // A TLS server we did not write: openssl's, answering every GET with a status page.
    let _server = Kill(
        Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{port}"),
                "-www",
                "-quiet",
                "-cert",
            ])
            .arg(certs.path().join("leaf.pem"))
            .arg("-key")
            .arg(certs.path().join("leaf.key"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("openssl s_server", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let ca = certs.path().join("ca.pem").display().to_string();
    let spec = |name: &str| {
        format!(
            r#"
[services.secure]
endpoints = ["127.0.0.1:{port}"]
upstream = {{ tls = {{ ca_file = "{ca}", server_name = "{name}" }} }}
[[services.secure.routes]]
path_prefix = "/secure"
strip_prefix = true
"#
        )
    };
    let g = Gantry::start(&spec("backend.test"));
    let r = g.get("/secure/");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("Ciphers") || r.body.contains("s_server"),
        "{}",
        r.body
    );
    // A certificate for another name is refused: no response, never clear text.
    g.rewrite_and_reload(&spec("other.test"));
    let r = g.get("/secure/");
    assert_eq!(r.status, 502, "{}", r.body);
}

#[test]
fn event_streams_are_forwarded_as_they_come_and_idle_ones_are_cut() {
    use std::io::{Read, Write};
    let g = Gantry::start(
        r#"
[services.events]
command = ["{TESTSVC}"]
[[services.events.routes]]
path_prefix = "/"
[[services.events.routes]]
path_prefix = "/quiet"
strip_prefix = true
idle_timeout_ms = 300
"#,
    );
    g.wait_healthy("events", 1, Duration::from_secs(20));
    // Read a response, noting when each event arrived.
    let read_events = |path: &str| {
        let mut s = std::net::TcpStream::connect(g.gateway).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t = std::time::Instant::now();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let mut seen = String::new();
        let mut at = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                    while at.len() < seen.matches("data: ").count() {
                        at.push(t.elapsed());
                    }
                }
            }
        }
        (seen, at, t.elapsed())
    };
    // Four events 400 ms apart: each reaches the client when it is sent, not at the end.
    let (seen, at, _) = read_events("/stream?n=4&ms=400");
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(
        seen.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{seen}"
    );
    assert_eq!(at.len(), 4, "{seen}");
    assert!(
        at[0] < Duration::from_millis(300),
        "first event after {:?}",
        at[0]
    );
    for w in at.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(250),
            "events bunched: {at:?}"
        );
    }
    assert!(
        seen.ends_with("0\r\n\r\n"),
        "a complete chunked stream: {seen:?}"
    );
    // A stream quiet for longer than the route's idle timeout is cut: the client sees it end
    // without the final chunk (so it knows it is incomplete).
    let (seen, at, took) = read_events("/quiet/stream?n=3&ms=1000");
    assert_eq!(at.len(), 1, "{seen}");
    assert!(took < Duration::from_millis(900), "cut after {took:?}");
    assert!(!seen.ends_with("0\r\n\r\n"), "{seen:?}");
}

#[test]
fn auto_protocol_over_tls_speaks_to_the_instance_what_the_client_spoke() {
    // The instance side: another gantry's TLS listener (HTTP/1.1 and HTTP/2 by ALPN) in front of
    // a test service, logging each request's protocol.
    let dir = tempfile::tempdir().unwrap();
    ca_and_leaf(dir.path(), "upstream.test");
    let (b, tls_port) = start_with_tls(
        dir,
        "[services.web]\ncommand = [\"{TESTSVC}\"]\n[[services.web.routes]]\npath_prefix = \"/\"\n",
        "{ cert = \"leaf.pem\", key = \"leaf.key\", hosts = [\"upstream.test\"] }",
        "access_log = true",
    );
    b.wait_healthy("web", 1, Duration::from_secs(20));
    let ca = b.dir.path().join("ca.pem").display().to_string();
    // The gateway under test: that listener as a self-registered instance, `auto`, TLS
    // verified.
    let up = |name: &str| {
        format!(
            r#"
[services.up]
command = ["{{TESTSVC}}"]
replicas = 0
upstream = {{ protocol = "auto", tls = {{ ca_file = "{ca}", server_name = "{name}" }} }}
[[services.up.routes]]
path_prefix = "/"
"#
        )
    };
    let a = Gantry::start(&up("upstream.test"));
    let r = a.admin_call(
        "POST",
        "/v1/registry/instances",
        Some(&serde_json::json!({"service": "up", "id": "up-tls", "port": tls_port, "ttl_ms": 60000})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = a.get("/over-h1");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["headers"]["x-forwarded-proto"], "https");
    let (ok, body, err) = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version}",
        &format!("http://{}/over-h2", a.gateway),
    ]);
    assert!(ok, "{err}");
    assert!(body.ends_with("\n2"), "{body}");
    let protocol_of = |path: &str| {
        let out = b.output();
        out.lines()
            .filter(|l| l.contains("\"type\":\"access\"") && l.contains(path))
            .find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                Some(v["protocol"].as_str()?.to_string())
            })
    };
    let h1 = wait_for("access log of /over-h1", Duration::from_secs(5), || {
        protocol_of("/over-h1")
    });
    let h2 = wait_for("access log of /over-h2", Duration::from_secs(5), || {
        protocol_of("/over-h2")
    });
    assert_eq!(h1, "HTTP/1.1");
    assert_eq!(h2, "HTTP/2.0");

    // A reloaded policy applies to the instances at once, pooled connections included: with a
    // server name the certificate does not carry, nothing more goes out.
    assert_eq!(a.get("/pooled").status, 200);
    a.rewrite_and_reload(&up("wrong.test"));
    let r = a.get("/after-reload");
    assert_eq!(
        r.status, 502,
        "a connection made under the old policy was used: {}",
        r.body
    );
    a.rewrite_and_reload(&up("upstream.test"));
    assert_eq!(a.get("/fixed").status, 200);
}
