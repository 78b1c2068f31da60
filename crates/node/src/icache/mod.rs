//! The inode cache, memory reclaim, and deferred deallocation: the heart of mcfs.
//!
//! An [`Inode`] here is this node's in-memory presence of an inode: the kernel's
//! lookup count, open handles, cached file data, and the iopen glock held shared
//! ("this node has it in memory"). Unused inodes (no kernel lookups, no opens)
//! sit on an LRU and are evicted by reclaim or at unmount.
//!
//! Eviction follows a decision table ([`decide`]) over three facts: what the
//! inode is (clean and linked, dirty and linked, or unlinked: link count zero),
//! whether the locks it needs are available, and whether the context may sleep
//! on a cluster lock. Reclaim never may ([`crate::glock::NoSleep`]): it asks for
//! every lock with try semantics and, when one would block, frees the inode's
//! memory now and puts a small record (inode number, generation) on the
//! per-filesystem deferred list. A deallocator thread retries those with
//! jittered backoff; unmount drains the list with a bounded, reported wait. The
//! on-disk "unlinked" bitmap state keeps the work safe across crashes: an orphan
//! scan finishes deallocations that a crash interrupted.
//!
//! `--evict=sync` keeps GFS2's behaviour (eviction from reclaim takes its locks
//! blocking), so the deadlock of the 2016 linux-fsdevel thread can be shown.

pub mod budget;
pub mod evict;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::glock::Holder;
use crate::icache::budget::Charge;

pub use evict::{decide, Action, EvictMode, InodeKind, LockAvail};

/// One cached file data block.
struct DataBlock {
    data: Arc<Vec<u8>>,
    _charge: Charge,
}

/// Read-ahead for one sequential reader of a large file (one open file
/// handle): windows read by up to [`Readahead::THREADS`] background threads
/// ahead of the reader (up to [`Readahead::DEPTH`] windows ready or in
/// flight), so the device always has the next reads queued while the kernel
/// copies the current one. A read that finds its range being read ahead waits
/// for it instead of reading it a second time.
#[derive(Default)]
pub struct Readahead {
    /// Which stream this is: background threads check it before they touch
    /// the stream, so a thread of a stream that was invalidated or replaced
    /// stops (see [`ReadaheadSet`]).
    pub id: u64,
    /// Where the next sequential read is expected.
    pub next: u64,
    /// Windows read ahead, in file order: (offset, data, its budget charge).
    pub ready: std::collections::VecDeque<(u64, Arc<mcfs_blockdev::AlignedBuf>, Option<Charge>)>,
    /// The windows the background threads are reading now (offset, length).
    pub inflight: Vec<(u64, u64)>,
    /// Background threads running for this stream.
    pub running: usize,
    /// When a read last used it (the set's clock), to replace the least
    /// recently used.
    pub used_at: u64,
}

impl Readahead {
    /// Windows kept ahead of a sequential reader (ready or in flight).
    pub const DEPTH: usize = 3;
    /// Windows read at once: the device serves one window alone at a lower
    /// queue depth than it needs, and a single thread leaves it idle between
    /// windows.
    pub const THREADS: usize = 2;

    /// Where read-ahead data (ready or in flight) ends.
    pub fn ahead_end(&self) -> Option<u64> {
        let r = self.ready.back().map(|(o, d, _)| o + d.len() as u64);
        let i = self.inflight.iter().map(|(o, l)| o + l).max();
        r.max(i)
    }

    /// Is `[off, end)` inside a window being read now?
    pub fn in_flight(&self, off: u64, end: u64) -> bool {
        self.inflight.iter().any(|&(o, l)| o <= off && end <= o + l)
    }

    /// Does any window, ready or being read, hold a byte of `[off, end)`?
    pub fn overlaps(&self, off: u64, end: u64) -> bool {
        self.ready.iter().any(|(o, d, _)| *o < end && off < o + d.len() as u64) || self.inflight.iter().any(|&(o, l)| o < end && off < o + l)
    }

