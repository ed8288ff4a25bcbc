//! The operator API port: liveness, readiness and the JSON query API (spec §6).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, header};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use http_body_util::{BodyExt, Limited};
use time::OffsetDateTime;

use super::{HttpResponse, json_response, response};
use crate::catalog;
use crate::domain::{CallbackKind, DeliveryResult, DeviceIdentifier, Operation, Secret};
use crate::jobs::{JobState, RegistrationRequest};
use crate::metrics::Metrics;
use crate::storage::events::{EventQuery, EventType, parse_event_id};
use crate::storage::{
    DeliveryQuery, FaultRecord, JobQuery, MessageQuery, MessageRecord, OutcomeRecord, RawBody,
    Registered, Store, StoreError,
};
use crate::telemetry::ErrorChain;

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

pub struct ApiState {
    /// Every read, registrations and the readiness probe.
    pub store: Arc<dyn Store>,
    /// Rendered on `/metrics` (job counts refreshed from the store at scrape time).
    pub metrics: Arc<Metrics>,
    /// Digest of the bearer token, when one is configured: every `/api/` request must carry it.
    token_digest: Option<[u8; 32]>,
    /// How long readiness waits for a probe commit before answering "not ready".
    pub readiness_timeout: Duration,
}

impl ApiState {
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        token: Option<&Secret>,
        readiness_timeout: Duration,
    ) -> Self {
        let token_digest = token
            .filter(|token| !token.is_empty())
            .map(|token| Sha256::digest(token.expose().as_bytes()).into());
        Self {
            store,
            metrics,
            token_digest,
            readiness_timeout,
        }
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let Some(expected) = &self.token_digest else {
            return true;
        };
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or_default();
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(presented.ct_eq(expected))
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is matched without regard
/// to case and may be followed by several spaces (RFC 7235 §2.1: `bearer`, `BEARER` are the same
/// scheme).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// An API error with a stable upper-case code.
fn error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    json_response(
        status,
        &json!({ "error": { "code": code, "message": message } }),
    )
}

/// A refused request parameter: 400 unless said otherwise.
struct InvalidParameter {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl InvalidParameter {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
        }
    }

    fn into_response(self) -> HttpResponse {
        error(self.status, self.code, &self.message)
    }
}

/// The answer to a request that failed in storage, logged here once with its cause chain: 503
/// when the store cannot answer now (the client retries), 500 for a fault of this request or of
/// the code, which a retry would meet again. The 500 names no internals; the log has them.
fn storage_error(failure: &StoreError) -> HttpResponse {
    match failure {
        StoreError::Unavailable(_) | StoreError::Busy(_) | StoreError::Closed => {
            tracing::warn!(error = %ErrorChain(failure), "API request failed in storage; answered 503");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "STORAGE_UNAVAILABLE",
                &ErrorChain(failure).to_string(),
            )
        }
        StoreError::Internal(_) => {
            tracing::error!(error = %ErrorChain(failure), "API request failed in storage; answered 500");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL",
                "the request failed in storage; the listener's log has the cause",
            )
        }
    }
}

/// Largest accepted registration body: 10,000 devices fit in well under 2 MiB.
const MAX_API_BODY: usize = 4 * 1024 * 1024;

pub async fn handle(
    state: Arc<ApiState>,
    request: Request<Incoming>,
    _peer: SocketAddr,
) -> HttpResponse {
    let path = request.uri().path().to_owned();
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .map(|query| {
            form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let Some(segments) = path_segments(&path) else {
        return error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "the path is not valid UTF-8 after decoding",
        );
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = request.method().clone();
    let reading = method == Method::GET || method == Method::HEAD;
    if segments.first() == Some(&"api") && !state.authorized(&request) {
        let mut refused = error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "a valid bearer token is required",
        );
        refused.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return refused;
    }
    let Some(endpoint) = Endpoint::of(&segments) else {
        return error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("no endpoint at {path}"),
        );
    };
    match (endpoint, reading) {
        (Endpoint::Health, true) => json_response(StatusCode::OK, &json!({ "status": "ok" })),
        (Endpoint::Readiness, true) => readiness(&state).await,
        (Endpoint::Metrics, true) => metrics(&state).await,
        (Endpoint::Jobs, false) if method == Method::POST => register_job(&state, request).await,
        (Endpoint::Jobs, true) => list_jobs(&state, &query).await,
        (Endpoint::Job(request_id), true) => get_job(&state, request_id).await,
        (Endpoint::JobDevices(request_id), true) => match reveal_secrets(&state, &query) {
            Ok(reveal) => job_devices(&state, request_id, &query, reveal).await,
            Err(refused) => refused.into_response(),
        },
        (Endpoint::Device(kind, identifier), true) => match reveal_secrets(&state, &query) {
            Ok(reveal) => device_history(&state, kind, identifier, reveal).await,
            Err(refused) => refused.into_response(),
        },
        (Endpoint::Catalog, true) => search_catalog(&query),
        (Endpoint::DeviceMessages(kind, identifier), true) => {
            device_messages(&state, kind, identifier, &query).await
        }
        (Endpoint::CatalogEntry(code), true) => catalog_entry(code),
        (Endpoint::Deliveries, true) => list_deliveries(&state, &query).await,
        (Endpoint::RawBody(id), true) => raw_body(&state, id, &query).await,
        (Endpoint::Reprocess(id), false) if method == Method::POST => {
            reprocess(&state, id, &query).await
        }
        (Endpoint::Events, true) => list_events(&state, &query).await,
        (Endpoint::Event(id), true) => get_event(&state, id).await,
        (Endpoint::Redeliver(id), false) if method == Method::POST => {
            redeliver_event(&state, id).await
        }
        (endpoint, _) => {
            let mut refused = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                &format!("{method} is not allowed on {path}"),
            );
            refused.headers_mut().insert(
                header::ALLOW,
                header::HeaderValue::from_static(endpoint.allowed_methods()),
            );
            refused
        }
    }
}

