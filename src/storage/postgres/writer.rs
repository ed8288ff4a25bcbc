//! The writer tasks: each takes every delivery queued since its last commit and writes them in
//! one transaction (group commit), run again on a deadlock or serialization failure, and written
//! again one delivery at a time when one of them fails on its own; the batch is then settled
//! (see [`crate::storage::batch`]).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::connection::Shared;
use super::error::{DatabaseError, Failure, RETRIES, is_retryable};
use super::write;
use crate::storage::batch::{self, Write, Written};
use crate::storage::{NewDelivery, StoreError};

/// Concurrent write transactions per replica. Each commits a whole batch; two keep one batch
/// being written while the next is collected.
pub(super) const WRITERS: usize = 2;

/// Runs one writer until the queue is closed and drained.
pub(super) async fn run(
    shared: Arc<Shared>,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Write>>>,
) {
    loop {
        let writes = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                break;
            };
            batch::gather(
                first,
                shared.max_batch,
                |write| write.delivery.weight(),
                || queue.try_recv().ok(),
            )
        };
        commit_batch(&shared, writes).await;
    }
    tracing::debug!("PostgreSQL writer stopped");
}

async fn commit_batch(shared: &Shared, writes: Vec<Write>) {
    let started = Instant::now();
    let (deliveries, replies) = batch::split(writes);
    let deliveries: Vec<&NewDelivery> = deliveries.iter().collect();
    let written = match write(shared, &deliveries).await {
        Err(failure)
            if batch::isolates(
                matches!(failure, StoreError::Internal(_)),
                deliveries.len().saturating_sub(1),
            ) =>
        {
            tracing::debug!(error = %crate::telemetry::ErrorChain(&failure), "a delivery failed; writing the batch one delivery at a time");
            Ok(one_at_a_time(shared, &deliveries).await)
        }
        written => written,
    };
    batch::settle(
        replies,
        written,
        &mut shared.memory(),
        &shared.metrics,
        started,
    );
}

/// Each delivery in a transaction of its own, so that only the one at fault is refused. Once the
/// database is away, the rest are answered with the same failure at once.
async fn one_at_a_time(shared: &Shared, deliveries: &[&NewDelivery]) -> Written {
    let mut all = Written {
        results: Vec::with_capacity(deliveries.len()),
        completions: Vec::new(),
    };
    let mut outage: Option<StoreError> = None;
    for delivery in deliveries {
        if let Some(failure) = &outage {
            all.results.push(Err(failure.clone()));
            continue;
        }
        match write(shared, std::slice::from_ref(delivery)).await {
            Ok(mut written) => {
                all.results.append(&mut written.results);
                all.completions.append(&mut written.completions);
            }
            Err(failure) => {
                if matches!(failure, StoreError::Unavailable(_)) {
                    outage = Some(failure.clone());
                }
                all.results.push(Err(failure));
            }
        }
    }
    all
}

/// Writes `deliveries` in one transaction; run again on deadlock or serialization failure.
async fn write(shared: &Shared, deliveries: &[&NewDelivery]) -> Result<Written, StoreError> {
    let mut client = shared.client().await?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match write::write_batch(
            &mut client,
            deliveries,
            shared.job_timeout,
            shared.record_events,
        )
        .await
        {
            Err(Failure::Db(error)) if is_retryable(&error) && attempt < RETRIES => {
                tracing::debug!(error = %DatabaseError::from(error), "batch conflicted with another replica; retrying");
            }
            Ok((receipts, completions)) => {
                return Ok(Written {
                    results: receipts.into_iter().map(Ok).collect(),
                    completions,
                });
            }
            Err(failure) => return Err(failure.into_store_error()),
        }
    }
}
