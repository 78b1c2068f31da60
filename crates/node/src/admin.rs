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
