//! The embedded backend: one SQLite file in WAL mode.
//!
//! One writer thread owns the read-write connection. It takes every delivery queued since its last
//! commit, writes them in one transaction (each in its own savepoint, so one bad delivery cannot
//! fail the others), commits once, and only then answers each submitter: group commit, so that
//! 64 concurrent callbacks cost about one fsync rather than 64. Readers use their own read-only
//! connections on the blocking pool and never wait for the writer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rusqlite::{Connection, OpenFlags, ToSql, TransactionBehavior, params, params_from_iter};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

mod error;
mod jobs;
mod queries;
mod retention;

use crate::storage::rows::JobCompletion;
use jobs::JobBatch;
mod schema;

use super::{
    BackupError, BoxFuture, Cause, DeliveryContent, DeliveryQuery, DeliveryRecord, DeviceHistory,
    Fault, JobQuery, JobRecord, NewDelivery, OutcomeRecord, Page, Purpose, RawBody, Receipt,
    Registered, Store, StoreError, timestamp,
};
use crate::configuration::StorageSettings;
use crate::domain::{Callback, DeliveryResult, DeviceIdentifier, DeviceOutcome, Operation};
use crate::jobs::Registration;
use crate::metrics::Metrics;
use error::{is_storage_wide, needs_reopen, store_error};
use schema::MIGRATIONS;

/// Idle read-only connections kept for reuse.
const MAX_IDLE_READERS: usize = 4;
/// Queued writes waiting for the writer; submitters wait (back-pressure) beyond this.
const WRITE_QUEUE: usize = 4096;
/// Readiness stays false this long after deliveries failed to commit, unless one commits since: a
/// probe row can still fit on a disk too full for a real callback. Bounded, so that readiness does
/// not stay false forever when traffic stops because of it.
const FAILURE_MEMORY: Duration = Duration::from_secs(30);

/// Where the writer sends a delivery's receipt once its batch has committed (or failed).
type ReceiptSender = oneshot::Sender<Result<Receipt, StoreError>>;

enum Command {
    Write(
        Box<NewDelivery>,
        oneshot::Sender<Result<Receipt, StoreError>>,
    ),
    Probe(oneshot::Sender<Result<(), StoreError>>),
    Register(
        Box<Registration>,
        OffsetDateTime,
        oneshot::Sender<Result<Registered, StoreError>>,
    ),
    Sweep(OffsetDateTime, oneshot::Sender<Result<u64, StoreError>>),
    /// One chunk of raw bodies received before the cutoff.
    Prune(OffsetDateTime, oneshot::Sender<Result<usize, StoreError>>),
    Shutdown,
}

pub struct SqliteStore {
    /// The writer thread's queue.
    commands: mpsc::Sender<Command>,
    /// Joined on close, so that the last commit happens before the process exits.
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Dropping it stops the checkpointer thread.
    stop_checkpoints: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    readers: Arc<Readers>,
    path: PathBuf,
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
        let readers = Arc::new(Readers {
            path: path.clone(),
            idle: Mutex::new(Vec::new()),
            generation: Arc::new(AtomicU64::new(0)),
        });
        let (commands, receiver) = mpsc::channel(WRITE_QUEUE);
        let writer = Writer {
            connection,
            readers: Arc::clone(&readers),
            path: path.clone(),
            settings: settings.clone(),
            purpose,
            last_failure: None,
            job_timeout,
            metrics,
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
        Box::pin(self.ask(move |reply| Command::Write(Box::new(delivery), reply)))
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
    ) -> BoxFuture<'_, Result<Option<DeviceHistory>, StoreError>> {
        Box::pin(self.read(move |connection| queries::device_history(connection, &identifier)))
    }

    fn prune_raw_bodies(&self, cutoff: OffsetDateTime) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let mut total = 0;
            loop {
                let deleted = self.ask(move |reply| Command::Prune(cutoff, reply)).await?;
                total += deleted;
                if deleted < retention::PRUNE_CHUNK as usize {
                    return Ok(total);
                }
            }
        })
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

