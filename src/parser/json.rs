//! JSON callbacks of the platform's REST ("Connectivity Management") API: same meaning as the SOAP
//! ones, different shape. Keys are matched ignoring ASCII case; unknown keys are ignored.

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::UniqueIdentifiers;
use crate::domain::{
    Callback, CallbackForm, CallbackKind, DeviceIdentifier, DeviceMessage, DeviceOutcome, Fault,
    MessageChannel, Operation, OutcomeStatus,
};

/// Top-level keys that change between re-deliveries or rotations and so are left out of the digest.
const NOT_CONTENT: &[&str] = &[
    "callbackCount",
    "maxCallbackThreshold",
    "username",
    "password",
];
/// Response fields that have columns of their own.
const COLUMN_FIELDS: &[&str] = &["deviceIds", "servicePlan", "state", "ipAddress"];

/// The body object a REST callback reports in, and what it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// A `deviceResponse` entry: the key names the operation.
    Device,
    /// `niddResponse.niddMONotificationResponse`: a device uplink.
    NiddUplink,
    /// `niddResponse.niddMTDeliveryResponse`: the fate of a downlink.
    NiddDelivery,
    /// `niddResponse.niddConfigResponse`: the result of configuring a line.
    NiddConfig,
    /// Another `niddResponse` entry, of no documented shape.
    NiddOther,
}

/// The `niddResponse` entries of a documented shape.
const NIDD_SHAPES: &[(&str, Shape)] = &[
    ("niddMONotificationResponse", Shape::NiddUplink),
    ("niddMTDeliveryResponse", Shape::NiddDelivery),
    ("niddConfigResponse", Shape::NiddConfig),
];

/// The fault code of a NIDD delivery report whose status says it failed, when the callback
/// carries no `faultResponse` of its own: the platform's `<Service>.<...>` form, with the status
/// as the specific part. The catalog does not know it (the metric counts it as `other`); the
/// report's `reason` is the message.
pub(crate) const NIDD_DELIVERY_FAILED: &str = "NiddService.DeliveryFailed";

/// One response object of a callback: its key, its value and its shape.
#[derive(Clone, Copy)]
struct Response<'a> {
    name: &'a str,
    value: &'a Value,
    shape: Shape,
}

pub(crate) fn interpret(root: &Value) -> Result<Callback, String> {
    let Value::Object(object) = root else {
        return Err("a JSON callback is an object".to_owned());
    };
    let text = |key: &str| field(object, key).and_then(text_of);
    let count = |key: &str| field(object, key).and_then(count_of);
    let devices = field(object, "deviceIds")
        .map(identifiers_in)
        .unwrap_or_default();
    let fault = field(object, "faultResponse").and_then(fault_of);
    let response = match field(object, "niddResponse").filter(|value| !value.is_null()) {
        Some(nidd) => nidd_response(nidd)?,
        None => field(object, "deviceResponse").and_then(|responses| match responses {
            Value::Object(responses) => first_present(responses).map(|(name, value)| Response {
                name,
                value,
                shape: Shape::Device,
            }),
            _ => None,
        }),
    };
    let (kind, operation) = match response.map(|response| (response.shape, response.name)) {
        Some((Shape::Device, name)) => response_operation(name),
        Some((Shape::NiddUplink, _)) => (CallbackKind::Nidd, Operation::NiddMo),
        Some((Shape::NiddDelivery, _)) => (CallbackKind::Nidd, Operation::Nidd),
        Some((Shape::NiddConfig, _)) => (CallbackKind::Nidd, Operation::NiddConfig),
        Some((Shape::NiddOther, _)) => (CallbackKind::Nidd, Operation::Other),
        None => match &fault {
            Some(fault) => (fault_kind(&fault.code), Operation::Other),
            None => (CallbackKind::Other, Operation::Other),
        },
    };
    let mut callback = Callback {
        form: CallbackForm::Json,
        request_id: text("requestId"),
        devices,
        kind,
        operation,
        status: text("status"),
        fault,
        comment: text("comment"),
        callback_count: count("callbackCount"),
        max_callback_threshold: count("maxCallbackThreshold"),
        outcomes: Vec::new(),
        upload: None,
        details: response.map(|response| {
            let mut value = response.value.clone();
            if let (Shape::NiddUplink, Value::Object(uplink)) = (response.shape, &mut value) {
                // The payload is kept once, in the device message.
                uplink.retain(|key, _| !key.eq_ignore_ascii_case("message"));
            }
            let mut details = Map::new();
            details.insert(response.name.to_owned(), value);
            Value::Object(details)
        }),
        dedup_key: content_digest(object),
        messages: Vec::new(),
        repairs: Vec::new(),
    };
    match response {
        Some(uplink) if uplink.shape == Shape::NiddUplink => {
            callback
                .messages
                .extend(nidd_uplink(&callback, uplink.value));
        }
        _ => {
            if callback.fault.is_none() {
                callback.fault = delivery_failure(&callback, response);
            }
            if let Some(outcome) = device_outcome(&callback, response) {
                callback.outcomes.push(outcome);
            }
        }
    }
    Ok(callback)
}

