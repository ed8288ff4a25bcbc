//! What a store operation that failed tells its caller: the class of the failure, which decides
//! the answer (503 to retry, 500 for a defect), and the fault beneath it as an error source, which
//! the edge logs once, whole (see [`crate::telemetry::ErrorChain`]).

use std::sync::Arc;

/// The fault beneath a [`StoreError`]. Shared, so that one failed commit can answer every
/// delivery of its batch with the same source.
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot commit now (locked, read-only, disk full, I/O error, unreachable); it
    /// may recover.
    #[error("storage unavailable")]
    Unavailable(#[source] Cause),
    /// Rows this write needs were held by another writer (another replica) for longer than the
    /// lock timeout. The store itself is fine: the caller retries, readiness is not affected.
    #[error("storage busy")]
    Busy(#[source] Cause),
    /// The store is shutting down and takes no more writes.
    #[error("storage is shutting down")]
    Closed,
    /// A fault of this request or of the code (a value that does not convert, a row that cannot
    /// be read, an invariant that did not hold), not of the store as a whole.
    #[error("storage error")]
    Internal(#[source] Cause),
}

impl StoreError {
    /// An internal fault that only a message describes (an invariant that did not hold).
    pub fn internal(message: impl Into<String>) -> Self {
        StoreError::Internal(Arc::new(Fault::new(message)))
    }

    /// The fault beneath, if any.
    pub fn cause(&self) -> Option<&Cause> {
        match self {
            StoreError::Unavailable(cause)
            | StoreError::Busy(cause)
            | StoreError::Internal(cause) => Some(cause),
            StoreError::Closed => None,
        }
    }
}

/// A fault described by what the store was doing or found, with the error that caused it, if
/// any: "the last delivery failed to commit: ...", "the database is read-only: ...".
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Fault {
    message: String,
    #[source]
    source: Option<Cause>,
}

impl Fault {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    pub fn caused_by(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Cause::from(source.into())),
        }
    }

    /// Like [`Fault::caused_by`], for a source already shared.
    pub fn caused_by_shared(message: impl Into<String>, source: Cause) -> Self {
        Self {
            message: message.into(),
            source: Some(source),
        }
    }
}

/// Why a backup was not taken.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// This backend makes no copy itself; the message names the tools that do.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The copy failed; nothing was left at the target.
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync + 'static>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::ErrorChain;

    #[test]
    fn the_chain_names_the_class_then_every_source() {
        let io = std::io::Error::other("disk quota exceeded");
        let error = StoreError::Unavailable(Arc::new(Fault::caused_by("the disk is full", io)));
        assert_eq!(
            ErrorChain(&error).to_string(),
            "storage unavailable: the disk is full: disk quota exceeded"
        );
        assert_eq!(
            ErrorChain(&StoreError::internal("no receipt")).to_string(),
            "storage error: no receipt"
        );
        assert_eq!(
            ErrorChain(&StoreError::Closed).to_string(),
            "storage is shutting down"
        );
    }

    #[test]
    fn a_cloned_error_shares_its_source() {
        let error = StoreError::internal("one failure");
        let copy = error.clone();
        let (Some(first), Some(second)) = (error.cause(), copy.cause()) else {
            panic!("both carry the cause");
        };
        assert!(Arc::ptr_eq(first, second));
    }
}
