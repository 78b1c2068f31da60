//! Eviction: the decision table, eviction of one inode, deallocation, the
//! deferred list and its deallocator, reclaim, and the orphan scan.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcfs_format::rgrp::BlockState;

use super::{Deferred, ICache, Inode, INODE_CHARGE};
use crate::error::{FsError, Result};
use crate::fs::Fs;
use crate::glock::{in_tx, Holder, LockName, MaySleep, Mode, ReclaimScope};
use crate::icache::budget::Reclaimer;

/// How eviction from reclaim treats cluster locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictMode {
    /// Never sleep on a cluster lock from reclaim (default).
    Nonblocking,
    /// GFS2's behaviour: reclaim takes its locks blocking (reproduces the
    /// 2016 deadlock).
    Sync,
}

impl EvictMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EvictMode::Nonblocking => "nonblocking",
            EvictMode::Sync => "sync",
        }
    }
    pub fn parse(s: &str) -> Option<EvictMode> {
        match s {
            "nonblocking" => Some(EvictMode::Nonblocking),
            "sync" => Some(EvictMode::Sync),
            _ => None,
        }
    }
}

/// What the inode being evicted is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InodeKind {
    CleanLinked,
    DirtyLinked,
    /// Link count zero: must be deallocated.
    Unlinked,
}

/// Whether what eviction needs can be had now: for an unlinked inode, its
/// inode, iopen and rgrp locks; for a dirty one, a log flush (impossible inside
/// a transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockAvail {
    Available,
    WouldBlock,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Free the in-memory state.
    Drop,
    /// Write back under the glock already held, then drop.
    WriteBackThenDrop,
    /// Deallocate now.
    Deallocate,
    /// Free the memory now, queue (ino, generation) for the deallocator.
    Defer,
    /// Keep it for now (a dirty inode inside a transaction).
    Skip,
    /// Wait for the locks, then deallocate (contexts that may sleep).
    WaitThenDeallocate,
}

/// The eviction decision table.
pub fn decide(kind: InodeKind, avail: LockAvail, may_sleep: bool) -> Action {
    use Action::*;
    match (kind, avail, may_sleep) {
        (InodeKind::CleanLinked, _, _) => Drop,
        (InodeKind::DirtyLinked, LockAvail::Available, _) => WriteBackThenDrop,
        (InodeKind::DirtyLinked, LockAvail::WouldBlock, _) => Skip,
        (InodeKind::Unlinked, LockAvail::Available, _) => Deallocate,
        (InodeKind::Unlinked, LockAvail::WouldBlock, false) => Defer,
        (InodeKind::Unlinked, LockAvail::WouldBlock, true) => WaitThenDeallocate,
    }
}

/// How an eviction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evicted {
    Dropped,
    WrittenBack,
    Deallocated,
    /// Another node has it in memory and inherits the deallocation duty.
    HandedOff,
    Deferred(String),
    Skipped,
    /// It came back into use while we looked.
    InUse,
}

/// The sleeping rules of one eviction.
enum Ctx<'a> {
    /// Reclaim in nonblocking mode: try-locks only.
    NoSleep,
    /// May wait for locks (iput path, deallocator drain, unmount, sync-mode reclaim).
    Sleep(&'a MaySleep),
}

impl Ctx<'_> {
    fn may_sleep(&self) -> bool {
        matches!(self, Ctx::Sleep(_))
    }
}

/// Locks held for a deallocation, released in reverse order on drop.
struct DeallocLocks {
    _rgrps: Vec<Holder>,
    _inode: Holder,
    _iopen: Holder,
}

