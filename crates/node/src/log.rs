//! The node's journal: transactions, log flush, write-back (checkpoint), revokes
//! and the tail (GFS2's log.c, lops.c and trans.c in one place).
//!
//! 1. An operation takes its glocks, then opens a [`Tx`] (which holds the log's
//!    flush lock shared) and changes cached metadata buffers, adding each to the
//!    transaction. Closing the transaction moves the buffers to the pending list.
//! 2. A log flush (fsync, the background flusher, a demote, unmount) takes the
//!    flush lock exclusively, so no transaction is half-done, snapshots every
//!    pending buffer and writes one journal transaction: descriptors naming the
//!    targets, the images, revoke blocks, and a commit carrying a CRC over all of
//!    them and the current tail. File data is written in place before (ordered
//!    mode); a device flush makes the transaction durable. The snapshots go to
//!    the AIL ("active items list": journaled, not yet written in place).
//! 3. Write-back writes AIL images in place. Once an image is in place the log
//!    space of the transactions before it can be reused: the tail advances in the
//!    next commit (written and flushed before that space is overwritten).
//! 4. Before a glock is given up, its blocks are flushed, written back, and —
//!    when older images of them remain in the live part of the log — revoked, so
//!    a replay of this journal can never overwrite a newer copy another node wrote.
//!    A freed metadata block is revoked too, since it may become someone's data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use mcfs_blockdev::BlockDevice;
use mcfs_format::header::BlockType;
use mcfs_format::journal::{self, Commit, FLAG_CLEAN};

use crate::buf::Buf;
use crate::error::{FsError, Result};
use crate::glock::{self, LockName};
use crate::icache::budget::{Budget, Charge};

/// Where this node's journal is and where writing resumes.
#[derive(Debug, Clone, Copy)]
pub struct JournalPos {
    pub slot: u32,
    pub start: u64,
    pub blocks: u32,
    /// Next position to write, and the sequence it gets.
    pub head: u32,
    pub next_seq: u64,
}

struct AilEntry {
    image: Arc<Vec<u8>>,
    first_seq: u64,
    owner: LockName,
    _charge: Charge,
}

struct Inner {
    head: u32,
    next_seq: u64,
    /// Tail as recorded in the last commit written.
    tail_pos: u32,
    tail_seq: u64,
    pending: BTreeMap<u64, Arc<Buf>>,
    pending_revokes: BTreeSet<u64>,
    ail: BTreeMap<u64, AilEntry>,
    /// Start position of every transaction since the tail.
    live: BTreeMap<u64, u32>,
    /// Blocks with an image in the live region: last sequence.
    in_log: HashMap<u64, u64>,
    /// Blocks freed by transactions not yet committed. Their AIL copies stay
    /// until the commit: until then the committed state still uses them, and a
    /// checkpoint must write them in place before the tail passes them.
    freed: BTreeSet<u64>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct LogStats {
    pub slot: u32,
    pub blocks: u32,
    pub head: u32,
    pub tail: u32,
    pub used_blocks: u32,
    pub next_seq: u64,
    pub pending_buffers: usize,
    pub ail_buffers: usize,
    pub flushes: u64,
    pub checkpoints: u64,
    pub revokes_written: u64,
    pub blocks_journaled: u64,
    /// File data written behind (not journaled, but ordered before commits).
    pub data: crate::wb::DataStats,
}

/// File data written behind, at most (a sixteenth of the cache budget when
/// that is less).
const DATA_INFLIGHT_MAX: u64 = 16 << 20;

pub struct Log {
    /// File data written behind (see [`crate::wb`]); flushes wait for it.
    pub(crate) data: Arc<crate::wb::WriteBehind>,
    dev: Arc<dyn BlockDevice>,
    bs: usize,
    fsid: u32,
    node_id: u32,
    pos: JournalPos,
    flush_lock: RwLock<()>,
    inner: Mutex<Inner>,
    budget: Arc<Budget>,
    data_dirty: AtomicBool,
    withdrawn: Arc<AtomicBool>,
    flushes: AtomicU64,
    checkpoints: AtomicU64,
    revokes: AtomicU64,
    journaled: AtomicU64,
}

/// An open transaction. Dropping it closes it.
pub struct Tx<'a> {
    log: &'a Log,
    _g: RwLockReadGuard<'a, ()>,
    bufs: Vec<Arc<Buf>>,
}

