//! `mcfs fence ...` (owned by the fencing work).
use crate::common::ConnArgs;

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Fencing history.
    History {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

pub async fn run(_c: Cmd) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
