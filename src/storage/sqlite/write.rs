//! One delivery's rows: the delivery (or its duplicate row), raw body, outcomes and device
//! messages with their identifiers, upload report; and what it adds to its job, through [`JobBatch`]. Inside the
//! writer's transaction.

use std::borrow::Cow;
use std::time::Duration;

use rusqlite::params;

use super::bind::Value;
use super::connection::{ROWS_PER_INSERT, Statements, insert_rows, multi_row_insert};
use super::jobs::JobBatch;
use super::outbox;
use crate::domain::{Callback, DeliveryResult, DeviceOutcome, Operation};
use crate::storage::batch::Fate;
use crate::storage::events;
use crate::storage::jobs::stored_count;
use crate::storage::rows::{identifiers_text, repairs_text};
use crate::storage::{DeliveryContent, NewDelivery, Prepared, Receipt, timestamp};

/// An outcome is new, and its identifiers are distinct (the parser keeps each pair once), so
/// nothing conflicts; `OR IGNORE` keeps a repeated pair from failing the delivery all the same.
const OUTCOME_IDENTIFIER: [&str; ROWS_PER_INSERT] = multi_row_insert!(
    "INSERT OR IGNORE INTO outcome_identifiers (kind, identifier, outcome_id) VALUES ",
    "(?, ?, ?)"
);

/// As [`OUTCOME_IDENTIFIER`], for a device message.
const MESSAGE_IDENTIFIER: [&str; ROWS_PER_INSERT] = multi_row_insert!(
    "INSERT OR IGNORE INTO message_identifiers (kind, identifier, message_id) VALUES ",
    "(?, ?, ?)"
);

const INSERT_MESSAGE: &str = "INSERT INTO device_messages (delivery_id, request_id, channel, payload, text, sent_at, received_at)
 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

const INSERT_OUTCOME: &str = "INSERT INTO device_outcomes (delivery_id, request_id, operation, status, line_status, fault_code,
     fault_message, state, service_plan, ip_address, mdn, details, received_at, identifiers)
 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

const INSERT_UPLOAD_SUMMARY: &str =
    "INSERT INTO upload_summaries (delivery_id, request_id, account_name, device_sku, total_lines,
     pending_lines, success_lines, failed_lines, package_error)
 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

/// A delivery's row. (Its plan opens no ephemeral table: see the migration that rewrote the
/// `result` check, tested in [`super::schema`].)
pub(super) const INSERT_DELIVERY: &str = "INSERT INTO deliveries (received_at, form, kind, operation, request_id,
     callback_count, max_callback_threshold, dedup_key, result, duplicate_of, size, content_type, source_address,
     account, status, fault_code, fault_message, comment, details, parse_error, repairs)
 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)";

