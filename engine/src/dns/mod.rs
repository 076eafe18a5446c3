//! DNS for delivery: MX and address lookups with hickory-proto messages over glommio
//! UDP (TCP when the answer is truncated), a per-shard cache that honours TTLs and
//! caches negative answers, and the site name of a domain.
//!
//! `hickory-resolver` is not used: it needs tokio. This module builds queries and
//! reads answers itself; what it asks of the server is only recursion.

pub mod cache;

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::timer::deadline;
pub use gannet_core::config::IpLookup;

/// How long a negative answer (NXDOMAIN, no data) is cached when the server gives no
/// SOA minimum.
const NEGATIVE_TTL_SECS: u64 = 300;
/// Bounds on any cached TTL. The floor keeps a name with a zero TTL from being asked
/// again for every message queued to it.
const TTL_SECS_MAX: u64 = 86_400;
const TTL_SECS_MIN: u64 = 5;
/// Largest UDP answer read (EDNS is not requested; 512 is the classic limit, a
/// larger buffer is harmless).
/// Sends of a UDP query within the timeout.
const UDP_TRIES: u32 = 3;
const UDP_BYTES_MAX: usize = 4096;

/// Why a lookup did not give an answer (a temporary condition: retry later).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DnsError {
    #[error("DNS server {server} did not answer in time")]
    Timeout { server: SocketAddr },
    #[error("DNS server {server} answered {code}")]
    Server { server: SocketAddr, code: String },
    #[error("DNS query failed: {0}")]
    Io(String),
    #[error("DNS answer could not be read: {0}")]
    Malformed(String),
    #[error("`{0}` is not a valid domain name")]
    BadName(String),
}

/// The final answer to one question.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Records(Vec<RData>),
    NxDomain,
    NoData,
}

/// An MX lookup's meaning for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mx {
    /// Exchanges grouped by preference (lowest first), names sorted in a group.
    Hosts(Vec<Vec<String>>),
    /// The domain publishes "no mail" (RFC 7505 null MX).
    NoMail,
    /// The domain does not exist.
    NxDomain,
}

/// A shard's resolver.
#[derive(Debug)]
pub struct Resolver {
    server: SocketAddr,
    timeout: Duration,
    /// The address records asked for a host.
    ip_lookup: IpLookup,
    /// Answers, and whether the server said they were DNSSEC-validated (AD).
    cache: RefCell<cache::TtlCache<(String, RecordType), (Answer, bool)>>,
    /// Questions asked (not answered from the cache), and UDP queries sent again
    /// because no answer came within a try's share of the timeout.
    queries: Cell<u64>,
    resent: Cell<u64>,
    /// UDP sockets opened (one per resolution that asked the server).
    sockets: Cell<u64>,
}

/// What a shard's resolver has done so far (for its metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolverStats {
    /// Answers cached now.
    pub cached: usize,
    /// Answers dropped to make room before they expired.
    pub evicted: u64,
    /// Questions sent to the server.
    pub queries: u64,
    /// UDP queries sent again after a try's timeout.
    pub resent: u64,
    /// UDP sockets opened: one per resolution that asked the server.
    pub sockets: u64,
}

impl Resolver {
    /// A resolver asking `server` for hosts' addresses as `ip_lookup` says, caching
    /// at most `cache_entries_max` answers.
    pub fn new(
        server: SocketAddr,
        timeout: Duration,
        ip_lookup: IpLookup,
        cache_entries_max: usize,
    ) -> Resolver {
        Resolver {
            server,
            timeout,
            ip_lookup,
            cache: RefCell::new(cache::TtlCache::new(cache_entries_max)),
            queries: Cell::new(0),
            resent: Cell::new(0),
            sockets: Cell::new(0),
        }
    }

    /// What the resolver has done so far.
    pub fn stats(&self) -> ResolverStats {
        let cache = self.cache.borrow();
        ResolverStats {
            cached: cache.len(),
            evicted: cache.evicted,
            queries: self.queries.get(),
            resent: self.resent.get(),
            sockets: self.sockets.get(),
        }
    }

