//! Read queries for the API, and pruning.

use std::collections::HashMap;

use deadpool_postgres::{GenericClient, Object, Transaction};
use tokio_postgres::Row;
use tokio_postgres::types::{IsNull, ToSql, Type};

use super::jobs::{JOB_COLUMNS, job_row};
use super::write::clean_key;
use crate::domain::DeviceIdentifier;
use crate::storage::rows::{
    Conditions, FilterValue, HISTORY_LIMIT, fault_record, identifier_candidates, page,
    parse_details, unreported_outcome,
};
use crate::storage::{
    DeliveryQuery, DeliveryRecord, DeviceHistory, JobQuery, JobRecord, OutcomeRecord, Page, RawBody,
};

type Error = tokio_postgres::Error;

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
    let statement = client
        .prepare_cached(&format!(
            "SELECT id, received_at, form, kind, operation, request_id, callback_count, max_callback_threshold,
                    result, duplicate_of,
                    (SELECT count(*) FROM deliveries x WHERE x.duplicate_of = d.id),
                    size, content_type, account, status, fault_code, parse_error
             FROM deliveries d {clause}
             ORDER BY id DESC
             LIMIT {limit_placeholder}"
        ))
        .await?;
    let items = client
        .query(&statement, &parameters(&values))
        .await?
        .iter()
        .map(|row| {
            Ok(DeliveryRecord {
                id: row.try_get(0)?,
                received_at: row.try_get(1)?,
                form: row.try_get(2)?,
                kind: row.try_get(3)?,
                operation: row.try_get(4)?,
                request_id: row.try_get(5)?,
                callback_count: row.try_get(6)?,
                max_callback_threshold: row.try_get(7)?,
                result: row.try_get(8)?,
                duplicate_of: row.try_get(9)?,
                duplicates: row.try_get(10)?,
                size: row.try_get(11)?,
                content_type: row.try_get(12)?,
                account: row.try_get(13)?,
                status: row.try_get(14)?,
                fault_code: row.try_get(15)?,
                parse_error: row.try_get(16)?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(page(items, limit, |delivery| delivery.id))
}

pub(super) async fn raw_body(client: &Object, delivery_id: i64) -> Result<RawBody, Error> {
    let statement = client
        .prepare_cached(
            "SELECT d.content_type, d.duplicate_of, r.body
             FROM deliveries d LEFT JOIN raw_bodies r ON r.delivery_id = d.id
             WHERE d.id = $1",
        )
        .await?;
    let Some(row) = client.query_opt(&statement, &[&delivery_id]).await? else {
        return Ok(RawBody::NotFound);
    };
    let content_type: Option<String> = row.try_get(0)?;
    let duplicate_of: Option<i64> = row.try_get(1)?;
    let body: Option<Vec<u8>> = row.try_get(2)?;
    Ok(match (body, duplicate_of) {
        (Some(body), _) => RawBody::Found { content_type, body },
        (None, Some(duplicate_of)) => RawBody::Duplicate { duplicate_of },
        (None, None) => RawBody::Pruned,
    })
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
        .map(|row| job_row(&row).map(|job| job.into_record()))
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
        .map(|row| job_row(row).map(|job| job.into_record()))
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(page(items, limit, |job| job.id))
}

const OUTCOME_COLUMNS: &str =
    "o.id, o.request_id, o.operation, o.status, o.line_status, o.fault_code, o.fault_message,
     o.state, o.service_plan, o.ip_address, o.mdn, o.received_at, o.delivery_id, o.details";

/// An outcome row (columns as in `OUTCOME_COLUMNS`, starting at `first`), identifiers left empty.
fn outcome_from_row(row: &Row, first: usize) -> Result<OutcomeRecord, Error> {
    Ok(OutcomeRecord {
        request_id: row.try_get(first + 1)?,
        operation: row.try_get(first + 2)?,
        identifiers: Vec::new(),
        status: row.try_get(first + 3)?,
        line_status: row.try_get(first + 4)?,
        fault: fault_record(row.try_get(first + 5)?, row.try_get(first + 6)?),
        state: row.try_get(first + 7)?,
        service_plan: row.try_get(first + 8)?,
        ip_address: row.try_get(first + 9)?,
        mdn: row.try_get(first + 10)?,
        received_at: row.try_get(first + 11)?,
        delivery_id: row.try_get(first + 12)?,
        details: parse_details(row.try_get(first + 13)?),
    })
}

fn sort_identifiers(identifiers: &mut [DeviceIdentifier]) {
    identifiers.sort_by(|left, right| (&left.kind, &left.id).cmp(&(&right.kind, &right.id)));
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
    let statement = client
        .prepare_cached(
            "SELECT job_device_id, kind, identifier FROM job_device_identifiers WHERE job_id = $1",
        )
        .await?;
    let mut identifiers: HashMap<i64, Vec<DeviceIdentifier>> = HashMap::new();
    for row in client.query(&statement, &[&job.id]).await? {
        identifiers
            .entry(row.try_get(0)?)
            .or_default()
            .push(DeviceIdentifier {
                kind: row.try_get(1)?,
                id: row.try_get(2)?,
            });
    }
    let statement = client
        .prepare_cached(&format!(
            "SELECT d.id, o.id IS NOT NULL, {OUTCOME_COLUMNS}
             FROM job_devices d LEFT JOIN device_outcomes o ON o.id = d.latest_outcome_id
             WHERE d.job_id = $1 ORDER BY d.id"
        ))
        .await?;
    let mut devices = Vec::new();
    for row in client.query(&statement, &[&job.id]).await? {
        let device_id: i64 = row.try_get(0)?;
        let reported: bool = row.try_get(1)?;
        let mut outcome = if reported {
            outcome_from_row(&row, 2)?
        } else {
            unreported_outcome(&job, now)
        };
        outcome.identifiers = identifiers.remove(&device_id).unwrap_or_default();
        sort_identifiers(&mut outcome.identifiers);
        devices.push(outcome);
    }
    Ok(Some(devices))
}

pub(super) async fn device_history(
    client: &Object,
    identifier: &DeviceIdentifier,
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
    if outcome_ids.is_empty() {
        return Ok(None);
    }
    let outcomes = client
        .prepare_cached(&format!(
            "SELECT {OUTCOME_COLUMNS} FROM device_outcomes o WHERE o.id = ANY($1) ORDER BY o.id DESC"
        ))
        .await?;
    let identifiers = client
        .prepare_cached(
            "SELECT outcome_id, kind, identifier FROM outcome_identifiers WHERE outcome_id = ANY($1)",
        )
        .await?;
    let mut identifiers_of: HashMap<i64, Vec<DeviceIdentifier>> = HashMap::new();
    for row in client.query(&identifiers, &[&outcome_ids]).await? {
        identifiers_of
            .entry(row.try_get(0)?)
            .or_default()
            .push(DeviceIdentifier {
                kind: row.try_get(1)?,
                id: row.try_get(2)?,
            });
    }
    let mut history = Vec::with_capacity(outcome_ids.len());
    let mut all_identifiers: Vec<DeviceIdentifier> = Vec::new();
    for row in client.query(&outcomes, &[&outcome_ids]).await? {
        let outcome_id: i64 = row.try_get(0)?;
        let mut outcome = outcome_from_row(&row, 0)?;
        outcome.identifiers = identifiers_of.remove(&outcome_id).unwrap_or_default();
        sort_identifiers(&mut outcome.identifiers);
        for found in &outcome.identifiers {
            if !all_identifiers.contains(found) {
                all_identifiers.push(found.clone());
            }
        }
        history.push(outcome);
    }
    sort_identifiers(&mut all_identifiers);
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

/// Deletes up to `chunk` raw bodies of stored deliveries received before `cutoff`, keeping
/// quarantined bodies and those of jobs still pending or in progress (as the SQLite backend does).
/// Replicas pruning at once skip each other's rows.
pub(super) async fn prune_chunk(
    transaction: &Transaction<'_>,
    cutoff: &str,
    chunk: i64,
) -> Result<usize, Error> {
    let statement = transaction
        .prepare_cached(
            "DELETE FROM raw_bodies WHERE delivery_id IN (
                 SELECT r.delivery_id
                 FROM raw_bodies r
                 JOIN deliveries d ON d.id = r.delivery_id
                 LEFT JOIN jobs j ON j.request_id = d.request_id
                 WHERE d.received_at < $1
                   AND d.result = 'stored'
                   AND (j.id IS NULL OR j.state NOT IN ('pending', 'in_progress'))
                 ORDER BY r.delivery_id
                 LIMIT $2
                 FOR UPDATE OF r SKIP LOCKED)",
        )
        .await?;
    let deleted = transaction.execute(&statement, &[&cutoff, &chunk]).await?;
    Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
}
