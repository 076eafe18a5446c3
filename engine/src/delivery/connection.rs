//! One delivery connection's life: connect to the site's hosts in preference order,
//! take parts from the ready queue within max_message_rate, send each (pipelining
//! the next message's envelope behind the current one's end of data when the server
//! allows), wait idle for more, quit. A connection-level failure defers — one part,
//! or the whole queue after `connection_failures_max` failures in a row — and never
//! bounces.

use std::cell::Cell;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use super::Dispatcher;
use super::client::{CheckSlot, ClientError, ClientOptions, Envelope, Response, Session, TlsWant};
use super::handoff::report_home;
use super::settling::settle;
use crate::metrics::ShardMetrics;
use gannet_core::clock::unix_ms;
use gannet_core::queue::{self, Part};
use gannet_core::tls_policy::SiteTls;

/// Work a connection can take from a ready queue.
pub(super) enum Work {
    Local(Part),
    Remote(Box<gannet_core::handoff::Handoff>),
}

/// What a connection may do next.
enum Next {
    Work(Work),
    /// The queue has work, but max_message_rate says to wait this long.
    Wait(Duration),
    Done,
    /// An operator's suspension or a response rule (suspend, bounce) holds the
    /// queue: the connection closes.
    Held,
}

/// A connection waits for the message rate in place when the wait is this short;
/// longer, it closes and the maintainer opens one when the rate allows.
const RATE_WAIT_IN_PLACE: Duration = Duration::from_secs(2);

/// Takes the next work of a ready queue (this shard's parts first) if its message
/// rate allows.
fn next_work(d: &Dispatcher, key: &str, rated: bool) -> Next {
    let mut queues = d.queues.borrow_mut();
    if queues.may_hold() && queues.held(key, unix_ms()) {
        return Next::Held;
    }
    let Some(q) = queues.ready.get_mut(key) else {
        return Next::Done;
    };
    if q.is_empty() {
        return Next::Done;
    }
    // No clock read per message when no rate limits it (the common case).
    if rated
        && q.rates_messages()
        && let Err(wait) = q.acquire_message(unix_ms() * 1000)
    {
        return Next::Wait(wait);
    }
    match q.parts.pop_front() {
        Some(part) => Next::Work(Work::Local(part)),
        None => q
            .remote
            .pop_front()
            .map_or(Next::Done, |h| Next::Work(Work::Remote(h))),
    }
}

/// Waits until the ready queue `key` has a part (true), or `limit` passes, the queue
/// is gone or the shard stops (false). False at once when the shard already has
/// `idle_connections_max` connections waiting.
async fn wait_for_work(d: &Dispatcher, key: &str, limit: Duration) -> bool {
    let shard = &d.shard;
    if limit.is_zero()
        || shard.shutdown.is_raised()
        || d.idle_connections.get() >= d.idle_connections_max
    {
        return false;
    }
    /// Counts one idle connection for as long as it lives.
    struct Idle<'a>(&'a Cell<usize>);
    impl Drop for Idle<'_> {
        fn drop(&mut self) {
            self.0.set(self.0.get() - 1);
        }
    }
    d.idle_connections.set(d.idle_connections.get() + 1);
    let _idle = Idle(&d.idle_connections);
    let arrived = std::future::poll_fn(|cx| {
        let mut queues = d.queues.borrow_mut();
        match queues.ready.get_mut(key) {
            None => Poll::Ready(false),
            Some(q) if !q.is_empty() => Poll::Ready(true),
            // Another queue sharing a connection limit waits: make room.
            Some(q) if q.pressed() => Poll::Ready(false),
            Some(q) => {
                q.park_idle(cx.waker());
                Poll::Pending
            }
        }
    });
    let expired = async {
        shard.shutdown.sleep(limit).await;
        false
    };
    futures_lite::future::or(arrived, expired).await
}

/// The shaping a connection follows (read again per message: it may change live).
fn shaping_of(d: &Dispatcher, key: &str) -> Option<gannet_core::shaping::Shaping> {
    d.queues.borrow().ready.get(key).map(|q| q.shaping)
}

