//! The callback port: read, parse, authenticate, store, and only then acknowledge (spec §3).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, header};
use time::OffsetDateTime;

use super::{HttpResponse, json_response, response};
use crate::access::SourcePolicy;
use crate::auth::Authenticator;
use crate::domain::{CallbackForm, DeliveryResult};
use crate::metrics::{CallbackTally, Metrics, UNKNOWN_KIND};
use crate::parser::{self, Parsed};
use crate::storage::{DeliveryContent, NewDelivery, Store};

/// The acknowledgement the platform expects: any 2xx stops its retries.
const SOAP_ACK: &str = concat!(
    r#"<?xml version="1.0" encoding="utf-8"?>"#,
    r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>"#,
    r#"<CallbackResponse xmlns="http://nphase.com/unifiedwebservice/v2"/>"#,
    r#"</s:Body></s:Envelope>"#
);
const XML: &str = "text/xml; charset=utf-8";
/// Bodies larger than this are parsed on the blocking pool so that they do not stall the other
/// connections served by the same worker.
const PARSE_INLINE_LIMIT: usize = 256 * 1024;
/// Large callbacks (over [`PARSE_INLINE_LIMIT`]) parsed and stored at once. A 10,000-line upload
/// needs ~25 MB between parse and commit; ten at once measured 264 MiB resident. The others wait
/// with only their body buffered: the platform allows seconds for an answer.
const LARGE_CALLBACKS_IN_FLIGHT: usize = 2;
/// At most one "invalid credentials" log line per interval; the rest are counted in it.
const UNAUTHORIZED_LOG_INTERVAL: Duration = Duration::from_secs(10);

pub struct CallbackState {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub authenticator: Authenticator,
    /// Which sources may post, and which proxies may name the client.
    pub sources: SourcePolicy,
    pub max_body_bytes: u64,
    /// The whole body must arrive within this.
    pub body_read_timeout: Duration,
    /// When an unauthorized attempt was last logged, and how many were not logged since.
    unauthorized_log: Mutex<(Option<Instant>, u64)>,
    /// Bounds the memory of large callbacks in flight (see [`LARGE_CALLBACKS_IN_FLIGHT`]).
    large_callbacks: tokio::sync::Semaphore,
}

impl CallbackState {
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        authenticator: Authenticator,
        sources: SourcePolicy,
        max_body_bytes: u64,
        body_read_timeout: Duration,
    ) -> Self {
        Self {
            store,
            metrics,
            authenticator,
            sources,
            max_body_bytes,
            body_read_timeout,
            unauthorized_log: Mutex::new((None, 0)),
            large_callbacks: tokio::sync::Semaphore::new(LARGE_CALLBACKS_IN_FLIGHT),
        }
    }

    fn log_unauthorized(&self, source: std::net::IpAddr, username: Option<&str>) {
        let Ok(mut last) = self.unauthorized_log.lock() else {
            return;
        };
        let now = Instant::now();
        let (logged_at, suppressed) = &mut *last;
        if logged_at.is_some_and(|at| now.duration_since(at) < UNAUTHORIZED_LOG_INTERVAL) {
            *suppressed += 1;
            return;
        }
        match username {
            // The username helps spot a registration mismatch; the password is never logged.
            Some(username) => {
                let username: String = username.chars().take(40).collect();
                tracing::warn!(
                    %source, username = %username, suppressed_since_last = *suppressed,
                    "callback rejected: credentials do not match any configured pair (check RegisterCallback)"
                );
            }
            None => tracing::warn!(
                %source, suppressed_since_last = *suppressed,
                "callback rejected: source not in callback.allowed_sources"
            ),
        }
        *logged_at = Some(now);
        *suppressed = 0;
    }
}

