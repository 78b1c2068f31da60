//! Speed run: build a filesystem with many files through the node library on a
//! sparse image (or a block device), then time `mcfs_fsck::check` on it through
//! io_uring + O_DIRECT, and print a table. Not a test: numbers, not assertions.
//!
//! ```text
//! cargo run --release -p mcfs-fsck --example bench_fsck -- [--image PATH] [--size 10G]
//!     [--files 100000] [--dirs 100] [--big-mib 1024] [--reuse] [--keep]
//! ```
//! `--reuse` checks an image an earlier run left (with `--keep`) without
//! rebuilding it; PATH may be a block device (e.g. a loop device over the image).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcfs_blockdev::BlockDevice;
use mcfs_format::geometry::MkfsOptions;
use mcfs_format::sb::LockProto;
use mcfs_fsck::{check, Options};
use mcfs_node::glock::NoLock;
use mcfs_node::mkfs::{mkfs, MkfsParams};
use mcfs_node::ops::Caller;
use mcfs_node::{Fs, MountOptions};

struct Args {
    image: String,
    size: u64,
    files: u64,
    dirs: u64,
    big_mib: u64,
    reuse: bool,
    keep: bool,
}

fn parse() -> Args {
    let mut a = Args { image: "/tmp/mcfs-fsck-bench.img".into(), size: 10 << 30, files: 100_000, dirs: 100, big_mib: 1024, reuse: false, keep: false };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().expect("missing value");
        match k.as_str() {
            "--image" => a.image = v(),
            "--size" => {
                let s = v();
                let (n, m) = match s.chars().last() {
                    Some('G') => (&s[..s.len() - 1], 1u64 << 30),
                    Some('M') => (&s[..s.len() - 1], 1 << 20),
                    _ => (s.as_str(), 1),
                };
                a.size = n.parse::<u64>().expect("size") * m;
            }
            "--files" => a.files = v().parse().expect("files"),
            "--dirs" => a.dirs = v().parse().expect("dirs"),
            "--big-mib" => a.big_mib = v().parse().expect("big-mib"),
            "--reuse" => a.reuse = true,
            "--keep" => a.keep = true,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn build(a: &Args) -> Duration {
    let t0 = Instant::now();
    let is_file = std::fs::metadata(&a.image).map(|m| m.is_file()).unwrap_or(true);
    if is_file {
        let f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&a.image).expect("create image");
        f.set_len(a.size).expect("size image");
    }
    // Buffered I/O to build: the page cache makes the many small writes cheap.
    let dev: Arc<dyn BlockDevice> = Arc::new(mcfs_blockdev::FileDevice::open(&a.image, false, None).expect("open"));
    let p = MkfsParams {
        opts: MkfsOptions { journals: 2, journal_bytes: 128 << 20, ..Default::default() },
        lock_proto: LockProto::NoLock,
        cluster: "bench".into(),
        fsname: "fsck".into(),
        uuid: None,
    };
    mkfs(dev.as_ref(), &p, &mut |_, _| {}).expect("mkfs");
    let fs = Fs::mount(dev.clone(), Arc::new(NoLock::default()), MountOptions { cache_mem: 1 << 30, ..Default::default() }).expect("mount");
    fs.instantiate_root().expect("root");
    let c = Caller::ROOT;
    let root = fs.root_ino();
    let per_dir = a.files.div_ceil(a.dirs);
    let mut made = 0u64;
    let small = vec![0x42u8; 1000];
    let block = vec![0x17u8; 4096 * 3];
    let medium = vec![0x99u8; 40 << 10];
    for d in 0..a.dirs {
        let dir = fs.mkdir(root, format!("dir-{d:04}").as_bytes(), 0o755, c).expect("mkdir").ino;
        for i in 0..per_dir {
            if made >= a.files {
                break;
            }
            let f = fs.create(dir, format!("file-{i:06}.dat").as_bytes(), 0o644, c).expect("create");
            // half inline, 40% a few blocks, 10% 40 KiB
            let data: &[u8] = match i % 10 {
                0..=4 => &small,
                5..=8 => &block[..4096 * (1 + (i as usize % 3))],
                _ => &medium,
            };
            fs.write(f.ino, 0, data).expect("write");
            fs.release(f.ino);
            fs.forget(f.ino, 1);
            made += 1;
        }
        fs.forget(dir, 1);
        if d % 10 == 9 {
            eprintln!("  built {made} files in {:.1} s", t0.elapsed().as_secs_f64());
        }
    }
    // a few big files: multi-level pointer trees
    let chunk = vec![0x5au8; 1 << 20];
    for b in 0..4 {
        let f = fs.create(root, format!("big-{b}").as_bytes(), 0o644, c).expect("create big").ino;
        for m in 0..a.big_mib / 4 {
            fs.write(f, m << 20, &chunk).expect("write big");
        }
        fs.release(f);
    }
    fs.unmount().expect("unmount");
    t0.elapsed()
}

fn main() {
    let a = parse();
    let build_time = if a.reuse { Duration::ZERO } else { build(&a) };
    // Drop the image's pages from the page cache so the check reads the disk.
    let _ = std::process::Command::new("sh").arg("-c").arg("sync; echo 1 > /proc/sys/vm/drop_caches").status();
    let dev = mcfs_blockdev::open_path(&a.image, true).expect("open for check");
    let t0 = Instant::now();
    let r = check(&dev, &Options::default());
    let took = t0.elapsed();
    let s = &r.stats;
    println!();
    println!("| what                         | value |");
    println!("|------------------------------|-------|");
    println!("| image                        | {} ({:.1} GiB) |", a.image, dev.size() as f64 / (1u64 << 30) as f64);
    if !a.reuse {
        println!("| build time (node library)    | {:.1} s |", build_time.as_secs_f64());
    }
    println!("| inodes                       | {} ({} dirs, {} files) |", s.inodes, s.directories, s.files);
    println!("| data blocks in use           | {} of {} |", s.blocks_in_use, s.data_blocks);
    println!("| fsck -n time                 | {:.3} s |", took.as_secs_f64());
    println!("| bytes read                   | {:.1} MiB in {} requests |", s.bytes_read as f64 / (1 << 20) as f64, s.read_requests);
    println!("| exit code                    | {} ({} findings) |", r.exit_code(), r.findings.len());
    for f in r.findings.iter().take(5) {
        println!("  {:?}: {}", f.kind, f.message);
    }
    if !a.keep && !a.reuse {
        let _ = std::fs::remove_file(&a.image);
    }
}
