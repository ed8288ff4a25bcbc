//! Connections to the file: the writer's (opened, and migrated when serving), the readers'
//! read-only ones (reused, and retired when the writer reopens its own), and the checkpointer's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::cell::RefCell;
use std::ops::Deref;

use rusqlite::{
    CachedStatement, Connection, OpenFlags, OptionalExtension, Statement, params_from_iter,
};

use super::bind::{RawStatements, Value};
use super::error::{self, is_storage_wide, store_error};
use super::schema;
use crate::configuration::StorageSettings;
use crate::storage::StoreError;
use crate::storage::rows::RowReader;

/// Idle read-only connections kept for reuse.
const MAX_IDLE_READERS: usize = 4;

/// Creates the database file 0600 before SQLite does (SQLite would make it 0644, and gives its
/// `-wal` and `-shm` files the database file's mode, so all three are private this way); warns
/// about an existing one that others can read.
pub(super) fn create_private_database(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        crate::private_files::warn_if_shared(path, "database file");
        return Ok(());
    }
    match crate::private_files::create_new(path) {
        // An empty file is an empty database to SQLite.
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(anyhow::Error::new(error)
            .context(format!("failed to create database at {}", path.display()))),
    }
}

pub(super) fn open_writer(path: &Path, settings: &StorageSettings) -> rusqlite::Result<Connection> {
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(Duration::from_millis(settings.busy_timeout_ms))?;
    // No auto-vacuum (SQLite's default) for a new database: with it, every page the writer
    // allocates or moves in a split is also recorded in a pointer map, about 6% of the writer's
    // work per callback (BENCHMARKS.md). Pages freed by a prune go to the free list and take the
    // next bodies, so the file stops growing once the retention is reached, but it does not
    // shrink. A database an earlier release created keeps its incremental vacuum, and its prunes
    // still hand pages back (see `retention::prune_chunk`).
    connection.pragma_update(None, "auto_vacuum", "NONE")?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", settings.synchronous.pragma_value())?;
    connection.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)?;
    // Once a checkpoint has caught up, the WAL is cut back to this size (bytes).
    connection.pragma_update(None, "journal_size_limit", 16 * 1024 * 1024)?;
    // The references between tables are declared, not enforced: every id the writer stores in a
    // reference it has just written or read in the same transaction, and checking each one was
    // a parent lookup per row (about nine per callback, a tenth of the writer's work). The suite
    // runs `PRAGMA foreign_key_check` after every kind of write (callbacks, registrations,
    // sweeps, prunes) to hold it to that.
    connection.pragma_update(None, "foreign_keys", "OFF")?;
    // Statement journals (savepoints) in memory, not in temporary files.
    connection.pragma_update(None, "temp_store", "MEMORY")?;
    // A stable query plan: without it SQLite recompiles a statement whenever a rebound parameter
    // might change its plan (partial indexes, STAT4), which profiling showed on most statements
    // of the writer. The plans here are simple index lookups that no binding improves.
    connection.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    connection.set_prepared_statement_cache_capacity(64);
    Ok(connection)
}

/// How often the checkpointer copies committed WAL frames into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
/// The writer checkpoints by itself only past this many WAL pages (~40 MiB): a safety net for
/// when the checkpointer cannot run.
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 10_000;

/// Checkpoints the WAL from a connection of its own, so that copying pages into the database
/// file does not hold up the writer thread (and with it every acknowledgement). PASSIVE never
/// blocks the writer. Stops when `stop` is dropped.
///
/// A connection of an older [`Readers::generation`] is closed, and so is one whose checkpoint
/// failed: opened while the volume was read-only, it would keep a read-only `-shm` mapping that
/// the writer's next connection shares.
pub(super) fn run_checkpoints(
    path: &Path,
    generation: &AtomicU64,
    stop: &std::sync::mpsc::Receiver<()>,
) {
    let mut connection: Option<(u64, Connection)> = None;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(CHECKPOINT_INTERVAL)
    {
        let current = generation.load(Ordering::Acquire);
        if connection
            .as_ref()
            .is_some_and(|(opened_in, _)| *opened_in != current)
        {
            connection = None;
        }
        if connection.is_none() {
            connection = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .and_then(|opened| {
                opened.busy_timeout(Duration::from_millis(100))?;
                Ok((current, opened))
            })
            .ok();
        }
        let Some((_, open)) = &connection else {
            continue;
        };
        if let Err(error) = open.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(%error, "checkpoint failed; retrying");
            connection = None;
        }
    }
}

/// The writer's connection to a database brought to this build's schema.
pub(super) fn open_and_migrate(
    path: &Path,
    settings: &StorageSettings,
) -> anyhow::Result<Connection> {
    let mut connection = open_writer(path, settings)?;
    schema::check_version(&connection)?;
    schema::migrate(&mut connection)?;
    Ok(connection)
}

