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
}
