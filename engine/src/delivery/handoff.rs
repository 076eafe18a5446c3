//! Parts crossing shards. A part whose site another shard owns is handed to that
//! shard ([`super::routing`] sends the handoff and keeps the part by token); the
//! owner queues it with its own parts ([`receive_handoff`]) and reports each
//! attempt back; the home shard, which alone writes the message's spool records,
//! settles the part from the report ([`receive_report`]). The shard's inbox
//! routes both notes here.

use std::rc::Rc;

use gannet_core::clock::unix_ms;
use gannet_core::handoff::{Handoff, Report};

use super::Dispatcher;
use super::client::Response;
use super::connection::pad;
use super::routing::delay;
use super::settling::settle;
use crate::notes::Note;
use gannet_core::queue::Site;

/// Queues a part another shard handed over; a full ready queue sends it back to be
/// delayed by its home shard.
pub fn receive_handoff(d: &Rc<Dispatcher>, h: Box<Handoff>) {
    // The site as the home shard resolved it (its TLS policy with it).
    let site: Rc<Site> = Rc::new(h.site.clone());
    let egress = d
        .sources
        .get(&h.egress)
        .unwrap_or_else(|| &d.sources["default"])
        .clone();
    let refused = d.queues.borrow_mut().push_remote(site, egress, h);
    if let Err(h) = refused {
        // Full: the home shard delays the part. Sent from a task, as the inbox must
        // keep draining meanwhile.
        let report = Report {
            token: h.token,
            results: Vec::new(),
            peer: None,
            tls: None,
            delayed: true,
        };
        let (home, d) = (h.from, d.clone());
        glommio::spawn_local(async move {
            report_home(&d, home, report).await;
        })
        .detach();
    }
    d.wake.raise();
}

/// Settles a part this shard handed over, from its owner's report.
pub fn receive_report(d: &Dispatcher, r: Report) {
    let Some(part) = d.handed.borrow_mut().remove(&r.token) else {
        return;
    };
    if r.delayed {
        delay(d, part, unix_ms());
        return;
    }
    // One reply per recipient; a short report (never expected) leaves the missing
    // recipients to be retried rather than forgotten.
    let missing = Response::local(451, "4.3.0 no result from the owner shard");
    let replies = pad(r.results, part.rcpts.len(), &missing);
    let results = part.rcpts.iter().copied().zip(replies).collect();
    settle(d, part, results, r.peer, r.tls.as_deref());
}

/// Sends a report home, retrying while the home inbox is full (a report must not be
/// lost: the home shard holds the part until it hears back).
pub(super) async fn report_home(d: &Dispatcher, to: u16, report: Report) {
    let shard = &d.shard;
    crate::notes::send_surely(
        &shard.shared.mesh,
        to,
        Note::Report(report),
        &shard.shutdown,
    )
    .await;
}
