//! The callback port: the acknowledgement contract (spec §3), in phases.
//!
//! admit (source, declared size, room in the in-flight budget) → read (the body, held to that
//! budget) → authenticate (the credentials alone, found by one linear pass) → parse → store →
//! answer. Each phase either hands the next what it needs or ends the request with a
//! [`Refusal`], which knows its status, its metric label and how it is logged. The presented
//! password goes no further than the authentication phase.
//!
//! The store phase runs as a task of its own: a sender that hangs up after sending does not stop
//! it, so what is committed is also counted and logged, by the task that saw the commit.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, header};
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{HttpResponse, json_response, response};
use crate::access::SourcePolicy;
use crate::auth::{Authenticated, CallbackCredentials};
use crate::configuration::CallbackSettings;
use crate::domain::DeliveryResult;
use crate::metrics::{CallbackTally, Metrics, UNKNOWN_KIND};
use crate::parser::{self, Parsed};
use crate::storage::{DeliveryContent, NewDelivery, Store, StoreError};
use crate::telemetry::{ErrorChain, Wire};

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
/// The in-flight budget is counted in units of this many bytes (a semaphore's permits).
const BUDGET_UNIT: u64 = 1024;
/// A body's room in the budget grows in steps of this many bytes.
const BUDGET_STEP: usize = 64 * 1024;

pub struct CallbackState {
    /// Where deliveries are committed; the answer waits for it.
    pub store: Arc<dyn Store>,
    /// Counts every answer, and what each stored callback reported.
    pub metrics: Arc<Metrics>,
    /// The accepted credential pairs (configured, generated, rotated).
    pub authenticator: Arc<CallbackCredentials>,
    /// Which sources may post, and which proxies may name the client.
    pub sources: SourcePolicy,
    /// Larger bodies are refused with 413 (`callback.max_body_bytes`).
    pub max_body_bytes: u64,
    /// The whole body must arrive within this.
    pub body_read_timeout: Duration,
    /// Bytes of bodies in flight, all connections together (`callback.max_inflight_bytes`).
    inflight: InflightBudget,
    /// When an unauthorized attempt was last logged, and how many were not logged since.
    unauthorized_log: Mutex<(Option<Instant>, u64)>,
    /// Bounds the memory of parsed large callbacks (see [`LARGE_CALLBACKS_IN_FLIGHT`]).
    large_callbacks: Arc<Semaphore>,
}

impl CallbackState {
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        authenticator: Arc<CallbackCredentials>,
        sources: SourcePolicy,
        settings: &CallbackSettings,
    ) -> Self {
        Self {
            store,
            metrics,
            authenticator,
            sources,
            max_body_bytes: settings.max_body_bytes,
            body_read_timeout: Duration::from_millis(settings.body_read_timeout_ms),
            inflight: InflightBudget::new(
                settings.max_inflight_bytes,
                Duration::from_millis(settings.inflight_wait_ms),
            ),
            unauthorized_log: Mutex::new((None, 0)),
            large_callbacks: Arc::new(Semaphore::new(LARGE_CALLBACKS_IN_FLIGHT)),
        }
    }

    fn log_unauthorized(&self, source: IpAddr, username: Option<&str>) {
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
            Some(username) => tracing::warn!(
                %source, username = %Wire(username), suppressed_since_last = *suppressed,
                "callback rejected: credentials do not match any configured pair (check RegisterCallback)"
            ),
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
    if request.method() != Method::POST {
        return not_a_callback(&request);
    }
    let accepted = match receive(&state, request, peer).await {
        Ok(accepted) => accepted,
        Err((refusal, dialect)) => {
            refusal.log(&state, peer, started);
            state.metrics.callback_answered(
                UNKNOWN_KIND,
                refusal.result_label(),
                started.elapsed().as_secs_f64(),
            );
            return dialect.refuse(&refusal);
        }
    };
    let dialect = accepted.dialect;
    // The commit and its accounting happen in a task of their own: if the sender hangs up, this
    // future is dropped, the task is not.
    let storing = tokio::spawn(store(Arc::clone(&state), accepted, started));
    match storing.await {
        Ok(Ok(())) => dialect.ack(),
        Ok(Err(refusal)) => dialect.refuse(&refusal),
        // The task was cancelled (the runtime is shutting down): nothing acknowledged.
        Err(_) => dialect.refuse(&Refusal::Unavailable),
    }
}

/// Health checks and wrong methods; not counted as callbacks.
fn not_a_callback(request: &Request<Incoming>) -> HttpResponse {
    if matches!(*request.method(), Method::GET | Method::HEAD) && request.uri().path() == "/healthz"
    {
        return response(StatusCode::OK, "text/plain; charset=utf-8", "ok\n");
    }
    let mut refused = soap_fault(
        StatusCode::METHOD_NOT_ALLOWED,
        "Client",
        "callbacks are POSTed",
    );
    refused
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
    refused
}

