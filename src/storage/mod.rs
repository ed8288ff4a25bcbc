//! Storage: the only place that knows SQL.
//!
//! [`Store`] is the narrow interface the HTTP edge uses; [`sqlite::SqliteStore`] implements it on
//! one SQLite file, [`postgres::PostgresStore`] on a PostgreSQL database several replicas share. The contract that matters:
//! [`Store::submit`] returns `Ok` only once the delivery is committed durably, and stores a
//! re-delivery of a stored message as a duplicate, atomically, however many arrive at once.

mod batch;
pub mod credentials;
mod error;
pub mod events;
pub(crate) mod jobs;
pub mod postgres;
pub mod reprocess;
pub(crate) mod rows;
pub mod sqlite;

pub use error::{BackupError, Cause, Fault, StoreError};

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use serde::Serialize;
use time::OffsetDateTime;

use crate::domain::{Callback, DeliveryResult, DeviceIdentifier, Operation, UnreadableBody};
use crate::jobs::{JobState, Registration};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One accepted POST, authenticated, ready to be stored.
#[derive(Debug)]
pub struct NewDelivery {
    pub received_at: OffsetDateTime,
    /// The body exactly as received.
    pub body: Bytes,
    pub content_type: Option<String>,
    /// The peer address (or the forwarded client address from a trusted proxy).
    pub source_address: Option<String>,
    /// The account label of the credential pair that matched.
    pub account: Option<String>,
    pub content: DeliveryContent,
    /// Texts of its rows computed before the writer sees it ([`NewDelivery::prepared`]).
    pub prepared: std::sync::OnceLock<Prepared>,
}

/// What would otherwise cost the one writer thread per outcome, computed by the task that submits
/// the delivery (a request's worker): the callback's and each outcome's details as JSON text,
/// each outcome's identifiers as their column text and, when events are recorded, the outcome's
/// own `device.outcome` fields ([`events::outcome_fields`]). The writer adds only what it alone knows (row ids, the
/// operation in its job).
#[derive(Debug, Default)]
pub struct Prepared {
    /// The callback's details as JSON text.
    details: Option<String>,
    outcomes: Vec<PreparedOutcome>,
}

#[derive(Debug)]
struct PreparedOutcome {
    identifiers: String,
    /// The outcome's details as JSON text.
    details: Option<String>,
    event_fields: Option<String>,
}

impl Prepared {
    fn of(content: &DeliveryContent, record_events: bool) -> Self {
        let DeliveryContent::Callback(callback) = content else {
            return Self::default();
        };
        let outcomes = callback
            .outcomes
            .iter()
            .map(|outcome| PreparedOutcome {
                identifiers: rows::identifiers_text(
                    outcome
                        .identifiers
                        .iter()
                        .map(|identifier| (identifier.kind.as_str(), identifier.id.as_str())),
                ),
                details: outcome.details.as_ref().map(|details| details.to_string()),
                event_fields: record_events.then(|| events::outcome_fields(outcome)),
            })
            .collect();
        Self {
            details: callback.details.as_ref().map(|details| details.to_string()),
            outcomes,
        }
    }

    /// The callback's details as JSON text (`None` when it has none, or is not a callback).
    pub(crate) fn details(&self) -> Option<&str> {
        self.details.as_deref()
    }

    /// Outcome `index`'s details as JSON text (`Some(None)` when it has none), if prepared.
    pub(crate) fn outcome_details(&self, index: usize) -> Option<Option<&str>> {
        self.outcomes
            .get(index)
            .map(|outcome| outcome.details.as_deref())
    }

    /// Outcome `index`'s identifiers column text.
    pub(crate) fn identifiers(&self, index: usize) -> Option<&str> {
        self.outcomes
            .get(index)
            .map(|outcome| outcome.identifiers.as_str())
    }

    /// Outcome `index`'s `device.outcome` fields, if they were prepared.
    pub(crate) fn event_fields(&self, index: usize) -> Option<&str> {
        self.outcomes.get(index)?.event_fields.as_deref()
    }
}

