//! Read queries for the API. The rows are mapped in [`crate::storage::rows`], as
//! the SQLite backend's are.

use deadpool_postgres::{GenericClient, Object};
use tokio_postgres::Row;
use tokio_postgres::types::{IsNull, ToSql, Type};

use super::text::clean_key;
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

type Error = tokio_postgres::Error;

impl RowReader for Row {
    type Error = Error;

    fn text(&self, column: usize) -> Result<String, Error> {
        self.try_get(column)
    }

    fn optional_text(&self, column: usize) -> Result<Option<String>, Error> {
        self.try_get(column)
    }

    fn integer(&self, column: usize) -> Result<i64, Error> {
        self.try_get(column)
    }

    fn optional_integer(&self, column: usize) -> Result<Option<i64>, Error> {
        self.try_get(column)
    }

    fn flag(&self, column: usize) -> Result<bool, Error> {
        self.try_get(column)
    }

    fn optional_bytes(&self, column: usize) -> Result<Option<Vec<u8>>, Error> {
        self.try_get(column)
    }
}

impl ToSql for FilterValue {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            FilterValue::Text(text) => text.to_sql(ty, out),
            FilterValue::Integer(integer) => integer.to_sql(ty, out),
            FilterValue::Boolean(boolean) => boolean.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <String as ToSql>::accepts(ty)
            || <i64 as ToSql>::accepts(ty)
            || <bool as ToSql>::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

/// The conditions' clause with `$1`, `$2`..., the LIMIT's placeholder, and the values (text as
/// stored: see [`clean_key`]) followed by the LIMIT.
fn filtered(conditions: Conditions, limit: i64) -> (String, String, Vec<FilterValue>) {
    let clause = conditions.clause(|index| format!("${index}"));
    let mut values: Vec<FilterValue> = conditions
        .values
        .into_iter()
        .map(|value| match value {
            FilterValue::Text(text) => FilterValue::Text(clean_key(&text).into_owned()),
            other => other,
        })
        .collect();
    values.push(FilterValue::Integer(limit + 1));
    (clause, format!("${}", values.len()), values)
}

fn parameters(values: &[FilterValue]) -> Vec<&(dyn ToSql + Sync)> {
    values
        .iter()
        .map(|value| value as &(dyn ToSql + Sync))
        .collect()
}

pub(super) async fn list_deliveries(
    client: &Object,
    query: &DeliveryQuery,
) -> Result<Page<DeliveryRecord>, Error> {
    let limit = i64::from(query.limit.max(1));
    let (clause, limit_placeholder, values) = filtered(Conditions::deliveries(query), limit);
    // Re-deliveries are counted, not kept on the first delivery's row: a counter there would
    // make every replica storing a re-delivery wait for that row.
    let columns =
        delivery_columns("(SELECT count(*) FROM deliveries x WHERE x.duplicate_of = d.id)");
    let statement = client
        .prepare_cached(&format!(
            "SELECT {columns} FROM deliveries d {clause} ORDER BY id DESC LIMIT {limit_placeholder}"
        ))
        .await?;
    let items = client
        .query(&statement, &parameters(&values))
        .await?
        .iter()
        .map(delivery_from_row)
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(page(items, limit, |delivery| delivery.id))
}

pub(super) async fn raw_body(client: &Object, delivery_id: i64) -> Result<RawBody, Error> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT {RAW_BODY_COLUMNS}
             FROM deliveries d LEFT JOIN raw_bodies r ON r.delivery_id = d.id
             WHERE d.id = $1"
        ))
        .await?;
    match client.query_opt(&statement, &[&delivery_id]).await? {
        Some(row) => raw_body_from_row(&row),
        None => Ok(RawBody::NotFound),
    }
}

pub(super) async fn job_by_request_id(
    client: &Object,
    request_id: &str,
) -> Result<Option<JobRecord>, Error> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE request_id = $1"
        ))
        .await?;
    client
        .query_opt(&statement, &[&clean_key(request_id)])
        .await?
        .map(|row| JobRow::from_row(&row).map(JobRow::into_record))
        .transpose()
}

