//! `gannetctl top`: a live terminal view of a running gannetd, refreshed every
//! interval — messages received, delivered, deferred and bounced per second (from
//! the counters of `/metrics`), the busiest sites and ready queues with their
//! connections and effective limits (`/api/admin/queues/v1`), what is suspended (by
//! the operator or a response rule), the spool's use and each core's load. Plain
//! text over ratatui's crossterm backend, so it works over ssh; q or Esc quits.
//!
//! [`Top::update`] turns what the endpoints answered into a [`View`] (rates are the
//! change of each counter since the previous sample); [`draw`] puts a view on a
//! frame. Both are tested without a terminal.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Gauge, Paragraph, Row, Sparkline, Table};
use serde_json::Value;

use super::table::{ago_or_in, limit_pair};
use super::{Client, now_ms, ready_row};

/// Each metric's value per shard, from Prometheus text (`gannet_<name>{shard="N"}`).
pub type Metrics = HashMap<String, BTreeMap<u16, f64>>;

/// Reads the per-shard samples of gannetd's `/metrics` (histogram buckets and
/// lines without a shard label are left out).
pub fn parse_metrics(text: &str) -> Metrics {
    let mut out: Metrics = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let Some(name) = name.strip_prefix("gannet_") else {
            continue;
        };
        if labels.contains("le=") {
            continue;
        }
        let shard = labels
            .strip_prefix("shard=\"")
            .and_then(|rest| rest.split('"').next())
            .and_then(|s| s.parse::<u16>().ok());
        if let (Some(shard), Ok(value)) = (shard, value.parse::<f64>()) {
            out.entry(name.to_string())
                .or_default()
                .insert(shard, value);
        }
    }
    out
}

/// A metric's sum over the shards.
pub fn total(m: &Metrics, name: &str) -> f64 {
    m.get(name).map_or(0.0, |by_shard| by_shard.values().sum())
}

/// The rates shown, each the sum of these counters.
const RATES: &[(&str, &[&str])] = &[
    (
        "received",
        &[
            "smtp_messages_accepted_total",
            "http_messages_generated_total",
        ],
    ),
    ("delivered", &["delivery_delivered_total"]),
    ("deferred", &["delivery_transient_failures_total"]),
    (
        "bounced",
        &[
            "delivery_bounced_total",
            "delivery_admin_bounced_total",
            "delivery_expired_total",
        ],
    ),
];

/// Deliveries per second kept for the sparkline.
const HISTORY: usize = 120;

