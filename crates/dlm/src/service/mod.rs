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
//! * `guard`: authentication and unary-call deadlines in front of `rpc`.
//! * `convert`: proto <-> core conversions and the Dump.
//! * `stats`: the `Stats` reply and the Prometheus exposition.
//!
//! Bad peers: connections are admitted by `net::listener` (count, handshake
//! deadline), calls by `guard` (secret, deadline), sessions by `rpc` (limits)
//! and kept honest by the reaper (leases, slow readers, see `outbox`).

mod convert;
mod guard;
pub mod outbox;
mod rpc;
mod stats;

use crate::config::ServerConfig;
use crate::core::recovery::FenceOutcome;
use crate::core::{CompletionResult, Effect, LockId, Lockspace, NodeId, RecoveryState, EPOCH_SHIFT};
use crate::error::{Error, Result};
use crate::fence_client::{FenceClient, FenceProgress};
use crate::metrics::{DlmMetrics, FailKind};
use crate::net::listener::{self, ListenerLimits};
use crate::store::Store;
use crate::unix_ms;
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
pub use stats::{render_metrics, stats};

/// One lockspace: its core and the outboxes of its sessions, under one mutex.
pub struct LsHandle {
    pub name: String,
    inner: Mutex<LsInner>,
    grace_until: Mutex<Option<Instant>>,
}

pub struct LsInner {
    pub core: Lockspace,
    outboxes: HashMap<NodeId, Arc<Outbox>>,
    /// When each queued request or conversion arrived (grant latency).
    queued_at: HashMap<LockId, Instant>,
}

impl LsInner {
    fn new(core: Lockspace) -> LsInner {
        LsInner { core, outboxes: HashMap::new(), queued_at: HashMap::new() }
    }

