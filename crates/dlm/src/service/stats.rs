//! The lock server's numbers, two ways: the `Stats` RPC (for `mcfs`) and the
//! Prometheus text exposition (`GET /metrics`). Counters come from
//! `DlmMetrics`; gauges are computed here from the lockspaces, each under its
//! mutex for the time it takes to read a few counters. docs/METRICS.md lists
//! every metric.

use super::Shared;
use crate::core::{MemberState, RecoveryState};
use crate::net::metrics::Exposition;
use mcfs_proto::dlm as pb;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Per-lockspace gauges.
#[derive(Default)]
struct LsGauges {
    name: String,
    resources: u64,
    locks: u64,
    waiting: u64,
    members: BTreeMap<&'static str, u64>,
    recoveries: BTreeMap<&'static str, u64>,
}

const MEMBER_STATES: [MemberState; 4] =
    [MemberState::Active, MemberState::Expected, MemberState::Failed, MemberState::Fenced];
const RECOVERY_STATES: [RecoveryState; 4] =
    [RecoveryState::Failed, RecoveryState::Fencing, RecoveryState::NeedsReplay, RecoveryState::Released];

fn gauges(shared: &Shared) -> Vec<LsGauges> {
    shared
        .all_lockspaces()
        .iter()
        .map(|ls| {
            let g = ls.lock();
            let c = &g.core;
            let mut v = LsGauges {
                name: ls.name.clone(),
                resources: c.resource_count() as u64,
                locks: c.lock_count() as u64,
                ..Default::default()
            };
            for s in MEMBER_STATES {
                v.members.insert(s.name(), 0);
            }
            for s in RECOVERY_STATES {
                v.recoveries.insert(s.name(), 0);
            }
            for m in c.members() {
                v.waiting += m.pending as u64;
                *v.members.entry(m.state.name()).or_default() += 1;
            }
            for r in c.recoveries() {
                *v.recoveries.entry(r.state.name()).or_default() += 1;
            }
            v
        })
        .collect()
}

/// The `Stats` reply.
pub fn stats(shared: &Arc<Shared>) -> pb::StatsReply {
    let m = &shared.metrics;
    let ls = gauges(shared);
    let imm = m.grant_latency[0].snapshot();
    let que = m.grant_latency[1].snapshot();
    // Both paths together for the overall quantiles.
    let mut all = imm.clone();
    for (a, b) in all.cumulative.iter_mut().zip(&que.cumulative) {
        *a += b;
    }
    all.count += que.count;
    let named = |v: Vec<(&str, u64)>| v.into_iter().map(|(n, c)| pb::NamedCount { name: n.into(), count: c }).collect();
    let last_refused = m
        .last_refused
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|r| format!("{} {} {}: {}", r.at_unix_ms, r.peer, r.method, r.reason))
        .unwrap_or_default();
    pb::StatsReply {
        started_unix_ms: shared.started_unix_ms,
        lock_ops: m
            .ops()
            .into_iter()
            .map(|(k, o, c)| pb::OpCount { kind: k.into(), outcome: o.into(), count: c })
            .collect(),
        grants_immediate: imm.count,
        grants_queued: que.count,
        grant_latency_p50_ms: all.quantile_upper_bound(0.50) * 1e3,
        grant_latency_p99_ms: all.quantile_upper_bound(0.99) * 1e3,
        queued_grant_latency_p99_ms: que.quantile_upper_bound(0.99) * 1e3,
        grants_waiting: ls.iter().map(|l| l.waiting).sum(),
        sessions: shared.session_count() as u64,
        lockspaces: ls.len() as u64,
        resources: ls.iter().map(|l| l.resources).sum(),
        locks: ls.iter().map(|l| l.locks).sum(),
        joins: m.joins.load(Ordering::Relaxed),
        leaves: m.leaves.load(Ordering::Relaxed),
        session_failures: named(m.session_failures()),
        recoveries_started: m.recoveries_started.load(Ordering::Relaxed),
        recoveries_active: ls
            .iter()
            .flat_map(|l| l.recoveries.iter())
            .filter(|(s, _)| **s != RecoveryState::Released.name())
            .map(|(_, n)| n)
            .sum(),
        fence_requests: named(m.fence_requests()),
        fence_calls: named(m.fence_calls()),
        refused_calls: m.refused_total(),
        last_refused,
        rpc_timeouts: m.rpc_timeouts().iter().map(|(_, n)| n).sum(),
        connections_open: m.conn.open.load(Ordering::Relaxed),
        connections_rejected: m.conn.rejected(),
    }
}