    /// A window read by a background thread lands: kept in file order (two
    /// threads may finish out of order).
    pub fn land(&mut self, at: u64, data: Arc<mcfs_blockdev::AlignedBuf>, charge: Option<Charge>) {
        self.unclaim(at);
        let pos = self.ready.iter().position(|(o, _, _)| *o > at).unwrap_or(self.ready.len());
        self.ready.insert(pos, (at, data, charge));
    }

    /// The window at `at` is no longer being read (landed, or given up).
    pub fn unclaim(&mut self, at: u64) {
        self.inflight.retain(|&(o, _)| o != at);
    }
}

/// The read-ahead of one inode: a [`Readahead`] stream per open file handle
/// reading it (as the kernel keeps read-ahead state per open file), so two
/// processes reading the same file sequentially do not take each other's
/// reads for jumps. At most [`ReadaheadSet::MAX_STREAMS`]; a new one replaces
/// the least recently used.
#[derive(Default)]
pub struct ReadaheadSet {
    /// (file handle, its stream)
    streams: Vec<(u64, Readahead)>,
    /// Stream ids and the use clock.
    clock: u64,
}

impl ReadaheadSet {
    pub const MAX_STREAMS: usize = 8;

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The stream of handle `fh`, made if there is none.
    pub fn stream(&mut self, fh: u64) -> &mut Readahead {
        let now = self.tick();
        let i = match self.streams.iter().position(|(h, _)| *h == fh) {
            Some(i) => i,
            None => {
                if self.streams.len() >= Self::MAX_STREAMS {
                    if let Some(lru) = self.streams.iter().enumerate().min_by_key(|(_, (_, r))| r.used_at).map(|(i, _)| i) {
                        self.streams.swap_remove(lru);
                    }
                }
                self.streams.push((fh, Readahead { id: now, ..Readahead::default() }));
                self.streams.len() - 1
            }
        };
        let ra = &mut self.streams[i].1;
        ra.used_at = now;
        ra
    }

    /// Stream `id` of handle `fh`, if it is still there.
    pub fn get(&mut self, fh: u64, id: u64) -> Option<&mut Readahead> {
        self.streams.iter_mut().find(|(h, r)| *h == fh && r.id == id).map(|(_, r)| r)
    }

    /// Handle `fh` was closed: its stream goes.
    pub fn remove(&mut self, fh: u64) {
        self.streams.retain(|(h, _)| *h != fh);
    }

    /// Does a window of any stream hold a byte of `[off, end)`?
    pub fn overlaps(&self, off: u64, end: u64) -> bool {
        self.streams.iter().any(|(_, r)| r.overlaps(off, end))
    }

    /// Forget everything read ahead (an invalidation). Each reader keeps its
    /// position, so its next read still counts as sequential, but its stream
    /// gets a new id: a background thread still reading for the old one
    /// stops, and what it read is thrown away.
    pub fn clear(&mut self) {
        for i in 0..self.streams.len() {
            let id = self.tick();
            let ra = &mut self.streams[i].1;
            ra.ready.clear();
            ra.inflight.clear();
            ra.running = 0;
            ra.id = id;
        }
    }

