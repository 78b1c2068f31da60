//! The gRPC lock server: sessions with leases, per-lockspace state around the
//! pure core, effects carried out (events to sessions, records to sled, fence
//! requests), and the background reaper (leases, slow readers, grace windows).
//!
//! Concurrency: one `std::sync::Mutex` per lockspace guards its core and the
//! outboxes of its sessions. Every core call, the store writes it causes and the
//! events it produces happen under that mutex, so each session sees events in
//! the order the state changed; nothing under it awaits. Durability waits
//! (group-committed sled flushes) happen after it is released.
//!
//! * `outbox`: per-session event queue and the Events stream forwarder.
//! * `rpc`: the `Dlm` service (unary calls and the pipelined Ops stream).
//! * `convert`: proto <-> core conversions and the Dump.

mod convert;
pub mod outbox;
mod rpc;

use crate::config::ServerConfig;
use crate::core::recovery::FenceOutcome;
use crate::core::{Effect, Lockspace, NodeId, EPOCH_SHIFT};
use crate::error::{Error, Result};
use crate::unix_ms;
use crate::fence_client::FenceClient;
use crate::store::Store;
use mcfs_proto::auth::Secret;
use mcfs_proto::dlm::event::Kind;
use outbox::Outbox;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::time::Instant;

pub use rpc::DlmService;

/// One lockspace: its core and the outboxes of its sessions, under one mutex.
pub struct LsHandle {
    pub name: String,
    inner: Mutex<LsInner>,
    grace_until: Mutex<Option<Instant>>,
}

pub struct LsInner {
    pub core: Lockspace,
    outboxes: HashMap<NodeId, Arc<Outbox>>,
}

impl LsHandle {
    fn lock(&self) -> MutexGuard<'_, LsInner> {
        // The core never panics on input; if it did, refusing every later call
        // would turn one bug into a cluster-wide outage, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Session {
    pub id: u64,
    pub node: NodeId,
    pub ls: Arc<LsHandle>,
    outbox: Arc<Outbox>,
    lease_until: Mutex<Instant>,
    attached: AtomicBool,
    closed: AtomicBool,
}

impl Session {
    fn lease_until(&self) -> Instant {
        *self.lease_until.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn renew(&self, lease: Duration) {
        *self.lease_until.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now() + lease;
    }
}

pub struct Shared {
    pub cfg: ServerConfig,
    pub store: Arc<Store>,
    pub epoch: u64,
    pub started_unix_ms: u64,
    pub fence: FenceClient,
    lockspaces: RwLock<HashMap<String, Arc<LsHandle>>>,
    sessions: RwLock<HashMap<u64, Arc<Session>>>,
    next_session: AtomicU64,
}

/// A running server.
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Load state, start the flusher and reaper, and serve on `listener`.
pub async fn start(
    cfg: ServerConfig,
    store: Arc<Store>,
    secret: Secret,
    fence: FenceClient,
    listener: tokio::net::TcpListener,
) -> Result<ServerHandle> {
    cfg.validate()?;
    let addr = listener.local_addr().map_err(|e| Error::Config(format!("listener: {e}")))?;
    let shared = Shared::restore(cfg, store, fence)?;
    tokio::spawn(shared.store.clone().run_flusher());
    tokio::spawn(shared.clone().reaper());
    let svc = tonic::service::interceptor::InterceptedService::new(
        mcfs_proto::dlm::dlm_server::DlmServer::new(DlmService::new(shared.clone())).max_decoding_message_size(32 << 20),
        secret.checker(),
    );
    // tonic's tcp_nodelay only applies to listeners it binds itself; without it
    // a lone callback waits for the peer's delayed ACK (tens of ms).
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |r| {
        r.and_then(|s| {
            s.set_nodelay(true)?;
            Ok(s)
        })
    });
    let task = tokio::spawn(async move {
        let res = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(1 << 20))
            .initial_connection_window_size(Some(4 << 20))
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = res {
            tracing::error!("gRPC server stopped: {e}");
        }
    });
    Ok(ServerHandle { addr, shared, task })
}


/// The Dump reply (as served by the `Dump` RPC).
pub fn dump(shared: &Arc<Shared>, lockspace: &str, locks: bool) -> mcfs_proto::dlm::DumpReply {
    convert::dump(shared, lockspace, locks)
}

