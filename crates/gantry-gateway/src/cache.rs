//! A shared HTTP response cache, a subset of RFC 9111: `Cache-Control` (`max-age`, `s-maxage`,
//! `no-store`, `no-cache`, `private`, `public`), `Vary`, and revalidation with `ETag` /
//! `Last-Modified`. Memory is bounded (least recently used entries go first). Routes opt in.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};

/// `Cache-Control` directives that matter here.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
}

pub fn cache_control(h: &HeaderMap) -> CacheControl {
    let mut cc = CacheControl::default();
    for v in h.get_all(header::CACHE_CONTROL) {
        let Ok(v) = v.to_str() else { continue };
        for d in v.split(',') {
            let d = d.trim();
            let (name, arg) = match d.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (d, None),
            };
            match name.to_ascii_lowercase().as_str() {
                "no-store" => cc.no_store = true,
                "no-cache" => cc.no_cache = true,
                "private" => cc.private = true,
                "public" => cc.public = true,
                "max-age" => cc.max_age = arg.and_then(|a| a.parse().ok()),
                "s-maxage" => cc.s_maxage = arg.and_then(|a| a.parse().ok()),
                _ => {}
            }
        }
    }
    cc
}

/// Statuses cacheable by default (RFC 9110 §15.1).
fn heuristically_cacheable(s: StatusCode) -> bool {
    matches!(
        s.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// A stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Monotonic ms when stored or last revalidated.
    pub stored_ms: u64,
    pub fresh_ms: u64,
    pub etag: Option<HeaderValue>,
    pub last_modified: Option<HeaderValue>,
}

impl Entry {
    fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 32)
                .sum::<usize>()
            + 128
    }

    pub fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.stored_ms) < self.fresh_ms
    }

    pub fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_ms) / 1000
    }

    pub fn has_validators(&self) -> bool {
        self.etag.is_some() || self.last_modified.is_some()
    }
}

/// What the cache has for a request.
pub enum Lookup {
    Fresh(Arc<Entry>),
    /// Present but must be revalidated before use.
    Stale(Arc<Entry>),
    Miss,
}

/// How a request relates to the cache, decided before forwarding.
pub struct CacheKey {
    pub primary: String,
}

/// The key of a cacheable request: its route, the target it went to (a version asked for, or a
/// split's `service@version`: versions never share entries), host, path and query.
pub fn key_for(
    method: &Method,
    host: Option<&str>,
    path_and_query: &str,
    route: &str,
    target: &str,
) -> Option<CacheKey> {
    if *method != Method::GET && *method != Method::HEAD {
        return None;
    }
    Some(CacheKey {
        primary: format!(
            "{route}\u{0}{target}\u{0}{}\u{0}{path_and_query}",
            host.unwrap_or("")
        ),
    })
}

struct Inner {
    /// Full key (primary + vary values) → (LRU sequence, entry).
    entries: HashMap<String, (u64, Arc<Entry>)>,
    lru: BTreeMap<u64, String>,
    /// Primary key → the request headers its response varies on, and how many entries it has
    /// (the record goes with its last entry).
    vary: HashMap<String, (Vec<String>, usize)>,
    /// What entries, keys and vary records take, held within `max_bytes`.
    bytes: usize,
    seq: u64,
}

pub struct Cache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

/// What a vary record takes: its key, its names, and a map slot.
fn vary_cost(primary: &str, names: &[String]) -> usize {
    64 + primary.len() + names.iter().map(|n| n.len() + 24).sum::<usize>()
}

fn full_key(primary: &str, vary: &[String], req: &HeaderMap) -> String {
    let mut k = primary.to_string();
    for name in vary {
        k.push('\u{1}');
        for v in req.get_all(name.as_str()) {
            k.push_str(&String::from_utf8_lossy(v.as_bytes()));
            k.push(',');
        }
    }
    k
}

