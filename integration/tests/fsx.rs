//! fsx, the file-system exerciser, rewritten for mcfs: random reads, writes,
//! appends, truncates (down and up), fsyncs and close/reopen on one file, each
//! checked against an in-memory shadow copy; the size is checked after every
//! operation and the whole file every few operations. No miscompare allowed.
//!
//! Why our own: no Debian package ships fsx (xfstests and LTP, where fsx.c
//! lives, are not packaged for Debian 12), and the project builds nothing from
//! fetched sources. What this one leaves out of fsx.c: mmap reads and writes
//! (mcfs opens every file FOPEN_DIRECT_IO, so the kernel does not offer shared
//! mmap of its files), fallocate, punch hole, zero/collapse/insert range, and
//! copy/clone/dedupe range (mcfs implements none of them: FUSE answers
//! EOPNOTSUPP). What it adds: offsets biased to mcfs's boundaries — the inline
//! payload of a 4 KiB dinode (3960 bytes), block edges, the 1 MiB limit of the
//! per-inode data cache and the first indirect level (495 pointers = 1.9 MiB) —
//! and a second mount: in the two-node run each operation goes through node
//! 1's or node 2's mount of the same file, at random, so every switch moves the
//! inode glock across the cluster.
//!
//! `MCFS_FSX_OPS=N` runs N operations in each test (defaults below);
//! `MCFS_FSX_SEED=S` changes the seed (printed on failure with the last
//! operations and the one that last wrote the bad bytes, to reproduce).

// Test helpers fail the test on any unexpected error: that is their job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use mcfs_integration::TestCluster;
use mcfs_integration::rng::{env_u64, Rng};

const SINGLE_NODE_OPS: u64 = 20_000;
const TWO_NODE_OPS: u64 = 3000;
/// Largest file offset an operation reaches: past the data cache (1 MiB) and
/// the first indirect level (495 blocks of 4 KiB).
const MAX_LEN: u64 = 3 << 20;
/// Largest ordinary read or write; one in twenty goes up to 1 MiB.
const MAX_OP: u64 = 128 << 10;
const BIG_OP: u64 = 1 << 20;
/// The inline payload of a 4 KiB dinode.
const INLINE: u64 = 3960;
const BS: u64 = 4096;
/// Full-file comparison every this many operations.
const CHECK_EVERY: u64 = 100;


#[derive(Debug, Clone, Copy)]
enum Kind {
    Read { off: u64, len: u64 },
    Write { off: u64, len: u64 },
    Truncate { size: u64 },
    Fsync,
    Reopen,
}

/// One operation, kept for the failure report (printed with Debug).
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)]
struct Op {
    n: u64,
    handle: usize,
    kind: Kind,
    /// file size before the operation
    size_before: u64,
}

/// The bytes operation `n` writes at file offset `pos`: they name the
/// operation (fsx does the same), and are never zero, so a hole or lost write
/// that reads as zeros cannot pass for data.
fn data_byte(n: u64, pos: u64) -> u8 {
    let b = (n as u8).wrapping_mul(37) ^ (pos as u8) ^ ((pos >> 8) as u8).rotate_left(3);
    if b == 0 {
        0x5a
    } else {
        b
    }
}

struct Handle {
    path: PathBuf,
    file: File,
}

impl Handle {
    fn open(path: PathBuf) -> Handle {
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        Handle { path, file }
    }
}

struct Fsx {
    seed: u64,
    rng: Rng,
    shadow: Vec<u8>,
    handles: Vec<Handle>,
    history: Vec<Op>,
    recent: VecDeque<Op>,
    counts: [u64; 5],
    bytes_read: u64,
    bytes_written: u64,
}

impl Fsx {
    fn new(seed: u64, paths: &[PathBuf]) -> Fsx {
        File::create(&paths[0]).unwrap();
        let handles = paths.iter().map(|p| Handle::open(p.clone())).collect();
        Fsx { seed, rng: Rng(seed), shadow: Vec::new(), handles, history: Vec::new(), recent: VecDeque::new(), counts: [0; 5], bytes_read: 0, bytes_written: 0 }
    }

    /// An offset and length for a read or write, biased to mcfs's boundaries.
    fn range(&mut self) -> (u64, u64) {
        let r = &mut self.rng;
        let (mut off, mut len) = match r.below(10) {
            // around the inline payload and the first blocks
            0..=2 => (r.below(2 * BS), 1 + r.below(BS)),
            // across a block edge
            3 => {
                let edge = BS * (1 + r.below(MAX_LEN / BS - 1));
                (edge - 1 - r.below(64), 2 + r.below(256))
            }
            // around the data-cache limit or the first indirect level
            4 => {
                let edge = if r.chance(50) { 1 << 20 } else { 495 * BS };
                (edge - r.below(3 * BS), 1 + r.below(6 * BS))
            }
            _ => {
                let max = if r.chance(5) { BIG_OP } else { MAX_OP };
                (r.below(MAX_LEN), 1 + r.below(max))
            }
        };
        if r.chance(15) {
            off -= off % BS;
            len = (len.div_ceil(BS) * BS).max(BS);
        }
        len = len.min(MAX_LEN - off.min(MAX_LEN - 1));
        (off, len.max(1))
    }

