//! The client connection the in-task HTTP/1.1 server speaks on: a plain TCP socket, or TLS
//! (rustls) over one. The connection's task and the request body being read from it
//! (`h1server::OwnBody`, possibly polled by another task) share it by reference, so every
//! operation takes `&self`: a plain socket needs no lock (tokio's readiness slots serve each
//! direction), a TLS session has a `Mutex` that is held only inside one poll, never across an
//! await, and is uncontended but for a response written while its request body is still read.

use std::io;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::codec;

pub(crate) type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

pub(crate) enum Wire {
    Plain(TcpStream),
    /// Boxed: a TLS session is about a kilobyte, and plain connections should not carry that.
    Tls(Box<Mutex<TlsStream>>),
}

fn lock(t: &Mutex<TlsStream>) -> MutexGuard<'_, TlsStream> {
    t.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Wire {
    pub fn tls(s: TlsStream) -> Self {
        Wire::Tls(Box::new(Mutex::new(s)))
    }

    /// Read what is there into `buf` (appended; an empty `buf` gets an allocation of exactly
    /// the bytes read, see `codec::try_read_into`). `Ok(0)`: the client closed.
    pub fn poll_read_head(
        &self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        self.poll_read(cx, buf, codec::try_read_into)
    }

    /// Read what is there into `buf`'s spare capacity (which the caller made room for).
    pub fn poll_read_buf(
        &self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        self.poll_read(cx, buf, codec::try_read_buf)
    }

    /// A plain socket: wait for readiness, then `read` (which forgets readiness on `WouldBlock`
    /// or a short read); TLS: through the session.
    fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        read: fn(&TcpStream, &mut BytesMut) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        match self {
            Wire::Plain(s) => loop {
                ready!(s.poll_read_ready(cx))?;
                match read(s, buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => return Poll::Ready(r),
                }
            },
            Wire::Tls(t) => tls_read(&mut lock(t), cx, buf),
        }
    }

    /// Write `buf[*sent..]`, advancing `sent`; ready when all of it is out (flushed, for TLS).
    pub fn poll_write_all(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        sent: &mut usize,
    ) -> Poll<io::Result<()>> {
        match self {
            Wire::Plain(s) => {
                while *sent < buf.len() {
                    ready!(s.poll_write_ready(cx))?;
                    match crate::sys::try_send(s, &buf[*sent..]) {
                        Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        Ok(n) => *sent += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                Poll::Ready(Ok(()))
            }
            Wire::Tls(t) => {
                let mut rest = [&buf[*sent..]];
                let r = poll_tls_write(t, cx, &mut rest);
                *sent = buf.len() - rest[0].len();
                r
            }
        }
    }

    /// Write all of `buf`.
    pub async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Wire::Plain(s) => codec::write_all(s, buf).await,
            Wire::Tls(_) => {
                let mut sent = 0;
                std::future::poll_fn(|cx| self.poll_write_all(cx, buf, &mut sent)).await
            }
        }
    }

    /// Write `a` then `b` (one `writev` on a plain socket, usually; one TLS flush).
    pub async fn write_all2(&self, a: &[u8], b: &[u8]) -> io::Result<()> {
        match self {
            Wire::Plain(s) => codec::write_all2(s, a, b).await,
            Wire::Tls(t) => {
                let mut parts = [a, b];
                std::future::poll_fn(|cx| poll_tls_write(t, cx, &mut parts)).await
            }
        }
    }

    /// Close the sending side (TLS: `close_notify` first); reads still work.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self {
            Wire::Plain(s) => s.shutdown().await,
            Wire::Tls(t) => {
                let s = t.get_mut().unwrap_or_else(PoisonError::into_inner);
                s.shutdown().await
            }
        }
    }
}

/// Write `parts` in order into the TLS session (each advanced past what went), then flush it.
fn poll_tls_write(
    t: &Mutex<TlsStream>,
    cx: &mut Context<'_>,
    parts: &mut [&[u8]],
) -> Poll<io::Result<()>> {
    let mut g = lock(t);
    let mut s = Pin::new(&mut *g);
    for part in parts.iter_mut() {
        while !part.is_empty() {
            match ready!(s.as_mut().poll_write(cx, part))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => *part = &part[n..],
            }
        }
    }
    s.poll_flush(cx)
}

/// One read of decrypted bytes, through the per-thread scratch buffer (no uninitialized
/// memory, no unsafe), appended to `buf`.
fn tls_read(
    s: &mut TlsStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    codec::with_scratch(|scratch| {
        let mut rb = ReadBuf::new(scratch);
        ready!(Pin::new(s).poll_read(cx, &mut rb))?;
        let got = rb.filled();
        buf.extend_from_slice(got);
        Poll::Ready(Ok(got.len()))
    })
}
