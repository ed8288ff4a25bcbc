//! A Standard Webhooks receiver for demos and the benchmark: it verifies every request's
//! signature (the `standardwebhooks` crate), counts events by type and distinct id, and measures
//! delivery latency (arrival minus the event's timestamp).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;

#[derive(Default)]
struct Tally {
    ids: HashSet<String>,
    by_type: BTreeMap<String, u64>,
    requests: u64,
    bad_signatures: u64,
    /// Seconds.
    latencies_ms: Vec<f64>,
}

/// What the receiver saw.
#[derive(Debug, Default, Serialize)]
pub struct ReceiverSummary {
    pub requests: u64,
    /// Distinct event ids (a retry of the same event counts once).
    pub events: u64,
    pub by_type: BTreeMap<String, u64>,
    /// Requests refused with 401: no or a wrong signature.
    pub bad_signatures: u64,
    /// Event timestamp to arrival, in milliseconds.
    pub latency_ms: super::LatencySummary,
}

#[derive(Clone)]
pub struct EventReceiver {
    tally: Arc<Mutex<Tally>>,
    pub address: SocketAddr,
}

impl EventReceiver {
    /// Listens on `address`, verifying with `secret` (`whsec_...`).
    pub async fn start(address: SocketAddr, secret: &str) -> anyhow::Result<Self> {
        let verifier = Arc::new(
            standardwebhooks::Webhook::new(secret)
                .map_err(|_| anyhow::anyhow!("the receiver secret is not whsec_ and base64"))?,
        );
        let listener = tokio::net::TcpListener::bind(address).await?;
        let receiver = Self {
            tally: Arc::default(),
            address: listener.local_addr()?,
        };
        let tally = Arc::clone(&receiver.tally);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (tally, verifier) = (Arc::clone(&tally), Arc::clone(&verifier));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let (tally, verifier) = (Arc::clone(&tally), Arc::clone(&verifier));
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                receive(&tally, &verifier, request).await,
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(receiver)
    }

    pub fn summary(&self) -> ReceiverSummary {
        let Ok(mut tally) = self.tally.lock() else {
            return ReceiverSummary::default();
        };
        let latency_ms = super::LatencySummary::of(&mut tally.latencies_ms);
        ReceiverSummary {
            requests: tally.requests,
            events: tally.ids.len() as u64,
            by_type: tally.by_type.clone(),
            bad_signatures: tally.bad_signatures,
            latency_ms,
        }
    }
}

async fn receive(
    tally: &Mutex<Tally>,
    verifier: &standardwebhooks::Webhook,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let headers = request.headers().clone();
    let body = match Limited::new(request.into_body(), 4 * 1024 * 1024)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => return answer(StatusCode::PAYLOAD_TOO_LARGE),
    };
    let arrived = time::OffsetDateTime::now_utc();
    let verified = verifier.verify(&body, &headers).is_ok();
    let Ok(mut tally) = tally.lock() else {
        return answer(StatusCode::INTERNAL_SERVER_ERROR);
    };
    tally.requests += 1;
    if !verified {
        tally.bad_signatures += 1;
        return answer(StatusCode::UNAUTHORIZED);
    }
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let id = event["id"].as_str().unwrap_or_default().to_owned();
    if tally.ids.insert(id) {
        let kind = event["type"].as_str().unwrap_or("unknown").to_owned();
        *tally.by_type.entry(kind).or_default() += 1;
        if let Some(at) = event["timestamp"].as_str().and_then(|at| {
            time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
        }) {
            tally
                .latencies_ms
                .push((arrived - at).as_seconds_f64().max(0.0));
        }
    }
    answer(StatusCode::NO_CONTENT)
}

fn answer(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}
