//! Job writes: correlation of stored callbacks with jobs, registration (and adoption), the state
//! recompute and the deadline sweep. Always called on the writer thread, inside its transaction.

use std::time::Duration;

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, ToSql, params};
use time::OffsetDateTime;

use super::{insert_rows, queries, sql_count};
use crate::domain::{DeviceIdentifier, OutcomeStatus, UploadSummary};
use crate::jobs::{JobState, Registration};
use crate::storage::rows::{JOB_COLUMNS, JobCompletion, JobRow, TouchedJob, counter_of};
use crate::storage::{Registered, timestamp};

/// What one write batch does to the jobs it touches. Deliveries, re-deliveries, callback times
/// and device counters are accumulated here and written once per job when the batch ends, where
/// each touched job's state is recomputed once: a batch of 64 callbacks of one job costs one job
/// update, not 64 (and no recount of its devices).
#[derive(Clone, Default)]
pub(super) struct JobBatch {
    job_ids: HashMap<String, i64>,
    touched: HashMap<i64, TouchedJob>,
}

/// Positions in [`TouchedJob::counters`].
const REPORTED: usize = 0;

impl JobBatch {
    /// Finds or creates the job for `request_id` and counts this delivery on it. Returns its id.
    pub(super) fn record_delivery(
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
                let job_id = find_or_create_job(
                    connection,
                    request_id,
                    operation,
                    received_at,
                    default_timeout,
                )?;
                self.job_ids.insert(request_id.to_owned(), job_id);
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
    pub(super) fn record_outcome(
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
                match previous.as_deref() {
                    None => touched.counters[REPORTED] += 1,
                    Some(previous) => {
                        if let Some(index) = counter_of(previous) {
                            touched.counters[index] -= 1;
                        }
                    }
                }
                device_id
            }
            None => {
                connection
                    .prepare_cached("INSERT INTO job_devices (job_id, latest_outcome_id, status) VALUES (?1, ?2, ?3)")?
                    .execute(params![job_id, outcome_id, status.as_str()])?;
                touched.counters[REPORTED] += 1;
                connection.last_insert_rowid()
            }
        };
        if let Some(index) = counter_of(status.as_str()) {
            touched.counters[index] += 1;
        }
        add_identifiers(connection, job_id, device_id, identifiers)
    }

    /// Writes the accumulated changes and recomputes each touched job's state.
    pub(super) fn finish(
        self,
        connection: &Connection,
        completions: &mut Vec<JobCompletion>,
    ) -> rusqlite::Result<()> {
        for (job_id, touched) in self.touched {
            let [reported, succeeded, failed, accepted] = touched.counters;
            connection
                .prepare_cached(
                    "UPDATE jobs SET
                         deliveries = deliveries + ?2,
                         duplicates = duplicates + ?3,
                         operation = coalesce(operation, ?4),
                         first_callback_at = CASE WHEN first_callback_at IS NULL OR first_callback_at > ?5
                                                  THEN ?5 ELSE first_callback_at END,
                         last_callback_at = CASE WHEN last_callback_at IS NULL OR last_callback_at < ?6
                                                 THEN ?6 ELSE last_callback_at END,
                         devices_reported = devices_reported + ?7,
                         succeeded = succeeded + ?8,
                         failed = failed + ?9,
                         accepted = accepted + ?10
                     WHERE id = ?1",
                )?
                .execute(params![
                    job_id,
                    touched.deliveries,
                    touched.duplicates,
                    touched.operation,
                    timestamp(touched.first_at),
                    timestamp(touched.last_at),
                    reported,
                    succeeded,
                    failed,
                    accepted,
                ])?;
            if touched.deliveries > touched.duplicates {
                recompute(connection, job_id, touched.last_at, completions)?;
            }
        }
        Ok(())
    }
}

fn find_or_create_job(
    connection: &Connection,
    request_id: &str,
    operation: Option<&str>,
    received_at: OffsetDateTime,
    default_timeout: Duration,
) -> rusqlite::Result<i64> {
    let existing: Option<i64> = connection
        .prepare_cached("SELECT id FROM jobs WHERE request_id = ?1")?
        .query_row([request_id], |row| row.get(0))
        .optional()?;
    if let Some(job_id) = existing {
        return Ok(job_id);
    }
    connection
        .prepare_cached("INSERT INTO jobs (request_id, operation, state, created_at, deadline) VALUES (?1, ?2, ?3, ?4, ?5)")?
        .execute(params![
            request_id,
            operation,
            JobState::Pending.as_str(),
            timestamp(received_at),
            timestamp(received_at + default_timeout)
        ])?;
    Ok(connection.last_insert_rowid())
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
    let rows: Vec<[&dyn ToSql; 4]> = identifiers
        .iter()
        .map(|identifier| {
            [
                &job_id as &dyn ToSql,
                &identifier.kind,
                &identifier.id,
                &device_id,
            ]
        })
        .collect();
    insert_rows(
        connection,
        "INSERT INTO job_device_identifiers (job_id, kind, identifier, job_device_id)",
        "ON CONFLICT DO NOTHING",
        &rows,
    )
}

