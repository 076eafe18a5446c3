//! Inspecting a spool while gannetd is stopped: list live messages, dump one, verify
//! every segment.
//!
//! A path names either one shard directory (it holds `*.seg` files) or a spool root
//! whose numbered subdirectories are shards (`<data_dir>/spool/0`, `…/1`, …).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use gannet_spool::record::ArchivedMessageRecord;
use gannet_spool::storage::FileStorage;
use gannet_spool::{LiveMessage, MessageId, Recovered, Spool, SpoolConfig, Storage};

/// The shard directories under `path`, as (shard, directory).
pub fn shard_dirs(path: &Path) -> Result<Vec<(u16, PathBuf)>> {
    if !path.is_dir() {
        bail!("{} is not a directory", path.display());
    }
    let is_shard = |dir: &Path| -> Result<bool> {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        Ok(entries.any(|e| {
            e.map(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.ends_with(".seg") || name == gannet_spool::storage::LOCK_FILE_NAME
            })
            .unwrap_or(false)
        }))
    };
    if is_shard(path)? {
        // A shard directory is named by its number (`<data_dir>/spool/<shard>`).
        let shard = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u16>().ok())
            .unwrap_or(0);
        return Ok(vec![(shard, path.to_path_buf())]);
    }
    let mut shards = Vec::new();
    for entry in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let shard = name.to_str().and_then(|n| n.parse::<u16>().ok());
        if let Some(shard) = shard.filter(|_| entry.path().is_dir()) {
            shards.push((shard, entry.path()));
        }
    }
    shards.sort();
    if shards.is_empty() {
        bail!(
            "{} holds no spool segments and no shard directories",
            path.display()
        );
    }
    Ok(shards)
}

/// Recovers one shard read-only (no segment is created, deleted or written).
pub fn recover_shard(shard: u16, dir: &Path) -> Result<Recovered> {
    let storage =
        FileStorage::read_only(dir).with_context(|| format!("opening {}", dir.display()))?;
    // Nothing is appended, so segment sizing does not matter here.
    let (_, recovered) = Spool::open(storage, SpoolConfig::for_shard(shard))
        .with_context(|| format!("recovering {}", dir.display()))?;
    Ok(recovered)
}

fn format_time(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "now".to_string();
    }
    let at = UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn sender(m: &ArchivedMessageRecord) -> &str {
    if m.sender.is_empty() {
        "<>"
    } else {
        m.sender.as_str()
    }
}

/// One line per live message, oldest first; or JSON lines.
pub fn list(path: &Path, json: bool) -> Result<String> {
    let mut out = String::new();
    if !json {
        writeln!(
            out,
            "{:<32} {:>5} {:<20} {:>8} {:>9} {:>5}  {:<24} SENDER",
            "ID", "SHARD", "DUE", "ATTEMPTS", "BYTES", "RCPTS", "QUEUE"
        )?;
    }
    let mut total = 0;
    for (shard, dir) in shard_dirs(path)? {
        let recovered = recover_shard(shard, &dir)?;
        for live in &recovered.live {
            let m = live.message.get();
            let pending = m.recipients.len() - live.state.done.len().min(m.recipients.len());
            if json {
                let line = serde_json::json!({
                    "id": live.id.to_string(),
                    "shard": shard,
                    "queue": live.state.queue,
                    "attempts": live.state.attempts,
                    "due_unix_ms": live.state.due_unix_ms,
                    "bytes": m.body.len(),
                    "recipients": m.recipients.len(),
                    "recipients_pending": pending,
                    "sender": m.sender.as_str(),
                });
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "{:<32} {:>5} {:<20} {:>8} {:>9} {:>5}  {:<24} {}",
                    live.id,
                    shard,
                    format_time(live.state.due_unix_ms),
                    live.state.attempts,
                    m.body.len(),
                    pending,
                    live.state.queue,
                    sender(m)
                )?;
            }
            total += 1;
        }
    }
    if !json {
        writeln!(out, "{total} live messages")?;
    }
    Ok(out)
}

