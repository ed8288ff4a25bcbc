//! What both backends' reads share once the SQL is done: every record read is mapped here once,
//! from one column list, over either driver's rows ([`RowReader`]); the filters and pages of the
//! listings, identifier variants, the placeholder of an unreported device. (The job row is in
//! [`super::jobs`].)

use std::collections::HashMap;

use super::{
    DeliveryQuery, DeliveryRecord, DeviceHistory, DeviceJobRecord, FaultRecord, JobQuery,
    JobRecord, MessageRecord, OutcomeRecord, Page, RawBody,
};
use crate::domain::{DeliveryResult, DeviceIdentifier};

/// A row of a result, read by column position: what the mappings here need of a driver's row.
/// Each backend implements it for its driver (`rusqlite::Row`, `tokio_postgres::Row`), so that
/// each record type is read by one function whichever database it came from. A value of the
/// wrong type (or a NULL where none is allowed) is the driver's error.
pub(crate) trait RowReader {
    type Error;
    fn text(&self, column: usize) -> Result<String, Self::Error>;
    fn optional_text(&self, column: usize) -> Result<Option<String>, Self::Error>;
    fn integer(&self, column: usize) -> Result<i64, Self::Error>;
    fn optional_integer(&self, column: usize) -> Result<Option<i64>, Self::Error>;
    fn flag(&self, column: usize) -> Result<bool, Self::Error>;
    fn optional_bytes(&self, column: usize) -> Result<Option<Vec<u8>>, Self::Error>;
}

/// The columns of a delivery in the listing, as [`delivery_from_row`] reads them; `duplicates`
/// is how the backend counts the re-deliveries of the row `d`.
pub(crate) fn delivery_columns(duplicates: &str) -> String {
    format!(
        "d.id, d.received_at, d.form, d.kind, d.operation, d.request_id, d.callback_count,
         d.max_callback_threshold, d.result, d.duplicate_of, {duplicates}, d.size, d.content_type,
         d.account, d.status, d.fault_code, d.parse_error, d.repairs, d.reprocessed_at"
    )
}

/// A delivery selected with [`delivery_columns`].
pub(crate) fn delivery_from_row<R: RowReader>(row: &R) -> Result<DeliveryRecord, R::Error> {
    // Written by this program as a JSON list; anything else reads as no repairs.
    let repairs: Option<Vec<String>> = row
        .optional_text(17)?
        .and_then(|text| serde_json::from_str(&text).ok());
    Ok(DeliveryRecord {
        id: row.integer(0)?,
        received_at: row.text(1)?,
        form: row.optional_text(2)?,
        kind: row.optional_text(3)?,
        operation: row.optional_text(4)?,
        request_id: row.optional_text(5)?,
        callback_count: row.optional_integer(6)?,
        max_callback_threshold: row.optional_integer(7)?,
        result: row.text(8)?,
        duplicate_of: row.optional_integer(9)?,
        duplicates: row.integer(10)?,
        size: row.integer(11)?,
        content_type: row.optional_text(12)?,
        account: row.optional_text(13)?,
        status: row.optional_text(14)?,
        fault_code: row.optional_text(15)?,
        parse_error: row.optional_text(16)?,
        repaired: repairs.as_ref().is_some_and(|repairs| !repairs.is_empty()),
        repairs: repairs.unwrap_or_default(),
        reprocessed_at: row.optional_text(18)?,
    })
}

/// The `repairs` column of a delivery: a JSON list of what the parser repaired, NULL when
/// nothing was (read back by [`delivery_from_row`]).
pub(crate) fn repairs_text(repairs: &[String]) -> Option<String> {
    (!repairs.is_empty()).then(|| serde_json::Value::from(repairs.to_vec()).to_string())
}

/// The columns of a delivery's raw body, as [`raw_body_from_row`] reads them: the delivery `d`
/// joined to its body `r`, if any.
pub(crate) const RAW_BODY_COLUMNS: &str = "d.content_type, d.duplicate_of, r.body";

