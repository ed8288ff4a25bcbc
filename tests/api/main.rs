//! Integration tests against the real listener: port 0, a temporary SQLite file, real payloads.
//! `tests/api_postgres` runs the same modules on PostgreSQL.

pub const BACKEND: helpers::Backend = helpers::Backend::Sqlite;

mod backup;
mod binary;
mod callbacks;
mod catalog;
mod crash;
mod deliveries;
mod edges;
mod events;
mod file_modes;
mod hardening;
mod helpers;
mod hostile;
mod integrity;
mod jobs;
mod json_callbacks;
mod messages;
mod observability;
mod openapi;
mod platform;
mod properties;
mod reprocess;
mod retention;
mod secrets;
mod simulate;
mod storage_faults;
mod store_failures;
mod tls;
mod upgrade;