impl Cache {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes: max_bytes as usize,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                lru: BTreeMap::new(),
                vary: HashMap::new(),
                bytes: 0,
                seq: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    pub fn lookup(&self, key: &CacheKey, req: &HeaderMap, now_ms: u64) -> Lookup {
        let rcc = cache_control(req);
        if rcc.no_store {
            return Lookup::Miss;
        }
        let mut g = self.lock();
        let vary = g
            .vary
            .get(&key.primary)
            .map(|(v, _)| v.clone())
            .unwrap_or_default();
        let k = full_key(&key.primary, &vary, req);
        let Some((old_seq, entry)) = g.entries.get(&k).map(|(s, e)| (*s, e.clone())) else {
            return Lookup::Miss;
        };
        g.seq += 1;
        let seq = g.seq;
        g.lru.remove(&old_seq);
        g.lru.insert(seq, k.clone());
        if let Some(slot) = g.entries.get_mut(&k) {
            slot.0 = seq;
        }
        let wants_revalidation = rcc.no_cache || rcc.max_age == Some(0);
        if entry.is_fresh(now_ms) && !wants_revalidation {
            Lookup::Fresh(entry)
        } else if entry.has_validators() {
            Lookup::Stale(entry)
        } else {
            Lookup::Miss
        }
    }

    /// Decide whether a response may be stored; returns its freshness lifetime in ms.
    pub fn storable(
        req_method: &Method,
        req_headers: &HeaderMap,
        status: StatusCode,
        resp_headers: &HeaderMap,
    ) -> Option<u64> {
        if *req_method != Method::GET || !heuristically_cacheable(status) {
            return None;
        }
        if cache_control(req_headers).no_store {
            return None;
        }
        let cc = cache_control(resp_headers);
        if cc.no_store || cc.private || resp_headers.contains_key(header::SET_COOKIE) {
            return None;
        }
        if req_headers.contains_key(header::AUTHORIZATION) && !(cc.public || cc.s_maxage.is_some())
        {
            return None;
        }
        if resp_headers
            .get_all(header::VARY)
            .iter()
            .any(|v| v.to_str().map(|s| s.contains('*')).unwrap_or(true))
        {
            return None;
        }
        let fresh_secs = if cc.no_cache {
            0
        } else {
            cc.s_maxage.or(cc.max_age).unwrap_or(0)
        };
        let validators = resp_headers.contains_key(header::ETAG)
            || resp_headers.contains_key(header::LAST_MODIFIED);
        if fresh_secs == 0 && !validators {
            return None;
        }
        Some(fresh_secs.saturating_mul(1000))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn insert(
        &self,
        key: &CacheKey,
        req_headers: &HeaderMap,
        status: StatusCode,
        resp_headers: HeaderMap,
        body: Bytes,
        fresh_ms: u64,
        now_ms: u64,
    ) {
        let vary: Vec<String> = resp_headers
            .get_all(header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        let entry = Arc::new(Entry {
            status,
            etag: resp_headers.get(header::ETAG).cloned(),
            last_modified: resp_headers.get(header::LAST_MODIFIED).cloned(),
            headers: resp_headers,
            body,
            stored_ms: now_ms,
            fresh_ms,
        });
        let size = entry.size();
        if size > self.max_bytes {
            return;
        }
        let k = full_key(&key.primary, &vary, req_headers);
        let mut g = self.lock();
        let g = &mut *g;
        let new_cost = vary_cost(&key.primary, &vary);
        match g.vary.get_mut(&key.primary) {
            Some((names, _)) => {
                g.bytes = g.bytes + new_cost - vary_cost(&key.primary, names);
                *names = vary;
            }
            None => {
                g.vary.insert(key.primary.clone(), (vary, 0));
                g.bytes += new_cost;
            }
        }
        g.seq += 1;
        let seq = g.seq;
        let charge = size + 2 * k.len();
        match g.entries.insert(k.clone(), (seq, entry)) {
            Some((old_seq, old)) => {
                g.lru.remove(&old_seq);
                g.bytes -= old.size() + 2 * k.len();
            }
            None => {
                if let Some((_, n)) = g.vary.get_mut(&key.primary) {
                    *n += 1;
                }
            }
        }
        g.lru.insert(seq, k);
        g.bytes += charge;
        while g.bytes > self.max_bytes {
            let Some((_, victim)) = g.lru.pop_first() else {
                break;
            };
            if let Some((_, e)) = g.entries.remove(&victim) {
                g.bytes -= e.size() + 2 * victim.len();
            }
            // The vary record goes with the last entry of its primary key.
            let primary = victim.split('\u{1}').next().unwrap_or("");
            if let Some((names, n)) = g.vary.get_mut(primary) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    let cost = vary_cost(primary, names);
                    g.vary.remove(primary);
                    g.bytes -= cost;
                }
            }
        }
    }

