//! Sans-io cores of the instance lifecycle (health thresholds, restart backoff, crash-loop
//! detection), with time passed in so they can be tested without waiting; and the probes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gantry_model::{HealthSpec, ProbeKind};
use http_body_util::Empty;

/// Health as the probes see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeState {
    /// No probe has passed yet.
    Starting,
    Healthy,
    Unhealthy,
}

/// A change the tracker decided on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    BecameHealthy,
    BecameUnhealthy,
}

/// Turns probe results into healthy/unhealthy transitions.
///
/// - Starting → Healthy on the first pass (so instances join routing as soon as they answer);
///   failures while starting do not count until `start_grace` has passed, then → Unhealthy.
/// - Healthy → Unhealthy after `unhealthy_threshold` consecutive failures.
/// - Unhealthy → Healthy after `healthy_threshold` consecutive passes.
#[derive(Debug)]
pub struct HealthTracker {
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    start_grace: Duration,
    started: Instant,
    state: ProbeState,
    ok_streak: u32,
    fail_streak: u32,
    unhealthy_since: Option<Instant>,
}

impl HealthTracker {
    pub fn new(spec: &HealthSpec, started: Instant) -> Self {
        Self {
            healthy_threshold: spec.healthy_threshold.max(1),
            unhealthy_threshold: spec.unhealthy_threshold.max(1),
            start_grace: Duration::from_millis(spec.start_grace_ms),
            started,
            state: ProbeState::Starting,
            ok_streak: 0,
            fail_streak: 0,
            unhealthy_since: None,
        }
    }

    pub fn state(&self) -> ProbeState {
        self.state
    }

    pub fn observe(&mut self, ok: bool, now: Instant) -> Option<Transition> {
        if ok {
            self.ok_streak += 1;
            self.fail_streak = 0;
        } else {
            self.fail_streak += 1;
            self.ok_streak = 0;
        }
        match self.state {
            ProbeState::Starting if ok => self.to(ProbeState::Healthy, now),
            ProbeState::Starting => {
                if now.duration_since(self.started) >= self.start_grace {
                    self.to(ProbeState::Unhealthy, now)
                } else {
                    None
                }
            }
            ProbeState::Healthy if self.fail_streak >= self.unhealthy_threshold => {
                self.to(ProbeState::Unhealthy, now)
            }
            ProbeState::Unhealthy if self.ok_streak >= self.healthy_threshold => {
                self.to(ProbeState::Healthy, now)
            }
            _ => None,
        }
    }

    /// How long the instance has been unhealthy, if it is.
    pub fn unhealthy_for(&self, now: Instant) -> Option<Duration> {
        self.unhealthy_since.map(|t| now.duration_since(t))
    }

    fn to(&mut self, s: ProbeState, now: Instant) -> Option<Transition> {
        self.state = s;
        match s {
            ProbeState::Healthy => {
                self.unhealthy_since = None;
                Some(Transition::BecameHealthy)
            }
            ProbeState::Unhealthy => {
                self.unhealthy_since = Some(now);
                Some(Transition::BecameUnhealthy)
            }
            ProbeState::Starting => None,
        }
    }
}

/// Exponential restart delay: `initial · 2^(failures-1)`, capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

/// A process that ran at least this long resets the backoff (its next crash restarts quickly).
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            failures: 0,
        }
    }

    /// Delay before the next start, given how long the last process ran.
    pub fn next_delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= BACKOFF_RESET_AFTER {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        let factor = 1u64 << (self.failures - 1).min(30);
        let ms = (self.initial.as_millis() as u64).saturating_mul(factor);
        Duration::from_millis(ms).min(self.max)
    }
}

/// Detects `limit` exits within `window`.
#[derive(Debug, Clone)]
pub struct CrashLoopDetector {
    limit: usize,
    window: Duration,
    exits: VecDeque<Instant>,
}

impl CrashLoopDetector {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit: limit.max(1) as usize,
            window,
            exits: VecDeque::new(),
        }
    }

    /// Record an exit; returns whether the instance is now crash-looping.
    pub fn record_exit(&mut self, now: Instant) -> bool {
        self.exits.push_back(now);
        while let Some(&t) = self.exits.front() {
            if now.duration_since(t) > self.window {
                self.exits.pop_front();
            } else {
                break;
            }
        }
        self.exits.len() >= self.limit
    }
}

/// Run one probe against an instance; `Err` carries why it failed.
pub async fn probe(
    spec: &HealthSpec,
    addr: SocketAddr,
    env: &[(String, String)],
    cwd: &std::path::Path,
) -> Result<(), String> {
    let timeout = Duration::from_millis(spec.timeout_ms);
    let fut = async {
        match spec.kind {
            ProbeKind::None => Ok(()),
            ProbeKind::Tcp => tokio::net::TcpStream::connect(addr)
                .await
                .map(|_| ())
                .map_err(|e| format!("tcp connect {addr}: {e}")),
            ProbeKind::Http => http_probe(addr, spec.path.as_deref().unwrap_or("/")).await,
            ProbeKind::Exec => exec_probe(spec.command.as_deref().unwrap_or(&[]), env, cwd).await,
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {} ms", spec.timeout_ms)),
    }
}

async fn http_probe(addr: SocketAddr, path: &str) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("http connect {addr}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
    let conn_task = tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", addr.to_string())
        .header("user-agent", "gantry-health/1")
        .header("connection", "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad probe request: {e}"))?;
    let res = sender.send_request(req).await;
    conn_task.abort();
    let resp = res.map_err(|e| format!("http GET {path}: {e}"))?;
    let status = resp.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("http GET {path}: status {}", status.as_u16()))
    }
}

