//! The SMTP client: one connection to one destination host, reused for many
//! messages. It reads the banner, says EHLO (HELO if refused), upgrades with STARTTLS
//! as the mode asks, and sends each message with PIPELINING when offered, returning
//! the reply to every recipient.
//!
//! The client never sends a bare CR or LF: the body's line endings are made CRLF as it
//! is dot-stuffed, and the end of data is always `<CRLF>.<CRLF>`. After STARTTLS it
//! refuses a server that sent anything beyond the 220 (response injection).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::io::Conn;

pub use gannet_core::config::TlsMode;

pub use gannet_core::shaping::Timeouts;

/// What the client is told to do.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub ehlo_name: String,
    pub source: Option<IpAddr>,
    pub tls: TlsWant,
    pub timeouts: Timeouts,
    /// AUTH credentials (a route to a smarthost): sent after TLS, never without it.
    pub auth: Option<std::sync::Arc<gannet_core::config::RouteAuth>>,
    /// The relay the egress source's connections go through.
    pub proxy: Option<std::sync::Arc<gannet_core::queue::EgressProxy>>,
}

/// What a report-only check of a certificate found wrong (TLS-RPT result type,
/// detail), filled in during the handshake.
pub type CheckSlot = std::sync::Arc<std::sync::Mutex<Option<(&'static str, String)>>>;

/// The TLS one connection uses.
#[derive(Debug, Clone)]
pub enum TlsWant {
    /// Plaintext, even when STARTTLS is offered.
    Disabled,
    /// STARTTLS when offered, any certificate; plaintext otherwise.
    Opportunistic,
    /// STARTTLS with a certificate valid for the host name (WebPKI roots and
    /// `delivery.tls_ca_file`), or no delivery (TLS mode required, MTA-STS enforce).
    Verified,
    /// STARTTLS with any certificate, or no delivery (DANE with no usable record).
    Encrypted,
    /// STARTTLS with a chain that matches one of these TLSA records (DANE), or no
    /// delivery.
    Dane(std::sync::Arc<[gannet_core::tls_policy::Tlsa]>),
    /// As opportunistic, with the certificate checked as `Verified` would and what
    /// is wrong with it written to the slot, not refused (MTA-STS testing).
    Checked(CheckSlot),
}

impl TlsWant {
    /// The want of a TLS mode.
    pub fn of(mode: TlsMode) -> TlsWant {
        match mode {
            TlsMode::Disabled => TlsWant::Disabled,
            TlsMode::Opportunistic => TlsWant::Opportunistic,
            TlsMode::Required => TlsWant::Verified,
        }
    }

    /// The want of a connection to the site's `host`-th address: the destination's
    /// demands (MTA-STS enforce, DANE, a route's mode) over the shaping's `mode`.
    pub fn for_host(
        site: &gannet_core::tls_policy::SiteTls,
        host: usize,
        mode: TlsMode,
    ) -> TlsWant {
        use gannet_core::tls_policy::{HostDane, SiteTls};
        match site {
            SiteTls::Shaping | SiteTls::Sts { enforce: false, .. } => TlsWant::of(mode),
            SiteTls::Mode(own) => TlsWant::of(*own),
            SiteTls::Sts { enforce: true, .. } => TlsWant::Verified,
            SiteTls::Dane { hosts, .. } => match hosts.get(host) {
                Some(HostDane::Authenticate(records)) => TlsWant::Dane(records.clone()),
                // Unreachable hosts are skipped before a connection is tried.
                Some(HostDane::EncryptOnly | HostDane::Unreachable) => TlsWant::Encrypted,
                Some(HostDane::Absent) | None => TlsWant::of(mode),
            },
        }
    }

    /// Whether the connection fails without TLS.
    pub fn mandatory(&self) -> bool {
        !matches!(
            self,
            TlsWant::Disabled | TlsWant::Opportunistic | TlsWant::Checked(_)
        )
    }
}

pub use gannet_core::reply::Response;

/// Why a connection or a transaction failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("timeout waiting for the {phase} reply")]
    Timeout { phase: &'static str },
    #[error("connection lost during {phase}: {source}")]
    Io {
        phase: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("protocol error during {phase}: {detail}")]
    Protocol { phase: &'static str, detail: String },
    /// The server refused the session itself (banner, EHLO, STARTTLS).
    #[error("{phase} refused: {response}")]
    Refused {
        phase: &'static str,
        response: Response,
    },
    /// TLS is required and could not be had; `result` is what TLS-RPT calls it
    /// (RFC 8460 4.3), when it is about TLS at all.
    #[error("TLS is required but {detail}")]
    TlsRequired {
        detail: String,
        result: Option<&'static str>,
    },
    /// An opportunistic handshake failed after the server accepted STARTTLS (the
    /// connection is unusable; a plaintext one may follow, per provider rule).
    #[error("the TLS handshake failed: {0}")]
    Handshake(std::io::Error),
}

impl ClientError {
    /// The reply that stands for this failure, for per-recipient outcomes and events.
    ///
    /// Always a 4xx: every failure here is of the connection or the session, not of
    /// a transaction, so it defers and never bounces (only the replies to MAIL, RCPT
    /// and DATA decide a recipient's fate). A server that refuses the session with a
    /// 5xx — a blocklisting's `554 5.7.1` banner, an EHLO refused — is deferred as
    /// Postfix does ("refused to talk to me"), with the server's words kept in the
    /// text for the event and for rules that read it.
    pub fn response(&self) -> Response {
        match self {
            ClientError::Refused { response, .. } if (400..500).contains(&response.code) => {
                response.clone()
            }
            // 5xx, or a reply that made no sense there (a banner of 250 is no
            // delivery either).
            ClientError::Refused { phase, response } => Response::local(
                451,
                format!("4.4.2 the server refused the session at {phase}: {response}"),
            ),
            ClientError::TlsRequired { .. } | ClientError::Handshake(_) => {
                Response::local(451, format!("4.7.5 {self}"))
            }
            _ => Response::local(451, format!("4.4.2 {self}")),
        }
    }
}

/// What TLS-RPT (RFC 8460 4.3.2) calls a failed handshake.
pub fn tls_result_type(e: &std::io::Error) -> &'static str {
    use rustls::CertificateError as C;
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            C::NotValidForName | C::NotValidForNameContext { .. } => "certificate-host-mismatch",
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => "certificate-expired",
            C::UnknownIssuer | C::BadSignature | C::BadEncoding => "certificate-not-trusted",
            _ => "validation-failure",
        },
        _ => "validation-failure",
    }
}