/// What a path names, whatever the method: a path that names none is 404, a method the
/// endpoint does not serve 405 (with `Allow`). Kept beside `tests/api/openapi.rs`'s `SERVED`.
#[derive(Clone, Copy)]
enum Endpoint<'a> {
    Health,
    Readiness,
    Metrics,
    Jobs,
    Job(&'a str),
    JobDevices(&'a str),
    Device(&'a str, &'a str),
    Catalog,
    DeviceMessages(&'a str, &'a str),
    CatalogEntry(&'a str),
    Deliveries,
    /// The id as it appears in the path; checked by [`delivery_id`].
    RawBody(&'a str),
    /// `POST`: the delivery read again by the current parser.
    Reprocess(&'a str),
    Events,
    Event(&'a str),
    /// `POST`: the event sent again to its sinks.
    Redeliver(&'a str),
}

impl<'a> Endpoint<'a> {
    fn of(segments: &[&'a str]) -> Option<Self> {
        Some(match segments {
            ["healthz"] => Endpoint::Health,
            ["readyz"] => Endpoint::Readiness,
            ["metrics"] => Endpoint::Metrics,
            ["api", "v1", "jobs"] => Endpoint::Jobs,
            ["api", "v1", "jobs", request_id] => Endpoint::Job(request_id),
            ["api", "v1", "jobs", request_id, "devices"] => Endpoint::JobDevices(request_id),
            ["api", "v1", "devices", kind, identifier] => Endpoint::Device(kind, identifier),
            ["api", "v1", "errors"] => Endpoint::Catalog,
            ["api", "v1", "devices", kind, identifier, "messages"] => {
                Endpoint::DeviceMessages(kind, identifier)
            }
            ["api", "v1", "errors", code] => Endpoint::CatalogEntry(code),
            ["api", "v1", "deliveries"] => Endpoint::Deliveries,
            ["api", "v1", "deliveries", id, "raw"] => Endpoint::RawBody(id),
            ["api", "v1", "deliveries", id, "reprocess"] => Endpoint::Reprocess(id),
            ["api", "v1", "events"] => Endpoint::Events,
            ["api", "v1", "events", id] => Endpoint::Event(id),
            ["api", "v1", "events", id, "redeliver"] => Endpoint::Redeliver(id),
            _ => return None,
        })
    }

    fn allowed_methods(self) -> &'static str {
        match self {
            Endpoint::Jobs => "GET, HEAD, POST",
            Endpoint::Reprocess(_) | Endpoint::Redeliver(_) => "POST",
            _ => "GET, HEAD",
        }
    }
}

/// The percent-decoded path segments (request ids and identifiers may need escaping).
fn path_segments(path: &str) -> Option<Vec<String>> {
    path.trim_end_matches('/')
        .split('/')
        .skip(1)
        .map(percent_decode)
        .collect()
}

fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = segment.get(index + 1..index + 3)?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

async fn register_job(state: &ApiState, request: Request<Incoming>) -> HttpResponse {
    let body = match Limited::new(request.into_body(), MAX_API_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BODY_TOO_LARGE",
                &format!("a registration body is at most {MAX_API_BODY} bytes"),
            );
        }
    };
    let parsed: RegistrationRequest = match serde_json::from_slice(&body) {
        Ok(parsed) => parsed,
        Err(failure) => {
            return error(
                StatusCode::BAD_REQUEST,
                "INVALID_JSON",
                &failure.to_string(),
            );
        }
    };
    let registration = match parsed.validate() {
        Ok(registration) => registration,
        Err(invalid) => return error(StatusCode::BAD_REQUEST, invalid.code, &invalid.message),
    };
    let request_id = registration.request_id.clone();
    match state
        .store
        .register_job(registration, OffsetDateTime::now_utc())
        .await
    {
        Ok(Registered::Created(job) | Registered::Adopted(job)) => {
            tracing::info!(request_id = %job.request_id, operation = job.operation.as_deref().unwrap_or_default(), "job registered");
            let mut created = json_response(StatusCode::CREATED, &job);
            if let Ok(location) = header::HeaderValue::from_str(&format!(
                "/api/v1/jobs/{}",
                encode_segment(&job.request_id)
            )) {
                created.headers_mut().insert(header::LOCATION, location);
            }
            created
        }
        Ok(Registered::Unchanged(job)) => json_response(StatusCode::OK, &job),
        Ok(Registered::Conflict(_)) => error(
            StatusCode::CONFLICT,
            "JOB_CONFLICT",
            &format!("job {request_id} is already registered with different values"),
        ),
        Err(failure) => storage_error(&failure),
    }
}

fn encode_segment(segment: &str) -> String {
    segment
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// `limit` and `cursor` of a listing, or the error answer.
fn paging(query: &HashMap<String, String>) -> Result<(u32, Option<i64>), InvalidParameter> {
    let limit = match query.get("limit").map(|limit| limit.parse::<u32>()) {
        None => DEFAULT_PAGE,
        Some(Ok(limit)) if (1..=MAX_PAGE).contains(&limit) => limit,
        Some(_) => {
            return Err(InvalidParameter::new(
                "INVALID_PARAMETER",
                format!("limit must be a whole number from 1 to {MAX_PAGE}"),
            ));
        }
    };
    let before_id = match query.get("cursor").filter(|cursor| !cursor.is_empty()) {
        None => None,
        // A next_cursor is a row id: at most 18 digits (always an i64), nothing else; no sign,
        // so a negative cursor cannot silently answer an empty page.
        Some(cursor) if cursor.len() <= 18 && cursor.bytes().all(|byte| byte.is_ascii_digit()) => {
            cursor.parse::<i64>().ok()
        }
        Some(_) => {
            return Err(InvalidParameter::new(
                "INVALID_CURSOR",
                "cursor must be a next_cursor value from a previous page (up to 18 digits)",
            ));
        }
    };
    Ok((limit, before_id))
}

/// A filter parameter that must be one of `allowed`.
fn one_of(
    query: &HashMap<String, String>,
    name: &str,
    allowed: &[&str],
) -> Result<Option<String>, InvalidParameter> {
    match query.get(name).map(String::as_str) {
        None => Ok(None),
        Some(value) if allowed.contains(&value) => Ok(Some(value.to_owned())),
        Some(_) => Err(InvalidParameter::new(
            "INVALID_PARAMETER",
            format!("{name} must be one of {}", allowed.join(", ")),
        )),
    }
}

async fn list_jobs(state: &ApiState, query: &HashMap<String, String>) -> HttpResponse {
    let states: Vec<&str> = JobState::ALL.iter().map(|state| state.as_str()).collect();
    let operations: Vec<&str> = Operation::ALL
        .iter()
        .map(|operation| operation.as_str())
        .collect();
    let filters = (|| {
        let (limit, before_id) = paging(query)?;
        Ok::<_, InvalidParameter>(JobQuery {
            state: one_of(query, "state", &states)?
                .as_deref()
                .and_then(JobState::from_label),
            operation: one_of(query, "operation", &operations)?,
            registered: one_of(query, "registered", &["true", "false"])?
                .map(|value| value == "true"),
            limit,
            before_id,
        })
    })();
    let filters = match filters {
        Ok(filters) => filters,
        Err(refused) => return refused.into_response(),
    };
    match state.store.list_jobs(filters).await {
        Ok(page) => json_response(StatusCode::OK, &page),
        Err(failure) => storage_error(&failure),
    }
}

async fn get_job(state: &ApiState, request_id: &str) -> HttpResponse {
    match state.store.get_job(request_id.to_owned()).await {
        Ok(Some(job)) => json_response(StatusCode::OK, &job),
        Ok(None) => job_not_found(request_id),
        Err(failure) => storage_error(&failure),
    }
}

fn job_not_found(request_id: &str) -> HttpResponse {
    error(
        StatusCode::NOT_FOUND,
        "JOB_NOT_FOUND",
        &format!("no job with request_id {request_id}"),
    )
}

/// Whether device credential passwords are to be shown: only on `reveal=secrets`, and only to a
/// bearer of the configured API token (the `/api` check has already verified it).
fn reveal_secrets(
    state: &ApiState,
    query: &HashMap<String, String>,
) -> Result<bool, InvalidParameter> {
    match query.get("reveal").map(String::as_str) {
        None => Ok(false),
        Some("secrets") if state.token_digest.is_some() => Ok(true),
        Some("secrets") => Err(InvalidParameter {
            status: StatusCode::FORBIDDEN,
            code: "SECRETS_REQUIRE_TOKEN",
            message: "device credentials are shown only to holders of api.token; configure one"
                .to_owned(),
        }),
        Some(_) => Err(InvalidParameter::new(
            "INVALID_PARAMETER",
            "reveal must be secrets",
        )),
    }
}

async fn job_devices(
    state: &ApiState,
    request_id: &str,
    query: &HashMap<String, String>,
    reveal: bool,
) -> HttpResponse {
    let status = match one_of(
        query,
        "status",
        &["succeeded", "failed", "accepted", "pending", "missing"],
    ) {
        Ok(status) => status,
        Err(refused) => return refused.into_response(),
    };
    let csv = match one_of(query, "format", &["json", "csv"]) {
        Ok(format) => format.as_deref() == Some("csv"),
        Err(refused) => return refused.into_response(),
    };
    let devices = match state
        .store
        .job_devices(request_id.to_owned(), OffsetDateTime::now_utc())
        .await
    {
        Ok(Some(devices)) => devices,
        Ok(None) => return job_not_found(request_id),
        Err(failure) => return storage_error(&failure),
    };
    let items: Vec<OutcomeRecord> = devices
        .into_iter()
        .filter(|device| {
            status
                .as_deref()
                .is_none_or(|wanted| device.status == wanted)
        })
        .map(|outcome| present_outcome(outcome, reveal))
        .collect();
    if csv {
        let mut answer = response(
            StatusCode::OK,
            "text/csv; charset=utf-8",
            outcomes_csv(&items),
        );
        if let Ok(disposition) = header::HeaderValue::from_str(&format!(
            "attachment; filename=\"{}-devices.csv\"",
            encode_segment(request_id)
        )) {
            answer
                .headers_mut()
                .insert(header::CONTENT_DISPOSITION, disposition);
        }
        return answer;
    }
    json_response(StatusCode::OK, &json!({ "items": items }))
}

/// The device view: what the device history holds, and its messages' link.
#[derive(serde::Serialize)]
struct DeviceView<Device: serde::Serialize> {
    #[serde(flatten)]
    device: Device,
    messages: MessagesLink,
}

/// The device view of a device known only by its messages: no outcome.
#[derive(serde::Serialize)]
struct KnownByMessages {
    identifiers: Vec<DeviceIdentifier>,
    latest: Option<OutcomeRecord>,
    history: Vec<OutcomeRecord>,
    jobs: Vec<crate::storage::DeviceJobRecord>,
}

/// Where a device's messages are listed, and the newest of them.
#[derive(serde::Serialize)]
struct MessagesLink {
    href: String,
    latest: Option<MessageRecord>,
}

async fn device_history(
    state: &ApiState,
    kind: &str,
    identifier: &str,
    reveal: bool,
) -> HttpResponse {
    let identifier = DeviceIdentifier::new(kind, identifier);
    // The newest message is one lookup in the identifier index, made beside the history's.
    let newest_message = MessageQuery {
        identifier: identifier.clone(),
        limit: 1,
        before_id: None,
    };
    let (history, messages) = tokio::join!(
        state
            .store
            .device_history(identifier.clone(), OffsetDateTime::now_utc()),
        state.store.device_messages(newest_message),
    );
    let (history, latest_message) = match (history, messages) {
        (Ok(history), Ok(messages)) => (history, messages.items.into_iter().next()),
        (Err(failure), _) | (_, Err(failure)) => return storage_error(&failure),
    };
    let messages = MessagesLink {
        href: format!(
            "/api/v1/devices/{}/{}/messages",
            encode_segment(&identifier.kind),
            encode_segment(&identifier.id)
        ),
        latest: latest_message,
    };
    let message_identifiers = messages
        .latest
        .as_ref()
        .map(|message| message.identifiers.clone())
        .unwrap_or_default();
    match history {
        Some(mut history) => {
            history.latest = present_outcome(history.latest, reveal);
            history.history = history
                .history
                .into_iter()
                .map(|outcome| present_outcome(outcome, reveal))
                .collect();
            // A message names the device's identifiers too (a NIDD uplink every one of its line).
            for found in message_identifiers {
                if !history.identifiers.contains(&found) {
                    history.identifiers.push(found);
                }
            }
            history
                .identifiers
                .sort_by(|left, right| (&left.kind, &left.id).cmp(&(&right.kind, &right.id)));
            json_response(
                StatusCode::OK,
                &DeviceView {
                    device: history,
                    messages,
                },
            )
        }
        None if messages.latest.is_some() => json_response(
            StatusCode::OK,
            &DeviceView {
                device: KnownByMessages {
                    identifiers: message_identifiers,
                    latest: None,
                    history: Vec::new(),
                    jobs: Vec::new(),
                },
                messages,
            },
        ),
        // The message released versions gave (tests/api/upgrade.rs holds the API to it); a
        // device with a message is found above.
        None => error(
            StatusCode::NOT_FOUND,
            "DEVICE_NOT_FOUND",
            &format!(
                "no outcome was ever reported for {} {}",
                identifier.kind, identifier.id
            ),
        ),
    }
}

/// The MO SMS and NIDD uplinks of a device, newest first, a page at a time.
async fn device_messages(
    state: &ApiState,
    kind: &str,
    identifier: &str,
    query: &HashMap<String, String>,
) -> HttpResponse {
    let (limit, before_id) = match paging(query) {
        Ok(paging) => paging,
        Err(refused) => return refused.into_response(),
    };
    let query = MessageQuery {
        identifier: DeviceIdentifier::new(kind, identifier),
        limit,
        before_id,
    };
    match state.store.device_messages(query).await {
        Ok(page) => json_response(StatusCode::OK, &page),
        Err(failure) => storage_error(&failure),
    }
}

/// `GET /api/v1/errors/{code}`: the catalog entry, or the guidance of the code's class
/// (`"match": "exact"` or `"class"`); 404 for a code of no known class.
fn catalog_entry(code: &str) -> HttpResponse {
    match catalog::catalog().explain(code) {
        Some(explanation) => json_response(StatusCode::OK, &explanation),
        None => error(
            StatusCode::NOT_FOUND,
            "ERROR_CODE_NOT_FOUND",
            &format!("{code} is not in the fault catalog and names no class of it"),
        ),
    }
}

/// `GET /api/v1/errors?q=&class=&source=`: the catalog entries every given filter keeps (see
/// [`catalog::CatalogSearch`]). `class` and `source` must be ones the catalog has.
fn search_catalog(query: &HashMap<String, String>) -> HttpResponse {
    let catalog = catalog::catalog();
    let search = (|| {
        Ok::<_, InvalidParameter>(catalog::CatalogSearch {
            query: query.get("q").map(String::as_str),
            class: catalog_filter(query, "class", catalog.classes(), |class| {
                catalog.class_named(class)
            })?,
            source: catalog_filter(query, "source", catalog.sources(), |source| {
                catalog.source_named(source)
            })?,
        })
    })();
    match search {
        Ok(search) => json_response(StatusCode::OK, &json!({ "items": catalog.search(&search) })),
        Err(refused) => refused.into_response(),
    }
}

/// A catalog filter parameter: one of `allowed`, in any case (`REQUEST_FAILED` is the class
/// `request_failed`), as `named` spells it.
fn catalog_filter(
    query: &HashMap<String, String>,
    name: &str,
    allowed: &[String],
    named: impl Fn(&str) -> Option<&'static str>,
) -> Result<Option<&'static str>, InvalidParameter> {
    match query.get(name) {
        None => Ok(None),
        Some(value) => named(value).map(Some).ok_or_else(|| {
            InvalidParameter::new(
                "INVALID_PARAMETER",
                format!("{name} must be one of {}", allowed.join(", ")),
            )
        }),
    }
}

/// Adds the catalog's explanation to a failed outcome (see [`catalog::Catalog::explain_fault`]:
/// by code, by text, else by the code's class) and hides device credentials unless `reveal`
/// (see [`reveal_secrets`]). `resolution` is a listed entry's only (a class's guidance is in
/// `explanation`), so that an answer given before class guidance existed is given again.
fn present_outcome(mut outcome: OutcomeRecord, reveal: bool) -> OutcomeRecord {
    let catalog = catalog::catalog();
    if let Some(fault) = outcome.fault.as_mut() {
        let explanation = catalog.explain_fault(fault.code.as_deref(), fault.message.as_deref());
        fault.resolution = listed_resolution(explanation.as_ref());
        fault.explanation = explanation;
    } else if outcome.status == "failed" {
        // A failed upload line reports a text, not a fault: name it from the catalog.
        if let Some(line_status) = outcome.line_status.clone() {
            let explanation = catalog.explain_fault(None, Some(&line_status));
            outcome.fault = Some(FaultRecord {
                code: explanation
                    .as_ref()
                    .map(|explanation| explanation.entry.code.clone()),
                message: Some(line_status),
                resolution: listed_resolution(explanation.as_ref()),
                explanation,
            });
        }
    }
    if let Some(details) = outcome.details.as_mut().filter(|_| !reveal) {
        redact_passwords(details);
    }
    outcome
}

/// The resolution of the catalog entry an explanation found; none for a class's guidance.
fn listed_resolution(explanation: Option<&catalog::Explanation>) -> Option<String> {
    explanation
        .filter(|explanation| explanation.matched != catalog::Match::Class)
        .and_then(|explanation| explanation.entry.resolution.clone())
}

/// Device credential passwords are stored but never shown.
fn redact_passwords(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(object) => {
            for (key, value) in object.iter_mut() {
                if key.eq_ignore_ascii_case("password") {
                    *value = serde_json::Value::String("********".to_owned());
                } else {
                    redact_passwords(value);
                }
            }
        }
        serde_json::Value::Array(values) => values.iter_mut().for_each(redact_passwords),
        _ => {}
    }
}

const CSV_HEADER: &str = "request_id,operation,status,identifiers,line_status,fault_code,fault_message,resolution,\
state,service_plan,ip_address,mdn,received_at,delivery_id";

fn outcomes_csv(outcomes: &[OutcomeRecord]) -> String {
    let mut csv = String::with_capacity(64 + outcomes.len() * 160);
    csv.push_str(CSV_HEADER);
    csv.push_str("\r\n");
    for outcome in outcomes {
        let identifiers: Vec<String> = outcome
            .identifiers
            .iter()
            .map(|identifier| format!("{}:{}", identifier.kind, identifier.id))
            .collect();
        let fault = outcome.fault.as_ref();
        let fields = [
            outcome.request_id.clone().unwrap_or_default(),
            outcome.operation.clone().unwrap_or_default(),
            outcome.status.clone(),
            identifiers.join(" "),
            outcome.line_status.clone().unwrap_or_default(),
            fault
                .and_then(|fault| fault.code.clone())
                .unwrap_or_default(),
            fault
                .and_then(|fault| fault.message.clone())
                .unwrap_or_default(),
            fault
                .and_then(|fault| fault.resolution.clone())
                .unwrap_or_default(),
            outcome.state.clone().unwrap_or_default(),
            outcome.service_plan.clone().unwrap_or_default(),
            outcome.ip_address.clone().unwrap_or_default(),
            outcome.mdn.clone().unwrap_or_default(),
            outcome.received_at.clone().unwrap_or_default(),
            outcome
                .delivery_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
        ];
        let escaped: Vec<String> = fields.iter().map(|field| csv_field(field)).collect();
        csv.push_str(&escaped.join(","));
        csv.push_str("\r\n");
    }
    csv
}

/// RFC 4180 quoting; a leading formula character is neutralised for spreadsheet users. Kept
/// rather than the `csv` crate's writer: the quoting is the four lines below, the neutralising
/// (which `csv` does not do) would stay ours anyway, and a writer over a `Vec` would add an error
/// path that cannot be taken. The tests read the output back with `csv`'s reader.
fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@']) && value.parse::<f64>().is_err() {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

/// The Prometheus exposition; the job gauge is read from storage at scrape time.
async fn metrics(state: &ApiState) -> HttpResponse {
    match state.store.job_counts().await {
        Ok(counts) => state.metrics.set_job_counts(&counts),
        Err(failure) => {
            tracing::warn!(error = %ErrorChain(&failure), "job counts unavailable for /metrics")
        }
    }
    match state.store.event_backlog().await {
        Ok(backlog) => state
            .metrics
            .set_event_backlog(&backlog, time::OffsetDateTime::now_utc()),
        Err(failure) => {
            tracing::warn!(error = %ErrorChain(&failure), "event backlog unavailable for /metrics")
        }
    }
    match state.metrics.render() {
        Ok(text) => response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            text,
        ),
        Err(failure) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "METRICS_UNAVAILABLE",
            &failure.to_string(),
        ),
    }
}

async fn readiness(state: &ApiState) -> HttpResponse {
    match tokio::time::timeout(state.readiness_timeout, state.store.check_writable()).await {
        Ok(Ok(())) => json_response(StatusCode::OK, &json!({ "status": "ready" })),
        Ok(Err(failure)) => {
            let reason = ErrorChain(&failure).to_string();
            tracing::warn!(%reason, "not ready");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "status": "unavailable", "reason": reason }),
            )
        }
        Err(_) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "status": "unavailable", "reason": "storage did not commit a probe in time" }),
        ),
    }
}

