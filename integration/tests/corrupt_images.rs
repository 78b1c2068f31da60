//! Corrupted images: the node withdraws, it does not panic, hang, or write
//! after withdrawing; fsck.mcfs never panics and either repairs or reports.
//!
//! 1. A base image (16 MiB, nolock) is populated through a real mount — files
//!    inline and across every tree height, a hashed directory, deep
//!    directories, short and long symlinks, hard links, a fifo, deleted files —
//!    and unmounted cleanly; fsck says it is clean. Two bases: 4 KiB and 1 KiB
//!    blocks.
//! 2. Its metadata blocks are found by their header ("MCFS" magic at the block
//!    start, own block number). Each iteration mutates one to three of them:
//!    bit flips, a zeroed block, garbage, a tampered header, another block of
//!    the same type copied over it (all failing the checksum or header
//!    check), or a field or byte changed and the block re-sealed so that it
//!    passes the checksum and only the structure's own checks remain.
//! 3. `fsck.mcfs -n` on the image: exit 0, 4 or 8, no panic, nothing written.
//! 4. mcfs-node mounts it (nolock; a refusal to mount is fine if it is a clean
//!    exit) and a walker reads everything (readdir, stat, every file, every
//!    link) and then writes (create, append, truncate, mkdir, symlink, rename,
//!    unlink, chmod, fsync). At the first EIO it asks `mcfs status --json`:
//!    if the node withdrew (with a reason), the device is copied at that
//!    moment; every later operation must fail with EIO; after unmount the
//!    device must be byte-identical to the copy.
//! 5. When every mutated block fails its checksum or header check, the node
//!    can never decode them: then each answer must be right (the content and
//!    names the base was populated with) or EIO — no ENOENT for a file that is
//!    there, no wrong bytes.
//! 6. `fsck.mcfs -y` on the image the node left: exit 0, 1, 4, 5 or 8; when
//!    it says everything was fixed (0 or 1) a following `-n` must be clean and
//!    the node must mount and read the repaired image without withdrawing.
//!
//! No daemon may crash (a signal, or the panic exit code 101) or log a panic.
//! Both families run in the suite, with focused reproducers of the bugs the
//! campaigns found (each was a panic; each now withdraws or is repaired).
//! `MCFS_CORRUPT_ITERS=N` runs N images (default below), `MCFS_CORRUPT_SEED=S`
//! changes the seed, `MCFS_CORRUPT_ONLY=I` runs iteration I alone (failures
//! print the seed and iteration), `MCFS_CORRUPT_KEEP=DIR` keeps failing images.

// Test helpers fail the test on any unexpected error: that is their job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcfs_format::header::{self, BlockType};
use mcfs_integration::{bin, is_mounted, Daemon, MountGuard};
use mcfs_integration::rng::{env_u64, Rng};

const IMAGE_BYTES: u64 = 16 << 20;
const WALK_TIMEOUT: Duration = Duration::from_secs(40);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);


// ---------------------------------------------------------------- the base image

#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
    Fifo,
}

/// Path (relative to the mount) -> what it is.
type Manifest = BTreeMap<PathBuf, Expect>;

struct Base {
    name: &'static str,
    bs: u64,
    bytes: Vec<u8>,
    /// (block, type) of every block that starts with a valid-looking header
    meta: Vec<(u64, u16)>,
    manifest: Arc<Manifest>,
    /// inode number (= dinode block) of every manifest path
    inos: BTreeMap<PathBuf, u64>,
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed);
    (0..len).map(|_| r.next() as u8).collect()
}

/// A scratch directory where one node at a time mounts `img`, with the files
/// `mcfs status --cluster-dir` reads (a nolock "cluster" of one node).
struct Env {
    dir: PathBuf,
    img: PathBuf,
    mnt: PathBuf,
}

impl Env {
    fn new(dir: &Path) -> Env {
        let mnt = dir.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let img = dir.join("disk.img");
        fs::write(dir.join("secret"), "corrupt-images-test-secret-0123456789").unwrap();
        let toml = format!(
            "dir = \"{d}\"\nlockspace = \"local:corrupt\"\nimage = \"{i}\"\nnodes = 1\nnolock = true\nbin_dir = \"{b}\"\nsecret_file = \"{d}/secret\"\nnode_args = []\ndlm_args = []\n\n[per_node_args]\n",
            d = dir.display(),
            i = img.display(),
            b = bin("mcfs-node").parent().unwrap().display()
        );
        fs::write(dir.join("cluster.toml"), toml).unwrap();
        Env { dir: dir.to_path_buf(), img, mnt }
    }

    fn log(&self) -> PathBuf {
        self.dir.join("node1.log")
    }
}

struct Node {
    d: Daemon,
    _g: MountGuard,
}

enum Started {
    Mounted(Node),
    /// exited before mounting: status, log
    Exited(ExitStatus, String),
    /// neither mounted nor exited in time (killed)
    Stuck(String),
}