/// A callback that passed every check before the store.
struct Accepted {
    dialect: Dialect,
    delivery: NewDelivery,
    /// What the metrics count if the delivery is stored (not a duplicate).
    tally: Option<CallbackTally>,
    kind: &'static str,
    operation: &'static str,
    /// Room in the in-flight budget, held until the commit answers.
    _budget: BudgetReservation,
    /// For a large callback, its slot among those parsed at once, held until the commit answers.
    _large_callback_slot: Option<OwnedSemaphorePermit>,
}

/// The phases before the store: admit, read, authenticate, parse.
async fn receive(
    state: &CallbackState,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Accepted, (Refusal, Dialect)> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let dialect = Dialect::of_content_type(content_type.as_deref());
    let refused = |refusal| (refusal, dialect);

    // Admit.
    let forwarded_for = request
        .headers()
        .get("x-forwarded-for")
        .and_then(|value| value.to_str().ok());
    let client = state.sources.client_address(peer.ip(), forwarded_for);
    if !state.sources.allows(client) {
        return Err(refused(Refusal::SourceNotAllowed { client }));
    }
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > state.max_body_bytes) {
        return Err(refused(Refusal::TooLarge {
            limit: state.max_body_bytes,
        }));
    }
    // Room is reserved as bytes arrive, not for the declared length: a sender that declares
    // 15 MiB and sends nothing holds nothing (see `read_body`).
    let mut budget = BudgetReservation::default();

    // Read.
    let body = tokio::time::timeout(
        state.body_read_timeout,
        read_body(request.into_body(), state, &mut budget, declared_length),
    )
    .await
    .map_err(|_| {
        refused(Refusal::BodyTimeout {
            timeout: state.body_read_timeout,
        })
    })?
    .map_err(refused)?;
    let received_at = OffsetDateTime::now_utc();
    let dialect = if parser::looks_like_json(&body) {
        Dialect::Json
    } else {
        Dialect::Soap
    };
    let refused = |refusal| (refusal, dialect);

    // Authenticate: the presented pair is checked and dropped here.
    let authenticated = authenticate(state, &body, Instant::now())
        .await
        .map_err(|refusal| refused(refusal.with_client(client)))?;

    // Parse. The parsed form of a large callback lives until its commit: hold a slot until then.
    let large_callback_slot = if body.len() > PARSE_INLINE_LIMIT {
        Arc::clone(&state.large_callbacks)
            .acquire_owned()
            .await
            .ok()
    } else {
        None
    };
    let content = match parse_off_the_hot_path(body.clone()).await {
        Parsed::Callback(callback) => DeliveryContent::Callback(callback),
        Parsed::Unreadable(unreadable) => DeliveryContent::Quarantined(unreadable),
    };
    let (kind, operation, tally) = match &content {
        DeliveryContent::Callback(callback) => (
            callback.kind.as_str(),
            callback.operation.as_str(),
            Some(CallbackTally::of(callback)),
        ),
        DeliveryContent::Quarantined(_) => (UNKNOWN_KIND, UNKNOWN_KIND, None),
    };
    Ok(Accepted {
        dialect,
        delivery: NewDelivery {
            received_at,
            body,
            content_type,
            source_address: Some(client.to_string()),
            account: authenticated.account,
            content,
            prepared: Default::default(),
        },
        tally,
        kind,
        operation,
        _budget: budget,
        _large_callback_slot: large_callback_slot,
    })
}

/// The credentials the body presents, checked; nothing else of the body has been looked at.
async fn authenticate(
    state: &CallbackState,
    body: &[u8],
    received: Instant,
) -> Result<Authenticated, Refusal> {
    let Some(presented) = parser::credentials(body) else {
        return Err(Refusal::NotACallback);
    };
    state
        .authenticator
        .verify(&presented.username, &presented.password, received)
        .await
        .ok_or(Refusal::Unauthorized {
            client: None,
            username: presented.username,
        })
}

/// Reads the body into one buffer, reserving room in the in-flight budget for its bytes before
/// they are stored. What counts is memory written, not memory asked for: the buffer of a declared
/// length is allocated at once, but its pages (a mapping of its own, see `memory.rs`) take memory
/// only as bytes arrive; a chunked body's buffer grows by `realloc`, which moves a mapping's pages
/// rather than copying them.
async fn read_body(
    mut body: Incoming,
    state: &CallbackState,
    budget: &mut BudgetReservation,
    declared_length: Option<u64>,
) -> Result<Bytes, Refusal> {
    let limit = usize::try_from(state.max_body_bytes).unwrap_or(usize::MAX);
    let mut buffer: Vec<u8> = Vec::new();
    if let Some(length) = declared_length.and_then(|length| usize::try_from(length).ok()) {
        buffer.reserve_exact(length.min(limit));
    }
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| Refusal::BodyUnreadable {
            error: error.to_string(),
        })?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        let needed = buffer.len() + chunk.len();
        if needed > limit {
            return Err(Refusal::TooLarge {
                limit: state.max_body_bytes,
            });
        }
        if needed as u64 > budget.bytes {
            let step = needed.next_multiple_of(BUDGET_STEP).min(limit.max(needed));
            state.inflight.grow(budget, step as u64).await?;
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buffer))
}

