//! The writer thread: it owns the read-write connection and takes every command queued since
//! its last commit. Deliveries and readiness probes go into one transaction (group commit, so
//! that 64 concurrent callbacks cost about one fsync rather than 64), which is settled once it
//! has committed (see [`crate::storage::batch`]); registrations, sweeps and prune chunks are
//! rare and get a transaction each.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use super::bind::WriterConnection;
use super::connection::{Readers, Statements, open_writer};
use super::error::{is_own_fault, is_storage_wide, needs_reopen, store_error};
use super::jobs::{self, JobBatch};
use super::write::insert_delivery;
use super::{outbox, reprocess, retention, schema};
use crate::configuration::StorageSettings;
use crate::jobs::Registration;
use crate::metrics::Metrics;
use crate::storage::batch::{self, FailureMemory, Weight, Write, Written};
use crate::storage::jobs::{JobCompletion, RegistrationPlan, observe_completions};
use crate::storage::reprocess::{ReprocessQuery, ReprocessReport};
use crate::storage::{NewDelivery, Purpose, Receipt, Registered, StoreError, timestamp};

/// Where a readiness probe's answer goes once its commit is done.
type ProbeSender = oneshot::Sender<Result<(), StoreError>>;

/// Outbox work for the writer's connection; it answers its caller itself.
pub(super) type OutboxWork = Box<dyn FnOnce(Result<&Connection, StoreError>) + Send>;

pub(super) enum Command {
    Write(Write),
    /// A commit of the heartbeat row, with the batch it lands in.
    Probe(ProbeSender),
    Register(
        Box<Registration>,
        OffsetDateTime,
        oneshot::Sender<Result<Registered, StoreError>>,
    ),
    Sweep(OffsetDateTime, oneshot::Sender<Result<u64, StoreError>>),
    Reprocess(
        Box<ReprocessQuery>,
        OffsetDateTime,
        oneshot::Sender<Result<ReprocessReport, StoreError>>,
    ),
    /// One chunk of raw bodies received before the cutoff.
    Prune(OffsetDateTime, oneshot::Sender<Result<usize, StoreError>>),
    RotateCredentials(
        Box<crate::storage::credentials::Rotation>,
        oneshot::Sender<Result<(), StoreError>>,
    ),
    /// Outbox work (claims, attempts, redeliveries, sink registration, event pruning), in a
    /// transaction of its own; the closure answers its caller.
    Outbox(OutboxWork),
    Shutdown,
}

impl Command {
    fn weight(&self) -> Weight {
        match self {
            Command::Write(write) => write.delivery.weight(),
            _ => Weight::default(),
        }
    }
}

/// The writer thread's state.
pub(super) struct Writer {
    /// `None` after a fault that may have left the connection unusable (read-only file, I/O
    /// error); the next batch reopens it, which is how the store recovers without a restart.
    pub connection: Option<WriterConnection>,
    /// Retired whenever the connection is (re)opened: see [`Readers::retire`].
    pub readers: Arc<Readers>,
    pub path: PathBuf,
    pub settings: StorageSettings,
    /// Whether a reopened connection applies the migrations (not for a maintenance command).
    pub purpose: Purpose,
    /// What readiness remembers of deliveries the database could not take.
    pub memory: FailureMemory,
    /// The deadline of jobs that do not set their own.
    pub job_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Where a settled batch's deliveries go to be freed, on a thread of their own: freeing a
    /// parsed callback was about 3% of the writer's work per callback, and the writer is the one
    /// thread every callback waits for.
    pub freed: std::sync::mpsc::Sender<Vec<NewDelivery>>,
}

/// Whether the connection's `PRAGMA synchronous` is `expected` (`OFF`, `NORMAL`, `FULL`, `EXTRA`).
fn synchronous_is(connection: &Connection, expected: &str) -> bool {
    let level = ["OFF", "NORMAL", "FULL", "EXTRA"]
        .iter()
        .position(|name| *name == expected);
    connection
        .query_row("PRAGMA synchronous", [], |row| row.get::<_, i64>(0))
        .ok()
        .and_then(|found| usize::try_from(found).ok())
        == level
}

/// Frees what the writer sends until the writer is gone.
pub(super) fn free_deliveries(batches: std::sync::mpsc::Receiver<Vec<NewDelivery>>) {
    for batch in batches {
        drop(batch);
    }
}

