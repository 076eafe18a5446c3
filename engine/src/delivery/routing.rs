//! Where a part goes: its site from a static route or DNS (MX hosts, or the implicit
//! MX, and their addresses), its egress source from its pool, and then the ready
//! queue of the shard that owns the site — this shard's, or another's through a
//! handoff ([`super::handoff`]). A full ready queue delays the part.

use std::rc::Rc;
use std::sync::Arc;

use super::Dispatcher;
use super::client::Response;
use super::settling::{delayed, settle};
use crate::metrics::ShardMetrics;
use gannet_core::clock::unix_ms;
use gannet_core::queue::{self, Part, Site};

/// Resolves a domain's site and moves the parts waiting for it on: to the site's
/// ready queue, or settled with the failure (a bounce for NXDOMAIN or null MX, a
/// transient failure for a DNS error). A site, and a domain that takes no mail, is
/// remembered as long as the DNS answers it comes from ([`Dispatcher::sites`]), so
/// that later parts of the domain find it without a lookup.
pub(super) async fn resolve(d: Rc<Dispatcher>, domain: Rc<str>) {
    ShardMetrics::add(&d.shard.metrics.delivery_site_lookups_total, 1);
    let resolved = {
        let _permit = d.lookups.acquire_permit(1).await;
        resolve_site(&d, &domain).await
    };
    let now = unix_ms();
    if let Some(until) = resolved.until {
        d.sites
            .borrow_mut()
            .insert(domain.to_string(), resolved.site.clone(), until, now);
    }
    let waiting = d.resolving.borrow_mut().remove(&domain).unwrap_or_default();
    for part in waiting {
        site_found(&d, part, &resolved.site, now);
    }
    d.wake.raise();
}

/// Moves a part on once its domain's site is known: placed, or settled with why the
/// domain has none.
pub(super) fn site_found(
    d: &Dispatcher,
    mut part: Part,
    site: &Result<Rc<Site>, Response>,
    now: u64,
) {
    match site {
        Ok(site) => {
            part.site = Some(site.clone());
            place(d, part, now);
        }
        Err(response) => {
            let results = part.rcpts.iter().map(|i| (*i, response.clone())).collect();
            settle(d, part, results, None, None);
        }
    }
}

/// A domain's site as DNS gives it, and until when it may be reused: the first
/// expiry of the answers it was made from (None for a failure that may pass: a DNS
/// error, or MX hosts without addresses).
struct Resolved {
    site: Result<Rc<Site>, Response>,
    until: Option<u64>,
}

