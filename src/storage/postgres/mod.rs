//! The scale-out backend: PostgreSQL, shared by several listener replicas.
//!
//! Each replica queues its deliveries to a few writer tasks. A writer takes every delivery queued
//! since its last commit and writes them in one transaction with a fixed number of set-based
//! statements (`unnest` arrays), whatever the batch size: group commit, as the SQLite writer does.
//! A submitter is answered only after COMMIT returns.
//!
//! What keeps replicas correct without application locks:
//! - a message is stored once by the partial unique index on `deliveries(dedup_key)` and
//!   `ON CONFLICT DO NOTHING`; an insert racing another replica's waits for that transaction;
//! - every transaction that changes a job locks the job rows first (`FOR NO KEY UPDATE`, in
//!   `request_id` order, after its delivery inserts, which go in dedup-key order), so job counters
//!   and state are read and written by one transaction at a time and lock waits cannot form a
//!   cycle; a deadlock or serialization failure is retried anyway;
//! - the deadline sweep locks with `SKIP LOCKED`, so every replica can run it at once.

mod error;
mod jobs;
mod queries;
mod schema;
mod tls;
mod write;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use super::rows::JobCompletion;
use super::{
    BackupError, BoxFuture, Cause, DeliveryQuery, DeliveryRecord, DeviceHistory, Fault, JobQuery,
    JobRecord, NewDelivery, OutcomeRecord, Page, Purpose, RawBody, Receipt, Registered, Store,
    StoreError,
};
use crate::configuration::{StorageSettings, mask_url_password};
use crate::domain::DeviceIdentifier;
use crate::jobs::Registration;
use crate::metrics::Metrics;
use crate::telemetry::ErrorChain;
use error::{Failure, is_retryable, pool_error, store_error};
use schema::MIGRATIONS;

/// Concurrent write transactions per replica. Each commits a whole batch; two keep one batch
/// being written while the next is collected.
const WRITERS: usize = 2;
/// Queued writes waiting for a writer; submitters wait (back-pressure) beyond this.
const WRITE_QUEUE: usize = 4096;
/// Readiness stays false this long after deliveries failed to commit, unless one commits since.
const FAILURE_MEMORY: Duration = Duration::from_secs(30);
/// A batch that meets a deadlock or serialization failure is retried this often.
const RETRIES: usize = 3;
/// A batch stops growing past this many body bytes or outcomes (besides `storage.max_batch`):
/// one statement carries all of a batch's bodies, and the protocol caps a message at 1 GiB.
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;
const MAX_BATCH_OUTCOMES: usize = 100_000;
/// Raw bodies deleted per transaction.
const PRUNE_CHUNK: i64 = 2_000;

/// Runs `$body` (an expression that may `.await` and `?`) in a transaction of its own on
/// `$store`, retried on deadlock or serialization failure; observes the jobs it completed once it
/// has committed. (A macro rather than a method taking an async closure: such closures borrowing
/// the transaction are not `Send` for every lifetime, which the `Store` futures must be.)
macro_rules! transact {
    ($store:expr, |$transaction:ident, $completions:ident| $body:expr) => {{
        let shared = &$store.shared;
        async {
            let mut client = shared.client().await?;
            let mut attempt = 0;
            loop {
                attempt += 1;
                #[allow(unused_mut)]
                let mut $completions: Vec<JobCompletion> = Vec::new();
                let result: Result<_, Failure> = async {
                    let $transaction = client.transaction().await?;
                    let value = $body;
                    $transaction.commit().await?;
                    Ok(value)
                }
                .await;
                match result {
                    Ok(value) => {
                        shared.observe_completions(&$completions);
                        break Ok::<_, StoreError>(value);
                    }
                    Err(Failure::Db(error)) if is_retryable(&error) && attempt < RETRIES => {}
                    Err(failure) => break Err(failure.into_store_error()),
                }
            }
        }
        .await
    }};
}

/// One queued delivery and where its receipt goes once its batch has committed (or failed).
struct Write {
    delivery: Box<NewDelivery>,
    reply: oneshot::Sender<Result<Receipt, StoreError>>,
}