impl Shared {
    fn restore(cfg: ServerConfig, store: Arc<Store>, fence: FenceClient) -> Result<Arc<Shared>> {
        let epoch = store.next_epoch()?;
        let stored = store.load()?;
        let shared = Arc::new(Shared {
            cfg,
            store,
            epoch,
            started_unix_ms: unix_ms(),
            fence,
            lockspaces: RwLock::new(HashMap::new()),
            sessions: RwLock::new(HashMap::new()),
            next_session: AtomicU64::new(1),
        });
        for s in stored {
            let mut fx = Vec::new();
            let generation = s.saved.generation;
            let core = Lockspace::restore(&s.name, epoch, shared.cfg.limits.clone(), s.saved, &mut fx);
            let grace = core.in_grace().then(|| Instant::now() + Duration::from_millis(shared.cfg.grace_ms.into()));
            tracing::info!(
                lockspace = %s.name, generation, in_grace = grace.is_some(),
                "restored lockspace: {} members, {} recoveries",
                core.members().count(), core.recoveries().count()
            );
            let h = Arc::new(LsHandle {
                name: s.name.clone(),
                inner: Mutex::new(LsInner { core, outboxes: HashMap::new() }),
                grace_until: Mutex::new(grace),
            });
            {
                let mut g = h.lock();
                shared.dispatch(&h, &mut g, fx);
            }
            shared.lockspaces_write().insert(s.name, h);
        }
        Ok(shared)
    }