fn start(env: &Env) -> Started {
    let _ = fs::remove_file(env.dir.join("node1.admin"));
    let mut cmd = Command::new(bin("mcfs-node"));
    cmd.arg("--device")
        .arg(&env.img)
        .arg("--mountpoint")
        .arg(&env.mnt)
        .args(["--node-id", "1", "--lock", "nolock", "--admin", "127.0.0.1:0", "--threads", "2"])
        .arg("--admin-addr-file")
        .arg(env.dir.join("node1.admin"))
        .arg("--secret-file")
        .arg(env.dir.join("secret"))
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LOG", "info,fuser=error");
    let mut d = Daemon::spawn("mcfs-node", &mut cmd, env.log()).unwrap();
    let g = MountGuard { path: env.mnt.clone() };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if is_mounted(&env.mnt) {
            return Started::Mounted(Node { d, _g: g });
        }
        if let Some(st) = d.exited() {
            let log = d.log_text();
            d.child = None;
            return Started::Exited(st, log);
        }
        if Instant::now() > deadline {
            d.kill();
            return Started::Stuck(d.log_text());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Unmount and wait for the daemon; its exit status (None: it had to be killed).
fn stop(env: &Env, node: &mut Node) -> Option<ExitStatus> {
    if is_mounted(&env.mnt) {
        let mut c = Command::new("umount").arg(&env.mnt).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let _ = mcfs_integration::wait_for("umount", EXIT_TIMEOUT, || c.try_wait().ok().flatten());
        let _ = c.kill();
        let _ = c.wait();
    }
    match node.d.wait_exit(EXIT_TIMEOUT) {
        Ok(st) => Some(st),
        Err(_) => {
            node.d.kill();
            if is_mounted(&env.mnt) {
                let _ = Command::new("umount").arg("-l").arg(&env.mnt).status();
            }
            None
        }
    }
}

fn node_status(env: &Env) -> Option<serde_json::Value> {
    let out = Command::new(bin("mcfs")).args(["status", "--json", "--cluster-dir"]).arg(&env.dir).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["nodes"].as_array()?.first().map(|n| n["status"].clone()).filter(|s| !s.is_null())
}

fn mkfs(img: &Path, bs: u32) {
    let _ = fs::remove_file(img);
    let st = Command::new(bin("mkfs-mcfs"))
        .args(["-q", "-p", "nolock", "-J", "1M", "-r", "4M", "-b", &bs.to_string(), "--size", &IMAGE_BYTES.to_string()])
        .arg(img)
        .status()
        .unwrap();
    assert!(st.success(), "mkfs-mcfs failed");
}

fn populate(m: &Path, bs: u64) -> Manifest {
    let mut man = Manifest::new();
    let mut file = |rel: &str, len: usize, seed: u64| {
        let c = content(seed, len);
        fs::write(m.join(rel), &c).unwrap();
        man.insert(PathBuf::from(rel), Expect::File(c));
    };
    let payload = bs as usize - 136;
    // deleted files leave stale metadata blocks behind in free space
    for i in 0..20 {
        fs::write(m.join(format!("gone{i}")), content(900 + i, 5000)).unwrap();
    }
    file("empty", 0, 1);
    file("small", 10, 2);
    file("inline-full", payload, 3);
    file("inline-plus-one", payload + 1, 4);
    file("blocks", 40_000, 5);
    file("mib-plus-one", (1 << 20) + 1, 6);
    file("two-levels", (5 << 20) / 2, 7);
    for d in ["d1", "d1/d2", "d1/d2/d3", "hashed"] {
        fs::create_dir(m.join(d)).unwrap();
    }
    file("d1/d2/d3/deep", 3000, 8);
    file("d1/d2/mid", 70_000, 9);
    for i in 0..200u64 {
        file(&format!("hashed/entry-{i:04}-{}", "n".repeat(50)), (i * 37 % 300) as usize, 100 + i);
    }
    for (rel, target) in [("d1/short-link", b"../small".to_vec()), ("long-link", (0..3000).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>())] {
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), m.join(rel)).unwrap();
        man.insert(PathBuf::from(rel), Expect::Symlink(target));
    }
    fs::hard_link(m.join("blocks"), m.join("d1/hard-to-blocks")).unwrap();
    man.insert(PathBuf::from("d1/hard-to-blocks"), man[Path::new("blocks")].clone());
    let fifo = std::ffi::CString::new(m.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    man.insert(PathBuf::from("fifo"), Expect::Fifo);
    for d in ["d1", "d1/d2", "d1/d2/d3", "hashed"] {
        man.insert(PathBuf::from(d), Expect::Dir);
    }
    for i in 0..20 {
        fs::remove_file(m.join(format!("gone{i}"))).unwrap();
    }
    man
}

fn build_base(work: &Path, name: &'static str, bs: u32) -> Base {
    let dir = work.join(format!("base-{name}"));
    fs::create_dir_all(&dir).unwrap();
    let env = Env::new(&dir);
    mkfs(&env.img, bs);
    let Started::Mounted(mut node) = start(&env) else { panic!("base image does not mount:\n{}", fs::read_to_string(env.log()).unwrap_or_default()) };
    let manifest = populate(&env.mnt, bs as u64);
    let inos = manifest.keys().map(|p| (p.clone(), fs::symlink_metadata(env.mnt.join(p)).unwrap().ino())).collect();
    let st = stop(&env, &mut node);
    assert!(st.is_some_and(|s| s.success()), "base unmount: {st:?}\n{}", fs::read_to_string(env.log()).unwrap_or_default());
    let (code, out) = fsck_run(&env.img, "-n");
    assert_eq!(code, 0, "the base image is clean:\n{out}");
    let bytes = fs::read(&env.img).unwrap();
    let bsz = bs as usize;
    let mut meta = Vec::new();
    for (b, blk) in bytes.chunks_exact(bsz).enumerate() {
        if let Some((magic, ty, _, self_addr, ..)) = header::peek(blk) {
            if magic == mcfs_format::MAGIC && self_addr == b as u64 && BlockType::from_u16(ty).is_some() {
                meta.push((b as u64, ty));
            }
        }
    }
    let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, t) in &meta {
        *by_type.entry(BlockType::from_u16(*t).map_or("?", |t| t.name())).or_default() += 1;
    }
    eprintln!("base {name}: {} blocks of {bs} bytes, {} metadata blocks: {by_type:?}", bytes.len() / bsz, meta.len());
    Base { name, bs: bs as u64, bytes, meta, manifest: Arc::new(manifest), inos }
}

// ---------------------------------------------------------------- mutations

/// Fields worth changing, per block type: (offset, width).
fn fields(ty: BlockType) -> &'static [(usize, usize)] {
    use BlockType::*;
    match ty {
        Superblock => &[(32, 8), (48, 4), (56, 8), (64, 8), (72, 8), (80, 4), (84, 4), (88, 8), (96, 4), (100, 4), (112, 8), (128, 1)],
        RgrpHeader => &[(32, 4), (36, 4), (40, 4), (44, 4), (48, 8), (56, 4), (60, 4), (64, 4), (68, 4)],
        Bitmap => &[(32, 4), (36, 4), (40, 8), (48, 1), (49, 1), (60, 1)],
        Dinode => &[(32, 4), (36, 4), (44, 4), (48, 8), (56, 8), (100, 4), (104, 1), (105, 1), (108, 4), (112, 8), (120, 8), (128, 8)],
        Indirect => &[(32, 8)],
        DirLeaf => &[(32, 8), (40, 2), (42, 2), (44, 4), (48, 8)],
        DirHash => &[(32, 8), (40, 4)],
        LogDescriptor => &[(32, 4), (40, 8), (48, 8)],
        LogRevoke => &[(32, 4), (40, 8)],
        LogCommit => &[(32, 8), (40, 4), (44, 4), (48, 4), (52, 4), (64, 4)],
    }
}

/// Where u64 block pointers live in a block of this type (first offset).
fn pointer_area(ty: BlockType, blk: &[u8]) -> Option<usize> {
    use BlockType::*;
    match ty {
        // a dinode's payload holds pointers unless the inline flag is set
        Dinode if u32::from_le_bytes(blk[100..104].try_into().unwrap()) & 1 == 0 => Some(136),
        Indirect => Some(40),
        DirHash => Some(48),
        _ => None,
    }
}

/// Offsets of directory entries in a leaf (or an inline directory's payload).
fn entries(blk: &[u8], start: usize, count: usize) -> Vec<usize> {
    let mut v = Vec::new();
    let mut p = start;
    while v.len() < count && p + 14 <= blk.len() {
        let len = blk[p + 13] as usize;
        if len == 0 || p + 14 + len > blk.len() {
            break;
        }
        v.push(p);
        p += 14 + len;
    }
    v
}

fn get(b: &[u8], off: usize, w: usize) -> u64 {
    let mut a = [0u8; 8];
    a[..w].copy_from_slice(&b[off..off + w]);
    u64::from_le_bytes(a)
}

fn put(b: &mut [u8], off: usize, w: usize, v: u64) {
    b[off..off + w].copy_from_slice(&v.to_le_bytes()[..w]);
}

