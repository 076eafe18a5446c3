//! `[suppression]`: the suppression lists (SparkPost's `/api/v1/suppression-list`),
//! consulted at injection, and what adds to them by itself.

use serde::Deserialize;

use super::Bounded;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SuppressionConfig {
    /// A hard bounce (a bounce class in `hard_bounce_classes`) suppresses its
    /// recipient for every kind of mail ("Bounce Rule").
    pub auto_add_hard_bounces: bool,
    /// SparkPost's hard bounce classes: 10 invalid recipient, 30 no RCPT, 90
    /// unsubscribe.
    pub hard_bounce_classes: Vec<u16>,
    /// A spam complaint (feedback loop) suppresses its recipient for
    /// non-transactional mail ("Spam Complaint").
    pub auto_add_complaints: bool,
    /// A list-unsubscribe suppresses its recipient for non-transactional mail
    /// ("Unsubscribe").
    pub auto_add_unsubscribes: bool,
    /// Entries at most, all tenants (each about 200 bytes of memory).
    pub entries_max: Bounded<1, 1_000_000_000>,
}

impl Default for SuppressionConfig {
    fn default() -> Self {
        SuppressionConfig {
            auto_add_hard_bounces: true,
            hard_bounce_classes: vec![10, 30, 90],
            auto_add_complaints: true,
            auto_add_unsubscribes: true,
            entries_max: Bounded(10_000_000),
        }
    }
}