async fn list_deliveries(state: &ApiState, query: &HashMap<String, String>) -> HttpResponse {
    let results: Vec<&str> = DeliveryResult::ALL
        .iter()
        .map(|result| result.as_str())
        .collect();
    let kinds: Vec<&str> = CallbackKind::ALL.iter().map(|kind| kind.as_str()).collect();
    let filters = (|| {
        let (limit, before_id) = paging(query)?;
        Ok::<_, InvalidParameter>(DeliveryQuery {
            request_id: query.get("request_id").filter(|id| !id.is_empty()).cloned(),
            kind: one_of(query, "kind", &kinds)?,
            result: one_of(query, "result", &results)?
                .as_deref()
                .and_then(DeliveryResult::from_label),
            limit,
            before_id,
        })
    })();
    let filters = match filters {
        Ok(filters) => filters,
        Err(refused) => return refused.into_response(),
    };
    match state.store.list_deliveries(filters).await {
        Ok(page) => json_response(StatusCode::OK, &page),
        Err(failure) => storage_error(&failure),
    }
}

/// `GET /api/v1/events?type=&after=&limit=`: the feed, oldest first; `after` is an event id (a
/// `next_cursor`), so a consumer resumes where it stopped.
async fn list_events(state: &ApiState, query: &HashMap<String, String>) -> HttpResponse {
    let types: Vec<&str> = EventType::ALL.iter().map(|kind| kind.as_str()).collect();
    let filters = (|| {
        let (limit, _) = paging(&HashMap::from_iter(
            query
                .get("limit")
                .map(|limit| ("limit".to_owned(), limit.clone())),
        ))?;
        let after = match query.get("after").filter(|after| !after.is_empty()) {
            None => None,
            Some(after) => Some(parse_event_id(after).ok_or_else(|| {
                InvalidParameter::new(
                    "INVALID_CURSOR",
                    "after must be an event id (evt_ and digits), e.g. a next_cursor",
                )
            })?),
        };
        Ok::<_, InvalidParameter>(EventQuery {
            kind: one_of(query, "type", &types)?
                .as_deref()
                .and_then(EventType::from_label),
            after,
            limit,
        })
    })();
    let filters = match filters {
        Ok(filters) => filters,
        Err(refused) => return refused.into_response(),
    };
    match state.store.list_events(filters).await {
        Ok(page) => json_response(StatusCode::OK, &page),
        Err(failure) => storage_error(&failure),
    }
}

