//! Engagement tracking: an open pixel added to the HTML of a generated message and
//! its links rewritten to pass through gannet, each carrying a signed token.
//!
//! A token is `base64url(payload ‖ tag)`: the payload names the message, recipient,
//! transmission, campaign, tenant and template (and, for a click, the link), fields
//! separated by NUL (tokens of older versions, kinds `o`/`c`, have no tenant and
//! template and still open);
//! the tag is the first 16 bytes of HMAC-SHA256 over the payload with the daemon's
//! tracking key (`<data_dir>/tracking.key`, made at first start). The endpoints
//! (`http/tracking.rs`) trust only tokens whose tag verifies, so nobody can forge
//! events or turn the redirect into an open redirector.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;

const TAG_BYTES: usize = 16;

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    pub kind: Kind,
    pub message_id: String,
    pub rcpt_to: String,
    pub transmission_id: String,
    pub campaign_id: String,
    /// The message's tenant and template (empty: none).
    pub tenant: String,
    pub template_id: String,
    /// The link a click goes to (empty for an open).
    pub url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Open,
    Click,
    /// A one-click unsubscribe link (RFC 8058).
    Unsubscribe,
    /// The header that names a message in the reports that come back about it
    /// (bounces, complaints: the engine's feedback module reads them).
    Feedback,
}

/// The daemon's tracking key.
#[derive(Debug)]
pub struct TrackingKey {
    key: hmac::Key,
}

impl TrackingKey {
    pub fn new(secret: &[u8]) -> TrackingKey {
        TrackingKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// Loads `<data_dir>/tracking.key`, creating it (32 random bytes, mode 0600,
    /// written atomically and durably) the first time. A key file shorter than 32
    /// bytes can only be what a crash left of an older version's first write (no token
    /// was ever signed with what it holds), so it is replaced with a warning.
    pub fn load_or_create(data_dir: &std::path::Path) -> std::io::Result<TrackingKey> {
        let path = data_dir.join("tracking.key");
        match std::fs::read(&path) {
            Ok(secret) if secret.len() >= 32 => return Ok(TrackingKey::new(&secret)),
            Ok(secret) => tracing::warn!(
                "{} holds {} bytes, not a whole key; generating a new one",
                path.display(),
                secret.len()
            ),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            Err(_) => {}
        }
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| std::io::Error::other("no randomness for the tracking key"))?;
        gannet_spool::durable::write_file(&path, &secret, 0o600)?;
        Ok(TrackingKey::new(&secret))
    }

    pub fn token(&self, t: &Tracked) -> String {
        // Upper case: the kinds of tokens with a tenant and a template.
        let kind = match t.kind {
            Kind::Open => "O",
            Kind::Click => "C",
            Kind::Unsubscribe => "U",
            Kind::Feedback => "F",
        };
        // Fields are separated by NUL. Only the last, the URL, may hold one (a
        // sender's link can hold anything, and `open` splits off seven fields at
        // most); in the others — the campaign id is the sender's text too — a NUL
        // becomes U+FFFD, so a token always opens to the fields it was made of.
        let clean = |field: &str| field.replace('\0', "\u{fffd}");
        let payload = [
            kind.to_string(),
            clean(&t.message_id),
            clean(&t.rcpt_to),
            clean(&t.transmission_id),
            clean(&t.campaign_id),
            clean(&t.tenant),
            clean(&t.template_id),
            t.url.clone(),
        ]
        .join("\0");
        let tag = hmac::sign(&self.key, payload.as_bytes());
        let mut bytes = payload.into_bytes();
        bytes.extend_from_slice(&tag.as_ref()[..TAG_BYTES]);
        B64.encode(bytes)
    }

    /// The token's content, if its tag verifies.
    pub fn open(&self, token: &str) -> Option<Tracked> {
        let bytes = B64.decode(token).ok()?;
        if bytes.len() <= TAG_BYTES {
            return None;
        }
        let (payload, tag) = bytes.split_at(bytes.len() - TAG_BYTES);
        let expected = hmac::sign(&self.key, payload);
        // Every byte compared whatever differs, so that a tag cannot be guessed byte
        // by byte from timings.
        let differ = expected.as_ref()[..TAG_BYTES]
            .iter()
            .zip(tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if differ != 0 {
            return None;
        }
        let text = std::str::from_utf8(payload).ok()?;
        let (kind, rest) = text.split_once('\0')?;
        let (kind, current) = match kind {
            "O" => (Kind::Open, true),
            "C" => (Kind::Click, true),
            "U" => (Kind::Unsubscribe, true),
            "F" => (Kind::Feedback, true),
            "o" => (Kind::Open, false),
            "c" => (Kind::Click, false),
            _ => return None,
        };
        let fields: Vec<&str> = rest.splitn(if current { 7 } else { 5 }, '\0').collect();
        let (message_id, rcpt_to, transmission_id, campaign_id, tenant, template_id, url) =
            match fields[..] {
                [m, r, t, c, tenant, template, url] => (m, r, t, c, tenant, template, url),
                [m, r, t, c, url] if !current => (m, r, t, c, "", "", url),
                _ => return None,
            };
        Some(Tracked {
            kind,
            message_id: message_id.into(),
            rcpt_to: rcpt_to.into(),
            transmission_id: transmission_id.into(),
            campaign_id: campaign_id.into(),
            tenant: tenant.into(),
            template_id: template_id.into(),
            url: url.into(),
        })
    }
}

/// What to track in one message.
#[derive(Debug, Clone, Copy)]
pub struct Track<'a> {
    pub key: &'a TrackingKey,
    /// Where the tracking endpoints are reached, e.g. `https://t.example.com`.
    pub base_url: &'a str,
    pub open: bool,
    pub click: bool,
    pub message_id: &'a str,
    pub rcpt_to: &'a str,
    pub transmission_id: &'a str,
    pub campaign_id: &'a str,
    pub tenant: &'a str,
    pub template_id: &'a str,
}

