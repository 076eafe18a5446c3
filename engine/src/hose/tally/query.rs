//! SparkPost's Metrics API over the tallies: the summary, the groupings by a
//! dimension, the time series and the lists of values, with `from`/`to`/
//! `precision`/`timezone`, the `count_*` metrics, the simple filters and the
//! advanced `query_filters`.
//!
//! The metrics gannet counts itself are the counters of [`Counter`]; the others are
//! SparkPost's sums of them (`count_targeted` = injected + rejected, `count_sent` =
//! delivered + in-band bounces, `count_accepted` = delivered − out-of-band
//! bounces, `count_bounce` = in-band + out-of-band, `count_rejected` = policy
//! rejections + generation failures and rejections, and `count_admin_bounce`
//! includes the rejected, as SparkPost documents). gannet puts one open pixel in a
//! message and does not tell prefetches apart: the `initial` and `nonprefetched`
//! forms of the rendering counts are the plain ones.
//!
//! Time: `from` (required) and `to` (default now) are `YYYY-MM-DDTHH:MM` (seconds and
//! an offset allowed) in `timezone` (UTC, or a fixed offset such as `-05:00`; gannet
//! carries no time zone database); the window is widened to whole buckets of the
//! precision, and each precision allows SparkPost's longest window (1min and 5min
//! 24 hours, 15min 48 hours, hour and 12hr 31 days). Without `precision` the
//! finest one the window allows is used. day, week (from Monday) and month buckets
//! are UTC's. Each precision reads the resolution that holds it (minutes, hours,
//! days: `[events.metrics]`), which covers its retention only.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value, json};

use super::store::{COUNTERS, Counter, Counts, Dim, Key, Resolution, Store};

/// A request the API refuses: 400 with this message and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub message: &'static str,
    pub description: String,
}

fn invalid(description: impl Into<String>) -> Invalid {
    Invalid {
        message: "invalid params",
        description: description.into(),
    }
}

/// What is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// `/deliverability`: one object.
    Summary,
    /// `/deliverability/<dimension>`: one object per value.
    By(Dim),
    /// `/deliverability/time-series`: one object per bucket.
    TimeSeries,
    /// `/metrics/<dimension>s`: the values known.
    List(Dim),
}

/// The name of a dimension in a grouping's objects and in its path.
pub fn dimension_field(dim: Dim) -> &'static str {
    match dim {
        Dim::Tenant => "subaccount_id",
        Dim::Domain => "domain",
        Dim::Campaign => "campaign_id",
        Dim::Template => "template_id",
        Dim::SendingIp => "sending_ip",
        Dim::IpPool => "ip_pool",
        Dim::SendingDomain => "sending_domain",
    }
}

/// The path segment of `/deliverability/<segment>` for a grouping.
pub fn by_path(segment: &str) -> Option<Dim> {
    Some(match segment {
        "domain" => Dim::Domain,
        "campaign" => Dim::Campaign,
        "template" => Dim::Template,
        "sending-ip" => Dim::SendingIp,
        "ip-pool" => Dim::IpPool,
        "sending-domain" => Dim::SendingDomain,
        "subaccount" => Dim::Tenant,
        _ => return None,
    })
}

/// The list endpoints: `/metrics/<segment>` and the key of its results.
pub fn list_path(segment: &str) -> Option<Dim> {
    Some(match segment {
        "domains" => Dim::Domain,
        "campaigns" => Dim::Campaign,
        "templates" => Dim::Template,
        "sending-ips" => Dim::SendingIp,
        "ip-pools" => Dim::IpPool,
        "sending-domains" => Dim::SendingDomain,
        "subaccounts" => Dim::Tenant,
        _ => return None,
    })
}

fn list_name(dim: Dim) -> &'static str {
    match dim {
        Dim::Tenant => "subaccounts",
        Dim::Domain => "domains",
        Dim::Campaign => "campaigns",
        Dim::Template => "templates",
        Dim::SendingIp => "sending-ips",
        Dim::IpPool => "ip-pools",
        Dim::SendingDomain => "sending-domains",
    }
}

