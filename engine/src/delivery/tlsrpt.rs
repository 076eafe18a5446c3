//! TLS-RPT (RFC 8460): what happened to TLS toward each domain under MTA-STS or
//! DANE, counted per shard and period (a UTC day) and reported to the domain.
//!
//! Counting is in memory (`Recorder::record`, on the executor, no lock): per policy
//! domain, successful sessions and failed ones by failure (result type, MX host, its
//! address, what went wrong). A shard's task writes its counts of the period to
//! `<data_dir>/tlsrpt/<period start>/<shard>.json` every few seconds when they
//! changed (atomically; a crash loses at most those seconds), and once more when
//! the period ends. Shard 0 sends the reports: `send_after_secs` after a period
//! ended it merges every shard's file, looks up each domain's `_smtp._tls` record,
//! and sends the JSON report (gzip) to each of its addresses — `mailto:` as a
//! message through gannet's own queue (spooled durably first), `https:` as a POST.
//! Domains done are listed in the period's `done.json` (so a restart sends none
//! twice), and the period's directory goes once all are; one still failing a day
//! after its period is given up.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Dispatcher;
use crate::metrics::ShardMetrics;
use gannet_core::clock::unix_ms;
use gannet_core::config::TlsReportingConfig;

/// One kind of failed session (RFC 8460 4.4 `failure-details`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Failure {
    pub result_type: String,
    pub receiving_mx_hostname: String,
    pub receiving_ip: String,
    /// What went wrong, in words (`additional-information`).
    pub detail: String,
}

/// The policy a domain's sessions were held to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// `sts`, `tlsa` or `no-policy-found`.
    pub policy_type: String,
    pub policy_string: Vec<String>,
    /// MTA-STS: the policy's `mx` patterns; DANE: the MX hosts.
    pub mx_host: Vec<String>,
}

/// One domain's counts in a period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub policy: Policy,
    pub successes: u64,
    /// Failures as a list (a map with struct keys has no JSON form).
    pub failures: Vec<(Failure, u64)>,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        // A shard that knew the policy (not only that its fetch failed) names it.
        if self.policy.policy_type.is_empty()
            || (self.policy.policy_string.is_empty() && !other.policy.policy_string.is_empty())
        {
            self.policy = other.policy.clone();
        }
        self.successes += other.successes;
        for (failure, n) in &other.failures {
            self.fail(failure, *n);
        }
    }

    fn fail(&mut self, failure: &Failure, n: u64) {
        match self.failures.iter_mut().find(|(f, _)| f == failure) {
            Some((_, count)) => *count += n,
            None => self.failures.push((failure.clone(), n)),
        }
    }
}

/// Distinct failures kept per domain and period (more are folded into the last).
const FAILURES_PER_DOMAIN_MAX: usize = 100;

/// What a session (or a policy lookup) came to.
#[derive(Debug)]
pub enum Outcome {
    Success,
    Failure(Failure),
}

/// A shard's counts of the period running.
#[derive(Debug)]
pub struct Recorder {
    config: TlsReportingConfig,
    shard: usize,
    dir: PathBuf,
    /// Start of the period counted (unix seconds).
    period: Cell<u64>,
    counts: RefCell<HashMap<String, Counts>>,
    /// Counts of a period that ended, not yet written.
    ended: RefCell<Option<(u64, HashMap<String, Counts>)>>,
    dirty: Cell<bool>,
}

impl Recorder {
    pub fn new(config: &TlsReportingConfig, data_dir: &Path, shard: usize) -> Recorder {
        let recorder = Recorder {
            config: config.clone(),
            shard,
            dir: data_dir.join("tlsrpt"),
            period: Cell::new(0),
            counts: RefCell::new(HashMap::new()),
            ended: RefCell::new(None),
            dirty: Cell::new(false),
        };
        // Counts this shard wrote earlier in the running period go on from there.
        let period = recorder.period_of(unix_ms() / 1000);
        recorder.period.set(period);
        let file = recorder.file(period, shard);
        if let Ok(text) = std::fs::read(&file) {
            match serde_json::from_slice(&text) {
                Ok(counts) => *recorder.counts.borrow_mut() = counts,
                Err(e) => {
                    tracing::warn!(file = %file.display(), "TLS-RPT counts damaged ({e}); counting again from zero")
                }
            }
        }
        recorder
    }

