//! Standard Webhooks endpoints: each event POSTed as JSON with `webhook-id` (the event id, the
//! same on every attempt), `webhook-timestamp` and `webhook-signature` (`v1,<base64 HMAC-SHA256
//! of "id.timestamp.body">`, one per configured secret during a rotation).
//!
//! Signing is the `standardwebhooks` crate's: the specification's own reference implementation
//! for Rust (two small dependencies), rather than HMAC written here. The client is hyper's
//! (`hyper-util` legacy client, already used by the project) with `hyper-rustls` on the same
//! rustls and ring as the callback port: no second HTTP stack. It follows no redirect (a 3xx is
//! a failure), and the dispatcher bounds each attempt by `timeout_ms`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::{Sent, Sink};
use crate::configuration::WebhookSettings;
use crate::storage::BoxFuture;
use crate::storage::events::{ClaimedEvent, error_text, verdict};

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// The most of an endpoint's answer read (and then dropped), so the connection can be reused.
const MAX_ANSWER: usize = 64 * 1024;

pub struct WebhookSink {
    url: hyper::Uri,
    /// One per secret; never logged (the crate's type has no `Debug`).
    signers: Vec<standardwebhooks::Webhook>,
    client: Client<Https, Full<Bytes>>,
}

impl WebhookSink {
    pub fn new(settings: &WebhookSettings) -> anyhow::Result<Self> {
        let url: hyper::Uri = settings.url.parse().map_err(|_| {
            anyhow::anyhow!("events.webhooks {}: url does not parse", settings.name)
        })?;
        let signers = settings
            .signing_secrets()
            .into_iter()
            .map(|secret| {
                standardwebhooks::Webhook::new(secret.expose()).map_err(|_| {
                    anyhow::anyhow!(
                        "events.webhooks {}: a secret is not whsec_ and base64 (value not shown)",
                        settings.name
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let connector = https_connector();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            url,
            signers,
            client,
        })
    }

    /// The `webhook-signature` value: every secret's signature, space-separated.
    pub fn signature(&self, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
        let signatures: Vec<String> = self
            .signers
            .iter()
            .filter_map(|signer| signer.sign(id, timestamp, body).ok())
            .collect();
        (!signatures.is_empty()).then(|| signatures.join(" "))
    }

    async fn post(&self, event: &ClaimedEvent) -> Sent {
        let id = event.id();
        let body = event.body();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let Some(signature) = self.signature(&id, now, body.as_bytes()) else {
            return Sent::failed("the body could not be signed");
        };
        let request = hyper::Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("m2m-listener/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", &id)
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::from(body)));
        let request = match request {
            Ok(request) => request,
            Err(error) => return Sent::failed(error),
        };
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(error) => return Sent::failed(ErrorText(&error)),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let _ = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await;
        let verdict = verdict(status, retry_after.as_deref());
        Sent {
            verdict,
            status: Some(status),
            error: (!matches!(verdict, crate::storage::events::Verdict::Delivered))
                .then(|| error_text(&format!("answered {status}"))),
        }
    }
}

impl Sink for WebhookSink {
    fn send<'a>(&'a self, event: &'a ClaimedEvent) -> BoxFuture<'a, Sent> {
        Box::pin(self.post(event))
    }
}

/// An error with its sources, on one line.
struct ErrorText<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// HTTPS with the system's roots (plain HTTP too, for endpoints on a private network). A system
/// without roots gets none: HTTPS endpoints then fail, recorded per attempt, and HTTP works.
fn https_connector() -> Https {
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match builder.with_native_roots() {
        Ok(builder) => builder,
        Err(error) => {
            tracing::warn!(%error, "no system TLS roots: HTTPS webhooks will fail");
            let config = rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
        }
    };
    builder.https_or_http().enable_http1().build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Secret;

    fn settings(secrets: &[&str]) -> WebhookSettings {
        WebhookSettings {
            name: "ops".into(),
            url: "http://127.0.0.1:9/hook".into(),
            secret: None,
            secrets: secrets.iter().map(|secret| Secret::new(*secret)).collect(),
            events: Vec::new(),
            retry_schedule_s: vec![1],
            timeout_ms: 1000,
        }
    }

    #[test]
    fn every_secret_signs_during_a_rotation_and_each_signature_verifies() {
        let first = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let second = "whsec_c2Vjb25kIHNlY3JldCBvZiB0aGUgcm90YXRpb24=";
        let sink = WebhookSink::new(&settings(&[first, second])).expect("sink");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let signature = sink
            .signature("evt_000000000001", now, b"{\"a\":1}")
            .expect("signed");
        assert_eq!(signature.split(' ').count(), 2);
        for secret in [first, second] {
            let mut headers = hyper::HeaderMap::new();
            headers.insert("webhook-id", "evt_000000000001".parse().expect("value"));
            headers.insert("webhook-timestamp", now.to_string().parse().expect("value"));
            headers.insert("webhook-signature", signature.parse().expect("value"));
            standardwebhooks::Webhook::new(secret)
                .expect("secret")
                .verify(b"{\"a\":1}", &headers)
                .expect("verifies");
        }
    }

    #[test]
    fn a_secret_that_is_not_base64_is_refused_without_showing_it() {
        let Err(error) = WebhookSink::new(&settings(&["whsec_not base64!"])) else {
            panic!("accepted");
        };
        assert!(!error.to_string().contains("not base64!"));
    }
}
