//! Pieces the seed-scenario and memory tests share (`seed_deadlock`,
//! `seed_cgroup`, `memory_budget`): cluster status queries, the machine-wide
//! drop_caches lock, /proc and statvfs readings, and the checks that follow a
//! nonblocking recovery.

// Test helpers fail the test on any unexpected error: that is their job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::{wait_for, TestCluster};

/// `mcfs status --json` of a cluster directory (Null if it does not answer).
pub fn status_of(cluster_dir: &Path) -> Value {
    let out = std::process::Command::new(crate::bin("mcfs")).args(["status", "--json", "--cluster-dir"]).arg(cluster_dir).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

pub fn status(tc: &TestCluster) -> Value {
    status_of(&tc.c.f.dir)
}

/// One node's part of [`status_of`].
pub fn node_status_of(cluster_dir: &Path, n: u32) -> Value {
    let v = status_of(cluster_dir);
    v["nodes"].as_array().into_iter().flatten().find(|x| x["node"].as_u64() == Some(n as u64)).map(|x| x["status"].clone()).unwrap_or(Value::Null)
}

pub fn node_status(tc: &TestCluster, n: u32) -> Value {
    node_status_of(&tc.c.f.dir, n)
}

/// Has the lock server released the dead `node`'s locks (recovery done)?
pub fn recovery_released(tc: &TestCluster, node: u32) -> bool {
    status(tc)["lock_server"]["lockspaces"][0]["recoveries"].as_array().into_iter().flatten().any(|r| r["node"].as_u64() == Some(node as u64) && r["state"].as_str() == Some("Released"))
}

pub fn write_sync(p: &Path, data: &[u8]) {
    let mut f = fs::File::create(p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Drop the kernel's dentries and inodes (machine-wide: hold [`exclusive`]).
pub fn drop_kernel_caches() {
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
}

/// drop_caches is machine-wide: tests that drop the kernel's caches in their
/// setups take this lock so that they do not run those setups at once.
pub fn exclusive() -> fs::File {
    let f = fs::OpenOptions::new().create(true).write(true).truncate(false).open("/tmp/mcfs-drop-caches.lock").unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an open descriptor.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

/// Free blocks of the filesystem mounted at `p`.
pub fn statvfs_free(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: zeroed plain-old-data out-parameter.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bfree as u64
}

/// A `kB` line of /proc/PID/status (`VmRSS:`, `VmHWM:`), in bytes (0 if gone).
pub fn proc_status_bytes(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok()))
        .unwrap_or(0)
        * 1024
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// After the dead node's recovery on survivor `a` (nonblocking eviction):
/// every byte the dead node fsynced is readable, the deferred deallocations
/// complete, no allocation waited long, and once the test's files (those,
/// and `afill/0..fill`) are removed the space is free again (statfs agrees
/// with `free_before`). Returns A's status after the deallocations.
pub fn check_after_nonblocking_recovery(tc: &TestCluster, a: u32, fsynced: &[(String, Vec<u8>)], fill: usize, free_before: u64) -> Value {
    for (name, data) in fsynced {
        assert_eq!(&fs::read(tc.mnt(a).join(name)).unwrap(), data, "{name}");
    }
    // the deferred deallocations complete once the dead node's locks are released
    wait_for("deferred deallocations to complete", Duration::from_secs(30), || {
        let e = node_status(tc, a)["eviction"].clone();
        (e["deferred_now"].as_u64() == Some(0) && e["deferred_completed"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .unwrap();
    let st = node_status(tc, a);
    let longest_ms = st["memory"]["longest_alloc_wait_us"].as_u64().unwrap_or(0) / 1000;
    eprintln!("longest allocation wait on node {a}: {longest_ms} ms; deallocated {}", st["ops"]["inodes_deallocated"]);
    assert!(longest_ms < 5000, "an allocation waited {longest_ms} ms: reclaim must not wait for the dead node");
    // the unlinked inodes' space is free again (statfs agrees)
    for (name, _) in fsynced {
        fs::remove_file(tc.mnt(a).join(name)).unwrap();
    }
    for i in 0..fill {
        fs::remove_file(tc.mnt(a).join(format!("afill/{i}"))).unwrap();
    }
    fs::remove_dir(tc.mnt(a).join("afill")).unwrap();
    wait_for("space to be freed", Duration::from_secs(20), || (statvfs_free(&tc.mnt(a)) + 2 >= free_before).then_some(())).unwrap();
    st
}

/// Fill node `a`'s memory budget to just under its low watermark by reading
/// its own files `afill/0..fill` (cached data), so that replay's first 1 MiB
/// read goes over the limit. First waits for the journal copies a's own
/// writes left in memory to be written back (a periodic checkpoint releases
/// them, and would otherwise release them in the middle of the scenario).
/// Returns a's memory status after the fill.
pub fn fill_budget_to_low_watermark(tc: &TestCluster, a: u32, fill: usize) -> Value {
    let mnt = tc.mnt(a);
    wait_for("node's journal copies to be written back", Duration::from_secs(20), || (node_status(tc, a)["log"]["ail_buffers"].as_u64() == Some(0)).then_some(())).unwrap();
    let mut i = 0;
    loop {
        let m = node_status(tc, a)["memory"].clone();
        let (used, low) = (m["used"].as_u64().unwrap(), m["low_watermark"].as_u64().unwrap());
        if used + 60_000 >= low || i >= fill {
            eprintln!("node {a}'s budget: used {used} of low watermark {low}, limit {}", m["limit"]);
            return m;
        }
        let _ = fs::read(mnt.join(format!("afill/{i}"))).unwrap();
        i += 1;
    }
}

/// Steps 1-3 of the seed scenario (see `seed_deadlock.rs`) on a running
/// 3-node cluster whose node `a` has a small budget: `a` writes its own files
/// `afill/0..fill`; `c` writes `seed/f*` (with second names `h*`), which `a`
/// reads; `b` unlinks them while `a` still has them, then stops; `c` writes
/// more (holding their rgrp again); `a`'s kernel forgets them, so they are
/// unused inodes on `a`'s LRU; `a`'s budget is filled to just under its low
/// watermark. Returns what `c` fsynced (name, bytes) and the free blocks
/// before the scenario.
pub fn run_seed_steps(tc: &TestCluster, a: u32, b: u32, c: u32, files: usize, fill: usize) -> (Vec<(String, Vec<u8>)>, u64) {
    let (ma, mb, mc) = (tc.mnt(a), tc.mnt(b), tc.mnt(c));
    let free0 = statvfs_free(&ma);
    // A's own files, written first: later read back to fill A's budget
    fs::create_dir(ma.join("afill")).unwrap();
    for i in 0..fill {
        write_sync(&ma.join(format!("afill/{i}")), &vec![i as u8; 24576]);
    }
    // 1. C writes files
    fs::create_dir(mc.join("seed")).unwrap();
    let mut fsynced = Vec::new();
    for i in 0..files {
        let data: Vec<u8> = (0..16384u32).map(|x| (x as usize * 7 + i) as u8).collect();
        write_sync(&mc.join(format!("seed/f{i}")), &data);
        // a second name: see below
        fs::hard_link(mc.join(format!("seed/f{i}")), mc.join(format!("seed/h{i}"))).unwrap();
    }
    // 2. A reads them all (its cache holds them; none stays open)
    for i in 0..files {
        assert_eq!(fs::read(ma.join(format!("seed/f{i}"))).unwrap().len(), 16384);
    }
    // C forgets them (its kernel and its own cache): only A has them in memory
    drop_kernel_caches();
    wait_for("C to drop its inodes", Duration::from_secs(10), || {
        mcfs_cli::proc_util::signal(tc.c.node_pid(c).unwrap(), libc::SIGUSR1);
        (node_status(tc, c)["eviction"]["cached_inodes"].as_u64().unwrap_or(99) <= 3).then_some(())
    })
    .unwrap();
    // A's kernel caches them under both names (f last)
    for i in 0..files {
        fs::metadata(ma.join(format!("seed/h{i}"))).unwrap();
        fs::metadata(ma.join(format!("seed/f{i}"))).unwrap();
    }
    // B unlinks both names while A has them cached. When B then tries to
    // deallocate, A is asked to let go: it asks its kernel to drop the name it
    // knows (f), but the kernel still holds the h dentry, so A reports the
    // inode in use and keeps the duty; B gives up after its retries.
    for i in 0..files {
        fs::remove_file(mb.join(format!("seed/f{i}"))).unwrap();
        fs::remove_file(mb.join(format!("seed/h{i}"))).unwrap();
    }
    wait_for("B to hand the deallocations over", Duration::from_secs(20), || (node_status(tc, b)["eviction"]["deferred_now"].as_u64() == Some(0)).then_some(())).unwrap();
    tc.c.stop(b).unwrap();
    // C writes more: it holds the rgrp of the unlinked inodes in EX again
    for i in 0..8 {
        let data: Vec<u8> = (0..8192u32).map(|x| (x as usize * 13 + i) as u8).collect();
        write_sync(&mc.join(format!("seed/c{i}")), &data);
        fsynced.push((format!("seed/c{i}"), data));
    }
    // 3. A's kernel forgets them: unused inodes on A's LRU
    drop_kernel_caches();
    wait_for("A to hold the unlinked inodes unused", Duration::from_secs(10), || (node_status(tc, a)["eviction"]["unused_inodes"].as_u64().unwrap_or(0) >= files as u64).then_some(())).unwrap();
    // fill A's budget to just under its low watermark with its own cached
    // data, so that replay's first 1 MiB read goes over the limit
    fill_budget_to_low_watermark(tc, a, fill);
    let st = node_status(tc, a);
    let ev = &st["eviction"];
    assert_eq!(ev["deferred_total"].as_u64(), Some(0), "nothing may have been evicted before the kill: {ev}");
    assert_eq!(st["ops"]["inodes_deallocated"].as_u64(), Some(0), "nothing may have been deallocated before the kill: {st}");
    assert!(st["memory"]["used"].as_u64().unwrap() + (1 << 20) > st["memory"]["limit"].as_u64().unwrap(), "replay's first read must go over the limit: {}", st["memory"]);
    (fsynced, free0)
}
