//! Throttles shared by the nodes of a cluster: a throttle's tokens are leased in
//! batches from a [`TokenSource`] (the engine's link to the shared Redis) and spent
//! here, so the shared store sees a few calls a second per throttle whatever the
//! message rate. A lease is sized from the throttle's recent spending over the
//! source's window; tokens not spent within two windows go back. Nothing here
//! waits or reads the clock: an ask is answered later, and until then the throttle
//! says to look again in a moment ([`POLL`]).
//!
//! While the source cannot be reached the throttle falls back as configured: open,
//! to a local throttle at the limit divided by the live nodes; closed, to no token
//! at all. It asks again once a second and is shared again from the first lease
//! granted.

use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use crate::config::Fallback;
use crate::config::shaping::Rate;

/// What a lease came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `tokens` taken (perhaps none); the next conforms in `wait_ms`.
    Granted { tokens: u32, wait_ms: u64 },
    /// A claim of connections: how many this claimant may have open, and whether
    /// another claimant waits for more than it holds (then connections with
    /// nothing to send should close rather than wait idle).
    Claimed { allowed: u32, others_waiting: bool },
    /// The shared store cannot be reached: the throttle falls back as configured.
    Down(Fallback),
}

/// A lease asked for, answered later.
pub trait Asked {
    /// The answer, if it has come (once).
    fn answer(&mut self) -> Option<Answer>;
}

/// Where shared throttles lease their tokens.
pub trait TokenSource: fmt::Debug {
    /// Asks for up to `wanted` tokens of the shared throttle `key` at `rate`.
    fn ask(&self, key: &str, rate: Rate, wanted: u32) -> Box<dyn Asked>;
    /// Gives `tokens` leased from `key` at `rate` and not spent back.
    fn give_back(&self, key: &str, rate: Rate, tokens: u32);
    /// Claims `wanted` of the `limit` connections shared under `key` for this node,
    /// which has `open` open now; answered with the connections it may have open
    /// (`Granted::tokens`). A claim of none releases the node's share.
    fn claim(&self, key: &str, limit: u32, wanted: u32, open: u32) -> Box<dyn Asked>;
    /// The live nodes sharing the throttles, this one included (at least 1).
    fn nodes(&self) -> u64;
    /// The time a lease is sized to last, in ms.
    fn window_ms(&self) -> u64;
}

/// An answer known when the question is asked (a source kept in this process).
#[derive(Debug)]
pub struct Ready(pub Option<Answer>);

impl Asked for Ready {
    fn answer(&mut self) -> Option<Answer> {
        self.0.take()
    }
}

/// How many of `limit` connections shared under one key a claimant may have open,
/// wanting `wanted` with `open` open, when `others` are the other live claimants'
/// `(held, wanted)`: what they do not hold, and while one of them waits for more
/// than it holds, no more than an even share (or what it has open). Answered as
/// [`Answer::Claimed`], with whether one of them waits. (The cluster's Redis script
/// answers the same: `CLAIM_SCRIPT`.)
pub fn claim_share(
    others: impl Iterator<Item = (u32, u32)>,
    limit: u32,
    wanted: u32,
    open: u32,
) -> (u32, bool) {
    let (mut held, mut claimants, mut starved) = (0u32, 1u32, false);
    for (h, w) in others {
        held = held.saturating_add(h);
        claimants += 1;
        starved |= w > h;
    }
    let mut allowed = wanted.min(limit.saturating_sub(held));
    if starved {
        allowed = allowed.min(limit.div_ceil(claimants).max(open));
    }
    (allowed, starved)
}

/// How soon a throttle waiting for an answer says to look again.
pub const POLL: Duration = Duration::from_millis(2);

/// How long a throttle that fell back waits before asking the store again.
const DOWN_RETRY_US: u64 = 1_000_000;

/// A generic cell rate algorithm in µs: one emission interval per event, bursts up
/// to the rate's count. (The cluster's Redis script keeps the same state the same
/// way: `engine/src/cluster.rs`'s `LEASE_SCRIPT`.)
#[derive(Debug, Clone, Copy, Default)]
pub struct Gcra {
    /// Theoretical arrival time of the next event.
    tat_us: u64,
    emission_us: u64,
    tolerance_us: u64,
    unlimited: bool,
}

impl Gcra {
    /// A rate's emission interval and tolerance in µs (a burst of the whole
    /// count); None when it is unlimited.
    pub fn params(rate: Rate) -> Option<(u64, u64)> {
        match rate {
            Rate::Unlimited => None,
            Rate::Per { count, per_ms } => {
                let per_us = per_ms.saturating_mul(1000);
                let emission_us = (per_us / count.max(1)).max(1);
                Some((emission_us, per_us.saturating_sub(emission_us)))
            }
        }
    }