/// The first entry that is not `null`.
fn first_present(object: &Map<String, Value>) -> Option<(&str, &Value)> {
    object
        .iter()
        .find(|(_, value)| !value.is_null())
        .map(|(name, value)| (name.as_str(), value))
}

/// The one result a `niddResponse` holds. Two results of documented shapes in one callback
/// would make its status and outcome ambiguous: such a body is unreadable (quarantined).
fn nidd_response(nidd: &Value) -> Result<Option<Response<'_>>, String> {
    let Value::Object(entries) = nidd else {
        return Ok(None);
    };
    let mut found: Option<Response<'_>> = None;
    for (name, value) in entries.iter().filter(|(_, value)| !value.is_null()) {
        let Some(&(_, shape)) = NIDD_SHAPES
            .iter()
            .find(|(known, _)| name.eq_ignore_ascii_case(known))
        else {
            continue;
        };
        if let Some(first) = found {
            return Err(format!(
                "niddResponse holds both {} and {name}: which result it reports is ambiguous",
                first.name
            ));
        }
        found = Some(Response { name, value, shape });
    }
    Ok(found.or_else(|| {
        first_present(entries).map(|(name, value)| Response {
            name,
            value,
            shape: Shape::NiddOther,
        })
    }))
}

/// The device message of a NIDD uplink: every identifier of the line (the top-level
/// `deviceIds` and the inner ones), the base64 payload as sent and, when the bytes are text, the
/// text. The uplink documents no time; a `timestamp` key is taken if one is there.
fn nidd_uplink(callback: &Callback, uplink: &Value) -> Option<DeviceMessage> {
    let Value::Object(object) = uplink else {
        return None;
    };
    let mut identifiers = UniqueIdentifiers::from_list(callback.devices.clone());
    collect_identifiers(uplink, &mut identifiers);
    let payload = field(object, "message").and_then(text_of);
    Some(DeviceMessage {
        identifiers: identifiers.into_vec(),
        channel: MessageChannel::Nidd,
        text: payload.as_deref().and_then(nidd_text),
        payload,
        sent_at: field(object, "timestamp").and_then(text_of),
    })
}

/// Base64 as the platform and devices write it: the standard alphabet, padded or not.
const NIDD_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The decoded payload when it is text: valid UTF-8 without control characters other than tab,
/// CR and LF. A device's binary frame is not text, even when its bytes happen to be UTF-8.
fn nidd_text(payload: &str) -> Option<String> {
    let compact: String = payload
        .chars()
        .filter(|character| !character.is_ascii_whitespace())
        .collect();
    let bytes = NIDD_BASE64.decode(compact).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    text.chars()
        .all(|character| !character.is_control() || matches!(character, '\t' | '\r' | '\n'))
        .then_some(text)
}

/// A NIDD delivery report that says it failed is a fault of the callback, even without a
/// `faultResponse`: code [`NIDD_DELIVERY_FAILED`], the report's `reason` as the message.
fn delivery_failure(callback: &Callback, response: Option<Response<'_>>) -> Option<Fault> {
    let report = response.filter(|response| response.shape == Shape::NiddDelivery)?;
    if status_outcome(callback.status.as_deref()) != Some(OutcomeStatus::Failed) {
        return None;
    }
    let reason = report
        .value
        .as_object()
        .and_then(|object| field(object, "reason"))
        .and_then(text_of);
    Some(Fault {
        code: NIDD_DELIVERY_FAILED.to_owned(),
        message: reason
            .or_else(|| callback.status.clone())
            .unwrap_or_default(),
        actor: None,
        detail: None,
    })
}