/// The site of a domain from DNS: MX hosts (or the implicit MX) — only those its
/// MTA-STS policy names when it enforces one — and their addresses, with the TLS the
/// domain demands (DANE before MTA-STS, RFC 8461 2).
async fn resolve_site(d: &Rc<Dispatcher>, domain: &str) -> Resolved {
    use crate::dns::Mx;
    use gannet_core::tls_policy::{SiteTls, StsMode};
    let failed = |response: Response, until: Option<u64>| Resolved {
        site: Err(response),
        until,
    };
    let asking = d.resolver.asking();
    let (mut groups, mx_until) = match asking.mx_until(domain).await {
        Ok((Mx::Hosts(groups), until)) => (groups, until),
        Ok((Mx::NxDomain, until)) => {
            let why = format!("5.1.2 domain {domain} does not exist (NXDOMAIN)");
            return failed(Response::local(550, why), Some(until));
        }
        Ok((Mx::NoMail, until)) => {
            let why = format!("5.1.10 domain {domain} accepts no mail (null MX)");
            return failed(Response::local(556, why), Some(until));
        }
        Err(err) => return failed(Response::local(451, format!("4.4.3 {err}")), None),
    };
    let mut until = mx_until;
    let mut hosts = Vec::new();
    let mut host_names = Vec::new();
    let mut last_error = None;
    for name in groups.iter().flatten() {
        match asking.addresses_until(name).await {
            Ok((addresses, expires)) => {
                until = until.min(expires);
                for ip in addresses {
                    hosts.push(std::net::SocketAddr::new(ip, d.smtp_port));
                    host_names.push(name.clone());
                }
            }
            Err(err) => last_error = Some(err),
        }
    }
    let mut tls = SiteTls::Shaping;
    if d.dane
        && let Some((dane, dane_until)) = dane_hosts(d, &asking, domain, &host_names).await
    {
        until = until.min(dane_until);
        tls = SiteTls::Dane {
            domain: domain.into(),
            hosts: dane.into(),
        };
    } else if d.sts.enabled() {
        let applies = super::sts::applies(d, &asking, domain).await;
        until = until.min(applies.until_ms);
        if let Some(failure) = &applies.failure {
            super::tlsrpt::note_failure(
                d,
                domain,
                super::tlsrpt::Policy {
                    policy_type: "sts".into(),
                    ..Default::default()
                },
                super::tlsrpt::Failure {
                    result_type: failure.result_type().into(),
                    receiving_mx_hostname: String::new(),
                    receiving_ip: String::new(),
                    detail: failure.detail().to_string(),
                },
            );
        }
        match applies.policy {
            Some(policy) if policy.mode == StsMode::Enforce => {
                let mx_names: Vec<String> = groups.iter().flatten().cloned().collect();
                // Only the MX hosts the policy names (RFC 8461 4.1).
                for group in &mut groups {
                    group.retain(|host| policy.matches(host));
                }
                groups.retain(|g| !g.is_empty());
                let mut kept = host_names.iter().map(|h| policy.matches(h));
                hosts.retain(|_| kept.next().unwrap_or(false));
                host_names.retain(|h| policy.matches(h));
                if groups.is_empty() {
                    let why = format!(
                        "4.7.5 no MX host of {domain} matches its MTA-STS policy (mx: {})",
                        policy.mx.join(", ")
                    );
                    super::tlsrpt::note_failure(
                        d,
                        domain,
                        super::tlsrpt::Policy {
                            policy_type: "sts".into(),
                            policy_string: policy.lines(),
                            mx_host: policy.mx.clone(),
                        },
                        super::tlsrpt::Failure {
                            result_type: "validation-failure".into(),
                            receiving_mx_hostname: mx_names.join(" "),
                            receiving_ip: String::new(),
                            detail: "no MX host matches the policy".into(),
                        },
                    );
                    return failed(Response::local(451, why), None);
                }
                tls = SiteTls::Sts {
                    domain: domain.into(),
                    enforce: true,
                    policy: std::sync::Arc::new(policy),
                };
            }
            Some(policy) => {
                tls = SiteTls::Sts {
                    domain: domain.into(),
                    enforce: false,
                    policy: std::sync::Arc::new(policy),
                }
            }
            None => {}
        }
    }
    if hosts.is_empty() {
        let why = last_error.map_or_else(
            || "no MX host has an address".to_string(),
            |e| e.to_string(),
        );
        let why = format!("4.4.4 cannot reach {domain}: {why}");
        return failed(Response::local(451, why), None);
    }
    let name = crate::dns::site_name(&groups) + &tls.name_suffix();
    Resolved {
        site: Ok(Rc::new(Site {
            name,
            hosts,
            host_names,
            tls,
            auth: None,
        })),
        // A host whose lookup failed is missing from the site: not kept then.
        until: last_error.is_none().then_some(until),
    }
}

