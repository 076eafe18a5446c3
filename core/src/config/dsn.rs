//! `[dsn]`: delivery status notifications (RFC 3464) gannet sends to a message's
//! envelope sender — when, and with how much of the message.

use serde::Deserialize;

use super::Bounded;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DsnConfig {
    /// A failure report for an SMTP message's recipient that bounced or expired
    /// without asking (no NOTIFY); a recipient's NOTIFY always decides for it.
    pub failure: bool,
    /// Reports for the messages of HTTP transmissions too (to their return path);
    /// SparkPost sends none, so neither does gannet unless asked.
    pub transmissions: bool,
    /// A delay report goes once a recipient is still undelivered this long after
    /// reception, for recipients with NOTIFY=DELAY (and, with `delay_default`, for
    /// those without NOTIFY).
    pub delay_warning_secs: Bounded<1, 31_536_000>,
    pub delay_default: bool,
    /// RET=FULL returns the whole message up to this many bytes, its header only
    /// past it (and without RET, always the header only).
    pub full_message_bytes_max: Bounded<0, { 1 << 30 }>,
}

impl Default for DsnConfig {
    fn default() -> Self {
        DsnConfig {
            failure: true,
            transmissions: false,
            delay_warning_secs: Bounded(14_400),
            delay_default: false,
            full_message_bytes_max: Bounded(10 << 20),
        }
    }
}
