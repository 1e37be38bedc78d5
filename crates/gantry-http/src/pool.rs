//! Upstream connections, pooled per instance: idle plain HTTP/1.1 connections for the in-task
//! client, idle hyper HTTP/1.1 connections (TLS), and one shared HTTP/2 connection
//! (multiplexed). Upgrade connections are never pooled. An idle connection is closed after the
//! pool's idle timeout (checked when one is taken, and by [`Pool::sweep`], which the owner
//! calls about once a second after [`tick`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::body::SendBody;
use crate::h1client::H1Conn;

#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(std::io::Error),
    Tls(std::io::Error),
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout => write!(f, "connect timed out"),
            ConnectError::Io(e) => write!(f, "connect: {e}"),
            ConnectError::Tls(e) => write!(f, "TLS handshake: {e}"),
            ConnectError::Handshake(e) => write!(f, "handshake: {e}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// How to set up TLS to a service's instances: one connector per protocol, each offering
/// exactly that protocol by ALPN (HTTP/2 connections ask for `h2`; HTTP/1.1 ones, upgrades
/// included, for `http/1.1`), so `auto` and WebSocket upgrades work over TLS too.
pub struct UpstreamTls {
    pub h1: tokio_rustls::TlsConnector,
    pub h2: tokio_rustls::TlsConnector,
    pub server_name: Option<ServerName<'static>>,
}

impl UpstreamTls {
    /// Trust the CAs in `ca_file` (PEM; the system's when `None`); verify the instances'
    /// certificates against `server_name` (their IP address when `None`).
    pub fn new(ca_file: Option<&str>, server_name: Option<&str>) -> Result<Self, String> {
        use rustls_pki_types::pem::PemObject;
        let file = ca_file.unwrap_or("/etc/ssl/certs/ca-certificates.crt");
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(file).map_err(|e| format!("{file}: {e}"))?;
        for c in certs {
            let c = c.map_err(|e| format!("{file}: {e}"))?;
            roots.add(c).map_err(|e| format!("{file}: {e}"))?;
        }
        if roots.is_empty() {
            return Err(format!("{file}: no CA certificates"));
        }
        Self::with(roots, None, server_name)
    }

    /// Mutual TLS: trust only `roots` for the instances' certificates and present the
    /// certificate `client` resolves (it may change between connections: renewals).
    pub fn mtls(
        roots: &[CertificateDer<'static>],
        client: Arc<dyn rustls::client::ResolvesClientCert>,
        server_name: Option<&str>,
    ) -> Result<Self, String> {
        let mut store = rustls::RootCertStore::empty();
        for c in roots {
            store
                .add(c.clone())
                .map_err(|e| format!("internal CA: {e}"))?;
        }
        if store.is_empty() {
            return Err("no internal CA certificate".into());
        }
        Self::with(store, Some(client), server_name)
    }

    fn with(
        roots: rustls::RootCertStore,
        client: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
        server_name: Option<&str>,
    ) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let cfg = match client {
            Some(c) => b.with_client_cert_resolver(c),
            None => b.with_no_client_auth(),
        };
        let connector = |alpn: &[u8]| {
            let mut c = cfg.clone();
            c.alpn_protocols = vec![alpn.to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(c))
        };
        let server_name = match server_name {
            Some(n) => Some(
                ServerName::try_from(n.to_string())
                    .map_err(|e| format!("server_name {n:?}: {e}"))?,
            ),
            None => None,
        };
        Ok(Self {
            h1: connector(b"http/1.1"),
            h2: connector(b"h2"),
            server_name,
        })
    }
}

/// Where to connect.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub addr: SocketAddr,
    /// For the TCP connect and the TLS handshake, each.
    pub connect_timeout: Duration,
    pub tls: Option<&'a UpstreamTls>,
}

/// Coarse monotonic seconds, advanced by [`tick`]: idle connections are stamped with it when
/// they go back to a pool (a plain load, no clock read per request).
static COARSE_SECS: AtomicU64 = AtomicU64::new(0);

