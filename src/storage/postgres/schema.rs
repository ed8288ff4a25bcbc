//! The PostgreSQL schema, as an ordered list of migrations recorded in `schema_migrations`.
//!
//! The same tables as the SQLite schema, with two differences: a delivery's re-delivery count is
//! counted at read time (`duplicate_of` is indexed) instead of being kept on the first delivery's
//! row, so that replicas storing re-deliveries of one message never wait on each other; and there
//! is no per-batch heartbeat row for them to contend on. Foreign keys are checked at commit
//! (`DEFERRABLE INITIALLY DEFERRED`): a batch sends its inserts pipelined, in one round trip, and
//! their order on the wire must not matter.

use deadpool_postgres::Object;

use super::error::store_error;
use crate::storage::StoreError;

/// Schema versions, applied in order. Never edit an applied migration: add a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deliveries (
    id                     BIGSERIAL PRIMARY KEY,
    received_at            TEXT NOT NULL,
    form                   TEXT,
    kind                   TEXT,
    operation              TEXT,
    request_id             TEXT,
    callback_count         BIGINT,
    max_callback_threshold BIGINT,
    dedup_key              BYTEA NOT NULL,
    result                 TEXT NOT NULL CHECK (result IN ('stored', 'duplicate', 'quarantined')),
    duplicate_of           BIGINT REFERENCES deliveries (id) DEFERRABLE INITIALLY DEFERRED,
    size                   BIGINT NOT NULL,
    content_type           TEXT,
    source_address         TEXT,
    account                TEXT,
    status                 TEXT,
    fault_code             TEXT,
    fault_message          TEXT,
    comment                TEXT,
    details                TEXT,
    parse_error            TEXT
);
-- One first delivery per message, whichever replica stores it: a concurrent insert of the same
-- message waits for the first one's transaction and then does nothing (ON CONFLICT DO NOTHING).
CREATE UNIQUE INDEX deliveries_message ON deliveries (dedup_key) WHERE duplicate_of IS NULL;
CREATE INDEX deliveries_request ON deliveries (request_id, id);
CREATE INDEX deliveries_unusual_result ON deliveries (result, id) WHERE result <> 'stored';
CREATE INDEX deliveries_duplicate_of ON deliveries (duplicate_of) WHERE duplicate_of IS NOT NULL;

CREATE TABLE raw_bodies (
    delivery_id BIGINT PRIMARY KEY REFERENCES deliveries (id) DEFERRABLE INITIALLY DEFERRED,
    body        BYTEA NOT NULL
);

CREATE TABLE device_outcomes (
    id            BIGSERIAL PRIMARY KEY,
    delivery_id   BIGINT NOT NULL REFERENCES deliveries (id) DEFERRABLE INITIALLY DEFERRED,
    request_id    TEXT,
    operation     TEXT NOT NULL,
    status        TEXT NOT NULL,
    line_status   TEXT,
    fault_code    TEXT,
    fault_message TEXT,
    state         TEXT,
    service_plan  TEXT,
    ip_address    TEXT,
    mdn           TEXT,
    details       TEXT,
    received_at   TEXT NOT NULL
);
CREATE INDEX device_outcomes_request ON device_outcomes (request_id, id);

CREATE TABLE outcome_identifiers (
    kind       TEXT NOT NULL,
    identifier TEXT NOT NULL,
    outcome_id BIGINT NOT NULL REFERENCES device_outcomes (id) DEFERRABLE INITIALLY DEFERRED,
    PRIMARY KEY (kind, identifier, outcome_id)
);
CREATE INDEX outcome_identifiers_outcome ON outcome_identifiers (outcome_id);

CREATE TABLE upload_summaries (
    delivery_id   BIGINT PRIMARY KEY REFERENCES deliveries (id) DEFERRABLE INITIALLY DEFERRED,
    request_id    TEXT,
    account_name  TEXT,
    device_sku    TEXT,
    total_lines   BIGINT,
    pending_lines BIGINT,
    success_lines BIGINT,
    failed_lines  BIGINT,
    package_error TEXT
);
CREATE INDEX upload_summaries_request ON upload_summaries (request_id);

-- Written by the readiness probe: proves a commit can go through right now.
CREATE TABLE heartbeat (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at TEXT NOT NULL
);

