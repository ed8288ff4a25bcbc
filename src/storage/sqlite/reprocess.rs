//! `reprocess` on SQLite: on the writer thread, in one transaction (rolled back on a dry run),
//! through the same writes as a callback's (see [`crate::storage::reprocess`]). The writer being
//! the only writer, a callback arriving meanwhile is stored before or after the run, never
//! between a delivery's lookup and its write.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, ToSql, params, params_from_iter};

use super::connection::Statements;
use super::jobs::JobBatch;
use super::write::{insert_messages, insert_outcomes};
use crate::domain::DeliveryResult;
use crate::storage::jobs::JobCompletion;
use crate::storage::reprocess::{
    MAX_PER_RUN, ReprocessQuery, ReprocessReport, Reread, Selected, StoredQuarantine, read_item,
    selection, unreadable_item,
};
use crate::storage::rows::repairs_text;
use crate::storage::{DeliveryContent, timestamp};

pub(super) fn reprocess(
    connection: &Connection,
    query: &ReprocessQuery,
    now: time::OffsetDateTime,
    job_timeout: Duration,
    completions: &mut Vec<JobCompletion>,
    record: bool,
) -> rusqlite::Result<ReprocessReport> {
    let mut report = ReprocessReport {
        dry_run: query.dry_run,
        ..ReprocessReport::default()
    };
    let (clause, values) = selection(query, |n| format!("?{n}"));
    let values: Vec<Box<dyn ToSql>> = values
        .into_iter()
        .map(|value| -> Box<dyn ToSql> {
            match value {
                Selected::Id(id) => Box::new(id),
                Selected::Since(since) => Box::new(since),
            }
        })
        .collect();
    let candidates: Vec<(i64, String)> = connection
        .prepare(&format!(
            "SELECT d.id, d.result FROM deliveries d WHERE {clause} ORDER BY d.id LIMIT {MAX_PER_RUN}"
        ))?
        .query_map(params_from_iter(values.iter()), |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for id in &query.ids {
        if !candidates.iter().any(|(candidate, _)| candidate == id) {
            report.skipped(*id, "no such delivery");
        }
    }
    let reprocessed_at = timestamp(now);
    let connection = &Statements::new(connection);
    let mut jobs = JobBatch::default();
    for (id, result) in candidates {
        if result != DeliveryResult::Quarantined.as_str() {
            report.skipped(id, format!("{result}: read when it arrived"));
            continue;
        }
        let Some(stored) = stored_quarantine(connection, id)? else {
            report.skipped(id, "its raw body is gone");
            continue;
        };
        let delivery = match stored.reread(query.kind) {
            Reread::Unreadable { reason, changed } => {
                if changed {
                    connection
                        .prepare_cached(
                            "UPDATE deliveries SET parse_error = ?2, reprocessed_at = ?3 WHERE id = ?1",
                        )?
                        .execute(params![id, reason, reprocessed_at])?;
                }
                report.add(unreadable_item(id, reason));
                continue;
            }
            Reread::OtherKind(kind) => {
                report.skipped(id, format!("reads as {kind}"));
                continue;
            }
            Reread::Readable(delivery) => delivery,
        };
        let DeliveryContent::Callback(callback) = &delivery.content else {
            continue;
        };
        // A re-delivery that arrived readable in the meantime stored the message: this one is
        // then a duplicate of it.
        let original: Option<i64> = connection
            .prepare_cached(
                "SELECT id FROM deliveries WHERE dedup_key = ?1 AND duplicate_of IS NULL AND id <> ?2",
            )?
            .query_row(params![&callback.dedup_key[..], id], |row| row.get(0))
            .optional()?;
        let fault = callback.fault.as_ref();
        connection
            .prepare_cached(
                "UPDATE deliveries SET result = ?2, duplicate_of = ?3, form = ?4, kind = ?5, operation = ?6,
                     request_id = ?7, callback_count = ?8, max_callback_threshold = ?9, dedup_key = ?10,
                     status = ?11, fault_code = ?12, fault_message = ?13, comment = ?14, details = ?15,
                     parse_error = NULL, repairs = ?16, reprocessed_at = ?17
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                if original.is_some() {
                    DeliveryResult::Duplicate.as_str()
                } else {
                    DeliveryResult::Stored.as_str()
                },
                original,
                callback.form.as_str(),
                callback.kind.as_str(),
                callback.operation.as_str(),
                callback.request_id,
                callback.callback_count,
                callback.max_callback_threshold,
                &callback.dedup_key[..],
                callback.status,
                fault.map(|fault| fault.code.as_str()),
                fault.map(|fault| fault.message.as_str()),
                callback.comment,
                callback.details.as_ref().map(|details| details.to_string()),
                repairs_text(&callback.repairs),
                reprocessed_at,
            ])?;
        if let Some(original) = original {
            connection
                .prepare_cached("UPDATE deliveries SET duplicates = duplicates + 1 WHERE id = ?1")?
                .execute([original])?;
        }
        let job_id = match callback.request_id.as_deref() {
            Some(request_id) => {
                let operation = delivery.content.job_operation();
                Some(jobs.record(
                    connection,
                    request_id,
                    operation,
                    delivery.received_at,
                    job_timeout,
                    |job| job.record_reprocessed(operation, original.is_some()),
                )?)
            }
            None => None,
        };
        let mut job_operation = None;
        if original.is_none() {
            let received_at = timestamp(delivery.received_at);
            let operation = insert_outcomes(
                connection,
                id,
                &received_at,
                callback,
                delivery.prepared(record),
                job_id.map(|job_id| (job_id, &mut jobs)),
                record,
            )?;
            insert_messages(connection, id, &received_at, callback, record)?;
            job_operation = (operation != callback.operation).then_some(operation);
        }
        report.add(read_item(id, callback, original, job_operation));
    }
    jobs.finish(connection, completions)?;
    Ok(report)
}

fn stored_quarantine(
    connection: &Connection,
    id: i64,
) -> rusqlite::Result<Option<StoredQuarantine>> {
    connection
        .prepare_cached(
            "SELECT d.received_at, d.content_type, d.source_address, d.account, d.parse_error, r.body
             FROM deliveries d JOIN raw_bodies r ON r.delivery_id = d.id WHERE d.id = ?1",
        )?
        .query_row([id], |row| {
            let received_at: String = row.get(0)?;
            Ok(StoredQuarantine {
                received_at: time::OffsetDateTime::parse(
                    &received_at,
                    &time::format_description::well_known::Rfc3339,
                )
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
                content_type: row.get(1)?,
                source_address: row.get(2)?,
                account: row.get(3)?,
                parse_error: row.get(4)?,
                body: row.get(5)?,
            })
        })
        .optional()
}
