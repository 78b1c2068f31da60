//! The real `mcfs-dlm` process, SIGKILLed and restarted on its sled state:
//! survivors reclaim their locks (same ids) in the grace window, a member that
//! does not come back is failed, fenced and replayed, a recovery that was under
//! way resumes with the same fence request id, and LVBs survive.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use mcfs_dlm::core::recovery::RecoveryState;
use mcfs_dlm::{flags, ClientEvent, Mode};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(15);

/// The server process, SIGKILLed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &Path, listen: &str, fence: &str) -> Proc {
    let addr_file = dir.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("dlm.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mcfs-dlm"))
        .args(["--listen", listen, "--fence", fence, "--heartbeat-ms", "100", "--lease-ms", "1000", "--grace-ms", "1500"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--secret-file")
        .arg(dir.join("secret"))
        .arg("--addr-file")
        .arg(&addr_file)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

async fn addr_of(dir: &Path) -> String {
    let p = dir.join("addr");
    let mut out = String::new();
    wait_until("the address file", T, || {
        let s = std::fs::read_to_string(&p).unwrap_or_default();
        out = s.trim().to_string();
        let ok = !out.is_empty();
        async move { ok }
    })
    .await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_restart_reclaim_grace_and_resumed_recovery() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "test-secret-0123\n").unwrap();
    let fs = Arc::new(FencerState::default());
    fs.hold.store(true, Ordering::SeqCst);
    let faddr = fencer(fs.clone()).await;

    let mut server = spawn(dir.path(), "127.0.0.1:0", &faddr);
    let addr = addr_of(dir.path()).await;
    let (a, mut aev) = client(&addr, "c:fs", 1).await;
    a.set_session_info(0, "").await.unwrap();
    let x = a.lock(b"x", Mode::EX, 0).await.unwrap();
    let y = a.lock(b"y", Mode::PR, 0).await.unwrap();
    let l = a.lock(b"lvb", Mode::EX, flags::VALBLK).await.unwrap();
    a.unlock(l.lock_id, Some(b"hello")).await.unwrap();
    let (b, _bev) = client(&addr, "c:fs", 2).await;
    b.set_session_info(1, "").await.unwrap();
    b.lock(b"z", Mode::EX, 0).await.unwrap();
    // Node 3 fails before the crash; its fencing is still pending when the server dies.
    let (c, _cev) = client(&addr, "c:fs", 3).await;
    c.lock(b"w", Mode::EX, 0).await.unwrap();
    drop(c);
    wait_until("node 3's fence request", T, || async { !fs.request_ids().is_empty() }).await;
    let node3_id = fs.request_ids()[0].clone();
    assert!(node3_id.starts_with("c:fs/3/"), "{node3_id}");

    // Crash the lock server. Node 2 dies during the outage (never comes back).
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    drop(b);
    let calls_before = fs.calls.lock().unwrap().len();
    let _server = spawn(dir.path(), &addr, &faddr);
    assert_eq!(addr_of(dir.path()).await, addr);

    // Node 1 reconnects by itself and gets its locks back under the same ids.
    expect_event(&mut aev, T, "Reconnected", |e| matches!(e, ClientEvent::Reconnected).then_some(())).await;
    let d = a.dump(true).await.unwrap();
    assert!(d.in_grace || d.lockspaces[0].members.iter().any(|m| m.node_id == 2 && m.state != "active"));
    let held: Vec<u64> = a.held_locks().iter().map(|h| h.0).collect();
    assert_eq!(held, { let mut v = vec![x.lock_id, y.lock_id]; v.sort(); v });
    // The recovery of node 3 resumed with the same request id.
    wait_until("node 3's fence request re-sent", T, || async {
        fs.calls.lock().unwrap()[calls_before..].iter().any(|c| c.request_id == node3_id)
    })
    .await;
    // New grants wait: grace, then node 2's lock set is unknown until replayed.
    let a2 = a.clone();
    let newlock = tokio::spawn(async move { a2.lock(b"q", Mode::EX, 0).await });
    // Node 2 did not come back: after the grace window it is failed and fenced.
    wait_until("node 2's fence request", T, || async { fs.request_ids().iter().any(|r| r.starts_with("c:fs/2/")) }).await;
    assert!(!newlock.is_finished());
    fs.hold.store(false, Ordering::SeqCst);
    let rec = expect_event(&mut aev, T, "node 2 needs replay", |e| match e {
        ClientEvent::Recovery(r) if r.node_id == 2 && r.state == RecoveryState::NeedsReplay => Some(r.clone()),
        _ => None,
    })
    .await;
    assert_eq!(rec.journal, 1);
    assert!(!newlock.is_finished(), "still waiting for node 2's journal replay");
    let j = a.lock(b"journal/1", Mode::EX, flags::NOEXP).await.unwrap();
    a.recovery_done(2, 1).await.unwrap();
    tokio::time::timeout(T, newlock).await.unwrap().unwrap().unwrap();
    a.unlock(j.lock_id, None).await.unwrap();
    // Old ids work; the dead node's lock is gone; the LVB survived.
    a.unlock(x.lock_id, None).await.unwrap();
    a.convert(y.lock_id, Mode::EX, 0).await.unwrap();
    let z = a.lock(b"z", Mode::EX, flags::NOQUEUE).await.unwrap();
    a.unlock(z.lock_id, None).await.unwrap();
    let g = a.lock(b"lvb", Mode::PR, flags::VALBLK).await.unwrap();
    assert_eq!((g.lvb.as_deref(), g.lvb_seq, g.lvb_valid), (Some(&b"hello"[..]), 1, true));
    assert!(g.fence_token > x.fence_token, "tokens stay monotonic across restarts");
    let d = a.dump(true).await.unwrap();
    let ls = &d.lockspaces[0];
    let state = |n: u32| ls.members.iter().find(|m| m.node_id == n).map(|m| m.state.clone());
    assert_eq!(state(2).as_deref(), Some("fenced"));
    assert_eq!(state(3).as_deref(), Some("fenced"));
    a.leave().await.unwrap();
}
