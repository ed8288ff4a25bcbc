//! Job writes on SQLite: correlation of a batch with its jobs, registration (and adoption), the
//! deadline sweep. Always on the writer thread, inside its transaction: it is the only writer,
//! so a job row read in this transaction is the job as stored; what the row becomes is decided
//! by [`crate::storage::jobs`], and it is written back once per batch.

use std::collections::HashMap as StdHashMap;
use std::sync::LazyLock;
use std::time::Duration;

use rusqlite::{Connection, params};
use time::OffsetDateTime;

use super::bind::Value;
use super::connection::{ROWS_PER_INSERT, Statements, insert_rows, multi_row_insert};

/// The batch's maps live for one transaction and are keyed by what the writer has just read from
/// authenticated callbacks: a fast hasher rather than SipHash.
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

use crate::domain::{Callback, DeviceIdentifier, Operation, OutcomeStatus, UploadSummary};
use crate::jobs::JobState;
use crate::storage::jobs::{
    JOB_COLUMNS, JobCompletion, JobRow, RegistrationPlan, TouchedJob, outcome_operation,
};
use crate::storage::{Registered, timestamp};

/// What one write batch does to the jobs it touches: each job's row is read (or created) at its
/// first delivery in the batch, deliveries, re-deliveries, callback times, device counters and
/// upload reports are applied to it in memory, and each is written once when the batch ends: a
/// batch of 64 callbacks of one job costs one job update, not 64 (and no recount of its devices).
///
/// A job the batch creates is not inserted until the batch ends either: it gets its id here (the
/// next rowid, which is what SQLite would give it; the writer is the only writer) and its row is
/// inserted once, final state included, rather than inserted pending and updated at once. Its
/// devices are all known to the batch, so they are matched in memory rather than looked up.
#[derive(Clone, Default)]
pub(super) struct JobBatch {
    job_ids: HashMap<String, i64>,
    rows: HashMap<i64, BatchJob>,
    touched: HashMap<i64, TouchedJob>,
    /// The id the next job created by this batch gets; read from the table at the first one.
    next_job_id: Option<i64>,
    /// The devices of the jobs this batch created, by each of their identifiers.
    new_job_devices: HashMap<(i64, DeviceIdentifier), i64>,
    /// The latest status of each of those devices, by device: one callback may name a device by
    /// an identifier another did not.
    new_device_status: HashMap<i64, &'static str>,
}

/// A job row as the batch holds it.
#[derive(Clone)]
struct BatchJob {
    row: JobRow,
    /// The state and completion time as stored, to tell whether the state columns (and with them
    /// two indexes) need writing; `None` for a job this batch creates.
    stored: Option<(String, Option<String>)>,
}

impl JobBatch {
    /// An empty batch with room for the jobs of `deliveries` deliveries (growing the maps was
    /// another 2% of the writer's work with one new job per callback).
    pub fn for_deliveries(deliveries: usize) -> Self {
        Self {
            job_ids: HashMap::with_capacity_and_hasher(deliveries, Default::default()),
            rows: HashMap::with_capacity_and_hasher(deliveries, Default::default()),
            touched: HashMap::with_capacity_and_hasher(deliveries, Default::default()),
            next_job_id: None,
            new_job_devices: HashMap::with_capacity_and_hasher(deliveries * 3, Default::default()),
            new_device_status: HashMap::with_capacity_and_hasher(deliveries, Default::default()),
        }
    }

    /// Finds or creates the job for `request_id` and counts a delivery on it with `count` (see
    /// [`TouchedJob::record_delivery`] and [`TouchedJob::record_reprocessed`]). Returns its id.
    pub fn record(
        &mut self,
        connection: &Statements<'_>,
        request_id: &str,
        operation: Option<&'static str>,
        received_at: OffsetDateTime,
        default_timeout: Duration,
        count: impl FnOnce(&mut TouchedJob),
    ) -> rusqlite::Result<i64> {
        let job_id = self.job(
            connection,
            request_id,
            operation,
            received_at,
            default_timeout,
        )?;
        count(
            self.touched
                .entry(job_id)
                .or_insert_with(|| TouchedJob::new(received_at)),
        );
        Ok(job_id)
    }

