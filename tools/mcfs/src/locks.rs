//! `mcfs locks`: dump of mcfs-dlm state, like `dlm_tool ls` plus `dlm_tool lockdebug`:
//! lockspaces, members with their lease, recoveries, and every resource with
//! its granted, converting and waiting queues.

use crate::common::{endpoint, ConnArgs};
use anyhow::{Context, Result};
use mcfs_proto::dlm::{dlm_client::DlmClient, DumpReply, DumpRequest, LockDump, Mode, RecoveryState};
use serde_json::json;
use std::fmt::Write;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Only this lockspace ("cluster:fsname"; default: the local cluster's, else all).
    #[arg(long)]
    pub lockspace: Option<String>,
    /// Lockspaces, members and recoveries only (no resources).
    #[arg(long)]
    pub summary: bool,
}

pub async fn run(a: Args) -> Result<()> {
    let r = a.conn.resolve()?;
    let addr = r.dlm.context("no lock server address: pass --dlm HOST:PORT (or run in a local cluster directory)")?;
    let channel = tonic::transport::Endpoint::from_shared(endpoint(&addr))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to mcfs-dlm at {addr}"))?;
    let mut client = DlmClient::with_interceptor(channel, r.secret.interceptor()).max_decoding_message_size(64 << 20);
    let req = DumpRequest { lockspace: a.lockspace.clone().or(r.lockspace).unwrap_or_default(), locks: !a.summary };
    let dump = client.dump(req).await.map_err(|s| anyhow::anyhow!("dump refused ({:?}): {}", s.code(), s.message()))?;
    let dump = dump.into_inner();
    if a.conn.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&dump))?);
    } else {
        print!("{}", render(&dump));
    }
    Ok(())
}

fn mode_name(m: i32) -> &'static str {
    Mode::try_from(m).map(|m| m.as_str_name()).unwrap_or("--")
}

fn state_name(s: i32) -> String {
    RecoveryState::try_from(s).map(|s| s.as_str_name().to_ascii_lowercase().replace('_', "-")).unwrap_or_default()
}

/// Resource names are bytes: printable ASCII as is, anything else escaped.
pub fn name(b: &[u8]) -> String {
    let mut s = String::new();
    for &c in b {
        if (0x20..0x7f).contains(&c) && c != b'\\' {
            s.push(c as char);
        } else {
            let _ = write!(s, "\\x{c:02x}");
        }
    }
    s
}

fn lock_json(l: &LockDump) -> serde_json::Value {
    json!({
        "lock_id": format!("{:#x}", l.lock_id),
        "node": l.node_id,
        "node_state": l.node_state,
        "granted": if l.granted_mode < 0 { serde_json::Value::Null } else { mode_name(l.granted_mode).into() },
        "requested": mode_name(l.requested_mode),
        "flags": l.flags,
        "fence_token": l.fence_token,
    })
}

