//! The embedded backend: one SQLite file in WAL mode.
//!
//! One writer thread owns the read-write connection ([`writer`]). It takes every delivery queued
//! since its last commit, writes them in one transaction (no savepoint on the fast path; only a
//! delivery that fails on its own makes it write that batch again with a savepoint per delivery),
//! commits once, and only then answers each submitter: group commit, so that 64 concurrent
//! callbacks cost about one fsync rather than 64. Readers use their own read-only connections on
//! the blocking pool and never wait for the writer ([`connection`]).

mod bind;
mod connection;
mod credentials;
mod error;
mod jobs;
mod outbox;
mod queries;
mod reprocess;
mod retention;
mod schema;
mod write;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rusqlite::Connection;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use super::batch::{FailureMemory, WRITE_QUEUE, Write, prune_in_chunks};
use super::{
    BackupError, BoxFuture, DeliveryQuery, DeliveryRecord, DeviceHistory, Fault, JobQuery,
    JobRecord, MessageQuery, MessageRecord, NewDelivery, OutcomeRecord, Page, Purpose, RawBody,
    Receipt, Registered, Store, StoreError, timestamp,
};
use crate::configuration::StorageSettings;
use crate::domain::DeviceIdentifier;
use crate::jobs::Registration;
use crate::metrics::Metrics;
use crate::storage::events::{
    AttemptOutcome, ClaimedEvent, EventDetail, EventQuery, EventRecord, SinkBacklog, SinkSpec,
};
use crate::storage::reprocess::{ReprocessQuery, ReprocessReport};
use connection::{
    Readers, create_private_database, is_transient_open_failure, open_and_migrate, open_writer,
    run_checkpoints,
};
use writer::{Command, Writer, free_deliveries};

pub struct SqliteStore {
    /// The writer thread's queue.
    commands: mpsc::Sender<Command>,
    /// Joined on close, so that the last commit happens before the process exits.
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Dropping it stops the checkpointer thread.
    stop_checkpoints: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// Read-only connections for the API, on the blocking pool.
    readers: Arc<Readers>,
    /// The database file (what `backup` copies; what the banner shows).
    path: PathBuf,
    /// `storage.synchronous`, which the writer's connection is set back to after outbox work.
    synchronous: &'static str,
    /// Whether commits write events: what [`NewDelivery::prepared`] prepares for the writer.
    record_events: bool,
}

