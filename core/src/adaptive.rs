//! Adaptive delivery, as data: the response rules compiled for matching, and the state
//! one ready queue keeps of them — matches counted toward a rule's threshold, and the
//! rules in force until they expire. Nothing here does I/O or reads the clock; the
//! delivery code feeds it replies and times and applies what it says.

use std::collections::VecDeque;

use regex::RegexSet;

use crate::config::DeliveryConfig;
use crate::config::automation::{ActionName, Automation, Trigger};
use crate::config::shaping::Knobs;
use crate::shaping::Scope;

/// Every response rule of the configuration, compiled.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

/// One compiled response rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Where it is written: `default#0` for the first of `delivery.automation`,
    /// `yahoo#1` for the second of provider yahoo's. Names it in events and the admin
    /// API.
    pub name: String,
    /// The rule as configured: a rule in force stays so across a reload only if the
    /// reloaded file has the same rule (same provider, sources and definition).
    definition: Automation,
    /// The provider's sites and sources (everything for `delivery.automation`).
    scope: Scope,
    regex: Option<RegexSet>,
    codes: Vec<u16>,
    enhanced: Vec<String>,
    pub trigger: Trigger,
    pub duration_ms: u64,
    pub actions: Vec<ActionName>,
    pub set: Option<Knobs>,
    /// `set` as `name=value` words (empty: none).
    pub set_text: String,
}

impl Rules {
    /// The rules of `delivery.automation`, then each provider's in name order.
    pub fn new(config: &DeliveryConfig) -> Rules {
        let mut rules = Vec::new();
        let mut add = |name: &str, scope: Scope, list: &[Automation]| {
            for (i, a) in list.iter().enumerate() {
                rules.push(Rule::new(format!("{name}#{i}"), scope.clone(), a));
            }
        };
        add("default", Scope::default(), &config.automation);
        for (name, p) in &config.providers {
            add(name, Scope::new(&p.mx_suffix, &p.sources), &p.automation);
        }
        Rules { rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn get(&self, index: u16) -> Option<&Rule> {
        self.rules.get(usize::from(index))
    }

    /// The rule named `name`.
    pub fn find(&self, name: &str) -> Option<u16> {
        let i = self.rules.iter().position(|r| r.name == name)?;
        u16::try_from(i).ok()
    }

    /// The rule among `candidates` that is `rule` of another table: same provider
    /// scope and definition (its name may differ).
    fn same(&self, rule: &Rule, candidates: &[u16]) -> Option<u16> {
        candidates.iter().copied().find(|&i| {
            self.get(i)
                .is_some_and(|r| r.scope == rule.scope && r.definition == rule.definition)
        })
    }

    /// The rules for the ready queue from `source` to the site served by `hosts`.
    pub fn for_queue<'a>(
        &self,
        source: &str,
        hosts: impl Iterator<Item = &'a str> + Clone,
    ) -> Vec<u16> {
        (self.rules.iter().enumerate())
            .filter(|(_, r)| r.applies(source, hosts.clone()))
            .filter_map(|(i, _)| u16::try_from(i).ok())
            .collect()
    }
}

impl Rule {
    fn new(name: String, scope: Scope, a: &Automation) -> Rule {
        // The configuration compiled this very set when it was read.
        let regex = (!a.regex.is_empty())
            .then(|| RegexSet::new(&a.regex).ok())
            .flatten();
        Rule {
            name,
            scope,
            regex,
            codes: a.codes.clone(),
            enhanced: a.enhanced.clone(),
            trigger: a.trigger,
            duration_ms: a.duration_secs.saturating_mul(1000),
            actions: a.actions.clone(),
            set: a.set.clone(),
            set_text: a.set.as_ref().map(Knobs::describe).unwrap_or_default(),
            definition: a.clone(),
        }
    }

    /// In the provider's scope, and from one of the rule's own sources if it names
    /// some (they narrow the provider's, never widen them).
    fn applies<'a>(&self, source: &str, hosts: impl Iterator<Item = &'a str>) -> bool {
        let own = &self.definition.sources;
        (own.is_empty() || own.iter().any(|s| s == source)) && self.scope.applies(source, hosts)
    }

