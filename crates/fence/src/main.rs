//! `mcfs-fenced`: the fencing agent daemon. See the crate documentation
//! (`crates/fence/src/lib.rs`) and docs/RECOVERY.md "# Fencing".

use clap::Parser;
use mcfs_dlm::datadir::DataDirLock;
use mcfs_dlm::net::bind;
use mcfs_fence::config::ServerSettings;
use mcfs_fence::{Config, Engine, FenceError, FencerService};
use mcfs_proto::auth::Secret;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mcfs-fenced",
    version,
    about = "mcfs fencing agent: cuts failed nodes off the shared disk on request of mcfs-dlm"
)]
struct Args {
    /// Address to serve gRPC on (host:port; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7791")]
    listen: String,
    /// Fencing configuration (TOML: nodes and their levels).
    #[arg(long)]
    config: PathBuf,
    /// Directory of the durable fence log (sled).
    #[arg(long)]
    data_dir: PathBuf,
    /// File holding the cluster secret.
    #[arg(long)]
    secret_file: PathBuf,
    /// Write the bound address (host:port) here once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Validate the configuration, print what would be used, and exit.
    #[arg(long)]
    check_config: bool,
    /// Daemon bounds and metrics (also the `[server]` table of --config; flags win).
    #[command(flatten)]
    server: ServerSettings,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcfs-fenced: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcfs-fenced: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let secret = Secret::from_file(&args.secret_file)?;
    let mut cfg = Config::load(&args.config).map_err(|e| e.to_string())?;
    cfg.server = cfg.server.overlaid(&args.server);
    cfg.server.validate()?;
    let server = cfg.server.clone();
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    for n in cfg.nodes.values() {
        for (i, l) in n.levels.iter().enumerate() {
            tracing::info!(node = n.id, name = %n.name, level = i + 1, "{}", l.describe());
        }
    }
    if args.check_config {
        println!(
            "{}: {} node(s) configured: {}",
            args.config.display(),
            cfg.nodes.len(),
            cfg.known_nodes()
        );
        return Ok(());
    }
    // Before sled opens it: a second daemon on one fence log must be refused
    // naming the first, not by sled's lock error. Held until exit.
    let _dir_lock =
        DataDirLock::acquire(&args.data_dir, "mcfs-fenced").map_err(|e| e.to_string())?;
    let engine = Engine::open(cfg, &args.data_dir)
        .await
        .map_err(|e| match e {
            FenceError::DataDirInUse(_) => e.to_string(),
            e => format!("data dir {}: {e}", args.data_dir.display()),
        })?;
    let listener = bind(&args.listen, "mcfs-fenced", None).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    if let Some(m) = &server.metrics {
        let l = bind(m, "mcfs-fenced", Some("--metrics")).await?;
        let at = l
            .local_addr()
            .map_err(|e| format!("metrics address: {e}"))?;
        let e = engine.clone();
        let render: mcfs_dlm::net::metrics::Render =
            std::sync::Arc::new(move || e.render_metrics());
        tokio::spawn(mcfs_dlm::net::metrics::serve(l, render));
        tracing::info!(addr = %at, "serving Prometheus metrics on http://{at}/metrics");
        if let Some(f) = &server.metrics_addr_file {
            write_addr(f, &at.to_string())?;
        }
    }
    tracing::info!(%addr, data_dir = %args.data_dir.display(), "mcfs-fenced listening");
    if let Some(f) = &args.addr_file {
        write_addr(f, &addr.to_string())?;
    }
    let limits = mcfs_dlm::net::listener::ListenerLimits {
        max_connections: server.max_connections(),
        handshake_timeout: server.handshake_timeout(),
    };
    let incoming = mcfs_dlm::net::listener::incoming(
        listener,
        limits,
        engine.metrics().conn.clone(),
        "mcfs-fenced",
    );
    // Every Fencer call is short (Fence only starts an operation), so one
    // deadline for all of them bounds a peer that stalls mid-request.
    tonic::transport::Server::builder()
        .timeout(server.request_timeout())
        .max_concurrent_streams(Some(server.max_streams_per_connection()))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(FencerService::new(engine, secret).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown())
        .await
        .map_err(|e| format!("gRPC server: {e}"))?;
    tracing::info!("mcfs-fenced stopped");
    Ok(())
}

/// Written whole through a rename, so a reader never sees half an address.
fn write_addr(f: &std::path::Path, addr: &str) -> Result<(), String> {
    let tmp = f.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .and_then(|()| std::fs::rename(&tmp, f))
        .map_err(|e| format!("cannot write {}: {e}", f.display()))
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
    tracing::info!("shutting down on signal");
}