/// The kind of a callback that carries only a fault: the service its code names
/// (`NiddService.REQUEST_FAILED.X` → `nidd`). `UnifiedWebService`, the REST API's generic prefix
/// for device operations, is `carrier_service`, which every fault-only body was labelled before
/// the prefix was read.
fn fault_kind(code: &str) -> CallbackKind {
    let code = code.rsplit(':').next().unwrap_or(code);
    let service = code.split('.').next().unwrap_or(code).trim();
    if service.eq_ignore_ascii_case("UnifiedWebService") {
        return CallbackKind::CarrierService;
    }
    service_kind(service)
}

/// The kind label of a REST callback service name (`PLATFORM.md` §1, the registration list),
/// ignoring ASCII case. A bounded set: unknown and unlabelled services are `other`.
pub(crate) fn service_kind(service: &str) -> CallbackKind {
    const SERVICES: &[(&str, CallbackKind)] = &[
        ("CarrierService", CallbackKind::CarrierService),
        ("NiddService", CallbackKind::Nidd),
        ("DevicePRLInformation", CallbackKind::PrlInformation),
        ("DeviceUsage", CallbackKind::Usage),
        ("PromoChanges", CallbackKind::PromoChange),
        (
            "ExternalProvisioningChanges",
            CallbackKind::ExternalProvisioning,
        ),
        ("SMSDeliveryConfirmation", CallbackKind::SmsDelivery),
        ("EnhancedConnectivityService", CallbackKind::SmsMo),
        ("ResumeTrackingNotification", CallbackKind::ResumeTracking),
        ("DeviceSuspensionStatus", CallbackKind::ResumeTracking),
    ];
    SERVICES
        .iter()
        .find(|(name, _)| service.eq_ignore_ascii_case(name))
        .map_or(CallbackKind::Other, |&(_, kind)| kind)
}

/// The value of `key`, matched ignoring ASCII case.
fn field<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    object.get(key).or_else(|| {
        object
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| value)
    })
}

fn text_of(value: &Value) -> Option<String> {
    let text = match value {
        Value::String(text) => text.trim().to_owned(),
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        _ => return None,
    };
    (!text.is_empty()).then_some(text)
}