/// A database that exists but cannot be written right now (read-only volume, lock held by
/// another process): a fault to ride out, not a configuration error.
pub(super) fn is_transient_open_failure(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<rusqlite::Error>()
        .is_some_and(is_storage_wide)
}

/// Read-only connections for the API, reused across requests.
///
/// SQLite's unix VFS shares one mapping of the `-shm` file (the WAL index) among all connections
/// of the process to a database, and opens it read-only when the volume is read-only. A reader
/// opened then (a listener started on a read-only volume after a crash left the `-wal` and `-shm`
/// behind, which is when reads work) would keep that read-only mapping alive in the idle pool,
/// and the writer's connection, reopened once the volume is writable again, would share it and
/// fail with "read-only" on every commit until a restart. So connections belong to a generation,
/// which the writer advances each time it (re)opens its connection: idle readers are closed then,
/// readers in use when they come back, and the checkpointer closes its own.
pub(super) struct Readers {
    path: PathBuf,
    /// Idle connections, each with the generation it was opened in.
    idle: Mutex<Vec<(u64, Connection)>>,
    /// Advanced by [`Readers::retire`]; the checkpointer watches it too.
    pub generation: Arc<AtomicU64>,
}

impl Readers {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            idle: Mutex::new(Vec::new()),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Closes every connection opened so far (idle ones now, those in use when they are returned),
    /// so that the next connection maps the WAL index anew. Called by the writer thread before it
    /// (re)opens its connection.
    pub fn retire(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let retired = self
            .idle
            .lock()
            .map(|mut idle| std::mem::take(&mut *idle))
            .unwrap_or_default();
        drop(retired);
    }

    pub fn with<T>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let current = self.generation.load(Ordering::Acquire);
        let idle = self
            .idle
            .lock()
            .ok()
            .and_then(|mut idle| idle.pop())
            .filter(|(opened_in, _)| *opened_in == current);
        let (generation, connection) = match idle {
            Some(idle) => idle,
            None => Connection::open_with_flags(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .and_then(|connection| {
                connection.busy_timeout(Duration::from_secs(5))?;
                Ok((current, connection))
            })
            .map_err(|error| StoreError::Unavailable(error::cause(error)))?,
        };
        let result = query(&connection).map_err(store_error);
        let reusable = result.is_ok() && generation == self.generation.load(Ordering::Acquire);
        if let Ok(mut idle) = self.idle.lock() {
            if reusable && idle.len() < MAX_IDLE_READERS {
                idle.push((generation, connection));
            }
        }
        result
    }
}

/// The statements of one writer transaction, each taken from the connection's statement cache at
/// its first use in the transaction and held until the transaction ends, rather than looked up
/// and handed back at every execution: the cache hashes the SQL text on both ways, which was
/// about a tenth of the writer's cost per callback. Keyed by the address of the (static) SQL
/// text. Derefs to the connection, for what is not a held statement.
///
/// In the writer's batches the hot statements also bind their values in place, through the
/// connection's [`RawStatements`] ([`Self::execute`]).
pub(super) struct Statements<'c> {
    connection: &'c Connection,
    held: RefCell<Vec<(usize, usize, CachedStatement<'c>)>>,
    raw: Option<&'c RawStatements>,
}

impl<'c> Statements<'c> {
    pub fn new(connection: &'c Connection) -> Self {
        Self {
            connection,
            held: RefCell::new(Vec::with_capacity(16)),
            raw: None,
        }
    }

    /// As [`Self::new`], with `raw`, the statements prepared on this same connection (the
    /// writer's, see [`super::bind::WriterConnection::split`]).
    pub fn with_raw(connection: &'c Connection, raw: &'c RawStatements) -> Self {
        Self {
            raw: Some(raw),
            ..Self::new(connection)
        }
    }

