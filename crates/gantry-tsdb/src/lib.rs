//! Metrics history without a Prometheus: every `step` the sampler reads Gantry's own registry
//! (the same families `/metrics` serves) and appends one record of every series' value to a
//! segment log; a query (a PromQL subset, `eval.rs`) reads the records of its time range.
//!
//! Two streams in the tsdb's directory: `series` (one record per new series: its id, name and
//! labels; read whole at open) and `samples` (one record per step: its time and `(id, value)`
//! pairs), the latter with retention by age and size. Queries answer in the shape of
//! Prometheus's HTTP API (`vector`, `matrix`, `scalar`), so its clients can read them.
#![forbid(unsafe_code)]

pub mod eval;
pub mod sample;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gantry_store::{Append, Log, ReadFrom, StoreError, StreamOptions};
use gantry_telemetry::prometheus_client::metrics::counter::Counter;
use gantry_telemetry::prometheus_client::metrics::gauge::Gauge;
use gantry_telemetry::Metrics;
use serde::Serialize;

pub use sample::SeriesKey;

const SERIES: &str = "series";
const SAMPLES: &str = "samples";
/// A query reads at most this many sample records.
const MAX_RECORDS: usize = 200_000;
/// A query loads at most this many points (as Prometheus's `query.max-samples`).
const MAX_POINTS: usize = 5_000_000;
/// A range query evaluates at most this many steps, and answers at most this many values.
pub const MAX_STEPS: i64 = 11_000;
const MAX_VALUES: usize = 2_000_000;
/// A query's evaluation stops after this long.
const MAX_EVAL: Duration = Duration::from_secs(30);
/// The latest time a query may name: the year 9999.
pub const MAX_TIME_MS: i64 = 253_402_300_799_000;

/// Retention and resolution.
#[derive(Clone, Copy, Debug)]
pub struct TsdbOptions {
    /// How often the registry is sampled.
    pub step: Duration,
    pub max_age: Duration,
    pub max_bytes: u64,
}

#[derive(Default)]
struct Index {
    ids: HashMap<Arc<SeriesKey>, u32>,
    keys: Vec<Arc<SeriesKey>>,
}

/// The metrics history.
pub struct Tsdb {
    log: Arc<dyn Log>,
    index: Mutex<Index>,
    /// Serialises sampling (one record at a time, series before the samples naming them).
    write: tokio::sync::Mutex<()>,
    pub options: TsdbOptions,
    samples_total: Counter,
    series_gauge: Gauge,
    /// The last sampling's time: a wall clock stepped back does not put samples out of order.
    last_t: std::sync::atomic::AtomicI64,
}

