//! The outbox core both backends share, with no SQL and no IO: which events a write produces and
//! their data, event ids, the body a sink is sent, and the delivery policy (retry schedule with
//! jitter, `Retry-After`, leases). Each backend inserts the rows in the transaction of their
//! cause and keeps the delivery state; what the rows hold is decided here.
//!
//! An event is a fact of a first write: an outcome or a message is inserted once (a re-delivery
//! stores none, a reprocess stores a quarantined delivery's once), a delivery is quarantined
//! once, a job reaches a terminal state once per transition. So emitting at the insert emits each
//! fact once, with no dedup table.

use std::time::Duration;

use serde::Serialize;

use crate::domain::{DeviceIdentifier, DeviceMessage, DeviceOutcome};

use super::JobRecord;

/// The kinds of event, a bounded set (metric labels, filters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    JobFinished,
    DeviceOutcome,
    DeviceMessage,
    DeliveryQuarantined,
}

impl EventType {
    pub const ALL: [EventType; 4] = [
        EventType::JobFinished,
        EventType::DeviceOutcome,
        EventType::DeviceMessage,
        EventType::DeliveryQuarantined,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::JobFinished => "job.finished",
            EventType::DeviceOutcome => "device.outcome",
            EventType::DeviceMessage => "device.message",
            EventType::DeliveryQuarantined => "delivery.quarantined",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == label)
    }
}

/// An event to insert: the id is the row's, given by the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NewEvent {
    pub kind: EventType,
    /// [`super::timestamp`] text: when the fact happened (the delivery's arrival, the job's
    /// transition).
    pub created_at: String,
    /// The `data` object, as JSON text.
    pub data: String,
}

/// The public id of the event stored in row `id`: stable, the same on every attempt and sink.
pub fn event_id(id: i64) -> String {
    format!("evt_{id:012}")
}

/// The row of a public event id; `None` for anything else.
pub fn parse_event_id(text: &str) -> Option<i64> {
    let digits = text.strip_prefix("evt_")?;
    if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|id: &i64| *id > 0)
}

fn json<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs to a string cannot fail (no maps with non-string keys).
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned())
}

#[derive(Serialize)]
struct FaultData<'a> {
    code: &'a str,
    message: &'a str,
}

/// `device.outcome`: one stored outcome. The operation result's other fields (`details`) are
/// left out: they may hold device credentials, and an event leaves the listener.
///
/// The data is `{"delivery_id", "request_id", "operation", ...fields, "received_at"}`: the
/// fields are the outcome's alone ([`outcome_fields`]), so they are serialized before the
/// delivery reaches the writer (see [`super::Prepared`]); the writer adds what only it knows.
#[derive(Serialize)]
struct OutcomeFields<'a> {
    identifiers: &'a [DeviceIdentifier],
    status: &'a str,
    line_status: Option<&'a str>,
    fault: Option<FaultData<'a>>,
    state: Option<&'a str>,
    service_plan: Option<&'a str>,
    ip_address: Option<&'a str>,
    mdn: Option<&'a str>,
}

/// The outcome's own fields of its `device.outcome` data, as JSON members without the braces.
pub(crate) fn outcome_fields(outcome: &DeviceOutcome) -> String {
    let object = json(&OutcomeFields {
        identifiers: &outcome.identifiers,
        status: outcome.status.as_str(),
        line_status: outcome.line_status.as_deref(),
        fault: outcome.fault.as_ref().map(|fault| FaultData {
            code: &fault.code,
            message: &fault.message,
        }),
        state: outcome.state.as_deref(),
        service_plan: outcome.service_plan.as_deref(),
        ip_address: outcome.ip_address.as_deref(),
        mdn: outcome.mdn.as_deref(),
    });
    // `json` gives an object, `{...}`: its members are what lies between the braces.
    object
        .strip_prefix('{')
        .and_then(|members| members.strip_suffix('}'))
        .unwrap_or_default()
        .to_owned()
}

