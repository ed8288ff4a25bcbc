//! Interpretation of a callback element tree (any of the XML forms) into a [`Callback`].

use sha2::{Digest, Sha256};

use super::UniqueIdentifiers;
use super::tree::Element;
use crate::domain::{
    Callback, CallbackForm, CallbackKind, DeviceIdentifier, DeviceMessage, DeviceOutcome, Fault,
    MessageChannel, Operation, OutcomeStatus, UploadSummary,
};

/// Elements of `Data` that describe the callback itself rather than the service result.
const DATA_META: &[&str] = &[
    "Fault",
    "Comment",
    "Summary",
    "Status",
    "CallbackCount",
    "MaxCallbackThreshold",
];

/// Finds the callback element inside whichever envelope the document uses.
pub(crate) fn find_callback(root: &Element) -> Option<(CallbackForm, &Element)> {
    let is_callback =
        |element: &Element| element.is("CallbackRequest") || element.is("SmsCallbackRequest");
    if root.is("Envelope") {
        let body = root.child("Body")?;
        let inner = body
            .children
            .iter()
            .find(|child| is_callback(child) || child.is("CallbackRequest1"))?;
        let callback = if inner.is("CallbackRequest1") {
            inner.child("CallbackRequest")?
        } else {
            inner
        };
        return Some((CallbackForm::SoapEnvelope, callback));
    }
    if root.is("CallbackRequest1") {
        return Some((CallbackForm::Wrapper, root.child("CallbackRequest")?));
    }
    is_callback(root).then_some((CallbackForm::Bare, root))
}

pub(crate) fn interpret(form: CallbackForm, callback: &Element) -> Callback {
    let request_id = callback.child_value("RequestId");
    let devices: Vec<DeviceIdentifier> = callback
        .children_named("Device")
        .flat_map(identifiers_in)
        .collect();
    let dedup_key = content_digest(callback);

    // The service result sits in `Data`, sometimes in `Data/Data`; the meta fields may sit at
    // either level, and (leniently) directly in the callback element.
    let data = callback
        .child("Data")
        .map(|outer| outer.child("Data").unwrap_or(outer));
    let meta = |name: &str| {
        data.and_then(|data| data.child_value(name))
            .or_else(|| callback.child_value(name))
    };
    let fault = data
        .and_then(|data| data.child("Fault"))
        .or_else(|| callback.child("Fault"))
        .and_then(fault_of);
    let status = meta("Status");
    let comment = meta("Comment");
    let callback_count = meta("CallbackCount").and_then(|count| count.parse().ok());
    let max_callback_threshold = meta("MaxCallbackThreshold").and_then(|count| count.parse().ok());

    let mut parsed = Callback {
        form,
        request_id,
        devices,
        kind: CallbackKind::Other,
        operation: Operation::Other,
        status,
        fault,
        comment,
        callback_count,
        max_callback_threshold,
        outcomes: Vec::new(),
        upload: None,
        details: None,
        dedup_key,
        messages: Vec::new(),
        repairs: Vec::new(),
    };

    if callback.is("SmsCallbackRequest") {
        parsed.kind = CallbackKind::SmsMo;
        parsed.operation = Operation::SmsMo;
        let skip = [
            "Username",
            "Password",
            "RequestId",
            "Device",
            "CallbackCount",
            "MaxCallbackThreshold",
        ];
        parsed.details = details_of(
            callback
                .children
                .iter()
                .filter(|child| !skip.iter().any(|name| child.is(name))),
        );
        parsed.messages = callback
            .children_named("SmsMessage")
            .filter(|message| message.is_present())
            .map(|message| {
                let text = message.child_value("Message");
                DeviceMessage {
                    identifiers: UniqueIdentifiers::from_list(parsed.devices.clone()).into_vec(),
                    channel: MessageChannel::Sms,
                    payload: text.clone(),
                    text,
                    sent_at: message.child_value("Timestamp"),
                }
            })
            .collect();
        return parsed;
    }

    let service = data.and_then(|data| {
        data.children
            .iter()
            .find(|child| child.is_present() && !DATA_META.iter().any(|name| child.is(name)))
    });
    let mut result: Option<&Element> = None;
    match service {
        Some(carrier) if carrier.is("CarrierService") => {
            parsed.kind = CallbackKind::CarrierService;
            (parsed.operation, result) = carrier_operation(carrier);
        }
        Some(device_service) if device_service.is("DeviceService") => {
            match device_service
                .child("UploadDevices")
                .filter(|upload| upload.is_present())
            {
                Some(upload) => {
                    parsed.kind = CallbackKind::UploadDevices;
                    parsed.operation = Operation::UploadDevices;
                    interpret_upload(&mut parsed, upload);
                }
                None => parsed.details = details_of(std::iter::once(device_service)),
            }
        }
        Some(other) => {
            (parsed.kind, parsed.operation) = notification_kind(other);
            result = Some(other);
        }
        None => {
            if parsed.comment.is_some() && parsed.fault.is_none() {
                // Resume-tracking notifications carry only a Comment.
                parsed.kind = CallbackKind::ResumeTracking;
                parsed.operation = Operation::ResumeTracking;
            } else if parsed
                .fault
                .as_ref()
                .is_some_and(|fault| service_prefix(&fault.code) == "CarrierService")
            {
                // A failed carrier operation has every result element nil; the fault code names the service.
                parsed.kind = CallbackKind::CarrierService;
            }
        }
    }

    if parsed.kind != CallbackKind::UploadDevices && parsed.kind != CallbackKind::CarrierService {
        let generic = data
            .into_iter()
            .flat_map(|data| data.children.iter())
            .filter(|child| {
                !["Fault", "Status", "CallbackCount", "MaxCallbackThreshold"]
                    .iter()
                    .any(|name| child.is(name))
            });
        parsed.details = details_of(generic);
    }
    if parsed.kind != CallbackKind::UploadDevices {
        if let Some(outcome) = device_outcome(&parsed, result) {
            parsed.outcomes.push(outcome);
        }
    }
    parsed
}

