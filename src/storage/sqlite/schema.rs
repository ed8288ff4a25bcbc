//! The schema, as an ordered list of migrations, and how they are applied.

use rusqlite::{Connection, TransactionBehavior};

/// One schema version: SQL, or a change SQL cannot make.
enum Migration {
    Sql(&'static str),
    /// Replaces `old` by `new` in the `CREATE TABLE` text of `table` (see [`rewrite_table_sql`]).
    RewriteTable {
        table: &'static str,
        old: &'static str,
        new: &'static str,
    },
}

/// Schema versions, applied in order; `PRAGMA user_version` records how many have been applied.
/// Never edit an applied migration: add a new one.
const MIGRATIONS: &[Migration] = &[
    Migration::Sql(
        r#"
CREATE TABLE deliveries (
    id                     INTEGER PRIMARY KEY,
    received_at            TEXT NOT NULL,
    form                   TEXT,
    kind                   TEXT,
    operation              TEXT,
    request_id             TEXT,
    callback_count         INTEGER,
    max_callback_threshold INTEGER,
    dedup_key              BLOB NOT NULL,
    result                 TEXT NOT NULL CHECK (result IN ('stored', 'duplicate', 'quarantined')),
    duplicate_of           INTEGER REFERENCES deliveries (id),
    duplicates             INTEGER NOT NULL DEFAULT 0,
    size                   INTEGER NOT NULL,
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
-- One first delivery per message: re-deliveries (duplicate_of set) are outside the index, so a
-- concurrent re-delivery cannot be stored twice whatever the interleaving.
CREATE UNIQUE INDEX deliveries_message ON deliveries (dedup_key) WHERE duplicate_of IS NULL;
CREATE INDEX deliveries_request ON deliveries (request_id, id);
CREATE INDEX deliveries_result ON deliveries (result, id);

CREATE TABLE raw_bodies (
    delivery_id INTEGER PRIMARY KEY REFERENCES deliveries (id),
    body        BLOB NOT NULL
);

CREATE TABLE device_outcomes (
    id            INTEGER PRIMARY KEY,
    delivery_id   INTEGER NOT NULL REFERENCES deliveries (id),
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
CREATE INDEX device_outcomes_delivery ON device_outcomes (delivery_id);

-- Every identifier of a device outcome: a lookup by any (kind, identifier) pair finds it.
CREATE TABLE outcome_identifiers (
    kind       TEXT NOT NULL,
    identifier TEXT NOT NULL,
    outcome_id INTEGER NOT NULL REFERENCES device_outcomes (id),
    PRIMARY KEY (kind, identifier, outcome_id)
) WITHOUT ROWID;
CREATE INDEX outcome_identifiers_outcome ON outcome_identifiers (outcome_id);

CREATE TABLE upload_summaries (
    delivery_id   INTEGER PRIMARY KEY REFERENCES deliveries (id),
    request_id    TEXT,
    account_name  TEXT,
    device_sku    TEXT,
    total_lines   INTEGER,
    pending_lines INTEGER,
    success_lines INTEGER,
    failed_lines  INTEGER,
    package_error TEXT
);
CREATE INDEX upload_summaries_request ON upload_summaries (request_id);

-- Written by the readiness probe: proves a commit can go through right now.
CREATE TABLE heartbeat (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at TEXT NOT NULL
);
"#,
    ),
    Migration::Sql(
        r#"
-- A job: one platform request, keyed by RequestId; registered by the operator or created by the
-- first callback naming it. Counters and state are recomputed inside every transaction that adds
-- an outcome, so they are never behind.
CREATE TABLE jobs (
    id                INTEGER PRIMARY KEY,
    request_id        TEXT NOT NULL UNIQUE,
    registered        INTEGER NOT NULL DEFAULT 0,
    operation         TEXT,
    account           TEXT,
    label             TEXT,
    expected_devices  INTEGER,
    timeout_s         INTEGER,
    -- The registration as validated, to tell "the same again" from a conflict.
    registration      TEXT,
    state             TEXT NOT NULL,
    devices_reported  INTEGER NOT NULL DEFAULT 0,
    succeeded         INTEGER NOT NULL DEFAULT 0,
    failed            INTEGER NOT NULL DEFAULT 0,
    accepted          INTEGER NOT NULL DEFAULT 0,
    deliveries        INTEGER NOT NULL DEFAULT 0,
    duplicates        INTEGER NOT NULL DEFAULT 0,
    is_upload         INTEGER NOT NULL DEFAULT 0,
    total_lines       INTEGER,
    pending_lines     INTEGER,
    success_lines     INTEGER,
    failed_lines      INTEGER,
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

-- The devices of a job: registered ones and reported ones, matched by any identifier.
CREATE TABLE job_devices (
    id                INTEGER PRIMARY KEY,
    job_id            INTEGER NOT NULL REFERENCES jobs (id),
    registered        INTEGER NOT NULL DEFAULT 0,
    latest_outcome_id INTEGER REFERENCES device_outcomes (id),
    -- The latest outcome's status; NULL while not reported.
    status            TEXT
);
CREATE INDEX job_devices_job ON job_devices (job_id, id);

CREATE TABLE job_device_identifiers (
    job_id        INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    identifier    TEXT NOT NULL,
    job_device_id INTEGER NOT NULL REFERENCES job_devices (id),
    PRIMARY KEY (job_id, kind, identifier)
) WITHOUT ROWID;
CREATE INDEX job_device_identifiers_device ON job_device_identifiers (job_device_id);
"#,
    ),
    Migration::Sql(
        r#"
-- Indexes no query uses cost every insert: drop them. Listing by result is for the rare
-- results (duplicates, quarantined); stored deliveries are found through the primary key.
DROP INDEX device_outcomes_delivery;
DROP INDEX job_device_identifiers_device;
DROP INDEX deliveries_result;
CREATE INDEX deliveries_unusual_result ON deliveries (result, id) WHERE result <> 'stored';
"#,
    ),
    // SQLite checks `result IN (<three values>)` through an ephemeral table, a B-tree created and
    // dropped for every delivery inserted (5% of the writer's work): the same rule as comparisons.
    // Every stored row satisfies both, so the table's rows need no rewriting.
    Migration::RewriteTable {
        table: "deliveries",
        old: "CHECK (result IN ('stored', 'duplicate', 'quarantined'))",
        new: "CHECK (result = 'stored' OR result = 'duplicate' OR result = 'quarantined')",
    },
    Migration::Sql(
        r#"
-- What the parser repaired to read a delivery (a JSON list of lines; NULL when nothing was), and
-- when a stored body was read again by `reprocess`.
ALTER TABLE deliveries ADD COLUMN repairs TEXT;
ALTER TABLE deliveries ADD COLUMN reprocessed_at TEXT;
-- First deliveries of a job that could not be read: the job is not complete while it has any.
ALTER TABLE jobs ADD COLUMN quarantined INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET quarantined = (
    SELECT count(*) FROM deliveries d
     WHERE d.request_id = jobs.request_id AND d.result = 'quarantined' AND d.duplicate_of IS NULL
);
-- A device is found by any identifier from the moment a job registers it (before any callback):
-- the registered identifiers of one (kind, identifier), newest job device first. Only those a
-- registration wrote are indexed, so that a callback's identifiers cost no second index entry
-- (a reported device's jobs are found through its outcomes).
ALTER TABLE job_device_identifiers ADD COLUMN registered INTEGER NOT NULL DEFAULT 0;
UPDATE job_device_identifiers SET registered = 1
 WHERE job_device_id IN (SELECT id FROM job_devices WHERE registered = 1);
CREATE INDEX job_device_identifiers_registered
    ON job_device_identifiers (kind, identifier, job_device_id) WHERE registered = 1;
-- Device messages (MO SMS, NIDD uplinks): facts, kept like outcomes (never pruned), stored with
-- the first delivery of their callback.
CREATE TABLE device_messages (
    id          INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL REFERENCES deliveries (id),
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
    message_id INTEGER NOT NULL REFERENCES device_messages (id),
    PRIMARY KEY (kind, identifier, message_id)
) WITHOUT ROWID;
CREATE INDEX message_identifiers_message ON message_identifiers (message_id);
"#,
    ),
    Migration::Sql(
        r#"
-- An outcome's identifiers on its row as well (a JSON list of [kind, identifier] pairs), so that
-- reading them needs no index on outcome_identifiers (outcome_id): that index was about a tenth
-- of the writer's work per callback. outcome_identifiers still finds outcomes by identifier.
ALTER TABLE device_outcomes ADD COLUMN identifiers TEXT;
UPDATE device_outcomes SET identifiers = (
    SELECT json_group_array(json_array(i.kind, i.identifier))
      FROM outcome_identifiers i WHERE i.outcome_id = device_outcomes.id
);
DROP INDEX outcome_identifiers_outcome;
"#,
    ),
    Migration::Sql(
        r#"
-- Callback credentials written by `platform rotate`, beside those of the configuration file: every
-- replica reads them. The password is kept in clear only while its pair is current (to register
-- it again); a retired pair keeps its SHA-256 digest and the end of its overlap. A configured or
-- generated pair a rotation retired is a digest-only row (`source = 'retired'`).
CREATE TABLE callback_credentials (
    id              INTEGER PRIMARY KEY,
    username        TEXT NOT NULL,
    password_digest BLOB NOT NULL,
    password        TEXT,
    account         TEXT,
    source          TEXT NOT NULL CHECK (source IN ('rotated', 'retired')),
    created_at      TEXT NOT NULL,
    valid_until     TEXT
);
CREATE UNIQUE INDEX callback_credentials_pair ON callback_credentials (username, password_digest);
"#,
    ),
    Migration::Sql(
        r#"
-- The outbox: each event is written in the transaction of its cause. Narrow, with no secondary
-- index, so that an insert on the writer costs one b-tree entry. The newest row is never pruned,
-- so an id is never handed out twice.
CREATE TABLE events (
    id         INTEGER PRIMARY KEY,
    type       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    data       TEXT NOT NULL
);
-- Each sink (webhook endpoint, NATS) with the last event fanned out to it and, after a 410, when
-- it was disabled.
CREATE TABLE event_sinks (
    name            TEXT PRIMARY KEY,
    cursor          INTEGER NOT NULL,
    types           TEXT,
    disabled_at     TEXT,
    disabled_reason TEXT
) WITHOUT ROWID;
-- Where each event stands at each sink: pending (due at next_attempt_at, leased while a
-- dispatcher tries), delivered, dead (the schedule ran out), disabled (the endpoint said 410).
CREATE TABLE event_deliveries (
    event_id        INTEGER NOT NULL,
    sink            TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    manual          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT,
    lease_owner     TEXT,
    lease_until     TEXT,
    delivered_at    TEXT,
    last_error      TEXT,
    PRIMARY KEY (event_id, sink)
) WITHOUT ROWID;
CREATE INDEX event_deliveries_due ON event_deliveries (sink, next_attempt_at) WHERE state = 'pending';
-- Every attempt, one per (event, sink, attempt number): two dispatchers cannot both record one.
CREATE TABLE event_attempts (
    id           INTEGER PRIMARY KEY,
    event_id     INTEGER NOT NULL,
    sink         TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    attempted_at TEXT NOT NULL,
    status       INTEGER,
    latency_ms   INTEGER NOT NULL,
    result       TEXT NOT NULL,
    error        TEXT,
    manual       INTEGER NOT NULL DEFAULT 0,
    replica      TEXT NOT NULL
);
CREATE UNIQUE INDEX event_attempts_once ON event_attempts (event_id, sink, attempt);
"#,
    ),
    Migration::Sql(
        r#"
-- Indexes no query reads (issue 13): each cost the writer one b-tree entry per row for nothing.
-- A job's outcomes are found through its devices, an upload's line counts are on its job.
-- `queries::tests::every_index_is_read_by_a_query` keeps it so.
DROP INDEX device_outcomes_request;
DROP INDEX upload_summaries_request;
"#,
    ),
];

/// Refuses a database whose schema is newer than this build knows (a downgrade).
pub(super) fn check_version(connection: &Connection) -> anyhow::Result<()> {
    let applied: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    anyhow::ensure!(
        usize::try_from(applied).unwrap_or(usize::MAX) <= MIGRATIONS.len(),
        "the database schema is version {applied}, newer than this build knows ({}): upgrade m2m-listener",
        MIGRATIONS.len()
    );
    Ok(())
}

/// Applies the migrations not yet recorded in `PRAGMA user_version`.
pub(super) fn migrate(connection: &mut Connection) -> rusqlite::Result<()> {
    let applied: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(usize::MAX);
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        match migration {
            Migration::Sql(sql) => transaction.execute_batch(sql)?,
            Migration::RewriteTable { table, old, new } => {
                rewrite_table_sql(&transaction, table, old, new)?;
            }
        }
        transaction.pragma_update(
            None,
            "user_version",
            i64::try_from(index + 1).unwrap_or(i64::MAX),
        )?;
        transaction.commit()?;
        tracing::info!(version = index + 1, "applied database migration");
    }
    Ok(())
}

/// Changes a table's definition where its rows do not depend on the change (a constraint they all
/// satisfy either way), the way SQLite documents for such changes: the `CREATE TABLE` text in
/// `sqlite_schema` is edited under `writable_schema` and the schema version bumped, so that every
/// connection reloads it. Inside the migration's transaction; checked before it commits.
fn rewrite_table_sql(
    connection: &Connection,
    table: &str,
    old: &str,
    new: &str,
) -> rusqlite::Result<()> {
    let sql: String = connection.query_row(
        "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
        [table],
        |row| row.get(0),
    )?;
    if !sql.contains(old) {
        return Err(migration_failure(format!(
            "the definition of table {table} does not hold the text this migration changes"
        )));
    }
    let version: i64 = connection.query_row("PRAGMA schema_version", [], |row| row.get(0))?;
    connection.pragma_update(None, "writable_schema", true)?;
    let rewritten = connection.execute(
        "UPDATE sqlite_schema SET sql = ?2 WHERE type = 'table' AND name = ?1",
        [table, &sql.replacen(old, new, 1)],
    );
    connection.pragma_update(None, "writable_schema", false)?;
    rewritten?;
    connection.pragma_update(None, "schema_version", version + 1)?;
    let check: String = connection.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
    if check != "ok" {
        return Err(migration_failure(format!(
            "the schema change to table {table} failed its integrity check: {check}"
        )));
    }
    Ok(())
}

fn migration_failure(message: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
        Some(message),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migrated() -> Connection {
        let mut connection = Connection::open_in_memory().unwrap();
        migrate(&mut connection).unwrap();
        connection
    }

    #[test]
    fn inserting_a_delivery_opens_no_ephemeral_table() {
        let connection = migrated();
        let mut explain = connection
            .prepare(&format!("EXPLAIN {}", super::super::write::INSERT_DELIVERY))
            .unwrap();
        let nulls = [rusqlite::types::Null; 21];
        let program: Vec<String> = explain
            .query_map(rusqlite::params_from_iter(nulls.iter()), |row| {
                row.get::<_, String>(1)
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            program.iter().any(|opcode| opcode == "Insert"),
            "{program:?}"
        );
        assert!(
            !program.iter().any(|opcode| opcode == "OpenEphemeral"),
            "{program:?}"
        );
    }

    #[test]
    fn the_result_check_still_refuses_what_it_refused() {
        let connection = migrated();
        let insert = |result: &str| {
            connection.execute(
                "INSERT INTO deliveries (received_at, dedup_key, result, size) VALUES ('t', x'00', ?1, 1)",
                [result],
            )
        };
        for result in ["stored", "duplicate", "quarantined"] {
            connection.execute("DELETE FROM deliveries", []).unwrap();
            insert(result).unwrap();
        }
        assert!(insert("lost").is_err());
        assert!(insert("").is_err());
    }

    #[test]
    fn a_rewrite_that_does_not_find_its_text_changes_nothing() {
        let connection = migrated();
        let before: String = connection
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE name = 'deliveries'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert!(rewrite_table_sql(&connection, "deliveries", "CHECK (nothing)", "x").is_err());
        let after: String = connection
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE name = 'deliveries'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(before, after);
    }
}
