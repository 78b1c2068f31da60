//! The client library node daemons use to talk to mcfs-dlm.
//!
//! One `DlmClient` is one node's session in one lockspace. It runs, by itself:
//! * the Events stream (completions, blocking callbacks, recovery events, and
//!   the replies of pipelined requests),
//! * the Ops stream, on which lock/convert/unlock/cancel are pipelined (many
//!   requests in flight, no round trip per request),
//! * heartbeats that keep the session's lease alive and tell the server how
//!   many events this client took off its stream (a server evicts sessions
//!   that do not read their events). Each heartbeat has a deadline (the lease):
//!   a lock server that hangs is reported in the log and by
//!   [`DlmClient::server_silent_for`], and the session is kept (the server
//!   extends leases after it stalled itself),
//! * reconnection: when the stream breaks (the lock server restarted), it
//!   rejoins with a reclaim list of every granted lock. Lock ids stay valid:
//!   the server re-creates reclaimed locks under the same ids. Requests that
//!   were queued (not granted) are sent again transparently. If the server
//!   refuses the rejoin or any reclaim (the node was declared failed, or the
//!   grace window closed), every call fails with `SessionLost` and
//!   `ClientEvent::SessionLost` is delivered: the node must withdraw.
//!
//! Cancellation: `lock()` and `convert()` may be dropped at any time (e.g. by
//! `tokio::time::timeout`). A dropped `lock()` never leaves a lock nobody owns:
//! a queued request is cancelled, and if it was granted anyway it is unlocked.
//! A dropped `convert()` cancels the queued conversion; if it was granted
//! anyway the lock is converted back to the mode it had. `unlock()` and
//! `cancel()` are sent when called; dropping their futures does not undo them.
//! `cancel(lock_id)` is for queued conversions: a queued `lock()` has no id yet
//! for its caller, who cancels it by dropping the future.
//!
//! Dropping every handle without `leave()` ends the session like a crash: the
//! server sees the stream drop and fences the node.

use crate::core::mode::LvbOp;
use crate::core::recovery::RecoveryState;
use crate::core::{flags, Grant, LockId, Mode};
use crate::error::{Error, Result};
use mcfs_proto::auth::Secret;
use mcfs_proto::dlm as pb;
use mcfs_proto::dlm::dlm_client::DlmClient as Rpc;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// host:port of mcfs-dlm (or a full http:// URI).
    pub addr: String,
    pub secret: Secret,
    pub lockspace: String,
    pub node_id: u32,
    /// Where this node serves NodeAdmin (may be empty).
    pub admin_addr: String,
}

/// A recovery step of some node, as broadcast by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    pub node_id: u32,
    pub journal: i32,
    pub state: RecoveryState,
    pub failed_at_unix_ms: u64,
    pub fenced_at_unix_ms: u64,
    pub generation: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// A lock of ours blocks a request for `mode` (the BAST). Not repeated for
    /// the same waiting mode until the lock is granted anew.
    Blocking { lock_id: u64, resource: Vec<u8>, mode: Mode },
    /// Some node's recovery advanced (NEEDS_REPLAY names the journal to replay).
    Recovery(Recovery),
    /// The session is gone for good: withdraw.
    SessionLost(String),
    /// The lock server restarted and every granted lock was reclaimed.
    Reconnected,
}

type Rpcs = Rpc<tonic::service::interceptor::InterceptedService<Channel, Interceptor>>;

#[derive(Clone)]
struct Interceptor(Secret);

impl tonic::service::Interceptor for Interceptor {
    fn call(&mut self, req: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        Ok(self.0.attach(req))
    }
}

/// What a pipelined request resolves to.
enum Done {
    Grant(Grant),
    Unit,
    Bool(bool),
}

#[derive(Clone, Debug)]
enum Op {
    Lock { resource: Vec<u8>, mode: Mode, flags: u32 },
    Convert { lock_id: LockId, mode: Mode, flags: u32, from: Option<Mode>, lvb: Vec<u8> },
    Unlock { lock_id: LockId, lvb: Vec<u8>, flags: u32 },
    Cancel { lock_id: LockId },
}

