//! Log output of the long-running subcommands (`broker`, `relay`, `agent`): `tracing` events to
//! stderr, filtered by `RUST_LOG` (default `info`), with colour codes only when stderr is a
//! terminal, so log files hold plain text. Does not configure anything per subcommand.

use std::io::IsTerminal as _;

/// Installs the stderr subscriber; a second call (e.g. from tests) changes nothing.
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
