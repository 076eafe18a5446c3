//! Private keys for DKIM from PEM files: PKCS#8 (`BEGIN PRIVATE KEY`, RSA or
//! Ed25519) or PKCS#1 (`BEGIN RSA PRIVATE KEY`); and the public key as it goes in
//! the DNS TXT record (`p=`).
//!
//! RSA keys of 2048 to 4096 bits are ring's. ring refuses anything shorter, but
//! RFC 8301 still allows 1024-bit keys and many senders' DNS still publishes them,
//! so keys of 1024 to 2047 bits are parsed and signed by the `rsa` crate (blinded
//! private-key operations) and a warning at load says they are weak.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
// The same PKCS#8 decoding trait serves ed25519-dalek and the rsa crate.
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use ring::signature::RsaKeyPair;
use rsa::pkcs1::DecodeRsaPrivateKey as _;
use rsa::pkcs8::EncodePublicKey as _;
use rsa::traits::PublicKeyParts as _;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

use super::Key;

/// Shortest RSA key signed with (RFC 8301 section 3.2).
pub const RSA_BITS_MIN: usize = 1024;
/// Longest RSA key signed with.
pub const RSA_BITS_MAX: usize = 4096;

/// Reads and parses a key; the error says what is wrong with it.
pub fn load(path: &std::path::Path) -> Result<Key, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key = parse(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Key::RsaShort(short) = &key {
        tracing::warn!(
            key = %path.display(),
            bits = short.n().bits(),
            "RSA key shorter than 2048 bits: receivers increasingly treat such DKIM keys as weak"
        );
    }
    Ok(key)
}

pub fn parse(pem: &[u8]) -> Result<Key, String> {
    let der =
        PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no PEM private key ({e})"))?;
    match der {
        PrivateKeyDer::Pkcs8(pkcs8) => {
            let bytes = pkcs8.secret_pkcs8_der();
            // PKCS#8 v1 or v2; a v2 key's public key must match its private key.
            if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_der(bytes) {
                return Ok(Key::Ed25519(key));
            }
            match RsaKeyPair::from_pkcs8(bytes) {
                Ok(key) => rsa_ring(key),
                Err(e) => short_rsa(rsa::RsaPrivateKey::from_pkcs8_der(bytes).ok(), &e),
            }
        }
        PrivateKeyDer::Pkcs1(pkcs1) => {
            let bytes = pkcs1.secret_pkcs1_der();
            match RsaKeyPair::from_der(bytes) {
                Ok(key) => rsa_ring(key),
                Err(e) => short_rsa(rsa::RsaPrivateKey::from_pkcs1_der(bytes).ok(), &e),
            }
        }
        _ => Err("an EC (SEC1) key: DKIM signs with RSA or Ed25519".into()),
    }
}

/// ring takes keys up to 8192 bits; DKIM verifiers need only handle 4096.
fn rsa_ring(key: RsaKeyPair) -> Result<Key, String> {
    let bits = key.public().modulus_len() * 8;
    if bits > RSA_BITS_MAX {
        return Err(rsa_size(bits));
    }
    Ok(Key::Rsa(key))
}

/// A key ring refused: usable if it is a valid RSA key of 1024 to 2047 bits.
fn short_rsa(
    key: Option<rsa::RsaPrivateKey>,
    ring_said: &ring::error::KeyRejected,
) -> Result<Key, String> {
    let Some(key) = key else {
        return Err(format!(
            "not a usable RSA or Ed25519 private key ({ring_said}); RSA keys must have {RSA_BITS_MIN} to {RSA_BITS_MAX} bits"
        ));
    };
    let bits = key.n().bits();
    if !(RSA_BITS_MIN..2048).contains(&bits) {
        return Err(rsa_size(bits));
    }
    key.validate()
        .map_err(|e| format!("not a usable RSA private key ({e})"))?;
    Ok(Key::RsaShort(Box::new(key)))
}

fn rsa_size(bits: usize) -> String {
    format!("a {bits}-bit RSA key: RSA keys must have {RSA_BITS_MIN} to {RSA_BITS_MAX} bits")
}

impl Key {
    /// `k=` and `p=` of the DNS record: for RSA the SubjectPublicKeyInfo, for
    /// Ed25519 the 32 bytes of the public key (RFC 8463).
    pub fn dns_public(&self) -> (&'static str, String) {
        match self {
            Key::Ed25519(key) => ("ed25519", B64.encode(key.verifying_key().as_bytes())),
            Key::Rsa(key) => ("rsa", B64.encode(spki_rsa(key.public().as_ref()))),
            Key::RsaShort(key) => (
                "rsa",
                // Encoding a valid public key into a Vec cannot fail.
                key.to_public_key()
                    .to_public_key_der()
                    .map(|der| B64.encode(der.as_bytes()))
                    .unwrap_or_default(),
            ),
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