struct Pending {
    op: Op,
    /// Lock id once the server queued it.
    queued: Option<LockId>,
    waiter: Option<oneshot::Sender<Result<Done>>>,
    /// The caller went away (or this is an internal clean-up request).
    abandoned: bool,
}

struct Held {
    resource: Vec<u8>,
    mode: Mode,
}

struct State {
    session_id: u64,
    generation: u64,
    lost: Option<String>,
    /// Every handle is gone or the session left: stop at once.
    stopping: bool,
    /// A Leave is in flight: the end of the stream is expected, not a reason to rejoin.
    leaving: bool,
    ops_tx: Option<mpsc::UnboundedSender<pb::OpRequest>>,
    next_tag: u64,
    pending: HashMap<u64, Pending>,
    held: HashMap<LockId, Held>,
    journal: Option<(i32, String)>,
}

struct Inner {
    cfg: ClientConfig,
    channel: Channel,
    st: Mutex<State>,
    events: mpsc::UnboundedSender<ClientEvent>,
    stop: Notify,
    /// When the lock server last answered a heartbeat (or the session
    /// began), and the heartbeat period it asked for.
    last_answer: Mutex<(std::time::Instant, Duration)>,
}

/// Dropped with the last user handle: stops the driver.
struct Users(Arc<Inner>);

impl Drop for Users {
    fn drop(&mut self) {
        self.0.lock().stopping = true;
        self.0.stop.notify_one();
    }
}

/// One node's session in one lockspace. Cheap to clone.
#[derive(Clone)]
pub struct DlmClient {
    inner: Arc<Inner>,
    _users: Arc<Users>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rpc(&self) -> Rpcs {
        Rpc::with_interceptor(self.channel.clone(), Interceptor(self.cfg.secret.clone())).max_decoding_message_size(32 << 20)
    }
}

impl State {
    fn request(&self, tag: u64, op: &Op) -> pb::OpRequest {
        use pb::op_request::Op as R;
        let session_id = self.session_id;
        let op = match op {
            Op::Lock { resource, mode, flags } => R::Lock(pb::LockRequest {
                session_id,
                resource: resource.clone(),
                mode: *mode as i32,
                flags: *flags,
                lock_id: 0,
                client_ref: tag,
                lvb: Vec::new(),
            }),
            Op::Convert { lock_id, mode, flags: f, lvb, .. } => R::Lock(pb::LockRequest {
                session_id,
                resource: Vec::new(),
                mode: *mode as i32,
                flags: *f | flags::CONVERT,
                lock_id: *lock_id,
                client_ref: tag,
                lvb: lvb.clone(),
            }),
            Op::Unlock { lock_id, lvb, flags } => {
                R::Unlock(pb::UnlockRequest { session_id, lock_id: *lock_id, lvb: lvb.clone(), flags: *flags })
            }
            Op::Cancel { lock_id } => R::Cancel(pb::CancelRequest { session_id, lock_id: *lock_id }),
        };
        pb::OpRequest { tag, op: Some(op) }
    }

