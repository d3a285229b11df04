//! Steelyard's broker: the control plane that peers and relays register with.
//!
//! * Agents and relays each hold one WebSocket ([`steelyard_proto::api`] messages). They
//!   enroll once with a token and an Ed25519 key, and prove that key on every later connection
//!   by signing a challenge.
//! * Agents get a report schedule and the relay map, and report what they measure; relays
//!   stream their load. Both feed the selection engine ([`steelyard_select::Selector`]).
//! * When peer A asks for peer B, the broker decides, creates a session, signs one ticket per
//!   side with its key (published at `GET /v1/keys`), offers the session to B and answers A.
//! * Operators get an admin API (bearer token), `GET /v1/explain`, `/metrics` and
//!   `/openapi.json`. Durable state goes to a [`steelyard_store::Store`].
//!
//! Layout: [`core`] holds the logic, sans-I/O; [`server`] is the thin axum/tokio layer;
//! [`config`] reads the TOML; [`keys`] keeps the signing key; [`metrics`] counts.
//!
//! What it does not do: it never carries tunnel traffic (relays do), never reads a relay's
//! traffic, and does not share live state between several brokers (a later store backend).

#![forbid(unsafe_code)]

pub mod config;
pub mod core;
pub mod keys;
pub mod metrics;
pub mod openapi;
pub mod server;
pub mod ws;

pub use config::BrokerConfig;
pub use server::{start, RunningBroker, StartError};
