//! The process-wide stop, rung once (SIGTERM, SIGINT, or a start that failed) and
//! heard by every shard at the same moment.
//!
//! Shards used to look at a stop flag in their periodic round; an idle shard's round
//! runs every half second, so after SIGTERM one shard could be telling its clients
//! 421 while another still answered 250 for a while. The bell wakes each shard's
//! round as it rings (glommio takes a wake from a foreign thread through the
//! executor's own notifier), so all shards begin their shutdown together.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;

/// Rung once; every shard waits on its own slot.
#[derive(Debug)]
pub struct StopBell {
    rung: AtomicBool,
    /// One per shard: the waker of that shard's round while it sleeps.
    wakers: Vec<AtomicWaker>,
}

impl StopBell {
    pub fn new(shards: usize) -> Self {
        StopBell {
            rung: AtomicBool::new(false),
            wakers: (0..shards).map(|_| AtomicWaker::new()).collect(),
        }
    }

    /// Raises the stop and wakes every shard. Safe from any thread, any number of
    /// times (not from a signal handler: waking takes locks).
    pub fn ring(&self) {
        self.rung.store(true, Ordering::Release);
        for waker in &self.wakers {
            waker.wake();
        }
    }

    pub fn is_rung(&self) -> bool {
        self.rung.load(Ordering::Acquire)
    }

    /// Sleeps for `d` on shard `shard`, returning early (true) once the bell rings.
    pub async fn sleep(&self, shard: usize, d: Duration) -> bool {
        let rung = Rung { bell: self, shard };
        futures_lite::future::or(rung, async {
            crate::timer::sleep(d).await;
            self.is_rung()
        })
        .await
    }
}

/// Resolves (true) once the bell has rung.
struct Rung<'a> {
    bell: &'a StopBell,
    shard: usize,
}

impl Future for Rung<'_> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let Some(slot) = self.bell.wakers.get(self.shard) else {
            // A shard the bell was not made for hears it in its round.
            return Poll::Pending;
        };
        if self.bell.is_rung() {
            return Poll::Ready(true);
        }
        slot.register(cx.waker());
        // Registered before looking again, so a ring in between is not missed.
        if self.bell.is_rung() {
            Poll::Ready(true)
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    /// A bell rung from another thread wakes both sleeping executors at once, long
    /// before their sleep would have ended.
    #[test]
    fn a_ring_from_another_thread_wakes_every_shard() {
        let bell = Arc::new(StopBell::new(2));
        let handles: Vec<_> = (0..2)
            .map(|shard| {
                let bell = bell.clone();
                std::thread::spawn(move || {
                    glommio::LocalExecutorBuilder::default()
                        .spawn(move || async move {
                            let start = Instant::now();
                            let rung = bell.sleep(shard, Duration::from_secs(30)).await;
                            (rung, start.elapsed())
                        })
                        .expect("executor")
                        .join()
                        .expect("join")
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        bell.ring();
        for handle in handles {
            let (rung, took) = handle.join().expect("thread");
            assert!(rung);
            assert!(took < Duration::from_secs(20), "slept {took:?}");
        }
        // Rung already: a new sleep returns at once, and says so.
        let bell2 = bell.clone();
        let rung = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move { bell2.sleep(0, Duration::from_secs(30)).await })
            .expect("executor")
            .join()
            .expect("join");
        assert!(rung);
    }

    /// Without a ring the sleep runs its course and reports no stop.
    #[test]
    fn an_unrung_bell_lets_the_sleep_end() {
        let bell = Arc::new(StopBell::new(1));
        let rung = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move { bell.sleep(0, Duration::from_millis(20)).await })
            .expect("executor")
            .join()
            .expect("join");
        assert!(!rung);
    }
}
