//! One SMTP session: the input buffer, the command loop, and the parts of the protocol
//! that need to read or write the socket (greeting, DATA, BDAT, STARTTLS, AUTH and the
//! final spool append). The verbs decide; this file moves bytes.
//!
//! Pipelining (RFC 2920): replies are queued and written when the session has to wait
//! for input, so a client's pipelined group is answered in one write.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use gannet_spool::{MessageRecord, Record, SpoolError};

use super::data::{Scan, Scanner, Violations};
use super::feedback;
use super::verbs::{self, Mechanism, Next};
use crate::delivery::Dispatcher;
use crate::events::Event;
use crate::io::Conn;
use crate::metrics::ShardMetrics;
use crate::policy::script::{ConnSlot, Hook, Message as ScriptMessage, Outcome, Script};
use crate::policy::{Client, Draft, Verdict};
use crate::shard::Shard;
use gannet_core::clock::unix_ms;
use gannet_core::config::Config;
use gannet_core::message::{self, Trace};
use gannet_core::reply::{self, Reply};

use gannet_core::address::Address;

/// Input buffer size beyond the longest command line: reads are this large.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Replies are written when this many bytes are queued, even mid-pipeline.
const OUTPUT_FLUSH_BYTES: usize = 16 << 10;
/// Time allowed for writing a reply and for a TLS handshake.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The envelope and content of the mail transaction in progress.
#[derive(Debug)]
pub struct Transaction {
    pub sender: Address,
    pub smtputf8: bool,
    /// The SIZE the client declared, used to size the body buffer.
    pub declared_size: Option<u64>,
    pub recipients: Vec<String>,
    /// BDAT chunks so far (None until the first BDAT).
    pub bdat: Option<(Scanner, Vec<u8>)>,
    /// DSN parameters (RFC 3461): RET and ENVID of MAIL, NOTIFY and ORCPT of each
    /// recipient (in `recipients`' order).
    pub dsn_ret: Option<gannet_core::dsn::Ret>,
    pub dsn_envid: Option<String>,
    pub dsn_rcpts: Vec<gannet_core::dsn::RcptDsn>,
}

impl Transaction {
    pub fn new(sender: Address, smtputf8: bool, declared_size: Option<u64>) -> Transaction {
        Transaction {
            sender,
            smtputf8,
            declared_size,
            recipients: Vec::new(),
            bdat: None,
            dsn_ret: None,
            dsn_envid: None,
            dsn_rcpts: Vec::new(),
        }
    }
}

/// Session state the verbs read and change.
#[derive(Debug)]
pub struct Session {
    pub shard: Rc<Shard>,
    /// Where accepted messages are queued.
    pub delivery: Rc<Dispatcher>,
    pub peer: SocketAddr,
    pub helo: Option<String>,
    pub esmtp: bool,
    /// "TLSv1.3 with cipher …" once TLS is active.
    pub tls: Option<String>,
    pub auth_user: Option<String>,
    /// The client's address is in `smtp.relay_from`.
    pub relay_from_network: bool,
    pub tx: Option<Transaction>,
    /// The connection object the policy script's hooks get.
    pub script_conn: ConnSlot,
}

impl Session {
    pub fn config(&self) -> &Config {
        self.shard.config()
    }

