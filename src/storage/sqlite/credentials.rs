//! The SQL of stored callback credentials (see [`crate::storage::credentials`]).

use rusqlite::{Connection, params};

use crate::domain::Secret;
use crate::storage::credentials::{Rotation, SOURCE_RETIRED, SOURCE_ROTATED, StoredCredential};

pub(super) fn all(connection: &Connection) -> rusqlite::Result<Vec<StoredCredential>> {
    let mut statement = connection.prepare_cached(
        "SELECT username, password_digest, password, account, source, created_at, valid_until
           FROM callback_credentials ORDER BY id",
    )?;
    statement
        .query_map([], |row| {
            let digest: Vec<u8> = row.get(1)?;
            Ok(StoredCredential {
                username: row.get(0)?,
                password_digest: digest.try_into().unwrap_or([0u8; 32]),
                password: row.get::<_, Option<String>>(2)?.map(Secret::new),
                account: row.get(3)?,
                source: row.get(4)?,
                created_at: row.get(5)?,
                valid_until: row.get(6)?,
            })
        })?
        .collect()
}

pub(super) fn rotate(connection: &Connection, rotation: &Rotation) -> rusqlite::Result<()> {
    connection.execute(
        "UPDATE callback_credentials SET valid_until = ?1, password = NULL WHERE valid_until IS NULL",
        params![rotation.valid_until],
    )?;
    for retired in &rotation.retire {
        connection.execute(
            "INSERT INTO callback_credentials
                 (username, password_digest, password, account, source, created_at, valid_until)
             VALUES (?1, ?2, NULL, NULL, ?3, ?4, ?5)
             ON CONFLICT (username, password_digest) DO UPDATE
                 SET valid_until = coalesce(callback_credentials.valid_until, excluded.valid_until),
                     password = NULL",
            params![
                retired.username,
                retired.password_digest.as_slice(),
                SOURCE_RETIRED,
                rotation.now,
                rotation.valid_until
            ],
        )?;
    }
    connection.execute(
        "INSERT INTO callback_credentials
             (username, password_digest, password, account, source, created_at, valid_until)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)",
        params![
            rotation.username,
            rotation.password_digest().as_slice(),
            rotation.password.expose(),
            rotation.account,
            SOURCE_ROTATED,
            rotation.now
        ],
    )?;
    Ok(())
}
