//! Every line instances write to stdout and stderr (and the gateway's access log): the newest
//! kept in memory up to a byte budget and streamed to followers, all of them written to disk
//! (a `SegmentLog` stream, retention by size and age) by a writer task, and searched there.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gantry_store::{Append, Log, ReadFrom, StreamOptions};

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
    /// Only lines before this wall-clock time.
    pub until_ms: Option<u64>,
    /// Only lines this regular expression finds something in.
    pub grep: Option<regex::Regex>,
    /// Only lines at this level or above (lines without a level do not match).
    pub level: Option<Level>,
    /// Only JSON lines whose top-level fields have these values.
    pub fields: Vec<(String, String)>,
    /// Only lines that name this request id or trace id (a JSON line's `request_id` /
    /// `trace_id` field, or the id anywhere in the text).
    pub correlate: Option<String>,
    /// Only the last N matching lines.
    pub tail: Option<usize>,
}

impl LogFilter {
    pub fn matches(&self, l: &LogLine) -> bool {
        if !(self.service.as_deref().is_none_or(|s| *l.service == *s)
            && self.instance.as_deref().is_none_or(|i| *l.instance == *i)
            && self.since_ms.is_none_or(|t| l.ts_ms >= t)
            && self.until_ms.is_none_or(|t| l.ts_ms < t)
            && self.grep.as_ref().is_none_or(|r| r.is_match(&l.line)))
        {
            return false;
        }
        if self.level.is_none() && self.fields.is_empty() && self.correlate.is_none() {
            return true;
        }
        let json = l.json();
        if let Some(min) = self.level {
            if level_of(&l.line, json.as_ref()).is_none_or(|lv| lv < min) {
                return false;
            }
        }
        for (k, v) in &self.fields {
            if json
                .as_ref()
                .and_then(|j| j.get(k))
                .is_none_or(|f| !value_is(f, v))
            {
                return false;
            }
        }
        if let Some(id) = &self.correlate {
            let named = json.as_ref().is_some_and(|j| {
                ["request_id", "trace_id"]
                    .iter()
                    .any(|k| j.get(*k).is_some_and(|f| value_is(f, id)))
            });
            if !named && !l.line.contains(id.as_str()) {
                return false;
            }
        }
        true
    }
}

fn value_is(f: &serde_json::Value, want: &str) -> bool {
    match f {
        serde_json::Value::String(s) => s == want,
        serde_json::Value::Number(n) => n.to_string() == want,
        serde_json::Value::Bool(b) => (if *b { "true" } else { "false" }) == want,
        serde_json::Value::Null => want == "null",
        _ => false,
    }
}

/// A line's severity, from a JSON line's `level` (or `severity`, `levelname`, `lvl`) or a
/// level word near the start of a text line (`ERROR`, `[warn]`, `level=info`).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Fatal,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.to_ascii_lowercase().as_str() {
            "trace" => Level::Trace,
            "debug" | "dbug" => Level::Debug,
            "info" | "information" | "notice" => Level::Info,
            "warn" | "warning" => Level::Warn,
            "error" | "err" => Level::Error,
            "fatal" | "critical" | "crit" | "panic" | "emerg" | "alert" => Level::Fatal,
            _ => return None,
        })
    }
}

