//! Every configured key, loaded once and shared by all shards, found for a message by
//! its From domain (walking up its labels) and by its tenant.

use std::collections::HashMap;
use std::sync::Arc;

use super::{SignError, Signer};
use gannet_core::config::dkim::{DkimConfig, DkimMode};

#[derive(Debug)]
pub struct Signers {
    mode: DkimMode,
    by_domain: HashMap<String, Vec<Arc<Signer>>>,
    by_tenant: HashMap<String, Vec<Arc<Signer>>>,
}

/// Why a message was not signed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DkimFailure {
    #[error("no DKIM key signs mail from {0:?} (dkim.mode is required)")]
    NoKey(String),
    #[error("DKIM signing failed: {0}")]
    Sign(#[from] SignError),
}

impl Signers {
    /// Loads every key; the error names the key (`dkim.keys[i].key_file`) and why.
    pub fn load(config: &DkimConfig) -> Result<Signers, String> {
        let mut by_domain: HashMap<String, Vec<Arc<Signer>>> = HashMap::new();
        let mut by_tenant: HashMap<String, Vec<Arc<Signer>>> = HashMap::new();
        for (i, k) in config.keys.iter().enumerate() {
            let key = super::keys::load(&k.key_file)
                .map_err(|e| format!("dkim.keys[{i}].key_file: {e}"))?;
            let lower = |v: &[String]| {
                v.iter()
                    .map(|s| s.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            };
            let signer = Arc::new(Signer {
                domain: k.domain.trim().to_ascii_lowercase(),
                selector: k.selector.trim().to_string(),
                key,
                header_canon: k
                    .header_canonicalization
                    .unwrap_or(config.header_canonicalization),
                body_canon: k
                    .body_canonicalization
                    .unwrap_or(config.body_canonicalization),
                headers: lower(&config.headers),
                oversign: lower(k.oversign.as_deref().unwrap_or(&config.oversign)),
                expire_secs: (config.expiration_secs > 0).then_some(config.expiration_secs),
                body_length: k.body_length.unwrap_or(config.body_length),
            });
            if signer.domain.is_empty() || signer.selector.is_empty() {
                return Err(format!(
                    "dkim.keys[{i}]: domain and selector must not be empty"
                ));
            }
            let from = if k.from_domains.is_empty() && k.tenants.is_empty() {
                vec![signer.domain.clone()]
            } else {
                lower(&k.from_domains)
            };
            for domain in from {
                by_domain.entry(domain).or_default().push(signer.clone());
            }
            for tenant in &k.tenants {
                by_tenant
                    .entry(tenant.clone())
                    .or_default()
                    .push(signer.clone());
            }
        }
        Ok(Signers {
            mode: config.mode,
            by_domain,
            by_tenant,
        })
    }

    /// The DKIM-Signature fields for `message` (to put before it), one per matching
    /// key; None when no key matches and signing is optional.
    pub fn sign(
        &self,
        message: &[u8],
        tenant: Option<&str>,
        now_secs: u64,
    ) -> Result<Option<Vec<u8>>, DkimFailure> {
        if self.by_domain.is_empty() && self.by_tenant.is_empty() && self.mode == DkimMode::Optional
        {
            return Ok(None);
        }
        let (fields, body) = super::canon::split(message);
        let from = from_domain_of(&fields).unwrap_or_default();
        let mut chosen: Vec<&Arc<Signer>> = Vec::new();
        let mut domain = from.as_str();
        loop {
            if let Some(signers) = self.by_domain.get(domain) {
                chosen.extend(signers);
            }
            match domain.split_once('.') {
                Some((_, parent)) if !parent.is_empty() => domain = parent,
                _ => break,
            }
        }
        if let Some(signers) = tenant.and_then(|t| self.by_tenant.get(t)) {
            chosen.extend(signers);
        }
        chosen.dedup_by(|a, b| Arc::ptr_eq(a, b));
        if chosen.is_empty() {
            return match self.mode {
                DkimMode::Optional => Ok(None),
                DkimMode::Required => Err(DkimFailure::NoKey(from)),
            };
        }
        let mut out = Vec::with_capacity(chosen.len() * 512);
        for signer in chosen {
            out.extend_from_slice(signer.sign_split(&fields, body, now_secs)?.as_bytes());
        }
        Ok(Some(out))
    }
}

/// The domain of the message's From address, lower case.
pub fn from_domain(message: &[u8]) -> Option<String> {
    from_domain_of(&super::canon::split(message).0)
}

/// [`from_domain`] of a message split into its fields.
fn from_domain_of(fields: &[super::canon::Field<'_>]) -> Option<String> {
    let from = fields
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case(b"from"))?;
    let value = std::str::from_utf8(from.raw).ok()?;
    let value = value.split_once(':')?.1;
    let address = match (value.rfind('<'), value.rfind('>')) {
        (Some(open), Some(close)) if open < close => &value[open + 1..close],
        _ => value,
    };
    let domain = address.trim().rsplit_once('@')?.1.trim();
    Some(domain.trim_end_matches('.').to_ascii_lowercase())
}
