//! The on-disk record format: a 24-byte header followed by an rkyv payload, padded so
//! that the next record starts 8-byte aligned.
//!
//! ```text
//! 0      4   5    6     8           12          16       20           24
//! | magic | ver | kind | flags | payload_len | payload_crc | offset | header_crc |
//! ```
//! `payload_crc` is CRC32C of the payload. `offset` is where the record itself starts in
//! its segment, and `header_crc` is CRC32C of the first 20 header bytes followed by the
//! segment's sequence number: a record image copied elsewhere (say, inside a message
//! body) does not validate at another place, which keeps a resynchronising scan honest.
//! Records are checked when written (the payload is serialized in place, and the header
//! describes exactly those bytes) and again when read at recovery (both checksums, then
//! rkyv's validation of the payload).

use rkyv::rancor;

use crate::id::MessageId;

/// "GNRC", little endian.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"GNRC");
/// Bumped whenever the header or a payload changes shape.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes in a record header.
pub const RECORD_HEADER_BYTES: usize = 24;
/// Every record starts at a multiple of this (rkyv's payload alignment).
pub const RECORD_ALIGN: usize = 8;

const _: () = assert!(RECORD_HEADER_BYTES.is_multiple_of(RECORD_ALIGN));
const _: () = assert!(crate::segment::SEGMENT_HEADER_BYTES.is_multiple_of(RECORD_ALIGN));

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A whole message: envelope, metadata, retry state and body.
    Message = 1,
    /// New retry state for a message written earlier.
    Update = 2,
    /// The message is finished (delivered, bounced, expired or abandoned).
    Tombstone = 3,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Kind> {
        match value {
            1 => Some(Kind::Message),
            2 => Some(Kind::Update),
            3 => Some(Kind::Tombstone),
            _ => None,
        }
    }

    /// Lowercase name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Message => "message",
            Kind::Update => "update",
            Kind::Tombstone => "tombstone",
        }
    }
}

/// A message as spooled: everything needed to deliver it after a restart.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct MessageRecord {
    pub id: MessageId,
    /// Envelope sender (MAIL FROM), without angle brackets; empty for the null sender.
    pub sender: String,
    /// Envelope recipients (RCPT TO), in the order they were accepted.
    pub recipients: Vec<String>,
    /// Free-form metadata (tenant, campaign, binding, transmission id, …).
    pub meta: Vec<(String, String)>,
    /// The scheduled queue the message belongs to.
    pub queue: String,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due, unix milliseconds.
    pub due_unix_ms: u64,
    /// When the message was received, unix milliseconds (drives max_age).
    pub received_unix_ms: u64,
    /// Indices into `recipients` that are finished and must not be retried.
    pub done: Vec<u32>,
    /// The message content, CRLF line endings, as it will be sent.
    pub body: Vec<u8>,
}

impl ArchivedMessageRecord {
    /// The envelope as owned values: sender, recipients, metadata (what the queues
    /// keep of a recovered message; the body stays in the mapping).
    pub fn envelope(&self) -> (String, Vec<String>, Vec<(String, String)>) {
        (
            self.sender.to_string(),
            self.recipients.iter().map(|r| r.to_string()).collect(),
            self.meta
                .iter()
                .map(|kv| (kv.0.to_string(), kv.1.to_string()))
                .collect(),
        )
    }
}

/// New retry state for a message. It replaces the whole state: the newest update wins.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct UpdateRecord {
    pub id: MessageId,
    pub attempts: u32,
    pub due_unix_ms: u64,
    pub queue: String,
    /// Every finished recipient index so far (cumulative, not a delta).
    pub done: Vec<u32>,
}

/// The message is finished; nothing of it need survive a restart.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct TombstoneRecord {
    pub id: MessageId,
}

/// A decoded, checksummed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl Header {
    /// The whole record's length on disk, padding included.
    pub fn record_len(&self) -> usize {
        record_len(self.payload_len as usize)
    }
}

/// Why a header (or its record) does not validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRecord {
    /// All zeros: space never written.
    Unwritten,
    BadMagic,
    BadHeaderChecksum,
    /// A header that checks out but names a format this build does not read.
    UnknownVersion(u8),
    UnknownKind(u8),
    /// The payload would run past the end of the segment.
    Truncated,
    BadPayloadChecksum,
    /// Checksums pass but rkyv's validation does not (a bug or a forged record).
    InvalidPayload,
}

impl BadRecord {
    /// Lowercase description for reports.
    pub fn describe(self) -> String {
        match self {
            BadRecord::Unwritten => "unwritten space".into(),
            BadRecord::BadMagic => "bad record magic".into(),
            BadRecord::BadHeaderChecksum => "record header checksum mismatch".into(),
            BadRecord::UnknownVersion(v) => format!("unknown record format version {v}"),
            BadRecord::UnknownKind(k) => format!("unknown record kind {k}"),
            BadRecord::Truncated => "record runs past the end of the segment".into(),
            BadRecord::BadPayloadChecksum => "record payload checksum mismatch".into(),
            BadRecord::InvalidPayload => "record payload fails validation".into(),
        }
    }
}

