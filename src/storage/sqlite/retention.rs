//! Retention and backup: pruning old raw bodies, and consistent online copies.

use std::path::Path;

use anyhow::Context;
use rusqlite::{Connection, OpenFlags, params};
use time::OffsetDateTime;

use crate::storage::batch::PRUNE_CHUNK;
use crate::storage::timestamp;

/// Deletes up to [`PRUNE_CHUNK`] raw bodies of stored deliveries received before `cutoff`.
/// Kept whatever their age: quarantined bodies (the only copy of what was sent) and bodies of
/// jobs still pending or in progress (they may need re-processing). Delivery rows, outcomes, device
/// messages (whose payload is then the only copy) and jobs are never pruned. Returns how many bodies were deleted.
pub(super) fn prune_chunk(
    connection: &Connection,
    cutoff: OffsetDateTime,
) -> rusqlite::Result<usize> {
    let deleted = connection
        .prepare_cached(
            "DELETE FROM raw_bodies WHERE delivery_id IN (
                 SELECT r.delivery_id
                 FROM raw_bodies r
                 JOIN deliveries d ON d.id = r.delivery_id
                 LEFT JOIN jobs j ON j.request_id = d.request_id
                 WHERE d.received_at < ?1
                   AND d.result = 'stored'
                   AND (j.id IS NULL OR j.state NOT IN ('pending', 'in_progress'))
                 ORDER BY r.delivery_id
                 LIMIT ?2)",
        )?
        .execute(params![timestamp(cutoff), PRUNE_CHUNK])?;
    if deleted > 0 {
        give_pages_back(connection)?;
    }
    Ok(deleted)
}

/// Hands up to 1,000 free pages back to the file system, in a database created with incremental
/// vacuum (by an earlier release; see `connection::open_writer`); nothing otherwise. The pragma
/// frees one page per row it returns, so every row is read: stepped once, as `execute_batch`
/// does, it freed a single page per prune.
fn give_pages_back(connection: &Connection) -> rusqlite::Result<()> {
    let mut statement = connection.prepare_cached("PRAGMA incremental_vacuum(1000)")?;
    let mut rows = statement.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

/// Copies the database to `target` consistently while the listener keeps writing: the SQLite
/// backup API, all pages in one step (a step that copies everything reads one snapshot, and so
/// is not restarted by concurrent commits).
///
/// Atomic: the copy is written to a temporary file beside `target` (0600, as it holds callback
/// passwords), checked, synced, and only then given its name, so `target` is either absent or a
/// complete, checked copy. On any failure the temporary file (and SQLite's journal of it) is
/// removed, and a retry starts afresh. An existing `target` is never replaced.
pub(super) fn backup_database(path: &Path, target: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !target.exists(),
        "{} exists already; not overwriting it",
        target.display()
    );
    let partial = PartialCopy::create(target)?;
    copy_database(path, &partial.path)?;
    partial.publish(target)
}

/// Copies `path` into the empty database file `copy_path` and checks the copy.
fn copy_database(path: &Path, copy_path: &Path) -> anyhow::Result<()> {
    let source = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("failed to open database at {}", path.display()))?;
    source.busy_timeout(std::time::Duration::from_secs(10))?;
    let mut copy = Connection::open_with_flags(copy_path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .with_context(|| format!("failed to open {}", copy_path.display()))?;
    {
        let backup = rusqlite::backup::Backup::new(&source, &mut copy)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            // -1: every page in this one step.
            match backup.step(-1).context("backup failed")? {
                rusqlite::backup::StepResult::Done => break,
                rusqlite::backup::StepResult::Busy | rusqlite::backup::StepResult::Locked => {
                    anyhow::ensure!(
                        std::time::Instant::now() < deadline,
                        "the database stayed locked for a minute"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                _ => {}
            }
        }
    }
    let integrity: String = copy.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
    anyhow::ensure!(
        integrity == "ok",
        "the backup failed its integrity check: {integrity}"
    );
    copy.close()
        .map_err(|(_, error)| error)
        .with_context(|| format!("failed to close {}", copy_path.display()))
}

/// The temporary file a backup is written to, beside its target; removed when dropped, together
/// with the files SQLite may have left beside it.
struct PartialCopy {
    path: std::path::PathBuf,
}

impl PartialCopy {
    fn create(target: &Path) -> anyhow::Result<Self> {
        let name = target
            .file_name()
            .with_context(|| format!("{} does not name a file", target.display()))?;
        let mut partial_name = std::ffi::OsString::from(".");
        partial_name.push(name);
        partial_name.push(format!(".{}.partial", std::process::id()));
        let path = target.with_file_name(partial_name);
        crate::private_files::create_new(&path)
            .with_context(|| format!("failed to create {}", path.display()))?;
        Ok(Self { path })
    }

    /// Gives the finished copy its name. A hard link does it atomically and, unlike a rename,
    /// fails instead of replacing a `target` that appeared meanwhile; where the file system has
    /// no hard links, a rename after checking that `target` is still absent.
    fn publish(self, target: &Path) -> anyhow::Result<()> {
        std::fs::File::open(&self.path)
            .and_then(|file| file.sync_all())
            .with_context(|| format!("failed to sync {}", self.path.display()))?;
        match std::fs::hard_link(&self.path, target) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                anyhow::bail!("{} exists already; not overwriting it", target.display())
            }
            Err(_) if !target.exists() => std::fs::rename(&self.path, target)
                .with_context(|| format!("failed to rename the copy to {}", target.display()))?,
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("failed to name the copy {}", target.display())));
            }
        }
        // The new name is durable once its directory is.
        if let Some(directory) = target
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::File::open(directory)
                .and_then(|directory| directory.sync_all())
                .with_context(|| format!("failed to sync {}", directory.display()))?;
        }
        Ok(())
    }
}

