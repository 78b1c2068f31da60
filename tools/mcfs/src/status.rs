//! `mcfs status` and `mcfs glocks`: what the lock server, the fencing agent and
//! every node daemon report, in one view (text for a terminal, or `--json`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use mcfs_proto::dlm::dlm_client::DlmClient;
use mcfs_proto::fence::fencer_client::FencerClient;
use mcfs_proto::node::node_admin_client::NodeAdminClient;
use serde_json::{json, Value};

use crate::common::{endpoint, ConnArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Args)]
pub struct GlocksArgs {
    /// Node id.
    pub node: u32,
    /// Include unlocked glocks.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

const TIMEOUT: Duration = Duration::from_secs(3);

async fn channel(addr: &str) -> Result<tonic::transport::Channel> {
    let ep = tonic::transport::Endpoint::from_shared(endpoint(addr))?.connect_timeout(TIMEOUT).timeout(TIMEOUT);
    Ok(ep.connect().await?)
}

/// Admin addresses of the nodes: from the lock server's members, or from a
/// local cluster's files (nolock clusters have no lock server).
fn local_admin_addrs(conn: &ConnArgs) -> Vec<(u32, String)> {
    let Ok(c) = mcfs_cli::cluster::Cluster::open(&conn.cluster_dir) else { return Vec::new() };
    (1..=c.f.nodes).filter_map(|n| std::fs::read_to_string(c.admin_file(n)).ok().map(|a| (n, a.trim().to_string()))).collect()
}

async fn node_status(addr: &str, secret: &mcfs_proto::auth::Secret) -> Result<Value> {
    let ch = channel(addr).await?;
    let mut cl = NodeAdminClient::with_interceptor(ch, secret.interceptor());
    let r = cl.status(mcfs_proto::node::StatusRequest {}).await?;
    Ok(serde_json::from_str(&r.into_inner().json)?)
}

pub async fn collect(conn: &ConnArgs) -> Result<Value> {
    let r = conn.resolve()?;
    let mut out = json!({});
    let mut admin: Vec<(u32, String)> = Vec::new();
    if let Some(dlm) = &r.dlm {
        let v = match channel(dlm).await {
            Ok(ch) => {
                let mut cl = DlmClient::with_interceptor(ch, r.secret.interceptor());
                match cl.dump(mcfs_proto::dlm::DumpRequest { lockspace: String::new(), locks: false }).await {
                    Ok(d) => {
                        let d = d.into_inner();
                        let mut lss = Vec::new();
                        for ls in &d.lockspaces {
                            for m in &ls.members {
                                if !m.admin_addr.is_empty() && (m.state == "active") {
                                    admin.push((m.node_id, m.admin_addr.clone()));
                                }
                            }
                            lss.push(json!({
                                "name": ls.name,
                                "generation": ls.generation,
                                "resources": ls.resource_count,
                                "members": ls.members.iter().map(|m| json!({"node": m.node_id, "state": m.state, "lease_remaining_ms": m.lease_remaining_ms, "journal": m.journal, "admin": m.admin_addr, "locks": m.locks_held, "pending": m.pending})).collect::<Vec<_>>(),
                                "recoveries": ls.recoveries.iter().map(|x| json!({"node": x.node_id, "journal": x.journal, "state": format!("{:?}", x.state()), "failed_at_unix_ms": x.failed_at_unix_ms, "fenced_at_unix_ms": x.fenced_at_unix_ms})).collect::<Vec<_>>(),
                            }));
                        }
                        json!({"addr": dlm, "in_grace": d.in_grace, "lockspaces": lss})
                    }
                    Err(e) => json!({"addr": dlm, "error": e.message()}),
                }
            }
            Err(e) => json!({"addr": dlm, "error": format!("unreachable: {e}")}),
        };
        out["lock_server"] = v;
    }
    if let Some(f) = &r.fence {
        let v = match channel(f).await {
            Ok(ch) => {
                let mut cl = FencerClient::with_interceptor(ch, r.secret.interceptor());
                match cl.history(mcfs_proto::fence::HistoryRequest { node_id: 0, limit: 10 }).await {
                    Ok(h) => {
                        let h = h.into_inner();
                        json!({"addr": f, "history": h.records.iter().map(|x| json!({"node": x.node_id, "kind": x.kind, "outcome": format!("{:?}", x.outcome()), "method": x.method, "fence_time_unix_ms": x.fence_time_unix_ms, "message": x.message, "request_id": x.request_id})).collect::<Vec<_>>(), "refused_calls": h.refused.len()})
                    }
                    Err(e) => json!({"addr": f, "error": e.message()}),
                }
            }
            Err(e) => json!({"addr": f, "error": format!("unreachable: {e}")}),
        };
        out["fencing"] = v;
    }
    if admin.is_empty() {
        admin = local_admin_addrs(conn);
    }
    admin.sort();
    admin.dedup_by_key(|a| a.0);
    let mut nodes = Vec::new();
    for (n, a) in admin {
        match node_status(&a, &r.secret).await {
            Ok(v) => nodes.push(json!({"node": n, "admin": a, "status": v})),
            Err(e) => nodes.push(json!({"node": n, "admin": a, "error": e.to_string()})),
        }
    }
    out["nodes"] = Value::Array(nodes);
    Ok(out)
}

fn ago(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let d = now.saturating_sub(unix_ms);
    if d < 120_000 {
        format!("{:.1}s ago", d as f64 / 1000.0)
    } else {
        format!("{}m ago", d / 60_000)
    }
}

fn mib(v: &Value) -> String {
    format!("{:.1} MiB", v.as_u64().unwrap_or(0) as f64 / 1048576.0)
}

pub fn render(v: &Value) -> String {
    let mut s = String::new();
    if let Some(l) = v.get("lock_server") {
        if let Some(e) = l.get("error") {
            s += &format!("lock server {}: {}\n", l["addr"].as_str().unwrap_or(""), e.as_str().unwrap_or(""));
        } else {
            s += &format!("lock server {}{}\n", l["addr"].as_str().unwrap_or(""), if l["in_grace"].as_bool() == Some(true) { "  (restarted: grace period, nodes reclaiming locks)" } else { "" });
            for ls in l["lockspaces"].as_array().into_iter().flatten() {
                s += &format!("  lockspace {}  generation {}  {} resources\n", ls["name"].as_str().unwrap_or(""), ls["generation"], ls["resources"]);
                for m in ls["members"].as_array().into_iter().flatten() {
                    s += &format!(
                        "    node {:<3} {:<8} lease {:>5.1}s  journal {:<3} locks {:<6} pending {}\n",
                        m["node"],
                        m["state"].as_str().unwrap_or(""),
                        m["lease_remaining_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                        m["journal"],
                        m["locks"],
                        m["pending"]
                    );
                }
                for r in ls["recoveries"].as_array().into_iter().flatten() {
                    s += &format!(
                        "    recovery of node {} (journal {}): {}  failed {}  fenced {}\n",
                        r["node"],
                        r["journal"],
                        r["state"].as_str().unwrap_or(""),
                        ago(r["failed_at_unix_ms"].as_u64().unwrap_or(0)),
                        ago(r["fenced_at_unix_ms"].as_u64().unwrap_or(0))
                    );
                }
            }
        }
    }
    if let Some(f) = v.get("fencing") {
        if let Some(e) = f.get("error") {
            s += &format!("fencing {}: {}\n", f["addr"].as_str().unwrap_or(""), e.as_str().unwrap_or(""));
        } else {
            s += &format!("fencing {}  ({} refused calls)\n", f["addr"].as_str().unwrap_or(""), f["refused_calls"]);
            for h in f["history"].as_array().into_iter().flatten() {
                s += &format!("    {} node {}: {} by {} {}  {}\n", h["kind"].as_str().unwrap_or("fence"), h["node"], h["outcome"].as_str().unwrap_or(""), h["method"].as_str().unwrap_or("-"), ago(h["fence_time_unix_ms"].as_u64().unwrap_or(0)), h["message"].as_str().unwrap_or(""));
            }
        }
    }
    s += "nodes\n";
    for n in v["nodes"].as_array().into_iter().flatten() {
        if let Some(e) = n.get("error") {
            s += &format!("  node {} ({}): unreachable: {}\n", n["node"], n["admin"].as_str().unwrap_or(""), e.as_str().unwrap_or(""));
            continue;
        }
        let st = &n["status"];
        let d = &st["daemon"];
        s += &format!(
            "  node {}  {}  journal {}  {}{}\n",
            n["node"],
            d["mountpoint"].as_str().unwrap_or("?"),
            st["journal"],
            st["lock_backend"].as_str().unwrap_or(""),
            if st["withdrawn"].as_bool() == Some(true) { format!("  WITHDRAWN: {}", st["withdraw_reason"].as_str().unwrap_or("")) } else { String::new() }
        );
        let m = &st["memory"];
        let ev = &st["eviction"];
        let g = &st["glocks"];
        s += &format!(
            "    glocks {} (EX {}, PR {}, demotes pending {}, trimmed {})   cache {} / {} (peak {})   longest alloc wait {} ms\n",
            g["total"], g["exclusive"], g["shared"], g["demote_pending"], g["trimmed"], mib(&m["used"]), mib(&m["limit"]), mib(&m["peak"]),
            m["longest_alloc_wait_us"].as_u64().unwrap_or(0) / 1000
        );
        s += &format!(
            "    inodes cached {} (unused {})   evict mode {}   deferred now {} (total {}, retries {}, done {})   deallocated {}\n",
            ev["cached_inodes"], ev["unused_inodes"], ev["evict_mode"].as_str().unwrap_or(""), ev["deferred_now"], ev["deferred_total"], ev["dealloc_retries"], ev["deferred_completed"], st["ops"]["inodes_deallocated"]
        );
        let lg = &st["log"];
        s += &format!(
            "    journal {}/{} blocks used, {} flushes   file data written behind {} (in flight {}, waited {})\n",
            lg["used_blocks"], lg["blocks"], lg["flushes"], lg["data"]["writes_behind"], mib(&lg["data"]["inflight_bytes"]), lg["data"]["writes_waited"]
        );
        if let Some(b) = ev["reclaim_blocked_on"].as_str() {
            s += &format!("    RECLAIM BLOCKED on {b}\n");
        }
        for w in st["waiting_for_locks"].as_array().into_iter().flatten().take(5) {
            s += &format!("    waiting for {} {} for {} ms\n", w["lock"].as_str().unwrap_or(""), w["mode"].as_str().unwrap_or(""), w["waited_ms"]);
        }
        for r in st["recoveries"].as_array().into_iter().flatten() {
            s += &format!("    recovered node {} journal {}: {}\n", r["node"], r["journal"], r["step"].as_str().unwrap_or(""));
        }
    }
    s
}

pub async fn run(a: Args) -> Result<()> {
    let v = collect(&a.conn).await?;
    if a.conn.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&v));
    }
    Ok(())
}

