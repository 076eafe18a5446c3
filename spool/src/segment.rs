//! A segment's bytes: a fixed-size region (a shared file mapping, or heap memory in
//! the simulated storage) that is written append-only behind a frontier. Heap
//! segments are written directly. File segments stage appended records in memory and
//! write them with one `pwrite` (into the page cache, which the mapping shows): one
//! large write costs the kernel several times less per byte than one per record
//! (page-cache pages are filled whole and once; measured with dd here: 3.4 KB writes
//! 1.4 ms of system time per MB, 1 MiB writes 0.2 ms).
//!
//! The group commit hands the stage to the spool's writer thread ([`WriteJob`]) before
//! it syncs, and so does an append that finds the stage full: a `pwrite` can wait
//! (dirty-page throttling, page-cache allocation), and the shard's executor must not.
//! One write is in flight per segment; appends meanwhile go to a second buffer. A
//! reader asking for bytes that are staged or in flight (rare: the engine reads a
//! message once it is durable) gets them written inline first, as does an append
//! that fills the stage while a write is in flight.
//!
//! This is the only module of the crate with `unsafe` code. The soundness argument is
//! simple and local: bytes below the frontier are never written again, and shared
//! slices are only handed out for bytes below the frontier; the single writer gets a
//! mutable slice of the bytes at or above the frontier, and only one at a time.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use memmap2::MmapRaw;

/// A file segment's stage is written out once it would pass this many bytes.
const STAGE_BYTES: usize = 1 << 20;

/// Bytes at the start of every segment, holding [`SegmentHeader`].
pub const SEGMENT_HEADER_BYTES: usize = 64;
const SEGMENT_MAGIC: [u8; 8] = *b"GNTSEG01";

/// What a segment says about itself in its first [`SEGMENT_HEADER_BYTES`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The shard whose writer created the segment (its only writer, ever).
    pub shard: u16,
    /// The segment's sequence number within its shard; names the file.
    pub seq: u64,
    /// Capacity in bytes, header included; the file is preallocated to this size.
    pub len: u64,
    /// Wall-clock creation time, for operators.
    pub created_unix_ms: u64,
}

impl SegmentHeader {
    /// Encodes the header: magic, fields (little endian), then a CRC32C of all of it.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..10].copy_from_slice(&self.shard.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.len.to_le_bytes());
        out[32..40].copy_from_slice(&self.created_unix_ms.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header; the error says what is wrong with it.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, &'static str> {
        if bytes.len() < SEGMENT_HEADER_BYTES {
            return Err("shorter than a segment header");
        }
        let bytes = &bytes[..SEGMENT_HEADER_BYTES];
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err("bad segment magic");
        }
        let stored = u32::from_le_bytes(bytes[60..64].try_into().expect("4 bytes"));
        if crc32c::crc32c(&bytes[0..60]) != stored {
            return Err("segment header checksum mismatch");
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Ok(SegmentHeader {
            shard: u16::from_le_bytes([bytes[8], bytes[9]]),
            seq: u64_at(16),
            len: u64_at(24),
            created_unix_ms: u64_at(32),
        })
    }
}

/// Heap memory standing in for a mapped file in the simulated storage. Shared
/// between the segment and the simulated disk, which reads it when it "crashes".
#[derive(Debug)]
pub(crate) struct HeapBytes {
    ptr: *mut u8,
    len: usize,
}

/// Heap segments are aligned like a page, as a mapping would be, so that rkyv's
/// alignment checks see the same thing in simulation as on disk.
const HEAP_ALIGN: usize = 4096;

impl HeapBytes {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), HEAP_ALIGN).expect("segment layout")
    }

    pub(crate) fn zeroed(len: usize) -> Rc<HeapBytes> {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(Self::layout(len));
        }
        Rc::new(HeapBytes { ptr, len })
    }

    pub(crate) fn from_slice(bytes: &[u8]) -> Rc<HeapBytes> {
        let heap = HeapBytes::zeroed(bytes.len());
        // SAFETY: `heap` owns `bytes.len()` fresh bytes that nothing else references.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), heap.ptr, bytes.len()) };
        heap
    }
}

