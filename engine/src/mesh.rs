//! The core mesh: how shards hand work to each other. Each shard has one inbox, a
//! bounded lock-free crossbeam channel that every shard may send to, and a waker slot
//! for the inbox task; a sender wakes the owner only through that slot, so a busy
//! owner pays nothing per note and a parked one (sleeping in io_uring) is woken by
//! glommio's foreign-wake path.
//!
//! The mesh is generic over what it carries; the daemon's notes are
//! `Note` in `notes.rs`. It imports no other module of the engine.

use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

#[derive(Debug)]
struct Inbox<N> {
    tx: Sender<N>,
    rx: Receiver<N>,
    waker: AtomicWaker,
}

/// Every shard's inbox.
#[derive(Debug)]
pub struct Mesh<N> {
    inboxes: Vec<Inbox<N>>,
}

impl<N> Mesh<N> {
    /// `capacity_max` notes may wait in each inbox.
    pub fn new(shards: usize, capacity_max: usize) -> Mesh<N> {
        Mesh {
            inboxes: (0..shards)
                .map(|_| {
                    let (tx, rx) = bounded(capacity_max);
                    Inbox {
                        tx,
                        rx,
                        waker: AtomicWaker::new(),
                    }
                })
                .collect(),
        }
    }

    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }

    /// Puts a note in shard `to`'s inbox and wakes it; gives the note back when the
    /// inbox is full (the caller decides: do the work itself, or retry).
    pub fn send(&self, to: u16, note: N) -> Result<(), N> {
        let inbox = &self.inboxes[usize::from(to)];
        match inbox.tx.try_send(note) {
            Ok(()) => {
                inbox.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(note) | TrySendError::Disconnected(note)) => Err(note),
        }
    }

    /// Waits until shard `me` has notes, then moves up to `max` of them into `out`.
    pub async fn receive(&self, me: u16, out: &mut Vec<N>, max: usize) {
        let inbox = &self.inboxes[usize::from(me)];
        std::future::poll_fn(|cx| {
            let drain = |out: &mut Vec<N>| {
                while out.len() < max {
                    match inbox.rx.try_recv() {
                        Ok(note) => out.push(note),
                        Err(_) => break,
                    }
                }
                !out.is_empty()
            };
            if drain(out) {
                return Poll::Ready(());
            }
            inbox.waker.register(cx.waker());
            // A note sent between the drain and the registration must not be missed.
            if drain(out) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// The shard that owns a site: its name hashed over the shards.
pub fn owner(site_name: &str, shards: usize) -> u16 {
    (crc32c::crc32c(site_name.as_bytes()) as usize % shards.max(1)) as u16
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn report(token: u64) -> u64 {
        token
    }

    #[test]
    fn bounded_inboxes_wake_their_owner_across_threads() {
        let mesh = Arc::new(Mesh::<u64>::new(2, 4));
        for t in 0..4 {
            mesh.send(1, report(t)).unwrap();
        }
        assert!(
            mesh.send(1, report(9)).is_err(),
            "the fifth note does not fit"
        );
        let sender = mesh.clone();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut out = Vec::new();
                mesh.receive(1, &mut out, 3).await;
                assert_eq!(out.len(), 3);
                out.clear();
                mesh.receive(1, &mut out, 10).await;
                assert_eq!(out.len(), 1);
                out.clear();
                // Parked with an empty inbox: a note from another thread wakes us.
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    sender.send(1, report(42)).unwrap();
                });
                mesh.receive(1, &mut out, 10).await;
                assert_eq!(out, [42]);
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(owner("mx1.a.test", 1), 0);
        assert!(owner("mx1.a.test", 2) < 2);
    }
}
