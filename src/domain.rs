//! Domain types: what a callback means once the wire format is gone.
//!
//! The parser produces these; storage and the HTTP edge consume them. Nothing here knows about XML,
//! JSON, SQL or HTTP.

use std::fmt;

use serde::Serialize;

/// A value that must never reach a log line or an API answer by accident: callback passwords,
/// device credential passwords, the API token.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the few places that must compare or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(********)")
    }
}

/// One (kind, identifier) pair of a device. `kind` is always upper-case (`ICCID`, `IMEI`, `MDN`...):
/// the platform sends `Iccid`, `imei` and `Mdn` for the same kinds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct DeviceIdentifier {
    pub kind: String,
    pub id: String,
}

impl DeviceIdentifier {
    /// Trims ASCII white space only (the platform pads values with spaces); identifiers are ASCII.
    pub fn new(kind: &str, id: &str) -> Self {
        Self {
            kind: kind.trim_ascii().to_ascii_uppercase(),
            id: id.trim_ascii().to_owned(),
        }
    }
}

/// Which envelope the callback arrived in. Kept on the delivery record: it tells an operator which
/// API generation sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallbackForm {
    /// `Envelope/Body/CallbackRequest` (or `SmsCallbackRequest`).
    SoapEnvelope,
    /// `CallbackRequest1/CallbackRequest`, as in the upload callback.
    Wrapper,
    /// A bare `CallbackRequest` root.
    Bare,
    /// A JSON callback of the REST API.
    Json,
}

impl CallbackForm {
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackForm::SoapEnvelope => "soap",
            CallbackForm::Wrapper => "wrapper",
            CallbackForm::Bare => "bare",
            CallbackForm::Json => "json",
        }
    }
}

macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, for metrics initialisation and validation messages.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stable label used in storage, metrics and the API.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $label),+ }
            }

            /// The inverse of [`Self::as_str`].
            pub fn from_label(label: &str) -> Option<Self> {
                match label { $($label => Some($name::$variant),)+ _ => None }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use label_enum;

label_enum! {
    /// The callback service a delivery belongs to (spec §2, "kind label"). A bounded set: it is a
    /// metric label.
    CallbackKind {
        CarrierService => "carrier_service",
        UploadDevices => "upload_devices",
        ExternalProvisioning => "external_provisioning",
        PromoChange => "promo_change",
        SmsDelivery => "sms_delivery",
        PrlInformation => "prl_information",
        Usage => "usage",
        ResumeTracking => "resume_tracking",
        SmsMo => "sms_mo",
        /// `NiddService` (REST API): uplinks, downlink delivery reports and line configuration.
        Nidd => "nidd",
        Other => "other",
    }
}

label_enum! {
    /// The platform operation a callback reports on. A bounded set: it is a metric label and the
    /// vocabulary of job registration.
    Operation {
        Activate => "activate",
        Deactivate => "deactivate",
        Suspend => "suspend",
        Restore => "restore",
        Reconnect => "reconnect",
        GoToState => "go_to_state",
        ChangeDeviceState => "change_device_state",
        ChangeDeviceServicePlan => "change_device_service_plan",
        ChangeDeviceIdentifier => "change_device_identifier",
        Change4gDeviceIdentifier => "change_4g_device_identifier",
        ChangeDeviceFeatureCodes => "change_device_feature_codes",
        ChangeDeviceCostCenter => "change_device_cost_center",
        ChangeDeviceCustomFields => "change_device_custom_fields",
        ChangeDeviceContactInfo => "change_device_contact_info",
        MoveDevice => "move_device",
        UploadDevices => "upload_devices",
        ExternalProvisioningChange => "external_provisioning_change",
        PromoChange => "promo_change",
        SmsDelivery => "sms_delivery",
        PrlInformation => "prl_information",
        Usage => "usage",
        ResumeTracking => "resume_tracking",
        SmsMo => "sms_mo",
        /// Non-IP data delivery (REST API): a downlink the operator sent, whose delivery reports
        /// (`niddMTDeliveryResponse`) are the device outcomes of its job.
        Nidd => "nidd",
        /// The result of configuring a line for NIDD (`niddConfigResponse`), a request of its own.
        NiddConfig => "nidd_config",
        /// A NIDD uplink from a device (`niddMONotificationResponse`): a device message, not an
        /// outcome, as `sms_mo` is for SMS.
        NiddMo => "nidd_mo",
        Other => "other",
    }
}

label_enum! {
    /// What happened to one device (or one upload line).
    OutcomeStatus {
        Succeeded => "succeeded",
        Failed => "failed",
        /// Reported, not final, not a failure: an upload line the platform accepted for processing
        /// but has not confirmed yet, or a REST status `Pending` / `Queued` (a NIDD downlink
        /// buffered until the device is reachable). The status text is in `line_status`.
        Accepted => "accepted",
    }
}

label_enum! {
    /// What the listener did with an accepted POST.
    DeliveryResult {
        Stored => "stored",
        Duplicate => "duplicate",
        Quarantined => "quarantined",
    }
}

/// A SOAP fault (or REST `faultResponse`) carried by a callback.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Fault {
    /// As sent, service prefix included (`CarrierService.INPUT_INVALID.X`).
    pub code: String,
    pub message: String,
    pub actor: Option<String>,
    pub detail: Option<String>,
}

