//! The tallies as data, without I/O: counters per time bucket and per key (a
//! combination of the dimensions), at three resolutions — minutes, hours and days —
//! each kept for its own retention; the keys interned; the messages known to have
//! been opened or clicked (for the unique counts).
//!
//! Each event adds to the bucket of its minute, its hour and its day at once, so a
//! query reads one resolution only and an hour's tally outlives its minutes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// The counters kept per bucket and key; the Metrics API's other metrics are sums
/// and differences of these (`query.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    Injected,
    PolicyRejection,
    GenerationFailed,
    GenerationRejection,
    Delivered,
    DeliveredFirst,
    DeliveredSubsequent,
    TimeFirst,
    TimeSubsequent,
    MsgVolume,
    InbandBounce,
    OutofbandBounce,
    HardBounce,
    SoftBounce,
    BlockBounce,
    AdminBounce,
    UndeterminedBounce,
    Delayed,
    DelayedFirst,
    Rendered,
    UniqueRendered,
    UniqueConfirmedOpened,
    Clicked,
    UniqueClicked,
    SpamComplaint,
    Unsubscribe,
}

pub const COUNTERS: usize = Counter::Unsubscribe as usize + 1;

impl Counter {
    pub const ALL: [Counter; COUNTERS] = [
        Counter::Injected,
        Counter::PolicyRejection,
        Counter::GenerationFailed,
        Counter::GenerationRejection,
        Counter::Delivered,
        Counter::DeliveredFirst,
        Counter::DeliveredSubsequent,
        Counter::TimeFirst,
        Counter::TimeSubsequent,
        Counter::MsgVolume,
        Counter::InbandBounce,
        Counter::OutofbandBounce,
        Counter::HardBounce,
        Counter::SoftBounce,
        Counter::BlockBounce,
        Counter::AdminBounce,
        Counter::UndeterminedBounce,
        Counter::Delayed,
        Counter::DelayedFirst,
        Counter::Rendered,
        Counter::UniqueRendered,
        Counter::UniqueConfirmedOpened,
        Counter::Clicked,
        Counter::UniqueClicked,
        Counter::SpamComplaint,
        Counter::Unsubscribe,
    ];

    pub fn from_index(i: usize) -> Option<Counter> {
        Counter::ALL.get(i).copied()
    }
}

/// One bucket's counters for one key.
pub type Counts = [u64; COUNTERS];

/// The dimensions a tally is kept by (and the Metrics API groups and filters by).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Dim {
    Tenant,
    Domain,
    Campaign,
    Template,
    SendingIp,
    IpPool,
    SendingDomain,
}

pub const DIMS: usize = Dim::SendingDomain as usize + 1;

impl Dim {
    pub const ALL: [Dim; DIMS] = [
        Dim::Tenant,
        Dim::Domain,
        Dim::Campaign,
        Dim::Template,
        Dim::SendingIp,
        Dim::IpPool,
        Dim::SendingDomain,
    ];
}

/// A combination of the dimensions' values (empty: the event had none).
pub type Key = [Arc<str>; DIMS];

/// The value of every dimension of a key past `keys_max`.
pub const OTHER: &str = "(other)";

/// A resolution: buckets `width` minutes wide, kept `retention` minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Minute,
    Hour,
    Day,
}

impl Resolution {
    pub const ALL: [Resolution; 3] = [Resolution::Minute, Resolution::Hour, Resolution::Day];

