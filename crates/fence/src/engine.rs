//! The fencing engine: operations, levels, idempotency, per-node serialisation,
//! operator acknowledgements and resumption after a restart. No gRPC here (see
//! `service.rs`), so it is tested directly.

use crate::config::{Config, Level, NodeConfig};
use crate::error::{FenceError, Result};
use crate::metrics::FenceMetrics;
use crate::store::{
    now_ms, AttemptRecord, Kind, NodeRecord, OpRecord, Outcome, RefusedRecord, Store,
};
use crate::{agent, process};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// A fence request as the engine sees it.
#[derive(Clone, Debug)]
pub struct FenceArgs {
    pub request_id: String,
    pub node_id: u32,
    pub failure_time_ms: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatusView {
    pub node_id: u32,
    pub name: String,
    pub fenced: bool,
    pub fenced_at_ms: u64,
    pub last_request_id: String,
    pub last_outcome: Option<Outcome>,
    pub methods: Vec<String>,
    pub in_progress: bool,
    pub awaiting_ack: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckResult {
    pub acknowledged: bool,
    pub message: String,
}

/// Level outcome: `Ok((message, confirmed_at_ms))` or `Err(message)`.
type LevelResult = std::result::Result<(String, u64), String>;

#[derive(Default)]
struct SlotState {
    ops_in_flight: u32,
    fences_in_flight: u32,
    awaiting_ack: bool,
    /// An operator's acknowledgement not yet consumed by a manual level.
    ack: Option<(String, u64)>,
}

/// Per node: operations run one at a time (`run`), and the volatile state that
/// Status and Ack need.
struct Slot {
    run: tokio::sync::Mutex<()>,
    st: Mutex<SlotState>,
    ack: Notify,
    /// Serialises read-modify-write of the node's durable record.
    rec: Mutex<()>,
}

struct Inner {
    cfg: Config,
    store: Store,
    slots: HashMap<u32, Arc<Slot>>,
    /// Woken whenever an operation finishes.
    changed: Notify,
    metrics: Arc<FenceMetrics>,
    /// Wakes the background flusher (records of refused calls).
    flush: Arc<Notify>,
}

/// Longest `reason` of a FenceRequest and `operator` of an AckRequest kept.
pub const MAX_TEXT: usize = 1024;
/// Most records one History call returns.
pub const MAX_HISTORY: usize = 10_000;

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these cannot leave the data half-updated
    // (plain counters and options), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn check_request_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(FenceError::InvalidRequest(
            "request_id must not be empty".into(),
        ));
    }
    if id.len() > 256 || id.chars().any(char::is_control) {
        return Err(FenceError::InvalidRequest(
            "request_id must be at most 256 printable characters".into(),
        ));
    }
    Ok(())
}

fn check_text(what: &str, s: &str) -> Result<()> {
    if s.len() > MAX_TEXT {
        return Err(FenceError::InvalidRequest(format!(
            "{what} is {} bytes; the limit is {MAX_TEXT}",
            s.len()
        )));
    }
    Ok(())
}

impl Engine {
    /// Open the store and resume every operation a previous run left PENDING:
    /// fencing actions are idempotent (killing a dead process, switching off an
    /// off outlet), so running the levels again from the first is always safe,
    /// and the caller polling that request id simply gets its outcome later.
    pub async fn open(cfg: Config, data_dir: &Path) -> Result<Engine> {
        let store = Store::open(data_dir)?;
        let slots = cfg
            .nodes
            .keys()
            .map(|id| {
                let slot = Slot {
                    run: tokio::sync::Mutex::new(()),
                    st: Mutex::new(SlotState::default()),
                    ack: Notify::new(),
                    rec: Mutex::new(()),
                };
                (*id, Arc::new(slot))
            })
            .collect();
        let engine = Engine {
            inner: Arc::new(Inner {
                cfg,
                store,
                slots,
                changed: Notify::new(),
                metrics: Arc::new(FenceMetrics::default()),
                flush: Arc::new(Notify::new()),
            }),
        };
        engine.resume().await?;
        tokio::spawn(flusher(
            Arc::downgrade(&engine.inner),
            engine.inner.flush.clone(),
        ));
        Ok(engine)
    }

