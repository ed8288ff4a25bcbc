//! The outbox on PostgreSQL: a batch's events in one `unnest` insert inside its transaction, and
//! the dispatchers' work, which several replicas share. Ids are not committed in id order here
//! (each transaction reserves its own), so events are fanned out to sinks by a flag, not a cursor:
//! a fan-out takes unflagged events `FOR UPDATE SKIP LOCKED`. A claim leases due deliveries the
//! same way, so two replicas never lease one event for the same attempt; a lease left by a
//! replica that died expires.

use deadpool_postgres::{GenericClient, Object, Transaction};
use tokio_postgres::Error;

use crate::storage::Page;
use crate::storage::events::{
    AttemptOutcome, AttemptRecord, ClaimedEvent, EventDetail, EventQuery, EventRecord, NewEvent,
    Next, SinkBacklog, SinkDeliveryRecord, SinkSpec, feed_page,
};
use crate::storage::jobs::{JobCompletion, finished_events};

/// How many new events one claim fans out.
const FAN_OUT: i64 = 1000;

/// Inserts a transaction's events (with the `job.finished` of what it finished), in one statement.
pub(super) async fn insert(
    transaction: &Transaction<'_>,
    record: bool,
    mut events: Vec<NewEvent>,
    completions: &[JobCompletion],
) -> Result<(), Error> {
    if !record {
        return Ok(());
    }
    events.extend(finished_events(completions).cloned());
    if events.is_empty() {
        return Ok(());
    }
    let mut kinds = Vec::with_capacity(events.len());
    let mut times = Vec::with_capacity(events.len());
    let mut data = Vec::with_capacity(events.len());
    for event in events {
        kinds.push(event.kind.as_str());
        times.push(event.created_at);
        data.push(event.data);
    }
    let statement = transaction
        .prepare_cached(
            "INSERT INTO events (type, created_at, data)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[])",
        )
        .await?;
    transaction
        .execute(&statement, &[&kinds, &times, &data])
        .await?;
    Ok(())
}

/// Makes the sinks known and takes the configured filters.
pub(super) async fn register_sinks(
    transaction: &Transaction<'_>,
    sinks: &[SinkSpec],
) -> Result<(), Error> {
    for sink in sinks {
        transaction
            .execute(
                "INSERT INTO event_sinks (name, types) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET types = excluded.types",
                &[&sink.name, &sink.types_text()],
            )
            .await?;
    }
    Ok(())
}