/// Advance the coarse clock idle timeouts are measured by (call about once a second).
pub fn tick() {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    COARSE_SECS.store(start.elapsed().as_secs(), Ordering::Relaxed);
}

fn coarse_now() -> u64 {
    COARSE_SECS.load(Ordering::Relaxed)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Idle connections of one kind, newest last, each with the coarse second it went idle.
pub(crate) struct Idle<C> {
    conns: Mutex<Vec<(C, u64)>>,
    max: usize,
    timeout_secs: u64,
}

impl<C> Idle<C> {
    pub(crate) fn new(max: usize, timeout: Duration) -> Self {
        Self {
            conns: Mutex::new(Vec::new()),
            max,
            // Rounded up: a connection is never closed before its idle timeout.
            timeout_secs: timeout.as_millis().div_ceil(1000) as u64,
        }
    }

    fn expired(&self, since: u64, now: u64) -> bool {
        now.saturating_sub(since) > self.timeout_secs
    }

    /// The newest idle connection `usable` accepts; older expired ones are dropped.
    fn take(&self, usable: impl FnMut(&C) -> bool) -> Option<C> {
        self.take_at(coarse_now(), usable)
    }

    fn take_at(&self, now: u64, mut usable: impl FnMut(&C) -> bool) -> Option<C> {
        let mut idle = lock(&self.conns);
        while let Some((c, since)) = idle.pop() {
            if !self.expired(since, now) && usable(&c) {
                return Some(c);
            }
        }
        None
    }

    pub(crate) fn put(&self, c: C) {
        let mut idle = lock(&self.conns);
        if idle.len() < self.max {
            idle.push((c, coarse_now()));
        }
    }

    fn sweep(&self) -> usize {
        self.sweep_at(coarse_now())
    }

    fn sweep_at(&self, now: u64) -> usize {
        let mut idle = lock(&self.conns);
        let before = idle.len();
        idle.retain(|(_, since)| !self.expired(*since, now));
        before - idle.len()
    }

    fn len(&self) -> usize {
        lock(&self.conns).len()
    }

    fn clear(&self) {
        lock(&self.conns).clear();
    }
}

/// One instance's connections.
pub struct Pool<B> {
    /// Plain HTTP/1.1 connections for the in-task client (shared with the response bodies that
    /// give them back).
    pub(crate) own: Arc<Idle<H1Conn>>,
    /// hyper HTTP/1.1 connections (TLS upstreams).
    idle: Idle<http1::SendRequest<B>>,
    h2: Mutex<Option<http2::SendRequest<B>>>,
}

async fn tcp(t: Target<'_>) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(t.connect_timeout, TcpStream::connect(t.addr))
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Io)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn tls(
    t: Target<'_>,
    tls: &UpstreamTls,
    stream: TcpStream,
    h2: bool,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let name = tls
        .server_name
        .clone()
        .unwrap_or_else(|| ServerName::IpAddress(t.addr.ip().into()));
    let connector = if h2 { &tls.h2 } else { &tls.h1 };
    tokio::time::timeout(t.connect_timeout, connector.connect(name, stream))
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Tls)
}

/// A new hyper HTTP/1.1 client connection (upgrades allowed), plain or TLS.
pub(crate) async fn connect_h1<B: SendBody>(
    t: Target<'_>,
) -> Result<http1::SendRequest<B>, ConnectError> {
    let stream = tcp(t).await?;
    match t.tls {
        None => {
            let (sender, conn) = http1::Builder::new()
                .handshake(TokioIo::new(stream))
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            Ok(sender)
        }
        Some(cfg) => {
            let s = tls(t, cfg, stream, false).await?;
            let (sender, conn) = http1::Builder::new()
                .handshake(TokioIo::new(s))
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            Ok(sender)
        }
    }
}

