//! The `Dlm` gRPC service. Authentication is an interceptor in front of it
//! (`Secret::checker`), so an unauthenticated call never reaches this code.

use super::convert;
use super::outbox::{closed_event, Outbox};
use super::{Session, Shared};
use crate::core::{LockOutcome, LockReq, MAX_LVB, MAX_NAME};
use crate::error::{Error, Result};
use crate::metrics::{error_outcome, outcome, FailKind, OpKind};
use mcfs_proto::dlm::dlm_server::Dlm;
use mcfs_proto::dlm::event::Kind;
use mcfs_proto::dlm::{
    op_reply, op_request, CancelReply, CancelRequest, DumpReply, DumpRequest, Event, EventsRequest, HeartbeatReply,
    HeartbeatRequest, JoinReply, JoinRequest, LeaveReply, LeaveRequest, LockReply, LockRequest, OpError, OpReply,
    OpRequest, OpsSummary, RecoveryDoneReply, RecoveryDoneRequest, SessionInfoReply, SessionInfoRequest, StatsReply,
    StatsRequest, UnfenceReply, UnfenceRequest, UnlockReply, UnlockRequest,
};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub struct DlmService {
    shared: Arc<Shared>,
}

impl DlmService {
    pub fn new(shared: Arc<Shared>) -> DlmService {
        DlmService { shared }
    }
}

const MAX_ADMIN_ADDR: usize = 256;

/// A node retrying a refused join must not flood the log.
static REFUSED_JOIN_LOG: crate::net::RateLog = crate::net::RateLog::new(Duration::from_secs(10), 5);

fn check_lockspace_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(|c| c.is_control() || c == '/') {
        return Err(Error::InvalidArgument(format!(
            "lockspace name {name:?} must be 1..={MAX_NAME} bytes without '/' or control characters"
        )));
    }
    Ok(())
}