-- A job: one platform request, keyed by RequestId. Every transaction that changes a job locks its
-- row first (SELECT ... FOR NO KEY UPDATE, in request_id order), so counters and state written by
-- different replicas never interleave.
CREATE TABLE jobs (
    id                BIGSERIAL PRIMARY KEY,
    request_id        TEXT NOT NULL UNIQUE,
    registered        BOOLEAN NOT NULL DEFAULT FALSE,
    operation         TEXT,
    account           TEXT,
    label             TEXT,
    expected_devices  BIGINT,
    timeout_s         BIGINT,
    registration      TEXT,
    state             TEXT NOT NULL,
    devices_reported  BIGINT NOT NULL DEFAULT 0,
    succeeded         BIGINT NOT NULL DEFAULT 0,
    failed            BIGINT NOT NULL DEFAULT 0,
    accepted          BIGINT NOT NULL DEFAULT 0,
    deliveries        BIGINT NOT NULL DEFAULT 0,
    duplicates        BIGINT NOT NULL DEFAULT 0,
    is_upload         BOOLEAN NOT NULL DEFAULT FALSE,
    total_lines       BIGINT,
    pending_lines     BIGINT,
    success_lines     BIGINT,
    failed_lines      BIGINT,
    package_error     TEXT,
    created_at        TEXT NOT NULL,
    registered_at     TEXT,
    first_callback_at TEXT,
    last_callback_at  TEXT,
    completed_at      TEXT,
    deadline          TEXT NOT NULL
);
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_open_deadline ON jobs (deadline) WHERE state IN ('pending', 'in_progress');

CREATE TABLE job_devices (
    id                BIGSERIAL PRIMARY KEY,
    job_id            BIGINT NOT NULL REFERENCES jobs (id) DEFERRABLE INITIALLY DEFERRED,
    registered        BOOLEAN NOT NULL DEFAULT FALSE,
    latest_outcome_id BIGINT REFERENCES device_outcomes (id) DEFERRABLE INITIALLY DEFERRED,
    status            TEXT
);
CREATE INDEX job_devices_job ON job_devices (job_id, id);

CREATE TABLE job_device_identifiers (
    job_id        BIGINT NOT NULL,
    kind          TEXT NOT NULL,
    identifier    TEXT NOT NULL,
    job_device_id BIGINT NOT NULL REFERENCES job_devices (id) DEFERRABLE INITIALLY DEFERRED,
    PRIMARY KEY (job_id, kind, identifier)
);
"#,
    r#"