pub fn to_json(d: &DumpReply) -> serde_json::Value {
    json!({
        "started_unix_ms": d.started_unix_ms,
        "in_grace": d.in_grace,
        "lockspaces": d.lockspaces.iter().map(|ls| json!({
            "name": ls.name,
            "generation": ls.generation,
            "resource_count": ls.resource_count,
            "members": ls.members.iter().map(|m| json!({
                "node": m.node_id,
                "state": m.state,
                "session": format!("{:#x}", m.session_id),
                "lease_remaining_ms": m.lease_remaining_ms,
                "journal": m.journal,
                "admin_addr": m.admin_addr,
                "locks": m.locks_held,
                "pending": m.pending,
                "generation": m.generation,
            })).collect::<Vec<_>>(),
            "recoveries": ls.recoveries.iter().map(|r| json!({
                "node": r.node_id,
                "journal": r.journal,
                "state": state_name(r.state),
                "failed_at_unix_ms": r.failed_at_unix_ms,
                "fenced_at_unix_ms": r.fenced_at_unix_ms,
                "generation": r.generation,
            })).collect::<Vec<_>>(),
            "resources": ls.resources.iter().map(|r| json!({
                "name": name(&r.name),
                "lvb_seq": r.lvb_seq,
                "lvb_valid": r.lvb_valid,
                "fence_token": r.fence_token,
                "granted": r.granted.iter().map(lock_json).collect::<Vec<_>>(),
                "converting": r.converting.iter().map(lock_json).collect::<Vec<_>>(),
                "waiting": r.waiting.iter().map(lock_json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn lock_line(out: &mut String, queue: &str, l: &LockDump) {
    let modes = if queue == "granted" {
        mode_name(l.granted_mode).to_string()
    } else {
        let from = if l.granted_mode < 0 { "" } else { mode_name(l.granted_mode) };
        format!("{from}->{}", mode_name(l.requested_mode))
    };
    let flags = mcfs_dlm::flags::names(l.flags).join(",");
    let dead = if l.node_state == "active" { String::new() } else { format!(" [{}]", l.node_state) };
    let _ = writeln!(
        out,
        "      {queue:<10} {:#018x}  node {:<3} {modes:<7} {flags}{dead}",
        l.lock_id, l.node_id
    );
}

pub fn render(d: &DumpReply) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "mcfs-dlm up since unix ms {}{}",
        d.started_unix_ms,
        if d.in_grace { "  (IN GRACE: waiting for members to reclaim their locks)" } else { "" }
    );
    if d.lockspaces.is_empty() {
        s.push_str("no lockspaces\n");
    }
    for ls in &d.lockspaces {
        let _ = writeln!(s, "\nlockspace {}  generation {}  resources {}", ls.name, ls.generation, ls.resource_count);
        let _ = writeln!(
            s,
            "  {:<5} {:<9} {:<20} {:>9} {:>7} {:>7} {:>7}  admin",
            "node", "state", "session", "lease", "journal", "locks", "pending"
        );
        for m in &ls.members {
            let lease = if m.state == "active" { format!("{:.1}s", m.lease_remaining_ms as f64 / 1000.0) } else { "-".into() };
            let _ = writeln!(
                s,
                "  {:<5} {:<9} {:<20} {:>9} {:>7} {:>7} {:>7}  {}",
                m.node_id,
                m.state,
                format!("{:#x}", m.session_id),
                lease,
                m.journal,
                m.locks_held,
                m.pending,
                m.admin_addr
            );
        }
        for r in &ls.recoveries {
            let _ = writeln!(
                s,
                "  recovery: node {} journal {} {}  failed at {}  fenced at {}  generation {}",
                r.node_id,
                r.journal,
                state_name(r.state),
                r.failed_at_unix_ms,
                if r.fenced_at_unix_ms == 0 { "-".to_string() } else { r.fenced_at_unix_ms.to_string() },
                r.generation
            );
        }
        if !ls.resources.is_empty() {
            let _ = writeln!(s, "  resources:");
        }
        for r in &ls.resources {
            let _ = writeln!(
                s,
                "    \"{}\"  lvb seq {}{}  token {:#x}",
                name(&r.name),
                r.lvb_seq,
                if r.lvb_valid { "" } else { " NOT VALID" },
                r.fence_token
            );
            for l in &r.granted {
                lock_line(&mut s, "granted", l);
            }
            for l in &r.converting {
                lock_line(&mut s, "converting", l);
            }
            for l in &r.waiting {
                lock_line(&mut s, "waiting", l);
            }
        }
        if (ls.resources.len() as u64) < ls.resource_count && !ls.resources.is_empty() {
            let _ = writeln!(s, "    ... {} more resources not shown", ls.resource_count - ls.resources.len() as u64);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcfs_proto::dlm::{LockspaceDump, MemberDump, ResourceDump};

    #[test]
    fn renders_queues_and_escapes_names() {
        let l = |id, node, g: i32, r: i32, st: &str| LockDump {
            lock_id: id,
            node_id: node,
            granted_mode: g,
            requested_mode: r,
            flags: 0,
            fence_token: 1,
            node_state: st.into(),
        };
        let d = DumpReply {
            started_unix_ms: 1,
            in_grace: false,
            lockspaces: vec![LockspaceDump {
                name: "c:fs".into(),
                generation: 3,
                members: vec![MemberDump { node_id: 1, state: "active".into(), lease_remaining_ms: 2500, ..Default::default() }],
                recoveries: vec![],
                resources: vec![ResourceDump {
                    name: b"inode/\x01".to_vec(),
                    granted: vec![l(5, 1, 5, 5, "failed")],
                    converting: vec![],
                    waiting: vec![l(6, 2, -1, 3, "active")],
                    lvb_seq: 2,
                    lvb_valid: false,
                    fence_token: 9,
                }],
                resource_count: 1,
            }],
        };
        let text = render(&d);
        assert!(text.contains("\"inode/\\x01\""), "{text}");
        assert!(text.contains("NOT VALID"));
        assert!(text.contains("granted    0x0000000000000005  node 1   EX"), "{text}");
        assert!(text.contains("[failed]"), "{text}");
        assert!(text.contains("waiting    0x0000000000000006  node 2   ->PR"), "{text}");
        assert!(text.contains("2.5s"));
        let j = to_json(&d);
        assert_eq!(j["lockspaces"][0]["resources"][0]["waiting"][0]["granted"], serde_json::Value::Null);
        assert_eq!(j["lockspaces"][0]["resources"][0]["granted"][0]["granted"], "EX");
    }
}