    /// Runs `sql` (no result rows) with `values`; returns how many rows it changed. Values are
    /// bound in place where the raw statements are at hand, through rusqlite otherwise.
    pub fn execute(&self, sql: &'static str, values: &[Value<'_>]) -> rusqlite::Result<usize> {
        match self.raw {
            Some(raw) => raw.execute(self.connection, sql, values),
            None => self.with(sql, |statement| {
                statement.execute(params_from_iter(values.iter()))
            }),
        }
    }

    /// Runs the query `sql` with `values` and reads its first row, if it has one, with `read`.
    /// Values are bound in place where the raw statements are at hand, through rusqlite
    /// otherwise.
    pub fn query_first<T>(
        &self,
        sql: &'static str,
        values: &[Value<'_>],
        read: impl FnOnce(&dyn RowReader<Error = rusqlite::Error>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Option<T>> {
        match self.raw {
            Some(raw) => raw.query_first(self.connection, sql, values, |row| read(row)),
            None => self.with(sql, |statement| {
                statement
                    .query_row(params_from_iter(values.iter()), |row| read(row))
                    .optional()
            }),
        }
    }

    /// Runs `use_statement` on the statement of `sql`.
    pub fn with<T>(
        &self,
        sql: &'static str,
        use_statement: impl FnOnce(&mut Statement<'c>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let key = (sql.as_ptr() as usize, sql.len());
        let Ok(mut held) = self.held.try_borrow_mut() else {
            // Asked for from inside another statement's use: the cache, as usual.
            let mut statement = self.connection.prepare_cached(sql)?;
            return use_statement(&mut statement);
        };
        let index = match held
            .iter()
            .position(|(address, length, _)| (*address, *length) == key)
        {
            Some(index) => index,
            None => {
                held.push((key.0, key.1, self.connection.prepare_cached(sql)?));
                held.len() - 1
            }
        };
        use_statement(&mut held[index].2)
    }
}

impl Deref for Statements<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.connection
    }
}

/// How many rows one statement of [`insert_rows`] inserts at most.
pub(super) const ROWS_PER_INSERT: usize = 4;

/// The statements of a multi-row `INSERT OR IGNORE` for one to [`ROWS_PER_INSERT`] rows:
/// `multi_row_insert!("INSERT OR IGNORE INTO t (a, b) VALUES ", "(?, ?)")`.
macro_rules! multi_row_insert {
    ($head:literal, $row:literal) => {
        [
            concat!($head, $row),
            concat!($head, $row, ", ", $row),
            concat!($head, $row, ", ", $row, ", ", $row),
            concat!($head, $row, ", ", $row, ", ", $row, ", ", $row),
        ]
    };
}
pub(super) use multi_row_insert;

/// Inserts `rows`, up to [`ROWS_PER_INSERT`] per statement: `sql[n - 1]` inserts `n` rows (of
/// `WIDTH` placeholders each; see [`multi_row_insert`]).
///
/// The statements are `INSERT OR IGNORE`, not `INSERT ... ON CONFLICT DO NOTHING`: with the
/// latter a `NOT NULL` column may still abort the statement after its first rows, so SQLite keeps
/// a statement journal to undo them, which cost more than the statements saved (measured). With
/// `OR IGNORE` no constraint of these tables can abort a statement half-way (their foreign keys
/// are not enforced on the writer, and no value bound here is ever NULL).
pub(super) fn insert_rows<const WIDTH: usize>(
    statements: &Statements<'_>,
    sql: &[&'static str; ROWS_PER_INSERT],
    rows: &[[Value<'_>; WIDTH]],
) -> rusqlite::Result<()> {
    let mut values: Vec<Value<'_>> = Vec::with_capacity(WIDTH * ROWS_PER_INSERT.min(rows.len()));
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        values.clear();
        values.extend(chunk.iter().flatten().copied());
        statements.execute(sql[chunk.len() - 1], &values)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sqlite::bind::WriterConnection;

    const PAIR: [&str; ROWS_PER_INSERT] =
        multi_row_insert!("INSERT OR IGNORE INTO pairs (a, b) VALUES ", "(?, ?)");

    fn with_pairs() -> WriterConnection {
        let connection = Connection::open_in_memory().unwrap();
        connection
            .execute_batch(
                "CREATE TABLE pairs (a TEXT NOT NULL, b INTEGER NOT NULL, PRIMARY KEY (a, b)) WITHOUT ROWID",
            )
            .unwrap();
        WriterConnection::new(connection)
    }

    fn stored(connection: &Connection) -> Vec<(String, i64)> {
        connection
            .prepare("SELECT a, b FROM pairs ORDER BY a, b")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// Every count of rows from none to past two full statements, with a pair repeated inside one
    /// statement and across two, through the values bound in place and through rusqlite: each
    /// distinct pair is stored once and nothing fails.
    #[test]
    fn rows_are_inserted_in_statements_of_up_to_four_each_distinct_pair_once() {
        let names: Vec<String> = (0..10).map(|index| format!("id-{index}")).collect();
        for raw in [true, false] {
            for count in 0..=names.len() {
                let mut writer = with_pairs();
                let (connection, statements) = writer.split();
                let transaction = connection.transaction().unwrap();
                let held = if raw {
                    Statements::with_raw(&transaction, statements)
                } else {
                    Statements::new(&transaction)
                };
                let mut rows: Vec<[Value<'_>; 2]> = names[..count]
                    .iter()
                    .map(|name| [Value::Text(name), Value::Integer(7)])
                    .collect();
                if count >= 2 {
                    // Again in the same statement, and again in the next one.
                    rows.insert(1, rows[0]);
                    rows.push(rows[0]);
                }
                insert_rows(&held, &PAIR, &rows).unwrap();
                let mut expected: Vec<(String, i64)> = names[..count]
                    .iter()
                    .map(|name| (name.clone(), 7))
                    .collect();
                expected.sort();
                assert_eq!(stored(&held), expected, "{count} rows, raw {raw}");
                drop(held);
                transaction.commit().unwrap();
            }
        }
    }
}