impl NewDelivery {
    /// The delivery's [`Prepared`] texts, computed at the first call: a store calls it before
    /// queueing the delivery for its writer, so the writer finds them done.
    pub(crate) fn prepared(&self, record_events: bool) -> &Prepared {
        self.prepared
            .get_or_init(|| Prepared::of(&self.content, record_events))
    }
}

#[derive(Debug)]
pub enum DeliveryContent {
    Callback(Box<Callback>),
    /// Kept as-is for an operator to look at and re-process.
    Quarantined(Box<UnreadableBody>),
}

impl DeliveryContent {
    pub fn dedup_key(&self) -> &[u8; 32] {
        match self {
            DeliveryContent::Callback(callback) => &callback.dedup_key,
            DeliveryContent::Quarantined(unreadable) => &unreadable.dedup_key,
        }
    }

    pub fn request_id(&self) -> Option<&str> {
        match self {
            DeliveryContent::Callback(callback) => callback.request_id.as_deref(),
            DeliveryContent::Quarantined(unreadable) => unreadable.request_id.as_deref(),
        }
    }

    pub fn callback_count(&self) -> Option<u32> {
        match self {
            DeliveryContent::Callback(callback) => callback.callback_count,
            DeliveryContent::Quarantined(unreadable) => unreadable.callback_count,
        }
    }

    /// What the first delivery of its message is stored as: a callback, or quarantined.
    pub fn first_result(&self) -> DeliveryResult {
        match self {
            DeliveryContent::Callback(_) => DeliveryResult::Stored,
            DeliveryContent::Quarantined(_) => DeliveryResult::Quarantined,
        }
    }

    /// The operation its job takes from it: a job takes its operation from the first callback
    /// that names one.
    pub fn job_operation(&self) -> Option<&'static str> {
        match self {
            DeliveryContent::Callback(callback) if callback.operation != Operation::Other => {
                Some(callback.operation.as_str())
            }
            _ => None,
        }
    }

    /// The device outcomes it carries (none for a quarantined body).
    pub fn outcome_count(&self) -> usize {
        match self {
            DeliveryContent::Callback(callback) => callback.outcomes.len(),
            DeliveryContent::Quarantined(_) => 0,
        }
    }

    /// The device messages it carries (none for a quarantined body).
    pub fn message_count(&self) -> usize {
        match self {
            DeliveryContent::Callback(callback) => callback.messages.len(),
            DeliveryContent::Quarantined(_) => 0,
        }
    }
}

/// What the store did with a delivery. Returned only after the commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub delivery_id: i64,
    pub result: DeliveryResult,
    /// For a duplicate: the delivery that stored the message first.
    pub duplicate_of: Option<i64>,
    /// The operation the callback's outcomes were stored under when its job gave it (the
    /// callback named none): what the metrics count them under.
    pub job_operation: Option<crate::domain::Operation>,
}

/// A filter for the delivery listing.
#[derive(Clone, Debug, Default)]
pub struct DeliveryQuery {
    pub request_id: Option<String>,
    pub kind: Option<String>,
    pub result: Option<DeliveryResult>,
    pub limit: u32,
    /// Deliveries with ids below this one (newest first).
    pub before_id: Option<i64>,
}

/// A delivery as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct DeliveryRecord {
    pub id: i64,
    pub received_at: String,
    pub form: Option<String>,
    pub kind: Option<String>,
    pub operation: Option<String>,
    pub request_id: Option<String>,
    pub callback_count: Option<i64>,
    pub max_callback_threshold: Option<i64>,
    pub result: String,
    pub duplicate_of: Option<i64>,
    /// Re-deliveries of this message received after it was stored.
    pub duplicates: i64,
    /// Body size in bytes.
    pub size: i64,
    pub content_type: Option<String>,
    pub account: Option<String>,
    pub status: Option<String>,
    pub fault_code: Option<String>,
    pub parse_error: Option<String>,
    /// The parser repaired the body to read it (the raw body is kept as received).
    pub repaired: bool,
    /// What was repaired, one line each.
    pub repairs: Vec<String>,
    /// When `reprocess` last read this delivery's body again and changed it.
    pub reprocessed_at: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// The raw body of a delivery, or why it is not there.