    /// Whether the reply `code` with the whole text `text` (code, enhanced code and
    /// words, lines joined) is one this rule reacts to.
    pub fn matches(&self, code: u16, text: &str) -> bool {
        if !self.codes.is_empty() && !self.codes.contains(&code) {
            return false;
        }
        if !self.enhanced.is_empty() {
            let Some(enhanced) = enhanced_code(text) else {
                return false;
            };
            if !(self.enhanced.iter()).any(|prefix| enhanced_has_prefix(enhanced, prefix)) {
                return false;
            }
        }
        self.regex.as_ref().is_none_or(|set| set.is_match(text))
    }

    pub fn has(&self, action: ActionName) -> bool {
        self.actions.contains(&action)
    }

    /// Its actions' names.
    pub fn actions(&self) -> Vec<&'static str> {
        self.actions.iter().map(|a| a.name()).collect()
    }

    /// The holds this rule puts, fired by a reply to a message of `tenant` and
    /// `campaign` on site `site` (served by `hosts`), until `until_ms`: one per
    /// suspend_tenant / suspend_campaign action whose name the message has.
    pub fn holds(
        &self,
        tenant: Option<&str>,
        campaign: Option<&str>,
        site: &str,
        until_ms: u64,
    ) -> Vec<Hold> {
        let mut out = Vec::new();
        let whose = [
            (
                ActionName::SuspendTenant,
                tenant.map(|t| Whose::Tenant(t.to_string())),
            ),
            (
                ActionName::SuspendCampaign,
                campaign.map(|c| Whose::Campaign(c.to_string())),
            ),
        ];
        for (action, who) in whose {
            let Some(who) = who.filter(|_| self.has(action)) else {
                continue;
            };
            out.push(Hold {
                whose: who,
                sites: if self.scope.suffixes().is_empty() {
                    HoldSites::Site(site.to_string())
                } else {
                    HoldSites::Suffixes(self.scope.suffixes().to_vec())
                },
                until_ms,
                rule: self.name.clone(),
            });
        }
        out
    }
}

/// The enhanced status code (RFC 3463) a reply's text starts with after its code:
/// `"4.7.28"` of `"421 4.7.28 Our system has detected…"` (or `"421-4.7.28 …"`).
pub fn enhanced_code(text: &str) -> Option<&str> {
    let word = text
        .get(3..)?
        .trim_start_matches([' ', '-'])
        .split(' ')
        .next()?;
    crate::reply::is_enhanced_code(word).then_some(word)
}

/// `4.7.28` has the prefixes `4`, `4.7` and `4.7.28` (whole fields only: not `4.7.2`).
fn enhanced_has_prefix(code: &str, prefix: &str) -> bool {
    code == prefix
        || code
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// A rule that fired at a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fired {
    pub rule: u16,
    /// Until when it is in force (unix ms).
    pub until_ms: u64,
    /// It was not in force before (a rule in force that fires again only lasts
    /// longer).
    pub new: bool,
}

/// Whose mail a hold keeps back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Whose {
    Tenant(String),
    Campaign(String),
}

/// The sites a hold applies to: a provider's (by MX suffix), or one site.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldSites {
    Suffixes(Vec<String>),
    Site(String),
}

/// A tenant's or campaign's mail held back from a provider by a response rule
/// (suspend_tenant, suspend_campaign) until the rule's time is up. Shared by every
/// shard: the tenant's messages are spooled on all of them (and, with `[cluster]`,
/// by every node: the engine's `admin::cluster` shares it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hold {
    pub whose: Whose,
    pub sites: HoldSites,
    pub until_ms: u64,
    /// The rule that put it.
    pub rule: String,
}