/// A delivery's raw body (selected with [`RAW_BODY_COLUMNS`]), or why it is not there.
pub(crate) fn raw_body_from_row<R: RowReader>(row: &R) -> Result<RawBody, R::Error> {
    let content_type = row.optional_text(0)?;
    Ok(match (row.optional_bytes(2)?, row.optional_integer(1)?) {
        (Some(body), _) => RawBody::Found { content_type, body },
        (None, Some(duplicate_of)) => RawBody::Duplicate { duplicate_of },
        (None, None) => RawBody::Pruned,
    })
}

/// The columns of a device outcome `o`, as [`outcome_from_row`] reads them.
pub(crate) const OUTCOME_COLUMNS: &str =
    "o.id, o.request_id, o.operation, o.status, o.line_status, o.fault_code, o.fault_message,
     o.state, o.service_plan, o.ip_address, o.mdn, o.received_at, o.delivery_id, o.details,
     o.identifiers";

/// The `identifiers` column of an outcome: its identifiers as a JSON list of `[kind, identifier]`
/// pairs (read back by [`outcome_from_row`]). They are also rows of `outcome_identifiers`, which
/// finds an outcome by identifier; kept on the outcome as well, an outcome's identifiers need no
/// index on `outcome_identifiers (outcome_id)`, which was about a tenth of the SQLite writer's
/// work per callback.
pub(crate) fn identifiers_text<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let pairs: Vec<[&str; 2]> = pairs.map(|(kind, id)| [kind, id]).collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned())
}

/// The identifiers of an outcome's `identifiers` column; anything else reads as none.
fn parse_identifiers(text: Option<String>) -> Vec<DeviceIdentifier> {
    let pairs: Vec<(String, String)> = text
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let mut identifiers: Vec<DeviceIdentifier> = pairs
        .into_iter()
        .map(|(kind, id)| DeviceIdentifier { kind, id })
        .collect();
    sort_identifiers(&mut identifiers);
    identifiers
}

/// An outcome selected with [`OUTCOME_COLUMNS`] from column `first` on.
pub(crate) fn outcome_from_row<R: RowReader>(
    row: &R,
    first: usize,
) -> Result<OutcomeRecord, R::Error> {
    Ok(OutcomeRecord {
        request_id: row.optional_text(first + 1)?,
        operation: row.optional_text(first + 2)?,
        identifiers: parse_identifiers(row.optional_text(first + 14)?),
        status: row.text(first + 3)?,
        line_status: row.optional_text(first + 4)?,
        fault: fault_record(row.optional_text(first + 5)?, row.optional_text(first + 6)?),
        state: row.optional_text(first + 7)?,
        service_plan: row.optional_text(first + 8)?,
        ip_address: row.optional_text(first + 9)?,
        mdn: row.optional_text(first + 10)?,
        received_at: row.optional_text(first + 11)?,
        delivery_id: row.optional_integer(first + 12)?,
        details: parse_details(row.optional_text(first + 13)?),
    })
}

/// The columns of a job device `d` with its latest outcome `o` (if reported), as
/// [`JobDevices::add`] reads them.
pub(crate) fn job_device_columns() -> String {
    format!("d.id, o.id IS NOT NULL, {OUTCOME_COLUMNS}")
}

/// An identifier selected as `owner, kind, identifier`: the outcome or job device it belongs
/// to, and the identifier.
pub(crate) fn identifier_from_row<R: RowReader>(
    row: &R,
) -> Result<(i64, DeviceIdentifier), R::Error> {
    Ok((
        row.integer(0)?,
        DeviceIdentifier {
            kind: row.text(1)?,
            id: row.text(2)?,
        },
    ))
}

fn sort_identifiers(identifiers: &mut [DeviceIdentifier]) {
    identifiers.sort_by(|left, right| (&left.kind, &left.id).cmp(&(&right.kind, &right.id)));
}

/// The device list of one job, built from its identifier rows, then its device rows in order.
pub(crate) struct JobDevices<'a> {
    job: &'a JobRecord,
    now: &'a str,
    identifiers: HashMap<i64, Vec<DeviceIdentifier>>,
    pub devices: Vec<OutcomeRecord>,
}

impl<'a> JobDevices<'a> {
    /// For `job` as of `now` ([`super::timestamp`] text: a registered device not reported by its
    /// deadline is `missing`).
    pub fn new(job: &'a JobRecord, now: &'a str) -> Self {
        Self {
            job,
            now,
            identifiers: HashMap::new(),
            devices: Vec::new(),
        }
    }