/// The operation named by the most specific non-nil element under `CarrierService`, and that element.
fn carrier_operation(carrier: &Element) -> (Operation, Option<&Element>) {
    let Some(change) = carrier.children.iter().find(|child| child.is_present()) else {
        return (Operation::Other, None);
    };
    if change.is("ChangeDeviceState") {
        let state_change = change.children.iter().find(|child| child.is_present());
        return match state_change {
            Some(element) => (state_operation(&element.name), Some(element)),
            None => (Operation::ChangeDeviceState, Some(change)),
        };
    }
    let operation = match change.name.to_ascii_lowercase().as_str() {
        "changedeviceserviceplan" => Operation::ChangeDeviceServicePlan,
        "changedeviceidentifier" => Operation::ChangeDeviceIdentifier,
        "change4gdeviceidentifier" => Operation::Change4gDeviceIdentifier,
        "changedevicefeaturecodes" => Operation::ChangeDeviceFeatureCodes,
        "changedevicecostcenter" => Operation::ChangeDeviceCostCenter,
        "changedevicecustomfields" => Operation::ChangeDeviceCustomFields,
        // The platform's own schema spells it both ways.
        "changedevicecontactinfo" | "changedeviceconctactinfo" => {
            Operation::ChangeDeviceContactInfo
        }
        "movedevice" => Operation::MoveDevice,
        "gotostate" => Operation::GoToState,
        _ => Operation::Other,
    };
    (operation, Some(change))
}

fn state_operation(name: &str) -> Operation {
    match name.to_ascii_lowercase().as_str() {
        "activate" => Operation::Activate,
        "deactivate" => Operation::Deactivate,
        "suspend" => Operation::Suspend,
        "restore" => Operation::Restore,
        "reconnect" => Operation::Reconnect,
        "gotostate" => Operation::GoToState,
        _ => Operation::ChangeDeviceState,
    }
}

