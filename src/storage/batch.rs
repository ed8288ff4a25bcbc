//! Group commit, the part that is not SQL: what a writer gathers into one batch, how the
//! re-deliveries inside a batch are planned, when a failed batch is written again one delivery
//! at a time, and how it is settled: every submitter answered, the commit counted, and what
//! readiness remembers of a failure. Both backends' writers run on this; nothing here does IO.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::jobs::{JobCompletion, observe_completions};
use super::{DeliveryContent, DeliveryResult, Fault, NewDelivery, Receipt, StoreError};
use crate::metrics::Metrics;

/// Queued writes waiting for a writer; submitters wait (back-pressure) beyond this.
pub(crate) const WRITE_QUEUE: usize = 4096;
/// Readiness stays false this long after deliveries failed to commit, unless one commits since: a
/// probe row can still fit on a disk too full for a real callback. Bounded, so that readiness does
/// not stay false forever when traffic stops because of it.
pub(crate) const FAILURE_MEMORY: Duration = Duration::from_secs(30);
/// Raw bodies deleted per transaction, so that pruning never holds a writer for long.
pub(crate) const PRUNE_CHUNK: i64 = 2_000;
/// A batch stops growing past this many body bytes or outcomes (besides `storage.max_batch`):
/// a transaction stays bounded, and PostgreSQL's one statement for all of a batch's bodies stays
/// under the protocol's 1 GiB message.
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;
const MAX_BATCH_OUTCOMES: usize = 100_000;

/// Where a writer sends a delivery's receipt once its batch has committed (or failed).
pub(crate) type ReceiptSender = oneshot::Sender<Result<Receipt, StoreError>>;

/// One queued delivery and where its receipt goes.
pub(crate) struct Write {
    pub delivery: Box<NewDelivery>,
    pub reply: ReceiptSender,
}

/// The deliveries of a batch, and apart from them where each one's receipt goes.
pub(crate) fn split(writes: Vec<Write>) -> (Vec<NewDelivery>, Vec<ReceiptSender>) {
    writes
        .into_iter()
        .map(|write| (*write.delivery, write.reply))
        .unzip()
}

/// What an item takes of a batch's room: body bytes and device outcomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Weight {
    pub bytes: usize,
    pub outcomes: usize,
}

impl NewDelivery {
    pub(crate) fn weight(&self) -> Weight {
        Weight {
            bytes: self.body.len(),
            outcomes: self.content.outcome_count(),
        }
    }
}

/// A batch: `first`, then what `next` has ready at once, until `max_batch` items,
/// [`MAX_BATCH_BYTES`] or [`MAX_BATCH_OUTCOMES`] are reached (the item that reaches them is in).
pub(crate) fn gather<T>(
    first: T,
    max_batch: usize,
    weight: impl Fn(&T) -> Weight,
    mut next: impl FnMut() -> Option<T>,
) -> Vec<T> {
    let mut taken = weight(&first);
    let mut batch = vec![first];
    while batch.len() < max_batch
        && taken.bytes < MAX_BATCH_BYTES
        && taken.outcomes < MAX_BATCH_OUTCOMES
    {
        let Some(item) = next() else {
            break;
        };
        let more = weight(&item);
        taken.bytes += more.bytes;
        taken.outcomes += more.outcomes;
        batch.push(item);
    }
    batch
}

/// What became of one delivery of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    /// The first delivery of its message (stored or quarantined).
    First,
    /// A re-delivery of the message stored as `original`.
    Duplicate { original: i64 },
}

impl Fate {
    /// The receipt of the delivery stored as `delivery_id`.
    pub fn receipt(self, delivery_id: i64, content: &DeliveryContent) -> Receipt {
        match self {
            Fate::First => Receipt {
                delivery_id,
                result: content.first_result(),
                duplicate_of: None,
                job_operation: None,
            },
            Fate::Duplicate { original } => Receipt {
                delivery_id,
                result: DeliveryResult::Duplicate,
                duplicate_of: Some(original),
                job_operation: None,
            },
        }
    }
}