    /// The id of the job for `request_id`: read at its first delivery in the batch, or created.
    fn job(
        &mut self,
        connection: &Statements<'_>,
        request_id: &str,
        operation: Option<&'static str>,
        received_at: OffsetDateTime,
        default_timeout: Duration,
    ) -> rusqlite::Result<i64> {
        if let Some(job_id) = self.job_ids.get(request_id) {
            return Ok(*job_id);
        }
        let job = match job_row(connection, request_id)? {
            Some(row) => BatchJob {
                stored: Some((row.state.clone(), row.completed_at.clone())),
                row,
            },
            None => BatchJob {
                row: JobRow::created_by_callback(
                    self.new_job_id(connection)?,
                    request_id,
                    operation,
                    timestamp(received_at),
                    timestamp(received_at + default_timeout),
                ),
                stored: None,
            },
        };
        let job_id = job.row.id;
        self.job_ids.insert(request_id.to_owned(), job_id);
        self.rows.insert(job_id, job);
        Ok(job_id)
    }

    fn new_job_id(&mut self, connection: &Statements<'_>) -> rusqlite::Result<i64> {
        let next = match self.next_job_id {
            Some(next) => next,
            None => connection.with("SELECT coalesce(max(id), 0) + 1 FROM jobs", |statement| {
                statement.query_row([], |row| row.get(0))
            })?,
        };
        self.next_job_id = Some(next + 1);
        Ok(next)
    }

    /// Makes `outcome_id` the latest outcome of the job's device it names, matching the device by
    /// any of its identifiers (a registered IMEI finds the device a callback reports by IMEI and
    /// ICCID).
    pub fn record_outcome(
        &mut self,
        connection: &Statements<'_>,
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
        let created_here = self
            .rows
            .get(&job_id)
            .is_some_and(|job| job.stored.is_none());
        let found = if created_here {
            identifiers.iter().find_map(|identifier| {
                self.new_job_devices
                    .get(&(job_id, identifier.clone()))
                    .map(|device| {
                        let previous = self.new_device_status.get(device);
                        (*device, previous.map(|previous| (*previous).to_owned()))
                    })
            })
        } else {
            find_job_device(connection, job_id, identifiers)?
        };
        let device_id = match found {
            Some((device_id, previous)) => {
                connection.execute(
                    "UPDATE job_devices SET latest_outcome_id = ?2, status = ?3 WHERE id = ?1",
                    &[
                        Value::Integer(device_id),
                        Value::Integer(outcome_id),
                        Value::Text(status.as_str()),
                    ],
                )?;
                touched.count_outcome(previous.as_deref(), status);
                device_id
            }
            None => {
                connection.execute(
                    "INSERT INTO job_devices (job_id, latest_outcome_id, status) VALUES (?1, ?2, ?3)",
                    &[
                        Value::Integer(job_id),
                        Value::Integer(outcome_id),
                        Value::Text(status.as_str()),
                    ],
                )?;
                touched.count_outcome(None, status);
                connection.last_insert_rowid()
            }
        };
        if created_here {
            self.new_device_status.insert(device_id, status.as_str());
            let mut new = Vec::new();
            for identifier in identifiers {
                let key = (job_id, identifier.clone());
                if self.new_job_devices.insert(key, device_id).is_none() {
                    new.push(identifier.clone());
                }
            }
            return add_identifiers(connection, job_id, device_id, &new);
        }
        // A device just found may hold some of these already (`DO NOTHING`); a new one none.
        add_identifiers(connection, job_id, device_id, identifiers)
    }

    /// Counts an unreadable first delivery on its job (see [`TouchedJob::record_quarantined`]).
    pub fn record_quarantined(&mut self, job_id: i64, delta: i64) {
        if let Some(touched) = self.touched.get_mut(&job_id) {
            touched.record_quarantined(delta);
        }
    }

    /// The operation `callback`'s outcomes take in job `job_id` (see [`outcome_operation`]).
    pub fn outcome_operation(&self, job_id: i64, callback: &Callback) -> Operation {
        outcome_operation(
            callback,
            self.rows.get(&job_id).map(|job| &job.row),
            self.touched.get(&job_id),
        )
    }

    /// The job's latest upload report (see [`JobRow::record_upload`]).
    pub fn record_upload(&mut self, job_id: i64, upload: &UploadSummary) {
        if let Some(job) = self.rows.get_mut(&job_id) {
            job.row.record_upload(upload);
        }
    }

    /// Applies each touched job's batch to its row (the state rule included) and writes it: a
    /// job the batch created is inserted, one whose state changed updated with its state, any
    /// other updated without (its state columns, and the two indexes on them, stay as they are).
    pub fn finish(
        self,
        connection: &Statements<'_>,
        completions: &mut Vec<JobCompletion>,
    ) -> rusqlite::Result<()> {
        let JobBatch {
            mut rows, touched, ..
        } = self;
        for (job_id, job) in touched {
            let Some(BatchJob { mut row, stored }) = rows.remove(&job_id) else {
                continue;
            };
            completions.extend(job.apply_to(&mut row));
            match stored {
                None => insert_job(connection, &row)?,
                Some((state, completed_at)) => {
                    let state_changed = state != row.state || completed_at != row.completed_at;
                    write_job(connection, &row, state_changed)?;
                }
            }
        }
        Ok(())
    }
}