-- What the parser repaired to read a delivery (a JSON list of lines; NULL when nothing was), and
-- when a stored body was read again by `reprocess`.
ALTER TABLE deliveries ADD COLUMN repairs TEXT;
ALTER TABLE deliveries ADD COLUMN reprocessed_at TEXT;
-- First deliveries of a job that could not be read: the job is not complete while it has any.
ALTER TABLE jobs ADD COLUMN quarantined BIGINT NOT NULL DEFAULT 0;
UPDATE jobs SET quarantined = (
    SELECT count(*) FROM deliveries d
     WHERE d.request_id = jobs.request_id AND d.result = 'quarantined' AND d.duplicate_of IS NULL
);
-- A device is found by any identifier from the moment a job registers it (before any callback):
-- the registered identifiers of one (kind, identifier), newest job device first. Only those a
-- registration wrote are indexed, so that a callback's identifiers cost no second index entry
-- (a reported device's jobs are found through its outcomes).
ALTER TABLE job_device_identifiers ADD COLUMN registered BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE job_device_identifiers SET registered = TRUE
 WHERE job_device_id IN (SELECT id FROM job_devices WHERE registered);
CREATE INDEX job_device_identifiers_registered
    ON job_device_identifiers (kind, identifier, job_device_id) WHERE registered;
-- Device messages (MO SMS, NIDD uplinks): facts, kept like outcomes (never pruned), stored with
-- the first delivery of their callback.
CREATE TABLE device_messages (
    id          BIGSERIAL PRIMARY KEY,
    delivery_id BIGINT NOT NULL REFERENCES deliveries (id) DEFERRABLE INITIALLY DEFERRED,
    request_id  TEXT,
    channel     TEXT NOT NULL,
    payload     TEXT,
    text        TEXT,
    sent_at     TEXT,
    received_at TEXT NOT NULL
);

-- Every identifier a message names: a lookup by any (kind, identifier) pair finds its messages,
-- newest first, in index order.
CREATE TABLE message_identifiers (
    kind       TEXT NOT NULL,
    identifier TEXT NOT NULL,
    message_id BIGINT NOT NULL REFERENCES device_messages (id) DEFERRABLE INITIALLY DEFERRED,
    PRIMARY KEY (kind, identifier, message_id)
);
CREATE INDEX message_identifiers_message ON message_identifiers (message_id);
"#,
    r#"
-- An outcome's identifiers on its row as well (a JSON list of [kind, identifier] pairs), so that
-- reading them needs no index on outcome_identifiers (outcome_id). outcome_identifiers still
-- finds outcomes by identifier.
ALTER TABLE device_outcomes ADD COLUMN identifiers TEXT;
UPDATE device_outcomes o SET identifiers = coalesce((
    SELECT json_agg(json_build_array(i.kind, i.identifier))::text
      FROM outcome_identifiers i WHERE i.outcome_id = o.id
), '[]');
DROP INDEX outcome_identifiers_outcome;
"#,
    r#"
-- Callback credentials written by `platform rotate`, beside those of the configuration file: every
-- replica reads them. The password is kept in clear only while its pair is current (to register
-- it again); a retired pair keeps its SHA-256 digest and the end of its overlap. A configured or
-- generated pair a rotation retired is a digest-only row (`source = 'retired'`).
CREATE TABLE callback_credentials (
    id              BIGSERIAL PRIMARY KEY,
    username        TEXT NOT NULL,
    password_digest BYTEA NOT NULL,
    password        TEXT,
    account         TEXT,
    source          TEXT NOT NULL CHECK (source IN ('rotated', 'retired')),
    created_at      TEXT NOT NULL,
    valid_until     TEXT
);
CREATE UNIQUE INDEX callback_credentials_pair ON callback_credentials (username, password_digest);
"#,
    r#"
-- The outbox: each event is written in the transaction of its cause. Transactions commit out of
-- id order, so events wait for their fan-out to the sinks under a flag (a partial index holds
-- only those not fanned out yet).
CREATE TABLE events (
    id         BIGSERIAL PRIMARY KEY,
    type       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    data       TEXT NOT NULL,
    fanned_out BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX events_not_fanned_out ON events (id) WHERE NOT fanned_out;
CREATE TABLE event_sinks (
    name            TEXT PRIMARY KEY,
    types           TEXT,
    disabled_at     TEXT,
    disabled_reason TEXT
);
CREATE TABLE event_deliveries (
    event_id        BIGINT NOT NULL,
    sink            TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    manual          BOOLEAN NOT NULL DEFAULT FALSE,
    next_attempt_at TEXT,
    lease_owner     TEXT,
    lease_until     TEXT,
    delivered_at    TEXT,
    last_error      TEXT,
    PRIMARY KEY (event_id, sink)
);
CREATE INDEX event_deliveries_due ON event_deliveries (sink, next_attempt_at) WHERE state = 'pending';
CREATE TABLE event_attempts (
    id           BIGSERIAL PRIMARY KEY,
    event_id     BIGINT NOT NULL,
    sink         TEXT NOT NULL,
    attempt      BIGINT NOT NULL,
    attempted_at TEXT NOT NULL,
    status       INTEGER,
    latency_ms   BIGINT NOT NULL,
    result       TEXT NOT NULL,
    error        TEXT,
    manual       BOOLEAN NOT NULL DEFAULT FALSE,
    replica      TEXT NOT NULL
);
-- One row per (event, sink, attempt number): two replicas cannot both record one attempt.
CREATE UNIQUE INDEX event_attempts_once ON event_attempts (event_id, sink, attempt);
"#,
    r#"
-- Indexes no query reads (issue 13), as in SQLite's migration 9: a job's outcomes are found
-- through its devices, an upload's line counts are on its job.
DROP INDEX device_outcomes_request;
DROP INDEX upload_summaries_request;
"#,
];

/// Applies the migrations not yet recorded, under an advisory lock: replicas starting together
/// apply each one once, the others wait and find it applied.
pub(super) async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    let migrate = async {
        let transaction = client.transaction().await?;
        // A migration (or waiting for another replica's) may take longer than a write may.
        transaction
            .batch_execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
            .await?;
        transaction
            .execute(
                "SELECT pg_advisory_xact_lock(hashtext('m2m-listener migrations ' || current_schema()))",
                &[],
            )
            .await?;
        transaction
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version    INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .await?;
        let applied: i32 = transaction
            .query_one(
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                &[],
            )
            .await?
            .try_get(0)?;
        let applied = usize::try_from(applied).unwrap_or(0);
        if applied > MIGRATIONS.len() {
            return Ok(Err(StoreError::internal(format!(
                "the database schema is version {applied}, newer than this build knows ({}): upgrade m2m-listener",
                MIGRATIONS.len()
            ))));
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
            transaction.batch_execute(migration).await?;
            let version = i32::try_from(index + 1).unwrap_or(i32::MAX);
            transaction
                .execute(
                    "INSERT INTO schema_migrations (version) VALUES ($1)",
                    &[&version],
                )
                .await?;
            tracing::info!(version, "applied database migration");
        }
        transaction.commit().await?;
        Ok::<_, tokio_postgres::Error>(Ok(()))
    };
    match migrate.await {
        Ok(Ok(())) => Ok(()),
        Ok(refused) => refused,
        Err(error) => Err(store_error(error)),
    }
}
