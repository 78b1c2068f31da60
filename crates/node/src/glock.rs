//! Glocks: the node's cached view of cluster locks (GFS2's glock.c).
//!
//! Every inode, iopen, rgrp and journal has a glock backed by one lock in the lock
//! manager ([`LockBackend`]: mcfs-dlm, or nothing at all for `nolock`). A glock
//! stays granted after its last local holder leaves ("cached"), so a node that
//! keeps working on the same files talks to the lock manager once. When another
//! node wants the lock, the lock manager sends a blocking callback; the glock then
//! waits for its local holders to leave (and for the minimum hold time, so lock
//! ping-pong cannot starve work), asks its [`GlockOps`] to sync what the lock
//! covers (log flush, write-back in place, revokes) and, when the remote node wants
//! it exclusively, to invalidate the cached copies, and only then demotes.
//!
//! Local holders follow reader/writer rules: any number of shared holders, or one
//! exclusive holder, on this node. Lock order (as GFS2): rename lock, then inode
//! glocks in inode-number order, then rgrp glocks in index order, then the log.
//! No thread waits for a glock inside a transaction, which is what makes the log
//! flush a demote needs always able to run.
//!
//! Sleeping is a property of the calling context, carried by types: a blocking
//! acquire needs a [`MaySleep`] token, which memory reclaim never has (it gets a
//! [`NoSleep`] and can only use [`GlockTable::try_acquire`]). A thread-local
//! "in reclaim" flag backs the types up at run time: a blocking request from
//! reclaim is refused and counted, and the tests assert the count stays zero.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::error::{FsError, Result};

/// Lock modes (the VMS/Linux DLM six).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Mode {
    NL,
    CR,
    CW,
    PR,
    PW,
    EX,
}

/// What a glock protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LockName {
    /// Cross-directory rename serialisation (GFS2's rename lock).
    Rename,
    /// A dinode, its indirect blocks, directory blocks and file data.
    Inode(u64),
    /// "Someone has this inode in memory": held shared while cached.
    Iopen(u64),
    /// A resource group's header and bitmaps.
    Rgrp(u32),
    /// A journal slot.
    Journal(u32),
}

impl LockName {
    /// The lock manager resource name.
    pub fn resource(&self) -> Vec<u8> {
        match self {
            LockName::Rename => b"rename".to_vec(),
            LockName::Inode(n) => format!("inode/{n}").into_bytes(),
            LockName::Iopen(n) => format!("iopen/{n}").into_bytes(),
            LockName::Rgrp(n) => format!("rgrp/{n}").into_bytes(),
            LockName::Journal(n) => format!("journal/{n}").into_bytes(),
        }
    }

    pub fn parse(res: &[u8]) -> Option<LockName> {
        let s = std::str::from_utf8(res).ok()?;
        if s == "rename" {
            return Some(LockName::Rename);
        }
        let (k, n) = s.split_once('/')?;
        Some(match k {
            "inode" => LockName::Inode(n.parse().ok()?),
            "iopen" => LockName::Iopen(n.parse().ok()?),
            "rgrp" => LockName::Rgrp(n.parse().ok()?),
            "journal" => LockName::Journal(n.parse().ok()?),
            _ => return None,
        })
    }
}

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.resource()))
    }
}

/// Request flags understood by backends.
pub mod flags {
    /// Fail at once instead of waiting.
    pub const NOQUEUE: u32 = 1;
    /// Recovery: ignore locks of fenced nodes awaiting replay.
    pub const NOEXP: u32 = 1024;
    /// With NOQUEUE: still tell the holders that someone wants the lock.
    pub const NOQUEUEBAST: u32 = 128;
}

#[derive(Debug, Clone, Default)]
pub struct BackendGrant {
    pub id: u64,
    pub lvb: Vec<u8>,
    pub lvb_valid: bool,
}

/// Errors from a backend.
#[derive(Debug, Clone)]
pub enum LockError {
    /// NOQUEUE and not grantable now.
    WouldBlock,
    /// Lost session, server unreachable, refused.
    Failed(String),
}

/// The lock manager as the glock layer sees it. Calls block the calling thread.
pub trait LockBackend: Send + Sync {
    fn lock(&self, res: &[u8], mode: Mode, flags: u32) -> Result<BackendGrant, LockError>;
    fn convert(&self, id: u64, mode: Mode, flags: u32) -> Result<BackendGrant, LockError>;
    fn unlock(&self, id: u64, lvb: Option<&[u8]>) -> Result<(), LockError>;
    /// A short name for status output ("dlm", "nolock").
    fn kind(&self) -> &'static str;
}

/// `nolock`: a single node, every request granted at once, no callbacks.
#[derive(Default)]
pub struct NoLock {
    next: AtomicU64,
}

