//! The gateway's background work: active health checks, for instances gantry does not
//! supervise (self-registered ones) when their service's upstream policy asks for them (a
//! failing instance stays in the registry but receives no traffic until it passes again), and
//! closing idle upstream connections past their idle timeout.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use gantry_http::client::Mode;
use gantry_model::ActiveHealth;
use http::header::{HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::Method;
use tokio::sync::watch;

use crate::endpoints::{clock_ms, Endpoint, EndpointSet, ServiceState};
use crate::upstream::{Call, Policy};
use crate::Gateway;

impl Gateway {
    /// The gateway's background work until `shutdown` turns true: every 100 ms, probe the
    /// instances that are due; every second, close idle upstream connections past their
    /// service's `idle_connection_timeout_ms`.
    pub async fn run_background(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            }
            ticks += 1;
            let endpoints = self.endpoints_snapshot();
            if ticks.is_multiple_of(10) {
                self.lock().sweep_draining(&self.metrics);
                gantry_http::pool::tick();
                let closed: usize = endpoints.iter().map(|(ep, _)| ep.pool.sweep()).sum();
                if closed > 0 {
                    tracing::debug!(closed, "idle upstream connections closed");
                }
            }
            if ticks.is_multiple_of(100) {
                // Instances gone for longer than the window leave their version's figures.
                self.metrics.prune_retired(clock_ms());
            }
            let now = clock_ms();
            for (ep, policy) in endpoints {
                let Some((policy, service)) = policy.filter(|_| ep.external) else {
                    ep.healthy.store(true, Ordering::Relaxed);
                    continue;
                };
                if ep.next_probe_ms.load(Ordering::Relaxed) > now {
                    continue;
                }
                ep.next_probe_ms
                    .store(now + policy.interval_ms, Ordering::Relaxed);
                tokio::spawn(probe(self.clone(), ep, policy, service));
            }
        }
    }
}

/// One probe of one instance, through the upstream call (pinned to it: a one-instance set; no
/// retries, no breaker, no concurrency slot, and nothing fed to outlier detection).
async fn get(
    gw: &Gateway,
    ep: &Arc<Endpoint>,
    path: &str,
    service: &Arc<ServiceState>,
    timeout: Duration,
) -> Result<(), String> {
    let pq = PathAndQuery::try_from(path).map_err(|e| e.to_string())?;
    let set = EndpointSet::new(service.clone(), vec![ep.clone()]);
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static("gantry-gateway-health/1"),
    );
    let no_retries = gantry_model::RetryPolicy::none();
    let mut call = Call {
        set: &set,
        mode: Mode::Http1,
        method: &Method::GET,
        target: &pq,
        authority: None,
        host_in_map: false,
        headers: &mut headers,
        extra: None,
        body: None,
        watch: None,
        hash_key: None,
    };
    let start = std::time::Instant::now();
    let policy = Policy {
        retry: &no_retries,
        budget: None,
        retries: None,
        start,
        start_ms: crate::endpoints::ms_at(start),
        request_timeout: timeout,
        per_try_timeout: None,
        failure_statuses: &[],
        passive_health: false,
    };
    let answer = gw
        .call(&mut call, &policy, None, None)
        .await
        .map_err(|e| e.failure.as_str().to_string())?;
    let status = answer.resp.status();
    // Read to the end, so the connection goes back to the pool.
    let _ = http_body_util::BodyExt::collect(answer.resp.into_body()).await;
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("status {}", status.as_u16()))
    }
}

async fn probe(
    gw: Arc<Gateway>,
    ep: Arc<Endpoint>,
    policy: ActiveHealth,
    service: Arc<ServiceState>,
) {
    let timeout = Duration::from_millis(policy.timeout_ms);
    let res =
        match tokio::time::timeout(timeout, get(&gw, &ep, &policy.path, &service, timeout)).await {
            Ok(r) => r,
            Err(_) => Err("timed out".into()),
        };
    // probe_streak: high bit set = a run of failures, else a run of successes.
    const FAIL: u64 = 1 << 63;
    let prev = ep.probe_streak.load(Ordering::Relaxed);
    match res {
        Ok(()) => {
            let n = if prev & FAIL == 0 { prev + 1 } else { 1 };
            ep.probe_streak.store(n, Ordering::Relaxed);
            if n >= u64::from(policy.healthy_threshold) && !ep.healthy.swap(true, Ordering::Relaxed)
            {
                tracing::info!(instance = %ep.id, "active health check passes again; instance back in rotation");
            }
        }
        Err(why) => {
            let n = if prev & FAIL != 0 {
                (prev & !FAIL) + 1
            } else {
                1
            };
            ep.probe_streak.store(n | FAIL, Ordering::Relaxed);
            if n >= u64::from(policy.unhealthy_threshold)
                && ep.healthy.swap(false, Ordering::Relaxed)
            {
                tracing::warn!(instance = %ep.id, reason = %why, "active health check failing; instance out of rotation");
            }
        }
    }
}
