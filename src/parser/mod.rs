//! Wire formats → domain types. Pure: no IO, no clock, no configuration.
//!
//! [`credentials`] comes first: the callback's username and password, read by one linear pass
//! that builds nothing, so that a wrong password is refused before any parsing work.
//! [`parse`] accepts every form of spec §2: the XML ones (SOAP envelope, `CallbackRequest1`
//! wrapper, bare `CallbackRequest`, `SmsCallbackRequest`) and the REST API's JSON. The first
//! non-blank byte decides which, so a missing or wrong content type does not matter. A body it cannot read fully comes back as
//! [`Parsed::Unreadable`] together with whatever a lenient scan recovered (its `RequestId` above
//! all), so that the HTTP edge can still quarantine it instead of losing it.

mod credentials;
mod json;
mod soap;
mod tree;

use std::collections::HashSet;

use sha2::{Digest, Sha256};

use crate::domain::{Callback, DeviceIdentifier, UnreadableBody};

pub use credentials::{Presented, credentials};
pub use soap::line_outcome;

/// Identifiers in the order first seen, each once. A search of the list while it is short (the
/// usual device has two or three), a set once it is not: a hostile body may list hundreds of
/// thousands, and every step of the parser stays linear in its input.
#[derive(Default)]
pub(crate) struct UniqueIdentifiers {
    ordered: Vec<DeviceIdentifier>,
    /// Filled only past [`UniqueIdentifiers::SHORT`] identifiers.
    seen: HashSet<DeviceIdentifier>,
}

impl UniqueIdentifiers {
    const SHORT: usize = 16;

    pub(crate) fn from_list(identifiers: Vec<DeviceIdentifier>) -> Self {
        let mut unique = Self::default();
        identifiers
            .into_iter()
            .for_each(|identifier| unique.push(identifier));
        unique
    }

    pub(crate) fn push(&mut self, identifier: DeviceIdentifier) {
        if self.ordered.len() < Self::SHORT {
            if !self.ordered.contains(&identifier) {
                self.ordered.push(identifier);
            }
            return;
        }
        if self.seen.is_empty() {
            self.seen.extend(self.ordered.iter().cloned());
        }
        if self.seen.insert(identifier.clone()) {
            self.ordered.push(identifier);
        }
    }

    pub(crate) fn into_vec(self) -> Vec<DeviceIdentifier> {
        self.ordered
    }
}

/// The result of reading a callback body.
#[derive(Debug)]
pub enum Parsed {
    Callback(Box<Callback>),
    Unreadable(Box<UnreadableBody>),
}

pub fn parse(body: &[u8]) -> Parsed {
    let json = looks_like_json(body);
    let parsed = if json {
        parse_json(body)
    } else {
        parse_xml(body)
    };
    match parsed {
        Ok(callback) => Parsed::Callback(Box::new(callback)),
        Err(reason) if json => Parsed::Unreadable(Box::new(scan_unreadable_json(body, reason))),
        Err(reason) => Parsed::Unreadable(Box::new(scan_unreadable(body, reason))),
    }
}

/// Whether the first non-blank byte (after a UTF-8 byte order mark) opens a JSON object.
pub(crate) fn looks_like_json(body: &[u8]) -> bool {
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    body.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'{')
}

fn parse_json(body: &[u8]) -> Result<Callback, String> {
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| format!("JSON error: {error}"))?;
    json::interpret(&value)
}

fn scan_unreadable_json(body: &[u8], reason: String) -> UnreadableBody {
    let text = String::from_utf8_lossy(body);
    UnreadableBody {
        reason,
        json: true,
        request_id: json::scan_string(&text, "requestId").filter(|id| !id.is_empty()),
        callback_count: json::scan_value(&text, "callbackCount")
            .and_then(|count| count.trim_matches('"').parse().ok()),
        dedup_key: json::raw_digest(&text),
    }
}

fn parse_xml(body: &[u8]) -> Result<Callback, String> {
    let text = std::str::from_utf8(body).map_err(|error| format!("body is not UTF-8: {error}"))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let document = tree::build(text, body.len() - text.len())?;
    let root = &document.root;
    let (form, callback) = soap::find_callback(root).ok_or_else(|| {
        format!(
            "root element <{}> holds no CallbackRequest",
            tree::shown(&root.name)
        )
    })?;
    if let Some(reason) = cut_short(callback) {
        return Err(reason);
    }
    let mut parsed = soap::interpret(form, callback);
    parsed.repairs = document.repairs;
    Ok(parsed)
}

/// Why a callback whose end was repaired may be missing content, if it may: the repair closes
/// what the body left open at its end only when nothing of the callback can be missing, that is
/// when only the callback element and its envelope were left open and the callback element
/// already holds its content (`Data`, or an MO SMS's `SmsMessage`). A body cut inside its content
/// is ambiguous (how much is missing?) and stays unreadable.
fn cut_short(callback: &tree::Element) -> Option<String> {
    if let Some(child) = callback.children.iter().find(|child| child.closed_at_end) {
        return Some(format!(
            "the body ends inside <{}>: the callback may be cut short",
            tree::shown(&child.name)
        ));
    }
    let content = if callback.is("SmsCallbackRequest") {
        "SmsMessage"
    } else {
        "Data"
    };
    (callback.closed_at_end && callback.child(content).is_none()).then(|| {
        format!(
            "the body ends inside <{}> before its <{content}>: the callback may be cut short",
            callback.name
        )
    })
}

