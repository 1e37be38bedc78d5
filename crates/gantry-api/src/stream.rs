//! The one way the API streams: Server-Sent Events or newline-delimited JSON, fed by what was
//! there when the request came (initial items) and then by a broadcast channel, with a `lagged`
//! item when the client fell behind, keep-alives for SSE, and an end as soon as the client goes.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use http::header;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// How often an idle SSE stream sends a comment, so that proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `text/event-stream`: each item an event with its name, id and JSON data.
    Sse,
    /// `application/x-ndjson`: each item's JSON data on a line.
    Ndjson,
}

/// One item of a stream.
pub(crate) struct Item {
    pub event: &'static str,
    pub id: Option<String>,
    pub data: serde_json::Value,
}

impl Item {
    pub fn new(event: &'static str, data: impl serde::Serialize) -> Self {
        Self {
            event,
            id: None,
            data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null),
        }
    }

    pub fn with_id(mut self, id: impl ToString) -> Self {
        self.id = Some(id.to_string());
        self
    }

    fn encode(&self, format: Format) -> Bytes {
        let json = serde_json::to_string(&self.data).unwrap_or_else(|_| "null".into());
        match format {
            Format::Ndjson => Bytes::from(format!("{json}\n")),
            Format::Sse => {
                let mut s = format!("event: {}\n", self.event);
                if let Some(id) = &self.id {
                    s.push_str(&format!("id: {id}\n"));
                }
                s.push_str(&format!("data: {json}\n\n"));
                Bytes::from(s)
            }
        }
    }
}

/// A finished response holding `items` (no following).
pub(crate) fn once(format: Format, items: impl IntoIterator<Item = Item>) -> Response {
    let mut out = Vec::new();
    for i in items {
        out.extend_from_slice(&i.encode(format));
    }
    (headers(format), out).into_response()
}

fn headers(format: Format) -> [(header::HeaderName, &'static str); 2] {
    let ct = match format {
        Format::Sse => "text/event-stream",
        Format::Ndjson => "application/x-ndjson",
    };
    [
        (header::CONTENT_TYPE, ct),
        (header::CACHE_CONTROL, "no-cache"),
    ]
}

/// `initial`, then `next(item)` for every item of `rx` (`None` skips it), until the client
/// goes away or the channel closes.
pub(crate) fn follow<T, F>(
    format: Format,
    initial: Vec<Item>,
    rx: broadcast::Receiver<T>,
    mut next: F,
) -> Response
where
    T: Clone + Send + 'static,
    F: FnMut(T) -> Option<Item> + Send + 'static,
{
    follow_async(format, initial, rx, move |t| std::future::ready(next(t)))
}

/// [`follow`] where making an item takes a wait (reading the store).
pub(crate) fn follow_async<T, F, Fut>(
    format: Format,
    initial: Vec<Item>,
    mut rx: broadcast::Receiver<T>,
    mut next: F,
) -> Response
where
    T: Clone + Send + 'static,
    F: FnMut(T) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<Item>> + Send,
{
    let (tx, out) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        for i in initial {
            if tx.send(i.encode(format)).await.is_err() {
                return;
            }
        }
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
        keep_alive.reset();
        loop {
            let got = tokio::select! {
                n = rx.recv() => n,
                _ = keep_alive.tick(), if format == Format::Sse => {
                    if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                        return;
                    }
                    continue;
                }
                _ = tx.closed() => return,
            };
            let item = match got {
                Ok(v) => match next(v).await {
                    Some(i) => i,
                    None => continue,
                },
                Err(broadcast::error::RecvError::Lagged(n)) => Item::new(
                    "lagged",
                    serde_json::json!({ "lagged": n, "hint": "items were missed; reconnect for a fresh start" }),
                ),
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(item.encode(format)).await.is_err() {
                return;
            }
        }
    });
    let body = Body::from_stream(ReceiverStream::new(out).map(Ok::<_, Infallible>));
    (headers(format), body).into_response()
}