    /// One row of [`identifier_from_row`] (`job_device_id, kind, identifier`).
    pub fn add_identifier<R: RowReader>(&mut self, row: &R) -> Result<(), R::Error> {
        let (device, identifier) = identifier_from_row(row)?;
        self.identifiers.entry(device).or_default().push(identifier);
        Ok(())
    }

    /// One row of [`job_device_columns`], after every identifier.
    pub fn add<R: RowReader>(&mut self, row: &R) -> Result<(), R::Error> {
        let device_id = row.integer(0)?;
        let mut outcome = if row.flag(1)? {
            outcome_from_row(row, 2)?
        } else {
            unreported_outcome(self.job, self.now)
        };
        outcome.identifiers = self.identifiers.remove(&device_id).unwrap_or_default();
        sort_identifiers(&mut outcome.identifiers);
        self.devices.push(outcome);
        Ok(())
    }
}

/// A device's history, built from its outcome rows, newest first.
#[derive(Default)]
pub(crate) struct History {
    history: Vec<OutcomeRecord>,
}

impl History {
    /// One row of [`OUTCOME_COLUMNS`], newest first.
    pub fn add<R: RowReader>(&mut self, row: &R) -> Result<(), R::Error> {
        self.history.push(outcome_from_row(row, 0)?);
        Ok(())
    }

    /// Every identifier the device was reported or registered with, its latest outcome (or its
    /// entry in the newest job that lists it), its history and its jobs; `None` without an
    /// outcome or a job.
    pub fn finish(self, jobs: DeviceJobs) -> Option<DeviceHistory> {
        let mut identifiers: Vec<DeviceIdentifier> = Vec::new();
        let reported = self
            .history
            .iter()
            .flat_map(|outcome| outcome.identifiers.iter());
        for found in reported.chain(jobs.identifiers.iter()) {
            if !identifiers.contains(found) {
                identifiers.push(found.clone());
            }
        }
        sort_identifiers(&mut identifiers);
        let latest = match self.history.first() {
            Some(latest) => latest.clone(),
            None => {
                let mut placeholder = jobs.newest_unreported.clone()?;
                placeholder.identifiers = identifiers.clone();
                placeholder
            }
        };
        Some(DeviceHistory {
            identifiers,
            latest,
            history: self.history,
            jobs: jobs.jobs,
        })
    }
}

/// The columns of a job device `d` found by one of its identifiers, with its latest outcome `o`
/// (if reported), as [`DeviceJobs::add`] reads them.
pub(crate) const DEVICE_JOB_COLUMNS: &str = "d.id, d.job_id, d.registered, d.status, o.received_at";

/// The jobs that list a device, built from its job device rows, newest first.
#[derive(Default)]
pub(crate) struct DeviceJobs {
    identifiers: Vec<DeviceIdentifier>,
    jobs: Vec<DeviceJobRecord>,
    /// The device in the newest job whose device was not reported: the `latest` of a device
    /// no callback reported yet.
    newest_unreported: Option<OutcomeRecord>,
}

impl DeviceJobs {
    /// One row of the lookup, `job_device_id, kind, identifier`: the identifier as stored.
    /// Returns the job device.
    pub fn add_identifier<R: RowReader>(&mut self, row: &R) -> Result<i64, R::Error> {
        let (job_device_id, identifier) = identifier_from_row(row)?;
        if !self.identifiers.contains(&identifier) {
            self.identifiers.push(identifier);
        }
        Ok(job_device_id)
    }

    /// The job id of a row of [`DEVICE_JOB_COLUMNS`], to read its job with.
    pub fn job_id<R: RowReader>(row: &R) -> Result<i64, R::Error> {
        row.integer(1)
    }

