//! Segments as preallocated files in one directory per shard, mapped shared.
//!
//! Creating a segment costs an `fallocate`, an `fsync` of the file and one of the
//! directory (about 1–2 ms here, once per segment, done ahead of time on glommio's
//! blocking thread — see below — so that rotation does not stall the executor): after
//! that, an append is one
//! `pwrite` into the page cache, reads go through the shared mapping of the same pages,
//! and each group commit is one `fdatasync` issued through io_uring, which never blocks
//! the executor thread. Preallocation means a write can never meet a full disk halfway
//! through a segment: disk-full is seen, as an error, only when a segment is created.
//!
//! ## Spare segments
//! `posix_fallocate` leaves *unwritten* extents on ext4 and XFS: the first write-back
//! into each one converts it, so nearly every group commit's fdatasync also commits
//! the filesystem journal. Measured here with 10 KiB writes: fdatasync p50 173 µs and
//! 75 µs of CPU into a fallocated file, 104 µs and 48 µs into one whose blocks were
//! written (zeros) beforehand. So, once the active segment is an eighth used, the
//! maintenance task fills a spare file with zeros on glommio's blocking thread (paced,
//! so that its write-back does not crowd the live syncs), and then, still there, makes
//! it the *next* segment: header written and synced, renamed to the next segment's
//! name (never over an existing file) and the directory synced, its sync slots opened.
//! `create` of that segment then only maps it: no fsync on the executor. A prepared
//! segment that goes unused is an empty segment to recovery. Without one (start-up, a
//! record larger than a segment, a failed fill, a rotation before the fill ended)
//! `create` falls back to fallocate on the executor; a spare whose number a rotation
//! took meanwhile is kept, filled, and published under the next number.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::BufferedFile;
use memmap2::{MmapOptions, MmapRaw};

use super::{Storage, now_unix_ms};
use crate::error::SpoolError;
use crate::segment::{SEGMENT_HEADER_BYTES, Segment, SegmentHeader};

/// Syncs of one segment that may be in flight at once, each through its own open
/// file description (so that each sees every write-back error, see `Storage::sync`).
pub const SYNC_SLOTS: usize = 4;

/// The spare segment being filled or ready (never a `.seg` name: recovery and
/// inspection ignore it; a writer removes a stale one when it opens the directory).
pub const SPARE_FILE_NAME: &str = "spare.tmp";

/// The spare is written in pieces of this size, each pushed to the disk before the
/// next (sync_file_range), with a pause between them.
/// (64 MiB: 256 pieces, about 0.8 s here, in which a shard under full load fills
/// the rest of its active segment.)
const SPARE_PIECE_BYTES: usize = 256 << 10;
const SPARE_PAUSE: std::time::Duration = std::time::Duration::from_millis(3);

/// The lock file in every shard directory: the writer holds an exclusive `flock` on
/// it for as long as it runs; inspection takes a shared one.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// One shard's segment directory.
#[derive(Debug)]
pub struct FileStorage {
    dir: PathBuf,
    read_only: bool,
    /// Holds the directory's flock (released when the storage drops).
    _lock: Option<File>,
    /// io_uring handles for fdatasync, per (segment, slot), wrapped lazily inside the
    /// executor around a dup of the slot's descriptor.
    uring_files: RefCell<HashMap<(u64, usize), Rc<BufferedFile>>>,
    /// Per segment created in this run: one open file description per sync slot,
    /// opened right after creation, before any record is written.
    sync_files: RefCell<HashMap<u64, Vec<File>>>,
    /// The next segment made ahead of time, or a spare kept filled for it.
    next: RefCell<Next>,
    /// Segments created on the executor for want of a prepared one.
    unprepared: std::cell::Cell<u64>,
    /// The segment whose spare is being published (renamed into place and made
    /// durable) on the blocking thread.
    publishing: std::cell::Cell<Option<u64>>,
}

/// What is ready of the next segment.
#[derive(Debug)]
enum Next {
    Nothing,
    /// A spare filled (with this length) whose publication lost the race to a
    /// rotation: it is published under the next number instead of filled again.
    SpareFilled(usize),
    /// The next segment itself.
    Prepared(Prepared),
}

/// A segment created ahead of time: durable under its name, empty, slots open.
#[derive(Debug)]
struct Prepared {
    seq: u64,
    len: usize,
    file: File,
    slots: Vec<File>,
}

/// `00000000000000000042.seg`: fixed width, so names sort like numbers.
pub fn segment_file_name(seq: u64) -> String {
    format!("{seq:020}.seg")
}

