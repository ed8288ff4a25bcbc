//! The writer's hot statements, executed with their values bound in place.
//!
//! rusqlite binds every text and blob with `SQLITE_TRANSIENT`: SQLite copies each value into
//! memory of its own before the statement runs, then frees it. A callback binds about seventy
//! values (the delivery row alone has twenty-one), and with the raw body and the event's data
//! these copies, their allocations and rusqlite's conversions were the largest part of the
//! writer's cost outside SQLite's own b-tree work (BENCHMARKS.md, "The writer's cost per
//! callback"). Here a value is bound `SQLITE_STATIC`, that is by pointer, which is sound because
//! [`RawStatements::execute`] runs the statement to completion, resets it and clears every
//! binding before it returns: no pointer into a borrowed value outlives the call.
//!
//! The statements are prepared once per writer connection and kept in [`RawStatements`], which
//! only [`WriterConnection`] owns, beside the connection they belong to and dropped before it (a
//! connection closes only once its statements are finalized).

use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_int};
use std::ops::{Deref, DerefMut};
use std::ptr::{self, NonNull};

use rusqlite::types::{ToSqlOutput, Type, ValueRef};
use rusqlite::{Connection, ToSql, ffi};

use crate::storage::rows::RowReader;

/// A value to bind: what the writer's statements take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Value<'a> {
    Null,
    Integer(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(text: Option<&'a str>) -> Self {
        text.map_or(Value::Null, Value::Text)
    }
}

impl<'a> From<&'a Option<String>> for Value<'a> {
    fn from(text: &'a Option<String>) -> Self {
        text.as_deref().into()
    }
}

impl From<Option<i64>> for Value<'_> {
    fn from(number: Option<i64>) -> Self {
        number.map_or(Value::Null, Value::Integer)
    }
}

impl From<Option<u32>> for Value<'_> {
    fn from(number: Option<u32>) -> Self {
        number.map_or(Value::Null, |number| Value::Integer(i64::from(number)))
    }
}

impl From<bool> for Value<'_> {
    fn from(flag: bool) -> Self {
        Value::Integer(i64::from(flag))
    }
}

/// For the statements run through rusqlite (outside the writer's batches): the same values.
impl ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Value::Null => ValueRef::Null,
            Value::Integer(number) => ValueRef::Integer(number),
            Value::Text(text) => ValueRef::Text(text.as_bytes()),
            Value::Blob(bytes) => ValueRef::Blob(bytes),
        }))
    }
}

/// A prepared statement of the writer's connection, finalized when dropped.
struct RawStatement(NonNull<ffi::sqlite3_stmt>);

// SAFETY: a statement is only reachable through the `RawStatements` of one `WriterConnection`,
// which moves between threads with its connection (rusqlite's `Connection` is `Send` the same
// way) and is not `Sync` (`RefCell`): one thread at a time uses it, as SQLite requires of a
// connection opened without its mutex.
unsafe impl Send for RawStatement {}

impl Drop for RawStatement {
    fn drop(&mut self) {
        // SAFETY: the pointer came from a successful sqlite3_prepare_v3 and is finalized once,
        // here; its connection is still open (see `WriterConnection`'s field order).
        unsafe {
            ffi::sqlite3_finalize(self.0.as_ptr());
        }
    }
}

/// The statements [`Self::execute`] has prepared on one connection, by the address of their
/// (static) SQL text.
#[derive(Default)]
pub(super) struct RawStatements {
    held: RefCell<Vec<(usize, usize, RawStatement)>>,
}