/// What the server said to one transaction.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub mail: Response,
    /// One per recipient, in order (empty if MAIL was refused).
    pub rcpt: Vec<Response>,
    /// The reply after the data (None if no recipient was accepted or DATA failed).
    pub data: Option<Response>,
}

impl Transaction {
    /// The reply that decides recipient `i`'s fate.
    pub fn outcome(&self, i: usize) -> &Response {
        if !self.mail.is_positive() {
            return &self.mail;
        }
        match (&self.rcpt[i], &self.data) {
            (rcpt, _) if !rcpt.is_positive() => rcpt,
            (_, Some(data)) => data,
            (rcpt, None) => rcpt,
        }
    }
}

/// What EHLO offered.
#[derive(Debug, Default, Clone)]
pub struct Extensions {
    pub pipelining: bool,
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    /// The AUTH mechanisms offered (upper case).
    pub auth: Vec<String>,
}

impl Extensions {
    fn parse(ehlo: &Response) -> Extensions {
        let mut ext = Extensions::default();
        for line in ehlo.text.lines().skip(1) {
            let mut words = line.split_whitespace();
            let keyword = words.next().unwrap_or("").to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => ext.pipelining = true,
                "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "STARTTLS" => ext.starttls = true,
                "AUTH" => ext.auth = words.map(str::to_ascii_uppercase).collect(),
                _ => {}
            }
        }
        ext
    }
}