pub async fn glocks(a: GlocksArgs) -> Result<()> {
    let v = collect(&a.conn).await?;
    let addr = v["nodes"].as_array().into_iter().flatten().find(|n| n["node"].as_u64() == Some(a.node as u64)).and_then(|n| n["admin"].as_str().map(String::from)).with_context(|| format!("node {} not found (is it mounted?)", a.node))?;
    let r = a.conn.resolve()?;
    let ch = channel(&addr).await?;
    let mut cl = NodeAdminClient::with_interceptor(ch, r.secret.interceptor());
    let g = cl.glocks(mcfs_proto::node::GlocksRequest { all: a.all }).await?.into_inner();
    let v: Value = serde_json::from_str(&g.json)?;
    if a.conn.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{:<24} {:<5} {:>10} {:>4} {:>3} {:>5} {:<8} {:>8} {:>8}", "glock", "state", "lock id", "sh", "ex", "wait", "demote", "requests", "demotes");
    for x in v.as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<5} {:>10} {:>4} {:>3} {:>5} {:<8} {:>8} {:>8}",
            x["name"].as_str().unwrap_or(""),
            x["state"].as_str().unwrap_or(""),
            x["lock_id"],
            x["holders_shared"],
            if x["holder_exclusive"].as_bool() == Some(true) { "1" } else { "0" },
            x["waiters"],
            x["demote_wanted"].as_str().unwrap_or("-"),
            x["requests"],
            x["demotes"]
        );
    }
    Ok(())
}
