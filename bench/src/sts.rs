//! The MTA-STS rig of the relay benchmark: a certificate authority made for the run
//! (rcgen), the receiving sink's certificate for every MX host (`*.bench.test`), and
//! an HTTPS server (rustls, a thread per connection) answering
//! `/.well-known/mta-sts.txt` for every policy host `mta-sts.d<N>.test` with an
//! `enforce` policy naming `*.bench.test`. gannetd trusts the CA through
//! `delivery.tls_ca_file`, so both the policy fetch and the MX's certificate verify
//! as they would against a public CA.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// The policy every bench domain publishes.
pub const POLICY: &str =
    "version: STSv1\r\nmode: enforce\r\nmx: *.bench.test\r\nmax_age: 86400\r\n";

/// The DNS records (unbound `local-data` lines) that publish a policy for
/// `d0.test` … `d<domains-1>.test`, its host at 127.0.0.1.
pub fn policy_records(domains: u64) -> String {
    use std::fmt::Write as _;
    let mut zone = String::with_capacity(120 * domains as usize);
    for d in 0..domains {
        let _ = writeln!(
            zone,
            "  local-data: '_mta-sts.d{d}.test. 300 IN TXT \"v=STSv1; id=bench{d}\"'\n  local-data: \"mta-sts.d{d}.test. 300 IN A 127.0.0.1\""
        );
    }
    zone
}

/// The CA and the certificates issued for one run, as PEM files in `dir`.
#[derive(Debug)]
pub struct BenchPki {
    /// The CA's certificate (for `delivery.tls_ca_file`).
    pub ca_file: PathBuf,
    /// The sink's chain and key: `*.bench.test`, every MX host.
    pub sink_cert: PathBuf,
    pub sink_key: PathBuf,
    /// The policy server's configuration: `mta-sts.d<N>.test` for every domain.
    pub policy_tls: Arc<rustls::ServerConfig>,
}

impl BenchPki {
    pub fn create(dir: &Path, domains: u64) -> Result<BenchPki> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "gannet relay-bench CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem())?;
        let (sink_cert, sink_key) = (dir.join("sink.pem"), dir.join("sink.key"));
        let (chain, key) = issue(&ca, vec!["*.bench.test".into()])?;
        std::fs::write(&sink_cert, chain)?;
        std::fs::write(&sink_key, key)?;
        let names = (0..domains).map(|d| format!("mta-sts.d{d}.test")).collect();
        let (chain, key) = issue(&ca, names)?;
        let (policy_cert, policy_key) = (dir.join("policy.pem"), dir.join("policy.key"));
        std::fs::write(&policy_cert, chain)?;
        std::fs::write(&policy_key, key)?;
        let policy_tls = gannet_engine::tls::server_config(&policy_cert, &policy_key, dir, "")?;
        Ok(BenchPki {
            ca_file,
            sink_cert,
            sink_key,
            policy_tls,
        })
    }
}

/// A certificate for `names` signed by `ca`: (chain PEM, key PEM).
fn issue(ca: &CertifiedIssuer<'static, KeyPair>, names: Vec<String>) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(names)?.signed_by(&key, ca)?;
    Ok((cert.pem() + &ca.pem(), key.serialize_pem()))
}

/// The HTTPS server of every policy host; counts the policies it served.
#[derive(Debug)]
pub struct PolicyServer {
    pub port: u16,
    pub served: Arc<AtomicU64>,
}

impl PolicyServer {
    pub fn start(tls: Arc<rustls::ServerConfig>) -> Result<PolicyServer> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the policy server")?;
        let port = listener.local_addr()?.port();
        let served = Arc::new(AtomicU64::new(0));
        std::thread::spawn({
            let served = served.clone();
            move || {
                for stream in listener.incoming().flatten() {
                    let (tls, served) = (tls.clone(), served.clone());
                    std::thread::spawn(move || {
                        if answer(stream, tls).unwrap_or(false) {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            }
        });
        Ok(PolicyServer { port, served })
    }
}

/// Answers one request on `stream` (then closes it): the policy for its path, 404 for
/// any other. True when the policy was sent.
fn answer(stream: TcpStream, tls: Arc<rustls::ServerConfig>) -> Result<bool> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let conn = rustls::ServerConnection::new(tls)?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        head.extend_from_slice(&buf[..n]);
    }
    let found = head.starts_with(b"GET /.well-known/mta-sts.txt ");
    let (status, body) = if found {
        ("200 OK", POLICY)
    } else {
        ("404 Not Found", "not found\n")
    };
    write!(
        tls,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    tls.flush()?;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(found)
}