pub(crate) fn device_outcome(
    delivery_id: i64,
    request_id: Option<&str>,
    operation: &str,
    received_at: &str,
    outcome: &DeviceOutcome,
) -> NewEvent {
    device_outcome_with(
        delivery_id,
        request_id,
        operation,
        received_at,
        &outcome_fields(outcome),
    )
}

/// [`device_outcome`] from the outcome's [`outcome_fields`], serialized earlier.
pub(crate) fn device_outcome_with(
    delivery_id: i64,
    request_id: Option<&str>,
    operation: &str,
    received_at: &str,
    fields: &str,
) -> NewEvent {
    let mut data = String::with_capacity(fields.len() + 160);
    data.push_str("{\"delivery_id\":");
    data.push_str(&delivery_id.to_string());
    data.push_str(",\"request_id\":");
    data.push_str(&json(&request_id));
    data.push_str(",\"operation\":");
    data.push_str(&json(&operation));
    data.push(',');
    data.push_str(fields);
    data.push_str(",\"received_at\":");
    data.push_str(&json(&received_at));
    data.push('}');
    NewEvent {
        kind: EventType::DeviceOutcome,
        created_at: received_at.to_owned(),
        data,
    }
}

/// `device.message`: an MO SMS or NIDD uplink, as `GET /api/v1/devices/{id}/messages` shows it.
#[derive(Serialize)]
struct MessageData<'a> {
    message_id: i64,
    delivery_id: i64,
    request_id: Option<&'a str>,
    channel: &'a str,
    received_at: &'a str,
    sent_at: Option<&'a str>,
    text: Option<&'a str>,
    payload: Option<&'a str>,
    identifiers: &'a [DeviceIdentifier],
}

pub(crate) fn device_message(
    message_id: i64,
    delivery_id: i64,
    request_id: Option<&str>,
    received_at: &str,
    message: &DeviceMessage,
) -> NewEvent {
    NewEvent {
        kind: EventType::DeviceMessage,
        created_at: received_at.to_owned(),
        data: json(&MessageData {
            message_id,
            delivery_id,
            request_id,
            channel: message.channel.as_str(),
            received_at,
            sent_at: message.sent_at.as_deref(),
            text: message.text.as_deref(),
            payload: message.payload.as_deref(),
            identifiers: &message.identifiers,
        }),
    }
}

/// `delivery.quarantined`: a first delivery the parser could not read (kept raw).
#[derive(Serialize)]
struct QuarantineData<'a> {
    delivery_id: i64,
    request_id: Option<&'a str>,
    callback_count: Option<u32>,
    parse_error: &'a str,
    size: usize,
    received_at: &'a str,
}

pub(crate) fn delivery_quarantined(
    delivery_id: i64,
    request_id: Option<&str>,
    callback_count: Option<u32>,
    parse_error: &str,
    size: usize,
    received_at: &str,
) -> NewEvent {
    NewEvent {
        kind: EventType::DeliveryQuarantined,
        created_at: received_at.to_owned(),
        data: json(&QuarantineData {
            delivery_id,
            request_id,
            callback_count,
            parse_error,
            size,
            received_at,
        }),
    }
}

/// `job.finished`: the job, as `GET /api/v1/jobs/{id}` shows it, when it reached a terminal
/// state (`completed`, `completed_with_errors`, `failed`, `timed_out`).
pub(crate) fn job_finished(job: &JobRecord, at: &str) -> NewEvent {
    NewEvent {
        kind: EventType::JobFinished,
        created_at: at.to_owned(),
        data: json(job),
    }
}

/// The body every sink is sent (the Standard Webhooks payload: `type`, `timestamp`, `data`; the
/// id as well, for consumers that read no headers). `data` is stored JSON, inserted as it is.
pub fn envelope(id: &str, kind: &str, timestamp: &str, data: &str) -> String {
    let data = if serde_json::from_str::<serde::de::IgnoredAny>(data).is_ok() {
        data
    } else {
        "null"
    };
    format!(
        "{{\"id\":{},\"type\":{},\"timestamp\":{},\"data\":{data}}}",
        json(&id),
        json(&kind),
        json(&timestamp)
    )
}

