//! Response rules in the configuration (adaptive delivery): what a destination's reply
//! says, and what delivery does about it for a while. A rule sits under
//! `[[delivery.automation]]` (every site) or `[[delivery.providers.<name>.automation]]`
//! (the provider's sites), in KumoMTA's terms (`regex`, `trigger`, `duration`, its
//! `Suspend` and `Bounce` actions, and `set` for its `SetConfig`; `transient` makes a
//! permanent reply temporary):
//!
//! ```toml
//! [[delivery.providers.yahoo.automation]]
//! # Yahoo defers a source it distrusts with [TS04]/[TSS04]: stop for two hours.
//! regex = '\[TS?S04\]'
//! actions = ["suspend"]
//! duration = "2h"
//! ```
//!
//! Every value is checked when the file is read (regular expressions compile, a
//! rule matches something and does something), so a mistake is a config error with
//! its line, not a rule that silently never fires. Reloaded with the shaping on SIGHUP.

use serde::Deserialize;

use super::Bounded;
use super::shaping::{Knobs, Rate};

/// A response rule, checked.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "AutomationText")]
pub struct Automation {
    /// Regular expressions; the rule matches a reply when any of them is found in its
    /// whole text (`421 4.7.28 Our system has detected…`, every line joined by a
    /// space). None: the codes decide alone.
    pub regex: Vec<String>,
    /// Reply codes the rule is limited to (empty: any code).
    pub codes: Vec<u16>,
    /// Enhanced status codes (RFC 3463) the rule is limited to: `"4.7.28"`, or a
    /// prefix of whole fields such as `"5.7"` (empty: any).
    pub enhanced: Vec<String>,
    /// Only for these egress sources (empty: every source).
    pub sources: Vec<String>,
    pub trigger: Trigger,
    /// How long the rule stays in force once it fires (a match while it is in force
    /// starts the time again).
    pub duration_secs: u64,
    pub actions: Vec<ActionName>,
    /// Shaping knobs in force while the rule is (KumoMTA's `SetConfig`): lower
    /// connection_limit, max_message_rate, max_deliveries_per_connection, …
    pub set: Option<Knobs>,
}

/// When a rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trigger {
    /// At the first matching reply.
    #[default]
    Immediate,
    /// At the `count`th matching reply within `within_ms` (`"3/h"`: three in an hour).
    Threshold { count: u32, within_ms: u64 },
}

/// What a rule does while in force, besides `set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionName {
    /// Suspend the ready queue (egress source → site): no connections; what waits in
    /// it, and what arrives, is delayed until the rule ends.
    Suspend,
    /// Bounce what waits in the ready queue, and what arrives while the rule is in
    /// force, with the reply that fired it.
    Bounce,
    /// Treat a permanent (5xx) reply as temporary (4xx): retry instead of bouncing.
    Transient,
    /// Hold the mail of the tenant whose message got the reply, to this provider
    /// (its sites; for a rule of every site, this site), from every source: it waits
    /// in the scheduled queue until the rule's time is up. Other tenants go on.
    SuspendTenant,
    /// The same for the message's campaign.
    SuspendCampaign,
}

impl ActionName {
    pub fn name(self) -> &'static str {
        match self {
            ActionName::Suspend => "suspend",
            ActionName::Bounce => "bounce",
            ActionName::Transient => "transient",
            ActionName::SuspendTenant => "suspend_tenant",
            ActionName::SuspendCampaign => "suspend_campaign",
        }
    }
}

/// A rule as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AutomationText {
    #[serde(default)]
    regex: OneOrMany,
    #[serde(default)]
    codes: Vec<Bounded<200, 599>>,
    #[serde(default)]
    enhanced: Vec<String>,
    #[serde(default)]
    sources: Vec<String>,
    #[serde(default)]
    trigger: Option<String>,
    duration: Option<DurationValue>,
    #[serde(default)]
    actions: Vec<ActionName>,
    #[serde(default)]
    set: Option<Knobs>,
}

/// A string or a list of strings.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