fn event_row(id: &str) -> Result<i64, InvalidParameter> {
    parse_event_id(id).ok_or_else(|| {
        InvalidParameter::new("INVALID_EVENT_ID", "an event id is evt_ followed by digits")
    })
}

/// `GET /api/v1/events/{id}`: the event, where it stands at each sink, every attempt.
async fn get_event(state: &ApiState, id: &str) -> HttpResponse {
    let row = match event_row(id) {
        Ok(row) => row,
        Err(refused) => return refused.into_response(),
    };
    match state.store.event_detail(row).await {
        Ok(Some(detail)) => json_response(StatusCode::OK, &detail),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "EVENT_NOT_FOUND",
            &format!("no event {id}"),
        ),
        Err(failure) => storage_error(&failure),
    }
}

/// `POST /api/v1/events/{id}/redeliver`: the event is sent again to every sink it went to (a
/// recorded, manual attempt; an endpoint disabled by a 410 is enabled again). 202: the
/// dispatchers send it at their next poll.
async fn redeliver_event(state: &ApiState, id: &str) -> HttpResponse {
    let row = match event_row(id) {
        Ok(row) => row,
        Err(refused) => return refused.into_response(),
    };
    match state
        .store
        .redeliver_event(row, time::OffsetDateTime::now_utc())
        .await
    {
        Ok(Some(sinks)) => {
            json_response(StatusCode::ACCEPTED, &json!({ "id": id, "sinks": sinks }))
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "EVENT_NOT_FOUND",
            &format!("no event {id}"),
        ),
        Err(failure) => storage_error(&failure),
    }
}

