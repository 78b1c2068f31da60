//! `mcfs-dlm`: the lock server. `mcfs-dlm bench` runs the benchmark.

use clap::{Parser, Subcommand};
use mcfs_dlm::config::{FileConfig, ServerConfig};
use mcfs_dlm::fence_client::FenceClient;
use mcfs_dlm::{Error, Result};
use mcfs_proto::auth::Secret;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "mcfs-dlm", version, about = "mcfs distributed lock manager", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// Address to listen on (host:port; port 0 picks one).
    #[arg(long)]
    listen: Option<String>,
    /// Directory of the sled database.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// File holding the cluster secret.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Address of mcfs-fenced.
    #[arg(long, conflicts_with = "no_fencing")]
    fence: Option<String>,
    /// Treat every fence as done at once. UNSAFE: single-host demos only.
    #[arg(long)]
    no_fencing: bool,
    /// Write the bound address (host:port) here once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// TOML file with any of these settings (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    heartbeat_ms: Option<u32>,
    #[arg(long)]
    lease_ms: Option<u32>,
    /// Grace window after a restart for members to reclaim their locks.
    #[arg(long)]
    grace_ms: Option<u32>,
    #[arg(long)]
    max_sessions: Option<usize>,
    #[arg(long)]
    max_locks_per_node: Option<usize>,
    #[arg(long)]
    max_pending_per_node: Option<usize>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure lock throughput, grant latency and EX handoffs; print a table.
    Bench {
        /// Benchmark a running server instead of one started in this process.
        #[arg(long)]
        addr: Option<String>,
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Seconds per benchmark.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcfs-dlm: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let res = rt.block_on(async {
        match cli.cmd {
            Some(Cmd::Bench { addr, secret_file, seconds, json }) => bench(addr, secret_file, seconds, json).await,
            None => serve(cli.serve).await,
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcfs-dlm: {e}");
            ExitCode::from(1)
        }
    }
}

async fn bench(addr: Option<String>, secret_file: Option<PathBuf>, seconds: f64, json: bool) -> Result<()> {
    let secret = secret_file.map(|p| Secret::from_file(&p).map_err(Error::Config)).transpose()?;
    let opts = mcfs_dlm::bench::BenchOptions {
        addr,
        secret,
        duration: std::time::Duration::from_secs_f64(seconds.max(0.1)),
        ..Default::default()
    };
    let rows = mcfs_dlm::bench::run(&opts).await?;
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"benchmark": r.name, "measured": r.measured, "unit": r.unit, "target": r.target, "ok": r.ok}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).map_err(|e| Error::Internal(e.to_string()))?);
    } else {
        print!("{}", mcfs_dlm::bench::render(&rows));
    }
    Ok(())
}

async fn serve(a: ServeArgs) -> Result<()> {
    let file = match &a.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let mut cfg = ServerConfig::default();
    file.apply(&mut cfg);
    if let Some(v) = a.heartbeat_ms {
        cfg.heartbeat_ms = v;
    }
    if let Some(v) = a.lease_ms {
        cfg.lease_ms = v;
    }
    if let Some(v) = a.grace_ms {
        cfg.grace_ms = v;
    }
    if let Some(v) = a.max_sessions {
        cfg.max_sessions = v;
    }
    if let Some(v) = a.max_locks_per_node {
        cfg.limits.max_locks_per_node = v;
    }
    if let Some(v) = a.max_pending_per_node {
        cfg.limits.max_pending_per_node = v;
    }
    cfg.validate()?;
    let listen = a.listen.or(file.listen).ok_or_else(|| Error::Config("--listen ADDR is required".into()))?;
    let data_dir = a.data_dir.or(file.data_dir).ok_or_else(|| Error::Config("--data-dir DIR is required".into()))?;
    let secret_file =
        a.secret_file.or(file.secret_file).ok_or_else(|| Error::Config("--secret-file FILE is required".into()))?;
    let secret = Secret::from_file(&secret_file).map_err(Error::Config)?;
    let no_fencing = a.no_fencing || file.no_fencing.unwrap_or(false);
    let fence = match (a.fence.or(file.fence), no_fencing) {
        (Some(_), true) => return Err(Error::Config("--fence and --no-fencing are exclusive".into())),
        (Some(addr), false) => FenceClient::agent(&addr, secret.clone())?,
        (None, true) => {
            tracing::warn!("*** FENCING IS DISABLED (--no-fencing): a failed node is assumed dead at once. ***");
            tracing::warn!("*** This is only safe when every node is a process on this host that is really gone. ***");
            FenceClient::Disabled
        }
        (None, false) => {
            return Err(Error::Config(
                "refusing to start without fencing: give --fence ADDR (mcfs-fenced), or --no-fencing for a single-host demo"
                    .into(),
            ))
        }
    };
    let addr_file = a.addr_file.or(file.addr_file);
    let store = mcfs_dlm::store::Store::open(&data_dir)?;
    let listener =
        tokio::net::TcpListener::bind(&listen).await.map_err(|e| Error::Config(format!("cannot listen on {listen}: {e}")))?;
    let h = mcfs_dlm::service::start(cfg.clone(), store, secret, fence.clone(), listener).await?;
    tracing::info!(
        addr = %h.addr, epoch = h.shared.epoch, data_dir = %data_dir.display(), fencing = %fence.describe(),
        heartbeat_ms = cfg.heartbeat_ms, lease_ms = cfg.lease_ms, grace_ms = cfg.grace_ms, "mcfs-dlm listening"
    );
    if let Some(p) = addr_file {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", h.addr))
            .and_then(|_| std::fs::rename(&tmp, &p))
            .map_err(|e| Error::Config(format!("cannot write {}: {e}", p.display())))?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Internal(format!("signal handler: {e}")))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        r = h.task => { if let Err(e) = r { return Err(Error::Internal(format!("server task: {e}"))); } }
    }
    tracing::info!("mcfs-dlm stopping");
    Ok(())
}
