//! An in-task HTTP/1.1 client for plain upstream connections.
//!
//! hyper's client drives each connection from its own task and hands requests and responses
//! across channels; for a proxy that costs two extra task wake-ups and several allocations per
//! request. Here the request's own task writes the request head and body straight to the socket
//! and reads the response head itself (parsed by `httparse`, hyper's parser); the response body
//! is read by whoever polls it — the downstream connection's task — and the connection goes
//! back to the pool when the body ends. TLS upstreams, HTTP/2 and upgrades keep using hyper.
//!
//! Framing follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304; chunked when
//! `Transfer-Encoding` ends in chunked; else `Content-Length`; else until the server closes
//! (then the connection is not reused).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::body::{BoxError, SendBody};
use crate::client::ExtraFields;
use crate::codec::{
    Decoded, Decoder, FieldAt, RawHead, F_CONNECTION, F_LENGTH, F_TRANSFER_ENCODING,
};
use crate::pool::Idle;

/// Largest response head accepted from an instance.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Bodies are read this much at a time (a response head is read through a per-thread scratch
/// buffer into an allocation of its own size: `codec::try_read_into`).
const READ_CHUNK: usize = 16 * 1024;
/// A request body's first piece up to this size is sent in the same write as the head.
const COALESCE: usize = 16 * 1024;

/// A plain HTTP/1.1 connection to an instance, idle between requests.
pub struct H1Conn {
    stream: TcpStream,
    buf: BytesMut,
}

/// Why a send on an in-task connection failed.
pub(crate) enum H1Error<B> {
    /// The request may have reached the instance; no (complete) response head came back.
    Io(std::io::Error),
    /// The instance answered something that is not HTTP/1.x.
    Protocol(&'static str),
    /// The request body failed (the client's side, or the route's size limit).
    Body(BoxError),
    /// Nothing reached the instance (a pooled connection it had closed): the request may be
    /// sent again, with this body.
    Unsent(Box<B>, std::io::Error),
}

impl<B> std::fmt::Debug for H1Error<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H1Error::Io(e) => write!(f, "connection error: {e}"),
            H1Error::Protocol(m) => write!(f, "invalid response: {m}"),
            H1Error::Body(e) => write!(f, "request body: {e}"),
            H1Error::Unsent(_, e) => {
                write!(f, "connection closed before the request was sent: {e}")
            }
        }
    }
}

fn eof() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "closed before a complete response",
    )
}

impl H1Conn {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Forget the socket's cached readability (no syscall), so that any later readiness means
    /// the instance sent something or closed while the connection was idle.
    pub fn mark_idle(&mut self) {
        // An idle connection keeps no buffer (1000 idle connections would hold megabytes); the
        // next response head gets a fresh one.
        if self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
        let _ = self.stream.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
    }

    /// Is this idle connection still usable? Without a syscall when nothing happened on it since
    /// it went idle; otherwise a one-byte read decides (closed, or unexpected bytes: no).
    pub fn is_reusable(&self) -> bool {
        // `try_io` looks at the cached readiness (a plain load) and reads only if an event
        // came; `poll_read_ready` would take the socket's waiter lock to park a waker.
        let mut probe = [0u8; 1];
        match crate::sys::try_recv(&self.stream, &mut probe) {
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            Ok(_) => false,
        }
    }

