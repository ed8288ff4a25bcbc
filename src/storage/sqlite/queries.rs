//! Read queries for the API, run on read-only connections. The rows are mapped in
//! [`crate::storage::rows`], as the PostgreSQL backend's are.

use rusqlite::{Connection, OptionalExtension, ToSql, params, params_from_iter};

use crate::domain::DeviceIdentifier;
use crate::storage::jobs::{JOB_COLUMNS, JobRow};
use crate::storage::rows::{
    Conditions, DEVICE_JOB_COLUMNS, DeviceJobs, DeviceMessages, FilterValue, HISTORY_LIMIT,
    History, JobDevices, MESSAGE_COLUMNS, OUTCOME_COLUMNS, RAW_BODY_COLUMNS, RowReader,
    delivery_columns, delivery_from_row, identifier_candidates, job_device_columns,
    newest_message_ids, page, raw_body_from_row,
};
use crate::storage::{
    DeliveryQuery, DeliveryRecord, DeviceHistory, JobQuery, JobRecord, MessageQuery, MessageRecord,
    OutcomeRecord, Page, RawBody,
};

impl RowReader for rusqlite::Row<'_> {
    type Error = rusqlite::Error;

    fn text(&self, column: usize) -> rusqlite::Result<String> {
        self.get(column)
    }

    fn optional_text(&self, column: usize) -> rusqlite::Result<Option<String>> {
        self.get(column)
    }

    fn integer(&self, column: usize) -> rusqlite::Result<i64> {
        self.get(column)
    }

    fn optional_integer(&self, column: usize) -> rusqlite::Result<Option<i64>> {
        self.get(column)
    }

    fn flag(&self, column: usize) -> rusqlite::Result<bool> {
        self.get(column)
    }

    fn optional_bytes(&self, column: usize) -> rusqlite::Result<Option<Vec<u8>>> {
        self.get(column)
    }
}

impl ToSql for FilterValue {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            FilterValue::Text(text) => text.to_sql(),
            FilterValue::Integer(integer) => integer.to_sql(),
            FilterValue::Boolean(boolean) => boolean.to_sql(),
        }
    }
}

/// The conditions' clause, and their values followed by the LIMIT.
fn filtered(conditions: Conditions, limit: i64) -> (String, Vec<FilterValue>) {
    let clause = conditions.clause(|_| "?".to_owned());
    let mut values = conditions.values;
    values.push(FilterValue::Integer(limit + 1));
    (clause, values)
}

pub(super) fn list_deliveries(
    connection: &Connection,
    query: &DeliveryQuery,
) -> rusqlite::Result<Page<DeliveryRecord>> {
    let limit = i64::from(query.limit.max(1));
    let (clause, values) = filtered(Conditions::deliveries(query), limit);
    let columns = delivery_columns("d.duplicates");
    let items = connection
        .prepare_cached(&format!(
            "SELECT {columns} FROM deliveries d {clause} ORDER BY id DESC LIMIT ?"
        ))?
        .query_map(params_from_iter(values.iter()), |row| {
            delivery_from_row(row)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(page(items, limit, |delivery| delivery.id))
}

pub(super) fn raw_body(connection: &Connection, delivery_id: i64) -> rusqlite::Result<RawBody> {
    let found = connection
        .prepare_cached(&format!(
            "SELECT {RAW_BODY_COLUMNS}
             FROM deliveries d LEFT JOIN raw_bodies r ON r.delivery_id = d.id
             WHERE d.id = ?1"
        ))?
        .query_row([delivery_id], |row| raw_body_from_row(row))
        .optional()?;
    Ok(found.unwrap_or(RawBody::NotFound))
}

pub(super) fn job_by_request_id(
    connection: &Connection,
    request_id: &str,
) -> rusqlite::Result<Option<JobRecord>> {
    Ok(connection
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE request_id = ?1"
        ))?
        .query_row([request_id], |row| JobRow::from_row(row))
        .optional()?
        .map(JobRow::into_record))
}