/// Creates the database file 0600 before SQLite does (SQLite would make it 0644, and gives its
/// `-wal` and `-shm` files the database file's mode, so all three are private this way); warns
/// about an existing one that others can read.
fn create_private_database(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        crate::private_files::warn_if_shared(path, "database file");
        return Ok(());
    }
    match crate::private_files::create_new(path) {
        // An empty file is an empty database to SQLite.
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(anyhow::Error::new(error)
            .context(format!("failed to create database at {}", path.display()))),
    }
}

fn open_writer(path: &Path, settings: &StorageSettings) -> rusqlite::Result<Connection> {
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(Duration::from_millis(settings.busy_timeout_ms))?;
    // Takes effect only on a new database (before its first table): pruned raw bodies then give
    // their space back through incremental vacuum.
    connection.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", settings.synchronous.pragma_value())?;
    connection.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)?;
    // Once a checkpoint has caught up, the WAL is cut back to this size (bytes).
    connection.pragma_update(None, "journal_size_limit", 16 * 1024 * 1024)?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    // Statement journals (savepoints) in memory, not in temporary files.
    connection.pragma_update(None, "temp_store", "MEMORY")?;
    // A stable query plan: without it SQLite recompiles a statement whenever a rebound parameter
    // might change its plan (partial indexes, STAT4), which profiling showed on most statements
    // of the writer. The plans here are simple index lookups that no binding improves.
    connection.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    connection.set_prepared_statement_cache_capacity(64);
    Ok(connection)
}

/// How often the checkpointer copies committed WAL frames into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
/// The writer checkpoints by itself only past this many WAL pages (~40 MiB): a safety net for
/// when the checkpointer cannot run.
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 10_000;

/// Checkpoints the WAL from a connection of its own, so that copying pages into the database
/// file does not hold up the writer thread (and with it every acknowledgement). PASSIVE never
/// blocks the writer. Stops when `stop` is dropped.
///
/// A connection of an older [`Readers::generation`] is closed, and so is one whose checkpoint
/// failed: opened while the volume was read-only, it would keep a read-only `-shm` mapping that
/// the writer's next connection shares.
fn run_checkpoints(path: &Path, generation: &AtomicU64, stop: &std::sync::mpsc::Receiver<()>) {
    let mut connection: Option<(u64, Connection)> = None;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(CHECKPOINT_INTERVAL)
    {
        let current = generation.load(Ordering::Acquire);
        if connection
            .as_ref()
            .is_some_and(|(opened_in, _)| *opened_in != current)
        {
            connection = None;
        }
        if connection.is_none() {
            connection = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .and_then(|opened| {
                opened.busy_timeout(Duration::from_millis(100))?;
                Ok((current, opened))
            })
            .ok();
        }
        let Some((_, open)) = &connection else {
            continue;
        };
        if let Err(error) = open.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(%error, "checkpoint failed; retrying");
            connection = None;
        }
    }
}

fn open_and_migrate(path: &Path, settings: &StorageSettings) -> anyhow::Result<Connection> {
    let mut connection = open_writer(path, settings)?;
    let applied: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    anyhow::ensure!(
        usize::try_from(applied).unwrap_or(usize::MAX) <= MIGRATIONS.len(),
        "the database schema is version {applied}, newer than this build knows ({}): upgrade m2m-listener",
        MIGRATIONS.len()
    );
    migrate(&mut connection)?;
    Ok(connection)
}

/// Applies the migrations not yet recorded in `PRAGMA user_version`.
fn migrate(connection: &mut Connection) -> rusqlite::Result<()> {
    let applied: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(usize::MAX);
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        transaction.execute_batch(migration)?;
        transaction.pragma_update(
            None,
            "user_version",
            i64::try_from(index + 1).unwrap_or(i64::MAX),
        )?;
        transaction.commit()?;
        tracing::info!(version = index + 1, "applied database migration");
    }
    Ok(())
}

fn is_transient_open_failure(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<rusqlite::Error>()
        .is_some_and(is_storage_wide)
}