/// Sends one message to `recipients` over `session` in batches; one reply per
/// recipient, and whether the connection broke. `next` (the first batch of the
/// following message) may be pipelined behind the last batch (see [`Session::send`]).
async fn deliver(
    session: &mut Session,
    batch_max: usize,
    sender: &str,
    recipients: &[String],
    body: &[u8],
    next: Option<Envelope<'_>>,
) -> (Vec<Response>, bool) {
    let mut results = Vec::with_capacity(recipients.len());
    let batches = recipients.len().div_ceil(batch_max);
    for (i, chunk) in recipients.chunks(batch_max).enumerate() {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let then = if i + 1 == batches { next } else { None };
        match session.send(sender, &refs, body, then).await {
            Ok(t) => results.extend((0..chunk.len()).map(|k| t.outcome(k).clone())),
            Err(err) => {
                let response = err.response();
                results.extend(chunk.iter().map(|_| response.clone()));
                return (pad(results, recipients.len(), &response), true);
            }
        }
    }
    (results, false)
}

/// Fills the replies of recipients never tried (after a broken connection).
pub(super) fn pad(mut results: Vec<Response>, len: usize, response: &Response) -> Vec<Response> {
    results.resize(len, response.clone());
    results
}

/// A part taken from a ready queue with what sending it needs at hand.
enum Loaded {
    /// A part of a message this shard spooled; its body is read in place from the
    /// spool's mapping.
    Local {
        part: Part,
        sender: String,
        /// The part's recipients (allocated per part: the message keeps them with
        /// their per-recipient state, and a transaction needs them as one slice).
        recipients: Vec<String>,
        stored: gannet_spool::MessageRef,
    },
    Remote(Box<gannet_core::handoff::Handoff>),
}

impl Loaded {
    /// Gets `work` ready to send; None (logged) for a part whose message is gone
    /// from the spool.
    fn new(d: &Dispatcher, work: Work) -> Option<Loaded> {
        match work {
            Work::Remote(h) => Some(Loaded::Remote(h)),
            Work::Local(part) => {
                let (id, sender, recipients) = {
                    let m = part.message.borrow();
                    let recipients = part
                        .rcpts
                        .iter()
                        .map(|i| m.recipients[*i as usize].clone())
                        .collect();
                    (m.id, m.sender.clone(), recipients)
                };
                let Some(stored) = d.shard.spool.get(id) else {
                    tracing::error!(shard = d.shard.id, %id, "a queued message is missing from the spool; dropping it from the queue");
                    return None;
                };
                Some(Loaded::Local {
                    part,
                    sender,
                    recipients,
                    stored,
                })
            }
        }
    }

    /// Sender, recipients and body.
    fn envelope(&self) -> (&str, &[String], &[u8]) {
        match self {
            Loaded::Local {
                sender,
                recipients,
                stored,
                ..
            } => (sender, recipients, stored.get().body.as_slice()),
            Loaded::Remote(h) => (&h.sender, &h.recipients, &h.body),
        }
    }

    /// Puts the part back at the head of its ready queue, untried (taken ahead for a
    /// connection that then broke); fails it like a connection failure if the queue
    /// is gone.
    async fn give_back(self, d: &Dispatcher, key: &str) {
        let work = match self {
            Loaded::Local { part, .. } => Work::Local(part),
            Loaded::Remote(h) => Work::Remote(h),
        };
        let left = match (d.queues.borrow_mut().ready.get_mut(key), work) {
            (Some(q), Work::Local(part)) => {
                q.parts.push_front(part);
                None
            }
            (Some(q), Work::Remote(h)) => {
                q.remote.push_front(h);
                None
            }
            (None, work) => Some(work),
        };
        if let Some(work) = left {
            fail(
                d,
                work,
                &Response::local(451, "4.4.2 the connection was lost"),
            )
            .await;
        }
    }
}

/// Fails every recipient of `work` with `response`, as when no connection could be
/// made: settled here for a local part, reported home for a handed-off one.
pub(super) async fn fail(d: &Dispatcher, work: Work, response: &Response) {
    match work {
        Work::Local(part) => {
            let results = part.rcpts.iter().map(|i| (*i, response.clone())).collect();
            settle(d, part, results, None, None);
        }
        Work::Remote(h) => {
            let report = gannet_core::handoff::Report {
                token: h.token,
                results: vec![response.clone(); h.recipients.len()],
                peer: None,
                tls: None,
                delayed: false,
            };
            report_home(d, h.from, report).await;
        }
    }
}

