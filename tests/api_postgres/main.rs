//! The integration suite on PostgreSQL: the modules of `tests/api` that involve storage, run
//! again with every test app on a fresh schema of the server at `M2M_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), plus what only several replicas can show.
//! SQLite-only modules (file faults, crash on the file, online backup, CLI defaults) stay in
//! `tests/api`.

pub const BACKEND: helpers::Backend = helpers::Backend::Postgres;

#[path = "../api/helpers.rs"]
mod helpers;

#[path = "../api/callbacks.rs"]
mod callbacks;
#[path = "../api/catalog.rs"]
mod catalog;
#[path = "../api/deliveries.rs"]
mod deliveries;
#[path = "../api/events.rs"]
mod events;
#[path = "../api/hardening.rs"]
mod hardening;
#[path = "../api/hostile.rs"]
mod hostile;
#[path = "../api/jobs.rs"]
mod jobs;
#[path = "../api/json_callbacks.rs"]
mod json_callbacks;
#[path = "../api/messages.rs"]
mod messages;
#[path = "../api/observability.rs"]
mod observability;
#[path = "../api/openapi.rs"]
mod openapi;
#[path = "../api/platform.rs"]
mod platform;
#[path = "../api/properties.rs"]
mod properties;
#[path = "../api/reprocess.rs"]
mod reprocess;
#[path = "../api/retention.rs"]
mod retention;
#[path = "../api/secrets.rs"]
mod secrets;
#[path = "../api/simulate.rs"]
mod simulate;
#[path = "../api/store_failures.rs"]
mod store_failures;
#[path = "../api/tls.rs"]
mod tls;
#[path = "../api/upgrade.rs"]
mod upgrade;

mod replicas;
