//! POSIX operations on a mounted [`Fs`]: what the FUSE adapter calls, and what
//! the reference-model tests drive directly. Each operation takes its glocks in
//! the documented order (rename lock, inode glocks by inode number, rgrp
//! glocks, then the log), never waits for a glock inside a transaction, and
//! withdraws the node on an on-disk inconsistency.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mcfs_format::dinode::{self, Dinode, Timespec, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use mcfs_format::dir::{self, Entry};
use mcfs_format::rgrp::BlockState;

use crate::error::{FsError, Result};
use crate::fs::{Fs, StatFs};
use crate::glock::{Holder, LockName, MaySleep, Mode};
use crate::icache::budget::Charge;
use crate::icache::{Inode, Pinned, Readahead};
use crate::inode::{now, Attr};

/// Who is asking (from the FUSE request).
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

impl Caller {
    pub const ROOT: Caller = Caller { uid: 0, gid: 0 };
}

/// Attribute changes (setattr).
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timespec>,
    pub mtime: Option<Timespec>,
}

/// A directory entry as readdir returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub dtype: u8,
    pub name: Vec<u8>,
}

/// Rename flags (renameat2).
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;

const MAX_LINKS: u32 = 65000;
/// Files up to this size have their data cached (and charged) on read; larger
/// ones stream past the cache.
const CACHE_FILE_MAX: u64 = 1 << 20;
/// Read-ahead window of a sequential reader of a large file (all windows
/// ahead together are capped at an eighth of the memory budget).
const READAHEAD_MAX: u64 = 4 << 20;

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > dir::NAME_LEN_MAX {
        return Err(FsError::NameTooLong);
    }
    if !dir::valid_name(name) {
        return Err(FsError::Invalid("invalid file name".into()));
    }
    Ok(())
}

impl Fs {
    pub fn root_ino(&self) -> u64 {
        self.sb.root_ino
    }

    /// Run one operation: refuse after withdraw, wait for memory at this
    /// throttle point, withdraw on a fatal error.
    fn op<T>(&self, f: impl FnOnce(&MaySleep) -> Result<T>) -> Result<T> {
        self.check_live()?;
        self.budget.throttle(Duration::from_secs(5));
        let ms = MaySleep::new().ok_or_else(|| FsError::Other("operation from reclaim".into()))?;
        self.stats.ops.fetch_add(1, Ordering::Relaxed);
        let r = f(&ms);
        if let Err(e) = &r {
            if e.is_fatal() {
                self.withdraw(&e.to_string());
            }
            if !matches!(e, FsError::NotFound | FsError::Exists) {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    fn lock(&self, ino: u64, mode: Mode, ms: &MaySleep) -> Result<Holder> {
        self.glocks.acquire(LockName::Inode(ino), mode, ms)
    }

    /// Lock several inodes EX in inode-number order.
    fn lock_sorted(&self, inos: &[u64], ms: &MaySleep) -> Result<Vec<Holder>> {
        let mut v: Vec<u64> = inos.to_vec();
        v.sort_unstable();
        v.dedup();
        v.into_iter().map(|i| self.lock(i, Mode::EX, ms)).collect()
    }

    /// The in-memory inode, which must exist (the kernel holds a lookup on it).
    fn cached(&self, ino: u64) -> Result<Arc<Inode>> {
        match self.icache.get(ino) {
            Some(i) if !i.gone.load(Ordering::Acquire) => Ok(i),
            _ => Err(FsError::Stale),
        }
    }

    /// The kernel is going to cache names found in directory `dir` (replies
    /// give them a TTL): when its glock goes, the kernel must drop them.
    /// Called before the operation, so a demote that races it still sees it.
    pub fn kernel_caches_names(&self, dir: u64) {
        if let Some(i) = self.icache.get(dir) {
            i.names_cached.store(true, Ordering::Release);
        }
    }

    /// Bring `ino` into memory: iopen shared first (lock order iopen -> inode).
    fn instantiate(&self, ino: u64, ms: &MaySleep) -> Result<Pinned> {
        if let Some(i) = self.icache.get_pinned(ino) {
            return Ok(i);
        }
        let h = self.glocks.acquire(LockName::Iopen(ino), Mode::PR, ms)?;
        let charge = self.budget.charge(crate::icache::INODE_CHARGE);
        Ok(self.icache.insert(ino, 0, Some(h), charge))
    }

    /// Mount-time: the root directory is always in memory.
    pub fn instantiate_root(&self) -> Result<()> {
        self.op(|ms| {
            let i = self.instantiate(self.root_ino(), ms)?;
            i.nlookup.fetch_add(1, Ordering::AcqRel);
            Ok(())
        })
    }

    fn entry_of(&self, parent: u64, name: &[u8], ms: &MaySleep) -> Result<Option<Entry>> {
        let _h = self.lock(parent, Mode::PR, ms)?;
        let (_, d) = self.dinode(parent)?;
        if !d.is_dir() {
            return Err(FsError::NotDir);
        }
        self.dir_lookup(&d, name)
    }

    /// Look `name` up in `parent`; on success the kernel holds one more lookup.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        self.op(|ms| {
            self.cached(parent)?;
            if name.len() > dir::NAME_LEN_MAX {
                return Err(FsError::NameTooLong);
            }
            for _ in 0..8 {
                let Some(e) = self.entry_of(parent, name, ms)? else {
                    return Err(FsError::NotFound);
                };
                let fresh = self.icache.get(e.ino).is_none();
                let inode = self.instantiate(e.ino, ms)?;
                if fresh {
                    // With iopen held nobody can deallocate it; check the name
                    // still leads here (it may have been unlinked meanwhile).
                    match self.entry_of(parent, name, ms)? {
                        Some(e2) if e2.ino == e.ino => {}
                        _ => {
                            let i = inode.inode();
                            drop(inode);
                            self.forget_if_unused(&i);
                            continue;
                        }
                    }
                }
                let h = self.lock(e.ino, Mode::PR, ms)?;
                let (_, d) = self.dinode(e.ino)?;
                drop(h);
                if d.nlink == 0 {
                    let i = inode.inode();
                    drop(inode);
                    self.forget_if_unused(&i);
                    return Err(FsError::NotFound);
                }
                inode.generation.store(d.generation, Ordering::Relaxed);
                inode.nlookup.fetch_add(1, Ordering::AcqRel);
                *inode.last_name.lock().unwrap_or_else(|p| p.into_inner()) = Some((parent, name.to_vec()));
                return Ok(self.attr_of(&d));
            }
            Err(FsError::NotFound)
        })
    }