/// An event as the feed shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EventRecord {
    /// Storage order, for cursors; not part of the API.
    #[serde(skip)]
    pub row: i64,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub timestamp: String,
    pub data: serde_json::Value,
}

impl EventRecord {
    pub(crate) fn new(row: i64, kind: String, timestamp: String, data: &str) -> Self {
        Self {
            row,
            id: event_id(row),
            kind,
            timestamp,
            data: serde_json::from_str(data).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// One event with where it stands at each sink and every attempt.
#[derive(Clone, Debug, Serialize)]
pub struct EventDetail {
    #[serde(flatten)]
    pub event: EventRecord,
    pub deliveries: Vec<SinkDeliveryRecord>,
    pub attempts: Vec<AttemptRecord>,
}

/// Where an event stands at one sink.
#[derive(Clone, Debug, Serialize)]
pub struct SinkDeliveryRecord {
    pub sink: String,
    /// `pending`, `delivered`, `dead` (the schedule ran out: dead-lettered), `disabled` (the
    /// endpoint answered 410).
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
    pub last_error: Option<String>,
}

/// One attempt to hand an event to a sink.
#[derive(Clone, Debug, Serialize)]
pub struct AttemptRecord {
    pub sink: String,
    /// 1 for the first; a manual redelivery is an attempt too.
    pub attempt: i64,
    pub attempted_at: String,
    /// The HTTP status (webhooks); `null` when none was received.
    pub status: Option<i64>,
    pub latency_ms: i64,
    /// `delivered`, `failed`, `dead`, `disabled`.
    pub result: String,
    pub error: Option<String>,
    pub manual: bool,
    /// The listener that made it.
    pub replica: String,
}

/// A page of the feed: events after a cursor, oldest first.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    pub kind: Option<EventType>,
    /// Events stored after this row.
    pub after: Option<i64>,
    pub limit: u32,
}

/// A sink as a dispatcher claims for it: its name and filter.
#[derive(Clone, Debug)]
pub struct SinkSpec {
    pub name: String,
    /// `None`: every type.
    pub types: Option<Vec<EventType>>,
}

impl SinkSpec {
    pub fn wants(&self, kind: &str) -> bool {
        match &self.types {
            None => true,
            Some(types) => types.iter().any(|wanted| wanted.as_str() == kind),
        }
    }

    /// The filter as stored: type names joined by `,`, `NULL` for all.
    pub fn types_text(&self) -> Option<String> {
        self.types.as_ref().map(|types| {
            types
                .iter()
                .map(|kind| kind.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
    }
}

/// An event leased to one dispatcher for one attempt.
#[derive(Clone, Debug)]
pub struct ClaimedEvent {
    pub row: i64,
    pub kind: String,
    pub timestamp: String,
    pub data: String,
    /// This attempt's number (1 for the first).
    pub attempt: i64,
    /// Asked for by `redeliver`.
    pub manual: bool,
}

impl ClaimedEvent {
    pub fn id(&self) -> String {
        event_id(self.row)
    }

    pub fn body(&self) -> String {
        envelope(&self.id(), &self.kind, &self.timestamp, &self.data)
    }
}

/// What became of an event after an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    Delivered,
    /// Try again at this time ([`super::timestamp`] text).
    RetryAt(String),
    /// The schedule ran out: dead-lettered for this sink.
    Dead,
    /// The endpoint answered 410: the sink is disabled.
    Disabled,
}

impl Next {
    pub fn state(&self) -> &'static str {
        match self {
            Next::Delivered => "delivered",
            Next::RetryAt(_) => "pending",
            Next::Dead => "dead",
            Next::Disabled => "disabled",
        }
    }

    /// The attempt's result label (metrics, the feed).
    pub fn result(&self) -> &'static str {
        match self {
            Next::Delivered => "delivered",
            Next::RetryAt(_) => "failed",
            Next::Dead => "dead",
            Next::Disabled => "disabled",
        }
    }
}

/// One attempt, to record with the event's new state at its sink.
#[derive(Clone, Debug)]
pub struct AttemptOutcome {
    pub row: i64,
    pub sink: String,
    pub attempt: i64,
    pub attempted_at: String,
    pub status: Option<u16>,
    pub latency_ms: i64,
    pub error: Option<String>,
    pub manual: bool,
    pub replica: String,
    pub next: Next,
}

/// How many events, and since when, a sink has not delivered yet.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkBacklog {
    pub sink: String,
    pub pending: i64,
    /// The oldest undelivered event's timestamp.
    pub oldest: Option<String>,
    /// Dead-lettered: the schedule ran out.
    pub dead: i64,
}

/// A page of the feed from `limit + 1` rows: the cursor is the last event's id when more follow.
pub(crate) fn feed_page(mut items: Vec<EventRecord>, limit: i64) -> super::Page<EventRecord> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = items.len() > limit;
    items.truncate(limit);
    let next_cursor = if more {
        items.last().map(|item| item.id.clone())
    } else {
        None
    };
    super::Page { items, next_cursor }
}