pub(super) async fn list_jobs(client: &Object, query: &JobQuery) -> Result<Page<JobRecord>, Error> {
    let limit = i64::from(query.limit.max(1));
    let (clause, limit_placeholder, values) = filtered(Conditions::jobs(query), limit);
    let statement = client
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT {limit_placeholder}"
        ))
        .await?;
    let items = client
        .query(&statement, &parameters(&values))
        .await?
        .iter()
        .map(|row| JobRow::from_row(row).map(JobRow::into_record))
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(page(items, limit, |job| job.id))
}

/// Every device of a job, in the order they became known, with its latest outcome.
pub(super) async fn job_devices(
    client: &Object,
    request_id: &str,
    now: &str,
) -> Result<Option<Vec<OutcomeRecord>>, Error> {
    let Some(job) = job_by_request_id(client, request_id).await? else {
        return Ok(None);
    };
    let mut devices = JobDevices::new(&job, now);
    let statement = client
        .prepare_cached(
            "SELECT job_device_id, kind, identifier FROM job_device_identifiers WHERE job_id = $1",
        )
        .await?;
    for row in client.query(&statement, &[&job.id]).await? {
        devices.add_identifier(&row)?;
    }
    let statement = client
        .prepare_cached(&format!(
            "SELECT {}
             FROM job_devices d LEFT JOIN device_outcomes o ON o.id = d.latest_outcome_id
             WHERE d.job_id = $1 ORDER BY d.id",
            job_device_columns()
        ))
        .await?;
    for row in client.query(&statement, &[&job.id]).await? {
        devices.add(&row)?;
    }
    Ok(Some(devices.devices))
}

pub(super) async fn device_history(
    client: &Object,
    identifier: &DeviceIdentifier,
    now: &str,
) -> Result<Option<DeviceHistory>, Error> {
    let statement = client
        .prepare_cached(
            "SELECT outcome_id FROM outcome_identifiers WHERE kind = $1 AND identifier = $2
             ORDER BY outcome_id DESC LIMIT $3",
        )
        .await?;
    let mut outcome_ids: Vec<i64> = Vec::new();
    let kind = clean_key(&identifier.kind);
    for candidate in identifier_candidates(&clean_key(&identifier.id)) {
        outcome_ids = client
            .query(&statement, &[&kind, &candidate, &HISTORY_LIMIT])
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
        if !outcome_ids.is_empty() {
            break;
        }
    }
    let jobs = device_jobs(client, identifier, now).await?;
    if outcome_ids.is_empty() {
        return Ok(History::default().finish(jobs));
    }
    let outcomes = client
        .prepare_cached(&format!(
            "SELECT {OUTCOME_COLUMNS} FROM device_outcomes o WHERE o.id = ANY($1) ORDER BY o.id DESC"
        ))
        .await?;
    let mut history = History::default();
    for row in client.query(&outcomes, &[&outcome_ids]).await? {
        history.add(&row)?;
    }
    Ok(history.finish(jobs))
}

