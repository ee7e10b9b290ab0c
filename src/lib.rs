//! Herald: a realtime WebSocket fan-out gateway.
//!
//! # Layout
//!
//! - [`config`]: the typed, validated configuration (YAML + `HERALD_*` env).
//! - [`protocol`]: the wire contract as types and byte encoders; no IO.
//! - [`auth`]: JWT -> [`auth::Claims`].
//! - [`membership`]: who may subscribe to which chat.
//! - [`rooms`]: room and user registries of pre-encoded frames.
//! - [`broadcast`]: domain event -> client frame -> registries.
//! - [`bus`]: how accepted events reach every node (memory, Redis).
//! - [`conn`]: one task per WebSocket: reads commands, writes frames.
//! - [`http`]: `/ws`, `/api/events`, `/healthz`, `/metrics`.
//! - [`server`]: accept loop, limits and graceful drain.
//! - [`metrics`]: counters and their Prometheus rendering.
//! - [`cmd`]: the command line and the operator subcommands (token, check-token,
//!   check-config, init).
//! - [`demo`]: what the embedded default generates for a run, and its banner.

pub mod auth;
pub mod broadcast;
pub mod bus;
pub mod cmd;
pub mod config;
pub mod conn;
pub mod demo;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod protocol;
pub mod rooms;
pub mod server;

pub use config::Config;
