//! Job writes on PostgreSQL: correlation of a batch with its jobs, registration (and adoption),
//! the deadline sweep. Job rows are locked before they are read, and written back whole: the
//! counters and state computed here are never based on a row another replica is changing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use deadpool_postgres::Transaction;
use time::OffsetDateTime;

use super::error::Failure;
use super::ids::reserve_ids;
use super::text::{clean_key, clean_option};
use crate::domain::{DeviceIdentifier, OutcomeStatus};
use crate::jobs::JobState;
use crate::storage::jobs::{JOB_COLUMNS, JobCompletion, JobRow, RegistrationPlan, TouchedJob};
use crate::storage::{DeliveryContent, NewDelivery, Registered, timestamp};

/// [`clean_key`] owned: map keys of the job bookkeeping.
fn key_text(value: &str) -> String {
    clean_key(value).into_owned()
}

/// Creates the jobs not stored yet and locks all of them, in `request_id` order. Returns the
/// locked rows by `request_id`, and which were created.
pub(super) async fn create_and_lock(
    transaction: &Transaction<'_>,
    mut jobs: Vec<(String, Option<&'static str>, OffsetDateTime)>,
    timeout: Duration,
) -> Result<(HashMap<String, JobRow>, HashSet<String>), tokio_postgres::Error> {
    jobs.sort_by(|left, right| left.0.cmp(&right.0));
    let request_ids: Vec<&str> = jobs.iter().map(|job| job.0.as_str()).collect();
    let operations: Vec<Option<&str>> = jobs.iter().map(|job| job.1).collect();
    let created_at: Vec<String> = jobs.iter().map(|job| timestamp(job.2)).collect();
    let deadlines: Vec<String> = jobs.iter().map(|job| timestamp(job.2 + timeout)).collect();
    let states = vec![JobState::Pending.as_str(); jobs.len()];
    let insert = transaction
        .prepare_cached(
            "INSERT INTO jobs (request_id, operation, state, created_at, deadline)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
             ON CONFLICT (request_id) DO NOTHING
             RETURNING request_id",
        )
        .await?;
    let created = transaction
        .query(
            &insert,
            &[&request_ids, &operations, &states, &created_at, &deadlines],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<HashSet<String>, _>>()?;
    let lock = transaction
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE request_id = ANY($1) ORDER BY request_id FOR NO KEY UPDATE"
        ))
        .await?;
    let mut rows = HashMap::with_capacity(jobs.len());
    for row in transaction.query(&lock, &[&request_ids]).await? {
        let row = JobRow::from_row(&row)?;
        rows.insert(row.request_id.clone(), row);
    }
    Ok((rows, created))
}

/// Changes to the devices of locked jobs, written with a few set-based statements.
#[derive(Default)]
pub(super) struct DeviceUpdates {
    /// (job, kind, identifier) → device; new devices have negative placeholder ids.
    devices: HashMap<(i64, String, String), i64>,
    /// The latest status of every device seen (None: registered, not reported).
    status: HashMap<i64, Option<&'static str>>,
    /// The stored latest outcome of the devices loaded.
    stored_latest: HashMap<i64, i64>,
    /// Device → its new latest outcome and status.
    latest: HashMap<i64, (i64, &'static str)>,
    /// New devices: placeholder, job, registered.
    new_devices: Vec<(i64, i64, bool)>,
    /// Existing devices now registered.
    now_registered: Vec<i64>,
    /// New identifier rows: job, kind, identifier, device.
    new_identifiers: Vec<(i64, String, String, i64)>,
}

impl DeviceUpdates {
    /// Loads the stored devices that any of `wanted` (job, kind, identifier) names.
    async fn load_identifiers(
        &mut self,
        transaction: &Transaction<'_>,
        wanted: &[(i64, String, String)],
    ) -> Result<(), tokio_postgres::Error> {
        if wanted.is_empty() {
            return Ok(());
        }
        let jobs: Vec<i64> = wanted.iter().map(|key| key.0).collect();
        let kinds: Vec<&str> = wanted.iter().map(|key| key.1.as_str()).collect();
        let identifiers: Vec<&str> = wanted.iter().map(|key| key.2.as_str()).collect();
        let statement = transaction
            .prepare_cached(
                // One primary-key probe per wanted identifier, whatever the planner thinks of the
                // table's size (LIMIT keeps the subquery from being flattened into a hash join,
                // which profiling showed scanning the whole table once per batch).
                "SELECT w.job_id, w.kind, w.identifier, i.job_device_id, d.status, d.latest_outcome_id
                 FROM unnest($1::bigint[], $2::text[], $3::text[]) AS w (job_id, kind, identifier)
                 CROSS JOIN LATERAL (
                     SELECT job_device_id FROM job_device_identifiers
                     WHERE job_id = w.job_id AND kind = w.kind AND identifier = w.identifier
                     LIMIT 1) i
                 JOIN job_devices d ON d.id = i.job_device_id",
            )
            .await?;
        for row in transaction
            .query(&statement, &[&jobs, &kinds, &identifiers])
            .await?
        {
            let device: i64 = row.try_get(3)?;
            let status: Option<String> = row.try_get(4)?;
            if let Some(latest) = row.try_get::<_, Option<i64>>(5)? {
                self.stored_latest.insert(device, latest);
            }
            self.devices
                .insert((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?), device);
            self.status
                .insert(device, status.as_deref().and_then(static_status));
        }
        Ok(())
    }

