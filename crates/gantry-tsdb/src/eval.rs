//! A PromQL subset evaluated over loaded series (parsed by `promql-parser`, GreptimeDB's
//! parser of the Prometheus grammar). What it evaluates: selectors with `=`, `!=`, `=~`, `!~`;
//! `rate`, `irate`, `increase`, `delta`, `{avg,min,max,sum,count,last}_over_time` over a range;
//! `abs`, `ceil`, `floor`, `round`, `clamp_min`, `clamp_max`, `histogram_quantile`, `time`;
//! `sum`, `avg`, `min`, `max`, `count` with `by`/`without`; arithmetic and comparisons
//! (`bool` included) between scalars and vectors, vector to vector one-to-one with
//! `on`/`ignoring`. Anything else is refused by name.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use promql_parser::parser::{self, Expr, LabelModifier, VectorSelector};

use crate::sample::SeriesKey;

/// How far back an instant selector looks for a series' latest sample (Prometheus's default).
pub const LOOKBACK_MS: i64 = 5 * 60 * 1000;

/// The longest range selector (`x[366d]`).
pub const MAX_RANGE: Duration = Duration::from_secs(366 * 86_400);

/// A result's labels: the series' labels and `__name__` (kept sorted, `__name__` first).
pub type Labels = Vec<(String, String)>;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Scalar(f64),
    Vector(Vec<(Labels, f64)>),
}

/// A series' points: time in unix ms and value, oldest first.
pub type Points = Vec<(i64, f64)>;

/// The loaded series a query reads: every series any of its selectors matches, with its points.
pub struct Data {
    pub series: Vec<(Arc<SeriesKey>, Points)>,
}

pub type Error = String;

fn labels_of(k: &SeriesKey) -> Labels {
    let mut v = Vec::with_capacity(k.labels.len() + 1);
    v.push(("__name__".to_string(), k.name.clone()));
    v.extend(k.labels.iter().cloned());
    v
}

/// Whether a selector picks a series.
pub fn selects(vs: &VectorSelector, k: &SeriesKey) -> bool {
    if vs.name.as_deref().is_some_and(|n| n != k.name) {
        return false;
    }
    let all = |ms: &[promql_parser::label::Matcher]| {
        ms.iter()
            .all(|m| m.is_match(k.label(&m.name).unwrap_or("")))
    };
    if vs.matchers.or_matchers.is_empty() {
        all(&vs.matchers.matchers)
    } else {
        all(&vs.matchers.matchers) && vs.matchers.or_matchers.iter().any(|o| all(o))
    }
}

/// Every selector of a query, with the longest range any reads.
pub fn selectors(e: &Expr, out: &mut Vec<VectorSelector>, range: &mut Duration) {
    match e {
        Expr::VectorSelector(vs) => out.push(vs.clone()),
        Expr::MatrixSelector(ms) => {
            *range = (*range).max(ms.range);
            out.push(ms.vs.clone());
        }
        Expr::Aggregate(a) => {
            selectors(&a.expr, out, range);
            if let Some(p) = &a.param {
                selectors(p, out, range);
            }
        }
        Expr::Unary(u) => selectors(&u.expr, out, range),
        Expr::Binary(b) => {
            selectors(&b.lhs, out, range);
            selectors(&b.rhs, out, range);
        }
        Expr::Paren(p) => selectors(&p.expr, out, range),
        Expr::Subquery(s) => selectors(&s.expr, out, range),
        Expr::Call(c) => {
            for a in &c.args.args {
                selectors(a, out, range);
            }
        }
        _ => {}
    }
}

