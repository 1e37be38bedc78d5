//! A small HTTP service for Gantry's tests. It listens on `127.0.0.1:$PORT` and can be told to
//! misbehave.
//!
//! - `GET /health`           200, or 500 after `/admin/fail-health`
//! - `GET /env/NAME`         the value of environment variable NAME (404 if unset)
//! - `GET /slow?ms=N`        answers after N ms
//! - `GET /log?msg=TEXT&stream=stderr`  writes TEXT to stdout (or stderr)
//! - `POST /admin/hang`      from now on every request (health included) hangs forever
//! - `POST /admin/crash`     exits at once with status 3
//! - `POST /admin/fail-health`  health answers 500 from now on
//! - `POST /admin/fail`      every other request answers 500 from now on (health stays fine)
//! - `POST /admin/fail-next?n=N`  the next N requests (health excluded) answer 503
//! - `POST /admin/recover`   undo fail, fail-health, fail-next and hang
//! - `GET /admin/stats`      `{"requests": N, "revalidations": N, "bodies": N, "body_bytes": N,
//!   "digest_sum": "H", "connections_open": N, "connections_total": N}` (admin and health
//!   excluded from requests; bodies: whole bodies read by `/digest`; digest_sum: their digests
//!   added, wrapping, so the order they came in does not matter; connections: accepted, and
//!   still open, this one included)
//! - `POST /digest`          reads the whole body; `{"instance", "bytes": N, "digest": "H"}` (H:
//!   FNV-1a 64 of the body, hex)
//! - `GET /status/CODE`      answers with that status
//! - `GET [P]/hop/N`         302 to `[P]/hop/N-1` (`?absolute=1`: an absolute URL on the
//!   request's Host; `?self=1`: on the instance's own address); `[P]/hop/0` answers 200
//! - `GET /stream?n=N&ms=M`  a Server-Sent Events stream: N events (`data: i`), one every M ms,
//!   chunked
//! - `GET /cacheable?max_age=N&etag=E`  `Cache-Control: max-age=N`, `ETag: "E"`, body
//!   `count=<n>`; a matching `If-None-Match` gets 304
//! - anything else           200 with JSON: instance, method, path, query, headers
//!
//! Admin endpoints answer even while hanging or failing.
//!
//! Start-up knobs (environment): `TESTSVC_EXIT_AT_START=N` exits with N right away;
//! `TESTSVC_START_DELAY_MS=N` waits before listening; `TESTSVC_IGNORE_TERM=1` ignores SIGTERM;
//! `TESTSVC_SPAWN_CHILD=1` starts `sleep 1000` as a child (to test process-group handling);
//! `TESTSVC_DELAY_ALL_MS=N` delays every non-admin, non-health answer by N ms;
//! `TESTSVC_UNHEALTHY=1` fails its health check from the start (a bad config).
//! SIGHUP counts a reload (`/reloads`); `/config-file` answers the file `GANTRY_CONFIG_FILE`
//! names, as it is now.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

#[derive(Default)]
struct Flags {
    hang: AtomicBool,
    fail_health: AtomicBool,
    fail_all: AtomicBool,
    fail_next: AtomicU64,
    requests: AtomicU64,
    revalidations: AtomicU64,
    bodies: AtomicU64,
    body_bytes: AtomicU64,
    digest_sum: AtomicU64,
    connections_open: AtomicU64,
    connections_total: AtomicU64,
    reloads: AtomicU64,
    delay_ms: u64,
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn query_param<'a>(q: Option<&'a str>, name: &str) -> Option<&'a str> {
    q?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

fn json_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An event stream: `left` events, one every `every`, the first at once.
struct Ticks {
    sent: u32,
    left: u32,
    every: Duration,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for Ticks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        if let Some(s) = self.sleep.as_mut() {
            std::task::ready!(s.as_mut().poll(cx));
        }
        let every = self.every;
        self.sleep = Some(Box::pin(tokio::time::sleep(every)));
        self.left -= 1;
        self.sent += 1;
        let event = format!("data: {}\n\n", self.sent);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(event)))))
    }
}

type Body = http_body_util::Either<Full<Bytes>, Ticks>;

