//! The core mesh: how shards hand work to each other. Each shard has one inbox, a
//! bounded lock-free crossbeam channel that every shard may send to, and a waker slot
//! for the inbox task; a sender wakes the owner only through that slot, so a busy
//! owner pays nothing per note and a parked one (sleeping in io_uring) is woken by
//! glommio's foreign-wake path.
//!
//! What crosses: a part handed to the shard that owns its site (with a copy of the
//! body, since the sender's spool mapping stays on the sender), and the report of
//! the attempt back to the shard that spooled the message, which alone writes its
//! spool records and keeps its retry state; chunks of a large transmission for
//! other shards to generate, and word back when each is spooled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use crate::delivery::client::Response;

/// A destination site, in a form that can cross cores.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    pub name: String,
    pub hosts: Vec<SocketAddr>,
    pub host_names: Vec<String>,
}

/// A part for the owner of its site to deliver.
#[derive(Debug)]
pub struct Handoff {
    /// The shard that spooled the message (it gets the report).
    pub from: u16,
    /// The sender's handle for the part.
    pub token: u64,
    pub sender: String,
    pub recipients: Vec<String>,
    /// One copy of the body per hop: the spool mapping cannot leave its shard.
    pub body: Arc<Vec<u8>>,
    pub site: SiteSpec,
    /// The egress source drawn for this attempt (by name; every shard has the same
    /// configuration).
    pub egress: String,
}

/// The outcome of a handed-off part, for the shard that spooled the message.
#[derive(Debug)]
pub struct Report {
    pub token: u64,
    /// One reply per recipient of the handoff, in order.
    pub results: Vec<Response>,
    pub peer: Option<SocketAddr>,
    pub tls: Option<String>,
    /// The owner's ready queue was full (max_ready): nothing was tried, and the part
    /// is delayed rather than failed.
    pub delayed: bool,
}

/// A chunk of a transmission for another shard to generate, spool and queue.
#[derive(Debug)]
pub struct GenerateChunk {
    /// The shard coordinating the job (it gets told when the chunk is done).
    pub home: u16,
    /// The job's number on its home shard.
    pub key: u64,
    pub job: Arc<crate::generate::Job>,
    pub chunk: u32,
}

#[derive(Debug)]
pub enum Note {
    /// Boxed to keep notes small in the channel's slots (a hop allocates anyway).
    Handoff(Box<Handoff>),
    Report(Report),
    /// The live settings changed: look at them now rather than at the next round.
    Wake,
    Generate(Box<GenerateChunk>),
    /// A chunk handed over with `Generate` is spooled and queued (`ok`), or was not.
    Generated {
        key: u64,
        chunk: u32,
        ok: bool,
    },
}

#[derive(Debug)]
struct Inbox {
    tx: Sender<Note>,
    rx: Receiver<Note>,
    waker: AtomicWaker,
}

/// Every shard's inbox.
#[derive(Debug)]
pub struct Mesh {
    inboxes: Vec<Inbox>,
}

impl Mesh {
    /// `capacity_max` notes may wait in each inbox.
    pub fn new(shards: usize, capacity_max: usize) -> Mesh {
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
    pub fn send(&self, to: u16, note: Note) -> Result<(), Note> {
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
    pub async fn receive(&self, me: u16, out: &mut Vec<Note>, max: usize) {
        let inbox = &self.inboxes[usize::from(me)];
        std::future::poll_fn(|cx| {
            let drain = |out: &mut Vec<Note>| {
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
    use super::*;

    fn report(token: u64) -> Note {
        Note::Report(Report {
            token,
            results: vec![],
            peer: None,
            tls: None,
            delayed: false,
        })
    }

    #[test]
    fn bounded_inboxes_wake_their_owner_across_threads() {
        let mesh = Arc::new(Mesh::new(2, 4));
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
                assert!(matches!(&out[..], [Note::Report(Report { token: 42, .. })]));
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(owner("mx1.a.test", 1), 0);
        assert!(owner("mx1.a.test", 2) < 2);
    }
}
