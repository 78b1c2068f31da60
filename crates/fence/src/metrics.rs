//! mcfs-fenced's counters and their Prometheus exposition (`GET /metrics`,
//! `--metrics ADDR`). Every name is documented in docs/METRICS.md. Fencing is
//! rare, so the labelled counters sit behind small mutexes; nothing here is on
//! a hot path.

use crate::store::{Kind, Outcome};
use mcfs_dlm::net::listener::ConnStats;
use mcfs_dlm::net::metrics::{Exposition, Histogram, SLOW_BUCKETS};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Counts = Mutex<BTreeMap<(String, String), u64>>;

#[derive(Default)]
pub struct FenceMetrics {
    /// (kind, outcome) -> finished operations.
    operations: Counts,
    /// (kind, outcome) -> duration from request to outcome.
    op_duration: Mutex<BTreeMap<(String, String), Histogram>>,
    /// (method, outcome) -> level attempts.
    attempts: Counts,
    /// method -> attempt duration.
    attempt_duration: Mutex<BTreeMap<String, Histogram>>,
    /// (rpc, gRPC code) -> calls answered.
    calls: Counts,
    /// kind -> calls whose request id was already known (the recorded outcome was returned).
    duplicates: Counts,
    /// rpc -> unauthenticated calls refused.
    refused: Counts,
    pub in_progress: AtomicU64,
    pub conn: Arc<ConnStats>,
}

fn bump(m: &Counts, a: &str, b: &str) {
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    *g.entry((a.to_string(), b.to_string())).or_insert(0) += 1;
}

fn read(m: &Counts) -> Vec<((String, String), u64)> {
    m.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), *v)).collect()
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Pending => "pending",
        Outcome::Success => "success",
        Outcome::Failed => "failed",
    }
}

impl FenceMetrics {
    pub fn operation(&self, kind: Kind, outcome: Outcome, took: Duration) {
        let key = (kind.as_str().to_string(), outcome_name(outcome).to_string());
        bump(&self.operations, &key.0, &key.1);
        let mut h = self.op_duration.lock().unwrap_or_else(|p| p.into_inner());
        h.entry(key).or_insert_with(|| Histogram::new(SLOW_BUCKETS)).observe(took);
    }

    pub fn attempt(&self, method: &str, ok: bool, took: Duration) {
        bump(&self.attempts, method, if ok { "ok" } else { "failed" });
        let mut h = self.attempt_duration.lock().unwrap_or_else(|p| p.into_inner());
        h.entry(method.to_string()).or_insert_with(|| Histogram::new(SLOW_BUCKETS)).observe(took);
    }

    pub fn call(&self, rpc: &str, code: tonic::Code) {
        // ResourceExhausted -> resource_exhausted, as gRPC spells the codes.
        let mut c = String::new();
        for (i, ch) in format!("{code:?}").chars().enumerate() {
            if ch.is_uppercase() && i > 0 {
                c.push('_');
            }
            c.push(ch.to_ascii_lowercase());
        }
        bump(&self.calls, rpc, &c);
    }

    pub fn duplicate(&self, kind: Kind) {
        bump(&self.duplicates, kind.as_str(), "");
    }

    pub fn duplicates(&self, kind: Kind) -> u64 {
        read(&self.duplicates).into_iter().filter(|((k, _), _)| k == kind.as_str()).map(|(_, n)| n).sum()
    }

    pub fn refused(&self, rpc: &str) {
        bump(&self.refused, rpc, "");
    }

    pub fn refused_total(&self) -> u64 {
        read(&self.refused).iter().map(|(_, n)| n).sum()
    }

    /// `nodes_fenced` and `awaiting_ack` are read from the engine at scrape time.
    pub fn render(&self, nodes_configured: usize, nodes_fenced: usize, awaiting_ack: usize) -> String {
        let mut e = Exposition::new();
        e.family("mcfs_fenced_operations_total", "counter", "Finished fence and unfence operations, by kind and outcome.");
        for ((k, o), n) in read(&self.operations) {
            e.sample("mcfs_fenced_operations_total", &[("kind", &k), ("outcome", &o)], n as f64);
        }
        e.family(
            "mcfs_fenced_operation_duration_seconds",
            "histogram",
            "Time from an operation's request to its outcome, by kind and outcome.",
        );
        for ((k, o), h) in self.op_duration.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            e.histogram("mcfs_fenced_operation_duration_seconds", &[("kind", k), ("outcome", o)], &h.snapshot());
        }
        e.family("mcfs_fenced_attempts_total", "counter", "Attempts of fencing levels, by method and outcome.");
        for ((m, o), n) in read(&self.attempts) {
            e.sample("mcfs_fenced_attempts_total", &[("method", &m), ("outcome", &o)], n as f64);
        }
        e.family("mcfs_fenced_attempt_duration_seconds", "histogram", "Duration of level attempts, by method.");
        for (m, h) in self.attempt_duration.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            e.histogram("mcfs_fenced_attempt_duration_seconds", &[("method", m)], &h.snapshot());
        }
        e.family("mcfs_fenced_calls_total", "counter", "Authenticated gRPC calls answered, by rpc and status code.");
        for ((r, c), n) in read(&self.calls) {
            e.sample("mcfs_fenced_calls_total", &[("rpc", &r), ("code", &c)], n as f64);
        }
        e.family(
            "mcfs_fenced_duplicate_requests_total",
            "counter",
            "Fence/Unfence calls whose request id was already known: the recorded outcome was returned, nothing ran again.",
        );
        for ((k, _), n) in read(&self.duplicates) {
            e.sample("mcfs_fenced_duplicate_requests_total", &[("kind", &k)], n as f64);
        }
        e.family("mcfs_fenced_refused_calls_total", "counter", "Calls refused as unauthenticated (and recorded), by rpc.");
        for ((r, _), n) in read(&self.refused) {
            e.sample("mcfs_fenced_refused_calls_total", &[("rpc", &r)], n as f64);
        }
        e.single(
            "mcfs_fenced_operations_in_progress",
            "gauge",
            "Operations accepted and not finished (running or queued behind another on the same node).",
            self.in_progress.load(Ordering::Relaxed) as f64,
        );
        e.single("mcfs_fenced_nodes_configured", "gauge", "Nodes in the configuration.", nodes_configured as f64);
        e.single("mcfs_fenced_nodes_fenced", "gauge", "Nodes fenced now (not yet unfenced).", nodes_fenced as f64);
        e.single("mcfs_fenced_awaiting_ack", "gauge", "Nodes whose manual level waits for `mcfs fence ack`.", awaiting_ack as f64);
        let c = &self.conn;
        e.single("mcfs_fenced_connections_open", "gauge", "Open gRPC connections (including handshakes).", c.open.load(Ordering::Relaxed) as f64);
        e.family("mcfs_fenced_connections_rejected_total", "counter", "Connections closed before reaching the service, by reason.");
        e.sample("mcfs_fenced_connections_rejected_total", &[("reason", "limit")], c.rejected_limit.load(Ordering::Relaxed) as f64);
        e.sample("mcfs_fenced_connections_rejected_total", &[("reason", "garbage")], c.rejected_garbage.load(Ordering::Relaxed) as f64);
        e.sample(
            "mcfs_fenced_connections_rejected_total",
            &[("reason", "handshake_timeout")],
            c.rejected_timeout.load(Ordering::Relaxed) as f64,
        );
        e.finish()
    }
}
