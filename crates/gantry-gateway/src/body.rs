//! Body types of the proxy. Request bodies stream to the instance (never buffered: one goes
//! again on a retry only if none of it left), with the route's size limit enforced as bytes
//! pass, and a copy of each frame goes to a mirror when there is one (`Tee`, `MirrorBody`).
//! Response bodies stream back while holding the instance's in-flight count; at the end a
//! cacheable body is stored and the request's end work runs (the access-log line). How bodies
//! are read and written on the wire is the engine's (`gantry-http`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use gantry_http::{BoxError, ClientBody, Deferred, RequestBody, ResponseBody, SendBody};
use http_body::{Body, Frame, SizeHint};

use crate::endpoints::Endpoint;

#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body exceeds the route's max_body_bytes")
    }
}
impl std::error::Error for BodyTooLarge {}

/// What went wrong with a request body on the client's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// Its framing was bad (a chunk size that is not hex, a chunk without its CRLF...).
    Malformed,
    /// The client closed or reset the connection before the body's end.
    Closed,
    /// The client was still to send more when the request's time ran out.
    Slow,
}

/// What a request body's reader found that ends the request: the body passed the route's size
/// limit, or the client failed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    TooLarge,
    Client(ClientFault),
}

/// What the upstream call needs to know about a request body it is sending: its faults, and
/// whether its reader is waiting on the client (so that a timeout then is the client's). Written
/// by the body's reader only (plain loads and stores: no atomic read-modify-write).
#[derive(Debug, Default)]
pub struct BodyWatch(AtomicU8);

const W_TOO_LARGE: u8 = 1;
const W_MALFORMED: u8 = 2;
const W_CLOSED: u8 = 4;
const W_WAITING: u8 = 8;

impl BodyWatch {
    fn set(&self, bit: u8, on: bool) {
        let v = self.0.load(Ordering::Relaxed);
        let next = if on { v | bit } else { v & !bit };
        if next != v {
            self.0.store(next, Ordering::Relaxed);
        }
    }

    /// The fault the body ended with, if any.
    pub fn fault(&self) -> Option<BodyFault> {
        let v = self.0.load(Ordering::Relaxed);
        if v & W_TOO_LARGE != 0 {
            Some(BodyFault::TooLarge)
        } else if v & W_MALFORMED != 0 {
            Some(BodyFault::Client(ClientFault::Malformed))
        } else if v & W_CLOSED != 0 {
            Some(BodyFault::Client(ClientFault::Closed))
        } else {
            None
        }
    }

    /// The body's last read found nothing from the client yet (and it has not ended).
    pub fn waiting_on_client(&self) -> bool {
        self.0.load(Ordering::Relaxed) & W_WAITING != 0
    }
}

/// Body sent to an instance.
#[derive(Default)]
pub enum ReqBody {
    #[default]
    Empty,
    Stream {
        inner: RequestBody,
        remaining: u64,
        watch: Arc<BodyWatch>,
        /// Bytes taken from `inner` and put back (a send that failed before anything left).
        unread: Option<Bytes>,
        /// A copy of every frame taken from `inner` goes to the mirror.
        tee: Option<Tee>,
    },
    /// The copy of a request body sent to a mirror.
    Mirror(Box<MirrorBody>),
    /// A whole body in hand (an in-process caller's), sent as one frame.
    Full(Bytes),
}

impl ReqBody {
    /// A client's body, failed once more than `max` bytes came; `watch` hears of its faults.
    pub fn limited(inner: RequestBody, max: u64, watch: Arc<BodyWatch>, tee: Option<Tee>) -> Self {
        ReqBody::Stream {
            inner,
            remaining: max,
            watch,
            unread: None,
            tee,
        }
    }
}

