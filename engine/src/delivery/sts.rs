//! MTA-STS (RFC 8461) for delivery: a shard's policies, looked up when a domain's
//! site is resolved. The `_mta-sts` TXT record (cached like every DNS answer) says
//! whether the domain has a policy and its id; a policy is fetched over HTTPS from
//! `mta-sts.<domain>` only when the id is new to the shard's cache (or the cached
//! one expired), kept up to its max_age, and fetched again in the background once
//! it is `refresh_secs` old. A domain whose record disappears keeps its cached
//! policy until it expires (RFC 8461 5.1), and a failed fetch keeps the cached one
//! in force, so a downgrade needs more than blocking DNS or HTTPS for a moment.
//!
//! The cache is per shard (no lock, no cross-core call) and survives restarts in
//! `<data_dir>/mta-sts/<shard>.json`, written whole, atomically and durably, at
//! most about once a second after a change; at start every shard reads every
//! shard's file (a domain's mail may be resolved on any shard). A damaged file is
//! set aside (`.bad`) and its policies are fetched again.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Dispatcher;
use crate::dns::Asking;
use crate::metrics::ShardMetrics;
use gannet_core::clock::unix_ms;
use gannet_core::config::MtaStsConfig;
use gannet_core::tls_policy::{StsMode, StsPolicy, sts_record_id};

/// Largest policy file read (RFC 8461 3.3 suggests 64 KiB).
const POLICY_BYTES_MAX: usize = 64 << 10;

/// Why a policy could not be had, as TLS-RPT names it (RFC 8460 4.3.2.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchFailure {
    /// `sts-webpki-invalid`: the policy host's certificate did not validate.
    Certificate(String),
    /// `sts-policy-invalid`: served, but not a valid policy.
    Invalid(String),
    /// `sts-policy-fetch-error`: no address, no connection, not 200 text/plain.
    Fetch(String),
}

impl FetchFailure {
    pub fn result_type(&self) -> &'static str {
        match self {
            FetchFailure::Certificate(_) => "sts-webpki-invalid",
            FetchFailure::Invalid(_) => "sts-policy-invalid",
            FetchFailure::Fetch(_) => "sts-policy-fetch-error",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            FetchFailure::Certificate(d) | FetchFailure::Invalid(d) | FetchFailure::Fetch(d) => d,
        }
    }
}

/// A policy in the cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cached {
    /// The TXT record's id it was fetched under.
    id: String,
    /// The policy as served (re-read at load: a damaged entry is dropped).
    policy: String,
    fetched_ms: u64,
    #[serde(skip)]
    parsed: Option<StsPolicy>,
}

impl Cached {
    fn expires_ms(&self) -> u64 {
        let max_age = self.parsed.as_ref().map_or(0, |p| p.max_age_secs);
        self.fetched_ms.saturating_add(max_age.saturating_mul(1000))
    }
}

/// The policy that applies to a domain now, and until when that answer holds.
#[derive(Debug, Clone)]
pub struct Applies {
    pub policy: Option<StsPolicy>,
    pub until_ms: u64,
    /// A failed fetch behind this answer (reported by TLS-RPT).
    pub failure: Option<FetchFailure>,
}

/// A shard's MTA-STS state.
#[derive(Debug)]
pub struct Sts {
    config: MtaStsConfig,
    policies: RefCell<HashMap<String, Cached>>,
    /// Domains whose policy is being fetched in the background.
    refreshing: RefCell<HashSet<String>>,
    file: PathBuf,
    /// A write of the file is scheduled.
    write_pending: Cell<bool>,
}

