//! The lock server benchmark (`mcfs-dlm bench`, later `mcfs bench`).
//!
//! 1. Uncontended lock+unlock pairs: 2 clients (sessions), 64 requests in
//!    flight in total, each on its own resource; grant latency is the time a
//!    `lock()` call takes.
//! 2. EX ping-pong: two clients take turns on one resource, each giving it up
//!    only when the blocking callback says the other waits. A handoff is one
//!    grant.
//!
//! Both go through the real client library, real gRPC and the real server
//! (started in this process unless an address is given).

use crate::client::{ClientConfig, ClientEvent, DlmClient};
use crate::config::ServerConfig;
use crate::core::Mode;
use crate::error::{Error, Result};
use crate::fence_client::FenceClient;
use mcfs_proto::auth::Secret;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// A running server; None starts one in this process (no fencing, temp dir).
    pub addr: Option<String>,
    pub secret: Option<Secret>,
    /// Measuring time of each benchmark.
    pub duration: Duration,
    pub clients: usize,
    /// Requests in flight across all clients.
    pub in_flight: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { addr: None, secret: None, duration: Duration::from_secs(3), clients: 2, in_flight: 64 }
    }
}

#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub measured: f64,
    pub unit: String,
    pub target: String,
    pub ok: bool,
}

/// Run both benchmarks; returns the table rows.
pub async fn run(opts: &BenchOptions) -> Result<Vec<Row>> {
    let mut tmp = None;
    let (addr, secret) = match (&opts.addr, &opts.secret) {
        (Some(a), Some(s)) => (a.clone(), s.clone()),
        (Some(_), None) => return Err(Error::Config("--addr needs --secret-file".into())),
        _ => {
            let dir = std::env::temp_dir().join(format!("mcfs-dlm-bench-{}-{}", std::process::id(), crate::unix_ms()));
            let secret = Secret::new(format!("bench{}", crate::unix_ms())).map_err(Error::Config)?;
            let store = crate::store::Store::open(&dir)?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| Error::Config(format!("bind: {e}")))?;
            let h = crate::service::start(ServerConfig::default(), store, secret.clone(), FenceClient::Disabled, listener)
                .await?;
            tmp = Some(TempDir(dir));
            (h.addr.to_string(), secret)
        }
    };
    let lockspace = format!("bench:{}", crate::unix_ms());
    let mut rows = Vec::new();
    rows.extend(pairs(&addr, &secret, &lockspace, opts).await?);
    rows.push(ping_pong(&addr, &secret, &lockspace, opts.duration).await?);
    drop(tmp);
    Ok(rows)
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn client(addr: &str, secret: &Secret, ls: &str, node: u32) -> Result<(DlmClient, tokio::sync::mpsc::UnboundedReceiver<ClientEvent>)> {
    DlmClient::connect(ClientConfig {
        addr: addr.to_string(),
        secret: secret.clone(),
        lockspace: ls.to_string(),
        node_id: node,
        admin_addr: String::new(),
    })
    .await
}

async fn pairs(addr: &str, secret: &Secret, ls: &str, opts: &BenchOptions) -> Result<Vec<Row>> {
    let mut clients = Vec::new();
    for i in 0..opts.clients.max(1) {
        clients.push(client(addr, secret, ls, 1 + i as u32).await?.0);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..opts.in_flight.max(1) {
        let c = clients[t % clients.len()].clone();
        let (stop, measuring, count) = (stop.clone(), measuring.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let name = format!("bench/pairs/{t}");
            let mut lat = Vec::with_capacity(1 << 16);
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let g = c.lock(name.as_bytes(), Mode::EX, 0).await?;
                let dt = t0.elapsed();
                c.unlock(g.lock_id, None).await?;
                if measuring.load(Ordering::Relaxed) {
                    lat.push(dt.as_micros() as u32);
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, Error>(lat)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // warm-up
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(opts.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| Error::Internal(format!("bench task: {e}")))??);
    }
    for c in clients {
        c.leave().await?;
    }
    lat.sort_unstable();
    let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
    if std::env::var_os("MCFS_BENCH_DEBUG").is_some() {
        for p in [0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999] {
            eprintln!("p{p}: {} us", pct(p));
        }
        eprintln!("max: {:?} us, n = {}", lat.last(), lat.len());
    }
    let rate = count.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64();
    let (p50, p99) = (pct(0.50) as f64 / 1000.0, pct(0.99) as f64 / 1000.0);
    Ok(vec![
        Row {
            name: format!("lock+unlock pairs/s ({} in flight, {} clients)", opts.in_flight, opts.clients),
            measured: rate,
            unit: "pairs/s".into(),
            target: ">= 50000".into(),
            ok: rate >= 50_000.0,
        },
        Row { name: "grant latency p50".into(), measured: p50, unit: "ms".into(), target: "-".into(), ok: true },
        Row { name: "grant latency p99".into(), measured: p99, unit: "ms".into(), target: "< 1".into(), ok: p99 < 1.0 },
    ])
}

async fn ping_pong(addr: &str, secret: &Secret, ls: &str, duration: Duration) -> Result<Row> {
    let res = b"bench/pingpong".to_vec();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut handles = Vec::new();
    for node in [101u32, 102] {
        let (c, mut events) = client(addr, secret, ls, node).await?;
        handles.push(c.clone());
        let (res, stop, count) = (res.clone(), stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let g = match tokio::time::timeout(Duration::from_millis(500), c.lock(&res, Mode::EX, 0)).await {
                    Ok(g) => g?,
                    Err(_) => continue, // the other side stopped while holding it; dropped => cancelled
                };
                count.fetch_add(1, Ordering::Relaxed);
                // Hold until someone waits.
                loop {
                    match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
                        Ok(Some(ClientEvent::Blocking { lock_id, .. })) if lock_id == g.lock_id => break,
                        Ok(Some(_)) => {}
                        Ok(None) => return Err(Error::SessionLost("event channel closed".into())),
                        Err(_) if stop.load(Ordering::Relaxed) => break,
                        Err(_) => {}
                    }
                }
                c.unlock(g.lock_id, None).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    let start = count.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(duration).await;
    let n = count.load(Ordering::Relaxed) - start;
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.map_err(|e| Error::Internal(format!("bench task: {e}")))??;
    }
    for c in handles {
        c.leave().await?;
    }
    let rate = n as f64 / elapsed.as_secs_f64();
    Ok(Row {
        name: "EX ping-pong handoffs/s (2 clients, blocking callbacks)".into(),
        measured: rate,
        unit: "handoffs/s".into(),
        target: ">= 5000".into(),
        ok: rate >= 5_000.0,
    })
}

/// The table as text.
pub fn render(rows: &[Row]) -> String {
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(10).max(9);
    let mut s = format!("{:<w$}  {:>14}  {:<11}  {:<9}  {}\n", "benchmark", "measured", "unit", "target", "ok", w = w);
    s.push_str(&format!("{}\n", "-".repeat(w + 48)));
    for r in rows {
        let m = if r.measured >= 100.0 { format!("{:.0}", r.measured) } else { format!("{:.3}", r.measured) };
        s.push_str(&format!(
            "{:<w$}  {:>14}  {:<11}  {:<9}  {}\n",
            r.name,
            m,
            r.unit,
            r.target,
            if r.ok { "yes" } else { "NO" },
            w = w
        ));
    }
    s
}
