//! Conversions between the core's types and the protocol's, and the Dump.

use super::Shared;
use crate::core::{CompletionResult, Grant, LockOutcome, Mode, RecoveryRecord, RecoveryState};
use crate::error::{Error, Result};
use mcfs_proto::dlm as pb;
use std::sync::Arc;

pub fn mode(v: i32) -> Result<Mode> {
    u8::try_from(v).ok().and_then(Mode::from_u8).ok_or_else(|| Error::InvalidArgument(format!("unknown lock mode {v}")))
}

pub fn grant(g: &Grant) -> pb::Grant {
    pb::Grant {
        lock_id: g.lock_id,
        mode: g.mode as i32,
        lvb: g.lvb.clone().unwrap_or_default(),
        lvb_valid: g.lvb_valid,
        lvb_seq: g.lvb_seq,
        fence_token: g.fence_token,
        generation: g.generation,
    }
}

pub fn lock_reply(o: &LockOutcome) -> pb::LockReply {
    let (status, g) = match o {
        LockOutcome::Granted(g) => (pb::LockStatus::Granted, Some(grant(g))),
        LockOutcome::Queued(_) => (pb::LockStatus::Queued, None),
        LockOutcome::WouldBlock(_) => (pb::LockStatus::WouldBlock, None),
        LockOutcome::Deadlock(_) => (pb::LockStatus::Deadlock, None),
    };
    pb::LockReply { lock_id: o.lock_id(), status: status as i32, grant: g }
}

pub fn completion(lock_id: u64, client_ref: u64, r: CompletionResult) -> pb::Completion {
    let (status, g) = match r {
        CompletionResult::Granted(g) => (pb::LockStatus::Granted, Some(grant(&g))),
        CompletionResult::Canceled => (pb::LockStatus::Canceled, None),
        CompletionResult::Deadlock => (pb::LockStatus::Deadlock, None),
    };
    pb::Completion { lock_id, status: status as i32, grant: g, client_ref }
}

pub fn recovery_state(s: RecoveryState) -> pb::RecoveryState {
    match s {
        RecoveryState::Failed => pb::RecoveryState::Failed,
        RecoveryState::Fencing => pb::RecoveryState::Fencing,
        RecoveryState::NeedsReplay => pb::RecoveryState::NeedsReplay,
        RecoveryState::Released => pb::RecoveryState::Released,
    }
}

pub fn recovery(r: &RecoveryRecord) -> pb::Recovery {
    pb::Recovery {
        node_id: r.node,
        journal: r.journal,
        state: recovery_state(r.state) as i32,
        failed_at_unix_ms: r.failed_at_ms,
        fenced_at_unix_ms: r.fenced_at_ms,
        generation: r.generation,
        ..Default::default()
    }
}

/// A recovery as the Dump shows it: with its fencing attempts and, while it is
/// at FENCING, what the fence client saw last.
pub fn recovery_dump(shared: &Shared, ls: &str, r: &RecoveryRecord) -> pb::Recovery {
    let mut p = recovery(r);
    p.fence_attempts = r.attempt + u32::from(r.state >= RecoveryState::Fencing);
    p.reason = r.reason.clone();
    if r.state == RecoveryState::Fencing {
        p.fence_request_id = r.fence_request_id(ls);
        if let Some(f) = shared.fence_progress(ls, r.node, r.generation) {
            p.fence_calls = f.calls;
            p.last_error = f.last_error;
            p.last_error_unix_ms = f.last_error_unix_ms;
            p.last_call_unix_ms = f.last_call_unix_ms;
        }
    }
    p
}

/// State of every lockspace (or the one named), optionally with its resources.
pub fn dump(shared: &Arc<Shared>, only: &str, locks: bool) -> pb::DumpReply {
    let mut reply = pb::DumpReply { lockspaces: Vec::new(), started_unix_ms: shared.started_unix_ms, in_grace: false };
    for ls in shared.all_lockspaces() {
        if !only.is_empty() && ls.name != only {
            continue;
        }
        let g = ls.lock();
        let core = &g.core;
        reply.in_grace |= core.in_grace();
        let members = core
            .members()
            .map(|m| {
                let sess = shared.session_of(&ls.name, m.node).filter(|_| m.state == crate::core::MemberState::Active);
                let (sid, lease) = sess.as_ref().map(|s| (s.id, s.lease_left())).unwrap_or((0, std::time::Duration::ZERO));
                let (pushed, sent, acked) = sess.as_ref().map(|s| s.outbox.counts()).unwrap_or_default();
                pb::MemberDump {
                    node_id: m.node,
                    session_id: sid,
                    state: m.state.name().to_string(),
                    lease_remaining_ms: lease.as_millis() as u64,
                    journal: m.journal,
                    admin_addr: m.admin_addr.clone(),
                    locks_held: m.locks as u64,
                    generation: m.inc,
                    pending: m.pending as u64,
                    events_queued: pushed.saturating_sub(sent),
                    events_sent: sent,
                    events_confirmed: acked,
                }
            })
            .collect();
        let recoveries = core.recoveries().map(|r| recovery_dump(shared, &ls.name, r)).collect();
        let mut resources = Vec::new();
        if locks {
            let mut names: Vec<_> = core.resources().map(|(k, _)| k.clone()).collect();
            names.sort();
            for name in names.into_iter().take(shared.cfg.dump_max_resources) {
                let Some(r) = core.resource(&name) else { continue };
                let lock_dump = |id: &u64| {
                    let l = core.lock(*id)?;
                    let state = core.member(l.node).filter(|m| m.inc == l.inc).map(|m| m.state.name()).unwrap_or("gone");
                    Some(pb::LockDump {
                        lock_id: l.id,
                        node_id: l.node,
                        granted_mode: l.gr.map(|m| m as i32).unwrap_or(-1),
                        requested_mode: l.rq as i32,
                        flags: l.flags,
                        fence_token: l.fence_token,
                        node_state: state.to_string(),
                    })
                };
                resources.push(pb::ResourceDump {
                    name: name.to_vec(),
                    granted: r.granted.iter().filter_map(lock_dump).collect(),
                    converting: r.converting.iter().filter_map(lock_dump).collect(),
                    waiting: r.waiting.iter().filter_map(lock_dump).collect(),
                    lvb_seq: r.lvb.seq,
                    lvb_valid: r.lvb.valid,
                    fence_token: r.granted.iter().filter_map(|id| core.lock(*id)).map(|l| l.fence_token).max().unwrap_or(0),
                });
            }
        }
        reply.lockspaces.push(pb::LockspaceDump {
            name: ls.name.clone(),
            generation: core.generation(),
            members,
            recoveries,
            resources,
            resource_count: core.resource_count() as u64,
        });
    }
    reply
}
