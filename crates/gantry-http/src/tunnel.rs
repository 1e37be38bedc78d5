//! Upgraded connections (WebSocket): once both the client and the instance switched protocols,
//! bytes are copied both ways until both sides close or nothing moves for the idle time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::upgrade::OnUpgrade;

pub use hyper::upgrade::OnUpgrade as Upgrade;

/// The client's side of an upgrade its request asked for (the request must have come from
/// hyper's stack, which the in-task server hands upgrades to).
pub fn client_upgrade<B>(req: &mut http::Request<B>) -> OnUpgrade {
    hyper::upgrade::on(req)
}

/// The instance's side of an upgrade its `101` response agreed to.
pub fn upstream_upgrade<B>(resp: &mut http::Response<B>) -> OnUpgrade {
    hyper::upgrade::on(resp)
}

/// Once both sides have upgraded, splice them (in a task of its own); `hold` is kept until the
/// tunnel closes (an in-flight count, a concurrency slot).
pub fn spawn_splice(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle: Duration,
    hold: impl Send + 'static,
) {
    tokio::spawn(async move {
        let _hold = hold;
        let (Ok(c), Ok(u)) = (client.await, upstream.await) else {
            return;
        };
        splice(c, u, idle).await;
    });
}

/// Milliseconds since this module's first use (monotonic).
fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

async fn pump<R, W>(mut r: R, mut w: W, last: &AtomicU64, start: Instant)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        last.store(now_ms(start), Ordering::Relaxed);
    }
    let _ = w.shutdown().await;
}

/// Copy both ways between two upgraded connections until both sides close, or nothing moves
/// for `idle`.
pub async fn splice(a: hyper::upgrade::Upgraded, b: hyper::upgrade::Upgraded, idle: Duration) {
    let (ar, aw) = tokio::io::split(hyper_util::rt::TokioIo::new(a));
    let (br, bw) = tokio::io::split(hyper_util::rt::TokioIo::new(b));
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let watchdog = async {
        loop {
            tokio::time::sleep(idle / 4 + Duration::from_millis(1)).await;
            if now_ms(start).saturating_sub(last.load(Ordering::Relaxed)) >= idle.as_millis() as u64
            {
                break;
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(pump(ar, bw, &last, start), pump(br, aw, &last, start)) } => {}
        _ = watchdog => {}
    }
}
