//! DKIM signing (RFC 6376) with ring: rsa-sha256 and ed25519-sha256 (RFC 8463),
//! simple and relaxed canonicalization, chosen header fields with optional
//! over-signing, `t=` and optional `x=`.
//!
//! A [`Signer`] is one key with its domain, selector and settings, parsed once; it
//! is `Send + Sync` and shared by every shard. Signing a message costs one pass over
//! its body (the body hash) and one signature.

pub mod canon;
pub mod keys;
pub mod signers;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::RsaKeyPair;

pub use canon::Canon;
pub use signers::{DkimFailure, Signers};

/// A private key.
#[derive(Debug)]
pub enum Key {
    /// RSA of 2048 to 4096 bits (ring).
    Rsa(RsaKeyPair),
    /// RSA of 1024 to 2047 bits, which ring refuses (the `rsa` crate; see keys.rs).
    RsaShort(Box<rsa::RsaPrivateKey>),
    /// Ed25519 (ed25519-dalek: faster signing than ring's; see the workspace manifest).
    Ed25519(ed25519_dalek::SigningKey),
}

impl Key {
    pub fn algorithm(&self) -> &'static str {
        match self {
            Key::Rsa(_) | Key::RsaShort(_) => "rsa-sha256",
            Key::Ed25519(_) => "ed25519-sha256",
        }
    }
}

/// The DER DigestInfo prefix of a SHA-256 hash (RFC 8017 section 9.2, note 1).
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// One signing identity: a key with what to sign and how.
#[derive(Debug)]
pub struct Signer {
    pub domain: String,
    pub selector: String,
    pub key: Key,
    pub header_canon: Canon,
    pub body_canon: Canon,
    /// Header field names to sign, each instance present (lower case).
    pub headers: Vec<String>,
    /// Names signed once more than they appear, so that none can be added later.
    pub oversign: Vec<String>,
    /// `x=` this long after `t=`; None: no expiry.
    pub expire_secs: Option<u64>,
    /// Add `l=` (the length of the signed body). Off by default: it lets anyone
    /// append content that still verifies.
    pub body_length: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("the message has no From header field")]
    NoFrom,
    #[error("the signing operation failed")]
    Crypto,
}

/// Longest line of a DKIM-Signature field as written (folding at tag boundaries).
const LINE_MAX: usize = 76;

