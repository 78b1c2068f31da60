//! Node failure end to end over real loop devices, daemons and mounts: a node
//! is SIGKILLed (or frozen) under load; mcfs-dlm fences it through mcfs-fenced;
//! a survivor replays its journal; the cluster carries on without losing a
//! committed byte.

use std::fs;
use std::time::{Duration, Instant};

use mcfs_integration::workload::{verify, Workload};
use mcfs_integration::{fsck, wait_for, TestCluster};

/// The recovery state of `node` as the lock server reports it.
fn recovery_state(tc: &TestCluster, node: u32) -> Option<String> {
    let out = std::process::Command::new(mcfs_integration::bin("mcfs"))
        .args(["status", "--json", "--cluster-dir"])
        .arg(&tc.c.f.dir)
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    // the newest recovery of that node (older, finished ones may still be listed)
    v["lock_server"]["lockspaces"][0]["recoveries"]
        .as_array()?
        .iter()
        .filter(|r| r["node"].as_u64() == Some(node as u64))
        .max_by_key(|r| r["failed_at_unix_ms"].as_u64().unwrap_or(0))
        .and_then(|r| r["state"].as_str().map(String::from))
}

/// Wait until the recovery of `node` that started after `since` is released.
fn wait_released(tc: &TestCluster, node: u32, since: std::time::SystemTime, timeout: Duration) {
    let since_ms = since.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    wait_for(&format!("recovery of node {node} released"), timeout, || {
        let out = std::process::Command::new(mcfs_integration::bin("mcfs")).args(["status", "--json", "--cluster-dir"]).arg(&tc.c.f.dir).output().ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let ok = v["lock_server"]["lockspaces"][0]["recoveries"].as_array()?.iter().any(|r| {
            r["node"].as_u64() == Some(node as u64) && r["failed_at_unix_ms"].as_u64().unwrap_or(0) + 5 >= since_ms && r["state"].as_str() == Some("Released")
        });
        ok.then_some(())
    })
    .unwrap();
}

fn stop_all_and_fsck(tc: &TestCluster) {
    for n in 1..=tc.c.f.nodes {
        if tc.c.node_pid(n).is_some() {
            tc.c.stop(n).unwrap();
        }
    }
    let (code, out) = fsck(&tc.c.device());
    assert_eq!(code, 0, "fsck after clean unmount:\n{out}");
}

#[test]
fn sigkill_under_mixed_workload_loses_nothing_fsynced() {
    let tc = TestCluster::start(3).unwrap();
    let w1 = Workload::start(&tc.mnt(1), "n1", 1);
    let w2 = Workload::start(&tc.mnt(2), "n2", 2);
    let w3 = Workload::start(&tc.mnt(3), "n3", 3);
    wait_for("node 2 to make durable progress", Duration::from_secs(30), || (w2.durable_ops() >= 25).then_some(())).unwrap();
    let t = Instant::now();
    tc.c.kill(2).unwrap();
    let (d2, err) = w2.finish();
    assert!(err.is_some(), "the workload on the killed node should have failed");
    // survivors resume: everything node 2 fsynced is readable on node 1, with
    // its content, once recovery released node 2's locks
    wait_for("node 2 recovery released", Duration::from_secs(15), || (recovery_state(&tc, 2).as_deref() == Some("Released")).then_some(())).unwrap();
    verify(&tc.mnt(1), &d2).unwrap();
    verify(&tc.mnt(3), &d2).unwrap();
    eprintln!("recovered and verified {} files of the dead node in {:?}", d2.files.len(), t.elapsed());
    // the survivors' own workloads kept going
    let before = (w1.durable_ops(), w3.durable_ops());
    wait_for("survivors to keep working", Duration::from_secs(15), || (w1.durable_ops() > before.0 + 5 && w3.durable_ops() > before.1 + 5).then_some(())).unwrap();
    let (d1, e1) = w1.finish();
    let (d3, e3) = w3.finish();
    assert!(e1.is_none() && e3.is_none(), "survivor workload failed: {e1:?} {e3:?}");
    verify(&tc.mnt(3), &d1).unwrap();
    verify(&tc.mnt(1), &d3).unwrap();
    // the dead node comes back and sees everything
    tc.c.start(2).unwrap();
    verify(&tc.mnt(2), &d1).unwrap();
    verify(&tc.mnt(2), &d2).unwrap();
    stop_all_and_fsck(&tc);
}