impl Track<'_> {
    /// The token of the message's feedback header.
    pub fn feedback_token(&self) -> String {
        self.key.token(&self.tracked(Kind::Feedback, ""))
    }

    /// The one-click unsubscribe URL of the message (RFC 8058).
    pub fn unsubscribe_url(&self) -> String {
        format!(
            "{}/u/{}",
            self.base_url.trim_end_matches('/'),
            self.key.token(&self.tracked(Kind::Unsubscribe, ""))
        )
    }

    fn tracked(&self, kind: Kind, url: &str) -> Tracked {
        Tracked {
            kind,
            message_id: self.message_id.into(),
            rcpt_to: self.rcpt_to.into(),
            transmission_id: self.transmission_id.into(),
            campaign_id: self.campaign_id.into(),
            tenant: self.tenant.into(),
            template_id: self.template_id.into(),
            url: url.into(),
        }
    }

    /// The HTML with its http(s) links rewritten (click tracking) and the open pixel
    /// added before `</body>` or at the end (open tracking).
    pub fn apply(&self, html: &str) -> String {
        let mut out = String::with_capacity(html.len() + 512);
        let base = self.base_url.trim_end_matches('/');
        if self.click {
            rewrite_links(html, &mut out, |url| {
                format!(
                    "{base}/c/{}",
                    self.key.token(&self.tracked(Kind::Click, url))
                )
            });
        } else {
            out.push_str(html);
        }
        if self.open {
            let pixel = format!(
                "<img src=\"{base}/o/{}\" width=\"1\" height=\"1\" border=\"0\" alt=\"\" style=\"height:1px !important;width:1px !important;border-width:0 !important;margin:0 !important;padding:0 !important\">",
                self.key.token(&self.tracked(Kind::Open, ""))
            );
            let at = find_ascii_ci(&out, "</body>").unwrap_or(out.len());
            out.insert_str(at, &pixel);
        }
        out
    }
}

/// The first position of `needle` (ASCII, any case) in `hay`.
fn find_ascii_ci(hay: &str, needle: &str) -> Option<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    (0..h.len().saturating_sub(n.len() - 1)).find(|&i| h[i..i + n.len()].eq_ignore_ascii_case(n))
}

