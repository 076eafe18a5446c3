//! DKIM key pairs: Ed25519 made with ring, RSA with the `rsa` crate (ring cannot
//! make RSA keys); for `gannet-dkim keygen` and the capacity planner's calibration.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::KeyPair as _;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Algorithm {
    Ed25519,
    Rsa,
}

/// (PKCS#8 DER of the private key, k=, p=)
pub fn generate(
    algorithm: Algorithm,
    bits: usize,
) -> Result<(Vec<u8>, &'static str, String), String> {
    match algorithm {
        Algorithm::Ed25519 => {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 =
                ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
            let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .map_err(|e| e.to_string())?;
            Ok((
                pkcs8.as_ref().to_vec(),
                "ed25519",
                B64.encode(pair.public_key().as_ref()),
            ))
        }
        Algorithm::Rsa => {
            use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
            if !(1024..=4096).contains(&bits) {
                return Err(format!(
                    "--bits {bits}: gannet signs with RSA keys of 1024 to 4096 bits"
                ));
            }
            if bits < 2048 {
                eprintln!("warning: a {bits}-bit RSA key is weak; prefer 2048 bits or more");
            }
            let key =
                rsa::RsaPrivateKey::new(&mut rand_core::OsRng, bits).map_err(|e| e.to_string())?;
            let der = key.to_pkcs8_der().map_err(|e| e.to_string())?;
            let public = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| e.to_string())?;
            Ok((
                der.as_bytes().to_vec(),
                "rsa",
                B64.encode(public.as_bytes()),
            ))
        }
    }
}

/// A PKCS#8 private key as PEM (what `[dkim] keys` read).
pub fn pem(pkcs8: &[u8]) -> String {
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in B64.encode(pkcs8).as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    pem
}
