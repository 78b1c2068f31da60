//! Building test images with the node library, and poking at their blocks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use mcfs_blockdev::{BlockDevice, MemDevice};
use mcfs_format::dinode::Dinode;
use mcfs_format::dir;
use mcfs_format::sb::Superblock;
use mcfs_fsck::{check, Options, Report};
use mcfs_node::glock::NoLock;
use mcfs_node::ops::Caller;
use mcfs_node::{Fs, MountOptions};

pub const BS: usize = 4096;

/// Inode numbers of what [`populate`] made.
#[derive(Debug, Clone, Default)]
pub struct Made {
    pub root: u64,
    pub small: u64,
    pub medium: u64,
    pub big: u64,
    pub other_big: u64,
    pub sub: u64,
    pub deep: u64,
    pub hashed: u64,
    pub symlink: u64,
    pub long_symlink: u64,
    pub linked: u64,
    pub fifo: u64,
    pub hashed_names: Vec<(String, u64)>,
}

/// Mount with background flushing effectively off, so a snapshot of the device
/// is exactly what the operations so far left on it.
pub fn mount(dev: Arc<dyn BlockDevice>) -> Arc<Fs> {
    let opts = MountOptions { flush_interval: Duration::from_secs(3600), ..Default::default() };
    let fs = Fs::mount(dev, Arc::new(NoLock::default()), opts).expect("mount");
    fs.instantiate_root().expect("root");
    fs
}

pub fn write_all(fs: &Fs, ino: u64, data: &[u8]) {
    let mut off = 0;
    while off < data.len() {
        let n = fs.write(ino, off as u64, &data[off..(off + (256 << 10)).min(data.len())]).unwrap();
        off += n;
    }
}

/// A filesystem with one of everything: inline and block-mapped files, a file
/// with a two-level tree, nested directories, a hashed directory with split
/// leaves, short and long symlinks, a hard link, a fifo, renames and removals.
pub fn populate(fs: &Fs) -> Made {
    let c = Caller::ROOT;
    let root = fs.root_ino();
    let mut m = Made { root, ..Default::default() };
    m.small = fs.create(root, b"small.txt", 0o644, c).unwrap().ino;
    fs.write(m.small, 0, b"hello, fsck").unwrap();
    m.medium = fs.create(root, b"medium.bin", 0o644, c).unwrap().ino;
    write_all(fs, m.medium, &vec![0x5a; 5 * BS + 100]);
    m.big = fs.create(root, b"big.bin", 0o644, c).unwrap().ino;
    let big: Vec<u8> = (0..(700 * BS)).map(|i| (i % 251) as u8).collect();
    write_all(fs, m.big, &big);
    m.other_big = fs.create(root, b"other.bin", 0o644, c).unwrap().ino;
    write_all(fs, m.other_big, &vec![7u8; 40 * BS]);
    m.sub = fs.mkdir(root, b"sub", 0o755, c).unwrap().ino;
    m.deep = fs.mkdir(m.sub, b"deep", 0o755, c).unwrap().ino;
    let f = fs.create(m.deep, b"leaf.txt", 0o600, c).unwrap().ino;
    fs.write(f, 0, b"deep down").unwrap();
    m.hashed = fs.mkdir(root, b"many", 0o755, c).unwrap().ino;
    for i in 0..700 {
        let name = format!("entry-number-{i:05}");
        let a = fs.mknod(m.hashed, name.as_bytes(), 0o100644, 0, c).unwrap();
        m.hashed_names.push((name, a.ino));
    }
    m.symlink = fs.symlink(root, b"link", b"small.txt", c).unwrap().ino;
    let long = vec![b'x'; 5000];
    m.long_symlink = fs.symlink(m.sub, b"longlink", &long[..4096], c).unwrap().ino;
    m.linked = fs.create(m.sub, b"hard1", 0o644, c).unwrap().ino;
    fs.write(m.linked, 0, &vec![1u8; 3 * BS]).unwrap();
    fs.link(m.linked, root, b"hard2").unwrap();
    m.fifo = fs.mknod(root, b"fifo", 0o010644, 0, c).unwrap().ino;
    fs.rename(root, b"medium.bin", m.sub, b"medium-moved.bin", 0).unwrap();
    let gone = fs.create(root, b"gone", 0o644, c).unwrap().ino;
    fs.write(gone, 0, &vec![3u8; 9 * BS]).unwrap();
    fs.release(gone);
    fs.unlink(root, b"gone").unwrap();
    let d = fs.mkdir(root, b"emptied", 0o755, c).unwrap().ino;
    fs.create(d, b"x", 0o644, c).unwrap();
    fs.unlink(d, b"x").unwrap();
    for (i, (name, _)) in m.hashed_names.clone().iter().enumerate() {
        if i % 5 == 0 {
            fs.unlink(m.hashed, name.as_bytes()).unwrap();
        }
    }
    m.hashed_names = m.hashed_names.iter().enumerate().filter(|(i, _)| i % 5 != 0).map(|(_, x)| x.clone()).collect();
    m
}

