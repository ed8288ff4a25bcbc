//! The SQL of stored callback credentials (see [`crate::storage::credentials`]).

use deadpool_postgres::{Object, Transaction};

use crate::domain::Secret;
use crate::storage::credentials::{Rotation, SOURCE_RETIRED, SOURCE_ROTATED, StoredCredential};

pub(super) async fn all(client: &Object) -> Result<Vec<StoredCredential>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT username, password_digest, password, account, source, created_at, valid_until
               FROM callback_credentials ORDER BY id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let digest: Vec<u8> = row.try_get(1)?;
            Ok(StoredCredential {
                username: row.try_get(0)?,
                password_digest: digest.try_into().unwrap_or([0u8; 32]),
                password: row.try_get::<_, Option<String>>(2)?.map(Secret::new),
                account: row.try_get(3)?,
                source: row.try_get(4)?,
                created_at: row.try_get(5)?,
                valid_until: row.try_get(6)?,
            })
        })
        .collect()
}

pub(super) async fn rotate(
    transaction: &Transaction<'_>,
    rotation: &Rotation,
) -> Result<(), tokio_postgres::Error> {
    // Rotations from two places at once take turns: each retires what the other made current.
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext('m2m-listener credentials ' || current_schema()))",
            &[],
        )
        .await?;
    transaction
        .execute(
            "UPDATE callback_credentials SET valid_until = $1, password = NULL WHERE valid_until IS NULL",
            &[&rotation.valid_until],
        )
        .await?;
    for retired in &rotation.retire {
        transaction
            .execute(
                "INSERT INTO callback_credentials
                     (username, password_digest, password, account, source, created_at, valid_until)
                 VALUES ($1, $2, NULL, NULL, $3, $4, $5)
                 ON CONFLICT (username, password_digest) DO UPDATE
                     SET valid_until = coalesce(callback_credentials.valid_until, excluded.valid_until),
                         password = NULL",
                &[
                    &retired.username,
                    &retired.password_digest.as_slice(),
                    &SOURCE_RETIRED,
                    &rotation.now,
                    &rotation.valid_until,
                ],
            )
            .await?;
    }
    transaction
        .execute(
            "INSERT INTO callback_credentials
                 (username, password_digest, password, account, source, created_at, valid_until)
             VALUES ($1, $2, $3, $4, $5, $6, NULL)",
            &[
                &rotation.username,
                &rotation.password_digest().as_slice(),
                &rotation.password.expose(),
                &rotation.account,
                &SOURCE_ROTATED,
                &rotation.now,
            ],
        )
        .await?;
    Ok(())
}