/// A new value for a field of `w` bytes that held `old`.
fn new_value(r: &mut Rng, old: u64, w: usize, base: &Base) -> u64 {
    let max = if w == 8 { u64::MAX } else { (1u64 << (8 * w)) - 1 };
    let blocks = base.bytes.len() as u64 / base.bs;
    let v = match r.below(12) {
        0 => 0,
        1 => 1,
        2 => max,
        3 => max - 1,
        4 => old.wrapping_add(1),
        5 => old.wrapping_sub(1),
        6 => old.wrapping_mul(2),
        7 => blocks,
        8 => blocks.wrapping_sub(1),
        9 => r.pick(&base.meta).0,
        10 => 1u64 << r.below(8 * w as u64),
        _ => r.next(),
    };
    let v = v & max;
    if v == old {
        old ^ 1
    } else {
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    FlipBits,
    Zero,
    Garbage,
    Header,
    Misdirected,
    SealedField,
    SealedPointer,
    SealedEntry,
    SealedBytes,
    SealedHeader,
}

impl Kind {
    /// Does every block it touches fail the checksum or header check?
    fn undecodable(self) -> bool {
        matches!(self, Kind::FlipBits | Kind::Zero | Kind::Garbage | Kind::Header | Kind::Misdirected)
    }
}

struct Mutated {
    bytes: Vec<u8>,
    what: Vec<String>,
    kinds: Vec<Kind>,
}

impl Mutated {
    fn undecodable(&self) -> bool {
        self.kinds.iter().all(|k| k.undecodable())
    }
}

fn block_type_weight(t: u16) -> u64 {
    match BlockType::from_u16(t) {
        Some(BlockType::Superblock) => 1,
        Some(BlockType::LogDescriptor | BlockType::LogRevoke | BlockType::LogCommit) => 1,
        Some(BlockType::Dinode) => 4,
        _ => 3,
    }
}

/// Choose a metadata block: a type first (so the few rgrp headers and hash
/// blocks get their share), then a block of that type.
fn choose_block(r: &mut Rng, base: &Base) -> (u64, BlockType) {
    let mut types: Vec<u16> = base.meta.iter().map(|m| m.1).collect();
    types.sort_unstable();
    types.dedup();
    let total: u64 = types.iter().map(|t| block_type_weight(*t)).sum();
    let mut x = r.below(total);
    let mut ty = types[0];
    for t in &types {
        let w = block_type_weight(*t);
        if x < w {
            ty = *t;
            break;
        }
        x -= w;
    }
    let of: Vec<u64> = base.meta.iter().filter(|m| m.1 == ty).map(|m| m.0).collect();
    (*r.pick(&of), BlockType::from_u16(ty).unwrap())
}

fn random_kind(r: &mut Rng) -> Kind {
    match r.below(100) {
        0..=19 => Kind::FlipBits,
        20..=26 => Kind::Zero,
        27..=30 => Kind::Garbage,
        31..=35 => Kind::Header,
        36..=39 => Kind::Misdirected,
        40..=64 => Kind::SealedField,
        65..=74 => Kind::SealedPointer,
        75..=82 => Kind::SealedEntry,
        83..=92 => Kind::SealedBytes,
        _ => Kind::SealedHeader,
    }
}

/// Which mutations a test makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    /// every mutated block fails its checksum or header check
    Undecodable,
    /// mutated blocks are re-sealed: they pass the checksum
    Resealed,
}

fn mutate(r: &mut Rng, base: &Base, family: Family) -> Mutated {
    let mut bytes = base.bytes.clone();
    let bs = base.bs as usize;
    let n = if r.chance(80) { 1 } else { 2 + r.below(2) };
    let mut what = Vec::new();
    let mut kinds = Vec::new();
    for _ in 0..n {
        let (b, ty) = choose_block(r, base);
        let blk = &mut bytes[b as usize * bs..(b as usize + 1) * bs];
        let kind = loop {
            let k = random_kind(r);
            if k.undecodable() == (family == Family::Undecodable) {
                break k;
            }
        };
        let mut desc = format!("{} {b}: ", ty.name());
        let mut kind = kind;
        match kind {
            Kind::FlipBits => {
                let k = 1 + r.below(4);
                for _ in 0..k {
                    let off = r.below(bs as u64) as usize;
                    let bit = r.below(8);
                    blk[off] ^= 1 << bit;
                    desc += &format!("flip bit {bit} of byte {off}; ");
                }
            }
            Kind::Zero => {
                blk.fill(0);
                desc += "zeroed";
            }
            Kind::Garbage => {
                let off = r.below(bs as u64 - 64) as usize;
                let len = 16 + r.below(48) as usize;
                for x in &mut blk[off..off + len] {
                    *x = r.next() as u8;
                }
                desc += &format!("{len} random bytes at {off}");
            }
            Kind::Header => {
                let (off, w) = *r.pick(&[(0, 4), (4, 2), (6, 2), (8, 8), (16, 8), (24, 4), (28, 4)]);
                let old = get(blk, off, w);
                let v = new_value(r, old, w, base);
                put(blk, off, w, v);
                desc += &format!("header field at {off} {old:#x} -> {v:#x} (not re-sealed)");
            }
            Kind::Misdirected => {
                let others: Vec<u64> = base.meta.iter().filter(|m| m.1 == ty as u16 && m.0 != b).map(|m| m.0).collect();
                if others.is_empty() {
                    blk.fill(0);
                    kind = Kind::Zero;
                    desc += "zeroed (no other block of its type)";
                } else {
                    let from = *r.pick(&others);
                    blk.copy_from_slice(&base.bytes[from as usize * bs..(from as usize + 1) * bs]);
                    desc += &format!("replaced by a copy of block {from}");
                }
            }
            Kind::SealedField => {
                let (off, w) = *r.pick(fields(ty));
                let old = get(blk, off, w);
                let v = new_value(r, old, w, base);
                put(blk, off, w, v);
                header::reseal(blk);
                desc += &format!("field at {off} ({w} bytes) {old:#x} -> {v:#x}, re-sealed");
            }
            Kind::SealedPointer => {
                let area = pointer_area(ty, blk);
                let slots: Vec<usize> = match area {
                    Some(a) => (a..bs - 7).step_by(8).collect(),
                    None => Vec::new(),
                };
                let used: Vec<usize> = slots.iter().copied().filter(|&s| get(blk, s, 8) != 0).collect();
                let s = if !used.is_empty() && r.chance(85) {
                    Some(*r.pick(&used))
                } else if !slots.is_empty() {
                    Some(*r.pick(&slots))
                } else {
                    None
                };
                match s {
                    Some(s) => {
                        let old = get(blk, s, 8);
                        let v = new_value(r, old, 8, base);
                        put(blk, s, 8, v);
                        desc += &format!("pointer at {s} {old} -> {v}, re-sealed");
                    }
                    None => {
                        let (off, w) = *r.pick(fields(ty));
                        let old = get(blk, off, w);
                        let v = new_value(r, old, w, base);
                        put(blk, off, w, v);
                        kind = Kind::SealedField;
                        desc += &format!("(no pointers) field at {off} {old:#x} -> {v:#x}, re-sealed");
                    }
                }
                header::reseal(blk);
            }
            Kind::SealedEntry => {
                let es = match ty {
                    BlockType::DirLeaf => entries(blk, 56, get(blk, 42, 2) as usize),
                    BlockType::Dinode if get(blk, 100, 4) & 1 == 1 && get(blk, 32, 4) as u32 & 0o170000 == 0o040000 => entries(blk, 136, get(blk, 112, 8) as usize),
                    _ => Vec::new(),
                };
                if es.is_empty() {
                    let off = 32 + r.below(bs as u64 - 32) as usize;
                    blk[off] ^= 1 << r.below(8);
                    kind = Kind::SealedBytes;
                    desc += &format!("(no entries) byte {off} flipped, re-sealed");
                } else {
                    let e = *r.pick(&es);
                    let (off, w, name) = *r.pick(&[(0usize, 4usize, "hash"), (4, 8, "ino"), (12, 1, "dtype"), (13, 1, "name_len"), (14, 1, "name byte")]);
                    let old = get(blk, e + off, w);
                    let v = match name {
                        "name byte" => *r.pick(&[0u64, b'/' as u64, b'.' as u64, old ^ 0x20]),
                        _ => new_value(r, old, w, base),
                    };
                    put(blk, e + off, w, v);
                    desc += &format!("entry at {e}: {name} {old:#x} -> {v:#x}, re-sealed");
                }
                header::reseal(blk);
            }
            Kind::SealedBytes => {
                let k = 1 + r.below(4);
                for _ in 0..k {
                    let off = 32 + r.below(bs as u64 - 32) as usize;
                    blk[off] = r.next() as u8;
                    desc += &format!("byte {off}; ");
                }
                header::reseal(blk);
                desc += "re-sealed";
            }
            Kind::SealedHeader => {
                let (off, w) = *r.pick(&[(4, 2), (6, 2), (8, 8), (16, 8), (24, 4)]);
                let old = get(blk, off, w);
                let v = new_value(r, old, w, base);
                put(blk, off, w, v);
                header::reseal(blk);
                desc += &format!("header field at {off} {old:#x} -> {v:#x}, re-sealed");
            }
        }
        what.push(desc);
        kinds.push(kind);
    }
    Mutated { bytes, what, kinds }
}