/// The filter parameter of each dimension (simple filters, and the keys of
/// `query_filters`).
fn filter_param(dim: Dim) -> &'static str {
    match dim {
        Dim::Tenant => "subaccounts",
        Dim::Domain => "domains",
        Dim::Campaign => "campaigns",
        Dim::Template => "templates",
        Dim::SendingIp => "sending_ips",
        Dim::IpPool => "ip_pools",
        Dim::SendingDomain => "sending_domains",
    }
}

/// Filters SparkPost has and gannet cannot apply (it does not classify mailbox
/// providers, and subject campaigns need the deliverability add-on).
const UNSUPPORTED_FILTERS: &[&str] = &[
    "mailbox_providers",
    "mailbox_provider_regions",
    "subject_campaigns",
];

fn n(counts: &Counts, c: Counter) -> u64 {
    counts[c as usize]
}

fn rejected(k: &Counts) -> u64 {
    n(k, Counter::PolicyRejection)
        + n(k, Counter::GenerationFailed)
        + n(k, Counter::GenerationRejection)
}

type MetricFn = fn(&Counts) -> u64;

/// Every metric the API answers, and how it is computed from the counters.
const METRICS: &[(&str, MetricFn)] = &[
    ("count_injected", |k| n(k, Counter::Injected)),
    ("count_bounce", |k| {
        n(k, Counter::InbandBounce) + n(k, Counter::OutofbandBounce)
    }),
    ("count_rejected", rejected),
    ("count_delivered", |k| n(k, Counter::Delivered)),
    ("count_delivered_first", |k| n(k, Counter::DeliveredFirst)),
    ("count_delivered_subsequent", |k| {
        n(k, Counter::DeliveredSubsequent)
    }),
    ("total_delivery_time_first", |k| n(k, Counter::TimeFirst)),
    ("total_delivery_time_subsequent", |k| {
        n(k, Counter::TimeSubsequent)
    }),
    ("total_msg_volume", |k| n(k, Counter::MsgVolume)),
    ("count_policy_rejection", |k| n(k, Counter::PolicyRejection)),
    ("count_generation_rejection", |k| {
        n(k, Counter::GenerationRejection)
    }),
    ("count_generation_failed", |k| {
        n(k, Counter::GenerationFailed)
    }),
    ("count_inband_bounce", |k| n(k, Counter::InbandBounce)),
    ("count_outofband_bounce", |k| n(k, Counter::OutofbandBounce)),
    ("count_soft_bounce", |k| n(k, Counter::SoftBounce)),
    ("count_hard_bounce", |k| n(k, Counter::HardBounce)),
    ("count_block_bounce", |k| n(k, Counter::BlockBounce)),
    ("count_admin_bounce", |k| {
        n(k, Counter::AdminBounce) + rejected(k)
    }),
    ("count_undetermined_bounce", |k| {
        n(k, Counter::UndeterminedBounce)
    }),
    ("count_delayed", |k| n(k, Counter::Delayed)),
    ("count_delayed_first", |k| n(k, Counter::DelayedFirst)),
    ("count_rendered", |k| n(k, Counter::Rendered)),
    ("count_nonprefetched_rendered", |k| n(k, Counter::Rendered)),
    ("count_initial_rendered", |k| n(k, Counter::Rendered)),
    ("count_nonprefetched_initial_rendered", |k| {
        n(k, Counter::Rendered)
    }),
    ("count_unique_rendered", |k| n(k, Counter::UniqueRendered)),
    ("count_nonprefetched_unique_rendered", |k| {
        n(k, Counter::UniqueRendered)
    }),
    ("count_unique_initial_rendered", |k| {
        n(k, Counter::UniqueRendered)
    }),
    ("count_nonprefetched_unique_initial_rendered", |k| {
        n(k, Counter::UniqueRendered)
    }),
    ("count_unique_confirmed_opened", |k| {
        n(k, Counter::UniqueConfirmedOpened)
    }),
    ("count_nonprefetched_unique_confirmed_opened", |k| {
        n(k, Counter::UniqueConfirmedOpened)
    }),
    ("count_clicked", |k| n(k, Counter::Clicked)),
    ("count_unique_clicked", |k| n(k, Counter::UniqueClicked)),
    ("count_targeted", |k| n(k, Counter::Injected) + rejected(k)),
    ("count_sent", |k| {
        n(k, Counter::Delivered) + n(k, Counter::InbandBounce)
    }),
    ("count_accepted", |k| {
        n(k, Counter::Delivered).saturating_sub(n(k, Counter::OutofbandBounce))
    }),
    ("count_spam_complaint", |k| n(k, Counter::SpamComplaint)),
    ("count_unsubscribe", |k| n(k, Counter::Unsubscribe)),
];

