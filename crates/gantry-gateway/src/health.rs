//! Active health checks by the gateway, for instances gantry does not supervise (self-registered
//! ones) when their service's upstream policy asks for them. A failing instance stays in the
//! registry but receives no traffic until it passes again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use gantry_model::ActiveHealth;
use tokio::sync::watch;

use crate::table::{clock_ms, Endpoint, ServiceState};
use crate::Gateway;

impl Gateway {
    /// Probe due instances every 100 ms until `shutdown` turns true.
    pub async fn run_active_health(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            }
            let now = clock_ms();
            for (ep, policy) in self.endpoints_snapshot() {
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
    let target = crate::pool::Target {
        addr: ep.addr,
        timeout,
        tls: service.tls.as_ref(),
    };
    let mut tx = crate::pool::connect_h1(target)
        .await
        .map_err(|e| e.to_string())?;
    let req = http::Request::builder()
        .uri(path)
        .header(http::header::HOST, ep.authority.as_str())
        .header(http::header::USER_AGENT, "gantry-gateway-health/1")
        .body(crate::body::ReqBody::Empty)
        .map_err(|e| e.to_string())?;
    let res = tx.send_request(req).await;
    let status = res.map_err(|e| e.to_string())?.status();
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