/// A job's row by its request id.
static JOB_BY_REQUEST: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {JOB_COLUMNS} FROM jobs WHERE request_id = ?1"));

fn job_row(connection: &Statements<'_>, request_id: &str) -> rusqlite::Result<Option<JobRow>> {
    connection.query_first(JOB_BY_REQUEST.as_str(), &[Value::Text(request_id)], |row| {
        JobRow::from_row(row)
    })
}

/// A new job, pending, with its deadline `timeout` after `received_at` (a registration's).
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

/// Inserts a job a batch created, as the batch leaves it (never registered: a registration is a
/// transaction of its own).
fn insert_job(connection: &Statements<'_>, row: &JobRow) -> rusqlite::Result<()> {
    connection.execute(
            "INSERT INTO jobs (id, request_id, operation, state, devices_reported, succeeded, failed, accepted,
                 deliveries, duplicates, is_upload, total_lines, pending_lines, success_lines, failed_lines,
                 package_error, created_at, first_callback_at, last_callback_at, completed_at, deadline, quarantined)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21,
                 ?22)",
        &[
            &[
                Value::Integer(row.id),
                Value::Text(&row.request_id),
                (&row.operation).into(),
                Value::Text(&row.state),
            ][..],
            &counts(row),
            &[
                Value::Text(&row.created_at),
                (&row.first_callback_at).into(),
                (&row.last_callback_at).into(),
                (&row.completed_at).into(),
                Value::Text(&row.deadline),
                Value::Integer(row.quarantined),
            ],
        ]
        .concat(),
    )?;
    Ok(())
}

/// A job's counters and upload report, in the order both [`insert_job`] and [`write_job`] name
/// their columns (`devices_reported` to `package_error`).
fn counts(row: &JobRow) -> [Value<'_>; 12] {
    [
        Value::Integer(row.devices_reported),
        Value::Integer(row.succeeded),
        Value::Integer(row.failed),
        Value::Integer(row.accepted),
        Value::Integer(row.deliveries),
        Value::Integer(row.duplicates),
        row.is_upload.into(),
        row.total_lines.into(),
        row.pending_lines.into(),
        row.success_lines.into(),
        row.failed_lines.into(),
        (&row.package_error).into(),
    ]
}

/// Writes the columns a batch changes on a job row; the state columns only if they changed.
fn write_job(
    connection: &Statements<'_>,
    row: &JobRow,
    state_changed: bool,
) -> rusqlite::Result<()> {
    if state_changed {
        write_state(connection, row)?;
    }
    connection.execute(
        "UPDATE jobs SET operation = ?2, devices_reported = ?3, succeeded = ?4, failed = ?5,
                 accepted = ?6, deliveries = ?7, duplicates = ?8, is_upload = ?9, total_lines = ?10,
                 pending_lines = ?11, success_lines = ?12, failed_lines = ?13, package_error = ?14,
                 first_callback_at = ?15, last_callback_at = ?16, quarantined = ?17
             WHERE id = ?1",
        &[
            &[Value::Integer(row.id), (&row.operation).into()][..],
            &counts(row),
            &[
                (&row.first_callback_at).into(),
                (&row.last_callback_at).into(),
                Value::Integer(row.quarantined),
            ],
        ]
        .concat(),
    )?;
    Ok(())
}

/// Writes what the state rule changes on a job row (registration, sweep).
fn write_state(connection: &Statements<'_>, row: &JobRow) -> rusqlite::Result<()> {
    connection.execute(
        "UPDATE jobs SET state = ?2, completed_at = ?3 WHERE id = ?1",
        &[
            Value::Integer(row.id),
            Value::Text(&row.state),
            (&row.completed_at).into(),
        ],
    )?;
    Ok(())
}

