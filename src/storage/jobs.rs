//! The job core both backends share, with no SQL and no IO: a job as stored and the state rule
//! applied to it, what one write batch adds to a job (deliveries, re-deliveries, device counters,
//! the latest upload report), and what a registration writes. Each backend finds, locks and
//! writes the rows; what the rows become is decided here.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::events::{self, NewEvent};
use super::rows::RowReader;
use super::{Fault, JobRecord, Registered, StoreError, UploadRecord, timestamp};
use crate::domain::{Callback, Operation, OutcomeStatus, UploadSummary};
use crate::jobs::{self, JobFacts, JobState, Registration, UploadCounts};
use crate::metrics::Metrics;

/// The columns of a `jobs` row, as [`JobRow::from_row`] reads them.
pub(crate) const JOB_COLUMNS: &str = "id, request_id, registered, operation, account, label, state, expected_devices,
     devices_reported, succeeded, failed, accepted, deliveries, duplicates, is_upload, total_lines, pending_lines,
     success_lines, failed_lines, package_error, timeout_s, created_at, registered_at, first_callback_at,
     last_callback_at, completed_at, deadline, quarantined";

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
    /// First deliveries of this job that could not be read (quarantined).
    pub quarantined: i64,
}

/// A job that just reached a terminal state: its `job.finished` event, written in the same
/// transaction, and for `m2m_job_completion_seconds` (a timeout is not a completion), observed
/// once the transaction commits.
pub(crate) struct JobCompletion {
    pub operation: String,
    pub seconds: f64,
    /// Counted in `m2m_job_completion_seconds` (not for `timed_out`).
    pub observe: bool,
    pub event: NewEvent,
}

/// Observes the jobs a transaction completed, once it has committed.
pub(crate) fn observe_completions(metrics: &Metrics, completions: &[JobCompletion]) {
    for completion in completions.iter().filter(|completion| completion.observe) {
        metrics.job_completed(&completion.operation, completion.seconds);
    }
}

