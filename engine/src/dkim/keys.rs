//! Private keys for DKIM from PEM files: PKCS#8 (`BEGIN PRIVATE KEY`, RSA or
//! Ed25519) or PKCS#1 (`BEGIN RSA PRIVATE KEY`); and the public key as it goes in
//! the DNS TXT record (`p=`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

use super::Key;

/// Reads and parses a key; the error says what is wrong with it.
pub fn load(path: &std::path::Path) -> Result<Key, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse(pem: &[u8]) -> Result<Key, String> {
    let der =
        PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no PEM private key ({e})"))?;
    match der {
        PrivateKeyDer::Pkcs8(pkcs8) => {
            let bytes = pkcs8.secret_pkcs8_der();
            if let Ok(key) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(bytes) {
                return Ok(Key::Ed25519(key));
            }
            RsaKeyPair::from_pkcs8(bytes)
                .map(Key::Rsa)
                .map_err(|e| rsa_rejected(&e))
        }
        PrivateKeyDer::Pkcs1(pkcs1) => RsaKeyPair::from_der(pkcs1.secret_pkcs1_der())
            .map(Key::Rsa)
            .map_err(|e| rsa_rejected(&e)),
        _ => Err("an EC (SEC1) key: DKIM signs with RSA or Ed25519".into()),
    }
}

fn rsa_rejected(e: &ring::error::KeyRejected) -> String {
    format!("not a usable RSA or Ed25519 private key ({e}); RSA keys must have 2048 to 4096 bits")
}

impl Key {
    /// `k=` and `p=` of the DNS record: for RSA the SubjectPublicKeyInfo, for
    /// Ed25519 the 32 bytes of the public key (RFC 8463).
    pub fn dns_public(&self) -> (&'static str, String) {
        match self {
            Key::Ed25519(key) => ("ed25519", B64.encode(key.public_key().as_ref())),
            Key::Rsa(key) => ("rsa", B64.encode(spki_rsa(key.public().as_ref()))),
        }
    }

    /// The whole TXT record value.
    pub fn dns_record(&self) -> String {
        let (k, p) = self.dns_public();
        format!("v=DKIM1; k={k}; p={p}")
    }
}

/// DER length octets.
fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    der_len(content.len(), &mut out);
    out.extend_from_slice(content);
    out
}

/// Wraps a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo.
fn spki_rsa(rsa_public_key: &[u8]) -> Vec<u8> {
    // SEQUENCE { OID 1.2.840.113549.1.1.1 (rsaEncryption), NULL }
    const ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0u8];
    bits.extend_from_slice(rsa_public_key);
    let mut content = ALGORITHM.to_vec();
    content.extend(der(0x03, &bits));
    der(0x30, &content)
}
