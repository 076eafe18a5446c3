//! The ready queues' side of adaptive delivery: replies observed per queue fire its
//! response rules (`crate::adaptive`), whose effects the queues keep — shaping set
//! over the configured one, a suspension that holds connections, parts to bounce —
//! until the rules end.

use super::{Part, Queues, list};
use crate::adaptive::Fired;
use crate::config::automation::ActionName;
use crate::config::shaping::Rate;
use crate::handoff::Handoff;
use crate::shaping::Shaping;

/// Attempts an interval needs before its share of failures can lower the limit.
const BACKOFF_MIN_ATTEMPTS: u32 = 10;

/// One ready queue's adaptive backoff (shaping's `backoff_failure_percent`).
#[derive(Debug, Clone, Default)]
pub struct Feedback {
    /// When the interval being counted started.
    start_ms: Option<u64>,
    attempts: u32,
    failures: u32,
    /// The connection limit backoff imposes; None: the configured one.
    pub limit: Option<usize>,
}

/// A change of the connection limit by adaptive backoff: from, to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitChange {
    pub from: usize,
    pub to: usize,
}

/// `shaping` under a backoff `limit`: fewer connections, and a message rate cut in
/// the same proportion (an unlimited rate stays so).
pub(super) fn backed_off(mut shaping: Shaping, limit: Option<usize>) -> Shaping {
    let Some(limit) = limit.filter(|l| *l < shaping.connection_limit) else {
        return shaping;
    };
    if let Rate::Per { count, per_ms } = shaping.max_message_rate {
        let scaled = count * limit as u64 / shaping.connection_limit.max(1) as u64;
        shaping.max_message_rate = Rate::Per {
            count: scaled.max(1),
            per_ms,
        };
    }
    shaping.connection_limit = limit;
    shaping
}

/// A response rule that fired on a ready queue of another node of the cluster: in
/// force on the queue of the same name here too, until the same time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedRule {
    /// The ready queue: `egress_source->site_name`.
    pub queue: String,
    /// The rule's name (`default#0`, `yahoo#1`): the nodes share a configuration.
    pub rule: String,
    pub until_ms: u64,
}

/// A lowering of a ready queue's connection limit by adaptive backoff on another
/// node of the cluster: the queue of the same name here is lowered to it too (and
/// raised again by its own results, a connection per good interval). Kept until
/// `until_ms` for the queues made meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedBackoff {
    /// The ready queue: `egress_source->site_name`.
    pub queue: String,
    pub limit: usize,
    pub until_ms: u64,
}

/// Work a bounce rule takes out of a ready queue.
#[derive(Debug)]
pub enum Bounced {
    Local(Part),
    Remote(Box<Handoff>),
}

impl Queues {
    /// A reply (its code and whole text) from the site of ready queue `key`, at
    /// `now_ms`: the rules it fires. A rule that sets shaping takes effect at once;
    /// the queue is looked at again (a suspension or a lower limit may hold its
    /// connections, a bounce empties it at the maintainer's next round).
    pub fn observe(&mut self, key: &str, code: u16, text: &str, now_ms: u64) -> Vec<Fired> {
        let Some(q) = self.ready.get_mut(key) else {
            return Vec::new();
        };
        if q.adaptive.is_idle() {
            return Vec::new();
        }
        let fired = q.adaptive.observe(&self.shaping.rules, code, text, now_ms);
        if fired.iter().any(|f| f.new) {
            q.reshape(&self.shaping);
            if !self.adapting.iter().any(|k| k == key) {
                self.adapting.push(key.to_string());
            }
            list(&mut self.listed, q, key);
        }
        fired
    }

    /// Puts the rules that fired on other nodes in force on this node's queues of
    /// the same names, and keeps them for queues made while they last. Returns
    /// those imposed now (queue, rule, until) for their events.
    pub fn set_shared_rules(
        &mut self,
        rules: Vec<SharedRule>,
        now_ms: u64,
    ) -> Vec<(String, u16, u64)> {
        self.shared_rules = rules;
        self.shared_rules.retain(|r| r.until_ms > now_ms);
        let keys: Vec<String> = self.shared_rules.iter().map(|r| r.queue.clone()).collect();
        keys.into_iter()
            .flat_map(|key| self.impose_shared(&key))
            .collect()
    }