    /// Forget arrival times of requests that are no longer queued (their node
    /// failed or left: they ended without a completion).
    fn prune_queued(&mut self) {
        let core = &self.core;
        self.queued_at.retain(|id, _| core.lock(*id).is_some_and(|l| l.queue != crate::core::Queue::Granted));
    }
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
    fn lease_left(&self) -> Duration {
        self.lease_until().saturating_duration_since(Instant::now())
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
    pub metrics: Arc<DlmMetrics>,
    /// Fence requests in flight, by (lockspace, node, failure generation).
    fence_progress: Mutex<HashMap<(String, NodeId, u64), Arc<FenceProgress>>>,
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
    let c = &shared.cfg;
    let svc = guard::Guard::new(
        mcfs_proto::dlm::dlm_server::DlmServer::new(DlmService::new(shared.clone()))
            .max_decoding_message_size(c.max_message_bytes),
        secret,
        shared.clone(),
    );
    // The listener also sets TCP_NODELAY (tonic's own setting only applies to
    // listeners it binds itself); without it a lone callback waits for the
    // peer's delayed ACK (tens of ms).
    let limits = ListenerLimits {
        max_connections: c.max_connections,
        handshake_timeout: Duration::from_millis(c.handshake_timeout_ms),
    };
    let incoming = listener::incoming(listener, limits, shared.metrics.conn.clone(), "mcfs-dlm");
    let keepalive = Duration::from_millis(c.keepalive_ms);
    let builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(4 << 20))
        .max_concurrent_streams(Some(c.max_streams_per_connection))
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive));
    let task = tokio::spawn(async move {
        let mut builder = builder;
        let res = builder.add_service(svc).serve_with_incoming(incoming).await;
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

/// Serve `GET /metrics` on `listener` (runs until the process ends).
pub async fn serve_metrics(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    let render: crate::net::metrics::Render = Arc::new(move || render_metrics(&shared));
    crate::net::metrics::serve(listener, render).await
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
            metrics: Arc::new(DlmMetrics::default()),
            fence_progress: Mutex::new(HashMap::new()),
            lockspaces: RwLock::new(HashMap::new()),
            sessions: RwLock::new(HashMap::new()),
            next_session: AtomicU64::new(1),
        });
        for s in stored {
            if let Err(e) = shared.cfg.check_lockspace_cluster(&s.name) {
                tracing::warn!(lockspace = %s.name, "restored lockspace of another cluster: its nodes will be refused when they rejoin ({e})");
            }
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
                inner: Mutex::new(LsInner::new(core)),
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
            inner: Mutex::new(LsInner::new(Lockspace::new(name, self.epoch, self.cfg.limits.clone()))),
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
        self.session_of(ls, node).map(|s| (s.id, s.lease_left()))
    }

    /// The live session of `node` in `ls`.
    pub fn session_of(&self, ls: &str, node: NodeId) -> Option<Arc<Session>> {
        self.sessions_read().values().find(|s| s.node == node && s.ls.name == ls).cloned()
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
                    if let Some(t) = inner.queued_at.remove(&lock_id) {
                        if matches!(result, CompletionResult::Granted(_)) {
                            self.metrics.grant_latency[1].observe(t.elapsed());
                        }
                    }
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
                    self.observe_recovery(&rec);
                    let ev = convert::recovery(&rec);
                    for o in inner.outboxes.values() {
                        o.push(need, Kind::Recovery(ev.clone()));
                    }
                }
                Effect::Fence { node, request_id, failed_at_ms, failure_generation } => {
                    self.spawn_fence(ls.clone(), node, request_id, failed_at_ms, failure_generation);
                }
                Effect::Persist(_) => {}
            }
        }
    }

    fn observe_recovery(&self, rec: &crate::core::RecoveryRecord) {
        let m = &self.metrics;
        let since = |from: u64| unix_ms().saturating_sub(from);
        match rec.state {
            RecoveryState::Failed => {
                m.recoveries_started.fetch_add(1, Ordering::Relaxed);
            }
            RecoveryState::Fencing => {}
            RecoveryState::NeedsReplay => m.recovery_fencing.observe_ms(rec.fenced_at_ms.saturating_sub(rec.failed_at_ms)),
            RecoveryState::Released => {
                if rec.fenced_at_ms > 0 {
                    m.recovery_replay.observe_ms(since(rec.fenced_at_ms));
                }
                m.recovery_total.observe_ms(since(rec.failed_at_ms));
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

    /// What the fence client reported so far for a recovery at FENCING.
    pub fn fence_progress(&self, ls: &str, node: NodeId, generation: u64) -> Option<crate::fence_client::ProgressState> {
        let g = self.fence_progress.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&(ls.to_string(), node, generation)).map(|p| p.get())
    }

    fn spawn_fence(self: &Arc<Self>, ls: Arc<LsHandle>, node: NodeId, request_id: String, failed_at: u64, gen: u64) {
        let me = self.clone();
        tracing::warn!(lockspace = %ls.name, node, %request_id, "fencing node {node} via {}", me.fence.describe());
        let key = (ls.name.clone(), node, gen);
        let progress = {
            let mut g = self.fence_progress.lock().unwrap_or_else(|p| p.into_inner());
            g.entry(key.clone()).or_default().clone()
        };
        tokio::spawn(async move {
            let reason = format!("node {node} failed in lockspace {}", ls.name);
            let t0 = Instant::now();
            let outcome =
                me.fence.fence_tracked(&request_id, node, failed_at, &reason, &progress, Some(&me.metrics)).await;
            me.metrics.fence_duration.observe(t0.elapsed());
            match &outcome {
                FenceOutcome::Success { fence_time_ms } => me.metrics.fence_request(if *fence_time_ms >= failed_at { 0 } else { 2 }),
                FenceOutcome::Failed(m) => {
                    me.metrics.fence_request(1);
                    tracing::error!(lockspace = %ls.name, node, %request_id, "fencing FAILED: {m}");
                }
            }
            if !matches!(&outcome, FenceOutcome::Success { fence_time_ms } if *fence_time_ms >= failed_at) {
                // Do not hammer an agent that cannot fence: back off before the
                // core issues the next attempt.
                let attempt = ls.lock().core.recoveries().find(|r| r.node == node).map(|r| r.attempt).unwrap_or(0);
                tokio::time::sleep(me.fence.options().backoff(attempt + 3)).await;
            }
            let (seq, done) = {
                let mut g = ls.lock();
                let mut fx = Vec::new();
                g.core.fence_result(node, gen, outcome, &mut fx);
                let done = !g.core.recoveries().any(|r| r.node == node && r.generation == gen && r.state == RecoveryState::Fencing);
                (me.dispatch(&ls, &mut g, fx), done)
            };
            if done {
                me.fence_progress.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
            }
            me.store.request_flush(seq);
        });
    }

    /// The node behind `sess` failed (lease, dropped stream, eviction).
    pub fn fail_session(self: &Arc<Self>, sess: &Arc<Session>, reason: &str) {
        self.fail_session_as(sess, reason, FailKind::Evicted)
    }

    fn fail_session_as(self: &Arc<Self>, sess: &Arc<Session>, reason: &str, kind: FailKind) {
        if sess.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.metrics.session_failed(kind);
        self.sessions_write().remove(&sess.id);
        tracing::warn!(lockspace = %sess.ls.name, node = sess.node, session = sess.id, "node failed: {reason}");
        let seq = {
            let mut g = sess.ls.lock();
            if g.outboxes.get(&sess.node).is_some_and(|o| Arc::ptr_eq(o, &sess.outbox)) {
                g.outboxes.remove(&sess.node);
            }
            let mut fx = Vec::new();
            g.core.node_failed(sess.node, unix_ms(), reason, &mut fx);
            let seq = self.dispatch(&sess.ls, &mut g, fx);
            g.prune_queued();
            seq
        };
        sess.outbox.close(&format!("session failed: {reason}"));
        self.store.request_flush(seq);
    }

    /// Leases, slow readers and grace windows, checked a few times per heartbeat.
    async fn reaper(self: Arc<Self>) {
        let tick = Duration::from_millis(u64::from(self.cfg.heartbeat_ms / 4).clamp(10, 250));
        let evict_after = Duration::from_millis(self.cfg.evict_after_ms);
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            // A stopped or starved server (SIGSTOP, a frozen VM) heard no
            // heartbeats meanwhile; that is not its clients' fault.
            let gap = now.saturating_duration_since(last);
            if gap > tick + Duration::from_millis(u64::from(self.cfg.heartbeat_ms)) {
                self.extend_leases(gap - tick);
            }
            last = now;
            self.reap_once(now, evict_after);
        }
    }

    /// Give every session `by` more lease (after the server itself stalled).
    pub fn extend_leases(&self, by: Duration) {
        tracing::warn!(
            stalled_ms = by.as_millis() as u64,
            "the lock server did not run for {} ms (stopped or starved); leases extended by as much",
            by.as_millis()
        );
        for s in self.sessions_read().values() {
            let mut l = s.lease_until.lock().unwrap_or_else(|p| p.into_inner());
            *l += by;
        }
    }

    pub fn reap_once(self: &Arc<Self>, now: Instant, evict_after: Duration) {
        let sessions: Vec<Arc<Session>> = self.sessions_read().values().cloned().collect();
        for s in sessions {
            s.outbox.checkpoint(now, evict_after);
            if now > s.lease_until() {
                let reason = format!("lease expired (no heartbeat for {} ms)", self.cfg.lease_ms);
                self.fail_session_as(&s, &reason, FailKind::Lease);
            } else if let Some(why) = s.outbox.overdue(now, evict_after) {
                let kind = if s.attached.load(Ordering::Acquire) { FailKind::Evicted } else { FailKind::NeverAttached };
                self.fail_session_as(&s, &format!("evicted: {why}"), kind);
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