/// The jobs that list the device `identifier` names, newest first: registered with it before any
/// callback (through `job_device_identifiers_registered`), or reported by one (through its
/// outcomes' jobs).
async fn device_jobs(
    client: &Object,
    identifier: &DeviceIdentifier,
    now: &str,
) -> Result<DeviceJobs, Error> {
    let lookup = client
        .prepare_cached(
            "SELECT job_device_id, kind, identifier FROM job_device_identifiers
             WHERE kind = $1 AND identifier = $2 AND registered
             UNION
             SELECT i.job_device_id, i.kind, i.identifier
             FROM outcome_identifiers oi JOIN device_outcomes o ON o.id = oi.outcome_id
             JOIN jobs j ON j.request_id = o.request_id
             JOIN job_device_identifiers i ON i.job_id = j.id AND i.kind = oi.kind AND i.identifier = oi.identifier
             WHERE oi.kind = $1 AND oi.identifier = $2
             ORDER BY 1 DESC LIMIT $3",
        )
        .await?;
    let mut jobs = DeviceJobs::default();
    let mut job_device_ids: Vec<i64> = Vec::new();
    let kind = clean_key(&identifier.kind);
    for candidate in identifier_candidates(&clean_key(&identifier.id)) {
        for row in client
            .query(&lookup, &[&kind, &candidate, &HISTORY_LIMIT])
            .await?
        {
            job_device_ids.push(jobs.add_identifier(&row)?);
        }
        if !job_device_ids.is_empty() {
            break;
        }
    }
    if job_device_ids.is_empty() {
        return Ok(jobs);
    }
    let devices = client
        .prepare_cached(&format!(
            "SELECT {DEVICE_JOB_COLUMNS}
             FROM job_devices d LEFT JOIN device_outcomes o ON o.id = d.latest_outcome_id
             WHERE d.id = ANY($1) ORDER BY d.id DESC"
        ))
        .await?;
    let device_rows = client.query(&devices, &[&job_device_ids]).await?;
    let job_ids = device_rows
        .iter()
        .map(DeviceJobs::job_id)
        .collect::<Result<Vec<i64>, Error>>()?;
    let job_statement = client
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ANY($1)"
        ))
        .await?;
    let found_jobs = client
        .query(&job_statement, &[&job_ids])
        .await?
        .iter()
        .map(|row| JobRow::from_row(row).map(JobRow::into_record))
        .collect::<Result<Vec<JobRecord>, Error>>()?;
    for (row, job_id) in device_rows.iter().zip(job_ids) {
        if let Some(job) = found_jobs.iter().find(|job| job.id == job_id) {
            jobs.add(row, job, now)?;
        }
    }
    Ok(jobs)
}

/// A page of a device's messages, newest first: the ids from the identifier index (in index
/// order, from the cursor on), then the messages and their identifiers by those ids.
pub(super) async fn device_messages(
    client: &Object,
    query: &MessageQuery,
) -> Result<Page<MessageRecord>, Error> {
    let limit = i64::from(query.limit.max(1));
    let before = query.before_id.unwrap_or(i64::MAX);
    let statement = client
        .prepare_cached(
            "SELECT message_id FROM message_identifiers
             WHERE kind = $1 AND identifier = $2 AND message_id < $3
             ORDER BY message_id DESC LIMIT $4",
        )
        .await?;
    let kind = clean_key(&query.identifier.kind);
    let mut found: Vec<i64> = Vec::new();
    for candidate in identifier_candidates(&clean_key(&query.identifier.id)) {
        for row in client
            .query(&statement, &[&kind, &candidate, &before, &(limit + 1)])
            .await?
        {
            found.push(row.try_get(0)?);
        }
    }
    let message_ids = newest_message_ids(found, limit);
    let mut messages = DeviceMessages::default();
    if message_ids.is_empty() {
        return Ok(messages.page(limit));
    }
    let identifiers = client
        .prepare_cached(
            "SELECT message_id, kind, identifier FROM message_identifiers WHERE message_id = ANY($1)",
        )
        .await?;
    let rows = client
        .prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM device_messages m WHERE m.id = ANY($1) ORDER BY m.id DESC"
        ))
        .await?;
    for row in client.query(&identifiers, &[&message_ids]).await? {
        messages.add_identifier(&row)?;
    }
    for row in client.query(&rows, &[&message_ids]).await? {
        messages.add(&row)?;
    }
    Ok(messages.page(limit))
}

/// How many jobs are in each state (for the `m2m_jobs` gauge).
pub(super) async fn job_counts(client: &Object) -> Result<Vec<(String, i64)>, Error> {
    let statement = client
        .prepare_cached("SELECT state, count(*) FROM jobs GROUP BY state")
        .await?;
    client
        .query(&statement, &[])
        .await?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}