    /// Loads the devices the outcomes of `new_deliveries` may name.
    pub async fn load(
        &mut self,
        transaction: &Transaction<'_>,
        rows: &HashMap<String, JobRow>,
        deliveries: &[&NewDelivery],
        new_deliveries: &[usize],
    ) -> Result<(), tokio_postgres::Error> {
        let mut wanted = Vec::new();
        for index in new_deliveries {
            let DeliveryContent::Callback(callback) = &deliveries[*index].content else {
                continue;
            };
            let Some(job) = callback
                .request_id
                .as_deref()
                .and_then(|request_id| rows.get(&key_text(request_id)))
            else {
                continue;
            };
            for outcome in &callback.outcomes {
                for identifier in &outcome.identifiers {
                    wanted.push((job.id, key_text(&identifier.kind), key_text(&identifier.id)));
                }
            }
        }
        self.load_identifiers(transaction, &wanted).await
    }

    /// The job's device one of `identifiers` names.
    fn find(&self, job_id: i64, identifiers: &[DeviceIdentifier]) -> Option<i64> {
        identifiers.iter().find_map(|identifier| {
            self.devices
                .get(&(job_id, key_text(&identifier.kind), key_text(&identifier.id)))
                .copied()
        })
    }

    fn add(&mut self, job_id: i64, registered: bool) -> i64 {
        let placeholder = -1 - i64::try_from(self.new_devices.len()).unwrap_or(i64::MAX - 1);
        self.new_devices.push((placeholder, job_id, registered));
        self.status.insert(placeholder, None);
        placeholder
    }

    fn add_identifiers(&mut self, job_id: i64, device: i64, identifiers: &[DeviceIdentifier]) {
        for identifier in identifiers {
            let key = (job_id, key_text(&identifier.kind), key_text(&identifier.id));
            if !self.devices.contains_key(&key) {
                self.new_identifiers
                    .push((job_id, key.1.clone(), key.2.clone(), device));
                self.devices.insert(key, device);
            }
        }
    }

    /// Makes `outcome_id` the latest outcome of the job's device it names (a new device if none),
    /// and counts the change on `job`.
    pub fn record_outcome(
        &mut self,
        job_id: i64,
        outcome_id: i64,
        identifiers: &[DeviceIdentifier],
        status: OutcomeStatus,
        job: &mut TouchedJob,
    ) {
        let device = match self.find(job_id, identifiers) {
            Some(device) => device,
            None => self.add(job_id, false),
        };
        let current = self
            .latest
            .get(&device)
            .map(|latest| latest.0)
            .or_else(|| self.stored_latest.get(&device).copied());
        if current.is_some_and(|current| current > outcome_id) {
            // Another replica committed a newer outcome of this device (a higher id) first: this
            // one is history, and the latest stays the newest, as in the device history.
            self.add_identifiers(job_id, device, identifiers);
            return;
        }
        job.count_outcome(self.status.get(&device).copied().flatten(), status);
        self.status.insert(device, Some(status.as_str()));
        self.latest.insert(device, (outcome_id, status.as_str()));
        self.add_identifiers(job_id, device, identifiers);
    }

    /// Marks the job's device `identifier` names as registered (a new device if none).
    fn register(&mut self, job_id: i64, identifier: &DeviceIdentifier) {
        let identifiers = std::slice::from_ref(identifier);
        match self.find(job_id, identifiers) {
            Some(device) if device > 0 => self.now_registered.push(device),
            Some(_) => {}
            None => {
                let device = self.add(job_id, true);
                self.add_identifiers(job_id, device, identifiers);
            }
        }
    }

