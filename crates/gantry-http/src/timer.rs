//! Attempt deadlines on a timer a connection keeps: the in-task server lends its connection's
//! timer to each request ([`ConnTimer`]), and [`within`] bounds one attempt by it, moving the
//! timer lazily (a new timer per attempt would be a timer-wheel insertion and removal, and
//! moving it per request three atomic operations).

use std::pin::Pin;

use tokio::time::Sleep;

use crate::nudge::{poll_deadline, Nudge};

/// The deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// `fut`, or `Err(Elapsed)` once `deadline` passed first, on `timer` (see `within_on`).
pub fn within<'a, F: std::future::Future + 'a>(
    timer: &'a mut ConnTimer<'_>,
    deadline: tokio::time::Instant,
    fut: Pin<&'a mut F>,
) -> impl std::future::Future<Output = Result<F::Output, Elapsed>> + 'a {
    within_on(timer.sleep.as_mut(), timer.waits, deadline, fut)
}

/// `fut`, or `Err` once `deadline` passed first. A connection's timer keeps an earlier
/// request's deadline: it is moved to this one at once only if it would fire late, else when it
/// fires early. Moving it on every request would be three atomic operations each; this way it
/// moves about once per timeout period. With `waits` (the connection's timer), the timer is
/// polled only after it woke the task (`nudge.rs`).
async fn within_on<F: std::future::Future>(
    mut timer: Pin<&mut Sleep>,
    waits: Option<&Nudge>,
    deadline: tokio::time::Instant,
    mut fut: Pin<&mut F>,
) -> Result<F::Output, Elapsed> {
    use std::task::{ready, Context, Poll};
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
        // Re-armed: polled at its next turn, whatever it did before.
        if let Some(n) = waits {
            n.raise();
        }
    }
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let w = match waits {
            Some(n) => match n.due(cx, true) {
                Some(w) => w,
                None => return Poll::Pending,
            },
            None => cx.waker(),
        };
        ready!(poll_deadline(
            timer.as_mut(),
            deadline,
            &mut Context::from_waker(w)
        ));
        // Fired, holding no waker: the next attempt on this connection polls it (and re-arms it).
        if let Some(n) = waits {
            n.raise();
        }
        Poll::Ready(Err(Elapsed))
    })
    .await
}

/// A timer for attempt deadlines: a connection's, lent to each of its requests with the waker
/// group it is polled in, or (`ConnTimer::new`) one of a request's own.
pub struct ConnTimer<'a> {
    pub(crate) sleep: Pin<&'a mut Sleep>,
    pub(crate) waits: Option<&'a Nudge>,
}

impl<'a> ConnTimer<'a> {
    /// A timer of the caller's own (polled with the task's waker).
    pub fn new(sleep: Pin<&'a mut Sleep>) -> Self {
        Self { sleep, waits: None }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn within_keeps_the_deadline_whatever_the_timer_was_set_to() {
        use tokio::time::{sleep, sleep_until, Instant};
        let ms = Duration::from_millis;
        let nudge = Nudge::here().await;
        // The timer is set earlier than the deadline (an earlier request's), even already
        // fired: the future is given until the deadline, and no longer. With the connection's
        // waker group and without.
        for waits in [None, Some(&nudge)] {
            for timer_at in [ms(0), ms(20)] {
                let start = Instant::now();
                let mut timer = std::pin::pin!(sleep_until(start + timer_at));
                if timer_at.is_zero() {
                    timer.as_mut().await;
                }
                let slow = std::pin::pin!(sleep(ms(2000)));
                let r = within_on(timer.as_mut(), waits, start + ms(150), slow).await;
                let took = start.elapsed();
                assert!(r.is_err());
                assert!(took >= ms(150) && took < ms(800), "{took:?}");
                // The same timer, reused: a future that finishes in time is not cut, and one
                // that does not is cut at the new deadline.
                let quick = std::pin::pin!(async {
                    sleep(ms(10)).await;
                    7
                });
                let deadline = Instant::now() + ms(1000);
                assert_eq!(
                    within_on(timer.as_mut(), waits, deadline, quick).await,
                    Ok(7)
                );
                let start = Instant::now();
                let slow = std::pin::pin!(sleep(ms(2000)));
                let r = within_on(timer.as_mut(), waits, start + ms(100), slow).await;
                let took = start.elapsed();
                assert!(r.is_err() && took >= ms(100) && took < ms(800), "{took:?}");
            }
        }
    }
}
