//! Command line: `serve` (default), `check-config`, `jobs` and `errors`. Exit codes: 0 ok, 2 usage or configuration
//! error, 1 runtime failure.
//!
//! Commands print through [`emit`] and [`report`]: `println!` and `eprintln!` panic when the
//! reader has gone (`m2m-listener jobs list --json | head -c1`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod errors;
mod events;
mod jobs;
mod platform;

use crate::auth::CredentialSource;
use crate::configuration::{LogFormat, Settings, SettingsError};
use crate::startup::{Application, shutdown_signal};
use crate::storage::{BackupError, Purpose, Store};
use crate::telemetry::{self, ErrorChain};

#[derive(Debug, Parser)]
#[command(
    name = "m2m-listener",
    version,
    about = "Receives ThingSpace M2M callbacks and stores them before acknowledging"
)]
struct Cli {
    /// TOML configuration file; built-in defaults apply without one. `M2M_*` variables override it.
    #[arg(long, short, global = true, env = "M2M_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the listener (the default).
    Serve,
    /// Validate the configuration and print the effective settings, secrets masked.
    CheckConfig,
    /// Register and inspect jobs through the running listener's API.
    Jobs(jobs::JobsArgs),
    /// Explain and search the fault catalog built into the binary (no listener needed).
    Errors(errors::ErrorsArgs),
    /// The event feed of the running listener: list, show (with every attempt), redeliver.
    Events(events::EventsArgs),
    /// Prune raw bodies older than storage.retention_days now (the listener also does it hourly).
    Prune,
    /// Copy the database consistently to FILE while the listener keeps running. Written to a
    /// temporary file beside FILE (mode 0600) and named FILE only once complete and checked.
    Backup {
        /// Where to write the copy (must not exist; nothing is left there on failure).
        file: PathBuf,
    },
    /// Read the raw bodies of quarantined deliveries again with this build's parser: those it
    /// can read are stored with their outcomes (their jobs move), the others keep the current
    /// reason. Safe while the listener runs; running it twice changes nothing.
    Reprocess(ReprocessArgs),
    /// Manage the callback registrations on the platform (status, register, deregister, rotate).
    Platform(platform::PlatformArgs),
    /// Play the platform: post realistic callbacks (with its retries) to a listener and check that
    /// every acknowledged one was stored.
    Simulate(Box<SimulateArgs>),
}