#[derive(Debug)]
pub enum RawBody {
    Found {
        content_type: Option<String>,
        body: Vec<u8>,
    },
    /// A re-delivery: only the first delivery's body is kept.
    Duplicate {
        duplicate_of: i64,
    },
    /// The body is no longer kept (pruned).
    Pruned,
    NotFound,
}

/// A job as the API shows it (spec §6).
#[derive(Clone, Debug, Serialize)]
pub struct JobRecord {
    /// Storage order, for cursors; not part of the API.
    #[serde(skip)]
    pub id: i64,
    pub request_id: String,
    pub registered: bool,
    pub operation: Option<String>,
    pub account: Option<String>,
    pub label: Option<String>,
    pub state: String,
    /// From registration, else an upload's `TotalLineCount`; `null` while unknown.
    pub expected_devices: Option<i64>,
    pub devices_reported: i64,
    pub succeeded: i64,
    pub failed: i64,
    /// Upload lines accepted for processing ("Device upload request submitted").
    pub accepted: i64,
    /// Expected devices not reported yet; `null` while the expected count is unknown.
    pub pending: Option<i64>,
    pub upload: Option<UploadRecord>,
    pub deliveries: i64,
    pub duplicates: i64,
    pub timeout_s: Option<i64>,
    pub registered_at: Option<String>,
    pub first_callback_at: Option<String>,
    pub last_callback_at: Option<String>,
    pub completed_at: Option<String>,
    pub deadline: String,
    /// Deliveries of this job that could not be read (kept raw; see `reprocess`). A job with any
    /// is not `completed`.
    pub quarantined: i64,
}

/// The latest upload report of a job.
#[derive(Clone, Debug, Serialize)]
pub struct UploadRecord {
    pub total_lines: Option<i64>,
    pub pending_lines: Option<i64>,
    pub success_lines: Option<i64>,
    pub failed_lines: Option<i64>,
    pub package_error: Option<String>,
}

/// What a registration did.
#[derive(Debug)]
pub enum Registered {
    Created(JobRecord),
    /// A job created by earlier callbacks is now registered, with everything already received.
    Adopted(JobRecord),
    /// The same registration again.
    Unchanged(JobRecord),
    /// A different registration for a registered request id; the stored job is returned.
    Conflict(JobRecord),
}

#[derive(Clone, Debug, Default)]
pub struct JobQuery {
    pub state: Option<JobState>,
    pub operation: Option<String>,
    pub registered: Option<bool>,
    pub limit: u32,
    /// Jobs stored before this one (newest first).
    pub before_id: Option<i64>,
}