fn notification_kind(element: &Element) -> (CallbackKind, Operation) {
    match element.name.to_ascii_lowercase().as_str() {
        "externalprovisioningchange" => (
            CallbackKind::ExternalProvisioning,
            Operation::ExternalProvisioningChange,
        ),
        "promochange" => (CallbackKind::PromoChange, Operation::PromoChange),
        "smsdelivery" => (CallbackKind::SmsDelivery, Operation::SmsDelivery),
        "prlinformation" => (CallbackKind::PrlInformation, Operation::PrlInformation),
        "usage" | "deviceusage" => (CallbackKind::Usage, Operation::Usage),
        "devicesuspendstatus" => (CallbackKind::ResumeTracking, Operation::ResumeTracking),
        "gotostate" => (CallbackKind::CarrierService, Operation::GoToState),
        _ => (CallbackKind::Other, Operation::Other),
    }
}

/// One outcome for the device the callback is about, per the device outcome rule (spec §2):
/// a fault or `Failed` fails it; `Success` or a non-nil result without a fault succeeds it.
fn device_outcome(callback: &Callback, result: Option<&Element>) -> Option<DeviceOutcome> {
    let status = if callback.fault.is_some() || status_is(callback, "failed") {
        OutcomeStatus::Failed
    } else if status_is(callback, "success") || result.is_some() {
        OutcomeStatus::Succeeded
    } else {
        return None;
    };
    let mut identifiers = UniqueIdentifiers::from_list(callback.devices.clone());
    if let Some(result) = result {
        collect_identifiers(result, &mut identifiers);
    }
    let identifiers = identifiers.into_vec();
    if identifiers.is_empty() {
        return None;
    }
    let mdn = identifiers
        .iter()
        .find(|identifier| identifier.kind == "MDN")
        .map(|identifier| identifier.id.clone());
    let column_fields = [
        "IpAddress",
        "State",
        "ServicePlan",
        "DeviceIdentifierCollection",
        "DeviceIdentifiers",
        "DeviceIdentifier",
    ];
    Some(DeviceOutcome {
        identifiers,
        status,
        line_status: None,
        fault: callback.fault.clone(),
        state: result.and_then(|result| result.child_value("State")),
        service_plan: result.and_then(|result| result.child_value("ServicePlan")),
        ip_address: result.and_then(|result| result.child_value("IpAddress")),
        mdn,
        details: result.and_then(|result| {
            details_of(
                result
                    .children
                    .iter()
                    .filter(|child| !column_fields.iter().any(|name| child.is(name))),
            )
        }),
    })
}

fn status_is(callback: &Callback, expected: &str) -> bool {
    callback
        .status
        .as_deref()
        .is_some_and(|status| status.eq_ignore_ascii_case(expected))
}

fn interpret_upload(callback: &mut Callback, upload: &Element) {
    let mut lines = Vec::new();
    collect_named(upload, "UploadDevicesInfo", &mut lines);
    callback.outcomes = lines
        .into_iter()
        .map(|line| {
            let line_status = line.child_value("LineStatus");
            DeviceOutcome {
                identifiers: identifiers_in(line),
                status: line_outcome(line_status.as_deref()),
                line_status,
                fault: None,
                state: None,
                service_plan: None,
                ip_address: None,
                mdn: None,
                details: None,
            }
        })
        .collect();
    let count = |name: &str| {
        upload
            .child_value(name)
            .and_then(|value| value.parse().ok())
    };
    let package_error = callback
        .fault
        .as_ref()
        .map(|fault| {
            if fault.message.is_empty() {
                fault.code.clone()
            } else {
                fault.message.clone()
            }
        })
        .or_else(|| {
            [
                upload.child_value("Comment"),
                callback.comment.clone(),
                callback.status.clone(),
            ]
            .into_iter()
            .flatten()
            .find(|text| crate::catalog::catalog().is_upload_package_error(text))
        });
    callback.upload = Some(UploadSummary {
        account_name: upload.child_value("AccountName"),
        device_sku: upload.child_value("DeviceSku"),
        total_lines: count("TotalLineCount"),
        pending_lines: count("PendingLineCount"),
        success_lines: count("SuccessLineCount"),
        failed_lines: count("FailedLineCount"),
        package_error,
    });
}

/// Upload line status rule (spec §2). A line without a status has been received but not decided.
pub fn line_outcome(line_status: Option<&str>) -> OutcomeStatus {
    let Some(text) = line_status else {
        return OutcomeStatus::Accepted;
    };
    let text = text.trim().to_ascii_lowercase();
    if text == "line has been uploaded successfully" || text == "device upload successful" {
        OutcomeStatus::Succeeded
    } else if text == "device upload request submitted" {
        OutcomeStatus::Accepted
    } else {
        OutcomeStatus::Failed
    }
}

