//! What one delivery attempt decides for a part's recipients, as data: the verdict on
//! each reply, and the message's and part's state afterwards (finished recipients,
//! attempts, the next due time). No I/O and no clock: the dispatcher writes the
//! events and spool records this asks for, and the scheduler simulation
//! (`tests/scheduler_sim.rs`) drives the same code with virtual time.

use super::{Message, Part, next_due_ms};

/// The fate of one recipient after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx (or 3xx) to the transaction: delivered.
    Delivery,
    /// 4xx, or no connection: tried again later.
    TransientFailure,
    /// 5xx to MAIL, RCPT or DATA: bounced.
    Bounce,
    /// A temporary failure of a message older than max_age.
    Expiration,
}

impl Verdict {
    /// Whether the recipient is finished (no more attempts).
    pub fn is_final(self) -> bool {
        self != Verdict::TransientFailure
    }
}

/// The verdict on a reply code. Connection-level failures reach here as 4xx
/// (`ClientError::response`), so only a transaction's own 5xx bounces.
pub fn verdict(code: u16, expired: bool) -> Verdict {
    if (200..400).contains(&code) {
        Verdict::Delivery
    } else if code >= 500 {
        Verdict::Bounce
    } else if expired {
        Verdict::Expiration
    } else {
        Verdict::TransientFailure
    }
}

/// Whether `m` is past its maximum age at `now_ms`, or past its own expiry (the
/// `expires` metadata: unix ms, from an injection header or a transmission's
/// options).
pub fn expired(m: &Message, now_ms: u64, max_age_ms: u64) -> bool {
    now_ms >= expiry_ms(m, max_age_ms)
}

/// When `m` expires: its maximum age after reception, or its own expiry if sooner.
pub fn expiry_ms(m: &Message, max_age_ms: u64) -> u64 {
    let aged = m.received_ms.saturating_add(max_age_ms);
    match m.meta(META_EXPIRES).and_then(|e| e.parse::<u64>().ok()) {
        Some(own) => aged.min(own),
        None => aged,
    }
}

/// The metadata key of a message's own expiry (unix ms).
pub const META_EXPIRES: &str = "expires";

/// Reads an expiry as a client gives it — seconds from now (`3600`) or an RFC 3339
/// time (`2026-12-08T00:00:00Z`) — as unix ms. None for anything else, or a time
/// more than a year ahead.
pub fn parse_expiry(text: &str, now_ms: u64) -> Option<u64> {
    let text = text.trim();
    let at = if !text.is_empty() && text.len() <= 9 && text.bytes().all(|b| b.is_ascii_digit()) {
        now_ms.checked_add(text.parse::<u64>().ok()?.checked_mul(1000)?)?
    } else {
        crate::clock::parse_rfc3339(text)?
    };
    (at <= now_ms.saturating_add(366 * 86_400_000)).then_some(at)
}

/// The retry schedule of a part: `base` (delivery's), with what a provider rule of
/// its ready queue sets (`source` → the site's `hosts`), then what the scheduled
/// queues' rules matching it set.
pub fn retry_policy(
    base: RetryPolicy,
    table: &crate::shaping::ShapingTable,
    ready: Option<(&str, &[String])>,
    tenant: Option<&str>,
    campaign: Option<&str>,
    domain: &str,
) -> RetryPolicy {
    let mut policy = base;
    let mut set = |interval: Option<u64>, max_interval: Option<u64>, max_age_s: Option<u64>| {
        policy.interval_s = interval.unwrap_or(policy.interval_s);
        policy.max_interval_s = max_interval.unwrap_or(policy.max_interval_s);
        policy.max_age_ms = max_age_s.map_or(policy.max_age_ms, |s| s * 1000);
    };
    if table.providers_set_retry
        && let Some((source, hosts)) = ready
    {
        let r = table
            .resolve(source, hosts.iter().map(String::as_str))
            .retry;
        set(r.interval_s, r.max_interval_s, r.max_age_s);
    }
    for rule in (table.queue_rules.iter()).filter(|r| r.applies(tenant, campaign, domain)) {
        let secs = |v: Option<crate::config::Bounded<1, 31_536_000>>| v.map(|v| v.get());
        set(
            secs(rule.retry_interval_secs),
            secs(rule.max_retry_interval_secs),
            secs(rule.max_age_secs),
        );
    }
    policy
}