    /// Imposes the shared rules of ready queue `key` (when it exists here).
    pub(super) fn impose_shared(&mut self, key: &str) -> Vec<(String, u16, u64)> {
        let Some(q) = self.ready.get_mut(key) else {
            return Vec::new();
        };
        let mut imposed = Vec::new();
        for shared in self.shared_rules.iter().filter(|r| r.queue == key) {
            if let Some(rule) = self.shaping.rules.find(&shared.rule)
                && q.adaptive.impose(rule, shared.until_ms)
            {
                imposed.push((key.to_string(), rule, shared.until_ms));
            }
        }
        if !imposed.is_empty() {
            q.reshape(&self.shaping);
            if !self.adapting.iter().any(|k| k == key) {
                self.adapting.push(key.to_string());
            }
            list(&mut self.listed, q, key);
        }
        imposed
    }

    /// Ends the response rules whose time is up: each queue's shaping returns to what
    /// the rules still in force make it, and the queue is looked at again. Returns the
    /// rules that ended, by queue.
    pub fn expire_rules(&mut self, now_ms: u64) -> Vec<(String, u16)> {
        let mut ended = Vec::new();
        let shaping = &self.shaping;
        let (ready, listed) = (&mut self.ready, &mut self.listed);
        self.adapting.retain(|key| {
            let Some(q) = ready.get_mut(key) else {
                return false;
            };
            let gone = q.adaptive.expire(now_ms);
            if !gone.is_empty() {
                q.reshape(shaping);
                list(listed, q, key.as_str());
                ended.extend(gone.into_iter().map(|rule| (key.clone(), rule)));
            }
            !q.adaptive.in_force().is_empty()
        });
        ended
    }

    /// When the first response rule in force ends.
    pub fn next_rule_expiry(&self) -> Option<u64> {
        (self.adapting.iter())
            .filter_map(|key| self.ready.get(key))
            .filter_map(|q| q.adaptive.next_expiry())
            .min()
    }

    /// Takes out what waits in ready queues under a bounce rule in force, with the
    /// queue's name and the rule.
    pub fn take_bounced(&mut self, now_ms: u64) -> Vec<(String, u16, Bounced)> {
        let mut out = Vec::new();
        for key in &self.adapting {
            let Some(q) = self.ready.get_mut(key) else {
                continue;
            };
            let rules = &self.shaping.rules;
            let Some(rule) = q.adaptive.rule_with(rules, ActionName::Bounce, now_ms) else {
                continue;
            };
            out.extend(
                q.parts
                    .drain(..)
                    .map(|p| (key.clone(), rule, Bounced::Local(p))),
            );
            out.extend(
                q.remote
                    .drain(..)
                    .map(|h| (key.clone(), rule, Bounced::Remote(h))),
            );
        }
        out
    }

    /// The rule in force on ready queue `key` that makes permanent replies temporary,
    /// if any.
    pub fn transient_rule(&self, key: &str, now_ms: u64) -> Option<u16> {
        (self.ready.get(key)?.adaptive).rule_with(
            &self.shaping.rules,
            ActionName::Transient,
            now_ms,
        )
    }

    /// Counts one attempt on ready queue `key` for adaptive backoff: `failed` when it
    /// failed temporarily (no connection, a 421, a transaction with only 4xx
    /// replies). At the end of each interval the share of failures may halve the
    /// connection limit or give one connection back; the change is returned.
    pub fn feedback(&mut self, key: &str, failed: bool, now_ms: u64) -> Option<LimitChange> {
        let q = self.ready.get_mut(key)?;
        let percent = u32::from(q.shaping.backoff_failure_percent);
        if percent == 0 {
            if q.feedback.limit.take().is_some() {
                // Turned off by a reload: back to the configured limit.
                self.backed_off -= 1;
                q.reshape(&self.shaping);
            }
            return None;
        }
        let f = &mut q.feedback;
        let start_ms = *f.start_ms.get_or_insert(now_ms);
        f.attempts += 1;
        f.failures += u32::from(failed);
        let interval_ms = q.shaping.backoff_interval.as_millis() as u64;
        if now_ms.saturating_sub(start_ms) < interval_ms {
            return None;
        }
        let configured = q.configured_limit;
        let current = f.limit.unwrap_or(configured).min(configured);
        let failing = f.failures * 100 >= percent * f.attempts;
        let healthy = f.failures * 200 < percent * f.attempts;
        let to = if failing && f.attempts >= BACKOFF_MIN_ATTEMPTS {
            (current / 2).max(1)
        } else if healthy && current < configured {
            current + 1
        } else {
            current
        };
        (f.start_ms, f.attempts, f.failures) = (Some(now_ms), 0, 0);
        if to == current {
            return None;
        }
        let was = f.limit.is_some();
        f.limit = (to < configured).then_some(to);
        match (was, f.limit.is_some()) {
            (false, true) => self.backed_off += 1,
            (true, false) => self.backed_off -= 1,
            _ => {}
        }
        q.reshape(&self.shaping);
        list(&mut self.listed, q, key);
        Some(LimitChange { from: current, to })
    }

