//! The FUSE adapter: the only module that knows fuser. Each callback converts
//! arguments, calls one operation of [`Fs`], and replies; no filesystem logic
//! lives here (mountpoint-s3's fuse.rs is the model).
//!
//! Coherence with the kernel (docs/SEMANTICS.md, "Kernel caches"): file data
//! is never cached (FOPEN_DIRECT_IO). Names and attributes are, for as long as
//! this node holds the glock that covers them: giving the glock up invalidates
//! the kernel's copies first (`Fs::invalidate`, through [`KernelNotify`]). Where
//! the kernel cannot be told in time, the TTL is zero ([`Ttls`]).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use mcfs_format::dinode::{Timespec, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFSOCK};
use mcfs_format::dir;

use crate::error::FsError;
use crate::fs::Fs;
use crate::icache::KernelNotify;
use crate::inode::Attr;
use crate::ops::{Caller, DirEntry, SetAttr};

const ROOT: u64 = 1;

/// How long the kernel may keep a cached name or attribute. Long on purpose:
/// what ends a cached copy is the invalidation sent when this node gives up
/// the glock, not the clock.
const CACHE_TTL: Duration = Duration::from_secs(3600);
/// The FUSE protocol minor version with FUSE_NOTIFY_INC_EPOCH (Linux 6.16).
const EPOCH_MINOR: u32 = 44;
const FUSE_NOTIFY_INC_EPOCH: i32 = 8;

/// The TTLs replies carry (zero: the kernel asks again next time).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ttls {
    /// Names: lookup, create, mkdir, mknod, symlink and link replies.
    pub entry: Duration,
    /// Attributes in those same replies. They may set up a new kernel inode,
    /// and an invalidation sent before the kernel has it is lost, so a cluster
    /// mount cannot let the kernel keep them.
    pub entry_attr: Duration,
    /// Attributes in getattr replies: the kernel drops a reply that an
    /// invalidation overtook (it compares attribute versions).
    pub attr: Duration,
    /// Attributes in setattr replies (the kernel installs them unchecked).
    pub setattr: Duration,
}

impl Ttls {
    /// `cache`: the mount allows kernel caching (`-o nokernelcache` does not);
    /// `nolock`: no other node can change anything; `names`: a cluster mount
    /// asked for names to be cached (`-o namecache`) and the kernel can be
    /// told to look all names up again without taking directory locks.
    pub fn choose(cache: bool, nolock: bool, names: bool) -> Ttls {
        let z = Duration::ZERO;
        match (cache, nolock) {
            (false, _) => Ttls::default(),
            (true, true) => Ttls { entry: CACHE_TTL, entry_attr: CACHE_TTL, attr: CACHE_TTL, setattr: CACHE_TTL },
            (true, false) => Ttls { entry: if names { CACHE_TTL } else { z }, entry_attr: z, attr: CACHE_TTL, setattr: z },
        }
    }
}

pub struct McfsFuse {
    fs: Arc<Fs>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
    notifier: Arc<OnceLock<Notifier>>,
    kernel_cache: bool,
    name_cache: bool,
    ttls: Ttls,
    /// Our own descriptor of the FUSE connection, for the notification fuser
    /// has no call for (FUSE_NOTIFY_INC_EPOCH). Closed at unmount.
    epoch_fd: Arc<Mutex<Option<OwnedFd>>>,
}

/// Tells the kernel to drop entries (used when another node wants to delete an
/// inode this node's kernel still references) and cached names and attributes
/// (when a glock goes).
struct Notify {
    n: Arc<OnceLock<Notifier>>,
    root: u64,
    epoch_fd: Arc<Mutex<Option<OwnedFd>>>,
}

impl KernelNotify for Notify {
    fn forget_entry(&self, parent: u64, ino: u64, name: &[u8]) {
        if let Some(n) = self.n.get() {
            let _ = n.delete(fuse_ino_of(parent, self.root), INodeNo(ino), OsStr::from_bytes(name));
        }
    }
    fn inval_attr(&self, ino: u64) {
        if let Some(n) = self.n.get() {
            // offset -1: attributes only (no page cache: data is direct I/O)
            let _ = n.inval_inode(fuse_ino_of(ino, self.root), -1, 0);
        }
    }
    // the FUSE protocol is in the host's byte order
    #[allow(clippy::host_endian_bytes)]
    fn inval_all_names(&self) {
        let fd = self.epoch_fd.lock().unwrap_or_else(|p| p.into_inner());
        let Some(fd) = fd.as_ref() else { return };
        // struct fuse_out_header { len: u32, error: i32 (the notify code), unique: u64 (0) }
        let mut m = [0u8; 16];
        m[0..4].copy_from_slice(&16u32.to_ne_bytes());
        m[4..8].copy_from_slice(&FUSE_NOTIFY_INC_EPOCH.to_ne_bytes());
        // SAFETY: writes 16 bytes from a live buffer to a descriptor we own.
        let r = unsafe { libc::write(fd.as_raw_fd(), m.as_ptr().cast(), m.len()) };
        if r != m.len() as isize {
            let e = std::io::Error::last_os_error();
            // ENOENT/ENODEV: unmounted, nothing left to invalidate
            if !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) {
                tracing::error!("FUSE_NOTIFY_INC_EPOCH failed: {e}: the kernel may serve names another node changed");
            }
        }
    }
    fn inval_entry(&self, parent: u64, name: &[u8]) {
        if let Some(n) = self.n.get() {
            let _ = n.inval_entry(fuse_ino_of(parent, self.root), OsStr::from_bytes(name));
        }
    }
}

