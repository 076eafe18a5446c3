//! A shard's event log on disk, and the reading side the hose ships from.
//!
//! Every byte a shard ever wrote to its log has a position, its *LSN* (log sequence
//! number): the bytes written before it. The current file is `events.jsonl`; when it
//! would pass `events.file_bytes_max` it is renamed to `events.<start>.jsonl`, `start`
//! being its first byte's LSN written as 20 digits, and a new current file begins
//! where it ended. So a position names one byte of one file for as long as that file
//! is kept, and the start of the current file is the end of the newest rotated one
//! (which is therefore never deleted), or 0.
//!
//! Writing. The shard serialises each event into `pending`. Whoever writes the log
//! (the spool's writer thread right before each write of spool records — the spool's
//! write barrier —, glommio's blocking thread on the shard's periodic round, the shard
//! itself before an inline spool write) takes the writer lock, swaps `pending` out and
//! writes it with one `write`. Because the spool runs the barrier before every write
//! of its records, an event recorded before an append (a delivery before its
//! tombstone, a reception before its message's durability is awaited) is in the page
//! cache before that record: after a `kill -9` the log is never behind the spool.
//! Both locks are this shard's own, shared only with its writer threads; no lock is
//! shared between shards.
//!
//! Retention. Rotated files beyond `events.files_kept` are deleted once every sink of
//! the hose has shipped them (`shipped`), and unshipped ones only when the log's files
//! pass `events.unshipped_bytes_max` (then what was lost is counted).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use super::Event;

const CURRENT: &str = "events.jsonl";
/// How often the periodic round deletes rotated files no longer needed.
const PRUNE_INTERVAL_MS: u64 = 5_000;

/// One shard's event log: the buffer events are recorded into, the file writer, and
/// the positions the hose reads by.
#[derive(Debug)]
pub struct EventFiles {
    dir: PathBuf,
    /// Serialised events not yet written.
    pending: Mutex<Vec<u8>>,
    writer: Mutex<Writer>,
    /// The LSN of the end of what is written to the files.
    end: AtomicU64,
    /// The LSN the current file starts at.
    current_start: AtomicU64,
    /// Odd while a rotation runs; readers that saw it change look again.
    rotations: AtomicU64,
    /// The lowest LSN every sink of the hose has shipped up to (u64::MAX: no sink).
    shipped: AtomicU64,
    /// Events lost because serialising or writing failed.
    dropped: AtomicU64,
    /// Bytes of unshipped events deleted to keep within `unshipped_bytes_max`.
    pruned_unshipped: AtomicU64,
    /// When `prune` last ran (unix ms).
    pruned_ms: AtomicU64,
    limits: Limits,
}

/// The bounds of one log's files.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub file_bytes_max: u64,
    pub files_kept: usize,
    pub unshipped_bytes_max: u64,
}

#[derive(Debug)]
struct Writer {
    file: File,
    /// Bytes in the current file.
    file_bytes: u64,
    /// The LSN the current file starts at.
    start: u64,
    /// The buffer the last write handed back, swapped in for the next batch (no
    /// allocation per write once both buffers have grown).
    spare: Vec<u8>,
}

/// A rotated file: its first byte's LSN and its path.
#[derive(Debug, Clone)]
struct Rotated {
    start: u64,
    path: PathBuf,
}

