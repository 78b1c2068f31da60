//! `mcfs`: the operator's command. One module per subcommand family; each exposes
//! an `Args` (clap) and `run`. Connection flags shared by every subcommand that
//! talks to a daemon live in `common`.

mod common;
mod fence;
mod locks;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mcfs", version, about = "mcfs cluster filesystem: status, locks, fencing, local cluster")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Dump lockspaces, members, resources and queues of mcfs-dlm.
    Locks(locks::Args),
    /// Fencing: history, status, manual acknowledgement, unfence.
    #[command(subcommand)]
    Fence(fence::Cmd),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcfs: cannot start runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let res = rt.block_on(async {
        match cli.cmd {
            Cmd::Locks(a) => locks::run(a).await,
            Cmd::Fence(c) => fence::run(c).await,
        }
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcfs: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