    pub fn client(&self) -> Client<'_> {
        Client {
            ip: self.peer.ip(),
            helo: self.helo.as_deref(),
            tls: self.tls.is_some(),
            auth_user: self.auth_user.as_deref(),
        }
    }

    pub fn in_bdat(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.bdat.is_some())
    }

    /// AUTH is advertised and usable: users exist, and TLS is active unless the
    /// configuration allows AUTH in the clear.
    pub fn auth_offered(&self) -> bool {
        !self.shard.shared.credentials.is_empty()
            && (self.tls.is_some() || !self.config().smtp.auth_requires_tls)
    }

    /// The policy script's verdict in a phase (asked after the declarative rules
    /// let the command through): the reply to refuse with, if any. A hook that
    /// fails gives 451 4.3.0, counted and logged with why.
    pub fn script_refusal(
        &self,
        run: impl FnOnce(&Script, &ConnSlot, &Client<'_>) -> Outcome,
    ) -> Option<Reply> {
        let script = self.shard.script()?;
        self.refusal_of(run(&script, &self.script_conn, &self.client()))
    }

    /// A hook's outcome as the reply to refuse with, if any (a failure counted and
    /// logged with why).
    pub fn refusal_of(&self, outcome: Outcome) -> Option<Reply> {
        match outcome {
            Outcome::Continue => None,
            Outcome::Reject(reply) => Some(reply),
            Outcome::Failed(why) => {
                ShardMetrics::add(&self.shard.metrics.policy_script_failures_total, 1);
                tracing::warn!(shard = self.shard.id, peer = %self.peer, "policy script: {why}");
                Some(crate::policy::script::failure_reply())
            }
        }
    }

    /// Records a policy_rejection event.
    pub fn policy_rejection(
        &self,
        phase: &str,
        sender: Option<&str>,
        recipient: Option<&str>,
        reply: &Reply,
    ) {
        let mut text = Vec::new();
        reply.encode(&mut text);
        self.shard.event(&Event::PolicyRejection {
            timestamp_ms: unix_ms(),
            shard: self.shard.id,
            phase,
            peer: self.peer.ip().to_string(),
            sender,
            rcpt_to: recipient,
            reply: String::from_utf8_lossy(&text).trim_end().to_string(),
            message_id: None,
            tenant: None,
            campaign_id: None,
            transmission_id: None,
        });
    }

    fn protocol(&self) -> &'static str {
        let utf8 = self.tx.as_ref().is_some_and(|tx| tx.smtputf8);
        match (
            utf8,
            self.esmtp,
            self.tls.is_some(),
            self.auth_user.is_some(),
        ) {
            (_, false, _, _) => "SMTP",
            (false, true, false, false) => "ESMTP",
            (false, true, true, false) => "ESMTPS",
            (false, true, false, true) => "ESMTPA",
            (false, true, true, true) => "ESMTPSA",
            (true, true, false, false) => "UTF8SMTP",
            (true, true, true, false) => "UTF8SMTPS",
            (true, true, false, true) => "UTF8SMTPA",
            (true, true, true, true) => "UTF8SMTPSA",
        }
    }
}

/// Why the session ends early.
#[derive(Debug)]
enum End {
    /// The client closed the connection or it failed.
    Disconnected,
    /// The reply was sent; close.
    Closed,
}

/// The socket side of a session.
#[derive(Debug)]
struct Wire {
    conn: Conn,
    input: Vec<u8>,
    start: usize,
    end: usize,
    output: Vec<u8>,
    /// An over-long command line is being skipped up to its LF.
    skipping_line: bool,
}

