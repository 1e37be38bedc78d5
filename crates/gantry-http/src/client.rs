//! One request to one instance, whatever the protocol: [`send`] takes a connection from the
//! instance's [`Pool`] (or makes one) and sends on it — plain HTTP/1.1 by the in-task client
//! (the request's own task writes the head and body and reads the response head; the response
//! body is read by whoever polls it), TLS, HTTP/2 and upgrades by hyper. A failure says what
//! failed and whether any of the request left ([`SendError`]); a request that never left comes
//! back (headers and body) for another attempt.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};

use crate::body::{BoxError, ClientBody, SendBody};
use crate::h1client::H1Error;
use crate::pool::{ConnectError, Pool, Target};

/// Header fields sent after the request's map, without being inserted in it: the in-task
/// client writes them straight into the head; hyper's paths insert them into the map.
pub trait ExtraFields {
    fn for_each(&self, f: impl FnMut(&HeaderName, &HeaderValue));
}

impl ExtraFields for () {
    fn for_each(&self, _: impl FnMut(&HeaderName, &HeaderValue)) {}
}

/// How to speak to the instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// HTTP/1.1 on a pooled connection.
    Http1,
    /// HTTP/2 on the instance's shared connection (h2c, or `h2` by ALPN over TLS).
    Http2,
    /// HTTP/1.1 on a connection of its own that may switch protocols (WebSocket); never pooled.
    Upgrade,
}

/// The request to send. The body goes separately (it may come back).
pub struct Outgoing<'a, X> {
    pub method: &'a Method,
    pub target: &'a PathAndQuery,
    /// Who the request is for: HTTP/2's `:authority`, and HTTP/1.1's `Host` when the map has
    /// none (else the instance's address).
    pub authority: Option<&'a HeaderValue>,
    /// The map holds a `Host` (HTTP/2 drops it: `:authority` says it).
    pub host_in_map: bool,
    pub headers: &'a mut HeaderMap,
    pub extra: Option<&'a X>,
    /// Another attempt may follow: hyper, which takes the headers by value, gets a copy.
    pub keep_headers: bool,
}

/// What failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The connection was refused or could not be made.
    Connect,
    ConnectTimeout,
    /// The TLS handshake failed (a certificate not trusted, no common protocol...).
    Tls,
    /// The HTTP/2 handshake failed.
    Handshake,
    /// A pooled connection the instance had closed: nothing was sent; a fresh connection will
    /// do.
    Stale,
    /// The connection closed or reset after (some of) the request left, before a response head.
    Reset,
    /// The instance answered something that is not HTTP.
    Protocol,
    /// The request's body failed while it was sent (the client's side, or a size limit: the
    /// body knows which).
    RequestBody,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::Tls => "tls",
            ErrorKind::Handshake => "handshake",
            ErrorKind::Stale => "stale_connection",
            ErrorKind::Reset => "reset",
            ErrorKind::Protocol => "protocol",
            ErrorKind::RequestBody => "request_body",
        }
    }
}

/// A send that got no response.
#[derive(Debug)]
pub struct SendError {
    pub kind: ErrorKind,
    /// Some of the request may have reached the instance. `false`: none did; the request (its
    /// body given back) can go again, even if it is not idempotent.
    pub sent: bool,
    pub source: BoxError,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.source)
    }
}

impl std::error::Error for SendError {}

fn connect_failed(e: ConnectError) -> SendError {
    let kind = match &e {
        ConnectError::Timeout => ErrorKind::ConnectTimeout,
        ConnectError::Io(_) => ErrorKind::Connect,
        ConnectError::Tls(_) => ErrorKind::Tls,
        ConnectError::Handshake(_) => ErrorKind::Handshake,
    };
    SendError {
        kind,
        sent: false,
        source: Box::new(e),
    }
}

