//! The gateway's own answers: why it answered a request itself (`Reject`), as a JSON body
//! naming the reason, with the request id, counted by reason and logged like every request.

use std::net::SocketAddr;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode, Version};

use crate::body::{ClientFault, RespBody};
use crate::context::{Ctx, Host, Seen, X_REQUEST_ID};
use crate::endpoints::clock_ms;
use crate::table::CompiledRoute;
use crate::Gateway;

/// Why the gateway answered a request itself.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reject {
    NoRoute,
    NoInstance,
    NoVersion,
    UpstreamError,
    UpstreamTimeout,
    BadRequest(&'static str),
    /// Refused by the HTTP/1.1 parser or framing rules (smuggling shapes among them).
    Malformed(&'static str),
    TooLarge,
    HeadTooLarge,
    /// The request head did not arrive within `header_read_timeout_ms`.
    HeadTimeout,
    /// `max_connections` client connections are open.
    TooManyConnections,
    RateLimited,
    /// No valid credential for a route that needs one (401), by reason.
    Unauthenticated(gantry_authn::Denial),
    /// Authenticated but not allowed (403), by reason; the message is in `extra`.
    Forbidden(&'static str),
    CircuitOpen,
    Bulkhead,
    /// The client failed its own request body: bad framing (400), went away (499, nginx's
    /// code: nobody reads the answer), or too slow to send it (408).
    Client(crate::body::ClientFault),
}

impl Reject {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Reject::NoRoute => StatusCode::NOT_FOUND,
            Reject::NoInstance
            | Reject::NoVersion
            | Reject::CircuitOpen
            | Reject::Bulkhead
            | Reject::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            Reject::HeadTimeout => StatusCode::REQUEST_TIMEOUT,
            Reject::UpstreamError => StatusCode::BAD_GATEWAY,
            Reject::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reject::BadRequest(_) | Reject::Malformed(_) => StatusCode::BAD_REQUEST,
            Reject::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reject::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reject::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Reject::Forbidden(_) => StatusCode::FORBIDDEN,
            Reject::Client(ClientFault::Malformed) => StatusCode::BAD_REQUEST,
            Reject::Client(ClientFault::Slow) => StatusCode::REQUEST_TIMEOUT,
            Reject::Client(ClientFault::Closed) => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
        }
    }

    pub(crate) fn code(self) -> &'static str {
        match self {
            Reject::NoRoute => "no_route",
            Reject::NoInstance => "no_healthy_instance",
            Reject::NoVersion => "no_matching_version",
            Reject::UpstreamError => "upstream_unavailable",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::BadRequest(_) => "bad_request",
            Reject::Malformed(_) => "malformed_request",
            Reject::TooLarge => "body_too_large",
            Reject::HeadTooLarge => "request_head_too_large",
            Reject::HeadTimeout => "header_read_timeout",
            Reject::TooManyConnections => "max_connections",
            Reject::RateLimited => "rate_limited",
            Reject::Unauthenticated(d) => d.as_str(),
            Reject::Forbidden(reason) => reason,
            Reject::CircuitOpen => "circuit_open",
            Reject::Bulkhead => "concurrency_limit",
            Reject::Client(ClientFault::Malformed) => "malformed_request_body",
            Reject::Client(ClientFault::Closed) => "client_closed_request",
            Reject::Client(ClientFault::Slow) => "request_body_timeout",
        }
    }
}

impl Gateway {
    /// 401 or 403 from the route's authentication: counted by reason, with `WWW-Authenticate`.
    pub(crate) fn refuse(
        &self,
        ctx: &Ctx,
        route: &CompiledRoute,
        refusal: &crate::auth::Refusal,
        path: &str,
    ) -> Response<RespBody> {
        use crate::auth::Refusal;
        if let (Refusal::Forbidden(f), Some(o)) = (refusal, self.refusals.get()) {
            let caller = match f {
                gantry_authn::Forbidden::CallNotAllowed { caller, .. } => Some(caller.as_str()),
                gantry_authn::Forbidden::NotPublic => None,
                _ => return self.refuse_answer(ctx, route, refusal),
            };
            o.refused(&crate::Refused {
                reason: f.as_str(),
                caller,
                service: &route.service,
                route: &route.id,
                method: ctx.method.as_str(),
                path,
                client: ctx.client.ip(),
                request_id: ctx.request_id.to_str().unwrap_or(""),
            });
        }
        self.refuse_answer(ctx, route, refusal)
    }