    /// Send one request and read the response head. `home` gets the connection back when the
    /// response body has been read to its end. `extra` fields are written after the map's.
    ///
    /// An `async move` block rather than an `async fn`: the arguments then live in the future
    /// once, not twice.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn send<'a, B: SendBody, X: ExtraFields + Sync>(
        mut self,
        method: &'a Method,
        target: &'a str,
        headers: &'a HeaderMap,
        extra: Option<&'a X>,
        mut body: B,
        home: Arc<Idle<H1Conn>>,
    ) -> impl std::future::Future<Output = Result<Response<H1Body>, H1Error<B>>> + Send + 'a {
        async move {
            // Request head.
            let mut head = Vec::with_capacity(256 + headers.len() * 48);
            head.extend_from_slice(method.as_str().as_bytes());
            head.push(b' ');
            head.extend_from_slice(target.as_bytes());
            head.extend_from_slice(b" HTTP/1.1\r\n");
            let mut field = |k: &HeaderName, v: &http::HeaderValue| {
                head.extend_from_slice(k.as_str().as_bytes());
                head.extend_from_slice(b": ");
                head.extend_from_slice(v.as_bytes());
                head.extend_from_slice(b"\r\n");
            };
            for (k, v) in headers {
                field(k, v);
            }
            if let Some(x) = extra {
                x.for_each(field);
            }
            let has_body = !body.is_end_stream();
            let chunked = has_body && !headers.contains_key(header::CONTENT_LENGTH);
            if chunked {
                head.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
            head.extend_from_slice(b"\r\n");
            // A first piece of the body that is already here goes out with the head.
            let mut first: Option<Bytes> = None;
            let mut body_done = !has_body;
            if has_body {
                let polled =
                    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx)))
                        .await;
                match polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(d) = frame.into_data() {
                            if d.len() <= COALESCE {
                                if chunked && !d.is_empty() {
                                    head.extend_from_slice(format!("{:x}\r\n", d.len()).as_bytes());
                                    head.extend_from_slice(&d);
                                    head.extend_from_slice(b"\r\n");
                                } else {
                                    head.extend_from_slice(&d);
                                }
                                first = Some(d);
                            } else {
                                body.unread(d);
                            }
                        }
                        if first.is_some() && body.is_end_stream() {
                            if chunked {
                                head.extend_from_slice(b"0\r\n\r\n");
                            }
                            body_done = true;
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return Err(H1Error::Body(e)),
                    Poll::Ready(None) => {
                        if chunked {
                            head.extend_from_slice(b"0\r\n\r\n");
                        }
                        body_done = true;
                    }
                    Poll::Pending => {}
                }
            }
            // One write, usually all of it. One that fails before anything went found a pooled
            // connection the instance had closed: the request may go again, body included.
            let sent = match self.stream.write(&head).await {
                Ok(0) => return Err(H1Error::Io(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => n,
                Err(e) => {
                    if let Some(d) = first {
                        body.unread(d);
                    }
                    return Err(H1Error::Unsent(Box::new(body), e));
                }
            };
            if sent < head.len() || !body_done {
                // Boxed: what did not fit in the first write is the rare case.
                let body = (!body_done).then_some(body);
                let early = Box::pin(self.write_rest(&head[sent..], body, chunked)).await?;
                if let Some((status, version, resp_headers)) = early {
                    // Answered before the whole request went: the connection is not reused.
                    let r = self.response(method, status, version, resp_headers, home, false);
                    return Ok(r);
                }
            }
            // Response head (skipping 1xx interim responses).
            loop {
                let parsed = read_head(&mut self.buf).map_err(H1Error::Protocol)?;
                match parsed {
                    Some((status, version, resp_headers)) => {
                        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                            continue;
                        }
                        let r = self.response(method, status, version, resp_headers, home, true);
                        return Ok(r);
                    }
                    None => {
                        if self.buf.len() > MAX_HEAD {
                            return Err(H1Error::Protocol("response head too large"));
                        }
                        match self.read_buf_once().await {
                            Ok(0) => return Err(H1Error::Io(eof())),
                            Ok(_) => {}
                            Err(e) => return Err(H1Error::Io(e)),
                        }
                    }
                }
            }
        }
    }

    /// Send the rest of the request: `head` (what the first write left of the head and the
    /// body's first piece), then the body. An instance may answer before it has read all of it
    /// (a 413, a 401) and then stop reading or close: a final response head that arrives
    /// meanwhile ends the sending and is returned, and so is one already received when a
    /// write fails (as Envoy and hyper do; otherwise the client would get a 502 for the
    /// instance's answer). The rest of the body is not sent then.
    async fn write_rest<B: SendBody>(
        &mut self,
        head: &[u8],
        body: Option<B>,
        chunked: bool,
    ) -> Result<Option<Head>, H1Error<B>> {
        let H1Conn { stream, buf } = self;
        let stream = &*stream;
        let send = send_rest(stream, head, body, chunked);
        tokio::pin!(send);
        loop {
            tokio::select! {
                biased;
                r = &mut send => {
                    return match r {
                        Ok(()) => Ok(None),
                        Err(H1Error::Io(e)) => {
                            // Whatever the instance said before the failure is still readable.
                            read_to_close(stream, buf).await;
                            final_head(buf)
                                .map_err(H1Error::Protocol)?
                                .map(Some)
                                .ok_or(H1Error::Io(e))
                        }
                        Err(e) => Err(e),
                    };
                }
                r = read_once(stream, buf) => match r {
                    Ok(0) => {
                        return final_head(buf)
                            .map_err(H1Error::Protocol)?
                            .map(Some)
                            .ok_or(H1Error::Io(eof()))
                    }
                    Ok(_) => {
                        if let Some(h) = final_head(buf).map_err(H1Error::Protocol)? {
                            return Ok(Some(h));
                        }
                        if buf.len() > MAX_HEAD {
                            return Err(H1Error::Protocol("response head too large"));
                        }
                    }
                    Err(e) => {
                        return final_head(buf)
                            .map_err(H1Error::Protocol)?
                            .map(Some)
                            .ok_or(H1Error::Io(e))
                    }
                },
            }
        }
    }

    fn response(
        self,
        method: &Method,
        status: StatusCode,
        version: Version,
        mut raw: Box<RawHead>,
        home: Arc<Idle<H1Conn>>,
        reusable: bool,
    ) -> Response<H1Body> {
        let no_body = *method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        // What framing needs, from the fields picked out by name when the head was parsed.
        let mut has_te = false;
        let mut te_chunked = false;
        let mut length: Option<u64> = None;
        let mut lengths_differ = false;
        let mut close = false;
        let mut keep = false;
        let mut names_others = false;
        for f in raw.fields() {
            let v = f.value_bytes(raw.bytes());
            if f.kind & F_TRANSFER_ENCODING != 0 {
                // The last coding of the last line decides.
                has_te = true;
                te_chunked = v
                    .rsplit(|c| *c == b',')
                    .next()
                    .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if f.kind & F_LENGTH != 0 {
                let n = std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok());
                match length {
                    None => length = n,
                    Some(l) => lengths_differ |= n != Some(l),
                }
            } else if f.kind & F_CONNECTION != 0 {
                for t in v.split(|c| *c == b',') {
                    let t = t.trim_ascii();
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        keep = true;
                    } else if !t.is_empty() {
                        names_others = true;
                    }
                }
            }
        }
        raw.needs_map = names_others;
        // A 101 switched the connection to another protocol: it is never reused as HTTP.
        let mut keep_alive = reusable
            && status != StatusCode::SWITCHING_PROTOCOLS
            && match version {
                Version::HTTP_10 => keep,
                _ => !close,
            };
        let framing = if no_body {
            Decoder::done()
        } else if te_chunked {
            Decoder::chunked()
        } else if let (Some(n), false, false) = (length, has_te, lengths_differ) {
            Decoder::length(n)
        } else {
            // No length, or a coding we cannot frame: read to the end, never reuse.
            keep_alive = false;
            Decoder::close()
        };
        let mut body = H1Body {
            conn: Some(self),
            decoder: framing,
            keep_alive,
            home: Some(home),
            head: Some(raw),
        };
        if body.decoder.is_done() {
            body.finish();
        }
        let mut r = Response::new(body);
        *r.status_mut() = status;
        *r.version_mut() = version;
        r
    }
}