pub struct PostgresStore {
    shared: Arc<Shared>,
    /// Dropped on close: writers drain what is queued, then stop.
    queue: Mutex<Option<mpsc::Sender<Write>>>,
    writers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// What the writers and the read paths share.
struct Shared {
    pool: Pool,
    /// Set once the migrations are applied (at start, or on the first use after the database
    /// became reachable).
    migrated: tokio::sync::OnceCell<()>,
    /// When deliveries last failed to commit, and why; cleared by the next batch that commits.
    last_failure: Mutex<Option<(Instant, Cause)>>,
    job_timeout: Duration,
    max_batch: usize,
    metrics: Arc<Metrics>,
}

impl PostgresStore {
    /// Connects, applies migrations and starts the writers. A database that cannot be reached
    /// yet is a fault to ride out (503 and not ready until it can); a URL that does not parse is
    /// a configuration error. For a maintenance command nothing connects before its first use.
    pub async fn open(
        settings: &StorageSettings,
        job_timeout: Duration,
        metrics: Arc<Metrics>,
        purpose: Purpose,
    ) -> anyhow::Result<Self> {
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
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_millis(settings.busy_timeout_ms)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .context("failed to set up the PostgreSQL connection pool")?;
        let shared = Arc::new(Shared {
            pool,
            migrated: tokio::sync::OnceCell::new(),
            last_failure: Mutex::new(None),
            job_timeout,
            max_batch: settings.max_batch,
            metrics,
        });
        let connected = match purpose {
            Purpose::Serve => shared.client().await.map(drop),
            Purpose::Maintain => Ok(()),
        };
        match connected {
            Ok(()) => tracing::info!(database = %mask_url_password(url), "using PostgreSQL"),
            Err(error @ StoreError::Internal(_)) => {
                anyhow::bail!("cannot use the PostgreSQL database: {}", ErrorChain(&error))
            }
            Err(error) => tracing::error!(
                database = %mask_url_password(url), error = %ErrorChain(&error),
                "PostgreSQL cannot be reached; answering 503 until it can"
            ),
        }
        let (queue, receiver) = mpsc::channel(WRITE_QUEUE);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let writers = (0..WRITERS)
            .map(|_| tokio::spawn(Arc::clone(&shared).run_writer(Arc::clone(&receiver))))
            .collect();
        Ok(Self {
            shared,
            queue: Mutex::new(Some(queue)),
            writers: Mutex::new(writers),
        })
    }

    /// Runs `work` on a pooled connection (reads).
    async fn read<T>(
        &self,
        work: impl AsyncFnOnce(&Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        let client = self.shared.client().await?;
        work(&client).await.map_err(store_error)
    }
}

impl Shared {
    /// A pooled connection to a migrated database.
    async fn client(&self) -> Result<Object, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        // On this same connection: waiting for a second one could exhaust the pool when many
        // requests arrive while the database has just come back.
        if self.migrated.get().is_none() {
            self.migrated
                .get_or_try_init(|| migrate(&mut client))
                .await?;
        }
        Ok(client)
    }

    fn observe_completions(&self, completions: &[JobCompletion]) {
        for completion in completions {
            self.metrics
                .job_completed(&completion.operation, completion.seconds);
        }
    }

    fn remember_failure(&self, cause: Option<Cause>) {
        if let Ok(mut last_failure) = self.last_failure.lock() {
            *last_failure = cause.map(|cause| (Instant::now(), cause));
        }
    }

    fn recent_failure(&self) -> Option<Cause> {
        self.last_failure
            .lock()
            .ok()
            .and_then(|last_failure| last_failure.clone())
            .filter(|(at, _)| at.elapsed() < FAILURE_MEMORY)
            .map(|(_, reason)| reason)
    }

    async fn run_writer(self: Arc<Self>, receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<Write>>>) {
        loop {
            let batch = {
                let mut receiver = receiver.lock().await;
                let Some(first) = receiver.recv().await else {
                    break;
                };
                let size = |write: &Write| {
                    let outcomes = match &write.delivery.content {
                        crate::storage::DeliveryContent::Callback(callback) => {
                            callback.outcomes.len()
                        }
                        crate::storage::DeliveryContent::Quarantined(_) => 0,
                    };
                    (write.delivery.body.len(), outcomes)
                };
                let (mut bytes, mut outcomes) = size(&first);
                let mut batch = vec![first];
                while batch.len() < self.max_batch
                    && bytes < MAX_BATCH_BYTES
                    && outcomes < MAX_BATCH_OUTCOMES
                {
                    match receiver.try_recv() {
                        Ok(write) => {
                            let (more_bytes, more_outcomes) = size(&write);
                            bytes += more_bytes;
                            outcomes += more_outcomes;
                            batch.push(write);
                        }
                        Err(_) => break,
                    }
                }
                batch
            };
            self.commit_batch(batch).await;
        }
        tracing::debug!("PostgreSQL writer stopped");
    }

