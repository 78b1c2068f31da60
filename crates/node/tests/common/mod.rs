//! Helpers shared by the model and crash-consistency tests: mounting without a
//! lock server and without background flushing (so that what reaches the
//! device depends only on the operations), walking a mounted tree the way the
//! kernel would (lookup, use, forget), and running fsck.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mcfs_blockdev::{BlockDevice, MemDevice};
use mcfs_format::dinode::{S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use mcfs_format::dir;
use mcfs_node::glock::NoLock;
use mcfs_node::{Fs, FsError, MountOptions};

pub const BS: u64 = 4096;

/// Mount options for tests: the background log flush every 5 s (rarely
/// during a test's few milliseconds of operations; the flusher thread of an
/// unmounted filesystem only exits when it wakes, so a long period piles up
/// sleeping threads over thousands of mounts), a short drain at unmount.
///
/// MCFS_TEST_CACHE_MB sets the memory budget (default: the daemon's 256 MiB);
/// a small one makes reclaim evict inodes and drop cached blocks between and
/// during operations. MCFS_TEST_FLUSH_MS sets the flusher's period (a short
/// one races the operations). Both make runs timing dependent; the crash test
/// stays sound with them (each operation's flush counts are taken before and
/// after it), it just sees other flush points.
pub fn opts() -> MountOptions {
    opts_flushing_every(Duration::from_secs(5))
}

/// As [`opts`], with no background flush in practice (an hour): the flush
/// points of a recorded run then depend only on its operations. One mount per
/// recorded run, so its sleeping flusher thread does not matter.
pub fn opts_no_flusher() -> MountOptions {
    opts_flushing_every(Duration::from_secs(3600))
}

fn opts_flushing_every(every: Duration) -> MountOptions {
    let mut o = MountOptions { flush_interval: every, drain_timeout: Duration::from_secs(10), ..Default::default() };
    if let Some(mb) = std::env::var("MCFS_TEST_CACHE_MB").ok().and_then(|v| v.parse::<u64>().ok()) {
        o.cache_mem = mb << 20;
    }
    if let Some(ms) = std::env::var("MCFS_TEST_FLUSH_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
        o.flush_interval = Duration::from_millis(ms);
    }
    o
}

pub fn mount(dev: Arc<dyn BlockDevice>) -> Result<Arc<Fs>, FsError> {
    mount_with(dev, opts())
}

pub fn mount_with(dev: Arc<dyn BlockDevice>, o: MountOptions) -> Result<Arc<Fs>, FsError> {
    let fs = Fs::mount(dev, Arc::new(NoLock::default()), o)?;
    fs.instantiate_root()?;
    Ok(fs)
}

/// A freshly formatted in-memory image (1 journal of 8 MiB, 16 MiB rgrps).
pub fn formatted(size: u64) -> Vec<u8> {
    let dev = MemDevice::new(size, 512);
    mcfs_node::testutil::format(&dev, 1);
    dev.into_vec()
}

/// A freshly formatted image with one journal and the given journal and rgrp
/// sizes (small ones make the log wrap and allocations span rgrps).
pub fn formatted_with(size: u64, journal_bytes: u64, rgrp_bytes: u64) -> Vec<u8> {
    use mcfs_format::geometry::MkfsOptions;
    use mcfs_format::sb::LockProto;
    use mcfs_node::mkfs::{mkfs, MkfsParams};
    let dev = MemDevice::new(size, 512);
    let p = MkfsParams {
        opts: MkfsOptions { block_size: 4096, journals: 1, journal_bytes, rgrp_bytes: Some(rgrp_bytes) },
        lock_proto: LockProto::NoLock,
        cluster: "test".into(),
        fsname: "fs".into(),
        uuid: None,
    };
    mkfs(&dev, &p, &mut |_, _| {}).expect("mkfs");
    dev.into_vec()
}

/// Bytes that look random (xorshift), so misplaced data shows.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    if x == 0 {
        x = 1;
    }
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Lookups the adapter took; forgets them when dropped (the kernel dropping
/// its dentries).
pub struct Lookups<'a> {
    pub fs: &'a Fs,
    pub inos: Vec<u64>,
}

impl<'a> Lookups<'a> {
    pub fn new(fs: &'a Fs) -> Self {
        Lookups { fs, inos: Vec::new() }
    }
}

impl Drop for Lookups<'_> {
    fn drop(&mut self) {
        for ino in self.inos.drain(..).rev() {
            self.fs.forget(ino, 1);
        }
    }
}

/// What one name leads to, as the mounted filesystem shows it.
#[derive(Debug, Clone)]
pub struct Obj {
    pub ino: u64,
    pub mode: u32,
    pub nlink: u32,
    pub size: u64,
    /// Regular files: the whole content.
    pub data: Option<Vec<u8>>,
    /// Symlinks: the target.
    pub target: Option<Vec<u8>>,
}

pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return name.to_vec();
    }
    let mut p = parent.to_vec();
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