/// One device outcome as the API shows it (spec §6).
#[derive(Clone, Debug, Serialize)]
pub struct OutcomeRecord {
    pub request_id: Option<String>,
    pub operation: Option<String>,
    pub identifiers: Vec<DeviceIdentifier>,
    /// `succeeded`, `failed`, `accepted`; for registered devices not reported: `pending`, then
    /// `missing` after the deadline.
    pub status: String,
    pub line_status: Option<String>,
    pub fault: Option<FaultRecord>,
    pub state: Option<String>,
    pub service_plan: Option<String>,
    pub ip_address: Option<String>,
    pub mdn: Option<String>,
    pub received_at: Option<String>,
    pub delivery_id: Option<i64>,
    /// Other fields of the operation result. May hold device credentials: redact before showing.
    pub details: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FaultRecord {
    pub code: Option<String>,
    pub message: Option<String>,
    /// The fault catalog's resolution hint; filled in by the API.
    pub resolution: Option<String>,
    /// What the catalog says about the fault, as `GET /api/v1/errors/{code}` says it, with how it
    /// was found (`match`: `exact`, `text`, or `class` for an unlisted code of a known class, whose
    /// guidance it then gives); `null` when it knows nothing. Filled in by the API. `resolution`
    /// above stays the listed entry's only, as it always was.
    pub explanation: Option<crate::catalog::Explanation>,
}

/// Everything known about one device, found by any of its identifiers: from the moment a
/// registered job lists it, before any callback reported it.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceHistory {
    /// Every identifier the device was reported or registered with.
    pub identifiers: Vec<DeviceIdentifier>,
    /// The newest outcome; while none was reported, the device's entry in the newest job that
    /// lists it (`pending`, or `missing` after that job's deadline).
    pub latest: OutcomeRecord,
    /// Reported outcomes, newest first (empty before the first callback).
    pub history: Vec<OutcomeRecord>,
    /// The jobs that list the device (registered with it, or reported it), newest first.
    pub jobs: Vec<DeviceJobRecord>,
}

/// A job that lists a device, and where the device is in it.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceJobRecord {
    pub request_id: String,
    pub operation: Option<String>,
    /// The registration listed the device (else only a callback named it).
    pub registered: bool,
    /// The device's status in the job: its latest outcome's (`succeeded`, `failed`, `accepted`),
    /// else `pending`, or `missing` after the job's deadline.
    pub status: String,
    pub job_state: String,
    pub registered_at: Option<String>,
    pub deadline: String,
    /// When the device's latest outcome in the job was received; `null` while not reported.
    pub reported_at: Option<String>,
}

/// A page of one device's messages.
#[derive(Clone, Debug)]
pub struct MessageQuery {
    /// Any identifier the messages named.
    pub identifier: DeviceIdentifier,
    pub limit: u32,
    /// Messages with ids below this one (newest first).
    pub before_id: Option<i64>,
}

/// A device message (an MO SMS, a NIDD uplink) as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MessageRecord {
    pub id: i64,
    /// The first delivery of the callback that carried it (a re-delivery stores no message).
    pub delivery_id: i64,
    pub request_id: Option<String>,
    /// `sms` or `nidd`.
    pub channel: String,
    pub received_at: String,
    /// When the device sent it, as the callback gives it.
    pub sent_at: Option<String>,
    /// The payload as text, when it is text.
    pub text: Option<String>,
    /// The payload as sent: base64 for NIDD, the text for SMS.
    pub payload: Option<String>,
    /// Every identifier the callback named for the device.
    pub identifiers: Vec<DeviceIdentifier>,
}

