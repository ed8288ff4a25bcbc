//! One write batch: every delivery, its raw body, outcomes, device messages and upload report,
//! and the jobs they touch, in one transaction with a fixed number of set-based statements.
//!
//! Locks are taken in one order by every transaction: first delivery rows (dedup-key order),
//! then job rows (`request_id` order). Everything else a batch writes hangs off a job row it has
//! locked, or is new.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use deadpool_postgres::{Object, Transaction};
use time::OffsetDateTime;

use super::error::Failure;
use super::ids::reserve_ids;
use super::jobs::{self, DeviceUpdates};
use super::outbox;
use super::text::{clean_key, clean_option, clean_owned};
use crate::domain::{DeliveryResult, Operation};
use crate::storage::batch::{DedupPlan, Fate};
use crate::storage::events::{self, NewEvent};
use crate::storage::jobs::{JobCompletion, TouchedJob, outcome_operation, stored_count};
use crate::storage::rows::{identifiers_text, repairs_text};
use crate::storage::{DeliveryContent, NewDelivery, Receipt, timestamp};

/// The `deliveries` columns of several rows, one array per column.
#[derive(Default)]
struct DeliveryColumns<'a> {
    id: Vec<i64>,
    received_at: Vec<String>,
    form: Vec<Option<&'static str>>,
    kind: Vec<Option<&'static str>>,
    operation: Vec<Option<&'static str>>,
    request_id: Vec<Option<Cow<'a, str>>>,
    callback_count: Vec<Option<i64>>,
    max_callback_threshold: Vec<Option<i64>>,
    dedup_key: Vec<Vec<u8>>,
    result: Vec<&'static str>,
    duplicate_of: Vec<Option<i64>>,
    size: Vec<i64>,
    content_type: Vec<Option<Cow<'a, str>>>,
    source_address: Vec<Option<Cow<'a, str>>>,
    account: Vec<Option<Cow<'a, str>>>,
    status: Vec<Option<Cow<'a, str>>>,
    fault_code: Vec<Option<Cow<'a, str>>>,
    fault_message: Vec<Option<Cow<'a, str>>>,
    comment: Vec<Option<Cow<'a, str>>>,
    details: Vec<Option<Cow<'a, str>>>,
    parse_error: Vec<Option<Cow<'a, str>>>,
    repairs: Vec<Option<Cow<'a, str>>>,
}

impl<'a> DeliveryColumns<'a> {
    fn push(
        &mut self,
        id: i64,
        delivery: &'a NewDelivery,
        result: DeliveryResult,
        duplicate_of: Option<i64>,
    ) {
        let (callback, parse_error) = match &delivery.content {
            DeliveryContent::Callback(callback) => (Some(callback.as_ref()), None),
            DeliveryContent::Quarantined(unreadable) => (None, Some(unreadable.reason.as_str())),
        };
        let fault = callback.and_then(|callback| callback.fault.as_ref());
        self.id.push(id);
        self.received_at.push(timestamp(delivery.received_at));
        self.form
            .push(callback.map(|callback| callback.form.as_str()));
        self.kind
            .push(callback.map(|callback| callback.kind.as_str()));
        self.operation
            .push(callback.map(|callback| callback.operation.as_str()));
        self.request_id
            .push(delivery.content.request_id().map(clean_key));
        self.callback_count
            .push(delivery.content.callback_count().map(i64::from));
        self.max_callback_threshold.push(
            callback
                .and_then(|callback| callback.max_callback_threshold)
                .map(i64::from),
        );
        self.dedup_key.push(delivery.content.dedup_key().to_vec());
        self.result.push(result.as_str());
        self.duplicate_of.push(duplicate_of);
        self.size
            .push(i64::try_from(delivery.body.len()).unwrap_or(i64::MAX));
        self.content_type
            .push(clean_option(delivery.content_type.as_deref()));
        self.source_address
            .push(clean_option(delivery.source_address.as_deref()));
        self.account.push(clean_option(delivery.account.as_deref()));
        self.status.push(clean_option(
            callback.and_then(|callback| callback.status.as_deref()),
        ));
        self.fault_code
            .push(clean_option(fault.map(|fault| fault.code.as_str())));
        self.fault_message
            .push(clean_option(fault.map(|fault| fault.message.as_str())));
        self.comment.push(clean_option(
            callback.and_then(|callback| callback.comment.as_deref()),
        ));
        self.details.push(
            callback
                .and_then(|callback| callback.details.as_ref())
                .map(|details| clean_owned(details.to_string())),
        );
        self.parse_error.push(clean_option(parse_error));
        self.repairs.push(
            callback
                .and_then(|callback| repairs_text(&callback.repairs))
                .map(clean_owned),
        );
    }

