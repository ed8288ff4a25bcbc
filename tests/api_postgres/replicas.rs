//! Several replicas on one database.