    pub fn metrics(&self) -> &Arc<FenceMetrics> {
        &self.inner.metrics
    }

    /// The Prometheus exposition (counters plus gauges read now).
    pub fn render_metrics(&self) -> String {
        let mut fenced = 0;
        let mut awaiting = 0;
        let mut in_progress = 0;
        for (id, slot) in &self.inner.slots {
            if self.inner.store.node(*id).is_ok_and(|n| n.fenced) {
                fenced += 1;
            }
            let st = lock(&slot.st);
            awaiting += usize::from(st.awaiting_ack);
            in_progress += st.ops_in_flight as usize;
        }
        self.inner
            .metrics
            .in_progress
            .store(in_progress as u64, std::sync::atomic::Ordering::Relaxed);
        self.inner
            .metrics
            .render(self.inner.slots.len(), fenced, awaiting)
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    async fn resume(&self) -> Result<()> {
        let store = &self.inner.store;
        let pending: Vec<OpRecord> = store
            .ops()?
            .into_iter()
            .filter(|r| r.outcome == Outcome::Pending)
            .collect();
        for mut rec in pending {
            let now = now_ms();
            if self.inner.cfg.node(rec.node_id).is_err() {
                rec.outcome = Outcome::Failed;
                rec.finished_ms = now;
                rec.message = format!(
                    "mcfs-fenced restarted and node {} is no longer configured",
                    rec.node_id
                );
                tracing::warn!(request_id = %rec.request_id, node = rec.node_id, "{}", rec.message);
                store.put_op(&rec)?;
                continue;
            }
            rec.attempts.push(AttemptRecord {
                level: 0,
                method: "restart".into(),
                started_ms: now,
                finished_ms: now,
                ok: false,
                message:
                    "mcfs-fenced restarted while this operation ran; it runs again from level 1"
                        .into(),
            });
            store.put_op(&rec)?;
            tracing::warn!(request_id = %rec.request_id, node = rec.node_id, kind = rec.kind.as_str(), "resuming an operation interrupted by a restart");
            self.spawn(rec, false);
        }
        store.flush().await
    }

    fn slot(&self, node: u32) -> Result<&Arc<Slot>> {
        self.inner
            .slots
            .get(&node)
            .ok_or_else(|| FenceError::UnknownNode {
                node,
                known: self.inner.cfg.known_nodes(),
            })
    }

    /// Start fencing a node, or return the record of the operation that already
    /// has this request id (PENDING while it runs).
    pub async fn fence(&self, a: FenceArgs) -> Result<OpRecord> {
        check_request_id(&a.request_id)?;
        check_text("reason", &a.reason)?;
        self.inner.cfg.node(a.node_id)?;
        self.begin(
            Kind::Fence,
            a.request_id,
            a.node_id,
            a.failure_time_ms,
            a.reason,
        )
        .await
    }

    /// Switch a fenced node back on (agent levels with `unfence = true` get
    /// `action=on`) and clear its fenced state. Refused when it is not fenced.
    pub async fn unfence(&self, request_id: &str, node_id: u32) -> Result<OpRecord> {
        check_request_id(request_id)?;
        self.inner.cfg.node(node_id)?;
        if let Some(prev) = self.inner.store.op(request_id)? {
            let r = same_op(prev, Kind::Unfence, node_id);
            if r.is_ok() {
                self.inner.metrics.duplicate(Kind::Unfence);
            }
            return r;
        }
        if !self.inner.store.node(node_id)?.fenced {
            return Err(FenceError::NotFenced(node_id));
        }
        self.begin(
            Kind::Unfence,
            request_id.to_string(),
            node_id,
            0,
            String::new(),
        )
        .await
    }

    async fn begin(
        &self,
        kind: Kind,
        request_id: String,
        node_id: u32,
        failure_time_ms: u64,
        reason: String,
    ) -> Result<OpRecord> {
        let store = &self.inner.store;
        if let Some(prev) = store.op(&request_id)? {
            let r = same_op(prev, kind, node_id);
            if r.is_ok() {
                self.inner.metrics.duplicate(kind);
            }
            return r;
        }
        // The queue check and the insert happen under the node's state lock, so
        // a caller inventing request ids cannot pile up operations without
        // bound, and concurrent retries of one id all find its record.
        let slot = self.slot(node_id)?.clone();
        let limit = self.inner.cfg.server.max_pending_ops_per_node();
        let rec = OpRecord {
            seq: store.next_seq()?,
            request_id,
            node_id,
            kind,
            requested_ms: now_ms(),
            failure_time_ms,
            reason,
            outcome: Outcome::Pending,
            fence_time_ms: 0,
            finished_ms: 0,
            method: String::new(),
            message: "running".into(),
            attempts: vec![],
        };
        {
            let mut st = lock(&slot.st);
            let existing = match store.op(&rec.request_id)? {
                Some(prev) => Some(prev),
                None if st.ops_in_flight as usize >= limit => {
                    return Err(FenceError::TooBusy {
                        node: node_id,
                        pending: st.ops_in_flight as usize,
                        limit,
                    })
                }
                None => store.insert_op(&rec)?.err(),
            };
            if let Some(prev) = existing {
                drop(st);
                let r = same_op(prev, kind, node_id);
                if r.is_ok() {
                    self.inner.metrics.duplicate(kind);
                }
                return r;
            }
            st.ops_in_flight += 1;
            if kind == Kind::Fence {
                st.fences_in_flight += 1;
            }
        }
        // From the insert on, every retry of this id is answered from the
        // record ("running"), so the operation must start whatever becomes of
        // this call: nothing between the insert and `spawn` may await or return.
        // A caller that gives up mid-call (the DLM's per-call deadline: hyper
        // then drops this future at its next await) used to leave a PENDING
        // record that no operation would ever finish. The spawned task flushes
        // the record before it acts; this call waits for that flush too, so it
        // still answers only with a durable record.
        let noted = self.update_node(node_id, |n| {
            n.last_request_id = rec.request_id.clone();
            n.last_outcome = Some(Outcome::Pending);
        });
        tracing::info!(request_id = %rec.request_id, node = node_id, kind = kind.as_str(), reason = %rec.reason, "operation accepted");
        self.spawn(rec.clone(), true);
        noted?;
        store.flush().await?;
        Ok(rec)
    }

    fn update_node(&self, node_id: u32, f: impl FnOnce(&mut NodeRecord)) -> Result<()> {
        let slot = self.slot(node_id)?;
        let _g = lock(&slot.rec);
        let mut n = self.inner.store.node(node_id)?;
        f(&mut n);
        self.inner.store.put_node(node_id, &n)
    }

    /// Run `rec` once the node's earlier operations are done. `reserved`: its
    /// place in the node's queue was already counted (see `begin`).
    fn spawn(&self, rec: OpRecord, reserved: bool) {
        let Ok(slot) = self.slot(rec.node_id).cloned() else {
            return;
        };
        if !reserved {
            let mut st = lock(&slot.st);
            st.ops_in_flight += 1;
            if rec.kind == Kind::Fence {
                st.fences_in_flight += 1;
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            let kind = rec.kind;
            let id = rec.request_id.clone();
            // The PENDING record is durable before anything is done to the node
            // (a restart then resumes the operation; see `resume`).
            let res = match me.inner.store.flush().await {
                Ok(()) => {
                    let _running = slot.run.lock().await;
                    me.run(rec, &slot).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                tracing::error!(request_id = %id, "operation could not be recorded: {e}");
            }
            {
                let mut st = lock(&slot.st);
                st.ops_in_flight -= 1;
                if kind == Kind::Fence {
                    st.fences_in_flight -= 1;
                    if st.fences_in_flight == 0 {
                        st.ack = None;
                        st.awaiting_ack = false;
                    }
                }
            }
            me.inner.changed.notify_waiters();
        });
    }

    async fn run(&self, mut rec: OpRecord, slot: &Slot) -> Result<()> {
        let node = self.inner.cfg.node(rec.node_id)?.clone();
        let won = match rec.kind {
            Kind::Fence => self.run_fence(&mut rec, &node, slot).await?,
            Kind::Unfence => self.run_unfence(&mut rec, &node).await?,
        };
        rec.finished_ms = now_ms();
        self.finish(&mut rec, won)?;
        let took = Duration::from_millis(rec.finished_ms.saturating_sub(rec.requested_ms));
        self.inner.metrics.operation(rec.kind, rec.outcome, took);
        self.inner.store.flush().await
    }

    /// Write the final record and the node's new state in one transaction.
    fn finish(&self, rec: &mut OpRecord, won: Option<(u32, String, u64)>) -> Result<()> {
        let slot = self.slot(rec.node_id)?;
        let _g = lock(&slot.rec);
        let mut n = self.inner.store.node(rec.node_id)?;
        n.last_request_id = rec.request_id.clone();
        match won {
            Some((level, method, confirmed_ms)) => {
                rec.outcome = Outcome::Success;
                rec.method = method;
                n.last_outcome = Some(Outcome::Success);
                match rec.kind {
                    Kind::Fence => {
                        rec.fence_time_ms = confirmed_ms;
                        rec.message = format!(
                            "node {} fenced by level {level} ({})",
                            rec.node_id, rec.method
                        );
                        n.fenced = true;
                        n.fenced_at_ms = confirmed_ms;
                    }
                    Kind::Unfence => {
                        rec.message = format!("node {} unfenced", rec.node_id);
                        n.fenced = false;
                    }
                }
                tracing::info!(request_id = %rec.request_id, node = rec.node_id, kind = rec.kind.as_str(), fence_time_ms = rec.fence_time_ms, "{}", rec.message);
            }
            None => {
                rec.outcome = Outcome::Failed;
                n.last_outcome = Some(Outcome::Failed);
                tracing::error!(request_id = %rec.request_id, node = rec.node_id, kind = rec.kind.as_str(), "{}", rec.message);
            }
        }
        self.inner.store.put_op_and_node(rec, &n)
    }

    /// Levels in order; the first that fully succeeds wins.
    async fn run_fence(
        &self,
        rec: &mut OpRecord,
        node: &NodeConfig,
        slot: &Slot,
    ) -> Result<Option<(u32, String, u64)>> {
        for (i, level) in node.levels.iter().enumerate() {
            let n = i as u32 + 1;
            let method = level.method_name();
            let started = now_ms();
            tracing::info!(request_id = %rec.request_id, node = node.id, level = n, %method, "fence attempt started");
            let res: LevelResult = match level {
                Level::Process(p) => {
                    let p = p.clone();
                    match tokio::task::spawn_blocking(move || {
                        process::fence(&p).map(|m| (m, now_ms()))
                    })
                    .await
                    {
                        Ok(r) => r,
                        Err(e) => Err(format!("process fencing task failed: {e}")),
                    }
                }
                Level::Agent(a) => agent::off(a, &node.name).await.map(|m| (m, now_ms())),
                Level::Manual(m) => wait_ack(slot, m.timeout).await,
            };
            let ok = res.is_ok();
            let (message, confirmed) = match res {
                Ok((m, t)) => (m, t),
                Err(m) => (m, 0),
            };
            if ok {
                tracing::info!(request_id = %rec.request_id, node = node.id, level = n, %method, "fence attempt succeeded: {message}");
            } else {
                tracing::warn!(request_id = %rec.request_id, node = node.id, level = n, %method, "fence attempt failed: {message}");
            }
            let finished = now_ms();
            self.inner.metrics.attempt(
                &method,
                ok,
                Duration::from_millis(finished.saturating_sub(started)),
            );
            rec.attempts.push(AttemptRecord {
                level: n,
                method: method.clone(),
                started_ms: started,
                finished_ms: finished,
                ok,
                message,
            });
            if ok {
                return Ok(Some((n, method, confirmed)));
            }
            self.inner.store.put_op(rec)?;
            self.inner.store.flush().await?;
        }
        rec.message = format!(
            "all {} fencing levels failed for node {}",
            node.levels.len(),
            node.id
        );
        Ok(None)
    }

    async fn run_unfence(
        &self,
        rec: &mut OpRecord,
        node: &NodeConfig,
    ) -> Result<Option<(u32, String, u64)>> {
        if !self.inner.store.node(node.id)?.fenced {
            rec.message = format!("node {} is no longer fenced; nothing to unfence", node.id);
            return Ok(None);
        }
        let mut methods = Vec::new();
        for (i, level) in node.levels.iter().enumerate() {
            let Level::Agent(a) = level else { continue };
            if !a.unfence {
                continue;
            }
            let n = i as u32 + 1;
            let method = level.method_name();
            let started = now_ms();
            tracing::info!(request_id = %rec.request_id, node = node.id, level = n, %method, "unfence (action=on) started");
            let res = agent::on(a, &node.name).await;
            let ok = res.is_ok();
            let message = match res {
                Ok(m) | Err(m) => m,
            };
            let finished = now_ms();
            self.inner.metrics.attempt(
                &method,
                ok,
                Duration::from_millis(finished.saturating_sub(started)),
            );
            rec.attempts.push(AttemptRecord {
                level: n,
                method: method.clone(),
                started_ms: started,
                finished_ms: finished,
                ok,
                message: message.clone(),
            });
            if !ok {
                tracing::warn!(request_id = %rec.request_id, node = node.id, level = n, %method, "unfence failed: {message}");
                rec.message = format!(
                    "level {n} ({method}) could not switch node {} on; it stays fenced",
                    node.id
                );
                return Ok(None);
            }
            methods.push(method);
        }
        let method = if methods.is_empty() {
            "none".to_string()
        } else {
            methods.join(",")
        };
        Ok(Some((0, method, now_ms())))
    }

    /// Operator acknowledgement (`mcfs fence ack`): accepted while a fence of the
    /// node is in progress and the node has a manual level; consumed by that level
    /// when the operation reaches it.
    pub fn ack(&self, node_id: u32, operator: &str) -> Result<AckResult> {
        check_text("operator", operator)?;
        let node = self.inner.cfg.node(node_id)?;
        let slot = self.slot(node_id)?;
        if !node.levels.iter().any(|l| matches!(l, Level::Manual(_))) {
            return Ok(AckResult {
                acknowledged: false,
                message: format!(
                    "node {node_id} has no manual fencing level; nothing to acknowledge"
                ),
            });
        }
        let mut st = lock(&slot.st);
        if st.fences_in_flight == 0 {
            return Ok(AckResult {
                acknowledged: false,
                message: format!(
                    "no fence operation is in progress for node {node_id}; nothing to acknowledge"
                ),
            });
        }
        let who = if operator.is_empty() {
            "an operator".to_string()
        } else {
            operator.to_string()
        };
        let at = now_ms();
        st.ack = Some((
            format!(
                "acknowledged by {who} at {at} ms: the operator confirms node {node_id} is off"
            ),
            at,
        ));
        let waiting = st.awaiting_ack;
        drop(st);
        slot.ack.notify_waiters();
        tracing::warn!(node = node_id, operator = %who, "manual fencing acknowledged by an operator");
        Ok(AckResult {
            acknowledged: true,
            message: if waiting {
                format!("node {node_id}: acknowledgement accepted; the manual level completes")
            } else {
                format!("node {node_id}: acknowledgement recorded; it completes the manual level when the operation reaches it")
            },
        })
    }

    pub fn status(&self, node_id: u32) -> Result<NodeStatusView> {
        let node = self.inner.cfg.node(node_id)?;
        let slot = self.slot(node_id)?;
        let n = self.inner.store.node(node_id)?;
        let st = lock(&slot.st);
        Ok(NodeStatusView {
            node_id,
            name: node.name.clone(),
            fenced: n.fenced,
            fenced_at_ms: n.fenced_at_ms,
            last_request_id: n.last_request_id,
            last_outcome: n.last_outcome,
            methods: node.levels.iter().map(Level::describe).collect(),
            in_progress: st.ops_in_flight > 0,
            awaiting_ack: st.awaiting_ack,
        })
    }

    /// Operations, newest first; `node_id` 0 means every node; `limit` 0 means 100.
    pub fn history(&self, node_id: u32, limit: usize) -> Result<Vec<OpRecord>> {
        let limit = if limit == 0 { 100 } else { limit.min(MAX_HISTORY) };
        let mut v: Vec<OpRecord> = self
            .inner
            .store
            .ops()?
            .into_iter()
            .filter(|r| node_id == 0 || r.node_id == node_id)
            .collect();
        v.reverse();
        v.truncate(limit);
        Ok(v)
    }

    pub fn refused(&self, limit: usize) -> Result<Vec<RefusedRecord>> {
        self.inner.store.refused(if limit == 0 {
            100
        } else {
            limit.min(crate::store::MAX_REFUSED)
        })
    }

    /// Record a refused (unauthenticated) call. It changes nothing else. The
    /// record is made durable by the background flusher within milliseconds,
    /// not before the refusal is answered: a flood of bad calls must not turn
    /// into a flood of synchronous disk flushes.
    pub async fn record_refused(&self, call: String, peer: String, reason: String) -> Result<()> {
        static LOG: mcfs_dlm::net::RateLog = mcfs_dlm::net::RateLog::new(Duration::from_secs(10), 5);
        if let Some(n) = LOG.allow() {
            tracing::warn!(%call, %peer, %reason, suppressed = n, "refused an unauthenticated call");
        }
        self.inner.store.add_refused(&RefusedRecord {
            at_ms: now_ms(),
            call,
            peer,
            reason,
        })?;
        self.inner.flush.notify_one();
        Ok(())
    }

    pub fn op(&self, request_id: &str) -> Result<Option<OpRecord>> {
        self.inner.store.op(request_id)
    }

    /// Wait until the operation is no longer PENDING, or `timeout` passes (then the
    /// PENDING record is returned).
    pub async fn wait_final(&self, request_id: &str, timeout: Duration) -> Result<OpRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let rec = self.inner.store.op(request_id)?.ok_or_else(|| {
                FenceError::InvalidRequest(format!("no operation with request id {request_id:?}"))
            })?;
            if rec.outcome != Outcome::Pending {
                return Ok(rec);
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return Ok(rec);
            }
        }
    }
}