    /// Inserts the rows; a first delivery of a message already stored is skipped. Returns the ids
    /// inserted.
    async fn insert(
        &self,
        transaction: &Transaction<'_>,
    ) -> Result<HashSet<i64>, tokio_postgres::Error> {
        if self.id.is_empty() {
            return Ok(HashSet::new());
        }
        let statement = transaction
            .prepare_cached(
                "INSERT INTO deliveries (id, received_at, form, kind, operation, request_id, callback_count,
                     max_callback_threshold, dedup_key, result, duplicate_of, size, content_type, source_address,
                     account, status, fault_code, fault_message, comment, details, parse_error, repairs)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::bigint[], $8::bigint[], $9::bytea[], $10::text[], $11::bigint[], $12::bigint[], $13::text[],
                     $14::text[], $15::text[], $16::text[], $17::text[], $18::text[], $19::text[], $20::text[],
                     $21::text[], $22::text[])
                 ON CONFLICT DO NOTHING
                 RETURNING id",
            )
            .await?;
        let rows = transaction
            .query(
                &statement,
                &[
                    &self.id,
                    &self.received_at,
                    &self.form,
                    &self.kind,
                    &self.operation,
                    &self.request_id,
                    &self.callback_count,
                    &self.max_callback_threshold,
                    &self.dedup_key,
                    &self.result,
                    &self.duplicate_of,
                    &self.size,
                    &self.content_type,
                    &self.source_address,
                    &self.account,
                    &self.status,
                    &self.fault_code,
                    &self.fault_message,
                    &self.comment,
                    &self.details,
                    &self.parse_error,
                    &self.repairs,
                ],
            )
            .await?;
        rows.iter().map(|row| row.try_get(0)).collect()
    }
}

/// Writes `deliveries` in one transaction and commits. `Ok` holds one receipt per delivery, in
/// order, and the jobs that completed.
pub(super) async fn write_batch(
    client: &mut Object,
    deliveries: &[&NewDelivery],
    job_timeout: Duration,
    record: bool,
) -> Result<(Vec<Receipt>, Vec<JobCompletion>), Failure> {
    let transaction = client.transaction().await?;
    // Enough outcome and job device ids for every outcome of the batch, message ids for every
    // message.
    let outcomes: usize = deliveries
        .iter()
        .map(|delivery| delivery.content.outcome_count())
        .sum();
    let messages: usize = deliveries
        .iter()
        .map(|delivery| delivery.content.message_count())
        .sum();
    let [ids, outcome_ids, device_ids, message_ids] = reserve_ids(
        &transaction,
        [deliveries.len(), outcomes, outcomes, messages],
    )
    .await?;

    let plan = DedupPlan::new(deliveries);
    let mut firsts = DeliveryColumns::default();
    for &index in plan.candidates() {
        let delivery = deliveries[index];
        firsts.push(ids[index], delivery, delivery.content.first_result(), None);
    }
    let inserted = firsts.insert(&transaction).await?;

    // Candidates not inserted are re-deliveries of a message stored before (by any replica);
    // the conflicting insert has committed by now, so this statement sees it.
    let stored_before: Vec<Vec<u8>> = plan
        .candidates()
        .iter()
        .filter(|index| !inserted.contains(&ids[**index]))
        .map(|index| deliveries[*index].content.dedup_key().to_vec())
        .collect();
    let mut originals: HashMap<Vec<u8>, i64> = HashMap::new();
    if !stored_before.is_empty() {
        let statement = transaction
            .prepare_cached(
                "SELECT dedup_key, id FROM deliveries WHERE dedup_key = ANY($1) AND duplicate_of IS NULL",
            )
            .await?;
        for row in transaction.query(&statement, &[&stored_before]).await? {
            originals.insert(row.try_get(0)?, row.try_get(1)?);
        }
    }
    let fates = plan
        .fates(
            &ids,
            |id| inserted.contains(&id),
            |index| {
                originals
                    .get(&deliveries[index].content.dedup_key()[..])
                    .copied()
            },
        )
        .ok_or_else(missing_original)?;
    let mut duplicates = DeliveryColumns::default();
    for (index, fate) in fates.iter().enumerate() {
        if let Fate::Duplicate { original } = fate {
            duplicates.push(
                ids[index],
                deliveries[index],
                DeliveryResult::Duplicate,
                Some(*original),
            );
        }
    }
    duplicates.insert(&transaction).await?;

    let (job_operations, completions) = write_contents(
        &transaction,
        deliveries,
        &ids,
        &fates,
        (outcome_ids, device_ids, message_ids),
        job_timeout,
        (Writing::Arrived, record),
    )
    .await?;
    transaction.commit().await?;

    let receipts = fates
        .iter()
        .enumerate()
        .map(|(index, fate)| {
            let mut receipt = fate.receipt(ids[index], &deliveries[index].content);
            receipt.job_operation = job_operations.get(&index).copied();
            receipt
        })
        .collect();
    Ok((receipts, completions))
}