/// Refuse what the evaluator does not do, before any data is read.
pub fn check(e: &Expr) -> Result<(), Error> {
    match e {
        Expr::NumberLiteral(_) => Ok(()),
        Expr::StringLiteral(_) => Err("string literals are not supported here".into()),
        Expr::VectorSelector(vs) => {
            if vs.offset.is_some() || vs.at.is_some() {
                return Err("offset and @ modifiers are not supported".into());
            }
            Ok(())
        }
        Expr::MatrixSelector(ms) => {
            if ms.range > MAX_RANGE {
                return Err("a range selector covers at most 366d".into());
            }
            check(&Expr::VectorSelector(ms.vs.clone()))
        }
        Expr::Subquery(_) => Err("subqueries are not supported".into()),
        Expr::Extension(_) => Err("extensions are not supported".into()),
        Expr::Paren(p) => check(&p.expr),
        Expr::Unary(u) => check(&u.expr),
        Expr::Binary(b) => {
            let op = b.op.to_string();
            if b.op.is_set_operator() {
                return Err(format!("the {op} operator is not supported"));
            }
            if let Some(m) = &b.modifier {
                if !matches!(m.card, parser::VectorMatchCardinality::OneToOne) {
                    return Err("group_left and group_right are not supported".into());
                }
            }
            check(&b.lhs)?;
            check(&b.rhs)
        }
        Expr::Aggregate(a) => {
            let op = a.op.to_string();
            if !["sum", "avg", "min", "max", "count"].contains(&op.as_str()) {
                return Err(format!(
                    "the {op} aggregation is not supported (sum, avg, min, max, count are)"
                ));
            }
            check(&a.expr)
        }
        Expr::Call(c) => {
            const OK: [&str; 16] = [
                "rate",
                "irate",
                "increase",
                "delta",
                "avg_over_time",
                "min_over_time",
                "max_over_time",
                "sum_over_time",
                "count_over_time",
                "last_over_time",
                "abs",
                "ceil",
                "floor",
                "round",
                "histogram_quantile",
                "time",
            ];
            let name = c.func.name;
            if !OK.contains(&name) && name != "clamp_min" && name != "clamp_max" {
                return Err(format!(
                    "the function {name} is not supported (supported: {}, clamp_min, clamp_max)",
                    OK.join(", ")
                ));
            }
            c.args.args.iter().try_for_each(|a| check(a))
        }
    }
}

/// The points of `points` in `(from, to]`.
fn window(points: &[(i64, f64)], from: i64, to: i64) -> &[(i64, f64)] {
    if from >= to {
        return &[];
    }
    let a = points.partition_point(|p| p.0 <= from);
    let b = points.partition_point(|p| p.0 <= to);
    &points[a..b.max(a)]
}

fn drop_name(mut l: Labels) -> Labels {
    l.retain(|(k, _)| k != "__name__");
    l
}

/// Evaluate `e` at time `t` (unix ms).
pub fn eval(e: &Expr, data: &Data, t: i64) -> Result<Value, Error> {
    match e {
        Expr::NumberLiteral(n) => Ok(Value::Scalar(n.val)),
        Expr::Paren(p) => eval(&p.expr, data, t),
        Expr::Unary(u) => Ok(match eval(&u.expr, data, t)? {
            Value::Scalar(v) => Value::Scalar(-v),
            Value::Vector(v) => {
                Value::Vector(v.into_iter().map(|(l, x)| (drop_name(l), -x)).collect())
            }
        }),
        Expr::VectorSelector(vs) => Ok(Value::Vector(
            data.series
                .iter()
                .filter(|(k, _)| selects(vs, k))
                .filter_map(|(k, pts)| {
                    let w = window(pts, t - LOOKBACK_MS, t);
                    w.last().map(|p| (labels_of(k), p.1))
                })
                .collect(),
        )),
        Expr::MatrixSelector(_) => {
            Err("a range selector needs a function around it, such as rate(x[5m])".into())
        }
        Expr::Call(c) => call(c, data, t),
        Expr::Aggregate(a) => {
            let Value::Vector(v) = eval(&a.expr, data, t)? else {
                return Err(format!("{} needs a vector", a.op));
            };
            let mut groups: BTreeMap<Labels, Vec<f64>> = BTreeMap::new();
            for (l, x) in v {
                let key: Labels = match &a.modifier {
                    None => Vec::new(),
                    Some(LabelModifier::Include(by)) => l
                        .into_iter()
                        .filter(|(k, _)| by.labels.contains(k))
                        .collect(),
                    Some(LabelModifier::Exclude(without)) => l
                        .into_iter()
                        .filter(|(k, _)| k != "__name__" && !without.labels.contains(k))
                        .collect(),
                };
                groups.entry(key).or_default().push(x);
            }
            let op = a.op.to_string();
            Ok(Value::Vector(
                groups
                    .into_iter()
                    .map(|(l, xs)| {
                        let n = xs.len() as f64;
                        let v = match op.as_str() {
                            "sum" => xs.iter().sum(),
                            "avg" => xs.iter().sum::<f64>() / n,
                            "min" => xs.iter().copied().fold(f64::INFINITY, f64::min),
                            "max" => xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                            _ => n,
                        };
                        (l, v)
                    })
                    .collect(),
            ))
        }
        Expr::Binary(b) => binary(b, data, t),
        _ => Err(format!("{e} is not supported")),
    }
}

