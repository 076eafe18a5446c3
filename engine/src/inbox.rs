//! The shard's inbox: drains the notes other shards sent through the mesh and routes
//! each to the part of the engine it is for — handoffs and reports to delivery
//! ([`crate::delivery::handoff`]), chunks of transmissions and word of them back to
//! the shard's jobs ([`crate::jobs`]), wake-ups to the delivery maintainer, the
//! admin API's questions to delivery ([`crate::delivery::inspect`]).

use std::rc::Rc;

use crate::delivery::Dispatcher;
use crate::delivery::handoff::{receive_handoff, receive_report};
use crate::jobs::Jobs;
use crate::notes::{Note, send_surely};

/// Notes taken from the inbox at a time.
const INBOX_BATCH: usize = 64;

/// Runs until the shard stops.
pub async fn run(delivery: Rc<Dispatcher>, jobs: Rc<Jobs>) {
    let shard = delivery.shard.clone();
    let mut notes = Vec::with_capacity(INBOX_BATCH);
    while !shard.shutdown.is_raised() {
        futures_lite::future::or(
            shard.shared.mesh.receive(shard.id, &mut notes, INBOX_BATCH),
            shard.shutdown.wait(),
        )
        .await;
        for note in notes.drain(..) {
            match note {
                Note::Handoff(h) => receive_handoff(&delivery, h),
                Note::Report(r) => receive_report(&delivery, r),
                Note::Wake => delivery.wake_maintainer(),
                Note::Generate(g) => {
                    let jobs = jobs.clone();
                    glommio::spawn_local(async move {
                        let ok = jobs.generate_chunk(&g.job, g.chunk).await;
                        let done = Note::Generated {
                            key: g.key,
                            chunk: g.chunk,
                            ok,
                        };
                        let shard = &jobs.shard;
                        send_surely(&shard.shared.mesh, g.home, done, &shard.shutdown).await;
                    })
                    .detach();
                }
                Note::Generated { key, chunk, ok } => jobs.chunk_done(key, chunk, ok),
                Note::Ask(ask) => {
                    let answer = crate::delivery::inspect::answer(&delivery, &ask.question);
                    ask.answers.put(shard.id, answer);
                }
            }
        }
    }
}