/// The `job.finished` events of the jobs a transaction finished.
pub(crate) fn finished_events(completions: &[JobCompletion]) -> impl Iterator<Item = &NewEvent> {
    completions.iter().map(|completion| &completion.event)
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
/// see [`timestamp`]).
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

/// Seconds from `start` to `end` (both [`timestamp`] text); 0 when either does not parse.
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
    /// A job a callback creates (no registration yet), pending: the row the `jobs` table holds
    /// after an `INSERT` of these columns, the others at their defaults. A backend that inserts
    /// the row builds it with this rather than reading it back.
    pub(crate) fn created_by_callback(
        id: i64,
        request_id: &str,
        operation: Option<&str>,
        created_at: String,
        deadline: String,
    ) -> Self {
        Self {
            id,
            request_id: request_id.to_owned(),
            registered: false,
            operation: operation.map(str::to_owned),
            account: None,
            label: None,
            state: JobState::Pending.as_str().to_owned(),
            expected_devices: None,
            devices_reported: 0,
            succeeded: 0,
            failed: 0,
            accepted: 0,
            deliveries: 0,
            duplicates: 0,
            is_upload: false,
            total_lines: None,
            pending_lines: None,
            success_lines: None,
            failed_lines: None,
            package_error: None,
            timeout_s: None,
            created_at,
            registered_at: None,
            first_callback_at: None,
            last_callback_at: None,
            completed_at: None,
            deadline,
            quarantined: 0,
        }
    }

    /// A `jobs` row selected with [`JOB_COLUMNS`].
    pub fn from_row<R: RowReader + ?Sized>(row: &R) -> Result<Self, R::Error> {
        Ok(JobRow {
            id: row.integer(0)?,
            request_id: row.text(1)?,
            registered: row.flag(2)?,
            operation: row.optional_text(3)?,
            account: row.optional_text(4)?,
            label: row.optional_text(5)?,
            state: row.text(6)?,
            expected_devices: row.optional_integer(7)?,
            devices_reported: row.integer(8)?,
            succeeded: row.integer(9)?,
            failed: row.integer(10)?,
            accepted: row.integer(11)?,
            deliveries: row.integer(12)?,
            duplicates: row.integer(13)?,
            is_upload: row.flag(14)?,
            total_lines: row.optional_integer(15)?,
            pending_lines: row.optional_integer(16)?,
            success_lines: row.optional_integer(17)?,
            failed_lines: row.optional_integer(18)?,
            package_error: row.optional_text(19)?,
            timeout_s: row.optional_integer(20)?,
            created_at: row.text(21)?,
            registered_at: row.optional_text(22)?,
            first_callback_at: row.optional_text(23)?,
            last_callback_at: row.optional_text(24)?,
            completed_at: row.optional_text(25)?,
            deadline: row.text(26)?,
            quarantined: row.integer(27)?,
        })
    }

    /// The facts of the state rule as of `now` ([`timestamp`] text).
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
            quarantined: count(self.quarantined),
            deadline_passed: self.deadline.as_str() < now,
        }
    }

    /// Applies the state rule in place as of `now`. Returns whether the row changed, and the
    /// completion to observe when the job just completed (a timeout is not a completion).
    pub fn recompute(&mut self, now: OffsetDateTime) -> (bool, Option<JobCompletion>) {
        let now = timestamp(now);
        let transition = transition(
            &self.facts(&now),
            &self.state,
            self.completed_at.as_deref(),
            &now,
        );
        let finished = transition.changed && transition.state.is_terminal();
        self.state = transition.state.as_str().to_owned();
        self.completed_at = transition.completed_at;
        let completion = finished.then(|| JobCompletion {
            operation: self.operation.clone().unwrap_or_else(|| "other".to_owned()),
            seconds: seconds_between(
                self.registered_at.as_deref().unwrap_or(&self.created_at),
                &now,
            ),
            observe: transition.state != JobState::TimedOut,
            event: events::job_finished(&self.clone().into_record(), &now),
        });
        (transition.write, completion)
    }

    /// The latest upload report sets the job's line counts; a package-level error sticks.
    pub fn record_upload(&mut self, upload: &UploadSummary) {
        self.is_upload = true;
        self.total_lines = stored_count(upload.total_lines).or(self.total_lines);
        self.pending_lines = stored_count(upload.pending_lines).or(self.pending_lines);
        self.success_lines = stored_count(upload.success_lines).or(self.success_lines);
        self.failed_lines = stored_count(upload.failed_lines).or(self.failed_lines);
        if self.package_error.is_none() {
            self.package_error.clone_from(&upload.package_error);
        }
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
            quarantined: self.quarantined,
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
    /// Change to the job's quarantined deliveries: one more per unreadable first delivery, one
    /// fewer per delivery `reprocess` could read.
    pub quarantined: i64,
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
            quarantined: 0,
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

    /// Counts a quarantined delivery `reprocess` could read: it is no longer quarantined (and,
    /// if it turned out to be a re-delivery, is one more duplicate). It was counted as a delivery
    /// when it arrived.
    pub fn record_reprocessed(&mut self, operation: Option<&'static str>, duplicate: bool) {
        self.quarantined -= 1;
        self.duplicates += i64::from(duplicate);
        self.operation = self.operation.or(operation);
    }

    /// Counts an unreadable first delivery of the job (`delta` 1), or one `reprocess` could read
    /// (`delta` -1).
    pub fn record_quarantined(&mut self, delta: i64) {
        self.quarantined += delta;
    }

    /// Counts a device's new latest outcome: `previous` is the status it had, `None` while it
    /// had not reported (new, or registered only).
    pub fn count_outcome(&mut self, previous: Option<&str>, status: OutcomeStatus) {
        match previous {
            None => self.counters[REPORTED] += 1,
            Some(previous) => {
                if let Some(index) = counter_of(previous) {
                    self.counters[index] -= 1;
                }
            }
        }
        if let Some(index) = counter_of(status.as_str()) {
            self.counters[index] += 1;
        }
    }

    /// Adds the batch to the job's row and, when the batch brought a first delivery (not only
    /// re-deliveries), applies the state rule as of its last callback. Returns the completion to
    /// observe once the transaction commits.
    pub fn apply_to(&self, row: &mut JobRow) -> Option<JobCompletion> {
        row.deliveries += self.deliveries;
        row.duplicates += self.duplicates;
        row.operation = row.operation.take().or(self.operation.map(str::to_owned));
        let first_at = timestamp(self.first_at);
        if row
            .first_callback_at
            .as_ref()
            .is_none_or(|first| *first > first_at)
        {
            row.first_callback_at = Some(first_at);
        }
        let last_at = timestamp(self.last_at);
        if row
            .last_callback_at
            .as_ref()
            .is_none_or(|last| *last < last_at)
        {
            row.last_callback_at = Some(last_at);
        }
        let [reported, succeeded, failed, accepted] = self.counters;
        row.devices_reported += reported;
        row.succeeded += succeeded;
        row.failed += failed;
        row.accepted += accepted;
        row.quarantined = (row.quarantined + self.quarantined).max(0);
        // Re-deliveries alone change nothing the state rule reads; a reprocess does.
        if self.deliveries > self.duplicates || self.quarantined != 0 || self.counters != [0; 4] {
            row.recompute(self.last_at).1
        } else {
            None
        }
    }
}