/// A delivery id from a path: a whole number from 1 to `i64::MAX`, digits only.
fn delivery_id(id: &str) -> Result<i64, InvalidParameter> {
    id.bytes()
        .all(|byte| byte.is_ascii_digit())
        .then(|| id.parse::<i64>().ok())
        .flatten()
        .filter(|id| *id >= 1)
        .ok_or_else(|| {
            InvalidParameter::new(
                "INVALID_DELIVERY_ID",
                "a delivery id is a whole number from 1 to 9223372036854775807",
            )
        })
}

/// `POST /api/v1/deliveries/{id}/reprocess[?dry_run=true]`: the delivery's raw body read again
/// by the current parser (see [`crate::storage::reprocess`]). A quarantined delivery it can read
/// is stored (or found to be a re-delivery) with its outcomes, and counted in the metrics as a
/// callback stored would be; one it cannot read stays quarantined with the current reason.
async fn reprocess(state: &ApiState, id: &str, query: &HashMap<String, String>) -> HttpResponse {
    let delivery_id = match delivery_id(id) {
        Ok(delivery_id) => delivery_id,
        Err(refused) => return refused.into_response(),
    };
    let dry_run = match query.get("dry_run").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "INVALID_PARAMETER",
                "dry_run is true or false",
            );
        }
    };
    let query = crate::storage::reprocess::ReprocessQuery {
        ids: vec![delivery_id],
        dry_run,
        ..Default::default()
    };
    match state.store.reprocess(query).await {
        Ok(report) => {
            count_reprocessed(&state.metrics, &report);
            match report.items.into_iter().next() {
                Some(item) if item.reason.as_deref() == Some("no such delivery") => error(
                    StatusCode::NOT_FOUND,
                    "DELIVERY_NOT_FOUND",
                    &format!("no delivery with id {delivery_id}"),
                ),
                Some(item) => json_response(
                    StatusCode::OK,
                    &json!({ "dry_run": dry_run, "delivery": item }),
                ),
                None => error(
                    StatusCode::NOT_FOUND,
                    "DELIVERY_NOT_FOUND",
                    &format!("no delivery with id {delivery_id}"),
                ),
            }
        }
        Err(failure) => storage_error(&failure),
    }
}