/// Who writes the contents of first deliveries: a batch of callbacks as they arrive, or
/// `reprocess` over a stored delivery the current parser reads (its row and raw body are stored
/// already, and it was counted on its job when it arrived).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Writing {
    Arrived,
    Reprocessed,
}

/// Writes what the first deliveries among `deliveries` (their `fates`) hold, with the ids
/// reserved for their outcomes and job devices, and applies every delivery to its job. Returns
/// the operations jobs gave outcomes (by delivery index) and the jobs completed.
pub(super) async fn write_contents(
    transaction: &Transaction<'_>,
    deliveries: &[&NewDelivery],
    ids: &[i64],
    fates: &[Fate],
    (outcome_ids, device_ids, message_ids): (Vec<i64>, Vec<i64>, Vec<i64>),
    job_timeout: Duration,
    (writing, record): (Writing, bool),
) -> Result<(HashMap<usize, Operation>, Vec<JobCompletion>), Failure> {
    let new_deliveries: Vec<usize> = (0..deliveries.len())
        .filter(|index| fates[*index] == Fate::First)
        .collect();
    // Message ids are handed out in this order (new deliveries, then their messages).
    let event_message_ids = if record {
        message_ids.clone()
    } else {
        Vec::new()
    };
    let outcome_ids = insert_contents(
        transaction,
        deliveries,
        ids,
        &new_deliveries,
        Fresh {
            outcomes: outcome_ids,
            messages: message_ids,
        },
        writing,
    )
    .await?;

    // Jobs: create the missing ones, lock all of them, then apply the batch to them.
    let mut touched: HashMap<String, TouchedJob> = HashMap::new();
    let mut creating: Vec<(String, Option<&'static str>, OffsetDateTime)> = Vec::new();
    for (index, delivery) in deliveries.iter().enumerate() {
        let Some(request_id) = delivery.content.request_id() else {
            continue;
        };
        let operation = delivery.content.job_operation();
        let request_id = clean_key(request_id).into_owned();
        if !touched.contains_key(&request_id) {
            creating.push((request_id.clone(), operation, delivery.received_at));
        }
        let job = touched
            .entry(request_id)
            .or_insert_with(|| TouchedJob::new(delivery.received_at));
        match writing {
            Writing::Arrived => {
                job.record_delivery(
                    operation,
                    delivery.received_at,
                    matches!(fates[index], Fate::Duplicate { .. }),
                );
                if fates[index] == Fate::First
                    && matches!(delivery.content, DeliveryContent::Quarantined(_))
                {
                    job.record_quarantined(1);
                }
            }
            Writing::Reprocessed => {
                job.record_reprocessed(operation, matches!(fates[index], Fate::Duplicate { .. }))
            }
        }
    }
    // Operations follow the job: outcomes of callbacks that name none, by delivery.
    let mut job_operations: HashMap<usize, Operation> = HashMap::new();
    let mut completions = Vec::new();
    if !touched.is_empty() {
        let (mut rows, _) = jobs::create_and_lock(transaction, creating, job_timeout).await?;
        let mut devices = DeviceUpdates::default();
        let mut relabelled: (Vec<i64>, Vec<&'static str>) = Default::default();
        devices
            .load(transaction, &rows, deliveries, &new_deliveries)
            .await?;
        for (position, &index) in new_deliveries.iter().enumerate() {
            let DeliveryContent::Callback(callback) = &deliveries[index].content else {
                continue;
            };
            let Some(request_id) = callback.request_id.as_deref().map(clean_key) else {
                continue;
            };
            let (Some(row), Some(job)) = (
                rows.get_mut(request_id.as_ref()),
                touched.get_mut(request_id.as_ref()),
            ) else {
                continue;
            };
            let operation = outcome_operation(callback, Some(row), Some(job));
            if operation != callback.operation {
                job_operations.insert(index, operation);
                for outcome_id in &outcome_ids[position] {
                    relabelled.0.push(*outcome_id);
                    relabelled.1.push(operation.as_str());
                }
            }
            for (outcome, outcome_id) in callback.outcomes.iter().zip(&outcome_ids[position]) {
                devices.record_outcome(
                    row.id,
                    *outcome_id,
                    &outcome.identifiers,
                    outcome.status,
                    job,
                );
            }
            if let Some(upload) = &callback.upload {
                row.record_upload(upload);
            }
        }
        // Pipelined: the device rows and the job rows are written in one round trip.
        tokio::try_join!(
            devices.write(transaction, device_ids),
            jobs::finish(transaction, &mut rows, touched, &mut completions),
            relabel_outcomes(transaction, &relabelled.0, &relabelled.1),
        )?;
    }
    if record {
        let events = batch_events(
            deliveries,
            ids,
            &new_deliveries,
            &job_operations,
            &event_message_ids,
        );
        outbox::insert(transaction, record, events, &completions).await?;
    }
    Ok((job_operations, completions))
}

/// The events of a batch's first deliveries: each outcome (under the operation its job gave it),
/// each message (with its id), each quarantined delivery.
fn batch_events(
    deliveries: &[&NewDelivery],
    ids: &[i64],
    new_deliveries: &[usize],
    job_operations: &HashMap<usize, Operation>,
    message_ids: &[i64],
) -> Vec<NewEvent> {
    let mut message_ids = message_ids.iter();
    let mut found = Vec::new();
    for &index in new_deliveries {
        let delivery = deliveries[index];
        let received_at = timestamp(delivery.received_at);
        match &delivery.content {
            DeliveryContent::Callback(callback) => {
                let operation = job_operations
                    .get(&index)
                    .copied()
                    .unwrap_or(callback.operation);
                for outcome in &callback.outcomes {
                    found.push(events::device_outcome(
                        ids[index],
                        callback.request_id.as_deref(),
                        operation.as_str(),
                        &received_at,
                        outcome,
                    ));
                }
                for message in &callback.messages {
                    let message_id = message_ids.next().copied().unwrap_or_default();
                    found.push(events::device_message(
                        message_id,
                        ids[index],
                        callback.request_id.as_deref(),
                        &received_at,
                        message,
                    ));
                }
            }
            DeliveryContent::Quarantined(unreadable) => {
                found.push(events::delivery_quarantined(
                    ids[index],
                    unreadable.request_id.as_deref(),
                    unreadable.callback_count,
                    &unreadable.reason,
                    delivery.body.len(),
                    &received_at,
                ));
            }
        }
    }
    found
}

/// Stores outcomes under the operation their job gave them (their callback named none; they
/// were inserted before the jobs were locked).
async fn relabel_outcomes(
    transaction: &Transaction<'_>,
    ids: &[i64],
    operations: &[&'static str],
) -> Result<(), tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let statement = transaction
        .prepare_cached(
            "UPDATE device_outcomes SET operation = u.operation
             FROM unnest($1::bigint[], $2::text[]) AS u (id, operation) WHERE device_outcomes.id = u.id",
        )
        .await?;
    transaction
        .execute(&statement, &[&ids, &operations])
        .await?;
    Ok(())
}

/// A conflict on a message that then cannot be found: not expected (deliveries are never
/// deleted); a defect, so that the batch is retried one delivery at a time.
fn missing_original() -> Failure {
    Failure::Defect("a stored message could not be found again")
}

/// Ids reserved for the rows [`insert_contents`] inserts.
struct Fresh {
    outcomes: Vec<i64>,
    messages: Vec<i64>,
}

/// Inserts the raw bodies, outcomes, device messages, their identifiers and upload reports of the
/// new deliveries, in one pipelined round trip, with ids from `fresh`. Returns the outcome ids of
/// each delivery (in the order of `new_deliveries`, then of its outcomes).
async fn insert_contents(
    transaction: &Transaction<'_>,
    deliveries: &[&NewDelivery],
    ids: &[i64],
    new_deliveries: &[usize],
    fresh: Fresh,
    writing: Writing,
) -> Result<Vec<Vec<i64>>, Failure> {
    let callbacks: Vec<(i64, &NewDelivery, &crate::domain::Callback)> = new_deliveries
        .iter()
        .filter_map(|index| match &deliveries[*index].content {
            DeliveryContent::Callback(callback) => {
                Some((ids[*index], deliveries[*index], callback.as_ref()))
            }
            DeliveryContent::Quarantined(_) => None,
        })
        .collect();
    // Formatted once per delivery; every outcome row borrows it.
    let received: Vec<String> = new_deliveries
        .iter()
        .map(|index| timestamp(deliveries[*index].received_at))
        .collect();
    let mut fresh_messages = fresh.messages.into_iter();
    let mut messages = MessageColumns::default();
    let mut fresh_outcomes = fresh.outcomes.into_iter();
    let mut outcome_ids = Vec::with_capacity(new_deliveries.len());
    let mut outcomes = OutcomeColumns::default();
    let mut identifiers: [Vec<Cow<'_, str>>; 2] = Default::default();
    let mut identified: Vec<i64> = Vec::new();
    let mut uploads = UploadColumns::default();
    let mut callbacks = callbacks.into_iter().peekable();
    for (index, received_at) in new_deliveries.iter().zip(&received) {
        let Some((_, _, callback)) = callbacks.next_if(|(id, _, _)| *id == ids[*index]) else {
            outcome_ids.push(Vec::new());
            continue;
        };
        let mut these = Vec::with_capacity(callback.outcomes.len());
        for outcome in &callback.outcomes {
            let Some(outcome_id) = fresh_outcomes.next() else {
                return Err(Failure::Defect("fewer outcome ids than outcomes"));
            };
            outcomes.push(outcome_id, ids[*index], received_at, callback, outcome);
            for identifier in &outcome.identifiers {
                identifiers[0].push(clean_key(&identifier.kind));
                identifiers[1].push(clean_key(&identifier.id));
                identified.push(outcome_id);
            }
            these.push(outcome_id);
        }
        for message in &callback.messages {
            let Some(message_id) = fresh_messages.next() else {
                return Err(Failure::Defect("fewer message ids than messages"));
            };
            messages.push(message_id, ids[*index], received_at, callback, message);
        }
        if let Some(upload) = &callback.upload {
            uploads.push(ids[*index], callback, upload);
        }
        outcome_ids.push(these);
    }
    let delivery_ids: Vec<i64> = new_deliveries.iter().map(|index| ids[*index]).collect();
    let bodies: Vec<&[u8]> = new_deliveries
        .iter()
        .map(|index| &deliveries[*index].body[..])
        .collect();
    let raw_bodies = async {
        // A reprocessed delivery's body is stored already.
        if delivery_ids.is_empty() || writing == Writing::Reprocessed {
            return Ok(());
        }
        let statement = transaction
            .prepare_cached(
                "INSERT INTO raw_bodies (delivery_id, body) SELECT * FROM unnest($1::bigint[], $2::bytea[])",
            )
            .await?;
        transaction
            .execute(&statement, &[&delivery_ids, &bodies])
            .await
            .map(drop)
    };
    let identifier_rows = async {
        if identified.is_empty() {
            return Ok(());
        }
        let statement = transaction
            .prepare_cached(
                "INSERT INTO outcome_identifiers (kind, identifier, outcome_id)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        transaction
            .execute(&statement, &[&identifiers[0], &identifiers[1], &identified])
            .await
            .map(drop)
    };
    // Sent in this order (outcome and message rows before the identifiers referring to them).
    tokio::try_join!(
        raw_bodies,
        outcomes.insert(transaction),
        identifier_rows,
        messages.insert(transaction),
        messages.insert_identifiers(transaction),
        uploads.insert(transaction),
    )?;
    Ok(outcome_ids)
}

#[derive(Default)]
struct OutcomeColumns<'a> {
    id: Vec<i64>,
    delivery_id: Vec<i64>,
    request_id: Vec<Option<Cow<'a, str>>>,
    operation: Vec<&'static str>,
    status: Vec<&'static str>,
    line_status: Vec<Option<Cow<'a, str>>>,
    fault_code: Vec<Option<Cow<'a, str>>>,
    fault_message: Vec<Option<Cow<'a, str>>>,
    state: Vec<Option<Cow<'a, str>>>,
    service_plan: Vec<Option<Cow<'a, str>>>,
    ip_address: Vec<Option<Cow<'a, str>>>,
    mdn: Vec<Option<Cow<'a, str>>>,
    details: Vec<Option<Cow<'a, str>>>,
    received_at: Vec<&'a str>,
    /// See [`identifiers_text`]: the same (cleaned) pairs as the outcome's identifier rows.
    identifiers: Vec<String>,
}

impl<'a> OutcomeColumns<'a> {
    fn push(
        &mut self,
        id: i64,
        delivery_id: i64,
        received_at: &'a str,
        callback: &'a crate::domain::Callback,
        outcome: &'a crate::domain::DeviceOutcome,
    ) {
        self.id.push(id);
        self.delivery_id.push(delivery_id);
        self.request_id
            .push(callback.request_id.as_deref().map(clean_key));
        self.operation.push(callback.operation.as_str());
        self.status.push(outcome.status.as_str());
        self.line_status
            .push(clean_option(outcome.line_status.as_deref()));
        self.fault_code.push(clean_option(
            outcome.fault.as_ref().map(|fault| fault.code.as_str()),
        ));
        self.fault_message.push(clean_option(
            outcome.fault.as_ref().map(|fault| fault.message.as_str()),
        ));
        self.state.push(clean_option(outcome.state.as_deref()));
        self.service_plan
            .push(clean_option(outcome.service_plan.as_deref()));
        self.ip_address
            .push(clean_option(outcome.ip_address.as_deref()));
        self.mdn.push(clean_option(outcome.mdn.as_deref()));
        self.details.push(
            outcome
                .details
                .as_ref()
                .map(|details| clean_owned(details.to_string())),
        );
        self.received_at.push(received_at);
        let cleaned: Vec<(Cow<'_, str>, Cow<'_, str>)> = outcome
            .identifiers
            .iter()
            .map(|identifier| (clean_key(&identifier.kind), clean_key(&identifier.id)))
            .collect();
        self.identifiers.push(identifiers_text(
            cleaned
                .iter()
                .map(|(kind, id)| (kind.as_ref(), id.as_ref())),
        ));
    }

    async fn insert(&self, transaction: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.id.is_empty() {
            return Ok(());
        }
        let statement = transaction
            .prepare_cached(
                "INSERT INTO device_outcomes (id, delivery_id, request_id, operation, status, line_status, fault_code,
                     fault_message, state, service_plan, ip_address, mdn, details, received_at, identifiers)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                     $15::text[])",
            )
            .await?;
        transaction
            .execute(
                &statement,
                &[
                    &self.id,
                    &self.delivery_id,
                    &self.request_id,
                    &self.operation,
                    &self.status,
                    &self.line_status,
                    &self.fault_code,
                    &self.fault_message,
                    &self.state,
                    &self.service_plan,
                    &self.ip_address,
                    &self.mdn,
                    &self.details,
                    &self.received_at,
                    &self.identifiers,
                ],
            )
            .await?;
        Ok(())
    }
}

/// The `device_messages` columns of several rows, and the `message_identifiers` rows of each.
#[derive(Default)]
struct MessageColumns<'a> {
    id: Vec<i64>,
    delivery_id: Vec<i64>,
    request_id: Vec<Option<Cow<'a, str>>>,
    channel: Vec<&'static str>,
    payload: Vec<Option<Cow<'a, str>>>,
    text: Vec<Option<Cow<'a, str>>>,
    sent_at: Vec<Option<Cow<'a, str>>>,
    received_at: Vec<&'a str>,
    /// Every identifier of every message: kind, identifier and the message's id.
    identifiers: [Vec<Cow<'a, str>>; 2],
    identified: Vec<i64>,
}

impl<'a> MessageColumns<'a> {
    fn push(
        &mut self,
        id: i64,
        delivery_id: i64,
        received_at: &'a str,
        callback: &'a crate::domain::Callback,
        message: &'a crate::domain::DeviceMessage,
    ) {
        self.id.push(id);
        self.delivery_id.push(delivery_id);
        self.request_id
            .push(callback.request_id.as_deref().map(clean_key));
        self.channel.push(message.channel.as_str());
        self.payload.push(clean_option(message.payload.as_deref()));
        self.text.push(clean_option(message.text.as_deref()));
        self.sent_at.push(clean_option(message.sent_at.as_deref()));
        self.received_at.push(received_at);
        for identifier in &message.identifiers {
            self.identifiers[0].push(clean_key(&identifier.kind));
            self.identifiers[1].push(clean_key(&identifier.id));
            self.identified.push(id);
        }
    }

    async fn insert(&self, transaction: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.id.is_empty() {
            return Ok(());
        }
        let statement = transaction
            .prepare_cached(
                "INSERT INTO device_messages (id, delivery_id, request_id, channel, payload, text, sent_at,
                     received_at)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[])",
            )
            .await?;
        transaction
            .execute(
                &statement,
                &[
                    &self.id,
                    &self.delivery_id,
                    &self.request_id,
                    &self.channel,
                    &self.payload,
                    &self.text,
                    &self.sent_at,
                    &self.received_at,
                ],
            )
            .await?;
        Ok(())
    }

    /// A message is new, and its identifiers distinct (the parser keeps each pair once), so
    /// nothing conflicts; `DO NOTHING` keeps a repeated pair from failing the batch all the same.
    async fn insert_identifiers(
        &self,
        transaction: &Transaction<'_>,
    ) -> Result<(), tokio_postgres::Error> {
        if self.identified.is_empty() {
            return Ok(());
        }
        let statement = transaction
            .prepare_cached(
                "INSERT INTO message_identifiers (kind, identifier, message_id)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        transaction
            .execute(
                &statement,
                &[&self.identifiers[0], &self.identifiers[1], &self.identified],
            )
            .await?;
        Ok(())
    }
}

