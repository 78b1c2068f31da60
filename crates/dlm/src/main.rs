//! `mcfs-dlm`: the lock server. `mcfs-dlm bench` runs the benchmark.

use clap::{Parser, Subcommand};
use mcfs_dlm::config::{ServerConfig, Settings};
use mcfs_dlm::datadir::DataDirLock;
use mcfs_dlm::fence_client::FenceClient;
use mcfs_dlm::net::bind;
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
    #[command(flatten)]
    settings: Settings,
    /// TOML file with any of these settings (same names with `_`; flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Load and check the settings (flags and --config), print a one-line
    /// summary and exit 0, or the error and exit 1; opens and listens on nothing.
    #[arg(long)]
    check_config: bool,
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
        // Colour codes only for a person at a terminal, not in journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
            None if cli.serve.check_config => {
                plan(&cli.serve).await.map(|p| println!("{}", summary(&p, cli.serve.config.as_deref())))
            }
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

/// Everything `serve` needs, resolved and checked, with nothing opened yet.
struct Plan {
    set: Settings,
    cfg: ServerConfig,
    listen: String,
    data_dir: PathBuf,
    secret: Secret,
    fence: FenceClient,
}

/// Flags over the TOML file, every value checked (the secret read, the
/// addresses parsed or resolved), without touching the data directory or any port.
async fn plan(a: &ServeArgs) -> Result<Plan> {
    let file = match &a.config {
        Some(p) => Settings::load(p)?,
        None => Settings::default(),
    };
    let set = file.overlaid(&a.settings);
    let mut cfg = ServerConfig::default();
    set.apply(&mut cfg);
    cfg.validate()?;
    let listen = set.listen.clone().ok_or_else(|| Error::Config("--listen ADDR is required".into()))?;
    let data_dir = set.data_dir.clone().ok_or_else(|| Error::Config("--data-dir DIR is required".into()))?;
    let secret_file =
        set.secret_file.clone().ok_or_else(|| Error::Config("--secret-file FILE is required".into()))?;
    let secret = Secret::from_file(&secret_file).map_err(Error::Config)?;
    for (what, addr) in [("--listen", Some(&listen)), ("--metrics", set.metrics.as_ref())] {
        if let Some(addr) = addr {
            let mut found = tokio::net::lookup_host(addr.as_str())
                .await
                .map_err(|e| Error::Config(format!("{what} {addr} is not an address to listen on: {e}")))?;
            if found.next().is_none() {
                return Err(Error::Config(format!("{what} {addr} resolves to no address")));
            }
        }
    }
    let fence = match (set.fence.clone(), set.no_fencing) {
        (Some(_), true) => return Err(Error::Config("--fence and --no-fencing are exclusive".into())),
        (Some(addr), false) => FenceClient::agent_with(&addr, secret.clone(), cfg.fence.clone())?,
        (None, true) => FenceClient::Disabled,
        (None, false) => {
            return Err(Error::Config(
                "refusing to start without fencing: give --fence ADDR (mcfs-fenced), or --no-fencing for a single-host demo"
                    .into(),
            ))
        }
    };
    Ok(Plan { set, cfg, listen, data_dir, secret, fence })
}

/// `--check-config`: the one line that says what a start would use.
fn summary(p: &Plan, config: Option<&std::path::Path>) -> String {
    let from = config.map(|c| format!("{} and flags", c.display())).unwrap_or_else(|| "flags".into());
    let cluster = match &p.cfg.cluster_name {
        Some(c) => format!("cluster {c} (other clusters' filesystems refused)"),
        None => "any cluster (cluster_name not set)".into(),
    };
    let metrics = p.set.metrics.as_deref().map(|m| format!(", metrics on {m}")).unwrap_or_default();
    format!(
        "mcfs-dlm configuration OK ({from}): listen {}, data dir {}, fencing {}, {cluster}, heartbeat {} ms, lease {} ms, grace {} ms{metrics}",
        p.listen,
        p.data_dir.display(),
        p.fence.describe(),
        p.cfg.heartbeat_ms,
        p.cfg.lease_ms,
        p.cfg.grace_ms,
    )
}

async fn serve(a: ServeArgs) -> Result<()> {
    let Plan { set, cfg, listen, data_dir, secret, fence } = plan(&a).await?;
    if matches!(fence, FenceClient::Disabled) {
        tracing::warn!("*** FENCING IS DISABLED (--no-fencing): a failed node is assumed dead at once. ***");
        tracing::warn!("*** This is only safe when every node is a process on this host that is really gone. ***");
    }
    // Before sled opens it: a second server on one database must be refused
    // naming the first, not by sled's lock error.
    let _dir_lock = DataDirLock::acquire(&data_dir, "mcfs-dlm")?;
    let store = mcfs_dlm::store::Store::open(&data_dir)?;
    let listener = bind(&listen, "mcfs-dlm", None).await.map_err(Error::Startup)?;
    let metrics = match &set.metrics {
        Some(m) => Some(bind(m, "mcfs-dlm", Some("--metrics")).await.map_err(Error::Startup)?),
        None => None,
    };
    let h = mcfs_dlm::service::start(cfg.clone(), store, secret, fence.clone(), listener).await?;
    tracing::info!(
        addr = %h.addr, epoch = h.shared.epoch, data_dir = %data_dir.display(), fencing = %fence.describe(),
        cluster = cfg.cluster_name.as_deref().unwrap_or("(any: cluster_name not set)"),
        heartbeat_ms = cfg.heartbeat_ms, lease_ms = cfg.lease_ms, grace_ms = cfg.grace_ms, "mcfs-dlm listening"
    );
    if let Some(l) = metrics {
        let at = l.local_addr().map_err(|e| Error::Startup(format!("metrics listener: {e}")))?;
        tokio::spawn(mcfs_dlm::service::serve_metrics(h.shared.clone(), l));
        tracing::info!(addr = %at, "serving Prometheus metrics on http://{at}/metrics");
        if let Some(p) = &set.metrics_addr_file {
            write_addr(p, &at.to_string())?;
        }
    }
    if let Some(p) = &set.addr_file {
        write_addr(p, &h.addr.to_string())?;
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

/// Written whole through a rename, so a reader never sees half an address.
fn write_addr(p: &std::path::Path, addr: &str) -> Result<()> {
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .and_then(|_| std::fs::rename(&tmp, p))
        .map_err(|e| Error::Startup(format!("cannot write {}: {e}", p.display())))
}
