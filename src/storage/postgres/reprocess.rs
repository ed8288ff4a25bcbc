//! `reprocess` on PostgreSQL: one transaction per delivery, through the same writes as a
//! callback batch ([`super::write::write_contents`]); see [`crate::storage::reprocess`].
//!
//! Safe with callbacks arriving and with several replicas reprocessing at once: the delivery's
//! row is locked (`FOR UPDATE`) and read again under the lock, so a second run finds it no
//! longer quarantined; a first delivery of the same message committed by another replica
//! between the lookup and the update makes the update fail on the unique index, and the
//! delivery is read again as a re-delivery of it.

use std::time::Duration;

use deadpool_postgres::Transaction;
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;

use super::connection::Shared;
use super::error::{Failure, RETRIES, is_retryable};
use super::ids::reserve_ids;
use super::text::{clean_key, clean_option, clean_owned};
use super::write::{Writing, write_contents};
use crate::domain::DeliveryResult;
use crate::storage::batch::Fate;
use crate::storage::jobs::JobCompletion;
use crate::storage::reprocess::{
    MAX_PER_RUN, ReprocessItem, ReprocessQuery, ReprocessReport, Reread, Selected,
    StoredQuarantine, read_item, selection, unreadable_item,
};
use crate::storage::rows::repairs_text;
use crate::storage::{DeliveryContent, StoreError, timestamp};

pub(super) async fn reprocess(
    shared: &Shared,
    query: ReprocessQuery,
) -> Result<ReprocessReport, StoreError> {
    let mut report = ReprocessReport {
        dry_run: query.dry_run,
        ..ReprocessReport::default()
    };
    let mut client = shared.client().await?;
    let (clause, values) = selection(&query, |n| format!("${n}"));
    let values: Vec<Box<dyn ToSql + Sync + Send>> = values
        .into_iter()
        .map(|value| -> Box<dyn ToSql + Sync + Send> {
            match value {
                Selected::Id(id) => Box::new(id),
                Selected::Since(since) => Box::new(since),
            }
        })
        .collect();
    let parameters: Vec<&(dyn ToSql + Sync)> = values
        .iter()
        .map(|value| value.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let candidates: Vec<(i64, String)> = client
        .query(
            &format!(
                "SELECT d.id, d.result FROM deliveries d WHERE {clause} ORDER BY d.id LIMIT {MAX_PER_RUN}"
            ),
            &parameters,
        )
        .await
        .map_err(|error| Failure::Db(error).into_store_error())?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(|error| Failure::Db(error).into_store_error())?;
    for id in &query.ids {
        if !candidates.iter().any(|(candidate, _)| candidate == id) {
            report.skipped(*id, "no such delivery");
        }
    }
    let now = timestamp(OffsetDateTime::now_utc());
    for (id, result) in candidates {
        if result != DeliveryResult::Quarantined.as_str() {
            report.skipped(id, format!("{result}: read when it arrived"));
            continue;
        }
        let mut attempt = 0;
        let item = loop {
            attempt += 1;
            let mut completions = Vec::new();
            let outcome = async {
                let transaction = client.transaction().await?;
                let item = reprocess_one(
                    &transaction,
                    id,
                    &query,
                    &now,
                    shared.job_timeout,
                    &mut completions,
                    shared.record_events,
                )
                .await?;
                if query.dry_run {
                    transaction.rollback().await?;
                } else {
                    transaction.commit().await?;
                }
                Ok::<_, Failure>(item)
            }
            .await;
            match outcome {
                Ok(item) => {
                    if !query.dry_run {
                        shared.observe_completions(&completions);
                    }
                    break item;
                }
                Err(Failure::Db(error))
                    if (is_retryable(&error) || is_unique_violation(&error))
                        && attempt < RETRIES => {}
                Err(failure) => return Err(failure.into_store_error()),
            }
        };
        match item {
            Some(item) => report.add(item),
            None => report.skipped(id, "no longer quarantined"),
        }
    }
    Ok(report)
}

fn is_unique_violation(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|code| code.code() == "23505")
}

