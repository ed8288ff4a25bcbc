//! Prometheus metrics (spec §7). Every label value comes from a bounded set (kind, result,
//! operation, status, catalog code, job state): never a RequestId or a device identifier.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::catalog;
use crate::domain::{Callback, CallbackKind, Operation, OutcomeStatus};
use crate::jobs::JobState;

/// Callback results (spec §7) beyond the three storage results.
pub const REJECTED_RESULTS: &[&str] = &["unauthorized", "bad_request", "too_large", "unavailable"];
const ACCEPTED_RESULTS: &[&str] = &["stored", "duplicate", "quarantined"];
/// The kind label of a body that was never parsed into a callback.
pub const UNKNOWN_KIND: &str = "unknown";
/// The `code` of a fault the catalog does not list.
pub const OTHER_FAULT_CODE: &str = "other";

/// Operations that notify of a change nobody requested (the platform sends them unasked, without a
/// job to complete): `m2m_job_completion_seconds` is not initialised for them. A job of one of them
/// still completes and is observed; its series then appears with its first completion.
const UNSOLICITED_OPERATIONS: &[Operation] = &[
    Operation::SmsMo,
    Operation::PromoChange,
    Operation::ExternalProvisioningChange,
    Operation::ResumeTracking,
    Operation::NiddMo,
];

/// The catalog classes of the faults callbacks carry (ThingSpace SOAP and REST faults): the codes of
/// these classes are the `m2m_faults_total` series initialised at start. The other sources' codes
/// (upload texts, a messaging platform's and a provisioning API's numbers) are not fault codes of
/// callbacks; a variant entry (`CODE~TAG`) is never what a callback's code resolves to.
const CALLBACK_FAULT_CLASSES: &[&str] = &[
    "input_invalid",
    "request_failed",
    "input_missing",
    "deserialization",
];

/// What a callback adds to the outcome metrics, taken before it is handed to storage and counted
/// only if storage says it was stored (a re-delivery adds nothing).
#[derive(Clone, Copy, Debug)]
pub struct CallbackTally {
    operation: &'static str,
    /// Outcomes per status, in the order of `OutcomeStatus::ALL`.
    outcomes: [u64; 3],
    upload: bool,
    /// The catalog code of the callback's fault, `other` if unknown.
    fault_code: Option<&'static str>,
}

impl CallbackTally {
    pub fn of(callback: &Callback) -> Self {
        let mut outcomes = [0u64; 3];
        for outcome in &callback.outcomes {
            if let Some(index) = OutcomeStatus::ALL
                .iter()
                .position(|status| *status == outcome.status)
            {
                outcomes[index] += 1;
            }
        }
        let fault_code = callback.fault.as_ref().map(|fault| {
            catalog::catalog()
                .lookup(&fault.code)
                .map(|entry| entry.code.as_str())
                .unwrap_or(OTHER_FAULT_CODE)
        });
        Self {
            operation: callback.operation.as_str(),
            outcomes,
            upload: callback.kind == CallbackKind::UploadDevices,
            fault_code,
        }
    }
}

impl CallbackTally {
    /// The same tally under the operation its job gave the outcomes (the callback named none).
    pub fn under(mut self, operation: crate::domain::Operation) -> Self {
        self.operation = operation.as_str();
        self
    }
}

/// The `(operation, status)` pairs of `m2m_device_outcomes_total` that exist from the start: every
/// operation with every status (`accepted` is an upload line's, and a REST `Pending`/`Queued`).
fn device_outcome_labels() -> impl Iterator<Item = (&'static str, &'static str)> {
    Operation::ALL.iter().flat_map(|operation| {
        OutcomeStatus::ALL
            .iter()
            .map(move |status| (operation.as_str(), status.as_str()))
    })
}

/// The `code` values of `m2m_faults_total` that exist from the start: see
/// [`CALLBACK_FAULT_CLASSES`], and `other`.
fn fault_code_labels() -> impl Iterator<Item = &'static str> {
    catalog::catalog()
        .entries()
        .iter()
        .filter(|entry| CALLBACK_FAULT_CLASSES.contains(&entry.class.as_str()))
        .filter(|entry| !entry.code.contains('~'))
        .map(|entry| entry.code.as_str())
        .chain([OTHER_FAULT_CODE])
}

