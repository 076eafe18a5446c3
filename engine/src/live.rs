//! Settings that change while gannetd runs: the traffic shaping and the DKIM keys
//! (reloaded from the configuration file on SIGHUP), and the administrative
//! suspensions of scheduled queues and requests to retry them now (the admin HTTP
//! API). They are kept behind one mutex with a generation
//! number; a shard reads the number (one atomic load per maintainer round) and takes
//! the lock only when it changed, so the delivery path never waits on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use gannet_core::shaping::{QueueSelector, ShapingTable, Suspension};

#[derive(Debug)]
pub struct Live {
    generation: AtomicU64,
    state: Mutex<Arc<LiveState>>,
}

/// One version of the live settings.
#[derive(Debug, Clone)]
pub struct LiveState {
    pub shaping: Arc<ShapingTable>,
    pub suspensions: Vec<Suspension>,
    /// The latest requests to retry scheduled queues now, oldest first, at most
    /// [`RETRIES_KEPT`]: each shard applies those newer than the last it applied.
    pub retries: Vec<RetryRequest>,
    pub dkim: Arc<crate::dkim::Signers>,
}

/// Retry requests kept in the live settings: more than any shard can miss between
/// two of its maintainer rounds.
pub const RETRIES_KEPT: usize = 64;

/// An operator's request to retry the selected scheduled queues now.
#[derive(Debug, Clone)]
pub struct RetryRequest {
    /// Numbers requests in order (from 1).
    pub seq: u64,
    pub queues: QueueSelector,
    pub reason: String,
}

impl Live {
    pub fn new(shaping: ShapingTable, dkim: crate::dkim::Signers) -> Live {
        Live {
            generation: AtomicU64::new(0),
            state: Mutex::new(Arc::new(LiveState {
                shaping: Arc::new(shaping),
                suspensions: Vec::new(),
                retries: Vec::new(),
                dkim: Arc::new(dkim),
            })),
        }
    }

    /// Changes with every update.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> Arc<LiveState> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Applies `change` to a copy of the settings and publishes it.
    pub fn update<R>(&self, change: impl FnOnce(&mut LiveState) -> R) -> R {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = LiveState::clone(&guard);
        let result = change(&mut next);
        *guard = Arc::new(next);
        self.generation.fetch_add(1, Ordering::AcqRel);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_are_published_with_a_new_generation() {
        let live = Live::new(
            ShapingTable::new(&Default::default()),
            crate::dkim::Signers::load(&Default::default()).unwrap(),
        );
        let before = live.snapshot();
        assert_eq!(live.generation(), 0);
        live.update(|s| {
            s.suspensions.push(Suspension {
                id: "a".into(),
                queues: Default::default(),
                reason: "r".into(),
                expires_unix_ms: 1,
            })
        });
        assert_eq!(live.generation(), 1);
        assert!(before.suspensions.is_empty(), "old snapshots are unchanged");
        assert_eq!(live.snapshot().suspensions.len(), 1);
    }
}