async fn handle(
    req: Request<Incoming>,
    flags: Arc<Flags>,
    instance: Arc<str>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/stream" {
        let q = req.uri().query();
        let n = query_param(q, "n")
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        let ms = query_param(q, "ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(200);
        let mut r = Response::new(http_body_util::Either::Right(Ticks {
            sent: 0,
            left: n,
            every: Duration::from_millis(ms),
            sleep: None,
        }));
        r.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        return Ok(r);
    }
    let r = handle_full(req, flags, instance).await?;
    Ok(r.map(http_body_util::Either::Left))
}

async fn handle_full(
    req: Request<Incoming>,
    flags: Arc<Flags>,
    instance: Arc<str>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query();
    let admin = path.starts_with("/admin/");
    if !admin {
        if flags.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if path != "/health" {
            flags.requests.fetch_add(1, Ordering::SeqCst);
            if flags.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(flags.delay_ms)).await;
            }
            if flags.fail_all.load(Ordering::SeqCst) {
                return Ok(text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "failing on purpose\n".into(),
                ));
            }
            let next = flags
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if next.is_ok() {
                return Ok(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "failing this once\n".into(),
                ));
            }
        }
    }
    let resp = match (req.method().as_str(), path.as_str()) {
        (_, "/health") => {
            if flags.fail_health.load(Ordering::SeqCst) {
                text(StatusCode::INTERNAL_SERVER_ERROR, "failing\n".into())
            } else {
                text(StatusCode::OK, "ok\n".into())
            }
        }
        ("POST", "/admin/hang") => {
            flags.hang.store(true, Ordering::SeqCst);
            println!("hanging from now on");
            text(StatusCode::OK, "hanging\n".into())
        }
        ("POST", "/admin/crash") => {
            println!("crashing");
            std::process::exit(3);
        }
        ("POST", "/admin/fail-health") => {
            flags.fail_health.store(true, Ordering::SeqCst);
            text(StatusCode::OK, "health fails from now on\n".into())
        }
        ("POST", "/admin/fail") => {
            flags.fail_all.store(true, Ordering::SeqCst);
            text(StatusCode::OK, "failing from now on\n".into())
        }
        ("POST", "/admin/fail-next") => {
            let n = query_param(query, "n")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            flags.fail_next.store(n, Ordering::SeqCst);
            text(StatusCode::OK, format!("the next {n} requests fail\n"))
        }
        ("POST", "/admin/recover") => {
            flags.fail_next.store(0, Ordering::SeqCst);
            flags.fail_all.store(false, Ordering::SeqCst);
            flags.fail_health.store(false, Ordering::SeqCst);
            flags.hang.store(false, Ordering::SeqCst);
            text(StatusCode::OK, "recovered\n".into())
        }
        (_, "/admin/stats") => text(
            StatusCode::OK,
            format!(
                "{{\"requests\":{},\"revalidations\":{},\"bodies\":{},\"body_bytes\":{},\
                 \"digest_sum\":\"{:016x}\",\"connections_open\":{},\"connections_total\":{}}}",
                flags.requests.load(Ordering::SeqCst),
                flags.revalidations.load(Ordering::SeqCst),
                flags.bodies.load(Ordering::SeqCst),
                flags.body_bytes.load(Ordering::SeqCst),
                flags.digest_sum.load(Ordering::SeqCst),
                flags.connections_open.load(Ordering::SeqCst),
                flags.connections_total.load(Ordering::SeqCst)
            ),
        ),
        ("POST", "/digest") => {
            let body = match http_body_util::BodyExt::collect(req.into_body()).await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(text(StatusCode::BAD_REQUEST, format!("body: {e}\n"))),
            };
            let digest = fnv1a(&body);
            flags.bodies.fetch_add(1, Ordering::SeqCst);
            flags
                .body_bytes
                .fetch_add(body.len() as u64, Ordering::SeqCst);
            flags.digest_sum.fetch_add(digest, Ordering::SeqCst);
            text(
                StatusCode::OK,
                format!(
                    "{{\"instance\":{},\"bytes\":{},\"digest\":\"{digest:016x}\"}}\n",
                    json_escape(&instance),
                    body.len()
                ),
            )
        }
        (_, p) if p.starts_with("/status/") => {
            let code = p[8..]
                .parse()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            text(code, format!("{}\n", code.as_u16()))
        }
        (_, "/cacheable") => {
            let max_age = query_param(query, "max_age").unwrap_or("60").to_string();
            let etag = format!("\"{}\"", query_param(query, "etag").unwrap_or("v1"));
            let inm = req
                .headers()
                .get("if-none-match")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let mut r = if inm == etag {
                flags.revalidations.fetch_add(1, Ordering::SeqCst);
                let mut r = text(StatusCode::NOT_MODIFIED, String::new());
                *r.body_mut() = Full::new(Bytes::new());
                r
            } else {
                text(
                    StatusCode::OK,
                    format!("count={}", flags.requests.load(Ordering::SeqCst)),
                )
            };
            let h = r.headers_mut();
            if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("max-age={max_age}")) {
                h.insert("cache-control", v);
            }
            if let Ok(v) = hyper::header::HeaderValue::from_str(&etag) {
                h.insert("etag", v);
            }
            r
        }
        (_, p) if p.contains("/hop/") => {
            // Redirect chains: [PREFIX]/hop/N answers 302 to [PREFIX]/hop/N-1 ([PREFIX]/hop/0
            // answers 200 with the path it was asked for); `absolute=1` makes the Location an
            // absolute URL on the Host the request came with, `self=1` on the instance's own
            // address.
            let at = p.find("/hop/").unwrap_or(0);
            let n: u32 = p[at + 5..].parse().unwrap_or(0);
            if n == 0 {
                text(
                    StatusCode::OK,
                    format!("{{\"arrived\":{}}}\n", json_escape(p)),
                )
            } else {
                let next = format!("{}/hop/{}", &p[..at], n - 1);
                let location = if query_param(query, "absolute") == Some("1") {
                    let host = req
                        .headers()
                        .get("host")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("localhost");
                    format!("http://{host}{next}?absolute=1")
                } else if query_param(query, "self") == Some("1") {
                    let port = std::env::var("PORT").unwrap_or_default();
                    format!("http://127.0.0.1:{port}{next}?self=1")
                } else {
                    next
                };
                let mut r = text(StatusCode::FOUND, String::new());
                if let Ok(v) = hyper::header::HeaderValue::from_str(&location) {
                    r.headers_mut().insert("location", v);
                }
                r
            }
        }
        (_, "/slow") => {
            let ms = query_param(query, "ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(StatusCode::OK, format!("{instance} slept {ms} ms\n"))
        }
        (_, "/call") => {
            // Call another service through the gateway, as a service would: `path` on
            // $GANTRY_GATEWAY_URL with the workload credential from $GANTRY_TOKEN_FILE (unless
            // `token=none`); answers `{"status":N,"body":...}`.
            let target = query_param(query, "path").unwrap_or("/");
            let with_token = query_param(query, "token") != Some("none");
            let forged = query_param(query, "forge");
            let (status, body) = call_gateway(target, with_token, forged).await;
            text(
                StatusCode::OK,
                format!("{{\"status\":{status},\"body\":{}}}\n", json_escape(&body)),
            )
        }
        (_, "/log") => {
            let msg = query_param(query, "msg").unwrap_or("").replace('+', " ");
            if query_param(query, "stream") == Some("stderr") {
                eprintln!("{msg}");
            } else {
                println!("{msg}");
            }
            text(StatusCode::OK, "logged\n".into())
        }
        (_, "/reloads") => text(
            StatusCode::OK,
            flags.reloads.load(Ordering::SeqCst).to_string(),
        ),
        (_, "/config-file") => {
            let path = std::env::var("GANTRY_CONFIG_FILE").unwrap_or_default();
            match std::fs::read_to_string(&path) {
                Ok(t) => text(StatusCode::OK, t),
                Err(e) => text(StatusCode::NOT_FOUND, format!("{path}: {e}\n")),
            }
        }
        (_, p) if p.starts_with("/env/") => match std::env::var(&p[5..]) {
            Ok(v) => text(StatusCode::OK, v),
            Err(_) => text(StatusCode::NOT_FOUND, format!("{} is not set\n", &p[5..])),
        },
        _ => {
            let headers: Vec<String> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}:{}",
                        json_escape(k.as_str()),
                        json_escape(v.to_str().unwrap_or(""))
                    )
                })
                .collect();
            let body = format!(
                "{{\"instance\":{},\"method\":{},\"path\":{},\"query\":{},\"headers\":{{{}}}}}\n",
                json_escape(&instance),
                json_escape(req.method().as_str()),
                json_escape(&path),
                json_escape(query.unwrap_or("")),
                headers.join(",")
            );
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
    };
    Ok(resp)
}