/// Prometheus's `extrapolatedRate`: the change over the window's samples (counter resets
/// added back for counters), extrapolated towards the window's edges — all the way when the
/// first or last sample is within 1.1 average intervals of the edge, half an interval
/// otherwise, and for counters never below zero.
fn extrapolated(w: &[(i64, f64)], t: i64, range_ms: i64, counter: bool, rate: bool) -> Option<f64> {
    if w.len() < 2 {
        return None;
    }
    let (first, last) = (w[0], w[w.len() - 1]);
    let mut result = last.1 - first.1;
    if counter {
        for p in w.windows(2) {
            if p[1].1 < p[0].1 {
                result += p[0].1;
            }
        }
    }
    let range_start = t - range_ms;
    let mut to_start = (first.0 - range_start) as f64 / 1000.0;
    let to_end = (t - last.0) as f64 / 1000.0;
    let sampled = (last.0 - first.0) as f64 / 1000.0;
    if sampled <= 0.0 {
        return None;
    }
    let average = sampled / (w.len() - 1) as f64;
    if counter && result > 0.0 && first.1 >= 0.0 {
        // A counter is not extrapolated below zero.
        to_start = to_start.min(sampled * (first.1 / result));
    }
    let threshold = average * 1.1;
    let mut interval = sampled;
    interval += if to_start < threshold {
        to_start
    } else {
        average / 2.0
    };
    interval += if to_end < threshold {
        to_end
    } else {
        average / 2.0
    };
    let mut v = result * (interval / sampled);
    if rate {
        v /= range_ms as f64 / 1000.0;
    }
    Some(v)
}

fn range_fn(name: &str, w: &[(i64, f64)], t: i64, range_ms: i64) -> Option<f64> {
    let last = w.last()?;
    let nan_fold = |init: f64, f: fn(f64, f64) -> f64| {
        // NaN only when every value is NaN (as Prometheus's min/max).
        let v = w.iter().map(|p| p.1).filter(|v| !v.is_nan()).fold(init, f);
        if w.iter().all(|p| p.1.is_nan()) {
            f64::NAN
        } else {
            v
        }
    };
    Some(match name {
        "rate" => extrapolated(w, t, range_ms, true, true)?,
        "increase" => extrapolated(w, t, range_ms, true, false)?,
        "delta" => extrapolated(w, t, range_ms, false, false)?,
        "irate" => {
            if w.len() < 2 {
                return None;
            }
            let (a, b) = (w[w.len() - 2], w[w.len() - 1]);
            let d = if b.1 >= a.1 { b.1 - a.1 } else { b.1 };
            d / ((b.0 - a.0) as f64 / 1000.0)
        }
        "avg_over_time" => w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64,
        "min_over_time" => nan_fold(f64::INFINITY, f64::min),
        "max_over_time" => nan_fold(f64::NEG_INFINITY, f64::max),
        "sum_over_time" => w.iter().map(|p| p.1).sum(),
        "count_over_time" => w.len() as f64,
        _ => last.1,
    })
}

