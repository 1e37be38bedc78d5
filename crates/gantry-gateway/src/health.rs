//! The gateway's background work: active health checks, for instances gantry does not
//! supervise (self-registered ones) when their service's upstream policy asks for them (a
//! failing instance stays in the registry but receives no traffic until it passes again), and
//! closing idle upstream connections past their idle timeout.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use gantry_http::client::{self, Mode, Outgoing};
use gantry_http::pool::Target;
use gantry_model::ActiveHealth;
use http::header::{HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::Method;
use tokio::sync::watch;

use crate::table::{clock_ms, Endpoint, ServiceState};
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
                gantry_http::pool::tick();
                let closed: usize = endpoints.iter().map(|(ep, _)| ep.pool.sweep()).sum();
                if closed > 0 {
                    tracing::debug!(closed, "idle upstream connections closed");
                }
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
                tokio::spawn(probe(ep, policy, service));
            }
        }
    }
}

async fn get(
    ep: &Endpoint,
    path: &str,
    service: &ServiceState,
    timeout: Duration,
) -> Result<(), String> {
    let target = Target {
        addr: ep.addr,
        connect_timeout: timeout,
        tls: service.tls.as_ref(),
    };
    let pq = PathAndQuery::try_from(path).map_err(|e| e.to_string())?;
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static("gantry-gateway-health/1"),
    );
    let outgoing = Outgoing {
        method: &Method::GET,
        target: &pq,
        authority: None,
        host_in_map: false,
        headers: &mut headers,
        extra: None::<&()>,
        keep_headers: false,
    };
    let mut body = None;
    let resp = client::send(&ep.pool, target, Mode::Http1, outgoing, &mut body)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    // Read to the end, so the connection goes back to the pool.
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("status {}", status.as_u16()))
    }
}

async fn probe(ep: Arc<Endpoint>, policy: ActiveHealth, service: Arc<ServiceState>) {
    let timeout = Duration::from_millis(policy.timeout_ms);
    let res = match tokio::time::timeout(timeout, get(&ep, &policy.path, &service, timeout)).await {
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