async fn exec_probe(
    command: &[String],
    env: &[(String, String)],
    cwd: &std::path::Path,
) -> Result<(), String> {
    let Some((prog, args)) = command.split_first() else {
        return Err("exec probe has no command".into());
    };
    let status = tokio::process::Command::new(prog)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| format!("exec {prog}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("exec {prog}: {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(healthy: u32, unhealthy: u32, grace_ms: u64) -> HealthSpec {
        HealthSpec {
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
            start_grace_ms: grace_ms,
            ..HealthSpec::default()
        }
    }

    #[test]
    fn starting_instance_becomes_healthy_on_first_pass() {
        let t0 = Instant::now();
        let mut h = HealthTracker::new(&spec(2, 3, 1000), t0);
        assert_eq!(h.observe(false, t0 + Duration::from_millis(10)), None);
        assert_eq!(h.observe(false, t0 + Duration::from_millis(20)), None);
        assert_eq!(
            h.observe(true, t0 + Duration::from_millis(30)),
            Some(Transition::BecameHealthy)
        );
        assert_eq!(h.state(), ProbeState::Healthy);
    }

    #[test]
    fn grace_expiry_makes_a_silent_instance_unhealthy() {
        let t0 = Instant::now();
        let mut h = HealthTracker::new(&spec(1, 3, 100), t0);
        assert_eq!(h.observe(false, t0 + Duration::from_millis(99)), None);
        assert_eq!(
            h.observe(false, t0 + Duration::from_millis(100)),
            Some(Transition::BecameUnhealthy)
        );
        assert_eq!(
            h.unhealthy_for(t0 + Duration::from_millis(150)),
            Some(Duration::from_millis(50))
        );
    }

    #[test]
    fn thresholds_apply_both_ways() {
        let t0 = Instant::now();
        let mut h = HealthTracker::new(&spec(2, 3, 0), t0);
        assert_eq!(h.observe(true, t0), Some(Transition::BecameHealthy));
        assert_eq!(h.observe(false, t0), None);
        assert_eq!(h.observe(false, t0), None);
        assert_eq!(h.observe(true, t0), None); // streak broken
        assert_eq!(h.observe(false, t0), None);
        assert_eq!(h.observe(false, t0), None);
        assert_eq!(h.observe(false, t0), Some(Transition::BecameUnhealthy));
        assert_eq!(h.observe(true, t0), None);
        assert_eq!(h.observe(true, t0), Some(Transition::BecameHealthy));
        assert_eq!(h.unhealthy_for(t0), None);
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let short = Duration::from_millis(5);
        let delays: Vec<u64> = (0..6)
            .map(|_| b.next_delay(short).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.next_delay(BACKOFF_RESET_AFTER).as_millis(), 100);
    }

    #[test]
    fn crash_loop_needs_exits_within_window() {
        let t0 = Instant::now();
        let mut c = CrashLoopDetector::new(3, Duration::from_secs(10));
        assert!(!c.record_exit(t0));
        assert!(!c.record_exit(t0 + Duration::from_secs(1)));
        assert!(c.record_exit(t0 + Duration::from_secs(2)));
        // Spread out exits do not count.
        let mut c = CrashLoopDetector::new(3, Duration::from_secs(10));
        assert!(!c.record_exit(t0));
        assert!(!c.record_exit(t0 + Duration::from_secs(11)));
        assert!(!c.record_exit(t0 + Duration::from_secs(22)));
    }

    #[tokio::test]
    async fn probes_report_failures() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|_| unreachable!());
        let addr = l.local_addr().unwrap_or_else(|_| unreachable!());
        let tcp = HealthSpec::default();
        assert!(probe(&tcp, addr, &[], std::path::Path::new("."))
            .await
            .is_ok());
        drop(l);
        assert!(probe(&tcp, addr, &[], std::path::Path::new("."))
            .await
            .is_err());
        let exec = HealthSpec {
            kind: ProbeKind::Exec,
            command: Some(vec!["false".into()]),
            ..HealthSpec::default()
        };
        assert!(probe(&exec, addr, &[], std::path::Path::new("."))
            .await
            .is_err());
        let exec_ok = HealthSpec {
            kind: ProbeKind::Exec,
            command: Some(vec!["sh".into(), "-c".into(), "test \"$X\" = 1".into()]),
            ..HealthSpec::default()
        };
        let env = vec![("X".to_string(), "1".to_string())];
        assert!(probe(&exec_ok, addr, &env, std::path::Path::new("."))
            .await
            .is_ok());
    }
}