/// Copies `html` to `out`, passing the value of every `href="http…"` (or `'…'`)
/// through `rewrite`. Other links (mailto:, anchors, relative) are left alone; so is
/// a link marked `data-msys-clicktrack="0"` before its href.
fn rewrite_links(html: &str, out: &mut String, rewrite: impl Fn(&str) -> String) {
    let mut rest = html;
    while let Some(at) = find_ascii_ci(rest, "href") {
        let after = &rest[at + 4..];
        let trimmed = after.trim_start();
        let Some(value) = trimmed.strip_prefix('=') else {
            out.push_str(&rest[..at + 4]);
            rest = after;
            continue;
        };
        let value = value.trim_start();
        let quote = match value.chars().next() {
            Some(q @ ('"' | '\'')) => q,
            _ => {
                out.push_str(&rest[..at + 4]);
                rest = after;
                continue;
            }
        };
        let start = rest.len() - value.len() + 1;
        let Some(len) = rest[start..].find(quote) else {
            break;
        };
        let url = &rest[start..start + len];
        let tag_start = rest[..at].rfind('<').unwrap_or(0);
        let opted_out = rest[tag_start..at].contains("data-msys-clicktrack=\"0\"");
        // `get`, not slicing: the URL is the sender's text, and byte 7 or 8 may fall
        // inside a character (a panic once took a shard down here).
        let scheme = |s: &str| {
            url.get(..s.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(s))
        };
        let trackable = url.len() > 7 && (scheme("http://") || scheme("https://"));
        out.push_str(&rest[..start]);
        if trackable && !opted_out {
            // The URL as the browser would follow it: entities in attributes decoded.
            out.push_str(&rewrite(&url.replace("&amp;", "&")));
        } else {
            out.push_str(url);
        }
        rest = &rest[start + len..];
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(key: &TrackingKey, open: bool, click: bool) -> Track<'_> {
        Track {
            key,
            base_url: "https://t.test/",
            open,
            click,
            message_id: "m1",
            rcpt_to: "a@x.test",
            transmission_id: "t1",
            campaign_id: "c1",
            tenant: "acme",
            template_id: "welcome",
        }
    }

    #[test]
    fn tokens_round_trip_and_refuse_tampering() {
        let key = TrackingKey::new(b"0123456789abcdef0123456789abcdef");
        let t = track(&key, true, true).tracked(Kind::Click, "https://x.test/a?b=c");
        let token = key.token(&t);
        assert_eq!(key.open(&token), Some(t));
        let mut bytes = B64.decode(&token).unwrap();
        bytes[3] ^= 1;
        assert_eq!(key.open(&B64.encode(&bytes)), None);
        assert_eq!(key.open("not base64!"), None);
        assert_eq!(key.open(""), None);
        let other = TrackingKey::new(b"another key, another key, another");
        assert_eq!(other.open(&token), None);
    }

    #[test]
    fn tokens_of_the_older_form_still_open() {
        let key = TrackingKey::new(b"0123456789abcdef0123456789abcdef");
        let payload = "c\0m1\0a@x.test\0t1\0c1\0https://x.test/\0a";
        let tag = hmac::sign(&key.key, payload.as_bytes());
        let mut bytes = payload.as_bytes().to_vec();
        bytes.extend_from_slice(&tag.as_ref()[..TAG_BYTES]);
        let opened = key.open(&B64.encode(bytes)).expect("opens");
        assert_eq!(opened.kind, Kind::Click);
        assert_eq!(opened.url, "https://x.test/\0a");
        assert_eq!(
            (opened.tenant.as_str(), opened.template_id.as_str()),
            ("", "")
        );
        assert_eq!(opened.campaign_id, "c1");
    }

    #[test]
    fn links_are_rewritten_and_the_pixel_added() {
        let key = TrackingKey::new(b"0123456789abcdef0123456789abcdef");
        let html = "<html><BODY><a href=\"https://x.test/a?b=1&amp;c=2\">A</a> <a HREF = 'http://y.test/'>B</a> \
                    <a href=\"mailto:z@x.test\">M</a> <a href=\"#top\">T</a> \
                    <a data-msys-clicktrack=\"0\" href=\"https://keep.test/\">K</a></BODY></html>";
        let out = track(&key, true, true).apply(html);
        let tokens: Vec<&str> = out
            .match_indices("https://t.test/c/")
            .map(|(i, _)| &out[i + 17..])
            .collect();
        assert_eq!(tokens.len(), 2, "{out}");
        let first = key
            .open(tokens[0].split(['"', '\'']).next().unwrap())
            .unwrap();
        assert_eq!(first.url, "https://x.test/a?b=1&c=2");
        let second = key
            .open(tokens[1].split(['"', '\'']).next().unwrap())
            .unwrap();
        assert_eq!(second.url, "http://y.test/");
        assert!(out.contains("href=\"mailto:z@x.test\"") && out.contains("href=\"#top\""));
        assert!(out.contains("href=\"https://keep.test/\""));
        let pixel = out.find("https://t.test/o/").unwrap();
        assert!(pixel < out.find("</BODY>").unwrap());
        // Open only: links untouched; no body tag: the pixel goes at the end.
        let out = track(&key, true, false).apply("<p><a href=\"https://x.test/\">x</a></p>");
        assert!(
            out.starts_with("<p><a href=\"https://x.test/\">x</a></p><img src=\"https://t.test/o/")
        );
    }

    #[test]
    fn tokens_open_whatever_the_url_and_campaign_hold() {
        let key = TrackingKey::new(b"0123456789abcdef0123456789abcdef");
        let mut t = track(&key, true, true).tracked(Kind::Click, "https://x.test/a\0b\0c");
        t.campaign_id = "camp\0aign".into();
        let opened = key.open(&key.token(&t)).expect("opens");
        assert_eq!(opened.url, "https://x.test/a\0b\0c");
        assert_eq!(opened.campaign_id, "camp\u{fffd}aign");
        assert_eq!(opened.message_id, t.message_id);
    }

    #[test]
    fn links_with_characters_across_the_scheme_boundary_are_left_alone() {
        let key = TrackingKey::new(b"0123456789abcdef0123456789abcdef");
        for href in [
            "héllo wörld",
            "ñññññ",
            "http:/ñ",
            "https:/é/",
            "日本語のリンク",
            "http://é",
        ] {
            let html = format!("<a href=\"{href}\">x</a>");
            let out = track(&key, false, true).apply(&html);
            let expected = if href == "http://é" { 1 } else { 0 };
            assert_eq!(
                out.matches("https://t.test/c/").count(),
                expected,
                "{href}: {out}"
            );
        }
    }
}