impl LockBackend for NoLock {
    fn lock(&self, _res: &[u8], _mode: Mode, _flags: u32) -> Result<BackendGrant, LockError> {
        Ok(BackendGrant { id: self.next.fetch_add(1, Ordering::Relaxed) + 1, lvb: Vec::new(), lvb_valid: true })
    }
    fn convert(&self, id: u64, _mode: Mode, _flags: u32) -> Result<BackendGrant, LockError> {
        Ok(BackendGrant { id, lvb: Vec::new(), lvb_valid: true })
    }
    fn unlock(&self, _id: u64, _lvb: Option<&[u8]>) -> Result<(), LockError> {
        Ok(())
    }
    fn kind(&self) -> &'static str {
        "nolock"
    }
}

/// What a glock's owner does around a demote.
pub trait GlockOps: Send + Sync {
    /// Make everything this node changed under `name` durable in place, and revoke
    /// its journal copies, so the next holder sees it and replay cannot undo it.
    fn sync(&self, name: LockName) -> Result<()>;
    /// Forget every cached copy of what `name` covers.
    fn invalidate(&self, name: LockName);
    /// Another node wants an iopen lock this node holds (it wants to deallocate).
    fn iopen_wanted(&self, ino: u64);
    /// A fatal error during a demote: withdraw.
    fn fatal(&self, err: &FsError);
}

thread_local! {
    static IN_RECLAIM: Cell<bool> = const { Cell::new(false) };
    static IN_TX: Cell<u32> = const { Cell::new(0) };
}

/// Counts blocking lock requests attempted from a context that may not sleep.
/// Must stay zero; exported in status and asserted by tests.
pub static SLEEP_VIOLATIONS: AtomicU64 = AtomicU64::new(0);

/// Proof that the current context may sleep on a cluster lock: FUSE requests,
/// the deallocator task, unmount, recovery. Reclaim never holds one.
#[derive(Debug)]
pub struct MaySleep {
    /// Made for `--evict=sync`: allowed to sleep even inside reclaim.
    gfs2_compat: bool,
}

impl MaySleep {
    /// For a context that may sleep. Refused (and counted) inside reclaim.
    pub fn new() -> Option<MaySleep> {
        if in_reclaim() {
            SLEEP_VIOLATIONS.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(MaySleep { gfs2_compat: false })
    }
    /// Only for `--evict=sync`: the GFS2-like behaviour, kept so the seed deadlock
    /// can be reproduced. Reclaim then blocks on cluster locks on purpose.
    pub fn gfs2_compat_from_reclaim() -> MaySleep {
        MaySleep { gfs2_compat: true }
    }
}

/// The reclaim context: may not sleep on a cluster lock.
#[derive(Debug)]
pub struct NoSleep {
    _p: (),
}

/// Marks the current thread as reclaiming while alive.
pub struct ReclaimScope {
    prev: bool,
    pub ctx: NoSleep,
}

impl ReclaimScope {
    pub fn enter() -> ReclaimScope {
        let prev = IN_RECLAIM.with(|c| c.replace(true));
        ReclaimScope { prev, ctx: NoSleep { _p: () } }
    }
}

impl Drop for ReclaimScope {
    fn drop(&mut self) {
        IN_RECLAIM.with(|c| c.set(self.prev));
    }
}

pub fn in_reclaim() -> bool {
    IN_RECLAIM.with(|c| c.get())
}

/// Transaction nesting marker (maintained by the log).
pub fn tx_enter() {
    IN_TX.with(|c| c.set(c.get() + 1));
}
pub fn tx_exit() {
    IN_TX.with(|c| c.set(c.get().saturating_sub(1)));
}
pub fn in_tx() -> bool {
    IN_TX.with(|c| c.get() > 0)
}

#[derive(Debug, Default)]
struct GlState {
    /// DLM lock id and granted mode; None = unlocked.
    granted: Option<(u64, Mode)>,
    holders_sh: u32,
    holder_ex: bool,
    /// A lock-manager request or a demote is running.
    busy: bool,
    /// Mode another node is waiting for (from a blocking callback).
    demote: Option<Mode>,
    demote_since: Option<Instant>,
    acquired_at: Option<Instant>,
    /// When the last local holder left (for trimming the least recently used).
    last_used: Option<Instant>,
    waiters: u32,
    lvb: Vec<u8>,
    requests: u64,
    demotes: u64,
}

impl GlState {
    /// Does a local holder have it now (shared or exclusive)?
    fn held(&self) -> bool {
        self.holder_ex || self.holders_sh > 0
    }
}

pub struct Glock {
    pub name: LockName,
    st: Mutex<GlState>,
    cv: Condvar,
}

impl Glock {
    fn lock_st(&self) -> std::sync::MutexGuard<'_, GlState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A local hold on a glock; released on drop.
pub struct Holder {
    gl: Arc<Glock>,
    table: Weak<GlockTable>,
    pub mode: Mode,
}

impl Holder {
    pub fn name(&self) -> LockName {
        self.gl.name
    }
    /// The lock value block as last granted.
    pub fn lvb(&self) -> Vec<u8> {
        self.gl.lock_st().lvb.clone()
    }
}

impl fmt::Debug for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Holder({} {:?})", self.gl.name, self.mode)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let need_demote = {
            let mut st = self.gl.lock_st();
            if self.mode == Mode::EX {
                st.holder_ex = false;
            } else {
                st.holders_sh = st.holders_sh.saturating_sub(1);
            }
            let idle = !st.held();
            if idle {
                st.last_used = Some(Instant::now());
            }
            self.gl.cv.notify_all();
            idle && st.demote.is_some() && !st.busy
        };
        if need_demote {
            if let Some(t) = self.table.upgrade() {
                t.queue_demote(self.gl.name);
            }
        }
    }
}