/// The re-deliveries inside one batch, planned before any insert: the first delivery of each
/// message in the batch is its candidate to be stored; the later ones are re-deliveries of it.
pub(crate) struct DedupPlan {
    /// For each delivery, the earlier one of the batch with the same message, if any.
    earlier: Vec<Option<usize>>,
    /// The candidates, in message (dedup-key) order: the order they are inserted in, which is
    /// the order their rows are locked in by every writer.
    candidates: Vec<usize>,
}

impl DedupPlan {
    pub fn new(deliveries: &[&NewDelivery]) -> Self {
        let mut first_in_batch: HashMap<&[u8; 32], usize> = HashMap::new();
        let mut earlier = Vec::with_capacity(deliveries.len());
        for (index, delivery) in deliveries.iter().enumerate() {
            let key = delivery.content.dedup_key();
            earlier.push(first_in_batch.get(key).copied());
            first_in_batch.entry(key).or_insert(index);
        }
        let mut candidates: Vec<usize> = (0..deliveries.len())
            .filter(|index| earlier[*index].is_none())
            .collect();
        candidates.sort_by_key(|index| deliveries[*index].content.dedup_key());
        Self {
            earlier,
            candidates,
        }
    }

    pub fn candidates(&self) -> &[usize] {
        &self.candidates
    }

    /// Each delivery's fate once the candidates were inserted: `ids` are the deliveries' ids,
    /// `inserted(id)` whether a candidate's insert went in, `stored_before(index)` the original of
    /// a candidate whose message was stored before this batch. `None` if such an original is
    /// missing (a defect: deliveries are never deleted).
    pub fn fates(
        &self,
        ids: &[i64],
        inserted: impl Fn(i64) -> bool,
        stored_before: impl Fn(usize) -> Option<i64>,
    ) -> Option<Vec<Fate>> {
        self.earlier
            .iter()
            .enumerate()
            .map(|(index, earlier)| {
                let first = earlier.unwrap_or(index);
                if inserted(ids[first]) {
                    Some(if first == index {
                        Fate::First
                    } else {
                        Fate::Duplicate {
                            original: ids[first],
                        }
                    })
                } else {
                    stored_before(first).map(|original| Fate::Duplicate { original })
                }
            })
            .collect()
    }
}

/// Whether a batch that failed is written again one delivery at a time (each in a savepoint, or
/// a transaction, of its own): only when the failure was one delivery's own (`own_fault`: a
/// defect, what [`StoreError::Internal`] reports), not the store's, and it would otherwise take
/// `others` down with it.
pub(crate) fn isolates(own_fault: bool, others: usize) -> bool {
    own_fault && others > 0
}

/// When deliveries last failed to commit because the store could not take them, and why: what
/// readiness answers for [`FAILURE_MEMORY`], unless a delivery commits since.
#[derive(Default)]
pub(crate) struct FailureMemory {
    last: Option<(Instant, Arc<dyn std::error::Error + Send + Sync>)>,
}

impl FailureMemory {
    /// A committed delivery clears the memory; one the store could not take (unavailable) is
    /// remembered. Busy rows and a delivery's own defect say nothing about the store.
    pub fn learn(&mut self, result: &Result<Receipt, StoreError>, now: Instant) {
        match result {
            Ok(_) => self.last = None,
            Err(StoreError::Unavailable(cause)) => self.last = Some((now, Arc::clone(cause))),
            Err(_) => {}
        }
    }

    /// Readiness as of `now`: not ready while a recent failure is remembered.
    pub fn readiness(&self, now: Instant) -> Result<(), StoreError> {
        match &self.last {
            Some((at, cause)) if now.saturating_duration_since(*at) < FAILURE_MEMORY => {
                Err(StoreError::Unavailable(Arc::new(Fault::caused_by_shared(
                    "the last delivery failed to commit",
                    Arc::clone(cause),
                ))))
            }
            _ => Ok(()),
        }
    }
}

/// What a writer did with a batch that committed: one result per delivery, in order (a delivery
/// written on its own after the batch failed may have failed), and the jobs it completed.
pub(crate) struct Written {
    pub results: Vec<Result<Receipt, StoreError>>,
    pub completions: Vec<JobCompletion>,
}