/// A response head: status, version and the fields as received.
type Head = (StatusCode, Version, Box<RawHead>);

/// Parse a complete head from the buffer, if there is one, and split it off (fields keep
/// pointing into its bytes).
fn read_head(buf: &mut BytesMut) -> Result<Option<Head>, &'static str> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let n = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed response head"),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("bad status code")?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Boxed: it is moved several times on its way to the client's connection.
    let mut raw = Box::new(RawHead::new());
    for h in resp.headers.iter() {
        raw.push(FieldAt::of(buf, h));
    }
    raw.set_bytes(crate::codec::take_front(buf, n));
    Ok(Some((status, version, raw)))
}

/// The first final (not 1xx, 101 included) head in the buffer, skipping interim responses.
pub(crate) fn final_head(buf: &mut BytesMut) -> Result<Option<Head>, &'static str> {
    while let Some(h) = read_head(buf)? {
        if !h.0.is_informational() || h.0 == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Some(h));
        }
    }
    Ok(None)
}

/// After a write failed (the instance closed or reset the connection), read what it sent
/// before that: a closed socket is readable at once; bounded in time and size all the same.
async fn read_to_close(stream: &TcpStream, buf: &mut BytesMut) {
    let limit = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while buf.len() <= MAX_HEAD {
        match tokio::time::timeout_at(limit, read_once(stream, buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

/// One read into `buf`, waiting for the socket to be readable.
async fn read_once(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    loop {
        std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await?;
        match crate::codec::try_read_into(stream, buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Write the rest of a request head, then its body (if any), chunk-framed if `chunked`.
async fn send_rest<B: SendBody>(
    stream: &TcpStream,
    head: &[u8],
    body: Option<B>,
    chunked: bool,
) -> Result<(), H1Error<B>> {
    use crate::codec::write_all;
    write_all(stream, head).await.map_err(H1Error::Io)?;
    let Some(mut body) = body else {
        return Ok(());
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(H1Error::Body)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            let size = format!("{:x}\r\n", data.len());
            write_all(stream, size.as_bytes())
                .await
                .map_err(H1Error::Io)?;
            write_all(stream, &data).await.map_err(H1Error::Io)?;
            write_all(stream, b"\r\n").await.map_err(H1Error::Io)?;
        } else {
            write_all(stream, &data).await.map_err(H1Error::Io)?;
        }
    }
    if chunked {
        write_all(stream, b"0\r\n\r\n").await.map_err(H1Error::Io)?;
    }
    Ok(())
}

impl H1Conn {
    /// One read into the buffer.
    async fn read_buf_once(&mut self) -> std::io::Result<usize> {
        read_once(&self.stream, &mut self.buf).await
    }
}

/// A response body read straight from the instance's connection. It also carries the response's
/// head (the `Response` it came in has an empty map), for the caller to take.
pub struct H1Body {
    conn: Option<H1Conn>,
    decoder: Decoder,
    keep_alive: bool,
    /// Where the connection goes back to when the body is read to its end.
    home: Option<Arc<Idle<H1Conn>>>,
    head: Option<Box<RawHead>>,
}

impl H1Body {
    /// The response's head as the instance sent it.
    pub fn take_head(&mut self) -> Option<Box<RawHead>> {
        self.head.take()
    }

    /// The body ended: the connection goes back to the pool if it can serve another request.
    fn finish(&mut self) {
        if let (Some(conn), Some(home)) = (self.conn.take(), self.home.take()) {
            if self.keep_alive && conn.buf.is_empty() {
                let mut conn = conn;
                conn.mark_idle();
                home.put(conn);
            }
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        conn.buf.reserve(READ_CHUNK);
        loop {
            ready!(conn.stream.poll_read_ready(cx))?;
            match crate::codec::try_read_buf(&conn.stream, &mut conn.buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn fail(&mut self, e: std::io::Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.decoder = Decoder::done();
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut eof = false;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.buf, eof) {
                Ok(Decoded::Data(d)) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Decoded::Trailers(t)) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Ok(Decoded::End) => {
                    if eof {
                        // The end of a close-delimited body: nothing to reuse.
                        this.conn = None;
                    }
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(m) => {
                    return this.fail(std::io::Error::new(std::io::ErrorKind::InvalidData, m))
                }
            }
            match ready!(this.poll_fill(cx)) {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::header::HeaderValue;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An empty request body.
    struct Nothing;

    impl Body for Nothing {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(None)
        }
        fn is_end_stream(&self) -> bool {
            true
        }
    }

    impl SendBody for Nothing {
        fn unread(&mut self, _: Bytes) {}
    }

    fn home() -> Arc<Idle<H1Conn>> {
        Arc::new(Idle::new(8, std::time::Duration::from_secs(60)))
    }

    /// A one-shot server: reads one request head, answers `reply` bytes, then stays open.
    async fn server(
        reply: &'static [u8],
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(reply).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            got
        });
        (addr, h)
    }

    async fn fetch(reply: &'static [u8], method: Method) -> (Response<H1Body>, Vec<u8>) {
        let (addr, h) = server(reply).await;
        let conn = H1Conn::new(TcpStream::connect(addr).await.unwrap());
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("x"));
        let resp = conn
            .send(&method, "/p?q=1", &headers, None::<&()>, Nothing, home())
            .await
            .unwrap();
        let (mut parts, mut body) = resp.into_parts();
        parts.headers = body.take_head().unwrap().to_map(0).unwrap();
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        let mut r = Response::from_parts(
            parts,
            H1Body {
                conn: None,
                decoder: Decoder::done(),
                keep_alive: false,
                home: None,
                head: None,
            },
        );
        if let Some(t) = trailers {
            r.headers_mut()
                .insert("x-test-trailer-count", HeaderValue::from(t.len()));
        }
        let sent = h.await.unwrap();
        let mut out = collected.to_bytes().to_vec();
        out.extend_from_slice(b"|");
        out.extend_from_slice(&sent);
        (r, out)
    }

    #[tokio::test]
    async fn idle_connections_are_checked_before_reuse() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let pause = || tokio::time::sleep(std::time::Duration::from_millis(50));

        // Nothing happened while idle: reusable, and still so after a look.
        let mut conn = H1Conn::new(TcpStream::connect(addr).await.unwrap());
        let (mut peer, _) = l.accept().await.unwrap();
        conn.mark_idle();
        pause().await;
        assert!(conn.is_reusable());
        assert!(conn.is_reusable());
        // Bytes nobody asked for: not reusable.
        peer.write_all(b"x").await.unwrap();
        pause().await;
        assert!(!conn.is_reusable());

        // The instance closed it while idle: not reusable.
        let mut conn = H1Conn::new(TcpStream::connect(addr).await.unwrap());
        let (peer, _) = l.accept().await.unwrap();
        conn.mark_idle();
        pause().await;
        assert!(conn.is_reusable());
        drop(peer);
        pause().await;
        assert!(!conn.is_reusable());
    }

    #[tokio::test]
    async fn content_length_body_and_request_head() {
        let (r, out) = fetch(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
            Method::GET,
        )
        .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-a"], "b");
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with("hello|GET /p?q=1 HTTP/1.1\r\nhost: x\r\n\r\n"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn chunked_body_with_extensions_and_trailers() {
        let (r, out) = fetch(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
            Method::GET,
        )
        .await;
        assert!(String::from_utf8(out).unwrap().starts_with("hello world|"));
        assert_eq!(r.headers()["x-test-trailer-count"], "1");
    }

    #[tokio::test]
    async fn interim_responses_and_bodiless_statuses() {
        let (r, out) = fetch(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            Method::GET,
        )
        .await;
        assert_eq!(r.status(), 204);
        assert!(out.starts_with(b"|"));
        let (r, out) = fetch(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
            Method::HEAD,
        )
        .await;
        assert_eq!(r.status(), 200);
        assert!(out.starts_with(b"|"));
    }

    #[tokio::test]
    async fn malformed_heads_are_errors() {
        let (addr, _h) = server(b"NOT HTTP\r\n\r\n").await;
        let conn = H1Conn::new(TcpStream::connect(addr).await.unwrap());
        let r = conn
            .send(
                &Method::GET,
                "/",
                &HeaderMap::new(),
                None::<&()>,
                Nothing,
                home(),
            )
            .await;
        assert!(matches!(r, Err(H1Error::Protocol(_))));
    }
}