    /// The first `nameserver` of /etc/resolv.conf (port 53), if any.
    pub fn system_server() -> Option<SocketAddr> {
        let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .next()
    }

    /// MX of `domain`, with the implicit MX (the domain itself) when it has none.
    pub async fn mx(&self, domain: &str) -> Result<Mx, DnsError> {
        Ok(self.asking().mx_until(domain).await?.0)
    }

    /// The addresses of `host` as the resolver's `ip_lookup` asks for them. Empty if
    /// it has none.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        Ok(self.asking().addresses_until(host).await?.0)
    }

    /// The questions of one resolution (a domain's MX, then its hosts' addresses),
    /// asked one after the other from one UDP socket.
    pub fn asking(&self) -> Asking<'_> {
        Asking {
            resolver: self,
            socket: Cell::new(None),
        }
    }
}

/// One resolution's questions. They share a UDP socket, opened at the first question
/// the cache cannot answer and closed with the `Asking`, as a stub resolver asks A
/// and AAAA from one port: the port is still a fresh ephemeral one per resolution
/// (source-port randomness against spoofed answers), and each question has its own
/// random id. A socket per question cost five more system calls each (socket, bind,
/// connect, fcntl, close) — three questions per new domain (bench/RESULTS.md).
pub struct Asking<'r> {
    resolver: &'r Resolver,
    /// Taken out while a question is on the wire, put back after.
    socket: Cell<Option<glommio::net::UdpSocket>>,
}

impl std::fmt::Debug for Asking<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asking")
            .field("server", &self.resolver.server)
            .finish_non_exhaustive()
    }
}