    /// Changes the rate, keeping what has been spent.
    pub fn set_rate(&mut self, rate: Rate) {
        match Gcra::params(rate) {
            None => self.unlimited = true,
            Some((emission_us, tolerance_us)) => {
                self.unlimited = false;
                self.emission_us = emission_us;
                self.tolerance_us = tolerance_us;
            }
        }
    }

    /// Takes up to `wanted` events that conform at `now_us` at once; answers how
    /// many, and the µs until the next conforms.
    pub fn take(&mut self, now_us: u64, wanted: u32) -> (u32, u64) {
        if self.unlimited {
            return (wanted, 0);
        }
        let tat = self.tat_us.max(now_us);
        let room = if tat - now_us <= self.tolerance_us {
            (now_us + self.tolerance_us - tat) / self.emission_us + 1
        } else {
            0
        };
        let granted = u32::try_from(room.min(u64::from(wanted))).unwrap_or(wanted);
        self.tat_us = tat + u64::from(granted) * self.emission_us;
        let wait = (self.tat_us - now_us).saturating_sub(self.tolerance_us);
        (granted, wait)
    }

    /// Gives `events` taken and not used back (their time is freed, never before
    /// `now_us`).
    pub fn give_back(&mut self, now_us: u64, events: u32) {
        let back = u64::from(events).saturating_mul(self.emission_us);
        self.tat_us = self.tat_us.saturating_sub(back).max(now_us);
    }

    /// Whether every event taken is past (a limit left in this state is as good
    /// as new).
    pub fn is_idle(&self, now_us: u64) -> bool {
        self.tat_us <= now_us
    }

    /// Undoes the last event taken (another limit refused the same event).
    pub(crate) fn refund(&mut self) {
        if !self.unlimited {
            self.tat_us = self.tat_us.saturating_sub(self.emission_us);
        }
    }

    pub(crate) fn is_unlimited(&self) -> bool {
        self.unlimited
    }

    pub(crate) fn wait(&self, now_us: u64) -> Duration {
        if self.unlimited {
            return Duration::ZERO;
        }
        let tat = self.tat_us.max(now_us);
        Duration::from_micros((tat - now_us).saturating_sub(self.tolerance_us))
    }

    pub(crate) fn acquire(&mut self, now_us: u64) -> Result<(), Duration> {
        let wait = self.wait(now_us);
        if !wait.is_zero() {
            return Err(wait);
        }
        if !self.unlimited {
            self.tat_us = self.tat_us.max(now_us) + self.emission_us;
        }
        Ok(())
    }
}

/// `rate` split among `nodes`: each node's share when the store is down (at least
/// one event per interval).
pub fn share(rate: Rate, nodes: u64) -> Rate {
    match rate {
        Rate::Unlimited => Rate::Unlimited,
        Rate::Per { count, per_ms } => Rate::Per {
            count: (count / nodes.max(1)).max(1),
            per_ms,
        },
    }
}

/// A shared throttle's local side: the tokens leased and not spent, the ask under
/// way, the fallback in force.
pub(crate) struct Leased {
    source: Rc<dyn TokenSource>,
    key: String,
    rate: Rate,
    tokens: u32,
    /// When tokens were last granted (those held go back two windows later).
    leased_at_us: u64,
    asked: Option<Box<dyn Asked>>,
    /// No ask before this: the store said when the next token conforms, or it is
    /// down.
    next_ask_us: u64,
    /// Tokens spent since `since_us`: the recent rate a lease is sized from.
    spent: u32,
    since_us: u64,
    /// The size of the last lease asked for (an ask goes ahead when a quarter is
    /// left).
    last_size: u32,
    /// The fallback in force while the store is down.
    down: Option<Fallback>,
    /// Open fallback: this node's share of the limit.
    local: Gcra,
}

impl fmt::Debug for Leased {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leased")
            .field("key", &self.key)
            .field("tokens", &self.tokens)
            .field("asking", &self.asked.is_some())
            .field("down", &self.down)
            .finish()
    }
}

impl Leased {
    pub(crate) fn new(source: Rc<dyn TokenSource>, key: String, rate: Rate) -> Leased {
        Leased {
            source,
            key,
            rate,
            tokens: 0,
            leased_at_us: 0,
            asked: None,
            next_ask_us: 0,
            spent: 0,
            since_us: 0,
            last_size: 0,
            down: None,
            local: Gcra::default(),
        }
    }

    pub(crate) fn set_rate(&mut self, rate: Rate) {
        self.rate = rate;
        if self.down == Some(Fallback::Open) {
            self.local.set_rate(share(rate, self.source.nodes()));
        }
    }