impl SendBody for ReqBody {
    /// Put back data taken from this body; the next frame yields it again.
    fn unread(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        match self {
            ReqBody::Stream {
                remaining, unread, ..
            } => {
                *remaining += data.len() as u64;
                *unread = Some(prepend(data, unread.take()));
            }
            ReqBody::Mirror(m) => m.unread = Some(prepend(data, m.unread.take())),
            ReqBody::Full(rest) => *rest = prepend(data, Some(std::mem::take(rest))),
            ReqBody::Empty => *self = ReqBody::Full(data),
        }
    }
}

/// `data`, then `later`.
fn prepend(data: Bytes, later: Option<Bytes>) -> Bytes {
    match later {
        Some(later) if !later.is_empty() => {
            let mut b = BytesMut::with_capacity(data.len() + later.len());
            b.extend_from_slice(&data);
            b.extend_from_slice(&later);
            b.freeze()
        }
        _ => data,
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Stream {
                inner,
                remaining,
                watch,
                unread,
                tee,
            } => {
                if let Some(d) = unread.take() {
                    *remaining -= d.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                watch.set(W_WAITING, polled.is_pending());
                match polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            let n = d.len() as u64;
                            if n > *remaining {
                                watch.set(W_TOO_LARGE, true);
                                // The mirror's copy fails too (`tee` dropped unfinished).
                                *tee = None;
                                return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                            }
                            *remaining -= n;
                        }
                        if let Some(t) = tee.take() {
                            // Ended now if that was the last frame: a reader that knows the
                            // length stops without polling for the end.
                            if t.copy(&frame) {
                                if inner.is_end_stream() {
                                    t.end();
                                } else {
                                    *tee = Some(t);
                                }
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        *tee = None;
                        let bit = match RequestBody::classify(&e) {
                            gantry_http::body::ClientBodyError::Malformed => W_MALFORMED,
                            gantry_http::body::ClientBodyError::Closed => W_CLOSED,
                        };
                        watch.set(bit, true);
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Ready(None) => {
                        if let Some(t) = tee.take() {
                            t.end();
                        }
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            ReqBody::Mirror(m) => m.poll(cx),
            ReqBody::Full(b) => {
                if b.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Ok(Frame::data(std::mem::take(b)))))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Stream { inner, unread, .. } => unread.is_none() && inner.is_end_stream(),
            ReqBody::Mirror(m) => m.done && m.unread.is_none(),
            ReqBody::Full(b) => b.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Stream { inner, unread, .. } => {
                let extra = unread.as_ref().map_or(0, |d| d.len() as u64);
                let h = inner.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + extra);
                if let Some(u) = h.upper() {
                    out.set_upper(u + extra);
                }
                out
            }
            ReqBody::Mirror(m) if m.done && m.unread.is_none() => SizeHint::with_exact(0),
            ReqBody::Mirror(m) => m.hint,
            ReqBody::Full(b) => SizeHint::with_exact(b.len() as u64),
        }
    }
}

/// Frames a mirror may fall behind the primary before it is abandoned: the memory a mirrored
/// body may hold (frames are at most a read's worth, 16 KiB on the gateway's own HTTP/1.1
/// server and HTTP/2's default frame size).
pub const TEE_FRAMES: usize = 32;

enum TeeMsg {
    Frame(Frame<Bytes>),
    /// The body ended cleanly (without it, a closed channel means the copy was abandoned).
    End,
}

/// The primary's side of a mirrored request body: each frame the primary takes is copied to the
/// mirror without waiting (a `Bytes` copy shares the buffer). When the mirror is `TEE_FRAMES`
/// behind, or the primary's body fails or is dropped unfinished, the copy is abandoned: the
/// mirror's body fails, so the shadow never takes a truncated body for a whole one, and the
/// primary never waits for the shadow.
pub struct Tee {
    tx: tokio::sync::mpsc::Sender<TeeMsg>,
}

impl Tee {
    /// A tee and the mirror's body it feeds; `hint` is the original body's size hint.
    pub fn new(hint: SizeHint) -> (Tee, MirrorBody) {
        let (tx, rx) = tokio::sync::mpsc::channel(TEE_FRAMES);
        let body = MirrorBody {
            rx,
            hint,
            done: false,
            unread: None,
            abandoned: Arc::new(AtomicBool::new(false)),
        };
        (Tee { tx }, body)
    }

    /// Copy a frame to the mirror; `false`: the mirror fell behind (or is gone) and is dropped.
    fn copy(&self, frame: &Frame<Bytes>) -> bool {
        // One slot always stays free for `End`.
        if self.tx.capacity() < 2 {
            return false;
        }
        let copy = if let Some(d) = frame.data_ref() {
            Frame::data(d.clone())
        } else if let Some(t) = frame.trailers_ref() {
            Frame::trailers(t.clone())
        } else {
            return true;
        };
        self.tx.try_send(TeeMsg::Frame(copy)).is_ok()
    }

    fn end(self) {
        let _ = self.tx.try_send(TeeMsg::End);
    }
}

#[derive(Debug)]
pub struct MirrorAbandoned;

impl std::fmt::Display for MirrorAbandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the mirror fell behind the request body and was abandoned"
        )
    }
}
impl std::error::Error for MirrorAbandoned {}