/// Points a time series answers at most.
const TIME_SERIES_POINTS_MAX: i64 = 100_000;

/// SparkPost's deliverability add-on metrics (seed lists and panels), which gannet
/// has no data for.
const ADD_ON_METRICS: &[&str] = &[
    "count_inbox_panel",
    "count_spam_panel",
    "count_inbox_seed",
    "count_spam_seed",
    "count_inbox_seed_private",
    "count_spam_seed_private",
    "count_inbox_seed_virtual",
    "count_spam_seed_virtual",
    "count_moved_to_inbox",
    "count_moved_to_spam",
];

/// Every metric name the API knows (for the error that names a wrong one).
pub fn metric_names() -> impl Iterator<Item = &'static str> {
    METRICS.iter().map(|m| m.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precision {
    Min1,
    Min5,
    Min15,
    Hour,
    Hr12,
    Day,
    Week,
    Month,
}

impl Precision {
    fn parse(text: &str) -> Option<Precision> {
        Some(match text {
            "1min" => Precision::Min1,
            "5min" => Precision::Min5,
            "15min" => Precision::Min15,
            "hour" => Precision::Hour,
            "12hr" => Precision::Hr12,
            "day" => Precision::Day,
            "week" => Precision::Week,
            "month" => Precision::Month,
            _ => return None,
        })
    }

    /// Fixed bucket width in minutes (a month's varies).
    fn width(self) -> u32 {
        match self {
            Precision::Min1 => 1,
            Precision::Min5 => 5,
            Precision::Min15 => 15,
            Precision::Hour => 60,
            Precision::Hr12 => 720,
            Precision::Day => 1440,
            Precision::Week => 7 * 1440,
            Precision::Month => 31 * 1440,
        }
    }

    /// SparkPost's longest window, in minutes.
    fn window_max(self) -> Option<u32> {
        match self {
            Precision::Min1 | Precision::Min5 => Some(1440),
            Precision::Min15 => Some(2 * 1440),
            Precision::Hour | Precision::Hr12 => Some(31 * 1440),
            Precision::Day | Precision::Week | Precision::Month => None,
        }
    }

    fn resolution(self) -> Resolution {
        match self {
            Precision::Min1 | Precision::Min5 | Precision::Min15 => Resolution::Minute,
            Precision::Hour | Precision::Hr12 => Resolution::Hour,
            Precision::Day | Precision::Week | Precision::Month => Resolution::Day,
        }
    }

    /// Whether buckets follow the request's time zone (day and longer are UTC's).
    fn local(self) -> bool {
        self.width() < 1440
    }

    /// The start of the bucket holding minute `m` (local minutes when `local`).
    fn floor(self, m: i64) -> i64 {
        match self {
            Precision::Week => {
                let days = m.div_euclid(1440);
                // 1970-01-01 was a Thursday: Monday is 3 days before.
                (days - (days + 3).rem_euclid(7)) * 1440
            }
            Precision::Month => {
                let (y, mo, _) = gannet_core::clock::civil_from_days(m.div_euclid(1440));
                gannet_core::clock::days_from_civil(y, mo, 1) * 1440
            }
            _ => m - m.rem_euclid(i64::from(self.width())),
        }
    }

    /// The start of the bucket after the one starting at `start`.
    fn next(self, start: i64) -> i64 {
        match self {
            Precision::Month => {
                let (y, mo, _) = gannet_core::clock::civil_from_days(start.div_euclid(1440));
                let (y, mo) = if mo == 12 { (y + 1, 1) } else { (y, mo + 1) };
                gannet_core::clock::days_from_civil(y, mo, 1) * 1440
            }
            _ => start + i64::from(self.width()),
        }
    }
}

/// A condition on one dimension (a simple filter, or one comparator of an
/// advanced one).
#[derive(Debug, Clone)]
enum Condition {
    Eq(Dim, Vec<String>),
    Like(Dim, Vec<String>),
    NotEq(Dim, Vec<String>),
    NotLike(Dim, Vec<String>),
}

impl Condition {
    fn holds(&self, key: &Key) -> bool {
        let value = |d: &Dim| &*key[*d as usize];
        let eq = |d: &Dim, values: &[String]| {
            let v = value(d);
            values.iter().any(|x| x == v)
        };
        let like = |d: &Dim, values: &[String]| {
            let v = value(d).to_lowercase();
            values.iter().any(|x| v.contains(&x.to_lowercase()))
        };
        match self {
            Condition::Eq(d, values) => eq(d, values),
            Condition::Like(d, values) => like(d, values),
            Condition::NotEq(d, values) => !eq(d, values),
            Condition::NotLike(d, values) => !like(d, values),
        }
    }
}

/// Groups of conditions, all of which must hold: each either all (AND) or any (OR)
/// of its conditions.
#[derive(Debug, Clone, Default)]
struct Filter {
    groups: Vec<(bool, Vec<Condition>)>,
    /// A tenant's key sees its own tenant only.
    tenant: Option<String>,
}

impl Filter {
    fn holds(&self, key: &Key) -> bool {
        if let Some(tenant) = &self.tenant
            && &*key[Dim::Tenant as usize] != tenant.as_str()
        {
            return false;
        }
        self.groups.iter().all(|(all, conditions)| {
            if *all {
                conditions.iter().all(|c| c.holds(key))
            } else {
                conditions.iter().any(|c| c.holds(key))
            }
        })
    }
}

/// The request's parameters, decoded.
#[derive(Debug)]
pub struct Params<'a> {
    pairs: &'a [(String, String)],
}

