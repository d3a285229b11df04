//! `steelyard relay`: runs a relay (being built; see the relay issue).

/// Flags of `steelyard relay`.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Path of the relay's TOML config.
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
}

/// Runs the relay until it is told to stop.
pub fn run(_args: RelayArgs) -> anyhow::Result<()> {
    anyhow::bail!("the relay is not built yet")
}