    fn lockspaces_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<LsHandle>>> {
        self.lockspaces.read().unwrap_or_else(|p| p.into_inner())
    }
    fn lockspaces_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<LsHandle>>> {
        self.lockspaces.write().unwrap_or_else(|p| p.into_inner())
    }
    fn sessions_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Arc<Session>>> {
        self.sessions.read().unwrap_or_else(|p| p.into_inner())
    }
    fn sessions_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<Session>>> {
        self.sessions.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lockspace(&self, name: &str) -> Option<Arc<LsHandle>> {
        self.lockspaces_read().get(name).cloned()
    }

    pub fn all_lockspaces(&self) -> Vec<Arc<LsHandle>> {
        let mut v: Vec<_> = self.lockspaces_read().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn lockspace_or_create(&self, name: &str) -> Result<Arc<LsHandle>> {
        if let Some(h) = self.lockspace(name) {
            return Ok(h);
        }
        let mut w = self.lockspaces_write();
        if let Some(h) = w.get(name) {
            return Ok(h.clone());
        }
        if w.len() >= self.cfg.max_lockspaces {
            return Err(Error::ResourceExhausted(format!("{} lockspaces exist (limit)", w.len())));
        }
        let h = Arc::new(LsHandle {
            name: name.to_string(),
            inner: Mutex::new(LsInner {
                core: Lockspace::new(name, self.epoch, self.cfg.limits.clone()),
                outboxes: HashMap::new(),
            }),
            grace_until: Mutex::new(None),
        });
        w.insert(name.to_string(), h.clone());
        tracing::info!(lockspace = name, "lockspace created");
        Ok(h)
    }

    /// The session with this id, if it is alive.
    pub fn session(&self, id: u64) -> Result<Arc<Session>> {
        match self.sessions_read().get(&id) {
            Some(s) if !s.closed.load(Ordering::Acquire) => Ok(s.clone()),
            _ => Err(Error::NotFound(format!(
                "unknown session {id:#x}: it expired, failed, left, or predates a lock-server restart"
            ))),
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions_read().len()
    }

    /// Lease remaining for the session of `node` in `ls`.
    pub fn lease_remaining(&self, ls: &str, node: NodeId) -> Option<(u64, Duration)> {
        let now = Instant::now();
        self.sessions_read()
            .values()
            .find(|s| s.node == node && s.ls.name == ls)
            .map(|s| (s.id, s.lease_until().saturating_duration_since(now)))
    }

    /// Write the effects' records to the store (in order). Returns the sequence
    /// number the caller must see flushed before it answers, or 0.
    fn persist(&self, ls: &LsHandle, fx: &[Effect]) -> u64 {
        let mut seq = 0;
        for e in fx {
            if let Effect::Persist(r) = e {
                match self.store.apply(&ls.name, r) {
                    Ok(s) => seq = s,
                    Err(e) => tracing::error!(lockspace = %ls.name, "cannot persist {r:?}: {e}"),
                }
            }
        }
        seq
    }

    /// Deliver events and start fence operations (records already persisted).
    fn deliver(self: &Arc<Self>, ls: &Arc<LsHandle>, inner: &mut LsInner, fx: Vec<Effect>) {
        let need = self.store.written();
        for e in fx {
            match e {
                Effect::Completion { node, lock_id, client_ref, result } => {
                    if let Some(o) = inner.outboxes.get(&node) {
                        o.push(need, Kind::Completion(convert::completion(lock_id, client_ref, result)));
                    }
                }
                Effect::Blocking { node, lock_id, resource, mode } => {
                    if let Some(o) = inner.outboxes.get(&node) {
                        o.push(
                            need,
                            Kind::Blocking(mcfs_proto::dlm::Blocking {
                                lock_id,
                                resource: resource.to_vec(),
                                mode: mode as i32,
                            }),
                        );
                    }
                }
                Effect::Recovery(rec) => {
                    tracing::info!(lockspace = %ls.name, node = rec.node, journal = rec.journal, state = rec.state.name(), "recovery");
                    let ev = convert::recovery(&rec);
                    for o in inner.outboxes.values() {
                        o.push(need, Kind::Recovery(ev));
                    }
                }
                Effect::Fence { node, request_id, failed_at_ms, failure_generation } => {
                    self.spawn_fence(ls.clone(), node, request_id, failed_at_ms, failure_generation);
                }
                Effect::Persist(_) => {}
            }
        }
    }

    /// `persist` then `deliver`.
    fn dispatch(self: &Arc<Self>, ls: &Arc<LsHandle>, inner: &mut LsInner, fx: Vec<Effect>) -> u64 {
        if fx.is_empty() {
            return 0;
        }
        let seq = self.persist(ls, &fx);
        self.deliver(ls, inner, fx);
        seq
    }

    fn spawn_fence(self: &Arc<Self>, ls: Arc<LsHandle>, node: NodeId, request_id: String, failed_at: u64, gen: u64) {
        let me = self.clone();
        tracing::warn!(lockspace = %ls.name, node, %request_id, "fencing node {node} via {}", me.fence.describe());
        tokio::spawn(async move {
            let reason = format!("node {node} failed in lockspace {}", ls.name);
            let outcome = me.fence.fence(&request_id, node, failed_at, &reason).await;
            if let FenceOutcome::Failed(m) = &outcome {
                tracing::error!(lockspace = %ls.name, node, %request_id, "fencing FAILED: {m}");
                // Do not hammer a failing agent.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let seq = {
                let mut g = ls.lock();
                let mut fx = Vec::new();
                g.core.fence_result(node, gen, outcome, &mut fx);
                me.dispatch(&ls, &mut g, fx)
            };
            me.store.request_flush(seq);
        });
    }

    /// The node behind `sess` failed (lease, dropped stream, eviction).
    pub fn fail_session(self: &Arc<Self>, sess: &Arc<Session>, reason: &str) {
        if sess.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.sessions_write().remove(&sess.id);
        tracing::warn!(lockspace = %sess.ls.name, node = sess.node, session = sess.id, "node failed: {reason}");
        let seq = {
            let mut g = sess.ls.lock();
            if g.outboxes.get(&sess.node).is_some_and(|o| Arc::ptr_eq(o, &sess.outbox)) {
                g.outboxes.remove(&sess.node);
            }
            let mut fx = Vec::new();
            g.core.node_failed(sess.node, unix_ms(), reason, &mut fx);
            self.dispatch(&sess.ls, &mut g, fx)
        };
        sess.outbox.close(&format!("session failed: {reason}"));
        self.store.request_flush(seq);
    }

    /// Leases, slow readers and grace windows, checked a few times per heartbeat.
    async fn reaper(self: Arc<Self>) {
        let tick = Duration::from_millis(u64::from(self.cfg.heartbeat_ms / 4).clamp(10, 250));
        let evict_after = Duration::from_millis(self.cfg.evict_after_ms);
        loop {
            tokio::time::sleep(tick).await;
            self.reap_once(Instant::now(), evict_after);
        }
    }

    pub fn reap_once(self: &Arc<Self>, now: Instant, evict_after: Duration) {
        let sessions: Vec<Arc<Session>> = self.sessions_read().values().cloned().collect();
        for s in sessions {
            if now > s.lease_until() {
                let reason = format!("lease expired (no heartbeat for {} ms)", self.cfg.lease_ms);
                self.fail_session(&s, &reason);
            } else if let Some(why) = s.outbox.overdue(now, evict_after) {
                self.fail_session(&s, &format!("evicted: {why}"));
            }
        }
        for ls in self.all_lockspaces() {
            let due = {
                let mut g = ls.grace_until.lock().unwrap_or_else(|p| p.into_inner());
                match *g {
                    Some(t) if now >= t => {
                        *g = None;
                        true
                    }
                    _ => false,
                }
            };
            if due {
                let seq = {
                    let mut g = ls.lock();
                    let mut fx = Vec::new();
                    tracing::info!(lockspace = %ls.name, "grace window over");
                    g.core.end_grace(unix_ms(), &mut fx);
                    self.dispatch(&ls, &mut g, fx)
                };
                self.store.request_flush(seq);
            }
        }
    }

    fn new_session_id(&self) -> u64 {
        (self.epoch << EPOCH_SHIFT) | self.next_session.fetch_add(1, Ordering::Relaxed)
    }
}
