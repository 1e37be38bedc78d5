//! The test service itself behaves as documented (the gantry tests rely on it).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

struct Svc(Child, u16);
impl Drop for Svc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(extra: &[(&str, &str)]) -> Svc {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_gantry-testsvc"))
        .env("PORT", port.to_string())
        .env("GANTRY_INSTANCE", "t-1")
        .envs(extra.iter().copied())
        .spawn()
        .unwrap();
    // Owned by `Svc` at once: killed and reaped even if it never becomes healthy.
    let svc = Svc(child, port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if get(port, "GET", "/health").is_some() {
            return svc;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("testsvc did not start");
}

#[test]
fn answers_health_env_and_echo() {
    let s = start(&[("HELLO", "world")]);
    assert_eq!(get(s.1, "GET", "/health").unwrap().0, 200);
    assert_eq!(
        get(s.1, "GET", "/env/HELLO").unwrap(),
        (200, "world".to_string())
    );
    assert_eq!(get(s.1, "GET", "/env/NOPE").unwrap().0, 404);
    let (st, body) = get(s.1, "GET", "/a/b?c=d").unwrap();
    assert_eq!(st, 200);
    assert!(body.contains("\"instance\":\"t-1\""), "{body}");
    assert!(body.contains("\"path\":\"/a/b\""), "{body}");
}

#[test]
fn fails_health_and_hangs_when_told() {
    let s = start(&[]);
    assert_eq!(get(s.1, "POST", "/admin/fail-health").unwrap().0, 200);
    assert_eq!(get(s.1, "GET", "/health").unwrap().0, 500);
    assert_eq!(get(s.1, "POST", "/admin/hang").unwrap().0, 200);
    // Connection accepted, no answer within the read timeout.
    assert!(get(s.1, "GET", "/health").is_none());
}

#[test]
fn crashes_when_told() {
    let mut s = start(&[]);
    let _ = get(s.1, "POST", "/admin/crash");
    let status = s.0.wait().unwrap();
    assert_eq!(status.code(), Some(3));
}
