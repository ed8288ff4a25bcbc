//! Retention: pruning old raw bodies. (Backups are PostgreSQL's own tools' work.)

use deadpool_postgres::Transaction;

use crate::storage::batch::PRUNE_CHUNK;

/// Deletes up to [`PRUNE_CHUNK`] raw bodies of stored deliveries received before `cutoff`.
/// Kept whatever their age: quarantined bodies (the only copy of what was sent) and bodies of
/// jobs still pending or in progress (they may need re-processing). Delivery rows, outcomes, device
/// messages (whose payload is then the only copy) and jobs are never pruned. Replicas pruning at once skip each other's rows. Returns how many
/// bodies were deleted.
pub(super) async fn prune_chunk(
    transaction: &Transaction<'_>,
    cutoff: &str,
) -> Result<usize, tokio_postgres::Error> {
    let statement = transaction
        .prepare_cached(
            "DELETE FROM raw_bodies WHERE delivery_id IN (
                 SELECT r.delivery_id
                 FROM raw_bodies r
                 JOIN deliveries d ON d.id = r.delivery_id
                 LEFT JOIN jobs j ON j.request_id = d.request_id
                 WHERE d.received_at < $1
                   AND d.result = 'stored'
                   AND (j.id IS NULL OR j.state NOT IN ('pending', 'in_progress'))
                 ORDER BY r.delivery_id
                 LIMIT $2
                 FOR UPDATE OF r SKIP LOCKED)",
        )
        .await?;
    let deleted = transaction
        .execute(&statement, &[&cutoff, &PRUNE_CHUNK])
        .await?;
    Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
}