fn call(c: &parser::Call, data: &Data, t: i64) -> Result<Value, Error> {
    let name = c.func.name;
    let args = &c.args.args;
    let arg = |i: usize| -> Result<&Expr, Error> {
        args.get(i)
            .map(|b| &**b)
            .ok_or_else(|| format!("{name} needs argument {}", i + 1))
    };
    let scalar = |i: usize| -> Result<f64, Error> {
        match eval(arg(i)?, data, t)? {
            Value::Scalar(s) => Ok(s),
            Value::Vector(_) => Err(format!("{name}: argument {} must be a number", i + 1)),
        }
    };
    let vector = |i: usize| -> Result<Vec<(Labels, f64)>, Error> {
        match eval(arg(i)?, data, t)? {
            Value::Vector(v) => Ok(v),
            Value::Scalar(_) => Err(format!("{name}: argument {} must be a vector", i + 1)),
        }
    };
    let map = |v: Vec<(Labels, f64)>, f: &dyn Fn(f64) -> f64| {
        unique(v.into_iter().map(|(l, x)| (drop_name(l), f(x))).collect())
    };
    match name {
        "time" => Ok(Value::Scalar(t as f64 / 1000.0)),
        "abs" => map(vector(0)?, &f64::abs),
        "ceil" => map(vector(0)?, &f64::ceil),
        "floor" => map(vector(0)?, &f64::floor),
        "round" => {
            // Prometheus: floor(v / to_nearest + 0.5) * to_nearest (halves round up).
            let n = if args.len() > 1 { scalar(1)? } else { 1.0 };
            map(vector(0)?, &|x| (x / n + 0.5).floor() * n)
        }
        "clamp_min" => {
            let m = scalar(1)?;
            map(vector(0)?, &|x| x.max(m))
        }
        "clamp_max" => {
            let m = scalar(1)?;
            map(vector(0)?, &|x| x.min(m))
        }
        "histogram_quantile" => {
            let q = scalar(0)?;
            let mut groups: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
            for (l, x) in vector(1)? {
                let Some(le) = l.iter().find(|(k, _)| k == "le").map(|(_, v)| v.clone()) else {
                    continue;
                };
                let bound = match le.as_str() {
                    "+Inf" | "Inf" => f64::INFINITY,
                    s => match s.parse::<f64>() {
                        Ok(b) => b,
                        Err(_) => continue,
                    },
                };
                let key: Labels = drop_name(l)
                    .into_iter()
                    .filter(|(k, _)| k != "le")
                    .collect();
                groups.entry(key).or_default().push((bound, x));
            }
            Ok(Value::Vector(
                groups
                    .into_iter()
                    .filter_map(|(l, b)| Some((l, quantile(q, b)?)))
                    .collect(),
            ))
        }
        _ => {
            let Expr::MatrixSelector(ms) = arg(0)? else {
                return Err(format!("{name} needs a range selector, such as x[5m]"));
            };
            let range_ms = i64::try_from(ms.range.as_millis()).unwrap_or(i64::MAX);
            unique(
                data.series
                    .iter()
                    .filter(|(k, _)| selects(&ms.vs, k))
                    .filter_map(|(k, pts)| {
                        let w = window(pts, t - range_ms, t);
                        let v = range_fn(name, w, t, range_ms)?;
                        let l = labels_of(k);
                        Some((
                            if name == "last_over_time" {
                                l
                            } else {
                                drop_name(l)
                            },
                            v,
                        ))
                    })
                    .collect(),
            )
        }
    }
}

