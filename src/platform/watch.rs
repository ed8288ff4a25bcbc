//! While serving with `platform.check_interval_s` > 0: the registration list is read every
//! interval and each configured service's state set in `m2m_platform_registration`.
//!
//! One client (one session) serves every check; the session is renewed only on the platform's
//! expiry error. A failed login ends that check (every service `error`) until the next interval,
//! never a loop; after [`MAX_REFUSED_LOGINS`] refused logins in a row the check stops logging in
//! until the listener restarts, so that a wrong password can never use up the five attempts that
//! lock the account.

use std::sync::Arc;
use std::time::Duration;

use super::client::{PlatformClient, PlatformError};
use crate::auth::CallbackCredentials;
use crate::configuration::PlatformSettings;
use crate::metrics::Metrics;
use crate::storage::Store;
use crate::telemetry::ErrorChain;

/// Refused logins in a row after which the periodic check stops logging in.
pub const MAX_REFUSED_LOGINS: u32 = 2;

pub async fn run(
    settings: PlatformSettings,
    credentials: Arc<CallbackCredentials>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs(settings.check_interval_s));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<PlatformClient> = None;
    let mut refused_logins = 0u32;
    loop {
        ticks.tick().await;
        if refused_logins >= MAX_REFUSED_LOGINS {
            continue;
        }
        let current = match client.as_mut() {
            Some(current) => current,
            None => match PlatformClient::new(&settings) {
                Ok(created) => client.insert(created),
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "platform check cannot start");
                    return;
                }
            },
        };
        match current.list().await {
            Ok(list) => {
                refused_logins = 0;
                let arriving = super::services_arriving(
                    store.as_ref(),
                    &settings.services,
                    time::OffsetDateTime::now_utc(),
                )
                .await;
                let statuses = super::classify(
                    &settings.services,
                    &list,
                    &settings.callback_url,
                    &credentials.authenticator(),
                    &arriving,
                );
                for status in &statuses {
                    metrics.set_platform_registration(&status.service, status.state.as_str());
                    if status.state != super::RegistrationState::Ours {
                        tracing::warn!(
                            service = %status.service, state = status.state.as_str(),
                            url = status.url.as_deref().unwrap_or(""),
                            "callback registration is not this listener's: {}", status.detail
                        );
                    }
                }
            }
            Err(error) => {
                for service in &settings.services {
                    metrics.set_platform_registration(service, "error");
                }
                if error.is_login_failure() {
                    refused_logins += 1;
                    // A new client (a new login) at the next interval, and only then.
                    client = None;
                    let stopping = refused_logins >= MAX_REFUSED_LOGINS;
                    tracing::error!(
                        error = %ErrorChain(&error),
                        stopped = stopping,
                        "platform check: login failed; {}",
                        if stopping {
                            "no more logins until the listener restarts (fix platform.username/password)"
                        } else {
                            "trying once more at the next interval"
                        }
                    );
                } else {
                    if matches!(
                        error,
                        PlatformError::Token(_) | PlatformError::Gateway { .. }
                    ) {
                        client = None;
                    }
                    tracing::warn!(
                        error = %ErrorChain(&error),
                        "platform check failed; trying again at the next interval"
                    );
                }
            }
        }
    }
}