/// The store phase, and the accounting of what it committed (or could not).
async fn store(
    state: Arc<CallbackState>,
    accepted: Accepted,
    started: Instant,
) -> Result<(), Refusal> {
    // The budget and the large-callback slot are held to the end of this task, past the commit.
    let Accepted {
        delivery,
        tally,
        kind,
        operation,
        dialect: _,
        _budget,
        _large_callback_slot,
    } = accepted;
    let request_id = delivery.content.request_id().unwrap_or_default().to_owned();
    let callback_count = delivery.content.callback_count();
    let size = delivery.body.len();
    match state.store.submit(delivery).await {
        Ok(receipt) => {
            state.metrics.callback_attempt(callback_count);
            if let (DeliveryResult::Stored, Some(tally)) = (receipt.result, tally) {
                let tally = match receipt.job_operation {
                    Some(operation) => tally.under(operation),
                    None => tally,
                };
                state.metrics.callback_stored(&tally);
            }
            state.metrics.callback_answered(
                kind,
                receipt.result.as_str(),
                started.elapsed().as_secs_f64(),
            );
            tracing::info!(
                delivery_id = receipt.delivery_id, request_id = %Wire(&request_id), kind, operation,
                callback_count, bytes = size, result = receipt.result.as_str(), latency_ms = elapsed_ms(started),
                "callback acknowledged"
            );
            Ok(())
        }
        Err(error) => {
            state.metrics.callback_answered(
                kind,
                Refusal::Unavailable.result_label(),
                started.elapsed().as_secs_f64(),
            );
            log_store_failure(&request_id, kind, size, &error, started);
            Err(Refusal::Unavailable)
        }
    }
}

fn log_store_failure(
    request_id: &str,
    kind: &str,
    size: usize,
    error: &StoreError,
    started: Instant,
) {
    tracing::error!(
        request_id = %Wire(request_id), kind, bytes = size, result = "unavailable", error = %ErrorChain(error),
        latency_ms = elapsed_ms(started), "callback not stored; answered 503 so the platform retries"
    );
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

/// Why a callback POST was not acknowledged.
#[derive(Debug)]
enum Refusal {
    /// The source address is not in `callback.allowed_sources`.
    SourceNotAllowed { client: IpAddr },
    /// Over `callback.max_body_bytes`, declared or as it arrived.
    TooLarge { limit: u64 },
    /// No room in the in-flight budget within `callback.inflight_wait_ms`.
    Overloaded { waited: Duration },
    /// The body did not arrive within `callback.body_read_timeout_ms`.
    BodyTimeout { timeout: Duration },
    /// The connection failed while the body was read.
    BodyUnreadable { error: String },
    /// Neither a callback nor credentials to check.
    NotACallback,
    /// The presented credentials match no configured pair.
    Unauthorized {
        client: Option<IpAddr>,
        username: String,
    },
    /// The store could not commit.
    Unavailable,
}

impl Refusal {
    fn with_client(self, client: IpAddr) -> Self {
        match self {
            Self::Unauthorized { username, .. } => Self::Unauthorized {
                client: Some(client),
                username,
            },
            other => other,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::SourceNotAllowed { .. } | Self::Unauthorized { .. } => StatusCode::FORBIDDEN,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded { .. } | Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::BodyUnreadable { .. } | Self::NotACallback => StatusCode::BAD_REQUEST,
        }
    }

    /// The `result` label of `m2m_callbacks_total`.
    fn result_label(&self) -> &'static str {
        match self {
            Self::SourceNotAllowed { .. } | Self::Unauthorized { .. } => "unauthorized",
            Self::TooLarge { .. } => "too_large",
            Self::Overloaded { .. } | Self::Unavailable => "unavailable",
            Self::BodyTimeout { .. } | Self::BodyUnreadable { .. } | Self::NotACallback => {
                "bad_request"
            }
        }
    }

    /// The stable code of a JSON answer.
    fn code(&self) -> &'static str {
        match self {
            Self::SourceNotAllowed { .. } | Self::Unauthorized { .. } => "UNAUTHORIZED",
            Self::TooLarge { .. } => "BODY_TOO_LARGE",
            Self::Overloaded { .. } => "OVERLOADED",
            Self::Unavailable => "STORAGE_UNAVAILABLE",
            Self::BodyTimeout { .. } | Self::BodyUnreadable { .. } | Self::NotACallback => {
                "BAD_REQUEST"
            }
        }
    }

    /// The short message of the answer.
    fn message(&self) -> &'static str {
        match self {
            Self::SourceNotAllowed { .. } => "source address not allowed",
            Self::Unauthorized { .. } => "invalid callback credentials",
            Self::TooLarge { .. } => "body exceeds the configured limit",
            Self::Overloaded { .. } => "too many callbacks in flight; retry later",
            Self::BodyTimeout { .. } => "the body did not arrive in time",
            Self::BodyUnreadable { .. } => "the request body could not be read",
            Self::NotACallback => "the body is not a callback (XML with CallbackRequest, or JSON)",
            Self::Unavailable => "storage unavailable; retry later",
        }
    }

    /// One log line (refused credentials: at a limited rate). The store phase logs its own.
    fn log(&self, state: &CallbackState, peer: SocketAddr, started: Instant) {
        let result = self.result_label();
        let latency_ms = elapsed_ms(started);
        match self {
            Self::SourceNotAllowed { client } => state.log_unauthorized(*client, None),
            Self::Unauthorized { client, username } => {
                state.log_unauthorized(client.unwrap_or(peer.ip()), Some(username));
            }
            Self::TooLarge { limit } => tracing::info!(
                source = %peer.ip(), limit, result, latency_ms,
                "callback refused: body over callback.max_body_bytes"
            ),
            Self::Overloaded { waited } => tracing::warn!(
                source = %peer.ip(), waited_ms = waited.as_millis() as u64, result, latency_ms,
                "callback refused with 503: callback.max_inflight_bytes of bodies already in flight"
            ),
            Self::BodyTimeout { timeout } => tracing::info!(
                source = %peer.ip(), timeout_ms = timeout.as_millis() as u64, result,
                "callback refused: body not received within callback.body_read_timeout_ms"
            ),
            Self::BodyUnreadable { error } => tracing::info!(
                source = %peer.ip(), error = %Wire(error), result,
                "callback body could not be read"
            ),
            Self::NotACallback => tracing::info!(
                source = %peer.ip(), result, latency_ms,
                "callback refused: not a callback and no credentials to check"
            ),
            Self::Unavailable => {}
        }
    }
}

