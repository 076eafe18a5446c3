//! A sink's durable cursor: for each shard's event log, the position up to which its
//! events are shipped (acknowledged by the receiver).
//!
//! The file `<data_dir>/hose/<sink>.cursor` holds two 24-byte slots per log: a
//! sequence number, the position and a CRC-32C of both. An update writes the slot the
//! older sequence number was in (one `pwrite` into the page cache, which survives a
//! process crash), so a torn write — power loss in the middle of it — leaves the other
//! slot, one batch older: that batch is sent again, never lost. The file is synced at
//! most once a second, and at the end. A new file is written whole and durably
//! (temporary file, fsync, rename, fsync of the directory) before it is used.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SLOT_BYTES: usize = 24;
const LOG_BYTES: usize = 2 * SLOT_BYTES;
const SYNC_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Cursor {
    path: PathBuf,
    file: File,
    /// Per log: (sequence number of the newest slot, position).
    positions: Vec<(u64, u64)>,
    unsynced: bool,
    synced_at: Instant,
}

impl Cursor {
    /// Opens the cursor at `path`, or creates it with `start(log)` for each of `logs`
    /// logs. A log the file has no slot for (one added since) starts at 0: its events
    /// are all newer than the cursor.
    pub fn open(path: &Path, logs: usize, start: impl Fn(usize) -> u64) -> std::io::Result<Cursor> {
        if !path.exists() {
            let mut bytes = vec![0u8; logs * LOG_BYTES];
            for log in 0..logs {
                write_slot(
                    &mut bytes[log * LOG_BYTES + SLOT_BYTES..][..SLOT_BYTES],
                    1,
                    start(log),
                );
            }
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            gannet_spool::durable::write_file(path, &bytes, 0o600)?;
        }
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes)?;
        let mut positions = Vec::with_capacity(logs);
        for log in 0..logs {
            let slots = bytes.get(log * LOG_BYTES..(log + 1) * LOG_BYTES);
            let newest = slots.and_then(|s| {
                let a = read_slot(&s[..SLOT_BYTES]);
                let b = read_slot(&s[SLOT_BYTES..]);
                match (a, b) {
                    (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
                    (a, b) => a.or(b),
                }
            });
            positions.push(newest.unwrap_or((0, 0)));
        }
        Ok(Cursor {
            path: path.to_path_buf(),
            file,
            positions,
            unsynced: false,
            synced_at: Instant::now(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shipped position of `log`.
    pub fn get(&self, log: usize) -> u64 {
        self.positions.get(log).map_or(0, |p| p.1)
    }

    pub fn logs(&self) -> usize {
        self.positions.len()
    }

    /// Moves `log`'s position (written at once; synced within a second).
    pub fn set(&mut self, log: usize, lsn: u64) -> std::io::Result<()> {
        let Some(&(seq, old)) = self.positions.get(log) else {
            return Err(std::io::Error::other(format!("no log {log}")));
        };
        if old == lsn {
            return Ok(());
        }
        let seq = seq + 1;
        let mut slot = [0u8; SLOT_BYTES];
        write_slot(&mut slot, seq, lsn);
        let at = log * LOG_BYTES + (seq % 2) as usize * SLOT_BYTES;
        self.file.write_all_at(&slot, at as u64)?;
        self.positions[log] = (seq, lsn);
        self.unsynced = true;
        if self.synced_at.elapsed() >= SYNC_INTERVAL {
            self.sync()?;
        }
        Ok(())
    }

    /// Syncs what was written since the last sync.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        self.synced_at = Instant::now();
        Ok(())
    }
}

fn write_slot(slot: &mut [u8], seq: u64, lsn: u64) {
    slot[..8].copy_from_slice(&seq.to_le_bytes());
    slot[8..16].copy_from_slice(&lsn.to_le_bytes());
    let crc = crc32c::crc32c(&slot[..16]);
    slot[16..20].copy_from_slice(&crc.to_le_bytes());
}

/// (sequence number, position) of a slot whose checksum holds.
fn read_slot(slot: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(slot.get(..8)?.try_into().ok()?);
    let lsn = u64::from_le_bytes(slot.get(8..16)?.try_into().ok()?);
    let crc = u32::from_le_bytes(slot.get(16..20)?.try_into().ok()?);
    (seq > 0 && crc == crc32c::crc32c(&slot[..16])).then_some((seq, lsn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_survive_reopening_and_a_torn_slot_falls_back_one_update() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hose/w.cursor");
        let mut cursor = Cursor::open(&path, 2, |log| 100 * log as u64).unwrap();
        assert_eq!((cursor.get(0), cursor.get(1)), (0, 100));
        cursor.set(1, 150).unwrap();
        cursor.set(1, 180).unwrap();
        cursor.set(0, 7).unwrap();
        cursor.sync().unwrap();
        drop(cursor);
        // Reopened with a log more (the shard count was raised): it starts at 0.
        let cursor = Cursor::open(&path, 3, |_| 999).unwrap();
        assert_eq!((cursor.get(0), cursor.get(1), cursor.get(2)), (7, 180, 0));
        drop(cursor);
        // Tear the newest slot of log 1 (sequence 3, the odd slot).
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[LOG_BYTES + SLOT_BYTES + 9] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let cursor = Cursor::open(&path, 2, |_| 999).unwrap();
        assert_eq!(cursor.get(1), 150, "the update before the torn one");
    }
}