/// Settles a batch: answers each submitter, in order, with its delivery's result (every one with
/// the batch's failure if nothing committed), and records what the batch did: the commit's time
/// and size (when a delivery of it committed), the jobs it completed, and what readiness must
/// remember. Logs nothing: each submitter's edge logs its failure, once.
pub(crate) fn settle(
    replies: Vec<ReceiptSender>,
    written: Result<Written, StoreError>,
    memory: &mut FailureMemory,
    metrics: &Metrics,
    started: Instant,
) {
    let now = Instant::now();
    let deliveries = replies.len();
    let results = match written {
        Ok(Written {
            results,
            completions,
        }) => {
            if results.iter().any(Result::is_ok) {
                metrics.store_committed(started.elapsed().as_secs_f64(), deliveries);
            }
            observe_completions(metrics, &completions);
            results
        }
        Err(failure) => vec![Err(failure); deliveries],
    };
    // One result per delivery; a writer that returned fewer has a defect, and says so.
    let results = results.into_iter().chain(std::iter::repeat_with(|| {
        Err(StoreError::internal(
            "the writer returned no result for this delivery",
        ))
    }));
    for (reply, result) in replies.into_iter().zip(results) {
        memory.learn(&result, now);
        let _ = reply.send(result);
    }
}

/// Prunes chunk by chunk (each `chunk` one transaction, deleting up to [`PRUNE_CHUNK`]) until a
/// chunk comes back short; returns how many were deleted in all.
pub(crate) async fn prune_in_chunks<F>(mut chunk: impl FnMut() -> F) -> Result<usize, StoreError>
where
    F: Future<Output = Result<usize, StoreError>>,
{
    let mut total = 0;
    loop {
        let deleted = chunk().await?;
        total += deleted;
        if deleted < usize::try_from(PRUNE_CHUNK).unwrap_or(usize::MAX) {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::UnreadableBody;
    use bytes::Bytes;
    use time::OffsetDateTime;

    fn delivery(key: u8, body_bytes: usize) -> NewDelivery {
        NewDelivery {
            received_at: OffsetDateTime::UNIX_EPOCH,
            body: Bytes::from(vec![b'x'; body_bytes]),
            content_type: None,
            source_address: None,
            account: None,
            content: DeliveryContent::Quarantined(Box::new(UnreadableBody {
                reason: "not a callback".to_owned(),
                json: false,
                request_id: None,
                callback_count: None,
                dedup_key: [key; 32],
            })),
            prepared: Default::default(),
        }
    }

    fn receipt(delivery_id: i64) -> Receipt {
        Receipt {
            delivery_id,
            result: DeliveryResult::Stored,
            duplicate_of: None,
            job_operation: None,
        }
    }

    fn unavailable() -> StoreError {
        StoreError::Unavailable(Arc::new(Fault::new("the disk is full")))
    }

    #[test]
    fn a_batch_takes_what_is_ready_up_to_its_limit() {
        let mut queue = vec![2, 3, 4, 5].into_iter();
        let weight = |_: &i32| Weight::default();
        assert_eq!(gather(1, 3, weight, || queue.next()), [1, 2, 3]);
        assert_eq!(gather(9, 3, weight, || None), [9]);
    }

    #[test]
    fn a_batch_stops_growing_at_its_bytes_or_outcomes() {
        let big = Weight {
            bytes: MAX_BATCH_BYTES / 2,
            outcomes: 0,
        };
        let mut queue = std::iter::repeat(big);
        let batch = gather(big, 100, |weight| *weight, || queue.next());
        assert_eq!(batch.len(), 2, "the item that reaches the limit is in");
        let many = Weight {
            bytes: 0,
            outcomes: MAX_BATCH_OUTCOMES,
        };
        let mut queue = std::iter::repeat(big);
        assert_eq!(
            gather(many, 100, |weight| *weight, || queue.next()).len(),
            1
        );
    }

    #[test]
    fn the_plan_inserts_each_message_once_in_key_order_and_the_rest_are_its_duplicates() {
        let deliveries = [
            delivery(9, 1),
            delivery(2, 1),
            delivery(9, 1),
            delivery(5, 1),
        ];
        let deliveries: Vec<&NewDelivery> = deliveries.iter().collect();
        let plan = DedupPlan::new(&deliveries);
        assert_eq!(plan.candidates(), [1, 3, 0], "by dedup key");

        let ids = [10, 11, 12, 13];
        // Message 5 was stored before this batch, as delivery 7.
        let fates = plan.fates(&ids, |id| id != 13, |index| (index == 3).then_some(7));
        assert_eq!(
            fates,
            Some(vec![
                Fate::First,
                Fate::First,
                Fate::Duplicate { original: 10 },
                Fate::Duplicate { original: 7 },
            ])
        );
        // An original that cannot be found again is a defect.
        assert_eq!(plan.fates(&ids, |_| false, |_| None), None);
    }

    #[test]
    fn a_first_delivery_is_stored_or_quarantined_and_a_re_delivery_points_at_the_first() {
        let quarantined = delivery(1, 1);
        assert_eq!(
            Fate::First.receipt(4, &quarantined.content).result,
            DeliveryResult::Quarantined
        );
        let duplicate = Fate::Duplicate { original: 3 }.receipt(4, &quarantined.content);
        assert_eq!(
            (duplicate.result, duplicate.duplicate_of),
            (DeliveryResult::Duplicate, Some(3))
        );
    }

    #[test]
    fn only_a_deliverys_own_defect_with_others_at_stake_is_written_again_one_at_a_time() {
        assert!(isolates(true, 1));
        assert!(!isolates(true, 0), "alone, it would fail again");
        assert!(!isolates(false, 5), "the store's fault: all fail");
    }

    #[test]
    fn readiness_remembers_an_unavailable_store_until_a_commit_or_the_memory_runs_out() {
        let mut memory = FailureMemory::default();
        let start = Instant::now();
        assert!(memory.readiness(start).is_ok());

        memory.learn(&Err(StoreError::internal("one delivery's defect")), start);
        assert!(
            memory.readiness(start).is_ok(),
            "a defect is not the store's"
        );
        memory.learn(&Err(unavailable()), start);
        let answer = memory.readiness(start + Duration::from_secs(1));
        assert!(
            matches!(&answer, Err(StoreError::Unavailable(cause)) if cause.to_string() == "the last delivery failed to commit"),
            "{answer:?}"
        );
        assert!(memory.readiness(start + FAILURE_MEMORY).is_ok(), "bounded");

        memory.learn(&Err(unavailable()), start);
        memory.learn(&Ok(receipt(1)), start);
        assert!(memory.readiness(start).is_ok(), "a commit since clears it");
    }

    #[test]
    fn settling_answers_every_submitter_in_order_and_counts_only_what_committed() {
        let metrics = Metrics::new().unwrap();
        let mut memory = FailureMemory::default();
        let (replies, answers): (Vec<_>, Vec<_>) = (0..2).map(|_| oneshot::channel()).unzip();
        let written = Written {
            results: vec![Ok(receipt(1)), Err(StoreError::internal("defect"))],
            completions: Vec::new(),
        };
        settle(replies, Ok(written), &mut memory, &metrics, Instant::now());
        let mut answers = answers
            .into_iter()
            .map(|mut answer| answer.try_recv().unwrap());
        assert_eq!(answers.next().unwrap().unwrap().delivery_id, 1);
        assert!(matches!(answers.next(), Some(Err(StoreError::Internal(_)))));
        assert!(memory.readiness(Instant::now()).is_ok());
        let commits = || {
            metrics
                .render()
                .unwrap()
                .lines()
                .find(|line| line.starts_with("m2m_store_commit_seconds_count"))
                .map(str::to_owned)
        };
        assert_eq!(
            commits().as_deref(),
            Some("m2m_store_commit_seconds_count 1")
        );

        let (replies, answers): (Vec<_>, Vec<_>) = (0..3).map(|_| oneshot::channel()).unzip();
        settle(
            replies,
            Err(unavailable()),
            &mut memory,
            &metrics,
            Instant::now(),
        );
        for mut answer in answers {
            assert!(matches!(
                answer.try_recv(),
                Ok(Err(StoreError::Unavailable(_)))
            ));
        }
        assert!(memory.readiness(Instant::now()).is_err());
        assert_eq!(
            commits().as_deref(),
            Some("m2m_store_commit_seconds_count 1"),
            "a batch that did not commit is not counted"
        );
    }
}
