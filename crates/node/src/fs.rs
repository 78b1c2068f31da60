//! The mounted filesystem (GFS2's super.c): mount, unmount, statfs, withdraw, and
//! the glue that lets the glock layer sync and invalidate what a lock covers.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use mcfs_blockdev::BlockDevice;
use mcfs_format::geometry::Geometry;
use mcfs_format::header::{self, BlockType};
use mcfs_format::sb::{LockProto, Superblock};

use crate::buf::{Buf, BufCache};
use crate::error::{FsError, Result};
use crate::glock::{GlockOps, GlockTable, Holder, LockBackend, LockName, MaySleep, Mode};
use crate::icache::budget::Budget;
use crate::icache::{EvictMode, ICache};
use crate::log::Log;
use crate::recovery::{self, ReplayReport};

/// How a node mounts.
#[derive(Clone)]
pub struct MountOptions {
    pub node_id: u32,
    pub cache_mem: u64,
    pub evict: EvictMode,
    /// Minimum time a glock is kept before a remote demote is honoured.
    pub min_hold: Duration,
    /// Background log flush interval.
    pub flush_interval: Duration,
    /// Mount a `dlm` filesystem with no lock server (dangerous).
    pub force_nolock: bool,
    /// Deallocator retry backoff (jittered between min and max).
    pub dealloc_backoff: (Duration, Duration),
    /// Longest unmount waits for deferred deallocations.
    pub drain_timeout: Duration,
    /// Longest mount waits for a journal slot.
    pub journal_wait: Duration,
    /// Inode glocks kept while idle ([`GlockTable::trim`]); None: one per
    /// 4 KiB of `cache_mem`, between 1,024 and 1,048,576.
    pub max_glocks: Option<usize>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            node_id: 1,
            cache_mem: 256 << 20,
            evict: EvictMode::Nonblocking,
            min_hold: Duration::from_millis(10),
            flush_interval: Duration::from_secs(1),
            force_nolock: false,
            dealloc_backoff: (Duration::from_millis(100), Duration::from_millis(1000)),
            drain_timeout: Duration::from_secs(30),
            journal_wait: Duration::from_secs(30),
            max_glocks: None,
        }
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct FsStats {
    pub blocks_allocated: AtomicU64,
    pub blocks_freed: AtomicU64,
    pub inodes_created: AtomicU64,
    pub inodes_deallocated: AtomicU64,
    pub data_bytes_read: AtomicU64,
    pub data_bytes_written: AtomicU64,
    /// Read-ahead windows that landed, and the bytes reads took from them.
    pub readahead_windows: AtomicU64,
    pub readahead_bytes: AtomicU64,
    pub ops: AtomicU64,
    pub errors: AtomicU64,
    pub journals_replayed: AtomicU64,
}

/// A mounted mcfs.
pub struct Fs {
    pub dev: Arc<dyn BlockDevice>,
    /// Read-ahead windows given back after use (a few, so a streaming reader
    /// does not map, zero and unmap fresh memory for every window).
    pub(crate) ra_bufs: crate::inode::SpareBufs,
    pub sb: Superblock,
    pub geo: Geometry,
    pub fsid: u32,
    pub bs: usize,
    pub node_id: u32,
    pub opts: MountOptions,
    pub glocks: Arc<GlockTable>,
    pub bufs: BufCache,
    pub log: Log,
    pub budget: Arc<Budget>,
    pub icache: ICache,
    pub stats: FsStats,
    pub(crate) rgrp_hint: AtomicUsize,
    pub withdrawn: Arc<AtomicBool>,
    withdraw_reason: Mutex<Option<String>>,
    journal: Mutex<Option<Holder>>,
    pub replays: Mutex<Vec<ReplayReport>>,
    /// Recoveries of other nodes this node took part in: (node, journal) -> step.
    pub recoveries: Mutex<std::collections::BTreeMap<(u32, u32), String>>,
    pub mounted_at: Instant,
    stopping: AtomicBool,
    me: Weak<Fs>,
}

