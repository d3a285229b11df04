//! `steelyard broker`: runs the broker (being built; see the broker issue).

/// Flags of `steelyard broker`.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// Path of the broker's TOML config.
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
}

/// Runs the broker until it is told to stop.
pub fn run(_args: BrokerArgs) -> anyhow::Result<()> {
    anyhow::bail!("the broker is not built yet")
}