/// What the screen shows.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub endpoint: String,
    /// Rates per second, by [`RATES`] label (None before the second sample).
    pub rates: Vec<(&'static str, Option<f64>)>,
    pub delivered_history: Vec<u64>,
    /// Each shard's load (share of the interval its executor ran tasks).
    pub load: Vec<(u16, f64)>,
    pub spool: SpoolUse,
    pub sites: Vec<Vec<String>>,
    pub ready: Vec<Vec<String>>,
    pub suspended: Vec<String>,
    pub totals: String,
    pub error: Option<String>,
    pub updated: String,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SpoolUse {
    pub messages: f64,
    pub live_bytes: f64,
    pub disk_bytes: f64,
    pub segments: f64,
}

/// The state between refreshes: the previous sample of the counters.
#[derive(Debug, Default)]
pub struct Top {
    last: Option<(Instant, Metrics)>,
    history: VecDeque<u64>,
}

impl Top {
    /// A view of what the endpoints answered at `at`: `/metrics`, the queue listing,
    /// the scheduled-queue suspensions and the bounces.
    pub fn update(
        &mut self,
        at: Instant,
        metrics: Metrics,
        listing: &Value,
        suspensions: &Value,
        bounces: &Value,
    ) -> View {
        let now = now_ms();
        let mut view = View::default();
        let elapsed = self
            .last
            .as_ref()
            .map(|(then, _)| at.duration_since(*then).as_secs_f64())
            .filter(|s| *s > 0.0);
        for (label, names) in RATES {
            let rate = elapsed.and_then(|secs| {
                let (_, before) = self.last.as_ref()?;
                let sum = |m: &Metrics| names.iter().map(|n| total(m, n)).sum::<f64>();
                Some(((sum(&metrics) - sum(before)) / secs).max(0.0))
            });
            view.rates.push((label, rate));
        }
        if let Some(delivered) = view.rates[1].1 {
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(delivered.round() as u64);
        }
        view.delivered_history = self.history.iter().copied().collect();
        if let (Some(secs), Some((_, before))) = (elapsed, &self.last) {
            let busy = metrics
                .get("shard_busy_us_total")
                .cloned()
                .unwrap_or_default();
            for (shard, us) in busy {
                let was = before
                    .get("shard_busy_us_total")
                    .and_then(|b| b.get(&shard))
                    .copied()
                    .unwrap_or(us);
                view.load
                    .push((shard, ((us - was) / 1e6 / secs).clamp(0.0, 1.0)));
            }
        }
        view.spool = SpoolUse {
            messages: total(&metrics, "spool_live_messages"),
            live_bytes: total(&metrics, "spool_live_bytes"),
            disk_bytes: total(&metrics, "spool_disk_bytes"),
            segments: total(&metrics, "spool_segments"),
        };
        view.sites = sites(listing);
        view.ready = (listing["ready"].as_array().into_iter().flatten())
            .map(|q| ready_row(q, now))
            .collect();
        view.suspended = suspended(listing, suspensions, bounces, now);
        let count = |k: &str| listing[k].as_u64().unwrap_or(0);
        let waiting: u64 = (listing["scheduled"].as_array().into_iter().flatten())
            .map(|s| s["waiting"].as_u64().unwrap_or(0) + s["held"].as_u64().unwrap_or(0))
            .sum();
        view.totals = format!(
            "scheduled {waiting}   due {}   handed {}",
            count("due"),
            count("handed")
        );
        self.last = Some((at, metrics));
        view
    }
}

/// Ready queues added up by site (over their egress sources), the largest first.
fn sites(listing: &Value) -> Vec<Vec<String>> {
    let mut by_site: BTreeMap<String, (u64, u64, u64, String)> = BTreeMap::new();
    for q in listing["ready"].as_array().into_iter().flatten() {
        let e = by_site
            .entry(q["site"].as_str().unwrap_or_default().to_string())
            .or_default();
        e.0 += q["parts"].as_u64().unwrap_or(0) + q["remote"].as_u64().unwrap_or(0);
        e.1 += q["connections"].as_u64().unwrap_or(0);
        e.2 += 1;
        e.3 = limit_pair(
            &q["effective"]["connection_limit"],
            &q["configured"]["connection_limit"],
        );
    }
    let mut rows: Vec<(String, (u64, u64, u64, String))> = by_site.into_iter().collect();
    rows.sort_by_key(|(_, (parts, conns, _, _))| std::cmp::Reverse((*parts, *conns)));
    (rows.into_iter())
        .map(|(site, (parts, conns, queues, limit))| {
            vec![
                site,
                queues.to_string(),
                parts.to_string(),
                conns.to_string(),
                limit,
            ]
        })
        .collect()
}

/// One line per thing suspended: ready queues (by the operator or a rule),
/// scheduled-queue suspensions, bounces in force.
fn suspended(listing: &Value, suspensions: &Value, bounces: &Value, now: u64) -> Vec<String> {
    let mut out = Vec::new();
    for q in listing["ready"].as_array().into_iter().flatten() {
        if let (Some(by), Some(until)) =
            (q["suspended_by"].as_str(), q["suspended_until_ms"].as_u64())
        {
            out.push(format!(
                "ready {}: {by}, until {}",
                q["name"].as_str().unwrap_or_default(),
                ago_or_in(until, now)
            ));
        }
    }
    for h in listing["holds"].as_array().into_iter().flatten() {
        out.push(format!("held {}", super::hold_text(h, now)));
    }
    for s in suspensions.as_array().into_iter().flatten() {
        out.push(format!(
            "scheduled {}: {} ({} left)",
            super::criteria(s),
            s["reason"].as_str().unwrap_or_default(),
            s["duration"].as_str().unwrap_or_default()
        ));
    }
    for b in bounces.as_array().into_iter().flatten() {
        out.push(format!(
            "bounce {}: {} ({} bounced, {} left)",
            super::criteria(b),
            b["reason"].as_str().unwrap_or_default(),
            b["total_bounced"],
            b["duration"].as_str().unwrap_or_default()
        ));
    }
    out
}

fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Draws `view` on `frame`.
pub fn draw(frame: &mut Frame<'_>, view: &View) {
    let load_rows = view.load.len().max(1) as u16;
    let [
        header,
        rates,
        middle,
        sites_area,
        ready_area,
        suspended_area,
    ] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(4),
        Constraint::Length(load_rows + 2),
        Constraint::Percentage(30),
        Constraint::Min(4),
        Constraint::Length(view.suspended.len().clamp(1, 6) as u16 + 2),
    ])
    .areas(frame.area());

    let status = match &view.error {
        Some(err) => format!("gannetctl top  {}  ERROR: {err}", view.endpoint),
        None => format!(
            "gannetctl top  {}  {}  (q quits)",
            view.endpoint, view.updated
        ),
    };
    frame.render_widget(
        Paragraph::new(status).style(Style::new().add_modifier(Modifier::REVERSED)),
        header,
    );

    let [rate_text_area, spark_area] =
        Layout::horizontal([Constraint::Length(60), Constraint::Min(10)]).areas(rates);
    let rate_line: Vec<String> = (view.rates.iter())
        .map(|(label, rate)| match rate {
            Some(r) => format!("{label}/s {r:.1}"),
            None => format!("{label}/s -"),
        })
        .collect();
    let rate_lines = vec![
        Line::from(rate_line[..2.min(rate_line.len())].join("   ")),
        Line::from(rate_line.get(2..).map_or(String::new(), |r| r.join("   "))),
    ];
    frame.render_widget(
        Paragraph::new(rate_lines).block(Block::new().borders(Borders::ALL).title("rates")),
        rate_text_area,
    );
    frame.render_widget(
        Sparkline::default()
            .block(Block::new().borders(Borders::ALL).title("delivered/s"))
            .data(&view.delivered_history),
        spark_area,
    );

    let [load_area, spool_area] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(middle);
    let block = Block::new().borders(Borders::ALL).title("per-core load");
    let inner = block.inner(load_area);
    frame.render_widget(block, load_area);
    let rows = Layout::vertical(vec![Constraint::Length(1); view.load.len()]).split(inner);
    for ((shard, load), area) in view.load.iter().zip(rows.iter()) {
        frame.render_widget(
            Gauge::default()
                .ratio(*load)
                .label(format!("shard {shard} {:.0}%", load * 100.0)),
            *area,
        );
    }
    let s = view.spool;
    let spool_lines = vec![
        Line::from(format!(
            "live messages {:.0}   live {}",
            s.messages,
            bytes(s.live_bytes)
        )),
        Line::from(format!(
            "on disk {} in {:.0} segments",
            bytes(s.disk_bytes),
            s.segments
        )),
        Line::from(view.totals.clone()),
    ];
    frame.render_widget(
        Paragraph::new(spool_lines).block(Block::new().borders(Borders::ALL).title("spool")),
        spool_area,
    );

    let site_rows = view.sites.iter().map(|r| Row::new(r.clone()));
    frame.render_widget(
        Table::new(
            site_rows,
            [
                Constraint::Min(24),
                Constraint::Length(7),
                Constraint::Length(8),
                Constraint::Length(6),
                Constraint::Length(8),
            ],
        )
        .header(
            Row::new(["SITE", "QUEUES", "PARTS", "CONN", "LIMIT"])
                .style(Style::new().add_modifier(Modifier::BOLD)),
        )
        .block(Block::new().borders(Borders::ALL).title("busiest sites")),
        sites_area,
    );
    let ready_rows = view.ready.iter().map(|r| Row::new(r.clone()));
    frame.render_widget(
        Table::new(
            ready_rows,
            [
                Constraint::Min(24),
                Constraint::Length(5),
                Constraint::Length(7),
                Constraint::Length(5),
                Constraint::Length(7),
                Constraint::Length(18),
                Constraint::Min(10),
            ],
        )
        .header(
            Row::new([
                "READY QUEUE",
                "SHARD",
                "PARTS",
                "CONN",
                "LIMIT",
                "RATE",
                "STATE",
            ])
            .style(Style::new().add_modifier(Modifier::BOLD)),
        )
        .block(
            Block::new()
                .borders(Borders::ALL)
                .title("busiest ready queues"),
        ),
        ready_area,
    );
    let lines: Vec<Line> = if view.suspended.is_empty() {
        vec![Line::from("nothing suspended")]
    } else {
        view.suspended
            .iter()
            .map(|s| Line::from(s.clone()))
            .collect()
    };
    frame.render_widget(
        Paragraph::new(lines).block(Block::new().borders(Borders::ALL).title("suspended")),
        suspended_area,
    );
}