impl Writer {
    pub fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
        while let Some(first) = receiver.blocking_recv() {
            let commands = batch::gather(first, self.settings.max_batch, Command::weight, || {
                receiver.try_recv().ok()
            });
            let mut writes = Vec::with_capacity(commands.len());
            let mut probes = Vec::new();
            for command in commands {
                match command {
                    Command::Write(write) => writes.push(write),
                    Command::Probe(reply) => probes.push(reply),
                    Command::Register(registration, now, reply) => {
                        let answer = RegistrationPlan::new(&registration, now, self.job_timeout)
                            .and_then(|plan| {
                                self.transact(|connection, completions| {
                                    jobs::register(connection, &plan, now, completions)
                                })
                            });
                        let _ = reply.send(answer);
                    }
                    Command::Prune(cutoff, reply) => {
                        let _ =
                            reply.send(self.transact(|connection, _| {
                                retention::prune_chunk(connection, cutoff)
                            }));
                    }
                    Command::Reprocess(query, now, reply) => {
                        let job_timeout = self.job_timeout;
                        let record = self.settings.record_events;
                        let _ = reply.send(self.transact_or_roll_back(
                            !query.dry_run,
                            |connection, completions| {
                                reprocess::reprocess(
                                    connection,
                                    &query,
                                    now,
                                    job_timeout,
                                    completions,
                                    record,
                                )
                            },
                        ));
                    }
                    Command::Sweep(now, reply) => {
                        let _ = reply.send(self.transact(|connection, completions| {
                            jobs::sweep(connection, now, completions)
                        }));
                    }
                    Command::RotateCredentials(rotation, reply) => {
                        let _ = reply.send(self.transact(|connection, _| {
                            super::credentials::rotate(connection, &rotation)
                        }));
                    }
                    Command::Outbox(work) => {
                        match (self.settings.synchronous.pragma_value(), self.connection()) {
                            (configured, Ok(connection)) => {
                                work(Ok(&**connection));
                                // Outbox work runs without an fsync of its own and sets the
                                // connection back: a connection left otherwise would acknowledge
                                // callbacks before they are durable, so it is reopened instead.
                                if !synchronous_is(connection, configured) {
                                    tracing::error!(
                                        "the writer's synchronous setting was not restored; reopening it"
                                    );
                                    self.connection = None;
                                }
                            }
                            (_, Err(error)) => {
                                if needs_reopen(&error) {
                                    self.connection = None;
                                }
                                work(Err(store_error(error)));
                            }
                        }
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

    fn commit_batch(&mut self, writes: Vec<Write>, probes: Vec<ProbeSender>) {
        let started = Instant::now();
        let (owned, replies) = batch::split(writes);
        let deliveries: Vec<&NewDelivery> = owned.iter().collect();
        // What a failure of one delivery would take down with it: the others, and the probes.
        let others = deliveries.len().saturating_sub(1) + probes.len();
        let job_timeout = self.job_timeout;
        let record = self.settings.record_events;
        let written = self.connection().and_then(|connection| {
            write_batch(connection, &deliveries, job_timeout, others, record)
        });
        let written = written
            .map(|(results, completions)| Written {
                results,
                completions,
            })
            .map_err(|error| {
                if needs_reopen(&error) {
                    self.connection = None;
                }
                store_error(error)
            });
        let batch_failure = written.as_ref().err().cloned();
        batch::settle(replies, written, &mut self.memory, &self.metrics, started);
        // If the freeing thread is gone, the batch is freed here as it is returned.
        drop(deliveries);
        let _ = self.freed.send(owned);
        let now = Instant::now();
        for probe in probes {
            let _ = probe.send(match &batch_failure {
                // The probe's commit was the batch's.
                Some(failure) => Err(failure
                    .cause()
                    .map(|cause| StoreError::Unavailable(Arc::clone(cause)))
                    .unwrap_or_else(|| failure.clone())),
                None => self.memory.readiness(now),
            });
        }
    }

    /// Runs `work` in its own transaction; observes the jobs it completed once it has committed.
    fn transact<T>(
        &mut self,
        work: impl FnOnce(&Connection, &mut Vec<JobCompletion>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.transact_or_roll_back(true, work)
    }

    /// [`Self::transact`], or, unless `commit`, the same work rolled back (a dry run).
    fn transact_or_roll_back<T>(
        &mut self,
        commit: bool,
        work: impl FnOnce(&Connection, &mut Vec<JobCompletion>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut completions = Vec::new();
        let record = self.settings.record_events;
        let result = self.connection().and_then(|connection| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = work(&transaction, &mut completions)?;
            outbox::insert_finished(&Statements::new(&transaction), record, &completions)?;
            if commit {
                transaction.commit()?;
            } else {
                transaction.rollback()?;
                completions.clear();
            }
            Ok(value)
        });
        if result.is_ok() {
            observe_completions(&self.metrics, &completions);
        }
        result.map_err(|error| {
            if needs_reopen(&error) {
                self.connection = None;
            }
            store_error(error)
        })
    }

    fn connection(&mut self) -> rusqlite::Result<&mut WriterConnection> {
        if self.connection.is_none() {
            self.readers.retire();
            let mut connection = open_writer(&self.path, &self.settings)?;
            // A no-op unless the database could not be migrated at start.
            if self.purpose == Purpose::Serve {
                schema::migrate(&mut connection)?;
            }
            tracing::info!(path = %self.path.display(), "reopened the database for writing");
            self.connection = Some(WriterConnection::new(connection));
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
/// defect, not a storage fault) and `others` would go down with it is the batch written again
/// with a savepoint per delivery, so that the others are still stored.
fn write_batch(
    connection: &mut WriterConnection,
    deliveries: &[&NewDelivery],
    job_timeout: Duration,
    others: usize,
    record: bool,
) -> rusqlite::Result<CommittedBatch> {
    match write_deliveries(connection, deliveries, job_timeout, false, record) {
        Err(error) if batch::isolates(is_own_fault(&error), others) => {
            // The delivery's own edge logs its failure; this says only why the batch is redone.
            tracing::debug!(%error, "a delivery failed; writing the batch one delivery at a time");
            write_deliveries(connection, deliveries, job_timeout, true, record)
        }
        written => written,
    }
}

fn write_deliveries(
    connection: &mut WriterConnection,
    deliveries: &[&NewDelivery],
    job_timeout: Duration,
    isolate: bool,
    record: bool,
) -> rusqlite::Result<CommittedBatch> {
    let (connection, raw) = connection.split();
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(deliveries.len());
    let mut completions = Vec::new();
    {
        // Savepoints are SQL here: a held statement borrows the transaction.
        let statements = Statements::with_raw(&transaction, raw);
        let mut jobs = JobBatch::for_deliveries(deliveries.len());
        for delivery in deliveries {
            if !isolate {
                results.push(Ok(insert_delivery(
                    &statements,
                    delivery,
                    job_timeout,
                    &mut jobs,
                    record,
                )?));
                continue;
            }
            let before = jobs.clone();
            statements.execute_batch("SAVEPOINT delivery")?;
            match insert_delivery(&statements, delivery, job_timeout, &mut jobs, record) {
                Ok(receipt) => {
                    statements.execute_batch("RELEASE delivery")?;
                    results.push(Ok(receipt));
                }
                Err(error) if is_storage_wide(&error) => return Err(error),
                Err(error) => {
                    // This delivery only is rolled back.
                    statements.execute_batch("ROLLBACK TO delivery; RELEASE delivery")?;
                    jobs = before;
                    results.push(Err(store_error(error)));
                }
            }
        }
        jobs.finish(&statements, &mut completions)?;
        outbox::insert_finished(&statements, record, &completions)?;
        statements.with(
            "INSERT INTO heartbeat (id, checked_at) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            |statement| statement.execute([timestamp(OffsetDateTime::now_utc())]),
        )?;
    }
    transaction.commit()?;
    Ok((results, completions))
}

#[cfg(test)]
mod tests {
    use super::synchronous_is;

    #[test]
    fn the_synchronous_check_reads_the_level_the_connection_is_at() {
        let connection = rusqlite::Connection::open_in_memory().unwrap();
        for level in ["OFF", "NORMAL", "FULL", "EXTRA"] {
            connection
                .pragma_update(None, "synchronous", level)
                .unwrap();
            assert!(synchronous_is(&connection, level), "{level}");
            let other = if level == "FULL" { "NORMAL" } else { "FULL" };
            assert!(
                !synchronous_is(&connection, other),
                "{level} is not {other}"
            );
        }
    }
}