/// The level of a line (its parsed JSON when it is a JSON object).
pub fn level_of(
    line: &str,
    json: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Option<Level> {
    if let Some(j) = json {
        return ["level", "severity", "levelname", "lvl", "log.level"]
            .iter()
            .find_map(|k| j.get(*k)?.as_str())
            .and_then(Level::parse);
    }
    // A level word among the first few words of a text line.
    let head: String = line.chars().take(96).collect();
    head.split(|c: char| !c.is_ascii_alphabetic() && c != '=')
        .filter(|w| !w.is_empty())
        .take(6)
        .find_map(|w| {
            let w = w.strip_prefix("level=").unwrap_or(w);
            // Upper case (ERROR) or a bracketed/keyed lower-case form; "error" inside a
            // sentence is not a level.
            (w.chars().all(|c| c.is_ascii_uppercase())
                || head.contains(&format!("[{w}]"))
                || head.contains(&format!("level={w}")))
            .then(|| Level::parse(w))
            .flatten()
        })
}

impl LogLine {
    /// The line as a JSON object, if it is one.
    pub fn json(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        if !self.line.trim_start().starts_with('{') {
            return None;
        }
        match serde_json::from_str(&self.line) {
            Ok(serde_json::Value::Object(m)) => Some(m),
            _ => None,
        }
    }

    pub fn level(&self) -> Option<Level> {
        level_of(&self.line, self.json().as_ref())
    }
}

struct Inner {
    lines: VecDeque<Arc<LogLine>>,
    bytes: u64,
    next_seq: u64,
}

/// The on-disk side: the stream the writer appends to.
struct Archive {
    log: Arc<dyn Log>,
    queue: tokio::sync::mpsc::Sender<Arc<LogLine>>,
    /// The highest seq written, for `flush`.
    written: Arc<AtomicU64>,
    /// Bytes of lines waiting for the writer.
    queued: Arc<AtomicU64>,
    wrote: Arc<tokio::sync::Notify>,
}

/// The stream every line goes to.
pub const LOG_STREAM: &str = "lines";

/// Lines waiting for the writer; beyond this (or `QUEUE_BYTES`) a line is kept in memory only
/// (and counted).
const QUEUE: usize = 65_536;
const QUEUE_BYTES: u64 = 64 << 20;
/// The largest record a line becomes: a line of `MAX_LINE_BYTES` of control characters is six
/// times longer as JSON (`\u0000`), plus the record's other fields.
pub const MAX_RECORD_BYTES: u32 = 6 * MAX_LINE_BYTES as u32 + 4096;
/// Lines per append (one group commit).
const BATCH: usize = 4096;
/// A search reads at most this many records from disk.
const MAX_SCAN: u64 = 2_000_000;

/// Instance output: the newest lines in memory with live followers, every line on disk.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
    max_bytes: u64,
    tx: broadcast::Sender<Arc<LogLine>>,
    archive: Option<Arc<Archive>>,
    m: Arc<LogMetrics>,
}

struct LogMetrics {
    lines_total: Counter,
    dropped_total: Counter,
    kept_bytes: Gauge,
    stored_total: Counter,
    unstored_total: Counter,
}

/// Longest line kept; longer output is split into several lines.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

impl LogStore {
    /// In memory only (tests, and tools that keep no data directory).
    pub fn new(max_bytes: u64, metrics: &Metrics) -> Self {
        Self::build(max_bytes, metrics, None, 1)
    }

    /// In memory and on disk: every line is appended to `log`'s stream [`LOG_STREAM`] with
    /// `retention`; seqs continue from the last stored line. Spawns the writer (call within a
    /// runtime).
    pub async fn open(
        max_bytes: u64,
        metrics: &Metrics,
        log: Arc<dyn Log>,
        retention: StreamOptions,
    ) -> Result<Self, gantry_store::StoreError> {
        log.ensure_stream(LOG_STREAM, retention).await?;
        let info = log.info(LOG_STREAM).await?.unwrap_or_default();
        let last = if info.last_seq >= info.first_seq && info.last_seq > 0 {
            log.read(LOG_STREAM, ReadFrom::Seq(info.last_seq), 1, Duration::ZERO)
                .await?
                .first()
                .and_then(|r| serde_json::from_slice::<LogLine>(&r.data).ok())
                .map_or(info.last_seq, |l| l.seq.max(info.last_seq))
        } else {
            info.last_seq
        };
        let (queue, rx) = tokio::sync::mpsc::channel(QUEUE);
        let archive = Arc::new(Archive {
            log,
            queue,
            written: Arc::new(AtomicU64::new(last)),
            queued: Arc::new(AtomicU64::new(0)),
            wrote: Arc::new(tokio::sync::Notify::new()),
        });
        let store = Self::build(max_bytes, metrics, Some(archive.clone()), last + 1);
        // The writer holds no sender: it ends once every clone of the store is gone.
        tokio::spawn(write_lines(
            archive.log.clone(),
            archive.written.clone(),
            archive.queued.clone(),
            archive.wrote.clone(),
            rx,
            store.m.clone(),
        ));
        Ok(store)
    }