// ---------------------------------------------------------------- the walk

/// How a walk went.
#[derive(Default)]
struct Walk {
    ops: u64,
    errors: BTreeMap<i32, u64>,
    /// the device as it was when the withdraw was seen
    snapshot: Option<Vec<u8>>,
    withdraw_reason: Option<String>,
    problems: Vec<String>,
    /// the daemon is gone (ENOTCONN): stop walking
    dead: bool,
    ops_after_withdraw: u64,
    eio_without_withdraw: u64,
    /// which operations those were
    eio_without_withdraw_ops: Vec<String>,
}

struct Walker<'a> {
    env: &'a Env,
    strict: bool,
    w: Walk,
}

fn errno_name(n: i32) -> String {
    io::Error::from_raw_os_error(n).to_string()
}

impl Walker<'_> {
    /// Record one operation's outcome.
    fn op<T>(&mut self, what: &str, r: io::Result<T>) -> Option<T> {
        self.w.ops += 1;
        let withdrawn = self.w.snapshot.is_some();
        match r {
            Ok(v) => {
                if withdrawn {
                    self.w.problems.push(format!("{what} succeeded after the withdraw"));
                }
                Some(v)
            }
            Err(e) => {
                let n = e.raw_os_error().unwrap_or(-1);
                *self.w.errors.entry(n).or_default() += 1;
                if n == libc::ENOTCONN || n == libc::ECONNABORTED {
                    if !self.w.dead {
                        self.w.problems.push(format!("{what}: {e}: the daemon went away"));
                    }
                    self.w.dead = true;
                } else if withdrawn {
                    self.w.ops_after_withdraw += 1;
                    if n != libc::EIO {
                        self.w.problems.push(format!("{what} after the withdraw: {e} (want EIO)"));
                    }
                } else if n == libc::EIO {
                    self.check_withdraw(what);
                } else if self.strict {
                    self.w.problems.push(format!("{what}: {e} (only EIO or the right answer is allowed when every corrupted block fails its checksum)"));
                }
                None
            }
        }
    }

    /// The first EIO: did the node withdraw? Then copy the device now.
    fn check_withdraw(&mut self, what: &str) {
        let st = node_status(self.env);
        match st {
            Some(s) if s["withdrawn"] == true => {
                let reason = s["withdraw_reason"].as_str().unwrap_or("").to_string();
                if reason.is_empty() {
                    self.w.problems.push(format!("withdrawn without a reason in mcfs status: {s}"));
                }
                self.w.withdraw_reason = Some(reason);
                self.w.snapshot = Some(fs::read(&self.env.img).unwrap());
            }
            Some(_) => {
                self.w.eio_without_withdraw += 1;
                self.w.eio_without_withdraw_ops.push(what.to_string());
            }
            None => self.w.problems.push(format!("{what}: EIO, and mcfs status --json does not answer")),
        }
    }

    fn walk_tree(&mut self, dir: &Path, rel: &Path, depth: u32, seen: &mut u64, manifest: &Manifest) {
        if depth > 12 || *seen > 5000 || self.w.dead {
            return;
        }
        let Some(rd) = self.op(&format!("opendir {}", rel.display()), fs::read_dir(dir)) else { return };
        let mut names = Vec::new();
        let mut complete = true;
        for e in rd {
            match self.op(&format!("readdir {}", rel.display()), e) {
                Some(e) => names.push(e.file_name()),
                None => {
                    complete = false;
                    break;
                }
            }
        }
        if self.strict && complete && self.w.snapshot.is_none() {
            // a listing that succeeded must be the right one
            let want: Vec<PathBuf> = manifest.keys().filter(|p| p.parent() == Some(rel)).cloned().collect();
            let got: Vec<PathBuf> = names.iter().map(|n| rel.join(n)).collect();
            for p in &want {
                if !got.contains(p) {
                    self.w.problems.push(format!("readdir of /{} succeeded without {}", rel.display(), p.display()));
                }
            }
            for p in &got {
                if !manifest.contains_key(p) {
                    self.w.problems.push(format!("readdir of /{} returned an unknown name {}", rel.display(), p.display()));
                }
            }
        }
        for n in names {
            *seen += 1;
            let p = dir.join(&n);
            let r = rel.join(&n);
            if let Some(md) = self.op(&format!("lstat {}", r.display()), fs::symlink_metadata(&p)) {
                if md.is_dir() {
                    self.walk_tree(&p, &r, depth + 1, seen, manifest);
                } else if md.is_file() && !manifest.contains_key(&r) {
                    let _ = self.op(&format!("read {}", r.display()), read_file(&p));
                }
            }
        }
    }

    fn check_manifest(&mut self, m: &Path, manifest: &Manifest) {
        for (rel, want) in manifest {
            if self.w.dead {
                return;
            }
            let p = m.join(rel);
            let Some(md) = self.op(&format!("lstat {}", rel.display()), fs::symlink_metadata(&p)) else { continue };
            let kind_ok = match want {
                Expect::Dir => md.is_dir(),
                Expect::File(_) => md.is_file(),
                Expect::Symlink(_) => md.file_type().is_symlink(),
                Expect::Fifo => md.mode() & libc::S_IFMT == libc::S_IFIFO,
            };
            if self.strict && !kind_ok && self.w.snapshot.is_none() {
                self.w.problems.push(format!("{} has mode {:o}, expected {want:?}", rel.display(), md.mode()));
                continue;
            }
            match want {
                Expect::File(c) if md.is_file() => {
                    if let Some(got) = self.op(&format!("read {}", rel.display()), read_file(&p)) {
                        if self.strict && &got != c {
                            let at = got.iter().zip(c.iter()).position(|(a, b)| a != b).unwrap_or(got.len().min(c.len()));
                            self.w.problems.push(format!("{}: read {} bytes, expected {}; first difference at {at}", rel.display(), got.len(), c.len()));
                        }
                    }
                }
                Expect::Symlink(t) if md.file_type().is_symlink() => {
                    if let Some(got) = self.op(&format!("readlink {}", rel.display()), fs::read_link(&p)) {
                        if self.strict && got.as_os_str().as_bytes() != &t[..] {
                            self.w.problems.push(format!("readlink {}: wrong target ({} bytes)", rel.display(), got.as_os_str().len()));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn writes(&mut self, m: &Path, manifest: &Manifest) {
        let dirs: Vec<PathBuf> = std::iter::once(PathBuf::new()).chain(manifest.iter().filter(|(_, e)| **e == Expect::Dir).map(|(p, _)| p.clone())).collect();
        for (i, d) in dirs.iter().enumerate() {
            if self.w.dead {
                return;
            }
            let f = m.join(d).join(format!("new-{i}"));
            let data = content(7000 + i as u64, 10_000 + i * 3000);
            if self.op(&format!("create+write {}", f.display()), fs::write(&f, &data)).is_some() {
                if let Some(got) = self.op(&format!("read back {}", f.display()), read_file(&f)) {
                    if self.strict && got != data {
                        self.w.problems.push(format!("{}: read back differs from what was written", f.display()));
                    }
                }
            }
            let _ = self.op(&format!("mkdir in /{}", d.display()), fs::create_dir(m.join(d).join(format!("newdir-{i}"))));
            let _ = self.op(&format!("symlink in /{}", d.display()), std::os::unix::fs::symlink("target", m.join(d).join(format!("newlink-{i}"))));
        }
        let files: Vec<(PathBuf, Vec<u8>)> = manifest.iter().filter_map(|(p, e)| if let Expect::File(c) = e { Some((p.clone(), c.clone())) } else { None }).filter(|(p, _)| !p.starts_with("hashed")).collect();
        for (i, (rel, c)) in files.iter().enumerate() {
            if self.w.dead {
                return;
            }
            let p = m.join(rel);
            let extra = content(8000 + i as u64, 5000);
            let appended = fs::OpenOptions::new().append(true).open(&p).and_then(|mut f| f.write_all(&extra));
            if self.op(&format!("append to {}", rel.display()), appended).is_some() {
                if let Some(got) = self.op(&format!("read back {}", rel.display()), read_file(&p)) {
                    // a hard link shares the content: read it back through either name only once
                    let want = [c.as_slice(), &extra].concat();
                    if self.strict && got != want && !rel.ends_with("hard-to-blocks") && !rel.ends_with("blocks") {
                        self.w.problems.push(format!("{}: after an append read {} bytes, expected {}", rel.display(), got.len(), want.len()));
                    }
                }
            }
        }
        let _ = self.op("truncate mib-plus-one", fs::OpenOptions::new().write(true).open(m.join("mib-plus-one")).and_then(|f| f.set_len(12_345)));
        let _ = self.op("truncate two-levels up", fs::OpenOptions::new().write(true).open(m.join("two-levels")).and_then(|f| f.set_len(4 << 20)));
        let _ = self.op("chmod small", fs::set_permissions(m.join("small"), fs::Permissions::from_mode(0o600)));
        let _ = self.op("rename deep", fs::rename(m.join("d1/d2/d3/deep"), m.join("hashed/moved-deep")));
        let _ = self.op("unlink hashed entry", fs::remove_file(m.join(format!("hashed/entry-0007-{}", "n".repeat(50)))));
        let _ = self.op("unlink hard link", fs::remove_file(m.join("d1/hard-to-blocks")));
        let _ = self.op("rmdir newdir-0", fs::remove_dir(m.join("newdir-0")));
        let _ = self.op("fsync", fs::OpenOptions::new().write(true).open(m.join("small")).and_then(|f| f.sync_all()));
        let _ = self.op("statfs", statfs(m));
        let _ = self.op("syncfs", syncfs(m));
        let _ = self.op("stat the root", fs::metadata(m));
    }
}

fn read_file(p: &Path) -> io::Result<Vec<u8>> {
    let mut f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(p)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

fn statfs(p: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path and a zeroed out-struct.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn syncfs(p: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(p)?;
    // SAFETY: a valid open descriptor.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn walk(env: &Env, strict: bool, manifest: &Manifest) -> Walk {
    let mut w = Walker { env, strict, w: Walk::default() };
    let m = env.mnt.clone();
    let mut seen = 0;
    w.walk_tree(&m, Path::new(""), 0, &mut seen, manifest);
    w.check_manifest(&m, manifest);
    w.writes(&m, manifest);
    if w.w.snapshot.is_some() && !w.w.dead {
        // after a withdraw nothing works, reads included
        let _ = w.op("stat the root after the withdraw", fs::metadata(&m));
        let _ = w.op("read after the withdraw", read_file(&m.join("small")));
        let _ = w.op("create after the withdraw", fs::write(m.join("after-withdraw"), b"x"));
    }
    w.w
}

// ---------------------------------------------------------------- fsck

fn fsck_run(img: &Path, flag: &str) -> (i32, String) {
    let out = Command::new(bin("fsck-mcfs")).arg(flag).arg(img).env("RUST_BACKTRACE", "1").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&out.status).unwrap_or(0)), text)
}

fn panicked(log: &str) -> bool {
    log.contains("panicked at") || log.contains("RUST_BACKTRACE")
}

fn diff_blocks(a: &[u8], b: &[u8], bs: usize) -> Vec<u64> {
    a.chunks(bs).zip(b.chunks(bs)).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i as u64).take(20).collect()
}

// ---------------------------------------------------------------- one image

#[derive(Default)]
struct Tally {
    by_outcome: BTreeMap<String, u64>,
    fsck_n: BTreeMap<i32, u64>,
    fsck_y: BTreeMap<i32, u64>,
    by_kind: BTreeMap<String, (u64, u64)>,
    errors: BTreeMap<i32, u64>,
    ops: u64,
    ops_after_withdraw: u64,
    remounted_after_repair: u64,
    eio_without_withdraw: u64,
    /// notes worth a look that are not failures (printed, first few)
    notes: Vec<String>,
}

fn run_one(base: &Base, env: &Env, family: Family, seed: u64, i: u64, t: &mut Tally) -> Vec<String> {
    let mut r = Rng(seed ^ i.wrapping_mul(0xa24b_aed4_963e_e407));
    let mt = mutate(&mut r, base, family);
    let strict = mt.undecodable();
    let mut problems = Vec::new();
    let bs = base.bs as usize;
    fs::write(&env.img, &mt.bytes).unwrap();

    // fsck -n: no panic, a known exit code, nothing written
    let (code, out) = fsck_run(&env.img, "-n");
    *t.fsck_n.entry(code).or_default() += 1;
    if ![0, 4, 8].contains(&code) || panicked(&out) {
        problems.push(format!("fsck -n exit {code}:\n{}", out.lines().take(30).collect::<Vec<_>>().join("\n")));
    }
    if fs::read(&env.img).unwrap() != mt.bytes {
        problems.push("fsck -n wrote to the image".into());
    }

    // mount and walk
    let outcome = match start(env) {
        Started::Exited(st, log) => {
            if st.code() != Some(1) || panicked(&log) {
                problems.push(format!("mount failed with {st} (want a clean exit 1):\n{}", tail(&log)));
            }
            let now = fs::read(&env.img).unwrap();
            if now != mt.bytes {
                *t.by_outcome.entry("(mount refused after writing to the device)".into()).or_default() += 1;
            }
            "mount refused".to_string()
        }
        Started::Stuck(log) => {
            problems.push(format!("the node neither mounted nor exited in 20 s:\n{}", tail(&log)));
            "stuck at mount".to_string()
        }
        Started::Mounted(mut node) => {
            let (tx, rx) = mpsc::channel();
            let manifest = base.manifest.clone();
            let wenv = Env { dir: env.dir.clone(), img: env.img.clone(), mnt: env.mnt.clone() };
            let h = std::thread::spawn(move || {
                let w = walk(&wenv, strict, &manifest);
                let _ = tx.send(());
                w
            });
            let hung = rx.recv_timeout(WALK_TIMEOUT).is_err();
            if hung {
                // abort the FUSE connection: the stuck calls return ENOTCONN
                node.d.kill();
                problems.push(format!("the walk hung for {WALK_TIMEOUT:?}:\n{}", tail(&node.d.log_text())));
            }
            let mut w = h.join().unwrap_or_default();
            if hung {
                w.problems.retain(|p| !p.contains("went away"));
            }
            t.ops += w.ops;
            t.ops_after_withdraw += w.ops_after_withdraw;
            t.eio_without_withdraw += w.eio_without_withdraw;
            for op in &w.eio_without_withdraw_ops {
                t.notes.push(format!("[{} iteration {i}] EIO without a withdraw: {op} ({})", base.name, mt.what.join(" | ")));
            }
            if code == 0 && w.snapshot.is_some() {
                // fsck found nothing, the node withdrew: one of them is wrong
                t.notes.push(format!("[{} iteration {i}] fsck -n clean but the node withdrew ({:?}): {}", base.name, w.withdraw_reason, mt.what.join(" | ")));
            }
            for (e, n) in &w.errors {
                *t.errors.entry(*e).or_default() += n;
            }
            problems.append(&mut w.problems);
            let st = stop(env, &mut node);
            let log = fs::read_to_string(env.log()).unwrap_or_default();
            if panicked(&log) {
                problems.push(format!("the node panicked:\n{}", tail(&log)));
            }
            let withdrew_in_log = log.contains("withdrawing from the filesystem");
            match (st, &w.snapshot) {
                (None, _) if !hung => problems.push(format!("the node did not exit within {EXIT_TIMEOUT:?} of the unmount:\n{}", tail(&log))),
                (Some(st), Some(_)) if st.code() != Some(1) => problems.push(format!("a withdrawn node exited with {st}, want 1")),
                (Some(st), None) if st.code() != Some(0) && !(st.code() == Some(1) && withdrew_in_log) => problems.push(format!("the node exited with {st}:\n{}", tail(&log))),
                _ => {}
            }
            if let Some(snap) = &w.snapshot {
                let now = fs::read(&env.img).unwrap();
                if &now != snap {
                    problems.push(format!("the device was written after the withdraw (reason: {:?}); blocks changed: {:?}", w.withdraw_reason, diff_blocks(snap, &now, bs)));
                }
                "withdrawn during the walk".to_string()
            } else if withdrew_in_log {
                "withdrawn at unmount (or without an EIO)".to_string()
            } else if hung {
                "hung".to_string()
            } else {
                "no withdraw".to_string()
            }
        }
    };
    *t.by_outcome.entry(outcome.clone()).or_default() += 1;
    for k in &mt.kinds {
        let e = t.by_kind.entry(format!("{k:?}")).or_default();
        e.0 += 1;
        if outcome.starts_with("withdrawn") || outcome == "mount refused" {
            e.1 += 1;
        }
    }

    // fsck -y on what the node left: fixes or reports
    let (ycode, yout) = fsck_run(&env.img, "-y");
    *t.fsck_y.entry(ycode).or_default() += 1;
    if ![0, 1, 4, 5, 8].contains(&ycode) || panicked(&yout) {
        problems.push(format!("fsck -y exit {ycode}:\n{}", yout.lines().take(30).collect::<Vec<_>>().join("\n")));
    }
    if ycode == 0 || ycode == 1 {
        let (ncode, nout) = fsck_run(&env.img, "-n");
        if ncode != 0 {
            problems.push(format!("fsck -y said it fixed everything (exit {ycode}) but -n then exits {ncode}:\n-y:\n{}\n-n:\n{}", yout.lines().take(20).collect::<Vec<_>>().join("\n"), nout.lines().take(20).collect::<Vec<_>>().join("\n")));
        } else {
            // a repaired image mounts and reads without a withdraw
            match start(env) {
                Started::Mounted(mut node) => {
                    t.remounted_after_repair += 1;
                    let mut seen = 0;
                    let mut w = Walker { env, strict: false, w: Walk::default() };
                    w.walk_tree(&env.mnt, Path::new(""), 0, &mut seen, &Manifest::new());
                    if let Some(s) = node_status(env) {
                        if s["withdrawn"] == true {
                            problems.push(format!("after fsck -y said the image was repaired the node withdrew: {}", s["withdraw_reason"]));
                        }
                    }
                    if w.w.dead {
                        problems.push("the node died reading a repaired image".into());
                    }
                    let st = stop(env, &mut node);
                    let log = fs::read_to_string(env.log()).unwrap_or_default();
                    if panicked(&log) || st.is_none() {
                        problems.push(format!("reading the repaired image: exit {st:?}:\n{}", tail(&log)));
                    }
                }
                Started::Exited(st, log) => problems.push(format!("fsck -y said the image was repaired, the node refuses it ({st}):\n{}", tail(&log))),
                Started::Stuck(log) => problems.push(format!("repaired image: the node neither mounted nor exited:\n{}", tail(&log))),
            }
        }
    }
    if !problems.is_empty() {
        if let Ok(keep) = std::env::var("MCFS_CORRUPT_KEEP") {
            let p = Path::new(&keep).join(format!("{}-seed{seed}-iter{i}.img", base.name));
            let _ = fs::create_dir_all(&keep);
            let _ = fs::write(&p, &mt.bytes);
        }
        let mut v = vec![format!("[{} seed {seed} iteration {i}] {}", base.name, mt.what.join(" | "))];
        v.extend(problems.into_iter().map(|p| format!("    {p}")));
        return v;
    }
    Vec::new()
}

/// The end of a log, or where it panicked: the message and our frames.
fn tail(s: &str) -> String {
    let v: Vec<&str> = s.lines().collect();
    if let Some(i) = v.iter().position(|l| l.contains("panicked at")) {
        let mut out: Vec<&str> = v[i..(i + 3).min(v.len())].to_vec();
        out.extend(v[i..].iter().filter(|l| l.contains("mcfs_") && !l.contains(" at ")).take(8));
        return out.join("\n");
    }
    v[v.len().saturating_sub(12)..].join("\n")
}

/// Run `iters` images of `family` over both bases; report a table; fail on
/// any problem.
fn campaign(family: Family, default_iters: u64, default_seed: u64) {
    let iters = env_u64("MCFS_CORRUPT_ITERS").unwrap_or(default_iters);
    let seed = env_u64("MCFS_CORRUPT_SEED").unwrap_or(default_seed);
    let only = env_u64("MCFS_CORRUPT_ONLY");
    let work = mcfs_integration::tempdir();
    let t0 = Instant::now();
    let bases = [build_base(work.path(), "4k", 4096), build_base(work.path(), "1k", 1024)];
    let env = Env::new(&work.path().join("run"));
    let mut tally = Tally::default();
    let mut failures: Vec<Vec<String>> = Vec::new();
    let t1 = Instant::now();
    let mut ran = 0;
    for i in 0..iters {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let base = &bases[(i % 2) as usize];
        let f = run_one(base, &env, family, seed, i, &mut tally);
        ran += 1;
        if !f.is_empty() {
            eprintln!("{}", f.join("\n"));
            failures.push(f);
        }
    }
    eprintln!("\n{ran} corrupted images (seed {seed}) in {:?} (bases built in {:?})", t1.elapsed(), t1 - t0);
    eprintln!("{:<44} {:>6}", "outcome", "images");
    for (k, v) in &tally.by_outcome {
        eprintln!("{k:<44} {v:>6}");
    }
    eprintln!("{:<44} {:>6} {:>12}", "mutation", "blocks", "withdrew");
    for (k, (n, w)) in &tally.by_kind {
        eprintln!("{k:<44} {n:>6} {w:>12}");
    }
    eprintln!("fsck -n exit codes {:?}; fsck -y exit codes {:?}; repaired images remounted and read: {}", tally.fsck_n, tally.fsck_y, tally.remounted_after_repair);
    let errs: Vec<String> = tally.errors.iter().map(|(e, n)| format!("{}: {n}", errno_name(*e))).collect();
    eprintln!("{} operations; errors: {}; {} operations after a withdraw (all EIO unless reported); EIO without a withdraw: {}", tally.ops, errs.join(", "), tally.ops_after_withdraw, tally.eio_without_withdraw);
    eprintln!("{} notes (not failures){}", tally.notes.len(), if tally.notes.is_empty() { "" } else { ":" });
    for n in tally.notes.iter().take(20) {
        eprintln!("  {n}");
    }
    assert!(failures.is_empty(), "{} of {ran} images went wrong (all listed above); the first:\n{}", failures.len(), failures.iter().take(3).map(|f| f.join("\n")).collect::<Vec<_>>().join("\n"));
}

/// Bit flips, zeroed blocks, garbage, tampered headers, misdirected copies:
/// the node must detect every one it reads, answer right or EIO, withdraw,
/// and write nothing after.
#[test]
fn corrupted_images_checksum_failures() {
    campaign(Family::Undecodable, 200, 0xc0ff_ee00);
}

/// Fields, pointers, directory entries and bytes changed in blocks that are
/// re-sealed, so only the structures' own checks stand between them and the
/// node. (The panics it first found each have a focused reproducer below.)
#[test]
fn corrupted_images_resealed_fields() {
    campaign(Family::Resealed, 200, 0x5ea1_ed00);
}

// ---------------------------------------------------------------- focused reproducers

impl Base {
    fn block_mut<'a>(&self, bytes: &'a mut [u8], b: u64) -> &'a mut [u8] {
        let bs = self.bs as usize;
        &mut bytes[b as usize * bs..(b as usize + 1) * bs]
    }

    /// The rgrp header block whose data area holds block `b`.
    fn rgrp_header_of(&self, b: u64) -> u64 {
        let bs = self.bs as usize;
        self.meta
            .iter()
            .filter(|m| m.1 == BlockType::RgrpHeader as u16)
            .map(|m| m.0)
            .find(|&h| {
                let blk = &self.bytes[h as usize * bs..(h as usize + 1) * bs];
                let (start, n) = (get(blk, 48, 8), get(blk, 44, 4));
                b >= start && b < start + n
            })
            .unwrap()
    }
}

/// Mount `base` changed by `change`, run `action` (which must meet the
/// corruption), and check the withdraw: EIO, `mcfs status` withdrawn with a
/// reason, EIO for everything after, no panic, exit status 1, and not one
/// byte written to the device after the withdraw.
fn expect_withdraw(bs: u32, change: impl Fn(&Base, &mut Vec<u8>), action: impl Fn(&Path) -> io::Result<()>) {
    let work = mcfs_integration::tempdir();
    let base = build_base(work.path(), "focused", bs);
    let env = Env::new(&work.path().join("run"));
    let mut bytes = base.bytes.clone();
    change(&base, &mut bytes);
    fs::write(&env.img, &bytes).unwrap();
    let Started::Mounted(mut node) = start(&env) else { panic!("did not mount:\n{}", tail(&fs::read_to_string(env.log()).unwrap_or_default())) };
    let r = action(&env.mnt);
    let log = fs::read_to_string(env.log()).unwrap_or_default();
    assert!(!panicked(&log), "the node panicked:\n{}", tail(&log));
    assert_eq!(r.as_ref().map_err(|e| e.raw_os_error()).err(), Some(Some(libc::EIO)), "the operation meeting the corruption: {r:?}");
    let st = node_status(&env).expect("mcfs status answers");
    assert_eq!(st["withdrawn"], true, "{st}");
    assert!(st["withdraw_reason"].as_str().is_some_and(|s| !s.is_empty()), "{st}");
    let snap = fs::read(&env.img).unwrap();
    for (what, r) in [("stat", fs::metadata(env.mnt.join("small")).map(|_| ())), ("read", read_file(&env.mnt.join("blocks")).map(|_| ())), ("write", fs::write(env.mnt.join("new"), b"x"))] {
        assert_eq!(r.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)), "{what} after the withdraw");
    }
    let st = stop(&env, &mut node);
    let log = fs::read_to_string(env.log()).unwrap_or_default();
    assert!(!panicked(&log), "the node panicked:\n{}", tail(&log));
    assert_eq!(st.and_then(|s| s.code()), Some(1), "a withdrawn node exits 1:\n{}", tail(&log));
    let now = fs::read(&env.img).unwrap();
    assert!(now == snap, "blocks written after the withdraw: {:?}", diff_blocks(&snap, &now, bs as usize));
}