/// Memory for callback bodies in flight, all connections together: a semaphore whose permits are
/// [`BUDGET_UNIT`]s of bytes. Past it a body waits up to `wait` for room, then is refused.
struct InflightBudget {
    units: Arc<Semaphore>,
    wait: Duration,
}

/// Room reserved for one body; returned when dropped.
#[derive(Default)]
struct BudgetReservation {
    permit: Option<OwnedSemaphorePermit>,
    bytes: u64,
}

impl InflightBudget {
    fn new(max_bytes: u64, wait: Duration) -> Self {
        let units = usize::try_from(max_bytes / BUDGET_UNIT)
            .unwrap_or(Semaphore::MAX_PERMITS)
            .min(Semaphore::MAX_PERMITS);
        Self {
            units: Arc::new(Semaphore::new(units)),
            wait,
        }
    }

    /// Grows `reservation` to `bytes`.
    async fn grow(&self, reservation: &mut BudgetReservation, bytes: u64) -> Result<(), Refusal> {
        let have = reservation.bytes.div_ceil(BUDGET_UNIT);
        let need = bytes.div_ceil(BUDGET_UNIT);
        if need <= have {
            return Ok(());
        }
        let more = u32::try_from(need - have).map_err(|_| Refusal::Overloaded {
            waited: Duration::ZERO,
        })?;
        let acquired =
            tokio::time::timeout(self.wait, Arc::clone(&self.units).acquire_many_owned(more)).await;
        let permit = match acquired {
            Ok(Ok(permit)) => permit,
            // Timed out, or a body larger than the whole budget (refused at configuration).
            Ok(Err(_)) | Err(_) => return Err(Refusal::Overloaded { waited: self.wait }),
        };
        match &mut reservation.permit {
            Some(held) => held.merge(permit),
            None => reservation.permit = Some(permit),
        }
        reservation.bytes = need * BUDGET_UNIT;
        Ok(())
    }
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
    fn refuse(self, refusal: &Refusal) -> HttpResponse {
        let status = refusal.status();
        match self {
            Dialect::Soap => soap_fault(
                status,
                if status.is_server_error() {
                    "Server"
                } else {
                    "Client"
                },
                refusal.message(),
            ),
            Dialect::Json => json_response(
                status,
                &serde_json::json!({
                    "error": { "code": refusal.code(), "message": refusal.message() }
                }),
            ),
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
