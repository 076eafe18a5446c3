//! Spool directories left by shards that no longer exist (`server.shards` lowered, a
//! smaller host): their mail is adopted at start-up, so that changing the shard count
//! never strands a message.
//!
//! Directory `spool/<j>` with `j >= shards` is adopted by shard `j mod shards`. The
//! shard reads it (shared lock, never writing it), copies every live message into its
//! own spool with its exact retry state (attempts, due time, queue, finished
//! recipients), waits until the copies are durable, and only then renames the old
//! directory to `spool/.adopted-<j>` and removes it. A crash at any point leaves
//! every message in the old directory, in the new one, or in both; a message already
//! live in the adopting spool (copied before a crash) is not copied again, so a
//! second adoption of the same directory queues nothing twice.
//!
//! Raising the shard count needs nothing: every existing directory keeps its shard,
//! and the new shards start empty.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use gannet_spool::{FileStorage, LiveMessage, MessageRecord, Spool, SpoolConfig};

use crate::storage::ShardStorage;

/// The prefix of a directory being removed after its adoption.
const ADOPTED_PREFIX: &str = ".adopted-";

/// The spool directories of shards `>= shards` that shard `id` adopts, in order.
pub fn orphans(spool_dir: &Path, shards: u16, id: u16) -> Result<Vec<(u16, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(spool_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", spool_dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", spool_dir.display()))?;
        let name = entry.file_name();
        let Some(j) = name.to_str().and_then(|n| n.parse::<u16>().ok()) else {
            continue;
        };
        // "07" is not the directory of shard 7; only canonical names are spools.
        if j.to_string().as_str() != name.to_str().unwrap_or_default() {
            continue;
        }
        if j >= shards && j % shards == id && entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.push((j, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Removes what an adoption interrupted by a crash left to delete (every message in
/// it was durable in its adopting spool before the rename).
pub fn remove_adopted_leftovers(spool_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(spool_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(ADOPTED_PREFIX)
        {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Copies the live messages of orphan directory `dir` (shard `j`'s) into `spool` and
/// removes the directory; returns the adopted messages, read from `spool`, with their
/// retry state, for the caller to queue like recovered ones.
pub async fn adopt(
    spool: &Spool<ShardStorage>,
    id: u16,
    j: u16,
    dir: &Path,
) -> Result<Vec<LiveMessage>> {
    let storage = FileStorage::read_only(dir)
        .with_context(|| format!("shard {id}: opening {} to adopt it", dir.display()))?;
    let (orphan, recovered) = Spool::open(storage, SpoolConfig::for_shard(j))
        .with_context(|| format!("shard {id}: recovering {} to adopt it", dir.display()))?;
    let mut tickets = Vec::with_capacity(recovered.live.len());
    let mut adopted = Vec::with_capacity(recovered.live.len());
    for live in &recovered.live {
        if spool.get(live.id).is_some() {
            // Copied by an adoption that a crash interrupted: recovered (and queued)
            // with the adopting spool itself.
            continue;
        }
        let m = live.message.get();
        let (sender, recipients, meta) = m.envelope();
        let record = MessageRecord {
            id: live.id,
            sender,
            recipients,
            meta,
            queue: live.state.queue.clone(),
            attempts: live.state.attempts,
            due_unix_ms: live.state.due_unix_ms,
            received_unix_ms: m.received_unix_ms.to_native(),
            done: live.state.done.clone(),
            body: m.body.to_vec(),
        };
        let ticket = spool.append_message(&record).with_context(|| {
            format!(
                "shard {id}: cannot adopt message {} from {} (start with server.shards > {j} to deliver it from there)",
                live.id,
                dir.display()
            )
        })?;
        tickets.push(ticket);
        adopted.push(live.id);
    }
    for ticket in tickets {
        spool
            .durable(ticket)
            .await
            .with_context(|| format!("shard {id}: adopting {}", dir.display()))?;
    }
    drop(recovered);
    drop(orphan);
    // Every message is durable here now: the old directory goes, atomically first.
    let parent = dir.parent().unwrap_or(Path::new("."));
    let gone = parent.join(format!("{ADOPTED_PREFIX}{j}"));
    std::fs::rename(dir, &gone)
        .and_then(|()| gannet_spool::durable::sync_dir(parent))
        .with_context(|| format!("shard {id}: renaming {} after adopting it", dir.display()))?;
    std::fs::remove_dir_all(&gone)
        .with_context(|| format!("shard {id}: removing {}", gone.display()))?;
    let messages = adopted
        .into_iter()
        .filter_map(|mid| {
            let message = spool.get(mid)?;
            let m = message.get();
            let state = gannet_spool::RetryState {
                attempts: m.attempts.to_native(),
                due_unix_ms: m.due_unix_ms.to_native(),
                queue: m.queue.to_string(),
                done: m.done.iter().map(|d| d.to_native()).collect(),
            };
            Some(LiveMessage {
                id: mid,
                message,
                state,
            })
        })
        .collect::<Vec<_>>();
    tracing::info!(
        shard = id,
        from = %dir.display(),
        messages = messages.len(),
        "adopted the spool of a shard beyond server.shards"
    );
    Ok(messages)
}