#[test]
fn frozen_node_is_fenced_by_lease_and_cannot_write_again() {
    let tc = TestCluster::start(2).unwrap();
    {
        let mut f = fs::File::create(tc.mnt(2).join("held")).unwrap();
        std::io::Write::write_all(&mut f, b"node 2 holds this").unwrap();
        f.sync_all().unwrap();
    }
    let pid = tc.c.node_pid(2).unwrap();
    // SIGSTOP: heartbeats stop, the stream stays open: only the lease notices
    mcfs_cli::proc_util::signal(pid, libc::SIGSTOP);
    let t = Instant::now();
    wait_for("frozen node 2 fenced and recovered", Duration::from_secs(20), || (recovery_state(&tc, 2).as_deref() == Some("Released")).then_some(())).unwrap();
    eprintln!("lease expiry to recovery: {:?}", t.elapsed());
    // process fencing killed it: resuming it writes nothing ever again
    mcfs_cli::proc_util::signal(pid, libc::SIGCONT);
    assert!(!mcfs_cli::proc_util::alive(pid), "a fenced node's process must be gone");
    assert_eq!(fs::read(tc.mnt(1).join("held")).unwrap(), b"node 2 holds this");
    fs::write(tc.mnt(1).join("held"), b"node 1 now").unwrap();
    tc.c.start(2).unwrap();
    assert_eq!(fs::read(tc.mnt(2).join("held")).unwrap(), b"node 1 now");
    stop_all_and_fsck(&tc);
}

#[test]
fn kill_loop_keeps_every_fsynced_byte() {
    let cycles: u32 = std::env::var("MCFS_KILL_CYCLES").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let tc = TestCluster::start(3).unwrap();
    let mut all = mcfs_integration::workload::Durable::default();
    let mut seed = 0x5eed_u64;
    for cycle in 0..cycles {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let victim = 1 + (seed >> 33) as u32 % 3;
        let ws: Vec<(u32, Workload)> = (1..=3).map(|n| (n, Workload::start(&tc.mnt(n), &format!("c{cycle}n{n}"), seed ^ n as u64))).collect();
        wait_for("some durable progress", Duration::from_secs(30), || ws.iter().all(|(_, w)| w.durable_ops() >= 3).then_some(())).unwrap();
        let killed_at = std::time::SystemTime::now();
        tc.c.kill(victim).unwrap();
        for (n, w) in ws {
            let (d, err) = w.finish();
            if n != victim {
                assert!(err.is_none(), "cycle {cycle}: survivor {n} failed: {err:?}");
            }
            all.extend(d);
        }
        let survivor = if victim == 1 { 2 } else { 1 };
        wait_released(&tc, victim, killed_at, Duration::from_secs(20));
        verify(&tc.mnt(survivor), &all).unwrap_or_else(|e| panic!("cycle {cycle} (killed node {victim}): {e}"));
        tc.c.start(victim).unwrap();
    }
    verify(&tc.mnt(1), &all).unwrap();
    stop_all_and_fsck(&tc);
}

#[test]
fn whole_cluster_crash_then_fresh_start_replays_everything() {
    let mut tc = TestCluster::start(2).unwrap();
    let w1 = Workload::start(&tc.mnt(1), "a", 11);
    let w2 = Workload::start(&tc.mnt(2), "b", 12);
    wait_for("durable progress", Duration::from_secs(30), || (w1.durable_ops() >= 10 && w2.durable_ops() >= 10).then_some(())).unwrap();
    // everything dies at once, the lock server and fencing agent too
    for n in 1..=2 {
        let _ = tc.c.kill(n);
    }
    tc.c.kill_dlm();
    let (d1, _) = w1.finish();
    let (d2, _) = w2.finish();
    // fresh start of the daemons on their data; the first mounter replays
    tc.c.start_dlm(None).unwrap();
    tc.c.start(1).unwrap();
    verify(&tc.mnt(1), &d1).unwrap();
    verify(&tc.mnt(1), &d2).unwrap();
    tc.c.start(2).unwrap();
    verify(&tc.mnt(2), &d1).unwrap();
    stop_all_and_fsck(&tc);
}

#[test]
fn dlm_restart_in_the_middle_of_a_recovery_resumes_it() {
    let mut tc = TestCluster::start(2).unwrap();
    {
        let mut f = fs::File::create(tc.mnt(2).join("x")).unwrap();
        std::io::Write::write_all(&mut f, b"from node 2").unwrap();
        f.sync_all().unwrap();
    }
    let fenced = tc.c.f.fenced_pid.unwrap();
    // a hung fencing agent: the recovery stops in FENCING
    mcfs_cli::proc_util::signal(fenced, libc::SIGSTOP);
    tc.c.kill(2).unwrap();
    wait_for("recovery stuck in fencing", Duration::from_secs(10), || (recovery_state(&tc, 2).as_deref() == Some("Fencing")).then_some(())).unwrap();
    // the lock server dies mid-recovery and comes back on its sled state
    tc.c.kill_dlm();
    tc.c.start_dlm(None).unwrap();
    mcfs_cli::proc_util::signal(fenced, libc::SIGCONT);
    wait_for("recovery resumed and finished", Duration::from_secs(30), || (recovery_state(&tc, 2).as_deref() == Some("Released")).then_some(())).unwrap();
    assert_eq!(fs::read(tc.mnt(1).join("x")).unwrap(), b"from node 2");
    fs::write(tc.mnt(1).join("y"), b"after").unwrap();
    tc.c.start(2).unwrap();
    assert_eq!(fs::read(tc.mnt(2).join("y")).unwrap(), b"after");
    stop_all_and_fsck(&tc);
}
