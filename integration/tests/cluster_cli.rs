//! `mcfs cluster up/kill/start/down` and `mcfs status` as a user runs them: the
//! real `mcfs` binary (debug build, `MCFS_SKIP_BUILD` so it does not rebuild),
//! real daemons, loop device and FUSE mounts. After `down` nothing of the
//! cluster directory may be left on the machine: no mount under it, no loop
//! device backed by its image, no process whose command line names it.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use mcfs_integration::ops::{leftovers, mcfs, run, wait_pid_gone, ClusterDirGuard, Out};
use mcfs_integration::{bin, tempdir, wait_for};
use serde_json::Value;

fn mcfs_in(dir: &Path, args: &[&str]) -> Out {
    run(mcfs(args).arg("--dir").arg(dir)).unwrap()
}

fn status(dir: &Path) -> Value {
    let o = run(mcfs(&["status", "--json", "--cluster-dir"]).arg(dir)).unwrap();
    assert!(o.ok(), "mcfs status: {}", o.text);
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("status --json is JSON ({e}): {}", o.stdout))
}

fn assert_nothing_left(dir: &Path) {
    let left = leftovers(dir);
    assert!(left.is_empty(), "left behind by {}:\n{}", dir.display(), left.join("\n"));
}

fn pid_of(dir: &Path, file: &str) -> u32 {
    fs::read_to_string(dir.join(file)).unwrap().trim().parse().unwrap()
}

#[test]
fn up_write_read_kill_fence_replay_start_down_leaves_nothing() {
    let t = tempdir();
    let d = t.path().join("c");
    let _guard = ClusterDirGuard(d.clone());

    let o = run(mcfs(&["cluster", "up", "--nodes", "3", "--size", "1G", "--dir"]).arg(&d)).unwrap();
    assert!(o.ok(), "cluster up: {}", o.text);
    assert!(!o.text.contains("building the daemons"), "MCFS_SKIP_BUILD: no nested cargo build");
    for n in 1..=3 {
        assert!(o.text.contains(&d.join(format!("mnt/node{n}")).display().to_string()), "up prints where node {n} is mounted:\n{}", o.text);
    }
    assert!(o.text.contains("mcfs cluster down"), "up says how to stop:\n{}", o.text);
    for f in ["cluster.toml", "secret", "fence.toml", "node1.toml", "node3.toml", "logs/dlm.log", "logs/fenced.log", "logs/node2.log"] {
        assert!(d.join(f).exists(), "{f} in the cluster directory");
    }

    // written on node 1, read on node 3
    fs::write(d.join("mnt/node1/hello"), b"hello from node 1\n").unwrap();
    assert_eq!(fs::read(d.join("mnt/node3/hello")).unwrap(), b"hello from node 1\n");
    let v = status(&d);
    let members = v["lock_server"]["lockspaces"][0]["members"].as_array().unwrap().clone();
    assert_eq!(members.iter().filter(|m| m["state"] == "active").count(), 3, "{v:#}");
    assert_eq!(v["nodes"].as_array().unwrap().len(), 3, "every node's admin status: {v:#}");

    // node 2 crashes: it is fenced, its journal replayed, its locks released
    let o = mcfs_in(&d, &["cluster", "kill", "2"]);
    assert!(o.ok() && o.text.contains("killed"), "cluster kill 2: {}", o.text);
    let v = wait_for("node 2 fenced and its recovery released", Duration::from_secs(30), || {
        let v = status(&d);
        let fenced = v["fencing"]["history"].as_array()?.iter().any(|h| h["node"] == 2 && h["kind"] == "fence" && h["outcome"] == "Success");
        let released = v["lock_server"]["lockspaces"][0]["recoveries"].as_array()?.iter().any(|r| r["node"] == 2 && r["state"] == "Released");
        (fenced && released).then_some(v)
    })
    .unwrap_or_else(|e| panic!("{e}; last status:\n{:#}", status(&d)));
    let fence = v["fencing"]["history"].as_array().unwrap().iter().find(|h| h["node"] == 2).unwrap().clone();
    assert_eq!(fence["method"], "process", "{fence:#}");
    // the human form says the same at a glance
    let o = run(mcfs(&["status", "--cluster-dir"]).arg(&d)).unwrap();
    assert!(o.text.contains("recovery of node 2") && o.text.contains("Released"), "{}", o.text);
    assert!(o.text.contains("fence node 2: Success by process"), "{}", o.text);
    // survivors carry on
    assert_eq!(fs::read(d.join("mnt/node3/hello")).unwrap(), b"hello from node 1\n");
    fs::write(d.join("mnt/node3/after"), b"written while node 2 was down").unwrap();

    // node 2 comes back (unfenced by `start`) and sees everything
    let o = mcfs_in(&d, &["cluster", "start", "2"]);
    assert!(o.ok(), "cluster start 2: {}", o.text);
    assert_eq!(fs::read(d.join("mnt/node2/after")).unwrap(), b"written while node 2 was down");
    let v = status(&d);
    assert_eq!(v["nodes"].as_array().unwrap().len(), 3, "{v:#}");

    let o = mcfs_in(&d, &["cluster", "down"]);
    assert!(o.ok(), "cluster down: {}", o.text);
    assert_nothing_left(&d);
    // down again: nothing to do, still fine
    let o = mcfs_in(&d, &["cluster", "down"]);
    assert!(o.ok(), "second cluster down: {}", o.text);
    assert_nothing_left(&d);
    // every node unmounted cleanly: the image is consistent
    let (code, out) = mcfs_integration::fsck(&d.join("disk.img"));
    assert_eq!(code, 0, "fsck of the image after down:\n{out}");
}