impl Hold {
    /// Whether it holds a message of `tenant` and `campaign` to the site named
    /// `site` served by `hosts`, at `now_ms`.
    pub fn holds<'a>(
        &self,
        tenant: Option<&str>,
        campaign: Option<&str>,
        site: &str,
        hosts: impl Iterator<Item = &'a str>,
        now_ms: u64,
    ) -> bool {
        if now_ms >= self.until_ms {
            return false;
        }
        let whose = match &self.whose {
            Whose::Tenant(t) => tenant == Some(t.as_str()),
            Whose::Campaign(c) => campaign == Some(c.as_str()),
        };
        whose
            && match &self.sites {
                HoldSites::Site(name) => name == site,
                HoldSites::Suffixes(suffixes) => {
                    let mut hosts = hosts;
                    hosts.any(|host| {
                        let host = host.trim_end_matches('.');
                        (suffixes.iter()).any(|s| crate::shaping::ends_with_ignore_case(host, s))
                    })
                }
            }
    }

    /// The same tenant or campaign and sites (a new firing extends it).
    pub fn same(&self, other: &Hold) -> bool {
        self.whose == other.whose && self.sites == other.sites
    }

    /// What names the hold among others (the mail and the sites, not the time):
    /// "tenant acme|mx.site.test" or "campaign spring|.yahoodns.net,.yahoo.com".
    pub fn key(&self) -> String {
        let sites = match &self.sites {
            HoldSites::Site(name) => name.clone(),
            HoldSites::Suffixes(suffixes) => suffixes.join(","),
        };
        format!("{}|{sites}", self.who())
    }

    /// "tenant acme" or "campaign spring".
    pub fn who(&self) -> String {
        match &self.whose {
            Whose::Tenant(t) => format!("tenant {t}"),
            Whose::Campaign(c) => format!("campaign {c}"),
        }
    }
}

/// What one ready queue keeps of its response rules.
#[derive(Debug, Clone, Default)]
pub struct Adaptive {
    /// The rules that apply to the queue.
    rules: Vec<u16>,
    /// For each of `rules` with a threshold: the times of its latest matches, at most
    /// its count (older ones can no longer make it fire).
    hits: Vec<VecDeque<u64>>,
    /// Rules in force, and until when (unix ms).
    active: Vec<(u16, u64)>,
}

impl Adaptive {
    /// The state of a queue that `rules` (from [`Rules::for_queue`]) apply to.
    pub fn new(rules: Vec<u16>) -> Adaptive {
        let hits = vec![VecDeque::new(); rules.len()];
        Adaptive {
            rules,
            hits,
            active: Vec::new(),
        }
    }

    /// No rule applies to the queue: replies need not be looked at.
    pub fn is_idle(&self) -> bool {
        self.rules.is_empty()
    }

    /// A reply seen on the queue at `now_ms`: the rules it makes fire (in force from
    /// now for their duration).
    pub fn observe(&mut self, table: &Rules, code: u16, text: &str, now_ms: u64) -> Vec<Fired> {
        let mut fired = Vec::new();
        for (k, &index) in self.rules.iter().enumerate() {
            let Some(rule) = table.get(index) else {
                continue;
            };
            if !rule.matches(code, text) {
                continue;
            }
            let fires = match rule.trigger {
                Trigger::Immediate => true,
                Trigger::Threshold { count, within_ms } => {
                    let hits = &mut self.hits[k];
                    while hits
                        .front()
                        .is_some_and(|t| now_ms.saturating_sub(*t) >= within_ms)
                    {
                        hits.pop_front();
                    }
                    hits.push_back(now_ms);
                    if hits.len() >= count as usize {
                        hits.clear();
                        true
                    } else {
                        false
                    }
                }
            };
            if !fires {
                continue;
            }
            let until_ms = now_ms.saturating_add(rule.duration_ms);
            let new = match self.active.iter_mut().find(|(r, _)| *r == index) {
                Some((_, until)) => {
                    *until = (*until).max(until_ms);
                    false
                }
                None => {
                    self.active.push((index, until_ms));
                    true
                }
            };
            fired.push(Fired {
                rule: index,
                until_ms,
                new,
            });
        }
        fired
    }

    /// Puts `rule` in force until `until_ms` as if it had fired here (it fired on
    /// another node of the cluster): false when it does not apply to the queue or
    /// is in force until then already.
    pub fn impose(&mut self, rule: u16, until_ms: u64) -> bool {
        if !self.rules.contains(&rule) {
            return false;
        }
        match self.active.iter_mut().find(|(r, _)| *r == rule) {
            Some((_, until)) if *until >= until_ms => false,
            Some((_, until)) => {
                *until = until_ms;
                true
            }
            None => {
                self.active.push((rule, until_ms));
                true
            }
        }
    }

    /// Ends the rules whose time is up at `now_ms`; returns them.
    pub fn expire(&mut self, now_ms: u64) -> Vec<u16> {
        let mut ended = Vec::new();
        self.active.retain(|&(rule, until)| {
            let keep = until > now_ms;
            if !keep {
                ended.push(rule);
            }
            keep
        });
        ended
    }