/// Fetches what a view needs.
fn fetch(client: &Client) -> Result<(Metrics, Value, Value, Value)> {
    let metrics = parse_metrics(&client.text("GET", "/metrics", None)?);
    let listing = client.request("GET", "/api/admin/queues/v1?limit=50", None)?;
    let suspensions = client.request("GET", "/api/admin/suspend/v1", None)?;
    let bounces = client.request("GET", "/api/admin/bounce/v1", None)?;
    Ok((metrics, listing, suspensions, bounces))
}

/// Runs the view until q, Esc or Ctrl-C.
pub fn run(client: &Client, interval: Duration) -> Result<()> {
    let mut terminal = ratatui::init();
    let result = (|| -> Result<()> {
        let mut top = Top::default();
        let mut view = View {
            endpoint: client.endpoint.clone(),
            ..View::default()
        };
        let mut next = Instant::now();
        loop {
            if Instant::now() >= next {
                next = Instant::now() + interval;
                match fetch(client) {
                    Ok((metrics, listing, suspensions, bounces)) => {
                        view =
                            top.update(Instant::now(), metrics, &listing, &suspensions, &bounces);
                        view.endpoint = client.endpoint.clone();
                        view.updated = clock_time();
                    }
                    Err(err) => view.error = Some(format!("{err:#}")),
                }
                terminal.draw(|frame| draw(frame, &view))?;
            }
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait)? {
                match event::read()? {
                    Event::Key(key) if key.kind == KeyEventKind::Press => {
                        let ctrl_c = key.code == KeyCode::Char('c')
                            && key.modifiers.contains(event::KeyModifiers::CONTROL);
                        if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                            return Ok(());
                        }
                    }
                    Event::Resize(..) => {
                        terminal.draw(|frame| draw(frame, &view))?;
                    }
                    _ => {}
                }
            }
        }
    })();
    ratatui::restore();
    result
}

