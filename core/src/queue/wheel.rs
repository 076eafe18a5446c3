//! The scheduled queue's timer: a hierarchical timing wheel with millisecond ticks.
//!
//! Six levels of 64 slots; a slot of level `l` spans 64^l ms, so the wheel reaches
//! 2^36 ms (about 795 days) ahead, past any `max_age`. An entry goes to the lowest
//! level at which its due time and the wheel's current time differ only inside one
//! slot's span; when the wheel reaches a slot of a higher level, the slot's entries
//! fall to lower levels (or fire). Insertion is O(1), and advancing costs O(1) per
//! occupied slot passed plus one cascade per level per entry at most — a binary heap
//! pays O(log n) on both, with n in the millions for a large backlog of retries.
//!
//! Invariant (as in the classic design): every entry at level `l` is due within the
//! current level-`l+1` window of `elapsed`, in a later level-`l` slot than
//! `elapsed`'s (level 0: a later or equal millisecond). So the first occupied slot
//! of the lowest occupied level holds the earliest entries.

const LEVELS: usize = 6;
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
/// The furthest ahead an entry can be placed (later due times are clamped to this
/// and placed again when they come up).
const RANGE_MS: u64 = 1 << (SLOT_BITS as usize * LEVELS);

#[derive(Debug)]
pub struct Wheel<T> {
    /// Current time of the wheel (ms); nothing due at or before it remains.
    elapsed: u64,
    /// `slots[level][slot]`: entries with their due times.
    slots: Vec<Vec<Vec<(u64, T)>>>,
    /// One bit per non-empty slot, per level.
    occupied: [u64; LEVELS],
    len: usize,
}