impl McfsFuse {
    /// `kernel_cache`: let the kernel cache names and attributes;
    /// `name_cache`: names too on a cluster mount (see [`Ttls`]).
    pub fn new(fs: Arc<Fs>, kernel_cache: bool, name_cache: bool) -> McfsFuse {
        let notifier = Arc::new(OnceLock::new());
        let epoch_fd = Arc::new(Mutex::new(None));
        fs.icache.set_kernel(Arc::new(Notify { n: notifier.clone(), root: fs.root_ino(), epoch_fd: epoch_fd.clone() }));
        McfsFuse { fs, dirs: Mutex::new(HashMap::new()), next_fh: AtomicU64::new(1), notifier, kernel_cache, name_cache, ttls: Ttls::default(), epoch_fd }
    }

    /// Before an operation whose reply gives names in `parent` a TTL.
    fn names_in(&self, parent: INodeNo) {
        if !self.ttls.entry.is_zero() {
            self.fs.kernel_caches_names(self.ino(parent));
        }
    }

    fn ino(&self, i: INodeNo) -> u64 {
        if i.0 == ROOT {
            self.fs.root_ino()
        } else {
            i.0
        }
    }

    fn fuse_ino(&self, ino: u64) -> INodeNo {
        fuse_ino_of(ino, self.fs.root_ino())
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: self.fuse_ino(a.ino),
            size: a.size,
            blocks: a.blocks,
            atime: systime(a.atime),
            mtime: systime(a.mtime),
            ctime: systime(a.ctime),
            crtime: systime(a.ctime),
            kind: kind_of(a.mode),
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: a.blksize,
            flags: 0,
        }
    }

    fn entry(&self, r: Result<Attr, FsError>, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry_with_ttls(&self.ttls.entry_attr, &self.ttls.entry, &self.attr(&a), Generation(a.generation)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// A fresh handle for an open file or directory (each open file's
    /// read-ahead and each directory listing is kept under its own).
    fn new_handle(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Run the session until unmounted. Blocks.
    pub fn run(self, mountpoint: &Path, config: &fuser::Config) -> std::io::Result<()> {
        let notifier = self.notifier.clone();
        let epoch_fd = self.epoch_fd.clone();
        let session = fuser::Session::new(self, mountpoint, config)?;
        let _ = notifier.set(session.notifier());
        let r = session.run();
        epoch_fd.lock().unwrap_or_else(|p| p.into_inner()).take();
        r
    }
}

/// A descriptor of our FUSE connection: the only /dev/fuse this process has
/// open during the INIT handshake (fuser opens the per-thread clones later).
fn dup_dev_fuse() -> Option<OwnedFd> {
    for e in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/fuse")) {
            let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            // SAFETY: `fd` is open in this process (listed just now); the
            // duplicate is a new descriptor that we own.
            let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if d >= 0 {
                // SAFETY: `d` was just returned by fcntl and nothing else owns it.
                return Some(unsafe { OwnedFd::from_raw_fd(d) });
            }
        }
    }
    None
}

/// The kernel's number for inode `ino`: the root is always FUSE_ROOT_ID.
fn fuse_ino_of(ino: u64, root: u64) -> INodeNo {
    INodeNo(if ino == root { ROOT } else { ino })
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn systime(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::new(t.sec.unsigned_abs(), 0) + Duration::new(0, t.nsec)
    }
}

fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec { sec: d.as_secs() as i64, nsec: d.subsec_nanos() },
        Err(e) => Timespec { sec: -(e.duration().as_secs() as i64), nsec: 0 },
    }
}