impl Fs {
    fn get_lock(&self, ctx: &Ctx<'_>, name: LockName, mode: Mode) -> Result<Holder> {
        match ctx {
            // try, but tell the holder someone wants it: an idle cached lock
            // elsewhere is then given up and the next retry succeeds
            Ctx::NoSleep => self.glocks.try_acquire_bast(name, mode),
            Ctx::Sleep(ms) => {
                // try first so that waiting shows up only when it happens
                match self.glocks.try_acquire(name, mode) {
                    Err(FsError::WouldBlock) => {}
                    other => return other,
                }
                if crate::glock::in_reclaim() {
                    *self.icache.reclaim_blocked.lock().unwrap_or_else(|p| p.into_inner()) = Some((format!("{name} ({mode:?})"), Instant::now()));
                }
                let r = self.glocks.acquire(name, mode, ms);
                if crate::glock::in_reclaim() {
                    *self.icache.reclaim_blocked.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                r
            }
        }
    }

    /// Evict one unused inode in the given context.
    fn evict_one(&self, inode: &Arc<Inode>, ctx: &Ctx<'_>) -> Result<Evicted> {
        let ino = inode.ino;
        // Take it out of the cache first, so nobody starts using this copy.
        let Some(mine) = self.icache.remove(ino) else {
            return Ok(Evicted::Dropped);
        };
        if !Arc::ptr_eq(&mine, inode) || inode.in_use() {
            self.icache.reinsert(mine);
            return Ok(Evicted::InUse);
        }
        let data = inode.drop_data() as u64;
        self.icache.bump(|s| s.data_blocks_dropped += data);
        // Do we know it is linked? Only while we hold its glock (cached).
        let linked = match self.glocks.is_granted(LockName::Inode(ino)) {
            Some(_) if !inode.unlinked.load(Ordering::Acquire) => match self.glocks.try_acquire(LockName::Inode(ino), Mode::PR) {
                Ok(h) => {
                    let r = self.dinode(ino).map(|(_, d)| d.nlink > 0 && d.generation == inode.generation.load(Ordering::Relaxed));
                    drop(h);
                    r.unwrap_or(false)
                }
                Err(_) => false,
            },
            _ => false,
        };
        if linked {
            let dirty = self.bufs.count_of(LockName::Inode(ino)) > 0 && self.log_has_owner(LockName::Inode(ino));
            let kind = if dirty { InodeKind::DirtyLinked } else { InodeKind::CleanLinked };
            let avail = if dirty && in_tx() { LockAvail::WouldBlock } else { LockAvail::Available };
            match decide(kind, avail, ctx.may_sleep()) {
                Action::WriteBackThenDrop => {
                    self.log.sync_owner(LockName::Inode(ino))?;
                    self.bufs.invalidate(LockName::Inode(ino));
                    self.release_iopen(inode);
                    self.icache.bump(|s| s.written_back += 1);
                    return Ok(Evicted::WrittenBack);
                }
                Action::Skip => {
                    self.icache.reinsert(mine);
                    return Ok(Evicted::Skipped);
                }
                _ => {
                    if !self.log_has_owner(LockName::Inode(ino)) {
                        self.bufs.invalidate(LockName::Inode(ino));
                    }
                    self.release_iopen(inode);
                    self.icache.bump(|s| s.dropped_clean += 1);
                    return Ok(Evicted::Dropped);
                }
            }
        }
        // Possibly unlinked: our iopen goes first, then see whether we are the
        // last node that has it in memory.
        inode.iopen.lock().unwrap_or_else(|p| p.into_inner()).take();
        let generation = inode.generation.load(Ordering::Relaxed);
        self.try_deallocate(ino, generation, ctx)
    }

    /// The inode leaves this node's memory: its iopen lock goes too (a cached
    /// iopen lock would make other nodes believe it is still in use here).
    fn release_iopen(&self, inode: &Arc<Inode>) {
        inode.iopen.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.glocks.unlock_idle(LockName::Iopen(inode.ino));
    }

    fn log_has_owner(&self, owner: LockName) -> bool {
        // Conservative: the log does not index by owner; any pending work with
        // buffers of this owner cached counts as dirty.
        self.log.has_pending() && self.bufs.count_of(owner) > 0
    }

    /// The iopen / inode / rgrp dance and the deallocation itself. Used by
    /// eviction and by the deallocator for deferred records.
    fn try_deallocate(&self, ino: u64, generation: u64, ctx: &Ctx<'_>) -> Result<Evicted> {
        let attempts = self.icache.deferred.lock().unwrap_or_else(|p| p.into_inner()).get(&ino).map_or(0, |d| d.attempts);
        let r = self.try_deallocate_locked(ino, generation, ctx, attempts);
        // whatever happened, this node no longer has the inode in memory
        self.glocks.unlock_idle(LockName::Iopen(ino));
        r
    }

    fn try_deallocate_locked(&self, ino: u64, generation: u64, ctx: &Ctx<'_>, attempts: u32) -> Result<Evicted> {
        let iopen = match self.glocks.try_acquire_bast(LockName::Iopen(ino), Mode::EX) {
            Ok(h) => h,
            // Another node has it in memory, or just cached the lock (the
            // callback we asked for makes an idle one let go): look again a
            // few times before leaving the duty to that node.
            Err(FsError::WouldBlock) if attempts < 3 => return Ok(self.defer(ino, generation, 0, format!("{} (held by another node)", LockName::Iopen(ino)))),
            Err(FsError::WouldBlock) => {
                self.icache.bump(|s| s.handed_to_other_node += 1);
                return Ok(Evicted::HandedOff);
            }
            Err(e) => return Err(e),
        };
        let inode_h = match self.get_lock(ctx, LockName::Inode(ino), Mode::EX) {
            Ok(h) => h,
            Err(FsError::WouldBlock) => return Ok(self.defer(ino, generation, 0, format!("{}", LockName::Inode(ino)))),
            Err(e) => return Err(e),
        };
        // Is it still the same, unlinked inode?
        let state = self.block_state_locked(ino, ctx)?;
        let d = match state {
            Some(BlockState::Unlinked) | Some(BlockState::Dinode) => {
                let (_, d) = self.dinode(ino)?;
                if (generation != 0 && d.generation != generation) || d.nlink > 0 {
                    return Ok(Evicted::Dropped);
                }
                d
            }
            Some(_) => return Ok(Evicted::Dropped), // already deallocated by someone
            None => return Ok(self.defer(ino, generation, 0, format!("rgrp of inode {ino}"))),
        };
        let (data, mut meta) = self.collect_blocks(&d, 0)?;
        if d.is_dir() {
            meta = self.dir_blocks(&d)?;
        }
        let blocks = (data.len() + meta.len() + 1) as u64;
        let mut rgrps: BTreeSet<u32> = BTreeSet::new();
        for b in data.iter().chain(meta.iter()).chain(std::iter::once(&ino)) {
            if let Some(l) = self.geo.rgrp_of(*b) {
                rgrps.insert(l.index);
            }
        }
        let mut rh = Vec::new();
        for r in rgrps {
            match self.get_lock(ctx, LockName::Rgrp(r), Mode::EX) {
                Ok(h) => rh.push(h),
                Err(FsError::WouldBlock) => return Ok(self.defer(ino, d.generation, blocks, format!("{}", LockName::Rgrp(r)))),
                Err(e) => return Err(e),
            }
        }
        if in_tx() {
            // A thread inside a transaction never starts another one.
            return Ok(self.defer(ino, d.generation, blocks, "the reclaiming thread is inside a transaction".into()));
        }
        let locks = DeallocLocks { _rgrps: rh, _inode: inode_h, _iopen: iopen };
        self.deallocate(&d, &data, &meta)?;
        drop(locks);
        self.icache.bump(|s| s.deallocated_now += 1);
        Ok(Evicted::Deallocated)
    }

    /// Block state of a dinode, taking its rgrp lock in the context's manner
    /// (None: would block).
    fn block_state_locked(&self, ino: u64, ctx: &Ctx<'_>) -> Result<Option<BlockState>> {
        let Some(l) = self.geo.rgrp_of(ino) else {
            return Err(self.inconsistent(format!("inode {ino} outside every rgrp")));
        };
        let h = match self.get_lock(ctx, LockName::Rgrp(l.index), Mode::PR) {
            Ok(h) => h,
            Err(FsError::WouldBlock) => return Ok(None),
            Err(e) => return Err(e),
        };
        let s = self.block_state(ino)?;
        drop(h);
        Ok(Some(s))
    }

    /// Free an unlinked inode's blocks and its dinode (all locks held EX).
    fn deallocate(&self, d: &mcfs_format::dinode::Dinode, data: &[u64], meta: &[u64]) -> Result<()> {
        let ino = d.ino;
        {
            let mut tx = self.log.begin()?;
            for m in meta {
                tx.revoke(*m);
                self.bufs.forget(*m);
            }
            tx.revoke(ino);
            let mut all: Vec<u64> = data.to_vec();
            all.extend_from_slice(meta);
            all.push(ino);
            self.set_block_states(&mut tx, &all, BlockState::Free)?;
        }
        self.bufs.invalidate(LockName::Inode(ino));
        self.bufs.forget(ino);
        // The freed blocks are quarantined (set_block_states): the allocator
        // hands none of them out before this transaction commits, so no data
        // is written in place over a block the committed state still uses,
        // and a reused dinode's new image is always in a later log
        // transaction than the revoke of its old one (ordered free).
        self.stats.inodes_deallocated.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(ino, blocks = data.len() + meta.len() + 1, "deallocated");
        Ok(())
    }

    fn defer(&self, ino: u64, generation: u64, blocks: u64, why: String) -> Evicted {
        let mut q = self.icache.deferred.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let e = q.entry(ino).or_insert_with(|| Deferred { ino, generation, blocks, attempts: 0, waiting_for: String::new(), next_try: now, since: now });
        e.attempts += 1;
        e.blocks = e.blocks.max(blocks);
        if generation != 0 {
            e.generation = generation;
        }
        e.waiting_for = why.clone();
        e.next_try = now + ICache::backoff(e.attempts, self.opts.dealloc_backoff);
        let first = e.attempts == 1;
        drop(q);
        self.icache.bump(|s| if first { s.deferred_total += 1 } else { s.dealloc_retries += 1 });
        self.icache.deferred_cv.notify_all();
        Evicted::Deferred(why)
    }

    /// Last close of an unlinked inode that the kernel still caches (it holds
    /// lookups but no opens): deallocate now, keep the in-memory entry for the
    /// kernel's references, marked gone.
    pub(crate) fn dealloc_closed(&self, inode: &Arc<Inode>, ms: &MaySleep) -> Result<()> {
        inode.drop_data();
        inode.iopen.lock().unwrap_or_else(|p| p.into_inner()).take();
        let generation = inode.generation.load(Ordering::Relaxed);
        if self.try_deallocate(inode.ino, generation, &Ctx::Sleep(ms))? == Evicted::Deallocated {
            inode.gone.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Evict an unused inode from a context that may sleep (the iput path:
    /// final forget or release of an unlinked inode).
    pub fn iput_final(&self, ino: u64, ms: &MaySleep) -> Result<Evicted> {
        let Some(i) = self.icache.get(ino) else {
            return Ok(Evicted::Dropped);
        };
        if i.in_use() {
            return Ok(Evicted::InUse);
        }
        self.evict_one(&i, &Ctx::Sleep(ms))
    }

    /// Run one pass over the deferred list (try-locks, or waiting when `ms`).
    pub fn run_deferred(&self, ms: Option<&MaySleep>, only_due: bool) -> usize {
        let now = Instant::now();
        let due: Vec<Deferred> = {
            let q = self.icache.deferred.lock().unwrap_or_else(|p| p.into_inner());
            q.values().filter(|d| !only_due || d.next_try <= now).cloned().collect()
        };
        let mut done = 0;
        for d in due {
            if self.icache.get(d.ino).is_some_and(|i| i.opens.load(Ordering::Acquire) > 0 && !i.gone.load(Ordering::Acquire)) {
                // open here again: the last close handles it
                self.icache.deferred.lock().unwrap_or_else(|p| p.into_inner()).remove(&d.ino);
                continue;
            }
            let ctx = match ms {
                Some(ms) => Ctx::Sleep(ms),
                None => Ctx::NoSleep,
            };
            match self.try_deallocate(d.ino, d.generation, &ctx) {
                Ok(Evicted::Deferred(_)) => {}
                Ok(outcome) => {
                    if outcome == Evicted::Deallocated {
                        if let Some(i) = self.icache.get(d.ino) {
                            i.gone.store(true, Ordering::Release);
                        }
                    }
                    self.icache.deferred.lock().unwrap_or_else(|p| p.into_inner()).remove(&d.ino);
                    self.icache.bump(|s| s.deferred_completed += 1);
                    done += 1;
                }
                Err(e) => {
                    if e.is_fatal() {
                        return done;
                    }
                    tracing::warn!(ino = d.ino, "deferred deallocation failed: {e}");
                    self.defer(d.ino, d.generation, d.blocks, format!("error: {e}"));
                }
            }
        }
        done
    }

    /// The deallocator: retries deferred records with jittered backoff; also
    /// runs the periodic orphan scan.
    pub(crate) fn start_deallocator(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let _ = std::thread::Builder::new().name("deallocator".into()).spawn(move || {
            // the first scan right after mount: crash leftovers (journals were
            // just replayed) are found without waiting for the period
            let mut last_scan = Instant::now() - Duration::from_secs(29);
            loop {
                let Some(fs) = me.upgrade() else { return };
                if fs.is_stopping() || fs.is_withdrawn() {
                    return;
                }
                let wait = {
                    let q = fs.icache.deferred.lock().unwrap_or_else(|p| p.into_inner());
                    let next = q.values().map(|d| d.next_try).min();
                    let w = next.map_or(Duration::from_secs(1), |t| t.saturating_duration_since(Instant::now()).min(Duration::from_secs(1)));
                    let _ = fs.icache.deferred_cv.wait_timeout(q, w);
                    w
                };
                let _ = wait;
                if fs.is_stopping() {
                    return;
                }
                fs.run_deferred(None, true);
                if last_scan.elapsed() >= Duration::from_secs(30) || fs.icache.scan_requested.swap(false, Ordering::AcqRel) {
                    last_scan = Instant::now();
                    if let Err(e) = fs.orphan_scan() {
                        tracing::warn!("orphan scan: {e}");
                    }
                }
            }
        });
    }

    /// Queue every unlinked dinode this node does not have in memory (crash
    /// leftovers). Uses try-locks only: busy rgrps are scanned next time. The
    /// iopen lock makes sure only one node deallocates each orphan, and a node
    /// that has the inode open keeps it.
    pub fn orphan_scan(&self) -> Result<usize> {
        let mut found = 0;
        for l in self.geo.rgrps() {
            let h = match self.glocks.try_acquire(LockName::Rgrp(l.index), Mode::PR) {
                Ok(h) => h,
                Err(FsError::WouldBlock) => continue,
                Err(e) => return Err(e),
            };
            let v = self.unlinked_in(&l)?;
            drop(h);
            for ino in v {
                if self.icache.get(ino).is_some() {
                    continue;
                }
                let known = self.icache.deferred.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&ino);
                if !known {
                    self.defer(ino, 0, 0, "orphan (found by scan)".into());
                    found += 1;
                }
            }
        }
        if found > 0 {
            self.icache.bump(|s| s.orphans_found += found as u64);
            tracing::info!(found, "orphan scan queued unlinked inodes");
        }
        Ok(found)
    }

    /// Evict every unused inode and drop clean buffers, in a context that may
    /// sleep (SIGUSR1 to mcfs-node; the kernel's drop_caches for our caches).
    pub fn drop_caches(&self) -> usize {
        let Some(ms) = MaySleep::new() else { return 0 };
        let mut n = 0;
        for i in self.icache.lru() {
            if matches!(self.evict_one(&i, &Ctx::Sleep(&ms)), Ok(Evicted::Dropped | Evicted::WrittenBack | Evicted::Deallocated | Evicted::HandedOff)) {
                n += 1;
            }
        }
        for i in self.icache.all_lru() {
            i.drop_data();
        }
        self.bufs.shrink(u64::MAX);
        tracing::info!(evicted = n, used = self.budget.used(), "caches dropped");
        n
    }

    /// Unmount: evict every cached inode (may sleep).
    pub(crate) fn evict_all_for_unmount(&self) -> Result<()> {
        let ms = MaySleep::new().ok_or_else(|| FsError::Other("unmount from reclaim".into()))?;
        for i in self.icache.all_lru() {
            i.nlookup.store(0, Ordering::Release);
            i.opens.store(0, Ordering::Release);
            match self.evict_one(&i, &Ctx::Sleep(&ms)) {
                Ok(_) => {}
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => tracing::warn!(ino = i.ino, "eviction at unmount: {e}"),
            }
        }
        Ok(())
    }

    /// Unmount: wait (bounded) for the deferred list to drain, reporting
    /// progress and, at the end, what remains and which lock it waits for.
    pub(crate) fn drain_deferred(&self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let left = self.icache.deferred_list();
            if left.is_empty() {
                return Ok(());
            }
            if t0.elapsed() >= timeout {
                for d in &left {
                    tracing::error!(ino = d.ino, attempts = d.attempts, waiting_for = %d.waiting_for, "deferred deallocation not finished at unmount");
                }
                // The on-disk unlinked state keeps them safe: the orphan scan of
                // the next mount (any node) finishes them.
                tracing::warn!(remaining = left.len(), "unmount continues; unlinked inodes stay for the orphan scan");
                return Ok(());
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                tracing::info!(remaining = left.len(), first = left[0].ino, waiting_for = %left[0].waiting_for, "draining deferred deallocations");
            }
            self.run_deferred(None, false);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for deferred deallocations that can complete (ENOSPC path).
    pub fn flush_deferred_for_space(&self, timeout: Duration) -> usize {
        let t0 = Instant::now();
        let mut done = 0;
        while t0.elapsed() < timeout && !self.icache.deferred_list().is_empty() {
            let n = self.run_deferred(None, false);
            done += n;
            if n == 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        done
    }
}

impl ICache {
    fn reinsert(&self, i: Arc<Inode>) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).entry(i.ino).or_insert(i);
    }

    /// Another node wants to deallocate `ino` and we have it in memory.
    pub(crate) fn iopen_wanted(&self, fs: &Fs, ino: u64) {
        let Some(i) = self.get(ino) else { return };
        if i.opens.load(Ordering::Acquire) > 0 {
            return; // open here: we keep the duty and deallocate at last close
        }
        if i.nlookup.load(Ordering::Acquire) > 0 {
            // The kernel still references it: ask it to let go; the forget
            // that follows evicts it.
            let name = i.last_name.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let (Some(k), Some((parent, n))) = (self.kernel(), name) {
                k.forget_entry(parent, ino, &n);
            }
            return;
        }
        // Unused here: evict off the callback path (it may take locks).
        if let Some(fs) = fs.arc() {
            let _ = std::thread::Builder::new().name("iopen-evict".into()).spawn(move || {
                if let Some(ms) = MaySleep::new() {
                    if let Some(i) = fs.icache.get(ino) {
                        if !i.in_use() {
                            let _ = fs.evict_one(&i, &Ctx::Sleep(&ms));
                        }
                    }
                }
            });
        }
    }
}

impl Reclaimer for Fs {
    fn reclaim(&self, want: u64, scope: &ReclaimScope) -> u64 {
        let _ = &scope.ctx;
        let start = self.budget.used();
        self.icache.bump(|s| s.reclaim_runs += 1);
        let compat;
        let ctx = match self.icache.mode {
            EvictMode::Nonblocking => Ctx::NoSleep,
            EvictMode::Sync => {
                compat = MaySleep::gfs2_compat_from_reclaim();
                Ctx::Sleep(&compat)
            }
        };
        let freed = |fs: &Fs| start.saturating_sub(fs.budget.used());
        // 0. journal copies awaiting write-back: written back under the locks
        // this node already holds (never from inside a transaction)
        if !in_tx() && self.log.ail_bytes() > want / 2 {
            if let Err(e) = self.log.checkpoint_if_any() {
                self.withdraw(&format!("write-back during reclaim failed: {e}"));
            }
        }
        // 1. unused inodes, least recently used first
        for i in self.icache.lru() {
            if freed(self) >= want || self.is_stopping() {
                break;
            }
            if let Err(e) = self.evict_one(&i, &ctx) {
                if e.is_fatal() {
                    break;
                }
            }
        }
        // 2. cached data of inodes still in use
        if freed(self) < want {
            for i in self.icache.all_lru() {
                if freed(self) >= want {
                    break;
                }
                let n = i.drop_data() as u64;
                self.icache.bump(|s| s.data_blocks_dropped += n);
            }
        }
        // 3. spare data buffers kept for reuse, then clean metadata
        // buffers nobody is using
        if freed(self) < want {
            self.ra_bufs.clear();
            self.log.data.drop_spares();
        }
        if freed(self) < want {
            self.bufs.shrink(want - freed(self).min(want));
        }
        freed(self)
    }

    /// Inodes only the kernel's dentry cache keeps (looked up, not open):
    /// ask the kernel to drop those entries, least recently used first, on a
    /// thread of its own (an invalidation takes the directory's lock in the
    /// kernel, which a FUSE request in progress may hold). The forgets that
    /// follow make them evictable for the next reclaim pass.
    fn release_references(&self, want: u64) {
        let Some(k) = self.icache.kernel() else {
            return;
        };
        if self.icache.releasing.swap(true, Ordering::AcqRel) {
            return; // a batch is still going
        }
        let most = (want / INODE_CHARGE).clamp(64, 4096) as usize;
        let root = self.root_ino();
        let batch: Vec<(u64, Vec<u8>)> = self
            .icache
            .all_lru()
            .into_iter()
            .filter(|i| i.ino != root && i.opens.load(Ordering::Acquire) == 0 && i.pins.load(Ordering::Acquire) == 0 && i.nlookup.load(Ordering::Acquire) > 0)
            .filter_map(|i| i.last_name.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .take(most)
            .collect();
        if batch.is_empty() {
            self.icache.releasing.store(false, Ordering::Release);
            return;
        }
        self.icache.bump(|s| s.kernel_entries_released += batch.len() as u64);
        let releasing = self.icache.releasing.clone();
        let spawned = std::thread::Builder::new().name("kernel-release".into()).spawn(move || {
            for (parent, name) in batch {
                k.inval_entry(parent, &name);
            }
            releasing.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.icache.releasing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_table() {
        use Action::*;
        use InodeKind::*;
        use LockAvail::*;
        let cases = [
            (CleanLinked, Available, false, Drop),
            (CleanLinked, WouldBlock, false, Drop),
            (CleanLinked, Available, true, Drop),
            (CleanLinked, WouldBlock, true, Drop),
            (DirtyLinked, Available, false, WriteBackThenDrop),
            (DirtyLinked, Available, true, WriteBackThenDrop),
            (DirtyLinked, WouldBlock, false, Skip),
            (DirtyLinked, WouldBlock, true, Skip),
            (Unlinked, Available, false, Deallocate),
            (Unlinked, Available, true, Deallocate),
            (Unlinked, WouldBlock, false, Defer),
            (Unlinked, WouldBlock, true, WaitThenDeallocate),
        ];
        for (k, a, s, want) in cases {
            assert_eq!(decide(k, a, s), want, "{k:?} {a:?} may_sleep={s}");
        }
    }

    #[test]
    fn backoff_is_jittered_and_bounded() {
        let r = (Duration::from_millis(100), Duration::from_millis(1000));
        let v: Vec<Duration> = (0..50).map(|_| ICache::backoff(3, r)).collect();
        assert!(v.iter().all(|d| *d >= Duration::from_millis(50) && *d <= Duration::from_millis(1000)));
        let distinct: std::collections::HashSet<_> = v.iter().collect();
        assert!(distinct.len() > 5, "no jitter: {v:?}");
        assert!(ICache::backoff(20, r) <= Duration::from_millis(1000));
    }
}