/// Read and check the superblock: the primary at 64 KiB, or, when that one is
/// damaged, the backup in the device's last block (reported loudly: fsck.mcfs
/// -y rewrites the primary). The node never repairs it itself.
pub fn read_superblock(dev: &dyn BlockDevice) -> Result<Superblock> {
    let sb_off = mcfs_format::geometry::SB_OFFSET;
    let sector = (dev.sector_size() as usize).max(512);
    if dev.size() < sb_off + 65536 {
        return Err(FsError::Invalid("device too small to hold an mcfs filesystem".into()));
    }
    // The block size is a field of the superblock; read the largest possible block.
    let mut b = vec![0u8; 65536];
    dev.read_at(sb_off, &mut b)?;
    let bs = mcfs_format::le_u32(&b, 48);
    let primary = if (512..=65536).contains(&bs) && bs.is_power_of_two() {
        Superblock::decode(&b[..bs as usize], sb_off / bs as u64)
    } else {
        Superblock::decode(&b[..4096], sb_off / 4096)
    };
    let err = match primary {
        Ok(sb) => return Ok(sb),
        Err(e) => e,
    };
    let mut bsz = 512u64.max(sector as u64);
    while bsz <= 65536 {
        let blk = dev.size() / bsz - 1;
        let mut v = vec![0u8; bsz as usize];
        if dev.read_at(blk * bsz, &mut v).is_ok() {
            if let Ok(sb) = Superblock::decode(&v, blk) {
                tracing::warn!("primary superblock damaged ({err}); using the backup at block {blk}. Run fsck.mcfs -y to repair the primary");
                return Ok(sb);
            }
        }
        bsz *= 2;
    }
    Err(FsError::Corrupt(err))
}