pub fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Walk the tree below directory `dir` (already looked up by the caller; its
/// parent is `parent`): every entry is looked up, checked against readdir
/// (inode, type), read whole, and forgotten. Checks directory link counts and
/// `.`/`..` on the way. Paths are relative to `dir`, joined with '/'.
pub fn walk(fs: &Fs, dir: u64, parent: u64) -> Result<BTreeMap<Vec<u8>, Obj>, String> {
    let mut out = BTreeMap::new();
    walk_in(fs, dir, parent, &[], &mut out)?;
    Ok(out)
}

fn walk_in(fs: &Fs, dir: u64, parent: u64, prefix: &[u8], out: &mut BTreeMap<Vec<u8>, Obj>) -> Result<u32, String> {
    let list = fs.readdir(dir).map_err(|e| format!("readdir of '{}' (ino {dir}): {e}", show(prefix)))?;
    let mut subdirs = 0u32;
    let mut seen = std::collections::BTreeSet::new();
    for e in list {
        if e.name == b"." {
            if e.ino != dir {
                return Err(format!("'{}/.' is inode {} instead of {dir}", show(prefix), e.ino));
            }
            continue;
        }
        if e.name == b".." {
            if e.ino != parent {
                return Err(format!("'{}/..' is inode {} instead of {parent}", show(prefix), e.ino));
            }
            continue;
        }
        if !seen.insert(e.name.clone()) {
            return Err(format!("'{}' listed twice", show(&join(prefix, &e.name))));
        }
        let path = join(prefix, &e.name);
        let a = fs.lookup(dir, &e.name).map_err(|err| format!("lookup of listed entry '{}': {err}", show(&path)))?;
        let _l = Lookups { fs, inos: vec![a.ino] };
        if a.ino != e.ino {
            return Err(format!("'{}': readdir says inode {}, lookup {}", show(&path), e.ino, a.ino));
        }
        if e.dtype != dir::dtype_of_mode(a.mode) {
            return Err(format!("'{}': readdir type {} but mode {:o}", show(&path), e.dtype, a.mode));
        }
        let mut o = Obj { ino: a.ino, mode: a.mode, nlink: a.nlink, size: a.size, data: None, target: None };
        match a.mode & S_IFMT {
            S_IFDIR => {
                subdirs += 1;
                let below = walk_in(fs, a.ino, dir, &path, out)?;
                if a.nlink != 2 + below {
                    return Err(format!("directory '{}' has nlink {} but {below} subdirectories", show(&path), a.nlink));
                }
            }
            S_IFREG => {
                let d = fs.read(a.ino, 0, u32::try_from(a.size).map_err(|_| "file too big to read".to_string())?).map_err(|err| format!("read of '{}': {err}", show(&path)))?;
                if d.len() as u64 != a.size {
                    return Err(format!("'{}': size {} but read returned {} bytes", show(&path), a.size, d.len()));
                }
                o.data = Some(d);
            }
            S_IFLNK => {
                let t = fs.readlink(a.ino).map_err(|err| format!("readlink of '{}': {err}", show(&path)))?;
                if t.len() as u64 != a.size {
                    return Err(format!("symlink '{}': size {} but target of {} bytes", show(&path), a.size, t.len()));
                }
                o.target = Some(t);
            }
            _ => {}
        }
        out.insert(path, o);
    }
    Ok(subdirs)
}

/// Inodes named more than once must agree on their link count: count names per
/// inode and compare with nlink (non-directories).
pub fn check_link_counts(tree: &BTreeMap<Vec<u8>, Obj>) -> Result<(), String> {
    let mut names: BTreeMap<u64, (u32, u32, Vec<u8>)> = BTreeMap::new();
    for (p, o) in tree {
        if o.mode & S_IFMT == S_IFDIR {
            continue;
        }
        let e = names.entry(o.ino).or_insert((0, o.nlink, p.clone()));
        e.0 += 1;
        if e.1 != o.nlink {
            return Err(format!("inode {} shows nlink {} at '{}' and {} at '{}'", o.ino, e.1, show(&e.2), o.nlink, show(p)));
        }
    }
    for (ino, (n, nlink, p)) in names {
        if n != nlink {
            return Err(format!("inode {ino} ('{}') has nlink {nlink} but {n} names", show(&p)));
        }
    }
    Ok(())
}

/// Run fsck read-only; Ok if clean, else the findings. `allow` lists finding
/// kinds that are expected (e.g. unlinked inodes after a crash).
pub fn fsck(dev: &dyn BlockDevice, allow: &[mcfs_fsck::Kind]) -> Result<mcfs_fsck::Report, String> {
    let r = mcfs_fsck::check(dev, &mcfs_fsck::Options { repair: false, progress: None });
    let bad: Vec<&mcfs_fsck::Finding> = r.findings.iter().filter(|f| !allow.contains(&f.kind)).collect();
    if r.operational_error.is_some() || !bad.is_empty() {
        let mut s = format!("fsck: exit {} operational error {:?}\n", r.exit_code(), r.operational_error);
        for f in bad {
            s.push_str(&format!("  {:?} ino {:?} block {:?}: {}\n", f.kind, f.ino, f.block, f.message));
        }
        return Err(s);
    }
    Ok(r)
}

/// Finish deallocations a crash left behind (the orphan scan runs every 30 s
/// in the deallocator; tests run it now).
pub fn reap_orphans(fs: &Fs) -> Result<(), String> {
    fs.orphan_scan().map_err(|e| format!("orphan scan: {e}"))?;
    let t0 = std::time::Instant::now();
    while !fs.icache.deferred_list().is_empty() {
        fs.run_deferred(None, false);
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!("deferred deallocations do not finish: {:?}", fs.icache.deferred_list()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

pub fn type_name(mode: u32) -> &'static str {
    match mode & S_IFMT {
        S_IFDIR => "dir",
        S_IFREG => "file",
        S_IFLNK => "symlink",
        _ => "other",
    }
}

pub fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The name of an errno, for failure messages.
pub fn errname(e: i32) -> &'static str {
    match e {
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EINVAL => "EINVAL",
        libc::EPERM => "EPERM",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::EFBIG => "EFBIG",
        libc::ESTALE => "ESTALE",
        _ => "?",
    }
}

pub fn errnames(v: &[i32]) -> String {
    v.iter().map(|e| errname(*e)).collect::<Vec<_>>().join("|")
}
