//! The platform link: the platform's REST API for callback registration ([`client`]), what a
//! registration list means for this listener (pure, here), and the periodic check while serving
//! ([`watch`]).
//!
//! Architecture invariant: nothing here logs or returns a password. The registration list carries
//! every password in clear; it is compared (digests, constant time) and dropped.

pub mod client;
pub mod watch;

use rand::distr::{Alphanumeric, SampleString};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::auth::Authenticator;
use crate::domain::{CallbackKind, DeliveryResult, Secret};
use crate::storage::{DeliveryQuery, Store};

/// How recent a stored callback of a service must be to show that the service reaches this
/// listener although the REST list does not name it (a registration made over SOAP).
pub const ARRIVING_WITHIN: time::Duration = time::Duration::days(7);

/// The kinds this listener stores a service's callbacks under, where it knows them.
pub fn service_kinds(service: &str) -> &'static [CallbackKind] {
    match service.to_ascii_lowercase().as_str() {
        "carrierservice" => &[CallbackKind::CarrierService, CallbackKind::UploadDevices],
        "externalprovisioningchanges" => &[CallbackKind::ExternalProvisioning],
        "promochanges" | "devicepromousage" => &[CallbackKind::PromoChange],
        "smsdeliveryconfirmation" => &[CallbackKind::SmsDelivery],
        "deviceprlinformation" => &[CallbackKind::PrlInformation],
        "deviceusage" => &[CallbackKind::Usage],
        "resumetrackingnotification" => &[CallbackKind::ResumeTracking],
        "niddservice" => &[CallbackKind::Nidd],
        _ => &[],
    }
}

/// The configured services whose callbacks this listener stored within [`ARRIVING_WITHIN`] of
/// `now`: evidence that they reach it whatever the REST list says. A store that cannot answer
/// gives no evidence.
pub async fn services_arriving(
    store: &dyn Store,
    services: &[String],
    now: OffsetDateTime,
) -> Vec<String> {
    let mut arriving = Vec::new();
    for service in services {
        for kind in service_kinds(service) {
            let query = DeliveryQuery {
                request_id: None,
                kind: Some(kind.as_str().to_owned()),
                result: Some(DeliveryResult::Stored),
                limit: 1,
                before_id: None,
            };
            let Ok(page) = store.list_deliveries(query).await else {
                continue;
            };
            let recent = page.items.first().is_some_and(|latest| {
                OffsetDateTime::parse(&latest.received_at, &Rfc3339)
                    .is_ok_and(|received| now - received <= ARRIVING_WITHIN)
            });
            if recent {
                arriving.push(service.clone());
                break;
            }
        }
    }
    arriving
}

/// The callback service names PLATFORM.md lists (the registration page's, and the SDK's newer
/// ones); `AlertsService` is how the deregistration page spells `AlertService`.
pub const CALLBACK_SERVICES: &[&str] = &[
    "AlertService",
    "AlertsService",
    "CarrierService",
    "DevicePRLInformation",
    "DeviceProfileService",
    "DevicePromoUsage",
    "DeviceService",
    "DeviceSuspensionStatus",
    "DeviceUsage",
    "DiagnosticsService",
    "EnhancedConnectivityService",
    "ExtendedEnhancedConnectivityService",
    "ExternalProvisioningChanges",
    "IntelligenceService",
    "NetworkEventService",
    "NiddService",
    "PromoChanges",
    "PwnService",
    "QoS",
    "ResumeTrackingNotification",
    "SMSDeliveryConfirmation",
    "StateService",
    "SubscriptionNotificationService",
    "VIPCallbackService",
];

/// The platform's limit on callback usernames and passwords, and the length of a rotated one.
pub const ROTATED_PASSWORD_LENGTH: usize = crate::configuration::MAX_CREDENTIAL_LENGTH;

/// A new callback password: 40 random alphanumerics (the platform's limit; ~238 bits).
pub fn new_callback_password() -> Secret {
    Secret::new(Alphanumeric.sample_string(&mut rand::rng(), ROTATED_PASSWORD_LENGTH))
}

/// One entry of the platform's registration list. The password is held only to be compared.
#[derive(Clone, Debug)]
pub struct Registration {
    pub service: String,
    pub url: String,
    pub username: String,
    pub password: Secret,
}

/// What a configured service is on the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistrationState {
    /// Our URL and one of our valid credential pairs.
    Ours,
    /// Not in the REST list. A registration made over SOAP is not shown there either.
    Missing,
    /// Another URL, or our URL with a pair we do not accept (its callbacks would be refused).
    Elsewhere,
    /// Not in the REST list, but its callbacks reach this listener: registered over SOAP (which
    /// the REST list does not show), so which URL and pair it holds cannot be read here.
    NotVisible,
}

impl RegistrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            RegistrationState::Ours => "ours",
            RegistrationState::Missing => "missing",
            RegistrationState::Elsewhere => "elsewhere",
            RegistrationState::NotVisible => "not_visible",
        }
    }
}