#[test]
fn up_refuses_a_running_cluster_and_down_cleans_up_after_sigkill_of_everything() {
    let t = tempdir();
    let d = t.path().join("c");
    let _guard = ClusterDirGuard(d.clone());
    let o = run(mcfs(&["cluster", "up", "--nodes", "2", "--size", "512M", "--dir"]).arg(&d)).unwrap();
    assert!(o.ok(), "cluster up: {}", o.text);

    // a second `up` in the same directory refuses and leaves the cluster alone
    let o = run(mcfs(&["cluster", "up", "--nodes", "2", "--size", "512M", "--dir"]).arg(&d)).unwrap();
    assert!(!o.ok());
    assert!(o.text.contains("already running") && o.text.contains("mcfs cluster down"), "{}", o.text);
    fs::write(d.join("mnt/node1/still"), b"up").unwrap();
    assert_eq!(fs::read(d.join("mnt/node2/still")).unwrap(), b"up");

    // every daemon dies at once: a half-dead cluster with stale FUSE mounts
    let cf = mcfs_cli::cluster::Cluster::open(&d).unwrap().f;
    let pids = [pid_of(&d, "node1.pid"), pid_of(&d, "node2.pid"), cf.dlm_pid.unwrap(), cf.fenced_pid.unwrap()];
    for p in &pids {
        // SAFETY: kill(2) on the daemons this test's cluster started.
        unsafe { libc::kill(*p as i32, libc::SIGKILL) };
    }
    for p in &pids {
        wait_pid_gone(*p, Duration::from_secs(10)).unwrap();
    }
    assert!(!leftovers(&d).is_empty(), "the stale mounts and the loop device are still there before down");

    let o = mcfs_in(&d, &["cluster", "down"]);
    assert!(o.ok(), "cluster down of a dead cluster: {}", o.text);
    assert_nothing_left(&d);
    let o = mcfs_in(&d, &["cluster", "down"]);
    assert!(o.ok(), "{}", o.text);
    assert_nothing_left(&d);
}

#[test]
fn up_refuses_with_a_reason_before_creating_anything() {
    let t = tempdir();
    let d = t.path().join("c");
    let _guard = ClusterDirGuard(d.clone());
    let refused = |args: &[&str], want: &[&str]| {
        let o = run(mcfs(&["cluster", "up"]).args(args).arg("--dir").arg(&d)).unwrap();
        assert_eq!(o.code, 1, "up {args:?}: {}", o.text);
        for w in want {
            assert!(o.text.contains(w), "up {args:?} should say {w:?}: {}", o.text);
        }
        assert!(!d.join("cluster.toml").exists(), "up {args:?} created a cluster");
        assert_nothing_left(&d);
    };
    refused(&["--bin-dir", "/nonexistent/mcfs-bin"], &["/nonexistent/mcfs-bin", "mcfs-node", "mcfs-dlm", "mcfs-fenced", "--bin-dir"]);
    refused(&["--size", "lots"], &["--size", "not a size"]);
    refused(&["--nodes", "0"], &["--nodes must be between 1 and 16"]);

    // the mcfs binary alone, away from the workspace (as if copied to
    // /usr/local/bin): it does not build anything and says where the daemons must be
    let lone = t.path().join("bin");
    fs::create_dir(&lone).unwrap();
    if fs::hard_link(bin("mcfs"), lone.join("mcfs")).is_err() {
        fs::copy(bin("mcfs"), lone.join("mcfs")).unwrap();
    }
    let o = run(std::process::Command::new(lone.join("mcfs")).args(["cluster", "up", "--dir"]).arg(&d).env_remove("MCFS_SKIP_BUILD").env_remove("MCFS_BIN_DIR")).unwrap();
    assert_eq!(o.code, 1, "{}", o.text);
    assert!(!o.text.contains("building"), "{}", o.text);
    assert!(o.text.contains(&lone.display().to_string()) && o.text.contains("mcfs-node") && o.text.contains("--bin-dir"), "{}", o.text);
    assert!(!d.join("cluster.toml").exists());
    assert_nothing_left(&d);
}
