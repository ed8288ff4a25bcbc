//! Native TLS on the callback port, with a certificate generated for the test.

use std::sync::Arc;

use m2m_listener::configuration::TlsSettings;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{fixture, spawn_app_with};

async fn post_over_tls(
    address: &str,
    certificate: &CertificateDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
    body: &[u8],
) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certificate.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let head = format!(
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn callbacks_are_served_over_tls_1_2_and_1_3_with_a_configured_certificate() {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let directory = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (
        directory.path().join("cert.pem"),
        directory.path().join("key.pem"),
    );
    std::fs::write(&cert_path, generated.cert.pem()).unwrap();
    std::fs::write(&key_path, generated.signing_key.serialize_pem()).unwrap();
    let certificate = generated.cert.der().clone();
    let app = spawn_app_with(|settings| {
        settings.callback.tls = Some(TlsSettings {
            cert_path,
            key_path,
        })
    })
    .await;
    let address = app
        .callback_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let body = String::from_utf8(fixture("deactivate_bare.xml")).unwrap();

    let over_tls13 = post_over_tls(
        &address,
        &certificate,
        &rustls::version::TLS13,
        body.replace("7d1c1f0e", "tls13").as_bytes(),
    )
    .await;
    let over_tls12 = post_over_tls(
        &address,
        &certificate,
        &rustls::version::TLS12,
        body.replace("7d1c1f0e", "tls12").as_bytes(),
    )
    .await;
    let plain = app
        .client
        .post(&app.callback_url)
        .body(body.clone())
        .send()
        .await;

    assert!(over_tls13.starts_with("HTTP/1.1 200"), "{over_tls13}");
    assert!(over_tls12.starts_with("HTTP/1.1 200"), "{over_tls12}");
    assert!(
        plain
            .map(|response| response.status() != 200)
            .unwrap_or(true),
        "plain HTTP is not served on a TLS port"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE result = 'stored'"),
        2
    );
}

#[tokio::test]
async fn a_missing_certificate_stops_the_start_naming_the_key() {
    let directory = tempfile::tempdir().unwrap();
    let mut settings = m2m_listener::configuration::Settings::default();
    settings.callback.listen = "127.0.0.1:0".parse().unwrap();
    settings.api.listen = "127.0.0.1:0".parse().unwrap();
    settings.storage.path = directory.path().join("db.sqlite");
    settings.callback.credentials = crate::helpers::test_credentials();
    settings.callback.tls = Some(TlsSettings {
        cert_path: directory.path().join("none.pem"),
        key_path: directory.path().join("none.key"),
    });

    let error = match m2m_listener::startup::Application::build(&settings).await {
        Ok(_) => panic!("started without a certificate"),
        Err(error) => format!("{error:#}"),
    };

    assert!(error.contains("callback.tls.cert_path"), "{error}");
}
