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

use super::{HttpResponse, json_response, response};
use crate::domain::{DeliveryResult, Secret};
use crate::storage::{DeliveryQuery, RawBody, Store, StoreError};

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

pub struct ApiState {
    pub store: Arc<dyn Store>,
    /// Digest of the bearer token, when one is configured: every `/api/` request must carry it.
    token_digest: Option<[u8; 32]>,
    /// How long readiness waits for a probe commit before answering "not ready".
    pub readiness_timeout: Duration,
}

impl ApiState {
    pub fn new(store: Arc<dyn Store>, token: Option<&Secret>, readiness_timeout: Duration) -> Self {
        let token_digest = token
            .filter(|token| !token.is_empty())
            .map(|token| Sha256::digest(token.expose().as_bytes()).into());
        Self {
            store,
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
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        let presented: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        bool::from(presented.ct_eq(expected))
    }
}

/// An API error with a stable upper-case code.
fn error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    json_response(
        status,
        &json!({ "error": { "code": code, "message": message } }),
    )
}

fn storage_error(failure: &StoreError) -> HttpResponse {
    tracing::warn!(error = %failure, "API request failed in storage");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "STORAGE_UNAVAILABLE",
        &failure.to_string(),
    )
}

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
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "this endpoint answers GET",
        );
    }
    match segments.as_slice() {
        ["healthz"] => json_response(StatusCode::OK, &json!({ "status": "ok" })),
        ["readyz"] => readiness(&state).await,
        ["api", ..] if !state.authorized(&request) => {
            let mut refused = error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "a valid bearer token is required",
            );
            refused.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            refused
        }
        ["api", "v1", "deliveries"] => list_deliveries(&state, &query).await,
        ["api", "v1", "deliveries", id, "raw"] => raw_body(&state, id).await,
        _ => error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("no endpoint at {path}"),
        ),
    }
}

async fn readiness(state: &ApiState) -> HttpResponse {
    match tokio::time::timeout(state.readiness_timeout, state.store.check_writable()).await {
        Ok(Ok(())) => json_response(StatusCode::OK, &json!({ "status": "ready" })),
        Ok(Err(failure)) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "status": "unavailable", "reason": failure.to_string() }),
        ),
        Err(_) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "status": "unavailable", "reason": "storage did not commit a probe in time" }),
        ),
    }
}

async fn list_deliveries(state: &ApiState, query: &HashMap<String, String>) -> HttpResponse {
    let result = match query.get("result").map(String::as_str) {
        None | Some("") => None,
        Some(label) => match DeliveryResult::from_label(label) {
            Some(result) => Some(result),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_PARAMETER",
                    "result must be one of stored, duplicate, quarantined",
                );
            }
        },
    };
    let limit = match query.get("limit").map(|limit| limit.parse::<u32>()) {
        None => DEFAULT_PAGE,
        Some(Ok(limit)) if (1..=MAX_PAGE).contains(&limit) => limit,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "INVALID_PARAMETER",
                &format!("limit must be a whole number from 1 to {MAX_PAGE}"),
            );
        }
    };
    let before_id = match query.get("cursor").map(|cursor| cursor.parse::<i64>()) {
        None => None,
        Some(Ok(cursor)) => Some(cursor),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "INVALID_CURSOR",
                "cursor must be a next_cursor value from a previous page",
            );
        }
    };
    let request_id = query.get("request_id").filter(|id| !id.is_empty()).cloned();
    match state
        .store
        .list_deliveries(DeliveryQuery {
            request_id,
            result,
            limit,
            before_id,
        })
        .await
    {
        Ok(page) => json_response(StatusCode::OK, &page),
        Err(failure) => storage_error(&failure),
    }
}

async fn raw_body(state: &ApiState, id: &str) -> HttpResponse {
    let Ok(delivery_id) = id.parse::<i64>() else {
        return error(
            StatusCode::NOT_FOUND,
            "DELIVERY_NOT_FOUND",
            &format!("no delivery with id {id}"),
        );
    };
    match state.store.raw_body(delivery_id).await {
        Ok(RawBody::Found { content_type, body }) => {
            let mut found = response(StatusCode::OK, "application/octet-stream", body);
            if let Some(value) =
                content_type.and_then(|value| header::HeaderValue::from_str(&value).ok())
            {
                found.headers_mut().insert(header::CONTENT_TYPE, value);
            }
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
