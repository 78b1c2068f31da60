//! The lock server's counters and histograms. Written on the request paths with
//! relaxed atomics; read by `GET /metrics` (rendered in `service::stats`) and
//! by the `Stats` RPC. Every name is documented in docs/METRICS.md.

use crate::error::Error;
use crate::net::listener::ConnStats;
use crate::net::metrics::{Histogram, LATENCY_BUCKETS, SLOW_BUCKETS};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// `kind` label of `mcfs_dlm_lock_ops_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Lock,
    Convert,
    Unlock,
    Cancel,
}

pub const OP_KINDS: [&str; 4] = ["lock", "convert", "unlock", "cancel"];

/// `outcome` label of `mcfs_dlm_lock_ops_total`.
pub const OUTCOMES: [&str; 12] = [
    "granted",
    "queued",
    "would_block",
    "deadlock",
    "ok",
    "canceled",
    "not_pending",
    "invalid_argument",
    "not_found",
    "failed_precondition",
    "resource_exhausted",
    "error",
];

pub mod outcome {
    pub const GRANTED: usize = 0;
    pub const QUEUED: usize = 1;
    pub const WOULD_BLOCK: usize = 2;
    pub const DEADLOCK: usize = 3;
    pub const OK: usize = 4;
    pub const CANCELED: usize = 5;
    pub const NOT_PENDING: usize = 6;
}

/// Outcome index of an error.
pub fn error_outcome(e: &Error) -> usize {
    match e {
        Error::InvalidArgument(_) => 7,
        Error::NotFound(_) => 8,
        Error::FailedPrecondition(_) | Error::SessionLost(_) => 9,
        Error::ResourceExhausted(_) => 10,
        Error::WouldBlock => outcome::WOULD_BLOCK,
        Error::Deadlock => outcome::DEADLOCK,
        _ => 11,
    }
}

/// Why a session ended badly (`reason` label of `mcfs_dlm_session_failures_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailKind {
    Lease,
    StreamDropped,
    Evicted,
    NeverAttached,
}

pub const FAIL_KINDS: [&str; 4] = ["lease_expired", "stream_dropped", "evicted", "never_attached"];

/// Result of one call to mcfs-fenced (`result` label of `mcfs_dlm_fence_calls_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallResult {
    Success,
    Failed,
    Pending,
    Error,
    Timeout,
    BadReply,
}

pub const CALL_RESULTS: [&str; 6] = ["success", "failed", "pending", "error", "timeout", "bad_reply"];

/// Verdict on a fence request (`outcome` label of `mcfs_dlm_fence_requests_total`).
pub const FENCE_OUTCOMES: [&str; 3] = ["success", "failed", "stale"];

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

pub struct DlmMetrics {
    ops: [[AtomicU64; OUTCOMES.len()]; OP_KINDS.len()],
    /// [immediate, queued].
    pub grant_latency: [Histogram; 2],
    pub joins: AtomicU64,
    pub leaves: AtomicU64,
    session_failures: [AtomicU64; FAIL_KINDS.len()],
    pub recoveries_started: AtomicU64,
    /// Failure -> fenced, fenced -> released (replay), failure -> released.
    pub recovery_fencing: Histogram,
    pub recovery_replay: Histogram,
    pub recovery_total: Histogram,
    fence_requests: [AtomicU64; FENCE_OUTCOMES.len()],
    fence_calls: [AtomicU64; CALL_RESULTS.len()],
    /// Time from the first call of a fence request to its verdict.
    pub fence_duration: Histogram,
    /// Unary calls cut off by `request_timeout_ms`, by method.
    rpc_timeouts: Mutex<BTreeMap<String, u64>>,
    /// Unauthenticated calls, by method.
    refused: Mutex<BTreeMap<String, u64>>,
    pub last_refused: Mutex<Option<Refused>>,
    pub conn: Arc<ConnStats>,
}

#[derive(Clone, Debug, Default)]
pub struct Refused {
    pub at_unix_ms: u64,
    pub method: String,
    pub peer: String,
    pub reason: String,
}

impl Default for DlmMetrics {
    fn default() -> Self {
        DlmMetrics {
            ops: std::array::from_fn(|_| counters()),
            grant_latency: [Histogram::new(LATENCY_BUCKETS), Histogram::new(LATENCY_BUCKETS)],
            joins: AtomicU64::new(0),
            leaves: AtomicU64::new(0),
            session_failures: counters(),
            recoveries_started: AtomicU64::new(0),
            recovery_fencing: Histogram::new(SLOW_BUCKETS),
            recovery_replay: Histogram::new(SLOW_BUCKETS),
            recovery_total: Histogram::new(SLOW_BUCKETS),
            fence_requests: counters(),
            fence_calls: counters(),
            fence_duration: Histogram::new(SLOW_BUCKETS),
            rpc_timeouts: Mutex::new(BTreeMap::new()),
            refused: Mutex::new(BTreeMap::new()),
            last_refused: Mutex::new(None),
            conn: Arc::new(ConnStats::default()),
        }
    }
}

fn bump(m: &Mutex<BTreeMap<String, u64>>, key: &str) {
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    match g.get_mut(key) {
        Some(v) => *v += 1,
        None => {
            // Method names come from the request path; cap the label set so a
            // client cannot grow it without bound.
            let k = if g.len() < 64 { key } else { "other" };
            *g.entry(k.to_string()).or_insert(0) += 1;
        }
    }
}

impl DlmMetrics {
    pub fn op(&self, kind: OpKind, outcome: usize) {
        self.ops[kind as usize][outcome.min(OUTCOMES.len() - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// (kind, outcome, count) for every non-zero counter.
    pub fn ops(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut v = Vec::new();
        for (k, row) in self.ops.iter().enumerate() {
            for (o, c) in row.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    v.push((OP_KINDS[k], OUTCOMES[o], n));
                }
            }
        }
        v
    }

    pub fn session_failed(&self, k: FailKind) {
        self.session_failures[k as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub fn session_failures(&self) -> Vec<(&'static str, u64)> {
        FAIL_KINDS.iter().zip(&self.session_failures).map(|(n, c)| (*n, c.load(Ordering::Relaxed))).collect()
    }

    pub fn fence_call(&self, r: CallResult) {
        self.fence_calls[r as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub fn fence_calls(&self) -> Vec<(&'static str, u64)> {
        CALL_RESULTS.iter().zip(&self.fence_calls).map(|(n, c)| (*n, c.load(Ordering::Relaxed))).collect()
    }

    /// `outcome`: 0 success, 1 failed, 2 stale (a success older than the failure).
    pub fn fence_request(&self, outcome: usize) {
        self.fence_requests[outcome.min(FENCE_OUTCOMES.len() - 1)].fetch_add(1, Ordering::Relaxed);
    }
    pub fn fence_requests(&self) -> Vec<(&'static str, u64)> {
        FENCE_OUTCOMES.iter().zip(&self.fence_requests).map(|(n, c)| (*n, c.load(Ordering::Relaxed))).collect()
    }

    pub fn rpc_timeout(&self, method: &str) {
        bump(&self.rpc_timeouts, method);
    }
    pub fn rpc_timeouts(&self) -> Vec<(String, u64)> {
        self.rpc_timeouts.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    pub fn refused(&self, r: Refused) {
        bump(&self.refused, &r.method);
        *self.last_refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }
    pub fn refused_by_method(&self) -> Vec<(String, u64)> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
    pub fn refused_total(&self) -> u64 {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).values().sum()
    }
}