impl<T> Wheel<T> {
    /// A wheel whose current time is `now_ms`.
    pub fn new(now_ms: u64) -> Wheel<T> {
        Wheel {
            elapsed: now_ms,
            slots: (0..LEVELS)
                .map(|_| (0..SLOTS).map(|_| Vec::new()).collect())
                .collect(),
            occupied: [0; LEVELS],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The wheel's current time: an entry due at or before it is not taken.
    pub fn now(&self) -> u64 {
        self.elapsed
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten().flatten().map(|(_, item)| item)
    }

    /// Adds an entry due at `due_ms`; one already due is returned instead.
    pub fn insert(&mut self, due_ms: u64, item: T) -> Result<(), T> {
        if due_ms <= self.elapsed {
            return Err(item);
        }
        self.place(due_ms, item);
        self.len += 1;
        Ok(())
    }

    fn place(&mut self, due_ms: u64, item: T) {
        // Entries beyond the wheel's reach wait in its last slot for their turn.
        let at = due_ms.min(self.elapsed + RANGE_MS - 1);
        let level = level_for(self.elapsed, at);
        let slot = slot_for(at, level);
        self.slots[level][slot].push((due_ms, item));
        self.occupied[level] |= 1 << slot;
    }

    /// The earliest time at which an entry can be due: the start of the first
    /// occupied slot (exact at level 0, a lower bound above it).
    pub fn next_deadline(&self) -> Option<u64> {
        self.next_slot().map(|(_, _, deadline)| deadline)
    }

    fn next_slot(&self) -> Option<(usize, usize, u64)> {
        for level in 0..LEVELS {
            let occupied = self.occupied[level];
            if occupied == 0 {
                continue;
            }
            let shift = SLOT_BITS as usize * level;
            let now_slot = ((self.elapsed >> shift) as usize) & (SLOTS - 1);
            let distance = occupied.rotate_right(now_slot as u32).trailing_zeros() as usize;
            let slot = (now_slot + distance) % SLOTS;
            let level_span = 1u64 << (shift + SLOT_BITS as usize);
            let level_start = self.elapsed & !(level_span - 1);
            let mut deadline = level_start + ((slot as u64) << shift);
            if slot < now_slot || (level > 0 && slot == now_slot) {
                // Only the top level wraps: an entry placed near the end of the
                // wheel's reach can land in a slot at or before `elapsed`'s, meaning
                // that slot of the next top-level window.
                deadline += level_span;
            }
            return Some((level, slot, deadline));
        }
        None
    }

    /// Moves the wheel to `now_ms`, appending every entry due by then to `out`
    /// (earliest slots first).
    pub fn advance(&mut self, now_ms: u64, out: &mut Vec<T>) {
        while let Some((level, slot, deadline)) = self.next_slot() {
            if deadline > now_ms {
                break;
            }
            self.elapsed = self.elapsed.max(deadline);
            self.occupied[level] &= !(1 << slot);
            let entries = std::mem::take(&mut self.slots[level][slot]);
            for (due, item) in entries {
                if due <= self.elapsed {
                    self.len -= 1;
                    out.push(item);
                } else {
                    self.place(due, item);
                }
            }
        }
        self.elapsed = self.elapsed.max(now_ms);
    }

    /// Removes every entry for which `take` is true, returning them.
    pub fn drain_where(&mut self, mut take: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        for level in 0..LEVELS {
            for slot in 0..SLOTS {
                let entries = &mut self.slots[level][slot];
                if entries.is_empty() {
                    continue;
                }
                let mut i = 0;
                while i < entries.len() {
                    if take(&entries[i].1) {
                        out.push(entries.swap_remove(i).1);
                    } else {
                        i += 1;
                    }
                }
                if entries.is_empty() {
                    self.occupied[level] &= !(1 << slot);
                }
            }
        }
        self.len -= out.len();
        out
    }
}

/// The lowest level whose slot span holds both times' difference.
fn level_for(elapsed: u64, due: u64) -> usize {
    let masked = (elapsed ^ due) | (SLOTS as u64 - 1);
    let significant = 63 - masked.leading_zeros() as usize;
    (significant / SLOT_BITS as usize).min(LEVELS - 1)
}

fn slot_for(due: u64, level: usize) -> usize {
    ((due >> (SLOT_BITS as usize * level)) as usize) & (SLOTS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry fires exactly once, not before its due time and not after the
    /// first advance that passes it, whatever the step pattern.
    fn check(start: u64, dues: &[u64], steps: &[u64]) {
        let mut wheel = Wheel::new(start);
        let mut fired_now = Vec::new();
        for (i, due) in dues.iter().enumerate() {
            if wheel.insert(*due, i).is_err() {
                fired_now.push(i);
            }
        }
        let mut fired = vec![None; dues.len()];
        for i in fired_now {
            fired[i] = Some(start);
        }
        let mut now = start;
        let mut out = Vec::new();
        for step in steps {
            now += step;
            wheel.advance(now, &mut out);
            for i in out.drain(..) {
                assert!(fired[i].is_none(), "entry {i} fired twice");
                assert!(dues[i] <= now, "entry {i} due {} fired at {now}", dues[i]);
                fired[i] = Some(now);
            }
            for (i, due) in dues.iter().enumerate() {
                if *due <= now {
                    assert!(fired[i].is_some(), "entry {i} due {due} missed at {now}");
                }
            }
            if let Some(deadline) = wheel.next_deadline() {
                let earliest = dues
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| fired[*i].is_none())
                    .map(|(_, d)| *d)
                    .min()
                    .expect("entries left");
                assert!(deadline <= earliest, "deadline {deadline} after {earliest}");
            }
        }
        assert_eq!(wheel.len(), dues.iter().filter(|d| **d > now).count());
    }

    #[test]
    fn entries_fire_once_at_their_time_across_levels() {
        let start = 1_700_000_000_123;
        let dues: Vec<u64> = [0, 1, 2, 63, 64, 65, 4095, 4096, 4097, 262_143, 1 << 24]
            .iter()
            .flat_map(|d| [start + d, start + d + 7])
            .collect();
        check(start, &dues, &[1; 300]);
        check(
            start,
            &dues,
            &[1, 63, 64, 1000, 4096, 100_000, 300_000, 1 << 25],
        );
        check(start, &dues, &[1 << 30]);
    }

    #[test]
    fn random_schedules_agree_with_a_sorted_list() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..50 {
            let start = rng.u64(0..1 << 40);
            let dues: Vec<u64> = (0..200)
                .map(|_| {
                    let bits = rng.u32(1..34);
                    start + rng.u64(0..1 << bits)
                })
                .collect();
            let steps: Vec<u64> = (0..200)
                .map(|_| {
                    let bits = rng.u32(0..30);
                    rng.u64(0..1 << bits)
                })
                .collect();
            check(start, &dues, &steps);
        }
    }

    #[test]
    fn far_entries_are_clamped_then_placed_again() {
        let mut wheel = Wheel::new(0);
        wheel.insert(RANGE_MS * 3, "far").unwrap();
        let mut out = Vec::new();
        wheel.advance(RANGE_MS * 2, &mut out);
        assert!(out.is_empty());
        wheel.advance(RANGE_MS * 3, &mut out);
        assert_eq!(out, vec!["far"]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn drained_entries_leave_the_wheel() {
        let mut wheel = Wheel::new(0);
        for i in 1..=100u64 {
            wheel.insert(i * 1000, i).unwrap();
        }
        let odd = wheel.drain_where(|i| i % 2 == 1);
        assert_eq!(odd.len(), 50);
        assert_eq!(wheel.len(), 50);
        let mut out = Vec::new();
        wheel.advance(1_000_000, &mut out);
        out.sort_unstable();
        assert_eq!(out, (1..=50).map(|i| i * 2).collect::<Vec<_>>());
    }
}
