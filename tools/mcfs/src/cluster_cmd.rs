//! `mcfs cluster up|down|status|kill|start|stop`: a local cluster in one
//! command (the logic is in the library's `cluster` module).

use std::path::PathBuf;

use anyhow::{Context, Result};
use mcfs_cli::cluster::{Cluster, ClusterOptions};

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Create an image and loop device, format, start mcfs-fenced, mcfs-dlm and
    /// one mcfs-node per node, mounted under DIR/mnt/nodeN.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Image size (sparse), e.g. 2G.
        #[arg(long, default_value = "2G")]
        size: String,
        #[arg(long, default_value = "./mcfs-cluster")]
        dir: PathBuf,
        /// Memory budget per node, e.g. 256M.
        #[arg(long)]
        cache_mem: Option<String>,
        /// Eviction mode of the nodes: nonblocking (default) or sync.
        #[arg(long)]
        evict: Option<String>,
        /// Journals to make (default nodes + 1).
        #[arg(long)]
        journals: Option<u32>,
        /// Where mcfs-dlm, mcfs-fenced and mcfs-node are (default: next to this
        /// binary; built first when that is this workspace's target directory).
        #[arg(long, env = "MCFS_BIN_DIR")]
        bin_dir: Option<PathBuf>,
    },
    /// Unmount, stop the daemons, detach the loop device (idempotent).
    Down {
        #[arg(long, default_value = "./mcfs-cluster")]
        dir: PathBuf,
    },
    /// SIGKILL a node (a crash): the cluster fences it and replays its journal.
    Kill {
        node: u32,
        #[arg(long, default_value = "./mcfs-cluster")]
        dir: PathBuf,
    },
    /// Start a node again (after kill or stop).
    Start {
        node: u32,
        #[arg(long, default_value = "./mcfs-cluster")]
        dir: PathBuf,
    },
    /// Cleanly unmount one node.
    Stop {
        node: u32,
        #[arg(long, default_value = "./mcfs-cluster")]
        dir: PathBuf,
    },
}

/// The daemons every local cluster runs.
const DAEMONS: [&str; 3] = ["mcfs-node", "mcfs-dlm", "mcfs-fenced"];

/// The directory of the daemons: `--bin-dir`, or next to this binary. When this
/// binary runs from this workspace's target directory (`cargo run --bin mcfs --
/// cluster up`), build the daemons first, in this binary's profile, so the
/// cluster never runs stale ones; `MCFS_SKIP_BUILD` (set by tools/test, whose
/// caller built everything already) skips that.
fn bin_dir(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return check_bin_dir(dir, "--bin-dir");
    }
    let exe = std::env::current_exe().context("cannot find the mcfs binary's directory")?;
    let dir = exe.parent().context("mcfs binary has no directory")?.to_path_buf();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let in_workspace = std::fs::canonicalize(&target).ok().is_some_and(|t| dir.starts_with(&t));
    if in_workspace && std::env::var_os("MCFS_SKIP_BUILD").is_none() {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--workspace", "--bins", "--quiet"]).current_dir(&root);
        if release {
            cmd.arg("--release");
        }
        println!("building the daemons ({} profile)...", if release { "release" } else { "debug" });
        let st = cmd.status().context("running cargo build")?;
        if !st.success() {
            anyhow::bail!("building the daemons failed (see the errors above)");
        }
    }
    check_bin_dir(dir, "the directory of this mcfs binary")
}

/// Every daemon must be there before anything is created.
fn check_bin_dir(dir: PathBuf, what: &str) -> Result<PathBuf> {
    let missing: Vec<&str> = DAEMONS.iter().copied().filter(|d| !dir.join(d).is_file()).collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "{} ({what}) has no {}: build them (`cargo build --release --workspace --bins`) and pass their directory with --bin-dir (or MCFS_BIN_DIR)",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(dir)
}

pub fn run(c: Cmd) -> Result<()> {
    match c {
        Cmd::Up { nodes, size, dir, cache_mem, evict, journals, bin_dir: explicit } => {
            // What can be refused at once is refused before a (slow) build.
            let size = mcfs_node::config::parse_size(&size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
            mcfs_cli::cluster::preflight()?;
            if let Ok(c) = Cluster::open(&dir) {
                if c.anything_running() {
                    anyhow::bail!("a cluster is already running in {} (run `mcfs cluster down --dir {}` first)", c.f.dir.display(), dir.display());
                }
            }
            let mut o = ClusterOptions::new(&dir, nodes, bin_dir(explicit)?);
            o.size = size;
            o.journals = journals;
            o.verbose = true;
            if let Some(m) = cache_mem {
                o.node_args.extend(["--cache-mem".into(), m]);
            }
            if let Some(e) = evict {
                o.node_args.extend(["--evict".into(), e]);
            }
            println!("starting an mcfs cluster of {nodes} nodes in {}", dir.display());
            let c = Cluster::up(&o)?;
            print_summary(&c);
            Ok(())
        }
        Cmd::Down { dir } => {
            match Cluster::open(&dir) {
                Ok(c) => {
                    c.down()?;
                    println!("mcfs cluster in {} is down", c.f.dir.display());
                }
                Err(_) => println!("no cluster in {} (nothing to do)", dir.display()),
            }
            Ok(())
        }
        Cmd::Kill { node, dir } => {
            let c = Cluster::open(&dir)?;
            let pid = c.kill(node)?;
            println!("node {node} (pid {pid}) killed; watch its recovery with `mcfs status`");
            Ok(())
        }
        Cmd::Start { node, dir } => {
            let c = Cluster::open(&dir)?;
            c.start(node)?;
            println!("node {node} mounted on {}", c.mountpoint(node).display());
            Ok(())
        }
        Cmd::Stop { node, dir } => {
            let c = Cluster::open(&dir)?;
            c.stop(node)?;
            println!("node {node} unmounted");
            Ok(())
        }
    }
}

fn print_summary(c: &Cluster) {
    let f = &c.f;
    let d = f.dir.display();
    println!();
    println!("mcfs cluster is up: {} nodes, lockspace {}", f.nodes, f.lockspace);
    for n in 1..=f.nodes {
        println!("  node {n}: {}   (log {})", c.mountpoint(n).display(), c.log(&format!("node{n}")).display());
    }
    println!("  device:       {} (sparse image {}, direct I/O)", c.device().display(), f.image.display());
    if let (Some(dlm), Some(fence)) = (&f.dlm_addr, &f.fence_addr) {
        println!("  lock server:  mcfs-dlm on {dlm}   (log {})", c.log("dlm").display());
        println!("  fencing:      mcfs-fenced on {fence}   (log {})", c.log("fenced").display());
    }
    println!("  configs:      {d}/cluster.toml, {d}/node1.toml ..., {d}/fence.toml, secret {d}/secret");
    println!();
    println!("try:");
    println!("  echo hello > {}/hello && cat {}/hello", c.mountpoint(1).display(), c.mountpoint(f.nodes).display());
    println!("  mcfs status --cluster-dir {d}");
    if f.nodes > 1 {
        println!("  mcfs cluster kill 2 --dir {d}    (then watch fencing and replay in mcfs status)");
        println!("  mcfs cluster start 2 --dir {d}");
    }
    println!("stop with:");
    println!("  mcfs cluster down --dir {d}");
}