    async fn commit_batch(&self, batch: Vec<Write>) {
        let started = Instant::now();
        let deliveries: Vec<&NewDelivery> =
            batch.iter().map(|write| write.delivery.as_ref()).collect();
        let results = match self.write(&deliveries).await {
            Ok((receipts, completions)) => {
                self.metrics
                    .store_committed(started.elapsed().as_secs_f64(), batch.len());
                self.observe_completions(&completions);
                self.remember_failure(None);
                receipts.into_iter().map(Ok).collect()
            }
            Err(StoreError::Internal(cause)) if deliveries.len() > 1 => {
                // One delivery failed on its own (a defect, not a storage fault): store the others
                // one by one, so that only that one is refused. Its edge logs its failure.
                tracing::debug!(error = %cause, "a delivery failed; writing the batch one delivery at a time");
                let mut results = Vec::with_capacity(deliveries.len());
                let mut outage: Option<StoreError> = None;
                for delivery in &deliveries {
                    // Once the database is away, the rest are answered 503 at once.
                    if let Some(error) = &outage {
                        results.push(Err(error.clone()));
                        continue;
                    }
                    results.push(match self.write(std::slice::from_ref(delivery)).await {
                        Ok((mut receipts, completions)) => {
                            self.observe_completions(&completions);
                            self.remember_failure(None);
                            receipts.pop().ok_or_else(|| {
                                StoreError::internal("the batch returned no receipt")
                            })
                        }
                        Err(error) => {
                            if let StoreError::Unavailable(cause) = &error {
                                self.remember_failure(Some(Arc::clone(cause)));
                                outage = Some(error.clone());
                            }
                            Err(error)
                        }
                    });
                }
                results
            }
            // Not logged here: each submitter's edge logs its failure, once.
            Err(error) => {
                if let StoreError::Unavailable(cause) = &error {
                    self.remember_failure(Some(Arc::clone(cause)));
                }
                batch.iter().map(|_| Err(error.clone())).collect()
            }
        };
        for (write, result) in batch.into_iter().zip(results) {
            let _ = write.reply.send(result);
        }
    }

    /// Writes `deliveries` in one transaction; retried on deadlock or serialization failure.
    async fn write(
        &self,
        deliveries: &[&NewDelivery],
    ) -> Result<(Vec<Receipt>, Vec<JobCompletion>), StoreError> {
        let mut client = self.client().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match write::write_batch(&mut client, deliveries, self.job_timeout).await {
                Err(Failure::Db(error)) if is_retryable(&error) && attempt < RETRIES => {
                    tracing::debug!(error = %error::DatabaseError::from(error), "batch conflicted with another replica; retrying");
                }
                result => return result.map_err(Failure::into_store_error),
            }
        }
    }
}

/// Applies the migrations not yet recorded, under an advisory lock: replicas starting together
/// apply each one once, the others wait and find it applied.
async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    let migrate = async {
        let transaction = client.transaction().await?;
        // A migration (or waiting for another replica's) may take longer than a write may.
        transaction
            .batch_execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
            .await?;
        transaction
            .execute(
                "SELECT pg_advisory_xact_lock(hashtext('m2m-listener migrations ' || current_schema()))",
                &[],
            )
            .await?;
        transaction
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version    INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .await?;
        let applied: i32 = transaction
            .query_one(
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                &[],
            )
            .await?
            .try_get(0)?;
        let applied = usize::try_from(applied).unwrap_or(0);
        if applied > MIGRATIONS.len() {
            return Ok(Err(StoreError::internal(format!(
                "the database schema is version {applied}, newer than this build knows ({}): upgrade m2m-listener",
                MIGRATIONS.len()
            ))));
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
            transaction.batch_execute(migration).await?;
            let version = i32::try_from(index + 1).unwrap_or(i32::MAX);
            transaction
                .execute(
                    "INSERT INTO schema_migrations (version) VALUES ($1)",
                    &[&version],
                )
                .await?;
            tracing::info!(version, "applied database migration");
        }
        transaction.commit().await?;
        Ok::<_, tokio_postgres::Error>(Ok(()))
    };
    match migrate.await {
        Ok(Ok(())) => Ok(()),
        Ok(refused) => refused,
        Err(error) => Err(store_error(error)),
    }
}