    /// Takes the backoffs other nodes made (`SharedBackoff`): each one not seen
    /// before lowers its queue here, if the queue exists and backs off at all
    /// (`backoff_failure_percent`); queues made while one lasts are lowered when
    /// made. Answers the changes, by queue, for events.
    pub fn set_shared_backoffs(
        &mut self,
        backoffs: Vec<SharedBackoff>,
        now_ms: u64,
    ) -> Vec<(String, LimitChange)> {
        let seen = std::mem::replace(&mut self.shared_backoffs, backoffs);
        self.shared_backoffs.retain(|b| b.until_ms > now_ms);
        let new: Vec<String> = (self.shared_backoffs.iter())
            .filter(|b| !seen.contains(b))
            .map(|b| b.queue.clone())
            .collect();
        new.into_iter()
            .filter_map(|key| Some((key.clone(), self.impose_backoff(&key)?)))
            .collect()
    }

    /// Lowers ready queue `key` to the lowest shared backoff of its name, when it
    /// is above it.
    pub(super) fn impose_backoff(&mut self, key: &str) -> Option<LimitChange> {
        let q = self.ready.get_mut(key)?;
        let shared = (self.shared_backoffs.iter())
            .filter(|b| b.queue == key)
            .map(|b| b.limit.max(1))
            .min()?;
        if q.shaping.backoff_failure_percent == 0 {
            // (Its own results would never raise it again.)
            return None;
        }
        let configured = q.configured_limit;
        let current = q.feedback.limit.unwrap_or(configured).min(configured);
        if shared >= current {
            return None;
        }
        if q.feedback.limit.replace(shared).is_none() {
            self.backed_off += 1;
        }
        q.reshape(&self.shaping);
        Some(LimitChange {
            from: current,
            to: shared,
        })
    }

    /// Ready queues with a response rule in force (a walk over those only).
    pub fn queues_with_rules(&self) -> usize {
        (self.adapting.iter())
            .filter(|key| (self.ready.get(*key)).is_some_and(|q| !q.adaptive.in_force().is_empty()))
            .count()
    }

    /// Ready queues whose connection limit adaptive backoff has lowered.
    pub fn queues_backed_off(&self) -> usize {
        self.backed_off
    }

    /// The response rules the queues follow.
    pub fn rules(&self) -> &crate::adaptive::Rules {
        &self.shaping.rules
    }

    /// Whether ready queue `key` must not send now: an operator suspended it, or a
    /// suspend or bounce rule is in force (its connections close; the maintainer
    /// bounces or holds its parts).
    pub fn held(&self, key: &str, now_ms: u64) -> bool {
        if self.ready_suspension(key, now_ms).is_some() {
            return true;
        }
        if self.adapting.is_empty() {
            return false;
        }
        let rules = &self.shaping.rules;
        self.ready.get(key).is_some_and(|q| {
            [ActionName::Suspend, ActionName::Bounce]
                .into_iter()
                .any(|action| q.adaptive.rule_with(rules, action, now_ms).is_some())
        })
    }

    /// Whether any response rule is in force (the maintainer then looks for bounces
    /// and expiries).
    pub fn rules_in_force(&self) -> bool {
        !self.adapting.is_empty()
    }

    /// Whether any ready queue may be held ([`Queues::held`]): a response rule or an
    /// operator's suspension is in force somewhere. False in the common case, so a
    /// connection asks for the time only when it may matter.
    pub fn may_hold(&self) -> bool {
        !self.adapting.is_empty() || !self.ready_suspensions.is_empty()
    }
}
