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

use std::time::{Duration, Instant};

use mcfs_integration::seed::{check_after_nonblocking_recovery, exclusive, node_status, recovery_released, run_seed_steps};
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
    let (fsynced, free_before_unlink) = run_seed_steps(&tc, A, B, C, FILES, FILL);
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