impl Signer {
    /// The names in `h=`, in order: every present instance of each signed name, then
    /// one more of each over-signed name.
    fn signed_names(&self, fields: &[canon::Field<'_>]) -> Vec<String> {
        let mut names = Vec::new();
        for name in &self.headers {
            let present = fields
                .iter()
                .filter(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))
                .count();
            let extra = usize::from(self.oversign.iter().any(|o| o.eq_ignore_ascii_case(name)));
            names.extend(std::iter::repeat_n(name.clone(), present + extra));
        }
        for name in &self.oversign {
            if !self.headers.iter().any(|h| h.eq_ignore_ascii_case(name)) {
                let present = fields
                    .iter()
                    .filter(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))
                    .count();
                names.extend(std::iter::repeat_n(name.clone(), present + 1));
            }
        }
        names
    }

    /// The DKIM-Signature header field for `message` (CRLF line endings), ending in
    /// CRLF, to be put before the message's first header field.
    pub fn sign(&self, message: &[u8], now_secs: u64) -> Result<String, SignError> {
        let (fields, body) = canon::split(message);
        self.sign_split(&fields, body, now_secs)
    }

    /// [`Signer::sign`] of a message already split into its fields and body.
    pub fn sign_split(
        &self,
        fields: &[canon::Field<'_>],
        body: &[u8],
        now_secs: u64,
    ) -> Result<String, SignError> {
        use std::fmt::Write as _;
        if !fields.iter().any(|f| f.name.eq_ignore_ascii_case(b"from")) {
            return Err(SignError::NoFrom);
        }
        let names = self.signed_names(fields);
        let (bh, body_len) = body_hash_len(self.body_canon, body);
        let mut head = String::with_capacity(512);
        head.push_str("DKIM-Signature:");
        let mut line = head.len();
        let mut piece = String::with_capacity(128);
        // Tags are written one by one, folded before any that would pass LINE_MAX.
        let mut tag = |head: &mut String, args: std::fmt::Arguments<'_>| {
            piece.clear();
            // Writing into a String cannot fail.
            let _ = write!(piece, " {args};");
            if line + piece.len() > LINE_MAX {
                head.push_str("\r\n");
                line = 0;
            }
            head.push_str(&piece);
            line += piece.len();
        };
        tag(&mut head, format_args!("v=1"));
        tag(&mut head, format_args!("a={}", self.key.algorithm()));
        let (hc, bc) = (self.header_canon.name(), self.body_canon.name());
        tag(&mut head, format_args!("c={hc}/{bc}"));
        tag(&mut head, format_args!("d={}", self.domain));
        tag(&mut head, format_args!("s={}", self.selector));
        tag(&mut head, format_args!("t={now_secs}"));
        if let Some(expire) = self.expire_secs {
            tag(&mut head, format_args!("x={}", now_secs + expire));
        }
        if self.body_length {
            tag(&mut head, format_args!("l={body_len}"));
        }
        tag(&mut head, format_args!("h={}", names.join(":")));
        tag(&mut head, format_args!("bh={bh}"));
        head.push_str("\r\n b=");
        let b = self.signature(fields, &names, &head)?;
        let mut out = head;
        // The value folded so that no line passes LINE_MAX; verifiers drop the FWS.
        let mut rest = b.as_str();
        let mut room = LINE_MAX - 3;
        while !rest.is_empty() {
            let take = rest.len().min(room);
            out.push_str(&rest[..take]);
            rest = &rest[take..];
            if !rest.is_empty() {
                out.push_str("\r\n ");
                room = LINE_MAX - 1;
            }
        }
        out.push_str("\r\n");
        Ok(out)
    }

    /// The base64 signature over the signed fields (chosen bottom-up, RFC 6376
    /// 5.4.2) and the DKIM-Signature field `head` (which ends in `b=`).
    pub fn signature(
        &self,
        fields: &[canon::Field<'_>],
        names: &[String],
        head: &str,
    ) -> Result<String, SignError> {
        let mut data = Vec::with_capacity(1024);
        // How many instances of each name are used so far, counted from the bottom.
        let mut used: Vec<(String, usize)> = Vec::new();
        for name in names {
            let lower = name.to_ascii_lowercase();
            let n = match used.iter_mut().find(|(k, _)| *k == lower) {
                Some((_, n)) => {
                    *n += 1;
                    *n - 1
                }
                None => {
                    used.push((lower.clone(), 1));
                    0
                }
            };
            // The n-th instance from the bottom; a name with no instance left signs
            // nothing (over-signing).
            if let Some(field) = fields
                .iter()
                .rev()
                .filter(|f| f.name.eq_ignore_ascii_case(lower.as_bytes()))
                .nth(n)
            {
                canon::header(self.header_canon, field.raw, true, &mut data);
            }
        }
        canon::header(self.header_canon, head.as_bytes(), false, &mut data);
        let signature = match &self.key {
            Key::Rsa(key) => {
                let mut sig = vec![0u8; key.public().modulus_len()];
                key.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &ring::rand::SystemRandom::new(),
                    &data,
                    &mut sig,
                )
                .map_err(|_| SignError::Crypto)?;
                sig
            }
            Key::RsaShort(key) => {
                let digest = ring::digest::digest(&ring::digest::SHA256, &data);
                let padding = rsa::Pkcs1v15Sign {
                    hash_len: Some(digest.as_ref().len()),
                    prefix: SHA256_DIGEST_INFO.into(),
                };
                // With a random source the private-key operation is blinded.
                key.sign_with_rng(&mut rand_core::OsRng, padding, digest.as_ref())
                    .map_err(|_| SignError::Crypto)?
            }
            Key::Ed25519(key) => {
                // RFC 8463: Ed25519 over the SHA-256 of the data.
                let digest = ring::digest::digest(&ring::digest::SHA256, &data);
                ed25519_dalek::Signer::sign(key, digest.as_ref())
                    .to_bytes()
                    .to_vec()
            }
        };
        Ok(B64.encode(signature))
    }
}

/// `bh=`: the base64 SHA-256 of the canonicalized body.
pub fn body_hash(canon: Canon, body: &[u8]) -> String {
    body_hash_len(canon, body).0
}

/// `bh=` and the canonicalized body's length (`l=`).
fn body_hash_len(canon: Canon, body: &[u8]) -> (String, usize) {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut len = 0;
    canon::body(canon, body, &mut |chunk| {
        len += chunk.len();
        ctx.update(chunk);
    });
    (B64.encode(ctx.finish().as_ref()), len)
}

#[cfg(test)]
mod tests;