    /// Queue a request; it is sent now if connected, else after reconnecting.
    fn submit(&mut self, op: Op, waiter: Option<oneshot::Sender<Result<Done>>>) -> Result<u64> {
        if let Some(r) = &self.lost {
            return Err(Error::SessionLost(r.clone()));
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        if let Some(tx) = &self.ops_tx {
            // A send error means the connection is going down: resent on reconnect.
            let _ = tx.send(self.request(tag, &op));
        }
        let abandoned = waiter.is_none();
        self.pending.insert(tag, Pending { op, queued: None, waiter, abandoned });
        Ok(tag)
    }

    /// A request finished. Keeps `held` in step and cleans up after callers
    /// that went away.
    fn finish(&mut self, tag: u64, res: Result<Done>) {
        let Some(p) = self.pending.remove(&tag) else { return };
        match (&p.op, &res) {
            (Op::Lock { resource, .. }, Ok(Done::Grant(g))) => {
                self.held.insert(g.lock_id, Held { resource: resource.clone(), mode: g.mode });
            }
            (Op::Convert { lock_id, .. }, Ok(Done::Grant(g))) => {
                if let Some(h) = self.held.get_mut(lock_id) {
                    h.mode = g.mode;
                }
            }
            (Op::Unlock { lock_id, .. }, Ok(_)) | (Op::Unlock { lock_id, .. }, Err(Error::NotFound(_))) => {
                self.held.remove(lock_id);
            }
            _ => {}
        }
        let res = match p.waiter {
            Some(w) => match w.send(res) {
                Ok(()) => return,
                Err(res) => res, // the caller dropped its receiver just now
            },
            None => res,
        };
        if p.abandoned || res.is_ok() {
            self.clean_up_abandoned(&p.op, res);
        }
    }

    /// Undo what a caller that went away would have got.
    fn clean_up_abandoned(&mut self, op: &Op, res: Result<Done>) {
        match (op, res) {
            (Op::Lock { .. }, Ok(Done::Grant(g))) => {
                let _ = self.submit(Op::Unlock { lock_id: g.lock_id, lvb: Vec::new(), flags: 0 }, None);
            }
            (Op::Convert { lock_id, from: Some(from), .. }, Ok(Done::Grant(g))) if g.mode != *from => {
                let op = Op::Convert { lock_id: *lock_id, mode: *from, flags: 0, from: Some(g.mode), lvb: Vec::new() };
                let _ = self.submit(op, None);
            }
            (_, Err(e)) => tracing::debug!("clean-up request failed: {e}"),
            _ => {}
        }
    }

    fn lose(&mut self, reason: &str, events: &mpsc::UnboundedSender<ClientEvent>) {
        if self.lost.is_some() {
            return;
        }
        self.lost = Some(reason.to_string());
        self.ops_tx = None;
        for (_, p) in self.pending.drain() {
            if let Some(w) = p.waiter {
                let _ = w.send(Err(Error::SessionLost(reason.to_string())));
            }
        }
        self.held.clear();
        let _ = events.send(ClientEvent::SessionLost(reason.to_string()));
    }
}

fn mode_of(v: i32) -> Result<Mode> {
    u8::try_from(v).ok().and_then(Mode::from_u8).ok_or_else(|| Error::Internal(format!("unknown mode {v} from the server")))
}

fn grant_from(g: Option<pb::Grant>, valblk_read: bool) -> Result<Grant> {
    let g = g.ok_or_else(|| Error::Internal("granted without a grant".into()))?;
    let mode = mode_of(g.mode)?;
    Ok(Grant {
        lock_id: g.lock_id,
        mode,
        lvb: valblk_read.then_some(g.lvb),
        lvb_valid: g.lvb_valid,
        lvb_seq: g.lvb_seq,
        fence_token: g.fence_token,
        generation: g.generation,
    })
}

/// Did this request ask to read the LVB on the transition it got?
fn reads_lvb(op: &Op, granted: i32) -> bool {
    let Ok(to) = mode_of(granted) else { return false };
    match op {
        Op::Lock { flags: f, .. } => f & flags::VALBLK != 0,
        Op::Convert { flags: f, from, .. } => f & flags::VALBLK != 0 && Mode::lvb_op(*from, to) == LvbOp::Read,
        _ => false,
    }
}

/// Why a connection ended.
enum End {
    Broken(String),
    Stop,
}

enum JoinError {
    Transient(String),
    Fatal(String),
}

impl DlmClient {
    /// Join the lockspace and start the session's streams and heartbeats.
    pub async fn connect(cfg: ClientConfig) -> Result<(DlmClient, mpsc::UnboundedReceiver<ClientEvent>)> {
        let uri = if cfg.addr.contains("://") { cfg.addr.clone() } else { format!("http://{}", cfg.addr) };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| Error::Config(format!("bad lock server address {}: {e}", cfg.addr)))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(3))
            .initial_stream_window_size(Some(1 << 20))
            .initial_connection_window_size(Some(4 << 20))
            .connect_lazy();
        let (etx, erx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            cfg,
            channel,
            st: Mutex::new(State {
                session_id: 0,
                generation: 0,
                lost: None,
                stopping: false,
                leaving: false,
                ops_tx: None,
                next_tag: 1,
                pending: HashMap::new(),
                held: HashMap::new(),
                journal: None,
            }),
            events: etx,
            stop: Notify::new(),
            last_answer: Mutex::new((std::time::Instant::now(), Duration::from_secs(1))),
        });
        let conn = match establish(&inner).await {
            Ok(c) => c,
            Err(JoinError::Transient(m)) => return Err(Error::Unavailable(m)),
            Err(JoinError::Fatal(m)) => return Err(Error::FailedPrecondition(m)),
        };
        tokio::spawn(drive_forever(inner.clone(), conn));
        let users = Arc::new(Users(inner.clone()));
        Ok((DlmClient { inner, _users: users }, erx))
    }

    async fn call(&self, op: Op) -> Result<Done> {
        let (tx, rx) = oneshot::channel();
        let tag = self.inner.lock().submit(op.clone(), Some(tx))?;
        let mut guard = Abandon { inner: &self.inner, tag, rx: Some(rx), op };
        guard.wait().await
    }

    /// A new lock. Waits for the grant if the request is queued. With NOQUEUE,
    /// `Err(WouldBlock)` when it cannot be granted at once.
    pub async fn lock(&self, resource: &[u8], mode: Mode, flags: u32) -> Result<Grant> {
        if flags & flags::CONVERT != 0 {
            return Err(Error::InvalidArgument("use convert() for conversions".into()));
        }
        match self.call(Op::Lock { resource: resource.to_vec(), mode, flags }).await? {
            Done::Grant(g) => Ok(g),
            _ => Err(Error::Internal("unexpected reply to a lock request".into())),
        }
    }

    /// Convert a granted lock. Waits if the conversion is queued.
    pub async fn convert(&self, lock_id: u64, mode: Mode, flags: u32) -> Result<Grant> {
        self.convert_with_lvb(lock_id, mode, flags, None).await
    }

    /// Convert, writing `lvb` on a down-conversion from PW/EX (with VALBLK).
    pub async fn convert_with_lvb(&self, lock_id: u64, mode: Mode, flags: u32, lvb: Option<&[u8]>) -> Result<Grant> {
        let from = self.inner.lock().held.get(&lock_id).map(|h| h.mode);
        let op = Op::Convert { lock_id, mode, flags, from, lvb: lvb.map(|b| b.to_vec()).unwrap_or_default() };
        match self.call(op).await? {
            Done::Grant(g) => Ok(g),
            _ => Err(Error::Internal("unexpected reply to a conversion".into())),
        }
    }

    /// Release a granted lock; a PW/EX holder writes `lvb` into the resource.
    pub async fn unlock(&self, lock_id: u64, lvb: Option<&[u8]>) -> Result<()> {
        let (lvb, f) = match lvb {
            Some(b) => (b.to_vec(), flags::VALBLK),
            None => (Vec::new(), 0),
        };
        self.call(Op::Unlock { lock_id, lvb, flags: f }).await.map(|_| ())
    }

    /// Cancel a queued conversion of `lock_id`. False when nothing was queued.
    pub async fn cancel(&self, lock_id: u64) -> Result<bool> {
        match self.call(Op::Cancel { lock_id }).await? {
            Done::Bool(b) => Ok(b),
            _ => Err(Error::Internal("unexpected reply to a cancel".into())),
        }
    }

    /// Report that this node replayed `node_id`'s journal (it must hold
    /// `journal/<journal>` in PW or EX).
    pub async fn recovery_done(&self, node_id: u32, journal: i32) -> Result<()> {
        let sid = self.session_id();
        self.inner
            .rpc()
            .recovery_done(pb::RecoveryDoneRequest { session_id: sid, node_id, journal })
            .await?;
        Ok(())
    }

    /// Register this node's journal slot and admin address (kept across reconnects).
    pub async fn set_session_info(&self, journal: i32, admin_addr: &str) -> Result<()> {
        let sid = self.session_id();
        self.inner
            .rpc()
            .set_session_info(pb::SessionInfoRequest { session_id: sid, journal, admin_addr: admin_addr.to_string() })
            .await?;
        self.inner.lock().journal = Some((journal, admin_addr.to_string()));
        Ok(())
    }

    /// The server-wide counters (`mcfs_dlm_*` metrics).
    pub async fn stats(&self) -> Result<pb::StatsReply> {
        Ok(self.inner.rpc().stats(pb::StatsRequest {}).await?.into_inner())
    }

    /// How long the lock server has not answered this session's heartbeats
    /// (zero while it answers). Over the lease, the server may have declared
    /// this node failed, or may itself be hung.
    pub fn server_silent_for(&self) -> Duration {
        let (last, hb) = *self.inner.last_answer.lock().unwrap_or_else(|p| p.into_inner());
        let since = last.elapsed();
        // One heartbeat period late is normal scheduling.
        if since <= hb * 2 {
            Duration::ZERO
        } else {
            since
        }
    }

    /// The server's state (this lockspace only); with `locks`, every resource's queues.
    pub async fn dump(&self, locks: bool) -> Result<pb::DumpReply> {
        let r = self.inner.rpc().dump(pb::DumpRequest { lockspace: self.inner.cfg.lockspace.clone(), locks }).await?;
        Ok(r.into_inner())
    }

    /// Leave the lockspace cleanly: every lock is released, no recovery.
    pub async fn leave(self) -> Result<()> {
        let sid = {
            let mut st = self.inner.lock();
            st.leaving = true;
            st.session_id
        };
        // The streams stay open until the server ends them: closing them first
        // would look like a crash and get the node fenced.
        let r = self.inner.rpc().leave(pb::LeaveRequest { session_id: sid }).await;
        {
            let mut st = self.inner.lock();
            st.stopping = true;
            let ev = self.inner.events.clone();
            st.lose("left the lockspace", &ev);
        }
        self.inner.stop.notify_one();
        r.map(|_| ()).map_err(Error::from)
    }

    pub fn node_id(&self) -> u32 {
        self.inner.cfg.node_id
    }

    pub fn session_id(&self) -> u64 {
        self.inner.lock().session_id
    }

    /// Lockspace generation seen at the last join.
    pub fn generation(&self) -> u64 {
        self.inner.lock().generation
    }

    /// Locks this client holds (granted), as it would reclaim them.
    pub fn held_locks(&self) -> Vec<(u64, Vec<u8>, Mode)> {
        let st = self.inner.lock();
        let mut v: Vec<_> = st.held.iter().map(|(id, h)| (*id, h.resource.clone(), h.mode)).collect();
        v.sort();
        v
    }
}