/// The wall-clock time of day, UTC, as the header shows it.
fn clock_time() -> String {
    let secs = now_ms() / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use serde_json::json;

    const METRICS: &str = "# HELP gannet_delivery_delivered_total x\n\
        # TYPE gannet_delivery_delivered_total counter\n\
        gannet_delivery_delivered_total{shard=\"0\"} 100\n\
        gannet_delivery_delivered_total{shard=\"1\"} 50\n\
        gannet_smtp_accept_durable_bucket{shard=\"0\",le=\"0.001\"} 9\n\
        gannet_shard_busy_us_total{shard=\"0\"} 1000000\n\
        gannet_shard_busy_us_total{shard=\"1\"} 0\n\
        gannet_spool_live_messages{shard=\"0\"} 12\n\
        gannet_spool_disk_bytes{shard=\"0\"} 67108864\n";

    #[test]
    fn metrics_are_read_per_shard() {
        let m = parse_metrics(METRICS);
        assert_eq!(total(&m, "delivery_delivered_total"), 150.0);
        assert!(!m.contains_key("smtp_accept_durable_bucket"));
        assert_eq!(m["shard_busy_us_total"][&0], 1e6);
    }

    fn listing() -> Value {
        json!({
            "scheduled": [{ "name": "b.test", "waiting": 4, "held": 1 }],
            "ready": [
                { "name": "s1->mx.a.test", "site": "mx.a.test", "shard": 0, "parts": 7, "remote": 1,
                  "connections": 2,
                  "effective": { "connection_limit": 2, "max_message_rate": "unlimited" },
                  "configured": { "connection_limit": 32, "max_message_rate": "unlimited" },
                  "rules_in_force": [{ "rule": "gmail#0", "until_ms": 1, "actions": [] }] },
                { "name": "s2->mx.a.test", "site": "mx.a.test", "shard": 0, "parts": 1, "remote": 0,
                  "connections": 1,
                  "effective": { "connection_limit": 32, "max_message_rate": "unlimited" },
                  "configured": { "connection_limit": 32, "max_message_rate": "unlimited" } },
                { "name": "s1->mx.b.test", "site": "mx.b.test", "shard": 1, "parts": 0, "remote": 0,
                  "connections": 0,
                  "effective": { "connection_limit": 32, "max_message_rate": "unlimited" },
                  "configured": { "connection_limit": 32, "max_message_rate": "unlimited" },
                  "suspended_by": "admin suspension x: block", "suspended_until_ms": u64::MAX / 2 }
            ],
            "due": 3, "handed": 2
        })
    }

    #[test]
    fn rates_are_the_change_of_counters_over_the_interval() {
        let mut top = Top::default();
        let start = Instant::now();
        let first = top.update(
            start,
            parse_metrics(METRICS),
            &listing(),
            &json!([]),
            &json!([]),
        );
        assert!(
            first.rates.iter().all(|(_, r)| r.is_none()),
            "one sample: no rate yet"
        );
        let later = METRICS
            .replace("total{shard=\"0\"} 100\n", "total{shard=\"0\"} 300\n")
            .replace(
                "gannet_shard_busy_us_total{shard=\"0\"} 1000000",
                "gannet_shard_busy_us_total{shard=\"0\"} 2000000",
            );
        let view = top.update(
            start + Duration::from_secs(2),
            parse_metrics(&later),
            &listing(),
            &json!([{ "id": "s", "reason": "pause", "duration": "5m", "domain": "c.test" }]),
            &json!([]),
        );
        assert_eq!(view.rates[1], ("delivered", Some(100.0)));
        assert_eq!(view.rates[0], ("received", Some(0.0)));
        assert_eq!(view.load, vec![(0, 0.5), (1, 0.0)]);
        assert_eq!(view.delivered_history, vec![100]);
        assert_eq!(view.sites[0], ["mx.a.test", "2", "9", "3", "32"]);
        assert_eq!(view.spool.messages, 12.0);
        assert!(view.suspended[0].starts_with("ready s1->mx.b.test: admin suspension x: block"));
        assert!(view.suspended[1].contains("domain=c.test: pause (5m left)"));
        assert_eq!(view.totals, "scheduled 5   due 3   handed 2");
    }

    #[test]
    fn the_view_draws_on_a_terminal() {
        let mut top = Top::default();
        let start = Instant::now();
        top.update(
            start,
            parse_metrics(METRICS),
            &listing(),
            &json!([]),
            &json!([]),
        );
        let mut view = top.update(
            start + Duration::from_secs(1),
            parse_metrics(METRICS),
            &listing(),
            &json!([]),
            &json!([]),
        );
        view.endpoint = "http://127.0.0.1:8000".into();
        let mut terminal = Terminal::new(TestBackend::new(120, 40)).unwrap();
        terminal.draw(|f| draw(f, &view)).unwrap();
        let screen: String = (terminal.backend().buffer().content().chunks(120))
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
            .collect();
        for needle in [
            "delivered/s 0.0",
            "per-core load",
            "shard 0 0%",
            "busiest sites",
            "mx.a.test",
            "s1->mx.a.test",
            "2/32",
            "rule gmail#0",
            "live messages 12",
            "64.0 MiB",
        ] {
            assert!(screen.contains(needle), "{needle} missing:\n{screen}");
        }
    }
}
