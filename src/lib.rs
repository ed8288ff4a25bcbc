//! # m2m-listener
//!
//! Receives ThingSpace M2M callbacks, stores each durably before acknowledging it, and answers what
//! happened to every request and device.
//!
//! # Layout
//! - [`domain`]: what a callback means, free of wire formats and storage.
//! - [`parser`]: wire formats → domain types; pure, no IO.
pub mod domain;
pub mod parser;