impl Asking<'_> {
    /// MX of `domain`, and when the answer it comes from expires (unix ms).
    pub async fn mx_until(&self, domain: &str) -> Result<(Mx, u64), DnsError> {
        let (answer, expires_ms) = self.lookup(domain, RecordType::MX).await?;
        Ok((mx_meaning(answer, domain), expires_ms))
    }

    /// The addresses of `host` as the resolver's `ip_lookup` asks for them (IPv4
    /// first when both are kept), and when the first of the answers they come from
    /// expires (unix ms; never for a literal). Questions go one after the other:
    /// asked at once, many-domains ran a quarter slower against dnsmasq
    /// (bench/RESULTS.md, 2026-12-06).
    pub async fn addresses_until(&self, host: &str) -> Result<(Vec<IpAddr>, u64), DnsError> {
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok((vec![ip], u64::MAX));
        }
        let (first, second, fallback) = match self.resolver.ip_lookup {
            IpLookup::Ipv4ThenIpv6 => (RecordType::A, Some(RecordType::AAAA), true),
            IpLookup::Ipv6ThenIpv4 => (RecordType::AAAA, Some(RecordType::A), true),
            IpLookup::Ipv4AndIpv6 => (RecordType::A, Some(RecordType::AAAA), false),
            IpLookup::Ipv4Only => (RecordType::A, None, false),
            IpLookup::Ipv6Only => (RecordType::AAAA, None, false),
        };
        let (answer, mut until) = self.lookup(host, first).await?;
        let mut out = Vec::new();
        let found = addresses(answer, &mut out);
        // A fallback is asked only when the first answer said the name exists and
        // has no such records: NXDOMAIN holds for every type.
        let ask_second = match found {
            Found::Some => !fallback,
            Found::NoData => true,
            Found::NxDomain => false,
        };
        if let Some(second) = second.filter(|_| ask_second) {
            let (answer, second_until) = self.lookup(host, second).await?;
            until = until.min(second_until);
            addresses(answer, &mut out);
        }
        Ok((out, until))
    }

    /// The TXT records of `name` (each record's strings joined; bytes that are not
    /// UTF-8 replaced), and when the answer expires. None when the name has none.
    pub async fn txt_until(&self, name: &str) -> Result<(Vec<String>, u64), DnsError> {
        let (answer, until, _) = self.lookup_secure(name, RecordType::TXT).await?;
        let Answer::Records(records) = answer else {
            return Ok((Vec::new(), until));
        };
        let texts = records
            .into_iter()
            .filter_map(|r| match r {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|part| String::from_utf8_lossy(part))
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect();
        Ok((texts, until))
    }

    /// The TLSA records of `name` (`_25._tcp.<host>`), whether the answer was
    /// DNSSEC-validated (the resolver set AD), and when it expires. Records of an
    /// answer that was not validated mean nothing to DANE; the caller decides.
    pub async fn tlsa_until(
        &self,
        name: &str,
    ) -> Result<(Vec<gannet_core::tls_policy::Tlsa>, bool, u64), DnsError> {
        let (answer, until, secure) = self.lookup_secure(name, RecordType::TLSA).await?;
        let Answer::Records(records) = answer else {
            return Ok((Vec::new(), secure, until));
        };
        let records = records
            .into_iter()
            .filter_map(|r| match r {
                RData::TLSA(t) => Some(gannet_core::tls_policy::Tlsa {
                    usage: t.cert_usage.into(),
                    selector: t.selector.into(),
                    matching: t.matching.into(),
                    data: t.cert_data,
                }),
                _ => None,
            })
            .collect();
        Ok((records, secure, until))
    }

    /// Whether `domain`'s MX answer (as cached by [`Asking::mx_until`]) was
    /// DNSSEC-validated.
    pub async fn mx_secure(&self, domain: &str) -> Result<bool, DnsError> {
        Ok(self.lookup_secure(domain, RecordType::MX).await?.2)
    }

    /// Whether `host`'s address answers (the first type `ip_lookup` asks) were
    /// DNSSEC-validated.
    pub async fn addresses_secure(&self, host: &str) -> Result<bool, DnsError> {
        let first = match self.resolver.ip_lookup {
            IpLookup::Ipv6ThenIpv4 | IpLookup::Ipv6Only => RecordType::AAAA,
            _ => RecordType::A,
        };
        Ok(self.lookup_secure(host, first).await?.2)
    }

    /// The answer to a question (from the cache while it lasts) and when it expires.
    async fn lookup(&self, name: &str, rtype: RecordType) -> Result<(Answer, u64), DnsError> {
        let (answer, until, _) = self.lookup_secure(name, rtype).await?;
        Ok((answer, until))
    }

    /// The answer to a question, when it expires, and whether it was validated.
    async fn lookup_secure(
        &self,
        name: &str,
        rtype: RecordType,
    ) -> Result<(Answer, u64, bool), DnsError> {
        let resolver = self.resolver;
        let key = (name.to_ascii_lowercase(), rtype);
        let now = gannet_core::clock::unix_ms();
        if let Some(((answer, secure), until)) = resolver.cache.borrow().get_until(&key, now) {
            return Ok((answer, until, secure));
        }
        let (answer, ttl, secure) = self.query(&key.0, rtype).await?;
        let expires_ms = now + ttl.clamp(TTL_SECS_MIN, TTL_SECS_MAX) * 1000;
        resolver.cache.borrow_mut().insert(
            key,
            (answer.clone(), secure),
            expires_ms,
            gannet_core::clock::unix_ms(),
        );
        Ok((answer, expires_ms, secure))
    }

    /// One question to the server: the answer, how long it may be cached, and
    /// whether the server vouched for it (AD).
    async fn query(&self, name: &str, rtype: RecordType) -> Result<(Answer, u64, bool), DnsError> {
        let resolver = self.resolver;
        let fqdn = Name::from_ascii(format!("{}.", name.trim_end_matches('.')))
            .map_err(|_| DnsError::BadName(name.to_string()))?;
        let id: u16 = fastrand::u16(..);
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        // AD in a query asks a validating resolver to say whether the answer is
        // authentic (RFC 6840 5.7); DANE trusts that bit from a local resolver.
        message.metadata.authentic_data = true;
        message.add_query(Query::query(fqdn, rtype));
        let bytes = message
            .to_vec()
            .map_err(|e| DnsError::Malformed(e.to_string()))?;
        resolver.queries.set(resolver.queries.get() + 1);
        let socket = match self.socket.take() {
            Some(socket) => socket,
            None => {
                resolver.sockets.set(resolver.sockets.get() + 1);
                query_socket(resolver.server).map_err(|e| DnsError::Io(e.to_string()))?
            }
        };
        let response = resolver.udp(&socket, &bytes, id).await;
        self.socket.set(Some(socket));
        let mut response = response?;
        if response.metadata.truncation {
            response = resolver.tcp(&bytes, id).await?;
        }
        let secure = response.metadata.authentic_data;
        let (answer, ttl) = interpret(response, rtype, resolver.server)?;
        Ok((answer, ttl, secure))
    }
}

