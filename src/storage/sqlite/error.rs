//! SQLite failures classified: a fault of the database as a whole (the batch cannot commit; the
//! store may recover), or of one delivery or request.

use std::sync::Arc;

use rusqlite::ErrorCode;

use crate::storage::{Cause, Fault, StoreError};

fn error_code(error: &rusqlite::Error) -> Option<ErrorCode> {
    match error {
        rusqlite::Error::SqliteFailure(failure, _) => Some(failure.code),
        _ => None,
    }
}

/// Faults of the database as a whole, not of one delivery: the batch cannot commit.
pub(super) fn is_storage_wide(error: &rusqlite::Error) -> bool {
    matches!(
        error_code(error),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::ReadOnly
                | ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen
                | ErrorCode::DatabaseCorrupt
                | ErrorCode::NotADatabase
                | ErrorCode::OutOfMemory
        )
    )
}

/// A fault of one delivery or request (a defect), not of the database as a whole.
pub(super) fn is_own_fault(error: &rusqlite::Error) -> bool {
    !is_storage_wide(error)
}

/// A storage-wide fault after which the writer's connection may be unusable (read-only file,
/// I/O error): it is reopened for the next batch. A lock held elsewhere is only waited out.
pub(super) fn needs_reopen(error: &rusqlite::Error) -> bool {
    is_storage_wide(error)
        && !matches!(
            error_code(error),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
        )
}

/// What an operator should read first, for the faults whose SQLite message says little.
fn hint(error: &rusqlite::Error) -> Option<&'static str> {
    match error_code(error)? {
        ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => Some(
            "the database is locked by another connection for longer than storage.busy_timeout_ms",
        ),
        ErrorCode::ReadOnly => Some("the database is read-only"),
        ErrorCode::DiskFull => Some("the disk (or the database's page limit) is full"),
        _ => None,
    }
}

/// The error as a [`Cause`]: behind its hint when it has one.
pub(super) fn cause(error: rusqlite::Error) -> Cause {
    match hint(&error) {
        Some(hint) => Arc::new(Fault::caused_by(hint, error)),
        None => Arc::new(error),
    }
}

/// The error classified: storage-wide faults are [`StoreError::Unavailable`], the others
/// [`StoreError::Internal`].
pub(super) fn store_error(error: rusqlite::Error) -> StoreError {
    if is_storage_wide(&error) {
        StoreError::Unavailable(cause(error))
    } else {
        StoreError::Internal(cause(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::ErrorChain;

    fn failure(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn a_locked_database_is_unavailable_with_its_hint_and_is_not_reopened() {
        let error = failure(rusqlite::ffi::SQLITE_BUSY);
        assert!(!needs_reopen(&error));
        let error = store_error(error);
        assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
        assert!(
            ErrorChain(&error)
                .to_string()
                .starts_with("storage unavailable: the database is locked by another connection"),
            "{}",
            ErrorChain(&error)
        );
    }

    #[test]
    fn a_read_only_database_is_reopened() {
        assert!(needs_reopen(&failure(rusqlite::ffi::SQLITE_READONLY)));
    }

    #[test]
    fn a_value_that_does_not_convert_is_internal() {
        let error = rusqlite::Error::InvalidColumnType(
            3,
            "label".to_owned(),
            rusqlite::types::Type::Integer,
        );
        let error = store_error(error);
        assert!(matches!(error, StoreError::Internal(_)), "{error:?}");
        assert!(
            ErrorChain(&error).to_string().contains("label"),
            "{}",
            ErrorChain(&error)
        );
    }
}