impl FileStorage {
    /// Storage in `dir`, created if missing, locked against a second writer.
    pub fn open_dir(dir: impl Into<PathBuf>) -> Result<FileStorage, SpoolError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| SpoolError::io("creating directory", 0, e))?;
        let lock = lock(&dir, libc::LOCK_EX)?;
        // A spare left by an earlier run may be half filled.
        match std::fs::remove_file(dir.join(SPARE_FILE_NAME)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(SpoolError::io("removing the old spare in", 0, e));
            }
            _ => {}
        }
        Ok(FileStorage::new(dir, false, Some(lock)))
    }

    /// Storage in `dir` for inspection: never writes, maps read-only, and refuses a
    /// directory that a running writer holds.
    pub fn read_only(dir: impl Into<PathBuf>) -> Result<FileStorage, SpoolError> {
        let dir = dir.into();
        let lock = if dir.join(LOCK_FILE_NAME).exists() {
            Some(lock(&dir, libc::LOCK_SH)?)
        } else {
            None
        };
        Ok(FileStorage::new(dir, true, lock))
    }

    fn new(dir: PathBuf, read_only: bool, lock: Option<File>) -> FileStorage {
        FileStorage {
            dir,
            read_only,
            _lock: lock,
            uring_files: RefCell::new(HashMap::new()),
            sync_files: RefCell::new(HashMap::new()),
            next: RefCell::new(Next::Nothing),
            unprepared: std::cell::Cell::new(0),
            publishing: std::cell::Cell::new(None),
        }
    }

    /// The segment prepared ahead of time, if any: its sequence number and length.
    pub fn prepared(&self) -> Option<(u64, usize)> {
        match &*self.next.borrow() {
            Next::Prepared(p) => Some((p.seq, p.len)),
            _ => None,
        }
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of segment `seq`.
    pub fn segment_path(&self, seq: u64) -> PathBuf {
        self.dir.join(segment_file_name(seq))
    }

    fn sync_dir(&self) -> io::Result<()> {
        crate::durable::sync_dir(&self.dir)
    }

    fn create_file(&self, seq: u64, shard: u16, len: usize) -> Result<File, SpoolError> {
        let path = self.segment_path(seq);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&path)
            .map_err(|e| SpoolError::io("creating", seq, e))?;
        let cleanup = |err: SpoolError| {
            let _ = std::fs::remove_file(&path);
            err
        };
        // SAFETY: plain FFI call on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if rc == libc::ENOSPC || rc == libc::EDQUOT {
            return Err(cleanup(SpoolError::NoSpace {
                seq,
                bytes: len as u64,
            }));
        } else if rc != 0 {
            return Err(cleanup(SpoolError::io(
                "preallocating",
                seq,
                io::Error::from_raw_os_error(rc),
            )));
        }
        write_header(&file, seq, shard, len)
            .and_then(|()| file.sync_all())
            .and_then(|()| self.sync_dir())
            .map_err(|e| cleanup(SpoolError::io("initialising", seq, e)))?;
        Ok(file)
    }

    /// Takes over a segment made durable, empty, with its sync slots open (prepared
    /// ahead or just created): only its mapping is left to make.
    fn adopt(&self, prepared: Prepared) -> Result<Rc<Segment>, SpoolError> {
        let Prepared {
            seq,
            len,
            file,
            slots,
        } = prepared;
        let map = match self.map(seq, &file, len) {
            Ok(map) => map,
            Err(err) => {
                let _ = std::fs::remove_file(self.segment_path(seq));
                return Err(err);
            }
        };
        self.sync_files.borrow_mut().insert(seq, slots);
        Ok(Rc::new(Segment::from_map(
            seq,
            map,
            Some(file),
            SEGMENT_HEADER_BYTES,
        )))
    }

    fn map(&self, seq: u64, file: &File, len: usize) -> Result<MmapRaw, SpoolError> {
        if self.read_only {
            MmapOptions::new().len(len).map_raw_read_only(file)
        } else {
            MmapOptions::new().len(len).map_raw(file)
        }
        .map_err(|e| SpoolError::io("mapping", seq, e))
    }

    fn uring_file(&self, seq: u64, slot: usize) -> Result<Rc<BufferedFile>, SpoolError> {
        if let Some(file) = self.uring_files.borrow().get(&(seq, slot)) {
            return Ok(file.clone());
        }
        let files = self.sync_files.borrow();
        let slot_file = files.get(&seq).and_then(|f| f.get(slot)).ok_or_else(|| {
            SpoolError::io(
                "syncing",
                seq,
                io::Error::other("segment is not open for writing"),
            )
        })?;
        // dup() shares the open file description, and with it the write-back error
        // state this slot must see.
        let dup = slot_file
            .try_clone()
            .map_err(|e| SpoolError::io("duplicating", seq, e))?;
        let fd = std::os::fd::IntoRawFd::into_raw_fd(dup);
        // SAFETY: `fd` is a fresh descriptor from try_clone that nothing else owns; the
        // BufferedFile takes it over and closes it.
        let file = Rc::new(unsafe { BufferedFile::from_raw_fd(fd) });
        self.uring_files
            .borrow_mut()
            .insert((seq, slot), file.clone());
        Ok(file)
    }
}