    fn pick(&mut self) -> Kind {
        let size = self.shadow.len() as u64;
        match self.rng.below(100) {
            0..=29 => {
                // reads mostly inside the file, some past its end
                let (mut off, len) = self.range();
                if size > 0 && self.rng.chance(80) {
                    off %= size;
                }
                Kind::Read { off, len }
            }
            30..=64 => {
                let (off, len) = self.range();
                Kind::Write { off, len }
            }
            65..=74 => {
                // append
                let max = if self.rng.chance(50) { BS } else { MAX_OP };
                let len = 1 + self.rng.below(max);
                let off = size.min(MAX_LEN - 1);
                Kind::Write { off, len: len.min(MAX_LEN - off) }
            }
            75..=89 => {
                let size = match self.rng.below(10) {
                    0 => 0,
                    1..=3 => INLINE - 8 + self.rng.below(16),
                    4..=5 => self.rng.below(2 * BS),
                    _ => self.rng.below(MAX_LEN),
                };
                Kind::Truncate { size }
            }
            90..=94 => Kind::Fsync,
            _ => Kind::Reopen,
        }
    }

    fn fail(&self, what: String) -> ! {
        let mut s = format!("fsx miscompare (seed {}): {what}\nlast operations (handle = mount index):\n", self.seed);
        for op in &self.recent {
            s += &format!("  {op:?}\n");
        }
        panic!("{s}");
    }

    /// The last operation that wrote or cut offset `pos`.
    fn last_touch(&self, pos: u64) -> Option<&Op> {
        self.history.iter().rev().find(|op| match op.kind {
            Kind::Write { off, len } => pos >= off && pos < off + len,
            Kind::Truncate { size } => pos >= size.min(op.size_before),
            _ => false,
        })
    }

    fn compare(&self, off: u64, got: &[u8], what: &str) {
        let size = self.shadow.len() as u64;
        let want = &self.shadow[off.min(size) as usize..(off + got.len() as u64).min(size) as usize];
        if got.len() != want.len() {
            self.fail(format!("{what}: {} bytes at {off}, expected {} (file size {size})", got.len(), want.len()));
        }
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            let pos = off + i as u64;
            let s = i.saturating_sub(8);
            let e = (i + 8).min(got.len());
            self.fail(format!(
                "{what}: first bad byte at file offset {pos} (block {}, +{}): got {:02x?}, expected {:02x?} (from {}); last operation to write or cut there: {:?}",
                pos / BS,
                pos % BS,
                &got[s..e],
                &want[s..e],
                off + s as u64,
                self.last_touch(pos)
            ));
        }
    }

    fn read_all(&self, h: usize, off: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        let mut done = 0usize;
        while done < buf.len() {
            match self.handles[h].file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => self.fail(format!("read of {len} at {off} through {}: {e}", self.handles[h].path.display())),
            }
        }
        buf.truncate(done);
        buf
    }

    fn check_size(&self, h: usize, after: &str) {
        let got = self.handles[h].file.metadata().unwrap_or_else(|e| self.fail(format!("fstat after {after}: {e}"))).len();
        if got != self.shadow.len() as u64 {
            self.fail(format!("size {got} after {after}, expected {}", self.shadow.len()));
        }
    }

    fn check_all(&self, h: usize, when: &str) {
        let size = self.shadow.len() as u64;
        let got = self.read_all(h, 0, size + 4096);
        self.compare(0, &got, &format!("full-file check {when} through mount {h}"));
    }

    fn step(&mut self, n: u64) {
        let h = self.rng.below(self.handles.len() as u64) as usize;
        let kind = self.pick();
        let op = Op { n, handle: h, kind, size_before: self.shadow.len() as u64 };
        self.recent.push_back(op);
        if self.recent.len() > 40 {
            self.recent.pop_front();
        }
        self.history.push(op);
        match kind {
            Kind::Read { off, len } => {
                self.counts[0] += 1;
                let got = self.read_all(h, off, len);
                self.bytes_read += got.len() as u64;
                self.compare(off, &got, &format!("op {n}: read of {len} at {off} through mount {h}"));
            }
            Kind::Write { off, len } => {
                self.counts[1] += 1;
                let data: Vec<u8> = (off..off + len).map(|p| data_byte(n, p)).collect();
                if let Err(e) = self.handles[h].file.write_all_at(&data, off) {
                    self.fail(format!("op {n}: write of {len} at {off}: {e}"));
                }
                let end = (off + len) as usize;
                if self.shadow.len() < end {
                    self.shadow.resize(end, 0);
                }
                self.shadow[off as usize..end].copy_from_slice(&data);
                self.bytes_written += len;
            }
            Kind::Truncate { size } => {
                self.counts[2] += 1;
                if let Err(e) = self.handles[h].file.set_len(size) {
                    self.fail(format!("op {n}: truncate to {size}: {e}"));
                }
                self.shadow.resize(size as usize, 0);
            }
            Kind::Fsync => {
                self.counts[3] += 1;
                if let Err(e) = self.handles[h].file.sync_all() {
                    self.fail(format!("op {n}: fsync: {e}"));
                }
            }
            Kind::Reopen => {
                self.counts[4] += 1;
                let p = self.handles[h].path.clone();
                self.handles[h] = Handle::open(p);
            }
        }
        self.check_size(h, &format!("op {n} {kind:?}"));
        if n.is_multiple_of(CHECK_EVERY) {
            let h = self.rng.below(self.handles.len() as u64) as usize;
            self.check_all(h, &format!("after op {n}"));
        }
    }

    fn run(&mut self, ops: u64) {
        let t = Instant::now();
        for n in 1..=ops {
            self.step(n);
        }
        for h in 0..self.handles.len() {
            self.check_all(h, "at the end");
        }
        eprintln!(
            "fsx seed {}: {ops} ops on {} mount(s) in {:?}: {} reads ({} MiB), {} writes ({} MiB), {} truncates, {} fsyncs, {} reopens; final size {}",
            self.seed,
            self.handles.len(),
            t.elapsed(),
            self.counts[0],
            self.bytes_read >> 20,
            self.counts[1],
            self.bytes_written >> 20,
            self.counts[2],
            self.counts[3],
            self.counts[4],
            self.shadow.len()
        );
    }
}

