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

/// Whether `m` is past its maximum age at `now_ms`.
pub fn expired(m: &Message, now_ms: u64, max_age_ms: u64) -> bool {
    now_ms.saturating_sub(m.received_ms) >= max_age_ms
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
}