impl<'a> Params<'a> {
    pub fn new(pairs: &'a [(String, String)]) -> Params<'a> {
        Params { pairs }
    }

    fn get(&self, name: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The dimension of a filter key of `query_filters`.
fn filter_dim(name: &str) -> Option<Dim> {
    Dim::ALL.into_iter().find(|d| filter_param(*d) == name)
}

fn parse_filter(params: &Params<'_>, tenant: Option<&str>) -> Result<Filter, Invalid> {
    let mut filter = Filter {
        groups: Vec::new(),
        tenant: tenant.map(str::to_string),
    };
    if let Some(text) = params.get("query_filters") {
        filter.groups = parse_query_filters(text)?;
        return Ok(filter);
    }
    for name in UNSUPPORTED_FILTERS {
        if params.get(name).is_some() {
            return Err(invalid(format!(
                "{name}: gannet does not classify mailbox providers or subject campaigns"
            )));
        }
    }
    let delimiter = params.get("delimiter").unwrap_or(",");
    if delimiter.is_empty() {
        return Err(invalid("delimiter must not be empty"));
    }
    for dim in Dim::ALL {
        if let Some(list) = params.get(filter_param(dim)) {
            let mut values: Vec<String> = list
                .split(delimiter)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            if dim == Dim::Domain || dim == Dim::SendingDomain {
                values.iter_mut().for_each(|v| *v = v.to_ascii_lowercase());
            }
            if dim == Dim::Tenant {
                // The primary account is subaccount 0.
                values
                    .iter_mut()
                    .filter(|v| *v == "0")
                    .for_each(String::clear);
            }
            filter.groups.push((true, vec![Condition::Eq(dim, values)]));
        }
    }
    Ok(filter)
}

/// `query_filters`: `{"groupings": [{"AND"|"OR": {<filter key>: {"eq"|"like"|
/// "notEq"|"notLike": [values]}}}]}`.
fn parse_query_filters(text: &str) -> Result<Vec<(bool, Vec<Condition>)>, Invalid> {
    let bad = |why: String| Invalid {
        message: "invalid query_filters",
        description: why,
    };
    let root: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Some(root) = root.as_object() else {
        return Err(bad("must be an object with a groupings array".into()));
    };
    if let Some(other) = root.keys().find(|k| *k != "groupings") {
        return Err(bad(format!("unknown property {other}")));
    }
    let Some(groupings) = root.get("groupings").and_then(Value::as_array) else {
        return Err(bad("groupings must be an array".into()));
    };
    let mut groups = Vec::new();
    for (i, grouping) in groupings.iter().enumerate() {
        let Some(grouping) = grouping.as_object().filter(|g| g.len() == 1) else {
            return Err(bad(format!("groupings[{i}] must have one of AND or OR")));
        };
        let (operator, filters) = grouping.iter().next().expect("one entry");
        let all = match operator.as_str() {
            "AND" => true,
            "OR" => false,
            other => return Err(bad(format!("groupings[{i}]: unknown operator {other}"))),
        };
        let Some(filters) = filters.as_object() else {
            return Err(bad(format!("groupings[{i}].{operator} must be an object")));
        };
        let mut conditions = Vec::new();
        for (name, comparators) in filters {
            if UNSUPPORTED_FILTERS.contains(&name.as_str()) {
                return Err(bad(format!(
                    "{name}: gannet does not classify mailbox providers or subject campaigns"
                )));
            }
            let Some(dim) = filter_dim(name) else {
                return Err(bad(format!("groupings[{i}]: unknown filter key {name}")));
            };
            let Some(comparators) = comparators.as_object() else {
                return Err(bad(format!(
                    "groupings[{i}].{operator}.{name} must be an object"
                )));
            };
            for (comparator, values) in comparators {
                let values: Vec<String> = values
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                    .filter(|v: &Vec<String>| !v.is_empty())
                    .ok_or_else(|| {
                        bad(format!(
                            "groupings[{i}].{operator}.{name}.{comparator} must be a non-empty array of strings"
                        ))
                    })?;
                let short = values.iter().find(|v| v.chars().count() < 3);
                let condition = match comparator.as_str() {
                    "eq" => Condition::Eq(dim, values),
                    "notEq" => Condition::NotEq(dim, values),
                    "like" | "notLike" if short.is_some() => {
                        return Err(bad(format!(
                            "groupings[{i}].{operator}.{name}.{comparator}: values must be at least 3 characters long"
                        )));
                    }
                    "like" => Condition::Like(dim, values),
                    "notLike" => Condition::NotLike(dim, values),
                    other => {
                        return Err(bad(format!(
                            "groupings[{i}].{operator}.{name}: unknown comparator {other}"
                        )));
                    }
                };
                conditions.push(condition);
            }
        }
        groups.push((all, conditions));
    }
    Ok(groups)
}

/// `timezone`: minutes east of UTC.
fn parse_timezone(text: &str) -> Result<i64, Invalid> {
    match text {
        "UTC" | "Etc/UTC" | "GMT" | "Etc/GMT" | "Z" | "utc" => return Ok(0),
        _ => {}
    }
    let offset = text
        .strip_prefix("UTC")
        .or_else(|| text.strip_prefix("GMT"))
        .unwrap_or(text);
    parse_offset(offset).ok_or_else(|| {
        invalid(format!(
            "timezone `{text}`: gannet knows UTC and fixed offsets such as -05:00 or +0530 only"
        ))
    })
}

/// `+HH:MM`, `-HHMM`, `+HH`: minutes east of UTC.
fn parse_offset(text: &str) -> Option<i64> {
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !matches!(digits.len(), 2 | 4) {
        return None;
    }
    let hours: i64 = digits.get(..2)?.parse().ok()?;
    let minutes: i64 = digits
        .get(2..)
        .filter(|m| !m.is_empty())
        .map_or(Some(0), |m| m.parse().ok())?;
    (hours <= 14 && minutes < 60).then_some(sign * (hours * 60 + minutes))
}

/// `YYYY-MM-DDTHH:MM[:SS]`, in the request's time zone unless it carries its own
/// offset or `Z`: unix minutes (rounded down).
fn parse_time(name: &str, text: &str, offset_min: i64) -> Result<i64, Invalid> {
    let bad = || {
        invalid(format!(
            "{name} `{text}` is not a time in the format YYYY-MM-DDTHH:MM"
        ))
    };
    let (date, clock) = text.split_once(['T', ' ']).ok_or_else(bad)?;
    let has_zone = clock.ends_with(['Z', 'z']) || clock.contains(['+', '-']);
    let (with_zone, shift) = if has_zone {
        (text.to_string(), 0)
    } else {
        (format!("{date}T{clock}Z"), offset_min)
    };
    let ms = gannet_core::clock::parse_rfc3339_signed(&with_zone).ok_or_else(bad)?;
    Ok(ms.div_euclid(60_000) - shift)
}

/// `2026-12-07T10:15:00+01:00`: a bucket's start, in the request's time zone.
fn format_ts(minute: i64, offset_min: i64) -> String {
    let local = minute + offset_min;
    let (y, mo, d) = gannet_core::clock::civil_from_days(local.div_euclid(1440));
    let m = local.rem_euclid(1440);
    let sign = if offset_min < 0 { '-' } else { '+' };
    let off = offset_min.abs();
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:00{sign}{:02}:{:02}",
        m / 60,
        m % 60,
        off / 60,
        off % 60
    )
}

/// The time window: [from, to) in UTC minutes, whole buckets of the precision.
struct Window {
    from: i64,
    to: i64,
    precision: Precision,
    /// The request's offset, where the precision follows it.
    offset: i64,
}

fn parse_window(params: &Params<'_>, view: View, now_ms: u64) -> Result<Window, Invalid> {
    let offset = parse_timezone(params.get("timezone").unwrap_or("UTC"))?;
    let now = (now_ms / 60_000) as i64;
    let from = match params.get("from") {
        Some(text) => parse_time("from", text, offset)?,
        None if matches!(view, View::List(_)) => 0,
        None => return Err(invalid("from is required (YYYY-MM-DDTHH:MM)")),
    };
    let to = match params.get("to") {
        Some(text) => parse_time("to", text, offset)?,
        None => now + 1,
    };
    if to <= from {
        return Err(invalid("to must be later than from"));
    }
    let allowed: &[Precision] = match view {
        View::TimeSeries => &[
            Precision::Min1,
            Precision::Min5,
            Precision::Min15,
            Precision::Hour,
            Precision::Hr12,
            Precision::Day,
            Precision::Week,
            Precision::Month,
        ],
        View::List(_) => &[Precision::Day],
        _ => &[
            Precision::Min1,
            Precision::Min5,
            Precision::Min15,
            Precision::Hour,
            Precision::Day,
        ],
    };
    let precision = match params.get("precision") {
        Some(text) => Precision::parse(text)
            .filter(|p| allowed.contains(p))
            .ok_or_else(|| invalid(format!("precision `{text}` is not one this endpoint knows")))?,
        // The finest the window allows.
        None => *allowed
            .iter()
            .find(|p| p.window_max().is_none_or(|max| to - from <= i64::from(max)))
            .unwrap_or(&Precision::Day),
    };
    if offset % 60 != 0 && precision.resolution() != Resolution::Minute {
        return Err(invalid(
            "a timezone offset that is not whole hours works with 1min, 5min and 15min precision only",
        ));
    }
    let local = if precision.local() { offset } else { 0 };
    let from = precision.floor(from + local) - local;
    let to = {
        let last = precision.floor(to - 1 + local);
        precision.next(last) - local
    };
    if let Some(max) = precision.window_max()
        && to - from > i64::from(max)
    {
        return Err(invalid(format!(
            "precision {} allows a window of {} hours at most",
            params.get("precision").unwrap_or("(default)"),
            max / 60
        )));
    }
    Ok(Window {
        from,
        to,
        precision,
        offset: local,
    })
}

fn parse_metrics(params: &Params<'_>) -> Result<Vec<(&'static str, MetricFn)>, Invalid> {
    let Some(list) = params.get("metrics") else {
        return Err(invalid("metrics is required: a list of count_* metrics"));
    };
    let delimiter = params
        .get("delimiter")
        .filter(|d| !d.is_empty())
        .unwrap_or(",");
    let mut metrics = Vec::new();
    for name in list
        .split(delimiter)
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        if ADD_ON_METRICS.contains(&name) {
            return Err(invalid(format!(
                "{name} needs SparkPost's deliverability add-on (seed and panel data), which gannet does not have"
            )));
        }
        match METRICS.iter().find(|m| m.0 == name) {
            Some(m) if !metrics.iter().any(|(n, _)| *n == m.0) => metrics.push(*m),
            Some(_) => {}
            None => return Err(invalid(format!("unknown metric `{name}`"))),
        }
    }
    if metrics.is_empty() {
        return Err(invalid("metrics is empty"));
    }
    Ok(metrics)
}

fn parse_limit(params: &Params<'_>, default: usize) -> Result<usize, Invalid> {
    match params.get("limit") {
        None => Ok(default),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=10_000).contains(l))
            .ok_or_else(|| invalid(format!("limit `{text}` must be between 1 and 10000"))),
    }
}

