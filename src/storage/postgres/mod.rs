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

mod connection;
mod credentials;
mod error;
mod ids;
mod jobs;
mod outbox;
mod queries;
mod reprocess;
mod retention;
mod schema;
mod text;
mod tls;
mod write;
mod writer;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Object;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use super::batch::{WRITE_QUEUE, Write, prune_in_chunks};
use super::events::{
    AttemptOutcome, ClaimedEvent, EventDetail, EventQuery, EventRecord, SinkBacklog, SinkSpec,
};
use super::jobs::{JobCompletion, RegistrationPlan};
use super::{
    BackupError, BoxFuture, DeliveryQuery, DeliveryRecord, DeviceHistory, JobQuery, JobRecord,
    MessageQuery, MessageRecord, NewDelivery, OutcomeRecord, Page, Purpose, RawBody, Receipt,
    Registered, Store, StoreError,
};
use crate::configuration::{StorageSettings, mask_url_password};
use crate::domain::DeviceIdentifier;
use crate::jobs::Registration;
use crate::metrics::Metrics;
use crate::telemetry::ErrorChain;
use connection::Shared;
use error::{Failure, RETRIES, is_retryable, store_error};

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
                    outbox::insert(
                        &$transaction,
                        shared.record_events,
                        Vec::new(),
                        &$completions,
                    )
                    .await?;
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

pub struct PostgresStore {
    /// The pool and what the writers share with the read paths.
    shared: Arc<Shared>,
    /// Dropped on close: writers drain what is queued, then stop.
    queue: Mutex<Option<mpsc::Sender<Write>>>,
    /// Awaited on close, so that every queued delivery is answered before the pool closes.
    writers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
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
        let shared = Arc::new(Shared::new(settings, job_timeout, metrics)?);
        let url = settings.postgres_url().unwrap_or_default();
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
        let writers = (0..writer::WRITERS)
            .map(|_| tokio::spawn(writer::run(Arc::clone(&shared), Arc::clone(&receiver))))
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
            self.shared.memory().readiness(Instant::now())
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
        Box::pin(async move {
            let plan = RegistrationPlan::new(&registration, now, self.shared.job_timeout)?;
            transact!(self, |transaction, completions| {
                jobs::register(&transaction, &plan, now, &mut completions).await?
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

    fn reprocess(
        &self,
        query: crate::storage::reprocess::ReprocessQuery,
    ) -> BoxFuture<'_, Result<crate::storage::reprocess::ReprocessReport, StoreError>> {
        Box::pin(reprocess::reprocess(&self.shared, query))
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
        now: OffsetDateTime,
    ) -> BoxFuture<'_, Result<Option<DeviceHistory>, StoreError>> {
        Box::pin(self.read(async move |client| {
            queries::device_history(client, &identifier, &super::timestamp(now)).await
        }))
    }

    fn device_messages(
        &self,
        query: MessageQuery,
    ) -> BoxFuture<'_, Result<Page<MessageRecord>, StoreError>> {
        Box::pin(self.read(async move |client| queries::device_messages(client, &query).await))
    }

    fn prune_raw_bodies(&self, cutoff: OffsetDateTime) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let cutoff = &super::timestamp(cutoff);
            prune_in_chunks(move || async move {
                transact!(self, |transaction, completions| {
                    retention::prune_chunk(&transaction, cutoff).await?
                })
            })
            .await
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

    fn callback_credentials(
        &self,
    ) -> BoxFuture<'_, Result<Vec<crate::storage::credentials::StoredCredential>, StoreError>> {
        Box::pin(self.read(async |client| credentials::all(client).await))
    }

    fn rotate_callback_credentials(
        &self,
        rotation: crate::storage::credentials::Rotation,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let rotation = &rotation;
            transact!(self, |transaction, completions| {
                credentials::rotate(&transaction, rotation).await?
            })
        })
    }

    fn list_events(
        &self,
        query: EventQuery,
    ) -> BoxFuture<'_, Result<Page<EventRecord>, StoreError>> {
        Box::pin(self.read(async move |client| outbox::list(client, &query).await))
    }

    fn event_detail(&self, row: i64) -> BoxFuture<'_, Result<Option<EventDetail>, StoreError>> {
        Box::pin(self.read(async move |client| outbox::detail(client, row).await))
    }

    fn redeliver_event(
        &self,
        row: i64,
        now: OffsetDateTime,
    ) -> BoxFuture<'_, Result<Option<Vec<String>>, StoreError>> {
        Box::pin(async move {
            let now = &super::timestamp(now);
            transact!(self, |transaction, completions| {
                outbox::redeliver(&transaction, row, now).await?
            })
        })
    }

    fn register_sinks(&self, sinks: Vec<SinkSpec>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let sinks = &sinks;
            transact!(self, |transaction, completions| {
                outbox::register_sinks(&transaction, sinks).await?
            })
        })
    }

    fn claim_events(
        &self,
        sink: SinkSpec,
        owner: String,
        now: OffsetDateTime,
        lease: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<ClaimedEvent>, StoreError>> {
        Box::pin(async move {
            let lease_until = &super::timestamp(now + lease);
            let now = &super::timestamp(now);
            let (sink, owner) = (&sink, &owner);
            transact!(self, |transaction, completions| {
                outbox::claim(&transaction, sink, owner, now, lease_until, limit).await?
            })
        })
    }

    fn record_attempts(
        &self,
        attempts: Vec<AttemptOutcome>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let attempts = &attempts;
            transact!(self, |transaction, completions| {
                outbox::record(&transaction, attempts).await?
            })
        })
    }

    fn event_backlog(&self) -> BoxFuture<'_, Result<Vec<SinkBacklog>, StoreError>> {
        Box::pin(self.read(async |client| outbox::backlog(client).await))
    }

    fn prune_events(&self, cutoff: OffsetDateTime) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let cutoff = &super::timestamp(cutoff);
            transact!(self, |transaction, completions| {
                outbox::prune(&transaction, cutoff).await?
            })
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
