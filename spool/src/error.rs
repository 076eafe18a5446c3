//! The spool's errors. Every one is an operating condition the engine turns into a
//! temporary SMTP failure (451 4.3.0, or 421 while the spool is unhealthy) or an HTTP
//! 5xx — never a silent loss and never a 250.

use std::io;

/// What went wrong in the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The disk had no room for a new segment. Existing data is untouched.
    #[error(
        "spool disk is full: cannot preallocate segment {seq} ({bytes} bytes); free space or lower segment_bytes"
    )]
    NoSpace { seq: u64, bytes: u64 },

    /// An I/O call other than a sync failed.
    #[error("spool i/o failed {op} segment {seq}: {source}")]
    Io {
        op: &'static str,
        seq: u64,
        #[source]
        source: io::Error,
    },

    /// fdatasync failed: nothing written since the last good sync is known to be on
    /// disk, so none of it is acknowledged.
    #[error(
        "fdatasync of segment {seq} failed ({reason}); records since the last good sync are not durable"
    )]
    SyncFailed { seq: u64, reason: String },

    /// A sync failed recently and no sync has succeeded since.
    #[error("spool is unhealthy after a failed sync; appends are refused until a sync succeeds")]
    Unhealthy,

    /// A record larger than `record_bytes_max`.
    #[error("record of {bytes} bytes exceeds record_bytes_max ({max})")]
    RecordTooLarge { bytes: usize, max: usize },

    /// An update or tombstone for a message that is not live in this spool.
    #[error("{kind} for message {id}, which is not live in this spool")]
    UnknownMessage {
        id: crate::MessageId,
        kind: &'static str,
    },

    /// Another process (a running gannetd) holds the shard directory.
    #[error("spool directory {} is in use by another process (is gannetd running?)", dir.display())]
    Locked { dir: std::path::PathBuf },

    /// A segment file that cannot be used at all (its header is damaged).
    #[error("spool segment {seq} is unusable: {reason}")]
    BadSegment { seq: u64, reason: String },
}

impl SpoolError {
    pub(crate) fn io(op: &'static str, seq: u64, source: io::Error) -> SpoolError {
        SpoolError::Io { op, seq, source }
    }

    /// A copy for fanning one failure out to every waiter of a commit batch.
    pub(crate) fn duplicate(&self) -> SpoolError {
        match self {
            SpoolError::NoSpace { seq, bytes } => SpoolError::NoSpace {
                seq: *seq,
                bytes: *bytes,
            },
            SpoolError::Io { op, seq, source } => SpoolError::Io {
                op,
                seq: *seq,
                source: io::Error::new(source.kind(), source.to_string()),
            },
            SpoolError::SyncFailed { seq, reason } => SpoolError::SyncFailed {
                seq: *seq,
                reason: reason.clone(),
            },
            SpoolError::Unhealthy => SpoolError::Unhealthy,
            SpoolError::RecordTooLarge { bytes, max } => SpoolError::RecordTooLarge {
                bytes: *bytes,
                max: *max,
            },
            SpoolError::BadSegment { seq, reason } => SpoolError::BadSegment {
                seq: *seq,
                reason: reason.clone(),
            },
            SpoolError::UnknownMessage { id, kind } => SpoolError::UnknownMessage { id: *id, kind },
            SpoolError::Locked { dir } => SpoolError::Locked { dir: dir.clone() },
        }
    }
}