/// Sums the rows of `store` in the window that pass the filter, by `group` (a
/// bucket, a dimension value, or everything in one).
fn sum<G: Ord>(
    store: &Store,
    window: &Window,
    filter: &Filter,
    mut group: impl FnMut(i64, &Key) -> G,
) -> BTreeMap<G, Counts> {
    let mut out: BTreeMap<G, Counts> = BTreeMap::new();
    let mut passes: HashMap<u32, bool> = HashMap::new();
    let from = u32::try_from(window.from.max(0)).unwrap_or(u32::MAX);
    let to = u32::try_from(window.to.max(0)).unwrap_or(u32::MAX);
    for (start, rows) in store.buckets(window.precision.resolution()).range(from..to) {
        for (key_id, counts) in rows {
            let Some(key) = store.key(*key_id) else {
                continue;
            };
            if !*passes.entry(*key_id).or_insert_with(|| filter.holds(key)) {
                continue;
            }
            let total = out
                .entry(group(i64::from(*start), key))
                .or_insert([0; COUNTERS]);
            for (t, n) in total.iter_mut().zip(counts) {
                *t = t.saturating_add(*n);
            }
        }
    }
    out
}

fn metrics_object(metrics: &[(&'static str, MetricFn)], counts: &Counts) -> Map<String, Value> {
    metrics
        .iter()
        .map(|(name, f)| (name.to_string(), json!(f(counts))))
        .collect()
}

/// A dimension's value as the API shows it (the primary account is subaccount 0).
fn dimension_value(dim: Dim, value: &str) -> Value {
    if dim == Dim::Tenant && value.is_empty() {
        json!(0)
    } else {
        json!(value)
    }
}

/// Answers a Metrics API request: the `results` (and `links`) to send, or why not.
pub fn run(
    store: &Store,
    view: View,
    params: &Params<'_>,
    tenant: Option<&str>,
    now_ms: u64,
) -> Result<Value, Invalid> {
    let window = parse_window(params, view, now_ms)?;
    if view == View::TimeSeries {
        // Bounded answers: a day precision over centuries is a refusal, not a
        // response of millions of objects.
        let buckets = (window.to - window.from) / i64::from(window.precision.width().min(1440));
        if buckets > TIME_SERIES_POINTS_MAX {
            return Err(invalid(format!(
                "the window holds more than {TIME_SERIES_POINTS_MAX} points at this precision; narrow it or use a coarser precision"
            )));
        }
    }
    let filter = parse_filter(params, tenant)?;
    if let View::List(dim) = view {
        return list(store, dim, &window, &filter, params);
    }
    let metrics = parse_metrics(params)?;
    match view {
        View::Summary => {
            let totals = sum(store, &window, &filter, |_, _| ());
            let counts = totals.into_values().next().unwrap_or([0; COUNTERS]);
            Ok(json!({
                "results": [Value::Object(metrics_object(&metrics, &counts))],
                "links": [{"href": "/api/v1/metrics/deliverability", "rel": "deliverability", "method": "GET"}],
            }))
        }
        View::By(dim) => {
            let limit = parse_limit(params, 1000)?;
            let order_by = match params.get("order_by") {
                None => metrics[0].1,
                Some(name) => METRICS
                    .iter()
                    .find(|m| m.0 == name)
                    .map(|m| m.1)
                    .ok_or_else(|| invalid(format!("order_by `{name}` is not a metric")))?,
            };
            let groups = sum(store, &window, &filter, |_, key| key[dim as usize].clone());
            let mut rows: Vec<(&std::sync::Arc<str>, &Counts)> = groups.iter().collect();
            // The largest first; ties by value.
            rows.sort_by(|a, b| order_by(b.1).cmp(&order_by(a.1)).then(a.0.cmp(b.0)));
            let results: Vec<Value> = rows
                .into_iter()
                .take(limit)
                .map(|(value, counts)| {
                    let mut object = Map::new();
                    object.insert(
                        dimension_field(dim).to_string(),
                        dimension_value(dim, value),
                    );
                    object.extend(metrics_object(&metrics, counts));
                    Value::Object(object)
                })
                .collect();
            Ok(json!({ "results": results }))
        }
        View::TimeSeries => {
            let precision = window.precision;
            let offset = window.offset;
            let buckets = sum(store, &window, &filter, |start, _| {
                precision.floor(start + offset) - offset
            });
            let mut results = Vec::new();
            let mut start = window.from;
            while start < window.to {
                let counts = buckets.get(&start).copied().unwrap_or([0; COUNTERS]);
                let mut object = metrics_object(&metrics, &counts);
                object.insert("ts".into(), json!(format_ts(start, window.offset)));
                results.push(Value::Object(object));
                start = precision.next(start + offset) - offset;
            }
            Ok(json!({ "results": results }))
        }
        View::List(dim) => list(store, dim, &window, &filter, params),
    }
}

/// `/metrics/<dimension>s`: the values with tallies in the window (`match`: those
/// containing it), sorted.
fn list(
    store: &Store,
    dim: Dim,
    window: &Window,
    filter: &Filter,
    params: &Params<'_>,
) -> Result<Value, Invalid> {
    let limit = parse_limit(params, 10_000)?;
    let needle = params.get("match").map(str::to_lowercase);
    let values = sum(store, window, filter, |_, key| key[dim as usize].clone());
    let shown: Vec<Value> = values
        .keys()
        .filter(|v| dim == Dim::Tenant || !v.is_empty())
        .filter(|v| {
            needle
                .as_deref()
                .is_none_or(|n| v.to_lowercase().contains(n))
        })
        .take(limit)
        .map(|v| dimension_value(dim, v))
        .collect();
    Ok(json!({ "results": { list_name(dim): shown } }))
}

/// `GET /api/v1/metrics/`: the child endpoints.
pub fn discovery() -> Value {
    let links: Vec<Value> = [
        ("", "/api/v1/metrics/"),
        ("campaigns", "/api/v1/metrics/campaigns"),
        ("deliverability", "/api/v1/metrics/deliverability"),
        ("domains", "/api/v1/metrics/domains"),
        ("ip-pools", "/api/v1/metrics/ip-pools"),
        ("sending-domains", "/api/v1/metrics/sending-domains"),
        ("sending-ips", "/api/v1/metrics/sending-ips"),
        ("subaccounts", "/api/v1/metrics/subaccounts"),
        ("templates", "/api/v1/metrics/templates"),
    ]
    .iter()
    .map(|(rel, href)| json!({"href": href, "rel": rel, "method": "GET"}))
    .collect();
    json!({ "results": {}, "links": links })
}

#[cfg(test)]
mod tests;
