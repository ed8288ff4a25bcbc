//! `m2m-listener platform status|register|deregister|rotate`: the callback registrations of
//! `platform.account`, through the platform's REST API. One login per command, never retried.
//! No password (the platform's list carries every one in clear, ours included) is ever printed.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use time::OffsetDateTime;

use super::{emit, report};
use crate::auth::{self, Authenticator};
use crate::configuration::{CredentialSettings, Settings};
use crate::platform::client::{PlatformClient, PlatformError};
use crate::platform::{self, RegistrationState, ServiceStatus};
use crate::storage::credentials::{RetiredPair, Rotation, password_digest};
use crate::storage::{Purpose, Store};

#[derive(Debug, clap::Args)]
pub struct PlatformArgs {
    #[command(subcommand)]
    command: PlatformCommand,
}

#[derive(Debug, Subcommand)]
enum PlatformCommand {
    /// Each configured service: ours (our URL and one of our valid pairs), missing, or elsewhere.
    /// Exit 0 only when every one is ours.
    Status {
        /// The states as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Registers platform.callback_url with the listener's callback credentials for these
    /// services (default: platform.services); a service already registered so is left alone.
    Register { services: Vec<String> },
    /// Removes these services' registrations (one registered to this listener only with --yes).
    Deregister {
        #[arg(required = true)]
        services: Vec<String>,
        /// Deregister even a service whose callbacks come to this listener.
        #[arg(long)]
        yes: bool,
    },
    /// A new random callback password (40 characters), stored for every replica, registered for
    /// every configured service; the previous one is accepted platform.rotation_overlap_s longer.
    Rotate,
}

/// Why a command failed, and its exit code.
enum Failure {
    Usage(String),
    Runtime(String),
}

impl From<PlatformError> for Failure {
    fn from(error: PlatformError) -> Self {
        Failure::Runtime(crate::telemetry::ErrorChain(&error).to_string())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::Runtime(format!("{error:#}"))
    }
}

impl From<crate::storage::StoreError> for Failure {
    fn from(error: crate::storage::StoreError) -> Self {
        Failure::Runtime(crate::telemetry::ErrorChain(&error).to_string())
    }
}

pub fn run(settings: &Settings, arguments: PlatformArgs) -> ExitCode {
    if let Err(error) = settings.platform.require_link() {
        report(error);
        return ExitCode::from(2);
    }
    if settings.storage.postgres_url().is_some() && settings.callback.credentials.is_empty() {
        report(
            "invalid configuration: callback.credentials: must be configured when storage.url is set",
        );
        return ExitCode::from(2);
    }
    let named = match &arguments.command {
        PlatformCommand::Register { services } | PlatformCommand::Deregister { services, .. } => {
            services.clone()
        }
        _ => Vec::new(),
    };
    if let Some(unknown) = named
        .iter()
        .find(|service| !platform::CALLBACK_SERVICES.contains(&service.as_str()))
    {
        report(format_args!(
            "{unknown} is not a documented callback service name; one of {}",
            platform::CALLBACK_SERVICES.join(", ")
        ));
        return ExitCode::from(2);
    }
    for warning in settings.platform.warnings() {
        report(format_args!("warning: {warning}"));
    }
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(async {
        let metrics = Arc::new(crate::metrics::Metrics::new().map_err(anyhow::Error::new)?);
        let (store, _) = crate::storage::open(
            &settings.storage,
            std::time::Duration::from_secs(settings.jobs.default_timeout_s),
            metrics,
            Purpose::Serve,
        )
        .await?;
        let mut client = PlatformClient::new(&settings.platform)?;
        let done = command(settings, arguments.command, store.as_ref(), &mut client).await;
        client.logout().await;
        store.close().await;
        done
    });
    match outcome {
        Ok((text, code)) => match emit(&text) {
            Ok(()) => code,
            Err(code) => code,
        },
        Err(Failure::Usage(message)) => {
            report(message);
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            report(message);
            ExitCode::FAILURE
        }
    }
}

/// The pairs this listener accepts (configured or generated, and stored), and the one it
/// registers.
async fn our_credentials(
    settings: &Settings,
    store: &dyn Store,
) -> Result<(Authenticator, CredentialSettings), Failure> {
    let (configured, _) = auth::resolve_credentials(
        &settings.callback.credentials,
        &settings.storage.generated_credentials_path(),
    )?;
    let stored = store.callback_credentials().await?;
    let current = auth::current_pair(&configured, &stored)
        .ok_or_else(|| Failure::Runtime("no callback credentials to register".to_owned()))?;
    Ok((Authenticator::with_stored(&configured, &stored), current))
}

async fn command(
    settings: &Settings,
    command: PlatformCommand,
    store: &dyn Store,
    client: &mut PlatformClient,
) -> Result<(String, ExitCode), Failure> {
    let link = &settings.platform;
    let (accepted, current) = our_credentials(settings, store).await?;
    match command {
        PlatformCommand::Status { json } => {
            let list = client.list().await?;
            let arriving =
                platform::services_arriving(store, &link.services, OffsetDateTime::now_utc()).await;
            let statuses = platform::classify(
                &link.services,
                &list,
                &link.callback_url,
                &accepted,
                &arriving,
            );
            let all_ours = statuses
                .iter()
                .all(|status| status.state == RegistrationState::Ours);
            let text = if json {
                let shown = serde_json::json!({
                    "account": link.account,
                    "callback_url": link.callback_url,
                    "all_ours": all_ours,
                    "services": statuses,
                });
                serde_json::to_string_pretty(&shown).unwrap_or_default() + "\n"
            } else {
                status_table(&statuses)
            };
            let code = if all_ours {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
            Ok((text, code))
        }
        PlatformCommand::Register { services } => {
            let services = if services.is_empty() {
                link.services.clone()
            } else {
                services
            };
            let list = client.list().await?;
            let mut text = String::new();
            for service in &services {
                let held = list.iter().any(|registration| {
                    registration.service.eq_ignore_ascii_case(service)
                        && registration.url == link.callback_url
                        && registration.username == current.username
                        && registration.password.expose() == current.password.expose()
                });
                if held {
                    text.push_str(&format!(
                        "{service}: already registered to {}\n",
                        link.callback_url
                    ));
                    continue;
                }
                client
                    .register(
                        service,
                        &link.callback_url,
                        &current.username,
                        &current.password,
                    )
                    .await
                    .map_err(|error| {
                        Failure::Runtime(format!(
                            "{text}registering {service} failed: {}",
                            crate::telemetry::ErrorChain(&error)
                        ))
                    })?;
                text.push_str(&format!(
                    "{service}: registered {} (username {:?})\n",
                    link.callback_url, current.username
                ));
            }
            Ok((text, ExitCode::SUCCESS))
        }
        PlatformCommand::Deregister { services, yes } => {
            let list = client.list().await?;
            let arriving =
                platform::services_arriving(store, &services, OffsetDateTime::now_utc()).await;
            let statuses =
                platform::classify(&services, &list, &link.callback_url, &accepted, &arriving);
            let ours: Vec<&str> = statuses
                .iter()
                .filter(|status| status.state == RegistrationState::Ours)
                .map(|status| status.service.as_str())
                .collect();
            if !ours.is_empty() && !yes {
                return Err(Failure::Usage(format!(
                    "{} send callbacks to this listener; deregistering stops them: add --yes",
                    ours.join(", ")
                )));
            }
            let mut text = String::new();
            for status in &statuses {
                if status.state == RegistrationState::Missing {
                    text.push_str(&format!("{}: not registered\n", status.service));
                    continue;
                }
                client.deregister(&status.service).await.map_err(|error| {
                    Failure::Runtime(format!(
                        "{text}deregistering {} failed: {}",
                        status.service,
                        crate::telemetry::ErrorChain(&error)
                    ))
                })?;
                text.push_str(&format!("{}: deregistered\n", status.service));
            }
            Ok((text, ExitCode::SUCCESS))
        }
        PlatformCommand::Rotate => {
            // Log in (and see the platform answer) before anything changes here.
            client.list().await?;
            let password = platform::new_callback_password();
            let rotation = Rotation::new(
                current.username.clone(),
                password.clone(),
                current.account.clone(),
                vec![RetiredPair {
                    username: current.username.clone(),
                    password_digest: password_digest(current.password.expose()),
                }],
                time::OffsetDateTime::now_utc(),
                std::time::Duration::from_secs(link.rotation_overlap_s),
            );
            let until = rotation.valid_until.clone();
            // Stored first: every replica accepts the new pair before the platform sends it.
            store.rotate_callback_credentials(rotation).await?;
            let mut text = format!(
                "new callback password for {:?} stored; the previous one is accepted until {until}\n",
                current.username
            );
            for service in &link.services {
                client
                    .register(service, &link.callback_url, &current.username, &password)
                    .await
                    .map_err(|error| {
                        Failure::Runtime(format!(
                            "{text}registering {service} with the new password failed: {}; \
                             run `m2m-listener platform register` to retry (the previous password \
                             stays accepted until {until})",
                            crate::telemetry::ErrorChain(&error)
                        ))
                    })?;
                text.push_str(&format!("{service}: registered with the new password\n"));
            }
            Ok((text, ExitCode::SUCCESS))
        }
    }
}

fn status_table(statuses: &[ServiceStatus]) -> String {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_header(["SERVICE", "STATE", "URL", "USERNAME", "DETAIL"]);
    for status in statuses {
        table.add_row([
            status.service.as_str(),
            status.state.as_str(),
            status.url.as_deref().unwrap_or("-"),
            status.username.as_deref().unwrap_or("-"),
            status.detail.as_str(),
        ]);
    }
    format!("{table}\n")
}
