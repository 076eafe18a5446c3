//! Plain-text tables and the small formats gannetctl shows: times relative to now,
//! effective/configured limit pairs.

use std::time::Duration;

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Columns sized to their widest cell, two spaces apart.
#[derive(Debug)]
pub struct Table {
    head: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(head: &[(&str, Align)]) -> Table {
        Table {
            head: head.iter().map(|(h, a)| (h.to_string(), *a)).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let width = |i: usize| {
            let cells = self.rows.iter().filter_map(|r| r.get(i));
            cells
                .map(|c| c.chars().count())
                .chain([self.head[i].0.chars().count()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.head.len()).map(width).collect();
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut out = String::new();
            for (i, cell) in cells.enumerate() {
                let (w, align) = (widths.get(i).copied().unwrap_or(0), self.head[i].1);
                if i > 0 {
                    out.push_str("  ");
                }
                match align {
                    Align::Left => out.push_str(&format!("{cell:<w$}")),
                    Align::Right => out.push_str(&format!("{cell:>w$}")),
                }
            }
            out.trim_end().to_string() + "\n"
        };
        let mut out = line(&mut self.head.iter().map(|(h, _)| h.as_str()));
        for row in &self.rows {
            out.push_str(&line(&mut row.iter().map(String::as_str)));
        }
        out
    }
}

/// A time relative to now: "5m 2s ago", "in 1h", "now" (to the second).
pub fn ago_or_in(at_ms: u64, now_ms: u64) -> String {
    let secs = |ms: u64| Duration::from_secs(ms.div_ceil(1000));
    if at_ms + 500 < now_ms {
        format!("{} ago", humantime::format_duration(secs(now_ms - at_ms)))
    } else if at_ms > now_ms + 500 {
        format!("in {}", humantime::format_duration(secs(at_ms - now_ms)))
    } else {
        "now".into()
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// An effective limit and the configured one: "32" when equal, "4/32" when not.
pub fn limit_pair(effective: &Value, configured: &Value) -> String {
    if effective == configured {
        text(effective)
    } else {
        format!("{}/{}", text(effective), text(configured))
    }
}

/// A message rate in effect, with the configured one in brackets when they differ.
pub fn rate_text(effective: &Value, configured: &Value) -> String {
    if effective == configured {
        text(effective)
    } else {
        format!("{} ({})", text(effective), text(configured))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let mut t = Table::new(&[("NAME", Align::Left), ("N", Align::Right)]);
        t.row(vec!["a.test".into(), "7".into()]);
        t.row(vec!["éé".into(), "1234".into()]);
        assert_eq!(t.render(), "NAME       N\na.test     7\néé      1234\n");
    }

    #[test]
    fn relative_times() {
        assert_eq!(ago_or_in(1_000, 301_000), "5m ago");
        assert_eq!(ago_or_in(3_601_000, 1_000), "in 1h");
        assert_eq!(ago_or_in(1_000, 1_200), "now");
        assert_eq!(limit_pair(&4.into(), &32.into()), "4/32");
        assert_eq!(limit_pair(&32.into(), &32.into()), "32");
    }
}
