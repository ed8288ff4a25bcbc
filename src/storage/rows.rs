//! What both backends share once the SQL is done: a job row and the state rule applied to it,
//! listing pages, identifier variants, the placeholder of an unreported device.

use time::OffsetDateTime;

use super::{DeliveryQuery, FaultRecord, JobQuery, JobRecord, OutcomeRecord, Page, UploadRecord};
use crate::domain::DeliveryResult;
use crate::jobs::{self, JobFacts, JobState, UploadCounts};

/// A job as stored (the `jobs` table of either backend).
#[derive(Clone, Debug)]
pub(crate) struct JobRow {
    pub id: i64,
    pub request_id: String,
    pub registered: bool,
    pub operation: Option<String>,
    pub account: Option<String>,
    pub label: Option<String>,
    pub state: String,
    pub expected_devices: Option<i64>,
    pub devices_reported: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub accepted: i64,
    pub deliveries: i64,
    pub duplicates: i64,
    pub is_upload: bool,
    pub total_lines: Option<i64>,
    pub pending_lines: Option<i64>,
    pub success_lines: Option<i64>,
    pub failed_lines: Option<i64>,
    pub package_error: Option<String>,
    pub timeout_s: Option<i64>,
    pub created_at: String,
    pub registered_at: Option<String>,
    pub first_callback_at: Option<String>,
    pub last_callback_at: Option<String>,
    pub completed_at: Option<String>,
    pub deadline: String,
}

/// A job that just completed: for `m2m_job_completion_seconds`, observed once the transaction
/// commits.
pub(crate) struct JobCompletion {
    pub operation: String,
    pub seconds: f64,
}

/// What the state rule did to a job.
pub(crate) struct Transition {
    pub state: JobState,
    pub completed_at: Option<String>,
    /// The state changed.
    pub changed: bool,
    /// The state or `completed_at` changed: the row needs writing.
    pub write: bool,
}

/// Applies the state rule to a job whose state was `old_state`, as of `now` (fixed-width text,
/// see [`super::timestamp`]).
pub(crate) fn transition(
    facts: &JobFacts,
    old_state: &str,
    completed_at: Option<&str>,
    now: &str,
) -> Transition {
    let state = jobs::compute_state(facts);
    let was_terminal = JobState::from_label(old_state).is_some_and(JobState::is_terminal);
    let new_completed_at = match (state.is_terminal(), was_terminal) {
        (false, _) => None,
        (true, true) => Some(completed_at.unwrap_or(now).to_owned()),
        (true, false) => Some(now.to_owned()),
    };
    let changed = state.as_str() != old_state;
    Transition {
        state,
        write: changed || new_completed_at.as_deref() != completed_at,
        completed_at: new_completed_at,
        changed,
    }
}

/// Seconds from `start` to `end` (both [`super::timestamp`] text); 0 when either does not parse.
pub(crate) fn seconds_between(start: &str, end: &str) -> f64 {
    let parse = |text: &str| {
        OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
    };
    match (parse(start), parse(end)) {
        (Some(start), Some(end)) => (end - start).as_seconds_f64().max(0.0),
        _ => 0.0,
    }
}

impl JobRow {
    /// The facts of the state rule as of `now` ([`super::timestamp`] text).
    pub fn facts(&self, now: &str) -> JobFacts {
        let unsigned = |value: Option<i64>| value.and_then(|value| u64::try_from(value).ok());
        let count = |value: i64| u64::try_from(value).unwrap_or(0);
        JobFacts {
            registered_expected: unsigned(self.expected_devices),
            reported: count(self.devices_reported),
            succeeded: count(self.succeeded),
            failed: count(self.failed),
            accepted: count(self.accepted),
            upload: self.is_upload.then(|| UploadCounts {
                total: unsigned(self.total_lines),
                pending: unsigned(self.pending_lines),
                success: unsigned(self.success_lines),
                failed: unsigned(self.failed_lines),
            }),
            package_error: self.package_error.is_some(),
            deadline_passed: self.deadline.as_str() < now,
        }
    }

    /// Applies the state rule in place as of `now`. Returns whether the row changed, and the
    /// completion to observe when the job just completed (a timeout is not a completion).
    pub fn recompute(&mut self, now: OffsetDateTime) -> (bool, Option<JobCompletion>) {
        let now = super::timestamp(now);
        let transition = transition(
            &self.facts(&now),
            &self.state,
            self.completed_at.as_deref(),
            &now,
        );
        let completion = (transition.changed
            && transition.state.is_terminal()
            && transition.state != JobState::TimedOut)
            .then(|| JobCompletion {
                operation: self.operation.clone().unwrap_or_else(|| "other".to_owned()),
                seconds: seconds_between(
                    self.registered_at.as_deref().unwrap_or(&self.created_at),
                    &now,
                ),
            });
        self.state = transition.state.as_str().to_owned();
        self.completed_at = transition.completed_at;
        (transition.write, completion)
    }

    pub fn into_record(self) -> JobRecord {
        let expected_devices = self.expected_devices.or(if self.is_upload {
            self.total_lines
        } else {
            None
        });
        JobRecord {
            id: self.id,
            request_id: self.request_id,
            registered: self.registered,
            operation: self.operation,
            account: self.account,
            label: self.label,
            state: self.state,
            expected_devices,
            devices_reported: self.devices_reported,
            succeeded: self.succeeded,
            failed: self.failed,
            accepted: self.accepted,
            pending: expected_devices.map(|expected| (expected - self.devices_reported).max(0)),
            upload: self.is_upload.then_some(UploadRecord {
                total_lines: self.total_lines,
                pending_lines: self.pending_lines,
                success_lines: self.success_lines,
                failed_lines: self.failed_lines,
                package_error: self.package_error,
            }),
            deliveries: self.deliveries,
            duplicates: self.duplicates,
            timeout_s: self.timeout_s,
            registered_at: self.registered_at,
            first_callback_at: self.first_callback_at,
            last_callback_at: self.last_callback_at,
            completed_at: self.completed_at,
            deadline: self.deadline,
        }
    }
}

/// What one batch adds to one job.
#[derive(Clone)]
pub(crate) struct TouchedJob {
    pub deliveries: i64,
    pub duplicates: i64,
    pub operation: Option<&'static str>,
    pub first_at: OffsetDateTime,
    pub last_at: OffsetDateTime,
    /// Changes to devices_reported, succeeded, failed, accepted.
    pub counters: [i64; 4],
}

impl TouchedJob {
    pub fn new(at: OffsetDateTime) -> Self {
        Self {
            deliveries: 0,
            duplicates: 0,
            operation: None,
            first_at: at,
            last_at: at,
            counters: [0; 4],
        }
    }

    pub fn record_delivery(
        &mut self,
        operation: Option<&'static str>,
        at: OffsetDateTime,
        duplicate: bool,
    ) {
        self.deliveries += 1;
        self.duplicates += i64::from(duplicate);
        self.operation = self.operation.or(operation);
        self.first_at = self.first_at.min(at);
        self.last_at = self.last_at.max(at);
    }
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

/// Which of `devices_reported`, `succeeded`, `failed`, `accepted` (by position) a latest status
/// counts in besides `devices_reported`.
pub(crate) fn counter_of(status: &str) -> Option<usize> {
    match status {
        "succeeded" => Some(1),
        "failed" => Some(2),
        "accepted" => Some(3),
        _ => None,
    }
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
    })
}

/// The stored JSON text of an outcome's other fields.
pub(crate) fn parse_details(details: Option<String>) -> Option<serde_json::Value> {
    details.and_then(|details| serde_json::from_str(&details).ok())
}