/// A UDP socket of its own for one resolution, connected to `server`: the kernel
/// gives it an ephemeral port no other socket holds and delivers to it only datagrams from
/// the server. (glommio's `UdpSocket::bind` sets SO_REUSEPORT, which lets the kernel
/// hand the same ephemeral port to many concurrent queries and spread their answers
/// among them: about one answer in a thousand went to a socket that discarded it, and
/// its query waited a try's timeout to be sent again.)
fn query_socket(server: SocketAddr) -> std::io::Result<glommio::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(server),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let any: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    socket.bind(&any.into())?;
    socket.connect(&server.into())?;
    let fd = std::os::fd::IntoRawFd::into_raw_fd(socket);
    // SAFETY: `fd` is an open UDP socket that nothing else owns (just released by
    // `into_raw_fd`); the glommio socket takes it over and closes it.
    Ok(unsafe { <glommio::net::UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// What an address question found.
enum Found {
    Some,
    NoData,
    NxDomain,
}

/// Adds the addresses of an A or AAAA answer to `out`.
fn addresses(answer: Answer, out: &mut Vec<IpAddr>) -> Found {
    let records = match answer {
        Answer::NxDomain => return Found::NxDomain,
        Answer::NoData => return Found::NoData,
        Answer::Records(records) => records,
    };
    let before = out.len();
    out.extend(records.into_iter().filter_map(|r| match r {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }));
    if out.len() > before {
        Found::Some
    } else {
        Found::NoData
    }
}

/// What an MX answer means for delivery to `domain`.
fn mx_meaning(answer: Answer, domain: &str) -> Mx {
    let records = match answer {
        Answer::NxDomain => return Mx::NxDomain,
        Answer::NoData => return Mx::Hosts(vec![vec![domain.to_ascii_lowercase()]]),
        Answer::Records(records) => records,
    };
    let mut mx: Vec<(u16, String)> = records
        .into_iter()
        .filter_map(|r| match r {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
            _ => None,
        })
        .map(|(p, name)| (p, name.trim_end_matches('.').to_ascii_lowercase()))
        .collect();
    if mx.len() == 1 && mx[0].1.is_empty() {
        return Mx::NoMail;
    }
    mx.retain(|(_, name)| !name.is_empty());
    if mx.is_empty() {
        return Mx::Hosts(vec![vec![domain.to_ascii_lowercase()]]);
    }
    mx.sort();
    let mut groups: Vec<(u16, Vec<String>)> = Vec::new();
    for (pref, name) in mx {
        match groups.last_mut() {
            Some((p, names)) if *p == pref => names.push(name),
            _ => groups.push((pref, vec![name])),
        }
    }
    Mx::Hosts(groups.into_iter().map(|(_, names)| names).collect())
}

impl Resolver {
    async fn udp(
        &self,
        socket: &glommio::net::UdpSocket,
        query: &[u8],
        id: u16,
    ) -> Result<Message, DnsError> {
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::TimedOut => DnsError::Timeout {
                server: self.server,
            },
            _ => DnsError::Io(e.to_string()),
        };
        // UDP may lose the query or the answer (a busy server drops what overflows
        // its socket): the query is sent again, UDP_TRIES times within the timeout.
        // One receive stays posted across the tries: a receive dropped at a try's
        // end is cancelled in the kernel only later, and an answer arriving
        // meanwhile completed the cancelled one and was lost (seen as a lookup that
        // timed out although its resent query was answered).
        let per_try = self.timeout / UDP_TRIES;
        let mut buf = vec![0u8; UDP_BYTES_MAX];
        let answer = async {
            loop {
                // recv_from, not recv: glommio's recv first asks the kernel for the
                // peer's address (a system call per question, for nothing: the
                // socket is connected).
                let (n, _) =
                    (socket.recv_from(&mut buf).await).map_err(|e| io(std::io::Error::from(e)))?;
                match Message::from_vec(&buf[..n]) {
                    // A stray or spoofed answer with another id is ignored.
                    Ok(m) if m.metadata.id == id => return Ok(m),
                    Ok(_) => continue,
                    Err(e) => return Err(DnsError::Malformed(e.to_string())),
                }
            }
        };
        let mut answer = std::pin::pin!(answer);
        for attempt in 1..=UDP_TRIES {
            if attempt > 1 {
                self.resent.set(self.resent.get() + 1);
            }
            deadline(
                async { socket.send(query).await.map_err(std::io::Error::from) },
                per_try,
            )
            .await
            .map_err(io)?;
            let waited = futures_lite::future::or(async { Some(answer.as_mut().await) }, async {
                glommio::timer::sleep(per_try).await;
                None
            })
            .await;
            if let Some(result) = waited {
                return result;
            }
        }
        Err(DnsError::Timeout {
            server: self.server,
        })
    }

    async fn tcp(&self, query: &[u8], id: u16) -> Result<Message, DnsError> {
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::TimedOut => DnsError::Timeout {
                server: self.server,
            },
            _ => DnsError::Io(e.to_string()),
        };
        let exchange = async {
            let mut stream = glommio::net::TcpStream::connect(self.server)
                .await
                .map_err(std::io::Error::from)?;
            let mut framed = (query.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(query);
            stream.write_all(&framed).await?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await?;
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut buf).await?;
            Ok(buf)
        };
        let buf = deadline(exchange, self.timeout).await.map_err(io)?;
        let m = Message::from_vec(&buf).map_err(|e| DnsError::Malformed(e.to_string()))?;
        if m.metadata.id != id {
            return Err(DnsError::Malformed(
                "answer id does not match the query".into(),
            ));
        }
        Ok(m)
    }
}