    /// Writes the changes in one pipelined round trip; new devices take their ids from `fresh`
    /// (at least as many as there are new devices).
    pub async fn write(
        self,
        transaction: &Transaction<'_>,
        fresh: Vec<i64>,
    ) -> Result<(), tokio_postgres::Error> {
        let real: HashMap<i64, i64> = self
            .new_devices
            .iter()
            .map(|(placeholder, _, _)| *placeholder)
            .zip(fresh)
            .collect();
        let id_of = |device: i64| real.get(&device).copied().unwrap_or(device);
        let new_ids: Vec<i64> = self
            .new_devices
            .iter()
            .map(|device| id_of(device.0))
            .collect();
        let new_jobs: Vec<i64> = self.new_devices.iter().map(|device| device.1).collect();
        let new_registered: Vec<bool> = self.new_devices.iter().map(|device| device.2).collect();
        let new_latest: Vec<Option<i64>> = self
            .new_devices
            .iter()
            .map(|device| self.latest.get(&device.0).map(|latest| latest.0))
            .collect();
        let new_status: Vec<Option<&str>> = self
            .new_devices
            .iter()
            .map(|device| self.latest.get(&device.0).map(|latest| latest.1))
            .collect();
        let updated: Vec<(i64, i64, &str)> = self
            .latest
            .iter()
            .filter(|(device, _)| **device > 0)
            .map(|(device, (outcome, status))| (*device, *outcome, *status))
            .collect();
        let updated_ids: Vec<i64> = updated.iter().map(|update| update.0).collect();
        let updated_outcomes: Vec<i64> = updated.iter().map(|update| update.1).collect();
        let updated_status: Vec<&str> = updated.iter().map(|update| update.2).collect();
        let identifier_jobs: Vec<i64> = self.new_identifiers.iter().map(|row| row.0).collect();
        let identifier_kinds: Vec<&str> = self
            .new_identifiers
            .iter()
            .map(|row| row.1.as_str())
            .collect();
        let identifier_values: Vec<&str> = self
            .new_identifiers
            .iter()
            .map(|row| row.2.as_str())
            .collect();
        let identifier_devices: Vec<i64> = self
            .new_identifiers
            .iter()
            .map(|row| id_of(row.3))
            .collect();

        let insert_devices = async {
            if new_ids.is_empty() {
                return Ok(());
            }
            let statement = transaction
                .prepare_cached(
                    "INSERT INTO job_devices (id, job_id, registered, latest_outcome_id, status)
                     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::boolean[], $4::bigint[], $5::text[])",
                )
                .await?;
            transaction
                .execute(
                    &statement,
                    &[
                        &new_ids,
                        &new_jobs,
                        &new_registered,
                        &new_latest,
                        &new_status,
                    ],
                )
                .await
                .map(drop)
        };
        let update_devices = async {
            if updated_ids.is_empty() {
                return Ok(());
            }
            let statement = transaction
                .prepare_cached(
                    "UPDATE job_devices d SET latest_outcome_id = u.outcome, status = u.status
                     FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS u (id, outcome, status)
                     WHERE d.id = u.id",
                )
                .await?;
            transaction
                .execute(
                    &statement,
                    &[&updated_ids, &updated_outcomes, &updated_status],
                )
                .await
                .map(drop)
        };
        let mark_registered = async {
            if self.now_registered.is_empty() {
                return Ok(());
            }
            let statement = transaction
                .prepare_cached("UPDATE job_devices SET registered = TRUE WHERE id = ANY($1)")
                .await?;
            transaction
                .execute(&statement, &[&self.now_registered])
                .await
                .map(drop)
        };
        let insert_identifiers = async {
            if identifier_jobs.is_empty() {
                return Ok(());
            }
            let statement = transaction
                .prepare_cached(
                    "INSERT INTO job_device_identifiers (job_id, kind, identifier, job_device_id)
                     SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[])
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            transaction
                .execute(
                    &statement,
                    &[
                        &identifier_jobs,
                        &identifier_kinds,
                        &identifier_values,
                        &identifier_devices,
                    ],
                )
                .await
                .map(drop)
        };
        // Sent in this order: device rows before the identifiers referring to them.
        tokio::try_join!(
            insert_devices,
            update_devices,
            mark_registered,
            insert_identifiers
        )?;
        Ok(())
    }
}

