//! Limits over ready queues of several shards (`delivery.limits`, a provider's
//! `provider_*` keys) kept in this process, when no cluster shares them: one store
//! that every shard's side of a limit leases its tokens from and claims its share
//! of the connections from, as the nodes of a cluster do from Redis
//! (the cluster link). The queues of one limit may live on every shard (each site's
//! queues live on the shard that owns the site), so the limit is kept here, not in
//! any one shard.
//!
//! The store is behind one lock: a shard takes it once per lease or claim — a
//! lease lasts [`WINDOW_MS`] of the limit's recent spending, and a claim changes at
//! most once a window — never per message, so the lock is taken a few dozen times
//! a second per limit at most however fast the mail goes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use gannet_core::config::shaping::Rate;
use gannet_core::lease::{Answer, Asked, Gcra, Ready, TokenSource, claim_share};

/// The time a lease is sized to last: short, since a lease costs only a lock.
pub const WINDOW_MS: u64 = 50;

/// Rates idle this long ago are forgotten when the store grows past this many.
const RATES_KEPT: usize = 1024;

/// The process's store of limits over several queues.
#[derive(Debug)]
pub struct LocalLimits {
    state: Mutex<State>,
    started: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// Each rate's GCRA state, by key.
    rates: HashMap<String, Gcra>,
    /// Each connection limit's claims: shard → (held, wanted).
    claims: HashMap<String, HashMap<usize, (u32, u32)>>,
}

impl Default for LocalLimits {
    fn default() -> Self {
        LocalLimits {
            state: Mutex::new(State::default()),
            started: Instant::now(),
        }
    }
}

impl LocalLimits {
    fn now_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A shard that panicked holding the lock left the store whole (every
        // change below is one assignment).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes up to `wanted` tokens of `key` at `rate`.
    pub fn lease(&self, key: &str, rate: Rate, wanted: u32) -> (u32, u64) {
        let now_us = self.now_us();
        let mut state = self.state();
        if state.rates.len() > RATES_KEPT {
            state.rates.retain(|_, g| !g.is_idle(now_us));
        }
        let gcra = match state.rates.get_mut(key) {
            Some(gcra) => gcra,
            // The one allocation per limit: its key, the first time it is leased.
            None => state.rates.entry(key.to_string()).or_default(),
        };
        gcra.set_rate(rate);
        gcra.take(now_us, wanted)
    }

    /// Gives `tokens` of `key` leased and not spent back.
    pub fn give_back(&self, key: &str, tokens: u32) {
        let now_us = self.now_us();
        if let Some(gcra) = self.state().rates.get_mut(key) {
            gcra.give_back(now_us, tokens);
        }
    }

    /// Claims `wanted` of the `limit` connections of `key` for `shard`, which has
    /// `open` open: what it may have open (`Answer::Claimed`).
    pub fn claim(&self, key: &str, shard: usize, limit: u32, wanted: u32, open: u32) -> Answer {
        let mut state = self.state();
        let claims = match state.claims.get_mut(key) {
            Some(claims) => claims,
            None if wanted == 0 && open == 0 => {
                return Answer::Claimed {
                    allowed: 0,
                    others_waiting: false,
                };
            }
            None => state.claims.entry(key.to_string()).or_default(),
        };
        let others = (claims.iter())
            .filter(|(s, _)| **s != shard)
            .map(|(_, held)| *held);
        let (allowed, others_waiting) = claim_share(others, limit, wanted, open);
        if wanted == 0 && open == 0 {
            claims.remove(&shard);
            if claims.is_empty() {
                state.claims.remove(key);
            }
        } else {
            claims.insert(shard, (allowed.max(open), wanted));
        }
        Answer::Claimed {
            allowed,
            others_waiting,
        }
    }
}

/// One shard's handle on the store (`Queues::set_group_source`).
#[derive(Debug, Clone)]
pub struct LocalTokens {
    pub limits: Arc<LocalLimits>,
    pub shard: usize,
}

impl TokenSource for LocalTokens {
    fn ask(&self, key: &str, rate: Rate, wanted: u32) -> Box<dyn Asked> {
        let (tokens, wait_us) = self.limits.lease(key, rate, wanted);
        Box::new(Ready(Some(Answer::Granted {
            tokens,
            wait_ms: wait_us.div_ceil(1000),
        })))
    }

    fn give_back(&self, key: &str, _rate: Rate, tokens: u32) {
        self.limits.give_back(key, tokens);
    }

    fn claim(&self, key: &str, limit: u32, wanted: u32, open: u32) -> Box<dyn Asked> {
        Box::new(Ready(Some(
            self.limits.claim(key, self.shard, limit, wanted, open),
        )))
    }

    /// Never down: there is nothing to fall back from.
    fn nodes(&self) -> u64 {
        1
    }

    fn window_ms(&self) -> u64 {
        WINDOW_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_A_SECOND: Rate = Rate::Per {
        count: 10,
        per_ms: 1000,
    };

    #[test]
    fn shards_lease_one_rate_together() {
        let limits = LocalLimits::default();
        // The burst of ten, shared: what one shard takes the other does not get.
        assert_eq!(limits.lease("limit:a@s", TEN_A_SECOND, 6).0, 6);
        let (tokens, wait_us) = limits.lease("limit:a@s", TEN_A_SECOND, 6);
        assert_eq!(tokens, 4);
        assert!((99_000..=100_000).contains(&wait_us), "{wait_us}");
        assert_eq!(limits.lease("limit:a@s", TEN_A_SECOND, 1).0, 0);
        // Tokens given back are leased again; another key is its own limit.
        limits.give_back("limit:a@s", 3);
        assert_eq!(limits.lease("limit:a@s", TEN_A_SECOND, 5).0, 3);
        assert_eq!(limits.lease("limit:a@t", TEN_A_SECOND, 5).0, 5);
    }

    #[test]
    fn shards_claim_one_connection_limit_together() {
        let limits = LocalLimits::default();
        let claim = |shard, wanted, open| match limits.claim("c", shard, 4, wanted, open) {
            Answer::Claimed {
                allowed,
                others_waiting,
            } => (allowed, others_waiting),
            other => panic!("{other:?}"),
        };
        assert_eq!(claim(0, 4, 0), (4, false));
        // Shard 1 gets nothing while shard 0 holds all four, and says it waits.
        assert_eq!(claim(1, 2, 0), (0, false));
        // Shard 0, renewing, is told and held to an even share (or what it has
        // open).
        assert_eq!(claim(0, 4, 3), (3, true));
        assert_eq!(claim(0, 4, 1), (2, true));
        // Shard 1 gets the rest, and is told shard 0 wants more.
        assert_eq!(claim(1, 2, 0), (2, true));
        // A claim of none releases the shard's share; the last one, the key.
        assert_eq!(claim(0, 0, 0), (0, false));
        assert_eq!(claim(1, 0, 0), (0, false));
        assert!(limits.state().claims.is_empty());
    }
}