    /// One row of [`DEVICE_JOB_COLUMNS`] with its job, newest first, as of `now`
    /// ([`super::timestamp`] text).
    pub fn add<R: RowReader>(
        &mut self,
        row: &R,
        job: &JobRecord,
        now: &str,
    ) -> Result<(), R::Error> {
        let registered = row.flag(2)?;
        let status = row.optional_text(3)?;
        let reported_at = row.optional_text(4)?;
        let status = match status {
            Some(status) => status,
            None => {
                let unreported = unreported_outcome(job, now);
                let status = unreported.status.clone();
                if self.newest_unreported.is_none() {
                    self.newest_unreported = Some(unreported);
                }
                status
            }
        };
        self.jobs.push(DeviceJobRecord {
            request_id: job.request_id.clone(),
            operation: job.operation.clone(),
            registered,
            status,
            job_state: job.state.clone(),
            registered_at: job.registered_at.clone(),
            deadline: job.deadline.clone(),
            reported_at,
        });
        Ok(())
    }
}

/// The columns of a device message `m`, as [`DeviceMessages::add`] reads them.
pub(crate) const MESSAGE_COLUMNS: &str =
    "m.id, m.delivery_id, m.request_id, m.channel, m.received_at, m.sent_at, m.text, m.payload";

/// A page of device messages, built from their identifier rows, then their message rows newest
/// first.
#[derive(Default)]
pub(crate) struct DeviceMessages {
    identifiers: HashMap<i64, Vec<DeviceIdentifier>>,
    messages: Vec<MessageRecord>,
}

impl DeviceMessages {
    /// One row of [`identifier_from_row`] (`message_id, kind, identifier`).
    pub fn add_identifier<R: RowReader>(&mut self, row: &R) -> Result<(), R::Error> {
        let (message, identifier) = identifier_from_row(row)?;
        self.identifiers
            .entry(message)
            .or_default()
            .push(identifier);
        Ok(())
    }

    /// One row of [`MESSAGE_COLUMNS`], newest first, after the identifiers of its message.
    pub fn add<R: RowReader>(&mut self, row: &R) -> Result<(), R::Error> {
        let id = row.integer(0)?;
        let mut identifiers = self.identifiers.remove(&id).unwrap_or_default();
        sort_identifiers(&mut identifiers);
        self.messages.push(MessageRecord {
            id,
            delivery_id: row.integer(1)?,
            request_id: row.optional_text(2)?,
            channel: row.text(3)?,
            received_at: row.text(4)?,
            sent_at: row.optional_text(5)?,
            text: row.optional_text(6)?,
            payload: row.optional_text(7)?,
            identifiers,
        });
        Ok(())
    }

    /// The page of `limit` messages from the `limit + 1` (at most) of [`newest_message_ids`].
    pub fn page(self, limit: i64) -> Page<MessageRecord> {
        page(self.messages, limit, |message| message.id)
    }
}

/// The message ids of a page, from those each candidate of an identifier found (see
/// [`identifier_candidates`]; each list newest first): newest first, each once, `limit + 1` at
/// most, so that the extra one says that more follow. Each candidate is looked up on its own, in
/// index order, rather than all of them with `IN`, which would sort every message of the device.
pub(crate) fn newest_message_ids(found: Vec<i64>, limit: i64) -> Vec<i64> {
    let mut ids = found;
    ids.sort_unstable_by(|left, right| right.cmp(left));
    ids.dedup();
    ids.truncate(usize::try_from(limit.saturating_add(1)).unwrap_or(usize::MAX));
    ids
}

/// A value a listing filters on.
#[derive(Clone, Debug)]
pub(crate) enum FilterValue {
    Text(String),
    Integer(i64),
    Boolean(bool),
}

/// The WHERE clause of a listing: only the filters given, so that an index serves each (neither
/// database uses one for `$1 IS NULL OR column = $1`). Each condition holds `{}` where its
/// placeholder goes; each backend writes placeholders its own way.
#[derive(Default)]
pub(crate) struct Conditions {
    conditions: Vec<&'static str>,
    pub values: Vec<FilterValue>,
}

impl Conditions {
    fn add(&mut self, condition: &'static str, value: FilterValue) {
        self.conditions.push(condition);
        self.values.push(value);
    }