/// Inserts one delivery: its row (a duplicate row, if its message is stored already), its raw
/// body, outcomes and upload report, and counts it on its job.
pub(super) fn insert_delivery(
    transaction: &Statements<'_>,
    delivery: &NewDelivery,
    job_timeout: Duration,
    jobs: &mut JobBatch,
    record: bool,
) -> rusqlite::Result<Receipt> {
    let received_at = timestamp(delivery.received_at);
    let (callback, parse_error) = match &delivery.content {
        DeliveryContent::Callback(callback) => (Some(callback.as_ref()), None),
        DeliveryContent::Quarantined(unreadable) => (None, Some(unreadable.reason.as_str())),
    };
    let fault = callback.and_then(|callback| callback.fault.as_ref());
    let job_operation = delivery.content.job_operation();
    // Serialized on the submitting task (see `Prepared`).
    let details = delivery.prepared(record).details();
    let repairs = callback.and_then(|callback| repairs_text(&callback.repairs));
    let insert = |result: DeliveryResult, duplicate_of: Option<i64>| -> rusqlite::Result<usize> {
        transaction.execute(
            INSERT_DELIVERY,
            &[
                Value::Text(&received_at),
                callback.map(|callback| callback.form.as_str()).into(),
                callback.map(|callback| callback.kind.as_str()).into(),
                callback.map(|callback| callback.operation.as_str()).into(),
                delivery.content.request_id().into(),
                delivery.content.callback_count().into(),
                callback
                    .and_then(|callback| callback.max_callback_threshold)
                    .into(),
                Value::Blob(&delivery.content.dedup_key()[..]),
                Value::Text(result.as_str()),
                duplicate_of.into(),
                Value::Integer(i64::try_from(delivery.body.len()).unwrap_or(i64::MAX)),
                delivery.content_type.as_deref().into(),
                delivery.source_address.as_deref().into(),
                delivery.account.as_deref().into(),
                callback
                    .and_then(|callback| callback.status.as_deref())
                    .into(),
                fault.map(|fault| fault.code.as_str()).into(),
                fault.map(|fault| fault.message.as_str()).into(),
                callback
                    .and_then(|callback| callback.comment.as_deref())
                    .into(),
                details.into(),
                parse_error.into(),
                repairs.as_deref().into(),
            ],
        )
    };

    // The writer is the database's only writer, so a message not found here cannot be stored by
    // anyone before this transaction commits: look it up, then insert (rather than an `INSERT ...
    // ON CONFLICT DO NOTHING` followed, for a re-delivery, by this same lookup). The unique index
    // still refuses a second first delivery, whatever happens here.
    let original: Option<i64> = transaction.query_first(
        "SELECT id FROM deliveries WHERE dedup_key = ?1 AND duplicate_of IS NULL",
        &[Value::Blob(&delivery.content.dedup_key()[..])],
        |row| row.integer(0),
    )?;
    if let Some(original) = original {
        // The message is already stored: record this re-delivery against the first one.
        transaction.with(
            "UPDATE deliveries SET duplicates = duplicates + 1 WHERE id = ?1",
            |statement| statement.execute([original]),
        )?;
        insert(DeliveryResult::Duplicate, Some(original))?;
        let delivery_id = transaction.last_insert_rowid();
        if let Some(request_id) = delivery.content.request_id() {
            jobs.record(
                transaction,
                request_id,
                job_operation,
                delivery.received_at,
                job_timeout,
                |job| job.record_delivery(job_operation, delivery.received_at, true),
            )?;
        }
        return Ok(Fate::Duplicate { original }.receipt(delivery_id, &delivery.content));
    }
    insert(delivery.content.first_result(), None)?;
    let delivery_id = transaction.last_insert_rowid();
    transaction.execute(
        "INSERT INTO raw_bodies (delivery_id, body) VALUES (?1, ?2)",
        &[Value::Integer(delivery_id), Value::Blob(&delivery.body[..])],
    )?;
    let job_id = match delivery.content.request_id() {
        Some(request_id) => Some(jobs.record(
            transaction,
            request_id,
            job_operation,
            delivery.received_at,
            job_timeout,
            |job| job.record_delivery(job_operation, delivery.received_at, false),
        )?),
        None => None,
    };
    let mut receipt = Fate::First.receipt(delivery_id, &delivery.content);
    match callback {
        Some(callback) => {
            let operation = insert_outcomes(
                transaction,
                delivery_id,
                &received_at,
                callback,
                delivery.prepared(record),
                job_id.map(|job_id| (job_id, &mut *jobs)),
                record,
            )?;
            insert_messages(transaction, delivery_id, &received_at, callback, record)?;
            receipt.job_operation = (operation != callback.operation).then_some(operation);
        }
        None => {
            if let Some(job_id) = job_id {
                jobs.record_quarantined(job_id, 1);
            }
            if let DeliveryContent::Quarantined(unreadable) = &delivery.content {
                outbox::insert(transaction, record, || {
                    events::delivery_quarantined(
                        delivery_id,
                        unreadable.request_id.as_deref(),
                        unreadable.callback_count,
                        &unreadable.reason,
                        delivery.body.len(),
                        &received_at,
                    )
                })?;
            }
        }
    }
    Ok(receipt)
}

