//! PostgreSQL failures classified: the database as a whole (unreachable, out of space...), rows
//! held by another replica, a conflict to run again, or a fault of one request; and shown without
//! the server's DETAIL, which can quote row values.

use std::fmt;
use std::sync::Arc;

use crate::storage::{Fault, StoreError};

/// A PostgreSQL error as a log line or API message: the server's message and SQLSTATE, never its
/// DETAIL or HINT (which can quote row values, callback passwords among them). An error of the
/// server has no source (the driver's shows the DETAIL); the others (I/O, TLS, a value that does
/// not convert) keep theirs.
#[derive(Debug)]
pub(super) struct DatabaseError(tokio_postgres::Error);

impl fmt::Display for DatabaseError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_db_error() {
            Some(db) => write!(
                formatter,
                "{} (SQLSTATE {})",
                db.message(),
                db.code().code()
            ),
            None => write!(formatter, "{}", self.0),
        }
    }
}

impl std::error::Error for DatabaseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.0.as_db_error() {
            Some(_) => None,
            None => std::error::Error::source(&self.0),
        }
    }
}

impl From<tokio_postgres::Error> for DatabaseError {
    fn from(error: tokio_postgres::Error) -> Self {
        DatabaseError(error)
    }
}

/// Faults of the database as a whole (unreachable, shutting down, out of space, read-only,
/// locked for too long), not of one delivery.
fn is_storage_wide(error: &tokio_postgres::Error) -> bool {
    let Some(code) = error.code() else {
        // No SQLSTATE: the connection broke, or could not be made or secured; unless a value did
        // not convert, which is a defect of this delivery.
        let message = error.to_string();
        return !(message.starts_with("error serializing")
            || message.starts_with("error deserializing"));
    };
    let code = code.code();
    ["08", "53", "57", "58", "40", "3D", "28"]
        .iter()
        .any(|class| code.starts_with(class))
        || matches!(code, "25006" | "55006" | "25P03")
}

/// A transaction that meets a deadlock or serialization failure is run this often in all.
pub(super) const RETRIES: usize = 3;

/// A deadlock or serialization failure: the transaction can simply be run again.
pub(super) fn is_retryable(error: &tokio_postgres::Error) -> bool {
    error
        .code()
        .is_some_and(|code| matches!(code.code(), "40001" | "40P01"))
}

pub(super) fn store_error(error: tokio_postgres::Error) -> StoreError {
    // A lock timeout: rows of this write were held by another replica's transaction (a busy job,
    // an operator's open transaction), not a fault of the database.
    let busy = error.code().is_some_and(|code| code.code() == "55P03");
    let storage_wide = is_storage_wide(&error);
    let cause = Arc::new(DatabaseError(error));
    if busy {
        StoreError::Busy(cause)
    } else if storage_wide {
        StoreError::Unavailable(cause)
    } else {
        StoreError::Internal(cause)
    }
}

pub(super) fn pool_error(error: deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Backend(error) => store_error(error),
        other => {
            StoreError::Unavailable(Arc::new(Fault::caused_by("no database connection", other)))
        }
    }
}

/// Why a write failed: the database said no, or an invariant of the write did not hold.
pub(super) enum Failure {
    Db(tokio_postgres::Error),
    Defect(&'static str),
}

impl Failure {
    pub(super) fn into_store_error(self) -> StoreError {
        match self {
            Failure::Db(error) => store_error(error),
            Failure::Defect(message) => StoreError::internal(message),
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Self {
        Failure::Db(error)
    }
}
