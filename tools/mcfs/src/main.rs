//! `mcfs`: the operator's command. One module per subcommand family; each exposes
//! an `Args` (clap) and `run`. Connection flags shared by every subcommand that
//! talks to a daemon live in `common`.

mod cluster_cmd;
mod common;
mod fence;
mod locks;
mod status;

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
    /// A local cluster on this machine: up, down, kill, start, stop.
    #[command(subcommand)]
    Cluster(cluster_cmd::Cmd),
    /// Members, leases, recoveries, fencing, and each node's mount, journal,
    /// cache and deferred-eviction counters.
    Status(status::Args),
    /// Dump one node's glocks (state, holders, waiters), like GFS2's debugfs.
    Glocks(status::GlocksArgs),
    /// Every benchmark, side by side with its reference, in one table.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Only these groups: blockdev, dlm, mount, smallfiles, failover, stall.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Smaller sizes, shorter runs.
    #[arg(long)]
    quick: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Cmd::Bench(b) = &cli.cmd {
        let bin_dir = match std::env::current_exe() {
            Ok(p) => p.parent().map(|d| d.to_path_buf()).unwrap_or_default(),
            Err(e) => {
                eprintln!("mcfs: {e}");
                return std::process::ExitCode::from(1);
            }
        };
        let o = mcfs_cli::bench::BenchOpts { only: b.only.clone(), quick: b.quick, bin_dir };
        return match mcfs_cli::bench::run(&o) {
            Ok(rows) => {
                if b.json {
                    println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
                } else {
                    print!("{}", mcfs_cli::bench::render(&rows));
                }
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mcfs bench: {e:#}");
                std::process::ExitCode::from(1)
            }
        };
    }
    if let Cmd::Cluster(c) = cli.cmd {
        // blocking work (processes, mounts): no runtime needed
        return match cluster_cmd::run(c) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mcfs: {e:#}");
                std::process::ExitCode::from(1)
            }
        };
    }
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
            Cmd::Status(a) => status::run(a).await,
            Cmd::Glocks(a) => status::glocks(a).await,
            Cmd::Cluster(_) | Cmd::Bench(_) => Ok(()),
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