/// What an attempt's answer means for the sink, from the status and an optional `Retry-After`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Try again per the schedule, or after `Retry-After` when it gave one.
    Failed {
        retry_after: Option<Duration>,
    },
    /// 410 Gone: the endpoint does not want events any more.
    Gone,
}

/// 2xx is success; 410 disables; 429 and 503 honour `Retry-After`; everything else (3xx
/// included: redirects are not followed) is a failure.
pub fn verdict(status: u16, retry_after: Option<&str>) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        410 => Verdict::Gone,
        429 | 503 => Verdict::Failed {
            retry_after: retry_after.and_then(parse_retry_after),
        },
        _ => Verdict::Failed { retry_after: None },
    }
}

/// The longest `Retry-After` honoured: an endpoint cannot park an event for longer.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// `Retry-After` in seconds (the HTTP-date form is read too), bounded by [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }
    let at =
        time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    let seconds = (at - time::OffsetDateTime::now_utc())
        .whole_seconds()
        .max(0);
    Some(Duration::from_secs(u64::try_from(seconds).unwrap_or(0)).min(MAX_RETRY_AFTER))
}

/// The delay before the attempt after `attempts_made` failed ones, or `None` when the schedule
/// ran out (dead-letter). `jitter` in `[-1, 1]` moves the delay by up to a tenth either way, so
/// that endpoints recovering together are not sent a burst.
pub fn retry_delay(schedule_s: &[u64], attempts_made: i64, jitter: f64) -> Option<Duration> {
    let index = usize::try_from(attempts_made.checked_sub(1)?).ok()?;
    let base = *schedule_s.get(index)? as f64;
    let factor = 1.0 + 0.1 * jitter.clamp(-1.0, 1.0);
    Some(Duration::from_secs_f64((base * factor).max(0.0)))
}

/// What an attempt leads to: delivered, the next attempt's time, dead-lettered, or disabled.
/// A manual redelivery that fails is dead again: it does not restart the schedule.
pub fn next_after(
    verdict: Verdict,
    schedule_s: &[u64],
    attempts_made: i64,
    manual: bool,
    now: time::OffsetDateTime,
    jitter: f64,
) -> Next {
    match verdict {
        Verdict::Delivered => Next::Delivered,
        Verdict::Gone => Next::Disabled,
        Verdict::Failed { .. } if manual => Next::Dead,
        Verdict::Failed { retry_after } => match retry_delay(schedule_s, attempts_made, jitter) {
            None => Next::Dead,
            Some(delay) => Next::RetryAt(super::timestamp(now + retry_after.unwrap_or(delay))),
        },
    }
}

