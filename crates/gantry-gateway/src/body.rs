//! Body types of the proxy: upstream request bodies are streamed as received (or empty when a
//! request may be retried), response bodies are streamed back while holding the instance's
//! in-flight count.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;

use crate::table::Endpoint;

/// Body sent to an instance.
pub type RequestBody = Either<Incoming, Empty<Bytes>>;

/// Body sent back to the client: an instance's streamed response, or the gateway's own.
pub type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

/// Counts a request as in flight to an instance until dropped.
pub(crate) struct InflightGuard(Arc<Endpoint>);

impl InflightGuard {
    pub(crate) fn new(ep: Arc<Endpoint>) -> Self {
        ep.inflight.fetch_add(1, Ordering::Relaxed);
        Self(ep)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An instance's response body; the in-flight count drops when it ends or the client goes away.
pub struct UpstreamBody {
    inner: Incoming,
    guard: Option<InflightGuard>,
}

impl UpstreamBody {
    pub(crate) fn new(inner: Incoming, guard: InflightGuard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(res, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.guard = None;
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