#[derive(Default)]
struct UploadColumns<'a> {
    delivery_id: Vec<i64>,
    request_id: Vec<Option<Cow<'a, str>>>,
    account_name: Vec<Option<Cow<'a, str>>>,
    device_sku: Vec<Option<Cow<'a, str>>>,
    total_lines: Vec<Option<i64>>,
    pending_lines: Vec<Option<i64>>,
    success_lines: Vec<Option<i64>>,
    failed_lines: Vec<Option<i64>>,
    package_error: Vec<Option<Cow<'a, str>>>,
}

impl<'a> UploadColumns<'a> {
    fn push(
        &mut self,
        delivery_id: i64,
        callback: &'a crate::domain::Callback,
        upload: &'a crate::domain::UploadSummary,
    ) {
        self.delivery_id.push(delivery_id);
        self.request_id
            .push(callback.request_id.as_deref().map(clean_key));
        self.account_name
            .push(clean_option(upload.account_name.as_deref()));
        self.device_sku
            .push(clean_option(upload.device_sku.as_deref()));
        self.total_lines.push(stored_count(upload.total_lines));
        self.pending_lines.push(stored_count(upload.pending_lines));
        self.success_lines.push(stored_count(upload.success_lines));
        self.failed_lines.push(stored_count(upload.failed_lines));
        self.package_error
            .push(clean_option(upload.package_error.as_deref()));
    }

    async fn insert(&self, transaction: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.delivery_id.is_empty() {
            return Ok(());
        }
        let statement = transaction
            .prepare_cached(
                "INSERT INTO upload_summaries (delivery_id, request_id, account_name, device_sku, total_lines,
                     pending_lines, success_lines, failed_lines, package_error)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[],
                     $7::bigint[], $8::bigint[], $9::text[])",
            )
            .await?;
        transaction
            .execute(
                &statement,
                &[
                    &self.delivery_id,
                    &self.request_id,
                    &self.account_name,
                    &self.device_sku,
                    &self.total_lines,
                    &self.pending_lines,
                    &self.success_lines,
                    &self.failed_lines,
                    &self.package_error,
                ],
            )
            .await?;
        Ok(())
    }
}