impl SqliteStore {
    /// Opens the database and starts the writer thread: to serve, creating the database if
    /// needed and applying migrations; to maintain, only an existing one, as it is.
    /// `job_timeout` is the deadline of jobs that do not set their own.
    pub fn open(
        settings: &StorageSettings,
        job_timeout: Duration,
        metrics: Arc<Metrics>,
        purpose: Purpose,
    ) -> anyhow::Result<Self> {
        let path = settings.path.clone();
        match purpose {
            Purpose::Serve => {
                if let Some(directory) = path
                    .parent()
                    .filter(|parent| !parent.as_os_str().is_empty())
                {
                    crate::private_files::create_directory_all(directory).with_context(|| {
                        format!(
                            "failed to create database directory {}",
                            directory.display()
                        )
                    })?;
                }
                create_private_database(&path)?;
            }
            Purpose::Maintain => anyhow::ensure!(
                path.exists(),
                "failed to open database at {}: there is no such file",
                path.display()
            ),
        }
        let opened = match purpose {
            Purpose::Serve => open_and_migrate(&path, settings),
            Purpose::Maintain => open_writer(&path, settings).map_err(anyhow::Error::new),
        };
        let connection = match opened {
            Ok(connection) => Some(connection),
            // An existing database that cannot be written right now (read-only volume, lock held
            // by another process) is a fault to ride out: the listener starts, answers 503 so the
            // platform retries, reports not ready, and reopens on every attempt until it works. A
            // database that cannot even be created is a configuration error.
            Err(error) if path.exists() && is_transient_open_failure(&error) => {
                tracing::error!(
                    path = %path.display(), error = %format!("{error:#}"),
                    "database cannot be opened for writing; answering 503 until it can"
                );
                None
            }
            Err(error) => {
                return Err(error.context(format!("failed to open database at {}", path.display())));
            }
        };
        let readers = Arc::new(Readers::new(path.clone()));
        let (commands, receiver) = mpsc::channel(WRITE_QUEUE);
        let (freed, to_free) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("sqlite-free".to_owned())
            .spawn(move || free_deliveries(to_free))
            .context("failed to start the SQLite writer's freeing thread")?;
        let writer = Writer {
            connection: connection.map(bind::WriterConnection::new),
            readers: Arc::clone(&readers),
            path: path.clone(),
            settings: settings.clone(),
            purpose,
            memory: FailureMemory::default(),
            job_timeout,
            metrics,
            freed,
        };
        let writer_thread = std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || writer.run(receiver))
            .context("failed to start the SQLite writer thread")?;
        let (stop_checkpoints, stopped) = std::sync::mpsc::channel();
        let checkpoint_path = path.clone();
        let generation = Arc::clone(&readers.generation);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".to_owned())
            .spawn(move || run_checkpoints(&checkpoint_path, &generation, &stopped))
            .context("failed to start the SQLite checkpoint thread")?;
        Ok(Self {
            commands,
            writer_thread: Mutex::new(Some(writer_thread)),
            stop_checkpoints: Mutex::new(Some(stop_checkpoints)),
            readers,
            path,
            synchronous: settings.synchronous.pragma_value(),
            record_events: settings.record_events,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends a command to the writer thread and waits for its answer.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs outbox work on the writer thread, in a transaction of its own.
    async fn outbox<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let synchronous = self.synchronous;
        self.ask(move |reply| {
            Command::Outbox(Box::new(move |connection| {
                let result = connection.and_then(|connection| {
                    // Without an fsync of its own: what an outbox commit records (a lease, an
                    // attempt) is at worst done again after a power loss (delivery is at least
                    // once), and the next callback commit syncs the WAL these frames are in. So
                    // dispatching costs the callbacks no fsync.
                    let run = || -> rusqlite::Result<T> {
                        connection.pragma_update(None, "synchronous", "NORMAL")?;
                        let transaction = connection.unchecked_transaction()?;
                        let value = work(&transaction)?;
                        transaction.commit()?;
                        Ok(value)
                    };
                    let result = run();
                    let restored = connection.pragma_update(None, "synchronous", synchronous);
                    result
                        .and_then(|value| restored.map(|()| value))
                        .map_err(error::store_error)
                });
                let _ = reply.send(result);
            }))
        })
        .await
    }

    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || readers.with(query))
            .await
            .map_err(|error| {
                StoreError::Internal(Arc::new(Fault::caused_by("reader task failed", error)))
            })?
    }
}

