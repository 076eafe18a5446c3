//! The notes shards send each other through the mesh: a part handed to the shard
//! that owns its site (with a copy of the body, since the sender's spool mapping
//! stays on the sender), and the report of the attempt back to the shard that
//! spooled the message, which alone writes its spool records and keeps its retry
//! state; chunks of a large transmission for other shards to generate, and word back
//! when each is spooled; wake-ups when live settings change; the admin API's
//! questions to every shard ([`Ask`]). The shard's inbox routes each to the part of
//! the engine it is for.

use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use atomic_waker::AtomicWaker;
use gannet_core::handoff::{Handoff, Report};
use gannet_core::id::MessageId;
use gannet_core::shaping::QueueSelector;

use crate::io::Shutdown;
use crate::mesh::Mesh;

/// A chunk of a transmission for another shard to generate, spool and queue.
#[derive(Debug)]
pub struct GenerateChunk {
    /// The shard coordinating the job (it gets told when the chunk is done).
    pub home: u16,
    /// The job's number on its home shard.
    pub key: u64,
    pub job: Arc<crate::merge::Job>,
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
    /// The admin API asks the shard about its queues.
    Ask(Box<Ask>),
}

/// What the admin API asks each shard.
#[derive(Debug, Clone)]
pub enum Question {
    /// Its scheduled and ready queues (`detail`: with each scheduled queue's oldest
    /// message and next due time, found by a scan).
    Queues { detail: bool },
    /// A message it spooled: envelope, metadata, headers (and the body), retry
    /// state, where each part is.
    Message { id: MessageId, body: bool },
    /// What a bounce of these scheduled queues would take (a dry run).
    Count(QueueSelector),
    /// The messages of one scheduled queue (at most `limit`, with their bodies
    /// when `body`), and how many parts it has.
    SchedQueue {
        name: String,
        limit: usize,
        body: bool,
    },
    /// Drop the queued messages of a canceled transmission not yet tried (the
    /// Transmissions API's DELETE): how many.
    CancelTransmission { id: String },
}

/// A question for every shard and where their answers gather.
#[derive(Debug)]
pub struct Ask {
    pub question: Question,
    pub answers: Arc<Answers>,
}

/// The answers to an [`Ask`], one per shard, gathered across threads: each shard
/// puts its own and wakes the asking task.
#[derive(Debug)]
pub struct Answers {
    expected: usize,
    got: Mutex<Vec<(u16, serde_json::Value)>>,
    waker: AtomicWaker,
}

impl Answers {
    pub fn new(expected: usize) -> Arc<Answers> {
        Arc::new(Answers {
            expected,
            got: Mutex::new(Vec::with_capacity(expected)),
            waker: AtomicWaker::new(),
        })
    }

    /// Shard `shard`'s answer.
    pub fn put(&self, shard: u16, answer: serde_json::Value) {
        self.got
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((shard, answer));
        self.waker.wake();
    }

    /// Every shard's answer, in shard order, once all have answered.
    pub async fn all(&self) -> Vec<(u16, serde_json::Value)> {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            let mut got = self.got.lock().unwrap_or_else(PoisonError::into_inner);
            if got.len() < self.expected {
                return Poll::Pending;
            }
            let mut all = std::mem::take(&mut *got);
            all.sort_by_key(|(shard, _)| *shard);
            Poll::Ready(all)
        })
        .await
    }

    /// How many shards have answered.
    pub fn answered(&self) -> usize {
        self.got
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Sends a note that must not be lost (a report, a chunk's word back: the receiver
/// holds state until it arrives), retrying every millisecond while the inbox is full;
/// gives up only when the shard stops.
pub async fn send_surely(mesh: &Mesh<Note>, to: u16, mut note: Note, shutdown: &Shutdown) {
    loop {
        match mesh.send(to, note) {
            Ok(()) => return,
            Err(back) => {
                note = back;
                if shutdown.is_raised() {
                    return;
                }
                crate::timer::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}