/// The job's device one of `identifiers` names, with its latest status. One primary-key lookup
/// per identifier: an `OR` of them lets SQLite scan every identifier of the job instead, which
/// makes a 10,000-line upload quadratic.
fn find_job_device(
    connection: &Statements<'_>,
    job_id: i64,
    identifiers: &[DeviceIdentifier],
) -> rusqlite::Result<Option<(i64, Option<String>)>> {
    for identifier in identifiers {
        let found = connection.query_first(
            "SELECT d.id, d.status FROM job_device_identifiers i JOIN job_devices d ON d.id = i.job_device_id
             WHERE i.job_id = ?1 AND i.kind = ?2 AND i.identifier = ?3",
            &[
                Value::Integer(job_id),
                Value::Text(&identifier.kind),
                Value::Text(&identifier.id),
            ],
            |row| Ok((row.integer(0)?, row.optional_text(1)?)),
        )?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

fn add_identifiers(
    connection: &Statements<'_>,
    job_id: i64,
    device_id: i64,
    identifiers: &[DeviceIdentifier],
) -> rusqlite::Result<()> {
    let rows: Vec<[Value<'_>; 4]> = identifiers
        .iter()
        .map(|identifier| {
            [
                Value::Integer(job_id),
                Value::Text(&identifier.kind),
                Value::Text(&identifier.id),
                Value::Integer(device_id),
            ]
        })
        .collect();
    insert_rows(connection, &JOB_DEVICE_IDENTIFIER, &rows)
}

/// An identifier of a job's device; one already known is left alone.
const JOB_DEVICE_IDENTIFIER: [&str; ROWS_PER_INSERT] = multi_row_insert!(
    "INSERT OR IGNORE INTO job_device_identifiers (job_id, kind, identifier, job_device_id) VALUES ",
    "(?, ?, ?, ?)"
);

/// Registers a job as `plan` says, or adopts the unregistered one earlier callbacks created.
pub(super) fn register(
    connection: &Connection,
    plan: &RegistrationPlan<'_>,
    now: OffsetDateTime,
    completions: &mut Vec<JobCompletion>,
) -> rusqlite::Result<Registered> {
    let connection = &Statements::new(connection);
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
        connection
            .prepare_cached(
                "UPDATE job_device_identifiers SET registered = 1
                 WHERE job_id = ?1 AND kind = ?2 AND identifier = ?3",
            )?
            .execute(params![row.id, device.kind, device.id])?;
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

/// The open jobs whose deadline has passed, found through `jobs_open_deadline`: left to itself
/// the planner takes `jobs_state` and reads every open job (`INDEXED BY` fails the statement
/// rather than fall back, and `queries::tests::every_index_is_read_by_a_query` checks it).
pub(super) const OVERDUE_JOBS: &str = "FROM jobs INDEXED BY jobs_open_deadline
     WHERE state IN ('pending', 'in_progress') AND deadline < ?1";

/// Applies the state rule to every open job whose deadline has passed; returns how many changed.
pub(super) fn sweep(
    connection: &Connection,
    now: OffsetDateTime,
    completions: &mut Vec<JobCompletion>,
) -> rusqlite::Result<u64> {
    let connection = &Statements::new(connection);
    let overdue: Vec<JobRow> = connection
        .prepare_cached(&format!("SELECT {JOB_COLUMNS} {OVERDUE_JOBS}"))?
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

#[cfg(test)]
mod tests {
    use super::*;

    fn identifier(kind: &str, id: &str) -> DeviceIdentifier {
        DeviceIdentifier {
            kind: kind.to_owned(),
            id: id.to_owned(),
        }
    }

    /// One device, named by its IMEI and MDN, then by each alone, in one batch: each outcome
    /// moves the counters from the device's latest status, whichever identifier names it.
    #[test]
    fn a_device_named_by_another_of_its_identifiers_is_counted_from_its_latest_status() {
        let mut connection = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut connection).unwrap();
        // As on the writer: the outcome ids below name no stored outcome.
        connection
            .pragma_update(None, "foreign_keys", "OFF")
            .unwrap();
        let statements = Statements::new(&connection);
        let mut jobs = JobBatch::for_deliveries(3);
        let now = OffsetDateTime::now_utc();
        let imei = identifier("IMEI", "990000862471854");
        let mdn = identifier("MDN", "5096300001");
        let job = jobs
            .record(
                &statements,
                "r-1",
                Some("activate"),
                now,
                Duration::from_secs(3600),
                |job| job.record_delivery(Some("activate"), now, false),
            )
            .unwrap();
        let reports = [
            (vec![imei.clone(), mdn.clone()], OutcomeStatus::Failed),
            (vec![imei], OutcomeStatus::Succeeded),
            (vec![mdn], OutcomeStatus::Failed),
        ];
        for (outcome_id, (identifiers, status)) in (1..).zip(reports) {
            jobs.record_outcome(&statements, job, outcome_id, &identifiers, status)
                .unwrap();
        }
        let mut completions = Vec::new();
        jobs.finish(&statements, &mut completions).unwrap();
        let counts: (i64, i64, i64) = statements
            .query_row(
                "SELECT devices_reported, succeeded, failed FROM jobs WHERE id = ?1",
                [job],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .unwrap();
        assert_eq!(counts, (1, 0, 1));
        let devices: i64 = statements
            .query_row("SELECT count(*) FROM job_devices", [], |row| row.get(0))
            .unwrap();
        assert_eq!(devices, 1);
    }
}
