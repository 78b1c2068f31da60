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

#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::{Duration, Instant};

use mcfs_integration::seed::{check_after_nonblocking_recovery, drop_kernel_caches, fill_budget_to_low_watermark, exclusive, node_status, recovery_released, statvfs_free, write_sync};
use mcfs_integration::{fsck, wait_for, TestCluster};

const FILES: usize = 24;
const FILL: usize = 120;
const A: u32 = 1;
const B: u32 = 2;
const C: u32 = 3;

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
    let free0 = statvfs_free(&a);
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
    fill_budget_to_low_watermark(&tc, A, FILL);
    let st = node_status(&tc, A);
    let ev = &st["eviction"];
    assert_eq!(ev["deferred_total"].as_u64(), Some(0), "nothing may have been evicted before the kill: {ev}");
    assert_eq!(st["ops"]["inodes_deallocated"].as_u64(), Some(0), "nothing may have been deallocated before the kill: {st}");
    assert!(st["memory"]["used"].as_u64().unwrap() + (1 << 20) > st["memory"]["limit"].as_u64().unwrap(), "replay's first read must go over the limit: {}", st["memory"]);
    Setup { _excl: excl, tc, fsynced_by_c: fsynced, free_before_unlink }
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
    check_after_nonblocking_recovery(tc, A, &s.fsynced_by_c, FILL, s.free_before_unlink);
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