impl Drop for HeapBytes {
    fn drop(&mut self) {
        // SAFETY: frees exactly the allocation made in `zeroed`, with its layout.
        unsafe { std::alloc::dealloc(self.ptr, Self::layout(self.len)) };
    }
}

#[derive(Debug)]
#[expect(
    dead_code,
    reason = "the variants only own the memory that `Segment::ptr` points into"
)]
enum Memory {
    /// A shared, writable (or read-only, for inspection) mapping of a segment file.
    Map(MmapRaw),
    Heap(Rc<HeapBytes>),
}

/// One segment's memory plus its write frontier.
#[derive(Debug)]
pub struct Segment {
    seq: u64,
    /// Owns the memory behind `ptr` (unmapped or freed when the segment drops).
    _owner: Memory,
    ptr: *mut u8,
    len: usize,
    /// Bytes below this offset are immutable and may be read; the writer appends here.
    frontier: Cell<usize>,
    /// Set while the writer holds the mutable tail, to refuse a second one.
    tail_out: Cell<bool>,
    writable: bool,
    /// For file segments: records are written with `pwrite` through this descriptor
    /// (into the page cache, which the shared mapping shows) instead of through the
    /// mapping. Writing into mapped pages while their write-back runs measured 2.5-3x
    /// slower here under concurrent syncs (page faults on write-protected pages).
    /// Shared with the writer thread while a write is in flight.
    writer: Option<Arc<File>>,
    /// File segments: records appended but not yet written to the file, which start
    /// at offset `staged_at`; the first `staged_len` bytes are valid. The buffer is
    /// reused (its length is a high-water mark), so appends do not allocate.
    staged: RefCell<Vec<u8>>,
    staged_len: Cell<usize>,
    /// Where the stage goes in the file: `flushed`, or the end of the write in flight.
    staged_at: Cell<usize>,
    /// The stage handed to the writer thread and not yet back.
    in_flight: RefCell<Option<InFlight>>,
    /// A write the segment began (the stage filled up) for the spool to hand over.
    ready: RefCell<Option<WriteJob>>,
    /// The buffer the stage swaps with when it goes out (back from the last write).
    spare: RefCell<Vec<u8>>,
    /// Tasks waiting for the write in flight to end.
    write_waiters: RefCell<Vec<Waker>>,
    /// Takes no more appends (its buffers are not kept once written).
    sealed: Cell<bool>,
    /// Writes made on the caller's thread by [`Segment::flush`].
    inline_writes: Cell<u64>,
    /// Bytes below this offset are in the file's page cache (for file segments).
    flushed: Cell<usize>,
    /// The first failed write of this segment: every later write and sync of it fails
    /// too (the spool seals the segment when its sync fails).
    write_error: RefCell<Option<String>>,
    /// Run before every write of records to the file (see [`WriteBarrier`]).
    barrier: std::cell::OnceCell<WriteBarrier>,
}

/// What must reach the page cache before any record appended after it: the spool's
/// owner writes out its own buffered data here (the engine: the events recorded so far,
/// so that an event is in its log before the tombstone or update that follows it, and
/// a `kill -9` cannot leave the spool ahead of the event log). Called on the thread
/// that writes the records — the spool's writer thread, or the shard's own for an
/// inline write — right before the write.
#[derive(Clone)]
pub struct WriteBarrier(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for WriteBarrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteBarrier")
    }
}

impl Segment {
    /// A mapped file segment; `writer` (for segments created in this run) is the
    /// descriptor records are written through.
    pub(crate) fn from_map(
        seq: u64,
        map: MmapRaw,
        writer: Option<File>,
        frontier: usize,
    ) -> Segment {
        let (ptr, len) = (map.as_mut_ptr(), map.len());
        let writable = writer.is_some();
        let mut segment = Segment::new(seq, Memory::Map(map), ptr, len, writable, frontier);
        segment.writer = writer.map(Arc::new);
        segment
    }