/// A dinode whose `blocks` field is absurd (re-sealed, so the checksum holds).
/// mcfs-node: `attr_of` computes `(blocks + 1) * (bs / 512)` and panics with
/// an arithmetic overflow in the FUSE thread; the session ends and the daemon
/// then unmounts "cleanly" and exits 0.
#[test]
fn dinode_with_an_impossible_block_count() {
    expect_withdraw(
        4096,
        |base, bytes| {
            let blk = base.block_mut(bytes, base.inos[Path::new("small")]);
            put(blk, 56, 8, u64::MAX - 1);
            header::reseal(blk);
        },
        |m| fs::metadata(m.join("small")).map(|_| ()),
    );
}

/// An rgrp header whose dinode count disagrees with its bitmap (0 while the
/// bitmap has dinodes). Unlinking a file there: `set_block_states` does
/// `hdr.dinodes -= 1` after it already changed the bitmap buffer, and panics
/// with an underflow inside the transaction.
#[test]
fn rgrp_counters_that_disagree_with_the_bitmap() {
    expect_withdraw(
        4096,
        |base, bytes| {
            let h = base.rgrp_header_of(base.inos[Path::new("small")]);
            let blk = base.block_mut(bytes, h);
            put(blk, 60, 4, 0);
            header::reseal(blk);
        },
        |m| fs::remove_file(m.join("small")),
    );
}