impl Shared {
    fn join(self: &Arc<Self>, r: JoinRequest) -> Result<(JoinReply, u64)> {
        check_lockspace_name(&r.lockspace)?;
        // Before anything exists for it: a refused node has no member record,
        // so nothing about it can ever need fencing.
        if let Err(e) = self.cfg.check_lockspace_cluster(&r.lockspace) {
            if let Some(n) = REFUSED_JOIN_LOG.allow() {
                tracing::warn!(lockspace = %r.lockspace, node = r.node_id, suppressed = n, "join refused: {e}");
            }
            return Err(e);
        }
        if r.admin_addr.len() > MAX_ADMIN_ADDR {
            return Err(Error::InvalidArgument(format!("admin_addr longer than {MAX_ADMIN_ADDR} bytes")));
        }
        if r.reclaim.len() > self.cfg.limits.max_locks_per_node {
            return Err(Error::ResourceExhausted(format!(
                "reclaim list of {} locks exceeds the per-node limit {}",
                r.reclaim.len(),
                self.cfg.limits.max_locks_per_node
            )));
        }
        if self.session_count() >= self.cfg.max_sessions {
            return Err(Error::ResourceExhausted(format!("{} sessions open (limit)", self.cfg.max_sessions)));
        }
        let ls = self.lockspace_or_create(&r.lockspace)?;
        let outbox = Arc::new(Outbox::new(self.cfg.event_queue_soft, self.cfg.event_queue_hard));
        let lease = Duration::from_millis(self.cfg.lease_ms.into());
        let sess = Arc::new(Session {
            id: self.new_session_id(),
            node: r.node_id,
            ls: ls.clone(),
            outbox: outbox.clone(),
            lease_until: Mutex::new(Instant::now() + lease),
            attached: Default::default(),
            closed: Default::default(),
        });
        let (info, refused, seq) = {
            let mut g = ls.lock();
            let mut fx = Vec::new();
            let info = g.core.join(r.node_id, &r.admin_addr, &mut fx)?;
            let reclaim: Vec<_> =
                r.reclaim.iter().map(|l| (l.lock_id, l.resource.as_slice(), convert::mode(l.mode).ok())).collect();
            // Always: it also ends the grace window once everyone is back.
            let refused = g.core.reclaim(r.node_id, &reclaim, &mut fx);
            g.outboxes.insert(r.node_id, outbox);
            // Registered before the lockspace mutex is released, so a failure
            // found by anyone from now on finds the session.
            self.sessions_write().insert(sess.id, sess.clone());
            let seq = self.dispatch(&ls, &mut g, fx);
            (info, refused, seq)
        };
        self.metrics.joins.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            lockspace = %r.lockspace, node = r.node_id, session = sess.id, generation = info.generation,
            reclaimed = r.reclaim.len() - refused.len(), refused = refused.len(), "node joined"
        );
        let reply = JoinReply {
            session_id: sess.id,
            generation: info.generation,
            heartbeat_ms: self.cfg.heartbeat_ms,
            lease_ms: self.cfg.lease_ms,
            members: info.members,
            recoveries: info.recoveries.iter().map(convert::recovery).collect(),
            reclaim_refused: refused,
            in_grace: ls.lock().core.in_grace(),
        };
        Ok((reply, seq))
    }

    fn leave(self: &Arc<Self>, sess: &Arc<Session>) -> Result<u64> {
        if sess.closed.swap(true, Ordering::AcqRel) {
            return Err(Error::NotFound("session already closed".into()));
        }
        self.sessions_write().remove(&sess.id);
        let seq = {
            let mut g = sess.ls.lock();
            g.outboxes.remove(&sess.node);
            let mut fx = Vec::new();
            g.core.leave(sess.node, &mut fx)?;
            let seq = self.dispatch(&sess.ls, &mut g, fx);
            g.prune_queued();
            seq
        };
        self.metrics.leaves.fetch_add(1, Ordering::Relaxed);
        sess.outbox.close("left");
        tracing::info!(lockspace = %sess.ls.name, node = sess.node, session = sess.id, "node left");
        Ok(seq)
    }

    /// Lock or convert. With `reply_tag`, the reply goes to the session's
    /// outbox right after the state change (Ops stream); else it is returned.
    fn lock_op(self: &Arc<Self>, sess: &Arc<Session>, r: &LockRequest, reply_tag: Option<u64>) -> Result<(LockReply, u64)> {
        let t0 = Instant::now();
        let kind = if r.flags & crate::core::flags::CONVERT != 0 { OpKind::Convert } else { OpKind::Lock };
        // Checked here as well as in the core so that nothing oversized is
        // even looked at; an error still gets its reply on the Ops stream.
        let check = if r.resource.len() > MAX_NAME {
            Err(Error::InvalidArgument(format!("resource name is {} bytes; the limit is {MAX_NAME}", r.resource.len())))
        } else if r.lvb.len() > MAX_LVB {
            Err(Error::InvalidArgument(format!("LVB is {} bytes; the limit is {MAX_LVB}", r.lvb.len())))
        } else {
            Ok(())
        };
        let req = LockReq {
            resource: &r.resource,
            mode: convert::mode(r.mode).ok(),
            flags: r.flags,
            lock_id: r.lock_id,
            client_ref: r.client_ref,
            lvb: Some(&r.lvb),
        };
        let mut g = sess.ls.lock();
        let mut fx = Vec::new();
        let res = check.and_then(|()| g.core.request(sess.node, &req, &mut fx));
        let seq = self.persist(&sess.ls, &fx);
        let o = match &res {
            Ok(LockOutcome::Granted(_)) => {
                self.metrics.grant_latency[0].observe(t0.elapsed());
                outcome::GRANTED
            }
            Ok(LockOutcome::Queued(id)) => {
                g.queued_at.insert(*id, t0);
                outcome::QUEUED
            }
            Ok(LockOutcome::WouldBlock(_)) => outcome::WOULD_BLOCK,
            Ok(LockOutcome::Deadlock(_)) => outcome::DEADLOCK,
            Err(e) => error_outcome(e),
        };
        self.metrics.op(kind, o);
        let res = res.map(|o| convert::lock_reply(&o));
        if let Some(tag) = reply_tag {
            sess.outbox.push(self.store.written(), Kind::Reply(op_reply_of(tag, res.clone().map(op_reply::Result::Lock))));
        }
        self.deliver(&sess.ls, &mut g, fx);
        Ok((res?, seq))
    }

    fn unlock_op(self: &Arc<Self>, sess: &Arc<Session>, r: &UnlockRequest, reply_tag: Option<u64>) -> Result<u64> {
        let mut g = sess.ls.lock();
        let mut fx = Vec::new();
        let lvb = (!r.lvb.is_empty()).then_some(r.lvb.as_slice());
        let res = g.core.unlock(sess.node, r.lock_id, lvb, r.flags, &mut fx);
        self.metrics.op(OpKind::Unlock, res.as_ref().map_or_else(error_outcome, |_| outcome::OK));
        let seq = self.persist(&sess.ls, &fx);
        if let Some(tag) = reply_tag {
            let rep = res.clone().map(|_| op_reply::Result::Unlock(UnlockReply {}));
            sess.outbox.push(self.store.written(), Kind::Reply(op_reply_of(tag, rep)));
        }
        self.deliver(&sess.ls, &mut g, fx);
        res.map(|_| seq)
    }

    fn cancel_op(self: &Arc<Self>, sess: &Arc<Session>, r: &CancelRequest, reply_tag: Option<u64>) -> Result<(bool, u64)> {
        let mut g = sess.ls.lock();
        let mut fx = Vec::new();
        let res = g.core.cancel(sess.node, r.lock_id, &mut fx);
        let o = match &res {
            Ok(true) => outcome::CANCELED,
            Ok(false) => outcome::NOT_PENDING,
            Err(e) => error_outcome(e),
        };
        self.metrics.op(OpKind::Cancel, o);
        let seq = self.persist(&sess.ls, &fx);
        if let Some(tag) = reply_tag {
            let rep = res.clone().map(|c| op_reply::Result::Cancel(CancelReply { canceled: c }));
            sess.outbox.push(self.store.written(), Kind::Reply(op_reply_of(tag, rep)));
        }
        self.deliver(&sess.ls, &mut g, fx);
        res.map(|c| (c, seq))
    }

    /// Run a core call on the session's lockspace and dispatch its effects.
    fn with_core<T>(
        self: &Arc<Self>,
        sess: &Arc<Session>,
        f: impl FnOnce(&mut crate::core::Lockspace, &mut Vec<crate::core::Effect>) -> Result<T>,
    ) -> Result<(T, u64)> {
        let mut g = sess.ls.lock();
        let mut fx = Vec::new();
        let r = f(&mut g.core, &mut fx);
        let seq = self.dispatch(&sess.ls, &mut g, fx);
        r.map(|v| (v, seq))
    }

    async fn flushed(&self, seq: u64) -> Result<()> {
        if seq > 0 {
            self.store.flush_to(seq).await?;
        }
        Ok(())
    }

    /// Feed a session's outbox to its Events stream.
    async fn forward(self: Arc<Self>, sess: Arc<Session>, tx: tokio::sync::mpsc::Sender<Result<Event, Status>>) {
        let mut flushed = self.store.subscribe();
        loop {
            let batch = tokio::select! {
                b = sess.outbox.next_batch() => b,
                _ = tx.closed() => {
                    self.fail_session_as(&sess, "events stream dropped", FailKind::StreamDropped);
                    return;
                }
            };
            for (need, ev) in batch.events {
                while *flushed.borrow_and_update() < need {
                    self.store.request_flush(need);
                    if flushed.changed().await.is_err() {
                        return;
                    }
                }
                if tx.send(Ok(ev)).await.is_err() {
                    self.fail_session_as(&sess, "events stream dropped", FailKind::StreamDropped);
                    return;
                }
                sess.outbox.sent_one();
            }
            if let Some(reason) = batch.closed {
                let _ = tx.send(Ok(closed_event(&reason))).await;
                return;
            }
        }
    }
}

