//! The bodies the engine hands over and takes: a request body as it arrives from a client
//! ([`RequestBody`]), what a handler's response body must offer ([`ResponseBody`]), what an
//! outgoing request body must offer ([`SendBody`]), and an instance's response body
//! ([`ClientBody`]). Whichever stack read them, they are one type each, so the pipeline does
//! not branch on the stack.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::codec::{RawHead, F_HOP};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body as it arrives from the client: read by hyper (HTTP/2, TLS with `h2`,
/// upgrades) or in-task from an HTTP/1.1 connection (`h1server.rs`).
pub enum RequestBody {
    Empty,
    Hyper(Incoming),
    Own(crate::h1server::OwnBody),
}

/// Why a client's request body failed: the client's fault, never an instance's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientBodyError {
    /// Bad framing (a chunk size that is not hex, a chunk without its CRLF, ...).
    Malformed,
    /// The client closed or reset the connection before the body's end.
    Closed,
}

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientBodyError::Malformed => write!(f, "malformed request body framing"),
            ClientBodyError::Closed => {
                write!(f, "the client closed the connection inside the body")
            }
        }
    }
}
impl std::error::Error for ClientBodyError {}

impl RequestBody {
    /// What a failure of this body's frames was, from the client's side: every error a client
    /// body yields is the client's (malformed framing, or the connection went away).
    pub fn classify(e: &BoxError) -> ClientBodyError {
        if let Some(c) = e.downcast_ref::<ClientBodyError>() {
            return *c;
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_parse() {
                return ClientBodyError::Malformed;
            }
        }
        ClientBodyError::Closed
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            RequestBody::Own(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Hyper(b) => b.is_end_stream(),
            RequestBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Hyper(b) => b.size_hint(),
            RequestBody::Own(b) => b.size_hint(),
        }
    }
}

/// A handler's response body.
pub trait ResponseBody: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static {
    /// Response header fields not in the response's map (an instance's head as received): the
    /// in-task server writes them as they are; hyper's stacks get them in the map.
    fn take_deferred(&mut self) -> Option<Deferred>;
}

/// Response header fields kept out of the response's map: an instance's head as it was
/// received, and one more field to write after it (the gateway's request id).
pub struct Deferred {
    pub head: Box<RawHead>,
    pub extra: Option<(&'static HeaderName, HeaderValue)>,
}

impl Deferred {
    /// Move the fields into `headers` (hop-by-hop ones dropped), for a server that writes a map.
    pub fn materialize(self, headers: &mut HeaderMap) {
        headers.reserve(self.head.len() + 1);
        for f in self.head.fields() {
            if f.kind & F_HOP != 0 {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(f.name(self.head.bytes())),
                f.value(self.head.bytes()),
            ) {
                headers.append(n, v);
            }
        }
        if let Some((n, v)) = self.extra {
            if !v.is_empty() {
                headers.insert(n.clone(), v);
            }
        }
    }
}

/// An outgoing request body.
pub trait SendBody: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static {
    /// Put back data taken from this body (a send that failed before anything left, or a piece
    /// too large to go with the head): the next frame yields it again. Every body must keep
    /// what it is given, whatever its kind.
    fn unread(&mut self, data: Bytes);
}

/// An instance's response body: from a hyper connection (HTTP/2, TLS, upgrades) or read
/// in-task from a plain HTTP/1.1 connection. A hyper HTTP/1.1 connection goes back to its pool
/// when the body has been read to its end.
pub enum ClientBody {
    Hyper(Incoming, Option<Box<dyn FnOnce() + Send>>),
    Own(crate::h1client::H1Body),
}

impl ClientBody {
    /// The response's head as the instance sent it, when it was read in-task (the response's
    /// map is empty then).
    pub fn take_head(&mut self) -> Option<Box<RawHead>> {
        match self {
            ClientBody::Own(b) => b.take_head(),
            ClientBody::Hyper(..) => None,
        }
    }

    fn ended(&mut self) {
        if let ClientBody::Hyper(_, back) = self {
            if let Some(f) = back.take() {
                f();
            }
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this {
            ClientBody::Hyper(b, _) => {
                let r = std::task::ready!(Pin::new(b).poll_frame(cx));
                match r {
                    None => {
                        this.ended();
                        Poll::Ready(None)
                    }
                    Some(Err(e)) => {
                        if let ClientBody::Hyper(_, back) = this {
                            // Failed: the connection is not reused.
                            *back = None;
                        }
                        Poll::Ready(Some(Err(Box::new(e) as BoxError)))
                    }
                    Some(Ok(f)) => Poll::Ready(Some(Ok(f))),
                }
            }
            ClientBody::Own(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b, _) => b.is_end_stream(),
            ClientBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b, _) => b.size_hint(),
            ClientBody::Own(b) => b.size_hint(),
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        // hyper may never poll a body it knows is empty: read to its end all the same.
        if self.is_end_stream() {
            self.ended();
        }
    }
}