impl Tx<'_> {
    /// Record that `b` was (or is about to be) changed in this transaction.
    pub fn add(&mut self, b: &Arc<Buf>) {
        if !self.bufs.iter().any(|x| Arc::ptr_eq(x, b)) {
            self.bufs.push(b.clone());
        }
    }

    /// A metadata block was freed: never write it back, and revoke its journal
    /// copies so a replay cannot resurrect it over someone else's data.
    pub fn revoke(&mut self, blkno: u64) {
        self.bufs.retain(|b| b.blkno != blkno);
        let mut g = self.log.lock();
        g.pending.remove(&blkno);
        g.freed.insert(blkno);
        if g.in_log.contains_key(&blkno) {
            g.pending_revokes.insert(blkno);
        }
    }
}

impl Tx<'_> {
    /// Blocks this transaction frees (data or metadata): until it commits,
    /// the committed state still uses them, so the allocator must not hand
    /// them out (a reused block written in place before the free is durable
    /// would overwrite what a replay after a crash still points at).
    pub fn quarantine(&mut self, blocks: &[u64]) {
        if blocks.is_empty() {
            return;
        }
        let mut g = self.log.lock();
        g.freed.extend(blocks.iter().copied());
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        let mut g = self.log.lock();
        for b in self.bufs.drain(..) {
            g.pending.insert(b.blkno, b);
        }
        drop(g);
        glock::tx_exit();
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

impl Log {
    pub fn new(dev: Arc<dyn BlockDevice>, bs: usize, fsid: u32, node_id: u32, pos: JournalPos, budget: Arc<Budget>, withdrawn: Arc<AtomicBool>) -> Log {
        Log {
            data: crate::wb::WriteBehind::new(dev.clone(), DATA_INFLIGHT_MAX.min(budget.limit() / 16).max(1 << 20) as usize, withdrawn.clone(), Some(budget.clone())),
            dev,
            bs,
            fsid,
            node_id,
            pos,
            flush_lock: RwLock::new(()),
            inner: Mutex::new(Inner {
                head: pos.head,
                next_seq: pos.next_seq,
                tail_pos: pos.head,
                tail_seq: pos.next_seq,
                pending: BTreeMap::new(),
                pending_revokes: BTreeSet::new(),
                ail: BTreeMap::new(),
                live: BTreeMap::new(),
                in_log: HashMap::new(),
                freed: BTreeSet::new(),
            }),
            budget,
            data_dirty: AtomicBool::new(false),
            withdrawn,
            flushes: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            revokes: AtomicU64::new(0),
            journaled: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_withdrawn(&self) -> Result<()> {
        if self.withdrawn.load(Ordering::SeqCst) {
            return Err(FsError::Withdrawn("the node has withdrawn from this filesystem".into()));
        }
        Ok(())
    }

    pub fn slot(&self) -> u32 {
        self.pos.slot
    }

    /// The blocks in `[first, first + count)` freed by transactions not yet
    /// committed (see [`Tx::quarantine`]).
    pub fn uncommitted_frees_in(&self, first: u64, count: u64) -> BTreeSet<u64> {
        let g = self.lock();
        g.freed.range(first..first.saturating_add(count)).copied().collect()
    }

    /// How many blocks of `[first, first + count)` [`Log::uncommitted_frees_in`]
    /// would return, without copying them.
    pub fn uncommitted_frees_count(&self, first: u64, count: u64) -> usize {
        let g = self.lock();
        g.freed.range(first..first.saturating_add(count)).count()
    }

    /// Open a transaction. Flushes first when the log is filling up.
    pub fn begin(&self) -> Result<Tx<'_>> {
        self.check_withdrawn()?;
        if self.needs_flush() {
            self.flush()?;
        }
        let g = self.flush_lock.read().unwrap_or_else(|p| p.into_inner());
        glock::tx_enter();
        Ok(Tx { log: self, _g: g, bufs: Vec::new() })
    }

    fn used_blocks(&self, g: &Inner) -> u32 {
        (g.head + self.pos.blocks - g.tail_pos) % self.pos.blocks
    }

    fn needs_flush(&self) -> bool {
        let g = self.lock();
        // a pending set as large as a quarter of the journal is flushed now, so
        // one flush always fits
        g.pending.len() * 2 + 8 > self.pos.blocks as usize / 4
    }

    /// Has anything been changed since the last flush?
    pub fn has_pending(&self) -> bool {
        let g = self.lock();
        !g.pending.is_empty() || !g.pending_revokes.is_empty()
    }

    /// File data was written in place: the next commit must follow a device flush.
    pub fn note_data_write(&self) {
        self.data_dirty.store(true, Ordering::Release);
    }

    /// Make everything written so far durable: data, then journal.
    pub fn fsync(&self) -> Result<()> {
        // the flush waits for file data written behind
        self.flush()?;
        if self.data_dirty.swap(false, Ordering::AcqRel) {
            self.dev.flush()?;
        }
        Ok(())
    }

    /// Write every closed transaction to the journal as one log transaction.
    pub fn flush(&self) -> Result<()> {
        self.check_withdrawn()?;
        let _w = self.flush_lock.write().unwrap_or_else(|p| p.into_inner());
        self.flush_locked(false, false)
    }

    /// The flush itself; `force` writes a commit even with nothing pending (to
    /// record a new tail), `clean` marks it as the unmount commit.
    fn flush_locked(&self, force: bool, clean: bool) -> Result<()> {
        let (bufs, revokes, freed) = {
            let mut g = self.lock();
            (std::mem::take(&mut g.pending), std::mem::take(&mut g.pending_revokes), std::mem::take(&mut g.freed))
        };
        // Ordered data: the file data of every transaction taken above was
        // queued (or held back) before the transaction closed; it lands
        // before anything commits. Waited for even with nothing to commit:
        // fsync and a glock given up rely on it.
        self.data.wait_all()?;
        if bufs.is_empty() && revokes.is_empty() && freed.is_empty() && !force {
            return Ok(());
        }
        // Every image is resealed here: hot paths may change a cached block
        // without recomputing its checksum each time.
        let images: Vec<(u64, LockName, Arc<Vec<u8>>)> = bufs
            .values()
            .map(|b| {
                let mut img = b.read().clone();
                mcfs_format::header::reseal(&mut img);
                (b.blkno, b.owner, Arc::new(img))
            })
            .collect();
        let cap = journal::list_capacity(self.bs as u32);
        let nblocks = images.len() + images.len().div_ceil(cap) + revokes.len().div_ceil(cap) + 1;
        if nblocks + 2 > self.pos.blocks as usize / 2 {
            return Err(FsError::Other(format!("internal: a transaction of {nblocks} blocks exceeds half the journal")));
        }
        // Room: checkpoint when the new transaction would not fit before the tail.
        let free = {
            let g = self.lock();
            self.pos.blocks - 1 - self.used_blocks(&g)
        };
        // Keep a few blocks for the bare commits that move the tail, so they
        // always fit without a checkpoint of their own.
        if nblocks > 1 && nblocks as u32 + 4 > free {
            self.checkpoint_locked()?;
        }
        if self.data_dirty.swap(false, Ordering::AcqRel) {
            self.dev.flush()?;
        }
        let g = self.lock();
        let seq = g.next_seq;
        let start = g.head;
        // the tail this commit records: oldest image still not in place
        let (tail_seq, tail_pos) = match g.ail.values().map(|a| a.first_seq).min() {
            Some(s) => (s, g.live.get(&s).copied().unwrap_or(g.tail_pos)),
            None => (seq, start),
        };
        drop(g);
        let jb = self.pos.blocks as u64;
        let abs = |i: usize| self.pos.start + (start as u64 + i as u64) % jb;
        let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(nblocks);
        for chunk in images.chunks(cap.max(1)) {
            let targets: Vec<u64> = chunk.iter().map(|c| c.0).collect();
            let i = blocks.len();
            blocks.push(journal::encode_list(BlockType::LogDescriptor, &targets, self.bs as u32, abs(i), seq, self.fsid));
            for c in chunk {
                blocks.push(c.2.as_ref().clone());
            }
        }
        let rv: Vec<u64> = revokes.iter().copied().collect();
        for chunk in rv.chunks(cap.max(1)) {
            let i = blocks.len();
            blocks.push(journal::encode_list(BlockType::LogRevoke, chunk, self.bs as u32, abs(i), seq, self.fsid));
        }
        let body_n = blocks.len();
        let crc = journal::data_crc(blocks.iter().map(|b| b.as_slice()));
        let commit = Commit {
            seq,
            tail_seq,
            tail_pos,
            blocks: body_n as u32,
            data_crc: crc,
            flags: if clean && body_n == 0 && tail_seq == seq { FLAG_CLEAN } else { 0 },
            time_ns: now_ns(),
            node_id: self.node_id,
        };
        blocks.push(commit.encode(self.bs as u32, abs(body_n), self.fsid));
        let reqs: Vec<(u64, &[u8])> = blocks.iter().enumerate().map(|(i, b)| (abs(i) * self.bs as u64, b.as_slice())).collect();
        self.dev.write_many(&reqs)?;
        self.dev.flush()?;
        // Charge the AIL copies before taking `inner`, and without direct
        // reclaim: this thread holds the flush lock, and eviction reads through
        // the log (ail_image, has_pending) and may checkpoint.
        let charges: Vec<Charge> = images.iter().map(|(_, _, img)| self.budget.charge_no_reclaim(img.len() as u64)).collect();
        let mut g = self.lock();
        // the frees are committed: their blocks' old copies may go
        for b in &freed {
            g.ail.remove(b);
        }
        g.head = ((start as u64 + blocks.len() as u64) % jb) as u32;
        g.next_seq = seq + 1;
        g.live.insert(seq, start);
        g.tail_seq = tail_seq;
        g.tail_pos = tail_pos;
        let tail_seq_now = tail_seq;
        g.live.retain(|s, _| *s >= tail_seq_now);
        g.in_log.retain(|_, s| *s >= tail_seq_now);
        for ((blkno, owner, image), charge) in images.into_iter().zip(charges) {
            g.in_log.insert(blkno, seq);
            let first = g.ail.get(&blkno).map_or(seq, |a| a.first_seq);
            g.ail.insert(blkno, AilEntry { image, first_seq: first, owner, _charge: charge });
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.journaled.fetch_add(body_n as u64, Ordering::Relaxed);
        self.revokes.fetch_add(rv.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Write AIL images in place (all, or those of one owner) and flush the device.
    /// Returns the blocks written.
    fn write_back(&self, owner: Option<LockName>) -> Result<Vec<u64>> {
        let items: Vec<(u64, Arc<Vec<u8>>)> = {
            let g = self.lock();
            g.ail.iter().filter(|(_, a)| owner.is_none_or(|o| a.owner == o)).map(|(b, a)| (*b, a.image.clone())).collect()
        };
        if items.is_empty() {
            return Ok(Vec::new());
        }
        for chunk in items.chunks(256) {
            let reqs: Vec<(u64, &[u8])> = chunk.iter().map(|(b, img)| (*b * self.bs as u64, img.as_slice())).collect();
            self.dev.write_many(&reqs)?;
        }
        self.dev.flush()?;
        let mut g = self.lock();
        for (b, img) in &items {
            // a newer image may have been journaled meanwhile: keep that one
            if g.ail.get(b).is_some_and(|a| Arc::ptr_eq(&a.image, img)) {
                g.ail.remove(b);
            }
        }
        Ok(items.into_iter().map(|i| i.0).collect())
    }

    /// Write everything back and move the tail to the head. Flush lock held.
    fn checkpoint_locked(&self) -> Result<()> {
        self.write_back(None)?;
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        // an empty transaction records the new tail
        self.write_tail_commit(false)
    }

    fn write_tail_commit(&self, clean: bool) -> Result<()> {
        let mut g = self.lock();
        let pending = std::mem::take(&mut g.pending);
        let revokes = std::mem::take(&mut g.pending_revokes);
        let freed = std::mem::take(&mut g.freed);
        drop(g);
        // write only the commit: nothing pending may ride along here (and frees
        // whose transactions are not in it are not committed by it)
        let res = self.flush_locked(true, clean);
        let mut g = self.lock();
        g.pending.extend(pending);
        g.pending_revokes.extend(revokes);
        g.freed.extend(freed);
        res
    }

    /// Before giving up `owner`'s glock: flush, write its blocks in place, and
    /// revoke older journal copies of them.
    pub fn sync_owner(&self, owner: LockName) -> Result<()> {
        self.check_withdrawn()?;
        let _w = self.flush_lock.write().unwrap_or_else(|p| p.into_inner());
        self.flush_locked(false, false)?;
        let written = self.write_back(Some(owner))?;
        if written.is_empty() {
            return Ok(());
        }
        let mut g = self.lock();
        if g.ail.is_empty() {
            drop(g);
            // nothing else in flight: moving the tail to the head beats revoking
            return self.write_tail_commit(false);
        }
        for b in written {
            if g.in_log.contains_key(&b) {
                g.pending_revokes.insert(b);
            }
        }
        let other_pending = std::mem::take(&mut g.pending);
        let other_freed = std::mem::take(&mut g.freed);
        drop(g);
        let res = self.flush_locked(false, false);
        let mut g = self.lock();
        g.pending.extend(other_pending);
        g.freed.extend(other_freed);
        res
    }

    /// Write everything back, leave the journal clean (unmount).
    pub fn shutdown_clean(&self) -> Result<()> {
        self.check_withdrawn()?;
        let _w = self.flush_lock.write().unwrap_or_else(|p| p.into_inner());
        self.flush_locked(false, false)?;
        self.write_back(None)?;
        self.write_tail_commit(true)
    }

    /// Checkpoint when the log is more than half full (background flusher).
    pub fn maybe_checkpoint(&self) -> Result<()> {
        let half = {
            let g = self.lock();
            self.used_blocks(&g) > self.pos.blocks / 2 || g.ail.len() > 4096
        };
        if half {
            let _w = self.flush_lock.write().unwrap_or_else(|p| p.into_inner());
            self.flush_locked(false, false)?;
            self.checkpoint_locked()?;
        }
        Ok(())
    }

    /// Write everything journaled back in place and move the tail, if there is
    /// anything (periodic write-back; memory reclaim of journal copies).
    pub fn checkpoint_if_any(&self) -> Result<()> {
        if self.lock().ail.is_empty() {
            return Ok(());
        }
        let _w = self.flush_lock.write().unwrap_or_else(|p| p.into_inner());
        self.flush_locked(false, false)?;
        self.checkpoint_locked()
    }

    /// Bytes of journal copies held in memory awaiting write-back.
    pub fn ail_bytes(&self) -> u64 {
        self.lock().ail.values().map(|a| a.image.len() as u64).sum()
    }

    /// The newest journaled-but-not-written-back image of a block, if any (a
    /// reader must see it rather than the stale copy in place).
    pub fn ail_image(&self, blkno: u64) -> Option<Arc<Vec<u8>>> {
        self.lock().ail.get(&blkno).map(|a| a.image.clone())
    }

    pub fn stats(&self) -> LogStats {
        let g = self.lock();
        LogStats {
            slot: self.pos.slot,
            blocks: self.pos.blocks,
            head: g.head,
            tail: g.tail_pos,
            used_blocks: self.used_blocks(&g),
            next_seq: g.next_seq,
            pending_buffers: g.pending.len(),
            ail_buffers: g.ail.len(),
            flushes: self.flushes.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            revokes_written: self.revokes.load(Ordering::Relaxed),
            blocks_journaled: self.journaled.load(Ordering::Relaxed),
            data: self.data.stats(),
        }
    }
}