    /// The fallback in force, if the store is down.
    pub(crate) fn down(&self) -> Option<Fallback> {
        self.down
    }

    /// Leased tokens not spent yet.
    pub(crate) fn tokens(&self) -> u32 {
        self.tokens
    }

    /// How long until a token may be taken (zero: now, or an ask may go now).
    pub(crate) fn wait(&self, now_us: u64) -> Duration {
        match self.down {
            Some(Fallback::Open) => self.local.wait(now_us),
            Some(Fallback::Closed) => {
                Duration::from_micros(self.next_ask_us.saturating_sub(now_us))
            }
            None if self.tokens > 0 => Duration::ZERO,
            None if self.asked.is_some() => POLL,
            None => Duration::from_micros(self.next_ask_us.saturating_sub(now_us)),
        }
    }

    /// Takes a token at `now_us`, or says how long to wait.
    pub(crate) fn acquire(&mut self, now_us: u64) -> Result<(), Duration> {
        self.take_answer(now_us);
        let taken = match self.down {
            Some(Fallback::Open) => self.local.acquire(now_us),
            Some(Fallback::Closed) => Err(Duration::ZERO),
            None if self.tokens > 0 => {
                self.tokens -= 1;
                self.spent = self.spent.saturating_add(1);
                Ok(())
            }
            None => Err(Duration::ZERO),
        };
        // Ask ahead when a quarter of the last lease is left (or, down, once a
        // second to see whether the store is back).
        if self.down.is_some() || self.tokens <= self.last_size / 4 {
            self.ask(now_us);
        }
        taken.map_err(|_| self.wait(now_us).max(POLL))
    }

    /// Undoes the token [`Leased::acquire`] took just now (another limit refused
    /// the same event).
    pub(crate) fn refund(&mut self) {
        match self.down {
            Some(Fallback::Open) => self.local.refund(),
            Some(Fallback::Closed) => {}
            None => {
                self.tokens += 1;
                self.spent = self.spent.saturating_sub(1);
            }
        }
    }

    /// Takes an answer that has come, and gives back tokens held two windows
    /// unspent (the queue has gone quiet).
    pub(crate) fn settle(&mut self, now_us: u64) {
        self.take_answer(now_us);
        let held_us = now_us.saturating_sub(self.leased_at_us);
        if self.tokens > 0 && held_us > 2 * self.source.window_ms() * 1000 {
            self.source.give_back(&self.key, self.rate, self.tokens);
            self.tokens = 0;
        }
    }

    fn take_answer(&mut self, now_us: u64) {
        let Some(answer) = self.asked.as_mut().and_then(|a| a.answer()) else {
            return;
        };
        self.asked = None;
        match answer {
            Answer::Granted { tokens, wait_ms } => {
                self.down = None;
                self.tokens = self.tokens.saturating_add(tokens);
                self.leased_at_us = now_us;
                if tokens < self.last_size {
                    // The store had fewer: the limit binds. No ask before the next
                    // token conforms, nor within a window (so a node asks at most
                    // a few times a second however the nodes contend; tokens left
                    // meanwhile wait in the store, up to the burst).
                    let window_us = self.source.window_ms() * 1000;
                    self.next_ask_us = now_us + (wait_ms.max(1) * 1000).max(window_us);
                }
            }
            // (Not an answer to a lease.)
            Answer::Claimed { .. } => {}
            Answer::Down(fallback) => {
                if self.down != Some(fallback) && fallback == Fallback::Open {
                    self.local.set_rate(share(self.rate, self.source.nodes()));
                }
                self.down = Some(fallback);
                self.next_ask_us = now_us + DOWN_RETRY_US;
            }
        }
    }

    /// Asks for a lease unless one is under way or it is too soon.
    fn ask(&mut self, now_us: u64) {
        if self.asked.is_some() || now_us < self.next_ask_us {
            return;
        }
        let size = self.lease_size(now_us);
        self.spent = 0;
        self.since_us = now_us;
        self.last_size = size;
        self.asked = Some(self.source.ask(&self.key, self.rate, size));
    }

    /// The recent rate over one window (at least 1), within what the limit allows
    /// in a window (at most its burst).
    fn lease_size(&self, now_us: u64) -> u32 {
        let window_us = self.source.window_ms().max(1) * 1000;
        let Rate::Per { count, per_ms } = self.rate else {
            return 1;
        };
        let per_us = per_ms.max(1) * 1000;
        let cap = (count.saturating_mul(window_us) / per_us).clamp(1, count.max(1));
        let elapsed = now_us.saturating_sub(self.since_us).max(1000);
        let recent = u64::from(self.spent).saturating_mul(window_us) / elapsed + 1;
        u32::try_from(recent.min(cap)).unwrap_or(u32::MAX)
    }
}

