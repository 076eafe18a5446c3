//! The resolver's cache: answers kept until their TTL runs out, and never more than
//! `entries_max` of them. The names come from outside (every recipient domain of
//! every message, and the MX hosts their DNS names), so without a bound a stream of
//! distinct domains would grow a shard's memory without end.
//!
//! When an insert finds the cache full, expired answers are dropped first; if that
//! frees less than an eighth of the room, the answers closest to expiring go until an
//! eighth is free. The sweep costs O(entries), once per `entries_max / 8` inserts at
//! most, so an insert is O(1) amortized.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug)]
struct Entry<V> {
    expires_ms: u64,
    value: V,
}

/// A map whose entries expire and whose size is bounded.
#[derive(Debug)]
pub struct TtlCache<K, V> {
    map: HashMap<K, Entry<V>>,
    entries_max: usize,
    /// Entries dropped to make room before they expired.
    pub evicted: u64,
}

impl<K: Hash + Eq + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(entries_max: usize) -> TtlCache<K, V> {
        TtlCache {
            map: HashMap::new(),
            entries_max: entries_max.max(1),
            evicted: 0,
        }
    }

    /// The value of `key` if it has not expired at `now_ms`.
    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q, now_ms: u64) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.get_until(key, now_ms).map(|(value, _)| value)
    }

    /// The value of `key` if it has not expired at `now_ms`, and when it expires.
    pub fn get_until<Q: Hash + Eq + ?Sized>(&self, key: &Q, now_ms: u64) -> Option<(V, u64)>
    where
        K: Borrow<Q>,
    {
        self.map
            .get(key)
            .filter(|e| e.expires_ms > now_ms)
            .map(|e| (e.value.clone(), e.expires_ms))
    }

    pub fn insert(&mut self, key: K, value: V, expires_ms: u64, now_ms: u64) {
        if self.map.len() >= self.entries_max && !self.map.contains_key(&key) {
            self.make_room(now_ms);
        }
        self.map.insert(key, Entry { expires_ms, value });
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn make_room(&mut self, now_ms: u64) {
        self.map.retain(|_, e| e.expires_ms > now_ms);
        let target = self.entries_max - self.entries_max.div_ceil(8);
        if self.map.len() <= target {
            return;
        }
        let excess = self.map.len() - target;
        let mut by_expiry: Vec<(u64, K)> = self
            .map
            .iter()
            .map(|(k, e)| (e.expires_ms, k.clone()))
            .collect();
        by_expiry.select_nth_unstable_by_key(excess - 1, |(expires, _)| *expires);
        for (_, key) in by_expiry.into_iter().take(excess) {
            self.map.remove(&key);
        }
        self.evicted += excess as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_expire_and_the_size_stays_bounded() {
        let mut c: TtlCache<u32, u32> = TtlCache::new(16);
        c.insert(1, 10, 100, 0);
        assert_eq!(c.get(&1, 99), Some(10));
        assert_eq!(c.get(&1, 100), None, "expired at its time");
        for k in 0..10_000u32 {
            c.insert(k, k, 1000 + u64::from(k), 0);
            assert!(c.len() <= 16);
        }
        // The newest insert is always kept, and evictions took the soonest to expire.
        assert_eq!(c.get(&9999, 0), Some(9999));
        assert!(c.get(&0, 0).is_none());
        assert!(c.evicted > 9000);
    }

    #[test]
    fn expired_answers_go_before_live_ones() {
        let mut c: TtlCache<u32, u32> = TtlCache::new(8);
        for k in 0..4 {
            c.insert(k, k, 10, 0); // expire at 10
        }
        for k in 4..8 {
            c.insert(k, k, 1_000_000, 0);
        }
        c.insert(100, 100, 1_000_000, 50);
        assert_eq!(c.evicted, 0, "only expired entries were dropped");
        for k in 4..8 {
            assert_eq!(c.get(&k, 50), Some(k));
        }
        // Replacing a key in a full cache evicts nothing.
        let mut full: TtlCache<u32, u32> = TtlCache::new(2);
        full.insert(1, 1, 100, 0);
        full.insert(2, 2, 100, 0);
        full.insert(2, 3, 200, 0);
        assert_eq!((full.len(), full.evicted, full.get(&1, 0)), (2, 0, Some(1)));
    }
}
