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
use gannet_core::queue::{Part, Site};

/// Resolves a domain's site and moves the parts waiting for it on: to the site's
/// ready queue, or settled with the failure (a bounce for NXDOMAIN or null MX, a
/// transient failure for a DNS error).
pub(super) async fn resolve(d: Rc<Dispatcher>, domain: String) {
    let result = {
        let _permit = d.lookups.acquire_permit(1).await;
        resolve_site(&d.resolver, &domain, d.smtp_port).await
    };
    let waiting = d.resolving.borrow_mut().remove(&domain).unwrap_or_default();
    let now = unix_ms();
    for mut part in waiting {
        match &result {
            Ok(site) => {
                part.site = Some(site.clone());
                place(&d, part, now);
            }
            Err(response) => {
                let results = part.rcpts.iter().map(|i| (*i, response.clone())).collect();
                settle(&d, part, results, None, None);
            }
        }
    }
    d.wake.raise();
}

/// The site of a domain from DNS: MX hosts (or the implicit MX) and their addresses.
async fn resolve_site(
    resolver: &crate::dns::Resolver,
    domain: &str,
    port: u16,
) -> Result<Rc<Site>, Response> {
    use crate::dns::Mx;
    let groups = match resolver.mx(domain).await {
        Ok(Mx::Hosts(groups)) => groups,
        Ok(Mx::NxDomain) => {
            return Err(Response::local(
                550,
                format!("5.1.2 domain {domain} does not exist (NXDOMAIN)"),
            ));
        }
        Ok(Mx::NoMail) => {
            return Err(Response::local(
                556,
                format!("5.1.10 domain {domain} accepts no mail (null MX)"),
            ));
        }
        Err(err) => return Err(Response::local(451, format!("4.4.3 {err}"))),
    };
    let mut hosts = Vec::new();
    let mut host_names = Vec::new();
    let mut last_error = None;
    for name in groups.iter().flatten() {
        match resolver.addresses(name).await {
            Ok(addresses) => {
                for ip in addresses {
                    hosts.push(std::net::SocketAddr::new(ip, port));
                    host_names.push(name.clone());
                }
            }
            Err(err) => last_error = Some(err),
        }
    }
    if hosts.is_empty() {
        let why = last_error.map_or_else(
            || "no MX host has an address".to_string(),
            |e| e.to_string(),
        );
        return Err(Response::local(
            451,
            format!("4.4.4 cannot reach {domain}: {why}"),
        ));
    }
    Ok(Rc::new(Site {
        name: crate::dns::site_name(&groups),
        hosts,
        host_names,
    }))
}

/// Puts a part whose site is known where it is delivered: this shard's ready queue
/// when the site is ours, else the inbox of the shard that owns the site. A full
/// inbox means the owner is behind; the part is then delivered here instead of
/// waiting (the site's limits are per shard, so this can exceed them briefly).
pub(super) fn place(d: &Dispatcher, mut part: Part, now: u64) {
    let shard = &d.shard;
    let site = part.site.clone().expect("placed parts have a site");
    let egress = d.choose_source(part.message.borrow().meta("pool"));
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
            site: gannet_core::handoff::SiteSpec {
                name: site.name.clone(),
                hosts: site.hosts.clone(),
                host_names: site.host_names.clone(),
            },
            egress: egress.name.clone(),
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

/// Returns a part whose ready queue was full to the scheduled queue, untried.
pub(super) fn delay(d: &Dispatcher, mut part: Part, now: u64) {
    delayed(d, &part, &ready_queue_full(), now);
    part.due_ms = d.delay_due(part.attempts, now);
    part.message
        .borrow_mut()
        .set_part_due(&part.domain, Some(part.due_ms));
    part.site = None;
    part.egress = None;
    d.queues.borrow_mut().schedule(part);
}
