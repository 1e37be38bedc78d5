//! Attempt limits for the token endpoint and the login page: per client address and per
//! username, token buckets (a burst, then a steady rate). Memory is bounded: the maps are
//! cleared of full buckets when they grow.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Keyed {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Keyed {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether one is available, without taking it; `Err(seconds)` until one is.
    fn peek(&self, key: &str) -> Result<(), u64> {
        let now = Instant::now();
        let m = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(b) = m.get(key) else {
            return Ok(());
        };
        let tokens =
            (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= 1.0 {
            Ok(())
        } else {
            Err(((1.0 - tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }

    /// Take one; `Err(seconds)` until one is available.
    fn take(&self, key: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut m = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() > 50_000 {
            let (rate, burst) = (self.rate, self.burst);
            m.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = m.entry(key.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

pub(crate) struct Limits {
    /// Failed token-endpoint or login requests (a bad secret, password, code or refresh
    /// token), per client address: a client that knows its secret is never slowed down.
    address: Keyed,
    /// Password attempts per username (guessing one account from many addresses).
    user: Keyed,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // 20 failures in a burst from one address, then 2 a second.
            address: Keyed::new(2.0, 20.0),
            // One password attempt every 2 seconds per user, bursts of 10.
            user: Keyed::new(0.5, 10.0),
        }
    }
}

impl Limits {
    /// May this address try now (it has failures left)?
    pub(crate) fn address(&self, ip: &str) -> Result<(), u64> {
        self.address.peek(ip)
    }
    /// An attempt from this address failed.
    pub(crate) fn address_failed(&self, ip: &str) {
        let _ = self.address.take(ip);
    }
    pub(crate) fn user(&self, name: &str) -> Result<(), u64> {
        self.user.take(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_a_wait() {
        let k = Keyed::new(0.5, 3.0);
        for _ in 0..3 {
            assert!(k.take("u").is_ok());
        }
        assert_eq!(k.take("u"), Err(2));
        assert!(k.take("other").is_ok());
    }

    #[test]
    fn only_failures_use_up_an_address() {
        let l = Limits::default();
        for _ in 0..1000 {
            assert!(l.address("10.0.0.1").is_ok());
        }
        for _ in 0..20 {
            l.address_failed("10.0.0.1");
        }
        assert!(l.address("10.0.0.1").is_err());
        assert!(l.address("10.0.0.2").is_ok());
    }
}