    fn forget_if_unused(&self, inode: &Arc<Inode>) {
        if !inode.in_use() {
            if let Some(ms) = MaySleep::new() {
                let _ = self.iput_final(inode.ino, &ms);
            }
        }
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        let Some(i) = self.icache.get(ino) else {
            return;
        };
        let prev = i.nlookup.fetch_sub(n.min(i.nlookup.load(Ordering::Acquire)), Ordering::AcqRel);
        if prev <= n && !i.in_use() && i.unlinked.load(Ordering::Acquire) && !self.is_withdrawn() {
            // the iput path: an unlinked inode's last user went away
            if let Some(ms) = MaySleep::new() {
                if let Err(e) = self.iput_final(ino, &ms) {
                    tracing::warn!(ino, "final forget: {e}");
                }
            }
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        self.op(|ms| {
            let i = self.cached(ino)?;
            let _h = self.lock(ino, Mode::PR, ms)?;
            let (_, d) = self.dinode(ino)?;
            if d.nlink == 0 {
                // removed elsewhere: this node deallocates at its last close
                i.unlinked.store(true, Ordering::Release);
            }
            Ok(self.attr_of(&d))
        })
    }

    pub fn setattr(&self, ino: u64, a: &SetAttr, who: Caller) -> Result<Attr> {
        self.op(|ms| {
            let inode = self.cached(ino)?;
            let _h = self.lock(ino, Mode::EX, ms)?;
            let (b, mut d) = self.dinode(ino)?;
            if let Some(uid) = a.uid {
                if who.uid != 0 && uid != d.uid {
                    return Err(FsError::Perm);
                }
            }
            if let Some(gid) = a.gid {
                if who.uid != 0 && (who.uid != d.uid || (gid != d.gid && gid != who.gid)) {
                    return Err(FsError::Perm);
                }
            }
            if a.mode.is_some() && who.uid != 0 && who.uid != d.uid {
                return Err(FsError::Perm);
            }
            let t = now();
            let mut rgrp_holders = Vec::new();
            let mut plan = (Vec::new(), Vec::new());
            let mut res = None;
            if let Some(size) = a.size {
                if d.is_dir() {
                    return Err(FsError::IsDir);
                }
                if size.div_ceil(self.bs as u64) > dinode::tree_capacity(self.geo.block_size, dinode::MAX_HEIGHT) {
                    return Err(FsError::TooBig);
                }
                if size < d.size {
                    plan = self.truncate_plan(&d, size)?;
                    let mut rg: Vec<u32> = plan.0.iter().chain(plan.1.iter()).filter_map(|x| self.geo.rgrp_of(*x).map(|l| l.index)).collect();
                    rg.sort_unstable();
                    rg.dedup();
                    for r in rg {
                        rgrp_holders.push(self.glocks.acquire(LockName::Rgrp(r), Mode::EX, ms)?);
                    }
                } else if d.is_inline() && size > dinode::payload_size(self.geo.block_size) as u64 && d.size > 0 {
                    res = Some(self.reserve(1, 1, Some(ino), ms)?);
                }
                if size > d.size && !d.is_inline() {
                    self.zero_tail(&d, d.size)?;
                    inode.drop_data_from(d.size / self.bs as u64);
                }
            }
            {
                let mut tx = self.log.begin()?;
                if let Some(m) = a.mode {
                    d.mode = (d.mode & S_IFMT) | (m & 0o7777);
                }
                if let Some(u) = a.uid {
                    d.uid = u;
                }
                if let Some(g) = a.gid {
                    d.gid = g;
                }
                if let Some(size) = a.size {
                    if let Some(r) = &res {
                        // grow an inline file past its payload: move the data out
                        self.bmap_alloc(&mut tx, r, &mut d, &b, 0, 1)?;
                    }
                    if size != d.size || !plan.0.is_empty() || !plan.1.is_empty() {
                        self.truncate(&mut tx, &mut d, size, &plan)?;
                        inode.drop_data_from(size / self.bs as u64);
                        d.mtime = t;
                    }
                }
                if let Some(at) = a.atime {
                    d.atime = at;
                }
                if let Some(mt) = a.mtime {
                    d.mtime = mt;
                }
                d.ctime = t;
                self.put_dinode(&mut tx, &b, &d);
            }
            drop(rgrp_holders);
            Ok(self.attr_of(&d))
        })
    }

    /// Create a regular file, device, fifo, socket, directory or symlink.
    #[allow(clippy::too_many_arguments)]
    fn create_node(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, who: Caller, symlink: Option<&[u8]>, ms: &MaySleep) -> Result<(Pinned, Dinode)> {
        check_name(name)?;
        self.cached(parent)?;
        let _ph = self.lock(parent, Mode::EX, ms)?;
        let (pb, mut pd) = self.dinode(parent)?;
        if !pd.is_dir() {
            return Err(FsError::NotDir);
        }
        if pd.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if self.dir_lookup(&pd, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let is_dir = mode & S_IFMT == S_IFDIR;
        if is_dir && pd.nlink >= MAX_LINKS {
            return Err(FsError::TooManyLinks);
        }
        let target_blocks = symlink.map_or(0, |t| if t.len() <= dinode::payload_size(self.geo.block_size) { 0 } else { t.len().div_ceil(self.bs) as u32 + 2 });
        let need = 1 + self.dir_add_estimate(&pd) + target_blocks;
        let res = match self.reserve(need, need, Some(parent), ms) {
            Err(FsError::NoSpace) => {
                self.flush_deferred_for_space(Duration::from_secs(2));
                self.reserve(need, need, Some(parent), ms)?
            }
            r => r?,
        };
        // Pick and lock the new dinode's block before the transaction opens.
        let mut skip = Vec::new();
        let (ino, ih, ioh) = loop {
            let Some(c) = self.pick_free(&res, parent + 1, &skip)? else {
                return Err(FsError::NoSpace);
            };
            // both try-locks at once: one lock-server round trip, not two
            let (io, il) = std::thread::scope(|s| {
                let io = s.spawn(|| self.glocks.try_acquire(LockName::Iopen(c), Mode::PR));
                let il = self.glocks.try_acquire(LockName::Inode(c), Mode::EX);
                (io.join().unwrap_or_else(|_| Err(FsError::Other("lock thread panicked".into()))), il)
            });
            match (io, il) {
                (Ok(io), Ok(il)) => break (c, il, io),
                _ => skip.push(c),
            }
            if skip.len() > 64 {
                return Err(FsError::NoSpace);
            }
        };
        let gid = if pd.mode & 0o2000 != 0 { pd.gid } else { who.gid };
        let mode = if is_dir && pd.mode & 0o2000 != 0 { mode | 0o2000 } else { mode };
        let (b, d) = {
            let mut tx = self.log.begin()?;
            let (b, mut d) = self.alloc_dinode(&mut tx, &res, ino, mode, who.uid, gid, rdev, parent)?;
            if let Some(t) = symlink {
                self.write_data(&mut tx, Some(&res), &mut d, &b, 0, t)?;
            }
            self.put_dinode(&mut tx, &b, &d);
            self.dir_add(&mut tx, &res, &mut pd, Entry::new(name, ino, dir::dtype_of_mode(mode)))?;
            let t = now();
            pd.mtime = t;
            pd.ctime = t;
            if is_dir {
                pd.nlink += 1;
            }
            self.put_dinode(&mut tx, &pb, &pd);
            (b, d)
        };
        drop(res);
        let _ = &b;
        let charge = self.budget.charge(crate::icache::INODE_CHARGE);
        let inode = self.icache.insert(ino, d.generation, Some(ioh), charge);
        inode.generation.store(d.generation, Ordering::Relaxed);
        *inode.last_name.lock().unwrap_or_else(|p| p.into_inner()) = Some((parent, name.to_vec()));
        drop(ih);
        Ok((inode, d))
    }

    pub fn mknod(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, who: Caller) -> Result<Attr> {
        self.op(|ms| {
            let m = if mode & S_IFMT == 0 { mode | S_IFREG } else { mode };
            if m & S_IFMT == S_IFDIR || m & S_IFMT == S_IFLNK {
                return Err(FsError::Invalid("mknod of a directory or symlink".into()));
            }
            let (i, d) = self.create_node(parent, name, m, rdev, who, None, ms)?;
            i.nlookup.fetch_add(1, Ordering::AcqRel);
            Ok(self.attr_of(&d))
        })
    }

    /// Create and open a regular file. Without `excl` (O_EXCL) an existing file
    /// of that name is opened instead: another node may have created it since
    /// the kernel looked the name up (locally the kernel's directory lock rules
    /// that race out; across nodes only we can).
    pub fn create_open(&self, parent: u64, name: &[u8], mode: u32, who: Caller, excl: bool) -> Result<Attr> {
        let r = self.create(parent, name, mode, who);
        match r {
            Err(FsError::Exists) if !excl => {
                let a = self.lookup(parent, name)?;
                if a.mode & S_IFMT == S_IFDIR {
                    self.forget(a.ino, 1);
                    return Err(FsError::IsDir);
                }
                self.open(a.ino)
            }
            r => r,
        }
    }

    /// Create and open a regular file; `Exists` if the name is taken.
    pub fn create(&self, parent: u64, name: &[u8], mode: u32, who: Caller) -> Result<Attr> {
        self.op(|ms| {
            let (i, d) = self.create_node(parent, name, S_IFREG | (mode & 0o7777), 0, who, None, ms)?;
            i.nlookup.fetch_add(1, Ordering::AcqRel);
            i.opens.fetch_add(1, Ordering::AcqRel);
            Ok(self.attr_of(&d))
        })
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, who: Caller) -> Result<Attr> {
        self.op(|ms| {
            let (i, d) = self.create_node(parent, name, S_IFDIR | (mode & 0o7777), 0, who, None, ms)?;
            i.nlookup.fetch_add(1, Ordering::AcqRel);
            Ok(self.attr_of(&d))
        })
    }

    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8], who: Caller) -> Result<Attr> {
        self.op(|ms| {
            if target.is_empty() || target.len() > 4096 {
                return Err(if target.is_empty() { FsError::Invalid("empty symlink target".into()) } else { FsError::NameTooLong });
            }
            let (i, d) = self.create_node(parent, name, S_IFLNK | 0o777, 0, who, Some(target), ms)?;
            i.nlookup.fetch_add(1, Ordering::AcqRel);
            Ok(self.attr_of(&d))
        })
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        self.op(|ms| {
            self.cached(ino)?;
            let _h = self.lock(ino, Mode::PR, ms)?;
            let (_, d) = self.dinode(ino)?;
            if !d.is_symlink() {
                return Err(FsError::Invalid("not a symlink".into()));
            }
            self.read_data(&d, 0, d.size as u32)
        })
    }