/// Length on disk of a record whose payload is `payload_len` bytes.
pub fn record_len(payload_len: usize) -> usize {
    RECORD_HEADER_BYTES + payload_len.next_multiple_of(RECORD_ALIGN)
}

fn header_crc(first20: &[u8], segment_seq: u64) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(first20), &segment_seq.to_le_bytes())
}

/// Writes a header for `payload` into `out[..RECORD_HEADER_BYTES]`.
pub fn encode_header(out: &mut [u8], kind: Kind, payload: &[u8], segment_seq: u64, offset: usize) {
    let payload_len = u32::try_from(payload.len()).expect("payload length fits u32");
    let offset = u32::try_from(offset).expect("segment offsets fit u32");
    out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    out[4] = FORMAT_VERSION;
    out[5] = kind as u8;
    out[6..8].copy_from_slice(&0u16.to_le_bytes());
    out[8..12].copy_from_slice(&payload_len.to_le_bytes());
    out[12..16].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out[16..20].copy_from_slice(&offset.to_le_bytes());
    let crc = header_crc(&out[0..20], segment_seq);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// Checks the header at `offset` of a segment (its bytes from `offset` on are `bytes`).
pub fn decode_header(bytes: &[u8], segment_seq: u64, offset: usize) -> Result<Header, BadRecord> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(BadRecord::Truncated);
    }
    let h = &bytes[..RECORD_HEADER_BYTES];
    let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"));
    if u32_at(0) != RECORD_MAGIC {
        return Err(if h.iter().all(|&b| b == 0) {
            BadRecord::Unwritten
        } else {
            BadRecord::BadMagic
        });
    }
    if u32_at(20) != header_crc(&h[0..20], segment_seq) || u32_at(16) as usize != offset {
        return Err(BadRecord::BadHeaderChecksum);
    }
    if h[4] != FORMAT_VERSION {
        return Err(BadRecord::UnknownVersion(h[4]));
    }
    let kind = Kind::from_u8(h[5]).ok_or(BadRecord::UnknownKind(h[5]))?;
    Ok(Header {
        kind,
        payload_len: u32_at(8),
        payload_crc: u32_at(12),
    })
}

/// A record that passed every check, borrowed from its segment.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    Message(&'a ArchivedMessageRecord),
    Update(&'a ArchivedUpdateRecord),
    Tombstone(&'a ArchivedTombstoneRecord),
}

impl Payload<'_> {
    /// The id of the message the record is about.
    pub fn id(&self) -> MessageId {
        match self {
            Payload::Message(m) => (&m.id).into(),
            Payload::Update(u) => (&u.id).into(),
            Payload::Tombstone(t) => (&t.id).into(),
        }
    }
}

/// Fully checks the record at `offset` (`bytes` = the segment from `offset` on):
/// header, payload checksum and rkyv validation. Returns the record and its length.
pub fn read_record(
    bytes: &[u8],
    segment_seq: u64,
    offset: usize,
) -> Result<(Payload<'_>, usize), BadRecord> {
    let header = decode_header(bytes, segment_seq, offset)?;
    let payload_end = RECORD_HEADER_BYTES + header.payload_len as usize;
    if payload_end > bytes.len() {
        return Err(BadRecord::Truncated);
    }
    let payload = &bytes[RECORD_HEADER_BYTES..payload_end];
    if crc32c::crc32c(payload) != header.payload_crc {
        return Err(BadRecord::BadPayloadChecksum);
    }
    let parsed = validate_payload(header.kind, payload).map_err(|_| BadRecord::InvalidPayload)?;
    Ok((parsed, header.record_len().min(bytes.len())))
}

/// A record whose payload checksum was verified once — when it was appended (the
/// checksum is computed over the bytes as serialized in place) or recovered
/// ([`read_record`]) — read again: its header is checked (20 bytes and its CRC) and
/// its payload validated by rkyv, so that memory safety never rests on the file
/// staying as it was, but the payload's CRC is not computed again. Delivery reads a
/// message up to three times; the CRC over its whole body was most of each read.
pub fn read_verified_record(
    bytes: &[u8],
    segment_seq: u64,
    offset: usize,
) -> Result<Payload<'_>, BadRecord> {
    let header = decode_header(bytes, segment_seq, offset)?;
    let payload_end = RECORD_HEADER_BYTES + header.payload_len as usize;
    let payload = bytes
        .get(RECORD_HEADER_BYTES..payload_end)
        .ok_or(BadRecord::Truncated)?;
    validate_payload(header.kind, payload).map_err(|_| BadRecord::InvalidPayload)
}