    /// Forget the streams too (the file's last close here).
    pub fn reset(&mut self) {
        self.streams.clear();
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

/// This node's in-memory presence of an inode.
pub struct Inode {
    pub ino: u64,
    pub generation: AtomicU64,
    /// Kernel lookup count (FUSE forget decrements it).
    pub nlookup: AtomicU64,
    pub opens: AtomicU32,
    /// iopen glock, shared, held while this node has the inode in memory.
    pub iopen: Mutex<Option<Holder>>,
    /// Clean file data blocks, valid while the inode glock is held.
    data: Mutex<BTreeMap<u64, DataBlock>>,
    /// Read-ahead state of large files, a stream per open handle (also
    /// dropped with `drop_data`).
    pub ra: Mutex<ReadaheadSet>,
    /// Operations bringing it in that have not yet counted their lookup: while
    /// non-zero, reclaim leaves it alone (see [`Pinned`]).
    pub pins: AtomicU32,
    /// Signalled when a read-ahead window lands or is dropped.
    pub ra_cv: Condvar,
    pub last_used: AtomicU64,
    /// Link count seen zero under the inode glock.
    pub unlinked: AtomicBool,
    /// Deallocated while the kernel still cached it: every request is ESTALE.
    pub gone: AtomicBool,
    /// Where the kernel last found it (parent, name): lets us tell the kernel to
    /// forget it when another node wants to delete it.
    pub last_name: Mutex<Option<(u64, Vec<u8>)>>,
    /// A directory whose names the kernel may cache (a reply gave an entry
    /// TTL): giving up its glock must tell the kernel to drop them.
    pub names_cached: AtomicBool,
    _charge: Charge,
}

impl Inode {
    pub fn in_use(&self) -> bool {
        self.nlookup.load(Ordering::Acquire) > 0 || self.opens.load(Ordering::Acquire) > 0 || self.pins.load(Ordering::Acquire) > 0
    }

    pub fn cached_block(&self, lblk: u64) -> Option<Arc<Vec<u8>>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).get(&lblk).map(|b| b.data.clone())
    }