    #[cfg(test)]
    fn records(&self) -> (usize, usize) {
        let g = self.lock();
        (g.entries.len(), g.vary.len())
    }

    /// A 304 confirmed a stale entry: make it fresh again with the new lifetime.
    pub fn refresh(
        &self,
        key: &CacheKey,
        req_headers: &HeaderMap,
        entry: &Arc<Entry>,
        not_modified: &HeaderMap,
        now_ms: u64,
    ) -> Arc<Entry> {
        let cc = cache_control(not_modified);
        let fresh_ms = if cc.no_cache {
            0
        } else {
            cc.s_maxage
                .or(cc.max_age)
                .map_or(entry.fresh_ms, |s| s.saturating_mul(1000))
        };
        let mut headers = entry.headers.clone();
        for name in [
            header::CACHE_CONTROL,
            header::ETAG,
            header::EXPIRES,
            header::DATE,
            header::LAST_MODIFIED,
        ] {
            if let Some(v) = not_modified.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        self.insert(
            key,
            req_headers,
            entry.status,
            headers,
            entry.body.clone(),
            fresh_ms,
            now_ms,
        );
        Arc::new(Entry {
            status: entry.status,
            headers: entry.headers.clone(),
            body: entry.body.clone(),
            stored_ms: now_ms,
            fresh_ms,
            etag: entry.etag.clone(),
            last_modified: entry.last_modified.clone(),
        })
    }
}

/// Does the client's `If-None-Match` match the entry's ETag (weak comparison)?
pub fn etag_matches(req: &HeaderMap, etag: Option<&HeaderValue>) -> bool {
    let Some(etag) = etag.and_then(|e| e.to_str().ok()) else {
        return false;
    };
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let mine = strip(etag);
    req.get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*" || strip(t) == mine)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn parses_cache_control() {
        let cc = cache_control(&h(&[
            ("cache-control", "public, max-age=60, s-maxage=\"120\""),
            ("cache-control", "no-cache"),
        ]));
        assert!(cc.public && cc.no_cache && !cc.no_store);
        assert_eq!((cc.max_age, cc.s_maxage), (Some(60), Some(120)));
    }

    #[test]
    fn storability_rules() {
        let get = Method::GET;
        let none = HeaderMap::new();
        let ok = StatusCode::OK;
        assert_eq!(
            Cache::storable(&get, &none, ok, &h(&[("cache-control", "max-age=10")])),
            Some(10_000)
        );
        assert_eq!(
            Cache::storable(
                &get,
                &none,
                ok,
                &h(&[("cache-control", "max-age=10, s-maxage=20")])
            ),
            Some(20_000)
        );
        assert_eq!(
            Cache::storable(
                &get,
                &none,
                ok,
                &h(&[("cache-control", "no-store, max-age=10")])
            ),
            None
        );
        assert_eq!(
            Cache::storable(
                &get,
                &none,
                ok,
                &h(&[("cache-control", "private, max-age=10")])
            ),
            None
        );
        assert_eq!(Cache::storable(&get, &none, ok, &h(&[])), None);
        assert_eq!(
            Cache::storable(&get, &none, ok, &h(&[("etag", "\"v1\"")])),
            Some(0)
        );
        assert_eq!(
            Cache::storable(
                &Method::POST,
                &none,
                ok,
                &h(&[("cache-control", "max-age=10")])
            ),
            None
        );
        assert_eq!(
            Cache::storable(
                &get,
                &none,
                StatusCode::INTERNAL_SERVER_ERROR,
                &h(&[("cache-control", "max-age=10")])
            ),
            None
        );
        assert_eq!(
            Cache::storable(
                &get,
                &h(&[("authorization", "x")]),
                ok,
                &h(&[("cache-control", "max-age=10")])
            ),
            None
        );
        assert_eq!(
            Cache::storable(
                &get,
                &h(&[("authorization", "x")]),
                ok,
                &h(&[("cache-control", "public, max-age=10")])
            ),
            Some(10_000)
        );
        assert_eq!(
            Cache::storable(
                &get,
                &none,
                ok,
                &h(&[("cache-control", "max-age=10"), ("vary", "*")])
            ),
            None
        );
        assert_eq!(
            Cache::storable(
                &get,
                &none,
                ok,
                &h(&[("cache-control", "max-age=10"), ("set-cookie", "a=b")])
            ),
            None
        );
    }