    fn refuse_answer(
        &self,
        ctx: &Ctx,
        route: &CompiledRoute,
        refusal: &crate::auth::Refusal,
    ) -> Response<RespBody> {
        use crate::auth::Refusal;
        let (why, message) = match refusal {
            Refusal::Unauthenticated(d) => (Reject::Unauthenticated(*d), None),
            Refusal::Forbidden(f) => (Reject::Forbidden(f.as_str()), Some(f.to_string())),
        };
        self.metrics.auth_denied(why.code());
        let mut resp = self.finish_reject(ctx, Some(route), why, message.as_deref());
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, crate::auth::challenge(refusal));
        resp
    }

    /// A request the HTTP/1.1 server refused before it could be routed (bad framing, a head
    /// too large): answered as JSON and counted like every other rejection.
    pub(crate) fn reject_unparsed(
        &self,
        why: Reject,
        peer: SocketAddr,
        extra: Option<&str>,
    ) -> Response<RespBody> {
        let start = Instant::now();
        let ctx = Ctx {
            start,
            start_ms: crate::endpoints::ms_at(start),
            end_ms: 0,
            request_id: self.ids.next(),
            traceparent: HeaderValue::from_static(""),
            trace_id: [b'0'; 32],
            span_id: [b'0'; 16],
            method: Method::GET,
            version: Version::HTTP_11,
            end: None,
            path: String::new(),
            normalized: None,
            seen: Seen::default(),
            client: peer,
            tls: false,
            host: Host::None,
        };
        self.finish_reject(&ctx, None, why, extra)
    }

    pub(crate) fn finish_reject(
        &self,
        ctx: &Ctx,
        route: Option<&CompiledRoute>,
        why: Reject,
        extra: Option<&str>,
    ) -> Response<RespBody> {
        let resp = self.reject(why, route.map(|r| &*r.service), ctx, extra);
        // A route's answers, its rejections included, are counted once, where `handle` gets
        // them back from `forward`; only those that never reached a route are counted here.
        if route.is_none() {
            self.no_route.record(
                clock_ms(),
                resp.status().as_u16(),
                ctx.start.elapsed().as_secs_f64(),
            );
        }
        self.observe_now(
            ctx,
            route,
            "",
            None,
            resp.status().as_u16(),
            Some(why.code()),
            0,
            None,
        );
        resp
    }

    pub(crate) fn reject(
        &self,
        why: Reject,
        service: Option<&str>,
        ctx: &Ctx,
        extra: Option<&str>,
    ) -> Response<RespBody> {
        self.metrics.reject(why.code());
        let svc = service.unwrap_or("?");
        let message = match why {
            Reject::NoRoute => format!("no route matches {}", extra.unwrap_or("the request")),
            Reject::NoInstance => format!("service {svc} has no healthy instance"),
            Reject::NoVersion => format!(
                "service {svc} has no healthy instance matching version {}",
                extra.unwrap_or("?")
            ),
            Reject::UpstreamError => {
                format!("could not get a response from any instance of service {svc}")
            }
            Reject::UpstreamTimeout => {
                format!("service {svc} did not answer within the route's timeout")
            }
            Reject::BadRequest(m) | Reject::Malformed(m) => m.to_string(),
            Reject::TooLarge => format!(
                "request body is larger than the route allows ({} bytes)",
                extra.unwrap_or("?")
            ),
            Reject::HeadTooLarge => format!(
                "request line and headers are larger than the gateway allows ({})",
                extra.unwrap_or("?")
            ),
            Reject::HeadTimeout => format!(
                "the request head did not arrive within {} ms",
                extra.unwrap_or("?")
            ),
            Reject::TooManyConnections => {
                "the gateway has as many connections open as it allows; retry shortly".into()
            }
            Reject::RateLimited => {
                "rate limit exceeded; retry after the time in Retry-After".into()
            }
            Reject::Unauthenticated(d) => d.describe().to_string(),
            Reject::Forbidden(_) => extra.unwrap_or("not allowed").to_string(),
            Reject::CircuitOpen => format!("service {svc} is failing; its circuit breaker is open"),
            Reject::Bulkhead => format!("service {svc} has too many requests in flight"),
            Reject::Client(ClientFault::Malformed) => {
                "the request body's framing is malformed".into()
            }
            Reject::Client(ClientFault::Closed) => {
                "the client closed the connection before its request body ended".into()
            }
            Reject::Client(ClientFault::Slow) => {
                "the request body did not arrive within the route's timeout".into()
            }
        };
        // Answers of the gateway's own always carry an id, `request_id` off or not.
        let rid = if ctx.request_id.is_empty() {
            self.ids.next()
        } else {
            ctx.request_id.clone()
        };
        let body = serde_json::json!({
            "error": why.code(),
            "message": message,
            "service": service,
            "request_id": rid.to_str().unwrap_or(""),
        });
        let mut resp = Response::new(RespBody::full(body.to_string()));
        *resp.status_mut() = why.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(X_REQUEST_ID.clone(), rid);
        if matches!(
            why,
            Reject::NoInstance
                | Reject::NoVersion
                | Reject::CircuitOpen
                | Reject::Bulkhead
                | Reject::TooManyConnections
        ) {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