/// What DANE demands of each address of a site whose MX hosts are `host_names`
/// (one per address), and until when — None when DANE does not apply: the MX
/// answer was not DNSSEC-validated, or no host has a secure TLSA record set
/// (RFC 7672 2.2). TLSA records are asked only for hosts whose address answer was
/// validated too. A host whose TLSA lookup fails is not tried (2.2.3: it cannot be
/// told apart from an attacker hiding the records).
async fn dane_hosts(
    d: &Dispatcher,
    asking: &crate::dns::Asking<'_>,
    domain: &str,
    host_names: &[String],
) -> Option<(Vec<gannet_core::tls_policy::HostDane>, u64)> {
    use gannet_core::tls_policy::HostDane;
    if !asking.mx_secure(domain).await.unwrap_or(false) {
        return None;
    }
    let mut until = u64::MAX;
    let mut by_host: Vec<(&str, HostDane)> = Vec::new();
    for name in host_names {
        if by_host.iter().any(|(n, _)| n == name) {
            continue;
        }
        let mut demand = HostDane::Absent;
        if asking.addresses_secure(name).await.unwrap_or(false) {
            let question = format!("_{}._tcp.{name}", d.smtp_port);
            match asking.tlsa_until(&question).await {
                Ok((records, true, expires)) if !records.is_empty() => {
                    until = until.min(expires);
                    let usable: Vec<_> = records.into_iter().filter(|r| r.usable()).collect();
                    demand = if usable.is_empty() {
                        HostDane::EncryptOnly
                    } else {
                        HostDane::Authenticate(usable.into())
                    };
                }
                // Securely none, or an unsigned zone: as without DANE.
                Ok(_) => {}
                Err(_) => {
                    demand = HostDane::Unreachable;
                    until = until.min(gannet_core::clock::unix_ms() + 60_000);
                }
            }
        }
        by_host.push((name, demand));
    }
    if by_host.iter().all(|(_, h)| *h == HostDane::Absent) {
        return None;
    }
    let per_address = host_names
        .iter()
        .map(|name| {
            (by_host.iter())
                .find(|(n, _)| n == name)
                .map_or(HostDane::Absent, |(_, h)| h.clone())
        })
        .collect();
    Some((per_address, until))
}

/// Puts a part whose site is known where it is delivered: this shard's ready queue
/// when the site is ours, else the inbox of the shard that owns the site. A full
/// inbox means the owner is behind; the part is then delivered here instead of
/// waiting (the site's limits are per shard, so this can exceed them briefly).
pub(super) fn place(d: &Dispatcher, mut part: Part, now: u64) {
    let shard = &d.shard;
    let mut site = part.site.clone().expect("placed parts have a site");
    if let Some(own) = queue_tls(d, &part, &site) {
        site = own;
        part.site = Some(site.clone());
    }
    // Past its maximum age or its own expiry (a part put off untried, or due
    // again): expired now, not tried once more.
    let expired = {
        let retry = d.retry_for(&part);
        queue::settle::expired(&part.message.borrow(), now, retry.max_age_ms)
    };
    if expired {
        let why = Response::local(
            451,
            "4.4.7 the message expired before it could be delivered",
        );
        let results = part.rcpts.iter().map(|i| (*i, why.clone())).collect();
        settle(d, part, results, None, None);
        return;
    }
    // A part that was waiting for its site when an operator's bounce was made.
    if let Some(bounce) = d.admin_bounce(&part, now) {
        super::settling::admin_bounce(d, part, &bounce);
        return;
    }
    if let Some(hold) = d.hold_for(&part, &site, now) {
        held_by_rule(d, part, &hold, now);
        return;
    }
    let chosen = d.choose_source(part.message.borrow().meta("pool"), &site, now);
    let egress = match chosen {
        Ok(egress) => egress,
        Err(provider) => {
            warmup_spent(d, part, &provider, now);
            return;
        }
    };
    part.egress = Some(egress.clone());
    let mesh = &shard.shared.mesh;
    let owner = crate::mesh::owner(&site.name, mesh.shards());
    if owner == shard.id {
        push_ready(d, part, now);
        return;
    }
    let token = d.next_token.get();
    d.next_token.set(token + 1);
    let handoff = {
        let m = part.message.borrow();
        let Some(stored) = shard.spool.get(m.id) else {
            drop(m);
            push_ready(d, part, now);
            return;
        };
        gannet_core::handoff::Handoff {
            from: shard.id,
            token,
            sender: m.sender.clone(),
            recipients: part
                .rcpts
                .iter()
                .map(|i| m.recipients[*i as usize].clone())
                .collect(),
            // The one copy of the body a hop costs (the mapping stays on this shard).
            body: Arc::new(stored.get().body.to_vec()),
            site: Site::clone(&site),
            egress: egress.name.clone(),
            tenant: m.meta("tenant").map(str::to_string),
            campaign: m.meta("campaign").map(str::to_string),
        }
    };
    match mesh.send(owner, crate::notes::Note::Handoff(Box::new(handoff))) {
        Ok(()) => {
            ShardMetrics::add(&shard.metrics.mesh_handoffs_total, 1);
            d.handed.borrow_mut().insert(token, part);
        }
        Err(_) => {
            ShardMetrics::add(&shard.metrics.mesh_inbox_full_total, 1);
            push_ready(d, part, now);
        }
    }
}

