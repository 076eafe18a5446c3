//! Limits over several ready queues (`delivery.limits`, a provider's `provider_*`
//! keys), on one shard: each limit the shard's queues are in is a [`Group`] here,
//! shared by those queues. Its rates are throttles whose tokens are leased from a
//! [`TokenSource`] that every shard (and, with `[cluster]`, every node) leases the
//! same key from; its connection limit is claimed from the same source, a share at
//! a time, as a cluster-shared queue's is. Without a source (unit tests) a group is
//! kept on this shard alone.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use crate::config::Fallback;
use crate::lease::{Slots, TokenSource};
use crate::shaping::{LimitValues, Throttle};

/// One limit over several queues, this shard's side.
#[derive(Debug)]
pub struct Group {
    key: String,
    values: LimitValues,
    /// One token per message sent by a queue in the group.
    pub(crate) messages: Throttle,
    /// One token per connection opened.
    pub(crate) connects: Throttle,
    /// This shard's claim of the connection limit (None: no limit, or no source).
    slots: Option<Slots>,
    /// Connections open on this shard of the group's queues.
    open: usize,
    /// More connections the queues the group held back wanted in this round of
    /// connections (asked for in the next claim), and in the last.
    demand: usize,
    last_demand: usize,
    /// On [`Groups::pressing`]: it held a queue back this round or the last.
    pressing: bool,
    /// Connections of the group's queues waiting idle for their queue's next
    /// part: told to close when another queue of the group waits for a
    /// connection (here, or on another shard or node). A waker may be stale.
    idle: Vec<std::task::Waker>,
    /// What this shard may have open of the connection limit.
    claimed: usize,
}

/// Idle connections' wakers a group keeps at most before waking them all.
const IDLE_WAKERS_MAX: usize = 256;

/// A group, held by the map and by each queue in it.
pub type GroupRef = Rc<RefCell<Group>>;

impl Group {
    fn new(key: &str, values: LimitValues, source: Option<&Rc<dyn TokenSource>>) -> Group {
        let (messages, connects) = match source {
            Some(source) => (
                Throttle::shared(
                    values.max_message_rate,
                    format!("message-rate:{key}"),
                    source.clone(),
                ),
                Throttle::shared(
                    values.max_connection_rate,
                    format!("connection-rate:{key}"),
                    source.clone(),
                ),
            ),
            None => (
                Throttle::new(values.max_message_rate),
                Throttle::new(values.max_connection_rate),
            ),
        };
        let mut group = Group {
            key: key.to_string(),
            values,
            messages,
            connects,
            slots: None,
            open: 0,
            demand: 0,
            last_demand: 0,
            pressing: false,
            idle: Vec::new(),
            claimed: values.connection_limit.unwrap_or(usize::MAX),
        };
        group.claim_slots(source);
        group
    }

    /// A shared connection limit is claimed a share at a time (nothing until the
    /// first claim is answered).
    fn claim_slots(&mut self, source: Option<&Rc<dyn TokenSource>>) {
        if let (Some(source), Some(_), None) =
            (source, self.values.connection_limit, self.slots.as_ref())
        {
            self.slots = Some(Slots::new(source.clone(), self.key.clone()));
            self.claimed = 0;
        }
    }

    /// Takes new values (the configuration was reloaded), keeping what was spent.
    fn set_values(&mut self, values: LimitValues, source: Option<&Rc<dyn TokenSource>>) {
        if values == self.values {
            return;
        }
        self.values = values;
        self.messages.set_rate(values.max_message_rate);
        self.connects.set_rate(values.max_connection_rate);
        match values.connection_limit {
            None => {
                self.slots = None;
                self.claimed = usize::MAX;
            }
            Some(limit) if self.slots.is_none() && source.is_none() => self.claimed = limit,
            Some(_) => self.claim_slots(source),
        }
    }

    /// Whether the group limits messages.
    pub(crate) fn rates_messages(&self) -> bool {
        self.values.max_message_rate != crate::config::shaping::Rate::Unlimited
    }

    /// How many more connections a queue of the group holding `open` may open now
    /// (usize::MAX: no connection limit); wanting `want` in all, what it wanted
    /// past that is counted toward the next claim. True besides when the group
    /// must now go on [`Groups::pressing`].
    pub(crate) fn room(&mut self, open: usize, want: usize) -> (usize, bool) {
        if self.values.connection_limit.is_none() {
            return (usize::MAX, false);
        }
        let room = self.claimed.saturating_sub(self.open);
        let mut listed = false;
        if open + room < want {
            self.demand += want - open - room;
            listed = !std::mem::replace(&mut self.pressing, true);
            // Idle connections of the group's other queues make room.
            self.wake_idle();
        }
        (room, listed)
    }

    /// Whether a queue of the group waits for a connection (here, or, by the last
    /// claim, elsewhere): the group's connections with nothing to send close.
    pub(crate) fn pressed(&self) -> bool {
        self.values.connection_limit.is_some()
            && (self.demand > 0
                || self.last_demand > 0
                || self.slots.as_ref().is_some_and(|s| s.others_waiting()))
    }

