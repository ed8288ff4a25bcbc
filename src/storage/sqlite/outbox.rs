//! The outbox on SQLite: events inserted in the writer's transaction (one cached statement, one
//! narrow row), and the dispatchers' claims and attempts, on the writer thread too (it is the
//! only writer). A sink's events are fanned out by a cursor: the writer commits in id order, so
//! every event below the cursor was seen.

use rusqlite::{Connection, OptionalExtension, params};

use super::bind::Value;
use super::connection::Statements;
use crate::storage::Page;
use crate::storage::events::{
    AttemptOutcome, AttemptRecord, ClaimedEvent, EventDetail, EventQuery, EventRecord, NewEvent,
    Next, SinkBacklog, SinkDeliveryRecord, SinkSpec,
};

/// How many new events one claim fans out to a sink.
const FAN_OUT: i64 = 1000;

/// Inserts an event; `build` runs only when events are recorded.
pub(super) fn insert(
    connection: &Statements<'_>,
    record: bool,
    build: impl FnOnce() -> NewEvent,
) -> rusqlite::Result<()> {
    if !record {
        return Ok(());
    }
    let event = build();
    connection.execute(
        "INSERT INTO events (type, created_at, data) VALUES (?1, ?2, ?3)",
        &[
            Value::Text(event.kind.as_str()),
            Value::Text(&event.created_at),
            Value::Text(&event.data),
        ],
    )?;
    Ok(())
}

/// Inserts the `job.finished` events of what a transaction finished.
pub(super) fn insert_finished(
    connection: &Statements<'_>,
    record: bool,
    completions: &[crate::storage::jobs::JobCompletion],
) -> rusqlite::Result<()> {
    for event in crate::storage::jobs::finished_events(completions) {
        insert(connection, record, || event.clone())?;
    }
    Ok(())
}

/// Registers the configured sinks: a new one starts after the newest event (it is sent what
/// happens from now on); a known one keeps its cursor and takes the configured filter. Leases are
/// cleared: one process owns a SQLite file, so none is held by a live dispatcher now.
pub(super) fn register_sinks(connection: &Connection, sinks: &[SinkSpec]) -> rusqlite::Result<()> {
    let newest: i64 =
        connection.query_row("SELECT coalesce(max(id), 0) FROM events", [], |row| {
            row.get(0)
        })?;
    for sink in sinks {
        connection
            .prepare_cached(
                "INSERT INTO event_sinks (name, cursor, types) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET types = excluded.types",
            )?
            .execute(params![sink.name, newest, sink.types_text()])?;
    }
    connection.execute(
        "UPDATE event_deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL",
        [],
    )?;
    Ok(())
}