fn op_reply_of(tag: u64, r: Result<op_reply::Result>) -> OpReply {
    let result = match r {
        Ok(v) => v,
        Err(e) => op_reply::Result::Error(OpError { code: e.code() as i32, message: e.to_string() }),
    };
    OpReply { tag, result: Some(result) }
}

#[tonic::async_trait]
impl Dlm for DlmService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let (reply, seq) = self.shared.join(req.into_inner())?;
        self.shared.flushed(seq).await?;
        Ok(Response::new(reply))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let sess = self.shared.session(req.into_inner().session_id)?;
        let seq = self.shared.leave(&sess)?;
        self.shared.flushed(seq).await?;
        Ok(Response::new(LeaveReply {}))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let r = req.into_inner();
        let sess = self.shared.session(r.session_id)?;
        sess.renew(Duration::from_millis(self.shared.cfg.lease_ms.into()));
        sess.outbox.confirm(r.events_received);
        let generation = sess.ls.lock().core.generation();
        Ok(Response::new(HeartbeatReply { generation, lease_ms: self.shared.cfg.lease_ms }))
    }

    type EventsStream = ReceiverStream<Result<Event, Status>>;

    async fn events(&self, req: Request<EventsRequest>) -> Result<Response<Self::EventsStream>, Status> {
        let sess = self.shared.session(req.into_inner().session_id)?;
        if sess.attached.swap(true, Ordering::AcqRel) {
            return Err(Error::FailedPrecondition(format!("session {:#x} already has its Events stream", sess.id)).into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(self.shared.clone().forward(sess, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn ops(&self, req: Request<Streaming<OpRequest>>) -> Result<Response<OpsSummary>, Status> {
        let mut stream = req.into_inner();
        let mut sess: Option<Arc<Session>> = None;
        let mut n = 0u64;
        while let Some(msg) = stream.message().await? {
            n += 1;
            // Back-pressure: a client that does not read its replies stops
            // being read (its flow-control window fills), instead of growing
            // its queue; the reaper evicts it if that lasts.
            if let Some(s) = &sess {
                s.outbox.wait_room().await;
            }
            let sid = match &msg.op {
                Some(op_request::Op::Lock(r)) => r.session_id,
                Some(op_request::Op::Unlock(r)) => r.session_id,
                Some(op_request::Op::Cancel(r)) => r.session_id,
                None => return Err(Status::invalid_argument("empty OpRequest")),
            };
            let s = match &sess {
                Some(s) if s.id == sid => s.clone(),
                _ => {
                    let s = self.shared.session(sid)?;
                    sess = Some(s.clone());
                    s
                }
            };
            let seq = match msg.op {
                Some(op_request::Op::Lock(r)) => self.shared.lock_op(&s, &r, Some(msg.tag)).map(|x| x.1),
                Some(op_request::Op::Unlock(r)) => self.shared.unlock_op(&s, &r, Some(msg.tag)),
                Some(op_request::Op::Cancel(r)) => self.shared.cancel_op(&s, &r, Some(msg.tag)).map(|x| x.1),
                None => Ok(0),
            };
            // The reply is already queued behind the flush it needs; just start it.
            if let Ok(seq) = seq {
                self.shared.store.request_flush(seq);
            }
        }
        Ok(Response::new(OpsSummary { requests: n }))
    }

    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockReply>, Status> {
        let r = req.into_inner();
        let sess = self.shared.session(r.session_id)?;
        let (reply, seq) = self.shared.lock_op(&sess, &r, None)?;
        self.shared.flushed(seq).await?;
        Ok(Response::new(reply))
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockReply>, Status> {
        let r = req.into_inner();
        let sess = self.shared.session(r.session_id)?;
        let seq = self.shared.unlock_op(&sess, &r, None)?;
        self.shared.flushed(seq).await?;
        Ok(Response::new(UnlockReply {}))
    }

    async fn cancel(&self, req: Request<CancelRequest>) -> Result<Response<CancelReply>, Status> {
        let r = req.into_inner();
        let sess = self.shared.session(r.session_id)?;
        let (canceled, seq) = self.shared.cancel_op(&sess, &r, None)?;
        self.shared.flushed(seq).await?;
        Ok(Response::new(CancelReply { canceled }))
    }

    async fn recovery_done(&self, req: Request<RecoveryDoneRequest>) -> Result<Response<RecoveryDoneReply>, Status> {
        let r = req.into_inner();
        let sess = self.shared.session(r.session_id)?;
        let by = sess.node;
        let ((), seq) = self.shared.with_core(&sess, |c, fx| c.recovery_done(by, r.node_id, r.journal, fx))?;
        tracing::info!(lockspace = %sess.ls.name, by, node = r.node_id, journal = r.journal, "journal replayed");
        self.shared.flushed(seq).await?;
        Ok(Response::new(RecoveryDoneReply {}))
    }

    async fn set_session_info(&self, req: Request<SessionInfoRequest>) -> Result<Response<SessionInfoReply>, Status> {
        let r = req.into_inner();
        if r.admin_addr.len() > MAX_ADMIN_ADDR {
            return Err(Error::InvalidArgument(format!("admin_addr longer than {MAX_ADMIN_ADDR} bytes")).into());
        }
        let sess = self.shared.session(r.session_id)?;
        let node = sess.node;
        let ((), seq) = self.shared.with_core(&sess, |c, fx| c.set_session_info(node, r.journal, &r.admin_addr, fx))?;
        self.shared.flushed(seq).await?;
        Ok(Response::new(SessionInfoReply {}))
    }

    async fn stats(&self, _req: Request<StatsRequest>) -> Result<Response<StatsReply>, Status> {
        Ok(Response::new(super::stats(&self.shared)))
    }

    async fn dump(&self, req: Request<DumpRequest>) -> Result<Response<DumpReply>, Status> {
        let r = req.into_inner();
        Ok(Response::new(convert::dump(&self.shared, &r.lockspace, r.locks)))
    }

    async fn unfence(&self, req: Request<UnfenceRequest>) -> Result<Response<UnfenceReply>, Status> {
        let r = req.into_inner();
        let ls = self
            .shared
            .lockspace(&r.lockspace)
            .ok_or_else(|| Error::NotFound(format!("no lockspace {:?}", r.lockspace)))?;
        let generation = {
            let g = ls.lock();
            g.core.check_unfence(r.node_id)?;
            g.core.generation()
        };
        // The agent first: a node must not be let back in while it is still cut off
        // (or be cut off again after it was let in).
        let agent = self
            .shared
            .fence
            .unfence(&format!("{}/{}/unfence/{generation}", r.lockspace, r.node_id), r.node_id)
            .await
            .map_err(|e| Error::FailedPrecondition(format!("the fencing agent did not unfence node {}: {e}", r.node_id)))?;
        let (msg, seq) = {
            let mut g = ls.lock();
            let mut fx = Vec::new();
            let m = g.core.unfence(r.node_id, &mut fx)?;
            (m, self.shared.dispatch(&ls, &mut g, fx))
        };
        self.shared.flushed(seq).await?;
        tracing::info!(lockspace = %r.lockspace, node = r.node_id, "{msg} ({agent})");
        Ok(Response::new(UnfenceReply { message: format!("{msg} ({agent})") }))
    }
}