/// A query's answer, as Prometheus's API gives it (`data` of `/api/v1/query`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
pub enum QueryResult {
    Vector(Vec<InstantSeries>),
    Matrix(Vec<RangeSeries>),
    Scalar((f64, String)),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InstantSeries {
    pub metric: std::collections::BTreeMap<String, String>,
    /// Time (unix seconds) and value (a string, as Prometheus writes it).
    pub value: (f64, String),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RangeSeries {
    pub metric: std::collections::BTreeMap<String, String>,
    pub values: Vec<(f64, String)>,
}

/// Why a query was refused.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The query is not PromQL, or uses what is not supported: the caller's mistake.
    #[error("{0}")]
    Bad(String),
    #[error("reading the metrics history: {0}")]
    Store(#[from] StoreError),
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

fn encode_samples(t: i64, values: &[(u32, f64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + values.len() * 12);
    out.extend_from_slice(&t.to_le_bytes());
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for (id, v) in values {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn decode_samples(b: &[u8]) -> Option<(i64, Vec<(u32, f64)>)> {
    let t = i64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    let n = u32::from_le_bytes(b.get(8..12)?.try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let at = 12 + i * 12;
        let id = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?);
        let v = f64::from_le_bytes(b.get(at + 4..at + 12)?.try_into().ok()?);
        out.push((id, v));
    }
    Some((t, out))
}

#[derive(Serialize, serde::Deserialize)]
struct SeriesRecord {
    id: u32,
    #[serde(flatten)]
    key: SeriesKey,
}

impl Tsdb {
    /// Open (or create) the history in `log`; the series index is read back whole.
    pub async fn open(
        log: Arc<dyn Log>,
        options: TsdbOptions,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, StoreError> {
        log.ensure_stream(
            SERIES,
            StreamOptions {
                max_record_bytes: 64 * 1024,
                ..Default::default()
            },
        )
        .await?;
        log.ensure_stream(
            SAMPLES,
            StreamOptions {
                max_age: Some(options.max_age),
                max_bytes: Some(options.max_bytes),
                max_record_bytes: StreamOptions::MAX_RECORD_BYTES,
                ..Default::default()
            },
        )
        .await?;
        let mut index = Index::default();
        let mut seq = 1;
        loop {
            let recs = log
                .read(SERIES, ReadFrom::Seq(seq), 4096, Duration::ZERO)
                .await?;
            let Some(last) = recs.last().map(|r| r.seq) else {
                break;
            };
            for r in recs {
                if let Ok(s) = serde_json::from_slice::<SeriesRecord>(&r.data) {
                    let key = Arc::new(s.key);
                    // Ids are dense and in order; a record that is not the next id is a
                    // duplicate of a crash's half-written sampling: the first one stands.
                    if s.id as usize == index.keys.len() {
                        index.ids.insert(key.clone(), s.id);
                        index.keys.push(key);
                    }
                }
            }
            seq = last + 1;
        }
        let samples_total = Counter::default();
        let series_gauge = Gauge::default();
        series_gauge.set(index.keys.len() as i64);
        metrics.register("tsdb", |r| {
            r.register(
                "samples",
                "Samples of Gantry's metrics written to the history",
                samples_total.clone(),
            );
            r.register("series", "Series the history knows", series_gauge.clone());
        });
        let info = log.info(SAMPLES).await?.unwrap_or_default();
        let last_t = if info.last_seq >= info.first_seq && info.last_seq > 0 {
            log.read(SAMPLES, ReadFrom::Seq(info.last_seq), 1, Duration::ZERO)
                .await?
                .first()
                .and_then(|r| decode_samples(&r.data))
                .map_or(0, |(t, _)| t)
        } else {
            0
        };
        Ok(Arc::new(Self {
            last_t: std::sync::atomic::AtomicI64::new(last_t),
            log,
            index: Mutex::new(index),
            write: tokio::sync::Mutex::new(()),
            options,
            samples_total,
            series_gauge,
        }))
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Record one sampling at `t_ms` (new series first, then the values).
    pub async fn record(
        &self,
        t_ms: i64,
        samples: Vec<(SeriesKey, f64)>,
    ) -> Result<(), StoreError> {
        let _w = self.write.lock().await;
        let t_ms = t_ms.max(self.last_t.load(std::sync::atomic::Ordering::Relaxed) + 1);
        let (new, values) = {
            let mut ix = self.index();
            let mut new = Vec::new();
            let mut values = Vec::with_capacity(samples.len());
            for (k, v) in samples {
                let id = match ix.ids.get(&k) {
                    Some(&id) => id,
                    None => {
                        let id = ix.keys.len() as u32;
                        new.push(SeriesRecord { id, key: k.clone() });
                        let k = Arc::new(k);
                        ix.ids.insert(k.clone(), id);
                        ix.keys.push(k);
                        id
                    }
                };
                values.push((id, v));
            }
            (new, values)
        };
        if !new.is_empty() {
            let batch = new
                .iter()
                .map(|s| Append {
                    id: None,
                    data: serde_json::to_vec(s).unwrap_or_default(),
                })
                .collect();
            if let Err(e) = self.log.append(SERIES, batch).await {
                // Forget them: the next sampling names them again.
                let mut ix = self.index();
                let first = new[0].id as usize;
                for k in ix.keys.drain(first..).collect::<Vec<_>>() {
                    ix.ids.remove(&k);
                }
                return Err(e);
            }
            self.series_gauge.set(self.index().keys.len() as i64);
        }
        let n = values.len() as u64;
        self.log
            .append(
                SAMPLES,
                vec![Append {
                    id: None,
                    data: encode_samples(t_ms, &values),
                }],
            )
            .await?;
        self.samples_total.inc_by(n);
        self.last_t
            .store(t_ms, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Sample `metrics` every `options.step` until `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        metrics: Metrics,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.options.step);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = tokio::select! {
                _ = tick.tick() => *stop.borrow(),
                _ = stop.changed() => true,
            };
            // At the stop, one last sample: the figures every other component left.
            let samples = sample::parse(&metrics.encode());
            let t = now_ms();
            if let Err(e) = self.record(t, samples).await {
                tracing::warn!(error = %e, "tsdb: recording a sample failed");
            }
            if last {
                return;
            }
        }
    }

    /// The series (and their points) the query's selectors match, in `[from, to]`.
    async fn load(
        &self,
        expr: &promql_parser::parser::Expr,
        from: i64,
        to: i64,
    ) -> Result<eval::Data, QueryError> {
        let mut sels = Vec::new();
        let mut range = Duration::ZERO;
        eval::selectors(expr, &mut sels, &mut range);
        let wanted: HashMap<u32, Arc<SeriesKey>> = {
            let ix = self.index();
            ix.keys
                .iter()
                .enumerate()
                .filter(|(_, k)| sels.iter().any(|s| eval::selects(s, k)))
                .map(|(i, k)| (i as u32, k.clone()))
                .collect()
        };
        let back = i64::try_from(range.as_millis()).unwrap_or(i64::MAX);
        let start = from.saturating_sub(eval::LOOKBACK_MS.max(back));
        let mut loaded = 0usize;
        let mut points: HashMap<u32, Vec<(i64, f64)>> = HashMap::new();
        if !wanted.is_empty() {
            let mut next = ReadFrom::Time(start.max(0) as u64);
            let mut read = 0usize;
            'read: loop {
                let recs = self.log.read(SAMPLES, next, 512, Duration::ZERO).await?;
                let Some(last) = recs.last().map(|r| r.seq) else {
                    break;
                };
                for r in &recs {
                    let Some((t, values)) = decode_samples(&r.data) else {
                        continue;
                    };
                    if t > to {
                        break 'read;
                    }
                    if t < start {
                        continue;
                    }
                    for (id, v) in values {
                        if wanted.contains_key(&id) {
                            points.entry(id).or_default().push((t, v));
                            loaded += 1;
                        }
                    }
                    if loaded > MAX_POINTS {
                        return Err(QueryError::Bad(format!(
                            "the query selects more than {MAX_POINTS} samples: narrow its selectors or its range"
                        )));
                    }
                }
                read += recs.len();
                if read >= MAX_RECORDS {
                    return Err(QueryError::Bad(format!(
                        "the range holds more than {MAX_RECORDS} samplings: ask for a shorter one"
                    )));
                }
                next = ReadFrom::Seq(last + 1);
            }
        }
        Ok(eval::Data {
            series: wanted
                .into_iter()
                .filter_map(|(id, k)| Some((k, points.remove(&id)?)))
                .collect(),
        })
    }

    /// Parse and check on a thread of its own: a deep expression needs a deep stack, and the
    /// parser panics on some inputs (a range of `[1e30]`), which becomes a refusal here.
    async fn parse(query: &str) -> Result<promql_parser::parser::Expr, QueryError> {
        if query.len() > 4096 {
            return Err(QueryError::Bad(
                "the query is longer than 4096 bytes".into(),
            ));
        }
        let q = query.to_string();
        on_big_stack(move || {
            let e = promql_parser::parser::parse(&q)
                .map_err(|e| QueryError::Bad(format!("not a PromQL expression: {e}")))?;
            eval::check(&e).map_err(QueryError::Bad)?;
            Ok(e)
        })
        .await
    }

    /// The query's value at `t_ms`.
    pub async fn query(&self, query: &str, t_ms: i64) -> Result<QueryResult, QueryError> {
        check_time(t_ms)?;
        let e = Arc::new(Self::parse(query).await?);
        let data = Arc::new(self.load(&e, t_ms, t_ms).await?);
        let t = t_ms as f64 / 1000.0;
        let v = on_big_stack(move || eval::eval(&e, &data, t_ms).map_err(QueryError::Bad)).await?;
        Ok(match v {
            eval::Value::Scalar(s) => QueryResult::Scalar((t, format_value(s))),
            eval::Value::Vector(v) => QueryResult::Vector(
                v.into_iter()
                    .map(|(l, x)| InstantSeries {
                        metric: l.into_iter().collect(),
                        value: (t, format_value(x)),
                    })
                    .collect(),
            ),
        })
    }

    /// The query's value at every `step` from `start_ms` to `end_ms`.
    pub async fn query_range(
        &self,
        query: &str,
        start_ms: i64,
        end_ms: i64,
        step_ms: i64,
    ) -> Result<QueryResult, QueryError> {
        check_time(start_ms)?;
        check_time(end_ms)?;
        if step_ms <= 0 || end_ms < start_ms {
            return Err(QueryError::Bad(
                "expected start <= end and a positive step".into(),
            ));
        }
        let steps = (end_ms - start_ms) / step_ms;
        if steps > MAX_STEPS {
            return Err(QueryError::Bad(format!(
                "more than {MAX_STEPS} steps: use a larger step or a shorter range"
            )));
        }
        let e = Arc::new(Self::parse(query).await?);
        let data = Arc::new(self.load(&e, start_ms, end_ms).await?);
        on_big_stack(move || {
            let deadline = std::time::Instant::now() + MAX_EVAL;
            let mut out: std::collections::BTreeMap<eval::Labels, Vec<(f64, String)>> =
                std::collections::BTreeMap::new();
            let mut values = 0usize;
            for i in 0..=steps {
                let t = start_ms + i * step_ms;
                let ts = t as f64 / 1000.0;
                match eval::eval(&e, &data, t).map_err(QueryError::Bad)? {
                    eval::Value::Scalar(s) => {
                        values += 1;
                        out.entry(Vec::new())
                            .or_default()
                            .push((ts, format_value(s)));
                    }
                    eval::Value::Vector(v) => {
                        values += v.len();
                        for (l, x) in v {
                            out.entry(l).or_default().push((ts, format_value(x)));
                        }
                    }
                }
                if values > MAX_VALUES {
                    return Err(QueryError::Bad(format!(
                        "the answer would hold more than {MAX_VALUES} values: narrow the query, or use a larger step"
                    )));
                }
                if std::time::Instant::now() > deadline {
                    return Err(QueryError::Bad(format!(
                        "the query took longer than {}s: narrow it, or use a larger step",
                        MAX_EVAL.as_secs()
                    )));
                }
            }
            Ok(QueryResult::Matrix(
                out.into_iter()
                    .map(|(l, values)| RangeSeries {
                        metric: l.into_iter().collect(),
                        values,
                    })
                    .collect(),
            ))
        })
        .await
    }

    /// Metric names the history knows.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index().keys.iter().map(|k| k.name.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}

fn check_time(t: i64) -> Result<(), QueryError> {
    if (0..=MAX_TIME_MS).contains(&t) {
        Ok(())
    } else {
        Err(QueryError::Bad(
            "times must lie between 1970 and the year 9999".into(),
        ))
    }
}

/// Run `f` on a thread with a large stack (deep expressions recurse), catching a panic (the
/// parser's, on hostile input) as a refusal; the caller's task waits without blocking.
async fn on_big_stack<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueryError> + Send + 'static,
) -> Result<T, QueryError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("tsdb-query".into())
        .stack_size(256 << 20)
        .spawn(move || {
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
                    Err(QueryError::Bad(
                        "the query could not be read (too deep, or a number out of range)".into(),
                    ))
                });
            let _ = tx.send(r);
        });
    if spawned.is_err() {
        return Err(QueryError::Bad("no thread for the query: try again".into()));
    }
    rx.await
        .unwrap_or_else(|_| Err(QueryError::Bad("the query was lost".into())))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(name: &str, route: &str) -> SeriesKey {
        SeriesKey {
            name: name.into(),
            labels: vec![("route".into(), route.into())],
        }
    }

    #[tokio::test]
    async fn records_queries_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn Log> = Arc::new(gantry_store::SegmentLog::open(dir.path()).unwrap());
        let options = TsdbOptions {
            step: Duration::from_secs(10),
            max_age: Duration::from_secs(3600 * 24 * 365 * 100),
            max_bytes: 1 << 30,
        };
        let db = Tsdb::open(log.clone(), options, &Metrics::new())
            .await
            .unwrap();
        // 13 samplings 10 s apart, a new series appearing halfway.
        let t0 = 1_700_000_000_000i64;
        for i in 0..=12i64 {
            let mut s = vec![(key("req_total", "a"), (i * 100) as f64)];
            if i >= 6 {
                s.push((key("req_total", "b"), ((i - 6) * 10) as f64));
            }
            db.record(t0 + i * 10_000, s).await.unwrap();
        }
        let end = t0 + 120_000;
        let r = db.query("sum(rate(req_total[1m]))", end).await.unwrap();
        let QueryResult::Vector(v) = r else {
            panic!("{r:?}")
        };
        assert_eq!(v[0].value.1, "11");
        let r = db
            .query_range("req_total{route=\"b\"}", t0, end, 30_000)
            .await
            .unwrap();
        let QueryResult::Matrix(m) = r else {
            panic!("{r:?}")
        };
        // b exists from 60 s on: the samplings at 60, 90 and 120 s.
        assert_eq!(m.len(), 1);
        assert_eq!(
            m[0].values,
            vec![
                ((t0 + 60_000) as f64 / 1000.0, "0".to_string()),
                ((t0 + 90_000) as f64 / 1000.0, "30".to_string()),
                ((t0 + 120_000) as f64 / 1000.0, "60".to_string())
            ]
        );
        assert_eq!(m[0].metric["route"], "b");
        assert!(matches!(
            db.query("sum(", end).await,
            Err(QueryError::Bad(_))
        ));
        assert!(matches!(
            db.query_range("up", end, t0, 1000).await,
            Err(QueryError::Bad(_))
        ));
        drop(db);
        // Reopened on the same log: the index and the samples are back.
        let db = Tsdb::open(log, options, &Metrics::new()).await.unwrap();
        assert_eq!(db.names(), vec!["req_total".to_string()]);
        let r = db.query("req_total", end).await.unwrap();
        let QueryResult::Vector(v) = r else {
            panic!("{r:?}")
        };
        assert_eq!(v.len(), 2);
        db.record(end + 10_000, vec![(key("req_total", "c"), 1.0)])
            .await
            .unwrap();
        let r = db
            .query("req_total{route=\"c\"}", end + 10_000)
            .await
            .unwrap();
        let QueryResult::Vector(v) = r else {
            panic!("{r:?}")
        };
        assert_eq!(v.len(), 1);
    }

    #[tokio::test]
    async fn hostile_queries_are_refused_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn Log> = Arc::new(gantry_store::SegmentLog::open(dir.path()).unwrap());
        let options = TsdbOptions {
            step: Duration::from_secs(10),
            max_age: Duration::from_secs(86_400),
            max_bytes: 1 << 30,
        };
        let db = Tsdb::open(log, options, &Metrics::new()).await.unwrap();
        let t0 = 1_700_000_000_000i64;
        for i in 0..5i64 {
            db.record(
                t0 + i * 10_000,
                vec![
                    (key("a_total", "x"), i as f64),
                    (key("b_total", "x"), i as f64),
                ],
            )
            .await
            .unwrap();
        }
        let end = t0 + 40_000;
        for q in [
            "up[1e30]",
            "rate(up[99999999999999999999])",
            "rate(a_total[18446744073709548])",
            &"(".repeat(3000),
        ] {
            let r = db.query(q, end).await;
            assert!(matches!(r, Err(QueryError::Bad(_))), "{q}: {r:?}");
        }
        // Deep but valid: answered (the query's thread has the stack for it).
        let deep = format!("{}1", "-".repeat(2000));
        assert!(db.query(&deep, end).await.is_ok());
        // A step that would overflow, times out of range.
        assert!(db.query_range("a_total", 0, end, i64::MAX).await.is_ok());
        assert!(matches!(
            db.query_range("a_total", -5, end, 1000).await,
            Err(QueryError::Bad(_))
        ));
        assert!(matches!(
            db.query("a_total", i64::MAX).await,
            Err(QueryError::Bad(_))
        ));
        // Dropping the name makes two series one: refused, as Prometheus does.
        let r = db
            .query("rate({__name__=~\"a_total|b_total\"}[1m])", end)
            .await;
        assert!(
            matches!(r, Err(QueryError::Bad(ref m)) if m.contains("several series")),
            "{r:?}"
        );
        // Prometheus's rounding: halves up, to a given multiple.
        let r = db.query("round(a_total * 1.25, 0.5)", end).await.unwrap();
        let QueryResult::Vector(v) = r else {
            panic!("{r:?}")
        };
        assert_eq!(v[0].value.1, "5");
        // A clock stepped back does not put samples out of order.
        db.record(t0, vec![(key("a_total", "x"), 9.0)])
            .await
            .unwrap();
        let r = db.query("a_total", end + 1).await.unwrap();
        let QueryResult::Vector(v) = r else {
            panic!("{r:?}")
        };
        assert_eq!(v[0].value.1, "9");
    }
}