/// `"90m"`, `"2h"`, `"30d"`, `"1h30m"`, or seconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DurationValue {
    Seconds(u64),
    Text(String),
}

/// The longest a rule may stay in force: a year.
const DURATION_MAX_SECS: u64 = 365 * 86_400;

impl TryFrom<AutomationText> for Automation {
    type Error = String;

    fn try_from(t: AutomationText) -> Result<Automation, String> {
        let regex = match t.regex {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(r) => vec![r],
            OneOrMany::Many(rs) => rs,
        };
        // One by one to name the pattern at fault, then as the set the rule matches
        // with (which has size limits of its own).
        for r in &regex {
            if let Err(err) = regex::Regex::new(r) {
                // The parser's message ends with the reason on a line of its own,
                // below a picture of the pattern; the reason alone fits a config error.
                let text = err.to_string();
                let reason = text.lines().last().unwrap_or_default();
                let reason = reason.strip_prefix("error: ").unwrap_or(reason);
                return Err(format!("regex `{r}` does not compile ({reason})"));
            }
        }
        if let Err(err) = regex::RegexSet::new(&regex) {
            return Err(format!("the regexes together do not compile ({err})"));
        }
        for e in &t.enhanced {
            if !is_enhanced_prefix(e) {
                return Err(format!(
                    "enhanced `{e}` is not an enhanced status code such as \"4.7.28\" or a prefix such as \"5.7\""
                ));
            }
        }
        if regex.is_empty() && t.codes.is_empty() && t.enhanced.is_empty() {
            return Err(
                "a rule needs `regex`, `codes` or `enhanced`: it would match every reply".into(),
            );
        }
        if t.actions.is_empty() && t.set.is_none() {
            return Err("a rule needs `actions` or `set`: it would do nothing".into());
        }
        let duration_secs = match t.duration {
            None => return Err("a rule needs `duration` (such as \"90m\" or \"2h\")".into()),
            Some(DurationValue::Seconds(s)) => Some(s).filter(|s| *s > 0),
            Some(DurationValue::Text(text)) => parse_duration(&text),
        }
        .filter(|s| *s <= DURATION_MAX_SECS)
        .ok_or_else(|| {
            "`duration` must be like \"90s\", \"90m\", \"2h\", \"30d\" or \"1h30m\", at most a year"
                .to_string()
        })?;
        let trigger = match t.trigger.as_deref().map(str::trim) {
            None => Trigger::Immediate,
            Some(text) if text.eq_ignore_ascii_case("immediate") => Trigger::Immediate,
            Some(text) => match text.parse::<Rate>() {
                Ok(Rate::Per { count, per_ms }) if (2..=10_000).contains(&count) => {
                    Trigger::Threshold {
                        count: count as u32,
                        within_ms: per_ms,
                    }
                }
                _ => {
                    return Err(format!(
                        "trigger `{text}` is neither \"immediate\" nor a count within a time such as \"3/h\" or \"10/min\" (2 to 10000)"
                    ));
                }
            },
        };
        Ok(Automation {
            regex,
            codes: t.codes.iter().map(|c| c.get() as u16).collect(),
            enhanced: t.enhanced,
            sources: t.sources,
            trigger,
            duration_secs,
            actions: t.actions,
            set: t.set,
        })
    }
}

/// `4.7.28`, `5.7`, `4`: one to three dot-separated fields of digits, the first 2, 4
/// or 5.
fn is_enhanced_prefix(text: &str) -> bool {
    let fields: Vec<&str> = text.split('.').collect();
    fields.len() <= 3
        && fields
            .iter()
            .all(|f| !f.is_empty() && f.len() <= 3 && f.bytes().all(|b| b.is_ascii_digit()))
        && matches!(fields[0], "2" | "4" | "5")
}

