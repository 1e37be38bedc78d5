//! Test harness: runs the real `gantry` binary on a temporary spec with listeners on port 0,
//! and the workspace's `gantry-testsvc` as the service under supervision.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn gantry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gantry"))
}

/// The test service binary, built by cargo next to `gantry` (it has its own integration test,
/// so `cargo test --workspace` always builds it).
pub fn testsvc_bin() -> PathBuf {
    let p = gantry_bin().with_file_name("gantry-testsvc");
    assert!(
        p.exists(),
        "{} is missing: run the workspace tests (cargo test --workspace)",
        p.display()
    );
    p
}

/// Poll `f` every 10 ms until it returns Some, or panic after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A minimal HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One request on a fresh connection (`Connection: close`), bounded by `timeout`.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad response: {:?}", String::from_utf8_lossy(&raw)),
        )
    })
}

/// A POST without extra headers that must get an answer (any status).
pub fn post(addr: SocketAddr, path: &str, body: &str, timeout: Duration) -> Resp {
    http(addr, "POST", path, &[], Some(body), timeout)
        .unwrap_or_else(|e| panic!("POST {path} ({} bytes): {e}", body.len()))
}

fn parse_response(raw: &[u8]) -> Option<Resp> {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.get(9..12)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Some(Resp {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A running `gantry up` on a temporary spec.
pub struct Gantry {
    pub dir: tempfile::TempDir,
    pub spec: PathBuf,
    pub child: Option<Child>,
    pub admin: SocketAddr,
    pub gateway: SocketAddr,
    pub token: String,
    /// Started with this open-file soft limit (through `sh -c 'ulimit -Sn N; exec ...'`).
    pub soft_nofile: Option<u64>,
}

/// Spec text with `{TESTSVC}` replaced; the harness adds port-0 listeners unless the text
/// sets them itself.
pub fn spec_text(services: &str) -> String {
    let bin = testsvc_bin();
    let identity = if services.contains("[identity]") {
        ""
    } else {
        "[identity]\nlisten = \"127.0.0.1:0\"\n\n"
    };
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{identity}{}",
        services.replace("{TESTSVC}", &bin.display().to_string())
    )
}

impl Gantry {
    /// Start gantry on `services` (TOML for `[services.*]`, with `{TESTSVC}` placeholders).
    pub fn start(services: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("gantry.toml");
        std::fs::write(&spec, spec_text(services)).unwrap();
        Self::start_at(dir, spec)
    }

    /// Start gantry on a spec file already written.
    pub fn start_at(dir: tempfile::TempDir, spec: PathBuf) -> Self {
        let mut g = Self {
            dir,
            spec,
            child: None,
            admin: "127.0.0.1:1".parse().unwrap(),
            gateway: "127.0.0.1:1".parse().unwrap(),
            token: String::new(),
            soft_nofile: None,
        };
        g.launch();
        g
    }

    /// Start gantry on `services` with a lower open-file soft limit than the test's own.
    pub fn start_with_soft_nofile(services: &str, soft: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("gantry.toml");
        std::fs::write(&spec, spec_text(services)).unwrap();
        let mut g = Self {
            dir,
            spec,
            child: None,
            admin: "127.0.0.1:1".parse().unwrap(),
            gateway: "127.0.0.1:1".parse().unwrap(),
            token: String::new(),
            soft_nofile: Some(soft),
        };
        g.launch();
        g
    }

    /// (Re)start the gantry process on the same spec and data directory.
    pub fn launch(&mut self) {
        self.launch_with(&[]);
    }

    /// (Re)start with more arguments to `gantry up`.
    pub fn launch_with(&mut self, extra: &[&str]) {
        let data = self.data_dir();
        let _ = std::fs::remove_file(data.join("admin.json"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("gantry.out"))
            .unwrap();
        let mut cmd = match self.soft_nofile {
            None => Command::new(gantry_bin()),
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -Sn {n} && exec \"$0\" \"$@\""))
                    .arg(gantry_bin());
                c
            }
        };
        let child = cmd
            .args(["up", "-f"])
            .arg(&self.spec)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let info: Value = wait_for(
            "gantry to write admin.json",
            Duration::from_secs(20),
            || {
                if let Some(c) = self.child.as_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        panic!("gantry exited early with {st}:\n{}", self.output());
                    }
                }
                let b = std::fs::read(data.join("admin.json")).ok()?;
                serde_json::from_slice(&b).ok()
            },
        );
        let addr = |k: &str| -> SocketAddr {
            info[k]
                .as_str()
                .unwrap()
                .trim_start_matches("http://")
                .parse()
                .unwrap()
        };
        self.admin = addr("admin_url");
        self.gateway = addr("gateway_url");
        self.token = std::fs::read_to_string(data.join("admin-token"))
            .unwrap()
            .trim()
            .to_string();
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join(".gantry")
    }

    /// Everything gantry printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gantry.out")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn get(&self, path: &str) -> Resp {
        http(
            self.gateway,
            "GET",
            path,
            &[],
            None,
            Duration::from_secs(10),
        )
        .unwrap()
    }

    pub fn admin_get(&self, path: &str) -> Value {
        let auth = format!("Bearer {}", self.token);
        let r = http(
            self.admin,
            "GET",
            path,
            &[("authorization", &auth)],
            None,
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(r.status < 300, "GET {path}: {} {}", r.status, r.body);
        r.json()
    }

    pub fn admin_call(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        let auth = format!("Bearer {}", self.token);
        let body = body.map(|b| b.to_string());
        http(
            self.admin,
            method,
            path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.as_deref(),
            Duration::from_secs(60),
        )
        .unwrap()
    }

    /// The Prometheus text from `/metrics`.
    pub fn metrics(&self) -> String {
        let auth = format!("Bearer {}", self.token);
        http(
            self.admin,
            "GET",
            "/metrics",
            &[("authorization", &auth)],
            None,
            Duration::from_secs(5),
        )
        .unwrap()
        .body
    }

    /// The first route of the spec's services (not Gantry's own, such as the bus's).
    pub fn first_route(&self) -> Value {
        self.admin_get("/v1/routes")
            .as_array()
            .unwrap()
            .iter()
            .find(|r| !r["service"].as_str().unwrap_or("").starts_with("gantry-"))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The first upstream of the spec's services (not Gantry's own).
    pub fn first_upstream(&self) -> Value {
        self.admin_get("/v1/upstreams")
            .as_array()
            .unwrap()
            .iter()
            .find(|r| !r["service"].as_str().unwrap_or("").starts_with("gantry-"))
            .cloned()
            .unwrap_or(Value::Null)
    }

    pub fn instances(&self, service: &str) -> Vec<Value> {
        self.admin_get(&format!("/v1/instances?service={service}"))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Wait until `service` has `n` healthy instances; returns them.
    pub fn wait_healthy(&self, service: &str, n: usize, limit: Duration) -> Vec<Value> {
        wait_for(&format!("{n} healthy {service} instances"), limit, || {
            let list: Vec<Value> = self
                .instances(service)
                .into_iter()
                .filter(|i| i["state"] == "healthy")
                .collect();
            (list.len() == n).then_some(list)
        })
    }

    /// Instance ids the gateway currently routes `route_id` to.
    pub fn routed(&self, route_id: &str) -> Vec<String> {
        let routes = self.admin_get("/v1/routes");
        routes
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == route_id)
            .map(|r| {
                r["endpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["instance"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Run the CLI against this gantry.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(gantry_bin())
            .arg("-f")
            .arg(&self.spec)
            .args(args)
            .output()
            .unwrap()
    }

    /// SIGINT and wait (bounded) for gantry to exit; returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        signal(child.id(), libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gantry did not stop within 30 s:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL gantry (no cleanup on its side).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Gantry {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Graceful, so that instances (and anything they spawned) are cleaned up.
            self.stop();
        }
    }
}

pub fn signal(pid: u32, sig: i32) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on a pid this test started; no memory is touched.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Live processes whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] = state, fields[2] = pgrp
        if fields.first() == Some(&"Z") {
            continue;
        }
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// A test fixture (Python servers and clients) by file name.
pub fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// Send raw bytes on a new connection and read until the server closes (or 5 s pass).
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Status code of a raw HTTP/1.1 response.
pub fn raw_status(resp: &str) -> u16 {
    resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

impl Gantry {
    /// Replace the services part of the spec and reload it; returns the reload report.
    pub fn rewrite_and_reload(&self, services: &str) -> serde_json::Value {
        std::fs::write(&self.spec, spec_text(services)).unwrap();
        let r = self.admin_call("POST", "/v1/reload", None);
        assert_eq!(r.status, 200, "reload: {}", r.body);
        r.json()
    }

    /// Address of an instance (by id) for talking to it directly.
    pub fn instance_addr(&self, service: &str, id: &str) -> SocketAddr {
        let i = self
            .instances(service)
            .into_iter()
            .find(|i| i["id"] == id)
            .unwrap_or_else(|| panic!("no instance {id}"));
        format!("127.0.0.1:{}", i["port"]).parse().unwrap()
    }
}

/// A port nothing listens on right now (bound on 127.0.0.1:0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A test service this test starts itself (not supervised by gantry), on a free port.
pub struct OwnSvc {
    pub child: Child,
    pub port: u16,
}

impl OwnSvc {
    pub fn start(name: &str, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let child = Command::new(testsvc_bin())
            .env("PORT", port.to_string())
            .env("GANTRY_INSTANCE", name)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for("own test service", Duration::from_secs(10), || {
            http(
                addr,
                "GET",
                "/health",
                &[],
                None,
                Duration::from_millis(300),
            )
            .ok()
        });
        Self { child, port }
    }

    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    pub fn stats(&self) -> serde_json::Value {
        http(
            self.addr(),
            "GET",
            "/admin/stats",
            &[],
            None,
            Duration::from_secs(5),
        )
        .unwrap()
        .json()
    }
}

impl Drop for OwnSvc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bounded steady load: `threads` clients, each at most `max` GETs, until `stop`.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(
        addr: std::net::SocketAddr,
        path: &'static str,
        threads: usize,
        max: usize,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..threads)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    for _ in 0..max {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match http(addr, "GET", path, &[], None, Duration::from_secs(10)) {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => failed
                                .lock()
                                .unwrap()
                                .push(format!("{} {}", r.status, r.body)),
                            Err(e) => failed.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            workers,
        }
    }

    pub fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.join().unwrap();
        }
        let f = self.failed.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), f)
    }
}

