//! Listeners: accept connections (plain or TLS), enforce the connection limit, and serve each.
//! Connections start on the in-task HTTP/1.1 server (`h1server.rs`), plain or TLS, which hands
//! h2c (prior knowledge) and upgrades (WebSocket) to hyper; TLS connections that chose HTTP/2 by
//! ALPN go to hyper-util's auto builder at once. Shutdown stops accepting and lets open
//! requests finish within the grace.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
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

use crate::body::{RequestBody, ResponseBody};
use crate::h1server::Outcome;
use crate::wire::Wire;
use crate::{ConnInfo, Handler, PeerIdentity, Refusal};

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

/// What hyper refused on a connection it served (it answered 400 or 431 itself), and slow
/// heads, as refusals for the handler to count.
fn hyper_refusal(
    cfg: &ServerConfig,
    res: &Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Option<Refusal> {
    let h = res.as_ref().err()?.downcast_ref::<hyper::Error>()?;
    if h.is_parse_too_large() {
        Some(Refusal::HeadTooLarge {
            max_header_bytes: cfg.max_header_bytes,
            max_headers: cfg.max_headers,
        })
    } else if h.is_parse() {
        Some(Refusal::Malformed("refused by the HTTP parser"))
    } else if h.is_timeout() {
        Some(Refusal::HeadTimeout {
            after_ms: cfg.header_read_timeout.as_millis() as u64,
        })
    } else {
        None
    }
}

/// Where the gateway accepts traffic.
pub enum Listener {
    Plain(TcpListener),
    Tls(TcpListener, Arc<rustls::ServerConfig>),
}

/// Limits of the server side.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Open client connections, over all listeners; beyond it new ones are refused.
    pub max_connections: usize,
    /// Bytes of one request head.
    pub max_header_bytes: usize,
    /// Header fields of one request.
    pub max_headers: usize,
    /// Time a client has to send a complete request head (and a TLS handshake).
    pub header_read_timeout: Duration,
    /// How long shutdown waits for open requests to finish.
    pub shutdown_grace: Duration,
}

/// The server side: its limits and the connections open over all its listeners.
pub struct Server {
    cfg: ServerConfig,
    connections: AtomicUsize,
}

/// Gives back a connection's place when the connection ends.
struct ConnGuard<H: Handler>(Arc<Server>, Arc<H>);

impl<H: Handler> Drop for ConnGuard<H> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.1.connection(false);
    }
}

/// The client's verified certificate chain, if it sent one.
fn peer_identity(c: &rustls::ServerConnection) -> Option<Arc<PeerIdentity>> {
    let certs = c.peer_certificates()?;
    (!certs.is_empty()).then(|| {
        Arc::new(PeerIdentity {
            certificates: certs.iter().map(|c| c.clone().into_owned()).collect(),
            resolved: std::sync::OnceLock::new(),
        })
    })
}

impl Server {
    pub fn new(cfg: ServerConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            connections: AtomicUsize::new(0),
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

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

    /// Over `max_connections` on the plain port: the handler's refusal, if the socket takes it
    /// at once (a new socket's buffer is empty: it does), then it closes. Nothing waits on it,
    /// so a flood of connections costs a write and a close each.
    fn refuse_connection<H: Handler>(
        &self,
        h: &H,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
    ) {
        let info = ConnInfo::new(peer, false, None);
        let resp = h.refuse(Refusal::TooManyConnections, &info);
        let out = crate::h1server::encode_closing(resp);
        let _ = stream.try_write(&out);
        if let Ok(s) = stream.into_std() {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Accept on `listener` until `shutdown` turns true, then wait (up to the shutdown grace)
    /// for open requests to finish.
    pub async fn serve<H: Handler>(
        self: Arc<Self>,
        handler: Arc<H>,
        listener: Listener,
        mut shutdown: watch::Receiver<bool>,
    ) {
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
                    handler.refused_by_hyper(Refusal::TooManyConnections);
                } else {
                    self.refuse_connection(&*handler, stream, peer);
                }
                continue;
            }
            self.connections.fetch_add(1, Ordering::Relaxed);
            handler.connection(true);
            let guard = ConnGuard(self.clone(), handler.clone());
            let _ = stream.set_nodelay(true);
            let watcher = graceful.watcher();
            let builder = builder.clone();
            let server = self.clone();
            let h = handler.clone();
            let tls = tls.clone();
            let mut conn_shutdown = shutdown.clone();
            // The task holds only what a plain connection needs: hyper's connection future
            // (kilobytes) and the TLS handshake are boxed, off the common path.
            let task = async move {
                let _guard = guard;
                let cfg = &server.cfg;
                let (wire, info, watcher) = match tls {
                    None => (
                        Wire::Plain(stream),
                        ConnInfo::new(peer, false, None),
                        watcher,
                    ),
                    Some(acceptor) => {
                        let tls = Box::pin(async {
                            let accept = acceptor.accept(stream);
                            match tokio::time::timeout(cfg.header_read_timeout, accept).await {
                                Ok(Ok(s)) => {
                                    let info =
                                        ConnInfo::new(peer, true, peer_identity(s.get_ref().1));
                                    // HTTP/2 chosen by ALPN: hyper's from the start.
                                    if s.get_ref().1.alpn_protocol() == Some(b"h2") {
                                        let res = serve_hyper(&h, &builder, s, info, watcher).await;
                                        if let Some(r) = hyper_refusal(cfg, &res) {
                                            h.refused_by_hyper(r);
                                        }
                                        return None;
                                    }
                                    Some((Wire::tls(s), info, watcher))
                                }
                                _ => None,
                            }
                        });
                        match tls.await {
                            Some(w) => w,
                            None => return,
                        }
                    }
                };
                let res = match crate::h1server::serve(
                    &h,
                    cfg,
                    Arc::new(wire),
                    info.clone(),
                    &mut conn_shutdown,
                )
                .await
                {
                    Outcome::Closed => Ok(()),
                    Outcome::Handoff(Wire::Plain(inner), prefix) => {
                        let io = Prefixed { prefix, inner };
                        Box::pin(serve_hyper(&h, &builder, io, info, watcher)).await
                    }
                    Outcome::Handoff(Wire::Tls(t), prefix) => {
                        let inner = t.into_inner().unwrap_or_else(PoisonError::into_inner);
                        let io = Prefixed { prefix, inner };
                        Box::pin(serve_hyper(&h, &builder, io, info, watcher)).await
                    }
                };
                if let Some(r) = hyper_refusal(cfg, &res) {
                    h.refused_by_hyper(r);
                }
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

/// Serve a connection with hyper (TLS with `h2`, h2c, a connection that asked for an upgrade)
/// until it closes; `watcher` lets graceful shutdown close it and wait for it.
async fn serve_hyper<H, I>(
    handler: &Arc<H>,
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    info: ConnInfo,
    watcher: Watcher,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    H: Handler,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let h = handler.clone();
    let info = Arc::new(info);
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let h = h.clone();
        let info = info.clone();
        // Boxed: hyper moves the service future, and the pipeline's is large.
        Box::pin(async move {
            let resp = h.handle(req.map(RequestBody::Hyper), &info, None).await;
            // hyper writes a map: deferred response headers go into it.
            let (mut parts, mut body) = resp.into_parts();
            if let Some(d) = body.take_deferred() {
                d.materialize(&mut parts.headers);
            }
            Ok::<_, Infallible>(hyper::Response::from_parts(parts, body))
        })
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    watcher.watch(conn).await
}