/// Resolves a request, or hands it to the driver to clean up if dropped.
struct Abandon<'a> {
    inner: &'a Arc<Inner>,
    tag: u64,
    rx: Option<oneshot::Receiver<Result<Done>>>,
    op: Op,
}

impl Abandon<'_> {
    async fn wait(&mut self) -> Result<Done> {
        let Some(rx) = self.rx.as_mut() else { return Err(Error::Internal("request already resolved".into())) };
        let r = rx.await;
        self.rx = None;
        r.unwrap_or_else(|_| Err(Error::SessionLost("client stopped".into())))
    }
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let mut st = self.inner.lock();
        if let Some(p) = st.pending.get_mut(&self.tag) {
            // Still in flight: the driver cleans up when the outcome arrives.
            p.abandoned = true;
            p.waiter = None;
            if let Some(id) = p.queued {
                if matches!(p.op, Op::Lock { .. } | Op::Convert { .. }) {
                    let _ = st.submit(Op::Cancel { lock_id: id }, None);
                }
            }
        } else if let Ok(res) = rx.try_recv() {
            // Resolved while we were being dropped: nobody will see it.
            st.clean_up_abandoned(&self.op, res);
        }
    }
}

/// Join (with reclaims of everything held), open the streams, re-send pending
/// requests.
async fn establish(inner: &Arc<Inner>) -> std::result::Result<Conn, JoinError> {
    let mut rpc = inner.rpc();
    let reclaim: Vec<pb::ReclaimLock> = {
        let st = inner.lock();
        st.held
            .iter()
            .map(|(id, h)| pb::ReclaimLock { lock_id: *id, resource: h.resource.clone(), mode: h.mode as i32 })
            .collect()
    };
    let n_reclaim = reclaim.len();
    let req = pb::JoinRequest {
        lockspace: inner.cfg.lockspace.clone(),
        node_id: inner.cfg.node_id,
        reclaim,
        admin_addr: inner.cfg.admin_addr.clone(),
    };
    let reply = match rpc.join(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            return Err(match s.code() {
                tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::AlreadyExists => JoinError::Transient(format!("join: {}", s.message())),
                _ => JoinError::Fatal(format!("join refused ({:?}): {}", s.code(), s.message())),
            })
        }
    };
    if !reply.reclaim_refused.is_empty() {
        return Err(JoinError::Fatal(format!(
            "the lock server refused to give back {} of {n_reclaim} locks (grace window over, or its state was lost)",
            reply.reclaim_refused.len()
        )));
    }
    let sid = reply.session_id;
    let events = rpc
        .events(pb::EventsRequest { session_id: sid })
        .await
        .map_err(|s| JoinError::Transient(format!("events: {}", s.message())))?
        .into_inner();
    let journal = inner.lock().journal.clone();
    if let Some((j, admin)) = journal {
        rpc.set_session_info(pb::SessionInfoRequest { session_id: sid, journal: j, admin_addr: admin })
            .await
            .map_err(|s| JoinError::Transient(format!("session info: {}", s.message())))?;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let mut ops_rpc = rpc.clone();
    let ops_task =
        tokio::spawn(async move { ops_rpc.ops(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await.map(|_| ()) });
    {
        let mut st = inner.lock();
        st.session_id = sid;
        st.generation = reply.generation;
        resend(&mut st, &tx);
        st.ops_tx = Some(tx);
    }
    for r in reply.recoveries {
        let _ = inner.events.send(ClientEvent::Recovery(recovery(&r)));
    }
    let heartbeat = Duration::from_millis(reply.heartbeat_ms.max(10).into());
    *inner.last_answer.lock().unwrap_or_else(|p| p.into_inner()) = (std::time::Instant::now(), heartbeat);
    Ok(Conn {
        session_id: sid,
        heartbeat,
        lease: Duration::from_millis(reply.lease_ms.max(20).into()),
        events,
        ops_task,
    })
}

/// After a rejoin: requests the old server never finished are sent again.
/// Their old lock ids (of queued requests) died with the old server.
fn resend(st: &mut State, tx: &mpsc::UnboundedSender<pb::OpRequest>) {
    let mut tags: Vec<u64> = st.pending.keys().copied().collect();
    tags.sort();
    // A cancel of a request that is itself being re-sent: the old request is
    // gone, so both end here, as cancelled.
    for &t in &tags {
        let Some(Op::Cancel { lock_id }) = st.pending.get(&t).map(|p| p.op.clone()) else { continue };
        let target = st.pending.iter().find(|(_, p)| p.queued == Some(lock_id)).map(|(k, _)| *k);
        if let Some(tt) = target {
            st.finish(tt, Err(Error::Canceled));
        }
        st.finish(t, Ok(Done::Bool(target.is_some())));
    }
    let mut tags: Vec<u64> = st.pending.keys().copied().collect();
    tags.sort();
    for t in tags {
        let Some(p) = st.pending.get_mut(&t) else { continue };
        if p.abandoned && matches!(p.op, Op::Lock { .. } | Op::Convert { .. }) {
            // Nobody waits for it, and whatever the old server did with it was
            // not reclaimed: nothing to undo.
            st.pending.remove(&t);
            continue;
        }
        p.queued = None;
        let op = p.op.clone();
        let req = st.request(t, &op);
        let _ = tx.send(req);
    }
}

struct Conn {
    session_id: u64,
    heartbeat: Duration,
    lease: Duration,
    events: tonic::Streaming<pb::Event>,
    ops_task: tokio::task::JoinHandle<std::result::Result<(), tonic::Status>>,
}

async fn drive_forever(inner: Arc<Inner>, mut conn: Conn) {
    loop {
        // `drive` consumes the connection: its streams are closed before we
        // rejoin, so a server that is still up sees the old session end now.
        let end = drive(&inner, conn).await;
        inner.lock().ops_tx = None;
        let reason = match end {
            End::Stop => {
                let ev = inner.events.clone();
                inner.lock().lose("client closed", &ev);
                return;
            }
            End::Broken(r) => r,
        };
        if inner.lock().leaving {
            let ev = inner.events.clone();
            inner.lock().lose("left the lockspace", &ev);
            return;
        }
        tracing::warn!(node = inner.cfg.node_id, lockspace = %inner.cfg.lockspace, "lock server connection lost: {reason}; rejoining");
        let mut backoff = Duration::from_millis(20);
        loop {
            if inner.lock().stopping {
                let ev = inner.events.clone();
                inner.lock().lose("client closed", &ev);
                return;
            }
            match establish(&inner).await {
                Ok(c) => {
                    conn = c;
                    tracing::info!(node = inner.cfg.node_id, session = conn.session_id, "rejoined the lockspace");
                    let _ = inner.events.send(ClientEvent::Reconnected);
                    break;
                }
                Err(JoinError::Fatal(m)) => {
                    tracing::error!(node = inner.cfg.node_id, "session lost: {m}");
                    let ev = inner.events.clone();
                    inner.lock().lose(&m, &ev);
                    return;
                }
                Err(JoinError::Transient(m)) => {
                    tracing::debug!("rejoin failed: {m}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = inner.stop.notified() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

/// Serve one connection until it breaks or the client stops.
async fn drive(inner: &Arc<Inner>, mut conn: Conn) -> End {
    let (hb_tx, mut hb_rx) = oneshot::channel::<String>();
    let hb_inner = inner.clone();
    let (sid, every, lease) = (conn.session_id, conn.heartbeat, conn.lease);
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hb_received = received.clone();
    let hb = tokio::spawn(async move {
        let mut rpc = hb_inner.rpc();
        let mut silent = false;
        loop {
            tokio::time::sleep(every).await;
            let n = hb_received.load(std::sync::atomic::Ordering::Acquire);
            let call = rpc.heartbeat(pb::HeartbeatRequest { session_id: sid, events_received: n });
            match tokio::time::timeout(lease, call).await {
                Ok(Ok(_)) => {
                    hb_inner.last_answer.lock().unwrap_or_else(|p| p.into_inner()).0 = std::time::Instant::now();
                    if silent {
                        tracing::info!(node = hb_inner.cfg.node_id, "the lock server answers heartbeats again");
                        silent = false;
                    }
                }
                Ok(Err(s)) if s.code() == tonic::Code::NotFound => {
                    let _ = hb_tx.send(format!("heartbeat: {}", s.message()));
                    return;
                }
                Ok(Err(s)) => tracing::debug!("heartbeat failed: {}", s.message()),
                Err(_) => {
                    if !silent {
                        tracing::warn!(
                            node = hb_inner.cfg.node_id,
                            "the lock server did not answer a heartbeat within the lease ({} ms); still trying",
                            lease.as_millis()
                        );
                        silent = true;
                    }
                }
            }
        }
    });
    let mut closed: Option<String> = None;
    let mut hb_done = false;
    let end = loop {
        if inner.lock().stopping {
            break End::Stop;
        }
        tokio::select! {
            m = conn.events.message() => match m {
                Ok(Some(ev)) => {
                    received.fetch_add(1, std::sync::atomic::Ordering::Release);
                    if let Some(pb::event::Kind::Closed(c)) = &ev.kind {
                        closed = Some(c.reason.clone());
                    }
                    handle_event(inner, ev);
                }
                Ok(None) => break End::Broken(closed.take().unwrap_or_else(|| "events stream ended".into())),
                Err(s) => break End::Broken(format!("events stream: {}", s.message())),
            },
            r = &mut hb_rx, if !hb_done => {
                hb_done = true;
                if let Ok(m) = r {
                    break End::Broken(m);
                }
            }
            r = &mut conn.ops_task => break End::Broken(match r {
                Ok(Ok(())) => "ops stream ended".into(),
                Ok(Err(s)) => format!("ops stream: {}", s.message()),
                Err(e) => format!("ops task: {e}"),
            }),
            _ = inner.stop.notified() => {}
        }
    };
    hb.abort();
    conn.ops_task.abort();
    end
}

fn recovery(r: &pb::Recovery) -> Recovery {
    let state = match pb::RecoveryState::try_from(r.state) {
        Ok(pb::RecoveryState::Failed) => RecoveryState::Failed,
        Ok(pb::RecoveryState::Fencing) => RecoveryState::Fencing,
        Ok(pb::RecoveryState::NeedsReplay) => RecoveryState::NeedsReplay,
        _ => RecoveryState::Released,
    };
    Recovery {
        node_id: r.node_id,
        journal: r.journal,
        state,
        failed_at_unix_ms: r.failed_at_unix_ms,
        fenced_at_unix_ms: r.fenced_at_unix_ms,
        generation: r.generation,
    }
}

fn handle_event(inner: &Arc<Inner>, ev: pb::Event) {
    use pb::event::Kind;
    let Some(kind) = ev.kind else { return };
    match kind {
        Kind::Reply(r) => {
            let mut st = inner.lock();
            let Some(result) = r.result else { return };
            handle_reply(&mut st, r.tag, result);
        }
        Kind::Completion(c) => {
            let mut st = inner.lock();
            let tag = c.client_ref;
            let Some(p) = st.pending.get(&tag) else { return };
            if p.queued != Some(c.lock_id) {
                return; // a completion from before a reconnect
            }
            let res = match pb::LockStatus::try_from(c.status) {
                Ok(pb::LockStatus::Granted) => {
                    let read = c.grant.as_ref().is_some_and(|g| reads_lvb(&p.op, g.mode));
                    grant_from(c.grant, read).map(Done::Grant)
                }
                Ok(pb::LockStatus::Canceled) => Err(Error::Canceled),
                Ok(pb::LockStatus::Deadlock) => Err(Error::Deadlock),
                _ => Err(Error::Internal(format!("unexpected completion status {}", c.status))),
            };
            st.finish(tag, res);
        }
        Kind::Blocking(b) => {
            if let Ok(mode) = mode_of(b.mode) {
                let _ = inner.events.send(ClientEvent::Blocking { lock_id: b.lock_id, resource: b.resource, mode });
            }
        }
        Kind::Recovery(r) => {
            let _ = inner.events.send(ClientEvent::Recovery(recovery(&r)));
        }
        Kind::Closed(_) => {}
    }
}

fn handle_reply(st: &mut State, tag: u64, result: pb::op_reply::Result) {
    use pb::op_reply::Result as R;
    let Some(p) = st.pending.get_mut(&tag) else { return };
    let res = match result {
        R::Error(e) => Err(Error::from_code(e.code, e.message)),
        R::Unlock(_) => Ok(Done::Unit),
        R::Cancel(c) => Ok(Done::Bool(c.canceled)),
        R::Lock(l) => match pb::LockStatus::try_from(l.status) {
            Ok(pb::LockStatus::Granted) => {
                let read = l.grant.as_ref().is_some_and(|g| reads_lvb(&p.op, g.mode));
                grant_from(l.grant, read).map(Done::Grant)
            }
            Ok(pb::LockStatus::Queued) => {
                p.queued = Some(l.lock_id);
                if p.abandoned {
                    let _ = st.submit(Op::Cancel { lock_id: l.lock_id }, None);
                }
                return;
            }
            Ok(pb::LockStatus::WouldBlock) => Err(Error::WouldBlock),
            Ok(pb::LockStatus::Deadlock) => Err(Error::Deadlock),
            Ok(pb::LockStatus::Canceled) => Err(Error::Canceled),
            Err(_) => Err(Error::Internal(format!("unknown lock status {}", l.status))),
        },
    };
    st.finish(tag, res);
}