impl RawStatements {
    /// Runs the statement `sql` (one statement, no result rows) on `connection` with `values`
    /// bound to its parameters in order, and returns how many rows it changed.
    pub fn execute(
        &self,
        connection: &Connection,
        sql: &'static str,
        values: &[Value<'_>],
    ) -> rusqlite::Result<usize> {
        self.run(connection, sql, values, |db, _, step| match step {
            // SAFETY: `db` is the open connection the statement just ran on.
            ffi::SQLITE_DONE => {
                Ok(usize::try_from(unsafe { ffi::sqlite3_changes64(db) }).unwrap_or(0))
            }
            ffi::SQLITE_ROW => Err(rusqlite::Error::ExecuteReturnedResults),
            // SAFETY: as above.
            code => Err(unsafe { error(db, code) }),
        })
    }

    /// Runs the query `sql` on `connection` with `values` bound in order and reads its first
    /// row, if it has one, with `read` (rusqlite's `query_row(...).optional()`, values bound in
    /// place).
    pub fn query_first<T>(
        &self,
        connection: &Connection,
        sql: &'static str,
        values: &[Value<'_>],
        read: impl FnOnce(&RawRow<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Option<T>> {
        self.run(connection, sql, values, |db, statement, step| match step {
            ffi::SQLITE_DONE => Ok(None),
            ffi::SQLITE_ROW => read(&RawRow {
                statement,
                _borrowed: std::marker::PhantomData,
            })
            .map(Some),
            // SAFETY: `db` is the open connection the statement just ran on.
            code => Err(unsafe { error(db, code) }),
        })
    }

    /// Binds `values` to the statement of `sql` (prepared on first use), steps it once, hands
    /// the connection, the statement (on its row, if any) and the step's result code to
    /// `finish`, then resets the statement and clears its bindings.
    fn run<T>(
        &self,
        connection: &Connection,
        sql: &'static str,
        values: &[Value<'_>],
        finish: impl FnOnce(*mut ffi::sqlite3, *mut ffi::sqlite3_stmt, c_int) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        // SAFETY: the handle is only passed to SQLite calls on this thread while `connection`
        // is borrowed, so it stays open throughout.
        let db = unsafe { connection.handle() };
        let key = (sql.as_ptr() as usize, sql.len());
        let mut held = self
            .held
            .try_borrow_mut()
            .map_err(|_| rusqlite::Error::InvalidQuery)?;
        let statement = match held
            .iter()
            .position(|(address, length, _)| (*address, *length) == key)
        {
            Some(index) => held[index].2.0,
            None => {
                let statement = prepare(db, sql)?;
                let pointer = statement.0;
                held.push((key.0, key.1, statement));
                pointer
            }
        }
        .as_ptr();
        // SAFETY: `statement` is a live statement of these, and `db` the connection it was
        // prepared on (checked: a statement is never run on another connection). Every pointer
        // bound below borrows from `values`, and before returning the statement is reset and its
        // bindings cleared, so SQLite keeps none of them past this call. `finish` reads the row
        // (if any) before the reset.
        unsafe {
            if ffi::sqlite3_db_handle(statement) != db {
                return Err(rusqlite::Error::InvalidQuery);
            }
            let expected =
                usize::try_from(ffi::sqlite3_bind_parameter_count(statement)).unwrap_or(0);
            if expected != values.len() {
                return Err(rusqlite::Error::InvalidParameterCount(
                    values.len(),
                    expected,
                ));
            }
            let mut bound = Ok(());
            for (index, value) in values.iter().enumerate() {
                let Ok(position) = c_int::try_from(index + 1) else {
                    bound = Err(rusqlite::Error::InvalidParameterCount(
                        values.len(),
                        expected,
                    ));
                    break;
                };
                let code = bind(statement, position, *value);
                if code != ffi::SQLITE_OK {
                    bound = Err(error(db, code));
                    break;
                }
            }
            let result = match bound {
                Ok(()) => finish(db, statement, ffi::sqlite3_step(statement)),
                Err(error) => Err(error),
            };
            ffi::sqlite3_reset(statement);
            ffi::sqlite3_clear_bindings(statement);
            result
        }
    }
}

/// The current row of a query [`RawStatements::query_first`] runs, valid only inside its `read`.
pub(super) struct RawRow<'a> {
    statement: *mut ffi::sqlite3_stmt,
    _borrowed: std::marker::PhantomData<&'a ()>,
}

impl RawRow<'_> {
    /// Column `index` and its type, as rusqlite names it; an error past the last column.
    fn column(&self, index: usize) -> rusqlite::Result<(c_int, Type)> {
        // SAFETY: the statement is live and stepped to a row for as long as `self` exists.
        let count = unsafe { ffi::sqlite3_column_count(self.statement) };
        let column = c_int::try_from(index)
            .ok()
            .filter(|column| *column < count)
            .ok_or(rusqlite::Error::InvalidColumnIndex(index))?;
        // SAFETY: as above, `column` in range.
        let kind = match unsafe { ffi::sqlite3_column_type(self.statement, column) } {
            ffi::SQLITE_NULL => Type::Null,
            ffi::SQLITE_INTEGER => Type::Integer,
            ffi::SQLITE_FLOAT => Type::Real,
            ffi::SQLITE_TEXT => Type::Text,
            _ => Type::Blob,
        };
        Ok((column, kind))
    }

    /// The bytes `start` points to, as long as column `column` is: valid until the next call on
    /// the statement, so the caller copies them first.
    ///
    /// # Safety
    /// `start` must be what `sqlite3_column_text` or `sqlite3_column_blob` just returned for
    /// `column` of this row.
    unsafe fn bytes(&self, column: c_int, start: *const u8) -> &[u8] {
        // SAFETY: the statement is on a row, and `column` is the column `start` was read from.
        let length = usize::try_from(unsafe { ffi::sqlite3_column_bytes(self.statement, column) })
            .unwrap_or(0);
        if start.is_null() || length == 0 {
            // An empty text or blob may come back as a null pointer.
            return &[];
        }
        // SAFETY: SQLite holds `length` bytes at `start` until the next call on the statement.
        unsafe { std::slice::from_raw_parts(start, length) }
    }
}

/// The row read as the mappings of [`crate::storage::rows`] read rusqlite's: a value of another
/// type (a NULL where none is allowed included), or a column past the last, is rusqlite's error.
impl RowReader for RawRow<'_> {
    type Error = rusqlite::Error;

    fn text(&self, column: usize) -> rusqlite::Result<String> {
        self.optional_text(column)?
            .ok_or(wrong_type(column, Type::Null))
    }

    fn optional_text(&self, index: usize) -> rusqlite::Result<Option<String>> {
        match self.column(index)? {
            (_, Type::Null) => Ok(None),
            (column, Type::Text) => {
                // SAFETY: the statement is on a row and `column` is a text column of it.
                let text =
                    unsafe { self.bytes(column, ffi::sqlite3_column_text(self.statement, column)) };
                std::str::from_utf8(text)
                    .map(|text| Some(text.to_owned()))
                    .map_err(|error| {
                        rusqlite::Error::FromSqlConversionFailure(
                            index,
                            Type::Text,
                            Box::new(error),
                        )
                    })
            }
            (_, kind) => Err(wrong_type(index, kind)),
        }
    }

    fn integer(&self, column: usize) -> rusqlite::Result<i64> {
        self.optional_integer(column)?
            .ok_or(wrong_type(column, Type::Null))
    }

    fn optional_integer(&self, index: usize) -> rusqlite::Result<Option<i64>> {
        match self.column(index)? {
            (_, Type::Null) => Ok(None),
            // SAFETY: the statement is live and on a row; `column` is in range.
            (column, Type::Integer) => Ok(Some(unsafe {
                ffi::sqlite3_column_int64(self.statement, column)
            })),
            (_, kind) => Err(wrong_type(index, kind)),
        }
    }

    fn flag(&self, column: usize) -> rusqlite::Result<bool> {
        self.integer(column).map(|number| number != 0)
    }

    fn optional_bytes(&self, index: usize) -> rusqlite::Result<Option<Vec<u8>>> {
        match self.column(index)? {
            (_, Type::Null) => Ok(None),
            // SAFETY: the statement is on a row and `column` is a blob column of it.
            (column, Type::Blob) => Ok(Some(
                unsafe {
                    self.bytes(
                        column,
                        ffi::sqlite3_column_blob(self.statement, column).cast::<u8>(),
                    )
                }
                .to_vec(),
            )),
            (_, kind) => Err(wrong_type(index, kind)),
        }
    }
}

/// rusqlite's error for column `index` holding a value of type `kind`.
fn wrong_type(index: usize, kind: Type) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(index, String::new(), kind)
}

fn prepare(db: *mut ffi::sqlite3, sql: &'static str) -> rusqlite::Result<RawStatement> {
    let length = c_int::try_from(sql.len()).map_err(|_| rusqlite::Error::InvalidQuery)?;
    let mut statement = ptr::null_mut();
    // SAFETY: `sql` is valid for `length` bytes; SQLite writes the new statement (or null) to
    // `statement`, and reads nothing past the text (no tail pointer is asked for).
    let code = unsafe {
        ffi::sqlite3_prepare_v3(
            db,
            sql.as_ptr().cast::<c_char>(),
            length,
            ffi::SQLITE_PREPARE_PERSISTENT,
            &mut statement,
            ptr::null_mut(),
        )
    };
    if code != ffi::SQLITE_OK {
        if let Some(statement) = NonNull::new(statement) {
            drop(RawStatement(statement));
        }
        // SAFETY: `db` is open (see `execute`).
        return Err(unsafe { error(db, code) });
    }
    NonNull::new(statement)
        .map(RawStatement)
        .ok_or(rusqlite::Error::InvalidQuery)
}

static EMPTY: [u8; 1] = [0];

/// Binds `value` by pointer (`SQLITE_STATIC`) to parameter `position`.
///
/// # Safety
/// `statement` must be live, and `value` must outlive its binding (cleared by the caller).
unsafe fn bind(statement: *mut ffi::sqlite3_stmt, position: c_int, value: Value<'_>) -> c_int {
    // SAFETY: as the function's contract says; the lengths are those of the borrowed values.
    unsafe {
        match value {
            Value::Null => ffi::sqlite3_bind_null(statement, position),
            Value::Integer(number) => ffi::sqlite3_bind_int64(statement, position, number),
            Value::Text(text) => ffi::sqlite3_bind_text64(
                statement,
                position,
                // An empty `&str` may point nowhere; SQLite is given a real (static) byte.
                if text.is_empty() {
                    EMPTY.as_ptr()
                } else {
                    text.as_ptr()
                }
                .cast::<c_char>(),
                text.len() as ffi::sqlite3_uint64,
                ffi::SQLITE_STATIC(),
                ffi::SQLITE_UTF8 as u8,
            ),
            // An empty blob is bound as one, not as NULL.
            Value::Blob([]) => ffi::sqlite3_bind_zeroblob(statement, position, 0),
            Value::Blob(bytes) => ffi::sqlite3_bind_blob64(
                statement,
                position,
                bytes.as_ptr().cast(),
                bytes.len() as ffi::sqlite3_uint64,
                ffi::SQLITE_STATIC(),
            ),
        }
    }
}

/// The error of the call that returned `code`, as rusqlite reports it.
///
/// # Safety
/// `db` must be open.
unsafe fn error(db: *mut ffi::sqlite3, code: c_int) -> rusqlite::Error {
    // SAFETY: `db` is open; the message is copied before any other call on the connection.
    let (extended, message) = unsafe {
        let extended = ffi::sqlite3_extended_errcode(db);
        let message = ffi::sqlite3_errmsg(db);
        let message =
            (!message.is_null()).then(|| CStr::from_ptr(message).to_string_lossy().into_owned());
        (extended, message)
    };
    // The extended code names the same failure as `code`, in more detail.
    let code = if extended & 0xff == code & 0xff {
        extended
    } else {
        code
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(code), message)
}

/// The writer's connection and the statements prepared on it, which are finalized first when
/// it is dropped (fields drop in order), so the connection can close.
pub(super) struct WriterConnection {
    statements: RawStatements,
    connection: Connection,
}

impl WriterConnection {
    pub fn new(connection: Connection) -> Self {
        Self {
            statements: RawStatements::default(),
            connection,
        }
    }

