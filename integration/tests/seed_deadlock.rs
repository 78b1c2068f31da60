//! The scenario of the 2016 linux-fsdevel thread, over real daemons and mounts.
//!
//! 1. Node C creates and writes files in the resource group it keeps locked.
//! 2. Node A opens and reads them (its cache holds them); node B unlinks them
//!    while A still has them, so only A's eviction can deallocate them, and
//!    deallocation needs C's rgrp lock. B leaves cleanly; C writes more and so
//!    holds that rgrp glock in EX again.
//! 3. A's files are closed and forgotten by its kernel: unused inodes on A's
//!    LRU. A's memory budget (3 MiB) is filled to just under its low watermark.
//! 4. C is SIGKILLed. A, the only survivor, must replay C's journal; replay
//!    charges A's budget, so A must reclaim, and reclaim meets the unlinked
//!    inodes whose deallocation needs the rgrp lock the dead C holds.
//! 5. nonblocking (default): reclaim defers them, recovery completes, the
//!    deferred deallocations then complete; statfs and fsck agree.
//! 6. sync (GFS2's behaviour): reclaim blocks on C's lock, recovery never
//!    finishes, and A's status says what reclaim is blocked on.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use mcfs_integration::{fsck, wait_for, TestCluster};
use serde_json::Value;

const FILES: usize = 24;
const FILL: usize = 120;
const A: u32 = 1;
const B: u32 = 2;
const C: u32 = 3;