/// Fans out the sink's new events, then leases up to `limit` due ones to `owner` until
/// `lease_until`, each attempt numbered. Nothing for a disabled or unknown sink.
pub(super) fn claim(
    connection: &Connection,
    sink: &SinkSpec,
    owner: &str,
    now: &str,
    lease_until: &str,
    limit: u32,
) -> rusqlite::Result<Vec<ClaimedEvent>> {
    let state: Option<(i64, Option<String>)> = connection
        .prepare_cached("SELECT cursor, disabled_at FROM event_sinks WHERE name = ?1")?
        .query_row([&sink.name], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((cursor, None)) = state else {
        return Ok(Vec::new());
    };
    let fresh: Vec<(i64, String, String)> = connection
        .prepare_cached(
            "SELECT id, type, created_at FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?
        .query_map(params![cursor, FAN_OUT], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    if let Some((last, _, _)) = fresh.last() {
        let mut insert = connection.prepare_cached(
            "INSERT INTO event_deliveries (event_id, sink, state, next_attempt_at) VALUES (?1, ?2, 'pending', ?3)
             ON CONFLICT DO NOTHING",
        )?;
        for (id, kind, created_at) in &fresh {
            if sink.wants(kind) {
                insert.execute(params![id, sink.name, created_at])?;
            }
        }
        connection
            .prepare_cached("UPDATE event_sinks SET cursor = ?2 WHERE name = ?1")?
            .execute(params![sink.name, last])?;
    }
    let due: Vec<ClaimedEvent> = connection
        .prepare_cached(
            "SELECT d.event_id, e.type, e.created_at, e.data, d.attempts + 1, d.manual
             FROM event_deliveries d JOIN events e ON e.id = d.event_id
             WHERE d.sink = ?1 AND d.state = 'pending' AND d.next_attempt_at <= ?2
               AND (d.lease_until IS NULL OR d.lease_until < ?2)
             ORDER BY d.next_attempt_at, d.event_id LIMIT ?3",
        )?
        .query_map(params![sink.name, now, limit], |row| {
            Ok(ClaimedEvent {
                row: row.get(0)?,
                kind: row.get(1)?,
                timestamp: row.get(2)?,
                data: row.get(3)?,
                attempt: row.get(4)?,
                manual: row.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut lease = connection.prepare_cached(
        "UPDATE event_deliveries SET attempts = ?3, lease_owner = ?4, lease_until = ?5
         WHERE event_id = ?1 AND sink = ?2",
    )?;
    for event in &due {
        lease.execute(params![
            event.row,
            sink.name,
            event.attempt,
            owner,
            lease_until
        ])?;
    }
    Ok(due)
}

/// Records attempts and what became of each event at its sink. An attempt whose lease another
/// dispatcher took over meanwhile is recorded, but leaves the event's state to that one.
pub(super) fn record(connection: &Connection, attempts: &[AttemptOutcome]) -> rusqlite::Result<()> {
    for attempt in attempts {
        connection
            .prepare_cached(
                "INSERT INTO event_attempts (event_id, sink, attempt, attempted_at, status, latency_ms, result,
                     error, manual, replica)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT DO NOTHING",
            )?
            .execute(params![
                attempt.row,
                attempt.sink,
                attempt.attempt,
                attempt.attempted_at,
                attempt.status,
                attempt.latency_ms,
                attempt.next.result(),
                attempt.error,
                attempt.manual,
                attempt.replica,
            ])?;
        let next_at = match &attempt.next {
            Next::RetryAt(at) => Some(at.as_str()),
            _ => None,
        };
        let delivered_at = (attempt.next == Next::Delivered).then_some(&attempt.attempted_at);
        connection
            .prepare_cached(
                "UPDATE event_deliveries SET state = ?5, next_attempt_at = coalesce(?6, next_attempt_at),
                     delivered_at = ?7, last_error = ?8, manual = 0, lease_owner = NULL, lease_until = NULL
                 WHERE event_id = ?1 AND sink = ?2 AND lease_owner = ?3 AND attempts = ?4",
            )?
            .execute(params![
                attempt.row,
                attempt.sink,
                attempt.replica,
                attempt.attempt,
                attempt.next.state(),
                next_at,
                delivered_at,
                attempt.error,
            ])?;
        if attempt.next == Next::Disabled {
            connection
                .prepare_cached(
                    "UPDATE event_sinks SET disabled_at = coalesce(disabled_at, ?2),
                         disabled_reason = coalesce(disabled_reason, '410 Gone') WHERE name = ?1",
                )?
                .execute(params![attempt.sink, attempt.attempted_at])?;
        }
    }
    Ok(())
}

/// Schedules an event again at every sink it was fanned out to (a manual attempt, recorded as
/// such); a sink the endpoint had disabled is enabled again: the operator asked to send there.
/// Returns the sinks, or `None` for an unknown event.
pub(super) fn redeliver(
    connection: &Connection,
    row: i64,
    now: &str,
) -> rusqlite::Result<Option<Vec<String>>> {
    let known: Option<i64> = connection
        .query_row("SELECT id FROM events WHERE id = ?1", [row], |row| {
            row.get(0)
        })
        .optional()?;
    if known.is_none() {
        return Ok(None);
    }
    let sinks: Vec<String> = connection
        .prepare_cached("SELECT sink FROM event_deliveries WHERE event_id = ?1 ORDER BY sink")?
        .query_map([row], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    connection.execute(
        "UPDATE event_deliveries SET state = 'pending', manual = 1, next_attempt_at = ?2,
             lease_owner = NULL, lease_until = NULL
         WHERE event_id = ?1",
        params![row, now],
    )?;
    for sink in &sinks {
        enable(connection, sink)?;
    }
    Ok(Some(sinks))
}

/// Enables a sink an endpoint disabled: its disabled events are pending again.
fn enable(connection: &Connection, sink: &str) -> rusqlite::Result<()> {
    let changed = connection.execute(
        "UPDATE event_sinks SET disabled_at = NULL, disabled_reason = NULL
         WHERE name = ?1 AND disabled_at IS NOT NULL",
        [sink],
    )?;
    if changed > 0 {
        connection.execute(
            "UPDATE event_deliveries SET state = 'pending' WHERE sink = ?1 AND state = 'disabled'",
            [sink],
        )?;
    }
    Ok(())
}

/// Deletes events created before `cutoff` with their deliveries and attempts, except the newest
/// event (so that no id is handed out again).
pub(super) fn prune(connection: &Connection, cutoff: &str) -> rusqlite::Result<usize> {
    let ids = "SELECT id FROM events WHERE created_at < ?1 AND id < (SELECT max(id) FROM events)
               ORDER BY id LIMIT ?2";
    let chunk = crate::storage::batch::PRUNE_CHUNK;
    connection.execute(
        &format!("DELETE FROM event_attempts WHERE event_id IN ({ids})"),
        params![cutoff, chunk],
    )?;
    connection.execute(
        &format!("DELETE FROM event_deliveries WHERE event_id IN ({ids})"),
        params![cutoff, chunk],
    )?;
    connection.execute(
        &format!("DELETE FROM events WHERE id IN ({ids})"),
        params![cutoff, chunk],
    )
}

/// The feed: events after a row, oldest first.
pub(super) fn list(
    connection: &Connection,
    query: &EventQuery,
) -> rusqlite::Result<Page<EventRecord>> {
    let limit = i64::from(query.limit.max(1));
    let items: Vec<EventRecord> = connection
        .prepare_cached(
            "SELECT id, type, created_at, data FROM events
             WHERE id > ?1 AND (?2 IS NULL OR type = ?2) ORDER BY id LIMIT ?3",
        )?
        .query_map(
            params![
                query.after.unwrap_or(0),
                query.kind.map(|kind| kind.as_str()),
                limit + 1
            ],
            |row| {
                let data: String = row.get(3)?;
                Ok(EventRecord::new(
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    &data,
                ))
            },
        )?
        .collect::<rusqlite::Result<_>>()?;
    Ok(crate::storage::events::feed_page(items, limit))
}

/// One event, where it stands at each sink, and every attempt.
pub(super) fn detail(connection: &Connection, row: i64) -> rusqlite::Result<Option<EventDetail>> {
    let event = connection
        .prepare_cached("SELECT id, type, created_at, data FROM events WHERE id = ?1")?
        .query_row([row], |row| {
            let data: String = row.get(3)?;
            Ok(EventRecord::new(
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                &data,
            ))
        })
        .optional()?;
    let Some(event) = event else {
        return Ok(None);
    };
    let deliveries = connection
        .prepare_cached(
            "SELECT sink, state, attempts, next_attempt_at, delivered_at, last_error
             FROM event_deliveries WHERE event_id = ?1 ORDER BY sink",
        )?
        .query_map([row], |row| {
            let state: String = row.get(1)?;
            Ok(SinkDeliveryRecord {
                sink: row.get(0)?,
                next_attempt_at: if state == "pending" {
                    row.get(3)?
                } else {
                    None
                },
                state,
                attempts: row.get(2)?,
                delivered_at: row.get(4)?,
                last_error: row.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let attempts = connection
        .prepare_cached(
            "SELECT sink, attempt, attempted_at, status, latency_ms, result, error, manual, replica
             FROM event_attempts WHERE event_id = ?1 ORDER BY id",
        )?
        .query_map([row], |row| {
            Ok(AttemptRecord {
                sink: row.get(0)?,
                attempt: row.get(1)?,
                attempted_at: row.get(2)?,
                status: row.get(3)?,
                latency_ms: row.get(4)?,
                result: row.get(5)?,
                error: row.get(6)?,
                manual: row.get(7)?,
                replica: row.get(8)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(Some(EventDetail {
        event,
        deliveries,
        attempts,
    }))
}

/// Per sink: events not delivered yet (pending, or not yet fanned out) and the oldest one's time;
/// dead-lettered events are counted apart.
pub(super) fn backlog(connection: &Connection) -> rusqlite::Result<Vec<SinkBacklog>> {
    connection
        .prepare_cached(
            "SELECT s.name,
                 (SELECT count(*) FROM event_deliveries d WHERE d.sink = s.name AND d.state IN ('pending', 'disabled'))
                   + (SELECT count(*) FROM events e WHERE e.id > s.cursor),
                 (SELECT min(e.created_at) FROM events e WHERE e.id IN (
                     SELECT d.event_id FROM event_deliveries d WHERE d.sink = s.name AND d.state IN ('pending', 'disabled')
                     UNION ALL SELECT min(e2.id) FROM events e2 WHERE e2.id > s.cursor)),
                 (SELECT count(*) FROM event_deliveries d WHERE d.sink = s.name AND d.state = 'dead')
             FROM event_sinks s ORDER BY s.name",
        )?
        .query_map([], |row| {
            Ok(SinkBacklog {
                sink: row.get(0)?,
                pending: row.get(1)?,
                oldest: row.get(2)?,
                dead: row.get(3)?,
            })
        })?
        .collect()
}
