//! IP warm-up: a source that follows a plan (`delivery.warmups`) may send each
//! provider only the plan's budget for the day — the first number on the plan's
//! first day, the second on the second, … — and is warm after the last day. When a
//! message's pool draws its source, sources whose budget for the site's provider is
//! spent today are passed over, so the pool's other sources take the overflow; when
//! all are spent the message waits for the next day.
//!
//! The counts are shared by every shard (each draws sources for its own messages):
//! one atomic word per (source, provider), holding the day and the count, changed
//! by compare-and-swap — no lock, and a new day starts the count again by itself.
//! Only parts to a provider that a warming source of their pool is limited for pay
//! anything.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::config::DeliveryConfig;
use crate::config::delivery::parse_date;
use crate::shaping::Scope;

const DAY_MS: u64 = 86_400_000;
/// The count takes the low 40 bits of a cell, the day the rest.
const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// The day a time falls on (days since 1970-01-01, UTC).
pub fn day_of(now_ms: u64) -> u64 {
    now_ms / DAY_MS
}

/// When the day after `now_ms`'s starts.
pub fn next_day_ms(now_ms: u64) -> u64 {
    (day_of(now_ms) + 1) * DAY_MS
}

/// One source's budget toward one provider.
#[derive(Debug)]
struct Cell {
    source: String,
    provider: String,
    /// Index into `Budgets::plans`.
    plan: usize,
    /// The plan's first day.
    start_day: u64,
    /// day << COUNT_BITS | messages counted that day.
    word: AtomicU64,
}

impl Cell {
    /// The day's budget; None once the source is warm.
    fn budget(&self, plans: &[Vec<u64>], day: u64) -> Option<u64> {
        let index = day.saturating_sub(self.start_day) as usize;
        plans[self.plan].get(index).copied()
    }

    fn used(&self, day: u64) -> u64 {
        let word = self.word.load(Ordering::Acquire);
        if word >> COUNT_BITS == day {
            word & COUNT_MASK
        } else {
            0
        }
    }
}

/// The warm-up budgets of every source that follows a plan.
#[derive(Debug, Default)]
pub struct Budgets {
    plans: Vec<Vec<u64>>,
    cells: Vec<Cell>,
    /// Cells by source, then provider.
    by_source: HashMap<String, Vec<(String, usize)>>,
    /// The providers, in name order, with their MX suffixes.
    providers: Vec<(String, Scope)>,
}

/// A source's standing toward a provider today (the admin API shows it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Standing {
    pub source: String,
    pub provider: String,
    /// Day of the plan (1 = its first day).
    pub day: u64,
    /// The day's budget; None: warm (the plan is over).
    pub budget: Option<u64>,
    pub used: u64,
}