/// Counters for status.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GlockCounts {
    pub total: usize,
    pub exclusive: usize,
    pub shared: usize,
    pub unlocked: usize,
    pub with_holders: usize,
    pub demote_pending: usize,
    /// Inode glocks kept granted while idle, at most (then trimmed).
    pub max_cached: usize,
    /// Inode glocks given up by trimming so far.
    pub trimmed: u64,
}

/// One entry of a glock dump (`mcfs glocks`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GlockDump {
    pub name: String,
    pub state: String,
    pub lock_id: u64,
    pub holders_shared: u32,
    pub holder_exclusive: bool,
    pub waiters: u32,
    pub demote_wanted: Option<Mode>,
    pub busy: bool,
    pub requests: u64,
    pub demotes: u64,
}

pub struct GlockTable {
    map: Mutex<HashMap<LockName, Arc<Glock>>>,
    by_id: Mutex<HashMap<u64, LockName>>,
    backend: Arc<dyn LockBackend>,
    ops: Mutex<Option<Weak<dyn GlockOps>>>,
    demote_q: Mutex<Vec<LockName>>,
    /// Idle glocks to give up, queued by reclaim (which may not talk to the
    /// lock manager itself).
    release_q: Mutex<Vec<LockName>>,
    demote_cv: Condvar,
    pub min_hold: Duration,
    shutdown: std::sync::atomic::AtomicBool,
    me: Weak<GlockTable>,
    /// What each thread currently waits for (status: "blocked on ...").
    waiting: Mutex<HashMap<std::thread::ThreadId, (LockName, Mode, Instant)>>,
    /// Blocking callbacks that arrived before the grant they are about was
    /// recorded (the grant reply and the callback travel different paths). The
    /// lock server never repeats a callback, so losing one would hang the
    /// waiter forever.
    early: Mutex<HashMap<u64, (Mode, Instant)>>,
    /// `--evict=sync`: reclaim behaves as GFS2's: it releases and upgrades
    /// locks inline, waiting for the lock manager.
    pub gfs2_reclaim: std::sync::atomic::AtomicBool,
    /// Time lock-manager requests took (grant or refusal), for metrics.
    pub lock_wait: mcfs_dlm::net::metrics::Histogram,
    pub requests_total: AtomicU64,
    pub would_block_total: AtomicU64,
    pub demotes_total: AtomicU64,
    pub callbacks_total: AtomicU64,
    /// Inode glocks kept granted while idle (see [`GlockTable::trim`]).
    pub max_cached: std::sync::atomic::AtomicUsize,
    /// Inode glocks given up by trimming.
    pub trimmed_total: AtomicU64,
}

impl GlockTable {
    pub fn new(backend: Arc<dyn LockBackend>, min_hold: Duration) -> Arc<GlockTable> {
        Arc::new_cyclic(|me| GlockTable {
            map: Mutex::new(HashMap::new()),
            by_id: Mutex::new(HashMap::new()),
            backend,
            ops: Mutex::new(None),
            demote_q: Mutex::new(Vec::new()),
            release_q: Mutex::new(Vec::new()),
            demote_cv: Condvar::new(),
            min_hold,
            shutdown: false.into(),
            me: me.clone(),
            waiting: Mutex::new(HashMap::new()),
            early: Mutex::new(HashMap::new()),
            gfs2_reclaim: std::sync::atomic::AtomicBool::new(false),
            lock_wait: mcfs_dlm::net::metrics::Histogram::new(LOCK_WAIT_BUCKETS),
            requests_total: AtomicU64::new(0),
            would_block_total: AtomicU64::new(0),
            demotes_total: AtomicU64::new(0),
            callbacks_total: AtomicU64::new(0),
            max_cached: std::sync::atomic::AtomicUsize::new(usize::MAX),
            trimmed_total: AtomicU64::new(0),
        })
    }

    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// A single-node mount without a lock server: no other node exists.
    pub fn is_nolock(&self) -> bool {
        self.backend.kind() == "nolock"
    }

