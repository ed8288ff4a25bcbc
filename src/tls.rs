//! Optional native TLS for the callback port (rustls, TLS 1.2 and 1.3), for users who expose the
//! listener directly instead of behind a TLS proxy.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The acceptor for the configured certificate chain and key (PEM files).
pub fn acceptor(cert_path: &Path, key_path: &Path) -> anyhow::Result<TlsAcceptor> {
    let certificates = read_certificates(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path).with_context(|| {
        format!(
            "failed to read a private key from {} (callback.tls.key_path)",
            key_path.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS 1.2 and 1.3 are not available")?
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .context("the certificate and the key of callback.tls do not form a valid pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "failed to read certificates from {} (callback.tls.cert_path)",
                path.display()
            )
        })?;
    anyhow::ensure!(
        !certificates.is_empty(),
        "no certificate in {} (callback.tls.cert_path)",
        path.display()
    );
    Ok(certificates)
}