/// Reads a response: records of the asked type, NXDOMAIN, or no data; with the TTL
/// to cache it for. Server failures are errors (never cached).
fn interpret(
    response: Message,
    rtype: RecordType,
    server: SocketAddr,
) -> Result<(Answer, u64), DnsError> {
    let negative_ttl = response
        .authorities
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some(u64::from(soa.minimum.min(r.ttl))),
            _ => None,
        })
        .unwrap_or(NEGATIVE_TTL_SECS);
    match response.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Ok((Answer::NxDomain, negative_ttl)),
        code => {
            return Err(DnsError::Server {
                server,
                code: code.to_string(),
            });
        }
    }
    let records: Vec<(u32, RData)> = response
        .answers
        .into_iter()
        .filter(|r| r.record_type() == rtype)
        .map(|r| (r.ttl, r.data))
        .collect();
    if records.is_empty() {
        return Ok((Answer::NoData, negative_ttl));
    }
    let ttl = records
        .iter()
        .map(|(ttl, _)| u64::from(*ttl))
        .min()
        .unwrap_or(0);
    Ok((
        Answer::Records(records.into_iter().map(|(_, d)| d).collect()),
        ttl,
    ))
}

/// The site name of an MX set: host names sorted within each preference group, groups
/// in preference order — so every domain served by the same MXes shares one ready
/// queue.
pub fn site_name(groups: &[Vec<String>]) -> String {
    groups
        .iter()
        .map(|g| {
            let mut g = g.clone();
            g.sort();
            g.join(",")
        })
        .collect::<Vec<_>>()
        .join("|")
}

#[cfg(test)]
mod tests;