/// Prometheus's `histogram_quantile`: linear interpolation within the bucket the rank falls in.
fn quantile(q: f64, mut buckets: Vec<(f64, f64)>) -> Option<f64> {
    if q.is_nan() {
        return Some(f64::NAN);
    }
    if q < 0.0 {
        return Some(f64::NEG_INFINITY);
    }
    if q > 1.0 {
        return Some(f64::INFINITY);
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let last = buckets.last()?;
    if last.0 != f64::INFINITY || buckets.len() < 2 {
        return Some(f64::NAN);
    }
    let total = last.1;
    if total == 0.0 {
        return Some(f64::NAN);
    }
    let rank = q * total;
    let i = buckets.iter().position(|b| b.1 >= rank)?;
    if i == buckets.len() - 1 {
        return Some(buckets[buckets.len() - 2].0);
    }
    let (lo, below) = if i == 0 {
        (0.0, 0.0)
    } else {
        (buckets[i - 1].0, buckets[i - 1].1)
    };
    let (hi, count) = buckets[i];
    if count - below == 0.0 {
        return Some(hi);
    }
    Some(lo + (hi - lo) * ((rank - below) / (count - below)))
}

/// A vector whose label sets repeat (functions and arithmetic drop `__name__`: `rate` over two
/// metrics of the same labels) is refused, as Prometheus refuses it.
fn unique(v: Vec<(Labels, f64)>) -> Result<Value, Error> {
    let mut seen = std::collections::BTreeSet::new();
    for (l, _) in &v {
        if !seen.insert(l) {
            return Err(format!(
                "the result has several series with the labels {l:?} (the metric name was dropped): aggregate or select one metric"
            ));
        }
    }
    Ok(Value::Vector(v))
}

fn compare(op: &str, a: f64, b: f64) -> Option<bool> {
    Some(match op {
        "==" => a == b,
        "!=" => a != b,
        ">" => a > b,
        "<" => a < b,
        ">=" => a >= b,
        "<=" => a <= b,
        _ => return None,
    })
}

fn arith(op: &str, a: f64, b: f64) -> Result<f64, Error> {
    Ok(match op {
        "+" => a + b,
        "-" => a - b,
        "*" => a * b,
        "/" => a / b,
        "%" => a % b,
        "^" => a.powf(b),
        "atan2" => a.atan2(b),
        _ => return Err(format!("the {op} operator is not supported")),
    })
}

fn binary(b: &parser::BinaryExpr, data: &Data, t: i64) -> Result<Value, Error> {
    let op = b.op.to_string();
    let op = op.as_str();
    let keep_bool = b.modifier.as_ref().is_some_and(|m| m.return_bool);
    let l = eval(&b.lhs, data, t)?;
    let r = eval(&b.rhs, data, t)?;
    // One pair: Some(value) to keep, None to drop (a comparison that failed).
    let apply = |x: f64, y: f64, sample: f64| -> Result<Option<f64>, Error> {
        match compare(op, x, y) {
            Some(c) if keep_bool => Ok(Some(if c { 1.0 } else { 0.0 })),
            Some(c) => Ok(c.then_some(sample)),
            None => arith(op, x, y).map(Some),
        }
    };
    let is_cmp = compare(op, 0.0, 0.0).is_some();
    // A vector and a number, either way round: each sample against the number; a filtering
    // comparison keeps the series as it is.
    let with_scalar = |v: Vec<(Labels, f64)>, n: f64, vector_left: bool| {
        let mut out = Vec::new();
        for (l, x) in v {
            let (lhs, rhs) = if vector_left { (x, n) } else { (n, x) };
            if let Some(res) = apply(lhs, rhs, x)? {
                out.push((
                    if is_cmp && !keep_bool {
                        l
                    } else {
                        drop_name(l)
                    },
                    res,
                ));
            }
        }
        unique(out)
    };
    match (l, r) {
        (Value::Scalar(x), Value::Scalar(y)) => {
            if is_cmp && !keep_bool {
                return Err("comparisons between scalars need bool".into());
            }
            Ok(Value::Scalar(apply(x, y, x)?.unwrap_or(0.0)))
        }
        (Value::Vector(v), Value::Scalar(n)) => with_scalar(v, n, true),
        (Value::Scalar(n), Value::Vector(v)) => with_scalar(v, n, false),
        (Value::Vector(lv), Value::Vector(rv)) => {
            let key = |l: &Labels| -> Labels {
                let l = drop_name(l.clone());
                match b.modifier.as_ref().and_then(|m| m.matching.as_ref()) {
                    None => l,
                    Some(LabelModifier::Include(on)) => l
                        .into_iter()
                        .filter(|(k, _)| on.labels.contains(k))
                        .collect(),
                    Some(LabelModifier::Exclude(ign)) => l
                        .into_iter()
                        .filter(|(k, _)| !ign.labels.contains(k))
                        .collect(),
                }
            };
            let mut right: BTreeMap<Labels, f64> = BTreeMap::new();
            for (l, y) in rv {
                if right.insert(key(&l), y).is_some() {
                    return Err(
                        "many-to-one matching: several series on the right share labels (use on/ignoring)".into(),
                    );
                }
            }
            let matching = b.modifier.as_ref().is_some_and(|m| m.matching.is_some());
            let mut out = Vec::new();
            let mut seen = std::collections::BTreeSet::new();
            for (l, x) in lv {
                let k = key(&l);
                if !seen.insert(k.clone()) {
                    return Err(
                        "many-to-one matching: several series on the left share labels (use on/ignoring, or aggregate first)".into(),
                    );
                }
                if let Some(&y) = right.get(&k) {
                    if let Some(res) = apply(x, y, x)? {
                        // A filtering comparison keeps the left series as it is, unless
                        // on/ignoring says which labels the result has.
                        out.push((
                            if is_cmp && !keep_bool && !matching {
                                l
                            } else {
                                k
                            },
                            res,
                        ));
                    }
                }
            }
            Ok(Value::Vector(out))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(name: &str, labels: &[(&str, &str)]) -> Arc<SeriesKey> {
        Arc::new(SeriesKey {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    fn data() -> Data {
        // Two routes' counters sampled every 10 s for 2 minutes; b's resets at 60 s.
        let pts = |f: &dyn Fn(i64) -> f64| -> Vec<(i64, f64)> {
            (0..=12).map(|i| (i * 10_000, f(i))).collect()
        };
        let mut series = vec![
            (
                key("req_total", &[("route", "a"), ("service", "s")]),
                pts(&|i| (i * 100) as f64),
            ),
            (
                key("req_total", &[("route", "b"), ("service", "s")]),
                pts(&|i| {
                    if i < 6 {
                        (i * 10) as f64
                    } else {
                        ((i - 6) * 10) as f64
                    }
                }),
            ),
            (key("up", &[]), pts(&|_| 1.0)),
        ];
        // A histogram: 90 fast (<= 0.1 s), 10 slow (<= 1 s).
        for (le, n) in [("0.1", 90.0), ("1", 100.0), ("+Inf", 100.0)] {
            series.push((key("d_bucket", &[("le", le)]), pts(&|i| n * i as f64)));
        }
        Data { series }
    }

    fn at(q: &str, t: i64) -> Value {
        let e = parser::parse(q).unwrap();
        check(&e).unwrap();
        eval(&e, &data(), t).unwrap()
    }

    fn one(v: Value) -> f64 {
        match v {
            Value::Scalar(s) => s,
            Value::Vector(v) => {
                assert_eq!(v.len(), 1, "{v:?}");
                v[0].1
            }
        }
    }

    #[test]
    fn selectors_rates_aggregations_and_quantiles() {
        let t = 120_000;
        assert_eq!(one(at("req_total{route=\"a\"}", t)), 1200.0);
        assert_eq!(one(at("req_total{route=~\"a|c\"}", t)), 1200.0);
        assert_eq!(one(at("sum(req_total)", t)), 1260.0);
        // 10/s over the last minute; b's counter reset is not a drop.
        assert!((one(at("rate(req_total{route=\"a\"}[1m])", t)) - 10.0).abs() < 1e-9);
        assert!((one(at("increase(req_total{route=\"b\"}[1m])", t)) - 60.0).abs() < 1e-9);
        let by = at("sum by (service) (rate(req_total[1m]))", t);
        assert_eq!(
            by,
            Value::Vector(vec![(vec![("service".into(), "s".into())], 11.0)])
        );
        assert_eq!(one(at("count(up)", t)), 1.0);
        assert_eq!(one(at("max_over_time(up[1m])", t)), 1.0);
        // 90% of requests are at most 0.1 s: p50 falls in the first bucket, p95 in the second.
        let p50 = one(at("histogram_quantile(0.5, rate(d_bucket[1m]))", t));
        assert!((p50 - 0.1 * 50.0 / 90.0).abs() < 1e-9, "{p50}");
        let p95 = one(at("histogram_quantile(0.95, rate(d_bucket[1m]))", t));
        assert!((p95 - (0.1 + 0.9 * 0.5)).abs() < 1e-9, "{p95}");
        // Comparisons filter; bool keeps 0/1; arithmetic on vectors matches labels.
        assert_eq!(at("rate(req_total[1m]) > 5", t).clone(), {
            let Value::Vector(v) = at("rate(req_total[1m])", t) else {
                panic!()
            };
            Value::Vector(v.into_iter().filter(|(_, x)| *x > 5.0).collect())
        });
        assert_eq!(one(at("sum(rate(req_total[1m])) > bool 100", t)), 0.0);
        assert_eq!(
            one(at(
                "req_total{route=\"a\"} / ignoring(route) req_total{route=\"b\"}",
                t
            )),
            20.0
        );
        assert_eq!(one(at("2 * 3 + 1", t)), 7.0);
        // A number on the left: the order of the operands holds; a filter keeps the sample.
        assert_eq!(one(at("100 - req_total{route=\"a\"}", t)), -1100.0);
        assert_eq!(one(at("1000 < req_total", t)), 1200.0);
        // Nothing within the lookback: no sample.
        assert_eq!(at("up", 120_000 + LOOKBACK_MS + 1), Value::Vector(vec![]));
    }

    #[test]
    fn what_is_not_supported_is_named() {
        for (q, says) in [
            ("topk(3, up)", "topk"),
            ("up offset 5m", "offset"),
            ("up and up", "and"),
            ("predict_linear(up[5m], 60)", "predict_linear"),
            ("max_over_time(rate(up[1m])[5m:1m])", "subqueries"),
        ] {
            let e = parser::parse(q).unwrap();
            let err = check(&e).unwrap_err();
            assert!(err.contains(says), "{q}: {err}");
        }
        let e = parser::parse("up[5m]").unwrap();
        assert!(eval(&e, &data(), 0).unwrap_err().contains("range selector"));
    }
}