/// Writes segment `seq`'s header at the start of `file` (not synced).
fn write_header(file: &File, seq: u64, shard: u16, len: usize) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let header = SegmentHeader {
        shard,
        seq,
        len: len as u64,
        created_unix_ms: now_unix_ms(),
    };
    file.write_all_at(&header.encode(), 0)
}

/// Turns the filled spare into segment `seq` at `target` (blocking; run on glommio's
/// blocking thread): the header written and made durable first, so that the rename —
/// which never replaces a file, and is made durable by the directory sync — only ever
/// publishes a complete, empty segment; then its sync slots are opened, before any
/// record is written (see `Storage::sync`).
fn publish_spare(
    dir: &Path,
    spare: &Path,
    target: &Path,
    seq: u64,
    shard: u16,
    len: usize,
) -> io::Result<(File, Vec<File>)> {
    use std::os::unix::ffi::OsStrExt;
    let file = OpenOptions::new().read(true).write(true).open(spare)?;
    write_header(&file, seq, shard, len)?;
    file.sync_data()?;
    let from = std::ffi::CString::new(spare.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: two NUL-terminated paths that live across the call; no other memory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let published = crate::durable::sync_dir(dir).and_then(|()| {
        (0..SYNC_SLOTS)
            .map(|_| OpenOptions::new().write(true).open(target))
            .collect::<io::Result<Vec<File>>>()
    });
    match published {
        Ok(slots) => Ok((file, slots)),
        Err(e) => {
            // Not handed out: an empty segment is harmless, but nothing needs it.
            let _ = std::fs::remove_file(target);
            Err(e)
        }
    }
}

/// Writes `len` zero bytes to a new file at `path` and makes them durable, so that
/// its blocks are allocated *and written*. Each piece is one call on glommio's
/// blocking thread (so other blocking work interleaves) that writes it and waits for
/// its write-back, then a pause: the fill never queues more than a piece ahead of the
/// live segment's syncs.
async fn fill_with_zeros(path: &Path, len: usize) -> io::Result<()> {
    let blocking =
        |f: Box<dyn FnOnce() -> io::Result<()> + Send>| glommio::executor().spawn_blocking(f);
    let file = std::sync::Arc::new(
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(path)?,
    );
    let zeros: std::sync::Arc<[u8]> = vec![0u8; SPARE_PIECE_BYTES].into();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(SPARE_PIECE_BYTES);
        let (file, zeros) = (file.clone(), zeros.clone());
        blocking(Box::new(move || {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&zeros[..n], at as u64)?;
            // SAFETY: plain FFI call on a descriptor the Arc keeps open; no memory
            // is passed.
            let rc = unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    at as libc::off64_t,
                    n as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        }))
        .await?;
        at += n;
        glommio::timer::sleep(SPARE_PAUSE).await;
    }
    blocking(Box::new(move || file.sync_all())).await
}

/// Takes `flock(mode)` on the directory's lock file without waiting.
fn lock(dir: &Path, mode: libc::c_int) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE_NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(mode == libc::LOCK_EX)
        .create(mode == libc::LOCK_EX)
        .truncate(false)
        .open(&path)
        .map_err(|e| SpoolError::io("locking", 0, e))?;
    // SAFETY: plain FFI call on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(SpoolError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        return Err(SpoolError::io("locking", 0, err));
    }
    Ok(file)
}

