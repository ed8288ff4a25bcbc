//! Ids reserved from the sequences before anything is inserted, so that the rows of one batch
//! (deliveries, their outcomes, new job devices) can refer to each other in set-based statements.

use deadpool_postgres::Transaction;

/// Fresh ids of deliveries, device outcomes and job devices (as many of each as asked), ascending,
/// in one round trip. Ids reserved and not used leave gaps, which nothing minds.
pub(super) async fn reserve_ids(
    transaction: &Transaction<'_>,
    [deliveries, outcomes, devices]: [usize; 3],
) -> Result<[Vec<i64>; 3], tokio_postgres::Error> {
    let statement = transaction
        .prepare_cached(
            "SELECT ARRAY(SELECT nextval('deliveries_id_seq') FROM generate_series(1, $1)),
                    ARRAY(SELECT nextval('device_outcomes_id_seq') FROM generate_series(1, $2)),
                    ARRAY(SELECT nextval('job_devices_id_seq') FROM generate_series(1, $3))",
        )
        .await?;
    let count = |value: usize| i32::try_from(value).unwrap_or(i32::MAX);
    let row = transaction
        .query_one(
            &statement,
            &[&count(deliveries), &count(outcomes), &count(devices)],
        )
        .await?;
    let mut reserved: [Vec<i64>; 3] = [row.try_get(0)?, row.try_get(1)?, row.try_get(2)?];
    for ids in &mut reserved {
        ids.sort_unstable();
    }
    Ok(reserved)
}
