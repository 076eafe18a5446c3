//! Reading segments back: a validating scan of one segment, and recovery of a shard's
//! live set from all of its segments.
//!
//! Recovery does no I/O of its own (storage opened the segments) and decides nothing
//! it could not report: every byte it refuses is accounted for, as a torn tail or as a
//! corrupt region, and the live set it returns carries the exact retry state.

use std::collections::HashMap;
use std::rc::Rc;

use crate::id::MessageId;
use crate::record::{
    BadRecord, Payload, RECORD_ALIGN, RECORD_HEADER_BYTES, RECORD_MAGIC, read_record,
};
use crate::segment::{SEGMENT_HEADER_BYTES, Segment, SegmentHeader};

/// Where a record sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLoc {
    pub seq: u64,
    pub offset: u32,
    /// Length on disk, padding included.
    pub len: u32,
}

/// Damage found in the middle of a segment: skipped, with valid records after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRegion {
    pub offset: usize,
    pub bytes: usize,
    pub reason: String,
}

/// What the scan of one segment found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    pub seq: u64,
    /// `None` when the segment header itself is damaged (`unusable` says why).
    pub header: Option<SegmentHeader>,
    pub unusable: Option<String>,
    /// Records that passed every check.
    pub records: u64,
    /// Offset just past the last valid record.
    pub end: usize,
    /// Written-looking bytes after the last valid record (a torn tail), if any.
    pub torn_bytes: usize,
    pub corrupt: Vec<CorruptRegion>,
}

impl SegmentReport {
    /// The report for a segment that could not be read at all.
    pub fn unusable(seq: u64, reason: String) -> SegmentReport {
        SegmentReport {
            seq,
            header: None,
            unusable: Some(reason),
            records: 0,
            end: 0,
            torn_bytes: 0,
            corrupt: Vec::new(),
        }
    }

    /// True when the segment scanned without any damage.
    pub fn is_clean(&self) -> bool {
        self.unusable.is_none() && self.torn_bytes == 0 && self.corrupt.is_empty()
    }
}

/// Scans `segment`, calling `visit` for every valid record in order, and reports damage.
pub fn scan_segment(
    segment: &Segment,
    mut visit: impl FnMut(RecordLoc, Payload<'_>),
) -> SegmentReport {
    let seq = segment.seq();
    let bytes = segment.written();
    let mut report = SegmentReport {
        seq,
        header: None,
        unusable: None,
        records: 0,
        end: SEGMENT_HEADER_BYTES.min(bytes.len()),
        torn_bytes: 0,
        corrupt: Vec::new(),
    };
    match SegmentHeader::decode(bytes) {
        Ok(h) if h.seq == seq => report.header = Some(h),
        Ok(h) => {
            report.unusable = Some(format!(
                "header names segment {} but the file is segment {seq}",
                h.seq
            ));
            return report;
        }
        Err(why) => {
            report.unusable = Some(why.to_string());
            return report;
        }
    }
    let mut pos = SEGMENT_HEADER_BYTES;
    while pos + RECORD_HEADER_BYTES <= bytes.len() {
        match read_record(&bytes[pos..], seq, pos) {
            Ok((payload, len)) => {
                visit(
                    RecordLoc {
                        seq,
                        offset: pos as u32,
                        len: len as u32,
                    },
                    payload,
                );
                report.records += 1;
                pos += len;
                report.end = pos;
            }
            Err(bad) => match next_valid_record(bytes, seq, pos + RECORD_ALIGN) {
                Some(next) => {
                    report.corrupt.push(CorruptRegion {
                        offset: pos,
                        bytes: next - pos,
                        reason: bad.describe(),
                    });
                    pos = next;
                }
                None => {
                    report.torn_bytes = written_len(&bytes[pos..]);
                    break;
                }
            },
        }
    }
    report
}

/// The first offset at or after `from` (aligned) holding a fully valid record. Jumps
/// between occurrences of the record magic, so unwritten space costs a SIMD scan.
fn next_valid_record(bytes: &[u8], seq: u64, from: usize) -> Option<usize> {
    let from = from.next_multiple_of(RECORD_ALIGN);
    if from >= bytes.len() {
        return None;
    }
    let magic = RECORD_MAGIC.to_le_bytes();
    memchr::memmem::find_iter(&bytes[from..], &magic)
        .map(|at| from + at)
        .filter(|pos| pos % RECORD_ALIGN == 0 && pos + RECORD_HEADER_BYTES <= bytes.len())
        .find(|&pos| read_record(&bytes[pos..], seq, pos).is_ok())
}

/// Length of `bytes` up to and including its last non-zero byte.
fn written_len(bytes: &[u8]) -> usize {
    // Word at a time: this runs over the unwritten tail of every segment.
    let words = bytes.len() / 8;
    let tail_nonzero = bytes[words * 8..].iter().rposition(|&b| b != 0);
    if let Some(i) = tail_nonzero {
        return words * 8 + i + 1;
    }
    let last_word = bytes[..words * 8]
        .chunks_exact(8)
        .rposition(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) != 0);
    match last_word {
        Some(w) => {
            w * 8
                + bytes[w * 8..w * 8 + 8]
                    .iter()
                    .rposition(|&b| b != 0)
                    .expect("non-zero word")
                + 1
        }
        None => 0,
    }
}