impl Store for SqliteStore {
    fn submit(&self, delivery: NewDelivery) -> BoxFuture<'_, Result<Receipt, StoreError>> {
        // On the submitting task, not on the writer thread.
        delivery.prepared(self.record_events);
        Box::pin(self.ask(move |reply| {
            Command::Write(Write {
                delivery: Box::new(delivery),
                reply,
            })
        }))
    }

    fn check_writable(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.ask(Command::Probe))
    }

    fn list_deliveries(
        &self,
        query: DeliveryQuery,
    ) -> BoxFuture<'_, Result<Page<DeliveryRecord>, StoreError>> {
        Box::pin(self.read(move |connection| queries::list_deliveries(connection, &query)))
    }

    fn raw_body(&self, delivery_id: i64) -> BoxFuture<'_, Result<RawBody, StoreError>> {
        Box::pin(self.read(move |connection| queries::raw_body(connection, delivery_id)))
    }

    fn register_job(
        &self,
        registration: Registration,
        now: OffsetDateTime,
    ) -> BoxFuture<'_, Result<Registered, StoreError>> {
        Box::pin(self.ask(move |reply| Command::Register(Box::new(registration), now, reply)))
    }

    fn sweep_jobs(&self, now: OffsetDateTime) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.ask(move |reply| Command::Sweep(now, reply)))
    }

    fn reprocess(
        &self,
        query: ReprocessQuery,
    ) -> BoxFuture<'_, Result<ReprocessReport, StoreError>> {
        let now = OffsetDateTime::now_utc();
        Box::pin(self.ask(move |reply| Command::Reprocess(Box::new(query), now, reply)))
    }

    fn get_job(&self, request_id: String) -> BoxFuture<'_, Result<Option<JobRecord>, StoreError>> {
        Box::pin(self.read(move |connection| queries::job_by_request_id(connection, &request_id)))
    }

    fn list_jobs(&self, query: JobQuery) -> BoxFuture<'_, Result<Page<JobRecord>, StoreError>> {
        Box::pin(self.read(move |connection| queries::list_jobs(connection, &query)))
    }

    fn job_devices(
        &self,
        request_id: String,
        now: OffsetDateTime,
    ) -> BoxFuture<'_, Result<Option<Vec<OutcomeRecord>>, StoreError>> {
        Box::pin(
            self.read(move |connection| {
                queries::job_devices(connection, &request_id, &timestamp(now))
            }),
        )
    }

    fn device_history(
        &self,
        identifier: DeviceIdentifier,
        now: OffsetDateTime,
    ) -> BoxFuture<'_, Result<Option<DeviceHistory>, StoreError>> {
        Box::pin(self.read(move |connection| {
            queries::device_history(connection, &identifier, &timestamp(now))
        }))
    }

    fn device_messages(
        &self,
        query: MessageQuery,
    ) -> BoxFuture<'_, Result<Page<MessageRecord>, StoreError>> {
        Box::pin(self.read(move |connection| queries::device_messages(connection, &query)))
    }

    fn prune_raw_bodies(&self, cutoff: OffsetDateTime) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(prune_in_chunks(move || {
            self.ask(move |reply| Command::Prune(cutoff, reply))
        }))
    }

    fn job_counts(&self) -> BoxFuture<'_, Result<Vec<(String, i64)>, StoreError>> {
        Box::pin(self.read(queries::job_counts))
    }

    fn backup(&self, target: PathBuf) -> BoxFuture<'_, Result<(), BackupError>> {
        let path = self.path.clone();
        Box::pin(async move {
            // On the blocking pool, not the writer thread: commits go on during the copy.
            tokio::task::spawn_blocking(move || retention::backup_database(&path, &target))
                .await
                .map_err(|error| BackupError::Failed(Box::new(error)))?
                .map_err(|error| BackupError::Failed(error.into()))
        })
    }

    fn callback_credentials(
        &self,
    ) -> BoxFuture<'_, Result<Vec<crate::storage::credentials::StoredCredential>, StoreError>> {
        Box::pin(self.read(credentials::all))
    }

    fn rotate_callback_credentials(
        &self,
        rotation: crate::storage::credentials::Rotation,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.ask(move |reply| Command::RotateCredentials(Box::new(rotation), reply)))
    }

    fn list_events(
        &self,
        query: EventQuery,
    ) -> BoxFuture<'_, Result<Page<EventRecord>, StoreError>> {
        Box::pin(self.read(move |connection| outbox::list(connection, &query)))
    }

    fn event_detail(&self, row: i64) -> BoxFuture<'_, Result<Option<EventDetail>, StoreError>> {
        Box::pin(self.read(move |connection| outbox::detail(connection, row)))
    }

    fn redeliver_event(
        &self,
        row: i64,
        now: OffsetDateTime,
    ) -> BoxFuture<'_, Result<Option<Vec<String>>, StoreError>> {
        let now = timestamp(now);
        Box::pin(self.outbox(move |connection| outbox::redeliver(connection, row, &now)))
    }

    fn register_sinks(&self, sinks: Vec<SinkSpec>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.outbox(move |connection| outbox::register_sinks(connection, &sinks)))
    }

    fn claim_events(
        &self,
        sink: SinkSpec,
        owner: String,
        now: OffsetDateTime,
        lease: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<ClaimedEvent>, StoreError>> {
        let lease_until = timestamp(now + lease);
        let now = timestamp(now);
        Box::pin(self.outbox(move |connection| {
            outbox::claim(connection, &sink, &owner, &now, &lease_until, limit)
        }))
    }

    fn record_attempts(
        &self,
        attempts: Vec<AttemptOutcome>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.outbox(move |connection| outbox::record(connection, &attempts)))
    }

    fn event_backlog(&self) -> BoxFuture<'_, Result<Vec<SinkBacklog>, StoreError>> {
        Box::pin(self.read(outbox::backlog))
    }

    fn prune_events(&self, cutoff: OffsetDateTime) -> BoxFuture<'_, Result<usize, StoreError>> {
        let cutoff = timestamp(cutoff);
        Box::pin(self.outbox(move |connection| outbox::prune(connection, &cutoff)))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Queued writes ahead of this command are still committed and answered.
            let _ = self.commands.send(Command::Shutdown).await;
            if let Ok(mut stop) = self.stop_checkpoints.lock() {
                stop.take();
            }
            let thread = self
                .writer_thread
                .lock()
                .ok()
                .and_then(|mut thread| thread.take());
            if let Some(thread) = thread {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
        })
    }
}