/// Flushes what `record_refused` wrote, coalescing bursts; ends with the engine.
async fn flusher(inner: std::sync::Weak<Inner>, kick: Arc<Notify>) {
    loop {
        // Wakes up now and then to notice that the engine is gone.
        if tokio::time::timeout(Duration::from_secs(5), kick.notified())
            .await
            .is_err()
        {
            if inner.strong_count() == 0 {
                return;
            }
            continue;
        }
        let Some(i) = inner.upgrade() else { return };
        if let Err(e) = i.store.flush().await {
            tracing::error!("cannot flush the fence store: {e}");
        }
    }
}

fn same_op(prev: OpRecord, kind: Kind, node_id: u32) -> Result<OpRecord> {
    if prev.kind == kind && prev.node_id == node_id {
        Ok(prev)
    } else {
        Err(FenceError::RequestIdReused {
            id: prev.request_id.clone(),
            previous: format!("{} of node {}", prev.kind.as_str(), prev.node_id),
        })
    }
}

async fn wait_ack(slot: &Slot, timeout: Option<Duration>) -> LevelResult {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let notified = slot.ack.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut st = lock(&slot.st);
            if let Some(a) = st.ack.take() {
                st.awaiting_ack = false;
                return Ok(a);
            }
            st.awaiting_ack = true;
        }
        tracing::warn!("waiting for an operator's acknowledgement (`mcfs fence ack NODE`)");
        match deadline {
            Some(d) => {
                if tokio::time::timeout_at(d.into(), notified).await.is_err() {
                    lock(&slot.st).awaiting_ack = false;
                    let ms = timeout.map(|t| t.as_millis()).unwrap_or(0);
                    return Err(format!("no operator acknowledgement within {ms} ms"));
                }
            }
            None => notified.await,
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
