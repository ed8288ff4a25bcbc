//! Connections: the pool, configured from the settings (timeouts, plans, TLS), and what the
//! writers and the read paths share; every connection handed out is to a migrated database.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};

use super::error::pool_error;
use super::{schema, tls};
use crate::configuration::StorageSettings;
use crate::metrics::Metrics;
use crate::storage::StoreError;
use crate::storage::batch::FailureMemory;
use crate::storage::jobs::{JobCompletion, observe_completions};

/// What the writers and the read paths share.
pub(super) struct Shared {
    /// Connections to the database, `storage.pool_size` at most.
    pub pool: Pool,
    /// Set once the migrations are applied (at start, or on the first use after the database
    /// became reachable).
    migrated: tokio::sync::OnceCell<()>,
    /// What readiness remembers of deliveries the database could not take, across the writers.
    memory: Mutex<FailureMemory>,
    /// The deadline of jobs that do not set their own.
    pub job_timeout: Duration,
    /// The most deliveries a writer commits in one transaction (`storage.max_batch`).
    pub max_batch: usize,
    /// Commit times, batch sizes and job completions, counted after the commit.
    pub metrics: Arc<Metrics>,
    /// Whether writes record events (`events.enabled`).
    pub record_events: bool,
}

impl Shared {
    pub fn new(
        settings: &StorageSettings,
        job_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            pool: pool(settings)?,
            migrated: tokio::sync::OnceCell::new(),
            memory: Mutex::new(FailureMemory::default()),
            job_timeout,
            max_batch: settings.max_batch,
            metrics,
            record_events: settings.record_events,
        })
    }

    /// A pooled connection to a migrated database.
    pub async fn client(&self) -> Result<Object, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        // On this same connection: waiting for a second one could exhaust the pool when many
        // requests arrive while the database has just come back.
        if self.migrated.get().is_none() {
            self.migrated
                .get_or_try_init(|| schema::migrate(&mut client))
                .await?;
        }
        Ok(client)
    }

    /// The failure memory, whichever writer held it last (a panic while holding it leaves
    /// nothing half-written: it is one field).
    pub fn memory(&self) -> std::sync::MutexGuard<'_, FailureMemory> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn observe_completions(&self, completions: &[JobCompletion]) {
        observe_completions(&self.metrics, completions);
    }
}

/// The pool `storage.url` describes. A URL that does not parse, or asks for a certificate check
/// without TLS, is a configuration error; nothing connects here.
fn pool(settings: &StorageSettings) -> anyhow::Result<Pool> {
    let url = settings.postgres_url().context("storage.url is not set")?;
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|error| anyhow::anyhow!("storage.url is not a PostgreSQL URL: {error}"))?;
    // A lock held by another replica is waited for as long as a SQLite lock would be; a
    // transaction a stalled replica left open is ended by the server.
    // Custom plans, made with each batch's array sizes and the tables' current statistics: a
    // generic plan made while a table was small kept scanning it whole once it was not
    // (profiled: one sequential scan of job_device_identifiers per batch).
    let options = format!(
        "{} -c lock_timeout={} -c statement_timeout={} -c idle_in_transaction_session_timeout=60000 -c plan_cache_mode=force_custom_plan",
        config.get_options().unwrap_or(""),
        settings.busy_timeout_ms,
        settings.busy_timeout_ms.max(30_000),
    );
    config.options(options.trim_start());
    if config.get_application_name().is_none() {
        config.application_name("m2m-listener");
    }
    config.connect_timeout(Duration::from_secs(5));
    if settings.ca_file.is_some() {
        // A checked certificate is worthless if a man in the middle can answer "no TLS".
        match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => anyhow::bail!(
                "invalid configuration: storage.ca_file is set but storage.url says sslmode=disable"
            ),
            _ => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
            }
        }
    }
    let manager = Manager::from_config(
        config,
        tls::connector(settings.ca_file.as_deref())?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_millis(settings.busy_timeout_ms)))
        .create_timeout(Some(Duration::from_secs(5)))
        .build()
        .context("failed to set up the PostgreSQL connection pool")
}