fn find(path: &Path, id: MessageId) -> Result<(u16, LiveMessage)> {
    for (shard, dir) in shard_dirs(path)? {
        let recovered = recover_shard(shard, &dir)?;
        if let Some(live) = recovered.live.into_iter().find(|m| m.id == id) {
            return Ok((shard, live));
        }
    }
    bail!("no live message {id} in {}", path.display())
}

/// Envelope, metadata and retry state of one message; with `body`, the raw body after
/// a blank line.
pub fn dump(path: &Path, id: &str, body: bool) -> Result<Vec<u8>> {
    let id: MessageId = id.parse()?;
    let (shard, live) = find(path, id)?;
    let m = live.message.get();
    let loc = live.message.loc();
    let mut out = String::new();
    writeln!(out, "id: {id}")?;
    writeln!(out, "shard: {shard}")?;
    writeln!(
        out,
        "location: segment {} offset {} ({} bytes)",
        loc.seq, loc.offset, loc.len
    )?;
    writeln!(
        out,
        "received: {}",
        format_time(m.received_unix_ms.to_native())
    )?;
    writeln!(out, "queue: {}", live.state.queue)?;
    writeln!(out, "attempts: {}", live.state.attempts)?;
    writeln!(out, "due: {}", format_time(live.state.due_unix_ms))?;
    writeln!(out, "sender: {}", sender(m))?;
    for (i, rcpt) in m.recipients.iter().enumerate() {
        let done = live.state.done.contains(&(i as u32));
        writeln!(
            out,
            "recipient: {rcpt}{}",
            if done { " (done)" } else { "" }
        )?;
    }
    for pair in m.meta.iter() {
        writeln!(out, "meta: {}={}", pair.0, pair.1)?;
    }
    writeln!(out, "body_bytes: {}", m.body.len())?;
    let mut out = out.into_bytes();
    if body {
        out.extend_from_slice(b"\n");
        out.extend_from_slice(m.body.as_slice());
    }
    Ok(out)
}

/// Checks every record of every segment. Returns the report and whether all was clean.
pub fn verify(path: &Path) -> Result<(String, bool)> {
    let mut out = String::new();
    let mut clean = true;
    for (shard, dir) in shard_dirs(path)? {
        let storage =
            FileStorage::read_only(&dir).with_context(|| format!("opening {}", dir.display()))?;
        let recovered = recover_shard(shard, &dir)?;
        let report = &recovered.report;
        for segment in &report.segments {
            let name = storage.segment_path(segment.seq);
            let name = name
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(why) = &segment.unusable {
                clean = false;
                writeln!(out, "shard {shard} {name}: UNUSABLE: {why}")?;
                continue;
            }
            let status = if segment.is_clean() { "ok" } else { "DAMAGED" };
            writeln!(
                out,
                "shard {shard} {name}: {status}: {} records, {} bytes used",
                segment.records, segment.end
            )?;
            for region in &segment.corrupt {
                clean = false;
                writeln!(
                    out,
                    "  corrupt: offset {} length {}: {}",
                    region.offset, region.bytes, region.reason
                )?;
            }
            if segment.torn_bytes > 0 {
                clean = false;
                writeln!(
                    out,
                    "  torn tail: {} bytes discarded after offset {}",
                    segment.torn_bytes, segment.end
                )?;
            }
        }
        let segments = storage.list().map(|l| l.len()).unwrap_or(0);
        writeln!(
            out,
            "shard {shard}: {segments} segments, {} records, {} live messages, {} orphan records",
            report.records, report.live, report.orphans
        )?;
    }
    writeln!(
        out,
        "{}",
        if clean {
            "verify: ok"
        } else {
            "verify: DAMAGE FOUND"
        }
    )?;
    Ok((out, clean))
}