pub async fn handle(
    state: Arc<CallbackState>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> HttpResponse {
    let started = Instant::now();
    let answered = answer(&state, request, peer, started).await;
    if let Some(result) = answered.result {
        state
            .metrics
            .callback_answered(answered.kind, result, started.elapsed().as_secs_f64());
    }
    answered.response
}

/// A response and the labels it is counted under.
struct Answered {
    kind: &'static str,
    /// The `result` label; `None` for requests that are not callback POSTs (health checks).
    result: Option<&'static str>,
    response: HttpResponse,
}

fn answered(kind: &'static str, result: &'static str, response: HttpResponse) -> Answered {
    Answered {
        kind,
        result: Some(result),
        response,
    }
}

async fn answer(
    state: &CallbackState,
    request: Request<Incoming>,
    peer: SocketAddr,
    started: Instant,
) -> Answered {
    if request.method() != Method::POST {
        let dialect = Dialect::Soap;
        let response = if matches!(*request.method(), Method::GET | Method::HEAD)
            && request.uri().path() == "/healthz"
        {
            response(StatusCode::OK, "text/plain; charset=utf-8", "ok\n")
        } else {
            let mut refused =
                dialect.refuse(StatusCode::METHOD_NOT_ALLOWED, "callbacks are POSTed");
            refused
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            refused
        };
        return Answered {
            kind: UNKNOWN_KIND,
            result: None,
            response,
        };
    }
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let mut dialect = Dialect::of_content_type(content_type.as_deref());
    let forwarded_for = request
        .headers()
        .get("x-forwarded-for")
        .and_then(|value| value.to_str().ok());
    let client = state.sources.client_address(peer.ip(), forwarded_for);
    if !state.sources.allows(client) {
        state.log_unauthorized(client, None);
        let refused = dialect.refuse(StatusCode::FORBIDDEN, "source address not allowed");
        return answered(UNKNOWN_KIND, "unauthorized", refused);
    }
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > state.max_body_bytes) {
        return answered(
            UNKNOWN_KIND,
            "too_large",
            too_large(state, peer, started, dialect),
        );
    }
    let limit = usize::try_from(state.max_body_bytes).unwrap_or(usize::MAX);
    let reading = tokio::time::timeout(
        state.body_read_timeout,
        Limited::new(request.into_body(), limit).collect(),
    );
    let Ok(read) = reading.await else {
        tracing::info!(
            source = %peer.ip(), timeout_ms = state.body_read_timeout.as_millis() as u64, result = "bad_request",
            "callback refused: body not received within callback.body_read_timeout_ms"
        );
        let refused = dialect.refuse(
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive in time",
        );
        return answered(UNKNOWN_KIND, "bad_request", refused);
    };
    let body = match read {
        Ok(collected) => collected.to_bytes(),
        Err(error)
            if error
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return answered(
                UNKNOWN_KIND,
                "too_large",
                too_large(state, peer, started, dialect),
            );
        }
        Err(error) => {
            tracing::info!(source = %peer.ip(), %error, "callback body could not be read");
            let refused = dialect.refuse(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            );
            return answered(UNKNOWN_KIND, "bad_request", refused);
        }
    };
    let received_at = OffsetDateTime::now_utc();
    // Held until the answer: the parsed form of a large callback lives until its commit.
    let _large_callback_slot = if body.len() > PARSE_INLINE_LIMIT {
        state.large_callbacks.acquire().await.ok()
    } else {
        None
    };

    let parsed = parse_off_the_hot_path(body.clone()).await;
    dialect = match &parsed {
        Parsed::Callback(callback) if callback.form == CallbackForm::Json => Dialect::Json,
        Parsed::Unreadable(unreadable) if unreadable.json => Dialect::Json,
        _ => Dialect::Soap,
    };
    let (username, password, content) = match parsed {
        Parsed::Callback(callback) => {
            let (username, password) = (callback.username.clone(), callback.password.clone());
            (username, password, DeliveryContent::Callback(callback))
        }
        Parsed::Unreadable(unreadable) => match unreadable.credentials.clone() {
            Some((username, password)) => {
                (username, password, DeliveryContent::Quarantined(unreadable))
            }
            None => {
                tracing::info!(
                    source = %peer.ip(), bytes = body.len(), reason = %unreadable.reason,
                    latency_ms = elapsed_ms(started), result = "bad_request",
                    "callback refused: not a callback and no credentials to check"
                );
                let refused = dialect.refuse(
                    StatusCode::BAD_REQUEST,
                    "the body is not a callback (XML with CallbackRequest, or JSON)",
                );
                return answered(UNKNOWN_KIND, "bad_request", refused);
            }
        },
    };
    let (kind, operation, tally) = match &content {
        DeliveryContent::Callback(callback) => (
            callback.kind.as_str(),
            callback.operation.as_str(),
            Some(CallbackTally::of(callback)),
        ),
        DeliveryContent::Quarantined(_) => (UNKNOWN_KIND, UNKNOWN_KIND, None),
    };
    let Some(authenticated) = state.authenticator.verify(&username, &password) else {
        state.log_unauthorized(client, Some(&username));
        let refused = dialect.refuse(StatusCode::FORBIDDEN, "invalid callback credentials");
        return answered(kind, "unauthorized", refused);
    };
    drop(password);

    let request_id = content.request_id().unwrap_or_default().to_owned();
    let callback_count = content.callback_count();
    let size = body.len();
    let delivery = NewDelivery {
        received_at,
        body,
        content_type,
        source_address: Some(client.to_string()),
        account: authenticated.account,
        content,
    };
    match state.store.submit(delivery).await {
        Ok(receipt) => {
            state.metrics.callback_attempt(callback_count);
            if let (DeliveryResult::Stored, Some(tally)) = (receipt.result, &tally) {
                state.metrics.callback_stored(tally);
            }
            tracing::info!(
                delivery_id = receipt.delivery_id, request_id = %request_id, kind, operation,
                callback_count, bytes = size, result = receipt.result.as_str(), latency_ms = elapsed_ms(started),
                "callback acknowledged"
            );
            answered(kind, receipt.result.as_str(), dialect.ack())
        }
        Err(error) => {
            tracing::error!(
                request_id = %request_id, kind, bytes = size, result = "unavailable", %error,
                latency_ms = elapsed_ms(started), "callback not stored; answered 503 so the platform retries"
            );
            let refused = dialect.refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage unavailable; retry later",
            );
            answered(kind, "unavailable", refused)
        }
    }
}