impl Wire {
    fn buffered(&self) -> &[u8] {
        &self.input[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn queue(&mut self, reply: &Reply) {
        reply.encode(&mut self.output);
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.output.is_empty() {
            return Ok(());
        }
        let result = self.conn.write_all(&self.output, WRITE_TIMEOUT).await;
        self.output.clear();
        result.map_err(|_| End::Disconnected)
    }

    /// Reads more input (after writing queued replies), waiting at most `limit`.
    /// `Ok(false)`: end of stream.
    async fn fill(&mut self, limit: Duration) -> Result<bool, std::io::Error> {
        if self.start > 0 {
            self.input.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let end = self.end;
        let n = self.conn.read(&mut self.input[end..], limit).await?;
        self.end += n;
        Ok(n > 0)
    }
}

/// What reading a command produced.
enum Line {
    Command(String),
    TooLong,
    BadBytes,
}

/// Runs a session on an accepted connection until it ends.
pub async fn run(delivery: Rc<Dispatcher>, conn: Conn, peer: SocketAddr) {
    let shard = delivery.shard.clone();
    let relay_from_network = shard
        .config()
        .smtp
        .relay_from
        .iter()
        .any(|n| n.contains(peer.ip()));
    let line_max = shard.config().smtp.command_line_bytes_max.usize();
    let tls = conn.tls_session().map(|c| crate::tls::describe(c));
    let mut session = Session {
        shard,
        delivery,
        peer,
        helo: None,
        esmtp: false,
        tls,
        auth_user: None,
        relay_from_network,
        tx: None,
        script_conn: ConnSlot::default(),
    };
    let mut wire = Wire {
        conn,
        input: session.shard.take_read_buffer(line_max + READ_CHUNK_BYTES),
        start: 0,
        end: 0,
        output: Vec::with_capacity(4096),
        skipping_line: false,
    };
    let _ = serve(&mut session, &mut wire).await;
    let _ = wire.flush().await;
    wire.conn.close().await;
    session.shard.return_read_buffer(wire.input);
}

async fn serve(s: &mut Session, w: &mut Wire) -> Result<(), End> {
    let hostname = s.config().server.hostname.clone();
    let refusal = match s.shard.shared.policy.connect(&s.client()) {
        Verdict::Reject(reply) => Some(reply),
        _ => s.script_refusal(|script, conn, client| script.connection_accepted(conn, client)),
    };
    if let Some(reply) = refusal {
        s.policy_rejection("connect", None, None, &reply);
        ShardMetrics::add(&s.shard.metrics.smtp_sessions_refused_total, 1);
        w.queue(&reply);
        return Err(End::Closed);
    }
    w.queue(&Reply::new(220, "", format!("{hostname} ESMTP gannet")));
    let bad_commands_max = s.config().smtp.bad_commands_max.get();
    let mut bad_commands = 0;
    loop {
        let line = match read_line(s, w).await? {
            Line::Command(line) => line,
            Line::TooLong => {
                count_bad(
                    s,
                    w,
                    &mut bad_commands,
                    bad_commands_max,
                    reply::LINE_TOO_LONG,
                )?;
                continue;
            }
            Line::BadBytes => {
                let reply =
                    Reply::fixed(500, "5.5.2", "command contains a NUL byte or invalid UTF-8");
                count_bad(s, w, &mut bad_commands, bad_commands_max, reply)?;
                continue;
            }
        };
        let reply = match verbs::dispatch(s, &line) {
            Next::Reply(reply) => reply,
            Next::Close(reply) => {
                w.queue(&reply);
                return Err(End::Closed);
            }
            Next::Data => {
                w.queue(&reply::START_DATA);
                w.flush().await?;
                let reply = read_data(s, w).await?;
                finish_reply(w, reply)?
            }
            Next::Bdat { size, last } => {
                let reply = read_bdat(s, w, size, last).await?;
                finish_reply(w, reply)?
            }
            Next::BdatDiscard { size, reply } => {
                discard(s, w, size).await?;
                reply
            }
            Next::StartTls => {
                start_tls(s, w).await?;
                continue;
            }
            Next::Auth { mechanism, initial } => auth(s, w, mechanism, initial).await?,
        };
        if verbs::is_bad_command(&reply) || reply == reply::AUTH_FAILED {
            count_bad(s, w, &mut bad_commands, bad_commands_max, reply)?;
        } else {
            w.queue(&reply);
        }
        if w.output.len() >= OUTPUT_FLUSH_BYTES {
            w.flush().await?;
        }
    }
}

/// Queues a reply to a bad command and ends the session once there were too many.
fn count_bad(
    s: &Session,
    w: &mut Wire,
    bad_commands: &mut u64,
    max: u64,
    reply: Reply,
) -> Result<(), End> {
    ShardMetrics::add(&s.shard.metrics.smtp_bad_commands_total, 1);
    w.queue(&reply);
    *bad_commands += 1;
    if *bad_commands >= max {
        w.queue(&reply::TOO_MANY_ERRORS);
        return Err(End::Closed);
    }
    Ok(())
}

/// A reply after message data: 421 ends the session.
fn finish_reply(w: &mut Wire, reply: Reply) -> Result<Reply, End> {
    if reply.code == 421 {
        w.queue(&reply);
        return Err(End::Closed);
    }
    Ok(reply)
}

/// `base`, or the stress timeout when that is shorter and the daemon is under stress
/// (at least `stress_sessions_percent` of `sessions_max` in use).
fn timeout(s: &Session, base: u64) -> Duration {
    let smtp = &s.config().smtp;
    let sessions = &s.shard.shared.sessions;
    let stressed =
        sessions.total() * 100 >= sessions.total_max() * smtp.stress_sessions_percent.usize();
    let secs = if stressed {
        base.min(smtp.stress_timeout_secs.get())
    } else {
        base
    };
    Duration::from_secs(secs)
}

/// How long is left before `deadline`, or a timeout error.
fn left(deadline: Instant) -> Result<Duration, std::io::Error> {
    let now = Instant::now();
    if now >= deadline {
        return Err(std::io::ErrorKind::TimedOut.into());
    }
    Ok(deadline - now)
}

/// Reads the next command line. Replies queued so far are written before waiting.
/// The whole line must arrive within the command timeout, however it is split.
async fn read_line(s: &Session, w: &mut Wire) -> Result<Line, End> {
    let line_max = s.config().smtp.command_line_bytes_max.usize();
    let mut deadline = None;
    loop {
        if let Some(lf) = memchr::memchr(b'\n', w.buffered()) {
            let skipped = std::mem::take(&mut w.skipping_line);
            let line = &w.buffered()[..lf + 1];
            let too_long = skipped || line.len() > line_max;
            let text = line
                .strip_suffix(b"\r\n")
                .or_else(|| line.strip_suffix(b"\n"))
                .unwrap_or(line);
            let parsed = if too_long {
                Line::TooLong
            } else if memchr::memchr(0, text).is_some() {
                Line::BadBytes
            } else {
                match std::str::from_utf8(text) {
                    Ok(text) => Line::Command(text.to_string()),
                    Err(_) => Line::BadBytes,
                }
            };
            w.consume(lf + 1);
            return Ok(parsed);
        }
        if w.buffered().len() > line_max {
            // Keep reading until the line's end, replying once.
            w.skipping_line = true;
            let n = w.buffered().len();
            w.consume(n);
        }
        w.flush().await?;
        if s.shard.stopping() {
            w.queue(&reply::SHUTTING_DOWN);
            return Err(End::Closed);
        }
        let shutdown = async {
            s.shard.shutdown.wait().await;
            Err(std::io::Error::other("shutdown"))
        };
        // The clock starts once the replies are out and the session waits.
        let deadline = *deadline.get_or_insert_with(|| {
            Instant::now() + timeout(s, s.config().smtp.command_timeout_secs.get())
        });
        let fill = async {
            let limit = left(deadline)?;
            w.fill(limit).await
        };
        match futures_lite::future::or(fill, shutdown).await {
            Ok(true) => {}
            Ok(false) => return Err(End::Disconnected),
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {
                w.queue(&reply::TIMEOUT);
                return Err(End::Closed);
            }
            Err(_) if s.shard.stopping() => {
                w.queue(&reply::SHUTTING_DOWN);
                return Err(End::Closed);
            }
            Err(_) => return Err(End::Disconnected),
        }
    }
}

/// The deadline of message data (DATA, or one BDAT chunk): the data timeout from the
/// start, extended as data arrives at the minimum rate, so a client that trickles
/// (slowloris) runs out of time while a slow but steady one does not.
struct DataDeadline {
    at: Instant,
    per_byte: Duration,
}

impl DataDeadline {
    fn new(s: &Session) -> DataDeadline {
        let smtp = &s.config().smtp;
        DataDeadline {
            at: Instant::now() + timeout(s, smtp.data_timeout_secs.get()),
            per_byte: Duration::from_secs(1) / smtp.data_rate_min_bytes_per_sec.get() as u32,
        }
    }
}

/// Reads more message data within `deadline`; a timeout ends the session with 421, a
/// disconnect abandons the transaction (nothing was acknowledged).
async fn fill_data(w: &mut Wire, deadline: &mut DataDeadline) -> Result<(), End> {
    let before = w.buffered().len();
    let filled = match left(deadline.at) {
        Ok(limit) => w.fill(limit).await,
        Err(e) => Err(e),
    };
    let received = w.buffered().len().saturating_sub(before) as u32;
    deadline.at += deadline.per_byte.saturating_mul(received);
    match filled {
        Ok(true) => Ok(()),
        Ok(false) => Err(End::Disconnected),
        Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {
            w.queue(&reply::TIMEOUT);
            Err(End::Closed)
        }
        Err(_) => Err(End::Disconnected),
    }
}

fn body_capacity(s: &Session) -> usize {
    let max = s.config().smtp.message_bytes_max.usize();
    let declared =
        s.tx.as_ref()
            .and_then(|tx| tx.declared_size)
            .map_or(16 << 10, |n| n as usize);
    declared.min(max)
}

async fn read_data(s: &mut Session, w: &mut Wire) -> Result<Reply, End> {
    let smtp = &s.config().smtp;
    let mut scanner = Scanner::data(
        smtp.data_line_bytes_max.usize(),
        smtp.message_bytes_max.usize(),
        !smtp.reject_bare_line_endings,
    );
    // The body buffer: one allocation per message, sized by SIZE when declared, which
    // the spool record needs as a whole anyway.
    let mut body = Vec::with_capacity(body_capacity(s));
    let mut deadline = DataDeadline::new(s);
    loop {
        match scanner.feed(w.buffered(), &mut body) {
            Scan::End(n) => {
                w.consume(n);
                break;
            }
            Scan::More => {
                let n = w.buffered().len();
                w.consume(n);
            }
        }
        fill_data(w, &mut deadline).await?;
    }
    Ok(finish_message(s, body, scanner.violations).await)
}

async fn read_bdat(s: &mut Session, w: &mut Wire, size: usize, last: bool) -> Result<Reply, End> {
    let (line_max, size_max, normalize) = {
        let smtp = &s.config().smtp;
        (
            smtp.data_line_bytes_max.usize(),
            smtp.message_bytes_max.usize(),
            !smtp.reject_bare_line_endings,
        )
    };
    let capacity = body_capacity(s);
    let mut deadline = DataDeadline::new(s);
    let tx =
        s.tx.as_mut()
            .expect("BDAT is only run inside a transaction");
    let (mut scanner, mut body) = tx.bdat.take().unwrap_or_else(|| {
        (
            Scanner::bdat(line_max, size_max, normalize),
            Vec::with_capacity(capacity),
        )
    });
    let mut remaining = size;
    loop {
        let n = remaining.min(w.buffered().len());
        scanner.feed(&w.buffered()[..n], &mut body);
        w.consume(n);
        remaining -= n;
        if remaining == 0 {
            break;
        }
        fill_data(w, &mut deadline).await?;
    }
    if !last {
        let tx = s.tx.as_mut().expect("still in the transaction");
        tx.bdat = Some((scanner, body));
        return Ok(Reply::new(250, "2.0.0", format!("{size} octets received")));
    }
    scanner.finish_chunks(&mut body);
    Ok(finish_message(s, body, scanner.violations).await)
}

async fn discard(s: &Session, w: &mut Wire, size: usize) -> Result<(), End> {
    let mut remaining = size;
    let mut deadline = DataDeadline::new(s);
    loop {
        let n = remaining.min(w.buffered().len());
        w.consume(n);
        remaining -= n;
        if remaining == 0 {
            return Ok(());
        }
        fill_data(w, &mut deadline).await?;
    }
}

fn violation_reply(v: &Violations, reject_bare: bool) -> Option<Reply> {
    if v.too_big {
        Some(reply::TOO_BIG)
    } else if v.nul {
        Some(reply::NUL_IN_DATA)
    } else if reject_bare && (v.bare_cr || v.bare_lf) {
        Some(reply::BARE_LINE_ENDING)
    } else if v.line_too_long {
        Some(reply::DATA_LINE_TOO_LONG)
    } else {
        None
    }
}

/// After the end of the data: checks, policy, spool, events. Ends the transaction
/// whatever the outcome.
async fn finish_message(s: &mut Session, body: Vec<u8>, violations: Violations) -> Reply {
    let reply = accept_message(s, body, violations).await;
    if !reply.is_positive() {
        ShardMetrics::add(&s.shard.metrics.smtp_messages_rejected_total, 1);
        // Suppressed recipients have their own events.
        if reply.code != 421 && reply.code != 451 && reply != reply::ALL_SUPPRESSED {
            let sender = s.tx.as_ref().map(|tx| tx.sender.text.clone());
            s.policy_rejection("data", sender.as_deref(), None, &reply);
        }
    }
    s.tx = None;
    reply
}

async fn accept_message(s: &mut Session, body: Vec<u8>, violations: Violations) -> Reply {
    let shard = s.shard.clone();
    let config = shard.config();
    if let Some(reply) = violation_reply(&violations, config.smtp.reject_bare_line_endings) {
        return reply;
    }
    // Recipients at inbound domains: the message is a report for gannet, read
    // here and not relayed to them; the others (if any) get it as usual.
    if !config.inbound.domains.is_empty()
        && let Some(tx) = s.tx.as_mut()
        && tx
            .recipients
            .iter()
            .any(|r| feedback::is_inbound(&shard, r))
    {
        // A copy: the message may still go to recipients elsewhere.
        feedback::consume(&shard, body.clone(), s.peer.ip(), unix_ms()).await;
        let mut kept = Vec::new();
        let mut kept_dsn = Vec::new();
        for (i, rcpt) in tx.recipients.iter().enumerate() {
            if !feedback::is_inbound(&shard, rcpt) {
                kept.push(rcpt.clone());
                kept_dsn.push(tx.dsn_rcpts.get(i).cloned().unwrap_or_default());
            }
        }
        if kept.is_empty() {
            return Reply::new(250, "2.0.0", "OK report read");
        }
        tx.recipients = kept;
        tx.dsn_rcpts = kept_dsn;
    }
    let id = shard.spool.next_id();
    let id_text = id.to_string();
    let now_ms = unix_ms();
    let protocol = s.protocol();
    let client = s.client();
    let tx =
        s.tx.as_ref()
            .expect("a message is only read inside a transaction");
    let single = (tx.recipients.len() == 1).then(|| tx.recipients[0].as_str());
    let trace = Trace {
        helo: client.helo.unwrap_or(""),
        peer_ip: s.peer.ip(),
        hostname: &config.server.hostname,
        protocol,
        tls: s.tls.as_deref(),
        id: &id_text,
        single_recipient: single,
        unix_secs: now_ms / 1000,
    };
    // The feedback header: a signed token naming this message in the bounces and
    // complaints that quote it (`crate::feedback`).
    let feedback = |lifted: &message::Lifted| {
        if config.inbound.no_feedback_header {
            return None;
        }
        let tracked = crate::merge::tracking::Tracked {
            kind: crate::merge::tracking::Kind::Feedback,
            message_id: id_text.clone(),
            rcpt_to: single.unwrap_or("").to_string(),
            transmission_id: String::new(),
            campaign_id: lifted.campaign.clone().unwrap_or_default(),
            tenant: lifted.tenant.clone().unwrap_or_default(),
            template_id: String::new(),
            url: String::new(),
        };
        let token = shard.shared.tracking_key.token(&tracked);
        Some(format!("{}: {token}\r\n", crate::feedback::HEADER))
    };
    let (mut prepared, lifted) =
        match message::prepare_with(&body, &shard.shared.meta_headers, &trace, feedback) {
            Ok(prepared) => prepared,
            Err(reply) => return reply,
        };
    drop(body);
    let expires = match lifted.expires.as_deref() {
        None => None,
        Some(text) => match gannet_core::queue::settle::parse_expiry(text, now_ms) {
            Some(at) => Some(at),
            None => {
                return Reply::new(
                    554,
                    "5.6.0",
                    format!(
                        "{}: give seconds from now or an RFC 3339 time within a year",
                        config.policy.expires_header
                    ),
                );
            }
        },
    };
    fn draft<'a>(tx: &'a Transaction, prepared: &[u8], lifted: &'a message::Lifted) -> Draft<'a> {
        Draft {
            sender: &tx.sender.text,
            recipients: &tx.recipients,
            size_bytes: prepared.len() as u64,
            tenant: lifted.tenant.as_deref(),
            campaign: lifted.campaign.as_deref(),
            requested_pool: lifted.pool.as_deref(),
        }
    }
    let policy = &shard.shared.policy;
    if let Verdict::Reject(reply) = policy.data(&client, &draft(tx, &prepared, &lifted)) {
        return reply;
    }
    // The script's smtp_server_data, then smtp_server_message_received: they may
    // set the tenant, campaign, pool, routing domain and keys of their own, and
    // edit header fields, before the binding is chosen.
    let mut lifted = lifted;
    let mut script_meta = Vec::new();
    if let Some(script) = shard.script()
        && (script.has(Hook::Data) || script.has(Hook::MessageReceived))
    {
        let meta = [
            ("tenant", lifted.tenant.take()),
            ("campaign", lifted.campaign.take()),
            ("pool", lifted.pool.take()),
        ];
        // Copies of the envelope: the message object must own what it shows (the
        // transaction stays the session's).
        let message = ScriptMessage {
            sender: tx.sender.text.clone(),
            recipients: tx.recipients.clone(),
            meta: (meta.into_iter())
                .filter_map(|(k, v)| Some((k.to_string(), v?)))
                .collect(),
            body: std::mem::take(&mut prepared),
        };
        let hooks = [Hook::Data, Hook::MessageReceived];
        let (outcome, mut message) = script.smtp_message(&hooks, &s.script_conn, &client, message);
        let refused = s.refusal_of(outcome);
        prepared = std::mem::take(&mut message.body);
        lifted.tenant = message.take_meta("tenant");
        lifted.campaign = message.take_meta("campaign");
        lifted.pool = message.take_meta("pool");
        if let Some(reply) = refused {
            s.policy_rejection("data", Some(&tx.sender.text), None, &reply);
            return reply;
        }
        script_meta = message.meta;
    }
    let draft = draft(tx, &prepared, &lifted);
    let pool = policy.set_binding(&client, &draft);
    if let Verdict::Reject(reply) = policy.final_validation(&client, &draft, &mut prepared) {
        return reply;
    }
    // The tenant's suppression list (SMTP mail is non-transactional): a suppressed
    // recipient gets a policy_rejection event and no copy; the others go on.
    let lists = &shard.shared.suppressions;
    let kept: Option<Vec<String>> = if lists.is_empty() {
        None
    } else {
        let tenant = lifted.tenant.as_deref();
        let kind = crate::suppression::Kind::NonTransactional;
        let (kept, gone): (Vec<&String>, Vec<&String>) =
            (tx.recipients.iter()).partition(|r| !lists.is_suppressed(tenant, r, kind));
        for rcpt in &gone {
            ShardMetrics::add(&shard.metrics.suppressed_recipients_total, 1);
            shard.event(&Event::PolicyRejection {
                timestamp_ms: now_ms,
                shard: shard.id,
                phase: "suppression",
                peer: s.peer.ip().to_string(),
                sender: Some(&tx.sender.text),
                rcpt_to: Some(rcpt),
                reply: "554 5.7.1 recipient address was suppressed due to customer policy (non_transactional)".into(),
                message_id: Some(id_text.clone()),
                tenant,
                campaign_id: lifted.campaign.as_deref(),
                transmission_id: None,
            });
        }
        if kept.is_empty() {
            return reply::ALL_SUPPRESSED;
        }
        (!gone.is_empty()).then(|| kept.into_iter().cloned().collect())
    };
    let recipients: &[String] = kept.as_deref().unwrap_or(&tx.recipients);
    // The DSN parameters of the recipients kept, in their order.
    let dsn_rcpts: Vec<gannet_core::dsn::RcptDsn> = recipients
        .iter()
        .map(|r| {
            let i = tx.recipients.iter().position(|x| x == r);
            i.and_then(|i| tx.dsn_rcpts.get(i).cloned())
                .unwrap_or_default()
        })
        .collect();
    // DKIM, once per message whatever its recipients, as the last change to it.
    match shard
        .dkim()
        .sign(&prepared, lifted.tenant.as_deref(), now_ms / 1000)
    {
        Ok(None) => {}
        Ok(Some(mut signed)) => {
            ShardMetrics::add(&shard.metrics.dkim_signatures_total, 1);
            signed.extend_from_slice(&prepared);
            prepared = signed;
        }
        Err(err) => {
            ShardMetrics::add(&shard.metrics.dkim_failures_total, 1);
            tracing::warn!(shard = shard.id, peer = %s.peer, "message not signed: {err}");
            return match err {
                crate::dkim::DkimFailure::NoKey(_) => Reply::new(550, "5.7.1", err.to_string()),
                crate::dkim::DkimFailure::Sign(_) => {
                    Reply::new(451, "4.3.0", "DKIM signing failed; try again later")
                }
            };
        }
    }
    let queue = gannet_core::queue::scheduled_queue(
        lifted.campaign.as_deref(),
        lifted.tenant.as_deref(),
        crate::policy::domain_of(&recipients[0]),
        gannet_core::queue::meta_value(&script_meta, "routing_domain"),
    );
    let mut meta = vec![("pool".to_string(), pool.clone())];
    if let Some(tenant) = &lifted.tenant {
        meta.push(("tenant".to_string(), tenant.clone()));
    }
    if let Some(campaign) = &lifted.campaign {
        meta.push(("campaign".to_string(), campaign.clone()));
    }
    if let Some(user) = &s.auth_user {
        meta.push(("auth_user".to_string(), user.clone()));
    }
    if let Some(at) = expires {
        meta.push((
            gannet_core::queue::settle::META_EXPIRES.to_string(),
            at.to_string(),
        ));
    }
    meta.push(("peer".to_string(), s.peer.ip().to_string()));
    meta.extend(script_meta);
    meta.extend(gannet_core::dsn::to_meta(
        tx.dsn_ret,
        tx.dsn_envid.as_deref(),
        &dsn_rcpts,
    ));
    let size = prepared.len();
    let record = MessageRecord {
        id,
        sender: tx.sender.text.clone(),
        recipients: recipients.to_vec(),
        meta,
        queue: queue.clone(),
        attempts: 0,
        due_unix_ms: now_ms,
        received_unix_ms: now_ms,
        done: Vec::new(),
        body: prepared,
    };
    let spooling = std::time::Instant::now();
    // The reception event is recorded once the message is appended, before its
    // durability is awaited: the spool's write barrier then puts it in the event log
    // before the message reaches its segment, so a crash cannot leave a recoverable
    // (and later delivered) message without its reception. A sync that fails after
    // this leaves a reception event for a message the client was told 451 about.
    let reception = || {
        shard.event(&Event::Reception {
            timestamp_ms: now_ms,
            message_id: id_text.clone(),
            shard: shard.id,
            sender: &tx.sender.text,
            rcpt_to: recipients,
            msg_size: size,
            peer: s.peer.to_string(),
            helo: client.helo.unwrap_or(""),
            protocol,
            tls: s.tls.as_deref(),
            auth_user: s.auth_user.as_deref(),
            tenant: lifted.tenant.as_deref(),
            campaign_id: lifted.campaign.as_deref(),
            ip_pool: &pool,
            queue: &queue,
            subject: lifted.subject.as_deref(),
        })
    };
    match shard
        .spool
        .write_and(Record::Message(&record), reception)
        .await
    {
        Ok(()) => shard.metrics.smtp_accept_durable.record(spooling.elapsed()),
        Err(err) => {
            ShardMetrics::add(&shard.metrics.smtp_spool_failures_total, 1);
            tracing::warn!(shard = shard.id, peer = %s.peer, "message not accepted: {err}");
            return match err {
                SpoolError::Unhealthy => reply::SPOOL_UNHEALTHY,
                SpoolError::NoSpace { .. } => reply::SPOOL_FULL,
                SpoolError::RecordTooLarge { .. } => reply::TOO_BIG,
                _ => reply::SPOOL_FAILED,
            };
        }
    }
    // The envelope moves into the queue; delivery reads the body from the spool's
    // mapping, so the heap copy is dropped here.
    s.delivery.enqueue_spooled(record, now_ms);
    let metrics = &shard.metrics;
    ShardMetrics::add(&metrics.smtp_messages_accepted_total, 1);
    ShardMetrics::add(
        &metrics.smtp_recipients_accepted_total,
        recipients.len() as u64,
    );
    ShardMetrics::add(&metrics.smtp_message_bytes_total, size as u64);
    Reply::new(250, "2.0.0", format!("OK queued as {id_text}"))
}

async fn start_tls(s: &mut Session, w: &mut Wire) -> Result<(), End> {
    w.queue(&reply::READY_TLS);
    w.flush().await?;
    if !w.buffered().is_empty() {
        // Plaintext sent behind STARTTLS would be read as if it came over TLS.
        ShardMetrics::add(&s.shard.metrics.smtp_starttls_injection_total, 1);
        tracing::info!(peer = %s.peer, "dropping connection: data pipelined after STARTTLS");
        return Err(End::Disconnected);
    }
    let config = s
        .shard
        .shared
        .tls
        .clone()
        .expect("STARTTLS is only offered with TLS");
    if let Err(err) = w.conn.start_tls(config, WRITE_TIMEOUT).await {
        tracing::debug!(peer = %s.peer, "TLS handshake failed: {err}");
        return Err(End::Disconnected);
    }
    ShardMetrics::add(&s.shard.metrics.smtp_tls_handshakes_total, 1);
    s.tls = w.conn.tls_session().map(|c| crate::tls::describe(c));
    // RFC 3207 4.2: forget everything learned before TLS.
    s.helo = None;
    s.esmtp = false;
    s.tx = None;
    s.auth_user = None;
    Ok(())
}

/// Sends a 334 challenge and reads the client's base64 response.
async fn challenge(
    s: &Session,
    w: &mut Wire,
    text: &'static str,
) -> Result<Result<Vec<u8>, Reply>, End> {
    w.queue(&Reply::fixed(334, "", text));
    match read_line(s, w).await? {
        Line::Command(line) => Ok(verbs::auth_decode(&line)),
        Line::TooLong | Line::BadBytes => Ok(Err(Reply::fixed(501, "5.5.2", "bad AUTH response"))),
    }
}

async fn auth(
    s: &mut Session,
    w: &mut Wire,
    mechanism: Mechanism,
    initial: Option<String>,
) -> Result<Reply, End> {
    let initial = initial.map(|i| verbs::auth_decode(&i));
    let (user, password) = match mechanism {
        Mechanism::Plain => {
            let response = match initial {
                Some(r) => r,
                None => challenge(s, w, "").await?,
            };
            match response.and_then(|r| verbs::auth_plain(&r)) {
                Ok(pair) => pair,
                Err(reply) => return Ok(reply),
            }
        }
        Mechanism::Login => {
            let user = match initial {
                Some(r) => r,
                None => challenge(s, w, "VXNlcm5hbWU6").await?,
            };
            let user = match user {
                Ok(u) => match String::from_utf8(u) {
                    Ok(u) => u,
                    Err(_) => return Ok(Reply::fixed(501, "5.5.2", "user name is not UTF-8")),
                },
                Err(reply) => return Ok(reply),
            };
            match challenge(s, w, "UGFzc3dvcmQ6").await? {
                Ok(password) => (user, password),
                Err(reply) => return Ok(reply),
            }
        }
    };
    if verify(s, &user, password).await {
        s.auth_user = Some(user);
        Ok(reply::AUTH_OK)
    } else {
        ShardMetrics::add(&s.shard.metrics.smtp_auth_failures_total, 1);
        tracing::info!(peer = %s.peer, user, "authentication failed");
        Ok(reply::AUTH_FAILED)
    }
}

/// Checks a password, first against this shard's cache of recent successes. The
/// PBKDF2 run (tens of thousands of HMAC rounds, milliseconds) goes to glommio's
/// blocking-call thread, so that the executor keeps serving every other session
/// meanwhile.
async fn verify(s: &Session, user: &str, password: Vec<u8>) -> bool {
    let digest = {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(user.as_bytes());
        ctx.update(&[0]);
        ctx.update(&password);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    };
    if s.shard.auth_cache.borrow().get(user) == Some(&digest) {
        return true;
    }
    let shared = s.shard.shared.clone();
    let name = user.to_string();
    let valid = glommio::executor()
        .spawn_blocking(move || shared.credentials.verify(&name, &password))
        .await;
    if valid {
        s.shard
            .auth_cache
            .borrow_mut()
            .insert(user.to_string(), digest);
        return true;
    }
    false
}