/// The Prometheus text exposition of everything.
pub fn render_metrics(shared: &Arc<Shared>) -> String {
    let m = &shared.metrics;
    let ls = gauges(shared);
    let mut e = Exposition::new();
    e.family("mcfs_dlm_lock_ops_total", "counter", "Lock, convert, unlock and cancel requests, by kind and outcome.");
    for (k, o, n) in m.ops() {
        e.sample("mcfs_dlm_lock_ops_total", &[("kind", k), ("outcome", o)], n as f64);
    }
    e.family(
        "mcfs_dlm_grant_latency_seconds",
        "histogram",
        "Time from a lock or conversion request's arrival to its grant; path=immediate was granted at once, path=queued waited in a queue.",
    );
    e.histogram("mcfs_dlm_grant_latency_seconds", &[("path", "immediate")], &m.grant_latency[0].snapshot());
    e.histogram("mcfs_dlm_grant_latency_seconds", &[("path", "queued")], &m.grant_latency[1].snapshot());
    e.family("mcfs_dlm_grants_waiting", "gauge", "Requests and conversions waiting in a queue now.");
    for l in &ls {
        e.sample("mcfs_dlm_grants_waiting", &[("lockspace", &l.name)], l.waiting as f64);
    }
    e.family("mcfs_dlm_resources", "gauge", "Resources (with locks or a non-default LVB).");
    for l in &ls {
        e.sample("mcfs_dlm_resources", &[("lockspace", &l.name)], l.resources as f64);
    }
    e.family("mcfs_dlm_locks", "gauge", "Locks (granted, converting or waiting).");
    for l in &ls {
        e.sample("mcfs_dlm_locks", &[("lockspace", &l.name)], l.locks as f64);
    }
    e.family("mcfs_dlm_members", "gauge", "Members of each lockspace, by state.");
    for l in &ls {
        for (s, n) in &l.members {
            e.sample("mcfs_dlm_members", &[("lockspace", &l.name), ("state", s)], *n as f64);
        }
    }
    e.family("mcfs_dlm_recoveries", "gauge", "Recovery records of failed nodes, by state.");
    for l in &ls {
        for (s, n) in &l.recoveries {
            e.sample("mcfs_dlm_recoveries", &[("lockspace", &l.name), ("state", s)], *n as f64);
        }
    }
    e.single("mcfs_dlm_lockspaces", "gauge", "Lockspaces.", ls.len() as f64);
    e.single("mcfs_dlm_sessions", "gauge", "Open sessions.", shared.session_count() as f64);
    e.single("mcfs_dlm_joins_total", "counter", "Successful joins.", m.joins.load(Ordering::Relaxed) as f64);
    e.single("mcfs_dlm_leaves_total", "counter", "Clean leaves.", m.leaves.load(Ordering::Relaxed) as f64);
    e.family("mcfs_dlm_session_failures_total", "counter", "Sessions that ended in a node failure, by reason.");
    for (r, n) in m.session_failures() {
        e.sample("mcfs_dlm_session_failures_total", &[("reason", r)], n as f64);
    }
    e.single(
        "mcfs_dlm_recoveries_started_total",
        "counter",
        "Node failures that started a recovery.",
        m.recoveries_started.load(Ordering::Relaxed) as f64,
    );
    e.family("mcfs_dlm_recovery_duration_seconds", "histogram", "Recovery phases: fencing (failure to fenced), replay (fenced to released), total (failure to released).");
    e.histogram("mcfs_dlm_recovery_duration_seconds", &[("phase", "fencing")], &m.recovery_fencing.snapshot());
    e.histogram("mcfs_dlm_recovery_duration_seconds", &[("phase", "replay")], &m.recovery_replay.snapshot());
    e.histogram("mcfs_dlm_recovery_duration_seconds", &[("phase", "total")], &m.recovery_total.snapshot());
    e.family("mcfs_dlm_fence_requests_total", "counter", "Verdicts of fence requests to mcfs-fenced, by outcome (stale: a success older than the failure).");
    for (o, n) in m.fence_requests() {
        e.sample("mcfs_dlm_fence_requests_total", &[("outcome", o)], n as f64);
    }
    e.family("mcfs_dlm_fence_calls_total", "counter", "Calls to mcfs-fenced, by result.");
    for (r, n) in m.fence_calls() {
        e.sample("mcfs_dlm_fence_calls_total", &[("result", r)], n as f64);
    }
    e.family("mcfs_dlm_fence_request_duration_seconds", "histogram", "Time from the first call of a fence request to its verdict.");
    e.histogram("mcfs_dlm_fence_request_duration_seconds", &[], &m.fence_duration.snapshot());
    e.family("mcfs_dlm_refused_calls_total", "counter", "Calls refused as unauthenticated, by method.");
    for (k, n) in m.refused_by_method() {
        e.sample("mcfs_dlm_refused_calls_total", &[("method", &k)], n as f64);
    }
    e.family("mcfs_dlm_rpc_timeouts_total", "counter", "Unary calls cut off by request_timeout_ms, by method.");
    for (k, n) in m.rpc_timeouts() {
        e.sample("mcfs_dlm_rpc_timeouts_total", &[("method", &k)], n as f64);
    }
    let c = &m.conn;
    e.single("mcfs_dlm_connections_open", "gauge", "Open gRPC connections (including handshakes).", c.open.load(Ordering::Relaxed) as f64);
    e.single("mcfs_dlm_connections_accepted_total", "counter", "TCP connections accepted.", c.accepted.load(Ordering::Relaxed) as f64);
    e.family("mcfs_dlm_connections_rejected_total", "counter", "Connections closed before reaching the service, by reason.");
    e.sample("mcfs_dlm_connections_rejected_total", &[("reason", "limit")], c.rejected_limit.load(Ordering::Relaxed) as f64);
    e.sample("mcfs_dlm_connections_rejected_total", &[("reason", "garbage")], c.rejected_garbage.load(Ordering::Relaxed) as f64);
    e.sample("mcfs_dlm_connections_rejected_total", &[("reason", "handshake_timeout")], c.rejected_timeout.load(Ordering::Relaxed) as f64);
    e.single("mcfs_dlm_start_time_seconds", "gauge", "When this server started (Unix time).", shared.started_unix_ms as f64 / 1e3);
    e.finish()
}