impl EventFiles {
    /// Opens (or creates) the log in `dir`. A current file that ends in a torn line (a
    /// crash during a write, or power loss) is cut back to its last whole line.
    pub fn open(dir: &Path, limits: Limits) -> std::io::Result<EventFiles> {
        std::fs::create_dir_all(dir)?;
        let start = match rotated(dir)?.last() {
            Some(newest) => newest.start + std::fs::metadata(&newest.path)?.len(),
            None => 0,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(dir.join(CURRENT))?;
        let len = whole_lines_len(&mut file)?;
        if len < file.metadata()?.len() {
            tracing::warn!(dir = %dir.display(), "event log ends in a torn line; cut back to the last whole one");
            file.set_len(len)?;
        }
        let writer = Writer {
            file,
            file_bytes: len,
            start,
            spare: Vec::with_capacity(64 << 10),
        };
        Ok(EventFiles {
            dir: dir.to_path_buf(),
            pending: Mutex::new(Vec::with_capacity(64 << 10)),
            writer: Mutex::new(writer),
            end: AtomicU64::new(start + len),
            current_start: AtomicU64::new(start),
            rotations: AtomicU64::new(0),
            shipped: AtomicU64::new(u64::MAX),
            dropped: AtomicU64::new(0),
            pruned_unshipped: AtomicU64::new(0),
            pruned_ms: AtomicU64::new(0),
            limits,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds an event to the pending buffer.
    pub fn record(&self, event: &Event<'_>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let before = pending.len();
        if serde_json::to_writer(&mut *pending, event).is_err() {
            pending.truncate(before);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.push(b'\n');
    }

    /// Whether events wait to be written.
    pub fn has_pending(&self) -> bool {
        !self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Writes every pending event (blocking: a `write` into the page cache, and a
    /// rotation when the current file would pass its bound). Event logs are not
    /// fsynced: the spool is the durable record of a message, and the barrier keeps
    /// the log ahead of the spool in the page cache, which survives a process crash.
    pub fn write_pending(&self) {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let spare = std::mem::take(&mut writer.spare);
        let mut batch = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.is_empty() {
                writer.spare = spare;
                return;
            }
            std::mem::replace(&mut *pending, spare)
        };
        if writer.file_bytes > 0
            && writer.file_bytes + batch.len() as u64 > self.limits.file_bytes_max
            && let Err(err) = self.rotate(&mut writer)
        {
            tracing::warn!(dir = %self.dir.display(), "event log rotation failed: {err}");
        }
        match writer.file.write_all(&batch) {
            Ok(()) => {
                writer.file_bytes += batch.len() as u64;
                self.end
                    .store(writer.start + writer.file_bytes, Ordering::Release);
            }
            Err(err) => {
                let lost = memchr::memchr_iter(b'\n', &batch).count() as u64;
                self.dropped.fetch_add(lost, Ordering::Relaxed);
                tracing::warn!(dir = %self.dir.display(), lost, "event log write failed: {err}");
                // Whatever part of the batch did reach the file is cut off, so the
                // file stays whole lines and the positions stay true.
                let _ = writer.file.set_len(writer.file_bytes);
            }
        }
        batch.clear();
        writer.spare = batch;
    }

    /// Renames the current file after its start and begins a new one.
    fn rotate(&self, writer: &mut Writer) -> std::io::Result<()> {
        let next_start = writer.start + writer.file_bytes;
        self.rotations.fetch_add(1, Ordering::AcqRel);
        let result = (|| {
            std::fs::rename(
                self.dir.join(CURRENT),
                self.dir.join(rotated_name(writer.start)),
            )?;
            let file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(self.dir.join(CURRENT))?;
            writer.file = file;
            writer.start = next_start;
            writer.file_bytes = 0;
            self.current_start.store(next_start, Ordering::Release);
            Ok(())
        })();
        self.rotations.fetch_add(1, Ordering::AcqRel);
        result
    }

    /// Deletes rotated files that are no longer needed (blocking; the periodic round
    /// runs it on the blocking thread). Keeps the newest rotated file always (the
    /// current file's start is its end), `files_kept` files, and every file a sink has
    /// not shipped yet unless the files pass `unshipped_bytes_max`.
    pub fn prune(&self) -> std::io::Result<()> {
        let files = rotated(&self.dir)?;
        let shipped = self.shipped.load(Ordering::Acquire);
        let current = self.current_start.load(Ordering::Acquire);
        let mut on_disk: u64 = current.saturating_sub(files.first().map_or(current, |f| f.start))
            + (self.end.load(Ordering::Acquire) - current);
        let mut left = files.len();
        for (i, file) in files.iter().enumerate() {
            if left <= 1 {
                break;
            }
            let end = files.get(i + 1).map_or(current, |f| f.start);
            let over_count = left > self.limits.files_kept;
            let shipped_all = end <= shipped;
            let over_bytes = on_disk > self.limits.unshipped_bytes_max;
            if !(over_count && shipped_all || over_bytes) {
                break;
            }
            if !shipped_all {
                let lost = end - shipped.max(file.start);
                self.pruned_unshipped.fetch_add(lost, Ordering::Relaxed);
                tracing::warn!(dir = %self.dir.display(), lost_bytes = lost,
                    "event log past events.unshipped_bytes_max: deleting events the hose has not shipped");
            }
            std::fs::remove_file(&file.path)?;
            on_disk -= end - file.start;
            left -= 1;
        }
        Ok(())
    }

    /// Whether it is time to prune again (every few seconds); notes that it is.
    pub fn prune_due(&self, now_ms: u64) -> bool {
        let last = self.pruned_ms.load(Ordering::Relaxed);
        now_ms >= last + PRUNE_INTERVAL_MS
            && self
                .pruned_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Events lost to serialising or writing errors.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Bytes of events deleted before the hose shipped them.
    pub fn pruned_unshipped(&self) -> u64 {
        self.pruned_unshipped.load(Ordering::Relaxed)
    }

    /// The LSN of the end of what is written.
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Tells the log how far every sink has shipped (for retention).
    pub fn set_shipped(&self, lsn: u64) {
        self.shipped.store(lsn, Ordering::Release);
    }

    /// Opens the file holding `lsn` for reading, positioned there, with the LSN its
    /// bytes end at when it is a rotated (finished) file. `Gap(next)` when the file
    /// was deleted: `next` is the first position still on disk.
    pub fn open_at(&self, lsn: u64) -> std::io::Result<At> {
        for _ in 0..100 {
            let before = self.rotations.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::thread::yield_now();
                continue;
            }
            let current = self.current_start.load(Ordering::Acquire);
            let opened = if lsn >= current {
                File::open(self.dir.join(CURRENT)).map(|f| (f, current, None))
            } else {
                let files = rotated(&self.dir)?;
                match files.iter().rposition(|f| f.start <= lsn) {
                    None => {
                        let next = files.first().map_or(current, |f| f.start);
                        return Ok(At::Gap(next));
                    }
                    Some(i) => {
                        let end = files.get(i + 1).map_or(current, |f| f.start);
                        File::open(&files[i].path).map(|f| (f, files[i].start, Some(end)))
                    }
                }
            };
            if self.rotations.load(Ordering::Acquire) != before {
                continue;
            }
            match opened {
                Ok((file, start, end)) => {
                    return Ok(At::File(OpenLog {
                        file,
                        start,
                        pos: lsn,
                        end,
                    }));
                }
                // Renamed between the listing and the open: look again.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            }
        }
        Err(std::io::Error::other(
            "event log kept rotating while being opened",
        ))
    }
}

/// Where a position is.
#[derive(Debug)]
pub enum At {
    File(OpenLog),
    Gap(u64),
}

/// A log file open for reading at `pos`.
#[derive(Debug)]
pub struct OpenLog {
    file: File,
    /// The LSN of the file's first byte.
    start: u64,
    /// The LSN of the next byte to read.
    pub pos: u64,
    /// Where the file's bytes end, once it is rotated (finished); None while it is
    /// the current file (read up to the log's end).
    end: Option<u64>,
}

impl OpenLog {
    /// Reads whole lines from `pos` into `buf` (cleared first), about `max` bytes at
    /// most (a longer single line is read whole), never past what `log` has written;
    /// advances `pos`. Ok(false) when this file is finished (rotated, and read to its
    /// end): open the log again at `pos`.
    pub fn read_lines(
        &mut self,
        log: &EventFiles,
        buf: &mut Vec<u8>,
        max: usize,
    ) -> std::io::Result<bool> {
        use std::os::unix::fs::FileExt;
        buf.clear();
        if self.end.is_none() && log.current_start.load(Ordering::Acquire) != self.start {
            // Rotated since it was opened: its length is final now.
            self.end = Some(self.start + self.file.metadata()?.len());
        }
        let limit = match self.end {
            Some(end) => end.min(log.end()),
            None => log.end(),
        };
        if self.pos >= limit {
            return Ok(self.end.is_none_or(|end| self.pos < end));
        }
        let available = (limit - self.pos) as usize;
        let mut want = available.min(max.max(1));
        loop {
            buf.resize(want, 0);
            let mut got = 0;
            while got < want {
                match self
                    .file
                    .read_at(&mut buf[got..], self.pos - self.start + got as u64)?
                {
                    0 => break,
                    n => got += n,
                }
            }
            buf.truncate(got);
            if let Some(last) = memchr::memrchr(b'\n', buf) {
                buf.truncate(last + 1);
                self.pos += buf.len() as u64;
                return Ok(true);
            }
            if got < want || want >= available {
                // No whole line yet.
                buf.clear();
                return Ok(true);
            }
            want = (want * 2).min(available);
        }
    }
}

/// The file name of a rotated file starting at `start`.
fn rotated_name(start: u64) -> String {
    format!("events.{start:020}.jsonl")
}

/// The rotated files of `dir`, oldest first. Names other than
/// `events.<20 digits>.jsonl` are not ours and are left alone.
fn rotated(dir: &Path) -> std::io::Result<Vec<Rotated>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(stem) = name
            .to_str()
            .and_then(|n| n.strip_prefix("events."))
            .and_then(|n| n.strip_suffix(".jsonl"))
        else {
            continue;
        };
        if stem.len() == 20
            && stem.bytes().all(|b| b.is_ascii_digit())
            && let Ok(start) = stem.parse()
        {
            files.push(Rotated {
                start,
                path: entry.path(),
            });
        }
    }
    files.sort_by_key(|f| f.start);
    Ok(files)
}

/// The length of `file` up to and including its last newline.
fn whole_lines_len(file: &mut File) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 << 10];
    while end > 0 {
        let from = end.saturating_sub(chunk.len() as u64);
        let n = (end - from) as usize;
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk[..n])?;
        if let Some(i) = memchr::memrchr(b'\n', &chunk[..n]) {
            return Ok(from + i as u64 + 1);
        }
        end = from;
    }
    Ok(0)
}