async fn connect_h2<B: SendBody>(t: Target<'_>) -> Result<http2::SendRequest<B>, ConnectError> {
    let stream = tcp(t).await?;
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    match t.tls {
        None => {
            let (sender, conn) = b
                .handshake(TokioIo::new(stream))
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        }
        Some(cfg) => {
            let s = tls(t, cfg, stream, true).await?;
            let (sender, conn) = b
                .handshake(TokioIo::new(s))
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        }
    }
}

impl<B: SendBody> Pool<B> {
    /// Up to `max_idle` idle connections of each kind, each closed after `idle_timeout`.
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            own: Arc::new(Idle::new(max_idle, idle_timeout)),
            idle: Idle::new(max_idle, idle_timeout),
            h2: Mutex::new(None),
        }
    }

    /// An idle plain HTTP/1.1 connection for the in-task client, or a new one.
    pub(crate) async fn own(&self, t: Target<'_>) -> Result<H1Conn, ConnectError> {
        if let Some(c) = self.own.take(H1Conn::is_reusable) {
            return Ok(c);
        }
        Ok(H1Conn::new(Box::pin(tcp(t)).await?))
    }

    /// An idle hyper HTTP/1.1 connection (ready for a request), or a new one.
    pub(crate) async fn h1(&self, t: Target<'_>) -> Result<http1::SendRequest<B>, ConnectError> {
        // Open but not ready yet (its last response is still being wound up) counts as not
        // usable here: rare, and taking another is always right.
        if let Some(s) = self.idle.take(|s| !s.is_closed() && s.is_ready()) {
            return Ok(s);
        }
        // Boxed: the connect path is rare, and its future is large.
        Box::pin(connect_h1(t)).await
    }

    /// Give back a hyper HTTP/1.1 connection after its response body ended.
    pub(crate) fn put_h1(&self, s: http1::SendRequest<B>) {
        if !s.is_closed() {
            self.idle.put(s);
        }
    }

    /// The shared HTTP/2 connection, made on first use or after it closed.
    pub(crate) async fn h2(&self, t: Target<'_>) -> Result<http2::SendRequest<B>, ConnectError> {
        if let Some(s) = lock(&self.h2).as_ref() {
            if !s.is_closed() && s.is_ready() {
                return Ok(s.clone());
            }
        }
        let sender = Box::pin(connect_h2(t)).await?;
        *lock(&self.h2) = Some(sender.clone());
        Ok(sender)
    }

    /// Close idle connections past the idle timeout (by [`tick`]'s clock); how many closed.
    pub fn sweep(&self) -> usize {
        self.own.sweep() + self.idle.sweep()
    }

    /// Idle HTTP/1.1 connections held now.
    pub fn idle_connections(&self) -> usize {
        self.own.len() + self.idle.len()
    }

    /// Close idle connections (the instance left).
    pub fn clear(&self) {
        self.own.clear();
        self.idle.clear();
        lock(&self.h2).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_entries_expire_and_the_newest_goes_first() {
        let idle: Idle<u32> = Idle::new(2, Duration::from_millis(1500));
        idle.put(1);
        idle.put(2);
        // Full: a third is closed rather than kept.
        idle.put(3);
        assert_eq!(idle.len(), 2);
        assert_eq!(idle.take(|_| true), Some(2));
        // 1.5 s rounds up to 2: still usable 2 s after going idle, not 3 s after.
        idle.clear();
        lock(&idle.conns).extend([(7, 100), (8, 101)]);
        assert_eq!(idle.sweep_at(102), 0);
        assert_eq!(idle.sweep_at(103), 1);
        assert_eq!(idle.take_at(103, |_| true), Some(8));
        // Expired and unusable ones are dropped on the way to a usable one.
        lock(&idle.conns).extend([(4, 100), (5, 200), (6, 200)]);
        assert_eq!(idle.take_at(201, |c| *c == 5), Some(5));
        assert_eq!(idle.take_at(201, |_| true), None, "4 expired");
        assert_eq!(idle.len(), 0);
    }
}