/// Operations follow the job: the operation a callback's outcomes are stored and counted under.
/// A callback that names none (fault-only, status-only) takes its job's: registered, stored from
/// an earlier callback, or learned from another callback of the same batch (`touched`).
pub(crate) fn outcome_operation(
    callback: &Callback,
    row: Option<&JobRow>,
    touched: Option<&TouchedJob>,
) -> Operation {
    if callback.operation != Operation::Other {
        return callback.operation;
    }
    row.and_then(|row| row.operation.as_deref())
        .or(touched.and_then(|touched| touched.operation))
        .and_then(Operation::from_label)
        .unwrap_or(Operation::Other)
}

/// Position of `devices_reported` in [`TouchedJob::counters`].
const REPORTED: usize = 0;

/// A count as both databases store it (a `bigint`; counts past `i64::MAX` do not occur, and read
/// as unknown).
pub(crate) fn stored_count(value: Option<u64>) -> Option<i64> {
    value.and_then(|value| i64::try_from(value).ok())
}

/// What a registration writes on its job row (a new one, or one earlier callbacks created), and
/// how a registration of an already registered job is answered.
pub(crate) struct RegistrationPlan<'a> {
    registration: &'a Registration,
    /// The registration as validated, in JSON: "the same registration again" is compared on it.
    pub canonical: String,
    /// The registration's own timeout, else the default: the deadline counts from `now`.
    pub timeout: Duration,
    now: OffsetDateTime,
}

impl<'a> RegistrationPlan<'a> {
    pub fn new(
        registration: &'a Registration,
        now: OffsetDateTime,
        default_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let canonical = serde_json::to_string(registration).map_err(|error| {
            StoreError::Internal(Arc::new(Fault::caused_by(
                "the registration does not serialize",
                error,
            )))
        })?;
        Ok(Self {
            canonical,
            timeout: registration
                .timeout_s
                .map(Duration::from_secs)
                .unwrap_or(default_timeout),
            registration,
            now,
        })
    }