impl Fs {
    /// Mount: read the superblock, claim and replay journals, start the workers.
    pub fn mount(dev: Arc<dyn BlockDevice>, backend: Arc<dyn LockBackend>, opts: MountOptions) -> Result<Arc<Fs>> {
        let sb = read_superblock(dev.as_ref())?;
        let geo = sb.geometry;
        if geo.block_count * geo.block_size as u64 > dev.size() {
            return Err(FsError::Invalid(format!(
                "the superblock describes {} bytes but the device has only {}",
                geo.block_count * geo.block_size as u64,
                dev.size()
            )));
        }
        if backend.kind() == "nolock" && sb.lock_proto == LockProto::Dlm && !opts.force_nolock {
            return Err(FsError::Invalid(format!(
                "{} was made for cluster locking (dlm); mounting it without a lock server risks corruption if another node mounts it. Use --dlm ADDR, or --force-nolock if you are sure no other node uses it",
                sb.table()
            )));
        }
        let budget = Budget::new(opts.cache_mem);
        let glocks = GlockTable::new(backend, opts.min_hold);
        glocks.gfs2_reclaim.store(opts.evict == EvictMode::Sync, Ordering::Relaxed);
        glocks.max_cached.store(opts.max_glocks.unwrap_or((opts.cache_mem / 4096).clamp(1024, 1 << 20) as usize), Ordering::Relaxed);
        let withdrawn = Arc::new(AtomicBool::new(false));
        let ms = MaySleep::new().ok_or_else(|| FsError::Other("mount from reclaim".into()))?;

        // Claim a journal slot: the first whose lock we get at once. None free
        // may also mean the lock server is in its grace period or recovering a
        // node (it then grants nothing new): wait for that, within a bound.
        let t0 = Instant::now();
        let mut waited = false;
        let (slot, jholder, others) = loop {
            let mut mine: Option<(u32, Holder)> = None;
            let mut others = Vec::new();
            for slot in 0..geo.journal_count {
                match glocks.try_acquire(LockName::Journal(slot), Mode::EX) {
                    Ok(h) if mine.is_none() => mine = Some((slot, h)),
                    Ok(h) => others.push((slot, h)),
                    Err(FsError::WouldBlock) => {}
                    Err(e) => return Err(e),
                }
            }
            if let Some((slot, h)) = mine {
                break (slot, h, others);
            }
            drop(others);
            if t0.elapsed() >= opts.journal_wait {
                return Err(FsError::Invalid(format!(
                    "no free journal slot after {:?}: all {} journals are in use by mounted nodes, or the lock server is still recovering a failed node (see mcfs status). Unmount a node, or re-create the filesystem with more journals (mkfs.mcfs -j N destroys its data: journals cannot be added yet)",
                    opts.journal_wait, geo.journal_count
                )));
            }
            if !waited {
                tracing::info!("no journal slot free yet (in use, or the lock server is in its grace period or recovering); waiting");
                waited = true;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let _ = ms;
        // Journals nobody holds: replay the dirty ones (first mounter after a
        // whole-cluster crash), then let them go.
        let mut reports = Vec::new();
        for (s, h) in others {
            let (r, _) = recovery::replay(dev.as_ref(), &sb, s, &budget, opts.node_id)?;
            if !r.was_clean {
                reports.push(r);
            }
            drop(h);
            // not ours: let the node that mounts it have it
            glocks.unlock_idle(LockName::Journal(s));
        }
        let (r, pos) = recovery::replay(dev.as_ref(), &sb, slot, &budget, opts.node_id)?;
        if !r.was_clean {
            reports.push(r);
        }
        let fsid = sb.fsid();
        let bs = geo.block_size as usize;
        let log = Log::new(dev.clone(), bs, fsid, opts.node_id, pos, budget.clone(), withdrawn.clone());
        let evict = opts.evict;
        let fs = Arc::new_cyclic(|me| Fs {
            ra_bufs: crate::inode::SpareBufs::new(2, usize::MAX, Some(budget.clone())),
            dev,
            sb,
            geo,
            fsid,
            bs,
            node_id: opts.node_id,
            opts,
            glocks: glocks.clone(),
            bufs: BufCache::new(budget.clone()),
            log,
            budget: budget.clone(),
            icache: ICache::new(evict),
            stats: FsStats::default(),
            rgrp_hint: AtomicUsize::new(0),
            withdrawn,
            withdraw_reason: Mutex::new(None),
            journal: Mutex::new(Some(jholder)),
            replays: Mutex::new(Vec::new()),
            recoveries: Mutex::new(std::collections::BTreeMap::new()),
            mounted_at: Instant::now(),
            stopping: AtomicBool::new(false),
            me: me.clone(),
        });
        fs.stats.journals_replayed.store(reports.len() as u64, Ordering::Relaxed);
        *fs.replays.lock().unwrap_or_else(|p| p.into_inner()) = reports;
        let ops: Arc<dyn GlockOps> = fs.clone();
        glocks.start(Arc::downgrade(&ops));
        let rec: Arc<dyn crate::icache::budget::Reclaimer> = fs.clone();
        budget.set_reclaimer(Arc::downgrade(&rec));
        budget.start_background();
        fs.start_flusher();
        fs.start_deallocator();
        tracing::info!(table = %fs.sb.table(), slot, node = fs.node_id, lock = fs.glocks.backend_kind(), "mounted");
        Ok(fs)
    }

    pub fn arc(&self) -> Option<Arc<Fs>> {
        self.me.upgrade()
    }

    pub fn set_recovery_progress(&self, node: u32, journal: u32, step: &str) {
        self.recoveries.lock().unwrap_or_else(|p| p.into_inner()).insert((node, journal), step.to_string());
    }

    pub fn note_replay(&self, r: ReplayReport) {
        if !r.was_clean {
            self.stats.journals_replayed.fetch_add(1, Ordering::Relaxed);
        }
        self.replays.lock().unwrap_or_else(|p| p.into_inner()).push(r);
    }

    pub fn journal_slot(&self) -> u32 {
        self.log.slot()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn start_flusher(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let every = self.opts.flush_interval;
        let _ = std::thread::Builder::new().name("log-flush".into()).spawn(move || {
            let mut n = 0u64;
            loop {
                // short naps: an unmount ends this thread promptly
                let t = Instant::now();
                while t.elapsed() < every {
                    std::thread::sleep(every.min(Duration::from_millis(100)));
                    match me.upgrade() {
                        Some(fs) if !fs.is_stopping() => {}
                        _ => return,
                    }
                }
                let Some(fs) = me.upgrade() else { return };
                if fs.is_stopping() || fs.is_withdrawn() {
                    return;
                }
                n += 1;
                // flush every period; write journaled blocks back in place every
                // fifth, so their in-memory copies do not pile up in the budget
                let r = fs.log.flush().and_then(|_| if n % 5 == 0 { fs.log.checkpoint_if_any() } else { fs.log.maybe_checkpoint() });
                if let Err(e) = r {
                    fs.withdraw(&format!("background log flush failed: {e}"));
                }
            }
        });
    }

    /// Read a metadata block through the cache, verifying its header (type,
    /// self-address, filesystem id, checksum) and then `check`.
    pub fn read_meta(&self, blkno: u64, owner: LockName, ty: BlockType, check: impl Fn(&[u8], &Fs) -> std::result::Result<(), mcfs_format::FormatError>) -> Result<Arc<Buf>> {
        if let Some(b) = self.bufs.get(blkno) {
            return Ok(b);
        }
        if blkno >= self.geo.block_count {
            return Err(self.inconsistent(format!("{} pointer to block {blkno} beyond the end of the filesystem", ty.name())));
        }
        self.check_live()?;
        let data = match self.log.ail_image(blkno) {
            Some(img) => img.as_ref().clone(),
            None => {
                let mut v = vec![0u8; self.bs];
                self.dev.read_at(blkno * self.bs as u64, &mut v)?;
                v
            }
        };
        if let Err(e) = header::verify(&data, ty, blkno, Some(self.fsid)).and_then(|_| check(&data, self)) {
            return Err(self.corrupt(e));
        }
        Ok(self.bufs.insert(blkno, owner, data))
    }

    /// Record an on-disk inconsistency and withdraw; returns the error to give.
    pub fn corrupt(&self, e: mcfs_format::FormatError) -> FsError {
        self.withdraw(&e.to_string());
        FsError::Corrupt(e)
    }

    pub fn inconsistent(&self, what: String) -> FsError {
        self.withdraw(&what);
        FsError::Withdrawn(what)
    }

    /// Stop writing to the device for good and report why (GFS2's withdraw).
    pub fn withdraw(&self, why: &str) {
        if !self.withdrawn.swap(true, Ordering::SeqCst) {
            tracing::error!(node = self.node_id, "withdrawing from the filesystem: {why}");
            *self.withdraw_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
            // Nothing the kernel cached may be served any more: every name is
            // looked up again (and fails), every attribute fetched again.
            if let Some(k) = self.icache.kernel() {
                k.inval_all_names();
                for ino in self.icache.try_inos().unwrap_or_default() {
                    k.inval_attr(ino);
                }
            }
        }
    }

    pub fn is_withdrawn(&self) -> bool {
        self.withdrawn.load(Ordering::SeqCst)
    }

    pub fn withdraw_reason(&self) -> Option<String> {
        self.withdraw_reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn check_live(&self) -> Result<()> {
        if self.is_withdrawn() {
            return Err(FsError::Withdrawn(self.withdraw_reason().unwrap_or_default()));
        }
        Ok(())
    }

    /// Unmount: finish deallocations, write everything back, leave the journal
    /// clean, release every lock.
    pub fn unmount(&self) -> Result<()> {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let res = if self.is_withdrawn() {
            Err(FsError::Withdrawn(self.withdraw_reason().unwrap_or_default()))
        } else {
            self.evict_all_for_unmount()
                .and_then(|_| {
                    // leftovers of crashed nodes: whoever unmounts last finishes them
                    self.orphan_scan()?;
                    self.drain_deferred(self.opts.drain_timeout)
                })
                .and_then(|_| self.log.shutdown_clean())
                .and_then(|_| self.glocks.release_all())
        };
        self.glocks.stop();
        self.budget.stop();
        self.log.data.shutdown();
        // The journal lock goes last: our journal is clean (or we withdrew, and
        // then recovery must replay it: keep it until the process ends).
        if res.is_ok() {
            self.journal.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        match &res {
            Ok(()) => tracing::info!(node = self.node_id, "unmounted cleanly"),
            Err(e) => tracing::error!(node = self.node_id, "unmount: {e}"),
        }
        res
    }

    /// Free and total blocks and inodes, including space that pending
    /// deallocations will free.
    pub fn statfs(&self, ms: &MaySleep) -> Result<StatFs> {
        let mut free = 0u64;
        let mut dinodes = 0u64;
        let mut unlinked = 0u64;
        for l in self.geo.rgrps() {
            let name = LockName::Rgrp(l.index);
            let h = match self.glocks.try_acquire(name, Mode::PR) {
                Ok(h) => h,
                Err(FsError::WouldBlock) => self.glocks.acquire(name, Mode::PR, ms)?,
                Err(e) => return Err(e),
            };
            let hdr = self.rgrp_header(&l)?;
            free += hdr.free as u64;
            dinodes += hdr.dinodes as u64;
            unlinked += hdr.unlinked as u64;
            drop(h);
        }
        let pending = self.icache.deferred_blocks();
        let total = self.geo.data_blocks();
        Ok(StatFs {
            blocks: total,
            bfree: free,
            bavail: free + pending,
            files: dinodes + unlinked + free,
            ffree: free,
            bsize: self.bs as u32,
            namelen: mcfs_format::dir::NAME_LEN_MAX as u32,
            pending_dealloc_blocks: pending,
            unlinked_inodes: unlinked,
        })
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    /// Free for users: includes blocks that queued deallocations will free.
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub pending_dealloc_blocks: u64,
    pub unlinked_inodes: u64,
}

impl GlockOps for Fs {
    fn sync(&self, name: LockName) -> Result<()> {
        match name {
            LockName::Inode(_) | LockName::Rgrp(_) => {
                if self.is_withdrawn() {
                    return Err(FsError::Withdrawn("cannot sync after withdraw".into()));
                }
                self.log.sync_owner(name)
            }
            _ => Ok(()),
        }
    }

    fn invalidate(&self, name: LockName) {
        self.bufs.invalidate(name);
        if let LockName::Inode(ino) = name {
            self.icache.invalidate_data(ino);
            // The kernel's copies too, before the lock goes (docs/SEMANTICS.md,
            // "Kernel caches"): the inode's attributes, and if the kernel may
            // cache names in it, every name. Not on a nolock mount: no other
            // node can change what the kernel has (a glock goes there only
            // when trimmed or at unmount).
            if let Some(k) = self.icache.kernel().filter(|_| !self.glocks.is_nolock()) {
                k.inval_attr(ino);
                if self.icache.peek(ino).is_some_and(|i| i.names_cached.swap(false, Ordering::AcqRel)) {
                    k.inval_all_names();
                }
            }
        }
    }

    fn iopen_wanted(&self, ino: u64) {
        self.icache.iopen_wanted(self, ino);
    }

    fn fatal(&self, err: &FsError) {
        self.withdraw(&format!("demote failed: {err}"));
    }
}
