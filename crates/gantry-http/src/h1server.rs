//! The in-task HTTP/1.1 server for client connections, plain or TLS (`wire.rs`): the
//! connection's own task reads and parses each request head (`httparse`), runs the proxy
//! pipeline, and writes the response itself, with no dispatcher, channels or per-connection
//! buffers beyond the bytes of the request in hand.
//!
//! What it does not serve itself it hands to hyper, with the bytes read so far: a connection that
//! opens with the HTTP/2 preface (h2c by prior knowledge), and an upgrade request (WebSocket) or
//! `CONNECT`, from which point hyper serves the rest of that connection. TLS connections that
//! chose HTTP/2 by ALPN are hyper's from the start.
//!
//! Framing rules (RFC 9112): a request with both `Content-Length` and `Transfer-Encoding`, several
//! `Content-Length` lines, a malformed length, a transfer coding other than `chunked`, obs-fold,
//! an HTTP/1.1 request without exactly one `Host`: all refused with a JSON 400 and the connection
//! closed, so nothing after them can be read as another request. Request bodies are read by
//! whoever polls them (the upstream request), straight from the socket; when the body is done the
//! bytes after it come back to the connection for the next request. A body the proxy did not read
//! (a 404, a 429, a cache hit) is drained, within bounds, to keep the connection.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::body::{BoxError, ClientBodyError, RequestBody, ResponseBody};
use crate::codec::{self, Decoded, Decoder, FieldAt};
use crate::nudge::{poll_deadline, Nudge};
use crate::wire::Wire;
use crate::{ConnInfo, Handler, Refusal, ServerConfig};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Read size for request bodies.
const BODY_CHUNK: usize = 16 * 1024;
/// Response bodies up to this size are copied behind the head and sent in one write.
const COALESCE: usize = 32 * 1024;
/// An unread request body is drained (and discarded) up to this size to keep the connection.
const MAX_DRAIN: usize = 256 * 1024;
/// Header slots on the stack; more (up to `max_headers`) go on the heap.
const STACK_HEADERS: usize = 128;

/// How a connection ended.
pub(crate) enum Outcome {
    Closed,
    /// Hyper takes over: the stream and the bytes already read from it.
    Handoff(Wire, Bytes),
}

/// What the head says about the rest of the exchange.
pub(crate) struct Meta {
    version: Version,
    head_request: bool,
    keep_alive: bool,
    /// The client accepts trailers (`TE: trailers`).
    te_trailers: bool,
}

/// A short-lived local, returned once per request: boxing it would cost an allocation for
/// nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Parsed {
    Request(Request<()>, Meta, BodyFraming),
    /// An upgrade or CONNECT: hyper serves it (and the rest of the connection).
    Handoff,
}