    /// Notes a connection of one of the group's queues waiting idle (only when the
    /// group limits connections).
    pub(crate) fn park(&mut self, waker: &std::task::Waker) {
        if self.values.connection_limit.is_none() {
            return;
        }
        // Stale wakers pile up while nothing presses: past a bound, every one is
        // woken (a connection woken for nothing waits again).
        if self.idle.len() >= IDLE_WAKERS_MAX {
            self.wake_idle();
        }
        self.idle.push(waker.clone());
    }

    fn wake_idle(&mut self) {
        for waker in self.idle.drain(..) {
            waker.wake();
        }
    }

    /// How long until a claim may change the room (a queue the group holds back
    /// looks again then; a connection of the group ending lists it sooner).
    pub(crate) fn claim_wait(&self, now_us: u64) -> Option<Duration> {
        self.slots.as_ref().map(|s| s.wait(now_us))
    }

    pub(crate) fn opened(&mut self) {
        self.open += 1;
    }

    pub(crate) fn ended(&mut self) {
        self.open = self.open.saturating_sub(1);
    }

    /// A queue with `connections` open came into the group (`joined`) or left it.
    pub(crate) fn moved(&mut self, connections: usize, joined: bool) {
        self.open = if joined {
            self.open + connections
        } else {
            self.open.saturating_sub(connections)
        };
    }

    /// Claims what the group's queues want now (those open, and the demand of the
    /// last round), and takes the answer to an earlier claim; `reset` starts the
    /// next round's demand afresh.
    fn claim(&mut self, now_us: u64, reset: bool) {
        if let (Some(slots), Some(limit)) = (self.slots.as_mut(), self.values.connection_limit) {
            self.claimed = slots.allowed(now_us, limit, self.open + self.demand, self.open);
            if slots.others_waiting() {
                self.wake_idle();
            }
        }
        if reset {
            self.last_demand = std::mem::take(&mut self.demand);
        }
    }

    /// The state the admin API shows.
    pub fn info(&self) -> GroupInfo {
        let (claimed, down) = match self.slots.as_ref().map(|s| s.state()) {
            Some((claimed, down)) => (Some(claimed), down),
            None => (self.values.connection_limit, None),
        };
        let lease = |t: &Throttle| t.lease_state().map_or(0, |(_, tokens)| tokens);
        let down = (down.or(self.messages.lease_state().and_then(|(d, _)| d)))
            .or(self.connects.lease_state().and_then(|(d, _)| d));
        GroupInfo {
            key: self.key.clone(),
            connections_open: self.open,
            connections_claimed: claimed,
            tokens_held: lease(&self.messages) + lease(&self.connects),
            fallback: down,
        }
    }
}

/// A group as the admin API lists it with each ready queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupInfo {
    pub key: String,
    /// This shard's connections of the group's queues.
    pub connections_open: usize,
    /// What this shard may have open of the connection limit (None: no limit).
    pub connections_claimed: Option<usize>,
    /// Leased tokens not spent yet.
    pub tokens_held: u32,
    /// The fallback in force while the shared store cannot be reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

/// The shard's groups by key, and where their tokens come from.
#[derive(Debug, Default)]
pub struct Groups {
    map: HashMap<String, GroupRef>,
    source: Option<Rc<dyn TokenSource>>,
    /// The groups that held a queue back this round or the last: only these claim
    /// at each round of connections (every group claims on the settling cadence),
    /// so a round never walks every group.
    pub(crate) pressing: Vec<GroupRef>,
}

impl Groups {
    /// Leases the groups made from now on from `source`.
    pub fn set_source(&mut self, source: Rc<dyn TokenSource>) {
        self.source = Some(source);
    }

    /// The group `key`, made when missing, with `values`.
    pub fn join(&mut self, key: &str, values: LimitValues) -> GroupRef {
        let source = self.source.as_ref();
        if let Some(group) = self.map.get(key) {
            group.borrow_mut().set_values(values, source);
            return group.clone();
        }
        let group = Rc::new(RefCell::new(Group::new(key, values, source)));
        self.map.insert(key.to_string(), group.clone());
        group
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The groups that held a queue back claim what their queues want for the
    /// round about to start, which counts their demand afresh; those that held
    /// none back in the last round leave the list.
    pub(crate) fn claim_pressing(&mut self, now_us: u64) {
        self.pressing.retain(|group| {
            let mut g = group.borrow_mut();
            g.claim(now_us, true);
            g.pressing = g.last_demand > 0;
            g.pressing
        });
    }

    /// Takes the answers to leases and gives back tokens held unspent.
    pub(crate) fn settle(&mut self, now_us: u64) {
        for group in self.map.values() {
            let mut g = group.borrow_mut();
            g.messages.settle(now_us);
            g.connects.settle(now_us);
            g.claim(now_us, false);
        }
    }

    /// Forgets the groups no queue is in any more and that have nothing open
    /// (their leases go back, their claims are released, as they drop).
    pub(crate) fn forget_unused(&mut self) {
        // (Held by the map and this list alone, a group is in no queue.)
        self.pressing
            .retain(|g| Rc::strong_count(g) > 2 || g.borrow().open > 0);
        self.map
            .retain(|_, g| Rc::strong_count(g) > 1 || g.borrow().open > 0);
    }
}