pub(super) fn list_jobs(
    connection: &Connection,
    query: &JobQuery,
) -> rusqlite::Result<Page<JobRecord>> {
    let limit = i64::from(query.limit.max(1));
    let (clause, values) = filtered(Conditions::jobs(query), limit);
    let items = connection
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT ?"
        ))?
        .query_map(params_from_iter(values.iter()), |row| {
            JobRow::from_row(row).map(JobRow::into_record)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(page(items, limit, |job| job.id))
}

/// Every device of a job, in the order they became known, with its latest outcome.
pub(super) fn job_devices(
    connection: &Connection,
    request_id: &str,
    now: &str,
) -> rusqlite::Result<Option<Vec<OutcomeRecord>>> {
    let Some(job) = job_by_request_id(connection, request_id)? else {
        return Ok(None);
    };
    let mut devices = JobDevices::new(&job, now);
    let mut statement = connection.prepare_cached(
        "SELECT job_device_id, kind, identifier FROM job_device_identifiers WHERE job_id = ?1",
    )?;
    let mut rows = statement.query([job.id])?;
    while let Some(row) = rows.next()? {
        devices.add_identifier(row)?;
    }
    let mut statement = connection.prepare_cached(&format!(
        "SELECT {}
         FROM job_devices d LEFT JOIN device_outcomes o ON o.id = d.latest_outcome_id
         WHERE d.job_id = ?1 ORDER BY d.id",
        job_device_columns()
    ))?;
    let mut rows = statement.query([job.id])?;
    while let Some(row) = rows.next()? {
        devices.add(row)?;
    }
    Ok(Some(devices.devices))
}

pub(super) fn device_history(
    connection: &Connection,
    identifier: &DeviceIdentifier,
    now: &str,
) -> rusqlite::Result<Option<DeviceHistory>> {
    let candidates = identifier_candidates(&identifier.id);
    let mut outcome_ids: Vec<i64> = Vec::new();
    for candidate in &candidates {
        outcome_ids = connection
            .prepare_cached(
                "SELECT outcome_id FROM outcome_identifiers WHERE kind = ?1 AND identifier = ?2
                 ORDER BY outcome_id DESC LIMIT ?3",
            )?
            .query_map(params![identifier.kind, candidate, HISTORY_LIMIT], |row| {
                row.get(0)
            })?
            .collect::<rusqlite::Result<_>>()?;
        if !outcome_ids.is_empty() {
            break;
        }
    }
    let mut history = History::default();
    let mut outcome_statement = connection.prepare_cached(&format!(
        "SELECT {OUTCOME_COLUMNS} FROM device_outcomes o WHERE o.id = ?1"
    ))?;
    // One primary-key lookup per outcome, newest first.
    for outcome_id in outcome_ids {
        let mut rows = outcome_statement.query([outcome_id])?;
        while let Some(row) = rows.next()? {
            history.add(row)?;
        }
    }
    let jobs = device_jobs(connection, identifier, now)?;
    Ok(history.finish(jobs))
}

/// The job devices one (kind, identifier) names, newest first (see [`device_jobs`]).
const DEVICE_JOBS: &str = "SELECT job_device_id, kind, identifier FROM job_device_identifiers
         WHERE kind = ?1 AND identifier = ?2 AND registered = 1
         UNION
         SELECT i.job_device_id, i.kind, i.identifier
         FROM outcome_identifiers oi JOIN device_outcomes o ON o.id = oi.outcome_id
         JOIN jobs j ON j.request_id = o.request_id
         JOIN job_device_identifiers i ON i.job_id = j.id AND i.kind = oi.kind AND i.identifier = oi.identifier
         WHERE oi.kind = ?1 AND oi.identifier = ?2
         ORDER BY 1 DESC LIMIT ?3";

/// The jobs that list the device `identifier` names, newest first: registered with it before any
/// callback (through `job_device_identifiers_registered`), or reported by one (through its
/// outcomes' jobs).
fn device_jobs(
    connection: &Connection,
    identifier: &DeviceIdentifier,
    now: &str,
) -> rusqlite::Result<DeviceJobs> {
    let mut jobs = DeviceJobs::default();
    let mut job_device_ids: Vec<i64> = Vec::new();
    let mut lookup = connection.prepare_cached(DEVICE_JOBS)?;
    for candidate in identifier_candidates(&identifier.id) {
        let mut rows = lookup.query(params![identifier.kind, candidate, HISTORY_LIMIT])?;
        while let Some(row) = rows.next()? {
            job_device_ids.push(jobs.add_identifier(row)?);
        }
        if !job_device_ids.is_empty() {
            break;
        }
    }
    let mut device_statement = connection.prepare_cached(&format!(
        "SELECT {DEVICE_JOB_COLUMNS}
         FROM job_devices d LEFT JOIN device_outcomes o ON o.id = d.latest_outcome_id
         WHERE d.id = ?1"
    ))?;
    let mut job_statement =
        connection.prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?;
    // Primary-key lookups, newest job device first.
    for job_device_id in job_device_ids {
        let mut rows = device_statement.query([job_device_id])?;
        while let Some(row) = rows.next()? {
            let job = job_statement
                .query_row([DeviceJobs::job_id(row)?], |job| JobRow::from_row(job))
                .optional()?
                .map(JobRow::into_record);
            if let Some(job) = job {
                jobs.add(row, &job, now)?;
            }
        }
    }
    Ok(jobs)
}

/// A page of a device's messages, newest first: the ids from the identifier index (in index
/// order, from the cursor on), then one primary-key lookup per message.
pub(super) fn device_messages(
    connection: &Connection,
    query: &MessageQuery,
) -> rusqlite::Result<Page<MessageRecord>> {
    let limit = i64::from(query.limit.max(1));
    let before = query.before_id.unwrap_or(i64::MAX);
    let mut found: Vec<i64> = Vec::new();
    let mut ids_statement = connection.prepare_cached(
        "SELECT message_id FROM message_identifiers
         WHERE kind = ?1 AND identifier = ?2 AND message_id < ?3
         ORDER BY message_id DESC LIMIT ?4",
    )?;
    for candidate in identifier_candidates(&query.identifier.id) {
        let ids = ids_statement
            .query_map(
                params![query.identifier.kind, candidate, before, limit + 1],
                |row| row.get::<_, i64>(0),
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        found.extend(ids);
    }
    let mut messages = DeviceMessages::default();
    let mut identifier_statement = connection.prepare_cached(
        "SELECT message_id, kind, identifier FROM message_identifiers WHERE message_id = ?1",
    )?;
    let mut message_statement = connection.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM device_messages m WHERE m.id = ?1"
    ))?;
    for message_id in newest_message_ids(found, limit) {
        let mut rows = identifier_statement.query([message_id])?;
        while let Some(row) = rows.next()? {
            messages.add_identifier(row)?;
        }
        let mut rows = message_statement.query([message_id])?;
        while let Some(row) = rows.next()? {
            messages.add(row)?;
        }
    }
    Ok(messages.page(limit))
}

