//! A certificate authority made for one test (rcgen), and certificates it issues,
//! written as PEM files for the real servers the tests start (aiosmtpd, Python's
//! HTTPS server) and for gannet's `delivery.tls_ca_file`.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub dir: tempfile::TempDir,
}

/// A certificate and its key on disk.
pub struct Leaf {
    /// The certificate, followed by the CA's when it was issued with its chain.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate alone (DER).
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).unwrap();
        TestCa { issuer, dir }
    }

    /// The CA's certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The CA's certificate (DER).
    pub fn der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// A certificate for `names`, signed by this CA; with `chain`, the file also holds
    /// the CA's certificate (as a server sends its chain).
    pub fn issue(&self, names: &[&str], chain: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let file = names.first().cloned().unwrap_or_default();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let mut pem = cert.pem();
        if chain {
            pem.push_str(&self.issuer.pem());
        }
        write_leaf(self.dir.path(), &file, pem, &key, cert.der().to_vec())
    }
}

/// A self-signed certificate for `name` (no CA vouches for it).
pub fn self_signed(dir: &Path, name: &str) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    write_leaf(dir, name, cert.pem(), &key, cert.der().to_vec())
}

impl Leaf {
    /// Copies the certificate and key into `dir` as what a server presents to a
    /// client naming `name` (SNI).
    pub fn serve_as(&self, dir: &Path, name: &str) {
        std::fs::copy(&self.cert, dir.join(format!("{name}.crt"))).unwrap();
        std::fs::copy(&self.key, dir.join(format!("{name}.key"))).unwrap();
    }
}

/// aiosmtpd with STARTTLS presenting, per SNI name, the certificates in `certs`
/// (`<name>.crt`, `<name>.key`) and a self-signed one for any other name; with the
/// directory it stores messages in.
pub fn smtp_with_sni(certs: &Path) -> (super::peers::Peer, u16, tempfile::TempDir) {
    let fallback = self_signed(certs, "sink.test");
    let out = tempfile::tempdir().unwrap();
    let (peer, port) = super::peers::aiosmtpd_args(
        out.path(),
        &[
            "--tls".into(),
            fallback.cert.into(),
            fallback.key.into(),
            "--sni".into(),
            certs.into(),
        ],
    );
    (peer, port, out)
}

fn write_leaf(dir: &Path, file: &str, pem: String, key: &KeyPair, der: Vec<u8>) -> Leaf {
    let cert_path = dir.join(format!("{file}.crt"));
    let key_path = dir.join(format!("{file}.key"));
    std::fs::write(&cert_path, pem).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Leaf {
        cert: cert_path,
        key: key_path,
        der,
    }
}