#[test]
fn fsx_one_node() {
    let ops = env_u64("MCFS_FSX_OPS").unwrap_or(SINGLE_NODE_OPS);
    let seed = env_u64("MCFS_FSX_SEED").unwrap_or(0x5eed_0001);
    let (dir, mut o) = TestCluster::options(1);
    o.nolock = true;
    o.journals = Some(1);
    o.size = 256 << 20;
    let tc = TestCluster::up(dir, &o).unwrap();
    let path = tc.mnt(1).join("fsx-file");
    let mut fsx = Fsx::new(seed, std::slice::from_ref(&path));
    fsx.run(ops);
    let shadow = std::mem::take(&mut fsx.shadow);
    drop(fsx);
    // what was written survives a clean remount, and fsck agrees
    tc.c.stop(1).unwrap();
    let (code, out) = mcfs_integration::fsck(&tc.c.device());
    assert_eq!(code, 0, "{out}");
    tc.c.start(1).unwrap();
    assert!(std::fs::read(&path).unwrap() == shadow, "the file after a remount");
}

#[test]
fn fsx_two_nodes_same_file() {
    let ops = env_u64("MCFS_FSX_OPS").unwrap_or(TWO_NODE_OPS);
    let seed = env_u64("MCFS_FSX_SEED").unwrap_or(0x5eed_0002);
    let (dir, mut o) = TestCluster::options(2);
    o.size = 256 << 20;
    o.journals = Some(2);
    let tc = TestCluster::up(dir, &o).unwrap();
    let paths = [tc.mnt(1).join("fsx-shared"), tc.mnt(2).join("fsx-shared")];
    let mut fsx = Fsx::new(seed, &paths);
    fsx.run(ops);
    let shadow = std::mem::take(&mut fsx.shadow);
    drop(fsx);
    tc.c.stop(1).unwrap();
    assert!(std::fs::read(&paths[1]).unwrap() == shadow, "node 2 reads the file after node 1 left");
    tc.c.stop(2).unwrap();
    let (code, out) = mcfs_integration::fsck(&tc.c.device());
    assert_eq!(code, 0, "{out}");
}

/// The checker itself, on a file outside mcfs: a byte changed behind fsx's
/// back is reported with its offset, and so is a size fsx did not make (so a
/// clean run on mcfs means something).
#[test]
fn fsx_reports_a_changed_byte_and_a_wrong_size() {
    let dir = mcfs_integration::tempdir();
    let path = dir.path().join("f");
    let mut fsx = Fsx::new(7, std::slice::from_ref(&path));
    for n in 1..=300 {
        fsx.step(n);
    }
    if fsx.shadow.is_empty() {
        fsx.handles[0].file.write_all_at(&[1; 100], 0).unwrap();
        fsx.shadow = vec![1; 100];
    }
    let pos = fsx.shadow.len() as u64 / 2;
    let other = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    other.write_all_at(&[fsx.shadow[pos as usize] ^ 0xff], pos).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fsx.check_all(0, "self-test")));
    let msg = *r.expect_err("a changed byte must be reported").downcast::<String>().unwrap();
    assert!(msg.contains(&format!("first bad byte at file offset {pos} ")), "{msg}");
    other.set_len(fsx.shadow.len() as u64 + 1).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fsx.check_size(0, "self-test")));
    let msg = *r.expect_err("a wrong size must be reported").downcast::<String>().unwrap();
    assert!(msg.contains(&format!("size {} after self-test", fsx.shadow.len() + 1)), "{msg}");
}
