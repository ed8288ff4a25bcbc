//! Jobs: one platform request (keyed by `RequestId`) and what its callbacks add up to (spec §5).
//!
//! Pure: the state rule and registration validation. Storage applies them inside the transaction
//! that stores a callback, so a job's state is never behind its outcomes.

use serde::{Deserialize, Serialize};

use crate::domain::{DeviceIdentifier, Operation};

/// The platform accepts at most this many devices in one request.
pub const MAX_DEVICES: usize = 10_000;
/// Longest accepted per-job timeout: a week. The platform gives up on a callback within a day.
pub const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;
/// The longest RequestId a job is registered under (the platform's are 36-character GUIDs). The
/// one rule for longer ones: the registration API refuses them; the callback port still stores
/// and correlates such a callback under its id as sent (refusing it would lose it, the platform
/// retries only a few times), and its log lines show the id cut to this many characters with its
/// full length (`telemetry::Wire`).
pub const MAX_REQUEST_ID_CHARS: usize = 128;
/// Device identifier kinds the platform uses.
pub const DEVICE_KINDS: &[&str] = &[
    "ESN", "ICCID", "IMEI", "MDN", "MEID", "MIN", "MSISDN", "IMSI", "EID",
];

crate::domain::label_enum! {
    /// Where a job stands.
    JobState {
        /// Registered; nothing reported yet.
        Pending => "pending",
        InProgress => "in_progress",
        /// Every expected device reported, all succeeded.
        Completed => "completed",
        /// Every expected device reported, some failed.
        CompletedWithErrors => "completed_with_errors",
        /// A package-level error, or every device failed.
        Failed => "failed",
        /// The deadline passed with devices still unreported.
        TimedOut => "timed_out",
    }
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Pending | JobState::InProgress)
    }
}

/// Everything the state rule looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobFacts {
    /// From registration (`expected_devices` or the device list).
    pub registered_expected: Option<u64>,
    /// Devices (or upload lines) with at least one outcome, by their latest status.
    pub reported: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub accepted: u64,
    /// The latest upload report, for uploads.
    pub upload: Option<UploadCounts>,
    pub package_error: bool,
    /// First deliveries that could not be read: what they reported is unknown.
    pub quarantined: u64,
    pub deadline_passed: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadCounts {
    pub total: Option<u64>,
    pub pending: Option<u64>,
    pub success: Option<u64>,
    pub failed: Option<u64>,
}

impl JobFacts {
    /// From registration, else an upload's `TotalLineCount`.
    pub fn expected(&self) -> Option<u64> {
        self.registered_expected
            .or_else(|| self.upload.and_then(|upload| upload.total))
    }
}

/// The state rule of spec §5.
///
/// A job whose expected device count is unknown (an unregistered, non-upload job) cannot know it
/// is complete; once its deadline passes, the platform has stopped sending, so it is closed on
/// what it received.
pub fn compute_state(facts: &JobFacts) -> JobState {
    if facts.package_error {
        return JobState::Failed;
    }
    let upload = facts.upload.unwrap_or_default();
    let upload_reports_done = upload.pending == Some(0)
        && upload
            .total
            .is_some_and(|total| upload.success.unwrap_or(0) + upload.failed.unwrap_or(0) >= total);
    let finished = match facts.expected() {
        Some(expected) => facts.reported >= expected || upload_reports_done,
        None => facts.deadline_passed && facts.reported > 0,
    };
    if finished {
        let any_failed = facts.failed > 0 || upload.failed.unwrap_or(0) > 0;
        let any_succeeded = facts.succeeded + facts.accepted > 0 || upload.success.unwrap_or(0) > 0;
        return match (any_failed, any_succeeded) {
            // A delivery that could not be read may hold a failure: not `completed` until
            // `reprocess` reads it.
            (false, _) if facts.quarantined > 0 => JobState::CompletedWithErrors,
            (false, _) => JobState::Completed,
            (true, false) => JobState::Failed,
            (true, true) => JobState::CompletedWithErrors,
        };
    }
    if facts.deadline_passed {
        JobState::TimedOut
    } else if facts.reported == 0 {
        JobState::Pending
    } else {
        JobState::InProgress
    }
}

/// `POST /api/v1/jobs` as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationRequest {
    pub request_id: String,
    pub operation: String,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub expected_devices: Option<u64>,
    #[serde(default)]
    pub devices: Option<Vec<RegisteredDevice>>,
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisteredDevice {
    pub kind: String,
    pub id: String,
}

/// A validated registration. Its JSON form is what "the same registration again" is compared on.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Registration {
    pub request_id: String,
    pub operation: Operation,
    pub account: Option<String>,
    pub label: Option<String>,
    pub expected_devices: Option<u64>,
    pub devices: Vec<DeviceIdentifier>,
    pub timeout_s: Option<u64>,
}