/// Send one request on a connection from `pool` to `target`. On a failure before anything
/// left, `headers` and `body` hold the request again.
///
/// An `async move` block rather than an `async fn`: the arguments then live in the future
/// once, not twice.
#[allow(clippy::manual_async_fn)]
pub fn send<'a, B: SendBody + Default, X: ExtraFields + Sync>(
    pool: &'a Arc<Pool<B>>,
    target: Target<'a>,
    mode: Mode,
    req: Outgoing<'a, X>,
    body: &'a mut Option<B>,
) -> impl std::future::Future<Output = Result<Response<ClientBody>, SendError>> + Send + 'a {
    async move {
        // The request's fields are read in place (destructured, they would take slots of their
        // own in this future).
        if mode != Mode::Http2 && !req.host_in_map {
            // An HTTP/1.0 client sent no Host: HTTP/1.1 needs one.
            let host = req
                .authority
                .cloned()
                .or_else(|| HeaderValue::from_str(&target.addr.to_string()).ok());
            if let Some(h) = host {
                req.headers.insert(header::HOST, h);
            }
        }
        if mode == Mode::Http1 && target.tls.is_none() {
            let conn = pool.own(target).await.map_err(connect_failed)?;
            let b = body.take().unwrap_or_default();
            let sent = conn.send(
                req.method,
                req.target.as_str(),
                req.headers,
                req.extra,
                b,
                pool.own.clone(),
            );
            return match sent.await {
                Ok(resp) => Ok(resp.map(ClientBody::Own)),
                Err(H1Error::Unsent(b, e)) => {
                    *body = Some(*b);
                    Err(SendError {
                        kind: ErrorKind::Stale,
                        sent: false,
                        source: Box::new(e),
                    })
                }
                Err(H1Error::Io(e)) => Err(SendError {
                    kind: ErrorKind::Reset,
                    sent: true,
                    source: Box::new(e),
                }),
                Err(H1Error::Protocol(m)) => Err(SendError {
                    kind: ErrorKind::Protocol,
                    sent: true,
                    source: m.into(),
                }),
                Err(H1Error::Body(e)) => Err(SendError {
                    kind: ErrorKind::RequestBody,
                    sent: true,
                    source: e,
                }),
            };
        }
        let Outgoing {
            method,
            target: pq,
            authority,
            host_in_map,
            headers,
            extra,
            keep_headers,
        } = req;
        // hyper's paths write a map: the extra fields go into it.
        if let Some(x) = extra {
            x.for_each(|n, v| {
                headers.insert(n.clone(), v.clone());
            });
        }
        // The hyper paths' futures are boxed: they are large and off the common path, and the
        // caller's future would otherwise carry their size.
        match mode {
            Mode::Http2 => {
                if host_in_map {
                    headers.remove(header::HOST);
                }
                let mut s = Box::pin(pool.h2(target)).await.map_err(connect_failed)?;
                let scheme = if target.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                let uri = absolute(scheme, authority, pq);
                let r = hyper_request(method, uri, Version::HTTP_2, headers, keep_headers, body);
                match Box::pin(s.try_send_request(r)).await {
                    Ok(resp) => Ok(resp.map(|b| ClientBody::Hyper(b, None))),
                    Err(e) => Err(hyper_failed(e, headers, body)),
                }
            }
            Mode::Upgrade => {
                let mut s = Box::pin(crate::pool::connect_h1::<B>(target))
                    .await
                    .map_err(connect_failed)?;
                let uri = Uri::from(pq.clone());
                let r = hyper_request(method, uri, Version::HTTP_11, headers, keep_headers, body);
                match Box::pin(s.try_send_request(r)).await {
                    // Never pooled, switched or not: dropping the sender closes the connection
                    // once its response is done.
                    Ok(resp) => Ok(resp.map(|b| ClientBody::Hyper(b, None))),
                    Err(e) => Err(hyper_failed(e, headers, body)),
                }
            }
            Mode::Http1 => {
                let mut s = Box::pin(pool.h1(target)).await.map_err(connect_failed)?;
                let uri = Uri::from(pq.clone());
                let r = hyper_request(method, uri, Version::HTTP_11, headers, keep_headers, body);
                match Box::pin(s.try_send_request(r)).await {
                    Ok(resp) => {
                        let pool = pool.clone();
                        let back: Box<dyn FnOnce() + Send> = Box::new(move || pool.put_h1(s));
                        Ok(resp.map(|b| ClientBody::Hyper(b, Some(back))))
                    }
                    Err(e) => Err(hyper_failed(e, headers, body)),
                }
            }
        }
    }
}