/// A connection limit shared by the cluster's nodes: the share this node has
/// claimed, the claim under way, the fallback in force. A node claims what it
/// wants when that changes (at most once a window) and again each second while it
/// holds connections (so it yields to nodes kept waiting, down to an even share);
/// a node that dies loses its claims with its place among the live nodes.
pub(crate) struct Slots {
    source: Rc<dyn TokenSource>,
    key: String,
    /// Connections this node may have open.
    claimed: usize,
    asked: Option<Box<dyn Asked>>,
    /// What the claim under way asked for.
    asked_for: usize,
    /// No claim for a change before this (one a window).
    next_ask_us: u64,
    /// A claim that holds connections is renewed by this time.
    renew_us: u64,
    down: Option<Fallback>,
    /// Another claimant waits for more than it holds (as of the last answer).
    others_waiting: bool,
}

impl fmt::Debug for Slots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slots")
            .field("key", &self.key)
            .field("claimed", &self.claimed)
            .field("asking", &self.asked.is_some())
            .field("down", &self.down)
            .finish()
    }
}

/// How often a claim that holds connections is renewed.
const RENEW_US: u64 = 1_000_000;

impl Slots {
    pub(crate) fn new(source: Rc<dyn TokenSource>, key: String) -> Slots {
        Slots {
            source,
            key,
            claimed: 0,
            asked: None,
            asked_for: 0,
            next_ask_us: 0,
            renew_us: 0,
            down: None,
            others_waiting: false,
        }
    }

    /// Whether another claimant waited for connections at the last claim: this
    /// node's connections with nothing to send should close, not wait idle.
    pub(crate) fn others_waiting(&self) -> bool {
        self.others_waiting && self.down.is_none()
    }

    /// The connections this node may have open now of the shared `limit`, wanting
    /// `want` with `open` open; claims anew when that is due.
    pub(crate) fn allowed(&mut self, now_us: u64, limit: usize, want: usize, open: usize) -> usize {
        self.take_answer();
        let want = want.max(open);
        // More at most once a window (once a second after a claim fell short);
        // none as soon as the queue is idle; less when the claim is renewed.
        let grow = want > self.claimed && now_us >= self.next_ask_us;
        let idle = want == 0 && self.claimed > 0 && now_us >= self.next_ask_us;
        let renew = (self.claimed > 0 || want > 0) && now_us >= self.renew_us;
        if self.asked.is_none() && (grow || idle || renew) {
            let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
            self.asked = Some(self.source.claim(&self.key, n(limit), n(want), n(open)));
            self.asked_for = want;
            self.next_ask_us = now_us + self.source.window_ms() * 1000;
            self.renew_us = now_us + RENEW_US;
        }
        match self.down {
            Some(Fallback::Open) => (limit / self.source.nodes() as usize).max(1),
            Some(Fallback::Closed) => open,
            None => self.claimed,
        }
    }

    /// How long until a claim may change what is allowed (an answer, or the next
    /// claim).
    pub(crate) fn wait(&self, now_us: u64) -> Duration {
        if self.asked.is_some() {
            return POLL;
        }
        Duration::from_micros(self.next_ask_us.saturating_sub(now_us)).max(POLL)
    }

    fn take_answer(&mut self) {
        let Some(answer) = self.asked.as_mut().and_then(|a| a.answer()) else {
            return;
        };
        self.asked = None;
        let (allowed, others_waiting) = match answer {
            Answer::Claimed {
                allowed,
                others_waiting,
            } => (allowed, others_waiting),
            Answer::Granted { tokens, .. } => (tokens, false),
            Answer::Down(fallback) => {
                self.down = Some(fallback);
                return;
            }
        };
        self.down = None;
        self.claimed = allowed as usize;
        self.others_waiting = others_waiting;
        if self.claimed < self.asked_for {
            // Others hold the rest: asking again before they renew their claims
            // (and yield) would change nothing.
            self.next_ask_us = self.renew_us;
        }
    }

    /// The connections claimed (the admin API), and the fallback in force.
    pub(crate) fn state(&self) -> (usize, Option<Fallback>) {
        (self.claimed, self.down)
    }
}

impl Drop for Slots {
    /// A queue forgotten releases its claim (no answer is waited for).
    fn drop(&mut self) {
        if self.claimed > 0 && self.down.is_none() {
            let _ = self.source.claim(&self.key, 0, 0, 0);
        }
    }
}

impl Drop for Leased {
    /// Tokens leased and not spent go back (an answer still under way is lost: its
    /// tokens' time passes in the store).
    fn drop(&mut self) {
        if self.tokens > 0 && self.down.is_none() {
            self.source.give_back(&self.key, self.rate, self.tokens);
        }
    }
}

#[cfg(test)]
mod tests;