    pub(crate) fn from_heap(seq: u64, heap: Rc<HeapBytes>, frontier: usize) -> Segment {
        let (ptr, len) = (heap.ptr, heap.len);
        Segment::new(seq, Memory::Heap(heap), ptr, len, true, frontier)
    }

    fn new(
        seq: u64,
        mem: Memory,
        ptr: *mut u8,
        len: usize,
        writable: bool,
        frontier: usize,
    ) -> Self {
        assert!(
            frontier <= len,
            "frontier {frontier} past segment end {len}"
        );
        Segment {
            seq,
            _owner: mem,
            ptr,
            len,
            frontier: Cell::new(frontier),
            tail_out: Cell::new(false),
            writable,
            writer: None,
            staged: RefCell::new(Vec::new()),
            staged_len: Cell::new(0),
            staged_at: Cell::new(frontier),
            in_flight: RefCell::new(None),
            ready: RefCell::new(None),
            spare: RefCell::new(Vec::new()),
            write_waiters: RefCell::new(Vec::new()),
            sealed: Cell::new(false),
            inline_writes: Cell::new(0),
            flushed: Cell::new(frontier),
            write_error: RefCell::new(None),
            barrier: std::cell::OnceCell::new(),
        }
    }

    /// Sets what runs before every write of this segment's records (once).
    pub(crate) fn set_barrier(&self, barrier: WriteBarrier) {
        let _ = self.barrier.set(barrier);
    }

    fn run_barrier(&self) {
        if let Some(barrier) = self.barrier.get() {
            (barrier.0)();
        }
    }

    /// The segment's sequence number within its shard.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Capacity in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-capacity segment (never created by the spool).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset of the first byte not yet written in this process.
    pub fn frontier(&self) -> usize {
        self.frontier.get()
    }

    /// Bytes still free for appends.
    pub fn remaining(&self) -> usize {
        self.len - self.frontier.get()
    }