/// Recovers what it can from a body that does not parse: the `RequestId` and `CallbackCount` (to
/// file it), and a dedup key. (Its credentials were read before the parse.)
fn scan_unreadable(body: &[u8], reason: String) -> UnreadableBody {
    let text = String::from_utf8_lossy(body);
    UnreadableBody {
        reason,
        json: false,
        request_id: scan_element(&text, "RequestId").filter(|id| !id.is_empty()),
        callback_count: scan_element(&text, "CallbackCount").and_then(|count| count.parse().ok()),
        dedup_key: raw_digest(body),
    }
}

/// Longest namespace prefix the lenient scan looks back over (`<soapenv:` and the like are short).
const MAX_PREFIX: usize = 64;

/// The trimmed text of the first element with this local name (any prefix), `""` for an empty
/// element. Tolerates everything after it being broken. Linear in `text`: each candidate looks
/// back at most [`MAX_PREFIX`] bytes, and only the one that is returned looks forward.
pub(crate) fn scan_element(text: &str, local_name: &str) -> Option<String> {
    let bytes = text.as_bytes();
    for (position, _) in text.match_indices(local_name) {
        if !opens_element_here(&bytes[..position]) {
            continue;
        }
        let after = &text[position + local_name.len()..];
        // A tag ends at the first `>`; a name that continues is another element.
        let tag_end = match after.as_bytes().first() {
            Some(b'>') => 0,
            // Searched once: the first candidate that gets here is the answer.
            Some(b' ' | b'\t' | b'\r' | b'\n' | b'/') => after.find('>')?,
            _ => continue, // a longer name that starts the same, such as <UsernameHint>
        };
        if after[..tag_end].ends_with('/') {
            return Some(String::new());
        }
        let content = &after[tag_end + 1..];
        let value = &content[..content.find('<').unwrap_or(content.len())];
        return Some(unescape_basic(value.trim()));
    }
    None
}

/// Whether `before` ends with `<` or `<prefix:`, the prefix a short XML name.
fn opens_element_here(before: &[u8]) -> bool {
    match before.last() {
        Some(b'<') => true,
        Some(b':') => {
            let head = &before[..before.len() - 1];
            let window = &head[head.len().saturating_sub(MAX_PREFIX)..];
            window
                .iter()
                .rposition(|&byte| byte == b'<')
                .is_some_and(|at| {
                    let prefix = &window[at + 1..];
                    !prefix.is_empty()
                        && prefix
                            .iter()
                            .all(|&byte| byte.is_ascii_alphanumeric() || b"_-.".contains(&byte))
                })
        }
        _ => false,
    }
}