/// The outcome for one device (or one upload line) reported by a callback.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceOutcome {
    /// Every identifier the callback names for this device: the `Device` elements plus those in the
    /// operation result (an activation adds MDN and MIN).
    pub identifiers: Vec<DeviceIdentifier>,
    pub status: OutcomeStatus,
    /// The status text as sent (trimmed), for upload lines (`LineStatus`) and for REST statuses
    /// that are not final (`Pending`, `Queued`): what an `accepted` outcome is waiting on.
    pub line_status: Option<String>,
    pub fault: Option<Fault>,
    pub state: Option<String>,
    pub service_plan: Option<String>,
    pub ip_address: Option<String>,
    pub mdn: Option<String>,
    /// The remaining fields of the operation result (feature codes, device credential...), as
    /// JSON. May hold secrets (`DeviceCredential/Password`): redact before showing.
    pub details: Option<serde_json::Value>,
}

/// Line counts and package-level result of an upload callback.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UploadSummary {
    pub account_name: Option<String>,
    pub device_sku: Option<String>,
    pub total_lines: Option<u64>,
    pub pending_lines: Option<u64>,
    pub success_lines: Option<u64>,
    pub failed_lines: Option<u64>,
    /// A package-level error (seed 001 table): the whole upload failed.
    pub package_error: Option<String>,
}

label_enum! {
    /// How a device message reached the platform.
    MessageChannel {
        Sms => "sms",
        /// Non-IP data delivery over the cellular control plane (REST `NiddService`).
        Nidd => "nidd",
    }
}

/// A message a device sent (a device-to-platform uplink), as a callback delivered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMessage {
    /// Every identifier the callback names for the sending device, each once.
    pub identifiers: Vec<DeviceIdentifier>,
    pub channel: MessageChannel,
    /// The payload as sent: base64 of the device's bytes for NIDD, the text for SMS.
    pub payload: Option<String>,
    /// The payload as text when it is text: for NIDD the base64-decoded bytes when they are valid
    /// UTF-8 without control characters other than tab, CR and LF; for SMS the message text.
    pub text: Option<String>,
    /// When the device sent it, as the callback gives it (SMS `Timestamp`); `None` if it gives
    /// no time.
    pub sent_at: Option<String>,
}

/// A fully parsed callback.
#[derive(Clone, Debug)]
/// The callback's credentials are not here: they are read and checked before the parse
/// (`parser::credentials`), and go no further than the authentication step.
pub struct Callback {
    pub form: CallbackForm,
    pub request_id: Option<String>,
    /// The top-level `Device` identifiers.
    pub devices: Vec<DeviceIdentifier>,
    pub kind: CallbackKind,
    pub operation: Operation,
    /// `Success` / `Failed`, as sent.
    pub status: Option<String>,
    pub fault: Option<Fault>,
    pub comment: Option<String>,
    pub callback_count: Option<u32>,
    pub max_callback_threshold: Option<u32>,
    pub outcomes: Vec<DeviceOutcome>,
    pub upload: Option<UploadSummary>,
    /// Kind-specific fields that have no column of their own (promo change, SMS message, summary...).
    pub details: Option<serde_json::Value>,
    /// Device messages (uplinks) the callback carries: one per MO SMS `SmsMessage`, one for a
    /// NIDD `niddMONotificationResponse`. Empty for every other kind.
    pub messages: Vec<DeviceMessage>,
    /// What the lenient XML reader repaired to read the body, one human-readable line each
    /// (``"`</MaxCallbackThreshold/>` read as `</MaxCallbackThreshold>` at byte 1234"``); empty
    /// when the body was well-formed. The raw body is stored as received all the same.
    pub repairs: Vec<String>,
    /// Identifies the message across re-deliveries: a digest of its content without
    /// `CallbackCount`, `MaxCallbackThreshold` and the callback credentials.
    ///
    /// A repaired body's key is the digest of the content as repaired, not of its raw bytes:
    /// the same broken body sent again repairs the same way and so gets the same key, and a later
    /// well-formed re-delivery of the same message (the platform fixed its serializer, or support
    /// re-sent it) has the same content and is recognised as a duplicate rather than stored twice.
    /// That is safe only because a repair is made where the meaning is unambiguous: a body whose
    /// meaning is in doubt is not repaired but quarantined under a digest of its raw bytes.
    pub dedup_key: [u8; 32],
}

/// A body that could not be parsed fully. It is kept (quarantined) when the credentials it presents
/// (found by the lenient scan of `parser::credentials`) are valid.
#[derive(Clone, Debug)]
pub struct UnreadableBody {
    pub reason: String,
    /// The body looks like JSON (a REST API callback): answer in JSON.
    pub json: bool,
    /// The `RequestId`, if a lenient scan found one.
    pub request_id: Option<String>,
    pub callback_count: Option<u32>,
    /// A digest of the raw body without the `CallbackCount`/`MaxCallbackThreshold` values, so that
    /// re-deliveries of the same broken body are recognised too.
    pub dedup_key: [u8; 32],
}
