//! Steelyard wire types and codecs.
//!
//! This crate defines the bytes that Steelyard's components exchange and how to read and write
//! them. Today that is the [`ticket`] module: the broker's Ed25519-signed session tickets and
//! their offline verification by relays. Relay hello and framing, probe packets and API
//! messages will join it.
//!
//! What it does **not** do: no I/O, no async, no clocks, no randomness and no shared state.
//! Callers pass the current time in (`now`, unix seconds) and keep any state themselves (for
//! example the relay's record of tickets already used).
//!
//! Every decoder is total: any byte string yields a value or an error, never a panic, and
//! reads no more than a documented maximum length.

#![forbid(unsafe_code)]

pub mod hex;
pub mod ticket;