/// The writer thread's state.
struct Writer {
    /// `None` after a fault that may have left the connection unusable (read-only file, I/O
    /// error); the next batch reopens it, which is how the store recovers without a restart.
    connection: Option<Connection>,
    /// Retired whenever the connection is (re)opened: see [`Readers::retire`].
    readers: Arc<Readers>,
    path: PathBuf,
    settings: StorageSettings,
    /// Whether a reopened connection applies the migrations (not for a maintenance command).
    purpose: Purpose,
    /// When deliveries last failed to commit, and why; cleared by the next delivery that commits.
    last_failure: Option<(std::time::Instant, Cause)>,
    /// The deadline of jobs that do not set their own.
    job_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Writer {
    fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
        while let Some(first) = receiver.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < self.settings.max_batch {
                match receiver.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            let mut writes = Vec::with_capacity(batch.len());
            let mut probes = Vec::new();
            for command in batch {
                match command {
                    Command::Write(delivery, reply) => writes.push((delivery, reply)),
                    Command::Probe(reply) => probes.push(reply),
                    // Registrations and sweeps are rare: each gets its own transaction.
                    Command::Register(registration, now, reply) => {
                        let job_timeout = self.job_timeout;
                        let _ = reply.send(self.transact(|connection, completions| {
                            jobs::register(connection, &registration, now, job_timeout, completions)
                        }));
                    }
                    Command::Prune(cutoff, reply) => {
                        let _ =
                            reply.send(self.transact(|connection, _| {
                                retention::prune_chunk(connection, cutoff)
                            }));
                    }
                    Command::Sweep(now, reply) => {
                        let _ = reply.send(self.transact(|connection, completions| {
                            jobs::sweep(connection, now, completions)
                        }));
                    }
                    // Stop taking commands; those already queued are still drained below.
                    Command::Shutdown => receiver.close(),
                }
            }
            if !writes.is_empty() || !probes.is_empty() {
                self.commit_batch(writes, probes);
            }
        }
        tracing::debug!("SQLite writer stopped");
    }

    fn commit_batch(
        &mut self,
        writes: Vec<(Box<NewDelivery>, ReceiptSender)>,
        probes: Vec<oneshot::Sender<Result<(), StoreError>>>,
    ) {
        let job_timeout = self.job_timeout;
        let started = std::time::Instant::now();
        let outcome = self.connection().and_then(|connection| {
            let deliveries: Vec<&NewDelivery> = writes
                .iter()
                .map(|(delivery, _)| delivery.as_ref())
                .collect();
            write_batch(connection, &deliveries, job_timeout)
        });
        match outcome {
            Ok((results, completions)) => {
                self.metrics
                    .store_committed(started.elapsed().as_secs_f64(), writes.len());
                self.observe_completions(&completions);
                if results.iter().any(Result::is_ok) {
                    self.last_failure = None;
                }
                for ((_, reply), result) in writes.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
                let recent_failure = self
                    .last_failure
                    .as_ref()
                    .filter(|(at, _)| at.elapsed() < FAILURE_MEMORY)
                    .map(|(_, cause)| Arc::clone(cause));
                for probe in probes {
                    let _ = probe.send(match &recent_failure {
                        Some(cause) => {
                            Err(StoreError::Unavailable(Arc::new(Fault::caused_by_shared(
                                "the last delivery failed to commit",
                                Arc::clone(cause),
                            ))))
                        }
                        None => Ok(()),
                    });
                }
            }
            // Not logged here: each submitter's edge logs its failure, once.
            Err(error) => {
                if needs_reopen(&error) {
                    self.connection = None;
                }
                let failure = store_error(error);
                let cause = failure
                    .cause()
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Fault::new("the batch failed to commit")));
                if !writes.is_empty() {
                    self.last_failure = Some((std::time::Instant::now(), Arc::clone(&cause)));
                }
                for (_, reply) in writes {
                    let _ = reply.send(Err(failure.clone()));
                }
                for probe in probes {
                    let _ = probe.send(Err(StoreError::Unavailable(Arc::clone(&cause))));
                }
            }
        }
    }

    /// Runs `work` in its own transaction.
    fn transact<T>(
        &mut self,
        work: impl FnOnce(&Connection, &mut Vec<JobCompletion>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut completions = Vec::new();
        let result = self.connection().and_then(|connection| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = work(&transaction, &mut completions)?;
            transaction.commit()?;
            Ok(value)
        });
        if result.is_ok() {
            self.observe_completions(&completions);
        }
        result.map_err(|error| {
            if needs_reopen(&error) {
                self.connection = None;
            }
            store_error(error)
        })
    }

    fn observe_completions(&self, completions: &[JobCompletion]) {
        for completion in completions {
            self.metrics
                .job_completed(&completion.operation, completion.seconds);
        }
    }

    fn connection(&mut self) -> rusqlite::Result<&mut Connection> {
        if self.connection.is_none() {
            self.readers.retire();
            let mut connection = open_writer(&self.path, &self.settings)?;
            // A no-op unless the database could not be migrated at start.
            if self.purpose == Purpose::Serve {
                migrate(&mut connection)?;
            }
            tracing::info!(path = %self.path.display(), "reopened the database for writing");
            self.connection = Some(connection);
        }
        self.connection
            .as_mut()
            .ok_or(rusqlite::Error::InvalidQuery)
    }
}