/// The mirror's copy of a request body, fed by a `Tee`.
pub struct MirrorBody {
    rx: tokio::sync::mpsc::Receiver<TeeMsg>,
    hint: SizeHint,
    done: bool,
    /// Bytes taken and put back (a send that failed before anything left).
    unread: Option<Bytes>,
    /// Set when the copy failed because the tee gave up (read by whoever sent the mirror).
    pub abandoned: Arc<AtomicBool>,
}

impl MirrorBody {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = self.unread.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(TeeMsg::Frame(f)) => Poll::Ready(Some(Ok(f))),
            Some(TeeMsg::End) => {
                self.done = true;
                Poll::Ready(None)
            }
            None => {
                self.done = true;
                self.abandoned.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(Box::new(MirrorAbandoned))))
            }
        }
    }
}

/// Counts a request as in flight to an instance (and to its service) until dropped.
pub struct InflightGuard {
    ep: Arc<Endpoint>,
}

impl InflightGuard {
    pub fn new(ep: Arc<Endpoint>) -> Self {
        ep.inflight.fetch_add(1, Ordering::Relaxed);
        Self { ep }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.ep.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Body sent back to the client.
pub enum RespBody {
    Upstream(Box<UpstreamBody>),
    Full(Option<Bytes>),
}

impl RespBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        RespBody::Full(Some(b.into()))
    }
    pub fn empty() -> Self {
        RespBody::Full(None)
    }
}

impl std::fmt::Debug for RespBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RespBody::Upstream(b) => write!(f, "RespBody::Upstream({} bytes so far)", b.bytes),
            RespBody::Full(b) => write!(f, "RespBody::Full({:?})", b.as_ref().map(Bytes::len)),
        }
    }
}

impl ResponseBody for RespBody {
    fn take_deferred(&mut self) -> Option<Deferred> {
        match self {
            RespBody::Upstream(b) => b.deferred.take(),
            RespBody::Full(_) => None,
        }
    }
}

/// An instance's streamed response.
pub struct UpstreamBody {
    inner: ClientBody,
    _guard: Option<InflightGuard>,
    idle: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    capture: Option<(BytesMut, usize)>,
    bytes: u64,
    on_end: Option<crate::proxy::RequestEnd>,
    done: bool,
    /// Response headers not in the response's map yet: the instance's head as it was received
    /// and the request id, written as they are by the in-task server.
    deferred: Option<Deferred>,
}

impl UpstreamBody {
    pub fn new(inner: ClientBody, guard: InflightGuard, idle: Duration) -> Self {
        Self {
            inner,
            _guard: Some(guard),
            idle,
            sleep: None,
            capture: None,
            bytes: 0,
            on_end: None,
            done: false,
            deferred: None,
        }
    }