fn status(tc: &TestCluster) -> Value {
    let out = std::process::Command::new(mcfs_integration::bin("mcfs")).args(["status", "--json", "--cluster-dir"]).arg(&tc.c.f.dir).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn node_status(tc: &TestCluster, n: u32) -> Value {
    let v = status(tc);
    v["nodes"].as_array().into_iter().flatten().find(|x| x["node"].as_u64() == Some(n as u64)).map(|x| x["status"].clone()).unwrap_or(Value::Null)
}

fn recovery_released(tc: &TestCluster, node: u32) -> bool {
    status(tc)["lock_server"]["lockspaces"][0]["recoveries"].as_array().into_iter().flatten().any(|r| r["node"].as_u64() == Some(node as u64) && r["state"].as_str() == Some("Released"))
}

fn write_sync(p: &Path, data: &[u8]) {
    let mut f = fs::File::create(p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn drop_kernel_caches() {
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
}

/// drop_caches is machine-wide: the two variants (and any other test that
/// drops the kernel's caches) must not run their setups at the same time.
fn exclusive() -> std::fs::File {
    let f = fs::OpenOptions::new().create(true).write(true).truncate(false).open("/tmp/mcfs-drop-caches.lock").unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an open descriptor.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

struct Setup {
    _excl: std::fs::File,
    tc: TestCluster,
    fsynced_by_c: Vec<(String, Vec<u8>)>,
    free_before_unlink: u64,
}

/// Steps 1-3; returns with A's budget just under its low watermark.
fn setup(mode: &str) -> Setup {
    let excl = exclusive();
    let (dir, mut o) = TestCluster::options(3);
    o.per_node_args.insert(A, vec!["--cache-mem".into(), "3M".into(), "--evict".into(), mode.into()]);
    let tc = TestCluster::up(dir, &o).unwrap();
    let (a, b, c) = (tc.mnt(A), tc.mnt(B), tc.mnt(C));
    let free0 = nix_statvfs_free(&a);
    // A's own files, written first: later read back to fill A's budget
    fs::create_dir(a.join("afill")).unwrap();
    for i in 0..FILL {
        write_sync(&a.join(format!("afill/{i}")), &vec![i as u8; 24576]);
    }
    // 1. C writes files
    fs::create_dir(c.join("seed")).unwrap();
    let mut fsynced = Vec::new();
    for i in 0..FILES {
        let data: Vec<u8> = (0..16384u32).map(|x| (x as usize * 7 + i) as u8).collect();
        write_sync(&c.join(format!("seed/f{i}")), &data);
        // a second name: see below
        fs::hard_link(c.join(format!("seed/f{i}")), c.join(format!("seed/h{i}"))).unwrap();
    }
    // 2. A reads them all (its cache holds them; none stays open)
    for i in 0..FILES {
        assert_eq!(fs::read(a.join(format!("seed/f{i}"))).unwrap().len(), 16384);
    }
    // C forgets them (its kernel and its own cache): only A has them in memory
    drop_kernel_caches();
    wait_for("C to drop its inodes", Duration::from_secs(10), || {
        mcfs_cli::proc_util::signal(tc.c.node_pid(C).unwrap(), libc::SIGUSR1);
        (node_status(&tc, C)["eviction"]["cached_inodes"].as_u64().unwrap_or(99) <= 3).then_some(())
    })
    .unwrap();
    // A's kernel caches them under both names (f last)
    for i in 0..FILES {
        fs::metadata(a.join(format!("seed/h{i}"))).unwrap();
        fs::metadata(a.join(format!("seed/f{i}"))).unwrap();
    }
    // B unlinks both names while A has them cached. When B then tries to
    // deallocate, A is asked to let go: it asks its kernel to drop the name it
    // knows (f), but the kernel still holds the h dentry, so A reports the
    // inode in use and keeps the duty; B gives up after its retries.
    for i in 0..FILES {
        fs::remove_file(b.join(format!("seed/f{i}"))).unwrap();
        fs::remove_file(b.join(format!("seed/h{i}"))).unwrap();
    }
    let free_before_unlink = free0;
    wait_for("B to hand the deallocations over", Duration::from_secs(20), || (node_status(&tc, B)["eviction"]["deferred_now"].as_u64() == Some(0)).then_some(())).unwrap();
    tc.c.stop(B).unwrap();
    // C writes more: it holds the rgrp of the unlinked inodes in EX again
    for i in 0..8 {
        let data: Vec<u8> = (0..8192u32).map(|x| (x as usize * 13 + i) as u8).collect();
        write_sync(&c.join(format!("seed/c{i}")), &data);
        fsynced.push((format!("seed/c{i}"), data));
    }
    // 3. A's kernel forgets them: unused inodes on A's LRU
    drop_kernel_caches();
    wait_for("A to hold the unlinked inodes unused", Duration::from_secs(10), || (node_status(&tc, A)["eviction"]["unused_inodes"].as_u64().unwrap_or(0) >= FILES as u64).then_some(())).unwrap();
    // fill A's budget to just under its low watermark with its own cached
    // data, so that replay's first 1 MiB read goes over the limit
    let mut i = 0;
    loop {
        let m = node_status(&tc, A)["memory"].clone();
        let (used, low) = (m["used"].as_u64().unwrap(), m["low_watermark"].as_u64().unwrap());
        if used + 60_000 >= low || i >= FILL {
            eprintln!("A's budget: used {used} of low watermark {low}, limit {}", m["limit"]);
            break;
        }
        let _ = fs::read(a.join(format!("afill/{i}"))).unwrap();
        i += 1;
    }
    let st = node_status(&tc, A);
    let ev = &st["eviction"];
    assert_eq!(ev["deferred_total"].as_u64(), Some(0), "nothing may have been evicted before the kill: {ev}");
    assert_eq!(st["ops"]["inodes_deallocated"].as_u64(), Some(0), "nothing may have been deallocated before the kill: {st}");
    assert!(st["memory"]["used"].as_u64().unwrap() + (1 << 20) > st["memory"]["limit"].as_u64().unwrap(), "replay's first read must go over the limit: {}", st["memory"]);
    Setup { _excl: excl, tc, fsynced_by_c: fsynced, free_before_unlink }
}

fn nix_statvfs_free(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bfree as u64
}

#[test]
fn nonblocking_eviction_lets_recovery_finish() {
    let s = setup("nonblocking");
    let tc = &s.tc;
    let t = Instant::now();
    tc.c.kill(C).unwrap();
    wait_for("C's recovery to complete", Duration::from_secs(30), || recovery_released(tc, C).then_some(())).unwrap();
    let took = t.elapsed();
    let st = node_status(tc, A);
    eprintln!("recovery after kill: {took:?}; A: memory {} eviction {}", st["memory"], st["eviction"]);
    assert!(st["memory"]["direct_reclaims"].as_u64().unwrap_or(0) > 0, "replay must have needed reclaim: {}", st["memory"]);
    assert!(st["eviction"]["deferred_total"].as_u64().unwrap_or(0) > 0, "reclaim must have met the unlinked inodes and deferred them");
    assert_eq!(st["eviction"]["sleep_violations"].as_u64(), Some(0));
    // every fsynced byte of C is readable on A
    for (name, data) in &s.fsynced_by_c {
        assert_eq!(&fs::read(tc.mnt(A).join(name)).unwrap(), data, "{name}");
    }
    // the deferred deallocations complete once C's locks are released
    wait_for("deferred deallocations to complete", Duration::from_secs(30), || {
        let e = node_status(tc, A)["eviction"].clone();
        (e["deferred_now"].as_u64() == Some(0) && e["deferred_completed"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .unwrap();
    let st = node_status(tc, A);
    let longest_ms = st["memory"]["longest_alloc_wait_us"].as_u64().unwrap_or(0) / 1000;
    eprintln!("longest allocation wait on A: {longest_ms} ms; deallocated {}", st["ops"]["inodes_deallocated"]);
    assert!(longest_ms < 5000, "an allocation waited {longest_ms} ms: reclaim must not wait for the dead node");
    // the unlinked inodes' space is free again (statfs agrees)
    for (name, _) in &s.fsynced_by_c {
        fs::remove_file(tc.mnt(A).join(name)).unwrap();
    }
    for i in 0..FILL {
        fs::remove_file(tc.mnt(A).join(format!("afill/{i}"))).unwrap();
    }
    fs::remove_dir(tc.mnt(A).join("afill")).unwrap();
    wait_for("space to be freed", Duration::from_secs(20), || (nix_statvfs_free(&tc.mnt(A)) + 2 >= s.free_before_unlink).then_some(())).unwrap();
    tc.c.stop(A).unwrap();
    let (code, out) = fsck(&tc.c.device());
    assert_eq!(code, 0, "fsck:\n{out}");
}

#[test]
fn sync_eviction_deadlocks_as_in_gfs2() {
    let s = setup("sync");
    let tc = &s.tc;
    tc.c.kill(C).unwrap();
    // recovery never finishes: reclaim on A waits for a lock the dead C holds
    let released = wait_for("C's recovery", Duration::from_secs(15), || recovery_released(tc, C).then_some(()));
    assert!(released.is_err(), "with --evict=sync the seed deadlock must reproduce");
    let st = node_status(tc, A);
    let blocked = st["eviction"]["reclaim_blocked_on"].as_str().unwrap_or("").to_string();
    eprintln!("A's reclaim is blocked on: {blocked}");
    assert!(blocked.starts_with("rgrp/") || blocked.starts_with("inode/"), "status must name the lock reclaim waits for: {}", st["eviction"]);
    // tear down: the stuck node must be killed (TestCluster's drop does the rest)
    let _ = tc.c.kill(A);
}