    /// The connection to open a transaction on, and the statements to run inside it.
    pub fn split(&mut self) -> (&mut Connection, &RawStatements) {
        (&mut self.connection, &self.statements)
    }
}

impl Deref for WriterConnection {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.connection
    }
}

impl DerefMut for WriterConnection {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.connection
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection() -> WriterConnection {
        let connection = Connection::open_in_memory().unwrap();
        connection
            .execute_batch(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b BLOB, c INTEGER UNIQUE, d TEXT);",
            )
            .unwrap();
        WriterConnection::new(connection)
    }

    const INSERT: &str = "INSERT INTO t (a, b, c, d) VALUES (?1, ?2, ?3, ?4)";

    /// Each value is stored as bound, though every buffer it was bound from is gone (overwritten
    /// and freed) before it is read back: SQLite kept no pointer into them past the call.
    #[test]
    fn values_bound_in_place_are_stored_whole_and_none_is_kept_past_the_call() {
        let mut writer = connection();
        let (connection, statements) = writer.split();
        for round in 0..3_i64 {
            let mut text = format!("text {round} \u{e9}\u{2028} \0 end");
            let mut bytes = vec![round as u8; 5000];
            let changed = statements
                .execute(
                    connection,
                    INSERT,
                    &[
                        Value::Text(&text),
                        Value::Blob(&bytes),
                        Value::Integer(round),
                        Value::Null,
                    ],
                )
                .unwrap();
            assert_eq!(changed, 1);
            text.clear();
            text.push_str("overwritten, then dropped");
            bytes.fill(0xff);
            drop((text, bytes));
        }
        let empty: &[u8] = &[];
        statements
            .execute(
                connection,
                INSERT,
                &[
                    Value::Text(""),
                    Value::Blob(empty),
                    Value::Integer(9),
                    Value::Text("x"),
                ],
            )
            .unwrap();
        let rows: Vec<(String, Vec<u8>, i64, Option<String>)> = connection
            .prepare("SELECT a, b, c, d FROM t ORDER BY id")
            .unwrap()
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows.len(), 4);
        for (round, row) in rows.iter().take(3).enumerate() {
            assert_eq!(row.0, format!("text {round} \u{e9}\u{2028} \0 end"));
            assert_eq!(row.1, vec![round as u8; 5000]);
            assert_eq!(row.3, None);
        }
        assert_eq!(
            rows[3],
            (String::new(), Vec::new(), 9, Some("x".to_owned()))
        );
        // An empty blob is a blob, not NULL.
        let kind: String = connection
            .query_row("SELECT typeof(b) FROM t WHERE c = 9", [], |row| row.get(0))
            .unwrap();
        assert_eq!(kind, "blob");
    }

    /// A refused statement is rusqlite's error for it, with SQLite's message, and the statement
    /// is usable again afterwards; a wrong number of values is refused before anything runs.
    #[test]
    fn failures_are_the_drivers_errors_and_leave_the_statement_usable() {
        let mut writer = connection();
        let (connection, statements) = writer.split();
        let values = [
            Value::Text("a"),
            Value::Null,
            Value::Integer(1),
            Value::Null,
        ];
        statements.execute(connection, INSERT, &values).unwrap();
        let refused = statements.execute(connection, INSERT, &values).unwrap_err();
        match &refused {
            rusqlite::Error::SqliteFailure(error, Some(message)) => {
                assert_eq!(error.code, rusqlite::ErrorCode::ConstraintViolation);
                assert_eq!(error.extended_code, ffi::SQLITE_CONSTRAINT_UNIQUE);
                assert!(
                    message.contains("UNIQUE constraint failed: t.c"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        let again = [
            Value::Text("b"),
            Value::Null,
            Value::Integer(2),
            Value::Null,
        ];
        assert_eq!(statements.execute(connection, INSERT, &again).unwrap(), 1);
        assert!(matches!(
            statements.execute(connection, INSERT, &again[..3]),
            Err(rusqlite::Error::InvalidParameterCount(3, 4))
        ));
        assert!(matches!(
            statements.execute(connection, "SELECT 1", &[]),
            Err(rusqlite::Error::ExecuteReturnedResults)
        ));
        assert!(matches!(
            statements.execute(connection, "INSERT INTO nowhere VALUES (1)", &[]),
            Err(rusqlite::Error::SqliteFailure(_, Some(message))) if message.contains("no such table")
        ));
        let count: i64 = connection
            .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .unwrap();
        assert_eq!(count, 2);
    }

    /// The same statements inside a transaction that is rolled back leave nothing, and the
    /// connection still closes (its statements are finalized first).
    #[test]
    fn statements_follow_the_transaction_and_let_the_connection_close() {
        let mut writer = connection();
        {
            let (connection, statements) = writer.split();
            let transaction = connection.transaction().unwrap();
            let values = [
                Value::Text("a"),
                Value::Null,
                Value::Integer(1),
                Value::Null,
            ];
            statements.execute(&transaction, INSERT, &values).unwrap();
            transaction.rollback().unwrap();
        }
        let count: i64 = writer
            .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .unwrap();
        assert_eq!(count, 0);
        drop(writer);
    }

    /// A query's first row is read alike with values bound in place and through rusqlite: the
    /// same integers, flags, texts and blobs (empty, NULL and not ASCII included), `None` for no
    /// row, and the same refusals of a column of another type or past the last; the key's buffer
    /// may be gone afterwards.
    #[test]
    fn a_first_row_reads_the_same_in_place_and_through_rusqlite() {
        let mut writer = connection();
        let (connection, raw) = writer.split();
        type Read = (i64, bool, Option<String>, Option<Vec<u8>>);
        let rows: [(&str, &[u8], i64, Option<&str>); 3] = [
            (
                "k\u{e9}y \0 1",
                &[0, 159, 255],
                1,
                Some("caf\u{e9} \u{2028}"),
            ),
            ("key 2", &[], 0, None),
            ("", &[7], 3, Some("")),
        ];
        for (a, b, c, d) in rows {
            raw.execute(
                connection,
                INSERT,
                &[Value::Text(a), Value::Blob(b), Value::Integer(c), d.into()],
            )
            .unwrap();
        }
        raw.execute(
            connection,
            INSERT,
            &[
                Value::Text("no blob"),
                Value::Null,
                Value::Integer(4),
                Value::Null,
            ],
        )
        .unwrap();
        const FIND: &str = "SELECT c, d, b FROM t WHERE a = ?1";
        let read = |row: &dyn RowReader<Error = rusqlite::Error>| -> rusqlite::Result<Read> {
            Ok((
                row.integer(0)?,
                row.flag(0)?,
                row.optional_text(1)?,
                row.optional_bytes(2)?,
            ))
        };
        let transaction = connection.transaction().unwrap();
        for in_place in [true, false] {
            let statements = if in_place {
                super::super::connection::Statements::with_raw(&transaction, raw)
            } else {
                super::super::connection::Statements::new(&transaction)
            };
            for (a, b, c, d) in rows {
                let key = a.to_owned();
                let found = statements
                    .query_first(FIND, &[Value::Text(&key)], read)
                    .unwrap();
                drop(key);
                let expected: Read = (c, c != 0, d.map(str::to_owned), Some(b.to_vec()));
                assert_eq!(found, Some(expected), "in place {in_place}");
            }
            let no_blob = statements
                .query_first(FIND, &[Value::Text("no blob")], read)
                .unwrap();
            assert_eq!(no_blob, Some((4, true, None, None)), "in place {in_place}");
            let missing = statements
                .query_first(FIND, &[Value::Text("absent")], |row| row.integer(0))
                .unwrap();
            assert_eq!(missing, None);
            // Text as an integer, a blob as text, NULL where a value must be, past the last.
            type Refused = fn(&dyn RowReader<Error = rusqlite::Error>) -> bool;
            let refusals: [(&str, Refused); 4] = [
                ("k\u{e9}y \0 1", |row| row.integer(1).is_err()),
                ("k\u{e9}y \0 1", |row| row.optional_text(2).is_err()),
                ("key 2", |row| row.text(1).is_err()),
                ("key 2", |row| row.optional_integer(3).is_err()),
            ];
            for (index, (key, refused)) in refusals.into_iter().enumerate() {
                let read = statements
                    .query_first(FIND, &[Value::Text(key)], |row| Ok(refused(row)))
                    .unwrap();
                assert_eq!(read, Some(true), "refusal {index}, in place {in_place}");
            }
        }
    }
}
