//! TLS for the SMTP server (STARTTLS and implicit TLS) and the HTTPS listeners, with
//! rustls and ring.
//!
//! The certificate and key come from the configuration; when neither is given, a
//! self-signed pair for the hostname (and localhost, 127.0.0.1) is generated once into `<data_dir>/tls/` and
//! reused on later starts, so that the default configuration offers STARTTLS.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Builds the server TLS configuration from `cert`/`key`, or from the generated pair.
pub fn server_config(
    cert: &Path,
    key: &Path,
    data_dir: &Path,
    hostname: &str,
) -> Result<Arc<rustls::ServerConfig>> {
    if !cert.as_os_str().is_empty() {
        return load(cert, key);
    }
    let dir = data_dir.join("tls");
    let (cert, key) = (dir.join("self-signed.crt"), dir.join("self-signed.key"));
    if cert.exists() || key.exists() {
        match load(&cert, &key) {
            Ok(config) => return Ok(config),
            // Only a crash while an older version wrote the pair (or a hand edit) can
            // leave it unusable; it is ours to make again, so a start never fails on it.
            Err(e) => tracing::warn!(
                "the generated TLS pair in {} is unusable ({e:#}); generating a new one",
                dir.display()
            ),
        }
    }
    generate_pair(&dir, &cert, &key, hostname)?;
    load(&cert, &key)
}

/// A server configuration from PEM files.
fn load(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            anyhow!(
                "smtp.tls_cert: cannot read certificates from {}: {e}",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(anyhow!(
            "smtp.tls_cert: no certificate in {}",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        anyhow!(
            "smtp.tls_key: cannot read a private key from {}: {e}",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("smtp.tls_cert and smtp.tls_key do not form a usable pair")?;
    Ok(Arc::new(config))
}

/// Generates a self-signed pair for `hostname` (and localhost, 127.0.0.1). Each file
/// is written atomically and durably; a crash between the two leaves a pair that does
/// not match, which the next start detects and replaces.
fn generate_pair(dir: &Path, cert: &Path, key: &Path, hostname: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let pair = rcgen::generate_simple_self_signed(vec![
        hostname.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ])
    .context("generating a self-signed certificate")?;
    gannet_spool::durable::write_file(key, pair.signing_key.serialize_pem().as_bytes(), 0o600)
        .with_context(|| format!("writing {}", key.display()))?;
    gannet_spool::durable::write_file(cert, pair.cert.pem().as_bytes(), 0o644)
        .with_context(|| format!("writing {}", cert.display()))?;
    tracing::info!(cert = %cert.display(), "generated a self-signed TLS certificate for {hostname}");
    Ok(())
}

/// "TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256", for Received headers and events;
/// for either side of a connection.
pub fn describe(conn: &rustls::CommonState) -> String {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_string(),
    };
    match conn.negotiated_cipher_suite() {
        Some(suite) => format!("{version} with cipher {:?}", suite.suite()),
        None => version,
    }
}