/// The latest upload report sets the job's line counts; a package-level error sticks.
pub(super) fn record_upload(
    connection: &Connection,
    job_id: i64,
    upload: &UploadSummary,
) -> rusqlite::Result<()> {
    let count = sql_count;
    connection
        .prepare_cached(
            "UPDATE jobs SET is_upload = 1,
                 total_lines = coalesce(?2, total_lines),
                 pending_lines = coalesce(?3, pending_lines),
                 success_lines = coalesce(?4, success_lines),
                 failed_lines = coalesce(?5, failed_lines),
                 package_error = coalesce(package_error, ?6)
             WHERE id = ?1",
        )?
        .execute(params![
            job_id,
            count(upload.total_lines),
            count(upload.pending_lines),
            count(upload.success_lines),
            count(upload.failed_lines),
            upload.package_error,
        ])?;
    Ok(())
}

/// Applies the state rule to the job's row as it stands in this transaction (its counters are
/// kept incrementally; nothing is recounted), as of `now`. Returns whether the state changed; a
/// job that just completed (not timed out) is added to `completions`.
pub(super) fn recompute(
    connection: &Connection,
    job_id: i64,
    now: OffsetDateTime,
    completions: &mut Vec<JobCompletion>,
) -> rusqlite::Result<bool> {
    let mut row = connection
        .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([job_id], |row| JobRow::from_row(row))?;
    let old_state = row.state.clone();
    let (write, completion) = row.recompute(now);
    if write {
        connection
            .prepare_cached("UPDATE jobs SET state = ?2, completed_at = ?3 WHERE id = ?1")?
            .execute(params![job_id, row.state, row.completed_at])?;
    }
    completions.extend(completion);
    Ok(row.state != old_state)
}

/// Registers a job, or adopts the unregistered one earlier callbacks created.
pub(super) fn register(
    connection: &Connection,
    registration: &Registration,
    now: OffsetDateTime,
    default_timeout: Duration,
    completions: &mut Vec<JobCompletion>,
) -> rusqlite::Result<Registered> {
    let canonical = serde_json::to_string(registration)
        .map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))?;
    let existing: Option<(i64, bool, Option<String>)> = connection
        .prepare_cached("SELECT id, registered, registration FROM jobs WHERE request_id = ?1")?
        .query_row([&registration.request_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    if let Some((job_id, true, stored)) = &existing {
        let job = queries::job_by_id(connection, *job_id)?;
        return Ok(if stored.as_deref() == Some(canonical.as_str()) {
            Registered::Unchanged(job)
        } else {
            Registered::Conflict(job)
        });
    }
    let timeout = registration
        .timeout_s
        .map(Duration::from_secs)
        .unwrap_or(default_timeout);
    let at = timestamp(now);
    let deadline = timestamp(now + timeout);
    let expected = registration
        .expected()
        .and_then(|expected| i64::try_from(expected).ok());
    let timeout_s = registration
        .timeout_s
        .and_then(|timeout| i64::try_from(timeout).ok());
    let operation = registration.operation.as_str();
    // One row for both paths: a new job is created first, and then registered like an adopted one.
    let job_id = match existing {
        Some((job_id, _, _)) => job_id,
        None => find_or_create_job(
            connection,
            &registration.request_id,
            Some(operation),
            now,
            timeout,
        )?,
    };
    connection
        .prepare_cached(
            "UPDATE jobs SET registered = 1, operation = ?2, account = ?3, label = ?4, expected_devices = ?5,
                 timeout_s = ?6, registration = ?7, registered_at = ?8, deadline = ?9
             WHERE id = ?1",
        )?
        .execute(params![
            job_id,
            operation,
            registration.account,
            registration.label,
            expected,
            timeout_s,
            canonical,
            at,
            deadline
        ])?;
    for device in &registration.devices {
        let identifiers = std::slice::from_ref(device);
        match find_job_device(connection, job_id, identifiers)? {
            Some((device_id, _)) => {
                connection
                    .prepare_cached("UPDATE job_devices SET registered = 1 WHERE id = ?1")?
                    .execute([device_id])?;
            }
            None => {
                connection
                    .prepare_cached("INSERT INTO job_devices (job_id, registered) VALUES (?1, 1)")?
                    .execute([job_id])?;
                add_identifiers(
                    connection,
                    job_id,
                    connection.last_insert_rowid(),
                    identifiers,
                )?;
            }
        }
    }
    recompute(connection, job_id, now, completions)?;
    let job = queries::job_by_id(connection, job_id)?;
    Ok(if existing.is_some() {
        Registered::Adopted(job)
    } else {
        Registered::Created(job)
    })
}

/// Applies the state rule to every open job whose deadline has passed.
pub(super) fn sweep(
    connection: &Connection,
    now: OffsetDateTime,
    completions: &mut Vec<JobCompletion>,
) -> rusqlite::Result<u64> {
    let overdue: Vec<i64> = connection
        .prepare_cached(
            "SELECT id FROM jobs WHERE state IN ('pending', 'in_progress') AND deadline < ?1",
        )?
        .query_map([timestamp(now)], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut changed = 0;
    for job_id in overdue {
        if recompute(connection, job_id, now, completions)? {
            changed += 1;
        }
    }
    Ok(changed)
}