/// Where a live message's current state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// The newest copy of the Message record.
    pub msg: RecordLoc,
    /// The newest Update record after that copy, if any.
    pub update: Option<RecordLoc>,
}

/// Everything recovery learned about a shard.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub segments: Vec<SegmentReport>,
    /// Valid records read, of every kind.
    pub records: u64,
    /// Updates or tombstones naming a message that no surviving record holds.
    pub orphans: u64,
    /// Messages live after applying every record.
    pub live: u64,
}

impl RecoveryReport {
    /// Torn-tail bytes discarded over all segments.
    pub fn torn_bytes(&self) -> usize {
        self.segments.iter().map(|s| s.torn_bytes).sum()
    }

    /// Corrupt regions skipped over all segments.
    pub fn corrupt_regions(&self) -> usize {
        self.segments.iter().map(|s| s.corrupt.len()).sum()
    }

    /// Segments whose header is unusable (kept on disk, never touched).
    pub fn unusable_segments(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| s.unusable.is_some())
            .count()
    }
}

/// The index rebuilt from a shard's segments.
#[derive(Debug, Default)]
pub(crate) struct Rebuilt {
    pub index: HashMap<MessageId, IndexEntry>,
    pub newest_id: Option<MessageId>,
    pub report: RecoveryReport,
}

/// Applies every valid record of `segments` (ascending sequence) in log order.
pub(crate) fn rebuild(segments: &[Rc<Segment>]) -> Rebuilt {
    let mut out = Rebuilt::default();
    for segment in segments {
        let index = &mut out.index;
        let newest = &mut out.newest_id;
        let mut orphans = 0;
        let report = scan_segment(segment, |loc, payload| {
            let id = payload.id();
            *newest = (*newest).max(Some(id));
            match payload {
                Payload::Message(_) => {
                    index.insert(
                        id,
                        IndexEntry {
                            msg: loc,
                            update: None,
                        },
                    );
                }
                Payload::Update(_) => match index.get_mut(&id) {
                    Some(entry) => entry.update = Some(loc),
                    None => orphans += 1,
                },
                Payload::Tombstone(_) => {
                    if index.remove(&id).is_none() {
                        orphans += 1;
                    }
                }
            }
        });
        out.report.records += report.records;
        out.report.orphans += orphans;
        out.report.segments.push(report);
    }
    out.report.live = out.index.len() as u64;
    out
}

/// Reads `loc` from `segment`, re-validating it (recovered records were validated at
/// scan time; checking again keeps every later read in safe code, and a mapping that
/// changed under us becomes an error rather than undefined behaviour).
pub(crate) fn payload_at(segment: &Segment, loc: RecordLoc) -> Result<Payload<'_>, BadRecord> {
    let bytes = segment.bytes(loc.offset as usize, loc.len as usize);
    read_record(bytes, loc.seq, loc.offset as usize).map(|(payload, _)| payload)
}

/// The payload of a record at `loc` whose checksum was verified when it was appended
/// or recovered ([`crate::record::read_verified_record`]).
pub(crate) fn verified_payload_at(
    segment: &Segment,
    loc: RecordLoc,
) -> Result<Payload<'_>, BadRecord> {
    let bytes = segment.bytes(loc.offset as usize, loc.len as usize);
    crate::record::read_verified_record(bytes, loc.seq, loc.offset as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_len_finds_the_last_non_zero_byte() {
        let check = |bytes: &[u8], want: usize| assert_eq!(written_len(bytes), want, "{bytes:?}");
        check(&[], 0);
        check(&[0; 20], 0);
        check(&[1], 1);
        let mut b = [0u8; 21];
        b[3] = 9;
        check(&b, 4);
        b[17] = 1;
        check(&b, 18);
        b[20] = 1;
        check(&b, 21);
    }
}