impl Storage for FileStorage {
    fn list(&self) -> Result<Vec<u64>, SpoolError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SpoolError::io("listing", 0, e)),
        };
        let mut seqs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| SpoolError::io("listing", 0, e))?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
                continue;
            };
            if let Ok(seq) = stem.parse::<u64>() {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }

    fn create(&self, seq: u64, shard: u16, len: usize) -> Result<Rc<Segment>, SpoolError> {
        assert!(!self.read_only, "create on read-only storage");
        let taken = {
            let mut next = self.next.borrow_mut();
            match std::mem::replace(&mut *next, Next::Nothing) {
                Next::Prepared(prepared) => Some(prepared),
                other => {
                    *next = other;
                    None
                }
            }
        };
        if let Some(prepared) = taken {
            if prepared.seq == seq && prepared.len == len {
                return self.adopt(prepared);
            }
            // Made for another rotation (a record larger than a segment came first):
            // an empty segment nothing refers to.
            let _ = std::fs::remove_file(self.segment_path(prepared.seq));
        }
        self.unprepared.set(self.unprepared.get() + 1);
        let file = self.create_file(seq, shard, len)?;
        let path = self.segment_path(seq);
        let mut slots = Vec::with_capacity(SYNC_SLOTS);
        for _ in 0..SYNC_SLOTS {
            let slot = OpenOptions::new().write(true).open(&path);
            slots.push(slot.map_err(|e| SpoolError::io("opening sync slots of", seq, e))?);
        }
        self.adopt(Prepared {
            seq,
            len,
            file,
            slots,
        })
    }

    fn open(&self, seq: u64) -> Result<Rc<Segment>, SpoolError> {
        let path = self.segment_path(seq);
        let file = OpenOptions::new()
            .read(true)
            .write(!self.read_only)
            .open(&path)
            .map_err(|e| SpoolError::io("opening", seq, e))?;
        let len = file
            .metadata()
            .map_err(|e| SpoolError::io("opening", seq, e))?
            .len() as usize;
        if len < SEGMENT_HEADER_BYTES {
            return Err(SpoolError::BadSegment {
                seq,
                reason: format!("file is only {len} bytes"),
            });
        }
        // The whole file is readable; recovered segments are never appended to.
        let map = self.map(seq, &file, len)?;
        Ok(Rc::new(Segment::from_map(seq, map, None, len)))
    }

    fn sync_slots(&self) -> usize {
        SYNC_SLOTS
    }

    fn publishing(&self) -> Option<u64> {
        self.publishing.get()
    }

    fn created_unprepared(&self) -> u64 {
        self.unprepared.get()
    }

    async fn prepare_next(&self, seq: u64, shard: u16, len: usize) {
        if self.read_only || matches!(*self.next.borrow(), Next::Prepared(_)) {
            return;
        }
        let spare = self.dir.join(SPARE_FILE_NAME);
        let kept = std::mem::replace(&mut *self.next.borrow_mut(), Next::Nothing);
        let filled = match kept {
            Next::SpareFilled(filled) if filled == len => Ok(()),
            _ => fill_with_zeros(&spare, len).await,
        };
        let published = match filled {
            Ok(()) => {
                let (dir, target) = (self.dir.clone(), self.segment_path(seq));
                let spare = spare.clone();
                // From here until it is done, the file may appear under `seq` at any
                // moment: a rotation meanwhile takes the next number (`publishing`).
                self.publishing.set(Some(seq));
                let published = glommio::executor()
                    .spawn_blocking(move || publish_spare(&dir, &spare, &target, seq, shard, len))
                    .await;
                self.publishing.set(None);
                published
            }
            Err(e) => Err(e),
        };
        match published {
            Ok((file, slots)) => {
                *self.next.borrow_mut() = Next::Prepared(Prepared {
                    seq,
                    len,
                    file,
                    slots,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // A rotation came first and made this segment itself; the spare is
                // kept, filled, for the next one.
                tracing::debug!(seq, "the next segment was made before its spare was ready");
                *self.next.borrow_mut() = Next::SpareFilled(len);
            }
            Err(e) => {
                tracing::warn!(seq, error = %e, "could not prepare the next segment; it is preallocated when needed");
                let _ = std::fs::remove_file(&spare);
            }
        }
    }

    async fn sync(&self, segment: &Segment, slot: usize) -> Result<(), SpoolError> {
        let seq = segment.seq();
        let file = self.uring_file(seq, slot % SYNC_SLOTS)?;
        file.fdatasync().await.map_err(|e| SpoolError::SyncFailed {
            seq,
            reason: e.to_string(),
        })
    }

    async fn remove(&self, seq: u64) -> Result<(), SpoolError> {
        self.sync_files.borrow_mut().remove(&seq);
        for slot in 0..SYNC_SLOTS {
            let uring = self.uring_files.borrow_mut().remove(&(seq, slot));
            if let Some(file) = uring.and_then(|f| Rc::try_unwrap(f).ok()) {
                let _ = file.close().await;
            }
        }
        glommio::io::remove(self.segment_path(seq))
            .await
            .map_err(|e| SpoolError::io("removing", seq, io::Error::other(e.to_string())))
    }
}
