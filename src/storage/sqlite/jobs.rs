//! Job writes on SQLite: correlation of a batch with its jobs, registration (and adoption), the
//! deadline sweep. Always on the writer thread, inside its transaction: it is the only writer,
//! so a job row read in this transaction is the job as stored; what the row becomes is decided
//! by [`crate::storage::jobs`], and it is written back once per batch.

use std::collections::HashMap;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;

use crate::domain::{DeviceIdentifier, OutcomeStatus, UploadSummary};
use crate::jobs::JobState;
use crate::storage::jobs::{JOB_COLUMNS, JobCompletion, JobRow, RegistrationPlan, TouchedJob};
use crate::storage::{Registered, timestamp};

/// What one write batch does to the jobs it touches: each job's row is read (or created) at its
/// first delivery in the batch, deliveries, re-deliveries, callback times, device counters and
/// upload reports are applied to it in memory, and each is written once when the batch ends: a
/// batch of 64 callbacks of one job costs one job update, not 64 (and no recount of its devices).
#[derive(Clone, Default)]
pub(super) struct JobBatch {
    job_ids: HashMap<String, i64>,
    rows: HashMap<i64, JobRow>,
    touched: HashMap<i64, TouchedJob>,
}

impl JobBatch {
    /// Finds or creates the job for `request_id` and counts this delivery on it. Returns its id.
    pub fn record_delivery(
        &mut self,
        connection: &Connection,
        request_id: &str,
        operation: Option<&'static str>,
        received_at: OffsetDateTime,
        duplicate: bool,
        default_timeout: Duration,
    ) -> rusqlite::Result<i64> {
        let job_id = match self.job_ids.get(request_id) {
            Some(job_id) => *job_id,
            None => {
                let row = match job_row(connection, request_id)? {
                    Some(row) => row,
                    None => create_job(
                        connection,
                        request_id,
                        operation,
                        received_at,
                        default_timeout,
                    )?,
                };
                let job_id = row.id;
                self.job_ids.insert(request_id.to_owned(), job_id);
                self.rows.insert(job_id, row);
                job_id
            }
        };
        self.touched
            .entry(job_id)
            .or_insert_with(|| TouchedJob::new(received_at))
            .record_delivery(operation, received_at, duplicate);
        Ok(job_id)
    }

    /// Makes `outcome_id` the latest outcome of the job's device it names, matching the device by
    /// any of its identifiers (a registered IMEI finds the device a callback reports by IMEI and
    /// ICCID).
    pub fn record_outcome(
        &mut self,
        connection: &Connection,
        job_id: i64,
        outcome_id: i64,
        identifiers: &[DeviceIdentifier],
        status: OutcomeStatus,
    ) -> rusqlite::Result<()> {
        let Some(touched) = self.touched.get_mut(&job_id) else {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "job {job_id} was not recorded first"
            )));
        };
        let device_id = match find_job_device(connection, job_id, identifiers)? {
            Some((device_id, previous)) => {
                connection
                    .prepare_cached(
                        "UPDATE job_devices SET latest_outcome_id = ?2, status = ?3 WHERE id = ?1",
                    )?
                    .execute(params![device_id, outcome_id, status.as_str()])?;
                touched.count_outcome(previous.as_deref(), status);
                device_id
            }
            None => {
                connection
                    .prepare_cached("INSERT INTO job_devices (job_id, latest_outcome_id, status) VALUES (?1, ?2, ?3)")?
                    .execute(params![job_id, outcome_id, status.as_str()])?;
                touched.count_outcome(None, status);
                connection.last_insert_rowid()
            }
        };
        add_identifiers(connection, job_id, device_id, identifiers)
    }

    /// The job's latest upload report (see [`JobRow::record_upload`]).
    pub fn record_upload(&mut self, job_id: i64, upload: &UploadSummary) {
        if let Some(row) = self.rows.get_mut(&job_id) {
            row.record_upload(upload);
        }
    }

    /// Applies each touched job's batch to its row (the state rule included) and writes it.
    pub fn finish(
        self,
        connection: &Connection,
        completions: &mut Vec<JobCompletion>,
    ) -> rusqlite::Result<()> {
        let JobBatch {
            mut rows, touched, ..
        } = self;
        for (job_id, job) in touched {
            let Some(mut row) = rows.remove(&job_id) else {
                continue;
            };
            completions.extend(job.apply_to(&mut row));
            write_job(connection, &row)?;
        }
        Ok(())
    }
}

