//! The lock server over real gRPC on 127.0.0.1, with two or three clients.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use mcfs_dlm::config::ServerConfig;
use mcfs_dlm::core::recovery::RecoveryState;
use mcfs_dlm::fence_client::FenceClient;
use mcfs_dlm::{flags, ClientError, ClientEvent, Mode};
use mcfs_proto::dlm as pb;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_blocking_callbacks_lvb_and_noqueue() {
    let s = server(quick_cfg(), FenceClient::Disabled).await;
    let (a, mut aev) = client(&s.addr(), "c:fs", 1).await;
    let (b, _bev) = client(&s.addr(), "c:fs", 2).await;
    let (c, _cev) = client(&s.addr(), "c:fs", 3).await;

    let ga = a.lock(b"inode/7", Mode::EX, flags::VALBLK).await.unwrap();
    assert_eq!((ga.mode, ga.lvb.as_deref(), ga.lvb_seq), (Mode::EX, Some(&b""[..]), 0));
    let b2 = b.clone();
    let waiter = tokio::spawn(async move { b2.lock(b"inode/7", Mode::PR, flags::VALBLK).await });
    // A is told that PR waits, once.
    let (id, mode) = expect_event(&mut aev, T, "blocking callback", |e| match e {
        ClientEvent::Blocking { lock_id, mode, resource } if resource == b"inode/7" => Some((*lock_id, *mode)),
        _ => None,
    })
    .await;
    assert_eq!((id, mode), (ga.lock_id, Mode::PR));
    // NOQUEUE from a third node: refused at once, nothing left behind.
    assert_eq!(c.lock(b"inode/7", Mode::EX, flags::NOQUEUE).await.unwrap_err(), ClientError::WouldBlock);
    assert!(!waiter.is_finished());
    a.unlock(ga.lock_id, Some(b"size=4096")).await.unwrap();
    let gb = tokio::time::timeout(T, waiter).await.unwrap().unwrap().unwrap();
    assert_eq!((gb.mode, gb.lvb.as_deref(), gb.lvb_seq, gb.lvb_valid), (Mode::PR, Some(&b"size=4096"[..]), 1, true));
    assert!(gb.fence_token > ga.fence_token);
    // Conversion: B's PR up to EX in place (nobody else holds it).
    let g = b.convert(gb.lock_id, Mode::EX, 0).await.unwrap();
    assert_eq!((g.lock_id, g.mode), (gb.lock_id, Mode::EX));
    // The dump shows the holder and queues.
    let d = c.dump(true).await.unwrap();
    let ls = &d.lockspaces[0];
    assert_eq!(ls.members.len(), 3);
    assert!(ls.members.iter().all(|m| m.state == "active" && m.lease_remaining_ms > 0));
    let r = ls.resources.iter().find(|r| r.name == b"inode/7").unwrap();
    assert_eq!(r.granted.len(), 1);
    assert_eq!((r.granted[0].node_id, r.granted[0].granted_mode), (2, Mode::EX as i32));
    for x in [a, b, c] {
        x.leave().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precise_errors_over_the_wire() {
    let s = server(quick_cfg(), FenceClient::Disabled).await;
    let (a, _e) = client(&s.addr(), "c:fs", 1).await;
    let g = a.lock(b"r", Mode::EX, 0).await.unwrap();
    a.unlock(g.lock_id, None).await.unwrap();
    assert!(matches!(a.unlock(g.lock_id, None).await, Err(ClientError::FailedPrecondition(_))), "double unlock");
    assert!(matches!(a.unlock(12345, None).await, Err(ClientError::NotFound(_))), "unknown id");
    assert!(matches!(a.convert(g.lock_id, Mode::PR, 0).await, Err(ClientError::FailedPrecondition(_))));
    assert!(matches!(a.lock(&[b'x'; 65], Mode::EX, 0).await, Err(ClientError::InvalidArgument(_))));
    assert!(matches!(a.lock(b"r", Mode::EX, 1 << 30).await, Err(ClientError::InvalidArgument(_))));
    let g = a.lock(b"r", Mode::EX, 0).await.unwrap();
    assert!(matches!(a.unlock(g.lock_id, Some(&[0u8; 65])).await, Err(ClientError::InvalidArgument(_))));
    assert!(!a.cancel(g.lock_id).await.unwrap(), "nothing to cancel");

    // Raw calls with malformed fields.
    let mut raw = raw(&s.addr(), Some(secret())).await;
    let sid = a.session_id();
    let bad_mode = pb::LockRequest { session_id: sid, resource: b"q".to_vec(), mode: 9, ..Default::default() };
    assert_eq!(raw.lock(bad_mode).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let big_lvb =
        pb::LockRequest { session_id: sid, resource: b"q".to_vec(), lvb: vec![1; 65], ..Default::default() };
    assert_eq!(raw.lock(big_lvb).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let no_session = pb::LockRequest { session_id: 999, resource: b"q".to_vec(), ..Default::default() };
    assert_eq!(raw.lock(no_session).await.unwrap_err().code(), tonic::Code::NotFound);
    for (ls, node) in [("", 5), ("a/b", 5), (&*"x".repeat(65), 5), ("ok", 0), ("ok", 256)] {
        let j = pb::JoinRequest { lockspace: ls.to_string(), node_id: node, ..Default::default() };
        assert_eq!(raw.join(j).await.unwrap_err().code(), tonic::Code::InvalidArgument, "{ls:?} {node}");
    }
    let dup = pb::JoinRequest { lockspace: "c:fs".into(), node_id: 1, ..Default::default() };
    assert_eq!(raw.join(dup).await.unwrap_err().code(), tonic::Code::AlreadyExists);
    assert_eq!(
        raw.events(pb::EventsRequest { session_id: sid }).await.unwrap_err().code(),
        tonic::Code::FailedPrecondition,
        "one Events stream per session"
    );
    let journal = pb::SessionInfoRequest { session_id: sid, journal: -5, admin_addr: String::new() };
    assert_eq!(raw.set_session_info(journal).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let rd = pb::RecoveryDoneRequest { session_id: sid, node_id: 9, journal: 0 };
    assert_eq!(raw.recovery_done(rd).await.unwrap_err().code(), tonic::Code::NotFound);
    a.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_clear_statuses() {
    let mut cfg = quick_cfg();
    cfg.max_sessions = 2;
    cfg.limits.max_locks_per_node = 3;
    cfg.limits.max_pending_per_node = 1;
    let s = server(cfg, FenceClient::Disabled).await;
    let (a, _ae) = client(&s.addr(), "c:fs", 1).await;
    let (b, _be) = client(&s.addr(), "c:fs", 2).await;
    let mut r = raw(&s.addr(), Some(secret())).await;
    let j = pb::JoinRequest { lockspace: "c:fs".into(), node_id: 3, ..Default::default() };
    assert_eq!(r.join(j).await.unwrap_err().code(), tonic::Code::ResourceExhausted, "sessions");
    for n in ["a", "b", "c"] {
        a.lock(n.as_bytes(), Mode::EX, 0).await.unwrap();
    }
    assert!(matches!(a.lock(b"d", Mode::EX, 0).await, Err(ClientError::ResourceExhausted(_))), "locks");
    let b2 = b.clone();
    let _w = tokio::spawn(async move { b2.lock(b"a", Mode::EX, 0).await });
    wait_until("b's request queued", T, || async { b.dump(true).await.unwrap().lockspaces[0].members[1].pending == 1 }).await;
    assert!(matches!(b.lock(b"b", Mode::EX, 0).await, Err(ClientError::ResourceExhausted(_))), "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filesystem_of_another_cluster_is_refused_before_it_joins() {
    let cfg = ServerConfig { cluster_name: Some("mine".into()), ..quick_cfg() };
    let s = server(cfg, FenceClient::Disabled).await;
    let mut r = raw(&s.addr(), Some(secret())).await;
    let j = pb::JoinRequest { lockspace: "other:fs".into(), node_id: 1, ..Default::default() };
    let st = r.join(j).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::FailedPrecondition);
    assert_eq!(st.message(), "filesystem table other:fs belongs to cluster other; this lock server serves cluster mine");
    // the client library hands it on as it came
    let e = mcfs_dlm::DlmClient::connect(mcfs_dlm::ClientConfig {
        addr: s.addr(),
        secret: secret(),
        lockspace: "other:fs".into(),
        node_id: 2,
        admin_addr: String::new(),
    })
    .await
    .err()
    .unwrap();
    assert!(matches!(&e, ClientError::FailedPrecondition(m) if m.contains("belongs to cluster other")), "{e:?}");
    // nothing was created for it: no lockspace, no member, so nothing to fence
    let (a, _ae) = client(&s.addr(), "mine:fs", 1).await;
    a.lock(b"r", Mode::EX, 0).await.unwrap();
    let d = r.dump(pb::DumpRequest { lockspace: String::new(), locks: false }).await.unwrap().into_inner();
    let names: Vec<_> = d.lockspaces.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["mine:fs"]);
    assert_eq!(s.handle.shared.metrics.joins.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_calls_are_refused_and_change_nothing() {
    let s = server(quick_cfg(), FenceClient::Disabled).await;
    let (a, _e) = client(&s.addr(), "c:fs", 1).await;
    let g = a.lock(b"r", Mode::EX, 0).await.unwrap();
    let wrong = mcfs_proto::auth::Secret::new("not-the-secret").unwrap();
    for auth in [None, Some(wrong)] {
        let mut r = raw(&s.addr(), auth).await;
        let j = pb::JoinRequest { lockspace: "evil".into(), node_id: 2, ..Default::default() };
        assert_eq!(r.join(j).await.unwrap_err().code(), tonic::Code::Unauthenticated);
        let u = pb::UnlockRequest { session_id: a.session_id(), lock_id: g.lock_id, ..Default::default() };
        assert_eq!(r.unlock(u).await.unwrap_err().code(), tonic::Code::Unauthenticated);
        let l = pb::LockRequest { session_id: a.session_id(), resource: b"r2".to_vec(), ..Default::default() };
        assert_eq!(r.lock(l).await.unwrap_err().code(), tonic::Code::Unauthenticated);
        let u = pb::UnfenceRequest { lockspace: "c:fs".into(), node_id: 1 };
        assert_eq!(r.unfence(u).await.unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(r.dump(pb::DumpRequest::default()).await.unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(
            r.leave(pb::LeaveRequest { session_id: a.session_id() }).await.unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
    let d = a.dump(true).await.unwrap();
    assert_eq!(d.lockspaces.len(), 1, "no lockspace created");
    let ls = &d.lockspaces[0];
    assert_eq!(ls.members.len(), 1);
    let names: Vec<&[u8]> = ls.resources.iter().map(|r| r.name.as_slice()).collect();
    assert_eq!(names, vec![&b"r"[..]]);
    assert_eq!(ls.resources[0].granted[0].lock_id, g.lock_id, "still held");
    a.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_lock_future_leaves_no_lock_behind() {
    let s = server(quick_cfg(), FenceClient::Disabled).await;
    let (a, _ae) = client(&s.addr(), "c:fs", 1).await;
    let (b, _be) = client(&s.addr(), "c:fs", 2).await;
    let ga = a.lock(b"busy", Mode::EX, 0).await.unwrap();
    // B gives up waiting: its queued request must be cancelled.
    let r = tokio::time::timeout(Duration::from_millis(100), b.lock(b"busy", Mode::EX, 0)).await;
    assert!(r.is_err());
    // Many abandoned requests racing with grants: none may survive.
    for i in 0..50 {
        let b2 = b.clone();
        let t = tokio::spawn(async move { b2.lock(b"race", Mode::EX, 0).await });
        if i % 2 == 0 {
            tokio::task::yield_now().await;
        }
        t.abort();
    }
    a.unlock(ga.lock_id, None).await.unwrap();
    wait_until("no locks of node 2 remain", T, || async {
        let d = a.dump(true).await.unwrap();
        d.lockspaces[0].resources.iter().all(|r| r.granted.is_empty() && r.waiting.is_empty())
    })
    .await;
    assert!(b.held_locks().is_empty());
    // The lock is free for others.
    let g = a.lock(b"race", Mode::EX, flags::NOQUEUE).await.unwrap();
    a.unlock(g.lock_id, None).await.unwrap();
    // A dropped conversion goes back to the old mode.
    let gb = b.lock(b"conv", Mode::PR, 0).await.unwrap();
    let ga = a.lock(b"conv", Mode::PR, 0).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(100), b.convert(gb.lock_id, Mode::EX, 0)).await.is_err());
    a.unlock(ga.lock_id, None).await.unwrap();
    wait_until("conversion cancelled, lock back in PR", T, || async {
        let d = a.dump(true).await.unwrap();
        let r = d.lockspaces[0].resources.iter().find(|r| r.name == b"conv").unwrap().clone();
        r.converting.is_empty() && r.granted.len() == 1 && r.granted[0].granted_mode == Mode::PR as i32
    })
    .await;
    a.leave().await.unwrap();
    b.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_fencing_replay_release_and_unfence() {
    let fs = Arc::new(FencerState::default());
    fs.hold.store(true, Ordering::SeqCst);
    fs.fail_first.store(1, Ordering::SeqCst);
    let faddr = fencer(fs.clone()).await;
    let s = server(quick_cfg(), FenceClient::agent(&faddr, secret()).unwrap()).await;
    let (a, _ae) = client(&s.addr(), "c:fs", 1).await;
    a.set_session_info(0, "127.0.0.1:9001").await.unwrap();
    let (b, mut bev) = client(&s.addr(), "c:fs", 2).await;
    let (c, _ce) = client(&s.addr(), "c:fs", 3).await;
    a.lock(b"journal/0", Mode::EX, 0).await.unwrap();
    a.lock(b"inode/1", Mode::EX, flags::VALBLK).await.unwrap();
    a.lock(b"inode/2", Mode::PR, 0).await.unwrap();
    // Node 1 crashes: its client goes away without leaving.
    drop(a);
    let rec = expect_event(&mut bev, T, "node 1 fencing", |e| match e {
        ClientEvent::Recovery(r) if r.node_id == 1 && r.state == RecoveryState::Fencing => Some(r.clone()),
        _ => None,
    })
    .await;
    assert_eq!(rec.journal, 0);
    // Locks of the dead node stay held: conflicting requests wait, others carry on.
    let c2 = c.clone();
    let blocked = tokio::spawn(async move { c2.lock(b"inode/1", Mode::PR, flags::VALBLK).await });
    let g = c.lock(b"inode/2", Mode::PR, 0).await.unwrap();
    c.unlock(g.lock_id, None).await.unwrap();
    c.lock(b"inode/3", Mode::EX, 0).await.unwrap();
    // NOEXP must wait until the node is fenced.
    let b2 = b.clone();
    let journal = tokio::spawn(async move { b2.lock(b"journal/0", Mode::EX, flags::NOEXP).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!journal.is_finished() && !blocked.is_finished());
    // The first attempt failed; the retry is pending at the agent.
    wait_until("a retry with a new request id", T, || async { fs.request_ids().len() >= 2 }).await;
    let ids = fs.request_ids();
    assert!(ids[0].starts_with("c:fs/1/") && ids[1] == format!("{}/retry1", ids[0]), "{ids:?}");
    assert!(fs.calls.lock().unwrap().iter().all(|c| c.node_id == 1 && c.failure_time_unix_ms > 0));
    fs.hold.store(false, Ordering::SeqCst);
    expect_event(&mut bev, T, "needs replay", |e| {
        matches!(e, ClientEvent::Recovery(r) if r.node_id == 1 && r.state == RecoveryState::NeedsReplay).then_some(())
    })
    .await;
    let gj = tokio::time::timeout(T, journal).await.unwrap().unwrap().unwrap();
    assert_eq!(gj.mode, Mode::EX);
    assert!(!blocked.is_finished(), "inode/1 still held by the dead node until replay is done");
    // Only the journal-lock holder may report.
    assert!(matches!(c.recovery_done(1, 0).await, Err(ClientError::FailedPrecondition(_))));
    b.recovery_done(1, 0).await.unwrap();
    let g = tokio::time::timeout(T, blocked).await.unwrap().unwrap().unwrap();
    assert!(!g.lvb_valid, "LVB of a resource the dead node held in EX is not valid");
    expect_event(&mut bev, T, "released", |e| {
        matches!(e, ClientEvent::Recovery(r) if r.node_id == 1 && r.state == RecoveryState::Released).then_some(())
    })
    .await;
    // Fenced: it may not rejoin until unfenced.
    let refused = DlmClientTry::connect(&s.addr(), 1).await;
    assert!(matches!(refused, Err(ClientError::FailedPrecondition(_))), "{refused:?}");
    let mut r = raw(&s.addr(), Some(secret())).await;
    let msg = r.unfence(pb::UnfenceRequest { lockspace: "c:fs".into(), node_id: 1 }).await.unwrap().into_inner().message;
    assert!(msg.contains("may rejoin"), "{msg}");
    assert_eq!(fs.unfences.lock().unwrap().len(), 1, "the agent was asked to unfence");
    let (a, _ae) = client(&s.addr(), "c:fs", 1).await;
    a.leave().await.unwrap();
    b.leave().await.unwrap();
    c.leave().await.unwrap();
}

struct DlmClientTry;
impl DlmClientTry {
    async fn connect(addr: &str, node: u32) -> Result<(), ClientError> {
        mcfs_dlm::DlmClient::connect(mcfs_dlm::ClientConfig {
            addr: addr.to_string(),
            secret: secret(),
            lockspace: "c:fs".into(),
            node_id: node,
            admin_addr: String::new(),
        })
        .await
        .map(|_| ())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_events_is_evicted_not_waited_for() {
    let cfg = ServerConfig { event_queue_soft: 16, evict_after_ms: 300, ..quick_cfg() };
    let s = server(cfg, FenceClient::Disabled).await;
    let (ok, _oe) = client(&s.addr(), "c:fs", 1).await;
    // A raw session that pipelines thousands of requests and never reads.
    let mut r = raw(&s.addr(), Some(secret())).await;
    let j = r.join(pb::JoinRequest { lockspace: "c:fs".into(), node_id: 2, ..Default::default() }).await.unwrap();
    let sid = j.into_inner().session_id;
    let _events = r.events(pb::EventsRequest { session_id: sid }).await.unwrap(); // never read
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut r2 = r.clone();
    tokio::spawn(async move { r2.ops(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let t0 = std::time::Instant::now();
    for i in 0..20_000u64 {
        let op = pb::op_request::Op::Lock(pb::LockRequest {
            session_id: sid,
            resource: format!("s/{}", i % 100).into_bytes(),
            mode: Mode::NL as i32,
            ..Default::default()
        });
        if tx.send(pb::OpRequest { tag: i, op: Some(op) }).await.is_err() {
            break; // the server ended the stream: evicted
        }
    }
    // Meanwhile everybody else is served promptly.
    let g = ok.lock(b"x", Mode::EX, 0).await.unwrap();
    ok.unlock(g.lock_id, None).await.unwrap();
    wait_until("the slow reader evicted", T, || async {
        let d = ok.dump(false).await.unwrap();
        d.lockspaces[0].members.iter().any(|m| m.node_id == 2 && m.state != "active")
    })
    .await;
    assert!(t0.elapsed() < T);
    ok.leave().await.unwrap();
}

/// Leases with tokio's paused clock, calling the service directly (no network,
/// so the clock only moves when the test says so).
#[tokio::test]
async fn lease_expiry_with_a_paused_clock() {
    use mcfs_proto::dlm::dlm_server::Dlm;
    use tonic::Request;
    let cfg = ServerConfig { heartbeat_ms: 1000, lease_ms: 3000, ..Default::default() };
    let s = server(cfg, FenceClient::Disabled).await;
    let svc = mcfs_dlm::service::DlmService::new(s.handle.shared.clone());
    let join = |n: u32| pb::JoinRequest { lockspace: "c:fs".into(), node_id: n, ..Default::default() };
    let s1 = svc.join(Request::new(join(1))).await.unwrap().into_inner().session_id;
    let s2 = svc.join(Request::new(join(2))).await.unwrap().into_inner().session_id;
    let lock = pb::LockRequest { session_id: s1, resource: b"r".to_vec(), mode: Mode::EX as i32, ..Default::default() };
    svc.lock(Request::new(lock)).await.unwrap();
    tokio::time::pause();
    let state = |n: u32| {
        let d = mcfs_dlm::service::dump(&s.handle.shared, "", false);
        d.lockspaces[0].members.iter().find(|m| m.node_id == n).map(|m| m.state.clone())
    };
    for second in 1..=5 {
        tokio::time::advance(Duration::from_millis(1000)).await;
        svc.heartbeat(Request::new(pb::HeartbeatRequest { session_id: s2, ..Default::default() })).await.unwrap();
        // Let the reaper run at this instant.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        if second <= 2 {
            assert_eq!(state(1).as_deref(), Some("active"), "at {second}s the lease (3s) still runs");
        }
    }
    assert_ne!(state(1).as_deref(), Some("active"), "node 1 failed after its lease");
    assert_eq!(state(2).as_deref(), Some("active"), "node 2 kept its lease alive");
    let err = svc.heartbeat(Request::new(pb::HeartbeatRequest { session_id: s1, ..Default::default() })).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_declared_failed_gets_session_lost_and_its_calls_fail() {
    let s = server(quick_cfg(), FenceClient::Disabled).await;
    let (a, mut aev) = client(&s.addr(), "c:fs", 1).await;
    let (b, _bev) = client(&s.addr(), "c:fs", 2).await;
    let g = a.lock(b"r", Mode::EX, 0).await.unwrap();
    let gb = b.lock(b"held-by-b", Mode::EX, 0).await.unwrap();
    let a2 = a.clone();
    let queued = tokio::spawn(async move { a2.lock(b"held-by-b", Mode::EX, 0).await });
    wait_until("a's request queued", T, || async { b.dump(false).await.unwrap().lockspaces[0].members[0].pending == 1 }).await;
    let shared = s.handle.shared.clone();
    shared.fail_session(&shared.session(a.session_id()).unwrap(), "evicted by the test");
    let why = expect_event(&mut aev, T, "SessionLost", |e| match e {
        ClientEvent::SessionLost(m) => Some(m.clone()),
        _ => None,
    })
    .await;
    assert!(why.contains("join refused") && why.contains("fenced"), "{why}");
    assert!(matches!(a.lock(b"x", Mode::NL, 0).await, Err(ClientError::SessionLost(_))));
    assert!(matches!(a.unlock(g.lock_id, None).await, Err(ClientError::SessionLost(_))));
    // The queued request is not left hanging.
    let r = tokio::time::timeout(T, queued).await.unwrap().unwrap();
    assert!(matches!(r, Err(ClientError::SessionLost(_))), "{r:?}");
    // No fencing agent and no journal: its locks are released at once.
    let g2 = tokio::time::timeout(T, b.lock(b"r", Mode::EX, 0)).await.unwrap().unwrap();
    b.unlock(g2.lock_id, None).await.unwrap();
    b.unlock(gb.lock_id, None).await.unwrap();
    b.leave().await.unwrap();
}