    fn build(max_bytes: u64, metrics: &Metrics, archive: Option<Arc<Archive>>, next: u64) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let m = Arc::new(LogMetrics {
            lines_total: Counter::default(),
            dropped_total: Counter::default(),
            kept_bytes: Gauge::default(),
            stored_total: Counter::default(),
            unstored_total: Counter::default(),
        });
        metrics.register("logs", |r| {
            r.register(
                "lines",
                "Lines captured from instance stdout and stderr",
                m.lines_total.clone(),
            );
            r.register(
                "evicted_lines",
                "Lines dropped from memory to stay within logs.max_bytes (they stay on disk)",
                m.dropped_total.clone(),
            );
            r.register(
                "kept_bytes",
                "Bytes of instance output held in memory",
                m.kept_bytes.clone(),
            );
            r.register(
                "stored_lines",
                "Lines written to disk (fsynced)",
                m.stored_total.clone(),
            );
            r.register(
                "unstored_lines",
                "Lines never written to disk: the writer's queue was full, or the write failed",
                m.unstored_total.clone(),
            );
        });
        Self {
            inner: Arc::new(Mutex::new(Inner {
                lines: VecDeque::new(),
                bytes: 0,
                next_seq: next,
            })),
            max_bytes,
            tx,
            archive,
            m,
        }
    }

    /// Record one line (without its line terminator).
    pub fn push(
        &self,
        service: &Arc<str>,
        instance: &Arc<str>,
        stream: LogStream,
        mut line: String,
    ) {
        if line.len() > MAX_LINE_BYTES {
            let mut end = MAX_LINE_BYTES;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
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
                        self.m.dropped_total.inc();
                    }
                    None => break,
                }
            }
            self.m.kept_bytes.set(g.bytes as i64);
            // Queued under the lock: the writer gets lines in seq order.
            if let Some(a) = &self.archive {
                // Counted before the send, so that the writer never subtracts what was not
                // added yet.
                let cost = l.cost();
                let before = a.queued.fetch_add(cost, Ordering::Relaxed);
                if before + cost > QUEUE_BYTES || a.queue.try_send(l.clone()).is_err() {
                    a.queued.fetch_sub(cost, Ordering::Relaxed);
                    self.m.unstored_total.inc();
                }
            }
            l
        };
        self.m.lines_total.inc();
        // No receivers is fine.
        let _ = self.tx.send(line);
    }

    /// Lines kept in memory matching `filter`, oldest first.
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

    /// Lines matching `filter`, oldest first, from disk and memory: at most `limit` (the first
    /// ones, or with `tail` the last ones). The second value says whether the search stopped
    /// at `limit` or at its scan bound with more left to look at.
    pub async fn search(
        &self,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<(Vec<Arc<LogLine>>, bool), gantry_store::StoreError> {
        let Some(a) = &self.archive else {
            let mut v = self.query(filter);
            let more = v.len() > limit;
            if filter.tail.is_none() {
                v.truncate(limit);
            } else {
                v.drain(..v.len().saturating_sub(limit));
            }
            return Ok((v, more));
        };
        let want = filter.tail.unwrap_or(limit).min(limit);
        let info = a.log.info(LOG_STREAM).await?.unwrap_or_default();
        let (mut found, mut last_read, mut more) = if filter.tail.is_some() {
            search_back(a, filter, want, info.first_seq, info.last_seq).await?
        } else {
            search_forward(a, filter, want, info.first_seq, info.last_seq).await?
        };
        // What memory has that the disk does not yet (queued for the writer).
        if found.len() < want || filter.tail.is_some() {
            for l in self.query(&LogFilter {
                tail: None,
                ..filter.clone()
            }) {
                if l.seq > last_read {
                    last_read = l.seq;
                    found.push(l);
                }
            }
        }
        if found.len() > want {
            more = true;
            if filter.tail.is_some() {
                found.drain(..found.len() - want);
            } else {
                found.truncate(want);
            }
        }
        Ok((found, more))
    }

    /// Wait until every line pushed so far is on disk (or up to `limit`); true if it is.
    pub async fn flush(&self, limit: Duration) -> bool {
        let Some(a) = &self.archive else {
            return true;
        };
        let target = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_seq
            - 1;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = a.wrote.notified();
            if a.written.load(Ordering::Acquire) >= target {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return a.written.load(Ordering::Acquire) >= target;
            }
        }
    }

    /// Lines pushed from now on. Subscribe before [`query`](Self::query) and skip lines whose
    /// `seq` the query already returned, to follow without gaps or repeats.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LogLine>> {
        self.tx.subscribe()
    }
}

