//! TLS for outbound delivery. Two client configurations are built once: `verified`
//! (the Mozilla roots of webpki-roots, plus `delivery.tls_ca_file`; TLS mode
//! required and MTA-STS enforce) and `opportunistic`, which accepts any
//! certificate — as every MTA must for opportunistic STARTTLS, since a message that
//! would otherwise go in the clear gains from encryption even unauthenticated. DANE
//! (RFC 7672) gets a configuration per connection whose verifier matches the
//! server's chain against the host's TLSA records. What the peer presented is
//! recorded by the caller from the session.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::client::TlsWant;
use gannet_core::tls_policy::Tlsa;

/// The client configurations of a process.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub verified: Arc<rustls::ClientConfig>,
    pub opportunistic: Arc<rustls::ClientConfig>,
    /// The roots `verified` trusts (for the MTA-STS policy fetch's own config).
    pub roots: Arc<rustls::RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ClientTls {
    /// With the built-in roots only.
    pub fn new() -> ClientTls {
        ClientTls::with_roots(webpki_roots())
    }

    /// With the built-in roots and the certificate authorities of the PEM file
    /// `ca_file` (none when empty). Err names what is wrong with the file.
    pub fn with_ca_file(ca_file: &std::path::Path) -> Result<ClientTls, String> {
        let mut roots = webpki_roots();
        if !ca_file.as_os_str().is_empty() {
            use rustls::pki_types::pem::PemObject as _;
            let certs = CertificateDer::pem_file_iter(ca_file)
                .map_err(|e| format!("{}: {e}", ca_file.display()))?;
            let mut added = 0;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{}: {e}", ca_file.display()))?;
                roots.add(cert).map_err(|e| {
                    format!("{}: a certificate is unusable: {e}", ca_file.display())
                })?;
                added += 1;
            }
            if added == 0 {
                return Err(format!("{}: no certificate in the file", ca_file.display()));
            }
        }
        Ok(ClientTls::with_roots(roots))
    }

    fn with_roots(roots: rustls::RootCertStore) -> ClientTls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);
        let verified = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        // Opportunistic TLS takes any certificate.
        let opportunistic = config_with(&provider, |_, _, _, _, _| Ok(()));
        ClientTls {
            verified: Arc::new(verified),
            opportunistic,
            roots,
            provider,
        }
    }

    /// The configuration a connection that wants `want` hands the handshake.
    pub fn config_for(&self, want: &TlsWant) -> Arc<rustls::ClientConfig> {
        match want {
            TlsWant::Verified => self.verified.clone(),
            // One configuration per connection for these (its check holds the
            // host's records, or the connection's slot); a connection carries many
            // messages.
            TlsWant::Dane(records) => {
                let (records, provider) = (records.clone(), self.provider.clone());
                config_with(&self.provider, move |ee, chain, name, ocsp, now| {
                    dane_check(&records, &provider, ee, chain, name, ocsp, now)
                })
            }
            TlsWant::Checked(slot) => {
                let (slot, provider, roots) =
                    (slot.clone(), self.provider.clone(), self.roots.clone());
                config_with(&self.provider, move |ee, chain, name, ocsp, now| {
                    let checked =
                        webpki_check(roots.clone(), &provider, ee, chain, name, ocsp, now);
                    if let Err(e) = checked {
                        // Reported (TLS-RPT), not refused: MTA-STS testing.
                        let as_io = std::io::Error::new(std::io::ErrorKind::InvalidData, e.clone());
                        let found = (super::client::tls_result_type(&as_io), e.to_string());
                        *slot
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(found);
                    }
                    Ok(())
                })
            }
            TlsWant::Disabled | TlsWant::Opportunistic | TlsWant::Encrypted => {
                self.opportunistic.clone()
            }
        }
    }
}

fn webpki_roots() -> rustls::RootCertStore {
    rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())
}

impl Default for ClientTls {
    fn default() -> Self {
        ClientTls::new()
    }
}

/// A certificate check: the server's certificate, the rest of its chain, the name
/// asked for, the OCSP response, the time.
trait Check:
    Fn(
        &CertificateDer<'_>,
        &[CertificateDer<'_>],
        &ServerName<'_>,
        &[u8],
        UnixTime,
    ) -> Result<(), rustls::Error>
    + Send
    + Sync
{
}

impl<F> Check for F where
    F: Fn(
            &CertificateDer<'_>,
            &[CertificateDer<'_>],
            &ServerName<'_>,
            &[u8],
            UnixTime,
        ) -> Result<(), rustls::Error>
        + Send
        + Sync
{
}

/// A certificate check of our own (`check`), with the handshake signatures still
/// verified by the provider: whatever `check` accepts, the session is encrypted to
/// whoever holds the presented key.
struct Verifier<F> {
    provider: Arc<CryptoProvider>,
    check: F,
}

impl<F> std::fmt::Debug for Verifier<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier")
    }
}