/// Bit flips in a file's dinode: the node withdraws at the first read of it.
/// (This one passes: the checksum catches it.)
#[test]
fn dinode_that_fails_its_checksum() {
    expect_withdraw(
        1024,
        |base, bytes| {
            let blk = base.block_mut(bytes, base.inos[Path::new("d1/d2/mid")]);
            blk[200] ^= 0x10;
        },
        |m| read_file(&m.join("d1/d2/mid")).map(|_| ()),
    );
}

/// Both superblocks unreadable: the node refuses to mount with a clear error
/// (exit 1, no panic) and fsck reports an operational error (8). Only the
/// primary damaged: the node mounts from the backup and fsck -y restores the
/// primary.
#[test]
fn damaged_superblocks() {
    let work = mcfs_integration::tempdir();
    let base = build_base(work.path(), "sb", 4096);
    let env = Env::new(&work.path().join("run"));
    let sbs: Vec<u64> = base.meta.iter().filter(|m| m.1 == BlockType::Superblock as u16).map(|m| m.0).collect();
    assert_eq!(sbs.len(), 2, "primary and backup superblock");
    let mut both = base.bytes.clone();
    for b in &sbs {
        base.block_mut(&mut both, *b)[40] ^= 1;
    }
    fs::write(&env.img, &both).unwrap();
    match start(&env) {
        Started::Exited(st, log) => {
            assert_eq!(st.code(), Some(1), "{log}");
            assert!(!panicked(&log) && log.contains("not a usable mcfs filesystem"), "{log}");
        }
        Started::Mounted(_) => panic!("mounted an image without a valid superblock"),
        Started::Stuck(log) => panic!("stuck: {log}"),
    }
    assert_eq!(fs::read(&env.img).unwrap(), both, "a refused mount writes nothing");
    let (code, out) = fsck_run(&env.img, "-n");
    assert_eq!(code, 8, "{out}");
    let (code, out) = fsck_run(&env.img, "-y");
    assert!(code == 8 && !panicked(&out), "{out}");

    let mut primary = base.bytes.clone();
    base.block_mut(&mut primary, sbs[0]).fill(0);
    fs::write(&env.img, &primary).unwrap();
    let Started::Mounted(mut node) = start(&env) else { panic!("no mount from the backup superblock:\n{}", fs::read_to_string(env.log()).unwrap_or_default()) };
    assert_eq!(read_file(&env.mnt.join("blocks")).unwrap(), match &base.manifest[Path::new("blocks")] {
        Expect::File(c) => c.clone(),
        _ => unreachable!(),
    });
    assert!(stop(&env, &mut node).is_some_and(|s| s.success()));
    assert!(fs::read_to_string(env.log()).unwrap_or_default().contains("backup"), "the node says it used the backup");
    let (code, out) = fsck_run(&env.img, "-y");
    assert_eq!(code, 1, "{out}");
    let (code, out) = fsck_run(&env.img, "-n");
    assert_eq!(code, 0, "{out}");
}