impl Sts {
    /// The shard's state, with the policies of every shard's file (the newest of
    /// each domain): after a restart a domain's mail may be resolved on another
    /// shard than before, and must find its policy there too.
    pub fn open(config: &MtaStsConfig, data_dir: &std::path::Path, shard: usize) -> Sts {
        let dir = data_dir.join("mta-sts");
        let file = dir.join(format!("{shard}.json"));
        let mut policies: HashMap<String, Cached> = HashMap::new();
        let files = std::fs::read_dir(&dir).into_iter().flatten().flatten();
        for path in files
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
        {
            for (domain, cached) in load(&path, config.cache_entries_max.usize()) {
                match policies.get(&domain) {
                    Some(known) if known.fetched_ms >= cached.fetched_ms => {}
                    _ => {
                        policies.insert(domain, cached);
                    }
                }
            }
        }
        bound(&mut policies, config.cache_entries_max.usize());
        Sts {
            config: config.clone(),
            policies: RefCell::new(policies),
            refreshing: RefCell::new(HashSet::new()),
            file,
            write_pending: Cell::new(false),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Policies cached now.
    pub fn len(&self) -> usize {
        self.policies.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn cached(&self, domain: &str, now: u64) -> Option<Cached> {
        self.policies
            .borrow()
            .get(domain)
            .filter(|c| c.expires_ms() > now)
            .cloned()
    }

    fn store(&self, domain: &str, id: &str, policy: &StsPolicy, now: u64) {
        let mut policies = self.policies.borrow_mut();
        if !policies.contains_key(domain) && policies.len() >= self.config.cache_entries_max.usize()
        {
            // Full: the expired first, else the one closest to expiring.
            let victim = (policies.iter())
                .min_by_key(|(_, c)| c.expires_ms())
                .map(|(d, _)| d.clone());
            if let Some(victim) = victim {
                policies.remove(&victim);
            }
        }
        policies.insert(
            domain.to_string(),
            Cached {
                id: id.to_string(),
                policy: policy.lines().join("\r\n"),
                fetched_ms: now,
                parsed: Some(policy.clone()),
            },
        );
    }
}

/// The MTA-STS policy of `domain` as delivery should apply it now.
pub(super) async fn applies(d: &Rc<Dispatcher>, asking: &Asking<'_>, domain: &str) -> Applies {
    let sts = &d.sts;
    let now = unix_ms();
    let txt = asking.txt_until(&format!("_mta-sts.{domain}")).await;
    let cached = sts.cached(domain, now);
    let (id, txt_until) = match txt {
        Ok((records, until)) => (sts_record_id(&records), until),
        // The DNS failed: the cached policy stands; without one, none applies for
        // now (asked again soon).
        Err(_) => (None, now + 60_000),
    };
    let until_of = |c: &Cached| txt_until.min(c.expires_ms());
    let policy_of = |c: &Cached| c.parsed.clone().filter(|p| p.mode != StsMode::None);
    match (id, cached) {
        (Some(id), Some(c)) if c.id == id => {
            if now.saturating_sub(c.fetched_ms) >= sts.config.refresh_secs.get() * 1000 {
                refresh_in_background(d, domain, &id);
            }
            Applies {
                policy: policy_of(&c),
                until_ms: until_of(&c),
                failure: None,
            }
        }
        (Some(id), cached) => match fetch(d, asking, domain).await {
            Ok(policy) => {
                sts.store(domain, &id, &policy, now);
                schedule_write(d);
                let until = txt_until.min(now + policy.max_age_secs * 1000);
                Applies {
                    policy: Some(policy).filter(|p| p.mode != StsMode::None),
                    until_ms: until,
                    failure: None,
                }
            }
            Err(failure) => {
                tracing::debug!(
                    shard = d.shard.id,
                    domain,
                    "MTA-STS policy fetch failed: {}",
                    failure.detail()
                );
                // Keep what is cached (a new id whose policy cannot be had yet);
                // try again within a minute.
                Applies {
                    policy: cached.as_ref().and_then(policy_of),
                    until_ms: now + 60_000,
                    failure: Some(failure),
                }
            }
        },
        (None, Some(c)) => Applies {
            policy: policy_of(&c),
            until_ms: until_of(&c),
            failure: None,
        },
        (None, None) => Applies {
            policy: None,
            until_ms: txt_until,
            failure: None,
        },
    }
}

/// Fetches `domain`'s policy again on a task of its own (once at a time per domain).
fn refresh_in_background(d: &Rc<Dispatcher>, domain: &str, id: &str) {
    if !d.sts.refreshing.borrow_mut().insert(domain.to_string()) {
        return;
    }
    let (d, domain, id) = (d.clone(), domain.to_string(), id.to_string());
    glommio::spawn_local(async move {
        let asking = d.resolver.asking();
        if let Ok(policy) = fetch(&d, &asking, &domain).await {
            d.sts.store(&domain, &id, &policy, unix_ms());
            schedule_write(&d);
        }
        d.sts.refreshing.borrow_mut().remove(&domain);
    })
    .detach();
}

/// Fetches and reads `https://mta-sts.<domain>/.well-known/mta-sts.txt`, counted.
async fn fetch(
    d: &Dispatcher,
    asking: &Asking<'_>,
    domain: &str,
) -> Result<StsPolicy, FetchFailure> {
    let fetched = fetch_policy(d, asking, domain).await;
    let metrics = &d.shard.metrics;
    match &fetched {
        Ok(_) => ShardMetrics::add(&metrics.delivery_mta_sts_policies_fetched_total, 1),
        Err(_) => ShardMetrics::add(&metrics.delivery_mta_sts_fetch_failures_total, 1),
    }
    fetched
}

async fn fetch_policy(
    d: &Dispatcher,
    asking: &Asking<'_>,
    domain: &str,
) -> Result<StsPolicy, FetchFailure> {
    let host = format!("mta-sts.{domain}");
    let (addresses, _) = asking
        .addresses_until(&host)
        .await
        .map_err(|e| FetchFailure::Fetch(format!("{host}: {e}")))?;
    let Some(ip) = addresses.first() else {
        return Err(FetchFailure::Fetch(format!("{host} has no address")));
    };
    let config = &d.sts.config;
    let addr = SocketAddr::new(*ip, u16::try_from(config.https_port.get()).unwrap_or(443));
    let request = crate::io::https::Request {
        method: hyper::Method::GET,
        host: &host,
        path: "/.well-known/mta-sts.txt",
        headers: &[],
        body: Vec::new(),
    };
    let limit = Duration::from_secs(config.fetch_timeout_secs.get());
    let reply = crate::io::https::send(
        addr,
        d.tls.verified.clone(),
        request,
        limit,
        POLICY_BYTES_MAX,
    )
    .await
    .map_err(|e| {
        let certificate = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .is_some_and(|tls| matches!(tls, rustls::Error::InvalidCertificate(_)));
        if certificate {
            FetchFailure::Certificate(format!("{host}: {e}"))
        } else {
            FetchFailure::Fetch(format!("{host}: {e}"))
        }
    })?;
    if reply.status != 200 {
        // Redirects included: RFC 8461 3.3 forbids following them.
        return Err(FetchFailure::Fetch(format!(
            "{host} answered HTTP {}",
            reply.status
        )));
    }
    let media = reply.content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("text/plain") {
        return Err(FetchFailure::Fetch(format!(
            "{host} served the policy as `{}`, not text/plain",
            media.chars().take(64).collect::<String>()
        )));
    }
    let text = std::str::from_utf8(&reply.body)
        .map_err(|_| FetchFailure::Invalid(format!("{host}: the policy is not UTF-8")))?;
    StsPolicy::parse(text).map_err(|e| FetchFailure::Invalid(format!("{host}: {e}")))
}

/// Writes the shard's policies within about a second (one write for a burst of
/// changes), off the executor.
fn schedule_write(d: &Rc<Dispatcher>) {
    if d.sts.write_pending.replace(true) {
        return;
    }
    let d = d.clone();
    glommio::spawn_local(async move {
        crate::timer::sleep(Duration::from_secs(1)).await;
        d.sts.write_pending.set(false);
        let text = {
            let policies = d.sts.policies.borrow();
            match serde_json::to_vec(&*policies) {
                Ok(text) => text,
                Err(e) => {
                    tracing::warn!(shard = d.shard.id, "MTA-STS cache not written: {e}");
                    return;
                }
            }
        };
        if let Err(e) = crate::io::write_file_durably(d.sts.file.clone(), text).await {
            tracing::warn!(shard = d.shard.id, file = %d.sts.file.display(), "MTA-STS cache not written: {e}");
        }
    })
    .detach();
}

/// Keeps the `entries_max` newest policies (a smaller bound than the files were
/// written under, or several shards' files together).
fn bound(policies: &mut HashMap<String, Cached>, entries_max: usize) {
    if policies.len() > entries_max {
        let mut by_age: Vec<(u64, String)> = policies
            .iter()
            .map(|(d, c)| (c.fetched_ms, d.clone()))
            .collect();
        by_age.sort_unstable();
        for (_, domain) in by_age.iter().take(policies.len() - entries_max) {
            policies.remove(domain);
        }
    }
}

/// The policies of `file`; a damaged file is set aside with a warning (the cache
/// starts empty: policies are fetched again).
fn load(file: &std::path::Path, entries_max: usize) -> HashMap<String, Cached> {
    let text = match std::fs::read(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            tracing::warn!(file = %file.display(), "MTA-STS cache unreadable, starting empty: {e}");
            return HashMap::new();
        }
    };
    match serde_json::from_slice::<HashMap<String, Cached>>(&text) {
        Ok(mut policies) => {
            policies.retain(|_, c| {
                c.parsed = StsPolicy::parse(&c.policy).ok();
                c.parsed.is_some()
            });
            bound(&mut policies, entries_max);
            policies
        }
        Err(e) => {
            let aside = file.with_extension("json.bad");
            tracing::warn!(file = %file.display(), aside = %aside.display(), "MTA-STS cache damaged ({e}); set aside, starting empty");
            let _ = std::fs::rename(file, &aside);
            HashMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_age: u64) -> StsPolicy {
        StsPolicy::parse(&format!(
            "version: STSv1\nmode: enforce\nmx: mx.a.test\nmax_age: {max_age}\n"
        ))
        .unwrap()
    }

    #[test]
    fn the_cache_survives_in_its_file_and_a_damaged_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let config = MtaStsConfig::default();
        let sts = Sts::open(&config, dir.path(), 0);
        assert!(sts.is_empty());
        sts.store("a.test", "id1", &policy(3600), 1000);
        sts.store("b.test", "id2", &policy(1), 1000);
        let text = serde_json::to_vec(&*sts.policies.borrow()).unwrap();
        std::fs::create_dir_all(dir.path().join("mta-sts")).unwrap();
        std::fs::write(&sts.file, &text).unwrap();
        let again = Sts::open(&config, dir.path(), 0);
        let a = again.cached("a.test", 2000).unwrap();
        assert_eq!(
            (a.id.as_str(), a.parsed, a.fetched_ms),
            ("id1", Some(policy(3600)), 1000)
        );
        assert!(
            again.cached("b.test", 2001).is_none(),
            "expired after max_age"
        );
        // An entry whose policy no longer reads is dropped; the rest stay.
        let mut value: serde_json::Value = serde_json::from_slice(&text).unwrap();
        value["b.test"]["policy"] = "mode: strict".into();
        std::fs::write(&sts.file, serde_json::to_vec(&value).unwrap()).unwrap();
        let again = Sts::open(&config, dir.path(), 0);
        assert_eq!(again.len(), 1);
        // A torn file: set aside, empty cache, the start goes on.
        std::fs::write(&sts.file, &text[..text.len() / 2]).unwrap();
        let again = Sts::open(&config, dir.path(), 0);
        assert!(again.is_empty());
        assert!(dir.path().join("mta-sts/0.json.bad").exists());
    }

    #[test]
    fn a_full_cache_drops_the_policy_closest_to_expiring() {
        let dir = tempfile::tempdir().unwrap();
        let config = MtaStsConfig {
            cache_entries_max: gannet_core::config::Bounded(16),
            ..MtaStsConfig::default()
        };
        let sts = Sts::open(&config, dir.path(), 0);
        for i in 0..16 {
            sts.store(&format!("d{i}.test"), "x", &policy(1000 + i), 0);
        }
        sts.store("new.test", "x", &policy(5000), 0);
        assert_eq!(sts.len(), 16);
        assert!(sts.cached("d0.test", 1).is_none());
        assert!(sts.cached("d1.test", 1).is_some());
        assert!(sts.cached("new.test", 1).is_some());
    }
}