fn fault_of(fault: &Element) -> Option<Fault> {
    if !fault.is_present() {
        return None;
    }
    let detail = fault.child("detail").and_then(|detail| {
        detail
            .value()
            .map(str::to_owned)
            .or_else(|| details_of(detail.children.iter()).map(|json| json.to_string()))
    });
    Some(Fault {
        code: fault.child_value("faultcode").unwrap_or_default(),
        message: fault.child_value("faultstring").unwrap_or_default(),
        // The platform's documentation spells it "faultfactor".
        actor: fault
            .child_value("faultactor")
            .or_else(|| fault.child_value("faultfactor")),
        detail,
    })
}

/// `CarrierService.INPUT_INVALID.X` → `CarrierService`.
fn service_prefix(code: &str) -> &str {
    let code = code.rsplit(':').next().unwrap_or(code);
    code.split('.').next().unwrap_or(code)
}

/// Every (Kind, Identifier) pair under `element`, in document order, without duplicates.
pub(crate) fn identifiers_in(element: &Element) -> Vec<DeviceIdentifier> {
    let mut found = UniqueIdentifiers::default();
    collect_identifiers(element, &mut found);
    found.into_vec()
}

fn collect_identifiers(element: &Element, found: &mut UniqueIdentifiers) {
    if let (Some(kind), Some(id)) = (
        element.child_value("Kind"),
        element.child_value("Identifier"),
    ) {
        found.push(DeviceIdentifier::new(&kind, &id));
        return;
    }
    for child in &element.children {
        collect_identifiers(child, found);
    }
}

fn collect_named<'a>(element: &'a Element, name: &str, found: &mut Vec<&'a Element>) {
    for child in &element.children {
        if child.is(name) {
            found.push(child);
        } else {
            collect_named(child, name, found);
        }
    }
}

/// The present elements as a JSON object (leaf → string; repeated names → array), or `None` when
/// nothing is present.
fn details_of<'a>(elements: impl Iterator<Item = &'a Element>) -> Option<serde_json::Value> {
    let mut object = serde_json::Map::new();
    for element in elements.filter(|element| element.is_present()) {
        let value = if element.children.is_empty() {
            serde_json::Value::String(element.text.clone())
        } else {
            details_of(element.children.iter()).unwrap_or(serde_json::Value::Null)
        };
        match object.get_mut(&element.name) {
            Some(serde_json::Value::Array(values)) => values.push(value),
            Some(existing) => {
                let first = existing.take();
                *existing = serde_json::Value::Array(vec![first, value]);
            }
            None => {
                object.insert(element.name.clone(), value);
            }
        }
    }
    (!object.is_empty()).then_some(serde_json::Value::Object(object))
}

/// A digest of the callback's content that ignores what changes between re-deliveries
/// (`CallbackCount`, `MaxCallbackThreshold`) and the callback credentials (which may be rotated
/// while the platform is still retrying). Formatting, prefixes and namespaces do not count either.
fn content_digest(callback: &Element) -> [u8; 32] {
    fn feed(hasher: &mut Sha256, bytes: &[u8]) {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    fn walk(hasher: &mut Sha256, element: &Element, skip_text: bool) {
        feed(hasher, element.name.as_bytes());
        hasher.update([u8::from(element.nil)]);
        let counter = element.is("CallbackCount") || element.is("MaxCallbackThreshold");
        feed(
            hasher,
            if skip_text || counter {
                b""
            } else {
                element.text.as_bytes()
            },
        );
        hasher.update((element.children.len() as u64).to_le_bytes());
        for child in &element.children {
            walk(hasher, child, false);
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(b"xml-callback\0");
    feed(&mut hasher, callback.name.as_bytes());
    hasher.update((callback.children.len() as u64).to_le_bytes());
    for child in &callback.children {
        let credential = child.is("Username") || child.is("Password");
        walk(&mut hasher, child, credential);
    }
    hasher.finalize().into()
}