/// One result per delivery of a committed batch, and the jobs it completed.
type CommittedBatch = (Vec<Result<Receipt, StoreError>>, Vec<JobCompletion>);

/// Writes every delivery and the heartbeat in one transaction. `Err` means nothing was committed;
/// `Ok` holds one result per delivery, all committed except those that failed on their own.
///
/// The fast path writes the batch without savepoints. Only if one delivery fails on its own (a
/// defect, not a storage fault) is the batch written again with a savepoint per delivery, so
/// that the others are still stored.
fn write_batch(
    connection: &mut Connection,
    deliveries: &[&NewDelivery],
    job_timeout: Duration,
) -> rusqlite::Result<CommittedBatch> {
    match write_deliveries(connection, deliveries, job_timeout, false) {
        Err(error) if !is_storage_wide(&error) => {
            // The delivery's own edge logs its failure; this says only why the batch is redone.
            tracing::debug!(%error, "a delivery failed; writing the batch one delivery at a time");
            write_deliveries(connection, deliveries, job_timeout, true)
        }
        written => written,
    }
}

fn write_deliveries(
    connection: &mut Connection,
    deliveries: &[&NewDelivery],
    job_timeout: Duration,
    isolate: bool,
) -> rusqlite::Result<CommittedBatch> {
    let mut transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(deliveries.len());
    let mut jobs = JobBatch::default();
    for delivery in deliveries {
        if !isolate {
            results.push(Ok(insert_delivery(
                &transaction,
                delivery,
                job_timeout,
                &mut jobs,
            )?));
            continue;
        }
        let before = jobs.clone();
        let savepoint = transaction.savepoint()?;
        match insert_delivery(&savepoint, delivery, job_timeout, &mut jobs) {
            Ok(receipt) => {
                savepoint.commit()?;
                results.push(Ok(receipt));
            }
            Err(error) if is_storage_wide(&error) => return Err(error),
            Err(error) => {
                // Dropping the savepoint rolls back this delivery only.
                drop(savepoint);
                jobs = before;
                results.push(Err(store_error(error)));
            }
        }
    }
    let mut completions = Vec::new();
    jobs.finish(&transaction, &mut completions)?;
    transaction.execute(
        "INSERT INTO heartbeat (id, checked_at) VALUES (1, ?1)
         ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
        [timestamp(OffsetDateTime::now_utc())],
    )?;
    transaction.commit()?;
    Ok((results, completions))
}

/// A count as SQLite stores it (counts past `i64::MAX` do not occur; they read as unknown).
pub(super) fn sql_count(value: Option<u64>) -> Option<i64> {
    value.and_then(|value| i64::try_from(value).ok())
}

/// Inserts `rows` with one cached single-row statement `head VALUES (?, ...) tail`. (Multi-row
/// statements built per call measured slower: their SQL text is formatted and looked up each time.)
pub(super) fn insert_rows<const WIDTH: usize>(
    connection: &Connection,
    head: &str,
    tail: &str,
    rows: &[[&dyn ToSql; WIDTH]],
) -> rusqlite::Result<()> {
    let placeholders = format!("({})", vec!["?"; WIDTH].join(", "));
    let mut statement =
        connection.prepare_cached(&format!("{head} VALUES {placeholders} {tail}"))?;
    for row in rows {
        statement.execute(params_from_iter(row.iter()))?;
    }
    Ok(())
}