/// Counts what a committed reprocess stored, as the callback edge counts a callback stored.
pub fn count_reprocessed(metrics: &Metrics, report: &crate::storage::reprocess::ReprocessReport) {
    if report.dry_run {
        return;
    }
    for tally in report.items.iter().filter_map(|item| item.tally.as_ref()) {
        metrics.callback_stored(tally);
    }
}

/// The stored body of a delivery, with its secrets masked (see [`crate::redact`]) unless
/// `reveal=secrets` (see [`reveal_secrets`]), which gives the exact bytes.
async fn raw_body(state: &ApiState, id: &str, query: &HashMap<String, String>) -> HttpResponse {
    let reveal = match reveal_secrets(state, query) {
        Ok(reveal) => reveal,
        Err(refused) => return refused.into_response(),
    };
    let delivery_id = match delivery_id(id) {
        Ok(delivery_id) => delivery_id,
        Err(refused) => return refused.into_response(),
    };
    match state.store.raw_body(delivery_id).await {
        Ok(RawBody::Found { content_type, body }) => {
            let body = if reveal {
                body
            } else {
                match mask_secrets(body).await {
                    Some(masked) => masked,
                    None => {
                        return error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "SHUTTING_DOWN",
                            "the listener is shutting down",
                        );
                    }
                }
            };
            let mut found = response(StatusCode::OK, "application/octet-stream", body);
            if let Some(value) =
                content_type.and_then(|value| header::HeaderValue::from_str(&value).ok())
            {
                found.headers_mut().insert(header::CONTENT_TYPE, value);
            }
            // Masked or not, a callback body is not for shared caches.
            found.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            found
        }
        Ok(RawBody::Duplicate { duplicate_of }) => error(
            StatusCode::NOT_FOUND,
            "RAW_BODY_NOT_KEPT",
            &format!(
                "delivery {delivery_id} re-delivered a stored message; its body is kept once, \
                 at /api/v1/deliveries/{duplicate_of}/raw"
            ),
        ),
        Ok(RawBody::Pruned) => error(
            StatusCode::GONE,
            "RAW_BODY_PRUNED",
            &format!("the body of delivery {delivery_id} has been pruned"),
        ),
        Ok(RawBody::NotFound) => error(
            StatusCode::NOT_FOUND,
            "DELIVERY_NOT_FOUND",
            &format!("no delivery with id {delivery_id}"),
        ),
        Err(failure) => storage_error(&failure),
    }
}