/// An open SMTP connection, ready for MAIL.
#[derive(Debug)]
pub struct Session {
    conn: Conn,
    input: Vec<u8>,
    /// Scratch for commands and the dot-stuffed body, reused across messages.
    output: Vec<u8>,
    pub extensions: Extensions,
    /// "TLSv1.3 with cipher …" when TLS is active.
    pub tls: Option<String>,
    timeouts: Timeouts,
    /// Recipients of a transaction whose MAIL, RCPT and DATA already went out behind
    /// the previous message's end of data: the next [`Session::send`] must be that
    /// transaction, and only reads its replies.
    primed: Option<usize>,
}

/// The envelope of the transaction that follows the one being sent.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub sender: &'a str,
    pub recipients: &'a [&'a str],
    pub body: &'a [u8],
}

/// Largest reply accepted (all lines).
const REPLY_BYTES_MAX: usize = 64 << 10;

impl Session {
    /// Connects, reads the banner, greets, and negotiates TLS as `options.tls` says.
    /// `server_name` is the host name the certificate must match in `Required` mode.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        options: &ClientOptions,
        tls: &super::tls::ClientTls,
    ) -> Result<Session, ClientError> {
        let t = options.timeouts;
        let conn = match &options.proxy {
            None => Conn::connect(addr, options.source, t.connect).await,
            Some(proxy) => crate::io::proxy::connect(proxy, addr, options.source, t.connect).await,
        }
        .map_err(|source| ClientError::Connect { addr, source })?;
        let mut session = Session {
            conn,
            input: Vec::with_capacity(4096),
            output: Vec::with_capacity(16 << 10),
            extensions: Extensions::default(),
            tls: None,
            timeouts: t,
            primed: None,
        };
        let banner = session.read_response("banner", t.banner).await?;
        if banner.code != 220 {
            return Err(ClientError::Refused {
                phase: "banner",
                response: banner,
            });
        }
        session.greet(&options.ehlo_name).await?;
        let want = &options.tls;
        let start_tls = match want {
            TlsWant::Disabled => false,
            TlsWant::Opportunistic | TlsWant::Checked(_) => session.extensions.starttls,
            _ if !session.extensions.starttls => {
                return Err(ClientError::TlsRequired {
                    detail: "the server does not offer STARTTLS".into(),
                    result: Some("starttls-not-supported"),
                });
            }
            _ => true,
        };
        if start_tls {
            session
                .command(b"STARTTLS\r\n", "STARTTLS", t.starttls)
                .await?;
            let reply = session.read_response("STARTTLS", t.starttls).await?;
            if reply.code != 220 {
                if want.mandatory() {
                    return Err(ClientError::TlsRequired {
                        detail: format!("STARTTLS was refused: {reply}"),
                        result: Some("starttls-not-supported"),
                    });
                }
                // Opportunistic: carry on in plaintext, as the server allows.
                return session.authenticate(options).await.map(|()| session);
            }
            if !session.input.is_empty() {
                return Err(ClientError::Protocol {
                    phase: "STARTTLS",
                    detail: "the server sent data after its 220 (response injection)".into(),
                });
            }
            let config = tls.config_for(want);
            let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
                .unwrap_or_else(|_| rustls::pki_types::ServerName::IpAddress(addr.ip().into()));
            session
                .conn
                .start_tls_client(config, name, t.starttls)
                .await
                .map_err(|e| {
                    if want.mandatory() {
                        ClientError::TlsRequired {
                            detail: format!("the TLS handshake failed: {e}"),
                            result: Some(tls_result_type(&e)),
                        }
                    } else {
                        ClientError::Handshake(e)
                    }
                })?;
            session.tls = session
                .conn
                .tls_client_session()
                .map(|c| crate::tls::describe(c));
            session.greet(&options.ehlo_name).await?;
        }
        session.authenticate(options).await?;
        Ok(session)
    }

    /// AUTH with the route's credentials, if it has any: PLAIN, or LOGIN when the
    /// server offers only that. Only over TLS. A refusal is the session's (it
    /// defers: the credentials are the operator's to fix, not the recipients').
    async fn authenticate(&mut self, options: &ClientOptions) -> Result<(), ClientError> {
        use base64::Engine as _;
        let Some(auth) = &options.auth else {
            return Ok(());
        };
        if self.tls.is_none() {
            return Err(ClientError::TlsRequired {
                detail: "AUTH credentials are sent only over TLS".into(),
                result: None,
            });
        }
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let t = self.timeouts.ehlo;
        let offered = |m: &str| self.extensions.auth.iter().any(|a| a == m);
        let refused = |response: Response| ClientError::Refused {
            phase: "AUTH",
            response,
        };
        let reply = if offered("PLAIN") || !offered("LOGIN") {
            let mut token = Vec::with_capacity(auth.username.len() + auth.password.len() + 2);
            token.push(0);
            token.extend_from_slice(auth.username.as_bytes());
            token.push(0);
            token.extend_from_slice(auth.password.as_bytes());
            let line = format!("AUTH PLAIN {}\r\n", b64(&token));
            self.command(line.as_bytes(), "AUTH", t).await?;
            self.read_response("AUTH", t).await?
        } else {
            self.command(b"AUTH LOGIN\r\n", "AUTH", t).await?;
            let mut reply = self.read_response("AUTH", t).await?;
            for secret in [&auth.username, &auth.password] {
                if reply.code != 334 {
                    break;
                }
                let line = format!("{}\r\n", b64(secret.as_bytes()));
                self.command(line.as_bytes(), "AUTH", t).await?;
                reply = self.read_response("AUTH", t).await?;
            }
            reply
        };
        if reply.code == 235 {
            Ok(())
        } else {
            Err(refused(reply))
        }
    }

    async fn greet(&mut self, ehlo_name: &str) -> Result<(), ClientError> {
        let t = self.timeouts.ehlo;
        self.command(format!("EHLO {ehlo_name}\r\n").as_bytes(), "EHLO", t)
            .await?;
        let reply = self.read_response("EHLO", t).await?;
        if reply.code == 250 {
            self.extensions = Extensions::parse(&reply);
            return Ok(());
        }
        self.command(format!("HELO {ehlo_name}\r\n").as_bytes(), "HELO", t)
            .await?;
        let reply = self.read_response("HELO", t).await?;
        if reply.code != 250 {
            return Err(ClientError::Refused {
                phase: "HELO",
                response: reply,
            });
        }
        self.extensions = Extensions::default();
        Ok(())
    }

    /// Whether the server takes pipelined commands (RFC 2920), and so the next
    /// transaction's envelope behind a message.
    pub fn pipelines(&self) -> bool {
        self.extensions.pipelining
    }

    /// Sends one message to `recipients`. Transport failures are errors (the caller
    /// retries every recipient); server refusals are in the returned transaction.
    ///
    /// With `next` and a pipelining server, the next transaction's MAIL, RCPT and
    /// DATA go out in the same write as this message's end of data (RFC 2920 3.1:
    /// message content may start a command group), sparing a write and a read per
    /// message; the following `send` must then be for exactly `next`. Whether it was
    /// sent so is [`Session::is_primed`].
    pub async fn send(
        &mut self,
        sender: &str,
        recipients: &[&str],
        body: &[u8],
        next: Option<Envelope<'_>>,
    ) -> Result<Transaction, ClientError> {
        let t = self.timeouts;
        match self.primed.take() {
            Some(primed) => debug_assert_eq!(primed, recipients.len(), "not the primed envelope"),
            None => {
                if let Some(refusal) = self.refusal(sender, recipients) {
                    return Ok(Transaction {
                        rcpt: vec![refusal.clone(); recipients.len()],
                        mail: refusal,
                        data: None,
                    });
                }
                self.output.clear();
                self.write_envelope(sender, recipients, body);
                self.flush_output("MAIL", t.mail).await?;
            }
        }
        let pipelined = self.extensions.pipelining;
        let mail_reply = self.read_response("MAIL", t.mail).await?;
        let mut rcpt_replies = Vec::with_capacity(recipients.len());
        for rcpt in recipients {
            if !pipelined {
                if !mail_reply.is_positive() {
                    break;
                }
                self.command(format!("RCPT TO:<{rcpt}>\r\n").as_bytes(), "RCPT", t.rcpt)
                    .await?;
            }
            rcpt_replies.push(self.read_response("RCPT", t.rcpt).await?);
        }
        let any_accepted =
            mail_reply.is_positive() && rcpt_replies.iter().any(Response::is_positive);
        let data_reply = if pipelined {
            Some(self.read_response("DATA", t.data).await?)
        } else if any_accepted {
            self.command(b"DATA\r\n", "DATA", t.data).await?;
            Some(self.read_response("DATA", t.data).await?)
        } else {
            None
        };
        let mut transaction = Transaction {
            mail: mail_reply,
            rcpt: rcpt_replies,
            data: None,
        };
        match data_reply {
            Some(reply) if reply.code == 354 => {
                if !any_accepted {
                    // RFC 2920 3.1: DATA was accepted although no recipient was; end
                    // the empty message and forget the transaction.
                    self.command(b".\r\n", "DATA", t.data_done).await?;
                    let _ = self.read_response("DATA", t.data_done).await?;
                } else {
                    self.output.clear();
                    dot_stuff(body, &mut self.output);
                    if let Some(next) = next
                        && pipelined
                        && self.refusal(next.sender, next.recipients).is_none()
                    {
                        self.write_envelope(next.sender, next.recipients, next.body);
                        self.primed = Some(next.recipients.len());
                    }
                    self.flush_output("DATA", t.data).await?;
                    transaction.data = Some(self.read_response("end of data", t.data_done).await?);
                }
            }
            Some(reply) => {
                if any_accepted {
                    transaction.data = Some(reply);
                }
                self.reset().await?;
            }
            None => self.reset().await?,
        }
        Ok(transaction)
    }

    /// Whether the next transaction's envelope is already on the wire (see
    /// [`Session::send`]).
    pub fn is_primed(&self) -> bool {
        self.primed.is_some()
    }

    /// A refusal for every recipient when this server cannot take the envelope.
    fn refusal(&self, sender: &str, recipients: &[&str]) -> Option<Response> {
        (needs_smtputf8(sender, recipients) && !self.extensions.smtputf8).then(|| {
            Response::local(
                550,
                "5.6.7 the server does not offer SMTPUTF8, which this message's addresses need",
            )
        })
    }

    /// Appends MAIL (and, to a pipelining server, the RCPTs and DATA) to the output.
    fn write_envelope(&mut self, sender: &str, recipients: &[&str], body: &[u8]) {
        use std::io::Write as _;
        let out = &mut self.output;
        // Writes into a Vec cannot fail.
        let _ = write!(out, "MAIL FROM:<{sender}>");
        if self.extensions.size.is_some() {
            let _ = write!(out, " SIZE={}", body.len());
        }
        if self.extensions.eight_bit_mime && !body.is_ascii() {
            out.extend_from_slice(b" BODY=8BITMIME");
        }
        if needs_smtputf8(sender, recipients) {
            out.extend_from_slice(b" SMTPUTF8");
        }
        out.extend_from_slice(b"\r\n");
        if self.extensions.pipelining {
            for rcpt in recipients {
                let _ = write!(out, "RCPT TO:<{rcpt}>\r\n");
            }
            out.extend_from_slice(b"DATA\r\n");
        }
    }

    async fn reset(&mut self) -> Result<(), ClientError> {
        self.command(b"RSET\r\n", "RSET", self.timeouts.mail)
            .await?;
        let reply = self.read_response("RSET", self.timeouts.mail).await?;
        if reply.code != 250 {
            return Err(ClientError::Protocol {
                phase: "RSET",
                detail: reply.to_string(),
            });
        }
        Ok(())
    }

    /// Whether the server has said something unasked (a 421 before closing) or
    /// closed the connection: then it cannot carry another transaction.
    pub fn peer_has_spoken(&self) -> bool {
        !self.input.is_empty() || self.conn.peer_has_spoken()
    }

    /// Says QUIT and closes without waiting for the reply (Postfix's default,
    /// `smtp_skip_quit_response = yes`): every transaction on the connection has its
    /// answer already, the 221 changes nothing, and waiting for it cost a read, a
    /// timer and a round trip per connection — one per message when every message
    /// goes to a new site. A session whose next envelope is already on the wire only
    /// closes: the server may be waiting for that message's content, and would take
    /// QUIT for it.
    pub async fn quit(mut self) {
        if self.primed.is_none() {
            let _ = self
                .command(b"QUIT\r\n", "QUIT", Duration::from_secs(5))
                .await;
        }
        self.conn.close().await;
    }

    async fn command(
        &mut self,
        bytes: &[u8],
        phase: &'static str,
        limit: Duration,
    ) -> Result<(), ClientError> {
        self.output.clear();
        self.output.extend_from_slice(bytes);
        self.flush_output(phase, limit).await
    }

    async fn flush_output(
        &mut self,
        phase: &'static str,
        limit: Duration,
    ) -> Result<(), ClientError> {
        let result = self.conn.write_all(&self.output, limit).await;
        self.output.clear();
        result.map_err(|e| io_error(phase, e))
    }

    async fn read_response(
        &mut self,
        phase: &'static str,
        limit: Duration,
    ) -> Result<Response, ClientError> {
        loop {
            match take_reply(&mut self.input) {
                Ok(Some(response)) => return Ok(response),
                Ok(None) => {}
                Err(detail) => return Err(ClientError::Protocol { phase, detail }),
            }
            if self.input.len() > REPLY_BYTES_MAX {
                return Err(ClientError::Protocol {
                    phase,
                    detail: "reply too long".into(),
                });
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .conn
                .read(&mut chunk, limit)
                .await
                .map_err(|e| io_error(phase, e))?;
            if n == 0 {
                return Err(ClientError::Io {
                    phase,
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            self.input.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Takes one whole reply (all its lines) from the front of `input`: `Ok(None)` while
/// its last line has not arrived (nothing is taken), an error for a line that is not
/// `ddd[ -]text` or whose code differs from the first line's. The bytes come from a
/// remote server: any of them may be anything.
pub fn take_reply(input: &mut Vec<u8>) -> Result<Option<Response>, String> {
    let mut code = None;
    let mut lines: Vec<String> = Vec::new();
    let mut at = 0;
    while let Some(lf) = memchr::memchr(b'\n', &input[at..]) {
        let raw = &input[at..at + lf + 1];
        at += lf + 1;
        let line = String::from_utf8_lossy(raw);
        let line = line.trim_end_matches(['\r', '\n']);
        let bad = || format!("malformed reply line {line:?}");
        let digits = line.as_bytes().get(..3).ok_or_else(bad)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        let this = digits
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
        if *code.get_or_insert(this) != this {
            return Err(bad());
        }
        lines.push(line.get(4..).unwrap_or("").to_string());
        match line.as_bytes().get(3).copied().unwrap_or(b' ') {
            b' ' => {
                input.drain(..at);
                return Ok(Some(Response {
                    code: this,
                    text: lines.join("\n"),
                }));
            }
            b'-' => {}
            _ => return Err(bad()),
        }
    }
    Ok(None)
}

/// Whether an envelope has non-ASCII addresses (RFC 6531).
fn needs_smtputf8(sender: &str, recipients: &[&str]) -> bool {
    !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii())
}

fn io_error(phase: &'static str, e: std::io::Error) -> ClientError {
    if e.kind() == std::io::ErrorKind::TimedOut {
        ClientError::Timeout { phase }
    } else {
        ClientError::Io { phase, source: e }
    }
}

/// Appends `body` dot-stuffed, with every line ending made CRLF, followed by the end
/// of data (`.` alone on a line).
pub fn dot_stuff(body: &[u8], out: &mut Vec<u8>) {
    out.reserve(body.len() + body.len() / 64 + 5);
    let mut line_start = true;
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if line_start && b == b'.' {
            out.push(b'.');
        }
        match b {
            b'\r' if body.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                line_start = true;
                continue;
            }
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                line_start = true;
            }
            _ => {
                let end = memchr::memchr2(b'\r', b'\n', &body[i..]).map_or(body.len(), |n| i + n);
                out.extend_from_slice(&body[i..end]);
                line_start = false;
                i = end;
                continue;
            }
        }
        i += 1;
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_taken_whole_and_bad_lines_refused() {
        let mut input = b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n354 go".to_vec();
        let r = take_reply(&mut input).unwrap().unwrap();
        assert_eq!(
            (r.code, r.text.as_str()),
            (250, "mx.test\nPIPELINING\nSIZE 100")
        );
        assert_eq!(input, b"354 go");
        assert_eq!(
            take_reply(&mut input),
            Ok(None),
            "incomplete: nothing taken"
        );
        assert_eq!(input, b"354 go");
        input.extend_from_slice(b"\n");
        assert_eq!(take_reply(&mut input).unwrap().unwrap().code, 354);
        for bad in [
            &b"25\r\n"[..],
            b"2x0 no\r\n",
            b"250-a\r\n251 b\r\n",
            b"250+a\r\n",
            "\u{e9}50 x\r\n".as_bytes(),
            b"\xff\xfe\xfd\n",
        ] {
            assert!(take_reply(&mut bad.to_vec()).is_err(), "{bad:?}");
        }
        let mut bare = b"220\n".to_vec();
        assert_eq!(take_reply(&mut bare).unwrap().unwrap().text, "");
    }

    #[test]
    fn enhanced_codes_are_found_only_when_well_formed() {
        let code = |text: &str| {
            Response::local(550, text)
                .enhanced_code()
                .map(str::to_string)
        };
        assert_eq!(code("5.1.1 no such user"), Some("5.1.1".into()));
        assert_eq!(code("4.7.28 rate limited"), Some("4.7.28".into()));
        assert_eq!(code("2.0.0"), Some("2.0.0".into()));
        for bad in [
            "",
            "no such user",
            "5.1 x",
            "6.1.1 x",
            "5.1.1.1 x",
            "5.a.1 x",
            "5.1.1234 x",
        ] {
            assert_eq!(code(bad), None, "{bad}");
        }
    }

    #[test]
    fn dot_stuffing_and_line_endings() {
        let check = |body: &[u8], expected: &[u8]| {
            let mut out = Vec::new();
            dot_stuff(body, &mut out);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(expected)
            );
        };
        check(b"", b".\r\n");
        check(b"a\r\n", b"a\r\n.\r\n");
        check(b"a", b"a\r\n.\r\n");
        check(
            b".a\r\n..\r\n.\r\nb.\r\n",
            b"..a\r\n...\r\n..\r\nb.\r\n.\r\n",
        );
        // Never a bare CR or LF on the wire, and a smuggling sequence is defused.
        check(b"a\n.\r\nb\r.\rc", b"a\r\n..\r\nb\r\n..\r\nc\r\n.\r\n");
    }

    #[test]
    fn outcomes_per_recipient() {
        let ok = Response::local(250, "2.1.5 ok");
        let no = Response::local(550, "5.1.1 no such user");
        let t = Transaction {
            mail: Response::local(250, "2.1.0 ok"),
            rcpt: vec![ok.clone(), no.clone()],
            data: Some(Response::local(250, "2.0.0 queued")),
        };
        assert_eq!(t.outcome(0).code, 250);
        assert_eq!(t.outcome(0).text, "2.0.0 queued");
        assert_eq!(t.outcome(1), &no);
        assert_eq!(no.enhanced(), Some("5.1.1"));
        assert_eq!(Response::local(250, "ok").enhanced(), None);
        let refused = Transaction {
            mail: Response::local(451, "4.3.0 later"),
            rcpt: vec![],
            data: None,
        };
        assert_eq!(refused.outcome(0).code, 451);
    }

    #[test]
    fn extensions() {
        let ehlo = Response::local(
            250,
            "mx.test greets\nPIPELINING\nSIZE 1000\n8BITMIME\nsmtputf8\nSTARTTLS",
        );
        let ext = Extensions::parse(&ehlo);
        assert!(ext.pipelining && ext.eight_bit_mime && ext.smtputf8 && ext.starttls);
        assert_eq!(ext.size, Some(1000));
    }
}