fn insert_delivery(
    transaction: &Connection,
    delivery: &NewDelivery,
    job_timeout: Duration,
    jobs: &mut JobBatch,
) -> rusqlite::Result<Receipt> {
    let received_at = timestamp(delivery.received_at);
    let (callback, parse_error) = match &delivery.content {
        DeliveryContent::Callback(callback) => (Some(callback.as_ref()), None),
        DeliveryContent::Quarantined(unreadable) => (None, Some(unreadable.reason.as_str())),
    };
    let first_result = if callback.is_some() {
        DeliveryResult::Stored
    } else {
        DeliveryResult::Quarantined
    };
    let fault = callback.and_then(|callback| callback.fault.as_ref());
    // A job takes its operation from the first callback that names one.
    let job_operation = callback
        .map(|callback| callback.operation)
        .filter(|operation| *operation != Operation::Other)
        .map(Operation::as_str);
    let insert = |result: DeliveryResult, duplicate_of: Option<i64>| -> rusqlite::Result<usize> {
        transaction.prepare_cached(
            "INSERT INTO deliveries (received_at, form, kind, operation, request_id, callback_count,
                 max_callback_threshold, dedup_key, result, duplicate_of, size, content_type, source_address,
                 account, status, fault_code, fault_message, comment, details, parse_error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)
             ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            received_at,
            callback.map(|callback| callback.form.as_str()),
            callback.map(|callback| callback.kind.as_str()),
            callback.map(|callback| callback.operation.as_str()),
            delivery.content.request_id(),
            delivery.content.callback_count(),
            callback.and_then(|callback| callback.max_callback_threshold),
            &delivery.content.dedup_key()[..],
            result.as_str(),
            duplicate_of,
            i64::try_from(delivery.body.len()).unwrap_or(i64::MAX),
            delivery.content_type,
            delivery.source_address,
            delivery.account,
            callback.and_then(|callback| callback.status.as_deref()),
            fault.map(|fault| fault.code.as_str()),
            fault.map(|fault| fault.message.as_str()),
            callback.and_then(|callback| callback.comment.as_deref()),
            callback.and_then(|callback| callback.details.as_ref()).map(|details| details.to_string()),
            parse_error,
        ])
    };

    if insert(first_result, None)? == 0 {
        // The message is already stored: record this re-delivery against the first one.
        let original: i64 = transaction
            .prepare_cached(
                "SELECT id FROM deliveries WHERE dedup_key = ?1 AND duplicate_of IS NULL",
            )?
            .query_row([&delivery.content.dedup_key()[..]], |row| row.get(0))?;
        transaction
            .prepare_cached("UPDATE deliveries SET duplicates = duplicates + 1 WHERE id = ?1")?
            .execute([original])?;
        insert(DeliveryResult::Duplicate, Some(original))?;
        let delivery_id = transaction.last_insert_rowid();
        if let Some(request_id) = delivery.content.request_id() {
            jobs.record_delivery(
                transaction,
                request_id,
                job_operation,
                delivery.received_at,
                true,
                job_timeout,
            )?;
        }
        return Ok(Receipt {
            delivery_id,
            result: DeliveryResult::Duplicate,
            duplicate_of: Some(original),
        });
    }
    let delivery_id = transaction.last_insert_rowid();
    transaction
        .prepare_cached("INSERT INTO raw_bodies (delivery_id, body) VALUES (?1, ?2)")?
        .execute(params![delivery_id, &delivery.body[..]])?;
    let job_id = match delivery.content.request_id() {
        Some(request_id) => Some(jobs.record_delivery(
            transaction,
            request_id,
            job_operation,
            delivery.received_at,
            false,
            job_timeout,
        )?),
        None => None,
    };
    if let Some(callback) = callback {
        insert_outcomes(
            transaction,
            delivery_id,
            &received_at,
            callback,
            job_id.map(|job_id| (job_id, jobs)),
        )?;
    }
    Ok(Receipt {
        delivery_id,
        result: first_result,
        duplicate_of: None,
    })
}