/// One connection's life: connect (hosts in preference order), send ready parts,
/// quit. A connection failure defers one ready part, or all of them after
/// `connection_failures_max` failures in a row, and backs the queue off.
pub(super) async fn connection(d: Rc<Dispatcher>, key: String) {
    let shard = &d.shard;
    let Some((site, egress, shaping)) = d
        .queues
        .borrow()
        .ready
        .get(&key)
        .map(|q| (q.site.clone(), q.egress.clone(), q.shaping))
    else {
        return;
    };
    let mut options = ClientOptions {
        source: egress.source_ip,
        ehlo_name: egress
            .ehlo_name
            .clone()
            .unwrap_or_else(|| d.options.ehlo_name.clone()),
        timeouts: shaping.timeouts,
        auth: site.auth.clone(),
        proxy: egress.proxy.clone(),
        ..d.options.clone()
    };
    let mut session = None;
    let mut failure = Response::local(451, "4.4.4 the route has no hosts");
    let mut connected = false;
    for (i, (host, name)) in site.hosts.iter().zip(&site.host_names).enumerate() {
        if site.tls.host_unreachable(i) {
            failure = Response::local(
                451,
                format!("4.7.5 the TLSA records of {name} could not be read (DANE)"),
            );
            super::tlsrpt::note_unreachable(&d, &site, *host, name);
            continue;
        }
        options.tls = TlsWant::for_host(&site.tls, i, shaping.tls);
        // MTA-STS testing: the certificate is checked, and what is wrong reported.
        let checked = (matches!(site.tls, SiteTls::Sts { enforce: false, .. })
            && matches!(options.tls, TlsWant::Opportunistic))
        .then(CheckSlot::default);
        if let Some(slot) = &checked {
            options.tls = TlsWant::Checked(slot.clone());
        }
        let mut attempt = Session::connect(*host, name, &options, &d.tls).await;
        super::tlsrpt::note_session(&d, &site, *host, name, &attempt, checked.as_ref());
        if let Err(ClientError::Handshake(e)) = &attempt
            && shaping.tls_reconnect_plaintext
            && site.tls.allows_plaintext_fallback()
        {
            // The server took STARTTLS and then failed the handshake: the provider
            // rule says to deliver in plaintext rather than not at all.
            tracing::debug!(shard = shard.id, queue = %key, %host, "TLS handshake failed ({e}); connecting again without TLS");
            ShardMetrics::add(&shard.metrics.delivery_tls_plaintext_fallbacks_total, 1);
            options.tls = TlsWant::Disabled;
            attempt = Session::connect(*host, name, &options, &d.tls).await;
        }
        match attempt {
            Ok(s) => {
                session = Some((s, *host));
                connected = true;
                break;
            }
            Err(err) => failure = err.response(),
        }
    }
    if !connected {
        // A banner or EHLO refusal (Microsoft's 421 4.7.650, …) is what response
        // rules most often read.
        super::adapt::observe(&d, &key, std::slice::from_mut(&mut failure), (None, None));
        super::adapt::feedback(&d, &key, true);
    }
    match session {
        None => {
            // A connection-level failure: deferred, never bounced (the response is a
            // 4xx, see ClientError::response); one part pays for this attempt, and
            // only failures in a row defer the whole queue (queue::health).
            let after = d.queues.borrow_mut().ready.get_mut(&key).map(|q| {
                q.health.failed(
                    unix_ms(),
                    q.shaping.connection_failures_max,
                    q.shaping.connection_backoff_max,
                )
            });
            tracing::debug!(shard = shard.id, queue = %key, ?after, "no connection: {failure}");
            if let Some(after) = after {
                while let Next::Work(work) = next_work(&d, &key, false) {
                    fail(&d, work, &failure).await;
                    if after == queue::health::AfterFailure::DeferOne {
                        break;
                    }
                }
            }
        }
        Some((mut session, host)) => {
            if let Some(q) = d.queues.borrow_mut().ready.get_mut(&key) {
                q.health.succeeded();
            }
            let mut sent = 0;
            let mut broken = false;
            // The part taken ahead, whose envelope may already follow the current
            // message's end of data (then it must be the next one sent).
            let mut ahead: Option<Loaded> = None;
            while !broken {
                let Some(shaping) = shaping_of(&d, &key) else {
                    break;
                };
                let current = match ahead.take() {
                    Some(loaded) => loaded,
                    None if sent >= shaping.max_deliveries_per_connection => break,
                    None => match next_work(&d, &key, true) {
                        Next::Work(work) => match Loaded::new(&d, work) {
                            Some(loaded) => loaded,
                            None => continue,
                        },
                        Next::Done => {
                            // Nothing to send: wait idle for the queue's next part, and
                            // use the connection again if the server has not closed it.
                            if !wait_for_work(&d, &key, shaping.idle_timeout).await {
                                break;
                            }
                            if session.peer_has_spoken() {
                                // Closed (or a 421) while idle: a new connection takes
                                // over; this one is only dropped.
                                tracing::debug!(shard = shard.id, queue = %key, "an idle delivery connection was closed by the server");
                                broken = true;
                                break;
                            }
                            continue;
                        }
                        Next::Wait(wait) if wait <= RATE_WAIT_IN_PLACE => {
                            shard.shutdown.sleep(wait).await;
                            if shard.shutdown.is_raised() {
                                break;
                            }
                            continue;
                        }
                        Next::Wait(wait) => {
                            if let Some(q) = d.queues.borrow_mut().ready.get_mut(&key) {
                                q.throttled_until_ms = unix_ms() + wait.as_millis() as u64;
                            }
                            break;
                        }
                        Next::Held => break,
                    },
                };
                // Take the following part now, so that its envelope can go out with
                // this message's end of data.
                if shaping.pipeline_next_message
                    && session.pipelines()
                    && sent + 1 < shaping.max_deliveries_per_connection
                    && let Next::Work(work) = next_work(&d, &key, true)
                {
                    ahead = Loaded::new(&d, work);
                }
                let batch_max = shaping.max_recipients_per_batch;
                let next_refs: Vec<&str> = ahead.as_ref().map_or_else(Vec::new, |a| {
                    let recipients = a.envelope().1;
                    recipients[..recipients.len().min(batch_max)]
                        .iter()
                        .map(String::as_str)
                        .collect()
                });
                let next = ahead.as_ref().map(|a| {
                    let (sender, _, body) = a.envelope();
                    Envelope {
                        sender,
                        recipients: &next_refs,
                        body,
                    }
                });
                let (sender, recipients, body) = current.envelope();
                let (mut replies, failed) =
                    deliver(&mut session, batch_max, sender, recipients, body, next).await;
                broken = failed;
                super::adapt::feedback(&d, &key, super::adapt::failed_attempt(&replies));
                {
                    // Whose message this was (suspend_tenant, suspend_campaign).
                    let local = match &current {
                        Loaded::Local { part, .. } => Some(part.message.clone()),
                        Loaded::Remote(_) => None,
                    };
                    let local = local.as_ref().map(|m| m.borrow());
                    let whose = match (&current, &local) {
                        (Loaded::Remote(h), _) => (h.tenant.as_deref(), h.campaign.as_deref()),
                        (_, Some(m)) => (m.meta("tenant"), m.meta("campaign")),
                        _ => (None, None),
                    };
                    super::adapt::observe(&d, &key, &mut replies, whose);
                }
                match current {
                    Loaded::Local { part, .. } => {
                        let results = part.rcpts.iter().copied().zip(replies).collect();
                        settle(&d, part, results, Some(host), session.tls.as_deref());
                    }
                    Loaded::Remote(h) => {
                        let report = gannet_core::handoff::Report {
                            token: h.token,
                            results: replies,
                            peer: Some(host),
                            tls: session.tls.clone(),
                            delayed: false,
                        };
                        report_home(&d, h.from, report).await;
                    }
                }
                sent += 1;
            }
            if let Some(loaded) = ahead.take() {
                loaded.give_back(&d, &key).await;
            }
            if !broken {
                session.quit().await;
            }
        }
    }
    d.queues.borrow_mut().connection_ended(&key);
    d.wake.raise();
}
