//! The `steelyard` binary.
fn main() {}