impl<F> ServerCertVerifier for Verifier<F>
where
    F: Check,
{
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        (self.check)(end_entity, intermediates, server_name, ocsp_response, now)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration whose certificate check is `check`.
fn config_with<F>(provider: &Arc<CryptoProvider>, check: F) -> Arc<rustls::ClientConfig>
where
    F: Check + 'static,
{
    let verifier = Verifier {
        provider: provider.clone(),
        check,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Arc::new(config)
}

/// WebPKI's check of a chain against `roots`, valid now for `server_name`.
fn webpki_check(
    roots: Arc<rustls::RootCertStore>,
    provider: &Arc<CryptoProvider>,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    server_name: &ServerName<'_>,
    ocsp_response: &[u8],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?
        .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        .map(|_| ())
}

/// DANE authentication (RFC 7672 3.1): the server's chain must match one of the
/// host's usable TLSA records. DANE-EE(3): the end-entity certificate (or its
/// public key) matches; its names and dates are not checked (3.1.1). DANE-TA(2): a
/// certificate the server sent besides its own matches, and the end-entity chains
/// to it as the only trust anchor, valid now and for the MX host name (3.1.2).
fn dane_check(
    records: &[Tlsa],
    provider: &Arc<CryptoProvider>,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    server_name: &ServerName<'_>,
    ocsp_response: &[u8],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let usable = records.iter().filter(|r| r.usable());
    if usable
        .clone()
        .any(|r| r.usage == 3 && tlsa_matches(r, end_entity))
    {
        return Ok(());
    }
    for record in usable.filter(|r| r.usage == 2) {
        for anchor in intermediates.iter().filter(|c| tlsa_matches(record, c)) {
            let mut roots = rustls::RootCertStore::empty();
            if roots.add(anchor.clone()).is_ok()
                && webpki_check(
                    Arc::new(roots),
                    provider,
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp_response,
                    now,
                )
                .is_ok()
            {
                return Ok(());
            }
        }
    }
    Err(rustls::Error::InvalidCertificate(
        rustls::CertificateError::ApplicationVerificationFailure,
    ))
}

/// Whether `cert` (DER) matches `record`'s selector and matching type.
pub fn tlsa_matches(record: &Tlsa, cert: &[u8]) -> bool {
    let selected: &[u8] = match record.selector {
        0 => cert,
        1 => match x509_parser::parse_x509_certificate(cert) {
            Ok((_, parsed)) => parsed.tbs_certificate.subject_pki.raw,
            Err(_) => return false,
        },
        _ => return false,
    };
    match record.matching {
        0 => selected == record.data.as_slice(),
        1 => ring::digest::digest(&ring::digest::SHA256, selected).as_ref() == record.data,
        2 => ring::digest::digest(&ring::digest::SHA512, selected).as_ref() == record.data,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlsa_records_match_by_certificate_or_public_key() {
        let pair = rcgen::generate_simple_self_signed(vec!["mx.a.test".to_string()]).unwrap();
        let der = pair.cert.der().to_vec();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let spki = parsed.tbs_certificate.subject_pki.raw.to_vec();
        let sha256 = |b: &[u8]| {
            ring::digest::digest(&ring::digest::SHA256, b)
                .as_ref()
                .to_vec()
        };
        let sha512 = |b: &[u8]| {
            ring::digest::digest(&ring::digest::SHA512, b)
                .as_ref()
                .to_vec()
        };
        let r = |usage, selector, matching, data| Tlsa {
            usage,
            selector,
            matching,
            data,
        };
        assert!(tlsa_matches(&r(3, 1, 1, sha256(&spki)), &der));
        assert!(tlsa_matches(&r(3, 0, 1, sha256(&der)), &der));
        assert!(tlsa_matches(&r(3, 0, 2, sha512(&der)), &der));
        assert!(tlsa_matches(&r(3, 1, 0, spki.clone()), &der));
        assert!(tlsa_matches(&r(3, 0, 0, der.clone()), &der));
        assert!(!tlsa_matches(&r(3, 1, 1, sha256(&der)), &der));
        assert!(!tlsa_matches(&r(3, 1, 1, vec![0; 32]), &der));
        assert!(!tlsa_matches(
            &r(3, 1, 1, sha256(&spki)),
            b"not a certificate"
        ));
    }
}