impl Serialize for Operation {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Why a registration was refused: a stable code and a message for people.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidRegistration {
    pub code: &'static str,
    pub message: String,
}

fn invalid(code: &'static str, message: impl Into<String>) -> InvalidRegistration {
    InvalidRegistration {
        code,
        message: message.into(),
    }
}

impl RegistrationRequest {
    pub fn validate(self) -> Result<Registration, InvalidRegistration> {
        let request_id = self.request_id.trim_ascii().to_owned();
        if request_id.is_empty() {
            return Err(invalid(
                "INVALID_REQUEST_ID",
                "request_id must not be empty",
            ));
        }
        if request_id.len() > MAX_REQUEST_ID_CHARS
            || !request_id.bytes().all(|byte| byte.is_ascii_graphic())
        {
            return Err(invalid(
                "INVALID_REQUEST_ID",
                format!(
                    "request_id must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces (the platform's are GUIDs)"
                ),
            ));
        }
        let operation = Operation::from_label(self.operation.trim())
            .filter(|operation| *operation != Operation::Other)
            .ok_or_else(|| {
                let known: Vec<&str> = Operation::ALL
                    .iter()
                    .filter(|operation| **operation != Operation::Other)
                    .map(|operation| operation.as_str())
                    .collect();
                invalid(
                    "UNKNOWN_OPERATION",
                    format!(
                        "unknown operation {:?}; known: {}",
                        self.operation,
                        known.join(", ")
                    ),
                )
            })?;
        let devices = self.devices.unwrap_or_default();
        if devices.len() > MAX_DEVICES {
            return Err(invalid(
                "TOO_MANY_DEVICES",
                format!(
                    "{} devices; the platform accepts at most {MAX_DEVICES} in one request",
                    devices.len()
                ),
            ));
        }
        let mut identifiers: Vec<DeviceIdentifier> = Vec::with_capacity(devices.len());
        for (index, device) in devices.iter().enumerate() {
            let identifier = DeviceIdentifier::new(&device.kind, &device.id);
            if !DEVICE_KINDS.contains(&identifier.kind.as_str()) {
                return Err(invalid(
                    "UNKNOWN_DEVICE_KIND",
                    format!(
                        "devices[{index}].kind {:?} is not one of {}",
                        device.kind,
                        DEVICE_KINDS.join(", ")
                    ),
                ));
            }
            let allowed = |byte: u8| byte.is_ascii_alphanumeric() || b"._:@+-".contains(&byte);
            if identifier.id.is_empty() || !identifier.id.bytes().all(allowed) {
                return Err(invalid(
                    "INVALID_DEVICE",
                    format!("devices[{index}].id must be letters, digits or . _ : @ + -"),
                ));
            }
            if !identifiers.contains(&identifier) {
                identifiers.push(identifier);
            }
        }
        match self.expected_devices {
            Some(0) => {
                return Err(invalid(
                    "INVALID_EXPECTED_DEVICES",
                    "expected_devices must be at least 1",
                ));
            }
            Some(expected) if expected > MAX_DEVICES as u64 => {
                return Err(invalid(
                    "TOO_MANY_DEVICES",
                    format!(
                        "expected_devices {expected}; the platform accepts at most {MAX_DEVICES}"
                    ),
                ));
            }
            Some(expected) if !identifiers.is_empty() && expected < identifiers.len() as u64 => {
                return Err(invalid(
                    "INVALID_EXPECTED_DEVICES",
                    format!(
                        "expected_devices {expected} is less than the {} devices listed",
                        identifiers.len()
                    ),
                ));
            }
            _ => {}
        }
        if let Some(timeout) = self.timeout_s {
            if timeout == 0 || timeout > MAX_TIMEOUT_S {
                return Err(invalid(
                    "INVALID_TIMEOUT",
                    format!("timeout_s must be from 1 to {MAX_TIMEOUT_S}"),
                ));
            }
        }
        let non_empty = |value: Option<String>| {
            value
                .map(|value| value.trim().to_owned())
                .filter(|value| !value.is_empty())
        };
        Ok(Registration {
            request_id,
            operation,
            account: non_empty(self.account),
            label: non_empty(self.label),
            expected_devices: self.expected_devices,
            devices: identifiers,
            timeout_s: self.timeout_s,
        })
    }
}

impl Registration {
    /// The expected device count this registration sets, if any.
    pub fn expected(&self) -> Option<u64> {
        self.expected_devices
            .or_else(|| (!self.devices.is_empty()).then_some(self.devices.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(expected: Option<u64>, reported: u64, succeeded: u64, failed: u64) -> JobFacts {
        JobFacts {
            registered_expected: expected,
            reported,
            succeeded,
            failed,
            ..JobFacts::default()
        }
    }

    #[test]
    fn the_state_rule() {
        assert_eq!(compute_state(&facts(Some(2), 0, 0, 0)), JobState::Pending);
        assert_eq!(
            compute_state(&facts(Some(2), 1, 1, 0)),
            JobState::InProgress
        );
        assert_eq!(compute_state(&facts(Some(2), 2, 2, 0)), JobState::Completed);
        assert_eq!(
            compute_state(&facts(Some(2), 2, 1, 1)),
            JobState::CompletedWithErrors
        );
        assert_eq!(compute_state(&facts(Some(2), 2, 0, 2)), JobState::Failed);
        let overdue = JobFacts {
            deadline_passed: true,
            ..facts(Some(2), 1, 1, 0)
        };
        assert_eq!(compute_state(&overdue), JobState::TimedOut);
        let package = JobFacts {
            package_error: true,
            ..facts(Some(2), 2, 2, 0)
        };
        assert_eq!(compute_state(&package), JobState::Failed);
    }

    #[test]
    fn unknown_expected_counts_close_at_the_deadline() {
        assert_eq!(compute_state(&facts(None, 3, 3, 0)), JobState::InProgress);
        let closed = JobFacts {
            deadline_passed: true,
            ..facts(None, 3, 2, 1)
        };
        assert_eq!(compute_state(&closed), JobState::CompletedWithErrors);
        let nothing = JobFacts {
            deadline_passed: true,
            ..facts(None, 0, 0, 0)
        };
        assert_eq!(compute_state(&nothing), JobState::TimedOut);
    }

    #[test]
    fn uploads_expect_their_total_line_count_and_trust_a_final_report() {
        let upload = |total, pending, success, failed| {
            Some(UploadCounts {
                total: Some(total),
                pending: Some(pending),
                success: Some(success),
                failed: Some(failed),
            })
        };
        let partial = JobFacts {
            upload: upload(4, 2, 2, 0),
            ..facts(None, 2, 2, 0)
        };
        assert_eq!(compute_state(&partial), JobState::InProgress);
        let final_report = JobFacts {
            upload: upload(4, 0, 3, 1),
            ..facts(None, 2, 2, 0)
        };
        assert_eq!(compute_state(&final_report), JobState::CompletedWithErrors);
    }

    fn request(json: &str) -> Result<Registration, InvalidRegistration> {
        serde_json::from_str::<RegistrationRequest>(json)
            .unwrap()
            .validate()
    }

    #[test]
    fn registrations_are_validated_with_stable_codes() {
        let ok = request(r#"{"request_id":" r1 ","operation":"activate","devices":[{"kind":"imei","id":"1"},{"kind":"IMEI","id":"1"}]}"#)
            .unwrap();
        assert_eq!(ok.request_id, "r1");
        assert_eq!(ok.devices, vec![DeviceIdentifier::new("IMEI", "1")]);
        assert_eq!(ok.expected(), Some(1));
        let code = |json: &str| request(json).unwrap_err().code;
        assert_eq!(
            code(r#"{"request_id":"","operation":"activate"}"#),
            "INVALID_REQUEST_ID"
        );
        assert_eq!(
            code(r#"{"request_id":"a b","operation":"activate"}"#),
            "INVALID_REQUEST_ID"
        );
        assert_eq!(
            code("{\"request_id\":\"\u{85}\",\"operation\":\"activate\"}"),
            "INVALID_REQUEST_ID"
        );
        assert_eq!(
            code(
                "{\"request_id\":\"r\",\"operation\":\"activate\",\"devices\":[{\"kind\":\"IMEI\",\"id\":\"\u{85}\"}]}"
            ),
            "INVALID_DEVICE"
        );
        assert_eq!(
            code(r#"{"request_id":"r","operation":"explode"}"#),
            "UNKNOWN_OPERATION"
        );
        assert_eq!(
            code(
                r#"{"request_id":"r","operation":"activate","devices":[{"kind":"SERIAL","id":"1"}]}"#
            ),
            "UNKNOWN_DEVICE_KIND"
        );
        assert_eq!(
            code(r#"{"request_id":"r","operation":"activate","expected_devices":10001}"#),
            "TOO_MANY_DEVICES"
        );
        assert_eq!(
            code(r#"{"request_id":"r","operation":"activate","timeout_s":0}"#),
            "INVALID_TIMEOUT"
        );
        let many: Vec<String> = (0..=MAX_DEVICES)
            .map(|index| format!(r#"{{"kind":"IMEI","id":"{index}"}}"#))
            .collect();
        assert_eq!(
            code(&format!(
                r#"{{"request_id":"r","operation":"activate","devices":[{}]}}"#,
                many.join(",")
            )),
            "TOO_MANY_DEVICES"
        );
    }
}
