//! Bounce classification: a permanent (or expired) failure is given a SparkPost /
//! Momentum bounce class from its reply, by the first matching rule of a table.

use crate::reply::Response;

/// (enhanced-code prefix or "", text fragment or "", class). First match wins.
const RULES: &[(&str, &str, u16)] = &[
    ("", "spam", 51),
    ("", "blocklist", 50),
    ("", "blacklist", 50),
    ("5.7.1", "relay", 54),
    ("5.7.", "", 50),
    ("5.1.", "", 10),
    ("5.2.2", "", 22),
    ("5.2.3", "", 23),
    ("5.3.4", "", 23),
    ("5.2.", "", 10),
    ("5.4.", "", 21),
    ("5.6.", "", 52),
    ("", "user unknown", 10),
    ("", "no such user", 10),
    ("", "mailbox unavailable", 10),
    ("", "mailbox full", 22),
    ("", "over quota", 22),
    ("", "too large", 23),
];

/// The bounce class of a failure reply (1 Undetermined when nothing matches).
pub fn classify(response: &Response) -> u16 {
    let enhanced = response.enhanced().unwrap_or("");
    let text = response.text.to_ascii_lowercase();
    for (prefix, fragment, class) in RULES {
        let code_ok = prefix.is_empty() || enhanced.starts_with(prefix);
        let text_ok = fragment.is_empty() || text.contains(fragment);
        if code_ok && text_ok && !(prefix.is_empty() && fragment.is_empty()) {
            return *class;
        }
    }
    if response.code >= 500 { 40 } else { 1 }
}

/// SparkPost's bounce categories: what a bounce class means for the recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// The address is bad (10, 30, 90): suppress it.
    Hard,
    /// Usually temporary (20–24, 40, 60, 70, 100).
    Soft,
    /// The receiver blocks the sender or its content (50–54).
    Block,
    /// The sender's own policy failed it (25, 80).
    Admin,
    /// The reply said nothing that could be classified (1, and classes unknown).
    Undetermined,
}

/// The category of bounce class `class` (SparkPost's bounce classification table).
pub fn category(class: u16) -> Category {
    match class {
        10 | 30 | 90 => Category::Hard,
        20..=24 | 40 | 60 | 70 | 100 => Category::Soft,
        50..=54 => Category::Block,
        25 | 26 | 80 => Category::Admin,
        _ => Category::Undetermined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let check = |code, text: &str, class| {
            assert_eq!(
                classify(&Response::local(code, text)),
                class,
                "{code} {text}"
            );
        };
        check(550, "5.1.1 no such user", 10);
        check(550, "5.7.1 message rejected as spam", 51);
        check(554, "5.7.1 relaying denied", 54);
        check(550, "5.7.1 blocked by policy", 50);
        check(552, "5.2.2 mailbox full", 22);
        check(552, "5.3.4 message too big", 23);
        check(550, "requested action not taken: mailbox unavailable", 10);
        check(554, "transaction failed", 40);
        check(550, "5.4.4 unable to route", 21);
    }

    #[test]
    fn categories() {
        assert_eq!(category(10), Category::Hard);
        assert_eq!(category(90), Category::Hard);
        assert_eq!(category(24), Category::Soft);
        assert_eq!(category(100), Category::Soft);
        assert_eq!(category(51), Category::Block);
        assert_eq!(category(25), Category::Admin);
        assert_eq!(category(1), Category::Undetermined);
        assert_eq!(category(7), Category::Undetermined);
    }
}
