//! `[dkim]`: signing keys and how messages are signed.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DkimMode {
    /// Sign what a key matches; a message no key matches goes unsigned.
    Optional,
    /// A message no key matches is refused (SMTP 550 5.7.1; HTTP a
    /// generation_failure), never sent unsigned.
    Required,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DkimConfig {
    pub mode: DkimMode,
    pub header_canonicalization: Canon,
    pub body_canonicalization: Canon,
    /// Header fields signed (each instance present).
    pub headers: Vec<String>,
    /// Header fields signed once more than present, so none can be added later.
    pub oversign: Vec<String>,
    /// `x=`: signatures expire this long after signing; 0: no `x=`.
    pub expiration_secs: u64,
    /// `l=`: sign the body's length (lets content be appended; off by default).
    pub body_length: bool,
    pub keys: Vec<DkimKey>,
}

impl Default for DkimConfig {
    fn default() -> Self {
        DkimConfig {
            mode: DkimMode::Optional,
            header_canonicalization: Canon::Relaxed,
            body_canonicalization: Canon::Relaxed,
            headers: [
                "from",
                "to",
                "cc",
                "subject",
                "date",
                "message-id",
                "reply-to",
                "in-reply-to",
                "references",
                "mime-version",
                "content-type",
                "content-transfer-encoding",
                "list-unsubscribe",
                "list-unsubscribe-post",
            ]
            .map(String::from)
            .to_vec(),
            oversign: Vec::new(),
            expiration_secs: 0,
            body_length: false,
            keys: Vec::new(),
        }
    }
}

/// One key: `d=`, `s=`, the PEM file, which mail it signs, and optional overrides.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKey {
    pub domain: String,
    pub selector: String,
    pub key_file: PathBuf,
    /// Sign mail whose From domain is one of these or below one of them; default: the
    /// key's own domain.
    #[serde(default)]
    pub from_domains: Vec<String>,
    /// Sign every message of these tenants, whatever its From (an ESP's own
    /// signature beside the author domain's).
    #[serde(default)]
    pub tenants: Vec<String>,
    pub header_canonicalization: Option<Canon>,
    pub body_canonicalization: Option<Canon>,
    pub oversign: Option<Vec<String>>,
    pub body_length: Option<bool>,
}

/// A DKIM canonicalization (RFC 6376 3.4), for header fields or the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Canon {
    Simple,
    Relaxed,
}

impl Canon {
    /// Its name in a signature's `c=` tag.
    pub fn name(self) -> &'static str {
        match self {
            Canon::Simple => "simple",
            Canon::Relaxed => "relaxed",
        }
    }
}