/// The retry schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub interval_s: u64,
    pub max_interval_s: u64,
    pub max_age_ms: u64,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Every recipient of the message is finished: it leaves the spool.
    MessageDone,
    /// This part is finished, others are still open: record the finished recipients.
    PartDone,
    /// Recipients remain: record the new state and schedule the part at its due time.
    Retry,
}

/// Applies an attempt's verdicts to the message and the part: finished recipients
/// are marked done; the rest stay in the part, whose attempts grow and whose next
/// due time follows the retry schedule (`jitter` in 0..=1000); the site is
/// forgotten so that the next attempt looks it up again.
pub fn apply(
    m: &mut Message,
    part: &mut Part,
    verdicts: &[(u32, Verdict)],
    now_ms: u64,
    policy: &RetryPolicy,
    jitter: u64,
) -> After {
    let mut pending = Vec::new();
    for (i, verdict) in verdicts {
        if verdict.is_final() {
            m.done.push(*i);
        } else {
            pending.push(*i);
        }
    }
    if pending.is_empty() {
        m.set_part_due(&part.domain, None);
        m.open_parts = m.open_parts.saturating_sub(1);
        return if m.open_parts == 0 {
            After::MessageDone
        } else {
            After::PartDone
        };
    }
    part.attempts += 1;
    m.attempts = m.attempts.max(part.attempts);
    part.rcpts = pending;
    part.site = None;
    part.due_ms = next_due_ms(
        now_ms,
        part.attempts,
        policy.interval_s,
        policy.max_interval_s,
        jitter,
    );
    m.set_part_due(&part.domain, Some(part.due_ms));
    After::Retry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_code_and_the_age() {
        assert_eq!(verdict(250, false), Verdict::Delivery);
        assert_eq!(verdict(250, true), Verdict::Delivery);
        assert_eq!(verdict(451, false), Verdict::TransientFailure);
        assert_eq!(verdict(421, true), Verdict::Expiration);
        assert_eq!(verdict(550, false), Verdict::Bounce);
        assert_eq!(verdict(554, true), Verdict::Bounce);
    }

    #[test]
    fn expiries_read_as_seconds_or_times_and_bad_forms_are_none() {
        let now = 1_796_600_000_000;
        assert_eq!(parse_expiry("3600", now), Some(now + 3_600_000));
        assert_eq!(parse_expiry(" 0 ", now), Some(now));
        assert_eq!(
            parse_expiry("2026-12-08T00:00:00Z", now),
            crate::clock::parse_rfc3339("2026-12-08T00:00:00Z")
        );
        for bad in [
            "",
            "-5",
            "1h",
            "99999999999",
            "2026-13-01T00:00:00Z",
            "2099-01-01T00:00:00Z",
            "é",
        ] {
            assert_eq!(parse_expiry(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_policies_take_provider_then_queue_rules() {
        use crate::config::{Bounded, DeliveryConfig, delivery::QueueRule};
        let mut config = DeliveryConfig::default();
        let mut provider = crate::config::shaping::Provider {
            mx_suffix: vec![".slow.test".into()],
            ..Default::default()
        };
        provider.shaping.retry_interval_secs = Some(Bounded(600));
        provider.shaping.max_age_secs = Some(Bounded(7200));
        config.providers.insert("slow".into(), provider);
        config.queues.push(QueueRule {
            tenant: Some("acme".into()),
            domain: Some(".slow.test".into()),
            retry_interval_secs: Some(Bounded(5)),
            ..Default::default()
        });
        let table = crate::shaping::ShapingTable::new(&config);
        let base = RetryPolicy {
            interval_s: 1200,
            max_interval_s: 43_200,
            max_age_ms: 604_800_000,
        };
        let hosts = vec!["mx1.slow.test".to_string()];
        let ready = Some(("default", hosts.as_slice()));
        let p = retry_policy(base, &table, ready, None, None, "a.slow.test");
        assert_eq!(
            (p.interval_s, p.max_interval_s, p.max_age_ms),
            (600, 43_200, 7_200_000)
        );
        let p = retry_policy(base, &table, ready, Some("acme"), None, "a.slow.test");
        assert_eq!(
            (p.interval_s, p.max_age_ms),
            (5, 7_200_000),
            "the queue rule goes over"
        );
        let p = retry_policy(base, &table, None, Some("acme"), None, "slow.test");
        assert_eq!(p, base, "`.slow.test` is the domains under it");
        let rule = &table.queue_rules[0];
        assert!(rule.applies(Some("acme"), Some("any"), "X.SLOW.TEST"));
        assert!(!rule.applies(Some("other"), None, "x.slow.test"));
    }
}
