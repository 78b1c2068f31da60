//! `mcfs fence ...`: talk to mcfs-fenced (history, status, ack, unfence, and a
//! manual fence request), in human or `--json` form.
use crate::common::{endpoint, ConnArgs};
use anyhow::{bail, Context, Result};
use mcfs_proto::fence as pb;
use mcfs_proto::fence::fencer_client::FencerClient;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Fencing history: every operation with its attempts, and refused calls.
    History {
        /// Only this node (default: all).
        #[arg(long)]
        node: Option<u32>,
        /// At most this many operations (newest first).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// A node's fencing state and configured levels.
    Status {
        node: u32,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Acknowledge that NODE is off (completes a `manual` fencing level).
    /// Improper use can corrupt the filesystem: be sure the node is really down.
    Ack {
        node: u32,
        /// Who acknowledges (recorded); default $USER.
        #[arg(long)]
        operator: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Unfence NODE (switch agents `on`, clear its fenced state). Normally the DLM
    /// does this after the node's journal was replayed.
    Unfence {
        node: u32,
        /// Request id (default: a fresh one); repeat it to get the same operation.
        #[arg(long)]
        request_id: Option<String>,
        /// Wait this long for the outcome (0: do not wait).
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Fence NODE now (what mcfs-dlm does when a node fails).
    Node {
        node: u32,
        #[arg(long)]
        request_id: Option<String>,
        #[arg(long, default_value = "requested by an operator (mcfs fence node)")]
        reason: String,
        /// Wait this long for the outcome (0: do not wait).
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

type Intercepted<F> = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, F>;

async fn connect(
    conn: &ConnArgs,
) -> Result<
    FencerClient<
        Intercepted<
            impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
        >,
    >,
> {
    let r = conn.resolve()?;
    let addr = r.fence.context("no mcfs-fenced address: pass --fence HOST:PORT (or run inside a directory made by `mcfs cluster up`)")?;
    let channel = tonic::transport::Endpoint::from_shared(endpoint(&addr))
        .with_context(|| format!("bad address {addr:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to mcfs-fenced at {addr}"))?;
    Ok(FencerClient::with_interceptor(
        channel,
        r.secret.interceptor(),
    ))
}

fn rpc_err(call: &str, st: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{call}: {:?}: {}", st.code(), st.message())
}

/// UTC time of a unix-ms timestamp, e.g. `2026-11-26 15:51:53.787Z`; `-` for 0.
fn fmt_ms(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn outcome_name(o: i32) -> &'static str {
    match pb::Outcome::try_from(o) {
        Ok(pb::Outcome::Pending) => "PENDING",
        Ok(pb::Outcome::Success) => "SUCCESS",
        Ok(pb::Outcome::Failed) => "FAILED",
        Err(_) => "UNKNOWN",
    }
}

fn reply_json(r: &pb::FenceReply) -> Value {
    json!({
        "request_id": r.request_id,
        "node_id": r.node_id,
        "kind": r.kind,
        "outcome": outcome_name(r.outcome),
        "requested_unix_ms": r.requested_unix_ms,
        "finished_unix_ms": r.finished_unix_ms,
        "failure_time_unix_ms": r.failure_time_unix_ms,
        "fence_time_unix_ms": r.fence_time_unix_ms,
        "method": r.method,
        "reason": r.reason,
        "message": r.message,
        "attempts": r.attempts.iter().map(|a| json!({
            "level": a.level,
            "method": a.method,
            "started_unix_ms": a.started_unix_ms,
            "finished_unix_ms": a.finished_unix_ms,
            "ok": a.ok,
            "message": a.message,
        })).collect::<Vec<_>>(),
    })
}

fn print_reply(r: &pb::FenceReply) {
    println!(
        "{} {:<8} node {:<3} {:<8} requested {}  fence time {}  {}",
        r.request_id,
        r.kind,
        r.node_id,
        outcome_name(r.outcome),
        fmt_ms(r.requested_unix_ms),
        fmt_ms(r.fence_time_unix_ms),
        r.message
    );
    if !r.reason.is_empty() {
        println!("    reason: {}", r.reason);
    }
    for a in &r.attempts {
        println!(
            "    level {} {:<24} {:<4} {:>6} ms  {}",
            a.level,
            a.method,
            if a.ok { "ok" } else { "FAIL" },
            a.finished_unix_ms.saturating_sub(a.started_unix_ms),
            a.message
        );
    }
}

fn status_json(s: &pb::NodeStatus) -> Value {
    json!({
        "node_id": s.node_id,
        "fenced": s.fenced,
        "fenced_at_unix_ms": s.fenced_at_unix_ms,
        "last_request_id": s.last_request_id,
        "last_outcome": if s.last_request_id.is_empty() { "NONE" } else { outcome_name(s.last_outcome) },
        "in_progress": s.in_progress,
        "awaiting_ack": s.awaiting_ack,
        "methods": s.methods,
    })
}

fn fresh_id(what: &str, node: u32) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("cli-{what}-{node}-{ms}-{}", std::process::id())
}

/// Repeat the (idempotent) call until the outcome is final or `wait` passes.
async fn poll<F, Fut>(wait: Duration, mut call: F) -> Result<pb::FenceReply>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<pb::FenceReply>>,
{
    let deadline = Instant::now() + wait;
    loop {
        let r = call().await?;
        if r.outcome != pb::Outcome::Pending as i32 || Instant::now() >= deadline {
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn finish(r: &pb::FenceReply, json_out: bool) -> Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(&reply_json(r))?);
    } else {
        print_reply(r);
    }
    match outcome_name(r.outcome) {
        "FAILED" => bail!("{} of node {} failed: {}", r.kind, r.node_id, r.message),
        _ => Ok(()),
    }
}

pub async fn run(c: Cmd) -> Result<()> {
    match c {
        Cmd::History { node, limit, conn } => {
            let mut cl = connect(&conn).await?;
            let h = cl
                .history(pb::HistoryRequest {
                    node_id: node.unwrap_or(0),
                    limit,
                })
                .await
                .map_err(|e| rpc_err("History", e))?
                .into_inner();
            if conn.json {
                let v = json!({
                    "records": h.records.iter().map(reply_json).collect::<Vec<_>>(),
                    "refused": h.refused.iter().map(|r| json!({
                        "at_unix_ms": r.at_unix_ms, "call": r.call, "peer": r.peer, "reason": r.reason,
                    })).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if h.records.is_empty() {
                println!("no fencing operations recorded");
            }
            for r in &h.records {
                print_reply(r);
            }
            if !h.refused.is_empty() {
                println!("refused (unauthenticated) calls, newest first:");
                for r in &h.refused {
                    println!(
                        "    {}  {:<21} {}  ({})",
                        fmt_ms(r.at_unix_ms),
                        r.peer,
                        r.call,
                        r.reason
                    );
                }
            }
            Ok(())
        }
        Cmd::Status { node, conn } => {
            let mut cl = connect(&conn).await?;
            let s = cl
                .status(pb::StatusRequest { node_id: node })
                .await
                .map_err(|e| rpc_err("Status", e))?
                .into_inner();
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
                return Ok(());
            }
            let state = if s.fenced {
                format!("FENCED since {}", fmt_ms(s.fenced_at_unix_ms))
            } else {
                "not fenced".into()
            };
            println!("node {}: {state}", s.node_id);
            if !s.last_request_id.is_empty() {
                println!(
                    "last operation: {} {}",
                    s.last_request_id,
                    outcome_name(s.last_outcome)
                );
            }
            if s.in_progress {
                println!(
                    "an operation is in progress{}",
                    if s.awaiting_ack {
                        "; WAITING for `mcfs fence ack`"
                    } else {
                        ""
                    }
                );
            }
            println!("levels:");
            for (i, m) in s.methods.iter().enumerate() {
                println!("  {}. {m}", i + 1);
            }
            Ok(())
        }
        Cmd::Ack {
            node,
            operator,
            conn,
        } => {
            let mut cl = connect(&conn).await?;
            let operator = operator
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "operator".into());
            let a = cl
                .ack(pb::AckRequest {
                    node_id: node,
                    operator,
                })
                .await
                .map_err(|e| rpc_err("Ack", e))?
                .into_inner();
            if conn.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"acknowledged": a.acknowledged, "message": a.message})
                    )?
                );
            } else {
                println!("{}", a.message);
            }
            if !a.acknowledged {
                bail!("not acknowledged: {}", a.message);
            }
            Ok(())
        }
        Cmd::Unfence {
            node,
            request_id,
            wait_secs,
            conn,
        } => {
            let cl = connect(&conn).await?;
            let req = pb::UnfenceRequest {
                request_id: request_id.unwrap_or_else(|| fresh_id("unfence", node)),
                node_id: node,
            };
            let r = poll(Duration::from_secs(wait_secs), || {
                let mut cl = cl.clone();
                let req = req.clone();
                async move {
                    Ok(cl
                        .unfence(req)
                        .await
                        .map_err(|e| rpc_err("Unfence", e))?
                        .into_inner())
                }
            })
            .await?;
            finish(&r, conn.json)
        }
        Cmd::Node {
            node,
            request_id,
            reason,
            wait_secs,
            conn,
        } => {
            let cl = connect(&conn).await?;
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let req = pb::FenceRequest {
                request_id: request_id.unwrap_or_else(|| fresh_id("fence", node)),
                node_id: node,
                failure_time_unix_ms: ms,
                reason,
            };
            let r = poll(Duration::from_secs(wait_secs), || {
                let mut cl = cl.clone();
                let req = req.clone();
                async move {
                    Ok(cl
                        .fence(req)
                        .await
                        .map_err(|e| rpc_err("Fence", e))?
                        .into_inner())
                }
            })
            .await?;
            finish(&r, conn.json)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fmt_ms;

    #[test]
    fn times_format_as_utc() {
        assert_eq!(fmt_ms(0), "-");
        assert_eq!(fmt_ms(1_000), "1970-01-01 00:00:01.000Z");
        assert_eq!(fmt_ms(951_782_400_123), "2000-02-29 00:00:00.123Z");
        assert_eq!(fmt_ms(1_795_708_313_787), "2026-11-26 15:51:53.787Z");
    }
}