    /// Moves on to period `next`. The ended period's counts are kept for writing
    /// only when some of them are not on disk yet: written again unchanged, they
    /// could bring back a period shard 0 has already reported and removed, and it
    /// would be reported twice.
    fn end_period(&self, next: u64) {
        let ended = std::mem::take(&mut *self.counts.borrow_mut());
        if self.dirty.replace(false) {
            *self.ended.borrow_mut() = Some((self.period.get(), ended));
        }
        self.period.set(next);
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    fn period_of(&self, secs: u64) -> u64 {
        let p = self.config.period_secs.get();
        secs / p * p
    }

    fn file(&self, period: u64, shard: usize) -> PathBuf {
        self.dir
            .join(period.to_string())
            .join(format!("{shard}.json"))
    }

    /// Counts one session (or policy lookup) toward `domain` under `policy`.
    pub fn record(&self, domain: &str, policy: impl FnOnce() -> Policy, outcome: Outcome) {
        if !self.config.enabled {
            return;
        }
        let period = self.period_of(unix_ms() / 1000);
        if period != self.period.get() {
            self.end_period(period);
        }
        let mut counts = self.counts.borrow_mut();
        if !counts.contains_key(domain) && counts.len() >= self.config.domains_max.usize() {
            return;
        }
        let entry = counts.entry(domain.to_string()).or_default();
        if entry.policy.policy_string.is_empty() {
            // First counted, or first counted before its policy was known (a fetch
            // failure): the policy the domain's sessions are held to.
            let known = policy();
            if entry.policy.policy_type.is_empty() || !known.policy_string.is_empty() {
                entry.policy = known;
            }
        }
        match outcome {
            Outcome::Success => entry.successes += 1,
            Outcome::Failure(failure) => {
                if entry.failures.len() < FAILURES_PER_DOMAIN_MAX
                    || entry.failures.iter().any(|(f, _)| *f == failure)
                {
                    entry.fail(&failure, 1);
                } else if let Some((_, n)) = entry.failures.last_mut() {
                    *n += 1;
                }
            }
        }
        self.dirty.set(true);
    }
}

/// Counts one connection attempt to the `host`-th address of `site` (named
/// `host_name`) if the site is under a policy: a TLS session as the policy asks is a
/// success, a failure that is about TLS is counted with its result type; other
/// failures (no TCP connection, a refused banner) are not TLS's and not counted.
/// `checked` is what an MTA-STS testing-mode check found wrong with the certificate.
pub(super) fn note_session(
    d: &Dispatcher,
    site: &gannet_core::queue::Site,
    host: std::net::SocketAddr,
    host_name: &str,
    attempt: &Result<super::client::Session, super::client::ClientError>,
    checked: Option<&super::client::CheckSlot>,
) {
    use super::client::ClientError;
    let Some(domain) = site.tls.policy_domain() else {
        return;
    };
    if !d.tlsrpt.enabled() {
        return;
    }
    let failure = |result_type: &str, detail: String| {
        Outcome::Failure(Failure {
            result_type: result_type.to_string(),
            receiving_mx_hostname: host_name.to_string(),
            receiving_ip: host.ip().to_string(),
            detail,
        })
    };
    let found = checked.and_then(|slot| {
        slot.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    });
    let outcome = match attempt {
        Ok(session) if session.tls.is_none() => failure(
            "starttls-not-supported",
            "the server did not offer STARTTLS".to_string(),
        ),
        Ok(_) => match found {
            Some((result_type, detail)) => failure(result_type, detail),
            None => Outcome::Success,
        },
        Err(ClientError::TlsRequired {
            result: Some(result_type),
            detail,
        }) => failure(result_type, detail.clone()),
        Err(ClientError::Handshake(e)) => failure(super::client::tls_result_type(e), e.to_string()),
        Err(_) => return,
    };
    d.tlsrpt.record(domain, || policy_of(site), outcome);
}

/// Counts a host DANE could not try: its TLSA records could not be read.
pub(super) fn note_unreachable(
    d: &Dispatcher,
    site: &gannet_core::queue::Site,
    host: std::net::SocketAddr,
    host_name: &str,
) {
    let Some(domain) = site.tls.policy_domain() else {
        return;
    };
    let failure = Failure {
        result_type: "dnssec-invalid".into(),
        receiving_mx_hostname: host_name.to_string(),
        receiving_ip: host.ip().to_string(),
        detail: "the TLSA records could not be read".into(),
    };
    d.tlsrpt
        .record(domain, || policy_of(site), Outcome::Failure(failure));
}

/// Counts a failure that happened before any session: a policy that could not be
/// fetched, MX hosts the policy does not name, TLSA records that could not be read.
pub(super) fn note_failure(d: &Dispatcher, domain: &str, policy: Policy, failure: Failure) {
    d.tlsrpt
        .record(domain, || policy, Outcome::Failure(failure));
}

/// The policy a site is under, as a report names it.
fn policy_of(site: &gannet_core::queue::Site) -> Policy {
    use gannet_core::tls_policy::{HostDane, SiteTls};
    match &site.tls {
        SiteTls::Sts { policy, .. } => Policy {
            policy_type: "sts".into(),
            policy_string: policy.lines(),
            mx_host: policy.mx.clone(),
        },
        SiteTls::Dane { hosts, .. } => {
            let mut strings = Vec::new();
            for host in hosts.iter() {
                if let HostDane::Authenticate(records) = host {
                    for r in records.iter() {
                        let data: String = r.data.iter().map(|b| format!("{b:02x}")).collect();
                        let text = format!("{} {} {} {data}", r.usage, r.selector, r.matching);
                        if !strings.contains(&text) {
                            strings.push(text);
                        }
                    }
                }
            }
            let mut mx_host: Vec<String> = site.host_names.clone();
            mx_host.dedup();
            Policy {
                policy_type: "tlsa".into(),
                policy_string: strings,
                mx_host,
            }
        }
        _ => Policy::default(),
    }
}

/// The shard's TLS-RPT task: writes its counts, and on shard 0 sends the reports
/// of periods that ended. Runs until the shard stops.
pub async fn run(d: Rc<Dispatcher>) {
    let r = &d.tlsrpt;
    if !r.config.enabled {
        return;
    }
    let period = r.config.period_secs.get();
    let every = Duration::from_secs((period / 4).clamp(1, 5));
    let shard = &d.shard;
    while !shard.shutdown.is_raised() {
        shard.shutdown.sleep(every).await;
        // A period that ended with no session since: its counts move on too.
        let now_period = r.period_of(unix_ms() / 1000);
        if now_period != r.period.get() && r.ended.borrow().is_none() {
            r.end_period(now_period);
        }
        write_counts(&d).await;
        if r.shard == 0 {
            send_due(&d).await;
        }
    }
    write_counts(&d).await;
}

/// Writes what changed: an ended period's final counts, the running period's.
async fn write_counts(d: &Dispatcher) {
    let r = &d.tlsrpt;
    let ended = r.ended.borrow_mut().take();
    if let Some((period, counts)) = ended
        && !counts.is_empty()
    {
        write_json(r.file(period, r.shard), &counts).await;
    }
    if r.dirty.replace(false) {
        let counts = r.counts.borrow().clone();
        write_json(r.file(r.period.get(), r.shard), &counts).await;
    }
}

/// Writes `value` as JSON to `file`, atomically and durably, off the executor.
async fn write_json<T: Serialize>(file: PathBuf, value: &T) {
    let Ok(text) = serde_json::to_vec(value) else {
        return;
    };
    let shown = file.display().to_string();
    if let Err(e) = crate::io::write_file_durably(file, text).await {
        tracing::warn!(file = %shown, "TLS-RPT counts not written: {e}");
    }
}

/// Sends the reports of every period whose time has come.
async fn send_due(d: &Dispatcher) {
    let r = &d.tlsrpt;
    let now = unix_ms() / 1000;
    let Ok(entries) = std::fs::read_dir(&r.dir) else {
        return;
    };
    let mut due: Vec<u64> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .filter(|start| start + r.config.period_secs.get() + r.config.send_after_secs.get() <= now)
        .collect();
    due.sort_unstable();
    for start in due {
        send_period(d, start, now).await;
    }
}

/// Sends one period's reports (those not sent yet), and forgets the period once
/// every domain is done or a day has passed.
async fn send_period(d: &Dispatcher, start: u64, now: u64) {
    let r = &d.tlsrpt;
    let dir = r.dir.join(start.to_string());
    let mut merged: BTreeMap<String, Counts> = BTreeMap::new();
    let mut done: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        if path.file_name().is_some_and(|n| n == "done.json") {
            done = serde_json::from_slice(&text).unwrap_or_default();
            continue;
        }
        match serde_json::from_slice::<HashMap<String, Counts>>(&text) {
            Ok(counts) => {
                for (domain, c) in counts {
                    merged.entry(domain).or_default().add(&c);
                }
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), "TLS-RPT counts damaged ({e}); left out of the report")
            }
        }
    }
    let end = start + r.config.period_secs.get();
    let mut changed = false;
    for (domain, counts) in &merged {
        if done.contains(domain) {
            continue;
        }
        if send_domain(d, domain, counts, start, end).await {
            done.push(domain.clone());
            changed = true;
        }
    }
    let give_up = now > end + 86_400;
    if done.len() >= merged.len() || give_up {
        if give_up && done.len() < merged.len() {
            tracing::warn!(
                period = start,
                "TLS-RPT reports still unsent a day after their period; given up"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    } else if changed {
        write_json(dir.join("done.json"), &done).await;
    }
}

/// Sends `domain`'s report to each of its addresses; true when it is done (sent
/// to every address, or the domain asks for none).
async fn send_domain(d: &Dispatcher, domain: &str, counts: &Counts, start: u64, end: u64) -> bool {
    let asking = d.resolver.asking();
    let rua = match asking.txt_until(&format!("_smtp._tls.{domain}")).await {
        Ok((records, _)) => gannet_core::tls_policy::tlsrpt_rua(&records),
        // Asked again at the next round.
        Err(_) => return false,
    };
    let Some(rua) = rua else {
        return true;
    };
    let org = organization(d);
    let report_id = format!(
        "{}_{domain}@{org}",
        gannet_core::clock::rfc3339(start * 1000)
    );
    let json = report_json(&org, &contact(d), &report_id, domain, counts, start, end);
    let gz = gzip(json.as_bytes());
    let mut all = true;
    for uri in &rua {
        let mailto = uri
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("mailto:"));
        let sent = match uri.get(7..) {
            Some(address) if mailto => mail(d, address, domain, &report_id, &gz, start, end).await,
            _ => post(d, uri, &gz).await,
        };
        match sent {
            Ok(()) => ShardMetrics::add(&d.shard.metrics.delivery_tls_reports_sent_total, 1),
            Err(e) => {
                all = false;
                ShardMetrics::add(&d.shard.metrics.delivery_tls_report_failures_total, 1);
                tracing::warn!(domain, uri = %uri, "TLS-RPT report not sent: {e}");
            }
        }
    }
    all
}