/// A stored status as the `'static` label it is (anything else counts nowhere).
fn static_status(status: &str) -> Option<&'static str> {
    OutcomeStatus::from_label(status).map(OutcomeStatus::as_str)
}

/// Applies each job's batch changes (recomputing the state of jobs that received a first
/// delivery) and writes the rows back.
pub(super) async fn finish(
    transaction: &Transaction<'_>,
    rows: &mut HashMap<String, JobRow>,
    touched: HashMap<String, TouchedJob>,
    completions: &mut Vec<JobCompletion>,
) -> Result<(), tokio_postgres::Error> {
    for (request_id, job) in touched {
        if let Some(row) = rows.get_mut(&request_id) {
            completions.extend(job.apply_to(row));
        }
    }
    write_jobs(transaction, rows.values()).await
}

/// Writes the mutable columns of locked job rows back, in one statement.
async fn write_jobs<'a>(
    transaction: &Transaction<'_>,
    rows: impl Iterator<Item = &'a JobRow>,
) -> Result<(), tokio_postgres::Error> {
    let rows: Vec<&JobRow> = rows.collect();
    if rows.is_empty() {
        return Ok(());
    }
    macro_rules! column {
        ($field:ident) => {
            rows.iter()
                .map(|row| row.$field.clone())
                .collect::<Vec<_>>()
        };
    }
    let statement = transaction
        .prepare_cached(
            "UPDATE jobs SET operation = u.operation, state = u.state, devices_reported = u.devices_reported,
                 succeeded = u.succeeded, failed = u.failed, accepted = u.accepted, deliveries = u.deliveries,
                 duplicates = u.duplicates, is_upload = u.is_upload, total_lines = u.total_lines,
                 pending_lines = u.pending_lines, success_lines = u.success_lines, failed_lines = u.failed_lines,
                 package_error = u.package_error, first_callback_at = u.first_callback_at,
                 last_callback_at = u.last_callback_at, completed_at = u.completed_at, quarantined = u.quarantined
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[],
                 $8::bigint[], $9::bigint[], $10::boolean[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[],
                 $15::text[], $16::text[], $17::text[], $18::text[], $19::bigint[])
                 AS u (id, operation, state, devices_reported, succeeded, failed, accepted, deliveries, duplicates,
                       is_upload, total_lines, pending_lines, success_lines, failed_lines, package_error,
                       first_callback_at, last_callback_at, completed_at, quarantined)
             WHERE jobs.id = u.id",
        )
        .await?;
    transaction
        .execute(
            &statement,
            &[
                &column!(id),
                &column!(operation),
                &column!(state),
                &column!(devices_reported),
                &column!(succeeded),
                &column!(failed),
                &column!(accepted),
                &column!(deliveries),
                &column!(duplicates),
                &column!(is_upload),
                &column!(total_lines),
                &column!(pending_lines),
                &column!(success_lines),
                &column!(failed_lines),
                &rows
                    .iter()
                    .map(|row| clean_option(row.package_error.as_deref()))
                    .collect::<Vec<_>>(),
                &column!(first_callback_at),
                &column!(last_callback_at),
                &column!(completed_at),
                &column!(quarantined),
            ],
        )
        .await?;
    Ok(())
}

