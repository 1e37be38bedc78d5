//! Gantry's HTTP engine: it speaks HTTP to clients and to instances, and knows nothing of
//! routing, policies or services.
//!
//! - **Server side**: [`Server::serve`] accepts connections (plain or TLS) and serves each with
//!   the in-task HTTP/1.1 server (`h1server.rs`: the connection's own task parses heads with
//!   `httparse`, calls the [`Handler`], and writes the response itself), which hands HTTP/2
//!   (prior knowledge), WebSocket upgrades and `CONNECT` to hyper; TLS connections that chose
//!   HTTP/2 by ALPN are hyper's from the start. Every stack calls the same [`Handler::handle`]
//!   with a [`RequestBody`] and the [`ConnInfo`]; the handler does not need to know which
//!   stack served the request.
//! - **Client side**: [`client::send`] sends one request to one address through a per-instance
//!   [`pool::Pool`]: plain HTTP/1.1 by the in-task client (`h1client.rs`), TLS, HTTP/2 and
//!   upgrades by hyper. Failures are typed ([`client::SendError`]: what failed, and whether
//!   any of the request left), never strings to match.
//! - Shared: the HTTP/1.1 codec (`codec.rs`: body decoder, raw heads, dates), direct socket
//!   syscalls (`sys.rs`), wake-up groups for a connection's background futures (`nudge.rs`),
//!   attempt deadlines on a connection's timer (`timer.rs`), and upgraded-connection splicing
//!   (`tunnel.rs`).
//!
//! Architecture invariant: this crate imports nothing from Gantry; the pipeline (the gateway
//! crate) plugs in through [`Handler`], [`ResponseBody`], [`SendBody`] and
//! [`client::ExtraFields`], all statically dispatched.
// No `unsafe` but in `sys.rs` (which says why); the workspace denies it everywhere else.
#![deny(unsafe_code)]

mod accept;
pub mod body;
pub mod client;
pub mod codec;
#[doc(hidden)]
pub mod fuzzing;
mod h1client;
mod h1server;
mod nudge;
pub mod pool;
mod sys;
pub mod timer;
pub mod tunnel;
mod wire;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use rustls_pki_types::CertificateDer;

pub use accept::{Listener, Server, ServerConfig};
pub use body::{BoxError, ClientBody, Deferred, RequestBody, ResponseBody, SendBody};
pub use h1server::encode_closing;
pub use timer::ConnTimer;

/// What serves requests: the gateway's pipeline.
pub trait Handler: Send + Sync + 'static {
    /// The body of the responses it gives.
    type Body: ResponseBody;

    /// Answer one request. `timer`: a timer the connection keeps (the in-task server's), lent
    /// for the request's attempt deadlines (see [`timer::within`]); `None` on hyper's stacks.
    fn handle<'a>(
        self: &'a Arc<Self>,
        req: Request<RequestBody>,
        conn: &'a ConnInfo,
        timer: Option<ConnTimer<'a>>,
    ) -> impl std::future::Future<Output = Response<Self::Body>> + Send + 'a;

    /// The answer to a request refused before it could be handled (its head was malformed,
    /// too large or too slow; or the connection is one too many). The connection closes after.
    fn refuse(&self, why: Refusal, conn: &ConnInfo) -> Response<Self::Body>;

    /// A refusal hyper answered itself (on the stacks it serves), for counting.
    fn refused_by_hyper(&self, _why: Refusal) {}

    /// A client connection opened (`true`) or closed (`false`).
    fn connection(&self, _open: bool) {}
}

/// Why a request was refused before its handler saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Refused by the HTTP/1.1 parser or the framing rules (smuggling shapes among them).
    Malformed(&'static str),
    /// The head is larger than `max_header_bytes`, or has more than `max_headers` fields.
    HeadTooLarge {
        max_header_bytes: usize,
        max_headers: usize,
    },
    /// The head did not arrive within `header_read_timeout`.
    HeadTimeout { after_ms: u64 },
    /// `max_connections` client connections are open.
    TooManyConnections,
}

/// Facts about the client connection a request came on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as a header value (what `X-Forwarded-For` starts from), formatted
    /// once per connection.
    pub peer_ip: HeaderValue,
    pub tls: bool,
    /// The client's certificate chain, as verified by the TLS handshake, when it presented one
    /// (mutual TLS); `None` on plain connections and when no certificate was asked for.
    pub peer_identity: Option<Arc<PeerIdentity>>,
}

/// A TLS client's verified certificate chain, end entity first.
#[derive(Debug)]
pub struct PeerIdentity {
    pub certificates: Vec<CertificateDer<'static>>,
    /// The workload name a verifier derived from the certificate (computed once per
    /// connection, on first use).
    pub resolved: std::sync::OnceLock<Option<Box<str>>>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool, peer_identity: Option<Arc<PeerIdentity>>) -> Self {
        Self {
            peer,
            peer_ip: ip_value(peer.ip()),
            tls,
            peer_identity,
        }
    }
}

/// Decimal digits of a byte, appended.
fn push_u8(out: &mut Vec<u8>, n: u8) {
    if n >= 100 {
        out.push(b'0' + n / 100);
    }
    if n >= 10 {
        out.push(b'0' + (n / 10) % 10);
    }
    out.push(b'0' + n % 10);
}

/// An IP address as a header value (IPv4 without the formatting machinery).
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    if let IpAddr::V4(v4) = ip {
        let mut out = Vec::with_capacity(15);
        for (i, o) in v4.octets().iter().enumerate() {
            if i > 0 {
                out.push(b'.');
            }
            push_u8(&mut out, *o);
        }
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(out)) {
            return v;
        }
    }
    HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_values() {
        for ip in [
            "0.0.0.0",
            "10.20.30.40",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
        ] {
            let parsed: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
            assert_eq!(ip_value(parsed), ip);
        }
    }
}
