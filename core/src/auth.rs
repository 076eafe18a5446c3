//! Credentials for SMTP AUTH: PBKDF2-HMAC-SHA256 password hashes (ring), never
//! passwords, are kept in the configuration.
//!
//! Hash format: `pbkdf2-sha256$<iterations>$<salt, base64>$<hash, base64>`.

use std::collections::HashMap;
use std::num::NonZeroU32;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use ring::pbkdf2;
use ring::rand::{SecureRandom, SystemRandom};

const PREFIX: &str = "pbkdf2-sha256";
/// Iterations for new hashes. Verification costs this many HMACs (a few ms), once per
/// AUTH command; it is the price of not keeping passwords.
pub const ITERATIONS_DEFAULT: u32 = 20_000;
const ITERATIONS_MIN: u32 = 1_000;
const SALT_BYTES: usize = 16;
const HASH_BYTES: usize = 32;

/// A parsed password hash.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    iterations: NonZeroU32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PasswordHash({PREFIX}, {} iterations)", self.iterations)
    }
}

impl PasswordHash {
    /// Hashes `password` with a fresh random salt.
    pub fn new(password: &str, iterations: u32) -> PasswordHash {
        let mut salt = vec![0u8; SALT_BYTES];
        SystemRandom::new()
            .fill(&mut salt)
            .expect("the system random source works");
        let iterations = NonZeroU32::new(iterations.max(ITERATIONS_MIN)).expect("nonzero");
        let mut hash = vec![0u8; HASH_BYTES];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            password.as_bytes(),
            &mut hash,
        );
        PasswordHash {
            iterations,
            salt,
            hash,
        }
    }

    /// Whether `password` matches (constant time in the hash comparison).
    pub fn verify(&self, password: &[u8]) -> bool {
        pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA256,
            self.iterations,
            &self.salt,
            password,
            &self.hash,
        )
        .is_ok()
    }
}

impl std::fmt::Display for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{PREFIX}${}${}${}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(&self.hash)
        )
    }
}

impl std::str::FromStr for PasswordHash {
    type Err = String;

    fn from_str(s: &str) -> Result<PasswordHash, String> {
        let bad = |why: &str| {
            format!("not a password hash ({why}); make one with `gannetd --hash-password`")
        };
        let mut parts = s.split('$');
        if parts.next() != Some(PREFIX) {
            return Err(bad("it must start with `pbkdf2-sha256$`"));
        }
        let iterations = parts
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .filter(|i| *i >= ITERATIONS_MIN)
            .and_then(NonZeroU32::new)
            .ok_or_else(|| bad(&format!("iterations must be a number >= {ITERATIONS_MIN}")))?;
        let salt = parts
            .next()
            .and_then(|p| B64.decode(p).ok())
            .filter(|s| s.len() >= 8)
            .ok_or_else(|| bad("bad salt"))?;
        let hash = parts
            .next()
            .and_then(|p| B64.decode(p).ok())
            .filter(|h| h.len() == HASH_BYTES)
            .ok_or_else(|| bad("bad hash"))?;
        if parts.next().is_some() {
            return Err(bad("too many `$` fields"));
        }
        Ok(PasswordHash {
            iterations,
            salt,
            hash,
        })
    }
}

impl<'de> serde::Deserialize<'de> for PasswordHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PasswordHash, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The users who may authenticate.
#[derive(Debug)]
pub struct Credentials {
    users: HashMap<String, PasswordHash>,
    /// Checked for unknown users so that a wrong name costs as much as a wrong password.
    decoy: PasswordHash,
}

impl Credentials {
    pub fn new(users: impl IntoIterator<Item = (String, PasswordHash)>) -> Credentials {
        Credentials {
            users: users.into_iter().collect(),
            decoy: PasswordHash::new("decoy", ITERATIONS_DEFAULT),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `user` exists and `password` is theirs.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                let _ = self.decoy.verify(password);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trips_and_verifies() {
        let hash = PasswordHash::new("s3cret", ITERATIONS_MIN);
        let parsed: PasswordHash = hash.to_string().parse().unwrap();
        assert_eq!(parsed, hash);
        assert!(parsed.verify(b"s3cret"));
        assert!(!parsed.verify(b"s3cret "));
        let creds = Credentials::new([("app".to_string(), parsed)]);
        assert!(creds.verify("app", b"s3cret"));
        assert!(!creds.verify("other", b"s3cret"));
    }

    #[test]
    fn bad_hashes_are_refused() {
        for bad in [
            "",
            "s3cret",
            "pbkdf2-sha256$10$AAAAAAAAAAA$AAAA",
            "pbkdf2-sha256$20000$!!$AAAA",
            "pbkdf2-sha1$20000$AAAAAAAAAAA$AAAA",
        ] {
            assert!(bad.parse::<PasswordHash>().is_err(), "{bad}");
        }
    }
}

/// The SHA-256 of an API key, written as 64 hex digits. API keys are long random
/// strings, so one hash (no salt, no stretching) keeps them safe at rest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest(pub [u8; 32]);

impl std::fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyDigest({})", self)
    }
}

impl std::fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl KeyDigest {
    pub fn of(key: &str) -> KeyDigest {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        KeyDigest(out)
    }
}

impl std::str::FromStr for KeyDigest {
    type Err = String;

    fn from_str(s: &str) -> Result<KeyDigest, String> {
        let s = s.trim();
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(
                "expected the SHA-256 of the key as 64 hex digits (gannetd --hash-api-key)".into(),
            );
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(KeyDigest(out))
    }
}

impl<'de> serde::Deserialize<'de> for KeyDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeyDigest, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Who an API request comes from.
#[derive(Debug, Clone)]
pub struct ApiIdentity {
    pub name: String,
    pub tenant: Option<String>,
    pub role: crate::config::Role,
}

/// The injection API's keys, by digest.
#[derive(Debug, Default)]
pub struct ApiKeys {
    keys: HashMap<KeyDigest, ApiIdentity>,
}

impl ApiKeys {
    pub fn new(keys: &[crate::config::ApiKey]) -> ApiKeys {
        ApiKeys {
            keys: keys
                .iter()
                .map(|k| {
                    (
                        k.key_sha256,
                        ApiIdentity {
                            name: k.name.clone(),
                            tenant: k.tenant.clone(),
                            role: k.role,
                        },
                    )
                })
                .collect(),
        }
    }

    /// The identity behind an `Authorization` header value: the key itself,
    /// `Bearer KEY`, or `Basic base64(KEY:)` (SparkPost's forms).
    pub fn identify(&self, authorization: &str) -> Option<&ApiIdentity> {
        use base64::Engine as _;
        let value = authorization.trim();
        let key = if let Some(token) = value.strip_prefix("Bearer ") {
            token.trim().to_string()
        } else if let Some(basic) = value.strip_prefix("Basic ") {
            let basic = basic.trim();
            match base64::engine::general_purpose::STANDARD.decode(basic) {
                Ok(decoded) => {
                    let text = String::from_utf8(decoded).ok()?;
                    text.split(':').next().unwrap_or("").to_string()
                }
                // "Basic KEY" with the key not encoded, as SparkPost also accepts.
                Err(_) => basic.to_string(),
            }
        } else {
            value.to_string()
        };
        if key.is_empty() {
            return None;
        }
        self.keys.get(&KeyDigest::of(&key))
    }
}
