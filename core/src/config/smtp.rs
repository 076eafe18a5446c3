//! `[smtp]`: the ESMTP listener — addresses, TLS, limits, timeouts, relay control
//! and users for AUTH.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Bounded, Cidr, Listen};
use crate::auth::PasswordHash;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    pub listen: Vec<Listen>,
    pub tls_listen: Vec<Listen>,
    pub relay_from: Vec<Cidr>,
    pub message_bytes_max: Bounded<1024, { 1 << 30 }>,
    pub recipients_max: Bounded<100, 100_000>,
    pub command_line_bytes_max: Bounded<512, 65536>,
    pub data_line_bytes_max: Bounded<1000, { 1 << 20 }>,
    pub sessions_max: Bounded<1, 1_000_000>,
    pub sessions_per_ip_max: Bounded<1, 1_000_000>,
    pub command_timeout_secs: Bounded<1, 3600>,
    pub data_timeout_secs: Bounded<1, 3600>,
    /// Message data must keep arriving at this rate on average (bytes per second):
    /// each byte received extends the DATA/BDAT deadline by 1/rate seconds.
    pub data_rate_min_bytes_per_sec: Bounded<1, 1_000_000_000>,
    /// When this share of `sessions_max` is in use (percent), every session's
    /// command and data timeouts shrink to `stress_timeout_secs`.
    pub stress_sessions_percent: Bounded<1, 100>,
    pub stress_timeout_secs: Bounded<1, 3600>,
    pub bad_commands_max: Bounded<1, 1000>,
    pub reject_bare_line_endings: bool,
    pub auth_requires_tls: bool,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub users: Vec<User>,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec![Listen("127.0.0.1:2025".parse().expect("literal"))],
            tls_listen: Vec::new(),
            relay_from: vec![
                "127.0.0.0/8".parse().expect("literal"),
                "::1/128".parse().expect("literal"),
            ],
            message_bytes_max: Bounded(25 << 20),
            recipients_max: Bounded(1000),
            command_line_bytes_max: Bounded(512),
            data_line_bytes_max: Bounded(1000),
            sessions_max: Bounded(2000),
            sessions_per_ip_max: Bounded(500),
            command_timeout_secs: Bounded(300),
            data_timeout_secs: Bounded(300),
            data_rate_min_bytes_per_sec: Bounded(500),
            stress_sessions_percent: Bounded(80),
            stress_timeout_secs: Bounded(10),
            bad_commands_max: Bounded(10),
            reject_bare_line_endings: true,
            auth_requires_tls: true,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            users: Vec::new(),
        }
    }
}

/// An AUTH identity: a user name and a password hash (never the password).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub password_hash: PasswordHash,
}
