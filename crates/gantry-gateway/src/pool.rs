//! Upstream connections, pooled per instance: idle HTTP/1.1 connections in a stack, one shared
//! HTTP/2 connection (multiplexed). Connections are hyper's client connections driven by their
//! own task; requests go through `try_send_request`, so a request that never left on a
//! connection the instance had just closed comes back and is sent again on a fresh one.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::ReqBody;

#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(std::io::Error),
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout => write!(f, "connect timed out"),
            ConnectError::Io(e) => write!(f, "connect: {e}"),
            ConnectError::Handshake(e) => write!(f, "handshake: {e}"),
        }
    }
}

/// A connection ready for one request.
pub enum Conn {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

pub struct Pool {
    idle: Mutex<Vec<http1::SendRequest<ReqBody>>>,
    h2: Mutex<Option<http2::SendRequest<ReqBody>>>,
    max_idle: usize,
}

async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Io)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

impl Pool {
    pub fn new(max_idle: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            max_idle,
        }
    }

    pub fn set_max_idle(&mut self, max_idle: usize) {
        self.max_idle = max_idle;
    }

    /// An idle HTTP/1.1 connection, or a new one.
    pub async fn h1(&self, addr: SocketAddr, timeout: Duration) -> Result<Conn, ConnectError> {
        if let Some(s) = self.idle_h1() {
            return Ok(Conn::H1(s));
        }
        // Boxed: the connect path is rare, and its future is large.
        Ok(Conn::H1(Box::pin(self.new_h1(addr, timeout)).await?))
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

    /// A new HTTP/1.1 connection (never pooled before; used for upgrades too).
    pub async fn new_h1(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<http1::SendRequest<ReqBody>, ConnectError> {
        let stream = tcp(addr, timeout).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
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

    /// The shared HTTP/2 connection (prior knowledge), made on first use or after it closed.
    pub async fn h2(&self, addr: SocketAddr, timeout: Duration) -> Result<Conn, ConnectError> {
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
        let stream = tcp(addr, timeout).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        *self.h2.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender.clone());
        Ok(Conn::H2(sender))
    }

    /// Close idle connections (the instance left).
    pub fn clear(&self) {
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