fn organization(d: &Dispatcher) -> String {
    let config = d.shard.config();
    match config.delivery.tls_reporting.organization_name.as_str() {
        "" => config.server.hostname.clone(),
        name => name.to_string(),
    }
}

fn contact(d: &Dispatcher) -> String {
    let config = d.shard.config();
    match config.delivery.tls_reporting.contact_info.as_str() {
        "" => format!("postmaster@{}", config.server.hostname),
        contact => contact.to_string(),
    }
}

/// The report (RFC 8460 4.4).
pub fn report_json(
    org: &str,
    contact: &str,
    report_id: &str,
    domain: &str,
    counts: &Counts,
    start: u64,
    end: u64,
) -> String {
    let failures: Vec<serde_json::Value> = (counts.failures.iter())
        .map(|(f, n)| {
            let mut detail = serde_json::json!({
                "result-type": f.result_type,
                "failed-session-count": n,
            });
            for (key, value) in [
                ("receiving-mx-hostname", &f.receiving_mx_hostname),
                ("receiving-ip", &f.receiving_ip),
                ("additional-information", &f.detail),
            ] {
                if !value.is_empty() {
                    detail[key] = value.as_str().into();
                }
            }
            detail
        })
        .collect();
    let failed: u64 = counts.failures.iter().map(|(_, n)| n).sum();
    let mut policy = serde_json::json!({
        "policy-type": counts.policy.policy_type,
        "policy-domain": domain,
    });
    if !counts.policy.policy_string.is_empty() {
        policy["policy-string"] = counts.policy.policy_string.clone().into();
    }
    if !counts.policy.mx_host.is_empty() {
        policy["mx-host"] = counts.policy.mx_host.clone().into();
    }
    serde_json::json!({
        "organization-name": org,
        "date-range": {
            "start-datetime": gannet_core::clock::rfc3339(start * 1000),
            "end-datetime": gannet_core::clock::rfc3339(end * 1000),
        },
        "contact-info": contact,
        "report-id": report_id,
        "policies": [{
            "policy": policy,
            "summary": {
                "total-successful-session-count": counts.successes,
                "total-failure-session-count": failed,
            },
            "failure-details": failures,
        }],
    })
    .to_string()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(bytes);
    encoder.finish().unwrap_or_default()
}

