//! Read queries for the API, run on read-only connections.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, ToSql, params, params_from_iter};

use crate::domain::DeviceIdentifier;
use crate::storage::rows::{
    Conditions, FilterValue, HISTORY_LIMIT, JobRow, fault_record, identifier_candidates, page,
    parse_details, unreported_outcome,
};
use crate::storage::{
    DeliveryQuery, DeliveryRecord, DeviceHistory, JobQuery, JobRecord, OutcomeRecord, Page, RawBody,
};

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
    let mut statement = connection.prepare_cached(&format!(
        "SELECT id, received_at, form, kind, operation, request_id, callback_count, max_callback_threshold,
                result, duplicate_of, duplicates, size, content_type, account, status, fault_code, parse_error
         FROM deliveries {clause}
         ORDER BY id DESC
         LIMIT ?"
    ))?;
    let items = statement
        .query_map(params_from_iter(values.iter()), |row| {
            Ok(DeliveryRecord {
                id: row.get(0)?,
                received_at: row.get(1)?,
                form: row.get(2)?,
                kind: row.get(3)?,
                operation: row.get(4)?,
                request_id: row.get(5)?,
                callback_count: row.get(6)?,
                max_callback_threshold: row.get(7)?,
                result: row.get(8)?,
                duplicate_of: row.get(9)?,
                duplicates: row.get(10)?,
                size: row.get(11)?,
                content_type: row.get(12)?,
                account: row.get(13)?,
                status: row.get(14)?,
                fault_code: row.get(15)?,
                parse_error: row.get(16)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(page(items, limit, |delivery| delivery.id))
}

pub(super) fn raw_body(connection: &Connection, delivery_id: i64) -> rusqlite::Result<RawBody> {
    type RawRow = (Option<String>, Option<i64>, Option<Vec<u8>>);
    let row: Option<RawRow> = connection
        .prepare_cached(
            "SELECT d.content_type, d.duplicate_of, r.body
             FROM deliveries d LEFT JOIN raw_bodies r ON r.delivery_id = d.id
             WHERE d.id = ?1",
        )?
        .query_row([delivery_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    Ok(match row {
        None => RawBody::NotFound,
        Some((content_type, _, Some(body))) => RawBody::Found { content_type, body },
        Some((_, Some(duplicate_of), None)) => RawBody::Duplicate { duplicate_of },
        Some((_, None, None)) => RawBody::Pruned,
    })
}

const JOB_COLUMNS: &str = "id, request_id, registered, operation, account, label, state, expected_devices, devices_reported,
     succeeded, failed, accepted, deliveries, duplicates, is_upload, total_lines, pending_lines, success_lines,
     failed_lines, package_error, timeout_s, registered_at, first_callback_at, last_callback_at, completed_at, deadline";

fn job_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRow {
        id: row.get(0)?,
        request_id: row.get(1)?,
        registered: row.get(2)?,
        operation: row.get(3)?,
        account: row.get(4)?,
        label: row.get(5)?,
        state: row.get(6)?,
        expected_devices: row.get(7)?,
        devices_reported: row.get(8)?,
        succeeded: row.get(9)?,
        failed: row.get(10)?,
        accepted: row.get(11)?,
        deliveries: row.get(12)?,
        duplicates: row.get(13)?,
        is_upload: row.get(14)?,
        total_lines: row.get(15)?,
        pending_lines: row.get(16)?,
        success_lines: row.get(17)?,
        failed_lines: row.get(18)?,
        package_error: row.get(19)?,
        timeout_s: row.get(20)?,
        created_at: String::new(),
        registered_at: row.get(21)?,
        first_callback_at: row.get(22)?,
        last_callback_at: row.get(23)?,
        completed_at: row.get(24)?,
        deadline: row.get(25)?,
    }
    .into_record())
}

pub(super) fn job_by_id(connection: &Connection, job_id: i64) -> rusqlite::Result<JobRecord> {
    connection
        .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([job_id], job_from_row)
}

pub(super) fn job_by_request_id(
    connection: &Connection,
    request_id: &str,
) -> rusqlite::Result<Option<JobRecord>> {
    connection
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE request_id = ?1"
        ))?
        .query_row([request_id], job_from_row)
        .optional()
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
        .query_map(params_from_iter(values.iter()), job_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(page(items, limit, |job| job.id))
}

const OUTCOME_COLUMNS: &str =
    "o.id, o.request_id, o.operation, o.status, o.line_status, o.fault_code, o.fault_message,
     o.state, o.service_plan, o.ip_address, o.mdn, o.received_at, o.delivery_id, o.details";

/// An outcome row (columns as in `OUTCOME_COLUMNS`, starting at `first`), identifiers left empty.
fn outcome_from_row(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<OutcomeRecord> {
    Ok(OutcomeRecord {
        request_id: row.get(first + 1)?,
        operation: row.get(first + 2)?,
        identifiers: Vec::new(),
        status: row.get(first + 3)?,
        line_status: row.get(first + 4)?,
        fault: fault_record(row.get(first + 5)?, row.get(first + 6)?),
        state: row.get(first + 7)?,
        service_plan: row.get(first + 8)?,
        ip_address: row.get(first + 9)?,
        mdn: row.get(first + 10)?,
        received_at: row.get(first + 11)?,
        delivery_id: row.get(first + 12)?,
        details: parse_details(row.get(first + 13)?),
    })
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
    let mut identifiers: HashMap<i64, Vec<DeviceIdentifier>> = HashMap::new();
    let mut rows = connection.prepare_cached(
        "SELECT job_device_id, kind, identifier FROM job_device_identifiers WHERE job_id = ?1",
    )?;
    let mut found = rows.query([job.id])?;
    while let Some(row) = found.next()? {
        identifiers
            .entry(row.get(0)?)
            .or_default()
            .push(DeviceIdentifier {
                kind: row.get(1)?,
                id: row.get(2)?,
            });
    }
    let mut statement = connection.prepare_cached(&format!(
        "SELECT d.id, o.id IS NOT NULL, {OUTCOME_COLUMNS}
         FROM job_devices d LEFT JOIN device_outcomes o ON o.id = d.latest_outcome_id
         WHERE d.job_id = ?1 ORDER BY d.id"
    ))?;
    let devices = statement
        .query_map([job.id], |row| {
            let device_id: i64 = row.get(0)?;
            let reported: bool = row.get(1)?;
            let mut outcome = if reported {
                outcome_from_row(row, 2)?
            } else {
                unreported_outcome(&job, now)
            };
            outcome.identifiers = identifiers.remove(&device_id).unwrap_or_default();
            outcome
                .identifiers
                .sort_by(|left, right| (&left.kind, &left.id).cmp(&(&right.kind, &right.id)));
            Ok(outcome)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(devices))
}

pub(super) fn device_history(
    connection: &Connection,
    identifier: &DeviceIdentifier,
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
    if outcome_ids.is_empty() {
        return Ok(None);
    }
    let mut history = Vec::with_capacity(outcome_ids.len());
    let mut all_identifiers: Vec<DeviceIdentifier> = Vec::new();
    let mut outcome_statement = connection.prepare_cached(&format!(
        "SELECT {OUTCOME_COLUMNS} FROM device_outcomes o WHERE o.id = ?1"
    ))?;
    let mut identifier_statement =
        connection.prepare_cached("SELECT kind, identifier FROM outcome_identifiers WHERE outcome_id = ?1 ORDER BY kind, identifier")?;
    for outcome_id in outcome_ids {
        let mut outcome =
            outcome_statement.query_row([outcome_id], |row| outcome_from_row(row, 0))?;
        outcome.identifiers = identifier_statement
            .query_map([outcome_id], |row| {
                Ok(DeviceIdentifier {
                    kind: row.get(0)?,
                    id: row.get(1)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        for found in &outcome.identifiers {
            if !all_identifiers.contains(found) {
                all_identifiers.push(found.clone());
            }
        }
        history.push(outcome);
    }
    all_identifiers.sort_by(|left, right| (&left.kind, &left.id).cmp(&(&right.kind, &right.id)));
    let Some(latest) = history.first().cloned() else {
        return Ok(None);
    };
    Ok(Some(DeviceHistory {
        identifiers: all_identifiers,
        latest,
        history,
    }))
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
        super::super::migrate(&mut connection).unwrap();
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
    }
}