/// The device messages of a first delivery, each with every identifier it names.
pub(super) fn insert_messages(
    transaction: &Statements<'_>,
    delivery_id: i64,
    received_at: &str,
    callback: &Callback,
    record: bool,
) -> rusqlite::Result<()> {
    if callback.messages.is_empty() {
        return Ok(());
    }
    for message in &callback.messages {
        transaction.execute(
            INSERT_MESSAGE,
            &[
                Value::Integer(delivery_id),
                callback.request_id.as_deref().into(),
                Value::Text(message.channel.as_str()),
                (&message.payload).into(),
                (&message.text).into(),
                (&message.sent_at).into(),
                Value::Text(received_at),
            ],
        )?;
        let message_id = transaction.last_insert_rowid();
        outbox::insert(transaction, record, || {
            events::device_message(
                message_id,
                delivery_id,
                callback.request_id.as_deref(),
                received_at,
                message,
            )
        })?;
        let rows: Vec<[Value<'_>; 3]> = message
            .identifiers
            .iter()
            .map(|identifier| {
                [
                    Value::Text(&identifier.kind),
                    Value::Text(&identifier.id),
                    Value::Integer(message_id),
                ]
            })
            .collect();
        insert_rows(transaction, &MESSAGE_IDENTIFIER, &rows)?;
    }
    Ok(())
}

/// Inserts a callback's outcomes (with their identifiers) and upload report, and counts them on
/// its job. Returns the operation the outcomes were stored under (see
/// [`crate::storage::jobs::outcome_operation`]).
pub(super) fn insert_outcomes(
    transaction: &Statements<'_>,
    delivery_id: i64,
    received_at: &str,
    callback: &Callback,
    prepared: &Prepared,
    mut job: Option<(i64, &mut JobBatch)>,
    record: bool,
) -> rusqlite::Result<Operation> {
    let operation = match &job {
        Some((job_id, jobs)) => jobs.outcome_operation(*job_id, callback),
        None => callback.operation,
    };
    for (index, outcome) in callback.outcomes.iter().enumerate() {
        let DeviceOutcome {
            identifiers,
            status,
            line_status,
            fault,
            state,
            service_plan,
            ip_address,
            mdn,
            details,
        } = outcome;
        let identifiers_column = match prepared.identifiers(index) {
            Some(text) => Cow::Borrowed(text),
            None => {
                Cow::Owned(identifiers_text(identifiers.iter().map(|identifier| {
                    (identifier.kind.as_str(), identifier.id.as_str())
                })))
            }
        };
        let details = match prepared.outcome_details(index) {
            Some(text) => text.map(Cow::Borrowed),
            None => details
                .as_ref()
                .map(|details| Cow::Owned(details.to_string())),
        };
        transaction.execute(
            INSERT_OUTCOME,
            &[
                Value::Integer(delivery_id),
                callback.request_id.as_deref().into(),
                Value::Text(operation.as_str()),
                Value::Text(status.as_str()),
                line_status.into(),
                fault.as_ref().map(|fault| fault.code.as_str()).into(),
                fault.as_ref().map(|fault| fault.message.as_str()).into(),
                state.into(),
                service_plan.into(),
                ip_address.into(),
                mdn.into(),
                details.as_deref().into(),
                Value::Text(received_at),
                Value::Text(&identifiers_column),
            ],
        )?;
        let outcome_id = transaction.last_insert_rowid();
        outbox::insert(transaction, record, || {
            let request_id = callback.request_id.as_deref();
            match prepared.event_fields(index) {
                Some(fields) => events::device_outcome_with(
                    delivery_id,
                    request_id,
                    operation.as_str(),
                    received_at,
                    fields,
                ),
                None => events::device_outcome(
                    delivery_id,
                    request_id,
                    operation.as_str(),
                    received_at,
                    outcome,
                ),
            }
        })?;
        let rows: Vec<[Value<'_>; 3]> = identifiers
            .iter()
            .map(|identifier| {
                [
                    Value::Text(&identifier.kind),
                    Value::Text(&identifier.id),
                    Value::Integer(outcome_id),
                ]
            })
            .collect();
        insert_rows(transaction, &OUTCOME_IDENTIFIER, &rows)?;
        if let Some((job_id, jobs)) = job.as_mut() {
            jobs.record_outcome(transaction, *job_id, outcome_id, identifiers, *status)?;
        }
    }
    if let (Some((job_id, jobs)), Some(upload)) = (job.as_mut(), &callback.upload) {
        jobs.record_upload(*job_id, upload);
    }
    if let Some(upload) = &callback.upload {
        let count = stored_count;
        transaction.with(INSERT_UPLOAD_SUMMARY, |statement| {
            statement.execute(params![
                delivery_id,
                callback.request_id,
                upload.account_name,
                upload.device_sku,
                count(upload.total_lines),
                count(upload.pending_lines),
                count(upload.success_lines),
                count(upload.failed_lines),
                upload.package_error,
            ])
        })?;
    }
    Ok(operation)
}