/// rkyv validation of a payload of the given kind.
pub fn validate_payload(kind: Kind, payload: &[u8]) -> Result<Payload<'_>, rancor::Error> {
    Ok(match kind {
        Kind::Message => Payload::Message(rkyv::access::<ArchivedMessageRecord, rancor::Error>(
            payload,
        )?),
        Kind::Update => Payload::Update(rkyv::access::<ArchivedUpdateRecord, rancor::Error>(
            payload,
        )?),
        Kind::Tombstone => Payload::Tombstone(rkyv::access::<
            ArchivedTombstoneRecord,
            rancor::Error,
        >(payload)?),
    })
}

/// A record ready to be appended, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    Message(&'a MessageRecord),
    Update(&'a UpdateRecord),
    Tombstone(&'a TombstoneRecord),
}

impl Record<'_> {
    pub fn kind(&self) -> Kind {
        match self {
            Record::Message(_) => Kind::Message,
            Record::Update(_) => Kind::Update,
            Record::Tombstone(_) => Kind::Tombstone,
        }
    }

    pub fn id(&self) -> MessageId {
        match self {
            Record::Message(m) => m.id,
            Record::Update(u) => u.id,
            Record::Tombstone(t) => t.id,
        }
    }

    /// An upper bound on the record's length on disk, used to decide whether it fits
    /// in what is left of the active segment before serializing it there.
    pub fn len_bound(&self) -> usize {
        // rkyv stores each string or vector inline plus an 8-byte relative pointer and
        // length, with up to 7 bytes of padding: 16 per item is a safe allowance.
        const PER_ITEM: usize = 16;
        let payload = match self {
            Record::Message(m) => {
                128 + m.sender.len()
                    + m.queue.len()
                    + m.body.len()
                    + m.recipients
                        .iter()
                        .map(|r| r.len() + PER_ITEM)
                        .sum::<usize>()
                    + m.meta
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 2 * PER_ITEM)
                        .sum::<usize>()
                    + m.done.len() * 4
                    + 6 * PER_ITEM
            }
            Record::Update(u) => 64 + u.queue.len() + u.done.len() * 4 + 3 * PER_ITEM,
            Record::Tombstone(_) => 32,
        };
        record_len(payload)
    }

    /// Serializes the record at `offset` of segment `segment_seq` into `out` (which
    /// starts at `offset`). Returns the record's length including padding, or `None`
    /// when `out` is too small (nothing valid is left behind: the header is written
    /// last, and an unwritten header reads as the end of the segment).
    pub fn write_into(&self, out: &mut [u8], segment_seq: u64, offset: usize) -> Option<usize> {
        if out.len() < RECORD_HEADER_BYTES {
            return None;
        }
        let rest = &mut out[RECORD_HEADER_BYTES..];
        let buffer = rkyv::ser::writer::Buffer::from(&mut *rest);
        let written = match self {
            Record::Message(m) => rkyv::api::high::to_bytes_in::<_, rancor::Error>(*m, buffer),
            Record::Update(u) => rkyv::api::high::to_bytes_in::<_, rancor::Error>(*u, buffer),
            Record::Tombstone(t) => rkyv::api::high::to_bytes_in::<_, rancor::Error>(*t, buffer),
        };
        let Ok(written) = written else {
            // rkyv filled what it could before running out of room: wipe it, so the
            // space reads as unwritten rather than as a damaged record.
            rest.fill(0);
            return None;
        };
        let payload_len = written.len();
        let total = record_len(payload_len);
        if total > out.len() {
            out[RECORD_HEADER_BYTES..].fill(0);
            return None;
        }
        let (head, rest) = out.split_at_mut(RECORD_HEADER_BYTES);
        rest[payload_len..total - RECORD_HEADER_BYTES].fill(0);
        encode_header(head, self.kind(), &rest[..payload_len], segment_seq, offset);
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MessageRecord {
        MessageRecord {
            id: MessageId { hi: 1 << 16, lo: 9 },
            sender: "a@example.test".into(),
            recipients: vec!["b@example.test".into(), "c@example.test".into()],
            meta: vec![("tenant".into(), "acme".into())],
            queue: "acme@example.test".into(),
            attempts: 0,
            due_unix_ms: 0,
            received_unix_ms: 1,
            done: vec![],
            body: b"Subject: hi\r\n\r\nbody\r\n".to_vec(),
        }
    }

    fn write(record: Record<'_>, seq: u64, offset: usize) -> rkyv::util::AlignedVec<16> {
        let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(4096);
        buf.resize(4096, 0);
        let len = record.write_into(&mut buf, seq, offset).expect("fits");
        assert!(
            len <= record.len_bound(),
            "{len} > bound {}",
            record.len_bound()
        );
        buf.resize(len, 0);
        buf
    }

    #[test]
    fn a_message_round_trips() {
        let msg = sample();
        let bytes = write(Record::Message(&msg), 5, 64);
        assert_eq!(bytes.len() % RECORD_ALIGN, 0);
        let (payload, len) = read_record(&bytes, 5, 64).expect("valid");
        assert_eq!(len, bytes.len());
        let Payload::Message(m) = payload else {
            panic!("wrong kind")
        };
        assert_eq!(m.sender.as_str(), "a@example.test");
        assert_eq!(m.body.as_slice(), msg.body.as_slice());
        let back: MessageRecord = rkyv::deserialize::<_, rancor::Error>(m).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn damage_is_named() {
        let msg = sample();
        let bytes = write(Record::Message(&msg), 5, 64);
        let check = |mutate: &dyn Fn(&mut Vec<u8>), seq: u64, offset: usize, want: BadRecord| {
            let mut b = bytes.to_vec();
            mutate(&mut b);
            assert_eq!(read_record(&b, seq, offset).map(|_| ()), Err(want));
        };
        check(
            &|b| b.iter_mut().for_each(|x| *x = 0),
            5,
            64,
            BadRecord::Unwritten,
        );
        check(&|b| b[0] ^= 1, 5, 64, BadRecord::BadMagic);
        check(&|b| b[9] ^= 1, 5, 64, BadRecord::BadHeaderChecksum);
        check(&|_| {}, 6, 64, BadRecord::BadHeaderChecksum);
        check(&|_| {}, 5, 72, BadRecord::BadHeaderChecksum);
        check(&|b| b[40] ^= 0x80, 5, 64, BadRecord::BadPayloadChecksum);
        check(&|b| b.truncate(40), 5, 64, BadRecord::Truncated);
    }

    /// A record read again after its checksum was verified: the header is checked
    /// and the payload validated, the payload's CRC is not computed again.
    #[test]
    fn a_verified_record_is_read_without_its_payload_checksum() {
        let msg = sample();
        let bytes = write(Record::Message(&msg), 5, 64);
        let Ok(Payload::Message(m)) = read_verified_record(&bytes, 5, 64) else {
            panic!("a valid record reads")
        };
        assert_eq!(m.body.as_slice(), msg.body.as_slice());
        // A body byte changed after the check is not looked for (the CRC is not
        // recomputed) …
        let body_at = bytes
            .windows(msg.body.len())
            .position(|w| w == msg.body.as_slice())
            .expect("the body is in the record");
        let mut b = bytes.clone();
        b[body_at] ^= 1;
        assert_eq!(
            read_record(&b, 5, 64).map(|_| ()),
            Err(BadRecord::BadPayloadChecksum)
        );
        assert!(read_verified_record(&b, 5, 64).is_ok());
        // … but the header still is, and a payload whose structure is broken never
        // reads (memory safety does not rest on the file).
        type Aligned = rkyv::util::AlignedVec<16>;
        let check = |mutate: &dyn Fn(&mut Aligned), want: BadRecord| {
            let mut b = bytes.clone();
            mutate(&mut b);
            assert_eq!(read_verified_record(&b, 5, 64).map(|_| ()), Err(want));
        };
        check(&|b| b[9] ^= 1, BadRecord::BadHeaderChecksum);
        check(&|b| b.resize(40, 0), BadRecord::Truncated);
        let root_at = RECORD_HEADER_BYTES + (msg_payload_len(&bytes) - 8);
        check(
            &|b| b[root_at..root_at + 8].fill(0xff),
            BadRecord::InvalidPayload,
        );
    }

    /// The payload length a record's header gives.
    fn msg_payload_len(bytes: &[u8]) -> usize {
        u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize
    }

    #[test]
    fn a_record_that_does_not_fit_writes_no_header() {
        let msg = sample();
        let mut small = vec![0u8; 64];
        assert_eq!(Record::Message(&msg).write_into(&mut small, 1, 64), None);
        assert!(small[..RECORD_HEADER_BYTES].iter().all(|&b| b == 0));
    }

    #[test]
    fn updates_and_tombstones_round_trip() {
        let id = MessageId { hi: 77, lo: 88 };
        let update = UpdateRecord {
            id,
            attempts: 3,
            due_unix_ms: 99,
            queue: "q".into(),
            done: vec![1],
        };
        let bytes = write(Record::Update(&update), 2, 128);
        let (Payload::Update(u), _) = read_record(&bytes, 2, 128).unwrap() else {
            panic!()
        };
        assert_eq!(u.attempts.to_native(), 3);
        let bytes = write(Record::Tombstone(&TombstoneRecord { id }), 2, 256);
        let (payload, _) = read_record(&bytes, 2, 256).unwrap();
        assert_eq!(payload.id(), id);
    }
}