    /// Connect the filesystem that syncs and invalidates on demote, and start the
    /// demote worker.
    pub fn start(self: &Arc<Self>, ops: Weak<dyn GlockOps>) {
        *self.ops.lock().unwrap_or_else(|p| p.into_inner()) = Some(ops);
        let me = Arc::downgrade(self);
        let _ = std::thread::Builder::new().name("glock-demote".into()).spawn(move || demote_worker(me));
    }

    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.demote_cv.notify_all();
    }

    fn get(&self, name: LockName) -> Arc<Glock> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(name)
            .or_insert_with(|| Arc::new(Glock { name, st: Mutex::new(GlState::default()), cv: Condvar::new() }))
            .clone()
    }

    /// Blocking acquire: waits for local and remote conflicts.
    pub fn acquire(&self, name: LockName, mode: Mode, ctx: &MaySleep) -> Result<Holder> {
        self.acquire_flags(name, mode, 0, if ctx.gfs2_compat { Sleep::EvenInReclaim } else { Sleep::Yes })
    }

    /// Acquire for recovery of a dead node's journal (NOEXP).
    pub fn acquire_noexp(&self, name: LockName, mode: Mode, _ctx: &MaySleep) -> Result<Holder> {
        self.acquire_flags(name, mode, flags::NOEXP, Sleep::Yes)
    }

    /// Try-acquire: never waits for another node. Returns `WouldBlock` when the
    /// lock is held elsewhere (or locally in a conflicting mode). Safe from reclaim.
    pub fn try_acquire(&self, name: LockName, mode: Mode) -> Result<Holder> {
        self.acquire_flags(name, mode, flags::NOQUEUE, Sleep::No)
    }

    /// Try-acquire that also tells the holders someone wants it (iopen protocol).
    pub fn try_acquire_bast(&self, name: LockName, mode: Mode) -> Result<Holder> {
        self.acquire_flags(name, mode, flags::NOQUEUE | flags::NOQUEUEBAST, Sleep::No)
    }

    fn acquire_flags(&self, name: LockName, mode: Mode, fl: u32, sleep: Sleep) -> Result<Holder> {
        let may_sleep = sleep != Sleep::No;
        if sleep == Sleep::Yes && in_reclaim() {
            SLEEP_VIOLATIONS.fetch_add(1, Ordering::Relaxed);
            return Err(FsError::WouldBlock);
        }
        if may_sleep && in_tx() {
            return Err(FsError::Other(format!("internal: blocking acquire of {name} inside a transaction")));
        }
        let mode = if mode >= Mode::PW { Mode::EX } else { Mode::PR };
        let gl = self.get(name);
        let mut st = gl.lock_st();
        loop {
            let local_conflict = st.holder_ex || (mode == Mode::EX && st.holders_sh > 0);
            // A remote waiter that has waited the minimum hold time goes first.
            let yield_to_remote = st.demote.is_some() && st.acquired_at.is_none_or(|t| t.elapsed() >= self.min_hold);
            if st.busy || local_conflict || (yield_to_remote && st.granted.is_some()) {
                if !may_sleep {
                    return Err(FsError::WouldBlock);
                }
                st.waiters += 1;
                self.set_waiting(name, mode, true);
                st = gl.cv.wait_timeout(st, Duration::from_millis(200)).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
                st.waiters -= 1;
                continue;
            }
            match st.granted {
                Some((_, g)) if g >= mode => {
                    add_holder(&mut st, mode);
                    self.set_waiting(name, mode, false);
                    return Ok(Holder { gl: gl.clone(), table: self.me.clone(), mode });
                }
                _ => {}
            }
            // Need the lock manager. Upgrades release first (no conversion
            // deadlocks between two shared holders), so the cache is dropped too.
            // That release is a blocking round trip: reclaim does not do it.
            if st.granted.is_some() && sleep == Sleep::No && in_reclaim() && !self.gfs2_reclaim.load(Ordering::Relaxed) {
                return Err(FsError::WouldBlock);
            }
            st.busy = true;
            let old = st.granted.take();
            drop(st);
            if let Some((id, _)) = old {
                if let Err(e) = self.release_for_upgrade(name, id) {
                    let mut st2 = gl.lock_st();
                    st2.busy = false;
                    gl.cv.notify_all();
                    self.set_waiting(name, mode, false);
                    return Err(e);
                }
            }
            if may_sleep {
                self.set_waiting(name, mode, true);
            }
            let t0 = Instant::now();
            let res = self.backend.lock(&name.resource(), mode, fl);
            self.lock_wait.observe(t0.elapsed());
            self.requests_total.fetch_add(1, Ordering::Relaxed);
            if matches!(res, Err(LockError::WouldBlock)) {
                self.would_block_total.fetch_add(1, Ordering::Relaxed);
            }
            self.set_waiting(name, mode, false);
            st = gl.lock_st();
            st.busy = false;
            st.requests += 1;
            gl.cv.notify_all();
            match res {
                Ok(g) => {
                    st.granted = Some((g.id, mode));
                    st.lvb = g.lvb;
                    st.acquired_at = Some(Instant::now());
                    st.demote = None;
                    st.demote_since = None;
                    if let Some((m, _)) = self.early.lock().unwrap_or_else(|p| p.into_inner()).remove(&g.id) {
                        st.demote = Some(m);
                        st.demote_since = Some(Instant::now());
                    }
                    self.by_id.lock().unwrap_or_else(|p| p.into_inner()).insert(g.id, name);
                    add_holder(&mut st, mode);
                    return Ok(Holder { gl: gl.clone(), table: self.me.clone(), mode });
                }
                Err(LockError::WouldBlock) => return Err(FsError::WouldBlock),
                Err(LockError::Failed(m)) => return Err(FsError::Lock(format!("{name}: {m}"))),
            }
        }
    }

    fn set_waiting(&self, name: LockName, mode: Mode, on: bool) {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let id = std::thread::current().id();
        if on {
            w.entry(id).or_insert((name, mode, Instant::now()));
        } else {
            w.remove(&id);
        }
    }

    /// Locks threads are waiting for right now, longest first: (lock, mode, waited).
    pub fn waiting(&self) -> Vec<(LockName, Mode, Duration)> {
        let w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = w.values().map(|(n, m, t)| (*n, *m, t.elapsed())).collect();
        v.sort_by(|a, b| b.2.cmp(&a.2));
        v
    }

    fn release_for_upgrade(&self, name: LockName, id: u64) -> Result<()> {
        if let Some(ops) = self.ops() {
            ops.sync(name)?;
            ops.invalidate(name);
        }
        self.by_id.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        self.backend.unlock(id, None).map_err(|e| FsError::Lock(format!("{name}: {e:?}")))
    }

    fn ops(&self) -> Option<Arc<dyn GlockOps>> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|w| w.upgrade())
    }

    /// A blocking callback from the lock manager: another node waits for `mode`.
    pub fn blocking_callback(&self, lock_id: u64, res: &[u8], mode: Mode) {
        self.callbacks_total.fetch_add(1, Ordering::Relaxed);
        let name = match self.by_id.lock().unwrap_or_else(|p| p.into_inner()).get(&lock_id).copied() {
            Some(n) => n,
            None => match LockName::parse(res) {
                Some(n) => n,
                None => return,
            },
        };
        let gl = self.get(name);
        if let LockName::Iopen(ino) = name {
            // Holding iopen shared means "in memory here": the owner decides
            // whether to let go (evict) or keep the duty to deallocate. An idle
            // cached iopen lock, or an exclusive one left over from a
            // deallocation attempt, is demoted like any other glock (EX under
            // shared holders goes to PR).
            let (queue, in_memory) = {
                let mut st = gl.lock_st();
                let ours = st.granted.is_some_and(|g| g.0 == lock_id);
                let in_memory = st.held();
                let demotable = ours && (!in_memory || st.granted.is_some_and(|g| g.1 == Mode::EX));
                if demotable {
                    st.demote = Some(st.demote.map_or(mode, |d| d.max(mode)));
                    st.demote_since.get_or_insert_with(Instant::now);
                } else if !ours {
                    let mut e = self.early.lock().unwrap_or_else(|p| p.into_inner());
                    e.insert(lock_id, (mode, Instant::now()));
                }
                (demotable && !st.busy && !st.holder_ex, in_memory)
            };
            if queue {
                self.queue_demote(name);
            }
            if in_memory {
                if let Some(ops) = self.ops() {
                    ops.iopen_wanted(ino);
                }
            }
            return;
        }
        let idle = {
            let mut st = gl.lock_st();
            if st.granted.map(|g| g.0) != Some(lock_id) {
                // Not (yet) the lock we hold: either stale (a lock we gave up)
                // or for a grant still on its way to the acquiring thread.
                // Keep it until that grant is recorded.
                let mut e = self.early.lock().unwrap_or_else(|p| p.into_inner());
                e.retain(|_, (_, t)| t.elapsed() < Duration::from_secs(120));
                let entry = e.entry(lock_id).or_insert((mode, Instant::now()));
                entry.0 = entry.0.max(mode);
                return;
            }
            let m = st.demote.map_or(mode, |d| d.max(mode));
            st.demote = Some(m);
            st.demote_since.get_or_insert_with(Instant::now);
            gl.cv.notify_all();
            !st.busy && !st.held()
        };
        if idle {
            self.queue_demote(name);
        }
    }

    fn queue_demote(&self, name: LockName) {
        self.demote_q.lock().unwrap_or_else(|p| p.into_inner()).push(name);
        self.demote_cv.notify_all();
    }

    /// Demote one glock if it is idle. Returns Some(delay) when it must wait for
    /// the minimum hold time first.
    fn try_demote(&self, name: LockName) -> Option<Duration> {
        let gl = self.get(name);
        let (id, held, target) = {
            let mut st = gl.lock_st();
            let Some(want) = st.demote else { return None };
            let Some((id, held)) = st.granted else {
                st.demote = None;
                return None;
            };
            // iopen holders are shared holders for the inode's whole life in
            // memory: an EX grant is demoted to PR under them
            let iopen = matches!(name, LockName::Iopen(_));
            if st.busy || st.holder_ex || (st.holders_sh > 0 && !(iopen && held == Mode::EX)) {
                return None; // the last holder requeues
            }
            if let Some(t) = st.acquired_at {
                let el = t.elapsed();
                if el < self.min_hold {
                    return Some(self.min_hold - el);
                }
            }
            st.busy = true;
            // A reader elsewhere only needs us out of EX: keep a shared copy.
            let target = if held == Mode::EX && (want <= Mode::PR || (iopen && st.holders_sh > 0)) { Mode::PR } else { Mode::NL };
            (id, held, target)
        };
        let ops = self.ops();
        let mut result = Ok(());
        if let Some(ops) = &ops {
            if held == Mode::EX {
                result = ops.sync(name);
            }
            if result.is_ok() && target == Mode::NL {
                ops.invalidate(name);
            }
        }
        let backend_res = match &result {
            Ok(()) if target == Mode::PR => self.backend.convert(id, Mode::PR, 0).map(|_| ()),
            Ok(()) => self.backend.unlock(id, None),
            Err(_) => Ok(()),
        };
        let mut st = gl.lock_st();
        let mut requeue = false;
        st.busy = false;
        st.demotes += 1;
        self.demotes_total.fetch_add(1, Ordering::Relaxed);
        match (&result, backend_res) {
            (Ok(()), Ok(())) => {
                if target == Mode::PR {
                    st.granted = Some((id, Mode::PR));
                } else {
                    st.granted = None;
                    self.by_id.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                }
                // A callback for a stronger mode may have arrived while we
                // converted down to PR (the lock server does not repeat it):
                // keep it and go on down.
                if target == Mode::PR && st.demote.is_some_and(|m| m > Mode::PR) {
                    requeue = true;
                } else {
                    st.demote = None;
                    st.demote_since = None;
                }
            }
            (Err(e), _) => {
                // Could not sync: keep the lock (never hand out what we could not
                // write back) and withdraw.
                st.demote = None;
                if let Some(ops) = &ops {
                    ops.fatal(e);
                }
            }
            (Ok(()), Err(e)) => {
                tracing::warn!(lock = %name, "demote request failed: {e:?}");
                st.demote = None;
            }
        }
        let idle = !st.held();
        gl.cv.notify_all();
        drop(st);
        if requeue && idle {
            self.queue_demote(name);
        }
        None
    }

    /// Give up a cached glock now if nobody holds it (journal locks: the node
    /// that owns the journal will want it).
    pub fn unlock_idle(&self, name: LockName) {
        if in_reclaim() && !self.gfs2_reclaim.load(Ordering::Relaxed) {
            // Releasing talks to the lock manager and can block: never from
            // reclaim. The demote worker does it.
            self.release_q.lock().unwrap_or_else(|p| p.into_inner()).push(name);
            self.demote_cv.notify_all();
            return;
        }
        let gl = self.get(name);
        let id = {
            let mut st = gl.lock_st();
            if st.busy || st.held() {
                return;
            }
            let Some((id, _)) = st.granted.take() else { return };
            id
        };
        self.by_id.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        if let Err(e) = self.backend.unlock(id, None) {
            tracing::warn!(lock = %name, "unlock failed: {e:?}");
        }
        gl.cv.notify_all();
    }

    /// Sync and release every glock (unmount). Holders must be gone.
    pub fn release_all(&self) -> Result<()> {
        let names: Vec<LockName> = self.map.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        let ops = self.ops();
        let mut first_err = None;
        for name in names {
            let gl = self.get(name);
            let granted = gl.lock_st().granted.take();
            if let Some((id, mode)) = granted {
                if let (Some(ops), Mode::EX) = (&ops, mode) {
                    if let Err(e) = ops.sync(name) {
                        first_err.get_or_insert(e);
                        continue;
                    }
                }
                if let Some(ops) = &ops {
                    ops.invalidate(name);
                }
                if let Err(e) = self.backend.unlock(id, None) {
                    tracing::warn!(lock = %name, "unlock at unmount failed: {e:?}");
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// GFS2's glock shrinker. Without it every inode this node ever touched
    /// would keep its glock, and its lock on the lock server, until another
    /// node asked (each deleted file too: a lock server caps locks per node).
    /// Keeps at most `max_cached` inode glocks granted: the idle ones used
    /// longest ago are given up through the demote path (sync, invalidate,
    /// unlock), as if another node wanted them, down to seven eighths of the
    /// cap. Entries nobody holds or wants, and that are not granted, are
    /// forgotten. Run by the demote worker about once a second.
    pub fn trim(&self) -> usize {
        const MAX_PER_PASS: usize = 4096;
        let max = self.max_cached.load(Ordering::Relaxed);
        let mut victims: Vec<(Instant, LockName)> = Vec::new();
        let mut granted = 0usize;
        {
            let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
            // only the map holds it (checked under the map lock, which every
            // new reference is taken under): nothing can race the removal
            m.retain(|_, gl| {
                if Arc::strong_count(gl) > 1 {
                    return true;
                }
                let st = gl.lock_st();
                st.granted.is_some() || st.busy || st.waiters > 0 || st.demote.is_some() || st.held()
            });
            if max == usize::MAX {
                return 0;
            }
            for gl in m.values() {
                if !matches!(gl.name, LockName::Inode(_)) {
                    continue;
                }
                let st = gl.lock_st();
                if st.granted.is_none() {
                    continue;
                }
                granted += 1;
                let idle = !st.busy && !st.held() && st.waiters == 0 && st.demote.is_none();
                let held_long_enough = st.acquired_at.is_none_or(|t| t.elapsed() >= self.min_hold);
                if idle && held_long_enough {
                    victims.push((st.last_used.or(st.acquired_at).unwrap_or_else(Instant::now), gl.name));
                }
            }
        }
        if granted <= max {
            return 0;
        }
        let excess = (granted - max + max / 8).min(MAX_PER_PASS);
        victims.sort();
        let mut n = 0;
        for (_, name) in victims.into_iter().take(excess) {
            let gl = self.get(name);
            {
                let mut st = gl.lock_st();
                if st.busy || st.held() || st.granted.is_none() || st.demote.is_some() {
                    continue;
                }
                st.demote = Some(Mode::EX);
                st.demote_since = Some(Instant::now());
            }
            // held longer than the minimum hold time: demotes now (or, if a
            // holder came back meanwhile, when it leaves)
            if self.try_demote(name).is_none() {
                n += 1;
            }
        }
        self.trimmed_total.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    pub fn counts(&self) -> GlockCounts {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut c = GlockCounts {
            total: m.len(),
            max_cached: self.max_cached.load(Ordering::Relaxed),
            trimmed: self.trimmed_total.load(Ordering::Relaxed),
            ..Default::default()
        };
        for gl in m.values() {
            let st = gl.lock_st();
            match st.granted {
                Some((_, Mode::EX)) => c.exclusive += 1,
                Some(_) => c.shared += 1,
                None => c.unlocked += 1,
            }
            if st.held() {
                c.with_holders += 1;
            }
            if st.demote.is_some() {
                c.demote_pending += 1;
            }
        }
        c
    }

    pub fn dump(&self, all: bool) -> Vec<GlockDump> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<GlockDump> = m
            .values()
            .filter_map(|gl| {
                let st = gl.lock_st();
                if !all && st.granted.is_none() && st.waiters == 0 {
                    return None;
                }
                Some(GlockDump {
                    name: gl.name.to_string(),
                    state: match st.granted {
                        Some((_, Mode::EX)) => "EX".into(),
                        Some((_, m)) => format!("{m:?}"),
                        None => "UN".into(),
                    },
                    lock_id: st.granted.map_or(0, |g| g.0),
                    holders_shared: st.holders_sh,
                    holder_exclusive: st.holder_ex,
                    waiters: st.waiters,
                    demote_wanted: st.demote,
                    busy: st.busy,
                    requests: st.requests,
                    demotes: st.demotes,
                })
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Is `name` granted to this node (any mode)?
    pub fn is_granted(&self, name: LockName) -> Option<Mode> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&name).and_then(|gl| gl.lock_st().granted.map(|g| g.1))
    }
}

/// Buckets (seconds) of the lock request time histogram: 50 us .. 30 s.
pub const LOCK_WAIT_BUCKETS: &[f64] = &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Whether an acquire may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sleep {
    No,
    Yes,
    /// `--evict=sync` only: waits even from reclaim (GFS2's behaviour).
    EvenInReclaim,
}

fn add_holder(st: &mut GlState, mode: Mode) {
    if mode == Mode::EX {
        st.holder_ex = true;
    } else {
        st.holders_sh += 1;
    }
}

fn demote_worker(table: Weak<GlockTable>) {
    let mut delayed: Vec<(Instant, LockName)> = Vec::new();
    let mut last_trim = Instant::now();
    loop {
        let Some(t) = table.upgrade() else { return };
        if t.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let batch: Vec<LockName> = {
            let mut q = t.demote_q.lock().unwrap_or_else(|p| p.into_inner());
            if q.is_empty() {
                let wait = delayed.iter().map(|d| d.0.saturating_duration_since(Instant::now())).min().unwrap_or(Duration::from_millis(500));
                q = t.demote_cv.wait_timeout(q, wait).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
            }
            std::mem::take(&mut *q)
        };
        let releases = std::mem::take(&mut *t.release_q.lock().unwrap_or_else(|p| p.into_inner()));
        for name in releases {
            t.unlock_idle(name);
        }
        let now = Instant::now();
        let mut due: Vec<LockName> = batch;
        delayed.retain(|(at, n)| {
            if *at <= now {
                due.push(*n);
                false
            } else {
                true
            }
        });
        due.sort();
        due.dedup();
        for name in due {
            if let Some(d) = t.try_demote(name) {
                delayed.push((Instant::now() + d, name));
            }
        }
        if last_trim.elapsed() >= Duration::from_secs(1) {
            last_trim = Instant::now();
            t.trim();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [LockName::Rename, LockName::Inode(5), LockName::Iopen(7), LockName::Rgrp(3), LockName::Journal(0)] {
            assert_eq!(LockName::parse(&n.resource()), Some(n));
        }
        assert_eq!(LockName::parse(b"bogus/1"), None);
    }

    #[test]
    fn local_holders_are_reader_writer() {
        let t = GlockTable::new(Arc::new(NoLock::default()), Duration::ZERO);
        let ms = MaySleep::new().unwrap();
        let a = t.acquire(LockName::Inode(1), Mode::PR, &ms).unwrap();
        let b = t.acquire(LockName::Inode(1), Mode::PR, &ms).unwrap();
        assert!(matches!(t.try_acquire(LockName::Inode(1), Mode::EX), Err(FsError::WouldBlock)));
        drop(a);
        drop(b);
        let c = t.try_acquire(LockName::Inode(1), Mode::EX).unwrap();
        assert!(matches!(t.try_acquire(LockName::Inode(1), Mode::PR), Err(FsError::WouldBlock)));
        drop(c);
    }

    #[derive(Default)]
    struct CountOps {
        synced: AtomicU64,
        invalidated: Mutex<Vec<LockName>>,
    }

    impl GlockOps for CountOps {
        fn sync(&self, _name: LockName) -> Result<()> {
            self.synced.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn invalidate(&self, name: LockName) {
            self.invalidated.lock().unwrap().push(name);
        }
        fn iopen_wanted(&self, _ino: u64) {}
        fn fatal(&self, _err: &FsError) {}
    }

    #[test]
    fn trim_gives_up_the_least_recently_used_idle_inode_glocks() {
        let t = GlockTable::new(Arc::new(NoLock::default()), Duration::ZERO);
        let ops = Arc::new(CountOps::default());
        let weak: Weak<dyn GlockOps> = Arc::downgrade(&(ops.clone() as Arc<dyn GlockOps>));
        *t.ops.lock().unwrap() = Some(weak);
        t.max_cached.store(16, Ordering::Relaxed);
        let ms = MaySleep::new().unwrap();
        for i in 0..100 {
            drop(t.acquire(LockName::Inode(i), if i % 2 == 0 { Mode::EX } else { Mode::PR }, &ms).unwrap());
            std::thread::sleep(Duration::from_micros(50));
        }
        // one in use, one rgrp: neither is trimmed
        let busy = t.acquire(LockName::Inode(0), Mode::EX, &ms).unwrap();
        drop(t.acquire(LockName::Rgrp(1), Mode::EX, &ms).unwrap());
        t.trim();
        let granted: Vec<LockName> = (0..100).map(LockName::Inode).filter(|n| t.is_granted(*n).is_some()).collect();
        assert!(granted.len() <= 16 - 16 / 8 + 1, "{} inode glocks still granted", granted.len());
        assert!(granted.contains(&LockName::Inode(0)), "the held glock was trimmed");
        assert!(granted.contains(&LockName::Inode(99)), "the most recently used glock was trimmed");
        assert!(t.is_granted(LockName::Rgrp(1)).is_some());
        let inv = ops.invalidated.lock().unwrap().clone();
        assert!(inv.contains(&LockName::Inode(1)) && !inv.contains(&LockName::Inode(0)));
        // EX glocks were synced before they went (every other one of the trimmed)
        assert!(ops.synced.load(Ordering::Relaxed) as usize >= inv.len() / 2 - 1);
        // the next pass forgets the entries of what was given up
        t.trim();
        assert!(t.counts().total <= 16 + 2, "{} entries kept", t.counts().total);
        drop(busy);
        assert_eq!(t.counts().trimmed as usize, inv.len());
    }

    #[test]
    fn reclaim_cannot_sleep() {
        let t = GlockTable::new(Arc::new(NoLock::default()), Duration::ZERO);
        let before = SLEEP_VIOLATIONS.load(Ordering::Relaxed);
        {
            let _r = ReclaimScope::enter();
            assert!(MaySleep::new().is_none());
            // try semantics still work from reclaim
            assert!(t.try_acquire(LockName::Inode(2), Mode::EX).is_ok());
        }
        assert!(SLEEP_VIOLATIONS.load(Ordering::Relaxed) > before);
        assert!(MaySleep::new().is_some());
    }
}
