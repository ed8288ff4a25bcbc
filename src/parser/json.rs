//! JSON callbacks of the platform's REST ("Connectivity Management") API: same meaning as the SOAP
//! ones, different shape. Keys are matched ignoring ASCII case; unknown keys are ignored.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::UniqueIdentifiers;
use crate::domain::{
    Callback, CallbackForm, CallbackKind, DeviceIdentifier, DeviceOutcome, Fault, Operation,
    OutcomeStatus,
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
    let response = field(object, "deviceResponse").and_then(|responses| match responses {
        Value::Object(responses) => responses
            .iter()
            .find(|(_, value)| !value.is_null())
            .map(|(name, value)| (name.as_str(), value)),
        _ => None,
    });
    let (kind, operation) = match response {
        Some((name, _)) => response_operation(name),
        None if fault.is_some() => (CallbackKind::CarrierService, Operation::Other),
        None => (CallbackKind::Other, Operation::Other),
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
        details: response.map(|(name, value)| {
            let mut details = Map::new();
            details.insert(name.to_owned(), value.clone());
            Value::Object(details)
        }),
        dedup_key: content_digest(object),
        messages: Vec::new(),
        repairs: Vec::new(),
    };
    if let Some(outcome) = device_outcome(&callback, response.map(|(_, value)| value)) {
        callback.outcomes.push(outcome);
    }
    Ok(callback)
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
        "nidd" | "niddmessage" | "sendnidd" => (CallbackKind::Other, Operation::Nidd),
        "sms" | "sendsms" | "smsdelivery" | "smsmessage" => {
            (CallbackKind::SmsDelivery, Operation::SmsDelivery)
        }
        _ => (CallbackKind::Other, Operation::Other),
    }
}

/// The device outcome rule of spec §2, as for SOAP callbacks.
fn device_outcome(callback: &Callback, response: Option<&Value>) -> Option<DeviceOutcome> {
    let status_is = |expected: &str| {
        callback
            .status
            .as_deref()
            .is_some_and(|status| status.eq_ignore_ascii_case(expected))
    };
    let status = if callback.fault.is_some() || status_is("failed") {
        OutcomeStatus::Failed
    } else if status_is("success") || response.is_some() {
        OutcomeStatus::Succeeded
    } else {
        return None;
    };
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
        line_status: None,
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