    #[test]
    fn vary_keeps_variants_apart_and_lru_bounds_memory() {
        let c = Cache::new(4096);
        let key =
            key_for(&Method::GET, Some("h"), "/x", "r", "t").unwrap_or_else(|| unreachable!());
        let en = h(&[("accept-language", "en")]);
        let de = h(&[("accept-language", "de")]);
        c.insert(
            &key,
            &en,
            StatusCode::OK,
            h(&[("vary", "Accept-Language")]),
            Bytes::from_static(b"hello"),
            10_000,
            0,
        );
        assert!(matches!(c.lookup(&key, &en, 5), Lookup::Fresh(e) if e.body == "hello"));
        assert!(matches!(c.lookup(&key, &de, 5), Lookup::Miss));
        assert!(
            matches!(c.lookup(&key, &en, 20_000), Lookup::Miss),
            "stale without validators"
        );
        // Fill beyond the budget: memory stays bounded.
        for i in 0..100 {
            let k = key_for(&Method::GET, Some("h"), &format!("/big{i}"), "r", "t")
                .unwrap_or_else(|| unreachable!());
            c.insert(
                &k,
                &en,
                StatusCode::OK,
                HeaderMap::new(),
                Bytes::from(vec![b'x'; 500]),
                10_000,
                1,
            );
        }
        assert!(c.bytes() <= 4096);
        // Evicted entries take their vary records with them: a stream of distinct URLs
        // (cache-busting query strings) cannot grow what the cache holds.
        let (entries, records) = c.records();
        assert!(entries <= 8, "{entries} entries");
        assert_eq!(records, entries, "one vary record per live primary key");
        assert!(matches!(c.lookup(&key, &en, 5), Lookup::Miss), "evicted");
    }

    #[test]
    fn stale_with_validators_needs_revalidation() {
        let c = Cache::new(1 << 20);
        let key = key_for(&Method::GET, None, "/x", "r", "t").unwrap_or_else(|| unreachable!());
        let req = HeaderMap::new();
        c.insert(
            &key,
            &req,
            StatusCode::OK,
            h(&[("etag", "\"v1\"")]),
            Bytes::from_static(b"b"),
            0,
            0,
        );
        let Lookup::Stale(e) = c.lookup(&key, &req, 1) else {
            panic!("expected stale")
        };
        let fresh = c.refresh(&key, &req, &e, &h(&[("cache-control", "max-age=5")]), 10);
        assert!(fresh.is_fresh(11));
        assert!(matches!(c.lookup(&key, &req, 12), Lookup::Fresh(_)));
        // A client asking for revalidation gets it even when fresh.
        assert!(matches!(
            c.lookup(&key, &h(&[("cache-control", "no-cache")]), 12),
            Lookup::Stale(_)
        ));
        assert!(etag_matches(
            &h(&[("if-none-match", "W/\"v1\", \"v2\"")]),
            e.etag.as_ref()
        ));
        assert!(!etag_matches(
            &h(&[("if-none-match", "\"v3\"")]),
            e.etag.as_ref()
        ));
    }
}
