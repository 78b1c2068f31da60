//! `mcfs locks`: dump of mcfs-dlm state (owned by the lock-manager work).
use crate::common::ConnArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub async fn run(_a: Args) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