impl Store for PostgresStore {
    fn submit(&self, delivery: NewDelivery) -> BoxFuture<'_, Result<Receipt, StoreError>> {
        Box::pin(async move {
            let queue = self
                .queue
                .lock()
                .ok()
                .and_then(|queue| queue.clone())
                .ok_or(StoreError::Closed)?;
            let (reply, receipt) = oneshot::channel();
            queue
                .send(Write {
                    delivery: Box::new(delivery),
                    reply,
                })
                .await
                .map_err(|_| StoreError::Closed)?;
            receipt.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn check_writable(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let now = super::timestamp(OffsetDateTime::now_utc());
            transact!(self, |transaction, completions| {
                transaction
                    .execute(
                        "INSERT INTO heartbeat (id, checked_at) VALUES (1, $1)
                         ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                        &[&now],
                    )
                    .await?
            })?;
            match self.shared.recent_failure() {
                Some(cause) => Err(StoreError::Unavailable(Arc::new(Fault::caused_by_shared(
                    "the last delivery failed to commit",
                    cause,
                )))),
                None => Ok(()),
            }
        })
    }

    fn list_deliveries(
        &self,
        query: DeliveryQuery,
    ) -> BoxFuture<'_, Result<Page<DeliveryRecord>, StoreError>> {
        Box::pin(self.read(async move |client| queries::list_deliveries(client, &query).await))
    }

    fn raw_body(&self, delivery_id: i64) -> BoxFuture<'_, Result<RawBody, StoreError>> {
        Box::pin(self.read(async move |client| queries::raw_body(client, delivery_id).await))
    }

    fn register_job(
        &self,
        registration: Registration,
        now: OffsetDateTime,
    ) -> BoxFuture<'_, Result<Registered, StoreError>> {
        let job_timeout = self.shared.job_timeout;
        Box::pin(async move {
            let canonical = serde_json::to_string(&registration).map_err(|error| {
                StoreError::Internal(Arc::new(Fault::caused_by(
                    "the registration does not serialize",
                    error,
                )))
            })?;
            transact!(self, |transaction, completions| {
                jobs::register(
                    &transaction,
                    &registration,
                    &canonical,
                    now,
                    job_timeout,
                    &mut completions,
                )
                .await?
            })
        })
    }

    fn sweep_jobs(&self, now: OffsetDateTime) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut total = 0;
            loop {
                let (changed, locked) = transact!(self, |transaction, completions| {
                    jobs::sweep_chunk(&transaction, now, &mut completions).await?
                })?;
                total += changed;
                if locked < jobs::SWEEP_CHUNK {
                    return Ok(total);
                }
            }
        })
    }

    fn get_job(&self, request_id: String) -> BoxFuture<'_, Result<Option<JobRecord>, StoreError>> {
        Box::pin(
            self.read(async move |client| queries::job_by_request_id(client, &request_id).await),
        )
    }

    fn list_jobs(&self, query: JobQuery) -> BoxFuture<'_, Result<Page<JobRecord>, StoreError>> {
        Box::pin(self.read(async move |client| queries::list_jobs(client, &query).await))
    }

    fn job_devices(
        &self,
        request_id: String,
        now: OffsetDateTime,
    ) -> BoxFuture<'_, Result<Option<Vec<OutcomeRecord>>, StoreError>> {
        Box::pin(self.read(async move |client| {
            queries::job_devices(client, &request_id, &super::timestamp(now)).await
        }))
    }

    fn device_history(
        &self,
        identifier: DeviceIdentifier,
    ) -> BoxFuture<'_, Result<Option<DeviceHistory>, StoreError>> {
        Box::pin(self.read(async move |client| queries::device_history(client, &identifier).await))
    }

    fn prune_raw_bodies(&self, cutoff: OffsetDateTime) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let cutoff = super::timestamp(cutoff);
            let mut total = 0;
            loop {
                let deleted = transact!(self, |transaction, completions| {
                    queries::prune_chunk(&transaction, &cutoff, PRUNE_CHUNK).await?
                })?;
                total += deleted;
                if deleted < PRUNE_CHUNK as usize {
                    return Ok(total);
                }
            }
        })
    }

    fn job_counts(&self) -> BoxFuture<'_, Result<Vec<(String, i64)>, StoreError>> {
        Box::pin(self.read(async |client| queries::job_counts(client).await))
    }

    fn backup(&self, _target: std::path::PathBuf) -> BoxFuture<'_, Result<(), BackupError>> {
        Box::pin(async {
            Err(BackupError::Unsupported(
                "backup copies the SQLite file; with storage.url use PostgreSQL's own tools (pg_dump, base backups)",
            ))
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Writers drain what is queued, answer it, and stop once the queue is empty.
            if let Ok(mut queue) = self.queue.lock() {
                queue.take();
            }
            let writers = self
                .writers
                .lock()
                .map(|mut writers| std::mem::take(&mut *writers))
                .unwrap_or_default();
            for writer in writers {
                let _ = writer.await;
            }
            self.shared.pool.close();
        })
    }
}