    pub fn width(self) -> u32 {
        match self {
            Resolution::Minute => 1,
            Resolution::Hour => 60,
            Resolution::Day => 1440,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The buckets of one resolution: start minute (unix minutes) → key → counters.
pub type Buckets = BTreeMap<u32, HashMap<u32, Counts>>;

/// The engagement already seen of a message (for the unique counts).
pub const OPENED: u8 = 1;
pub const CLICKED: u8 = 2;

/// Every tally: what the Metrics API answers from.
#[derive(Debug)]
pub struct Store {
    keys: Vec<Key>,
    /// Keys by a hash of their values (the event's borrowed values are looked up
    /// without making a key): hash → ids.
    index: HashMap<u64, Vec<u32>>,
    /// Each value once, shared by the keys that hold it.
    strings: HashMap<Arc<str>, ()>,
    keys_max: usize,
    /// Events whose key was past `keys_max` (tallied under `(other)`).
    pub folded: u64,
    buckets: [Buckets; 3],
    /// Retention per resolution, in minutes.
    retention: [u32; 3],
    engaged: HashMap<u64, u8>,
    engaged_order: VecDeque<u64>,
    engaged_max: usize,
}

/// The limits a store keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub keys_max: usize,
    pub engaged_max: usize,
    /// Minutes kept per resolution (minute, hour, day).
    pub retention: [u32; 3],
}

impl Store {
    pub fn new(limits: Limits) -> Store {
        Store {
            keys: Vec::new(),
            index: HashMap::new(),
            strings: HashMap::new(),
            keys_max: limits.keys_max,
            folded: 0,
            buckets: Default::default(),
            retention: limits.retention,
            engaged: HashMap::new(),
            engaged_order: VecDeque::new(),
            engaged_max: limits.engaged_max,
        }
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    pub fn key(&self, id: u32) -> Option<&Key> {
        self.keys.get(id as usize)
    }

    pub fn buckets(&self, resolution: Resolution) -> &Buckets {
        &self.buckets[resolution.index()]
    }

    /// Rows (bucket × key) over every resolution.
    pub fn rows(&self) -> usize {
        self.buckets
            .iter()
            .map(|b| b.values().map(HashMap::len).sum::<usize>())
            .sum()
    }

    fn intern_str(&mut self, value: &str) -> Arc<str> {
        if let Some((s, ())) = self.strings.get_key_value(value) {
            return s.clone();
        }
        let s: Arc<str> = Arc::from(value);
        self.strings.insert(s.clone(), ());
        s
    }

    /// The id of a key, interned if new (and `Err` with the new id when it was, so
    /// the caller can record it); past `keys_max` the `(other)` key's.
    pub fn intern(&mut self, values: [&str; DIMS]) -> Result<u32, u32> {
        if let Some(id) = self.find(&values) {
            return Ok(id);
        }
        if self.keys.len() >= self.keys_max {
            self.folded += 1;
            let other = [OTHER; DIMS];
            if let Some(id) = self.find(&other) {
                return Ok(id);
            }
            return Err(self.push_key(other));
        }
        Err(self.push_key(values))
    }

    fn find(&self, values: &[&str; DIMS]) -> Option<u32> {
        let ids = self.index.get(&key_hash(values))?;
        ids.iter().copied().find(|id| {
            self.keys
                .get(*id as usize)
                .is_some_and(|k| k.iter().zip(values).all(|(a, b)| &**a == *b))
        })
    }

    fn push_key(&mut self, values: [&str; DIMS]) -> u32 {
        let id = self.keys.len() as u32;
        self.index.entry(key_hash(&values)).or_default().push(id);
        let key = values.map(|v| self.intern_str(v));
        self.keys.push(key);
        id
    }

    /// Restores a key with a known id (a snapshot's or a journal's): the next id
    /// is added, a known id must hold the same values; false otherwise (the file
    /// is not what this store was made from).
    pub fn restore_key(&mut self, id: u32, values: [&str; DIMS]) -> bool {
        match self.keys.get(id as usize) {
            Some(key) => key.iter().zip(&values).all(|(a, b)| &**a == *b),
            None if id as usize == self.keys.len() => {
                self.push_key(values);
                true
            }
            None => false,
        }
    }

    /// Forgets keys interned after the first `len` (a batch that was not stored).
    pub fn truncate_keys(&mut self, len: usize) {
        while self.keys.len() > len {
            let id = self.keys.len() as u32 - 1;
            if let Some(key) = self.keys.pop() {
                let values: [&str; DIMS] = std::array::from_fn(|i| &*key[i]);
                let hash = key_hash(&values);
                if let Some(ids) = self.index.get_mut(&hash) {
                    ids.retain(|i| *i != id);
                    if ids.is_empty() {
                        self.index.remove(&hash);
                    }
                }
            }
        }
    }

    /// Adds `counts` to key `key`'s buckets of minute `minute` at every resolution
    /// whose retention still covers it (`now_min`: the current minute).
    pub fn add(&mut self, minute: u32, key: u32, counts: &Counts, now_min: u32) {
        for resolution in Resolution::ALL {
            let start = minute - minute % resolution.width();
            let kept_from = now_min.saturating_sub(self.retention[resolution.index()]);
            if start.saturating_add(resolution.width()) <= kept_from {
                continue;
            }
            let row = self.buckets[resolution.index()]
                .entry(start)
                .or_default()
                .entry(key)
                .or_insert([0; COUNTERS]);
            for (total, n) in row.iter_mut().zip(counts) {
                *total = total.saturating_add(*n);
            }
        }
    }

    /// Sets a row as a snapshot holds it.
    pub fn restore_row(&mut self, resolution: Resolution, start: u32, key: u32, counts: Counts) {
        self.buckets[resolution.index()]
            .entry(start)
            .or_default()
            .insert(key, counts);
    }

    /// Drops the buckets past their retention.
    pub fn prune(&mut self, now_min: u32) {
        for resolution in Resolution::ALL {
            let kept_from = now_min.saturating_sub(self.retention[resolution.index()]);
            let buckets = &mut self.buckets[resolution.index()];
            while let Some((&start, _)) = buckets.first_key_value() {
                if start.saturating_add(resolution.width()) > kept_from {
                    break;
                }
                buckets.pop_first();
            }
        }
    }

    /// What is known of message `hash`'s engagement (OPENED, CLICKED).
    pub fn engaged(&self, hash: u64) -> u8 {
        self.engaged.get(&hash).copied().unwrap_or(0)
    }

    /// Records message `hash`'s engagement; the oldest message is forgotten past
    /// `engaged_max`.
    pub fn set_engaged(&mut self, hash: u64, flags: u8) {
        match self.engaged.get_mut(&hash) {
            Some(known) => *known |= flags,
            None => {
                if self.engaged.len() >= self.engaged_max
                    && let Some(oldest) = self.engaged_order.pop_front()
                {
                    self.engaged.remove(&oldest);
                }
                self.engaged.insert(hash, flags);
                self.engaged_order.push_back(hash);
            }
        }
    }

    /// The engaged messages, oldest first.
    pub fn engaged_all(&self) -> impl Iterator<Item = (u64, u8)> + '_ {
        self.engaged_order
            .iter()
            .map(|h| (*h, self.engaged.get(h).copied().unwrap_or(0)))
    }
}

/// FNV-1a over the values, each followed by a byte no UTF-8 text holds.
fn key_hash(values: &[&str; DIMS]) -> u64 {
    values.iter().fold(0xcbf2_9ce4_8422_2325, |h: u64, v| {
        v.bytes()
            .chain(std::iter::once(0xff))
            .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    })
}

/// A stable 64-bit hash of a message id (FNV-1a): the engaged set is kept across
/// restarts, so the hash must not change between runs or versions.
pub fn message_hash(message_id: &str) -> u64 {
    message_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h: u64, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(keys_max: usize) -> Limits {
        Limits {
            keys_max,
            engaged_max: 2,
            retention: [60, 24 * 60, 10 * 1440],
        }
    }

    fn one(counter: Counter) -> Counts {
        let mut c = [0; COUNTERS];
        c[counter as usize] = 1;
        c
    }

    #[test]
    fn adds_at_every_resolution_and_prunes_each_by_its_retention() {
        let mut store = Store::new(limits(10));
        let key = store.intern(["t", "d", "", "", "", "", ""]).unwrap_err();
        assert_eq!(store.intern(["t", "d", "", "", "", "", ""]), Ok(key));
        let now = 100 * 1440 + 125;
        store.add(now - 5, key, &one(Counter::Delivered), now);
        store.add(now - 4, key, &one(Counter::Delivered), now);
        // Older than the minute retention: hours and days only.
        store.add(now - 70, key, &one(Counter::Delivered), now);
        assert_eq!(store.buckets(Resolution::Minute).len(), 2);
        let hour = store.buckets(Resolution::Hour);
        assert_eq!(hour.len(), 2, "{hour:?}");
        assert_eq!(
            hour[&(100 * 1440 + 120)][&key][Counter::Delivered as usize],
            2
        );
        let day = &store.buckets(Resolution::Day)[&(100 * 1440)];
        assert_eq!(day[&key][Counter::Delivered as usize], 3);
        store.prune(now + 60);
        assert!(store.buckets(Resolution::Minute).is_empty());
        assert_eq!(store.buckets(Resolution::Hour).len(), 2);
        store.prune(now + 11 * 1440);
        assert!(store.buckets(Resolution::Day).is_empty());
        // A minute at the end of time (a damaged timestamp) does not overflow.
        store.add(u32::MAX, key, &one(Counter::Delivered), now);
        store.prune(u32::MAX);
    }

    #[test]
    fn keys_past_the_bound_fold_into_other_and_a_batch_can_be_undone() {
        let mut store = Store::new(limits(2));
        let a = store.intern(["a", "", "", "", "", "", ""]).unwrap_err();
        let b = store.intern(["b", "", "", "", "", "", ""]).unwrap_err();
        let other = store.intern(["c", "", "", "", "", "", ""]).unwrap_err();
        assert_eq!(store.intern(["d", "", "", "", "", "", ""]), Ok(other));
        assert_eq!((a, b, other), (0, 1, 2));
        assert_eq!(store.folded, 2);
        assert_eq!(&*store.key(other).unwrap()[0], OTHER);
        store.truncate_keys(1);
        assert_eq!(store.keys().len(), 1);
        assert_eq!(store.intern(["b", "", "", "", "", "", ""]), Err(1));
        assert!(!store.restore_key(5, ["x"; DIMS]));
        assert!(store.restore_key(2, ["x"; DIMS]));
        assert!(store.restore_key(2, ["x"; DIMS]), "a known key again");
        assert!(
            !store.restore_key(2, ["y"; DIMS]),
            "another key under a known id"
        );
    }

    #[test]
    fn engaged_messages_are_bounded_oldest_first() {
        let mut store = Store::new(limits(2));
        store.set_engaged(1, OPENED);
        store.set_engaged(1, CLICKED);
        store.set_engaged(2, OPENED);
        assert_eq!(store.engaged(1), OPENED | CLICKED);
        store.set_engaged(3, CLICKED);
        assert_eq!(store.engaged(1), 0);
        assert_eq!(store.engaged(3), CLICKED);
        assert_eq!(store.engaged_all().count(), 2);
        assert_eq!(message_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