#[derive(Debug, clap::Args)]
struct ReprocessArgs {
    /// These deliveries (repeatable).
    #[arg(long = "id", value_name = "N")]
    ids: Vec<i64>,
    /// Every quarantined delivery.
    #[arg(long)]
    quarantined: bool,
    /// Quarantined deliveries this build reads as this kind (`carrier_service`, `nidd`...).
    #[arg(long, value_name = "K")]
    kind: Option<String>,
    /// Quarantined deliveries received at or after this time (RFC 3339).
    #[arg(long, value_name = "T")]
    since: Option<String>,
    /// Report what would change; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// The report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct SimulateArgs {
    /// The listener's API, to register jobs and to verify (default: from api.listen).
    #[arg(long, env = "M2M_API_URL")]
    api_url: Option<String>,
    #[command(flatten)]
    options: crate::simulate::SimulateOptions,
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            report(error);
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            // Everything serve checks before it opens storage and binds its ports.
            if let Err(error) = settings.validate_for_serving() {
                report(error);
                return ExitCode::from(2);
            }
            let mut shown = settings.to_masked_toml();
            if settings.callback.credentials.is_empty() {
                shown.push_str(&format!(
                    "# no [[callback.credentials]]: the listener uses the generated pair in {}\n",
                    settings.storage.generated_credentials_path().display()
                ));
            }
            emit(&shown).err().unwrap_or(ExitCode::SUCCESS)
        }
        Command::Serve => serve(&settings),
        Command::Jobs(arguments) => jobs::run(&settings, arguments),
        Command::Errors(arguments) => errors::run(arguments),
        Command::Platform(arguments) => platform::run(&settings, arguments),
        Command::Events(arguments) => events::run(&settings, arguments),
        Command::Simulate(arguments) => simulate(&settings, *arguments),
        Command::Prune => {
            let cutoff = time::OffsetDateTime::now_utc()
                - time::Duration::days(i64::from(settings.storage.retention_days));
            let event_cutoff = time::OffsetDateTime::now_utc()
                - time::Duration::days(i64::from(settings.events.retention_days));
            let pruned = with_store(&settings, async |store| {
                let bodies = store
                    .prune_raw_bodies(cutoff)
                    .await
                    .map_err(anyhow::Error::new)?;
                let mut events = 0;
                loop {
                    match store.prune_events(event_cutoff).await {
                        Ok(0) => break,
                        Ok(count) => events += count,
                        Err(error) => return Err(anyhow::Error::new(error)),
                    }
                }
                Ok((bodies, events))
            });
            match pruned.and_then(|pruned| pruned) {
                Ok((pruned, events)) => emit(&format!(
                    "pruned {pruned} raw bodies older than {} days\npruned {events} events older than {} days\n",
                    settings.storage.retention_days, settings.events.retention_days
                ))
                .err()
                .unwrap_or(ExitCode::SUCCESS),
                Err(error) => {
                    report(format_args!("{error:#}"));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Reprocess(arguments) => reprocess(&settings, arguments),
        Command::Backup { file } => {
            match with_store(&settings, async |store| store.backup(file.clone()).await) {
                Ok(Ok(())) => emit(&format!(
                    "backed up {} to {}\n",
                    settings.storage.path.display(),
                    file.display()
                ))
                .err()
                .unwrap_or(ExitCode::SUCCESS),
                // A usage error: this backend is backed up with other tools, which the message names.
                Ok(Err(BackupError::Unsupported(tools))) => {
                    report(tools);
                    ExitCode::from(2)
                }
                Ok(Err(error @ BackupError::Failed(_))) => {
                    report(ErrorChain(&error));
                    ExitCode::FAILURE
                }
                Err(error) => {
                    report(format_args!("{error:#}"));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs a maintenance command's `work` on the store the settings select, opened through
/// [`crate::storage::open`] as `serve` opens it (for maintenance: see [`Purpose::Maintain`]),
/// and closes the store once the work is done.
fn reprocess(settings: &Settings, arguments: ReprocessArgs) -> ExitCode {
    let usage = |message: &str| {
        report(message);
        ExitCode::from(2)
    };
    if arguments.ids.is_empty()
        && !arguments.quarantined
        && arguments.kind.is_none()
        && arguments.since.is_none()
    {
        return usage(
            "say which deliveries: --id N (repeatable), --quarantined, --kind K or --since T",
        );
    }
    let kind = match arguments.kind.as_deref() {
        None => None,
        Some(label) => match crate::domain::CallbackKind::from_label(label) {
            Some(kind) => Some(kind),
            None => {
                let known: Vec<&str> = crate::domain::CallbackKind::ALL
                    .iter()
                    .map(|kind| kind.as_str())
                    .collect();
                return usage(&format!(
                    "--kind {label} is not a kind; one of {}",
                    known.join(", ")
                ));
            }
        },
    };
    let since = match arguments.since.as_deref() {
        None => None,
        Some(text) => {
            match time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            {
                Ok(since) => Some(since),
                Err(_) => {
                    return usage(&format!(
                        "--since {text} is not an RFC 3339 time (2026-12-01T00:00:00Z)"
                    ));
                }
            }
        }
    };
    let query = crate::storage::reprocess::ReprocessQuery {
        ids: arguments.ids,
        kind,
        since,
        dry_run: arguments.dry_run,
    };
    let done = with_store(settings, async |store| {
        store.reprocess(query).await.map_err(anyhow::Error::new)
    });
    let report_of_run = match done.and_then(|done| done) {
        Ok(report_of_run) => report_of_run,
        Err(error) => {
            report(format_args!("{error:#}"));
            return ExitCode::FAILURE;
        }
    };
    let text = if arguments.json {
        match serde_json::to_string_pretty(&report_of_run) {
            Ok(json) => json + "\n",
            Err(error) => {
                report(format_args!("{error}"));
                return ExitCode::FAILURE;
            }
        }
    } else {
        let mut text = String::new();
        for item in &report_of_run.items {
            let detail = match (&item.duplicate_of, &item.reason, item.kind) {
                (Some(original), _, _) => format!("re-delivery of {original}"),
                (None, Some(reason), _) => reason.clone(),
                (None, None, Some(kind)) => kind.to_owned(),
                (None, None, None) => String::new(),
            };
            text.push_str(&format!(
                "delivery {}: {} {}\n",
                item.delivery_id, item.result, detail
            ));
        }
        text.push_str(&format!(
            "{}{} stored, {} duplicates, {} still quarantined, {} skipped\n",
            if report_of_run.dry_run {
                "dry run: "
            } else {
                ""
            },
            report_of_run.stored,
            report_of_run.duplicates,
            report_of_run.quarantined,
            report_of_run.skipped
        ));
        text
    };
    emit(&text).err().unwrap_or(ExitCode::SUCCESS)
}

fn with_store<T>(
    settings: &Settings,
    work: impl AsyncFnOnce(&dyn Store) -> T,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new()?);
        let (store, _) = crate::storage::open(
            &settings.storage,
            std::time::Duration::from_secs(settings.jobs.default_timeout_s),
            metrics,
            Purpose::Maintain,
        )
        .await?;
        let done = work(store.as_ref()).await;
        store.close().await;
        Ok(done)
    })
}

fn serve(settings: &Settings) -> ExitCode {
    if let Err(error) = telemetry::init(&settings.telemetry) {
        report(format_args!("{error:#}"));
        return ExitCode::from(2);
    }
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(async {
        let shutdown = shutdown_signal().context("cannot listen for SIGTERM/SIGINT")?;
        let application = Application::build(settings).await?;
        announce(&application, settings)?;
        application.run_until_stopped(shutdown).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            report(format_args!("{error:#}"));
            if error.downcast_ref::<SettingsError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn simulate(settings: &Settings, arguments: SimulateArgs) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    if arguments.options.platform.platform_listen.is_some() {
        let stats = runtime.block_on(crate::simulate::platform::run(
            arguments.options.platform.clone(),
        ));
        return match stats {
            Ok(stats) => emit(&format!(
                "{}\n",
                serde_json::to_string_pretty(&stats).unwrap_or_default()
            ))
            .err()
            .unwrap_or(ExitCode::SUCCESS),
            Err(error) => {
                report(format_args!("{error:#}"));
                ExitCode::FAILURE
            }
        };
    }
    let pair = crate::auth::existing_credentials(
        &settings.callback.credentials,
        &settings.storage.generated_credentials_path(),
    );
    let options = arguments.options;
    let username = options
        .username
        .clone()
        .or_else(|| pair.as_ref().map(|pair| pair.username.clone()));
    let password = options
        .password
        .clone()
        .or_else(|| pair.as_ref().map(|pair| pair.password.expose().to_owned()));
    let api = match crate::client::ApiClient::new(settings, arguments.api_url.as_deref()) {
        Ok(api) => Some(api),
        Err(error) => {
            report(format_args!("{error:#}"));
            return ExitCode::from(2);
        }
    };
    let as_json = options.json;
    let summary = runtime.block_on(crate::simulate::run(
        options,
        username.unwrap_or_default(),
        password.unwrap_or_default(),
        api,
    ));
    let summary = match summary {
        Ok(summary) => summary,
        Err(error) => {
            report(format_args!("{error:#}"));
            return ExitCode::FAILURE;
        }
    };
    let shown = if as_json {
        format!(
            "{}\n",
            serde_json::to_string_pretty(&summary).unwrap_or_default()
        )
    } else {
        format!(
            "callbacks {}  attempts {}  acknowledged {}  re-sent {}  early re-deliveries {}  given up {}  refused {}  lost {}\n\
             {:.1} s, {:.0} acknowledged/s, latency p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms\n",
            summary.callbacks,
            summary.attempts,
            summary.acknowledged,
            summary.resent,
            summary.early_redeliveries,
            summary.given_up,
            summary.refused,
            summary
                .lost
                .map(|lost| lost.to_string())
                .unwrap_or_else(|| "not verified".to_owned()),
            summary.seconds,
            summary.acknowledged_per_second,
            summary.latency_ms.p50,
            summary.latency_ms.p90,
            summary.latency_ms.p99,
            summary.latency_ms.max,
        )
    };
    let shown = match (&summary.receiver, as_json) {
        (Some(receiver), false) => format!(
            "{shown}events received {} ({} requests, {} bad signatures) {:?}, delivery latency p50 {:.1} ms  p99 {:.1} ms\n",
            receiver.events,
            receiver.requests,
            receiver.bad_signatures,
            receiver.by_type,
            receiver.latency_ms.p50,
            receiver.latency_ms.p99,
        ),
        _ => shown,
    };
    if let Err(code) = emit(&shown) {
        return code;
    }
    simulation_verdict(&summary)
}

/// Exit code 1, with the reason on stderr, unless every callback was acknowledged and stored.
fn simulation_verdict(summary: &crate::simulate::Summary) -> ExitCode {
    let mut failed = false;
    if summary.refused > 0 {
        let statuses: Vec<String> = summary
            .refused_by_status
            .iter()
            .map(|(status, count)| format!("{count} with {status}"))
            .collect();
        let hint = if summary.refused_by_status.contains_key(&403) {
            " (403: the credentials or the source address were refused; check --username and \
             --password against the listener's callback.credentials, and callback.allowed_sources)"
        } else {
            ""
        };
        report(format_args!(
            "{} callbacks were refused and not re-sent: {}{hint}",
            summary.refused,
            statuses.join(", ")
        ));
        failed = true;
    }
    if summary.given_up > 0 {
        report(format_args!(
            "{} callbacks were never acknowledged in {} attempts (timeouts, connection failures or 5xx answers)",
            summary.given_up, summary.attempts
        ));
        failed = true;
    }
    if let Some(lost) = summary.lost.filter(|lost| *lost > 0) {
        report(format_args!(
            "{lost} acknowledged callbacks are not in the listener"
        ));
        failed = true;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Prints `text` on stdout. A reader that has gone (`| head -1`) ends the output quietly, where
/// `print!` would panic: Rust ignores SIGPIPE, so the write fails with EPIPE instead of ending
/// the process. Any other failure (a full disk behind a redirection) is reported: exit code 1.
fn emit(text: &str) -> Result<(), ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(error) => {
            report(format_args!("cannot write the output: {error}"));
            Err(ExitCode::FAILURE)
        }
    }
}

/// A message on stderr, prefixed with the program's name. Never panics: `eprintln!` would, on a
/// closed pipe (`2>&1 | head -1`), and there is nowhere left to say anything anyway.
fn report(message: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr().lock(), "m2m-listener: {message}");
}

/// The async runtime of a command, or the exit code when it cannot start.
/// Runs an API-client command (`jobs`, `events`): a client for the listener's API (`api_url`, or
/// the configured one), exit 2 if there is none, exit 1 on a failure it reports.
fn run_against_api<F>(
    settings: &Settings,
    api_url: Option<&str>,
    command: impl FnOnce(crate::client::ApiClient) -> F,
) -> ExitCode
where
    F: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let client = match crate::client::ApiClient::new(settings, api_url) {
        Ok(client) => client,
        Err(error) => {
            report(format_args!("{error:#}"));
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(command(client)) {
        Ok(code) => code,
        Err(error) => {
            report(format_args!("{error:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The JSON answer of an API call, or, for a failure, the API's error reported and the exit code
/// it means: 2 for a request the API refused as invalid (400) or conflicting (409), else 1.
fn api_answer(status: hyper::StatusCode, body: &[u8]) -> Result<serde_json::Value, ExitCode> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()));
    if status.is_success() {
        return Ok(value);
    }
    let code = value["error"]["code"].as_str().unwrap_or("ERROR");
    let message = value["error"]["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| value.to_string());
    report(format_args!("{} {code}: {message}", status.as_u16()));
    Err(
        if status == hyper::StatusCode::BAD_REQUEST || status == hyper::StatusCode::CONFLICT {
            ExitCode::from(2)
        } else {
            ExitCode::FAILURE
        },
    )
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            report(format_args!("cannot start the async runtime: {error}"));
            ExitCode::FAILURE
        })
}

/// Tells the operator where things are. Generated credentials are printed here, once, on the
/// terminal: they never go through the log. With JSON logs the banner goes to stderr, so that
/// stdout holds nothing but JSON lines (and a log pipeline reading it never sees the password);
/// with pretty logs it stays on stdout, before them. A banner that cannot be written (the
/// reader has gone) does not stop the listener: the generated pair is also in its file.
fn announce(application: &Application, settings: &Settings) -> anyhow::Result<()> {
    let database = match application.database_path() {
        Some(path) => std::path::absolute(path)?.display().to_string(),
        None => format!(
            "PostgreSQL {}",
            settings
                .storage
                .postgres_url()
                .map(crate::configuration::mask_url_password)
                .unwrap_or_default()
        ),
    };
    let mut banner = format!(
        "m2m-listener {}\n  callbacks: http://{}/ (POST)\n  API:       http://{}/api/v1/\n  database:  {database}\n",
        env!("CARGO_PKG_VERSION"),
        application.callback_address()?,
        application.api_address()?,
    );
    match &application.credential_source {
        CredentialSource::Configured(count) => banner.push_str(&format!(
            "  callback credentials: {count} configured pair(s)\n"
        )),
        CredentialSource::Stored(path) => banner.push_str(&format!(
            "  callback credentials: generated earlier, in {}\n",
            path.display()
        )),
        CredentialSource::Generated {
            path,
            username,
            password,
        } => banner.push_str(&format!(
            "  No callback credentials were configured, so a pair was generated (saved in {}):\n    \
             username: {username}\n    password: {}\n  \
             Use them as Username and Password in RegisterCallback. They are shown only this once.\n",
            path.display(),
            password.expose()
        )),
    }
    let written = match settings.telemetry.format {
        LogFormat::Json => {
            let mut stderr = std::io::stderr().lock();
            stderr
                .write_all(banner.as_bytes())
                .and_then(|()| stderr.flush())
        }
        LogFormat::Pretty => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(banner.as_bytes())
                .and_then(|()| stdout.flush())
        }
    };
    if let Err(error) = written {
        tracing::warn!(%error, "the start-up banner could not be written");
    }
    tracing::info!(
        callback = %application.callback_address()?, api = %application.api_address()?,
        %database, "listening"
    );
    Ok(())
}
