//! # m2m-listener
//!
//! Receives ThingSpace M2M callbacks, stores each durably before acknowledging it, and answers what
//! happened to every request and device.
//!
//! # Layout
//! - [`domain`]: what a callback means, free of wire formats and storage.
//! - [`parser`]: wire formats → domain types; pure, no IO.
//! - [`jobs`]: job states and registration; pure.
//! - [`redact`]: secrets masked out of a raw callback body (a lenient, linear byte scan); pure.
//! - [`access`]: the source allow-list and trusted proxies.
//! - [`auth`]: which callback credentials are accepted; the generated pair.
//! - [`private_files`]: files and directories created for their owner only (0600, 0700).
//! - [`storage`]: the [`storage::Store`] interface, the core its SQLite and PostgreSQL backends
//!   share, and the backends (the only SQL).
//! - [`http`]: the callback port and the API port, with graceful shutdown.
//! - [`metrics`]: the Prometheus metrics (bounded labels).
//! - [`outbox`]: the event dispatchers (Standard Webhooks endpoints, NATS JetStream).
//! - [`configuration`]: defaults, TOML file, `M2M_` environment.
//! - [`memory`]: malloc told to return large body buffers to the system.
//! - [`telemetry`]: the log subscriber; [`tls`]: optional native TLS on the callback port.
//! - [`startup`]: wiring everything into an [`startup::Application`].
//! - [`platform`]: the platform's callback registration API, status, rotation, the periodic check.
//! - [`simulate`]: a stand-in for the platform (load, demos, the benchmark).
//! - [`cli`]: the command line; [`client`]: its client for the API.
pub mod access;
pub mod auth;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod configuration;
pub mod domain;
pub mod http;
pub mod jobs;
pub mod memory;
pub mod metrics;
pub mod outbox;
pub mod parser;
pub mod platform;
pub mod private_files;
pub mod redact;
pub mod simulate;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod tls;