/// The absolute form an HTTP/2 request's `:scheme` and `:authority` come from.
fn absolute(scheme: &str, authority: Option<&HeaderValue>, pq: &PathAndQuery) -> Uri {
    let auth = authority
        .and_then(|a| a.to_str().ok())
        .unwrap_or("localhost");
    format!("{scheme}://{auth}{}", pq.as_str())
        .parse::<Uri>()
        .unwrap_or_else(|_| Uri::from(pq.clone()))
}

/// The request hyper sends for one attempt: the headers themselves, or a copy of them when
/// another attempt may need them.
fn hyper_request<B: Default>(
    method: &Method,
    uri: Uri,
    version: Version,
    headers: &mut HeaderMap,
    keep_headers: bool,
    body: &mut Option<B>,
) -> Request<B> {
    let mut r = Request::new(body.take().unwrap_or_default());
    *r.method_mut() = method.clone();
    *r.uri_mut() = uri;
    *r.version_mut() = version;
    *r.headers_mut() = if keep_headers {
        headers.clone()
    } else {
        std::mem::take(headers)
    };
    r
}

/// A hyper send that failed: what failed, and the request back if hyper returned it unsent.
fn hyper_failed<B>(
    mut e: hyper::client::conn::TrySendError<Request<B>>,
    headers: &mut HeaderMap,
    body: &mut Option<B>,
) -> SendError {
    let unsent = give_back(e.take_message(), headers, body);
    let err = e.into_error();
    let kind = if unsent {
        ErrorKind::Stale
    } else if err.is_user() {
        // "error from user's Body stream": the request body failed.
        ErrorKind::RequestBody
    } else if err.is_parse() {
        ErrorKind::Protocol
    } else {
        ErrorKind::Reset
    };
    SendError {
        kind,
        sent: !unsent,
        source: Box::new(err),
    }
}

/// A request hyper gave back unsent: its headers and body are the next attempt's. `true` if
/// there was one.
fn give_back<B>(
    returned: Option<Request<B>>,
    headers: &mut HeaderMap,
    body: &mut Option<B>,
) -> bool {
    let Some(r) = returned else {
        return false;
    };
    let (parts, b) = r.into_parts();
    if headers.is_empty() {
        *headers = parts.headers;
    }
    *body = Some(b);
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hyper_attempts_copy_or_take_the_headers_and_get_them_back_unsent() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        let uri: Uri = "/p?q=1".parse().unwrap();
        let mut body = Some(7u8);
        // Another attempt may follow: a copy goes, the headers stay.
        let r = hyper_request(
            &Method::GET,
            uri.clone(),
            Version::HTTP_11,
            &mut headers,
            true,
            &mut body,
        );
        assert_eq!(r.headers()["x-a"], "1");
        assert_eq!(r.uri(), &uri);
        assert!(body.is_none());
        assert_eq!(headers["x-a"], "1");
        assert!(give_back(Some(r), &mut headers, &mut body));
        assert_eq!(body, Some(7));
        assert_eq!(headers.len(), 1);
        // The only attempt: the headers themselves go, and come back if hyper returns them.
        let r = hyper_request(
            &Method::POST,
            uri.clone(),
            Version::HTTP_2,
            &mut headers,
            false,
            &mut body,
        );
        assert_eq!(r.version(), Version::HTTP_2);
        assert!(headers.is_empty());
        assert!(give_back(Some(r), &mut headers, &mut body));
        assert_eq!(headers["x-a"], "1");
        assert!(body.is_some());
        // Sent (nothing given back): nothing changes.
        assert!(!give_back(None, &mut headers, &mut body));
        assert_eq!(headers["x-a"], "1");
    }

    #[test]
    fn http2_requests_carry_scheme_and_authority() {
        let pq = PathAndQuery::from_static("/a?b=1");
        let host = HeaderValue::from_static("api.example.com:8443");
        assert_eq!(
            absolute("https", Some(&host), &pq),
            "https://api.example.com:8443/a?b=1"
        );
        assert_eq!(absolute("http", None, &pq), "http://localhost/a?b=1");
    }
}