/// Reads delivery `id` again under a lock on its row; `None` if it is no longer quarantined.
async fn reprocess_one(
    transaction: &Transaction<'_>,
    id: i64,
    query: &ReprocessQuery,
    now: &str,
    job_timeout: Duration,
    completions: &mut Vec<JobCompletion>,
    record: bool,
) -> Result<Option<ReprocessItem>, Failure> {
    let statement = transaction
        .prepare_cached(
            "SELECT d.received_at, d.content_type, d.source_address, d.account, d.parse_error, r.body
             FROM deliveries d JOIN raw_bodies r ON r.delivery_id = d.id
             WHERE d.id = $1 AND d.result = 'quarantined' AND d.duplicate_of IS NULL
             FOR UPDATE OF d",
        )
        .await?;
    let Some(row) = transaction.query_opt(&statement, &[&id]).await? else {
        return Ok(None);
    };
    let received_at: String = row.try_get(0)?;
    let stored = StoredQuarantine {
        received_at: OffsetDateTime::parse(
            &received_at,
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap_or(OffsetDateTime::UNIX_EPOCH),
        content_type: row.try_get(1)?,
        source_address: row.try_get(2)?,
        account: row.try_get(3)?,
        parse_error: row.try_get(4)?,
        body: row.try_get(5)?,
    };
    let delivery = match stored.reread(query.kind) {
        Reread::Unreadable { reason, changed } => {
            if changed {
                transaction
                    .execute(
                        "UPDATE deliveries SET parse_error = $2, reprocessed_at = $3 WHERE id = $1",
                        &[&id, &clean_owned(reason.clone()), &now],
                    )
                    .await?;
            }
            return Ok(Some(unreadable_item(id, reason)));
        }
        Reread::OtherKind(kind) => {
            return Ok(Some(ReprocessItem {
                delivery_id: id,
                result: "skipped",
                duplicate_of: None,
                kind: Some(kind.as_str()),
                reason: Some(format!("reads as {kind}")),
                tally: None,
            }));
        }
        Reread::Readable(delivery) => delivery,
    };
    let DeliveryContent::Callback(callback) = &delivery.content else {
        return Ok(None);
    };
    let original: Option<i64> = transaction
        .query_opt(
            "SELECT id FROM deliveries WHERE dedup_key = $1 AND duplicate_of IS NULL AND id <> $2",
            &[&&callback.dedup_key[..], &id],
        )
        .await?
        .map(|row| row.try_get(0))
        .transpose()?;
    let fault = callback.fault.as_ref();
    let result = if original.is_some() {
        DeliveryResult::Duplicate
    } else {
        DeliveryResult::Stored
    };
    transaction
        .execute(
            "UPDATE deliveries SET result = $2, duplicate_of = $3, form = $4, kind = $5, operation = $6,
                 request_id = $7, callback_count = $8, max_callback_threshold = $9, dedup_key = $10,
                 status = $11, fault_code = $12, fault_message = $13, comment = $14, details = $15,
                 parse_error = NULL, repairs = $16, reprocessed_at = $17
             WHERE id = $1",
            &[
                &id,
                &result.as_str(),
                &original,
                &callback.form.as_str(),
                &callback.kind.as_str(),
                &callback.operation.as_str(),
                &callback.request_id.as_deref().map(clean_key),
                &callback.callback_count.map(i64::from),
                &callback.max_callback_threshold.map(i64::from),
                &&callback.dedup_key[..],
                &clean_option(callback.status.as_deref()),
                &clean_option(fault.map(|fault| fault.code.as_str())),
                &clean_option(fault.map(|fault| fault.message.as_str())),
                &clean_option(callback.comment.as_deref()),
                &callback
                    .details
                    .as_ref()
                    .map(|details| clean_owned(details.to_string())),
                &repairs_text(&callback.repairs).map(clean_owned),
                &now,
            ],
        )
        .await?;
    let fate = match original {
        Some(original) => Fate::Duplicate { original },
        None => Fate::First,
    };
    let (outcomes, messages) = if original.is_some() {
        (0, 0)
    } else {
        (callback.outcomes.len(), callback.messages.len())
    };
    let [_, outcome_ids, device_ids, message_ids] =
        reserve_ids(transaction, [0, outcomes, outcomes, messages]).await?;
    let (job_operations, completed) = write_contents(
        transaction,
        &[&delivery],
        &[id],
        &[fate],
        (outcome_ids, device_ids, message_ids),
        job_timeout,
        (Writing::Reprocessed, record),
    )
    .await?;
    completions.extend(completed);
    Ok(Some(read_item(
        id,
        callback,
        original,
        job_operations.get(&0).copied(),
    )))
}