/// Fans out new events to every sink, then leases up to `limit` of this sink's due deliveries.
pub(super) async fn claim(
    transaction: &Transaction<'_>,
    sink: &SinkSpec,
    owner: &str,
    now: &str,
    lease_until: &str,
    limit: u32,
) -> Result<Vec<ClaimedEvent>, Error> {
    transaction
        .execute(
            "WITH fresh AS (
                 SELECT id, type, created_at FROM events WHERE NOT fanned_out
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED),
             fanned AS (
                 INSERT INTO event_deliveries (event_id, sink, state, next_attempt_at)
                 SELECT f.id, s.name, 'pending', f.created_at FROM fresh f JOIN event_sinks s
                   ON s.types IS NULL OR f.type = ANY (string_to_array(s.types, ','))
                 ON CONFLICT DO NOTHING)
             UPDATE events SET fanned_out = TRUE WHERE id IN (SELECT id FROM fresh)",
            &[&FAN_OUT],
        )
        .await?;
    let rows = transaction
        .query(
            "WITH due AS (
                 SELECT d.event_id FROM event_deliveries d
                 JOIN event_sinks s ON s.name = d.sink AND s.disabled_at IS NULL
                 WHERE d.sink = $1 AND d.state = 'pending' AND d.next_attempt_at <= $2
                   AND (d.lease_until IS NULL OR d.lease_until < $2)
                 ORDER BY d.next_attempt_at, d.event_id LIMIT $3
                 FOR UPDATE OF d SKIP LOCKED)
             UPDATE event_deliveries d SET attempts = d.attempts + 1, lease_owner = $4, lease_until = $5
             FROM due, events e
             WHERE d.sink = $1 AND d.event_id = due.event_id AND e.id = d.event_id
             RETURNING d.event_id, e.type, e.created_at, e.data, d.attempts, d.manual",
            &[&sink.name, &now, &i64::from(limit), &owner, &lease_until],
        )
        .await?;
    let mut claimed = rows
        .iter()
        .map(|row| {
            Ok(ClaimedEvent {
                row: row.try_get(0)?,
                kind: row.try_get(1)?,
                timestamp: row.try_get(2)?,
                data: row.try_get(3)?,
                attempt: row.try_get(4)?,
                manual: row.try_get(5)?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    claimed.sort_by_key(|event| event.row);
    Ok(claimed)
}

/// Records attempts and each event's new state, only where the lease is still this one's.
pub(super) async fn record(
    transaction: &Transaction<'_>,
    attempts: &[AttemptOutcome],
) -> Result<(), Error> {
    for attempt in attempts {
        let status = attempt.status.map(i32::from);
        transaction
            .execute(
                "INSERT INTO event_attempts (event_id, sink, attempt, attempted_at, status, latency_ms, result,
                     error, manual, replica)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
                &[
                    &attempt.row,
                    &attempt.sink,
                    &attempt.attempt,
                    &attempt.attempted_at,
                    &status,
                    &attempt.latency_ms,
                    &attempt.next.result(),
                    &attempt.error,
                    &attempt.manual,
                    &attempt.replica,
                ],
            )
            .await?;
        let next_at = match &attempt.next {
            Next::RetryAt(at) => Some(at.as_str()),
            _ => None,
        };
        let delivered_at = (attempt.next == Next::Delivered).then_some(&attempt.attempted_at);
        transaction
            .execute(
                "UPDATE event_deliveries SET state = $5, next_attempt_at = coalesce($6, next_attempt_at),
                     delivered_at = $7, last_error = $8, manual = FALSE, lease_owner = NULL, lease_until = NULL
                 WHERE event_id = $1 AND sink = $2 AND lease_owner = $3 AND attempts = $4",
                &[
                    &attempt.row,
                    &attempt.sink,
                    &attempt.replica,
                    &attempt.attempt,
                    &attempt.next.state(),
                    &next_at,
                    &delivered_at,
                    &attempt.error,
                ],
            )
            .await?;
        if attempt.next == Next::Disabled {
            transaction
                .execute(
                    "UPDATE event_sinks SET disabled_at = coalesce(disabled_at, $2),
                         disabled_reason = coalesce(disabled_reason, '410 Gone') WHERE name = $1",
                    &[&attempt.sink, &attempt.attempted_at],
                )
                .await?;
        }
    }
    Ok(())
}

/// As SQLite's: the event again at every sink it went to, disabled sinks enabled.
pub(super) async fn redeliver(
    transaction: &Transaction<'_>,
    row: i64,
    now: &str,
) -> Result<Option<Vec<String>>, Error> {
    if transaction
        .query_opt("SELECT id FROM events WHERE id = $1", &[&row])
        .await?
        .is_none()
    {
        return Ok(None);
    }
    let sinks: Vec<String> = transaction
        .query(
            "UPDATE event_deliveries SET state = 'pending', manual = TRUE, next_attempt_at = $2,
                 lease_owner = NULL, lease_until = NULL
             WHERE event_id = $1 RETURNING sink",
            &[&row, &now],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, Error>>()?;
    for sink in &sinks {
        let changed = transaction
            .execute(
                "UPDATE event_sinks SET disabled_at = NULL, disabled_reason = NULL
                 WHERE name = $1 AND disabled_at IS NOT NULL",
                &[sink],
            )
            .await?;
        if changed > 0 {
            transaction
                .execute(
                    "UPDATE event_deliveries SET state = 'pending' WHERE sink = $1 AND state = 'disabled'",
                    &[sink],
                )
                .await?;
        }
    }
    let mut sinks = sinks;
    sinks.sort();
    Ok(Some(sinks))
}

/// Deletes one chunk of events created before `cutoff` with their deliveries and attempts.
pub(super) async fn prune(transaction: &Transaction<'_>, cutoff: &str) -> Result<usize, Error> {
    let chunk = crate::storage::batch::PRUNE_CHUNK;
    let ids: Vec<i64> = transaction
        .query(
            "SELECT id FROM events WHERE created_at < $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
            &[&cutoff, &chunk],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, Error>>()?;
    if ids.is_empty() {
        return Ok(0);
    }
    transaction
        .execute(
            "DELETE FROM event_attempts WHERE event_id = ANY($1)",
            &[&ids],
        )
        .await?;
    transaction
        .execute(
            "DELETE FROM event_deliveries WHERE event_id = ANY($1)",
            &[&ids],
        )
        .await?;
    let deleted = transaction
        .execute("DELETE FROM events WHERE id = ANY($1)", &[&ids])
        .await?;
    Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
}

fn event_from_row(row: &tokio_postgres::Row) -> Result<EventRecord, Error> {
    let data: String = row.try_get(3)?;
    Ok(EventRecord::new(
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        &data,
    ))
}

pub(super) async fn list(client: &Object, query: &EventQuery) -> Result<Page<EventRecord>, Error> {
    let limit = i64::from(query.limit.max(1));
    let kind = query.kind.map(|kind| kind.as_str());
    let statement = client
        .prepare_cached(
            "SELECT id, type, created_at, data FROM events
             WHERE id > $1 AND ($2::text IS NULL OR type = $2) ORDER BY id LIMIT $3",
        )
        .await?;
    let items = client
        .query(
            &statement,
            &[&query.after.unwrap_or(0), &kind, &(limit + 1)],
        )
        .await?
        .iter()
        .map(event_from_row)
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(feed_page(items, limit))
}

pub(super) async fn detail(client: &Object, row: i64) -> Result<Option<EventDetail>, Error> {
    let Some(event) = client
        .query_opt(
            "SELECT id, type, created_at, data FROM events WHERE id = $1",
            &[&row],
        )
        .await?
    else {
        return Ok(None);
    };
    let event = event_from_row(&event)?;
    let deliveries = client
        .query(
            "SELECT sink, state, attempts, next_attempt_at, delivered_at, last_error
             FROM event_deliveries WHERE event_id = $1 ORDER BY sink",
            &[&row],
        )
        .await?
        .iter()
        .map(|row| {
            let state: String = row.try_get(1)?;
            Ok(SinkDeliveryRecord {
                sink: row.try_get(0)?,
                next_attempt_at: if state == "pending" {
                    row.try_get(3)?
                } else {
                    None
                },
                state,
                attempts: row.try_get(2)?,
                delivered_at: row.try_get(4)?,
                last_error: row.try_get(5)?,
            })
        })
        .collect::<Result<_, Error>>()?;
    let attempts = client
        .query(
            "SELECT sink, attempt, attempted_at, status, latency_ms, result, error, manual, replica
             FROM event_attempts WHERE event_id = $1 ORDER BY id",
            &[&row],
        )
        .await?
        .iter()
        .map(|row| {
            let status: Option<i32> = row.try_get(3)?;
            Ok(AttemptRecord {
                sink: row.try_get(0)?,
                attempt: row.try_get(1)?,
                attempted_at: row.try_get(2)?,
                status: status.map(i64::from),
                latency_ms: row.try_get(4)?,
                result: row.try_get(5)?,
                error: row.try_get(6)?,
                manual: row.try_get(7)?,
                replica: row.try_get(8)?,
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(Some(EventDetail {
        event,
        deliveries,
        attempts,
    }))
}

pub(super) async fn backlog(client: &Object) -> Result<Vec<SinkBacklog>, Error> {
    client
        .query(
            "SELECT s.name,
                 (SELECT count(*) FROM event_deliveries d WHERE d.sink = s.name AND d.state IN ('pending', 'disabled'))
                   + (SELECT count(*) FROM events e WHERE NOT e.fanned_out),
                 (SELECT min(e.created_at) FROM events e WHERE e.id IN (
                     SELECT d.event_id FROM event_deliveries d WHERE d.sink = s.name AND d.state IN ('pending', 'disabled')
                     UNION ALL SELECT e2.id FROM events e2 WHERE NOT e2.fanned_out)),
                 (SELECT count(*) FROM event_deliveries d WHERE d.sink = s.name AND d.state = 'dead')
             FROM event_sinks s ORDER BY s.name",
            &[],
        )
        .await?
        .iter()
        .map(|row| {
            Ok(SinkBacklog {
                sink: row.try_get(0)?,
                pending: row.try_get(1)?,
                oldest: row.try_get(2)?,
                dead: row.try_get(3)?,
            })
        })
        .collect()
}
