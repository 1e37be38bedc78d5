//! Background futures of a connection (its timers, the shutdown signal) polled only after they
//! woke it.
//!
//! A connection's task waits, between and during requests, on a socket and on futures that
//! almost never complete: the header-read deadline, the shutdown signal, the attempt deadline.
//! Polling one of those re-registers the task's waker each time (a tokio timer: two atomic
//! read-modify-writes; the shutdown channel: its waiter lock), once or twice per request. Here
//! they are polled with a waker of their own, which raises a flag and wakes the task: the task
//! polls them again only when the flag is up, so a request that finds them still pending costs
//! one plain load.
//!
//! The invariant users keep: each such future either holds this waker (it was polled and is
//! pending) or the flag is up. A future that completes and is then re-armed (a timer reset
//! after it fired) must be polled again at once, or the flag raised with [`Nudge::raise`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use tokio::time::{Instant, Sleep};

struct Flag {
    raised: AtomicBool,
    task: Waker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.raised.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

/// One group of background futures, for the task that made it.
pub(crate) struct Nudge {
    flag: Arc<Flag>,
    waker: Waker,
}

impl Nudge {
    /// For the task polling with `cx`; the flag starts up (nothing registered yet).
    pub fn new(cx: &Context<'_>) -> Self {
        let flag = Arc::new(Flag {
            raised: AtomicBool::new(true),
            task: cx.waker().clone(),
        });
        Self {
            waker: Waker::from(flag.clone()),
            flag,
        }
    }

    /// Made in the current task (an `await` point).
    pub async fn here() -> Self {
        std::future::poll_fn(|cx| Poll::Ready(Self::new(cx))).await
    }

    /// The waker to poll the group's futures with, if they may have something to say: the flag
    /// is up, or the task polling is not the one this was made for (then its own waker, every
    /// time). `all`: every future of the group is about to be polled, so the flag goes down
    /// first (a wake from now on raises it again).
    pub fn due<'a>(&'a self, cx: &'a Context<'_>, all: bool) -> Option<&'a Waker> {
        if !self.flag.task.will_wake(cx.waker()) {
            return Some(cx.waker());
        }
        if !self.flag.raised.load(Ordering::Acquire) {
            return None;
        }
        if all {
            self.flag.raised.store(false, Ordering::Relaxed);
        }
        Some(&self.waker)
    }

    /// Have the group polled at its next turn (a future completed and will be re-armed).
    pub fn raise(&self) {
        self.flag.raised.store(true, Ordering::Relaxed);
    }
}

/// Poll a timer kept for a connection, which may be set earlier than `deadline` (an earlier
/// request's, moved lazily): fired early, it is moved to `deadline` and polled again at once,
/// so that it holds the waker again. Ready once `deadline` passed.
pub fn poll_deadline(
    mut timer: Pin<&mut Sleep>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) if Instant::now() < deadline => timer.as_mut().reset(deadline),
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::time::Duration;

    #[tokio::test]
    async fn a_pending_timer_is_polled_again_only_after_it_fires() {
        let nudge = Nudge::here().await;
        let mut timer = pin!(tokio::time::sleep(Duration::from_millis(30)));
        let mut polls = 0;
        let start = std::time::Instant::now();
        std::future::poll_fn(|cx| {
            if let Some(w) = nudge.due(cx, true) {
                polls += 1;
                if timer.as_mut().poll(&mut Context::from_waker(w)).is_ready() {
                    return Poll::Ready(());
                }
            }
            // Something else wakes the task meanwhile: the timer is not polled for it.
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await;
        assert!(start.elapsed() >= Duration::from_millis(30));
        // Once to register, once after it fired.
        assert_eq!(polls, 2);
        // Another task's waker: always due (polled with that waker).
        assert!(nudge
            .due(&Context::from_waker(Waker::noop()), true)
            .is_some());
        // Completed: without `raise`, the group is not due.
        let again = std::future::poll_fn(|cx| Poll::Ready(nudge.due(cx, false).is_some())).await;
        assert!(!again);
        nudge.raise();
        let again = std::future::poll_fn(|cx| Poll::Ready(nudge.due(cx, false).is_some())).await;
        assert!(again);
    }
}