/// The `operation` values of `m2m_job_completion_seconds` that exist from the start: a job's
/// operation (`other` while no callback or registration named one), less
/// [`UNSOLICITED_OPERATIONS`].
fn job_completion_labels() -> impl Iterator<Item = &'static str> {
    Operation::ALL
        .iter()
        .filter(|operation| !UNSOLICITED_OPERATIONS.contains(operation))
        .map(|operation| operation.as_str())
}

pub struct Metrics {
    registry: Registry,
    callbacks: IntCounterVec,
    callback_duration: HistogramVec,
    callback_attempts: IntCounterVec,
    device_outcomes: IntCounterVec,
    faults: IntCounterVec,
    upload_lines: IntCounterVec,
    jobs: IntGaugeVec,
    job_completion: HistogramVec,
    store_commit: Histogram,
    store_batch_size: Histogram,
    /// Whether each configured callback service is registered to this listener (`platform`).
    platform_registration: IntGaugeVec,
    /// Events not yet delivered, per sink.
    events_pending: IntGaugeVec,
    /// Age of the oldest undelivered event, per sink.
    events_oldest: prometheus::GaugeVec,
    /// Events dead-lettered, per sink.
    events_dead: IntGaugeVec,
    /// Attempts to hand an event to a sink, by sink and result.
    event_attempts: IntCounterVec,
}

/// The `state` values of `m2m_platform_registration`.
pub const PLATFORM_REGISTRATION_STATES: &[&str] =
    &["ours", "missing", "elsewhere", "not_visible", "error"];