    /// Resolve `name` in `parent` and lock [parent, child] (EX, sorted),
    /// retrying if the entry changed in between.
    fn lock_entry(&self, parent: u64, name: &[u8], extra: &[u64], ms: &MaySleep) -> Result<(Vec<Holder>, Entry)> {
        for _ in 0..16 {
            let Some(e) = self.entry_of(parent, name, ms)? else {
                return Err(FsError::NotFound);
            };
            let mut set = vec![parent, e.ino];
            set.extend_from_slice(extra);
            let hs = self.lock_sorted(&set, ms)?;
            let (_, pd) = self.dinode(parent)?;
            match self.dir_lookup(&pd, name)? {
                Some(e2) if e2.ino == e.ino => return Ok((hs, e2)),
                _ => continue,
            }
        }
        Err(FsError::Other("directory entry keeps changing".into()))
    }

    fn remove(&self, parent: u64, name: &[u8], rmdir: bool, ms: &MaySleep) -> Result<()> {
        self.cached(parent)?;
        let (_hs, e) = self.lock_entry(parent, name, &[], ms)?;
        let (pb, mut pd) = self.dinode(parent)?;
        let (cb, mut cd) = self.dinode(e.ino)?;
        if rmdir {
            if !cd.is_dir() {
                return Err(FsError::NotDir);
            }
            if cd.entries > 0 {
                return Err(FsError::NotEmpty);
            }
        } else if cd.is_dir() {
            return Err(FsError::IsDir);
        }
        let last = rmdir || cd.nlink <= 1;
        let _rh = if last {
            let l = self.geo.rgrp_of(e.ino).ok_or_else(|| self.inconsistent(format!("inode {} outside every rgrp", e.ino)))?;
            Some(self.glocks.acquire(LockName::Rgrp(l.index), Mode::EX, ms)?)
        } else {
            None
        };
        {
            let mut tx = self.log.begin()?;
            self.dir_remove(&mut tx, &mut pd, name)?;
            let t = now();
            pd.mtime = t;
            pd.ctime = t;
            if rmdir {
                pd.nlink = pd.nlink.saturating_sub(1);
                cd.nlink = 0;
            } else {
                cd.nlink = cd.nlink.saturating_sub(1);
            }
            cd.ctime = t;
            self.put_dinode(&mut tx, &pb, &pd);
            self.put_dinode(&mut tx, &cb, &cd);
            if cd.nlink == 0 {
                self.set_block_states(&mut tx, &[e.ino], BlockState::Unlinked)?;
            }
        }
        if cd.nlink == 0 {
            if let Some(i) = self.icache.get(e.ino) {
                i.unlinked.store(true, Ordering::Release);
            }
        }
        Ok(())
    }

