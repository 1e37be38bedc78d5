//! Every line instances write to stdout and stderr, kept in memory up to a byte budget
//! (oldest lines are dropped first) and streamed to followers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::Metrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One captured line.
#[derive(Clone, Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct LogLine {
    /// Position in the store; increases by one per line, over all instances.
    pub seq: u64,
    pub ts_ms: u64,
    #[schema(value_type = String)]
    pub service: Arc<str>,
    #[schema(value_type = String)]
    pub instance: Arc<str>,
    pub stream: LogStream,
    pub line: String,
}

impl LogLine {
    fn cost(&self) -> u64 {
        // Text plus a fixed overhead for the record itself.
        (self.line.len() + 64) as u64
    }
}

/// Which lines a reader wants.
#[derive(Clone, Debug, Default)]
pub struct LogFilter {
    pub service: Option<String>,
    pub instance: Option<String>,
    /// Only lines at or after this wall-clock time.
    pub since_ms: Option<u64>,
    /// Only the last N matching lines (of those kept).
    pub tail: Option<usize>,
}

impl LogFilter {
    pub fn matches(&self, l: &LogLine) -> bool {
        self.service.as_deref().is_none_or(|s| *l.service == *s)
            && self.instance.as_deref().is_none_or(|i| *l.instance == *i)
            && self.since_ms.is_none_or(|t| l.ts_ms >= t)
    }
}

struct Inner {
    lines: VecDeque<Arc<LogLine>>,
    bytes: u64,
    next_seq: u64,
}

/// Bounded in-memory log store with live followers.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
    max_bytes: u64,
    tx: broadcast::Sender<Arc<LogLine>>,
    lines_total: Counter,
    dropped_total: Counter,
    kept_bytes: Gauge,
}

/// Longest line kept; longer output is split into several lines.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

impl LogStore {
    pub fn new(max_bytes: u64, metrics: &Metrics) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let lines_total = Counter::default();
        let dropped_total = Counter::default();
        let kept_bytes = Gauge::default();
        metrics.register("logs", |r| {
            r.register(
                "lines",
                "Lines captured from instance stdout and stderr",
                lines_total.clone(),
            );
            r.register(
                "evicted_lines",
                "Lines dropped from memory to stay within logs.max_bytes",
                dropped_total.clone(),
            );
            r.register(
                "kept_bytes",
                "Bytes of instance output held in memory",
                kept_bytes.clone(),
            );
        });
        Self {
            inner: Arc::new(Mutex::new(Inner {
                lines: VecDeque::new(),
                bytes: 0,
                next_seq: 1,
            })),
            max_bytes,
            tx,
            lines_total,
            dropped_total,
            kept_bytes,
        }
    }

    /// Record one line (without its line terminator).
    pub fn push(&self, service: &Arc<str>, instance: &Arc<str>, stream: LogStream, line: String) {
        let line = {
            let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            let l = Arc::new(LogLine {
                seq: g.next_seq,
                ts_ms: gantry_model::unix_ms(),
                service: service.clone(),
                instance: instance.clone(),
                stream,
                line,
            });
            g.next_seq += 1;
            g.bytes += l.cost();
            g.lines.push_back(l.clone());
            while g.bytes > self.max_bytes {
                match g.lines.pop_front() {
                    Some(old) => {
                        g.bytes -= old.cost();
                        self.dropped_total.inc();
                    }
                    None => break,
                }
            }
            self.kept_bytes.set(g.bytes as i64);
            l
        };
        self.lines_total.inc();
        // No receivers is fine.
        let _ = self.tx.send(line);
    }

    /// Kept lines matching `filter`, oldest first.
    pub fn query(&self, filter: &LogFilter) -> Vec<Arc<LogLine>> {
        let g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<Arc<LogLine>> = g
            .lines
            .iter()
            .filter(|l| filter.matches(l))
            .cloned()
            .collect();
        if let Some(n) = filter.tail {
            let skip = out.len().saturating_sub(n);
            out.drain(..skip);
        }
        out
    }

    /// Lines pushed from now on. Subscribe before [`query`](Self::query) and skip lines whose
    /// `seq` the query already returned, to follow without gaps or repeats.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LogLine>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keeps_within_budget_and_filters() {
        let store = LogStore::new(4096, &Metrics::new());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let (a1, b1): (Arc<str>, Arc<str>) = ("a-1".into(), "b-1".into());
        for i in 0..200 {
            store.push(&a, &a1, LogStream::Stdout, format!("a line {i}"));
            store.push(&b, &b1, LogStream::Stderr, format!("b line {i}"));
        }
        let all = store.query(&LogFilter::default());
        let total: u64 = all.iter().map(|l| l.cost()).sum();
        assert!(total <= 4096, "{total}");
        assert!(all.len() > 10);
        // Newest lines are the ones kept, in order.
        assert_eq!(all.last().unwrap().line, "b line 199");
        assert!(all.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        let only_a = store.query(&LogFilter {
            service: Some("a".into()),
            tail: Some(3),
            ..Default::default()
        });
        assert_eq!(
            only_a.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
            ["a line 197", "a line 198", "a line 199"]
        );
    }

    #[tokio::test]
    async fn followers_see_new_lines() {
        let store = LogStore::new(1 << 20, &Metrics::new());
        let mut rx = store.subscribe();
        let (s, i): (Arc<str>, Arc<str>) = ("s".into(), "s-1".into());
        store.push(&s, &i, LogStream::Stdout, "hello".into());
        let got = rx.recv().await.unwrap();
        assert_eq!(got.line, "hello");
        assert_eq!(&*got.instance, "s-1");
    }
}