/// Results of `m2m_event_attempts_total`.
pub const EVENT_ATTEMPT_RESULTS: &[&str] = &["delivered", "failed", "dead", "disabled"];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let callbacks = IntCounterVec::new(
            Opts::new(
                "m2m_callbacks_total",
                "Callback POSTs by kind and what the listener answered.",
            ),
            &["kind", "result"],
        )?;
        // Acknowledgements take milliseconds; the platform's patience is measured in seconds.
        let callback_duration = HistogramVec::new(
            HistogramOpts::new(
                "m2m_callback_duration_seconds",
                "Receipt to response, by result.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["result"],
        )?;
        let callback_attempts = IntCounterVec::new(
            Opts::new(
                "m2m_callback_attempts_total",
                "Accepted callbacks by their CallbackCount; attempts above 1 mean earlier acknowledgements were late or lost.",
            ),
            &["attempt"],
        )?;
        let device_outcomes = IntCounterVec::new(
            Opts::new(
                "m2m_device_outcomes_total",
                "Device outcomes stored, by operation and status.",
            ),
            &["operation", "status"],
        )?;
        let faults = IntCounterVec::new(
            Opts::new(
                "m2m_faults_total",
                "Faults reported in callbacks, by catalog code (unknown codes: other).",
            ),
            &["code"],
        )?;
        let upload_lines = IntCounterVec::new(
            Opts::new("m2m_upload_lines_total", "Upload lines stored, by result."),
            &["result"],
        )?;
        let jobs = IntGaugeVec::new(Opts::new("m2m_jobs", "Jobs by state."), &["state"])?;
        // Activations complete within minutes, at worst a day.
        let job_completion = HistogramVec::new(
            HistogramOpts::new(
                "m2m_job_completion_seconds",
                "Registration (or first callback) to completion.",
            )
            .buckets(vec![
                30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0,
                86400.0, 172800.0,
            ]),
            &["operation"],
        )?;
        let store_commit = Histogram::with_opts(
            HistogramOpts::new(
                "m2m_store_commit_seconds",
                "Duration of one group commit (fsync included).",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        let store_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "m2m_store_batch_size",
                "Deliveries committed per transaction.",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
            ]),
        )?;
        let events_pending = IntGaugeVec::new(
            Opts::new(
                "m2m_events_pending",
                "Events not delivered yet to a sink (pending, waiting for a retry, or held by a disabled endpoint).",
            ),
            &["sink"],
        )?;
        let events_oldest = prometheus::GaugeVec::new(
            Opts::new(
                "m2m_events_oldest_undelivered_seconds",
                "Age of the oldest event a sink has not been delivered; 0 when none.",
            ),
            &["sink"],
        )?;
        let events_dead = IntGaugeVec::new(
            Opts::new(
                "m2m_events_dead",
                "Events dead-lettered for a sink (its retry schedule ran out); see POST /api/v1/events/{id}/redeliver.",
            ),
            &["sink"],
        )?;
        let event_attempts = IntCounterVec::new(
            Opts::new(
                "m2m_event_attempts_total",
                "Attempts to hand an event to a sink, by sink and result (delivered, failed, dead, disabled).",
            ),
            &["sink", "result"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("m2m_build_info", "The running version; always 1."),
            &["version"],
        )?;

        registry.register(Box::new(callbacks.clone()))?;
        registry.register(Box::new(callback_duration.clone()))?;
        registry.register(Box::new(callback_attempts.clone()))?;
        registry.register(Box::new(device_outcomes.clone()))?;
        registry.register(Box::new(faults.clone()))?;
        registry.register(Box::new(upload_lines.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(job_completion.clone()))?;
        registry.register(Box::new(store_commit.clone()))?;
        registry.register(Box::new(store_batch_size.clone()))?;
        let platform_registration = IntGaugeVec::new(
            Opts::new(
                "m2m_platform_registration",
                "1 for the state the last platform check found each configured callback service in \
                 (ours, missing, elsewhere, error), 0 for the others.",
            ),
            &["service", "state"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        registry.register(Box::new(platform_registration.clone()))?;
        registry.register(Box::new(events_pending.clone()))?;
        registry.register(Box::new(events_oldest.clone()))?;
        registry.register(Box::new(events_dead.clone()))?;
        registry.register(Box::new(event_attempts.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Series that exist from the start, so that rates and alerts see zero rather than nothing.
        for kind in CallbackKind::ALL
            .iter()
            .map(|kind| kind.as_str())
            .chain([UNKNOWN_KIND])
        {
            for result in ACCEPTED_RESULTS.iter().chain(REJECTED_RESULTS) {
                callbacks.with_label_values(&[kind, result]);
            }
        }
        for result in ACCEPTED_RESULTS.iter().chain(REJECTED_RESULTS) {
            callback_duration.with_label_values(&[result]);
        }
        for attempt in ["1", "2", "3", "4", "5+"] {
            callback_attempts.with_label_values(&[attempt]);
        }
        for status in OutcomeStatus::ALL {
            upload_lines.with_label_values(&[status.as_str()]);
        }
        for state in JobState::ALL {
            jobs.with_label_values(&[state.as_str()]);
        }
        for (operation, status) in device_outcome_labels() {
            device_outcomes.with_label_values(&[operation, status]);
        }
        for code in fault_code_labels() {
            faults.with_label_values(&[code]);
        }
        for operation in job_completion_labels() {
            job_completion.with_label_values(&[operation]);
        }
        Ok(Self {
            registry,
            callbacks,
            callback_duration,
            callback_attempts,
            device_outcomes,
            faults,
            upload_lines,
            jobs,
            job_completion,
            store_commit,
            store_batch_size,
            platform_registration,
            events_pending,
            events_oldest,
            events_dead,
            event_attempts,
        })
    }

    /// Creates the registration series of every configured service at zero (they are known only
    /// once the settings are, after [`Metrics::new`]).
    pub fn watch_platform_services(&self, services: &[String]) {
        for service in services {
            for state in PLATFORM_REGISTRATION_STATES {
                self.platform_registration
                    .with_label_values(&[service.as_str(), state]);
            }
        }
    }

    /// Starts the event series of the configured sinks at zero.
    pub fn register_sinks(&self, sinks: &[String]) {
        for sink in sinks {
            self.events_pending.with_label_values(&[sink.as_str()]);
            self.events_oldest.with_label_values(&[sink.as_str()]);
            self.events_dead.with_label_values(&[sink.as_str()]);
            for result in EVENT_ATTEMPT_RESULTS {
                self.event_attempts
                    .with_label_values(&[sink.as_str(), result]);
            }
        }
    }

    /// What the last check found `service` to be: 1 for `state`, 0 for the other states.
    pub fn set_platform_registration(&self, service: &str, state: &str) {
        for known in PLATFORM_REGISTRATION_STATES {
            self.platform_registration
                .with_label_values(&[service, known])
                .set(i64::from(*known == state));
        }
    }

    /// One attempt to hand an event to a sink.
    pub fn event_attempted(&self, sink: &str, result: &str) {
        self.event_attempts.with_label_values(&[sink, result]).inc();
    }

    /// Sets the event gauges from the store's backlog, as of `now`.
    pub fn set_event_backlog(
        &self,
        backlog: &[crate::storage::events::SinkBacklog],
        now: time::OffsetDateTime,
    ) {
        for sink in backlog {
            let name = sink.sink.as_str();
            self.events_pending
                .with_label_values(&[name])
                .set(sink.pending);
            self.events_dead.with_label_values(&[name]).set(sink.dead);
            let age = sink
                .oldest
                .as_deref()
                .and_then(|oldest| {
                    time::OffsetDateTime::parse(
                        oldest,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .ok()
                })
                .map(|oldest| (now - oldest).as_seconds_f64().max(0.0))
                .unwrap_or(0.0);
            self.events_oldest.with_label_values(&[name]).set(age);
        }
    }

    /// One answered callback POST.
    pub fn callback_answered(&self, kind: &str, result: &str, seconds: f64) {
        self.callbacks.with_label_values(&[kind, result]).inc();
        self.callback_duration
            .with_label_values(&[result])
            .observe(seconds);
    }

    /// An accepted callback's `CallbackCount`.
    pub fn callback_attempt(&self, callback_count: Option<u32>) {
        let attempt = match callback_count {
            None | Some(0) => return,
            Some(count @ 1..=4) => count.to_string(),
            Some(_) => "5+".to_owned(),
        };
        self.callback_attempts.with_label_values(&[&attempt]).inc();
    }

    /// Counts a stored callback's outcomes, faults and upload lines (see [`CallbackTally`]).
    pub fn callback_stored(&self, tally: &CallbackTally) {
        for (status, count) in OutcomeStatus::ALL.iter().zip(tally.outcomes) {
            if count == 0 {
                continue;
            }
            self.device_outcomes
                .with_label_values(&[tally.operation, status.as_str()])
                .inc_by(count);
            if tally.upload {
                self.upload_lines
                    .with_label_values(&[status.as_str()])
                    .inc_by(count);
            }
        }
        if let Some(code) = tally.fault_code {
            self.faults.with_label_values(&[code]).inc();
        }
    }

    pub fn job_completed(&self, operation: &str, seconds: f64) {
        self.job_completion
            .with_label_values(&[operation])
            .observe(seconds);
    }

    pub fn store_committed(&self, seconds: f64, deliveries: usize) {
        self.store_commit.observe(seconds);
        self.store_batch_size.observe(deliveries as f64);
    }

    /// Sets the job gauge from a count per state (states absent from `counts` are zero).
    pub fn set_job_counts(&self, counts: &[(String, i64)]) {
        for state in JobState::ALL {
            let count = counts
                .iter()
                .find(|(label, _)| label == state.as_str())
                .map(|(_, count)| *count)
                .unwrap_or(0);
            self.jobs.with_label_values(&[state.as_str()]).set(count);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        Ok(String::from_utf8_lossy(&buffer).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Series lines of `family` in an exposition (histograms: every bucket, sum and count).
    fn series(text: &str, family: &str) -> usize {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| {
                line.strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with(['{', ' ', '_']))
            })
            .count()
    }

    #[test]
    fn the_families_with_known_labels_start_with_their_bounded_series_at_zero() {
        let text = Metrics::new().unwrap().render().unwrap();
        // Every operation with every status.
        assert_eq!(
            series(&text, "m2m_device_outcomes_total"),
            Operation::ALL.len() * OutcomeStatus::ALL.len()
        );
        // The ThingSpace codes of the catalog without variants, and `other`.
        assert_eq!(series(&text, "m2m_faults_total"), 143 + 1);
        // The operations of jobs someone asked for, each 13 buckets, +Inf, sum and count.
        assert_eq!(
            series(&text, "m2m_job_completion_seconds"),
            (Operation::ALL.len() - UNSOLICITED_OPERATIONS.len()) * 16
        );
        assert!(text.contains(r#"m2m_job_completion_seconds_count{operation="other"} 0"#));
        assert!(!text.contains(r#"m2m_job_completion_seconds_count{operation="sms_mo"}"#));
    }
}
