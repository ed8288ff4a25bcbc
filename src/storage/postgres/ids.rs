//! Ids reserved from the sequences before anything is inserted, so that the rows of one batch
//! (deliveries, their outcomes, new job devices) can refer to each other in set-based statements.

use deadpool_postgres::Transaction;

/// Fresh ids of deliveries, device outcomes, job devices and device messages (as many of each as
/// asked), ascending, in one round trip. Ids reserved and not used leave gaps, which nothing
/// minds.
pub(super) async fn reserve_ids(
    transaction: &Transaction<'_>,
    [deliveries, outcomes, devices, messages]: [usize; 4],
) -> Result<[Vec<i64>; 4], tokio_postgres::Error> {
    let statement = transaction
        .prepare_cached(
            "SELECT ARRAY(SELECT nextval('deliveries_id_seq') FROM generate_series(1, $1)),
                    ARRAY(SELECT nextval('device_outcomes_id_seq') FROM generate_series(1, $2)),
                    ARRAY(SELECT nextval('job_devices_id_seq') FROM generate_series(1, $3)),
                    ARRAY(SELECT nextval('device_messages_id_seq') FROM generate_series(1, $4))",
        )
        .await?;
    let count = |value: usize| i32::try_from(value).unwrap_or(i32::MAX);
    let row = transaction
        .query_one(
            &statement,
            &[
                &count(deliveries),
                &count(outcomes),
                &count(devices),
                &count(messages),
            ],
        )
        .await?;
    let mut reserved: [Vec<i64>; 4] = [
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
    ];
    for ids in &mut reserved {
        ids.sort_unstable();
    }
    Ok(reserved)
}
