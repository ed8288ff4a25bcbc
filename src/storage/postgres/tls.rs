//! TLS to PostgreSQL (rustls, the same ring provider as the callback port).
//!
//! Whether TLS is used follows the URL's `sslmode`, as in libpq: `prefer` (the default) uses it
//! when the server offers it, `require` insists, `disable` never. What is checked follows
//! `storage.ca_file`: with it, the server's certificate must chain to those certificates and name
//! the URL's host (libpq's `verify-full`); without it, the connection is encrypted but the
//! certificate is not checked (libpq's `require`), which protects against eavesdropping, not
//! against an impostor on the network.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The connector for `storage.ca_file` (or none).
pub(super) fn connector(ca_file: Option<&Path>) -> anyhow::Result<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS to PostgreSQL: no protocol version")?;
    let config = match ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let pem = std::fs::read(path)
                .with_context(|| format!("storage.ca_file: cannot read {}", path.display()))?;
            for certificate in rustls_pemfile_certificates(&pem)
                .with_context(|| format!("storage.ca_file: {} is not PEM", path.display()))?
            {
                roots
                    .add(certificate)
                    .with_context(|| format!("storage.ca_file: {}", path.display()))?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "storage.ca_file: {} holds no certificate",
                path.display()
            );
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The certificates of a PEM file.
fn rustls_pemfile_certificates(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| anyhow::anyhow!("{error}"))
}

/// Accepts any server certificate, but still checks that the server holds its key (the
/// handshake signatures).
#[derive(Debug)]
struct EncryptOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, certificate, signature, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, certificate, signature, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
