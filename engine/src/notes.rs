//! The notes shards send each other through the mesh: a part handed to the shard
//! that owns its site (with a copy of the body, since the sender's spool mapping
//! stays on the sender), and the report of the attempt back to the shard that
//! spooled the message, which alone writes its spool records and keeps its retry
//! state; chunks of a large transmission for other shards to generate, and word back
//! when each is spooled; wake-ups when live settings change. The shard's
//! inbox routes each to the part of the engine it is for.

use std::sync::Arc;
use std::time::Duration;

use gannet_core::handoff::{Handoff, Report};

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