    pub fn cache_block(&self, lblk: u64, data: Arc<Vec<u8>>, charge: Charge) {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).insert(lblk, DataBlock { data, _charge: charge });
    }

    pub fn drop_data(&self) -> usize {
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let n = d.len();
        d.clear();
        drop(d);
        self.drop_readahead();
        n
    }

    pub fn drop_data_from(&self, lblk: u64) {
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let _ = d.split_off(&lblk);
        drop(d);
        self.drop_readahead();
    }

    /// This node wrote `[off, end)` (under the inode glock, exclusive):
    /// cached blocks and read-ahead windows holding any of it are stale. A
    /// window still being read may hold the bytes from before the write, so
    /// it must not land either ([`ReadaheadSet::clear`] renews the ids).
    pub fn written(&self, off: u64, end: u64, bs: u64) {
        let first = off / bs;
        let cached = self.data.lock().unwrap_or_else(|p| p.into_inner()).range(first..end.div_ceil(bs)).next().is_some();
        if cached {
            // drops read-ahead too
            self.drop_data_from(first);
            return;
        }
        self.change_readahead(|ra| {
            if ra.overlaps(off, end) {
                ra.clear();
            }
        });
    }

    /// Change the read-ahead set, then wake readers waiting on it (a window
    /// they wait for may be gone).
    fn change_readahead(&self, f: impl FnOnce(&mut ReadaheadSet)) {
        f(&mut self.ra.lock().unwrap_or_else(|p| p.into_inner()));
        self.ra_cv.notify_all();
    }

    /// Forget what was read ahead (an invalidation).
    pub fn drop_readahead(&self) {
        self.change_readahead(ReadaheadSet::clear);
    }

    /// The file's last close here: the read-ahead streams go.
    pub fn reset_readahead(&self) {
        self.change_readahead(ReadaheadSet::reset);
    }

    /// Handle `fh` was closed: its read-ahead stream goes.
    pub fn close_readahead(&self, fh: u64) {
        self.change_readahead(|ra| ra.remove(fh));
    }

    pub fn data_blocks_cached(&self) -> usize {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// What one cached inode is charged: the inode, its two glocks (inode and
/// iopen) with their lock-manager state, and the names the kernel holds for
/// it. Measured: about 4.5 KiB of resident memory per cached inode (20,000
/// files looked up by one node: RSS from 10.8 to ~100 MiB).
pub const INODE_CHARGE: u64 = 4096;

/// An inode held in the cache for the length of an operation that brings it
/// in: reclaim sees it in use (taking the pin under the cache's lock, while
/// eviction takes an inode out of the cache before it checks, closes the race
/// in which a lookup counted its lookup on an inode already evicted, and the
/// next request found nothing: ESTALE).
pub struct Pinned(Arc<Inode>);

impl Pinned {
    fn new(i: Arc<Inode>) -> Pinned {
        i.pins.fetch_add(1, Ordering::AcqRel);
        Pinned(i)
    }

    /// The inode, for use after the pin is let go.
    pub fn inode(&self) -> Arc<Inode> {
        self.0.clone()
    }
}

impl std::ops::Deref for Pinned {
    type Target = Arc<Inode>;
    fn deref(&self) -> &Arc<Inode> {
        &self.0
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.0.pins.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A deallocation that could not be done when the inode was evicted.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Deferred {
    pub ino: u64,
    pub generation: u64,
    /// Blocks it will free (for statfs), when known.
    pub blocks: u64,
    pub attempts: u32,
    /// The lock it last waited for.
    pub waiting_for: String,
    #[serde(skip)]
    pub next_try: Instant,
    #[serde(skip)]
    pub since: Instant,
}

#[derive(Debug, Default, serde::Serialize, Clone)]
pub struct EvictStats {
    pub evict_mode: String,
    pub cached_inodes: usize,
    pub unused_inodes: usize,
    pub reclaim_runs: u64,
    pub dropped_clean: u64,
    pub written_back: u64,
    pub deallocated_now: u64,
    pub deferred_total: u64,
    pub deferred_now: usize,
    pub deferred_blocks: u64,
    pub dealloc_retries: u64,
    pub deferred_completed: u64,
    pub handed_to_other_node: u64,
    pub orphans_found: u64,
    pub data_blocks_dropped: u64,
    /// Cached kernel entries we asked the kernel to drop under memory pressure.
    pub kernel_entries_released: u64,
    pub sleep_violations: u64,
    pub reclaim_blocked_on: Option<String>,
}

pub struct ICache {
    map: Mutex<HashMap<u64, Arc<Inode>>>,
    tick: AtomicU64,
    pub mode: EvictMode,
    pub(crate) deferred: Mutex<BTreeMap<u64, Deferred>>,
    pub(crate) deferred_cv: std::sync::Condvar,
    pub(crate) stats: Mutex<EvictStats>,
    /// What reclaim is blocked on right now (sync mode shows the deadlock).
    pub(crate) reclaim_blocked: Mutex<Option<(String, Instant)>>,
    pub(crate) kernel: Mutex<Option<Arc<dyn KernelNotify>>>,
    /// Ask the deallocator for an orphan scan now (after a journal replay).
    pub scan_requested: AtomicBool,
    /// A batch of kernel entry invalidations is being sent.
    pub(crate) releasing: Arc<AtomicBool>,
}

/// Lets the filesystem ask the kernel to drop its references (FUSE
/// notifications); implemented by the FUSE adapter.
pub trait KernelNotify: Send + Sync {
    /// The kernel should forget `name` in `parent` (which referred to `ino`).
    fn forget_entry(&self, parent: u64, ino: u64, name: &[u8]);
    /// The kernel should drop the attributes it cached for `ino`.
    fn inval_attr(&self, ino: u64);
    /// The kernel should look every cached name up again before it uses it
    /// (a connection-wide dentry epoch: it takes no inode lock, so it can be
    /// sent while requests on those directories wait for the glock).
    fn inval_all_names(&self);
    /// The kernel may drop its cached entry `name` in `parent` (memory
    /// reclaim: the forget that follows lets us evict the inode).
    fn inval_entry(&self, parent: u64, name: &[u8]);
}

impl ICache {
    pub fn new(mode: EvictMode) -> ICache {
        ICache {
            map: Mutex::new(HashMap::new()),
            tick: AtomicU64::new(1),
            mode,
            deferred: Mutex::new(BTreeMap::new()),
            deferred_cv: std::sync::Condvar::new(),
            stats: Mutex::new(EvictStats { evict_mode: mode.as_str().into(), ..Default::default() }),
            reclaim_blocked: Mutex::new(None),
            kernel: Mutex::new(None),
            scan_requested: AtomicBool::new(false),
            releasing: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn set_kernel(&self, k: Arc<dyn KernelNotify>) {
        *self.kernel.lock().unwrap_or_else(|p| p.into_inner()) = Some(k);
    }

    pub(crate) fn kernel(&self) -> Option<Arc<dyn KernelNotify>> {
        self.kernel.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Inode>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        let i = self.lock().get(&ino).cloned();
        if let Some(i) = &i {
            i.last_used.store(self.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        }
        i
    }

    /// The cached inode of `ino` without counting it as a use (for
    /// bookkeeping that must not move it up the eviction order).
    pub fn peek(&self, ino: u64) -> Option<Arc<Inode>> {
        self.lock().get(&ino).cloned()
    }

    /// The cached inode numbers, unless the map is locked (a withdraw from a
    /// panic may run on a thread that holds it).
    pub fn try_inos(&self) -> Option<Vec<u64>> {
        self.map.try_lock().ok().map(|m| m.keys().copied().collect())
    }

    /// Insert a new in-memory inode (the caller took its iopen lock).
    /// The cached inode of `ino`, pinned, if there is one.
    pub fn get_pinned(&self, ino: u64) -> Option<Pinned> {
        let m = self.lock();
        m.get(&ino).map(|i| Pinned::new(i.clone()))
    }

    /// Cache inode `ino` (or find the one already cached), pinned: the caller
    /// counts its lookup or open before it lets the pin go, so reclaim cannot
    /// evict it in between.
    pub fn insert(&self, ino: u64, generation: u64, iopen: Option<Holder>, charge: Charge) -> Pinned {
        let mut m = self.lock();
        if let Some(i) = m.get(&ino) {
            return Pinned::new(i.clone());
        }
        let i = Arc::new(Inode {
            ino,
            generation: AtomicU64::new(generation),
            nlookup: AtomicU64::new(0),
            opens: AtomicU32::new(0),
            iopen: Mutex::new(iopen),
            data: Mutex::new(BTreeMap::new()),
            ra: Mutex::new(ReadaheadSet::default()),
            pins: AtomicU32::new(0),
            ra_cv: Condvar::new(),
            last_used: AtomicU64::new(self.tick.fetch_add(1, Ordering::Relaxed)),
            unlinked: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            last_name: Mutex::new(None),
            names_cached: AtomicBool::new(false),
            _charge: charge,
        });
        m.insert(ino, i.clone());
        Pinned::new(i)
    }

    pub fn remove(&self, ino: u64) -> Option<Arc<Inode>> {
        self.lock().remove(&ino)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn invalidate_data(&self, ino: u64) {
        if let Some(i) = self.lock().get(&ino) {
            i.drop_data();
        }
    }

    /// Unused inodes, least recently used first.
    pub fn lru(&self) -> Vec<Arc<Inode>> {
        let m = self.lock();
        let mut v: Vec<Arc<Inode>> = m.values().filter(|i| !i.in_use()).cloned().collect();
        v.sort_by_key(|i| i.last_used.load(Ordering::Relaxed));
        v
    }

    /// All cached inodes, least recently used first.
    pub fn all_lru(&self) -> Vec<Arc<Inode>> {
        let m = self.lock();
        let mut v: Vec<Arc<Inode>> = m.values().cloned().collect();
        v.sort_by_key(|i| i.last_used.load(Ordering::Relaxed));
        v
    }

    /// Request an orphan scan soon (a replayed journal may have left unlinked
    /// inodes whose deallocation the dead node never finished).
    pub fn request_scan(&self) {
        self.scan_requested.store(true, Ordering::Release);
        self.deferred_cv.notify_all();
    }

    pub fn deferred_blocks(&self) -> u64 {
        self.deferred.lock().unwrap_or_else(|p| p.into_inner()).values().map(|d| d.blocks).sum()
    }

    pub fn deferred_list(&self) -> Vec<Deferred> {
        self.deferred.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    pub fn stats(&self) -> EvictStats {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let m = self.lock();
        s.cached_inodes = m.len();
        s.unused_inodes = m.values().filter(|i| !i.in_use()).count();
        drop(m);
        let d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        s.deferred_now = d.len();
        s.deferred_blocks = d.values().map(|x| x.blocks).sum();
        s.sleep_violations = crate::glock::SLEEP_VIOLATIONS.load(Ordering::Relaxed);
        s.reclaim_blocked_on = self.reclaim_blocked.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(w, t)| format!("{w} for {} ms", t.elapsed().as_millis()));
        s
    }

    pub(crate) fn bump(&self, f: impl FnOnce(&mut EvictStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Jittered delay before the next deallocation attempt.
    pub(crate) fn backoff(attempts: u32, range: (Duration, Duration)) -> Duration {
        let (lo, hi) = range;
        let grow = lo.saturating_mul(1u32 << attempts.min(6));
        let cap = grow.min(hi).max(lo);
        let span = cap.as_millis().max(1) as u64;
        let j = rand::random::<u64>() % span;
        Duration::from_millis(span / 2 + j / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::{Readahead, ReadaheadSet};
    use std::sync::Arc;

    fn window(n: usize) -> Arc<mcfs_blockdev::AlignedBuf> {
        Arc::new(mcfs_blockdev::AlignedBuf::new(n))
    }

    #[test]
    fn a_write_overlapping_a_window_ready_or_in_flight_is_seen() {
        let mut ra = Readahead::default();
        ra.land(100, window(100), None);
        ra.inflight.push((300, 100));
        assert!(ra.overlaps(150, 151) && ra.overlaps(0, 101) && ra.overlaps(199, 400) && ra.overlaps(399, 500));
        assert!(!ra.overlaps(0, 100) && !ra.overlaps(200, 300) && !ra.overlaps(400, 900));
    }

    #[test]
    fn windows_landing_out_of_order_are_kept_in_file_order() {
        let mut ra = Readahead::default();
        ra.inflight.push((0, 100));
        ra.inflight.push((100, 100));
        ra.inflight.push((200, 100));
        assert_eq!(ra.ahead_end(), Some(300));
        assert!(ra.in_flight(120, 180));
        assert!(!ra.in_flight(150, 250), "a read across two windows is not inside one");
        // the second thread finishes first
        ra.land(100, window(100), None);
        ra.land(200, window(100), None);
        ra.land(0, window(100), None);
        let order: Vec<u64> = ra.ready.iter().map(|(o, _, _)| *o).collect();
        assert_eq!(order, vec![0, 100, 200]);
        assert!(ra.inflight.is_empty());
        assert_eq!(ra.ahead_end(), Some(300));
    }

    #[test]
    fn each_handle_reads_ahead_on_its_own_and_an_invalidation_renews_them_all() {
        let mut set = ReadaheadSet::default();
        let a = {
            let s = set.stream(1);
            s.next = 4096;
            s.land(4096, window(100), None);
            s.running = 1;
            s.id
        };
        let b = {
            let s = set.stream(2);
            s.next = 1 << 30;
            s.inflight.push((1 << 30, 100));
            s.id
        };
        assert_ne!(a, b);
        assert_eq!(set.stream(1).next, 4096, "handle 1 finds its own stream");
        assert!(set.overlaps(4100, 4101) && set.overlaps(1 << 30, (1 << 30) + 1) && !set.overlaps(0, 4096));
        set.clear();
        assert!(set.get(1, a).is_none() && set.get(2, b).is_none(), "threads of the old streams find nothing");
        let s = set.stream(1);
        assert_eq!((s.next, s.ready.len(), s.running), (4096, 0, 0), "the reader keeps its place, not its windows");
        set.remove(2);
        assert_eq!(set.len(), 1);
        // more handles than streams: the least recently used goes
        for fh in 10..10 + ReadaheadSet::MAX_STREAMS as u64 {
            set.stream(fh);
        }
        assert_eq!(set.len(), ReadaheadSet::MAX_STREAMS);
        assert!(!set.streams.iter().any(|(h, _)| *h == 1), "handle 1 was used longest ago");
        set.reset();
        assert!(set.is_empty());
    }
}