/// One HTTP/1.1 GET to the gateway (`GANTRY_GATEWAY_URL`), with the instance's workload token
/// read fresh from its file; `forge`: a `gantry-auth-service` header claiming to be that service.
async fn call_gateway(path: &str, with_token: bool, forge: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let base = std::env::var("GANTRY_GATEWAY_URL").unwrap_or_default();
    let addr = base.trim_start_matches("http://").to_string();
    let mut head = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    if with_token {
        let file = std::env::var("GANTRY_TOKEN_FILE").unwrap_or_default();
        match std::fs::read_to_string(&file) {
            Ok(t) => head.push_str(&format!("authorization: Bearer {}\r\n", t.trim())),
            Err(e) => return (0, format!("cannot read {file}: {e}")),
        }
    }
    if let Some(f) = forge {
        head.push_str(&format!("gantry-auth-service: {f}\r\n"));
    }
    head.push_str("\r\n");
    let mut conn = match tokio::net::TcpStream::connect(&addr).await {
        Ok(c) => c,
        Err(e) => return (0, format!("connect {addr}: {e}")),
    };
    if let Err(e) = conn.write_all(head.as_bytes()).await {
        return (0, e.to_string());
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
    if !matches!(read, Ok(Ok(_))) {
        return (0, "no answer".into());
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Some(code) = std::env::var("TESTSVC_EXIT_AT_START")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        eprintln!("exiting at start with {code}");
        std::process::exit(code);
    }
    if let Some(ms) = std::env::var("TESTSVC_START_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let _child = if std::env::var("TESTSVC_SPAWN_CHILD").is_ok() {
        std::process::Command::new("sleep").arg("1000").spawn().ok()
    } else {
        None
    };
    let ignore_term = std::env::var("TESTSVC_IGNORE_TERM").is_ok();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot handle SIGTERM: {e}");
            std::process::exit(1);
        }
    };
    let port: u16 = match std::env::var("PORT").ok().and_then(|p| p.parse().ok()) {
        Some(p) => p,
        None => {
            eprintln!("PORT must be set to a port number");
            std::process::exit(2);
        }
    };
    let instance: Arc<str> = std::env::var("GANTRY_INSTANCE")
        .unwrap_or_else(|_| "testsvc".into())
        .into();
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("{instance} listening on 127.0.0.1:{port}");
    let flags = Arc::new(Flags {
        delay_ms: std::env::var("TESTSVC_DELAY_ALL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        fail_health: AtomicBool::new(std::env::var("TESTSVC_UNHEALTHY").is_ok_and(|v| v == "1")),
        ..Flags::default()
    });
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot handle SIGHUP: {e}");
            std::process::exit(1);
        }
    };
    loop {
        tokio::select! {
            acc = listener.accept() => {
                let Ok((stream, _)) = acc else { continue };
                let flags = flags.clone();
                let instance = instance.clone();
                flags.connections_open.fetch_add(1, Ordering::SeqCst);
                flags.connections_total.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let f = flags.clone();
                    let svc = service_fn(move |req| handle(req, f.clone(), instance.clone()));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                    flags.connections_open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            _ = hup.recv() => {
                let n = flags.reloads.fetch_add(1, Ordering::SeqCst) + 1;
                println!("SIGHUP: reload {n}");
            }
            _ = term.recv() => {
                if ignore_term {
                    println!("ignoring SIGTERM");
                } else {
                    println!("SIGTERM: exiting");
                    return;
                }
            }
        }
    }
}