fn unescape_basic(value: &str) -> String {
    if !value.contains('&') {
        return value.to_owned();
    }
    value
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// A digest of the raw body with the values of `CallbackCount` and `MaxCallbackThreshold` left
/// out, so that re-deliveries of one unreadable body share a key.
fn raw_digest(body: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"raw-body\0");
    let mut rest = body;
    while let Some(close) = rest.iter().position(|&byte| byte == b'>') {
        let (tag, after) = rest.split_at(close + 1);
        hasher.update(tag);
        let name = &tag[..tag.len() - 1];
        rest = if name.ends_with(b"CallbackCount") || name.ends_with(b"MaxCallbackThreshold") {
            let value_end = after
                .iter()
                .position(|&byte| byte == b'<')
                .unwrap_or(after.len());
            &after[value_end..]
        } else {
            after
        };
    }
    hasher.update(rest);
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        CallbackForm, CallbackKind, DeviceIdentifier, DeviceMessage, MessageChannel, Operation,
        OutcomeStatus,
    };

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|error| panic!("{path}: {error}"))
    }

    fn callback(name: &str) -> Callback {
        match parse(&fixture(name)) {
            Parsed::Callback(callback) => *callback,
            Parsed::Unreadable(unreadable) => panic!("{name} did not parse: {}", unreadable.reason),
        }
    }

    fn id(kind: &str, identifier: &str) -> DeviceIdentifier {
        DeviceIdentifier::new(kind, identifier)
    }

    #[test]
    fn seed_001_upload_callback_in_its_wrapper() {
        let upload = callback("upload_seed001.xml");
        assert_eq!(upload.form, CallbackForm::Wrapper);
        assert_eq!(upload.kind, CallbackKind::UploadDevices);
        assert_eq!(upload.operation, Operation::UploadDevices);
        assert_eq!(
            upload.request_id.as_deref(),
            Some("5afbb4c7-99dc-49a7-8341-7406b7d6f3d3")
        );
        assert_eq!(
            (upload.callback_count, upload.max_callback_threshold),
            (Some(1), Some(4))
        );
        assert_eq!(upload.status, None, "xsi:nil Status is absent");
        assert_eq!(upload.outcomes.len(), 2);
        let first = &upload.outcomes[0];
        assert_eq!(
            first.identifiers,
            vec![
                id("ICCID", "18072019672556477006"),
                id("IMEI", "180720196786706")
            ]
        );
        assert_eq!(first.status, OutcomeStatus::Succeeded);
        assert_eq!(
            first.line_status.as_deref(),
            Some("Line has been uploaded successfully")
        );
        let summary = upload.upload.expect("upload summary");
        assert_eq!(summary.account_name.as_deref(), Some("suvenduactiot"));
        assert_eq!(summary.device_sku.as_deref(), Some("test"));
        assert_eq!(
            (
                summary.total_lines,
                summary.pending_lines,
                summary.success_lines,
                summary.failed_lines
            ),
            (Some(2), Some(0), Some(2), Some(0))
        );
        assert_eq!(summary.package_error, None);
    }

    #[test]
    fn seed_004_activation_in_a_soap_envelope() {
        let activation = callback("activate_seed004.xml");
        assert_eq!(activation.form, CallbackForm::SoapEnvelope);
        assert_eq!(activation.kind, CallbackKind::CarrierService);
        assert_eq!(activation.operation, Operation::Activate);
        assert_eq!(activation.status.as_deref(), Some("Success"));
        assert_eq!(activation.fault, None);
        let outcome = &activation.outcomes[..];
        assert_eq!(outcome.len(), 1);
        let outcome = &outcome[0];
        assert_eq!(outcome.status, OutcomeStatus::Succeeded);
        assert_eq!(
            outcome.identifiers,
            vec![
                id("MEID", "A1000000444461"),
                id("MDN", "5096306081"),
                id("MIN", "2345958183")
            ]
        );
        assert_eq!(outcome.mdn.as_deref(), Some("5096306081"));
        assert_eq!(outcome.ip_address.as_deref(), Some("10.224.48.88"));
        assert_eq!(outcome.state.as_deref(), Some("Active"));
        assert_eq!(outcome.service_plan.as_deref(), Some("84638"));
        let details = outcome.details.as_ref().expect("details");
        assert_eq!(
            details["DeviceCredential"]["Username"],
            "5096306081@vzw3g.com"
        );
        assert!(
            details.get("StateName").is_none(),
            "nil fields are left out"
        );
    }

    #[test]
    fn a_fault_fails_the_device_and_names_the_carrier_service() {
        let failed = callback("activate_failed.xml");
        assert_eq!(failed.kind, CallbackKind::CarrierService);
        let outcome = &failed.outcomes[0];
        assert_eq!(outcome.status, OutcomeStatus::Failed);
        assert_eq!(outcome.identifiers, vec![id("MEID", "A1000000444462")]);
        let fault = outcome.fault.as_ref().expect("fault");
        assert_eq!(
            fault.code,
            "CarrierService.INPUT_INVALID.ServicePlan.NotFound"
        );
        assert_eq!(fault.message, "The service plan was not found.");
    }

    #[test]
    fn a_bare_callback_request_with_a_deactivation() {
        let deactivation = callback("deactivate_bare.xml");
        assert_eq!(deactivation.form, CallbackForm::Bare);
        assert_eq!(deactivation.operation, Operation::Deactivate);
        let outcome = &deactivation.outcomes[0];
        assert_eq!(
            outcome.identifiers,
            vec![
                id("ICCID", "89148000000800000001"),
                id("IMEI", "990000862471854"),
                id("MDN", "5096300001")
            ]
        );
        assert_eq!(outcome.state.as_deref(), Some("Deactive"));
    }

    #[test]
    fn notification_kinds_get_their_labels() {
        let sms = callback("sms_mo.xml");
        assert_eq!(
            (sms.kind, sms.operation),
            (CallbackKind::SmsMo, Operation::SmsMo)
        );
        assert_eq!(sms.request_id, None);
        assert_eq!(sms.devices.len(), 2);
        assert_eq!(
            sms.details.as_ref().expect("details")["SmsMessage"]["Message"],
            "TEMP=21.5;BATT=87"
        );

        let promo = callback("promo_change.xml");
        assert_eq!(promo.kind, CallbackKind::PromoChange);
        assert_eq!(
            promo.details.as_ref().expect("details")["PromoChange"]["Change"],
            "PromoApplied"
        );
        assert_eq!(promo.outcomes[0].status, OutcomeStatus::Succeeded);

        let resume = callback("resume_tracking.xml");
        assert_eq!(resume.kind, CallbackKind::ResumeTracking);
        assert!(
            resume
                .comment
                .as_deref()
                .unwrap_or_default()
                .starts_with("Device will resume")
        );
        assert!(
            resume.outcomes.is_empty(),
            "a comment alone says nothing about success"
        );
    }

    #[test]
    fn re_deliveries_share_a_dedup_key_and_other_content_does_not() {
        let body = String::from_utf8(fixture("activate_seed004.xml")).unwrap();
        let first = callback("activate_seed004.xml").dedup_key;
        let retry = body
            .replace("<CallbackCount>1<", "<CallbackCount>3<")
            .replace("<MaxCallbackThreshold>4<", "<MaxCallbackThreshold>5<");
        let Parsed::Callback(retry) = parse(retry.as_bytes()) else {
            panic!("retry did not parse")
        };
        assert_eq!(retry.dedup_key, first);
        let other_device = body.replace("A1000000444461", "A1000000444499");
        let Parsed::Callback(other) = parse(other_device.as_bytes()) else {
            panic!("did not parse")
        };
        assert_ne!(other.dedup_key, first);
    }

    fn unreadable(body: &[u8]) -> UnreadableBody {
        match parse(body) {
            Parsed::Unreadable(unreadable) => *unreadable,
            Parsed::Callback(callback) => panic!("parsed, with repairs {:?}", callback.repairs),
        }
    }

    fn seed_004() -> String {
        String::from_utf8(fixture("activate_seed004.xml")).unwrap()
    }

    #[test]
    fn the_malformed_seed_004_example_is_read_as_repaired_and_says_what_was_repaired() {
        let body = fixture("activate_seed004_malformed.xml");
        let at = String::from_utf8(body.clone())
            .unwrap()
            .find("</MaxCallbackThreshold/>")
            .unwrap();

        let repaired = callback("activate_seed004_malformed.xml");

        assert_eq!(
            repaired.repairs,
            vec![format!(
                "`</MaxCallbackThreshold/>` read as `</MaxCallbackThreshold>` at byte {at}"
            )]
        );
        let well_formed = callback("activate_seed004.xml");
        assert!(well_formed.repairs.is_empty());
        assert_eq!(repaired.operation, Operation::Activate);
        assert_eq!(repaired.outcomes, well_formed.outcomes);
        assert_eq!(repaired.max_callback_threshold, Some(4));
        assert_eq!(
            repaired.dedup_key, well_formed.dedup_key,
            "a later well-formed re-delivery of the message is its duplicate"
        );
        let retry = String::from_utf8(body)
            .unwrap()
            .replace("<CallbackCount>1<", "<CallbackCount>2<");
        let Parsed::Callback(retry) = parse(retry.as_bytes()) else {
            panic!("the re-delivery did not parse")
        };
        assert_eq!(retry.dedup_key, repaired.dedup_key);
    }

    #[test]
    fn a_stray_end_tag_is_ignored_and_reported() {
        let body = seed_004().replace(
            "<Status>Success</Status>",
            "<Status>Success</Status></Stray >",
        );
        let at = body.find("</Stray >").unwrap();

        let Parsed::Callback(repaired) = parse(body.as_bytes()) else {
            panic!("did not parse")
        };

        assert_eq!(
            repaired.repairs,
            vec![format!("stray `</Stray>` at byte {at} ignored")]
        );
        assert_eq!(repaired.status.as_deref(), Some("Success"));
        assert_eq!(
            repaired.dedup_key,
            callback("activate_seed004.xml").dedup_key
        );
    }

    #[test]
    fn envelope_elements_left_open_at_the_end_are_closed_and_reported() {
        let whole = seed_004();
        let cut = &whole[..whole.find("</s:Body>").unwrap()];

        let Parsed::Callback(repaired) = parse(cut.as_bytes()) else {
            panic!("did not parse")
        };

        assert_eq!(
            repaired.repairs,
            vec![
                format!(
                    "`<s:Body>` left open: closed at the end of the body (byte {})",
                    cut.len()
                ),
                format!(
                    "`<s:Envelope>` left open: closed at the end of the body (byte {})",
                    cut.len()
                ),
            ]
        );
        assert_eq!(repaired.outcomes[0].status, OutcomeStatus::Succeeded);
        let without_callback_end = &whole[..whole.find("</CallbackRequest>").unwrap()];
        let Parsed::Callback(repaired) = parse(without_callback_end.as_bytes()) else {
            panic!("a callback whose Data is complete did not parse")
        };
        assert_eq!(repaired.repairs.len(), 3);
    }

    #[test]
    fn a_body_that_ends_inside_its_data_or_a_value_stays_unreadable() {
        let whole = seed_004();
        for (cut_before, reason) in [
            ("</MaxCallbackThreshold>", "inside the text"),
            ("<CallbackCount>", "<Data>"),
            ("</Data>\n      </Data>", "<Data>"),
        ] {
            let cut = &whole[..whole.find(cut_before).unwrap()];
            let unreadable = unreadable(cut.as_bytes());
            assert!(
                unreadable.reason.contains(reason),
                "cut before {cut_before:?}: {}",
                unreadable.reason
            );
            assert_eq!(
                unreadable.request_id.as_deref(),
                Some("2c90bd28-ece4-42ef-9f02-7e3bd4fbff33")
            );
        }
    }

    #[test]
    fn an_ambiguous_body_stays_unreadable_with_its_reason_and_request_id() {
        // `<State>Active</Stat>`: which element was meant to close is a guess.
        let body = fixture("activate_seed004_ambiguous.xml");

        let unreadable = unreadable(&body);

        assert!(
            unreadable.reason.starts_with("XML error"),
            "{}",
            unreadable.reason
        );
        assert!(
            unreadable.reason.contains("</Activate>"),
            "{}",
            unreadable.reason
        );
        assert_eq!(
            unreadable.request_id.as_deref(),
            Some("2c90bd28-ece4-42ef-9f02-7e3bd4fbff33")
        );
        assert_eq!(unreadable.callback_count, Some(1));
        let retry = String::from_utf8(body)
            .unwrap()
            .replace("<CallbackCount>1<", "<CallbackCount>2<");
        assert_eq!(
            unreadable.dedup_key,
            super::tests::unreadable(retry.as_bytes()).dedup_key
        );
    }

    #[test]
    fn a_body_that_needs_too_many_repairs_is_not_trusted() {
        let strays = "</Stray>".repeat(tree::MAX_REPAIRS + 1);
        let body = seed_004().replace(
            "<Status>Success</Status>",
            &format!("<Status>Success</Status>{strays}"),
        );

        let unreadable = unreadable(body.as_bytes());

        assert!(
            unreadable.reason.contains("repairs"),
            "{}",
            unreadable.reason
        );
    }

    #[test]
    fn garbage_is_unreadable() {
        for garbage in [
            &b"hello world"[..],
            b"\xff\xfe\x00garbage",
            b"{\"json\": true",
            b"<html><body>hi</body></html>",
        ] {
            let Parsed::Unreadable(unreadable) = parse(garbage) else {
                panic!("parsed garbage")
            };
            assert_eq!(unreadable.request_id, None);
        }
    }

    #[test]
    fn the_scan_finds_prefixed_and_empty_elements_but_not_longer_names() {
        let text =
            "<a:UsernameHint>x</a:UsernameHint><a:Username> ops &amp; co </a:Username><Password/>";
        assert_eq!(scan_element(text, "Username").as_deref(), Some("ops & co"));
        assert_eq!(scan_element(text, "Password").as_deref(), Some(""));
        assert_eq!(scan_element(text, "RequestId"), None);
    }

    #[test]
    fn the_rest_api_json_example_is_a_change_identifier_outcome() {
        let change = callback("json_change_identifier.json");
        assert_eq!(change.form, CallbackForm::Json);
        assert_eq!(
            (change.kind, change.operation),
            (
                CallbackKind::CarrierService,
                Operation::ChangeDeviceIdentifier
            )
        );
        assert_eq!(
            change.request_id.as_deref(),
            Some("a28892ea-6503-4aa7-bfa2-4cd45d42f61b")
        );
        assert_eq!(
            (change.callback_count, change.max_callback_threshold),
            (Some(1), Some(4))
        );
        let outcome = &change.outcomes[0];
        assert_eq!(outcome.status, OutcomeStatus::Succeeded);
        assert_eq!(
            outcome.identifiers,
            vec![id("ESN", "22211315718"), id("ICCID", "A1000001999990")]
        );
        assert_eq!(outcome.service_plan.as_deref(), Some("M2M_4G"));
    }

    #[test]
    fn a_json_fault_fails_the_device_and_unknown_keys_are_ignored() {
        let failed = callback("json_fault.json");
        let outcome = &failed.outcomes[0];
        assert_eq!(outcome.status, OutcomeStatus::Failed);
        assert_eq!(
            outcome.identifiers,
            vec![
                id("IMEI", "990000862471854"),
                id("ICCID", "89148000000800000001")
            ]
        );
        assert_eq!(
            outcome.fault.as_ref().map(|fault| fault.code.as_str()),
            Some("UnifiedWebService.REQUEST_FAILED.UnexpectedError")
        );
    }

    #[test]
    fn json_re_deliveries_share_a_dedup_key_whatever_the_key_order() {
        let first = callback("json_change_identifier.json").dedup_key;
        let retry = r#"{"maxCallbackThreshold": 4, "callbackCount": 3, "status": "Success",
            "deviceResponse": {"changeIdentifierResponse": {"servicePlan": "M2M_4G",
                "deviceIds": [{"kind": "iccid", "id": "A1000001999990"}]}},
            "deviceIds": [{"kind": "ESN", "id": "22211315718"}],
            "requestId": "a28892ea-6503-4aa7-bfa2-4cd45d42f61b", "password": "", "username": ""}"#;
        let Parsed::Callback(retry) = parse(retry.as_bytes()) else {
            panic!("retry did not parse")
        };
        assert_eq!(retry.dedup_key, first);
        let other = String::from_utf8(fixture("json_change_identifier.json"))
            .unwrap()
            .replace("M2M_4G", "M2M_5G");
        let Parsed::Callback(other) = parse(other.as_bytes()) else {
            panic!("did not parse")
        };
        assert_ne!(other.dedup_key, first);
    }

    #[test]
    fn malformed_json_keeps_its_request_id_for_quarantine() {
        let body = fixture("json_malformed.json");
        let Parsed::Unreadable(unreadable) = parse(&body) else {
            panic!("parsed malformed JSON")
        };
        assert!(unreadable.json);
        assert_eq!(
            unreadable.request_id.as_deref(),
            Some("7f1f0c1e-2d44-4a8c-8d21-5b8f5e3a9c01")
        );
        assert_eq!(unreadable.callback_count, Some(1));
        let retry = String::from_utf8(body)
            .unwrap()
            .replace("\"callbackCount\": 1", "\"callbackCount\": 2");
        let Parsed::Unreadable(retry) = parse(retry.as_bytes()) else {
            panic!("parsed")
        };
        assert_eq!(retry.dedup_key, unreadable.dedup_key);
    }

    /// The fastest of five runs of `work`, in seconds (the least disturbed by a busy machine).
    fn fastest(work: impl Fn()) -> f64 {
        (0..5)
            .map(|_| {
                let started = std::time::Instant::now();
                work();
                started.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    }

    /// How much longer `body(4n)` takes to parse than `body(n)`: about 4 when linear, 16 when
    /// quadratic.
    fn growth(body: impl Fn(usize) -> String, n: usize) -> f64 {
        let (small, large) = (body(n), body(4 * n));
        let parse_all = |text: &str| {
            let parsed = parse(text.as_bytes());
            assert!(matches!(parsed, Parsed::Callback(_)));
        };
        fastest(|| parse_all(&large)) / fastest(|| parse_all(&small))
    }

    #[test]
    fn parsing_is_linear_in_the_number_of_identifiers() {
        let json = |count: usize| {
            let ids: Vec<String> = (0..count)
                .map(|index| format!(r#"{{"id":"35{index:013}","kind":"imei"}}"#))
                .collect();
            format!(
                r#"{{"username":"u","password":"p","requestId":"r","deviceIds":[{}],
                    "deviceResponse":{{"activateResponse":{{"deviceIds":[{}]}}}}}}"#,
                ids.join(","),
                ids.join(",")
            )
        };
        let soap = |count: usize| {
            let ids: String = (0..count)
                .map(|index| {
                    format!("<DeviceIdentifier><Kind>IMEI</Kind><Identifier>35{index:013}</Identifier></DeviceIdentifier>")
                })
                .collect();
            format!(
                "<CallbackRequest><Username>u</Username><Password>p</Password><RequestId>r</RequestId>\
                 <Device>{ids}</Device><Data><CarrierService><ChangeDeviceState><Activate>\
                 <DeviceIdentifierCollection>{ids}</DeviceIdentifierCollection>\
                 </Activate></ChangeDeviceState></CarrierService></Data></CallbackRequest>"
            )
        };
        // The repair path: the seed 004 malformation and the envelope's end missing.
        let repaired = |count: usize| {
            let body = soap(count).replace(
                "</Data></CallbackRequest>",
                "<MaxCallbackThreshold>4</MaxCallbackThreshold/></Data>",
            );
            format!("<s:Envelope><s:Body>{body}")
        };
        let Parsed::Callback(small) = parse(repaired(3).as_bytes()) else {
            panic!("the repair body did not parse")
        };
        assert_eq!(small.repairs.len(), 4, "{:?}", small.repairs);
        for (name, ratio) in [
            ("json", growth(json, 5_000)),
            ("soap", growth(soap, 5_000)),
            ("repaired soap", growth(repaired, 5_000)),
        ] {
            assert!(
                ratio < 10.0, // linear is about 4, quadratic about 16; the margin is for a busy machine
                "{name}: 4x the identifiers took {ratio:.1}x as long"
            );
        }
    }

    #[test]
    fn the_lenient_scan_is_linear_whatever_the_body() {
        // Prefixed names without an opening bracket made every match look back to the start;
        // unclosed tags made every match search forward to the same end.
        let scan = |text: &str| {
            assert!(matches!(parse(text.as_bytes()), Parsed::Unreadable(_)));
        };
        for (shape, ending) in [("x:Username ", ""), ("<Username ", ">")] {
            let body = |count: usize| format!("{}{ending}", shape.repeat(count));
            let (small, large) = (body(20_000), body(80_000));
            let ratio = fastest(|| scan(&large)) / fastest(|| scan(&small));
            assert!(
                ratio < 10.0,
                "{shape:?}: 4x the body took {ratio:.1}x as long"
            );
        }
    }

    #[test]
    fn upload_line_statuses() {
        assert_eq!(
            line_outcome(Some("Device upload successful")),
            OutcomeStatus::Succeeded
        );
        assert_eq!(
            line_outcome(Some("Line has been uploaded successfully ")),
            OutcomeStatus::Succeeded
        );
        assert_eq!(
            line_outcome(Some("Device upload request submitted")),
            OutcomeStatus::Accepted
        );
        assert_eq!(
            line_outcome(Some("IMEI (deviceId) is invalid")),
            OutcomeStatus::Failed
        );
    }

    #[test]
    fn a_package_level_upload_error_is_recorded() {
        let body = String::from_utf8(fixture("upload_seed001.xml"))
            .unwrap()
            .replace(
                "<Comment xsi:nil=\"true\" />",
                "<Comment>Device SKU is not Certified</Comment>",
            );
        let Parsed::Callback(upload) = parse(body.as_bytes()) else {
            panic!("did not parse")
        };
        let summary = upload.upload.as_ref().expect("summary");
        assert_eq!(
            summary.package_error.as_deref(),
            Some("Device SKU is not Certified")
        );
    }

    #[test]
    fn an_mo_sms_is_a_device_message() {
        let sms = callback("sms_mo.xml");

        assert_eq!(
            sms.messages,
            vec![DeviceMessage {
                identifiers: vec![id("MDN", "5096306081"), id("MEID", "A1000000444461")],
                channel: MessageChannel::Sms,
                payload: Some("TEMP=21.5;BATT=87".to_owned()),
                text: Some("TEMP=21.5;BATT=87".to_owned()),
                sent_at: Some("2026-11-20T10:15:00Z".to_owned()),
            }]
        );
        assert!(sms.outcomes.is_empty());
    }

    #[test]
    fn a_nidd_uplink_is_a_device_message_with_every_identifier_of_the_line() {
        let uplink = callback("json_nidd_uplink.json");

        assert_eq!(
            (uplink.kind, uplink.operation),
            (CallbackKind::Nidd, Operation::NiddMo)
        );
        assert_eq!(
            uplink.messages,
            vec![DeviceMessage {
                identifiers: vec![
                    id("IMEI", "990000862471854"),
                    id("IMSI", "311480000000001"),
                    id("MDN", "5096300001"),
                    id("MIN", "5096300001"),
                    id("MSISDN", "15096300001"),
                    id("ICCID", "89148000000800000001"),
                ],
                channel: MessageChannel::Nidd,
                payload: Some("VEVNUD0yMS41O0JBVFQ9ODcK".to_owned()),
                text: Some("TEMP=21.5;BATT=87\n".to_owned()),
                sent_at: None,
            }]
        );
        assert!(
            uplink.outcomes.is_empty(),
            "an uplink is no outcome of a job"
        );
        assert_eq!(uplink.max_callback_threshold, Some(2));
        let details = uplink.details.as_ref().expect("details");
        assert_eq!(
            details["niddMONotificationResponse"]["accountName"],
            "0000123456-00001"
        );
        assert!(
            details["niddMONotificationResponse"]
                .get("message")
                .is_none(),
            "the payload is kept once, in the message"
        );
    }

    #[test]
    fn a_nidd_uplink_that_is_not_text_keeps_its_payload_only() {
        let body = String::from_utf8(fixture("json_nidd_uplink.json")).unwrap();
        // 0x00 0x01 0xff 0xfe: not UTF-8; "AAEC": 0x00 0x01 0x02, UTF-8 but control characters;
        // "not base64!" is not base64 at all.
        for payload in ["AAH//g==", "AAEC", "not base64!"] {
            let body = body.replace("VEVNUD0yMS41O0JBVFQ9ODcK", payload);
            let Parsed::Callback(uplink) = parse(body.as_bytes()) else {
                panic!("{payload} did not parse")
            };
            let message = &uplink.messages[0];
            assert_eq!(message.payload.as_deref(), Some(payload));
            assert_eq!(message.text, None, "{payload}");
        }
        let unpadded = body.replace("VEVNUD0yMS41O0JBVFQ9ODcK", "aGk");
        let Parsed::Callback(uplink) = parse(unpadded.as_bytes()) else {
            panic!("did not parse")
        };
        assert_eq!(uplink.messages[0].text.as_deref(), Some("hi"));
    }

    #[test]
    fn nidd_delivery_reports_are_outcomes_of_the_downlink_job() {
        let queued = callback("json_nidd_mt_queued.json");
        assert_eq!(
            (queued.kind, queued.operation),
            (CallbackKind::Nidd, Operation::Nidd)
        );
        let outcome = &queued.outcomes[0];
        assert_eq!(
            outcome.status,
            OutcomeStatus::Accepted,
            "queued is not a failure"
        );
        assert_eq!(outcome.line_status.as_deref(), Some("Queued"));
        assert_eq!(outcome.fault, None);
        assert_eq!(
            outcome.identifiers,
            vec![id("IMEI", "990000862471854"), id("MDN", "5096300001")]
        );
        assert_eq!(
            outcome.details.as_ref().expect("details")["reason"],
            "Buffered, device not reachable"
        );
        assert!(queued.messages.is_empty());

        let delivered = callback("json_nidd_mt_delivered.json");
        assert_eq!(delivered.outcomes[0].status, OutcomeStatus::Succeeded);
        assert_eq!(delivered.outcomes[0].line_status, None);
        assert_ne!(delivered.dedup_key, queued.dedup_key);

        let failed = callback("json_nidd_mt_failed.json");
        let outcome = &failed.outcomes[0];
        assert_eq!(outcome.status, OutcomeStatus::Failed);
        let fault = outcome.fault.as_ref().expect("fault");
        assert_eq!(fault.code, "NiddService.DeliveryFailed");
        assert_eq!(fault.message, "Timeout, could not deliver data");
    }

    #[test]
    fn a_nidd_config_result_is_an_outcome_of_its_own_operation() {
        let config = callback("json_nidd_config.json");

        assert_eq!(
            (config.kind, config.operation),
            (CallbackKind::Nidd, Operation::NiddConfig)
        );
        let outcome = &config.outcomes[0];
        assert_eq!(outcome.status, OutcomeStatus::Succeeded);
        assert_eq!(
            outcome.identifiers,
            vec![id("IMEI", "990000862471854"), id("IMSI", "311480000000001")]
        );
    }

    #[test]
    fn a_nidd_response_with_more_than_one_result_is_unreadable() {
        let body = String::from_utf8(fixture("json_nidd_mt_queued.json"))
            .unwrap()
            .replace(
                "\"niddMTDeliveryResponse\"",
                "\"niddConfigResponse\": {\"accountName\": \"x\"}, \"niddMTDeliveryResponse\"",
            );

        let unreadable = unreadable(body.as_bytes());

        assert!(unreadable.json);
        assert!(
            unreadable.reason.contains("niddResponse"),
            "{}",
            unreadable.reason
        );
        assert_eq!(
            unreadable.request_id.as_deref(),
            Some("c3b1a7d2-5e4f-4a60-8b19-7d2e6f0a3c21")
        );
    }

    #[test]
    fn rest_device_responses_name_their_operation() {
        for (name, operation) in [
            ("json_activate.json", Operation::Activate),
            ("json_deactivate.json", Operation::Deactivate),
            ("json_suspend.json", Operation::Suspend),
            ("json_restore.json", Operation::Restore),
        ] {
            let parsed = callback(name);
            assert_eq!(
                (parsed.kind, parsed.operation),
                (CallbackKind::CarrierService, operation),
                "{name}"
            );
            assert_eq!(
                parsed.outcomes[0].status,
                OutcomeStatus::Succeeded,
                "{name}"
            );
        }
        let activation = callback("json_activate.json");
        let outcome = &activation.outcomes[0];
        assert_eq!(
            outcome.identifiers,
            vec![
                id("ICCID", "89148000000800000002"),
                id("IMEI", "990000862471856"),
                id("MDN", "5096300002"),
                id("MSISDN", "15096300002"),
                id("MIN", "5096300002"),
            ]
        );
        assert_eq!(outcome.mdn.as_deref(), Some("5096300002"));
        assert_eq!(outcome.ip_address.as_deref(), Some("10.224.48.90"));
        assert_eq!(outcome.state.as_deref(), Some("active"));
        assert_eq!(outcome.service_plan.as_deref(), Some("M2MPlan"));
    }

    #[test]
    fn pending_and_queued_rest_statuses_are_accepted_not_failed() {
        let pending = callback("json_pending.json");
        let outcome = &pending.outcomes[0];
        assert_eq!(pending.operation, Operation::ChangeDeviceIdentifier);
        assert_eq!(outcome.status, OutcomeStatus::Accepted);
        assert_eq!(outcome.line_status.as_deref(), Some("Pending"));

        let body = String::from_utf8(fixture("json_pending.json"))
            .unwrap()
            .replace("\"Pending\"", "\"queued\"");
        let Parsed::Callback(queued) = parse(body.as_bytes()) else {
            panic!("did not parse")
        };
        assert_eq!(queued.outcomes[0].status, OutcomeStatus::Accepted);
        assert_eq!(queued.outcomes[0].line_status.as_deref(), Some("queued"));
    }

    #[test]
    fn a_rest_fault_is_labelled_by_the_service_its_code_names() {
        let carrier = callback("json_fault_prefixed.json");
        assert_eq!(carrier.kind, CallbackKind::CarrierService);
        let outcome = &carrier.outcomes[0];
        assert_eq!(outcome.status, OutcomeStatus::Failed);
        assert_eq!(
            outcome.fault.as_ref().map(|fault| fault.code.as_str()),
            Some("UnifiedWebService.REQUEST_FAILED.DeviceAlreadyActive")
        );

        let nidd = callback("json_nidd_fault.json");
        assert_eq!(nidd.kind, CallbackKind::Nidd);
        assert_eq!(nidd.outcomes[0].status, OutcomeStatus::Failed);
    }

    #[test]
    fn a_rest_callback_of_an_undocumented_shape_is_stored_as_other() {
        let body = r#"{"username": "", "password": "", "requestId": "r-usage",
            "deviceIds": [{"id": "990000862471854", "kind": "imei"}],
            "usageResponse": {"bytesUsed": 1024}, "callbackCount": 1}"#;
        let Parsed::Callback(other) = parse(body.as_bytes()) else {
            panic!("did not parse")
        };
        assert_eq!(
            (other.kind, other.operation),
            (CallbackKind::Other, Operation::Other)
        );
        assert!(other.outcomes.is_empty() && other.messages.is_empty());
    }
}