fn count_of(value: &Value) -> Option<u32> {
    match value {
        Value::Number(number) => number.as_u64().and_then(|count| u32::try_from(count).ok()),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// Every `{id, kind}` object under `value`, in order, without duplicates.
fn identifiers_in(value: &Value) -> Vec<DeviceIdentifier> {
    let mut found = UniqueIdentifiers::default();
    collect_identifiers(value, &mut found);
    found.into_vec()
}

fn collect_identifiers(value: &Value, found: &mut UniqueIdentifiers) {
    match value {
        Value::Object(object) => {
            let id = field(object, "id").and_then(text_of);
            let kind = field(object, "kind").and_then(text_of);
            if let (Some(id), Some(kind)) = (id, kind) {
                found.push(DeviceIdentifier::new(&kind, &id));
                return;
            }
            object
                .values()
                .for_each(|child| collect_identifiers(child, found));
        }
        Value::Array(values) => values
            .iter()
            .for_each(|child| collect_identifiers(child, found)),
        _ => {}
    }
}

fn fault_of(value: &Value) -> Option<Fault> {
    let Value::Object(object) = value else {
        return None;
    };
    let code = field(object, "faultcode").and_then(text_of);
    let message = field(object, "faultstring").and_then(text_of);
    if code.is_none() && message.is_none() {
        return None;
    }
    Some(Fault {
        code: code.unwrap_or_default(),
        message: message.unwrap_or_default(),
        actor: field(object, "faultactor").and_then(text_of),
        detail: field(object, "detail")
            .map(|detail| text_of(detail).unwrap_or_else(|| detail.to_string())),
    })
}

/// `changeIdentifierResponse` → (carrier_service, change_device_identifier), and so on.
fn response_operation(name: &str) -> (CallbackKind, Operation) {
    let lowered = name.to_ascii_lowercase();
    let stem = lowered.strip_suffix("response").unwrap_or(&lowered);
    let carrier = |operation| (CallbackKind::CarrierService, operation);
    match stem {
        "activate" | "activation" | "activatedevice" => carrier(Operation::Activate),
        "deactivate" | "deactivation" | "deactivatedevice" => carrier(Operation::Deactivate),
        "suspend" | "suspenddevice" => carrier(Operation::Suspend),
        "restore" | "restoredevice" | "resume" => carrier(Operation::Restore),
        "reconnect" => carrier(Operation::Reconnect),
        "statechange" | "changestate" | "changedevicestate" | "state" => {
            carrier(Operation::ChangeDeviceState)
        }
        "changeidentifier" | "changedeviceidentifier" | "identifierchange" => {
            carrier(Operation::ChangeDeviceIdentifier)
        }
        "serviceplan" | "changeserviceplan" | "serviceplanchange" | "changedeviceserviceplan" => {
            carrier(Operation::ChangeDeviceServicePlan)
        }
        "costcenter" | "changecostcenter" | "changedevicecostcenter" => {
            carrier(Operation::ChangeDeviceCostCenter)
        }
        "featurecodes" | "changefeaturecodes" | "changedevicefeaturecodes" => {
            carrier(Operation::ChangeDeviceFeatureCodes)
        }
        "customfields" | "changecustomfields" | "changedevicecustomfields" => {
            carrier(Operation::ChangeDeviceCustomFields)
        }
        "contactinfo" | "changecontactinfo" | "changedevicecontactinfo" => {
            carrier(Operation::ChangeDeviceContactInfo)
        }
        "move" | "movedevice" => carrier(Operation::MoveDevice),
        "nidd" | "niddmessage" | "sendnidd" => (CallbackKind::Nidd, Operation::Nidd),
        "sms" | "sendsms" | "smsdelivery" | "smsmessage" => {
            (CallbackKind::SmsDelivery, Operation::SmsDelivery)
        }
        _ => (CallbackKind::Other, Operation::Other),
    }
}

/// What a REST `status` says of the device, when it says something: `Pending` and `Queued`
/// are reported, not final and not failures.
fn status_outcome(status: Option<&str>) -> Option<OutcomeStatus> {
    let status = status?.trim();
    let is = |expected: &str| status.eq_ignore_ascii_case(expected);
    if is("success") || is("delivered") || is("configcreated") {
        Some(OutcomeStatus::Succeeded)
    } else if is("failed") || is("deliveryfailed") {
        Some(OutcomeStatus::Failed)
    } else if is("pending") || is("queued") {
        Some(OutcomeStatus::Accepted)
    } else {
        None
    }
}

/// The device outcome rule of spec §2, as for SOAP callbacks, with the REST statuses: a fault
/// fails the device; else the status decides; else a response succeeds it, but for a NIDD
/// delivery report, whose fate is not known until its status says it (`accepted`).
fn device_outcome(callback: &Callback, response: Option<Response<'_>>) -> Option<DeviceOutcome> {
    let status = match (&callback.fault, status_outcome(callback.status.as_deref())) {
        (Some(_), _) => OutcomeStatus::Failed,
        (None, Some(status)) => status,
        (None, None) => match response {
            Some(report) if report.shape == Shape::NiddDelivery => OutcomeStatus::Accepted,
            Some(_) => OutcomeStatus::Succeeded,
            None => return None,
        },
    };
    let line_status = callback
        .status
        .clone()
        .filter(|_| status == OutcomeStatus::Accepted);
    let response = response.map(|response| response.value);
    let mut identifiers = UniqueIdentifiers::from_list(callback.devices.clone());
    if let Some(response) = response {
        collect_identifiers(response, &mut identifiers);
    }
    let identifiers = identifiers.into_vec();
    if identifiers.is_empty() {
        return None;
    }
    let response = response.and_then(Value::as_object);
    let response_text = |key: &str| {
        response
            .and_then(|object| field(object, key))
            .and_then(text_of)
    };
    let details = response.map(|object| {
        object
            .iter()
            .filter(|(name, _)| {
                !COLUMN_FIELDS
                    .iter()
                    .any(|column| name.eq_ignore_ascii_case(column))
            })
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect::<Map<String, Value>>()
    });
    Some(DeviceOutcome {
        mdn: identifiers
            .iter()
            .find(|identifier| identifier.kind == "MDN")
            .map(|identifier| identifier.id.clone()),
        identifiers,
        status,
        line_status,
        fault: callback.fault.clone(),
        state: response_text("state"),
        service_plan: response_text("servicePlan"),
        ip_address: response_text("ipAddress"),
        details: details
            .filter(|details| !details.is_empty())
            .map(Value::Object),
    })
}

/// A digest of the callback's content, independent of key order and formatting, without the
/// fields that change between re-deliveries.
fn content_digest(object: &Map<String, Value>) -> [u8; 32] {
    fn feed(hasher: &mut Sha256, value: &Value) {
        match value {
            Value::Object(object) => {
                let mut keys: Vec<&String> = object.keys().collect();
                keys.sort();
                hasher.update(b"{");
                for key in keys {
                    hasher.update((key.len() as u64).to_le_bytes());
                    hasher.update(key.as_bytes());
                    if let Some(value) = object.get(key) {
                        feed(hasher, value);
                    }
                }
                hasher.update(b"}");
            }
            Value::Array(values) => {
                hasher.update(b"[");
                values.iter().for_each(|value| feed(hasher, value));
                hasher.update(b"]");
            }
            scalar => {
                let text = scalar.to_string();
                hasher.update((text.len() as u64).to_le_bytes());
                hasher.update(text.as_bytes());
            }
        }
    }
    let content: Map<String, Value> = object
        .iter()
        .filter(|(name, _)| {
            !NOT_CONTENT
                .iter()
                .any(|skipped| name.eq_ignore_ascii_case(skipped))
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let mut hasher = Sha256::new();
    hasher.update(b"json-callback\0");
    feed(&mut hasher, &Value::Object(content));
    hasher.finalize().into()
}

/// The string value of `"key": "..."` (key matched ignoring ASCII case) in text that may not be
/// valid JSON. `null` reads as empty.
pub(crate) fn scan_string(text: &str, key: &str) -> Option<String> {
    scan_value(text, key).and_then(|raw| {
        if raw == "null" {
            return Some(String::new());
        }
        let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
        serde_json::from_str::<String>(&format!("\"{inner}\""))
            .ok()
            .map(|value| value.trim().to_owned())
    })
}

/// The raw text of the value after `"key":`, up to its end (a closing quote for strings, else a
/// delimiter).
pub(crate) fn scan_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    value_range(text, key).map(|range| &text[range])
}

/// Where [`scan_value`]'s value is in `text`.
fn value_range(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let quoted = format!("\"{}\"", key.to_ascii_lowercase());
    let lowered = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some(found) = lowered[from..].find(&quoted) {
        let after_key = from + found + quoted.len();
        from = after_key;
        let rest = text[after_key..].trim_start();
        let Some(value) = rest.strip_prefix(':') else {
            continue;
        };
        let value = value.trim_start();
        let offset = text.len() - value.len();
        let end = if value.starts_with('"') {
            let mut escaped = false;
            let mut end = None;
            for (index, character) in value.char_indices().skip(1) {
                match character {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(index + 1);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            end?
        } else {
            value.find([',', '}', ']', '\n']).unwrap_or(value.len())
        };
        let raw = &text[offset..offset + end];
        let trimmed_end = offset + raw.trim_end().len();
        return Some(offset..trimmed_end);
    }
    None
}

/// A digest of a raw JSON body with the `callbackCount` and `maxCallbackThreshold` values left out.
pub(crate) fn raw_digest(text: &str) -> [u8; 32] {
    let mut masked = text.to_owned();
    for key in ["callbackCount", "maxCallbackThreshold"] {
        if let Some(range) = value_range(&masked, key) {
            masked.replace_range(range, "");
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(b"raw-json\0");
    hasher.update(masked.as_bytes());
    hasher.finalize().into()
}
