//! The spool's writer thread: it writes staged records into their segment file (one
//! `pwrite` into the page cache per stage) so that the shard's executor never waits
//! on one. A `pwrite` is usually a copy into cached pages, but it can sleep (dirty-page
//! throttling, page-cache allocation under memory pressure), and everything else on
//! the core would sleep with it.
//!
//! The thread is the spool's own, not glommio's blocking pool: that pool also prepares
//! segments (seconds of zero-filling on a slow disk), hashes AUTH passwords and
//! writes event logs, and a commit's write queued behind those would hold every
//! acknowledgement of its batch.

use std::cell::OnceCell;
use std::io;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};

use crate::segment::WriteJob;

/// The handle of one spool's writer thread, started with the first write.
#[derive(Debug)]
pub(super) struct Writer {
    shard: u16,
    /// Set at the first write: None when the thread could not be started (then
    /// writes run inline).
    jobs: OnceCell<Option<Sender<Request>>>,
}

struct Request {
    job: WriteJob,
    done: Arc<Done>,
}

/// Where the thread leaves a write's result and wakes its task.
#[derive(Default)]
struct Done {
    state: Mutex<(Option<io::Result<()>>, Option<Waker>)>,
}

impl Writer {
    pub(super) fn new(shard: u16) -> Self {
        Writer {
            shard,
            jobs: OnceCell::new(),
        }
    }

    /// Runs `job` on the writer thread and returns its result.
    pub(super) async fn write(&self, job: WriteJob) -> io::Result<()> {
        // One small allocation per write (per group commit, not per record): the
        // result's meeting place, shared with the thread.
        let done = Arc::new(Done::default());
        let request = Request {
            job,
            done: done.clone(),
        };
        let sent = match self.jobs.get_or_init(|| self.start()) {
            Some(jobs) => jobs.send(request).map_err(|e| e.0),
            None => Err(request),
        };
        if let Err(request) = sent {
            return request.job.run();
        }
        std::future::poll_fn(|cx| {
            let mut state = done.state.lock().unwrap_or_else(PoisonError::into_inner);
            match state.0.take() {
                Some(result) => Poll::Ready(result),
                None => {
                    state.1 = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Starts the thread; None if it cannot be.
    fn start(&self) -> Option<Sender<Request>> {
        let (jobs, requests) = channel::<Request>();
        let spawned = std::thread::Builder::new()
            .name(format!("gannet-spool-{}", self.shard))
            .spawn(move || {
                // Ends when the spool (the only sender) is dropped.
                for Request { job, done } in requests {
                    let result = job.run();
                    let waker = {
                        let mut state = done.state.lock().unwrap_or_else(PoisonError::into_inner);
                        state.0 = Some(result);
                        state.1.take()
                    };
                    if let Some(waker) = waker {
                        // glommio takes a wake from another thread through the
                        // executor's notifier.
                        waker.wake();
                    }
                }
            });
        match spawned {
            Ok(_) => Some(jobs),
            Err(err) => {
                tracing::warn!(
                    shard = self.shard,
                    error = %err,
                    "could not start the spool's writer thread; segment writes run on the shard"
                );
                None
            }
        }
    }
}