/// A populated, cleanly unmounted in-memory filesystem.
pub fn populated(size: u64) -> (Arc<MemDevice>, Made) {
    let dev = mcfs_node::testutil::mem_fs(size, 2);
    let fs = mount(dev.clone());
    let m = populate(&fs);
    fs.unmount().unwrap();
    drop(fs);
    (dev, m)
}

/// A copy of the device as it is right now (a power cut at this instant).
pub fn snapshot(dev: &MemDevice) -> Arc<MemDevice> {
    Arc::new(MemDevice::from_vec(dev.to_vec(), dev.sector_size()))
}

pub fn run(dev: &dyn BlockDevice, repair: bool) -> Report {
    check(dev, &Options { repair, progress: None })
}

pub fn sb(dev: &dyn BlockDevice) -> Superblock {
    mcfs_node::fs::read_superblock(dev).unwrap()
}

pub fn block(dev: &dyn BlockDevice, b: u64) -> Vec<u8> {
    let mut v = vec![0u8; BS];
    dev.read_at(b * BS as u64, &mut v).unwrap();
    v
}

pub fn put(dev: &dyn BlockDevice, b: u64, data: &[u8]) {
    dev.write_at(b * BS as u64, data).unwrap();
}

pub fn dinode(dev: &dyn BlockDevice, ino: u64) -> Dinode {
    let s = sb(dev);
    Dinode::decode(&block(dev, ino), ino, s.fsid()).unwrap()
}

pub fn put_dinode(dev: &dyn BlockDevice, d: &Dinode) {
    let s = sb(dev);
    put(dev, d.ino, &d.encode(BS as u32, s.fsid()));
}

/// The leaves of a hashed directory (from its first hash block).
pub fn leaves(dev: &dyn BlockDevice, dir_ino: u64) -> Vec<u64> {
    let s = sb(dev);
    let d = dinode(dev, dir_ino);
    assert!(d.is_hashed_dir(), "directory {dir_ino} is not hashed");
    let hb = d.ptr(0);
    let ptrs = dir::decode_hash_block(&block(dev, hb), hb, dir_ino, 0, s.fsid()).unwrap();
    let mut v: Vec<u64> = ptrs.into_iter().filter(|p| *p != 0).collect();
    v.dedup();
    v.sort_unstable();
    v.dedup();
    v
}

/// Print a report's findings (for a failing assertion's context).
pub fn show(r: &Report) -> String {
    let mut s = format!("exit {} op {:?}\n", r.exit_code(), r.operational_error);
    for f in &r.findings {
        s.push_str(&format!("  {:?} fixed={} {}\n", f.kind, f.fixed, f.message));
    }
    s
}

/// The contract for a repair: -n finds it (exit 4) and writes nothing, -y
/// fixes it (exit 1), a second -y finds nothing (exit 0), and the node mounts
/// the result. Returns the -y report.
pub fn assert_repairs(dev: &Arc<MemDevice>, kind: mcfs_fsck::Kind) -> Report {
    assert_repairs_then(dev, kind, |_| {})
}

/// As [`assert_repairs`], calling `inspect` on the repaired device before the
/// node mounts and changes it.
pub fn assert_repairs_then(dev: &Arc<MemDevice>, kind: mcfs_fsck::Kind, inspect: impl FnOnce(&Report)) -> Report {
    let before = dev.to_vec();
    let r = run(dev.as_ref(), false);
    assert_eq!(r.exit_code() & 4, 4, "-n must report errors left uncorrected:\n{}", show(&r));
    assert!(r.of(kind).next().is_some(), "-n must report a {kind:?} finding:\n{}", show(&r));
    assert!(dev.to_vec() == before, "-n must not write");
    let y = run(dev.as_ref(), true);
    assert!(y.of(kind).next().is_some(), "-y must report a {kind:?} finding:\n{}", show(&y));
    assert_eq!(y.exit_code(), 1, "-y must fix everything it found:\n{}", show(&y));
    let again = run(dev.as_ref(), true);
    assert_eq!(again.exit_code(), 0, "a second -y must find nothing:\n{}", show(&again));
    inspect(&y);
    // the node accepts the repaired filesystem and can use it
    let fs = mount(dev.clone());
    let root = fs.root_ino();
    fs.readdir(root).unwrap();
    let t = fs.create(root, b"after-repair", 0o644, Caller::ROOT).unwrap();
    fs.write(t.ino, 0, &vec![9u8; 3 * BS]).unwrap();
    fs.unmount().unwrap();
    drop(fs);
    let last = run(dev.as_ref(), false);
    assert_eq!(last.exit_code(), 0, "the node's writes after repair must check clean:\n{}", show(&last));
    y
}