/// Registers a job as `plan` says, or adopts the unregistered one earlier callbacks created.
pub(super) async fn register(
    transaction: &Transaction<'_>,
    plan: &RegistrationPlan<'_>,
    now: OffsetDateTime,
    completions: &mut Vec<JobCompletion>,
) -> Result<Registered, Failure> {
    let registration = plan.registration();
    let request_id = registration.request_id.clone();
    let (mut rows, created) = create_and_lock(
        transaction,
        vec![(request_id.clone(), Some(plan.operation()), now)],
        plan.timeout,
    )
    .await?;
    let Some(mut row) = rows.remove(&request_id) else {
        return Err(Failure::Defect(
            "a job created and locked a moment ago is not there",
        ));
    };
    if row.registered {
        let stored: Option<String> = transaction
            .query_one("SELECT registration FROM jobs WHERE id = $1", &[&row.id])
            .await?
            .try_get(0)?;
        return Ok(plan.repeated(row, stored.as_deref()));
    }
    plan.apply(&mut row);
    row.account = clean_option(row.account.as_deref()).map(Into::into);
    row.label = clean_option(row.label.as_deref()).map(Into::into);
    transaction
        .execute(
            "UPDATE jobs SET registered = TRUE, operation = $2, account = $3, label = $4, expected_devices = $5,
                 timeout_s = $6, registration = $7, registered_at = $8, deadline = $9
             WHERE id = $1",
            &[
                &row.id,
                &row.operation,
                &row.account,
                &row.label,
                &row.expected_devices,
                &row.timeout_s,
                &plan.canonical,
                &row.registered_at,
                &row.deadline,
            ],
        )
        .await?;
    let mut devices = DeviceUpdates::default();
    let wanted: Vec<(i64, String, String)> = registration
        .devices
        .iter()
        .map(|device| (row.id, key_text(&device.kind), key_text(&device.id)))
        .collect();
    devices.load_identifiers(transaction, &wanted).await?;
    for device in &registration.devices {
        devices.register(row.id, device);
    }
    let [_, _, fresh, _] = reserve_ids(transaction, [0, 0, devices.new_devices.len(), 0]).await?;
    devices.write(transaction, fresh).await?;
    // The identifiers a registration names are indexed for the device lookup (see the schema).
    let kinds: Vec<String> = registration
        .devices
        .iter()
        .map(|device| key_text(&device.kind))
        .collect();
    let ids: Vec<String> = registration
        .devices
        .iter()
        .map(|device| key_text(&device.id))
        .collect();
    transaction
        .execute(
            "UPDATE job_device_identifiers i SET registered = TRUE
             FROM unnest($2::text[], $3::text[]) AS r (kind, identifier)
             WHERE i.job_id = $1 AND i.kind = r.kind AND i.identifier = r.identifier",
            &[&row.id, &kinds, &ids],
        )
        .await?;
    let (write, completion) = row.recompute(now);
    completions.extend(completion);
    if write {
        write_jobs(transaction, std::iter::once(&row)).await?;
    }
    Ok(if created.contains(&request_id) {
        Registered::Created(row.into_record())
    } else {
        Registered::Adopted(row.into_record())
    })
}

/// Open jobs locked per sweep transaction.
pub(super) const SWEEP_CHUNK: usize = 500;

/// Applies the state rule to up to [`SWEEP_CHUNK`] open jobs whose deadline has passed, skipping
/// those another replica holds (it is sweeping or updating them). Returns how many changed and
/// how many were locked.
pub(super) async fn sweep_chunk(
    transaction: &Transaction<'_>,
    now: OffsetDateTime,
    completions: &mut Vec<JobCompletion>,
) -> Result<(u64, usize), tokio_postgres::Error> {
    let statement = transaction
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE state IN ('pending', 'in_progress') AND deadline < $1
             ORDER BY id LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED"
        ))
        .await?;
    let limit = i64::try_from(SWEEP_CHUNK).unwrap_or(i64::MAX);
    let mut rows = transaction
        .query(&statement, &[&timestamp(now), &limit])
        .await?
        .iter()
        .map(JobRow::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let locked = rows.len();
    let mut changed = Vec::new();
    for row in &mut rows {
        let (write, completion) = row.recompute(now);
        completions.extend(completion);
        if write {
            changed.push(&*row);
        }
    }
    let count = changed.len() as u64;
    write_jobs(transaction, changed.into_iter()).await?;
    Ok((count, if count == 0 { 0 } else { locked }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_older_than_the_stored_latest_is_history_and_does_not_move_the_counters() {
        let mut devices = DeviceUpdates::default();
        let imei = DeviceIdentifier::new("IMEI", "350000000000001");
        devices
            .devices
            .insert((1, "IMEI".to_owned(), "350000000000001".to_owned()), 7);
        devices.status.insert(7, Some("succeeded"));
        devices.stored_latest.insert(7, 100);
        let mut job = TouchedJob::new(OffsetDateTime::UNIX_EPOCH);

        // Reserved before, committed after outcome 100 (by another replica): history only.
        devices.record_outcome(
            1,
            90,
            std::slice::from_ref(&imei),
            OutcomeStatus::Failed,
            &mut job,
        );
        assert_eq!(job.counters, [0, 0, 0, 0]);
        assert!(devices.latest.is_empty());

        // Newer: becomes the latest, moving the device from succeeded to failed.
        devices.record_outcome(
            1,
            110,
            std::slice::from_ref(&imei),
            OutcomeStatus::Failed,
            &mut job,
        );
        assert_eq!(job.counters, [0, -1, 1, 0]);
        assert_eq!(devices.latest.get(&7), Some(&(110, "failed")));
    }
}