/// The counts kept across a restart: the day, and the count of each source toward
/// each provider that day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub day: u64,
    pub used: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Budgets {
    pub fn new(config: &DeliveryConfig) -> Budgets {
        let mut budgets = Budgets {
            providers: (config.providers.iter())
                .map(|(name, p)| (name.clone(), Scope::new(&p.mx_suffix, &[])))
                .collect(),
            ..Budgets::default()
        };
        let mut plan_index = HashMap::new();
        for (name, plan) in &config.warmups {
            plan_index.insert(name.clone(), budgets.plans.len());
            budgets
                .plans
                .push(plan.schedule.iter().map(|b| b.get()).collect());
        }
        for (source, s) in &config.sources {
            let (Some(&plan), Some(start)) = (
                plan_index.get(&s.warmup),
                parse_date(&s.warmup_start).and_then(|d| u64::try_from(d).ok()),
            ) else {
                continue;
            };
            let limited = &config.warmups[&s.warmup].providers;
            for provider in config.providers.keys() {
                if !limited.is_empty() && !limited.contains(provider) {
                    continue;
                }
                budgets
                    .by_source
                    .entry(source.clone())
                    .or_default()
                    .push((provider.clone(), budgets.cells.len()));
                budgets.cells.push(Cell {
                    source: source.clone(),
                    provider: provider.clone(),
                    plan,
                    start_day: start,
                    word: AtomicU64::new(0),
                });
            }
        }
        budgets
    }

    /// Whether any source follows a plan.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Whether `source` follows a plan.
    pub fn warming(&self, source: &str) -> bool {
        self.by_source.contains_key(source)
    }

    /// The provider of the site served by `hosts` (the first by name whose MX
    /// suffix matches), if any.
    pub fn provider_of<'a>(&self, hosts: impl Iterator<Item = &'a str> + Clone) -> Option<&str> {
        (self.providers.iter())
            .find(|(_, scope)| scope.applies("", hosts.clone()))
            .map(|(name, _)| name.as_str())
    }

    fn cell(&self, source: &str, provider: &str) -> Option<&Cell> {
        let cells = self.by_source.get(source)?;
        let (_, i) = cells.iter().find(|(p, _)| p == provider)?;
        Some(&self.cells[*i])
    }

    /// Counts one message from `source` to `provider` at `now_ms` if the day's
    /// budget has room (true); false, counting nothing, when it is spent. A source
    /// not limited toward the provider always has room.
    pub fn take(&self, source: &str, provider: &str, now_ms: u64) -> bool {
        let Some(cell) = self.cell(source, provider) else {
            return true;
        };
        let day = day_of(now_ms);
        let Some(budget) = cell.budget(&self.plans, day) else {
            return true;
        };
        let mut word = cell.word.load(Ordering::Acquire);
        loop {
            let used = if word >> COUNT_BITS == day {
                word & COUNT_MASK
            } else {
                0
            };
            if used >= budget {
                return false;
            }
            let next = (day << COUNT_BITS) | (used + 1);
            match (cell.word).compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => word = now,
            }
        }
    }

    /// Every warming source's standing toward each provider at `now_ms`.
    pub fn standings(&self, now_ms: u64) -> Vec<Standing> {
        let day = day_of(now_ms);
        (self.cells.iter())
            .map(|c| Standing {
                source: c.source.clone(),
                provider: c.provider.clone(),
                day: day.saturating_sub(c.start_day) + 1,
                budget: c.budget(&self.plans, day),
                used: c.used(day),
            })
            .collect()
    }

    /// Today's counts, to be kept across a restart.
    pub fn save(&self, now_ms: u64) -> Saved {
        let day = day_of(now_ms);
        let mut saved = Saved {
            day,
            used: BTreeMap::new(),
        };
        for c in &self.cells {
            let used = c.used(day);
            if used > 0 {
                (saved.used.entry(c.source.clone()).or_default()).insert(c.provider.clone(), used);
            }
        }
        saved
    }

    /// Takes back counts saved today (those of another day are over).
    pub fn restore(&self, saved: &Saved, now_ms: u64) {
        let day = day_of(now_ms);
        if saved.day != day {
            return;
        }
        for (source, by_provider) in &saved.used {
            for (provider, used) in by_provider {
                if let Some(cell) = self.cell(source, provider) {
                    let used = (*used).min(COUNT_MASK);
                    cell.word
                        .store((day << COUNT_BITS) | used, Ordering::Release);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn budgets(start: &str) -> Budgets {
        let text = format!(
            "[delivery]\n\
             sources = {{ a = {{ warmup = \"new\", warmup_start = \"{start}\" }}, b = {{}} }}\n\
             warmups = {{ new = {{ schedule = [2, 5], providers = [\"gmail\"] }} }}\n\
             [delivery.providers.gmail]\nmx_suffix = [\".google.com\"]\n\
             [delivery.providers.yahoo]\nmx_suffix = [\".yahoodns.net\"]\n"
        );
        Budgets::new(&Config::parse(&text, "t.toml").unwrap().delivery)
    }

    const DAY: u64 = DAY_MS;

    #[test]
    fn budgets_rise_day_by_day_and_end_warm() {
        let b = budgets("2026-12-01");
        let start = 20_788 * DAY; // 2026-12-01
        assert!(b.warming("a") && !b.warming("b"));
        let hosts = ["alt1.gmail-smtp-in.l.google.com"];
        assert_eq!(b.provider_of(hosts.iter().copied()), Some("gmail"));
        assert_eq!(b.provider_of(["mx.other.test"].iter().copied()), None);
        // Day 1: two messages to gmail, then none; yahoo and source b unlimited.
        assert!(b.take("a", "gmail", start + 10));
        assert!(b.take("a", "gmail", start + 20));
        assert!(!b.take("a", "gmail", start + 30));
        assert!(b.take("a", "yahoo", start + 30));
        assert!(b.take("b", "gmail", start + 30));
        assert_eq!(
            b.standings(start + 40),
            [Standing {
                source: "a".into(),
                provider: "gmail".into(),
                day: 1,
                budget: Some(2),
                used: 2
            }]
        );
        // Day 2: a new count under a larger budget; day 3: warm.
        for _ in 0..5 {
            assert!(b.take("a", "gmail", start + DAY + 1));
        }
        assert!(!b.take("a", "gmail", start + DAY + 2));
        assert_eq!(b.standings(start + 2 * DAY)[0].budget, None);
        for _ in 0..100 {
            assert!(b.take("a", "gmail", start + 2 * DAY));
        }
        // Before its first day a source is on day 1.
        let early = budgets("2027-01-01");
        assert_eq!(early.standings(start)[0].day, 1);
        assert_eq!(early.standings(start)[0].budget, Some(2));
    }

    #[test]
    fn counts_survive_a_restart_the_same_day_only() {
        let b = budgets("2026-12-01");
        let now = 20_788 * DAY + 5;
        assert!(b.take("a", "gmail", now));
        let saved = b.save(now);
        assert_eq!(saved.used["a"]["gmail"], 1);
        let again = budgets("2026-12-01");
        again.restore(&saved, now + 1000);
        assert!(again.take("a", "gmail", now + 2000));
        assert!(
            !again.take("a", "gmail", now + 3000),
            "1 restored + 1 = budget 2"
        );
        let tomorrow = budgets("2026-12-01");
        tomorrow.restore(&saved, now + DAY);
        assert_eq!(tomorrow.standings(now + DAY)[0].used, 0);
    }

    #[test]
    fn concurrent_takes_never_pass_the_budget() {
        let b = std::sync::Arc::new(budgets("2026-12-01"));
        let now = 20_789 * DAY; // day 2: budget 5
        let taken: u64 = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    (0..100).filter(|_| b.take("a", "gmail", now)).count() as u64
                })
            })
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(taken, 5);
    }

    #[test]
    fn plans_and_sources_are_checked() {
        let err = |text: &str| Config::parse(text, "t.toml").unwrap_err().to_string();
        let e = err(
            "[delivery]\nsources = { a = { warmup = \"nope\", warmup_start = \"2026-12-01\" } }\n",
        );
        assert!(
            e.contains("delivery.sources.a.warmup") && e.contains("`nope`"),
            "{e}"
        );
        let e = err(
            "[delivery]\nwarmups = { w = { schedule = [1] } }\nsources = { a = { warmup = \"w\", warmup_start = \"2026-02-30\" } }\n",
        );
        assert!(
            e.contains("warmup_start") && e.contains("2026-02-30"),
            "{e}"
        );
        let e = err(
            "[delivery]\nwarmups = { w = { schedule = [1] } }\nsources = { a = { warmup = \"w\" } }\n",
        );
        assert!(e.contains("needs the plan's first day"), "{e}");
        let e = err("[delivery]\nwarmups = { w = { schedule = [] } }\n");
        assert!(e.contains("delivery.warmups.w.schedule"), "{e}");
        let e = err("[delivery]\nwarmups = { w = { schedule = [0] } }\n");
        assert!(e.contains("schedule"), "{e}");
        let e = err("[delivery]\nwarmups = { w = { schedule = [1], providers = [\"gmial\"] } }\n");
        assert!(e.contains("provider `gmial`"), "{e}");
        assert_eq!(parse_date("2026-12-01"), Some(20_788));
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2026-1-01"), None);
    }
}
