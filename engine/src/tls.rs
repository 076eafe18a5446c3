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
    let (cert, key) = if cert.as_os_str().is_empty() {
        generated_pair(data_dir, hostname)?
    } else {
        (cert.to_path_buf(), key.to_path_buf())
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
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
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| {
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

fn generated_pair(
    data_dir: &Path,
    hostname: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let dir = data_dir.join("tls");
    let cert = dir.join("self-signed.crt");
    let key = dir.join("self-signed.key");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pair = rcgen::generate_simple_self_signed(vec![
        hostname.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ])
    .context("generating a self-signed certificate")?;
    write_private(&key, pair.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&cert, pair.cert.pem())
        .with_context(|| format!("writing {}", cert.display()))?;
    tracing::info!(cert = %cert.display(), "generated a self-signed TLS certificate for {hostname}");
    Ok((cert, key))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
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