/// How long a dispatcher holds an event it claimed: the attempt's timeout and a margin. A replica
/// that dies mid-attempt loses its lease after this, and another replica tries again.
pub fn lease_for(timeout: Duration) -> Duration {
    timeout + Duration::from_secs(30)
}

/// The attempt error text as stored: bounded, one line.
pub fn error_text(error: &str) -> String {
    let mut text: String = error
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    if error.chars().count() > 300 {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use time::OffsetDateTime;

    use super::*;

    #[test]
    fn an_event_id_names_its_row_and_nothing_else_parses() {
        assert_eq!(event_id(42), "evt_000000000042");
        assert_eq!(parse_event_id("evt_000000000042"), Some(42));
        assert_eq!(parse_event_id(&event_id(i64::MAX)), Some(i64::MAX));
        for text in [
            "",
            "evt_",
            "evt_0",
            "evt_-1",
            "evt_1a",
            "42",
            "evt_99999999999999999999",
        ] {
            assert_eq!(parse_event_id(text), None, "{text}");
        }
    }

    /// The data the writer assembles from fields serialized before it (`device_outcome_with`) is
    /// the whole object, members in the documented order, valid JSON whatever the texts hold.
    #[test]
    fn an_outcome_event_assembled_from_its_fields_is_the_whole_object_in_order() {
        use crate::domain::{Fault, OutcomeStatus};
        let outcome = DeviceOutcome {
            identifiers: vec![DeviceIdentifier {
                kind: "IMEI".to_owned(),
                id: "99\"0\\1\u{2028}".to_owned(),
            }],
            status: OutcomeStatus::Failed,
            line_status: None,
            fault: Some(Fault {
                code: "CarrierService.X".to_owned(),
                message: "quote \" and </script> and \u{0}".to_owned(),
                actor: None,
                detail: None,
            }),
            state: Some("Active".to_owned()),
            service_plan: None,
            ip_address: Some("10.0.0.1".to_owned()),
            mdn: None,
            details: Some(serde_json::json!({"DeviceCredential": {"Password": "secret"}})),
        };
        let event = device_outcome(
            7,
            Some("r\"1"),
            "activate",
            "2026-01-01T00:00:00.000000Z",
            &outcome,
        );
        assert_eq!(event.kind, EventType::DeviceOutcome);
        assert_eq!(event.created_at, "2026-01-01T00:00:00.000000Z");
        let value: serde_json::Value = serde_json::from_str(&event.data).expect("valid JSON");
        assert_eq!(
            value,
            serde_json::json!({
                "delivery_id": 7,
                "request_id": "r\"1",
                "operation": "activate",
                "identifiers": [{"kind": "IMEI", "id": "99\"0\\1\u{2028}"}],
                "status": "failed",
                "line_status": null,
                "fault": {"code": "CarrierService.X", "message": "quote \" and </script> and \u{0}"},
                "state": "Active",
                "service_plan": null,
                "ip_address": "10.0.0.1",
                "mdn": null,
                "received_at": "2026-01-01T00:00:00.000000Z",
            })
        );
        let keys = [
            "delivery_id",
            "request_id",
            "operation",
            "identifiers",
            "status",
            "line_status",
            "fault",
            "state",
            "service_plan",
            "ip_address",
            "mdn",
            "received_at",
        ];
        let mut positions: Vec<usize> = keys
            .iter()
            .map(|key| event.data.find(&format!("\"{key}\":")).expect(key))
            .collect();
        let in_order = positions.clone();
        positions.sort_unstable();
        assert_eq!(positions, in_order, "{}", event.data);
        assert!(
            !event.data.contains("secret"),
            "details never leave: {}",
            event.data
        );
        let none = device_outcome(8, None, "activate", "t", &outcome);
        assert!(
            none.data
                .starts_with("{\"delivery_id\":8,\"request_id\":null,"),
            "{}",
            none.data
        );
    }

    #[test]
    fn the_envelope_carries_the_stored_data_as_json_and_never_invalid_json() {
        let body = envelope(
            "evt_1",
            "job.finished",
            "2026-01-01T00:00:00.000000Z",
            "{\"a\":1}",
        );
        let value: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(value["data"]["a"], 1);
        assert_eq!(value["type"], "job.finished");
        let body = envelope("evt_\"1", "x", "t", "{not json");
        let value: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(value["data"], serde_json::Value::Null);
        assert_eq!(value["id"], "evt_\"1");
    }

    #[test]
    fn two_hundreds_deliver_410_disables_and_429_or_503_honour_retry_after() {
        assert_eq!(verdict(204, None), Verdict::Delivered);
        assert_eq!(verdict(410, None), Verdict::Gone);
        assert_eq!(
            verdict(301, Some("5")),
            Verdict::Failed { retry_after: None }
        );
        assert_eq!(
            verdict(500, Some("5")),
            Verdict::Failed { retry_after: None }
        );
        assert_eq!(
            verdict(429, Some("7")),
            Verdict::Failed {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            verdict(503, Some("999999999")),
            Verdict::Failed {
                retry_after: Some(MAX_RETRY_AFTER)
            }
        );
        assert_eq!(
            verdict(503, Some("soon")),
            Verdict::Failed { retry_after: None }
        );
    }

    #[test]
    fn the_schedule_gives_each_retry_its_delay_with_a_tenth_of_jitter_then_runs_out() {
        let schedule = [5, 300];
        assert_eq!(retry_delay(&schedule, 1, 0.0), Some(Duration::from_secs(5)));
        assert_eq!(
            retry_delay(&schedule, 2, 1.0),
            Some(Duration::from_secs(330))
        );
        assert_eq!(
            retry_delay(&schedule, 2, -7.0),
            Some(Duration::from_secs(270))
        );
        assert_eq!(retry_delay(&schedule, 3, 0.0), None);
        assert_eq!(retry_delay(&schedule, 0, 0.0), None);
        assert_eq!(retry_delay(&[], 1, 0.0), None);
    }

    #[test]
    fn a_failed_attempt_is_retried_per_the_schedule_then_dead_lettered() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("instant");
        let failed = Verdict::Failed { retry_after: None };
        assert_eq!(
            next_after(failed, &[1, 1], 1, false, now, 0.0),
            Next::RetryAt(crate::storage::timestamp(now + Duration::from_secs(1)))
        );
        assert_eq!(next_after(failed, &[1, 1], 3, false, now, 0.0), Next::Dead);
        assert_eq!(next_after(failed, &[1, 1], 1, true, now, 0.0), Next::Dead);
        let later = Verdict::Failed {
            retry_after: Some(Duration::from_secs(60)),
        };
        assert_eq!(
            next_after(later, &[1, 1], 1, false, now, 0.0),
            Next::RetryAt(crate::storage::timestamp(now + Duration::from_secs(60)))
        );
        assert_eq!(
            next_after(Verdict::Gone, &[1], 1, false, now, 0.0),
            Next::Disabled
        );
    }

    #[test]
    fn a_sink_filter_takes_the_types_it_names_or_all() {
        let all = SinkSpec {
            name: "a".into(),
            types: None,
        };
        assert!(all.wants("device.outcome"));
        assert_eq!(all.types_text(), None);
        let jobs = SinkSpec {
            name: "b".into(),
            types: Some(vec![EventType::JobFinished, EventType::DeviceMessage]),
        };
        assert!(jobs.wants("job.finished"));
        assert!(!jobs.wants("device.outcome"));
        assert_eq!(
            jobs.types_text().as_deref(),
            Some("job.finished,device.message")
        );
    }

    #[test]
    fn an_error_text_is_one_bounded_line() {
        let text = error_text(&format!("a\nb{}", "x".repeat(400)));
        assert!(!text.contains('\n'));
        assert_eq!(text.chars().count(), 301);
    }
}
