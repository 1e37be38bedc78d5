//! Listeners: accept connections (plain or TLS), enforce the connection limit, and serve each.
//! Connections start on the in-task HTTP/1.1 server (`h1server.rs`), plain or TLS, which hands
//! h2c (prior knowledge) and upgrades (WebSocket) to hyper; TLS connections that chose HTTP/2 by
//! ALPN go to hyper-util's auto builder at once. Shutdown stops accepting and lets open
//! requests finish within the grace.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::DownBody;
use crate::h1server::Outcome;
use crate::wire::Wire;
use crate::Gateway;

/// A stream with bytes already read from it put back in front (a connection handed from the
/// in-task server to hyper).
struct Prefixed<I> {
    prefix: Bytes,
    inner: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Count what hyper refused on a connection it served (it answered 400 or 431 itself), and
/// slow heads.
fn count_refusals(gw: &Gateway, res: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = res {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_parse_too_large() {
                gw.metrics.reject("request_head_too_large");
            } else if h.is_parse() {
                gw.metrics.reject("malformed_request");
            } else if h.is_timeout() {
                gw.metrics.reject("header_read_timeout");
            }
        }
    }
}

/// Where the gateway accepts traffic.
pub enum Listener {
    Plain(TcpListener),
    Tls(TcpListener, Arc<rustls::ServerConfig>),
}

/// Facts about the client connection a request came on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as an `X-Forwarded-For` value, formatted once per connection.
    pub peer_ip: http::HeaderValue,
    pub tls: bool,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        Self {
            peer,
            peer_ip: crate::proxy::forwarded_for(None, peer),
            tls,
        }
    }
}

/// Decrements the open-connection count when the connection ends.
struct ConnGuard(Arc<Gateway>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.open_connections.dec();
    }
}

impl Gateway {
    fn http_builder(&self) -> auto::Builder<TokioExecutor> {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.cfg.header_read_timeout)
            .max_buf_size(self.cfg.max_header_bytes.max(8192))
            .max_headers(self.cfg.max_headers)
            .keep_alive(true);
        b.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(self.cfg.max_header_bytes as u32)
            .max_concurrent_streams(256)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        b
    }

    /// Serve a connection with hyper (TLS, h2c, a connection that asked for an upgrade) until it
    /// closes; `watcher` lets graceful shutdown close it and wait for it.
    async fn serve_hyper<I>(
        self: &Arc<Self>,
        builder: &auto::Builder<TokioExecutor>,
        io: I,
        peer: SocketAddr,
        tls: bool,
        watcher: Watcher,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let gw = self.clone();
        let conn_info = ConnInfo::new(peer, tls);
        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let gw = gw.clone();
            let info = conn_info.clone();
            // Boxed: hyper moves the service future, and the pipeline's is large.
            Box::pin(async move {
                let resp = gw.handle(req.map(DownBody::Hyper), &info, None).await;
                // hyper writes a map: deferred response headers go into it.
                let (mut parts, mut body) = resp.into_parts();
                body.materialize(&mut parts.headers);
                Ok::<_, Infallible>(hyper::Response::from_parts(parts, body))
            })
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
        watcher.watch(conn).await
    }

    /// Over `max_connections` on the plain port: a 503 JSON answer with `Retry-After` if the
    /// socket takes it at once (a new socket's buffer is empty: it does), then it closes. Nothing
    /// waits on it, so a flood of connections costs a write and a close each.
    fn refuse_connection(&self, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let resp = self.reject_unparsed(crate::proxy::Reject::TooManyConnections, peer, None);
        let out = crate::h1server::encode_closing(resp);
        let _ = stream.try_write(&out);
        if let Ok(s) = stream.into_std() {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Accept on `listener` until `shutdown` turns true, then wait (up to the shutdown grace)
    /// for open requests to finish.
    pub async fn serve(self: Arc<Self>, listener: Listener, mut shutdown: watch::Receiver<bool>) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let builder = Arc::new(self.http_builder());
        let (tcp, tls) = match listener {
            Listener::Plain(l) => (l, None),
            Listener::Tls(l, cfg) => (l, Some(tokio_rustls::TlsAcceptor::from(cfg))),
        };
        loop {
            let (stream, peer) = tokio::select! {
                res = tcp.accept() => match res {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "gateway accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            };
            if self.connections.load(Ordering::Relaxed) >= self.cfg.max_connections {
                if tls.is_some() {
                    // No TLS session to answer in: closed.
                    self.metrics.reject("max_connections");
                } else {
                    self.refuse_connection(stream, peer);
                }
                continue;
            }
            self.connections.fetch_add(1, Ordering::Relaxed);
            self.metrics.open_connections.inc();
            self.metrics.connections.inc();
            let guard = ConnGuard(self.clone());
            let _ = stream.set_nodelay(true);
            let watcher = graceful.watcher();
            let builder = builder.clone();
            let gw = self.clone();
            let tls = tls.clone();
            let handshake_timeout = self.cfg.header_read_timeout;
            let mut conn_shutdown = shutdown.clone();
            // The task holds only what a plain connection needs: hyper's connection future
            // (kilobytes) and the TLS handshake are boxed, off the common path.
            let task = async move {
                let _guard = guard;
                let (wire, watcher) = match tls {
                    None => (Wire::Plain(stream), watcher),
                    Some(acceptor) => {
                        let tls = Box::pin(async {
                            let accept = acceptor.accept(stream);
                            match tokio::time::timeout(handshake_timeout, accept).await {
                                // HTTP/2 chosen by ALPN: hyper's from the start.
                                Ok(Ok(s)) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
                                    let res = gw.serve_hyper(&builder, s, peer, true, watcher);
                                    count_refusals(&gw, res.await);
                                    None
                                }
                                Ok(Ok(s)) => Some((Wire::tls(s), watcher)),
                                _ => None,
                            }
                        });
                        match tls.await {
                            Some(w) => w,
                            None => return,
                        }
                    }
                };
                let tls = matches!(wire, Wire::Tls(_));
                let info = ConnInfo::new(peer, tls);
                let res =
                    match crate::h1server::serve(&gw, Arc::new(wire), info, &mut conn_shutdown)
                        .await
                    {
                        Outcome::Closed => Ok(()),
                        Outcome::Handoff(Wire::Plain(inner), prefix) => {
                            let io = Prefixed { prefix, inner };
                            Box::pin(gw.serve_hyper(&builder, io, peer, false, watcher)).await
                        }
                        Outcome::Handoff(Wire::Tls(t), prefix) => {
                            let inner = t.into_inner().unwrap_or_else(PoisonError::into_inner);
                            let io = Prefixed { prefix, inner };
                            Box::pin(gw.serve_hyper(&builder, io, peer, true, watcher)).await
                        }
                    };
                count_refusals(&gw, res);
            };
            tokio::spawn(task);
        }
        drop(tcp);
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(self.cfg.shutdown_grace) => {
                tracing::warn!("gateway shutdown grace elapsed with requests still open");
            }
        }
    }
}