    pub fn registration(&self) -> &'a Registration {
        self.registration
    }

    pub fn operation(&self) -> &'static str {
        self.registration.operation.as_str()
    }

    /// Registers the job on its row: what the job was told by the operator replaces what the
    /// callbacks implied; the deadline counts from the registration.
    pub fn apply(&self, row: &mut JobRow) {
        row.registered = true;
        row.operation = Some(self.operation().to_owned());
        row.account.clone_from(&self.registration.account);
        row.label.clone_from(&self.registration.label);
        row.expected_devices = stored_count(self.registration.expected());
        row.timeout_s = stored_count(self.registration.timeout_s);
        row.registered_at = Some(timestamp(self.now));
        row.deadline = timestamp(self.now + self.timeout);
    }

    /// The answer to a registration of a job already registered (`stored` is the canonical form
    /// registered then): the same one again, or a conflict; the job as stored either way.
    pub fn repeated(&self, row: JobRow, stored: Option<&str>) -> Registered {
        if stored == Some(self.canonical.as_str()) {
            Registered::Unchanged(row.into_record())
        } else {
            Registered::Conflict(row.into_record())
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DeviceIdentifier, Operation};

    const T0: &str = "2026-01-01T00:00:00.000000Z";

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::parse(T0, &time::format_description::well_known::Rfc3339)
            .map(|start| start + time::Duration::seconds(seconds))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// A job callbacks created at T0, with its deadline a day later.
    fn row() -> JobRow {
        JobRow::created_by_callback(1, "r-1", None, T0.to_owned(), timestamp(at(86_400)))
    }

    fn registration_of(expected: u64) -> Registration {
        Registration {
            request_id: "r-1".to_owned(),
            operation: Operation::Activate,
            account: Some("fleet".to_owned()),
            label: None,
            expected_devices: Some(expected),
            devices: vec![DeviceIdentifier::new("IMEI", "350000000000001")],
            timeout_s: Some(60),
        }
    }

    #[test]
    fn a_device_counts_once_as_reported_and_moves_between_outcomes() {
        let mut job = TouchedJob::new(at(0));
        job.count_outcome(None, OutcomeStatus::Failed);
        assert_eq!(job.counters, [1, 0, 1, 0], "newly reported, failed");
        job.count_outcome(Some("failed"), OutcomeStatus::Succeeded);
        assert_eq!(job.counters, [1, 1, 0, 0], "the same device, now succeeded");
    }

    #[test]
    fn a_batch_adds_its_deliveries_times_and_counters_and_applies_the_state_rule() {
        let mut row = row();
        row.expected_devices = Some(1);
        let mut job = TouchedJob::new(at(20));
        job.record_delivery(Some("activate"), at(20), false);
        job.record_delivery(None, at(10), true);
        job.count_outcome(None, OutcomeStatus::Succeeded);

        let completion = job.apply_to(&mut row);

        assert_eq!((row.deliveries, row.duplicates), (2, 1));
        assert_eq!(row.operation.as_deref(), Some("activate"));
        assert_eq!(row.first_callback_at, Some(timestamp(at(10))));
        assert_eq!(row.last_callback_at, Some(timestamp(at(20))));
        assert_eq!((row.devices_reported, row.succeeded), (1, 1));
        assert_eq!(row.state, "completed");
        assert_eq!(row.completed_at, Some(timestamp(at(20))));
        let completion = completion.expect("completed");
        assert_eq!(completion.operation, "activate");
        assert!((completion.seconds - 20.0).abs() < 1e-6, "from created_at");
    }

    #[test]
    fn re_deliveries_alone_change_no_state() {
        let mut row = row();
        row.expected_devices = Some(1);
        row.devices_reported = 1;
        row.succeeded = 1;
        let mut job = TouchedJob::new(at(5));
        job.record_delivery(None, at(5), true);
        assert!(job.apply_to(&mut row).is_none());
        assert_eq!((row.state.as_str(), row.duplicates), ("pending", 1));
    }

    #[test]
    fn the_latest_upload_report_sets_the_line_counts_and_a_package_error_sticks() {
        let mut row = row();
        let report = |total, error: Option<&str>| UploadSummary {
            total_lines: total,
            pending_lines: Some(0),
            package_error: error.map(str::to_owned),
            ..UploadSummary::default()
        };
        row.record_upload(&report(Some(10), Some("first error")));
        row.record_upload(&report(None, Some("second error")));
        assert!(row.is_upload);
        assert_eq!(
            row.total_lines,
            Some(10),
            "an absent count keeps the last one"
        );
        assert_eq!(row.pending_lines, Some(0));
        assert_eq!(row.package_error.as_deref(), Some("first error"));
    }

    #[test]
    fn a_registration_sets_what_the_operator_said_and_its_deadline_counts_from_it() {
        let registration = registration_of(1);
        let plan = RegistrationPlan::new(&registration, at(100), Duration::from_secs(86_400))
            .expect("serializes");
        let mut row = row();
        plan.apply(&mut row);
        assert!(row.registered);
        assert_eq!(row.operation.as_deref(), Some("activate"));
        assert_eq!(row.account.as_deref(), Some("fleet"));
        assert_eq!((row.expected_devices, row.timeout_s), (Some(1), Some(60)));
        assert_eq!(row.registered_at, Some(timestamp(at(100))));
        assert_eq!(row.deadline, timestamp(at(160)));

        let stored = plan.canonical.clone();
        assert!(matches!(
            plan.repeated(row.clone(), Some(&stored)),
            Registered::Unchanged(_)
        ));
        let other = registration_of(2);
        let other =
            RegistrationPlan::new(&other, at(100), Duration::from_secs(60)).expect("serializes");
        assert!(matches!(
            other.repeated(row, Some(&stored)),
            Registered::Conflict(_)
        ));
    }

    #[test]
    fn a_job_past_its_deadline_times_out_finished_but_a_timeout_is_not_a_completion() {
        let mut row = row();
        row.expected_devices = Some(2);
        let (write, completion) = row.recompute(at(86_401));
        assert!(write);
        assert_eq!(row.state, "timed_out");
        let completion = completion.expect("a job.finished event");
        assert!(!completion.observe, "not counted as a completion");
        assert_eq!(
            completion.event.kind,
            crate::storage::events::EventType::JobFinished
        );
        let data: serde_json::Value = serde_json::from_str(&completion.event.data).expect("JSON");
        assert_eq!(data["state"], "timed_out");
        assert_eq!(data["request_id"], row.request_id);
        let (write, again) = row.recompute(at(86_500));
        assert!(!write, "already terminal, nothing to write");
        assert!(again.is_none(), "finished once");
    }
}