#[derive(Clone, Copy)]
pub(crate) enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// Why a head was refused.
pub(crate) enum HeadError {
    Malformed(&'static str),
    TooLarge,
    Timeout,
}

/// Serve one connection until it closes or is handed to hyper.
///
/// The connection's future is what an open connection costs: the steps whose state is large
/// and rare (refusing a head, lingering before a close) are boxed or keep their buffers on the
/// heap, and each request's head and parse results are scoped so that they are not kept while
/// the request is proxied.
pub(crate) async fn serve<H: Handler>(
    h: &Arc<H>,
    cfg: &ServerConfig,
    stream: Arc<Wire>,
    info: ConnInfo,
    shutdown: &mut watch::Receiver<bool>,
) -> Outcome {
    let timeout = cfg.header_read_timeout;
    let mut deadline = Instant::now() + timeout;
    let sleep = tokio::time::sleep_until(deadline);
    tokio::pin!(sleep);
    // Deadlines of the requests' upstream attempts (lent to the handler: `timer.rs`).
    let attempts = tokio::time::sleep_until(deadline);
    tokio::pin!(attempts);
    // Background futures (see `nudge.rs`): the head deadline and shutdown; the attempt deadline.
    let waits = Nudge::here().await;
    let attempt_waits = Nudge::here().await;
    // Shutdown, waited for by one future for the connection's life: it registers with the
    // channel once, not once per wait between requests.
    let mut shut_rx = shutdown.clone();
    let shut = async move {
        let _ = shut_rx.wait_for(|v| *v).await;
    };
    tokio::pin!(shut);
    let mut buf = BytesMut::new();
    let mut first = true;
    loop {
        // A complete request head.
        let head = 'head: loop {
            if !buf.is_empty() {
                if first && is_h2_preface(&buf) {
                    if buf.len() >= H2_PREFACE.len() {
                        return handoff(stream, buf);
                    }
                } else {
                    match parse(&mut buf, cfg.max_headers) {
                        Ok(Some(p)) => break 'head Ok(p),
                        Ok(None) if buf.len() > cfg.max_header_bytes => {
                            break 'head Err(HeadError::TooLarge)
                        }
                        Ok(None) => {}
                        Err(e) => break 'head Err(e),
                    }
                }
            }
            let idle = buf.is_empty();
            match read_more(
                &stream,
                &mut buf,
                sleep.as_mut(),
                deadline,
                shutdown,
                shut.as_mut(),
                idle,
                &waits,
            )
            .await
            {
                Wait::Data => {}
                Wait::Timeout => {
                    // A head begun and not finished (slowloris) gets a 408; an idle
                    // keep-alive connection is just closed.
                    if !buf.is_empty() {
                        Box::pin(refuse(&**h, cfg, &stream, &info, HeadError::Timeout)).await;
                    }
                    return Outcome::Closed;
                }
                Wait::Closed => return Outcome::Closed,
            }
        };
        first = false;
        // The request, its body reading from the socket (it gives the rest of the buffer
        // back); the parsed head is not kept across the proxying.
        let (req, mut meta, slot) = match head {
            Err(e) => {
                Box::pin(refuse(&**h, cfg, &stream, &info, e)).await;
                linger(stream).await;
                return Outcome::Closed;
            }
            Ok(Parsed::Handoff) => return handoff(stream, buf),
            Ok(Parsed::Request(req, meta, framing)) => {
                let (body, slot) = match framing {
                    BodyFraming::None => (RequestBody::Empty, None),
                    BodyFraming::Length(n) => own_body(&stream, &mut buf, Decoder::length(n), &req),
                    BodyFraming::Chunked => own_body(&stream, &mut buf, Decoder::chunked(), &req),
                };
                (req.map(|()| body), meta, slot)
            }
        };
        let timer = crate::timer::ConnTimer {
            sleep: attempts.as_mut(),
            waits: Some(&attempt_waits),
        };
        let resp = h.handle(req, &info, Some(timer)).await;
        if shutting_down(shutdown) {
            meta.keep_alive = false;
        }
        // One clock read for the response's `Date` and the next head's deadline.
        let now = Instant::now();
        let mut keep = write_response(&stream, resp, &meta, now.into_std()).await;

        // Take the buffer back from the body (or drain what the proxy did not read).
        let mut unread_body = false;
        if let Some(slot) = slot {
            let returned = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            match returned {
                Some(r) if keep => {
                    buf = r.buf;
                    if !r.decoder.is_done() {
                        keep = drain(&stream, &mut buf, r.decoder, timeout).await;
                        unread_body = !keep;
                    }
                }
                Some(r) => unread_body = !r.decoder.is_done(),
                None => {
                    unread_body = true;
                    keep = false;
                }
            }
        }
        if !keep {
            if unread_body || !buf.is_empty() {
                // The client may still be sending: closing now could reset the connection and
                // take the response with it.
                linger(stream).await;
            }
            return Outcome::Closed;
        }
        if buf.is_empty() {
            // An idle connection holds no buffer.
            buf = BytesMut::new();
        }
        deadline = now + timeout;
    }
}

/// Has shutdown begun? The channel's version is read first (a plain atomic load); the value is
/// read, under the channel's lock (two atomic read-modify-writes), only once the version moved
/// past what this receiver saw when it was cloned at accept, or the channel closed. (A
/// connection accepted after shutdown began has seen that version: its idle wait's shutdown
/// future, which looks at the value first, closes it.)
fn shutting_down(rx: &watch::Receiver<bool>) -> bool {
    match rx.has_changed() {
        Ok(false) => false,
        _ => *rx.borrow(),
    }
}

fn is_h2_preface(buf: &[u8]) -> bool {
    let n = buf.len().min(H2_PREFACE.len());
    buf[..n] == H2_PREFACE[..n]
}