/// The writer: batches of queued lines appended (one group commit each), in seq order.
async fn write_lines(
    log: Arc<dyn Log>,
    written: Arc<AtomicU64>,
    queued: Arc<AtomicU64>,
    wrote: Arc<tokio::sync::Notify>,
    mut rx: tokio::sync::mpsc::Receiver<Arc<LogLine>>,
    m: Arc<LogMetrics>,
) {
    let mut batch: Vec<Arc<LogLine>> = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let last = batch.last().map_or(0, |l| l.seq);
        let bytes: u64 = batch.iter().map(|l| l.cost()).sum();
        let appends: Vec<Append> = batch.iter().map(|l| record_of(l)).collect();
        let n = appends.len() as u64;
        let ok = match log.append(LOG_STREAM, appends).await {
            Ok(_) => {
                m.stored_total.inc_by(n);
                true
            }
            Err(e @ gantry_store::StoreError::TooLarge(_)) => {
                // One record too large refuses the batch: the others go one by one.
                tracing::warn!(error = %e, lines = n, "logs: a line too large for the disk");
                let mut all = true;
                for l in &batch {
                    match log.append(LOG_STREAM, vec![record_of(l)]).await {
                        Ok(_) => {
                            m.stored_total.inc();
                        }
                        Err(_) => {
                            m.unstored_total.inc();
                            all = false;
                        }
                    }
                }
                all
            }
            Err(e) => {
                m.unstored_total.inc_by(n);
                tracing::warn!(error = %e, lines = n, "logs: writing to disk failed");
                false
            }
        };
        batch.clear();
        queued.fetch_sub(bytes, Ordering::Relaxed);
        if ok {
            written.fetch_max(last, Ordering::Release);
        }
        wrote.notify_waiters();
    }
}

/// A line as it is stored (its text cut, should its JSON still be too large).
fn record_of(l: &LogLine) -> Append {
    let mut data = serde_json::to_vec(l).unwrap_or_default();
    if data.len() > MAX_RECORD_BYTES as usize {
        let mut cut = l.clone();
        let mut end = cut.line.len() / 2;
        while !cut.line.is_char_boundary(end) {
            end -= 1;
        }
        cut.line.truncate(end);
        data = serde_json::to_vec(&cut).unwrap_or_default();
    }
    Append { id: None, data }
}

/// Decoded lines of one read.
async fn read_lines(
    a: &Archive,
    from: ReadFrom,
    max: usize,
) -> Result<Vec<(u64, Option<LogLine>)>, gantry_store::StoreError> {
    Ok(a.log
        .read(LOG_STREAM, from, max, Duration::ZERO)
        .await?
        .into_iter()
        .map(|r| (r.seq, serde_json::from_slice::<LogLine>(&r.data).ok()))
        .collect())
}

/// Forward from `since` (or the oldest line) until `want` match, `until`, or the end.
async fn search_forward(
    a: &Archive,
    f: &LogFilter,
    want: usize,
    first: u64,
    last: u64,
) -> Result<(Vec<Arc<LogLine>>, u64, bool), gantry_store::StoreError> {
    let mut from = match f.since_ms {
        Some(t) => ReadFrom::Time(t),
        None => ReadFrom::Seq(first),
    };
    let (mut out, mut last_read, mut scanned) = (Vec::new(), 0u64, 0u64);
    loop {
        let recs = read_lines(a, from, 2048).await?;
        let Some(&(end, _)) = recs.last() else {
            return Ok((out, last_read, false));
        };
        for (_, l) in recs {
            let Some(l) = l else { continue };
            last_read = last_read.max(l.seq);
            if f.until_ms.is_some_and(|u| l.ts_ms >= u) {
                return Ok((out, u64::MAX, false));
            }
            if f.matches(&l) {
                out.push(Arc::new(l));
                if out.len() > want {
                    return Ok((out, u64::MAX, true));
                }
            }
        }
        scanned += 2048;
        if end >= last {
            return Ok((out, last_read, false));
        }
        if scanned >= MAX_SCAN {
            return Ok((out, u64::MAX, true));
        }
        from = ReadFrom::Seq(end + 1);
    }
}