/// How many jobs are in each state (for the `m2m_jobs` gauge).
pub(super) fn job_counts(connection: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    connection
        .prepare_cached("SELECT state, count(*) FROM jobs GROUP BY state")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan SQLite chooses for a listing, as one line per step.
    fn plan(connection: &Connection, sql: &str, values: &[&dyn ToSql]) -> String {
        let mut statement = connection
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap();
        let rows = statement
            .query_map(params_from_iter(values.iter()), |row| {
                row.get::<_, String>(3)
            })
            .unwrap();
        rows.map(|row| row.unwrap()).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn filtered_listings_use_their_indexes() {
        let mut connection = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut connection).unwrap();
        let columns = "SELECT id FROM deliveries";
        let by_request = plan(
            &connection,
            &format!("{columns} WHERE request_id = ? ORDER BY id DESC LIMIT 10"),
            &[&"r"],
        );
        assert!(by_request.contains("deliveries_request"), "{by_request}");
        let quarantined = plan(
            &connection,
            &format!("{columns} WHERE result = ? AND result <> 'stored' ORDER BY id DESC LIMIT 10"),
            &[&"quarantined"],
        );
        assert!(
            quarantined.contains("deliveries_unusual_result"),
            "{quarantined}"
        );
        let by_state = plan(
            &connection,
            "SELECT id FROM jobs WHERE state = ? ORDER BY id DESC LIMIT 10",
            &[&"pending"],
        );
        assert!(by_state.contains("jobs_state"), "{by_state}");
        let device_jobs = plan(
            &connection,
            DEVICE_JOBS,
            &[&"IMEI", &"350000000000001", &500],
        );
        for index in [
            "job_device_identifiers_registered",
            "SEARCH oi USING PRIMARY KEY (kind=? AND identifier=?)",
            "sqlite_autoindex_jobs_1 (request_id=?)",
            "SEARCH i USING PRIMARY KEY (job_id=? AND kind=? AND identifier=?)",
        ] {
            assert!(device_jobs.contains(index), "{index}: {device_jobs}");
        }
        assert!(
            !device_jobs.lines().any(|step| step.starts_with("SCAN ")),
            "{device_jobs}"
        );
        let messages = plan(
            &connection,
            "SELECT message_id FROM message_identifiers
             WHERE kind = ? AND identifier = ? AND message_id < ? ORDER BY message_id DESC LIMIT 10",
            &[&"IMEI", &"1", &5_i64],
        );
        assert!(
            messages.contains("PRIMARY KEY") && !messages.contains("TEMP B-TREE"),
            "{messages}"
        );
    }

    /// An index costs the writer one more b-tree entry per row; one that no query reads is that
    /// cost for nothing (issue 13: `device_outcomes_request` and `upload_summaries_request` were
    /// read by none). Every index that is not a uniqueness constraint must be in the plan of a
    /// query the listener runs: the listings, the device lookup, a job's devices, the sweep, a
    /// message's identifiers, a sink's due events.
    #[test]
    fn every_index_is_read_by_a_query() {
        let connection = migrated();
        let plans = [
            plan(
                &connection,
                "SELECT id FROM deliveries WHERE request_id = ? ORDER BY id DESC LIMIT 10",
                &[&"r"],
            ),
            plan(
                &connection,
                "SELECT id FROM deliveries WHERE result = ? AND result <> 'stored' ORDER BY id DESC LIMIT 10",
                &[&"quarantined"],
            ),
            plan(
                &connection,
                "SELECT id FROM jobs WHERE state = ? ORDER BY id DESC LIMIT 10",
                &[&"pending"],
            ),
            plan(
                &connection,
                DEVICE_JOBS,
                &[&"IMEI", &"350000000000001", &500],
            ),
            plan(
                &connection,
                "SELECT d.id FROM job_devices d WHERE d.job_id = ?1 ORDER BY d.id",
                &[&1],
            ),
            plan(
                &connection,
                &format!("SELECT id {}", super::super::jobs::OVERDUE_JOBS),
                &[&"t"],
            ),
            plan(
                &connection,
                "SELECT message_id, kind, identifier FROM message_identifiers WHERE message_id = ?1",
                &[&1],
            ),
            plan(
                &connection,
                "SELECT d.event_id FROM event_deliveries d
                 WHERE d.sink = ?1 AND d.state = 'pending' AND d.next_attempt_at <= ?2",
                &[&"s", &"t"],
            ),
        ]
        .join("\n");
        let mut statement = connection
            .prepare(
                "SELECT name FROM sqlite_master
                 WHERE type = 'index' AND sql IS NOT NULL AND sql NOT LIKE 'CREATE UNIQUE%'",
            )
            .unwrap();
        let indexes: Vec<String> = statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(indexes.len() >= 8, "{indexes:?}");
        let unread: Vec<&String> = indexes
            .iter()
            .filter(|index| {
                !plans.contains(&format!("INDEX {index} "))
                    && !plans.contains(&format!("INDEX {index}\n"))
            })
            .collect();
        assert!(
            unread.is_empty(),
            "indexes no query reads: {unread:?}\n{plans}"
        );
    }

    fn migrated() -> Connection {
        let mut connection = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut connection).unwrap();
        connection
    }

    #[test]
    fn a_job_row_is_read_whole_created_at_included() {
        let connection = migrated();
        connection
            .execute_batch(
                "INSERT INTO jobs (request_id, registered, operation, state, expected_devices,
                     devices_reported, succeeded, is_upload, total_lines, created_at, registered_at,
                     deadline)
                 VALUES ('r-1', 1, 'activate', 'in_progress', 3, 2, 2, 1, 5,
                     '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:01.000000Z',
                     '2026-01-02T00:00:00.000000Z')",
            )
            .unwrap();
        let row = connection
            .query_row(&format!("SELECT {JOB_COLUMNS} FROM jobs"), [], |row| {
                JobRow::from_row(row)
            })
            .unwrap();
        assert_eq!(row.created_at, "2026-01-01T00:00:00.000000Z");
        assert_eq!(
            row.registered_at.as_deref(),
            Some("2026-01-01T00:00:01.000000Z")
        );
        assert!(row.registered && row.is_upload);
        assert_eq!(
            (row.expected_devices, row.devices_reported, row.succeeded),
            (Some(3), 2, 2)
        );
        let record = row.into_record();
        assert_eq!(record.pending, Some(1));
        assert_eq!(record.upload.and_then(|upload| upload.total_lines), Some(5));
    }

    #[test]
    fn a_value_of_the_wrong_type_is_the_drivers_error_not_a_default() {
        let connection = migrated();
        connection
            .execute_batch(
                "INSERT INTO jobs (request_id, label, state, created_at, deadline)
                 VALUES ('r-2', x'ff', 'pending', 't0', 't1')",
            )
            .unwrap();
        let read = connection.query_row(&format!("SELECT {JOB_COLUMNS} FROM jobs"), [], |row| {
            JobRow::from_row(row)
        });
        assert!(
            matches!(read, Err(rusqlite::Error::InvalidColumnType(5, _, _))),
            "{read:?}"
        );
    }

    #[test]
    fn a_raw_body_row_says_found_duplicate_or_pruned() {
        let connection = migrated();
        connection
            .execute_batch(
                "INSERT INTO deliveries (id, received_at, dedup_key, result, size, content_type)
                     VALUES (1, 't', x'01', 'stored', 3, 'text/xml');
                 INSERT INTO raw_bodies (delivery_id, body) VALUES (1, x'616263');
                 INSERT INTO deliveries (id, received_at, dedup_key, result, duplicate_of, size)
                     VALUES (2, 't', x'01', 'duplicate', 1, 3);
                 INSERT INTO deliveries (id, received_at, dedup_key, result, size)
                     VALUES (3, 't', x'03', 'stored', 3);",
            )
            .unwrap();
        assert!(matches!(
            raw_body(&connection, 1).unwrap(),
            RawBody::Found { content_type: Some(content_type), body }
                if content_type == "text/xml" && body == b"abc"
        ));
        assert!(matches!(
            raw_body(&connection, 2).unwrap(),
            RawBody::Duplicate { duplicate_of: 1 }
        ));
        assert!(matches!(raw_body(&connection, 3).unwrap(), RawBody::Pruned));
        assert!(matches!(
            raw_body(&connection, 4).unwrap(),
            RawBody::NotFound
        ));
    }
}