/// A configured service's state, as `platform status` shows it: never a password.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceStatus {
    pub service: String,
    pub state: RegistrationState,
    /// The registered URL (`null` when missing).
    pub url: Option<String>,
    pub username: Option<String>,
    /// Why it is not ours, in words.
    pub detail: String,
}

/// Each of `services` against the platform's `list` (pure); `arriving` are the services whose
/// callbacks reach this listener lately (see [`services_arriving`]).
pub fn classify(
    services: &[String],
    list: &[Registration],
    callback_url: &str,
    accepted: &Authenticator,
    arriving: &[String],
) -> Vec<ServiceStatus> {
    services
        .iter()
        .map(|service| {
            let Some(registration) = list
                .iter()
                .find(|registration| registration.service.eq_ignore_ascii_case(service))
            else {
                if arriving
                    .iter()
                    .any(|found| found.eq_ignore_ascii_case(service))
                {
                    return ServiceStatus {
                        service: service.clone(),
                        state: RegistrationState::NotVisible,
                        url: None,
                        username: None,
                        detail: "not in the platform's REST list, but its callbacks reached this \
                                 listener in the last 7 days: registered over SOAP, which the REST \
                                 list does not show (check it with GetCallbackRegistrations, or \
                                 run platform register to hold it over REST)"
                            .to_owned(),
                    };
                }
                return ServiceStatus {
                    service: service.clone(),
                    state: RegistrationState::Missing,
                    url: None,
                    username: None,
                    detail: "not in the platform's REST list (a registration made over SOAP is \
                             not shown there: check it with GetCallbackRegistrations)"
                        .to_owned(),
                };
            };
            let our_url = same_url(&registration.url, callback_url);
            let our_pair = accepted
                .verify(&registration.username, &registration.password)
                .is_some();
            let (state, detail) = match (our_url, our_pair) {
                (true, true) => (RegistrationState::Ours, "registered to this listener"),
                (true, false) => (
                    RegistrationState::Elsewhere,
                    "our URL, but with credentials this listener does not accept: its callbacks \
                     are refused (run platform register)",
                ),
                (false, _) => (
                    RegistrationState::Elsewhere,
                    "registered to another URL: its callbacks do not reach this listener",
                ),
            };
            ServiceStatus {
                service: service.clone(),
                state,
                url: Some(registration.url.clone()),
                username: Some(registration.username.clone()),
                detail: detail.to_owned(),
            }
        })
        .collect()
}

/// URLs compared as the platform uses them: scheme and host in any case, a trailing `/` ignored.
fn same_url(registered: &str, ours: &str) -> bool {
    let normal = |url: &str| {
        let url = url.trim().trim_end_matches('/');
        match url.split_once("://") {
            Some((scheme, rest)) => {
                let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
                format!(
                    "{}://{}/{path}",
                    scheme.to_ascii_lowercase(),
                    authority.to_ascii_lowercase()
                )
            }
            None => url.to_owned(),
        }
    };
    normal(registered) == normal(ours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::CredentialSettings;

    fn registration(service: &str, url: &str, username: &str, password: &str) -> Registration {
        Registration {
            service: service.to_owned(),
            url: url.to_owned(),
            username: username.to_owned(),
            password: Secret::new(password),
        }
    }

    #[test]
    fn a_service_is_ours_only_with_our_url_and_one_of_our_pairs() {
        let accepted = Authenticator::new(&[CredentialSettings {
            username: "ops".to_owned(),
            password: Secret::new("right"),
            account: None,
        }]);
        let services: Vec<String> = ["CarrierService", "DeviceService", "NiddService", "QoS"]
            .map(str::to_owned)
            .to_vec();
        let list = [
            registration(
                "CarrierService",
                "HTTPS://Listener.example/cb/",
                "ops",
                "right",
            ),
            registration("DeviceService", "https://other.example/cb", "ops", "right"),
            registration("NiddService", "https://listener.example/cb", "ops", "wrong"),
        ];
        let states = |arriving: &[String]| -> Vec<RegistrationState> {
            classify(
                &services,
                &list,
                "https://listener.example/cb",
                &accepted,
                arriving,
            )
            .iter()
            .map(|status| status.state)
            .collect()
        };
        use RegistrationState::{Elsewhere, Missing, NotVisible, Ours};
        assert_eq!(states(&[]), [Ours, Elsewhere, Elsewhere, Missing]);
        // A service the list does not name but whose callbacks arrive was registered over SOAP;
        // one the list names is judged by the list whatever arrives.
        let arriving = ["qos".to_owned(), "NiddService".to_owned()];
        assert_eq!(states(&arriving), [Ours, Elsewhere, Elsewhere, NotVisible]);
    }

    #[test]
    fn a_new_callback_password_is_forty_alphanumerics_and_never_the_same() {
        let first = new_callback_password();
        let second = new_callback_password();
        assert_eq!(first.expose().len(), 40);
        assert!(first.expose().chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(first.expose(), second.expose());
    }
}