async fn parse_off_the_hot_path(body: Bytes) -> Parsed {
    if body.len() <= PARSE_INLINE_LIMIT {
        return parser::parse(&body);
    }
    let for_fallback = body.clone();
    match tokio::task::spawn_blocking(move || parser::parse(&body)).await {
        Ok(parsed) => parsed,
        // The blocking pool is gone (shutting down): parse here rather than lose the callback.
        Err(_) => parser::parse(&for_fallback),
    }
}

fn too_large(
    state: &CallbackState,
    peer: SocketAddr,
    started: Instant,
    dialect: Dialect,
) -> HttpResponse {
    tracing::info!(
        source = %peer.ip(), limit = state.max_body_bytes, result = "too_large", latency_ms = elapsed_ms(started),
        "callback refused: body over callback.max_body_bytes"
    );
    dialect.refuse(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body exceeds the configured limit",
    )
}

fn elapsed_ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

/// How a caller is answered: SOAP callers get SOAP, REST API callers JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    Soap,
    Json,
}

impl Dialect {
    /// From the content type, before the body is read.
    fn of_content_type(content_type: Option<&str>) -> Self {
        match content_type {
            Some(value) if value.to_ascii_lowercase().contains("json") => Dialect::Json,
            _ => Dialect::Soap,
        }
    }

    /// The acknowledgement the platform expects: any 2xx stops its retries.
    fn ack(self) -> HttpResponse {
        match self {
            Dialect::Soap => response(StatusCode::OK, XML, SOAP_ACK),
            Dialect::Json => response(StatusCode::OK, "application/json", "{}"),
        }
    }

    /// A short refusal: a SOAP fault (`Server` when retrying may help, else `Client`), or a JSON
    /// error with a stable code.
    fn refuse(self, status: StatusCode, message: &str) -> HttpResponse {
        match self {
            Dialect::Soap => soap_fault(
                status,
                if status.is_server_error() {
                    "Server"
                } else {
                    "Client"
                },
                message,
            ),
            Dialect::Json => {
                let code = match status {
                    StatusCode::FORBIDDEN => "UNAUTHORIZED",
                    StatusCode::PAYLOAD_TOO_LARGE => "BODY_TOO_LARGE",
                    StatusCode::METHOD_NOT_ALLOWED => "METHOD_NOT_ALLOWED",
                    StatusCode::SERVICE_UNAVAILABLE => "STORAGE_UNAVAILABLE",
                    _ => "BAD_REQUEST",
                };
                json_response(
                    status,
                    &serde_json::json!({ "error": { "code": code, "message": message } }),
                )
            }
        }
    }
}

/// A short SOAP fault; `code` is `Client` (do not retry as-is) or `Server` (retry).
fn soap_fault(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    let body = format!(
        concat!(
            r#"<?xml version="1.0" encoding="utf-8"?>"#,
            r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>"#,
            r#"<faultcode>s:{}</faultcode><faultstring>{}</faultstring>"#,
            r#"</s:Fault></s:Body></s:Envelope>"#
        ),
        code, message
    );
    response(status, XML, body)
}