/// `"90s"`, `"5m"`, `"2h"`, `"1d"`, `"1h30m"` (units s, m, h, d), or plain seconds;
/// None for anything else and for zero.
pub fn parse_duration(text: &str) -> Option<u64> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(secs).filter(|s| *s > 0);
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        };
        let n: u64 = number.parse().ok()?;
        number.clear();
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    number.is_empty().then_some(total).filter(|t| *t > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(toml_text: &str) -> Result<Automation, String> {
        toml::from_str::<Automation>(toml_text).map_err(|e| e.message().to_string())
    }

    #[test]
    fn durations_parse_in_units_and_bad_ones_do_not() {
        assert_eq!(parse_duration("90"), Some(90));
        assert_eq!(parse_duration("90s"), Some(90));
        assert_eq!(parse_duration("5m"), Some(300));
        assert_eq!(parse_duration("1h30m"), Some(5400));
        assert_eq!(parse_duration("2d"), Some(172_800));
        for bad in ["", "0", "0m", "m", "5x", "5m3", "1.5h", "-5m"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_rule_reads_every_form() {
        let r = rule(
            r#"
            regex = ['\[TS?S04\]', "rate limited"]
            codes = [421, 451]
            enhanced = ["4.7.28", "4.7"]
            sources = ["ip1"]
            trigger = "3/h"
            duration = "1h30m"
            actions = ["suspend", "transient"]
            set = { connection_limit = 1, max_message_rate = "10/min" }
            "#,
        )
        .unwrap();
        assert_eq!(r.regex.len(), 2);
        assert_eq!(r.codes, vec![421, 451]);
        assert_eq!(
            r.trigger,
            Trigger::Threshold {
                count: 3,
                within_ms: 3_600_000
            }
        );
        assert_eq!(r.duration_secs, 5400);
        assert_eq!(r.actions, vec![ActionName::Suspend, ActionName::Transient]);
        let set = r.set.unwrap();
        assert_eq!(set.connection_limit, Some(Bounded(1)));
        // One regex as a string, seconds as a number, the default trigger.
        let r = rule("regex = 'TSS04'\nduration = 60\nactions = ['bounce']").unwrap();
        assert_eq!((r.regex.len(), r.duration_secs), (1, 60));
        assert_eq!(r.trigger, Trigger::Immediate);
        let r =
            rule("codes = [554]\nduration = '1d'\ntrigger = 'Immediate'\nactions = ['transient']")
                .unwrap();
        assert_eq!(r.regex, Vec::<String>::new());
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (text, says) in [
            (
                "regex = '(unclosed'\nduration = '1h'\nactions = ['suspend']",
                "does not compile",
            ),
            (
                "duration = '1h'\nactions = ['suspend']",
                "needs `regex`, `codes` or `enhanced`",
            ),
            ("regex = 'x'\nduration = '1h'", "needs `actions` or `set`"),
            ("regex = 'x'\nactions = ['suspend']", "needs `duration`"),
            (
                "regex = 'x'\nduration = '1 fortnight'\nactions = ['suspend']",
                "`duration`",
            ),
            (
                "regex = 'x'\nduration = '400d'\nactions = ['suspend']",
                "at most a year",
            ),
            (
                "regex = 'x'\nduration = 0\nactions = ['suspend']",
                "`duration`",
            ),
            (
                "regex = 'x'\nduration = '1h'\ntrigger = '1/h'\nactions = ['suspend']",
                "trigger `1/h`",
            ),
            (
                "regex = 'x'\nduration = '1h'\ntrigger = 'often'\nactions = ['suspend']",
                "trigger `often`",
            ),
            (
                "enhanced = ['4.x.1']\nduration = '1h'\nactions = ['suspend']",
                "enhanced `4.x.1`",
            ),
            (
                "enhanced = ['3.1.1']\nduration = '1h'\nactions = ['suspend']",
                "enhanced `3.1.1`",
            ),
            (
                "codes = [600]\nduration = '1h'\nactions = ['suspend']",
                "out of range",
            ),
            (
                "regex = 'x'\nduration = '1h'\nactions = ['pause']",
                "unknown variant `pause`",
            ),
            (
                "regex = 'x'\nduration = '1h'\nactions = ['suspend']\ncolour = 1",
                "unknown field `colour`",
            ),
            (
                "regex = 'x'\nduration = '1h'\nset = { speed = 1 }",
                "unknown field `speed`",
            ),
        ] {
            let err = rule(text).unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }
}