impl Drop for PartialCopy {
    fn drop(&mut self) {
        for suffix in ["", "-journal", "-wal", "-shm"] {
            let mut name = self.path.clone().into_os_string();
            name.push(suffix);
            let _ = std::fs::remove_file(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::StorageSettings;
    use crate::storage::sqlite::connection::open_and_migrate;

    fn pragma(connection: &Connection, name: &str) -> i64 {
        connection
            .query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
            .unwrap()
    }

    /// Stores `count` stored deliveries received in 2020 with a raw body of 3,000 bytes each.
    fn store_old_bodies(connection: &Connection, count: usize) {
        for _ in 0..count {
            connection
                .execute_batch(
                    "INSERT INTO deliveries (received_at, dedup_key, result, size)
                     VALUES ('2020-01-01T00:00:00.000000Z', randomblob(32), 'stored', 3000);
                     INSERT INTO raw_bodies (delivery_id, body) VALUES (last_insert_rowid(), randomblob(3000));",
                )
                .unwrap();
        }
    }

    fn prune_everything(connection: &Connection) -> usize {
        let mut pruned = 0;
        loop {
            match prune_chunk(connection, OffsetDateTime::now_utc()).unwrap() {
                0 => return pruned,
                deleted => pruned += deleted,
            }
        }
    }

    #[test]
    fn a_new_database_keeps_no_pointer_map_and_reuses_the_pages_of_pruned_bodies() {
        let directory = tempfile::tempdir().unwrap();
        let connection = open_and_migrate(
            &directory.path().join("new.db"),
            &StorageSettings::default(),
        )
        .unwrap();
        assert_eq!(pragma(&connection, "auto_vacuum"), 0, "no auto-vacuum");

        store_old_bodies(&connection, 300);
        let grown = pragma(&connection, "page_count");
        assert_eq!(prune_everything(&connection), 300);
        assert!(
            pragma(&connection, "freelist_count") >= 300,
            "the bodies' pages are free"
        );
        store_old_bodies(&connection, 300);
        // The second 300 bodies take the freed pages: only their delivery rows add pages.
        let regrown = pragma(&connection, "page_count");
        assert!(
            regrown < grown + 50,
            "{grown} pages, then {regrown}: the freed pages were not reused"
        );
    }

    #[test]
    fn a_database_created_with_incremental_vacuum_keeps_it_and_its_prunes_give_pages_back() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("earlier.db");
        // As an earlier release created its databases.
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA auto_vacuum = INCREMENTAL; CREATE TABLE created_first (x);")
            .unwrap();
        let connection = open_and_migrate(&path, &StorageSettings::default()).unwrap();
        assert_eq!(pragma(&connection, "auto_vacuum"), 2, "still incremental");

        store_old_bodies(&connection, 300);
        let grown = pragma(&connection, "page_count");
        assert_eq!(prune_everything(&connection), 300);
        let shrunk = pragma(&connection, "page_count");
        assert!(
            shrunk + 250 < grown,
            "{grown} pages, then {shrunk}: the prune gave no pages back"
        );
    }
}