fn job_row(connection: &Connection, request_id: &str) -> rusqlite::Result<Option<JobRow>> {
    connection
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE request_id = ?1"
        ))?
        .query_row([request_id], |row| JobRow::from_row(row))
        .optional()
}

/// A new job, pending, with its deadline `timeout` after `received_at`.
///
/// The row is built here rather than read back with `RETURNING`: SQLite answers `RETURNING` through
/// an ephemeral table, which with one new job per callback was a tenth of the job's creation on the
/// writer. What is built is what the `INSERT` stores, the columns it leaves to their defaults
/// included (see the `jobs` table in [`super::schema`]).
fn create_job(
    connection: &Connection,
    request_id: &str,
    operation: Option<&str>,
    received_at: OffsetDateTime,
    timeout: Duration,
) -> rusqlite::Result<JobRow> {
    let created_at = timestamp(received_at);
    let deadline = timestamp(received_at + timeout);
    let state = JobState::Pending.as_str();
    connection
        .prepare_cached(
            "INSERT INTO jobs (request_id, operation, state, created_at, deadline) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![request_id, operation, state, created_at, deadline])?;
    Ok(JobRow::created_by_callback(
        connection.last_insert_rowid(),
        request_id,
        operation,
        created_at,
        deadline,
    ))
}

/// Writes the columns a batch changes on a job row.
fn write_job(connection: &Connection, row: &JobRow) -> rusqlite::Result<()> {
    connection
        .prepare_cached(
            "UPDATE jobs SET operation = ?2, state = ?3, devices_reported = ?4, succeeded = ?5, failed = ?6,
                 accepted = ?7, deliveries = ?8, duplicates = ?9, is_upload = ?10, total_lines = ?11,
                 pending_lines = ?12, success_lines = ?13, failed_lines = ?14, package_error = ?15,
                 first_callback_at = ?16, last_callback_at = ?17, completed_at = ?18
             WHERE id = ?1",
        )?
        .execute(params![
            row.id,
            row.operation,
            row.state,
            row.devices_reported,
            row.succeeded,
            row.failed,
            row.accepted,
            row.deliveries,
            row.duplicates,
            row.is_upload,
            row.total_lines,
            row.pending_lines,
            row.success_lines,
            row.failed_lines,
            row.package_error,
            row.first_callback_at,
            row.last_callback_at,
            row.completed_at,
        ])?;
    Ok(())
}

/// Writes what the state rule changes on a job row (registration, sweep).
fn write_state(connection: &Connection, row: &JobRow) -> rusqlite::Result<()> {
    connection
        .prepare_cached("UPDATE jobs SET state = ?2, completed_at = ?3 WHERE id = ?1")?
        .execute(params![row.id, row.state, row.completed_at])?;
    Ok(())
}

/// The job's device one of `identifiers` names, with its latest status. One primary-key lookup
/// per identifier: an `OR` of them lets SQLite scan every identifier of the job instead, which
/// makes a 10,000-line upload quadratic.
fn find_job_device(
    connection: &Connection,
    job_id: i64,
    identifiers: &[DeviceIdentifier],
) -> rusqlite::Result<Option<(i64, Option<String>)>> {
    let mut find = connection.prepare_cached(
        "SELECT d.id, d.status FROM job_device_identifiers i JOIN job_devices d ON d.id = i.job_device_id
         WHERE i.job_id = ?1 AND i.kind = ?2 AND i.identifier = ?3",
    )?;
    for identifier in identifiers {
        let found = find
            .query_row(params![job_id, identifier.kind, identifier.id], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

fn add_identifiers(
    connection: &Connection,
    job_id: i64,
    device_id: i64,
    identifiers: &[DeviceIdentifier],
) -> rusqlite::Result<()> {
    let mut insert = connection.prepare_cached(
        "INSERT INTO job_device_identifiers (job_id, kind, identifier, job_device_id)
         VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
    )?;
    for identifier in identifiers {
        insert.execute(params![job_id, identifier.kind, identifier.id, device_id])?;
    }
    Ok(())
}

/// Registers a job as `plan` says, or adopts the unregistered one earlier callbacks created.
pub(super) fn register(
    connection: &Connection,
    plan: &RegistrationPlan<'_>,
    now: OffsetDateTime,
    completions: &mut Vec<JobCompletion>,
) -> rusqlite::Result<Registered> {
    let registration = plan.registration();
    let existing = job_row(connection, &registration.request_id)?;
    if let Some(row) = existing.as_ref().filter(|row| row.registered) {
        let stored: Option<String> = connection
            .prepare_cached("SELECT registration FROM jobs WHERE id = ?1")?
            .query_row([row.id], |row| row.get(0))?;
        return Ok(plan.repeated(row.clone(), stored.as_deref()));
    }
    let adopted = existing.is_some();
    // One row for both paths: a new job is created first, and then registered like an adopted one.
    let mut row = match existing {
        Some(row) => row,
        None => create_job(
            connection,
            &registration.request_id,
            Some(plan.operation()),
            now,
            plan.timeout,
        )?,
    };
    plan.apply(&mut row);
    connection
        .prepare_cached(
            "UPDATE jobs SET registered = 1, operation = ?2, account = ?3, label = ?4, expected_devices = ?5,
                 timeout_s = ?6, registration = ?7, registered_at = ?8, deadline = ?9
             WHERE id = ?1",
        )?
        .execute(params![
            row.id,
            row.operation,
            row.account,
            row.label,
            row.expected_devices,
            row.timeout_s,
            plan.canonical,
            row.registered_at,
            row.deadline
        ])?;
    for device in &registration.devices {
        let identifiers = std::slice::from_ref(device);
        match find_job_device(connection, row.id, identifiers)? {
            Some((device_id, _)) => {
                connection
                    .prepare_cached("UPDATE job_devices SET registered = 1 WHERE id = ?1")?
                    .execute([device_id])?;
            }
            None => {
                connection
                    .prepare_cached("INSERT INTO job_devices (job_id, registered) VALUES (?1, 1)")?
                    .execute([row.id])?;
                add_identifiers(
                    connection,
                    row.id,
                    connection.last_insert_rowid(),
                    identifiers,
                )?;
            }
        }
    }
    let (write, completion) = row.recompute(now);
    completions.extend(completion);
    if write {
        write_state(connection, &row)?;
    }
    Ok(if adopted {
        Registered::Adopted(row.into_record())
    } else {
        Registered::Created(row.into_record())
    })
}

/// Applies the state rule to every open job whose deadline has passed; returns how many changed.
pub(super) fn sweep(
    connection: &Connection,
    now: OffsetDateTime,
    completions: &mut Vec<JobCompletion>,
) -> rusqlite::Result<u64> {
    let overdue: Vec<JobRow> = connection
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('pending', 'in_progress') AND deadline < ?1"
        ))?
        .query_map([timestamp(now)], |row| JobRow::from_row(row))?
        .collect::<rusqlite::Result<_>>()?;
    let mut changed = 0;
    for mut row in overdue {
        let (write, completion) = row.recompute(now);
        completions.extend(completion);
        if write {
            write_state(connection, &row)?;
            changed += 1;
        }
    }
    Ok(changed)
}