    pub fn defer_head(&mut self, d: Deferred) {
        self.deferred = Some(d);
    }

    /// Keep a copy of up to `limit` bytes of the body for `on_end`.
    pub fn capture(&mut self, limit: usize) {
        self.capture = Some((BytesMut::new(), limit));
    }

    /// Work to do when the body is finished (or abandoned).
    pub(crate) fn on_end(&mut self, f: crate::proxy::RequestEnd) {
        self.on_end = Some(f);
    }

    fn finish(&mut self, complete: bool) {
        if self.done {
            return;
        }
        self.done = true;
        self._guard = None;
        let captured = self.capture.take().map(|(b, _)| b.freeze());
        if let Some(mut f) = self.on_end.take() {
            f.on_end(complete, self.bytes, if complete { captured } else { None });
        }
    }
}

#[derive(Debug)]
pub struct IdleTimeout;

impl std::fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream response idle timeout")
    }
}
impl std::error::Error for IdleTimeout {}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.sleep = None;
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                    if let Some((buf, limit)) = &mut this.capture {
                        if buf.len() + d.len() <= *limit {
                            buf.extend_from_slice(d);
                        } else {
                            this.capture = None;
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => {
                // Arm the idle timer only when the instance goes quiet.
                let idle = this.idle;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if sleep.as_mut().poll(cx).is_ready() {
                    this.finish(false);
                    return Poll::Ready(Some(Err(Box::new(IdleTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // The client went away (or hyper skipped polling an empty body).
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RespBody::Upstream(b) => Pin::new(b.as_mut()).poll_frame(cx),
            RespBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Upstream(b) => b.is_end_stream(),
            RespBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Upstream(b) => b.size_hint(),
            RespBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn mirror_of(tee_frames: &[&'static [u8]], end: bool) -> (ReqBody, Arc<AtomicBool>, bool) {
        let (tee, copy) = Tee::new(SizeHint::new());
        let abandoned = copy.abandoned.clone();
        let mut kept = true;
        for f in tee_frames {
            kept &= tee.copy(&Frame::data(Bytes::from_static(f)));
        }
        if end {
            tee.end();
        }
        (ReqBody::Mirror(Box::new(copy)), abandoned, kept)
    }

    #[tokio::test]
    async fn a_mirror_gets_every_frame_and_a_clean_end() {
        let (body, abandoned, kept) = mirror_of(&[b"hello", b" ", b"world"], true);
        assert!(kept);
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello world");
        assert!(!abandoned.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_tee_dropped_before_the_end_fails_the_copy() {
        let (body, abandoned, _) = mirror_of(&[b"part"], false);
        assert!(
            body.collect().await.is_err(),
            "a truncated copy must not end cleanly"
        );
        assert!(abandoned.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_mirror_that_falls_behind_is_given_up_with_room_left_for_the_end() {
        let (tee, copy) = Tee::new(SizeHint::new());
        // Nobody reads the copy: all but one slot fill, then the tee gives up.
        for i in 0..TEE_FRAMES - 1 {
            assert!(
                tee.copy(&Frame::data(Bytes::from_static(b"x"))),
                "frame {i}"
            );
        }
        assert!(!tee.copy(&Frame::data(Bytes::from_static(b"x"))));
        // The slot kept free always takes the end of a body that did fit.
        let (tee2, copy2) = Tee::new(SizeHint::new());
        for _ in 0..TEE_FRAMES - 1 {
            assert!(tee2.copy(&Frame::data(Bytes::from_static(b"y"))));
        }
        tee2.end();
        let got = ReqBody::Mirror(Box::new(copy2)).collect().await.unwrap();
        assert_eq!(got.to_bytes().len(), TEE_FRAMES - 1);
        drop(tee);
        assert!(ReqBody::Mirror(Box::new(copy)).collect().await.is_err());
    }
}