    /// After an unlink dropped the last link: deallocate now if nobody here
    /// uses the inode (the kernel usually still holds a lookup; then its forget
    /// does it).
    fn after_unlink(&self, parent: u64, name_ino: Option<u64>, ms: &MaySleep) {
        let _ = parent;
        if let Some(ino) = name_ino {
            match self.icache.get(ino) {
                Some(i) if !i.in_use() => {
                    let _ = self.iput_final(ino, ms);
                }
                Some(_) => {}
                None => {
                    // not in memory here: bring it in (iopen shared, as a lookup
                    // does), so that the iput path deallocates it, or leaves it
                    // to a node that has it open
                    if self.instantiate(ino, ms).is_ok() {
                        let _ = self.iput_final(ino, ms);
                    }
                }
            }
        }
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.op(|ms| {
            let ino = self.entry_of(parent, name, ms)?.map(|e| e.ino);
            self.remove(parent, name, false, ms)?;
            self.after_unlink(parent, ino, ms);
            Ok(())
        })
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.op(|ms| {
            let ino = self.entry_of(parent, name, ms)?.map(|e| e.ino);
            self.remove(parent, name, true, ms)?;
            self.after_unlink(parent, ino, ms);
            Ok(())
        })
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Attr> {
        self.op(|ms| {
            check_name(newname)?;
            let inode = self.cached(ino)?;
            self.cached(newparent)?;
            let _hs = self.lock_sorted(&[ino, newparent], ms)?;
            let (pb, mut pd) = self.dinode(newparent)?;
            let (cb, mut cd) = self.dinode(ino)?;
            if !pd.is_dir() {
                return Err(FsError::NotDir);
            }
            if cd.is_dir() {
                return Err(FsError::Perm);
            }
            if cd.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if cd.nlink >= MAX_LINKS {
                return Err(FsError::TooManyLinks);
            }
            if self.dir_lookup(&pd, newname)?.is_some() {
                return Err(FsError::Exists);
            }
            let need = self.dir_add_estimate(&pd);
            let res = self.reserve(need, need, Some(newparent), ms)?;
            {
                let mut tx = self.log.begin()?;
                self.dir_add(&mut tx, &res, &mut pd, Entry::new(newname, ino, dir::dtype_of_mode(cd.mode)))?;
                let t = now();
                pd.mtime = t;
                pd.ctime = t;
                cd.nlink += 1;
                cd.ctime = t;
                self.put_dinode(&mut tx, &pb, &pd);
                self.put_dinode(&mut tx, &cb, &cd);
            }
            inode.nlookup.fetch_add(1, Ordering::AcqRel);
            Ok(self.attr_of(&cd))
        })
    }

    /// Is `anc` an ancestor of (or equal to) directory `dir`? Walks parent
    /// pointers; callers hold the rename lock, so ancestry cannot change.
    fn is_ancestor(&self, anc: u64, mut dir: u64, ms: &MaySleep) -> Result<bool> {
        let root = self.root_ino();
        for _ in 0..100_000 {
            if dir == anc {
                return Ok(true);
            }
            if dir == root {
                return Ok(false);
            }
            let _h = self.lock(dir, Mode::PR, ms)?;
            let (_, d) = self.dinode(dir)?;
            if d.parent == 0 || d.parent == dir {
                return Ok(false);
            }
            dir = d.parent;
        }
        Err(self.inconsistent("directory parent pointers form a loop".into()))
    }

    pub fn rename(&self, parent: u64, name: &[u8], newparent: u64, newname: &[u8], flags: u32) -> Result<()> {
        self.op(|ms| {
            check_name(newname)?;
            if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 || flags == RENAME_NOREPLACE | RENAME_EXCHANGE {
                return Err(FsError::Invalid("rename flags".into()));
            }
            self.cached(parent)?;
            self.cached(newparent)?;
            let _rl = self.glocks.acquire(LockName::Rename, Mode::EX, ms)?;
            for _ in 0..16 {
                let Some(src) = self.entry_of(parent, name, ms)? else {
                    return Err(FsError::NotFound);
                };
                let dst = self.entry_of(newparent, newname, ms)?;
                if src.ino == dst.as_ref().map_or(0, |d| d.ino) {
                    return Ok(()); // same inode: POSIX says do nothing
                }
                let src_is_dir = src.dtype == dir::DT_DIR;
                if parent != newparent {
                    if src_is_dir && self.is_ancestor(src.ino, newparent, ms)? {
                        return Err(FsError::Invalid("cannot move a directory below itself".into()));
                    }
                    if flags & RENAME_EXCHANGE != 0 && dst.as_ref().is_some_and(|d| d.dtype == dir::DT_DIR) {
                        if let Some(d) = &dst {
                            if self.is_ancestor(d.ino, parent, ms)? {
                                return Err(FsError::Invalid("cannot move a directory below itself".into()));
                            }
                        }
                    }
                }
                let mut set = vec![parent, newparent, src.ino];
                if let Some(d) = &dst {
                    set.push(d.ino);
                }
                let hs = self.lock_sorted(&set, ms)?;
                // re-check under the locks
                let (_, pd0) = self.dinode(parent)?;
                let (_, npd0) = self.dinode(newparent)?;
                let src2 = self.dir_lookup(&pd0, name)?;
                let dst2 = self.dir_lookup(&npd0, newname)?;
                if src2.as_ref().map(|e| e.ino) != Some(src.ino) || dst2.as_ref().map(|e| e.ino) != dst.as_ref().map(|e| e.ino) {
                    drop(hs);
                    continue;
                }
                return self.rename_locked(parent, name, newparent, newname, flags, src, dst, ms);
            }
            Err(FsError::Other("rename: entries keep changing".into()))
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_locked(&self, parent: u64, name: &[u8], newparent: u64, newname: &[u8], flags: u32, src: Entry, dst: Option<Entry>, ms: &MaySleep) -> Result<()> {
        let (sb_, mut sd) = self.dinode(src.ino)?;
        let dst_d = match &dst {
            Some(e) => Some(self.dinode(e.ino)?),
            None => None,
        };
        if flags & RENAME_EXCHANGE != 0 && dst.is_none() {
            return Err(FsError::NotFound);
        }
        if flags & RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(FsError::Exists);
        }
        let exchange = flags & RENAME_EXCHANGE != 0;
        if let (Some((_, dd)), false) = (&dst_d, exchange) {
            if sd.is_dir() && !dd.is_dir() {
                return Err(FsError::NotDir);
            }
            if !sd.is_dir() && dd.is_dir() {
                return Err(FsError::IsDir);
            }
            if dd.is_dir() && dd.entries > 0 {
                return Err(FsError::NotEmpty);
            }
        }
        // does the replaced inode lose its last link?
        let victim_dies = !exchange && dst_d.as_ref().is_some_and(|(_, dd)| dd.is_dir() || dd.nlink <= 1);
        let same_dir = parent == newparent;
        let need = if dst.is_none() { self.dir_add_estimate(&self.dinode(newparent)?.1) } else { 0 };
        let res = if need > 0 { Some(self.reserve(need, need, Some(newparent), ms)?) } else { None };
        let _vr = if victim_dies {
            let v = dst.as_ref().map(|e| e.ino).unwrap_or(0);
            let l = self.geo.rgrp_of(v).ok_or_else(|| self.inconsistent(format!("inode {v} outside every rgrp")))?;
            Some(self.glocks.acquire(LockName::Rgrp(l.index), Mode::EX, ms)?)
        } else {
            None
        };
        let t = now();
        {
            let mut tx = self.log.begin()?;
            let (pb, mut pd) = self.dinode(parent)?;
            if exchange {
                let de = dst.clone().ok_or(FsError::NotFound)?;
                let (db, mut dd) = dst_d.clone().ok_or(FsError::NotFound)?;
                if same_dir {
                    self.dir_replace(&mut tx, &mut pd, name, de.ino, de.dtype)?;
                    self.dir_replace(&mut tx, &mut pd, newname, src.ino, src.dtype)?;
                } else {
                    let (npb, mut npd) = self.dinode(newparent)?;
                    self.dir_replace(&mut tx, &mut pd, name, de.ino, de.dtype)?;
                    self.dir_replace(&mut tx, &mut npd, newname, src.ino, src.dtype)?;
                    if sd.is_dir() != dd.is_dir() {
                        if sd.is_dir() {
                            pd.nlink -= 1;
                            npd.nlink += 1;
                        } else {
                            pd.nlink += 1;
                            npd.nlink -= 1;
                        }
                    }
                    if sd.is_dir() {
                        sd.parent = newparent;
                    }
                    if dd.is_dir() {
                        dd.parent = parent;
                    }
                    npd.mtime = t;
                    npd.ctime = t;
                    self.put_dinode(&mut tx, &npb, &npd);
                }
                dd.ctime = t;
                self.put_dinode(&mut tx, &db, &dd);
            } else {
                self.dir_remove(&mut tx, &mut pd, name)?;
                let mut npd_pair = if same_dir { None } else { Some(self.dinode(newparent)?) };
                {
                    let target: &mut Dinode = match &mut npd_pair {
                        Some((_, npd)) => npd,
                        None => &mut pd,
                    };
                    match &dst {
                        Some(_) => {
                            self.dir_replace(&mut tx, target, newname, src.ino, src.dtype)?;
                        }
                        None => {
                            let r = res.as_ref().ok_or_else(|| FsError::Other("internal: no reservation".into()))?;
                            self.dir_add(&mut tx, r, target, Entry::new(newname, src.ino, src.dtype))?;
                        }
                    }
                    target.mtime = t;
                    target.ctime = t;
                }
                if sd.is_dir() && !same_dir {
                    pd.nlink -= 1;
                    if let Some((_, npd)) = &mut npd_pair {
                        npd.nlink += 1;
                    }
                    sd.parent = newparent;
                }
                if let Some((db, mut dd)) = dst_d.clone() {
                    if dd.is_dir() {
                        dd.nlink = 0;
                        // the replaced directory's link from its parent goes
                        if let Some((_, npd)) = &mut npd_pair {
                            npd.nlink -= 1;
                        } else {
                            pd.nlink -= 1;
                        }
                    } else {
                        dd.nlink = dd.nlink.saturating_sub(1);
                    }
                    dd.ctime = t;
                    self.put_dinode(&mut tx, &db, &dd);
                    if dd.nlink == 0 {
                        self.set_block_states(&mut tx, &[dd.ino], BlockState::Unlinked)?;
                        if let Some(i) = self.icache.get(dd.ino) {
                            i.unlinked.store(true, Ordering::Release);
                        }
                    }
                }
                if let Some((npb, npd)) = &npd_pair {
                    self.put_dinode(&mut tx, npb, npd);
                }
            }
            pd.mtime = t;
            pd.ctime = t;
            self.put_dinode(&mut tx, &pb, &pd);
            sd.ctime = t;
            self.put_dinode(&mut tx, &sb_, &sd);
        }
        drop(res);
        if victim_dies {
            let v = dst.as_ref().map(|e| e.ino);
            self.after_unlink(newparent, v, ms);
        }
        Ok(())
    }

    pub fn open(&self, ino: u64) -> Result<Attr> {
        self.op(|ms| {
            let i = self.cached(ino)?;
            let _h = self.lock(ino, Mode::PR, ms)?;
            let (_, d) = self.dinode(ino)?;
            i.opens.fetch_add(1, Ordering::AcqRel);
            Ok(self.attr_of(&d))
        })
    }

    /// Close of handle `fh` (see [`Fs::read_handle_with`]): its read-ahead
    /// goes, then as [`Fs::release`].
    pub fn release_handle(&self, ino: u64, fh: u64) {
        if let Some(i) = self.icache.get(ino) {
            i.close_readahead(fh);
        }
        self.release(ino);
    }

    /// Last close of a handle.
    pub fn release(&self, ino: u64) {
        let Some(i) = self.icache.get(ino) else {
            return;
        };
        let prev = i.opens.fetch_sub(1.min(i.opens.load(Ordering::Acquire)), Ordering::AcqRel);
        if prev > 1 || i.opens.load(Ordering::Acquire) > 0 || self.is_withdrawn() {
            return;
        }
        // nobody reads on from where the windows are: give their memory back
        i.reset_readahead();
        let Some(ms) = MaySleep::new() else { return };
        // Last close here. Another node may have removed the last name while
        // we had it open: we then hold the duty to deallocate (iopen protocol).
        if !i.unlinked.load(Ordering::Acquire) {
            let nlink = self.glocks.acquire(LockName::Inode(ino), Mode::PR, &ms).and_then(|_h| self.dinode(ino).map(|(_, d)| d.nlink));
            if matches!(nlink, Ok(0)) {
                i.unlinked.store(true, Ordering::Release);
            }
        }
        if !i.unlinked.load(Ordering::Acquire) {
            return;
        }
        let r = if i.in_use() {
            // the kernel still caches it (no opens): nobody can reach its data
            // any more, so deallocate and answer ESTALE to what the kernel asks
            self.dealloc_closed(&i, &ms)
        } else {
            self.iput_final(ino, &ms).map(|_| ())
        };
        if let Err(e) = r {
            tracing::warn!(ino, "final close: {e}");
        }
    }

    pub fn read(&self, ino: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        self.read_with(ino, off, size, |b| b.to_vec())
    }

    /// [`Fs::read`] handing the bytes to `f` in place (the FUSE reply copies
    /// them straight from the read-ahead window or the device buffer).
    pub fn read_with<R>(&self, ino: u64, off: u64, size: u32, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        self.read_handle_with(ino, 0, off, size, f)
    }

    /// [`Fs::read_with`] through open file handle `fh` (a number the caller
    /// gives each open, the FUSE file handle; 0 is [`Fs::read_with`]'s):
    /// each handle has its own read-ahead, dropped by
    /// [`Fs::release_handle`].
    pub fn read_handle_with<R>(&self, ino: u64, fh: u64, off: u64, size: u32, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        self.op(|ms| {
            let inode = self.cached(ino)?;
            let _h = self.lock(ino, Mode::PR, ms)?;
            let (_, d) = self.dinode(ino)?;
            if d.is_dir() {
                return Err(FsError::IsDir);
            }
            if d.is_inline() {
                return Ok(f(&self.read_data(&d, off, size)?));
            }
            if d.size > CACHE_FILE_MAX {
                return self.read_streaming(&inode, fh, &d, off, size, f);
            }
            Ok(f(&self.read_cached(&inode, &d, off, size)?))
        })
    }

    /// Large files: no cache, but a sequential reader gets the next windows
    /// read ahead in the background (the kernel does no read-ahead for
    /// direct-I/O files), in the read-ahead stream of its file handle `fh`.
    /// Called with the inode glock held shared.
    fn read_streaming<R>(&self, inode: &Arc<Inode>, fh: u64, d: &Dinode, off: u64, size: u32, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let end = (off + size as u64).min(d.size);
        if off >= end {
            return Ok(f(&[]));
        }
        // does a window at `ro` of `n` bytes hold this whole read?
        let covers = |ro: u64, n: u64| ro <= off && end <= ro + n;
        let (hit, sequential, id) = {
            let mut set = inode.ra.lock().unwrap_or_else(|p| p.into_inner());
            let ra = set.stream(fh);
            let id = ra.id;
            let sequential = ra.next == off;
            ra.next = end;
            if !sequential {
                // a jump: what was read ahead is for somewhere else
                ra.ready.clear();
            }
            // A window being read that holds this range: wait for it (the
            // thread holds the glock shared too, so this is bounded by one
            // device read) rather than read the same blocks twice.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                let Some(ra) = set.get(fh, id) else { break };
                if ra.ready.iter().any(|(ro, data, _)| covers(*ro, data.len() as u64)) {
                    break;
                }
                let waiting = sequential && ra.in_flight(off, end);
                let now = std::time::Instant::now();
                if !waiting || now >= deadline {
                    break;
                }
                set = inode.ra_cv.wait_timeout(set, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
            }
            let hit = match set.get(fh, id) {
                // invalidated while waiting: read from the device
                None => None,
                Some(ra) => {
                    // windows wholly before this read are consumed
                    while ra.ready.front().is_some_and(|(ro, data, _)| ro + data.len() as u64 <= off) {
                        if let Some((_, data, charge)) = ra.ready.pop_front() {
                            self.recycle_window(data, charge);
                        }
                    }
                    match ra.ready.iter().position(|(ro, data, _)| covers(*ro, data.len() as u64)) {
                        // a read to the window's end is its last (the reader
                        // moves on, or the file ends here): it leaves with it
                        Some(i) if ra.ready[i].0 + ra.ready[i].1.len() as u64 == end => ra.ready.remove(i).map(|(ro, data, charge)| (data, (off - ro) as usize, Some(charge))),
                        Some(i) => Some((ra.ready[i].1.clone(), (off - ra.ready[i].0) as usize, None)),
                        None => None,
                    }
                }
            };
            (hit, sequential, id)
        };
        // start the next window before copying this one out
        if sequential && end < d.size {
            self.start_readahead(inode, fh, id, end);
        }
        let len = (end - off) as usize;
        Ok(match hit {
            Some((data, s, last)) => {
                self.stats.readahead_bytes.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                let r = f(&data[s..s + len]);
                if let Some(charge) = last {
                    self.recycle_window(data, charge);
                }
                r
            }
            None => {
                let (buf, s, len) = self.read_blocks(d, off, size)?;
                f(&buf[s..s + len])
            }
        })
    }

    /// Keep [`Readahead::DEPTH`] windows ahead of the sequential reader of
    /// stream `id` (handle `fh`) at `from`: up to [`Readahead::THREADS`]
    /// background threads per stream each take the next window not yet
    /// claimed, and stop when the reader is far enough behind, at the end of
    /// the file, when the stream is invalidated, replaced or closed, or when
    /// the glock is no longer cached here. One stream's windows take at most
    /// an eighth of the cache budget.
    fn start_readahead(&self, inode: &Arc<Inode>, fh: u64, id: u64, from: u64) {
        let window = READAHEAD_MAX.min(self.budget.limit() / (8 * Readahead::DEPTH as u64)).max(self.bs as u64);
        let reach = window * Readahead::DEPTH as u64;
        {
            let mut set = inode.ra.lock().unwrap_or_else(|p| p.into_inner());
            let Some(ra) = set.get(fh, id) else { return };
            if ra.running >= Readahead::THREADS {
                return;
            }
            let ahead = ra.ahead_end().unwrap_or(from).max(from);
            // a running thread takes a free window itself; another one is
            // only worth starting when two are free
            let room = if ra.running > 0 { window * 2 } else { window / 2 };
            if ahead + room > from + reach {
                return;
            }
            ra.running += 1;
        }
        // a thread leaves: counted off its stream, if that is still the same
        let stopped = move |inode: &Inode| {
            if let Some(ra) = inode.ra.lock().unwrap_or_else(|p| p.into_inner()).get(fh, id) {
                ra.running = ra.running.saturating_sub(1);
            }
            inode.ra_cv.notify_all();
        };
        let Some(fs) = self.arc() else {
            stopped(inode);
            return;
        };
        let me = inode.clone();
        let spawned = std::thread::Builder::new().name("readahead".into()).spawn(move || {
            let inode = me;
            loop {
                // what to read next, if anything
                let at = {
                    let mut set = inode.ra.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(ra) = set.get(fh, id) else {
                        // invalidated, replaced or closed: not ours any more
                        return;
                    };
                    let at = ra.ahead_end().unwrap_or(ra.next).max(ra.next);
                    // windows start on a block: read straight into aligned memory
                    let at = at - at % fs.bs as u64;
                    if at >= ra.next + reach {
                        drop(set);
                        stopped(&inode);
                        return;
                    }
                    ra.inflight.push((at, window));
                    at
                };
                // The window is charged before it is read (memory in flight
                // is memory held), and before `ra` is taken again: the charge
                // may reclaim, and reclaim drops this inode's read-ahead
                // (taking `ra`).
                let charge = fs.budget.charge(window);
                // only while the glock is cached here: never a lock request
                let data = fs.glocks.try_acquire(LockName::Inode(inode.ino), Mode::PR).ok().and_then(|h| {
                    let r = fs.dinode(inode.ino).ok().and_then(|(_, d)| {
                        if at >= d.size || d.is_inline() {
                            return None;
                        }
                        let reuse = fs.ra_bufs.take(window as usize);
                        let (mut buf, s, len) = fs.read_blocks_into(&d, at, window as u32, reuse).ok()?;
                        buf.truncate(s + len);
                        Some(buf)
                    });
                    drop(h);
                    r
                });
                let data = data.filter(|v| !v.is_empty()).map(|v| (v, charge));
                let mut set = inode.ra.lock().unwrap_or_else(|p| p.into_inner());
                let Some(ra) = set.get(fh, id) else {
                    // invalidated meanwhile: what was read may be stale
                    return;
                };
                let go_on = match data {
                    Some((v, charge)) => {
                        fs.stats.readahead_windows.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let full = v.len() as u64 == window;
                        ra.land(at, Arc::new(v), Some(charge));
                        full
                    }
                    None => {
                        ra.unclaim(at);
                        false
                    }
                };
                drop(set);
                if !go_on {
                    stopped(&inode);
                    return;
                }
                inode.ra_cv.notify_all();
            }
        });
        if spawned.is_err() {
            stopped(inode);
        }
    }

    /// A consumed read-ahead window: its charge goes first (a spare is
    /// charged again by the pool, so it is never counted twice), then the
    /// buffer is kept for the next window if nobody else still holds it and
    /// the spare list is short.
    fn recycle_window(&self, data: Arc<mcfs_blockdev::AlignedBuf>, charge: Option<Charge>) {
        drop(charge);
        if let Ok(b) = Arc::try_unwrap(data) {
            self.ra_bufs.put(b);
        }
    }

    /// Small files: read through the per-inode data cache (charged to the
    /// budget, dropped on demote or under reclaim).
    fn read_cached(&self, inode: &Arc<Inode>, d: &Dinode, off: u64, size: u32) -> Result<Vec<u8>> {
        if off >= d.size {
            return Ok(Vec::new());
        }
        let end = (off + size as u64).min(d.size);
        let bs = self.bs as u64;
        let mut out = Vec::with_capacity((end - off) as usize);
        let mut pos = off;
        while pos < end {
            let lblk = pos / bs;
            let block = match inode.cached_block(lblk) {
                Some(b) => b,
                None => {
                    let v = self.read_data(d, lblk * bs, bs as u32)?;
                    let mut v = v;
                    v.resize(bs as usize, 0);
                    let a = Arc::new(v);
                    let c = self.budget.charge(bs + 64);
                    inode.cache_block(lblk, a.clone(), c);
                    a
                }
            };
            let s = (pos - lblk * bs) as usize;
            let e = ((end - lblk * bs).min(bs)) as usize;
            out.extend_from_slice(&block[s..e]);
            pos = lblk * bs + e as u64;
        }
        Ok(out)
    }

    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<usize> {
        self.write_at(ino, Some(off), data)
    }

    /// O_APPEND: the offset is the size under the exclusive lock, so appends
    /// from several nodes never overwrite each other (the kernel's idea of the
    /// size may be stale).
    pub fn append(&self, ino: u64, data: &[u8]) -> Result<usize> {
        self.write_at(ino, None, data)
    }

    fn write_at(&self, ino: u64, off: Option<u64>, data: &[u8]) -> Result<usize> {
        self.op(|ms| {
            let inode = self.cached(ino)?;
            let _h = self.lock(ino, Mode::EX, ms)?;
            let (b, mut d) = self.dinode(ino)?;
            let off = off.unwrap_or(d.size);
            if d.is_dir() {
                return Err(FsError::IsDir);
            }
            if data.is_empty() {
                return Ok(0);
            }
            let bs = self.bs as u64;
            if off > d.size {
                self.zero_tail(&d, d.size)?;
                inode.drop_data_from(d.size / bs);
            }
            let mut done = 0usize;
            while done < data.len() {
                let o = off + done as u64;
                let rest = &data[done..];
                let end = o + rest.len() as u64;
                let inline_ok = d.is_inline() && end <= dinode::payload_size(self.geo.block_size) as u64;
                let need = if inline_ok {
                    0
                } else {
                    let first = o / bs;
                    let cnt = (end - 1) / bs - first + 1;
                    let holes = if d.is_inline() { cnt + 1 } else { self.bmap_range(&d, first, cnt)?.iter().filter(|p| p.is_none()).count() as u64 };
                    if holes == 0 {
                        0
                    } else {
                        self.alloc_estimate(&d, first, cnt)
                    }
                };
                let res = if need > 0 {
                    // at least what mapping one block may cost (new tree levels,
                    // indirect blocks), else bmap_alloc can spend the whole
                    // reservation on metadata and map nothing
                    let min = self.alloc_estimate(&d, o / bs, 1).min(need);
                    Some(match self.reserve(need, min, Some(if d.goal != 0 { d.goal } else { ino }), ms) {
                        Err(FsError::NoSpace) => {
                            self.flush_deferred_for_space(Duration::from_secs(2));
                            self.reserve(need, min, Some(ino), ms)?
                        }
                        r => r?,
                    })
                } else {
                    None
                };
                let n = {
                    let mut tx = self.log.begin()?;
                    let n = match self.write_data(&mut tx, res.as_ref(), &mut d, &b, o, rest) {
                        Ok(n) => n,
                        Err(FsError::NoSpace) if done > 0 => 0,
                        Err(e) => {
                            // nothing of this round happened; keep the dinode as it was
                            self.put_dinode(&mut tx, &b, &d);
                            return Err(e);
                        }
                    };
                    let t = now();
                    d.mtime = t;
                    d.ctime = t;
                    if n > 0 && d.mode & 0o6000 != 0 {
                        d.mode &= !0o6000; // writes clear setuid/setgid
                    }
                    self.put_dinode(&mut tx, &b, &d);
                    n
                };
                if n == 0 {
                    break;
                }
                done += n;
            }
            // cached copies of the written range are stale, read-ahead
            // windows too (before, only the small-file block cache was
            // checked: a sequential reader of a large file read back what it
            // had read ahead before this node's own write)
            inode.written(off, off + done as u64, bs);
            if done == 0 {
                return Err(FsError::NoSpace);
            }
            Ok(done)
        })
    }

    pub fn fsync(&self, _ino: u64) -> Result<()> {
        self.op(|_| self.log.fsync())
    }

    /// All entries of a directory (a snapshot; offsets index into it).
    pub fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        self.op(|ms| {
            self.cached(ino)?;
            let _h = self.lock(ino, Mode::PR, ms)?;
            let (_, d) = self.dinode(ino)?;
            if !d.is_dir() {
                return Err(FsError::NotDir);
            }
            let mut v = vec![
                DirEntry { ino, dtype: dir::DT_DIR, name: b".".to_vec() },
                DirEntry { ino: if d.parent != 0 { d.parent } else { ino }, dtype: dir::DT_DIR, name: b"..".to_vec() },
            ];
            v.extend(self.dir_list(&d)?.into_iter().map(|e| DirEntry { ino: e.ino, dtype: e.dtype, name: e.name }));
            Ok(v)
        })
    }

    pub fn statfs_op(&self) -> Result<StatFs> {
        self.op(|ms| self.statfs(ms))
    }

    /// Flush the log and the device (syncfs).
    pub fn sync_all(&self) -> Result<()> {
        self.op(|_| self.log.fsync())
    }
}
