//! Steelyard wire types and codecs.
//!
//! This crate defines the bytes that Steelyard's components exchange and how to read and write
//! them: [`ticket`], the broker's Ed25519-signed session tickets and their offline verification
//! by relays, and [`api`], the versioned JSON messages agents and relays exchange with the
//! broker over their WebSockets. (The relay's hello/status framing and probe packets live in
//! `steelyard-relay`'s `wire` module for now.)
//!
//! What it does **not** do: no I/O, no async, no clocks, no randomness and no shared state.
//! Callers pass the current time in (`now`, unix seconds) and keep any state themselves (for
//! example the relay's record of tickets already used).
//!
//! Every decoder is total: any byte string yields a value or an error, never a panic, and
//! reads no more than a documented maximum length.

#![forbid(unsafe_code)]

pub mod api;
pub mod hex;
pub mod ticket;