/// The site as a scheduled queue's rule with a TLS mode (`delivery.queues`) wants it
/// for this part: the same hosts, the rule's mode, a ready queue of its own. None
/// when no rule sets one, or the destination's own MTA-STS enforce or DANE stands.
/// (A site is made per part placed under such a rule: rare, and a site shared with
/// the DNS cache would need invalidating with it.)
fn queue_tls(d: &Dispatcher, part: &Part, site: &Rc<Site>) -> Option<Rc<Site>> {
    use gannet_core::tls_policy::SiteTls;
    let mode = {
        let queues = d.queues.borrow();
        let rules = &queues.shaping_table().queue_rules;
        if rules.is_empty() {
            return None;
        }
        let m = part.message.borrow();
        let (tenant, campaign) = (m.meta("tenant"), m.meta("campaign"));
        (rules.iter())
            .filter(|r| r.tls.is_some() && r.applies(tenant, campaign, &part.domain))
            .filter_map(|r| r.tls)
            .next_back()?
    };
    if matches!(
        site.tls,
        SiteTls::Sts { enforce: true, .. } | SiteTls::Dane { .. }
    ) {
        return None;
    }
    let mut own = Site::clone(site);
    own.name = format!(
        "{} (tls {})",
        site.name,
        format!("{mode:?}").to_ascii_lowercase()
    );
    own.tls = SiteTls::Mode(mode);
    Some(Rc::new(own))
}

/// Puts a part in this shard's ready queue, or delays it when the queue is full.
fn push_ready(d: &Dispatcher, part: Part, now: u64) {
    let refused = d.queues.borrow_mut().push_ready(part);
    if let Err(part) = refused {
        delay(d, part, now);
    }
}

/// The reply recorded for a part put off because its ready queue was full.
fn ready_queue_full() -> Response {
    Response::local(451, "4.4.5 ready queue full (max_ready); delayed")
}

/// Puts off a part whose pool's sources have all sent their warm-up budget toward
/// its site's provider today: Delayed, due in the first minute of the next day.
fn warmup_spent(d: &Dispatcher, part: Part, provider: &str, now: u64) {
    let pool = part
        .message
        .borrow()
        .meta("pool")
        .unwrap_or("default")
        .to_string();
    let why = Response::local(
        451,
        format!(
            "4.7.0 IP warm-up: every source of pool {pool} has sent its budget for today to provider {provider}; delayed to tomorrow"
        ),
    );
    ShardMetrics::add(&d.shard.metrics.delivery_warmup_delayed_total, 1);
    let due = gannet_core::warmup::next_day_ms(now) + fastrand::u64(0..60_000);
    put_off(d, part, &why, due, now);
}

/// Records a part put off untried (Delayed, `why`) and returns it to the scheduled
/// queue, due at `due_ms`; its site is looked up again then.
fn put_off(d: &Dispatcher, mut part: Part, why: &Response, due_ms: u64, now: u64) {
    delayed(d, &part, why, now);
    part.due_ms = due_ms;
    part.message
        .borrow_mut()
        .set_part_due(&part.domain, Some(part.due_ms));
    part.site = None;
    part.egress = None;
    d.queues.borrow_mut().schedule(part);
}

/// Puts off a part whose tenant or campaign a response rule holds back from its
/// site's provider: Delayed, due when the hold ends.
pub(super) fn held_by_rule(
    d: &Dispatcher,
    part: Part,
    hold: &gannet_core::adaptive::Hold,
    now: u64,
) {
    let why = Response::local(
        451,
        format!(
            "4.7.0 {}'s mail to this provider is held by response rule {} until {}",
            hold.who(),
            hold.rule,
            gannet_core::clock::rfc3339(hold.until_ms)
        ),
    );
    let due = hold.until_ms.max(now) + fastrand::u64(0..1000);
    put_off(d, part, &why, due, now);
}

/// Returns a part whose ready queue was full to the scheduled queue, untried.
pub(super) fn delay(d: &Dispatcher, part: Part, now: u64) {
    let due = d.delay_due(&part, now);
    put_off(d, part, &ready_queue_full(), due, now);
}
