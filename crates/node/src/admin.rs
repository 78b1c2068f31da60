//! NodeAdmin: the node daemon's read-only state over gRPC (`mcfs status`,
//! `mcfs glocks`), as JSON documents. Same bearer-secret auth as the lock server.

use std::sync::{Arc, OnceLock};

use mcfs_proto::auth::Secret;
use mcfs_proto::node::node_admin_server::{NodeAdmin, NodeAdminServer};
use mcfs_proto::node::{GlocksRequest, JsonReply, StatusRequest};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::fs::Fs;

/// Facts about the daemon that the filesystem does not know.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DaemonInfo {
    pub node_id: u32,
    pub device: String,
    pub mountpoint: String,
    pub pid: u32,
    pub lock: String,
    pub dlm: String,
}

impl Fs {
    /// Everything `mcfs status` shows about this node.
    pub fn status_json(&self) -> serde_json::Value {
        let waiting: Vec<serde_json::Value> = self
            .glocks
            .waiting()
            .into_iter()
            .map(|(n, m, d)| json!({"lock": n.to_string(), "mode": format!("{m:?}"), "waited_ms": d.as_millis() as u64}))
            .collect();
        let deferred: Vec<serde_json::Value> = self
            .icache
            .deferred_list()
            .into_iter()
            .take(50)
            .map(|d| json!({"ino": d.ino, "generation": d.generation, "attempts": d.attempts, "waiting_for": d.waiting_for, "age_ms": d.since.elapsed().as_millis() as u64}))
            .collect();
        let recoveries: Vec<serde_json::Value> = self
            .recoveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((n, j), s)| json!({"node": n, "journal": j, "step": s}))
            .collect();
        let replays = self.replays.lock().unwrap_or_else(|p| p.into_inner()).clone();
        use std::sync::atomic::Ordering::Relaxed;
        json!({
            "table": self.sb.table(),
            "uuid": mcfs_format::sb::uuid_string(&self.sb.uuid),
            "node_id": self.node_id,
            "journal": self.journal_slot(),
            "lock_backend": self.glocks.backend_kind(),
            "withdrawn": self.is_withdrawn(),
            "withdraw_reason": self.withdraw_reason(),
            "uptime_s": self.mounted_at.elapsed().as_secs(),
            "memory": self.budget.stats(),
            "eviction": self.icache.stats(),
            "deferred": deferred,
            "glocks": self.glocks.counts(),
            "waiting_for_locks": waiting,
            "log": self.log.stats(),
            "buffers_cached": self.bufs.len(),
            "ops": {
                "total": self.stats.ops.load(Relaxed),
                "errors": self.stats.errors.load(Relaxed),
                "bytes_read": self.stats.data_bytes_read.load(Relaxed),
                "bytes_written": self.stats.data_bytes_written.load(Relaxed),
                "readahead_windows": self.stats.readahead_windows.load(Relaxed),
                "readahead_bytes": self.stats.readahead_bytes.load(Relaxed),
                "inodes_created": self.stats.inodes_created.load(Relaxed),
                "inodes_deallocated": self.stats.inodes_deallocated.load(Relaxed),
                "blocks_allocated": self.stats.blocks_allocated.load(Relaxed),
                "blocks_freed": self.stats.blocks_freed.load(Relaxed),
            },
            "journals_replayed": replays,
            "recoveries": recoveries,
        })
    }
}

pub struct Admin {
    pub fs: Arc<OnceLock<Arc<Fs>>>,
    pub info: DaemonInfo,
}

#[tonic::async_trait]
impl NodeAdmin for Admin {
    async fn status(&self, _r: Request<StatusRequest>) -> Result<Response<JsonReply>, Status> {
        let mut v = match self.fs.get() {
            Some(fs) => fs.status_json(),
            None => json!({"state": "mounting"}),
        };
        if let (Some(obj), Ok(info)) = (v.as_object_mut(), serde_json::to_value(&self.info)) {
            obj.insert("daemon".into(), info);
        }
        Ok(Response::new(JsonReply { json: v.to_string() }))
    }

    async fn glocks(&self, r: Request<GlocksRequest>) -> Result<Response<JsonReply>, Status> {
        let all = r.get_ref().all;
        let v = match self.fs.get() {
            Some(fs) => serde_json::to_value(fs.glocks.dump(all)).unwrap_or_default(),
            None => json!([]),
        };
        Ok(Response::new(JsonReply { json: v.to_string() }))
    }
}