/// The storage interface of the HTTP edge.
pub trait Store: Send + Sync + 'static {
    /// Stores the delivery and returns once it is committed durably.
    fn submit(&self, delivery: NewDelivery) -> BoxFuture<'_, Result<Receipt, StoreError>>;

    /// Whether a write can be committed now (readiness).
    fn check_writable(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    fn list_deliveries(
        &self,
        query: DeliveryQuery,
    ) -> BoxFuture<'_, Result<Page<DeliveryRecord>, StoreError>>;

    fn raw_body(&self, delivery_id: i64) -> BoxFuture<'_, Result<RawBody, StoreError>>;

    /// Registers a job, adopting one that callbacks created first.
    fn register_job(
        &self,
        registration: Registration,
        now: OffsetDateTime,
    ) -> BoxFuture<'_, Result<Registered, StoreError>>;

    /// Moves jobs whose deadline passed to their final state; returns how many changed.
    fn sweep_jobs(&self, now: OffsetDateTime) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Reads the raw bodies of quarantined deliveries again with the current parser; those it
    /// can read are stored as if read on arrival (see [`reprocess`]).
    fn reprocess(
        &self,
        query: reprocess::ReprocessQuery,
    ) -> BoxFuture<'_, Result<reprocess::ReprocessReport, StoreError>>;

    fn get_job(&self, request_id: String) -> BoxFuture<'_, Result<Option<JobRecord>, StoreError>>;

    fn list_jobs(&self, query: JobQuery) -> BoxFuture<'_, Result<Page<JobRecord>, StoreError>>;

    /// Every device of a job with its latest outcome (registered devices not reported included);
    /// `None` if the job is unknown.
    fn job_devices(
        &self,
        request_id: String,
        now: OffsetDateTime,
    ) -> BoxFuture<'_, Result<Option<Vec<OutcomeRecord>>, StoreError>>;

    /// The device one identifier names, across jobs, as of `now` (a registered device not reported
    /// by its job's deadline is `missing` there); `None` if no callback reported it and no job
    /// lists it.
    fn device_history(
        &self,
        identifier: DeviceIdentifier,
        now: OffsetDateTime,
    ) -> BoxFuture<'_, Result<Option<DeviceHistory>, StoreError>>;

    /// The messages of the device one identifier names (any identifier a message named), newest
    /// first; an empty page if there are none.
    fn device_messages(
        &self,
        query: MessageQuery,
    ) -> BoxFuture<'_, Result<Page<MessageRecord>, StoreError>>;

    /// Deletes raw bodies received before `cutoff` (see the backend for what is kept); returns
    /// how many.
    fn prune_raw_bodies(&self, cutoff: OffsetDateTime) -> BoxFuture<'_, Result<usize, StoreError>>;

    /// How many jobs are in each state.
    fn job_counts(&self) -> BoxFuture<'_, Result<Vec<(String, i64)>, StoreError>>;

    /// Copies the database, consistently and atomically, to `target`, which must not exist; on
    /// failure nothing is left there. A backend that has no such copy says so
    /// ([`BackupError::Unsupported`]) and names the tools that make one.
    fn backup(&self, target: std::path::PathBuf) -> BoxFuture<'_, Result<(), BackupError>>;

    /// Every callback credential pair stored by `platform rotate`, current and retired (a
    /// handful of rows: one per rotation).
    fn callback_credentials(
        &self,
    ) -> BoxFuture<'_, Result<Vec<credentials::StoredCredential>, StoreError>>;

    /// Writes a rotation (see [`credentials::Rotation`]) in one transaction.
    fn rotate_callback_credentials(
        &self,
        rotation: credentials::Rotation,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The event feed: events after a cursor, oldest first.
    fn list_events(
        &self,
        query: events::EventQuery,
    ) -> BoxFuture<'_, Result<Page<events::EventRecord>, StoreError>>;

    /// One event with where it stands at each sink and every attempt; `None` if unknown.
    fn event_detail(
        &self,
        row: i64,
    ) -> BoxFuture<'_, Result<Option<events::EventDetail>, StoreError>>;

    /// Sends an event again to every sink it went to (a recorded, manual attempt); returns the
    /// sinks, or `None` if the event is unknown.
    fn redeliver_event(
        &self,
        row: i64,
        now: OffsetDateTime,
    ) -> BoxFuture<'_, Result<Option<Vec<String>>, StoreError>>;

    /// Makes the configured sinks known (a new one is sent what happens from now on).
    fn register_sinks(&self, sinks: Vec<events::SinkSpec>)
    -> BoxFuture<'_, Result<(), StoreError>>;

    /// Leases up to `limit` of a sink's due events to `owner` for `lease`, each attempt numbered;
    /// no two dispatchers are given the same event for the same attempt.
    fn claim_events(
        &self,
        sink: events::SinkSpec,
        owner: String,
        now: OffsetDateTime,
        lease: std::time::Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<events::ClaimedEvent>, StoreError>>;

    /// Records attempts and what became of each event at its sink.
    fn record_attempts(
        &self,
        attempts: Vec<events::AttemptOutcome>,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Per sink: undelivered events and the oldest one's time, dead-lettered ones.
    fn event_backlog(&self) -> BoxFuture<'_, Result<Vec<events::SinkBacklog>, StoreError>>;

    /// Deletes events created before `cutoff` (one chunk); returns how many.
    fn prune_events(&self, cutoff: OffsetDateTime) -> BoxFuture<'_, Result<usize, StoreError>>;

    /// Finishes queued writes and stops taking new ones.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// RFC 3339 UTC with microseconds, fixed width so that text order is time order.
///
/// Written digit by digit: the writer thread formats several timestamps per callback, and
/// `time`'s formatter (parsing a format description's items, writing through `io::Write`) cost
/// about 7,000 instructions per callback of the writer's ~190,000. Years outside 0..=9999 (never
/// a clock's) go through `time`'s formatter, whose output for them is not 27 characters.
pub fn timestamp(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    let year = at.year();
    if !(0..=9999).contains(&year) {
        return timestamp_through_time(at);
    }
    let mut text = [0u8; 27];
    let mut put = |start: usize, value: u32, width: usize| {
        let mut value = value;
        for position in (start..start + width).rev() {
            text[position] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year.unsigned_abs(), 4);
    put(5, u32::from(u8::from(at.month())), 2);
    put(8, u32::from(at.day()), 2);
    put(11, u32::from(at.hour()), 2);
    put(14, u32::from(at.minute()), 2);
    put(17, u32::from(at.second()), 2);
    put(20, at.microsecond(), 6);
    for (position, separator) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ] {
        text[position] = separator;
    }
    String::from_utf8(text.to_vec()).unwrap_or_else(|_| timestamp_through_time(at))
}

/// [`timestamp`] through `time`'s formatter: the reference it is tested against.
fn timestamp_through_time(at: OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    at.format(&format)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// What a store is opened for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// The listener: a SQLite file is created if there is none, and the schema is migrated.
    Serve,
    /// A maintenance command (`prune`, `backup`): the SQLite file must exist, and is used with
    /// the schema it has, so that a backup taken before an upgrade holds the old schema; nothing
    /// connects to PostgreSQL before the command needs it.
    Maintain,
}

/// Opens the backend the settings select: PostgreSQL when `storage.url` is set, else the SQLite
/// file at `storage.path`. Returns the store and, for SQLite, its file.
pub async fn open(
    settings: &crate::configuration::StorageSettings,
    job_timeout: std::time::Duration,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    purpose: Purpose,
) -> anyhow::Result<(std::sync::Arc<dyn Store>, Option<std::path::PathBuf>)> {
    if settings.postgres_url().is_some() {
        let store = postgres::PostgresStore::open(settings, job_timeout, metrics, purpose).await?;
        return Ok((std::sync::Arc::new(store), None));
    }
    let store = sqlite::SqliteStore::open(settings, job_timeout, metrics, purpose)?;
    let path = store.path().to_owned();
    Ok((std::sync::Arc::new(store), Some(path)))
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::{timestamp, timestamp_through_time};

    #[test]
    fn timestamp_writes_what_the_time_formatter_writes() {
        let instants: [i64; 7] = [
            0,
            1,
            951_782_400_123_456,     // 2000-02-29, a leap day
            1_764_620_059_999_999,   // 2025-12-01, the last microsecond of a second
            253_402_300_799_999_999, // 9999-12-31T23:59:59.999999Z, the last four-digit year
            -62_167_219_200_000_000, // 0000-01-01T00:00:00Z
            1_700_000_000_000_001,
        ];
        for micros in instants {
            let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
                .expect("a valid instant");
            assert_eq!(timestamp(at), timestamp_through_time(at), "at {micros} µs");
            assert_eq!(timestamp(at).len(), 27);
        }
        let offset = time::UtcOffset::from_hms(5, 30, 0).expect("a valid offset");
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000)
            .expect("a valid instant")
            .to_offset(offset);
        assert_eq!(timestamp(at), "2023-11-14T22:13:20.000000Z");
    }
}