fn insert_outcomes(
    transaction: &Connection,
    delivery_id: i64,
    received_at: &str,
    callback: &Callback,
    mut job: Option<(i64, &mut JobBatch)>,
) -> rusqlite::Result<()> {
    let mut insert_outcome = transaction.prepare_cached(
        "INSERT INTO device_outcomes (delivery_id, request_id, operation, status, line_status, fault_code,
             fault_message, state, service_plan, ip_address, mdn, details, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?;
    for outcome in &callback.outcomes {
        let DeviceOutcome {
            identifiers,
            status,
            line_status,
            fault,
            state,
            service_plan,
            ip_address,
            mdn,
            details,
        } = outcome;
        insert_outcome.execute(params![
            delivery_id,
            callback.request_id,
            callback.operation.as_str(),
            status.as_str(),
            line_status,
            fault.as_ref().map(|fault| fault.code.as_str()),
            fault.as_ref().map(|fault| fault.message.as_str()),
            state,
            service_plan,
            ip_address,
            mdn,
            details.as_ref().map(|details| details.to_string()),
            received_at,
        ])?;
        let outcome_id = transaction.last_insert_rowid();
        let rows: Vec<[&dyn ToSql; 3]> = identifiers
            .iter()
            .map(|identifier| [&identifier.kind as &dyn ToSql, &identifier.id, &outcome_id])
            .collect();
        insert_rows(
            transaction,
            "INSERT INTO outcome_identifiers (kind, identifier, outcome_id)",
            "ON CONFLICT DO NOTHING",
            &rows,
        )?;
        if let Some((job_id, jobs)) = job.as_mut() {
            jobs.record_outcome(transaction, *job_id, outcome_id, identifiers, *status)?;
        }
    }
    if let (Some((job_id, _)), Some(upload)) = (&job, &callback.upload) {
        jobs::record_upload(transaction, *job_id, upload)?;
    }
    if let Some(upload) = &callback.upload {
        let count = sql_count;
        transaction
            .prepare_cached(
                "INSERT INTO upload_summaries (delivery_id, request_id, account_name, device_sku, total_lines,
                     pending_lines, success_lines, failed_lines, package_error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                delivery_id,
                callback.request_id,
                upload.account_name,
                upload.device_sku,
                count(upload.total_lines),
                count(upload.pending_lines),
                count(upload.success_lines),
                count(upload.failed_lines),
                upload.package_error,
            ])?;
    }
    Ok(())
}

/// Read-only connections for the API, reused across requests.
///
/// SQLite's unix VFS shares one mapping of the `-shm` file (the WAL index) among all connections
/// of the process to a database, and opens it read-only when the volume is read-only. A reader
/// opened then (a listener started on a read-only volume after a crash left the `-wal` and `-shm`
/// behind, which is when reads work) would keep that read-only mapping alive in the idle pool,
/// and the writer's connection, reopened once the volume is writable again, would share it and
/// fail with "read-only" on every commit until a restart. So connections belong to a generation,
/// which the writer advances each time it (re)opens its connection: idle readers are closed then,
/// readers in use when they come back, and the checkpointer closes its own.
struct Readers {
    path: PathBuf,
    /// Idle connections, each with the generation it was opened in.
    idle: Mutex<Vec<(u64, Connection)>>,
    generation: Arc<AtomicU64>,
}

impl Readers {
    /// Closes every connection opened so far (idle ones now, those in use when they are returned),
    /// so that the next connection maps the WAL index anew. Called by the writer thread before it
    /// (re)opens its connection.
    fn retire(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let retired = self
            .idle
            .lock()
            .map(|mut idle| std::mem::take(&mut *idle))
            .unwrap_or_default();
        drop(retired);
    }

    fn with<T>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let current = self.generation.load(Ordering::Acquire);
        let idle = self
            .idle
            .lock()
            .ok()
            .and_then(|mut idle| idle.pop())
            .filter(|(opened_in, _)| *opened_in == current);
        let (generation, connection) = match idle {
            Some(idle) => idle,
            None => Connection::open_with_flags(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .and_then(|connection| {
                connection.busy_timeout(Duration::from_secs(5))?;
                Ok((current, connection))
            })
            .map_err(|error| StoreError::Unavailable(error::cause(error)))?,
        };
        let result = query(&connection).map_err(store_error);
        let reusable = result.is_ok() && generation == self.generation.load(Ordering::Acquire);
        if let Ok(mut idle) = self.idle.lock() {
            if reusable && idle.len() < MAX_IDLE_READERS {
                idle.push((generation, connection));
            }
        }
        result
    }
}