/// Serve NodeAdmin on `listener` until the runtime stops.
pub fn serve(listener: tokio::net::TcpListener, admin: Admin, secret: Secret) -> impl std::future::Future<Output = ()> {
    let svc = NodeAdminServer::with_interceptor(admin, secret.checker());
    async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(e) = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await {
            tracing::error!("admin server: {e}");
        }
    }
}

impl Fs {
    /// Prometheus text exposition of this node's counters (docs/METRICS.md).
    pub fn metrics_text(&self) -> String {
        use mcfs_dlm::net::metrics::Exposition;
        use std::sync::atomic::Ordering::Relaxed;
        let m = self.budget.stats();
        let e = self.icache.stats();
        let g = self.glocks.counts();
        let l = self.log.stats();
        let mut x = Exposition::new();
        x.family("mcfs_node_glocks", "gauge", "Glocks cached by this node, by granted state.");
        x.sample("mcfs_node_glocks", &[("state", "exclusive")], g.exclusive as f64);
        x.sample("mcfs_node_glocks", &[("state", "shared")], g.shared as f64);
        x.sample("mcfs_node_glocks", &[("state", "unlocked")], g.unlocked as f64);
        x.single("mcfs_node_glocks_demote_pending", "gauge", "Glocks another node is waiting for.", g.demote_pending as f64);
        x.single("mcfs_node_lock_requests_total", "counter", "Requests sent to the lock manager.", self.glocks.requests_total.load(Relaxed) as f64);
        x.single("mcfs_node_lock_would_block_total", "counter", "Try-lock requests refused because another node held the lock.", self.glocks.would_block_total.load(Relaxed) as f64);
        x.single("mcfs_node_lock_callbacks_total", "counter", "Blocking callbacks received (another node wants a lock we hold).", self.glocks.callbacks_total.load(Relaxed) as f64);
        x.single("mcfs_node_demotes_total", "counter", "Glock demotes (sync, invalidate, convert or unlock).", self.glocks.demotes_total.load(Relaxed) as f64);
        x.single("mcfs_node_glocks_trimmed_total", "counter", "Idle inode glocks given up because more than max_glocks were cached.", g.trimmed as f64);
        x.family("mcfs_node_lock_request_seconds", "histogram", "Time a lock-manager request took, grant or refusal.");
        x.histogram("mcfs_node_lock_request_seconds", &[], &self.glocks.lock_wait.snapshot());
        x.single("mcfs_node_lock_waiters", "gauge", "Threads waiting for a glock right now.", self.glocks.waiting().len() as f64);
        x.family("mcfs_node_cache_bytes", "gauge", "Memory budget: bytes charged, limit, low watermark, peak.");
        x.sample("mcfs_node_cache_bytes", &[("kind", "used")], m.used as f64);
        x.sample("mcfs_node_cache_bytes", &[("kind", "limit")], m.limit as f64);
        x.sample("mcfs_node_cache_bytes", &[("kind", "low_watermark")], m.low_watermark as f64);
        x.sample("mcfs_node_cache_bytes", &[("kind", "peak")], m.peak as f64);
        x.family("mcfs_node_reclaim_runs_total", "counter", "Reclaim runs, by kind.");
        x.sample("mcfs_node_reclaim_runs_total", &[("kind", "direct")], m.direct_reclaims as f64);
        x.sample("mcfs_node_reclaim_runs_total", &[("kind", "background")], m.background_reclaims as f64);
        x.single("mcfs_node_memory_pressure_events_total", "counter", "Memory-pressure notifications from the cgroup.", m.pressure_events as f64);
        x.single("mcfs_node_alloc_wait_longest_seconds", "gauge", "Longest time any allocation waited for memory.", m.longest_alloc_wait_us as f64 / 1e6);
        x.single("mcfs_node_alloc_wait_seconds_total", "counter", "Total time allocations waited for memory.", m.total_alloc_wait_us as f64 / 1e6);
        x.family("mcfs_node_alloc_wait_seconds", "histogram", "Time each allocation over budget spent reclaiming or waiting for memory.");
        x.histogram("mcfs_node_alloc_wait_seconds", &[], &self.budget.wait_hist.snapshot());
        x.family("mcfs_node_evictions_total", "counter", "Inode evictions by outcome.");
        x.sample("mcfs_node_evictions_total", &[("outcome", "dropped")], e.dropped_clean as f64);
        x.sample("mcfs_node_evictions_total", &[("outcome", "written_back")], e.written_back as f64);
        x.sample("mcfs_node_evictions_total", &[("outcome", "deallocated")], e.deallocated_now as f64);
        x.sample("mcfs_node_evictions_total", &[("outcome", "deferred")], e.deferred_total as f64);
        x.sample("mcfs_node_evictions_total", &[("outcome", "handed_off")], e.handed_to_other_node as f64);
        x.single("mcfs_node_inodes_cached", "gauge", "Inodes in this node's memory.", e.cached_inodes as f64);
        x.single("mcfs_node_deferred_deallocations", "gauge", "Deallocations waiting on the deferred list.", e.deferred_now as f64);
        x.single("mcfs_node_deferred_completed_total", "counter", "Deferred deallocations finished.", e.deferred_completed as f64);
        x.single("mcfs_node_dealloc_retries_total", "counter", "Retries of deferred deallocations.", e.dealloc_retries as f64);
        x.single("mcfs_node_orphans_found_total", "counter", "Unlinked inodes found by the orphan scan.", e.orphans_found as f64);
        x.single("mcfs_node_reclaim_sleep_violations_total", "counter", "Blocking lock requests attempted from reclaim (must stay 0).", e.sleep_violations as f64);
        x.single("mcfs_node_reclaim_blocked", "gauge", "1 while reclaim waits for a cluster lock (--evict=sync only).", f64::from(u8::from(e.reclaim_blocked_on.is_some())));
        x.single("mcfs_node_log_flushes_total", "counter", "Journal transactions written.", l.flushes as f64);
        x.single("mcfs_node_log_checkpoints_total", "counter", "Journal checkpoints (write-back, tail moved).", l.checkpoints as f64);
        x.single("mcfs_node_log_revokes_total", "counter", "Revoke records written.", l.revokes_written as f64);
        x.single("mcfs_node_log_used_blocks", "gauge", "Journal blocks between tail and head.", l.used_blocks as f64);
        x.single("mcfs_node_data_inflight_bytes", "gauge", "File data written behind and not yet on the device.", l.data.inflight_bytes as f64);
        x.single("mcfs_node_data_writes_behind_total", "counter", "File data writes queued to the write-behind writers.", l.data.writes_behind as f64);
        x.single("mcfs_node_data_writes_waited_total", "counter", "Writes that first waited for an overlapping write in flight or for room.", l.data.writes_waited as f64);
        x.single("mcfs_node_journals_replayed_total", "counter", "Dirty journals this node replayed (own at mount, others' on recovery).", self.stats.journals_replayed.load(Relaxed) as f64);
        x.single("mcfs_node_ops_total", "counter", "Filesystem operations served.", self.stats.ops.load(Relaxed) as f64);
        x.single("mcfs_node_op_errors_total", "counter", "Operations that failed (not counting ENOENT/EEXIST).", self.stats.errors.load(Relaxed) as f64);
        x.family("mcfs_node_data_bytes_total", "counter", "File data bytes, by direction.");
        x.sample("mcfs_node_data_bytes_total", &[("op", "read")], self.stats.data_bytes_read.load(Relaxed) as f64);
        x.sample("mcfs_node_data_bytes_total", &[("op", "write")], self.stats.data_bytes_written.load(Relaxed) as f64);
        x.single("mcfs_node_readahead_windows_total", "counter", "Read-ahead windows read in the background for sequential readers of large files.", self.stats.readahead_windows.load(Relaxed) as f64);
        x.single("mcfs_node_readahead_bytes_total", "counter", "File data bytes reads took from read-ahead windows.", self.stats.readahead_bytes.load(Relaxed) as f64);
        x.single("mcfs_node_inodes_deallocated_total", "counter", "Inodes this node deallocated.", self.stats.inodes_deallocated.load(Relaxed) as f64);
        x.single("mcfs_node_withdrawn", "gauge", "1 once the node has withdrawn from the filesystem.", f64::from(u8::from(self.is_withdrawn())));
        x.finish()
    }
}
