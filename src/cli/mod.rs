//! Command line: `serve` (default), `check-config` and `jobs`. Exit codes: 0 ok, 2 usage or configuration
//! error, 1 runtime failure.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod jobs;

use crate::auth::CredentialSource;
use crate::configuration::Settings;
use crate::startup::{Application, shutdown_signal};
use crate::telemetry;

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
    /// Prune raw bodies older than storage.retention_days now (the listener also does it hourly).
    Prune,
    /// Copy the database consistently to FILE while the listener keeps running. Written to a
    /// temporary file beside FILE (mode 0600) and named FILE only once complete and checked.
    Backup {
        /// Where to write the copy (must not exist; nothing is left there on failure).
        file: PathBuf,
    },
    /// Play the platform: post realistic callbacks (with its retries) to a listener and check that
    /// every acknowledged one was stored.
    Simulate(SimulateArgs),
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
            eprintln!("m2m-listener: {error}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            print!("{}", settings.to_masked_toml());
            if settings.callback.credentials.is_empty() {
                println!(
                    "# no [[callback.credentials]]: the listener uses the generated pair in {}",
                    settings.storage.generated_credentials_path().display()
                );
            }
            ExitCode::SUCCESS
        }
        Command::Serve => serve(&settings),
        Command::Jobs(arguments) => jobs::run(&settings, arguments),
        Command::Simulate(arguments) => simulate(&settings, arguments),
        Command::Prune => {
            let cutoff = time::OffsetDateTime::now_utc()
                - time::Duration::days(i64::from(settings.storage.retention_days));
            let pruned = if settings.storage.postgres_url().is_some() {
                prune_postgres(&settings, cutoff)
            } else {
                crate::storage::sqlite::prune_database(&settings.storage.path, cutoff)
            };
            match pruned {
                Ok(pruned) => {
                    println!(
                        "pruned {pruned} raw bodies older than {} days",
                        settings.storage.retention_days
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("m2m-listener: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Backup { .. } if settings.storage.postgres_url().is_some() => {
            eprintln!(
                "m2m-listener: backup copies the SQLite file; with storage.url use PostgreSQL's own tools (pg_dump, base backups)"
            );
            ExitCode::from(2)
        }
        Command::Backup { file } => {
            match crate::storage::sqlite::backup_database(&settings.storage.path, &file) {
                Ok(()) => {
                    println!(
                        "backed up {} to {}",
                        settings.storage.path.display(),
                        file.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("m2m-listener: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Prunes on PostgreSQL through the store, as the listener's own pruning task does.
fn prune_postgres(settings: &Settings, cutoff: time::OffsetDateTime) -> anyhow::Result<usize> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new()?);
        let store = crate::storage::postgres::PostgresStore::open(
            &settings.storage,
            std::time::Duration::from_secs(settings.jobs.default_timeout_s),
            metrics,
        )
        .await?;
        let pruned = crate::storage::Store::prune_raw_bodies(&store, cutoff).await;
        crate::storage::Store::close(&store).await;
        Ok(pruned?)
    })
}

fn serve(settings: &Settings) -> ExitCode {
    if let Err(error) = telemetry::init(&settings.telemetry) {
        eprintln!("m2m-listener: {error:#}");
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
            eprintln!("m2m-listener: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn simulate(settings: &Settings, arguments: SimulateArgs) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
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
            eprintln!("m2m-listener: {error:#}");
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
    match summary {
        Ok(summary) => {
            if as_json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&summary).unwrap_or_default()
                );
            } else {
                println!(
                    "callbacks {}  attempts {}  acknowledged {}  re-sent {}  early re-deliveries {}  given up {}  lost {}",
                    summary.callbacks,
                    summary.attempts,
                    summary.acknowledged,
                    summary.resent,
                    summary.early_redeliveries,
                    summary.given_up,
                    summary
                        .lost
                        .map(|lost| lost.to_string())
                        .unwrap_or_else(|| "not verified".to_owned()),
                );
                println!(
                    "{:.1} s, {:.0} acknowledged/s, latency p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
                    summary.seconds,
                    summary.acknowledged_per_second,
                    summary.latency_ms.p50,
                    summary.latency_ms.p90,
                    summary.latency_ms.p99,
                    summary.latency_ms.max,
                );
            }
            if summary.lost.unwrap_or(0) > 0 {
                eprintln!(
                    "m2m-listener: {} acknowledged callbacks are not in the listener",
                    summary.lost.unwrap_or(0)
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("m2m-listener: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime of a command, or the exit code when it cannot start.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("m2m-listener: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        })
}

/// Tells the operator where things are. Generated credentials are printed here, once, on the
/// terminal: they never go through the log.
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
    println!("m2m-listener {}", env!("CARGO_PKG_VERSION"));
    println!(
        "  callbacks: http://{}/ (POST)",
        application.callback_address()?
    );
    println!("  API:       http://{}/api/v1/", application.api_address()?);
    println!("  database:  {database}");
    match &application.credential_source {
        CredentialSource::Configured(count) => {
            println!("  callback credentials: {count} configured pair(s)")
        }
        CredentialSource::Stored(path) => println!(
            "  callback credentials: generated earlier, in {}",
            path.display()
        ),
        CredentialSource::Generated {
            path,
            username,
            password,
        } => {
            println!(
                "  No callback credentials were configured, so a pair was generated (saved in {}):",
                path.display()
            );
            println!("    username: {username}");
            println!("    password: {}", password.expose());
            println!(
                "  Use them as Username and Password in RegisterCallback. They are shown only this once."
            );
        }
    }
    tracing::info!(
        callback = %application.callback_address()?, api = %application.api_address()?,
        %database, "listening"
    );
    Ok(())
}