/// Backwards from the newest line in growing windows until `want` match (or `since`, or the
/// oldest line).
async fn search_back(
    a: &Archive,
    f: &LogFilter,
    want: usize,
    first: u64,
    last: u64,
) -> Result<(Vec<Arc<LogLine>>, u64, bool), gantry_store::StoreError> {
    let mut found: Vec<Arc<LogLine>> = Vec::new();
    // The newest line's own seq (lines' seqs and the log's can differ: a line that never
    // reached the disk still took its seq).
    let mut newest = 0u64;
    let mut hi = last; // the window is (lo, hi]
    let mut window = (want as u64 * 4).max(4096);
    let mut scanned = 0u64;
    while hi >= first && hi > 0 {
        let lo = hi.saturating_sub(window).max(first.saturating_sub(1));
        let mut chunk = Vec::new();
        let mut reached_since = false;
        let mut seq = lo + 1;
        while seq <= hi {
            let recs = read_lines(a, ReadFrom::Seq(seq), 2048).await?;
            let Some(&(end, _)) = recs.last() else { break };
            for (s, l) in recs {
                if s > hi {
                    break;
                }
                let Some(l) = l else { continue };
                newest = newest.max(l.seq);
                if f.since_ms.is_some_and(|t| l.ts_ms < t) {
                    reached_since = true;
                    continue;
                }
                if f.matches(&l) {
                    chunk.push(Arc::new(l));
                }
            }
            seq = end + 1;
        }
        scanned += hi - lo;
        chunk.append(&mut found);
        found = chunk;
        if found.len() >= want || reached_since || lo < first {
            break;
        }
        if scanned >= MAX_SCAN {
            return Ok((found, newest, true));
        }
        hi = lo;
        window = window.saturating_mul(4);
    }
    let more = found.len() > want;
    Ok((found, newest, more))
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

    fn disk(dir: &std::path::Path) -> Arc<dyn Log> {
        Arc::new(gantry_store::SegmentLog::open(dir).unwrap())
    }

    async fn lines(store: &LogStore, f: LogFilter, limit: usize) -> Vec<String> {
        let (v, _) = store.search(&f, limit).await.unwrap();
        v.iter().map(|l| l.line.clone()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lines_are_stored_searched_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let open = || async {
            LogStore::open(
                256,
                &Metrics::new(),
                disk(dir.path()),
                StreamOptions::default(),
            )
            .await
            .unwrap()
        };
        let store = open().await;
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let (a1, b1): (Arc<str>, Arc<str>) = ("a-1".into(), "b-1".into());
        for i in 0..300 {
            store.push(&a, &a1, LogStream::Stdout, format!("INFO a line {i}"));
        }
        store.push(
            &b,
            &b1,
            LogStream::Stdout,
            r#"{"level":"error","msg":"boom","request_id":"r-42","order":7}"#.into(),
        );
        store.push(&b, &b1, LogStream::Stderr, "WARN disk nearly full".into());
        store.push(&b, &b1, LogStream::Stderr, "an error in a sentence".into());
        store.push(&b, &b1, LogStream::Stdout, "saw request r-42 too".into());
        assert!(store.flush(Duration::from_secs(10)).await);
        // Memory holds only the newest few (256 bytes); the disk has all.
        assert!(store.query(&LogFilter::default()).len() < 10);
        let all = lines(&store, LogFilter::default(), 10_000).await;
        assert_eq!(all.len(), 304);
        assert_eq!(all[0], "INFO a line 0");
        let f = |f: LogFilter| f;
        assert_eq!(
            lines(
                &store,
                f(LogFilter {
                    service: Some("a".into()),
                    tail: Some(2),
                    ..Default::default()
                }),
                100
            )
            .await,
            ["INFO a line 298", "INFO a line 299"]
        );
        assert_eq!(
            lines(
                &store,
                f(LogFilter {
                    level: Some(Level::Warn),
                    ..Default::default()
                }),
                100
            )
            .await,
            [
                r#"{"level":"error","msg":"boom","request_id":"r-42","order":7}"#,
                "WARN disk nearly full"
            ]
        );
        assert_eq!(
            lines(
                &store,
                f(LogFilter {
                    fields: vec![("order".into(), "7".into())],
                    ..Default::default()
                }),
                100
            )
            .await
            .len(),
            1
        );
        assert_eq!(
            lines(
                &store,
                f(LogFilter {
                    correlate: Some("r-42".into()),
                    ..Default::default()
                }),
                100
            )
            .await
            .len(),
            2
        );
        assert_eq!(
            lines(
                &store,
                f(LogFilter {
                    grep: Some(regex::Regex::new("line 1[0-9]$").unwrap()),
                    ..Default::default()
                }),
                100
            )
            .await
            .len(),
            10
        );
        // A limit: the first ones, and says there is more.
        let (v, more) = store.search(&LogFilter::default(), 5).await.unwrap();
        assert!(more && v.len() == 5 && v[0].line == "INFO a line 0");
        let last_seq = all.len() as u64;
        drop(store);

        // Reopened: seqs go on from the last stored line, old lines still there.
        let store = open().await;
        store.push(&a, &a1, LogStream::Stdout, "after the restart".into());
        assert!(store.flush(Duration::from_secs(10)).await);
        let (v, _) = store
            .search(
                &LogFilter {
                    tail: Some(2),
                    ..Default::default()
                },
                100,
            )
            .await
            .unwrap();
        assert_eq!(v[1].line, "after the restart");
        assert_eq!(v[1].seq, last_seq + 1);
        assert_eq!(v[0].seq, last_seq);
        // A time range.
        let t = v[1].ts_ms;
        let (before, _) = store
            .search(
                &LogFilter {
                    until_ms: Some(t),
                    tail: Some(1),
                    ..Default::default()
                },
                100,
            )
            .await
            .unwrap();
        assert!(before.iter().all(|l| l.ts_ms < t));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_keeps_the_newest_lines_and_only_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let retention = StreamOptions {
            max_bytes: Some(64 * 1024),
            ..Default::default()
        };
        let log = disk(dir.path());
        let store = LogStore::open(1 << 20, &Metrics::new(), log.clone(), retention)
            .await
            .unwrap();
        let (s, i): (Arc<str>, Arc<str>) = ("s".into(), "s-1".into());
        for n in 0..3000 {
            store.push(
                &s,
                &i,
                LogStream::Stdout,
                format!("line {n:05} {}", "x".repeat(80)),
            );
        }
        assert!(store.flush(Duration::from_secs(10)).await);
        // Only the disk (memory holds everything here, so ask the disk through a fresh store).
        drop(store);
        let store = LogStore::open(64, &Metrics::new(), log, retention)
            .await
            .unwrap();
        let (v, _) = store.search(&LogFilter::default(), 10_000).await.unwrap();
        assert!(v.len() > 100 && v.len() < 3000, "{}", v.len());
        // A contiguous run that ends with the newest line.
        assert_eq!(v.last().unwrap().seq, 3000);
        assert!(v.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        let bytes: usize = v
            .iter()
            .map(|l| serde_json::to_vec(&**l).unwrap().len())
            .sum();
        assert!(bytes <= 64 * 1024, "{bytes}");
    }

    #[test]
    fn levels_are_read_from_json_and_text() {
        for (line, want) in [
            (r#"{"level":"WARNING","msg":"x"}"#, Some(Level::Warn)),
            (r#"{"severity":"error"}"#, Some(Level::Error)),
            (r#"{"levelname":"INFO"}"#, Some(Level::Info)),
            (r#"{"msg":"no level"}"#, None),
            (
                "2026-12-06T10:00:00Z ERROR payment failed",
                Some(Level::Error),
            ),
            ("[warn] slow disk", Some(Level::Warn)),
            ("ts=1 level=debug msg=x", Some(Level::Debug)),
            ("there was an error here", None),
            ("plain output", None),
        ] {
            let l = LogLine {
                seq: 1,
                ts_ms: 1,
                service: "s".into(),
                instance: "s-1".into(),
                stream: LogStream::Stdout,
                line: line.into(),
            };
            assert_eq!(l.level(), want, "{line}");
        }
    }
}
