//! Herald: a realtime WebSocket fan-out gateway.
//!
//! # Layout
//!
//! - [`config`]: the typed, validated configuration (YAML + `HERALD_*` env).
//! - [`error`]: client error codes and close codes, with their metric labels.
//! - [`protocol`]: the wire contract as types and byte encoders; no IO.
//! - [`auth`]: JWT -> [`auth::Claims`].
//! - [`membership`]: who may subscribe to which chat.
//! - [`bans`]: revocations and removals, remembered for `auth.max_token_ttl`.
//! - [`rooms`]: the room registry: per room a live ring and a history of
//!   pre-encoded frames, and the subscribers waiting for its ring.
//! - [`mailbox`]: a connection's signal hub (per-user frames, shutdown,
//!   alarms, nudges).
//! - [`users`]: the user registry: user -> mailboxes of its connections.
//! - [`backlog`]: frames owed to this node's readers, the signal that pushes
//!   back on publishers under overload.
//! - [`broadcast`]: domain event -> client frame -> registries.
//! - [`bus`]: how accepted events reach every node (memory, Redis).
//! - [`conn`]: one task per WebSocket: reads commands, writes frames.
//! - [`alarms`]: the node's one timer for every connection's deadlines.
//! - [`node`]: the node's shared state, built once; the load sensor and the
//!   history sweeper.
//! - [`http`]: `/ws`, `/api/events`, `/api/info`, `/healthz`, `/readyz`,
//!   `/metrics`, and the browser's files and demo page; which listener
//!   serves which route.
//! - [`server`]: builds the node, runs the accept loop (with the load sensor
//!   and the history sweeper), limits and graceful drain.
//! - [`metrics`]: counters and their Prometheus rendering; [`striped`]: the
//!   per-thread counters and latency histograms the delivery path adds to.
//! - [`process`]: this process's memory, CPU, file descriptors and start
//!   time from `/proc`, for `/metrics`.
//! - [`cmd`]: the command line and the operator subcommands (token, check-token,
//!   check-config, init).
//! - [`demo`]: what a run generates for itself, the embedded default's demo, and their banners.
//! - `sync`: the one poison-tolerant way to take a mutex.

pub mod alarms;
pub mod auth;
pub mod backlog;
pub mod bans;
pub mod broadcast;
pub mod bus;
pub mod cmd;
pub mod config;
pub mod conn;
pub mod demo;
pub mod error;
pub mod http;
pub mod mailbox;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod process;
pub mod protocol;
pub mod rooms;
pub mod server;
pub mod striped;
mod sync;
pub mod users;

pub use config::Config;
