//! `[server]`, `[spool]` and `[events]`: the process, its data directory, the
//! spool's segments and commit, the event logs.

use std::path::PathBuf;

use serde::Deserialize;

use super::Bounded;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Empty: the machine's host name (resolved at start-up).
    pub hostname: String,
    pub data_dir: PathBuf,
    /// 0: one per available core.
    pub shards: usize,
    /// How long an idle executor spins before it parks in io_uring (microseconds).
    pub spin_before_park_us: Bounded<0, 100_000>,
    /// Pin each executor to its own core (false: the kernel schedules them).
    pub pin_cores: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: String::new(),
            data_dir: PathBuf::from("data"),
            shards: 0,
            spin_before_park_us: Bounded(0),
            pin_cores: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolSection {
    pub segment_bytes: Bounded<{ 1 << 20 }, { 1 << 34 }>,
    pub commit_window_us: Bounded<0, 100_000>,
    pub commit_gather_max_us: Bounded<0, 100_000>,
}

impl Default for SpoolSection {
    fn default() -> Self {
        SpoolSection {
            segment_bytes: Bounded(64 << 20),
            commit_window_us: Bounded(0),
            commit_gather_max_us: Bounded(5_000),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    pub file_bytes_max: Bounded<4096, { 1 << 40 }>,
    pub files_kept: Bounded<0, 100_000>,
    /// Event files the hose has not shipped yet are kept up to this many bytes per
    /// shard; past it the oldest go (and are counted as lost).
    pub unshipped_bytes_max: Bounded<{ 1 << 20 }, { 1 << 50 }>,
    /// The hose: events in one batch at most.
    pub batch_events_max: Bounded<1, 100_000>,
    /// A batch goes out when this many milliseconds passed since its first event
    /// was written, full or not.
    pub batch_wait_ms: Bounded<0, 600_000>,
    /// A batch that keeps failing is given up after this long.
    pub retry_max_secs: Bounded<0, 2_592_000>,
    /// Pauses between attempts double from 1 s up to this.
    pub retry_interval_max_secs: Bounded<1, 86_400>,
    /// One POST to a webhook (connect, send, answer) at most.
    pub request_timeout_secs: Bounded<1, 600>,
    /// Webhooks at most (all tenants).
    pub webhooks_max: Bounded<0, 10_000>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            file_bytes_max: Bounded(64 << 20),
            files_kept: Bounded(8),
            unshipped_bytes_max: Bounded(32 << 30),
            batch_events_max: Bounded(1000),
            batch_wait_ms: Bounded(1000),
            retry_max_secs: Bounded(28_800),
            retry_interval_max_secs: Bounded(300),
            request_timeout_secs: Bounded(30),
            webhooks_max: Bounded(100),
        }
    }
}