    /// The rules in force, and until when.
    pub fn in_force(&self) -> &[(u16, u64)] {
        &self.active
    }

    /// When the first rule in force ends.
    pub fn next_expiry(&self) -> Option<u64> {
        self.active.iter().map(|(_, until)| *until).min()
    }

    /// Until when a rule with `action` is in force (the latest such), if one is.
    pub fn action_until(&self, table: &Rules, action: ActionName) -> Option<u64> {
        (self.active.iter())
            .filter(|(r, _)| table.get(*r).is_some_and(|rule| rule.has(action)))
            .map(|(_, until)| *until)
            .max()
    }

    /// A rule with `action` in force at `now_ms` (one that has not yet been expired
    /// but whose time is up does not count).
    pub fn rule_with(&self, table: &Rules, action: ActionName, now_ms: u64) -> Option<u16> {
        (self.active.iter())
            .filter(|(_, until)| *until > now_ms)
            .map(|(rule, _)| *rule)
            .find(|r| table.get(*r).is_some_and(|rule| rule.has(action)))
    }

    /// The shaping the rules in force set, in the order the rules are written (a
    /// later one wins a knob both set).
    pub fn knobs<'t>(&self, table: &'t Rules) -> Vec<&'t Knobs> {
        let mut rules: Vec<u16> = self.active.iter().map(|(r, _)| *r).collect();
        rules.sort_unstable();
        (rules.into_iter())
            .filter_map(|r| table.get(r).and_then(|rule| rule.set.as_ref()))
            .collect()
    }

    /// The same queue under a reloaded table: the rules that apply are looked up
    /// again (`rules`, from [`Rules::for_queue`] on `new`), and a rule in force stays
    /// in force, until the same time, if the reloaded file still has it unchanged
    /// (wherever it moved); a changed or removed rule ends. Counts toward thresholds
    /// start again.
    pub fn rebase(&self, old: &Rules, new: &Rules, rules: Vec<u16>) -> Adaptive {
        let mut next = Adaptive::new(rules);
        for &(rule, until) in &self.active {
            let Some(rule) = old.get(rule) else {
                continue;
            };
            if let Some(index) = new.same(rule, &next.rules) {
                next.active.push((index, until));
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(toml_text: &str) -> Rules {
        let config: crate::config::Config =
            crate::config::Config::parse(toml_text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        Rules::new(&config.delivery)
    }

    const RULES: &str = r#"
        [delivery]
        sources = { ip1 = {}, ip2 = {} }
        automation = [
            { codes = [554], enhanced = ["5.7"], actions = ["transient"], duration = "10m" },
        ]
        [delivery.providers.yahoo]
        mx_suffix = [".yahoodns.net"]
        [[delivery.providers.yahoo.automation]]
        regex = '\[TS?S04\]'
        actions = ["suspend"]
        duration = "2h"
        [[delivery.providers.yahoo.automation]]
        regex = "rate limited"
        trigger = "3/min"
        set = { connection_limit = 1 }
        duration = "30m"
        [delivery.providers.google]
        mx_suffix = [".google.com"]
        sources = ["ip2"]
        [[delivery.providers.google.automation]]
        enhanced = ["4.7.28"]
        set = { max_message_rate = "10/min" }
        actions = ["bounce"]
        duration = "1h"
    "#;

    /// suspend_tenant and suspend_campaign hold whose message got the reply: to
    /// the provider's sites, or for a rule of every site to that site only.
    #[test]
    fn holds_keep_back_one_tenant_or_campaign_from_a_provider() {
        let t = table(
            r#"
            [delivery]
            automation = [{ codes = [554], actions = ["suspend_campaign"], duration = "1h" }]
            [delivery.providers.google]
            mx_suffix = [".google.com"]
            [[delivery.providers.google.automation]]
            enhanced = ["4.7.28"]
            actions = ["suspend_tenant", "suspend_campaign"]
            duration = "1h"
        "#,
        );
        let google = t.get(1).unwrap();
        let holds = google.holds(Some("acme"), Some("spring"), "mx.site", 1000);
        assert_eq!(holds.len(), 2);
        let tenant = &holds[0];
        assert_eq!(tenant.who(), "tenant acme");
        let gmail = ["alt1.gmail-smtp-in.l.google.com."];
        assert!(tenant.holds(Some("acme"), None, "any", gmail.into_iter(), 999));
        assert!(
            !tenant.holds(Some("acme"), None, "any", gmail.into_iter(), 1000),
            "ended"
        );
        assert!(!tenant.holds(Some("zeta"), None, "any", gmail.into_iter(), 0));
        assert!(!tenant.holds(Some("acme"), None, "any", ["mx.other.test"].into_iter(), 0));
        assert_eq!(holds[1].who(), "campaign spring");
        // A message without a tenant puts no tenant hold.
        assert_eq!(google.holds(None, Some("spring"), "x", 1000).len(), 1);
        // A rule of every site holds that site only.
        let default = t.get(0).unwrap();
        let site = &default.holds(Some("acme"), Some("spring"), "127.0.0.1:25", 1000)[0];
        assert!(site.holds(None, Some("spring"), "127.0.0.1:25", [].into_iter(), 0));
        assert!(!site.holds(None, Some("spring"), "127.0.0.1:26", [].into_iter(), 0));
        assert!(site.same(&default.holds(None, Some("spring"), "127.0.0.1:25", 5000)[0]));
    }

    #[test]
    fn rules_apply_to_their_providers_and_sources() {
        let t = table(RULES);
        let yahoo = t.for_queue("ip1", ["mta5.am0.yahoodns.net."].into_iter());
        let names: Vec<&str> = yahoo
            .iter()
            .map(|r| t.get(*r).unwrap().name.as_str())
            .collect();
        assert_eq!(names, ["default#0", "yahoo#0", "yahoo#1"]);
        // Google's rule is for source ip2 only.
        assert_eq!(
            t.for_queue("ip1", ["aspmx.l.google.com"].into_iter()).len(),
            1
        );
        assert_eq!(
            t.for_queue("ip2", ["ASPMX.L.GOOGLE.COM"].into_iter()).len(),
            2
        );
        assert_eq!(t.for_queue("ip1", ["mx.example.test"].into_iter()).len(), 1);
    }

    /// A rule's own sources narrow its provider's: a rule for ip2 under a provider
    /// for ip1 applies to neither's other source.
    #[test]
    fn a_rule_s_sources_narrow_its_provider_s() {
        let t = table(
            r#"
            [delivery]
            sources = { ip1 = {}, ip2 = {} }
            [delivery.providers.p]
            mx_suffix = [".p.test"]
            sources = ["ip1"]
            [[delivery.providers.p.automation]]
            regex = "x"
            sources = ["ip2"]
            actions = ["suspend"]
            duration = "1h"
            [[delivery.providers.p.automation]]
            regex = "y"
            sources = ["ip1"]
            actions = ["suspend"]
            duration = "1h"
            "#,
        );
        let names = |source: &str| -> Vec<String> {
            (t.for_queue(source, ["mx.p.test"].into_iter()).iter())
                .map(|r| t.get(*r).unwrap().name.clone())
                .collect()
        };
        assert_eq!(names("ip1"), ["p#1"]);
        assert!(names("ip2").is_empty());
    }

    #[test]
    fn replies_match_on_text_codes_and_enhanced_codes() {
        let t = table(RULES);
        let rule = |name: &str| t.get(t.find(name).unwrap()).unwrap();
        assert!(rule("yahoo#0").matches(421, "421 4.7.0 [TSS04] Messages from 1.2.3.4 deferred"));
        assert!(rule("yahoo#0").matches(421, "421 [TS04] deferred"));
        assert!(!rule("yahoo#0").matches(421, "421 4.7.0 [TS03] deferred"));
        // Codes and enhanced prefixes of whole fields.
        assert!(rule("default#0").matches(554, "554 5.7.1 blocked"));
        assert!(!rule("default#0").matches(550, "550 5.7.1 blocked"));
        assert!(!rule("default#0").matches(554, "554 5.1.1 no such user"));
        assert!(!rule("default#0").matches(554, "554 blocked (no enhanced code)"));
        assert!(rule("google#0").matches(421, "421-4.7.28 Gmail has detected an unusual rate"));
        assert!(!rule("google#0").matches(421, "421 4.7.2 other"));
        assert!(!rule("google#0").matches(421, "421 4.7.280 other"));
    }

    #[test]
    fn enhanced_codes_are_read_from_the_reply() {
        assert_eq!(enhanced_code("421 4.7.28 slow down"), Some("4.7.28"));
        assert_eq!(enhanced_code("550-5.1.1 no"), Some("5.1.1"));
        assert_eq!(enhanced_code("250 2.0.0"), Some("2.0.0"));
        for none in [
            "",
            "42",
            "421",
            "421 slow down",
            "421 4.7 x",
            "421 4..1 x",
            "4é1 4.7.1 x",
        ] {
            assert_eq!(enhanced_code(none), None, "{none}");
        }
    }

    #[test]
    fn an_immediate_rule_fires_at_once_and_lasts_its_duration() {
        let t = table(RULES);
        let mut q = Adaptive::new(t.for_queue("ip1", ["mx.yahoodns.net"].into_iter()));
        assert!(q.observe(&t, 250, "250 2.0.0 OK", 1_000).is_empty());
        let fired = q.observe(&t, 421, "421 4.7.0 [TSS04] deferred", 1_000);
        let yahoo0 = t.find("yahoo#0").unwrap();
        assert_eq!(
            fired,
            [Fired {
                rule: yahoo0,
                until_ms: 1_000 + 7_200_000,
                new: true
            }]
        );
        assert_eq!(q.action_until(&t, ActionName::Suspend), Some(7_201_000));
        assert_eq!(q.action_until(&t, ActionName::Bounce), None);
        // Firing again while in force only moves its end.
        let again = q.observe(&t, 421, "421 [TSS04]", 61_000);
        assert_eq!((again[0].new, again[0].until_ms), (false, 7_261_000));
        assert_eq!(q.in_force().len(), 1);
        assert_eq!(q.next_expiry(), Some(7_261_000));
        assert!(q.expire(7_260_999).is_empty());
        assert_eq!(q.expire(7_261_000), [yahoo0]);
        assert_eq!(q.action_until(&t, ActionName::Suspend), None);
    }

    #[test]
    fn a_threshold_counts_matches_within_its_window() {
        let t = table(RULES);
        let mut q = Adaptive::new(t.for_queue("ip1", ["mx.yahoodns.net"].into_iter()));
        let limited = "451 4.7.1 rate limited";
        // Two within a minute, then a third only after the first left the window.
        assert!(q.observe(&t, 451, limited, 0).is_empty());
        assert!(q.observe(&t, 451, limited, 30_000).is_empty());
        assert!(q.observe(&t, 451, limited, 60_000).is_empty());
        let fired = q.observe(&t, 451, limited, 65_000);
        assert_eq!(
            fired.len(),
            1,
            "30 s, 60 s and 65 s are three within a minute"
        );
        assert_eq!(fired[0].until_ms, 65_000 + 1_800_000);
        let knobs = q.knobs(&t);
        assert_eq!(knobs.len(), 1);
        assert_eq!(knobs[0].connection_limit.map(|b| b.get()), Some(1));
        // The count starts again after firing.
        assert!(q.observe(&t, 451, limited, 66_000).is_empty());
    }

    #[test]
    fn a_reload_keeps_rules_in_force_by_name() {
        let old = table(RULES);
        let mut q = Adaptive::new(old.for_queue("ip1", ["mx.yahoodns.net"].into_iter()));
        q.observe(&old, 421, "421 [TSS04]", 0);
        q.observe(&old, 554, "554 5.7.1 blocked", 0);
        assert_eq!(q.in_force().len(), 2);
        // The reloaded file drops the default rule and puts a new yahoo rule first.
        let new = table(
            r#"
            [delivery.providers.yahoo]
            mx_suffix = [".yahoodns.net"]
            [[delivery.providers.yahoo.automation]]
            regex = "new"
            actions = ["bounce"]
            duration = "1h"
            [[delivery.providers.yahoo.automation]]
            regex = '\[TS?S04\]'
            actions = ["suspend"]
            duration = "2h"
            "#,
        );
        let rules = new.for_queue("ip1", ["mx.yahoodns.net"].into_iter());
        let q = q.rebase(&old, &new, rules);
        // The suspension (yahoo#0 before) goes on as yahoo#1, its new place; the
        // new yahoo#0 (a bounce) is not in force, and the dropped rule ended.
        assert_eq!(q.in_force(), [(new.find("yahoo#1").unwrap(), 7_200_000)]);
        assert_eq!(q.action_until(&new, ActionName::Bounce), None);
    }
}