/// An rgrp header whose generation (header `seq`) is at u64::MAX, re-sealed:
/// the node's next allocation there withdraws instead of wrapping it.
#[test]
fn rgrp_generation_at_its_limit_node() {
    expect_withdraw(
        4096,
        |base, bytes| {
            let h = base.rgrp_header_of(base.root_ino());
            let blk = base.block_mut(bytes, h);
            put(blk, 16, 8, u64::MAX);
            header::reseal(blk);
        },
        |m| fs::write(m.join("needs-a-block"), vec![7u8; 10_000]),
    );
}

/// The same image given to fsck.mcfs: `-n` reports it, `-y` restarts the
/// rgrp's generations at 1 and a second `-n` is clean.
#[test]
fn rgrp_generation_at_its_limit_fsck() {
    let work = mcfs_integration::tempdir();
    let base = build_base(work.path(), "gen", 4096);
    let img = work.path().join("gen.img");
    let mut bytes = base.bytes.clone();
    let h = base.rgrp_header_of(base.root_ino());
    let blk = base.block_mut(&mut bytes, h);
    put(blk, 16, 8, u64::MAX);
    header::reseal(blk);
    fs::write(&img, &bytes).unwrap();
    let (code, out) = fsck_run(&img, "-n");
    assert!(code == 4 && !panicked(&out) && out.contains("generation at its limit"), "fsck -n: exit {code}\n{}", tail(&out));
    let (code, out) = fsck_run(&img, "-y");
    assert!(code == 1 && !panicked(&out), "fsck -y: exit {code}\n{}", tail(&out));
    let (code, out) = fsck_run(&img, "-n");
    assert_eq!(code, 0, "fsck -n after the repair\n{}", tail(&out));
}

impl Base {
    /// The root directory's inode number, from the primary superblock.
    fn root_ino(&self) -> u64 {
        let sb = self.meta.iter().filter(|m| m.1 == BlockType::Superblock as u16).map(|m| m.0).min().unwrap();
        let bs = self.bs as usize;
        get(&self.bytes[sb as usize * bs..(sb as usize + 1) * bs], 112, 8)
    }
}