    pub fn deliveries(query: &DeliveryQuery) -> Self {
        let mut conditions = Self::default();
        if let Some(request_id) = &query.request_id {
            conditions.add("request_id = {}", FilterValue::Text(request_id.clone()));
        }
        if let Some(result) = query.result {
            // The partial index covers only the unusual results, and is used only when the query
            // says so.
            let condition = if result == DeliveryResult::Stored {
                "result = {}"
            } else {
                "result = {} AND result <> 'stored'"
            };
            conditions.add(condition, FilterValue::Text(result.as_str().to_owned()));
        }
        if let Some(kind) = &query.kind {
            conditions.add("kind = {}", FilterValue::Text(kind.clone()));
        }
        if let Some(before_id) = query.before_id {
            conditions.add("id < {}", FilterValue::Integer(before_id));
        }
        conditions
    }

    pub fn jobs(query: &JobQuery) -> Self {
        let mut conditions = Self::default();
        if let Some(state) = query.state {
            conditions.add("state = {}", FilterValue::Text(state.as_str().to_owned()));
        }
        if let Some(operation) = &query.operation {
            conditions.add("operation = {}", FilterValue::Text(operation.clone()));
        }
        if let Some(registered) = query.registered {
            conditions.add("registered = {}", FilterValue::Boolean(registered));
        }
        if let Some(before_id) = query.before_id {
            conditions.add("id < {}", FilterValue::Integer(before_id));
        }
        conditions
    }

    /// `WHERE ...` (or nothing) with `placeholder(n)` for the n-th value, counting from 1.
    pub fn clause(&self, placeholder: impl Fn(usize) -> String) -> String {
        if self.conditions.is_empty() {
            return String::new();
        }
        let conditions: Vec<String> = self
            .conditions
            .iter()
            .enumerate()
            .map(|(index, condition)| condition.replace("{}", &placeholder(index + 1)))
            .collect();
        format!("WHERE {}", conditions.join(" AND "))
    }
}

/// A page of `limit` rows from `limit + 1` fetched: the extra row only says that more follow.
pub(crate) fn page<T>(mut items: Vec<T>, limit: i64, id_of: impl Fn(&T) -> i64) -> Page<T> {
    let more = items.len() as i64 > limit;
    items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = if more {
        items.last().map(|last| id_of(last).to_string())
    } else {
        None
    };
    Page { items, next_cursor }
}

/// The identifier as sent, then upper- and lower-case: identifiers are stored as sent, and
/// hexadecimal ones (MEID, ESN) may differ in case only.
pub(crate) fn identifier_candidates(id: &str) -> Vec<String> {
    let mut candidates = vec![id.to_owned()];
    for variant in [id.to_ascii_uppercase(), id.to_ascii_lowercase()] {
        if !candidates.contains(&variant) {
            candidates.push(variant);
        }
    }
    candidates
}

/// Outcomes shown in a device history, newest first.
pub(crate) const HISTORY_LIMIT: i64 = 500;

/// A registered device of `job` that has not reported: `pending`, or `missing` after the deadline.
pub(crate) fn unreported_outcome(job: &JobRecord, now: &str) -> OutcomeRecord {
    let status = if job.deadline.as_str() < now {
        "missing"
    } else {
        "pending"
    };
    OutcomeRecord {
        request_id: Some(job.request_id.clone()),
        operation: job.operation.clone(),
        identifiers: Vec::new(),
        status: status.to_owned(),
        line_status: None,
        fault: None,
        state: None,
        service_plan: None,
        ip_address: None,
        mdn: None,
        received_at: None,
        delivery_id: None,
        details: None,
    }
}

/// A fault as stored (code and message columns); `None` when neither is set.
pub(crate) fn fault_record(code: Option<String>, message: Option<String>) -> Option<FaultRecord> {
    (code.is_some() || message.is_some()).then_some(FaultRecord {
        code,
        message,
        resolution: None,
        explanation: None,
    })
}

/// The stored JSON text of an outcome's other fields.
pub(crate) fn parse_details(details: Option<String>) -> Option<serde_json::Value> {
    details.and_then(|details| serde_json::from_str(&details).ok())
}

#[cfg(test)]
mod tests {
    use super::newest_message_ids;

    #[test]
    fn the_message_ids_of_several_candidates_are_merged_newest_first_each_once() {
        assert_eq!(newest_message_ids(vec![9, 4, 1, 7, 4, 2], 2), [9, 7, 4]);
        assert_eq!(newest_message_ids(vec![3], 5), [3]);
        assert!(newest_message_ids(Vec::new(), 1).is_empty());
    }
}