fn handoff(stream: Arc<Wire>, buf: BytesMut) -> Outcome {
    match Arc::try_unwrap(stream) {
        Ok(s) => Outcome::Handoff(s, buf.freeze()),
        // A body of an earlier request is still held somewhere: give up the connection.
        Err(_) => Outcome::Closed,
    }
}

enum Wait {
    Data,
    Timeout,
    Closed,
}

/// Read more bytes of a request head, within the deadline; between requests (`idle`) a
/// shutdown closes the connection instead. The deadline timer and the shutdown future are the
/// connection's background futures (`waits`): polled only after one of them woke the task.
#[allow(clippy::too_many_arguments)]
async fn read_more(
    stream: &Wire,
    buf: &mut BytesMut,
    mut sleep: Pin<&mut tokio::time::Sleep>,
    deadline: Instant,
    shutting: &watch::Receiver<bool>,
    mut shutdown: Pin<&mut impl std::future::Future<Output = ()>>,
    idle: bool,
    waits: &Nudge,
) -> Wait {
    // Between requests, shutdown wins over a new request.
    if idle && shutting_down(shutting) {
        return Wait::Closed;
    }
    std::future::poll_fn(|cx| {
        // A plain socket's readiness slot, not a `readable()` future: no waiter queued and
        // removed per wait (nothing else waits on this connection's reads meanwhile).
        match stream.poll_read_head(cx, buf) {
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Wait::Closed),
            Poll::Ready(Ok(_)) => return Poll::Ready(Wait::Data),
            Poll::Pending => {}
        }
        // Both background futures are polled only between requests: in a head, the flag stays
        // up for the shutdown future's sake, and the timer alone is polled.
        let Some(w) = waits.due(cx, idle) else {
            return Poll::Pending;
        };
        let mut bcx = Context::from_waker(w);
        // The timer is re-armed lazily: it may hold an earlier request's deadline.
        if poll_deadline(sleep.as_mut(), deadline, &mut bcx).is_ready() {
            return Poll::Ready(Wait::Timeout);
        }
        // Done once shutdown began; not polled again (the connection closes).
        if idle && shutdown.as_mut().poll(&mut bcx).is_ready() {
            return Poll::Ready(Wait::Closed);
        }
        Poll::Pending
    })
    .await
}