    /// Immutable bytes `[offset, offset + len)`; they must lie below the frontier.
    /// Staged bytes in the range are written to the file first.
    pub fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        let end = offset.checked_add(len).expect("range overflows");
        assert!(
            end <= self.frontier.get(),
            "read of {offset}+{len} past frontier"
        );
        if end > self.flushed.get() {
            // A failed write is reported by the sync that covers these bytes; the
            // bytes themselves are in the mapping either way (see `flush`).
            let _ = self.flush();
        }
        // SAFETY: the range is inside the live allocation (frontier <= len) and below
        // the frontier, which no writer touches again (see module docs).
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset), len) }
    }

    /// Everything below the frontier.
    pub fn written(&self) -> &[u8] {
        self.bytes(0, self.frontier.get())
    }

    /// Gives `write` room for a record at the frontier — at most `max_len` bytes of
    /// the free tail — and moves the frontier past the bytes it says it filled.
    /// `write` returns `None` (having claimed nothing) when the record does not fit;
    /// that is `Ok(None)` here. An error writing the file (an earlier one, or writing
    /// out a full stage now) is `Err`, and then the frontier stays where it was.
    pub(crate) fn append_with<R>(
        &self,
        max_len: usize,
        write: impl FnOnce(usize, &mut [u8]) -> Option<(usize, R)>,
    ) -> io::Result<Option<R>> {
        assert!(self.writable, "append to read-only segment {}", self.seq);
        assert!(
            !self.tail_out.replace(true),
            "second writer on segment {}",
            self.seq
        );
        let result = self.append_inner(max_len, write);
        self.tail_out.set(false);
        let Some((used, value)) = result? else {
            return Ok(None);
        };
        self.frontier.set(self.frontier.get() + used);
        Ok(Some(value))
    }

    fn append_inner<R>(
        &self,
        max_len: usize,
        write: impl FnOnce(usize, &mut [u8]) -> Option<(usize, R)>,
    ) -> io::Result<Option<(usize, R)>> {
        let at = self.frontier.get();
        let room = (self.len - at).min(max_len);
        if self.writer.is_none() {
            // SAFETY: `[at, at + room)` is inside the allocation, nobody holds a
            // shared slice of it (slices stop at the frontier) and `tail_out` makes
            // this the only mutable one.
            let tail = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), room) };
            let written = write(at, tail);
            if let Some((used, _)) = &written {
                assert!(*used <= room, "writer claims more than it was given");
            }
            return Ok(written);
        }
        if let Some(err) = &*self.write_error.borrow() {
            return Err(io::Error::other(err.clone()));
        }
        if self.staged_len.get() > 0 && self.staged_len.get() + room > STAGE_BYTES {
            // The stage is full: out to the writer thread, or inline when a write is
            // in flight already (a megabyte appended during one write).
            match self.begin_write() {
                Some(job) => *self.ready.borrow_mut() = Some(job),
                None => self.flush()?,
            }
        }
        let pending = self.staged_len.get();
        let mut staged = self.staged.borrow_mut();
        if staged.len() < pending + room {
            staged.resize(pending + room, 0);
        }
        let written = write(at, &mut staged[pending..pending + room]);
        if let Some((used, _)) = &written {
            assert!(*used <= room, "writer claims more than it was given");
            self.staged_len.set(pending + used);
        }
        Ok(written)
    }

    /// Writes the write in flight (again: the bytes are the same) and the staged
    /// records to the file, on this thread (a no-op for heap segments and when all is
    /// written). After an error, and for every later call, it returns the error; the
    /// bytes are then copied into the mapping instead, so that readers still find every
    /// appended record in memory while the sync that covers them fails.
    pub fn flush(&self) -> io::Result<()> {
        let Some(file) = &self.writer else {
            return Ok(());
        };
        let mut result = self.write_result();
        let pending = self.staged_len.get();
        let in_flight = self.in_flight.borrow();
        let rewrite = (in_flight.as_ref()).is_some_and(|out| self.flushed.get() < out.at + out.len);
        if pending > 0 || rewrite {
            self.inline_writes.set(self.inline_writes.get() + 1);
            self.run_barrier();
        }
        if let Some(out) = &*in_flight
            && self.flushed.get() < out.at + out.len
        {
            if result.is_ok() {
                result = file.write_all_at(&out.buf[..out.len], out.at as u64);
            }
            self.note_written(out.at, &out.buf[..out.len], &result);
        }
        drop(in_flight);
        if pending > 0 {
            let at = self.staged_at.get();
            let mut staged = self.staged.borrow_mut();
            if result.is_ok() {
                result = file.write_all_at(&staged[..pending], at as u64);
            }
            self.note_written(at, &staged[..pending], &result);
            self.staged_at.set(at + pending);
            self.staged_len.set(0);
            if self.sealed.get() {
                *staged = Vec::new();
            } else if staged.len() > 4 * STAGE_BYTES {
                // An outsized record grew the stage: give the memory back.
                staged.truncate(STAGE_BYTES);
                staged.shrink_to_fit();
            }
        }
        result
    }

    /// Notes that `bytes`, at `at`, were written to the file (with `result`): on an
    /// error they are copied into the mapping and the error sticks.
    fn note_written(&self, at: usize, bytes: &[u8], result: &io::Result<()>) {
        if let Err(err) = result {
            self.stick(err);
            // SAFETY: `[at, at + len)` lies below the frontier and inside the mapping,
            // at or past `flushed`: no shared slice covers it (`bytes` writes out what
            // it covers before handing out a slice past `flushed`), and the mutable
            // tail starts at the frontier.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(at), bytes.len()) };
        }
        self.flushed.set(self.flushed.get().max(at + bytes.len()));
    }

    /// Keeps the segment's first write error: every later write and sync fails.
    fn stick(&self, err: &io::Error) {
        self.write_error
            .borrow_mut()
            .get_or_insert_with(|| err.to_string());
    }

    /// Whether a write of this segment is with the writer thread.
    pub fn write_in_flight(&self) -> bool {
        self.in_flight.borrow().is_some()
    }

    /// How many times [`Segment::flush`] wrote on the caller's thread.
    pub fn inline_writes(&self) -> u64 {
        self.inline_writes.get()
    }

    /// The segment's first write error, if any (it sticks).
    pub fn write_result(&self) -> io::Result<()> {
        match &*self.write_error.borrow() {
            Some(err) => Err(io::Error::other(err.clone())),
            None => Ok(()),
        }
    }

    /// Hands the stage out as a write for the writer thread, unless it is empty, a
    /// write is in flight already, or an earlier write failed. The segment keeps a
    /// share of the buffer, so readers and [`Segment::flush`] still reach the bytes;
    /// [`Segment::end_write`] must follow with the job's result.
    pub(crate) fn begin_write(&self) -> Option<WriteJob> {
        let file = self.writer.as_ref()?;
        let len = self.staged_len.get();
        if len == 0 || self.in_flight.borrow().is_some() || self.write_result().is_err() {
            return None;
        }
        let at = self.staged_at.get();
        let next = if self.sealed.get() {
            Vec::new()
        } else {
            std::mem::take(&mut *self.spare.borrow_mut())
        };
        let buf = Arc::new(std::mem::replace(&mut *self.staged.borrow_mut(), next));
        self.staged_at.set(at + len);
        self.staged_len.set(0);
        *self.in_flight.borrow_mut() = Some(InFlight {
            at,
            len,
            buf: buf.clone(),
        });
        Some(WriteJob {
            file: file.clone(),
            buf,
            at,
            len,
            barrier: self.barrier.get().cloned(),
        })
    }

    /// A write the segment began itself (its stage filled up), for the spool to hand
    /// to the writer thread.
    pub(crate) fn take_ready_write(&self) -> Option<WriteJob> {
        self.ready.borrow_mut().take()
    }

    /// Ends the write in flight with its result (the job is gone; its buffer comes
    /// back as the spare) and wakes whoever waits for it.
    pub(crate) fn end_write(&self, result: io::Result<()>) {
        let Some(out) = self.in_flight.borrow_mut().take() else {
            return;
        };
        if self.flushed.get() < out.at + out.len {
            self.note_written(out.at, &out.buf[..out.len], &result);
        } else if let Err(err) = &result {
            // Written again inline meanwhile, but a failed write still fails the sync.
            self.stick(err);
        }
        if !self.sealed.get()
            && let Ok(buf) = Arc::try_unwrap(out.buf)
            && buf.len() <= 4 * STAGE_BYTES
        {
            *self.spare.borrow_mut() = buf;
        }
        for waker in self.write_waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Resolves once no write of this segment is in flight.
    pub(crate) async fn no_write_in_flight(&self) {
        std::future::poll_fn(|cx| {
            if self.in_flight.borrow().is_none() {
                return Poll::Ready(());
            }
            self.write_waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The segment takes no more appends: its buffers are let go once what they
    /// hold is written (by the sync of their epoch).
    pub(crate) fn seal(&self) {
        self.sealed.set(true);
        *self.spare.borrow_mut() = Vec::new();
        if self.staged_len.get() == 0 {
            *self.staged.borrow_mut() = Vec::new();
        }
    }
}

/// A stage on its way to the file: the segment's share of it.
#[derive(Debug)]
struct InFlight {
    at: usize,
    len: usize,
    buf: Arc<Vec<u8>>,
}

/// One `pwrite` for the writer thread: `len` bytes of `buf` at offset `at` of `file`.
#[derive(Debug)]
pub(crate) struct WriteJob {
    file: Arc<File>,
    buf: Arc<Vec<u8>>,
    at: usize,
    len: usize,
    barrier: Option<WriteBarrier>,
}

impl WriteJob {
    /// Runs the barrier, then writes the bytes (blocking; run it off the executor).
    pub(crate) fn run(self) -> io::Result<()> {
        if let Some(barrier) = &self.barrier {
            (barrier.0)();
        }
        self.file
            .write_all_at(&self.buf[..self.len], self.at as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_detects_damage() {
        let header = SegmentHeader {
            shard: 3,
            seq: 42,
            len: 1 << 20,
            created_unix_ms: 7,
        };
        let mut bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        bytes[17] ^= 0x10;
        assert_eq!(
            SegmentHeader::decode(&bytes),
            Err("segment header checksum mismatch")
        );
        assert_eq!(SegmentHeader::decode(&[0u8; 64]), Err("bad segment magic"));
        assert_eq!(
            SegmentHeader::decode(&[0u8; 10]),
            Err("shorter than a segment header")
        );
    }

    #[test]
    fn appends_move_the_frontier_and_reads_stop_at_it() {
        let segment = Segment::from_heap(1, HeapBytes::zeroed(128), 0);
        let got = segment.append_with(64, |at, tail| {
            assert_eq!((at, tail.len()), (0, 64));
            tail[..5].copy_from_slice(b"hello");
            Some((5, ()))
        });
        assert_eq!(got.unwrap(), Some(()));
        assert_eq!(segment.written(), b"hello");
        assert_eq!(segment.remaining(), 123);
        let failed = segment.append_with(1000, |_, tail| {
            assert_eq!(tail.len(), 123, "room is capped by the free tail");
            None::<(usize, ())>
        });
        assert_eq!(failed.unwrap(), None);
        assert_eq!(segment.frontier(), 5);
    }

    /// A file segment over a fresh zero-filled file of `len` bytes, written through
    /// a descriptor of its own (opened read-only unless `writer_can_write`).
    fn file_segment(
        dir: &std::path::Path,
        len: usize,
        writer_can_write: bool,
    ) -> (Segment, std::path::PathBuf) {
        let path = dir.join("seg");
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let map = memmap2::MmapOptions::new().map_raw(&file).unwrap();
        let writer = std::fs::OpenOptions::new()
            .read(true)
            .write(writer_can_write)
            .open(&path)
            .unwrap();
        (Segment::from_map(1, map, Some(writer), 0), path)
    }

    fn append(segment: &Segment, bytes: &[u8]) -> io::Result<Option<()>> {
        segment.append_with(bytes.len(), |_, tail| {
            tail[..bytes.len()].copy_from_slice(bytes);
            Some((bytes.len(), ()))
        })
    }

    #[test]
    fn file_appends_are_staged_until_a_flush_or_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let (segment, path) = file_segment(dir.path(), 1 << 16, true);
        append(&segment, b"one").unwrap();
        append(&segment, b"two").unwrap();
        assert_eq!(segment.frontier(), 6);
        assert_eq!(
            &std::fs::read(&path).unwrap()[..6],
            &[0u8; 6],
            "staged, not written"
        );
        segment.flush().unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[..6], b"onetwo");
        append(&segment, b"three").unwrap();
        // A read of staged bytes writes them out first.
        assert_eq!(segment.bytes(3, 8), b"twothree");
        assert_eq!(&std::fs::read(&path).unwrap()[..11], b"onetwothree");
        // A full stage goes out as a write (for the writer thread) before the record
        // that would overflow it; the bytes stay readable while it is in flight.
        let big = vec![7u8; STAGE_BYTES / 2 + 1];
        let dir = tempfile::tempdir().unwrap();
        let (segment, path) = file_segment(dir.path(), 4 * STAGE_BYTES, true);
        append(&segment, &big).unwrap();
        assert!(segment.take_ready_write().is_none(), "not full yet");
        append(&segment, &big).unwrap();
        let job = segment.take_ready_write().expect("the full stage goes out");
        assert!(
            segment.begin_write().is_none(),
            "one write in flight at a time"
        );
        assert_eq!(std::fs::read(&path).unwrap()[0], 0, "not written yet");
        job.run().unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[..big.len()], &big[..], "the first went out");
        assert_eq!(on_disk[big.len()], 0, "the second is still staged");
        segment.end_write(Ok(()));
        assert_eq!(segment.written().len(), 2 * big.len());
        segment.write_result().unwrap();
    }

    /// Bytes in a write that has not ended yet are written again, inline, when a
    /// reader asks for them; the write's late end changes nothing.
    #[test]
    fn a_read_of_bytes_in_flight_writes_them_inline() {
        let dir = tempfile::tempdir().unwrap();
        let (segment, path) = file_segment(dir.path(), 1 << 16, true);
        append(&segment, b"first").unwrap();
        let job = segment.begin_write().expect("staged bytes");
        append(&segment, b"second").unwrap();
        assert!(
            segment.begin_write().is_none(),
            "one write in flight at a time"
        );
        assert_eq!(segment.bytes(0, 11), b"firstsecond");
        assert_eq!(&std::fs::read(&path).unwrap()[..11], b"firstsecond");
        job.run().unwrap();
        segment.end_write(Ok(()));
        segment.write_result().unwrap();
        assert!(segment.begin_write().is_none(), "nothing left to write");
        // The buffer came back as the spare, which the next stage swaps in.
        assert!(segment.spare.borrow().capacity() > 0);
        append(&segment, b"third").unwrap();
        let job = segment.begin_write().expect("staged bytes");
        job.run().unwrap();
        segment.end_write(Ok(()));
        assert_eq!(&std::fs::read(&path).unwrap()[..16], b"firstsecondthird");
    }

    /// A write the writer thread failed keeps its bytes readable (from the mapping)
    /// and fails every later write and append, like an inline one.
    #[test]
    fn a_failed_write_off_the_executor_sticks() {
        let dir = tempfile::tempdir().unwrap();
        let (segment, _path) = file_segment(dir.path(), 1 << 16, false);
        append(&segment, b"kept").unwrap();
        let job = segment.begin_write().expect("staged bytes");
        let result = job.run();
        assert!(result.is_err(), "the descriptor is read-only");
        segment.end_write(result);
        assert!(segment.write_result().is_err());
        assert_eq!(segment.bytes(0, 4), b"kept");
        assert!(append(&segment, b"more").is_err());
        assert!(segment.begin_write().is_none());
        assert!(segment.flush().is_err(), "the error sticks");
    }

    /// A sealed segment writes what it holds and then keeps no buffers.
    #[test]
    fn a_sealed_segment_lets_its_buffers_go_once_written() {
        let dir = tempfile::tempdir().unwrap();
        let (segment, path) = file_segment(dir.path(), 1 << 16, true);
        append(&segment, b"last").unwrap();
        segment.seal();
        let job = segment.begin_write().expect("the stage is still written");
        job.run().unwrap();
        segment.end_write(Ok(()));
        assert_eq!(&std::fs::read(&path).unwrap()[..4], b"last");
        assert_eq!(segment.staged.borrow().capacity(), 0);
        assert_eq!(segment.spare.borrow().capacity(), 0);
    }

    #[test]
    fn a_failed_write_keeps_the_records_readable_and_fails_every_later_write() {
        let dir = tempfile::tempdir().unwrap();
        // A descriptor opened read-only: pwrite fails (EBADF).
        let (segment, path) = file_segment(dir.path(), 1 << 16, false);
        append(&segment, b"kept").unwrap();
        assert!(segment.flush().is_err());
        // The record is in the mapping (memory), though not written through the file.
        assert_eq!(segment.bytes(0, 4), b"kept");
        assert!(
            append(&segment, b"more").is_err(),
            "appends after a failed write fail"
        );
        assert_eq!(segment.frontier(), 4);
        assert!(segment.flush().is_err(), "the error sticks");
        drop(segment);
        // The mapping was shared, so the bytes reached the page cache anyway; what
        // matters is that the sync covering them was told it failed.
        assert_eq!(&std::fs::read(&path).unwrap()[..4], b"kept");
    }

    #[test]
    #[should_panic(expected = "past frontier")]
    fn reading_past_the_frontier_is_a_bug() {
        let segment = Segment::from_heap(1, HeapBytes::zeroed(16), 4);
        let _ = segment.bytes(2, 4);
    }
}