/// POSTs the report to an `https:` address.
async fn post(d: &Dispatcher, uri: &str, gz: &[u8]) -> Result<(), String> {
    let rest = uri.get(8..).ok_or("not an https URI")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("bad port in {uri}"))?,
        ),
        None => (authority, 443),
    };
    let asking = d.resolver.asking();
    let (addresses, _) = asking
        .addresses_until(host)
        .await
        .map_err(|e| e.to_string())?;
    let ip = addresses
        .first()
        .ok_or_else(|| format!("{host} has no address"))?;
    let request = crate::io::https::Request {
        method: hyper::Method::POST,
        host,
        path,
        headers: &[("content-type", "application/tlsrpt+gzip")],
        body: gz.to_vec(),
    };
    let reply = crate::io::https::send(
        std::net::SocketAddr::new(*ip, port),
        d.tls.verified.clone(),
        request,
        Duration::from_secs(60),
        64 << 10,
    )
    .await
    .map_err(|e| e.to_string())?;
    if (200..300).contains(&reply.status) {
        Ok(())
    } else {
        Err(format!("HTTP {}", reply.status))
    }
}

/// Mails the report to `address` through this shard's queue (RFC 8460 5.3),
/// durably spooled before the domain is marked done.
async fn mail(
    d: &Dispatcher,
    address: &str,
    domain: &str,
    report_id: &str,
    gz: &[u8],
    start: u64,
    end: u64,
) -> Result<(), String> {
    use base64::Engine as _;
    let address = address.split('?').next().unwrap_or(address).trim();
    let parsed = gannet_core::address::parse_path(address, false)
        .map_err(|_| format!("mailto:{address} is not a mail address"))?;
    let config = d.shard.config();
    let hostname = &config.server.hostname;
    let sender = match config.delivery.tls_reporting.sender.as_str() {
        "" => format!("noreply-smtp-tls-reporting@{hostname}"),
        sender => sender.to_string(),
    };
    let org = organization(d);
    let id = d.shard.spool.next_id();
    let filename = format!("{org}!{domain}!{start}!{end}!{id}.json.gz");
    let encoded = base64::engine::general_purpose::STANDARD.encode(gz);
    let mut body = String::new();
    for line in [
        format!("From: <{sender}>"),
        format!("To: <{address}>"),
        format!(
            "Date: {}",
            gannet_core::message::rfc5322_date(unix_ms() / 1000)
        ),
        format!("Message-ID: <{id}@{hostname}>"),
        format!("Subject: Report Domain: {domain} Submitter: {org} Report-ID: <{report_id}>"),
        format!("TLS-Report-Domain: {domain}"),
        format!("TLS-Report-Submitter: {org}"),
        "MIME-Version: 1.0".to_string(),
        format!("Content-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"tlsrpt-{id}\""),
        String::new(),
        format!("--tlsrpt-{id}"),
        "Content-Type: text/plain; charset=us-ascii".to_string(),
        String::new(),
        format!("This is an aggregate TLS report from {org} for {domain}."),
        String::new(),
        format!("--tlsrpt-{id}"),
        "Content-Type: application/tlsrpt+gzip".to_string(),
        "Content-Transfer-Encoding: base64".to_string(),
        format!("Content-Disposition: attachment; filename=\"{filename}\""),
        String::new(),
    ] {
        body.push_str(&line);
        body.push_str("\r\n");
    }
    for chunk in encoded.as_bytes().chunks(76) {
        body.push_str(&String::from_utf8_lossy(chunk));
        body.push_str("\r\n");
    }
    body.push_str(&format!("--tlsrpt-{id}--\r\n"));
    let sender_domain = sender
        .rsplit_once('@')
        .map_or("", |(_, d)| d)
        .to_ascii_lowercase();
    let own = super::dsn::Own {
        id,
        sender: sender.clone(),
        recipients: vec![parsed.text],
        meta: vec![("pool".to_string(), "default".to_string())],
        tenant: None,
        pool: "default",
        queue: gannet_core::queue::scheduled_queue(None, None, &sender_domain, None),
        body: body.into_bytes(),
        protocol: "TLSRPT",
        now: unix_ms(),
    };
    let ticket = d.spool_own(own).map_err(|e| e.to_string())?;
    d.shard
        .spool
        .durable(ticket)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(result_type: &str) -> Failure {
        Failure {
            result_type: result_type.into(),
            receiving_mx_hostname: "mx.a.test".into(),
            receiving_ip: "192.0.2.1".into(),
            detail: String::new(),
        }
    }

    #[test]
    fn an_ended_period_is_written_again_only_with_counts_not_yet_written() {
        let dir = tempfile::tempdir().unwrap();
        let r = Recorder::new(&TlsReportingConfig::default(), dir.path(), 0);
        let sts = || Policy {
            policy_type: "sts".into(),
            policy_string: vec!["version: STSv1".into()],
            mx_host: vec!["*.a.test".into()],
        };
        let first = r.period.get();
        r.record("a.test", sts, Outcome::Success);
        // Written (as write_counts does), then the period ends with nothing new:
        // nothing is queued that could bring the period back once reported.
        assert!(r.dirty.replace(false));
        r.end_period(first + 86_400);
        assert!(r.ended.borrow().is_none());
        assert!(r.counts.borrow().is_empty());
        // A session counted since the last write (back in the running period, which
        // `record` takes from the clock): the ended period goes out once more.
        r.period.set(first);
        r.record("a.test", sts, Outcome::Success);
        r.end_period(first + 86_400);
        let ended = r.ended.borrow();
        let (period, counts) = ended.as_ref().unwrap();
        assert_eq!(*period, first);
        assert_eq!(counts["a.test"].successes, 1);
    }

    #[test]
    fn counts_are_bounded_and_merge_across_shards_into_one_report() {
        let dir = tempfile::tempdir().unwrap();
        let config = TlsReportingConfig {
            domains_max: gannet_core::config::Bounded(2),
            ..TlsReportingConfig::default()
        };
        let r = Recorder::new(&config, dir.path(), 0);
        let sts = || Policy {
            policy_type: "sts".into(),
            policy_string: vec!["version: STSv1".into()],
            mx_host: vec!["*.a.test".into()],
        };
        r.record("a.test", sts, Outcome::Success);
        r.record(
            "a.test",
            sts,
            Outcome::Failure(failure("certificate-expired")),
        );
        r.record(
            "a.test",
            sts,
            Outcome::Failure(failure("certificate-expired")),
        );
        r.record("b.test", sts, Outcome::Success);
        r.record("c.test", sts, Outcome::Success);
        let counts = r.counts.borrow().clone();
        assert_eq!(counts.len(), 2, "c.test is past domains_max");
        let mut a = counts["a.test"].clone();
        assert_eq!((a.successes, a.failures.len(), a.failures[0].1), (1, 1, 2));
        // Another shard's counts of the same domain add up.
        let mut other = Counts {
            successes: 4,
            ..Counts::default()
        };
        other.fail(&failure("starttls-not-supported"), 1);
        a.add(&other);
        let report: serde_json::Value = serde_json::from_str(&report_json(
            "org.test",
            "postmaster@org.test",
            "id-1",
            "a.test",
            &a,
            86_400,
            172_800,
        ))
        .unwrap();
        assert_eq!(
            report["date-range"]["start-datetime"],
            "1970-01-02T00:00:00Z"
        );
        assert_eq!(report["date-range"]["end-datetime"], "1970-01-03T00:00:00Z");
        let policy = &report["policies"][0];
        assert_eq!(policy["policy"]["policy-domain"], "a.test");
        assert_eq!(policy["policy"]["mx-host"][0], "*.a.test");
        assert_eq!(policy["summary"]["total-successful-session-count"], 5);
        assert_eq!(policy["summary"]["total-failure-session-count"], 3);
        let details = policy["failure-details"].as_array().unwrap();
        assert_eq!(details.len(), 2);
        assert_eq!(details[1]["result-type"], "starttls-not-supported");
        assert!(
            details[0].get("additional-information").is_none(),
            "empty fields left out"
        );
        let gz = gzip(b"{}");
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    }
}
