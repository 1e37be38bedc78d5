//! Upstream connections, pooled per instance: idle HTTP/1.1 connections in a stack, one shared
//! HTTP/2 connection (multiplexed); plain TCP or TLS. Connections are hyper's client
//! connections driven by their own task; requests go through `try_send_request`, so a request
//! that never left on a connection the instance had just closed comes back and is sent again on
//! a fresh one.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::body::ReqBody;

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

/// How to set up TLS to a service's instances: one connector per protocol, each offering
/// exactly that protocol by ALPN (HTTP/2 connections ask for `h2`; HTTP/1.1 ones, upgrades
/// included, for `http/1.1`), so `auto` and WebSocket upgrades work over TLS too.
pub struct UpstreamTls {
    pub h1: tokio_rustls::TlsConnector,
    pub h2: tokio_rustls::TlsConnector,
    pub server_name: Option<ServerName<'static>>,
}

impl UpstreamTls {
    /// From the model: trust `ca_file` (or the system's CAs).
    pub fn new(t: &gantry_model::UpstreamTls) -> Result<Self, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::CertificateDer;
        let file = t
            .ca_file
            .clone()
            .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&file).map_err(|e| format!("{file}: {e}"))?;
        for c in certs {
            let c = c.map_err(|e| format!("{file}: {e}"))?;
            roots.add(c).map_err(|e| format!("{file}: {e}"))?;
        }
        if roots.is_empty() {
            return Err(format!("{file}: no CA certificates"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = |alpn: &[u8]| {
            let mut c = cfg.clone();
            c.alpn_protocols = vec![alpn.to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(c))
        };
        let server_name = match &t.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone()).map_err(|e| format!("server_name {n:?}: {e}"))?,
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
    pub timeout: Duration,
    pub tls: Option<&'a UpstreamTls>,
}

/// A connection ready for one request.
pub enum Conn {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
    /// Plain HTTP/1.1 driven by the request's own task (`h1.rs`).
    Own(crate::h1::H1Conn),
}

pub struct Pool {
    idle_own: Mutex<Vec<crate::h1::H1Conn>>,
    idle: Mutex<Vec<http1::SendRequest<ReqBody>>>,
    h2: Mutex<Option<http2::SendRequest<ReqBody>>>,
    max_idle: usize,
}

async fn tcp(t: Target<'_>) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(t.timeout, TcpStream::connect(t.addr))
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
    tokio::time::timeout(t.timeout, connector.connect(name, stream))
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Tls)
}

/// A new HTTP/1.1 client connection (upgrades allowed), plain or TLS.
pub async fn connect_h1(t: Target<'_>) -> Result<http1::SendRequest<ReqBody>, ConnectError> {
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

async fn connect_h2(t: Target<'_>) -> Result<http2::SendRequest<ReqBody>, ConnectError> {
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

impl Pool {
    pub fn new(max_idle: usize) -> Self {
        Self {
            idle_own: Mutex::new(Vec::new()),
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            max_idle,
        }
    }

    /// An idle plain HTTP/1.1 connection for the in-task client, or a new one.
    pub async fn own(&self, t: Target<'_>) -> Result<Conn, ConnectError> {
        loop {
            let next = self
                .idle_own
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match next {
                Some(c) if c.is_reusable() => return Ok(Conn::Own(c)),
                Some(_) => continue,
                None => break,
            }
        }
        Ok(Conn::Own(crate::h1::H1Conn::new(Box::pin(tcp(t)).await?)))
    }

    /// Give back a connection whose response was read to the end.
    pub fn put_own(&self, mut c: crate::h1::H1Conn) {
        c.mark_idle();
        let mut idle = self.idle_own.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(c);
        }
    }

    /// An idle HTTP/1.1 connection, or a new one.
    pub async fn h1(&self, t: Target<'_>) -> Result<Conn, ConnectError> {
        if let Some(s) = self.idle_h1() {
            return Ok(Conn::H1(s));
        }
        // Boxed: the connect path is rare, and its future is large.
        Ok(Conn::H1(Box::pin(connect_h1(t)).await?))
    }

    /// An idle HTTP/1.1 connection ready for a request, without waiting.
    fn idle_h1(&self) -> Option<http1::SendRequest<ReqBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].is_closed() {
                idle.swap_remove(i);
            } else if idle[i].is_ready() {
                return Some(idle.swap_remove(i));
            }
            // Open but not ready yet (its last response is still being wound up): keep it.
        }
        None
    }

    /// Give back an HTTP/1.1 connection after its response body ended.
    pub fn put_h1(&self, s: http1::SendRequest<ReqBody>) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(s);
        }
    }

    /// The shared HTTP/2 connection, made on first use or after it closed.
    pub async fn h2(&self, t: Target<'_>) -> Result<Conn, ConnectError> {
        if let Some(s) = self
            .h2
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            if !s.is_closed() && s.is_ready() {
                return Ok(Conn::H2(s.clone()));
            }
        }
        let sender = Box::pin(connect_h2(t)).await?;
        *self.h2.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender.clone());
        Ok(Conn::H2(sender))
    }

    /// Close idle connections (the instance left).
    pub fn clear(&self) {
        self.idle_own
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.h2
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}
