//! `[server]` and `[spool]`: the process, its data directory, the spool's segments
//! and commit.

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