fn time_or_now(t: TimeOrNow) -> Timespec {
    match t {
        TimeOrNow::SpecificTime(s) => timespec(s),
        TimeOrNow::Now => crate::inode::now(),
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & S_IFMT {
        S_IFDIR => FileType::Directory,
        S_IFLNK => FileType::Symlink,
        S_IFCHR => FileType::CharDevice,
        S_IFBLK => FileType::BlockDevice,
        S_IFIFO => FileType::NamedPipe,
        S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn kind_of_dtype(t: u8) -> FileType {
    match t {
        dir::DT_DIR => FileType::Directory,
        dir::DT_LNK => FileType::Symlink,
        dir::DT_CHR => FileType::CharDevice,
        dir::DT_BLK => FileType::BlockDevice,
        dir::DT_FIFO => FileType::NamedPipe,
        dir::DT_SOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid() }
}

impl Filesystem for McfsFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let nolock = self.fs.glocks.is_nolock();
        let mut fd = self.epoch_fd.lock().unwrap_or_else(|p| p.into_inner());
        if config.kernel_abi().1 >= EPOCH_MINOR {
            *fd = dup_dev_fuse();
        }
        let epoch = fd.is_some();
        drop(fd);
        if self.name_cache && !nolock && !epoch {
            tracing::warn!(kernel_abi = ?config.kernel_abi(), "namecache needs FUSE_NOTIFY_INC_EPOCH (Linux 6.16, FUSE 7.44): names are not cached");
        }
        self.ttls = Ttls::choose(self.kernel_cache, nolock, self.name_cache && epoch);
        tracing::info!(kernel_abi = ?config.kernel_abi(), ttls = ?self.ttls, "kernel caches");
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.unmount() {
            tracing::error!("unmount: {e}");
        }
        self.epoch_fd.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.names_in(parent);
        self.entry(self.fs.lookup(self.ino(parent), name.as_bytes()), reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(self.ino(ino), nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(self.ino(ino)) {
            Ok(a) => reply.attr(&self.ttls.attr, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let a = SetAttr { mode, uid, gid, size, atime: atime.map(time_or_now), mtime: mtime.map(time_or_now) };
        match self.fs.setattr(self.ino(ino), &a, caller(req)) {
            Ok(a) => reply.attr(&self.ttls.setattr, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(self.ino(ino)) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        self.names_in(parent);
        self.entry(self.fs.mknod(self.ino(parent), name.as_bytes(), mode & !umask, rdev, caller(req)), reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.names_in(parent);
        self.entry(self.fs.mkdir(self.ino(parent), name.as_bytes(), mode & !umask, caller(req)), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.unlink(self.ino(parent), name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.rmdir(self.ino(parent), name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.names_in(parent);
        self.entry(self.fs.symlink(self.ino(parent), link_name.as_bytes(), target.as_os_str().as_bytes(), caller(req)), reply);
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        let mut f = 0;
        if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            f |= crate::ops::RENAME_NOREPLACE;
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            f |= crate::ops::RENAME_EXCHANGE;
        }
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::from_i32(libc::EINVAL));
            return;
        }
        match self.fs.rename(self.ino(parent), name.as_bytes(), self.ino(newparent), newname.as_bytes(), f) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.names_in(newparent);
        self.entry(self.fs.link(self.ino(ino), self.ino(newparent), newname.as_bytes()), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.open(self.ino(ino)) {
            // a handle per open: each has its own read-ahead
            Ok(_) => reply.opened(FileHandle(self.new_handle()), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyData) {
        // the reply copies straight from the read-ahead window or device buffer
        let mut reply = Some(reply);
        let r = self.fs.read_handle_with(self.ino(ino), fh.0, offset, size, |d| {
            if let Some(rp) = reply.take() {
                rp.data(d);
            }
        });
        if let (Err(e), Some(rp)) = (r, reply.take()) {
            rp.error(errno(&e));
        }
    }

    fn write(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, data: &[u8], _wf: WriteFlags, flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyWrite) {
        let r = if flags.0 & libc::O_APPEND != 0 { self.fs.append(self.ino(ino), data) } else { self.fs.write(self.ino(ino), offset, data) };
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        // Nothing to do at close (data goes straight through, POSIX locks are
        // the kernel's): ENOSYS makes the kernel stop sending FLUSH at all,
        // which saves a round trip per close(2). fsync and release remain.
        reply.error(Errno::ENOSYS);
    }

    fn release(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, _lock: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        self.fs.release_handle(self.ino(ino), fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.fs.fsync(self.ino(ino)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.readdir(self.ino(ino)) {
            Ok(v) => {
                let fh = self.new_handle();
                self.dirs.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, Arc::new(v));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        // offset 0 after entries were read means rewinddir: take a new snapshot
        let snap = {
            let mut m = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
            match m.get(&fh.0) {
                Some(v) if offset != 0 => Some(v.clone()),
                _ => {
                    drop(m);
                    match self.fs.readdir(self.ino(ino)) {
                        Ok(v) => {
                            let a = Arc::new(v);
                            m = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
                            m.insert(fh.0, a.clone());
                            Some(a)
                        }
                        Err(e) => {
                            reply.error(errno(&e));
                            return;
                        }
                    }
                }
            }
        };
        let Some(v) = snap else { return };
        for (i, e) in v.iter().enumerate().skip(offset as usize) {
            let full = reply.add(self.fuse_ino(e.ino), (i + 1) as u64, kind_of_dtype(e.dtype), OsStr::from_bytes(&e.name));
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.fs.fsync(self.ino(ino)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs_op() {
            Ok(s) => reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        self.names_in(parent);
        match self.fs.create_open(self.ino(parent), name.as_bytes(), mode & !umask, caller(req), flags & libc::O_EXCL != 0) {
            // fuser's created() takes one TTL for the name and the attributes
            Ok(a) => reply.created(&self.ttls.entry.min(self.ttls.entry_attr), &self.attr(&a), Generation(a.generation), FileHandle(self.new_handle()), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(errno(&e)),
        }
    }
}