/// Parse a request head from the front of `buf`. `Ok(None)`: incomplete. A complete head is
/// split off the buffer (its header values share those bytes), except for a hand-off, which
/// leaves the buffer as it was.
pub(crate) fn parse(buf: &mut BytesMut, max_headers: usize) -> Result<Option<Parsed>, HeadError> {
    let mut stack = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut heap;
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= STACK_HEADERS {
        &mut stack[..max_headers]
    } else {
        heap = vec![MaybeUninit::uninit(); max_headers];
        &mut heap
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => {
            return Err(HeadError::Malformed(
                "malformed request line, or an HTTP version other than 1.0 and 1.1",
            ))
        }
        Err(httparse::Error::HeaderName | httparse::Error::HeaderValue) => {
            return Err(HeadError::Malformed(
                "malformed header line (obs-fold and control bytes are refused)",
            ))
        }
        Err(_) => return Err(HeadError::Malformed("malformed request line")),
    };
    let method_s = req.method.unwrap_or("");
    let target = req.path.unwrap_or("");
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let method = Method::from_bytes(method_s.as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    if method == Method::CONNECT {
        return Ok(Some(Parsed::Handoff));
    }
    let target_at = (
        target.as_ptr() as usize - buf.as_ptr() as usize,
        target.len(),
    );
    // Where every name and value sits, so the head can be split off before the map is built;
    // and the framing rules, checked on the raw fields before anything else (a WebSocket
    // upgrade handed to hyper included).
    let n = req.headers.len();
    let mut fields_stack = [FieldAt::default(); STACK_HEADERS];
    let mut fields_heap;
    let fields: &mut [FieldAt] = if n <= STACK_HEADERS {
        &mut fields_stack[..n]
    } else {
        fields_heap = vec![FieldAt::default(); n];
        &mut fields_heap
    };
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut hosts = 0;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut conn_upgrade = false;
    let mut websocket = false;
    let mut upgrades = 0u8;
    let mut te_trailers = false;
    const FRAMING: u8 = codec::F_LENGTH
        | codec::F_TRANSFER_ENCODING
        | codec::F_CONNECTION
        | codec::F_HOST
        | codec::F_UPGRADE
        | codec::F_TE;
    for (f, h) in fields.iter_mut().zip(req.headers.iter()) {
        *f = FieldAt::of(buf, h);
        if f.kind & FRAMING == 0 {
            continue;
        }
        let v = h.value;
        if f.kind & codec::F_LENGTH != 0 {
            if content_length.is_some() {
                return Err(HeadError::Malformed("several Content-Length headers"));
            }
            if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
                return Err(HeadError::Malformed("invalid Content-Length"));
            }
            content_length = Some(v.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0')));
        } else if f.kind & codec::F_TRANSFER_ENCODING != 0 {
            // Only `chunked`, once: anything else could be framed differently by the instance.
            if chunked || !v.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::Malformed(
                    "unsupported Transfer-Encoding (only a single chunked is accepted)",
                ));
            }
            chunked = true;
        } else if f.kind & codec::F_HOST != 0 {
            hosts += 1;
        } else if f.kind & codec::F_CONNECTION != 0 {
            for t in v.split(|c| *c == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    conn_close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    conn_keep_alive = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    conn_upgrade = true;
                }
            }
        } else if f.kind & codec::F_UPGRADE != 0 {
            // One `Upgrade` line: with several, this server and the pipeline could disagree
            // on whether the request is an upgrade (a desync for a proxy in front).
            if upgrades > 0 {
                return Err(HeadError::Malformed("several Upgrade headers"));
            }
            upgrades += 1;
            websocket = v.trim_ascii().eq_ignore_ascii_case(b"websocket");
        } else if f.kind & codec::F_TE != 0 {
            te_trailers |= v
                .split(|c| *c == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
        }
    }
    if chunked && content_length.is_some() {
        return Err(HeadError::Malformed(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if chunked && version == Version::HTTP_10 {
        return Err(HeadError::Malformed(
            "Transfer-Encoding in an HTTP/1.0 request",
        ));
    }
    if hosts > 1 {
        return Err(HeadError::Malformed("several Host headers"));
    }
    // Origin form (`/path`) and `*` carry no authority; the absolute form does.
    let has_authority = !target.starts_with('/') && target != "*";
    if hosts == 0 && version == Version::HTTP_11 && !has_authority {
        return Err(HeadError::Malformed("HTTP/1.1 request without Host"));
    }
    // A WebSocket upgrade (RFC 6455: HTTP/1.1, `Upgrade: websocket`, `Connection: upgrade`)
    // is hyper's, head and all. Any other `Upgrade` (`h2c`, RFC 9113 §3.1 no longer has it) is
    // a hop-by-hop header the request is served without.
    if websocket && conn_upgrade && version == Version::HTTP_11 {
        return Ok(Some(Parsed::Handoff));
    }
    // The target and the values are copied out of the buffer, which stays the connection's
    // own: sharing it (`split_to` + `freeze`) would put a reference count on it that every value
    // increments and decrements, an atomic operation each on memory gone cold by the time the
    // request ends. A small allocation is cheaper, and the buffer is reused as it is.
    let head = &buf[..len];
    let target = &head[target_at.0..target_at.0 + target_at.1];
    let uri = if target == b"/" {
        Uri::from_static("/")
    } else {
        Uri::try_from(target).map_err(|_| HeadError::Malformed("invalid request target"))?
    };
    // Room for the headers the proxy adds (trace context, forwarding, request id).
    let mut headers = codec::take_map(n + 8);
    for f in fields.iter() {
        let name = HeaderName::from_bytes(f.name(head))
            .map_err(|_| HeadError::Malformed("invalid header name"))?;
        let value = HeaderValue::from_bytes(f.value_bytes(head))
            .map_err(|_| HeadError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    buf.advance(len);
    let framing = if chunked {
        BodyFraming::Chunked
    } else {
        match content_length {
            None | Some(0) => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
        }
    };
    let meta = Meta {
        version,
        head_request: method == Method::HEAD,
        keep_alive: if version == Version::HTTP_10 {
            conn_keep_alive && !conn_close
        } else {
            !conn_close
        },
        te_trailers,
    };
    let mut r = Request::new(());
    *r.method_mut() = method;
    *r.uri_mut() = uri;
    *r.version_mut() = version;
    *r.headers_mut() = headers;
    Ok(Some(Parsed::Request(r, meta, framing)))
}

/// Answer a head that could not be accepted, then the connection closes.
async fn refuse<H: Handler>(
    h: &H,
    cfg: &ServerConfig,
    stream: &Wire,
    info: &ConnInfo,
    e: HeadError,
) {
    let why = match e {
        HeadError::Malformed(m) => Refusal::Malformed(m),
        HeadError::TooLarge => Refusal::HeadTooLarge {
            max_header_bytes: cfg.max_header_bytes,
            max_headers: cfg.max_headers,
        },
        HeadError::Timeout => Refusal::HeadTimeout {
            after_ms: cfg.header_read_timeout.as_millis() as u64,
        },
    };
    let resp = h.refuse(why, info);
    let meta = Meta {
        version: Version::HTTP_11,
        head_request: false,
        keep_alive: false,
        te_trailers: false,
    };
    write_response(stream, resp, &meta, std::time::Instant::now()).await;
}

/// Close after a response while the client may still be sending (a refused head, an unread
/// body, an instance that answered before reading the whole upload): half-close first, so the
/// response is delivered, and read and discard what still comes, for a bounded time and size,
/// before closing (a close with unread bytes would reset the connection, and a client still
/// sending could lose the response). nginx's `lingering_close` does the same.
async fn linger(stream: Arc<Wire>) {
    // A body still held elsewhere keeps the socket: nothing to do here.
    let Ok(mut s) = Arc::try_unwrap(stream) else {
        return;
    };
    if s.shutdown().await.is_err() {
        return;
    }
    let end = Instant::now() + LINGER_TIME;
    // On the heap: the connection's future would otherwise carry it for its whole life.
    let mut sink = BytesMut::with_capacity(BODY_CHUNK);
    let mut discarded = 0usize;
    while discarded <= LINGER_MAX_BYTES {
        sink.clear();
        let read = std::future::poll_fn(|cx| s.poll_read_buf(cx, &mut sink));
        let deadline = end.min(Instant::now() + LINGER_GAP);
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => discarded += n,
        }
    }
}

/// A closing connection reads what the client still sends for at most this long in all...
const LINGER_TIME: Duration = Duration::from_secs(10);
/// ...stops after this long without a byte (nginx: `lingering_time` 30 s,
/// `lingering_timeout` 5 s)...
const LINGER_GAP: Duration = Duration::from_secs(2);
/// ...and after this many bytes.
const LINGER_MAX_BYTES: usize = 64 << 20;

/// The part of a request body's state that goes back to the connection.
struct Returned {
    buf: BytesMut,
    decoder: Decoder,
}

type Slot = Arc<Mutex<Option<Returned>>>;

fn own_body(
    stream: &Arc<Wire>,
    buf: &mut BytesMut,
    decoder: Decoder,
    req: &Request<()>,
) -> (RequestBody, Option<Slot>) {
    let slot: Slot = Arc::new(Mutex::new(None));
    let expect_continue = req.version() == Version::HTTP_11
        && req
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let body = OwnBody {
        stream: stream.clone(),
        buf: std::mem::take(buf),
        decoder,
        slot: Some(slot.clone()),
        continue_sent: if expect_continue { Some(0) } else { None },
    };
    (RequestBody::Own(body), Some(slot))
}

/// A request body read straight from the client's connection.
pub struct OwnBody {
    stream: Arc<Wire>,
    buf: BytesMut,
    decoder: Decoder,
    /// Where the buffer goes when the body is done (or dropped unread); `None` once given back,
    /// or after a framing error (the connection cannot be reused then).
    slot: Option<Slot>,
    /// `Expect: 100-continue`: bytes of the interim response written so far.
    continue_sent: Option<usize>,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl OwnBody {
    fn give_back(&mut self) {
        if let Some(slot) = self.slot.take() {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Returned {
                buf: std::mem::take(&mut self.buf),
                decoder: self.decoder,
            });
        }
    }

    /// The body failed: the client's fault (bad framing, or it went away), never an instance's.
    fn fail(&mut self, e: ClientBodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.slot = None;
        self.decoder = Decoder::done();
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

impl Body for OwnBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.slot.is_none() {
            return Poll::Ready(None);
        }
        // The client waits for a go-ahead before it sends the body.
        if let Some(mut sent) = this.continue_sent {
            if this.buf.is_empty() {
                let r = this.stream.poll_write_all(cx, CONTINUE, &mut sent);
                this.continue_sent = Some(sent);
                if ready!(r).is_err() {
                    return this.fail(ClientBodyError::Closed);
                }
            }
            this.continue_sent = None;
        }
        let mut eof = false;
        loop {
            match this.decoder.decode(&mut this.buf, eof) {
                Ok(Decoded::Data(d)) => {
                    if this.decoder.is_done() {
                        this.give_back();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Decoded::Trailers(t)) => {
                    this.give_back();
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Ok(Decoded::End) => {
                    this.give_back();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                // At the end of the input, the body was cut short; before it, its framing is bad.
                Err(_) if eof => return this.fail(ClientBodyError::Closed),
                Err(_) => return this.fail(ClientBodyError::Malformed),
            }
            if this.buf.capacity() - this.buf.len() < 1024 {
                this.buf.reserve(BODY_CHUNK);
            }
            match ready!(this.stream.poll_read_buf(cx, &mut this.buf)) {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(_) => return this.fail(ClientBodyError::Closed),
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

impl Drop for OwnBody {
    fn drop(&mut self) {
        // Unread (or partly read): the connection may drain the rest. A client still waiting
        // for `100 Continue` never got it, so it may not send the body: do not wait for it.
        if self.continue_sent.is_some() && !self.decoder.is_done() {
            self.slot = None;
        }
        self.give_back();
    }
}

/// Read and discard the rest of a request body nobody read, within bounds. `true`: the
/// connection can serve another request.
async fn drain(stream: &Wire, buf: &mut BytesMut, mut decoder: Decoder, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut discarded = 0usize;
    let mut eof = false;
    loop {
        match decoder.decode(buf, eof) {
            Ok(Decoded::Data(d)) => {
                discarded += d.len();
                if discarded > MAX_DRAIN {
                    return false;
                }
            }
            Ok(Decoded::Trailers(_)) => {}
            Ok(Decoded::End) => return true,
            Ok(Decoded::NeedMore) => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(BODY_CHUNK);
                }
                let read = std::future::poll_fn(|cx| stream.poll_read_buf(cx, buf));
                match tokio::time::timeout_at(deadline, read).await {
                    Ok(Ok(0)) => eof = true,
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => return false,
                }
            }
            Err(_) => return false,
        }
    }
}

/// How the response body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body (HEAD, 1xx, 204, 304): headers go as they are.
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn push_hex(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Poll the body once, without waiting: `Pending` means the next frame is not there yet.
async fn frame_now<B: ResponseBody>(body: &mut B) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
}

/// The status line and headers of a response as they go on the wire (room left for a small
/// body behind them), how its body is framed, and whether the connection stays open.
fn encode_head<B: ResponseBody>(
    parts: http::response::Parts,
    body: &B,
    deferred: Option<crate::body::Deferred>,
    meta: &Meta,
    now: std::time::Instant,
) -> (Vec<u8>, Out, bool) {
    let status = parts.status;
    // A 101 here (the request was not handed to hyper as an upgrade) switches nothing: the
    // connection closes after it, so nobody in front takes what follows for a tunnel while
    // this server parses it as requests.
    let mut keep_alive = meta.keep_alive && status != StatusCode::SWITCHING_PROTOCOLS;
    let no_body = meta.head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Out::None
    } else if let Some(n) = body.size_hint().exact() {
        Out::Length(n)
    } else if let Some(n) = content_length(&parts.headers) {
        Out::Length(n)
    } else if meta.version == Version::HTTP_11 {
        Out::Chunked
    } else {
        keep_alive = false;
        Out::Close
    };

    let small_body = body
        .size_hint()
        .exact()
        .filter(|n| *n as usize <= COALESCE)
        .unwrap_or(0) as usize;
    let fields = parts.headers.len() + deferred.as_ref().map_or(0, |d| d.head.len());
    let mut out: Vec<u8> = Vec::with_capacity(256 + fields * 48 + small_body);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    let mut has_length = false;
    for (k, v) in &parts.headers {
        if *k == header::CONTENT_LENGTH {
            if framing != Out::None {
                continue;
            }
            has_length = true;
        } else if *k == header::TRANSFER_ENCODING || *k == header::CONNECTION {
            continue;
        } else if *k == header::DATE {
            has_date = true;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(d) = &deferred {
        let kinds = d.head.write_fields(&mut out, framing == Out::None);
        has_date |= kinds & codec::F_DATE != 0;
        has_length |= kinds & codec::F_LENGTH != 0;
        if let Some((n, v)) = &d.extra {
            if !v.is_empty() {
                out.extend_from_slice(n.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(v.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    match framing {
        Out::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_u64(&mut out, n);
            out.extend_from_slice(b"\r\n");
        }
        Out::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Out::None if meta.head_request && !has_length => {
            // HEAD of a response we made ourselves: the length its GET would have.
            if let Some(n) = body.size_hint().exact() {
                out.extend_from_slice(b"content-length: ");
                push_u64(&mut out, n);
                out.extend_from_slice(b"\r\n");
            }
        }
        Out::None | Out::Close => {}
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if meta.version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&codec::date_at(now));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    codec::recycle_map(parts.headers);
    (out, framing, keep_alive)
}

/// A response with its whole body in hand, as bytes to send before closing the connection:
/// what a connection refused at accept gets. (A body whose first frame is not ready at once
/// is left out.)
pub fn encode_closing<B: ResponseBody>(resp: Response<B>) -> Vec<u8> {
    let meta = Meta {
        version: Version::HTTP_11,
        head_request: false,
        keep_alive: false,
        te_trailers: false,
    };
    let (parts, mut body) = resp.into_parts();
    let (mut out, _, _) = encode_head(parts, &body, None, &meta, std::time::Instant::now());
    let mut cx = Context::from_waker(std::task::Waker::noop());
    while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) {
        if let Ok(d) = frame.into_data() {
            out.extend_from_slice(&d);
        }
    }
    out
}

/// Write the response; `true` when the connection can carry another request. `now` dates it.
async fn write_response<B: ResponseBody>(
    stream: &Wire,
    resp: Response<B>,
    meta: &Meta,
    now: std::time::Instant,
) -> bool {
    let (parts, mut body) = resp.into_parts();
    let deferred = body.take_deferred();
    let (mut out, framing, mut keep_alive) = encode_head(parts, &body, deferred, meta, now);
    if framing == Out::None {
        drop(body);
        return stream.write_all(&out).await.is_ok() && keep_alive;
    }

    let chunked = framing == Out::Chunked;
    let mut written = 0u64;
    let mut terminated = false;
    loop {
        let next = match frame_now(&mut body).await {
            Poll::Ready(f) => f,
            Poll::Pending => {
                // Send what we have while the instance is producing the rest.
                if !out.is_empty() {
                    if stream.write_all(&out).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let frame = match next {
            None => break,
            Some(Ok(f)) => f,
            Some(Err(_)) => {
                // The instance failed mid-body: send what came, then close (never a clean end).
                let _ = stream.write_all(&out).await;
                return false;
            }
        };
        match frame.into_data() {
            Ok(data) => {
                if data.is_empty() {
                    continue;
                }
                written += data.len() as u64;
                if let Out::Length(n) = framing {
                    if written > n {
                        let _ = stream.write_all(&out).await;
                        return false;
                    }
                }
                if chunked {
                    push_hex(&mut out, data.len());
                    out.extend_from_slice(b"\r\n");
                }
                if out.len() + data.len() <= COALESCE {
                    out.extend_from_slice(&data);
                } else {
                    if stream.write_all2(&out, &data).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                } else if body.is_end_stream() {
                    // That was the last of a sized body: no need to poll for its end.
                    break;
                }
            }
            Err(frame) => {
                if let (Ok(trailers), true) = (frame.into_trailers(), chunked) {
                    out.extend_from_slice(b"0\r\n");
                    if meta.te_trailers {
                        codec::encode_fields(&mut out, &trailers);
                    }
                    out.extend_from_slice(b"\r\n");
                    terminated = true;
                }
            }
        }
    }
    if chunked && !terminated {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if let Out::Length(n) = framing {
        if written != n {
            keep_alive = false;
        }
    }
    if !out.is_empty() && stream.write_all(&out).await.is_err() {
        return false;
    }
    keep_alive && framing != Out::Close
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse_ok(raw: &[u8]) -> (Request<()>, Meta, BodyFraming, BytesMut) {
        let mut buf = BytesMut::from(raw);
        match parse(&mut buf, 100) {
            Ok(Some(Parsed::Request(r, m, f))) => (r, m, f, buf),
            Ok(Some(Parsed::Handoff)) => panic!("handoff"),
            Ok(None) => panic!("partial"),
            Err(HeadError::Malformed(m)) => panic!("malformed: {m}"),
            Err(HeadError::TooLarge) => panic!("too large"),
            Err(HeadError::Timeout) => panic!("timeout"),
        }
    }

    fn parse_err(raw: &[u8]) -> &'static str {
        let mut buf = BytesMut::from(raw);
        match parse(&mut buf, 100) {
            Err(HeadError::Malformed(m)) => m,
            Err(HeadError::TooLarge) => "too large",
            Err(HeadError::Timeout) => "timeout",
            Ok(Some(Parsed::Handoff)) => "handoff",
            Ok(Some(Parsed::Request(..))) => "ok",
            Ok(None) => "partial",
        }
    }

    #[test]
    fn heads_split_off_with_what_follows() {
        let (r, m, f, rest) = parse_ok(
            b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nX-Y: z\r\n\r\nabcGET",
        );
        assert_eq!(r.method(), Method::POST);
        assert_eq!(r.uri().path(), "/a");
        assert_eq!(r.uri().query(), Some("b=1"));
        assert_eq!(r.headers()["x-y"], "z");
        assert!(m.keep_alive && !m.head_request);
        assert!(matches!(f, BodyFraming::Length(3)));
        assert_eq!(&rest[..], b"abcGET");
        let (_, m, f, _) = parse_ok(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!m.keep_alive);
        assert!(matches!(f, BodyFraming::None));
        let (_, m, _, _) = parse_ok(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(m.keep_alive);
        let (_, m, f, _) = parse_ok(
            b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n",
        );
        assert!(!m.keep_alive);
        assert!(matches!(f, BodyFraming::Chunked));
        let mut partial = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n"[..]);
        assert!(matches!(parse(&mut partial, 100), Ok(None)));
    }

    #[test]
    fn smuggling_shapes_and_bad_heads_are_refused() {
        for (raw, why) in [
            (&b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..], "both"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", "several Content-Length"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\n", "invalid Content-Length"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding"),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.0"),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n", "obs-fold"),
            (b"GET / HTTP/1.1\r\n\r\n", "without Host"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "several Host"),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "HTTP version"),
            (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", "request line"),
        ] {
            let got = parse_err(raw);
            assert!(got.contains(why), "{}: got {got:?}", String::from_utf8_lossy(raw));
        }
        let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        for i in 0..200 {
            many.push_str(&format!("x-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(parse_err(many.as_bytes()), "too large");
    }

    #[test]
    fn upgrades_and_connect_go_to_hyper_untouched() {
        for raw in [
            &b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"[..],
            b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(raw);
            assert!(matches!(parse(&mut buf, 100), Ok(Some(Parsed::Handoff))));
            assert_eq!(&buf[..], raw, "the buffer is left for hyper");
        }
        assert!(is_h2_preface(b"PRI * HT"));
        assert!(!is_h2_preface(b"GET / HTTP/1.1"));
    }

    #[test]
    fn only_a_well_framed_websocket_upgrade_is_handed_over() {
        // The framing rules come first: an upgrade is no way around them.
        for (raw, why) in [
            (
                &b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                "both Content-Length and Transfer-Encoding",
            ),
            (
                b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                "HTTP/1.1 request without Host",
            ),
            (
                b"GET /ws HTTP/1.1\r\nHost: a\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                "several Host headers",
            ),
        ] {
            assert_eq!(parse_err(raw), why);
        }
        // Any other Upgrade (curl --http2 on http:// asks for h2c), or one that Connection does
        // not name, is served here as plain HTTP/1.1.
        for raw in [
            &b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        ] {
            let (req, _, _, rest) = parse_ok(raw);
            assert!(rest.is_empty());
            assert!(req.headers().contains_key(header::UPGRADE));
        }
    }

    #[test]
    fn numbers() {
        let mut v = Vec::new();
        push_u64(&mut v, 0);
        v.push(b' ');
        push_u64(&mut v, 18_446_744_073_709_551_615);
        v.push(b' ');
        push_hex(&mut v, 0x1f40);
        assert_eq!(v, b"0 18446744073709551615 1f40");
    }
}