/// Bodies larger than this are masked on the blocking pool rather than on an async worker (a
/// 16 MiB body takes milliseconds).
const MASK_INLINE_LIMIT: usize = 64 * 1024;

/// `body` with its secrets masked; `None` only when the blocking pool is gone (shutting down).
async fn mask_secrets(body: Vec<u8>) -> Option<Vec<u8>> {
    fn masked(body: Vec<u8>) -> Vec<u8> {
        let masked = match crate::redact::redact(&body) {
            std::borrow::Cow::Owned(masked) => Some(masked),
            std::borrow::Cow::Borrowed(_) => None,
        };
        masked.unwrap_or(body)
    }
    if body.len() <= MASK_INLINE_LIMIT {
        return Some(masked(body));
    }
    tokio::task::spawn_blocking(move || masked(body)).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case_and_the_token_kept_whole() {
        for value in [
            "Bearer abc",
            "bearer abc",
            "BEARER abc",
            "Bearer   abc",
            " Bearer abc ",
        ] {
            assert_eq!(bearer_token(value), Some("abc"), "{value:?}");
        }
        for value in ["Basic abc", "Bearerabc", "abc", "Bearer", ""] {
            assert_ne!(bearer_token(value), Some("abc"), "{value:?}");
        }
    }

    #[test]
    fn a_delivery_id_is_a_whole_number_from_one_to_the_largest_i64() {
        assert_eq!(delivery_id("1").ok(), Some(1));
        assert_eq!(delivery_id("9223372036854775807").ok(), Some(i64::MAX));
        for id in [
            "",
            "0",
            "-1",
            "+1",
            " 1",
            "1.0",
            "abc",
            "9223372036854775808",
        ] {
            assert!(delivery_id(id).is_err(), "{id:?}");
        }
    }

    fn outcome_with(line_status: &str, fault_message: &str, mdn: &str) -> OutcomeRecord {
        OutcomeRecord {
            request_id: Some("job-1".to_owned()),
            operation: Some("activate".to_owned()),
            identifiers: vec![
                DeviceIdentifier::new("IMEI", "990000862471854"),
                DeviceIdentifier::new("ICCID", "89148000000800000001"),
            ],
            status: "failed".to_owned(),
            line_status: Some(line_status.to_owned()),
            fault: Some(FaultRecord {
                code: Some("E1".to_owned()),
                message: Some(fault_message.to_owned()),
                resolution: None,
                explanation: None,
            }),
            state: None,
            service_plan: None,
            ip_address: None,
            mdn: Some(mdn.to_owned()),
            received_at: Some("2026-11-20T10:15:00Z".to_owned()),
            delivery_id: Some(7),
            details: None,
        }
    }

    #[test]
    fn the_devices_csv_quotes_quotes_commas_and_line_breaks_as_rfc_4180_says() {
        let text = outcomes_csv(&[
            outcome_with("say \"no\"", "a, b", "line\nbreak"),
            outcome_with("cr\rhere", "crlf\r\nhere", "plain"),
        ]);
        assert_eq!(
            text,
            format!(
                "{CSV_HEADER}\r\n\
                 job-1,activate,failed,IMEI:990000862471854 ICCID:89148000000800000001,\
                 \"say \"\"no\"\"\",E1,\"a, b\",,,,,\"line\nbreak\",2026-11-20T10:15:00Z,7\r\n\
                 job-1,activate,failed,IMEI:990000862471854 ICCID:89148000000800000001,\
                 \"cr\rhere\",E1,\"crlf\r\nhere\",,,,,plain,2026-11-20T10:15:00Z,7\r\n"
            )
        );
        // And a reader gets the values back exactly.
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let rows: Vec<csv::StringRecord> = reader.records().map(|row| row.expect("row")).collect();
        assert_eq!(&rows[0][4], "say \"no\"");
        assert_eq!(&rows[0][6], "a, b");
        assert_eq!(&rows[0][11], "line\nbreak");
        assert_eq!(&rows[1][6], "crlf\r\nhere");
    }

    #[test]
    fn a_leading_formula_character_is_neutralised_but_a_negative_number_is_not() {
        let text = outcomes_csv(&[outcome_with("=HYPERLINK(\"x\")", "@SUM(A1)", "-12.5")]);
        let row = text.lines().nth(1).expect("a data row");
        assert!(row.contains(",\"'=HYPERLINK(\"\"x\"\")\","), "{row}");
        assert!(row.contains(",'@SUM(A1),"), "{row}");
        assert!(row.contains(",-12.5,"), "{row}");
        assert_eq!(outcomes_csv(&[]), format!("{CSV_HEADER}\r\n"));
    }
}