/// GETs of `path` on one kept-alive connection until `stop` (or `max`): how many got a 200.
/// Any error, other status or closed connection is an error.
pub fn keepalive_gets(
    addr: SocketAddr,
    path: &str,
    stop: &AtomicBool,
    max: usize,
) -> Result<usize, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut buf: Vec<u8> = Vec::new();
    let mut n = 0;
    while n < max && !stop.load(Ordering::Relaxed) {
        s.write_all(req.as_bytes())
            .map_err(|e| format!("after {n}: {e}"))?;
        // One response: the head, then Content-Length bytes.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let got = s.read(&mut chunk).map_err(|e| format!("after {n}: {e}"))?;
            if got == 0 {
                return Err(format!("closed after {n} responses"));
            }
            buf.extend_from_slice(&chunk[..got]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(format!("after {n}: {head}"));
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("no content-length: {head}"))?;
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            let got = s.read(&mut chunk).map_err(|e| format!("after {n}: {e}"))?;
            if got == 0 {
                return Err(format!("closed mid-body after {n} responses"));
            }
            buf.extend_from_slice(&chunk[..got]);
        }
        buf.drain(..head_end + len);
        n += 1;
    }
    Ok(n)
}

/// A self-signed certificate for `names` (first is the CN), via the openssl CLI.
pub fn cert(dir: &std::path::Path, stem: &str, names: &[&str]) {
    let san = names
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let o = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
        ])
        .arg(format!("/CN={}", names[0]))
        .args(["-addext", &format!("subjectAltName={san}"), "-keyout"])
        .arg(dir.join(format!("{stem}.key")))
        .arg("-out")
        .arg(dir.join(format!("{stem}.pem")))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A CA (`ca.pem`) and a leaf for `name` signed by it (`leaf.pem`, `leaf.key`).
pub fn ca_and_leaf(dir: &std::path::Path, name: &str) {
    let run = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "leaf.pem",
    ]);
}
