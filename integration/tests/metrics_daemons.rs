//! `GET /metrics` of the real `mcfs-dlm` and `mcfs-fenced` after some real
//! activity: lock traffic of every kind and outcome, a node that dies and is
//! fenced by process fencing, a refused call. The values must have moved, agree
//! with the `Stats` RPC, and the text must be well-formed exposition format.
#![allow(clippy::unwrap_used)]

use mcfs_dlm::{flags, ClientConfig, ClientError, DlmClient, Mode};
use mcfs_integration::dlmd::{check_exposition, fence_config, http_get, metric, start_dlm, start_fenced, StandIn};
use mcfs_integration::{secret_file, tempdir, wait_for};
use mcfs_proto::auth::Secret;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

async fn client(addr: &str, secret: &Secret, node: u32) -> DlmClient {
    DlmClient::connect(ClientConfig {
        addr: addr.into(),
        secret: secret.clone(),
        lockspace: "c:fs".into(),
        node_id: node,
        admin_addr: String::new(),
    })
    .await
    .unwrap()
    .0
}

#[test]
fn metrics_of_both_daemons_move_with_activity() {
    let dir = tempdir();
    let sf = secret_file(dir.path()).unwrap();
    let secret = Secret::from_file(&sf).unwrap();
    let pid_file = dir.path().join("n1.pid");
    let mut node1 = StandIn::spawn(&pid_file).unwrap();
    let cfg = fence_config(dir.path(), &[(1, &pid_file)], &[]).unwrap();
    let fenced = start_fenced(dir.path(), "fenced", &cfg, &sf, "127.0.0.1:0", &[]).unwrap();
    let dlm = start_dlm(dir.path(), "dlm", &sf, Some(&fenced.addr), &[]).unwrap();

    // Before any activity: well-formed, and zero where it counts.
    let before = dlm.scrape().unwrap();
    check_exposition(&before).unwrap();
    assert_eq!(metric(&before, "mcfs_dlm_sessions", &[]), Some(0.0));
    assert_eq!(metric(&before, "mcfs_dlm_grant_latency_seconds_count", &[("path", "immediate")]), Some(0.0));
    assert_eq!(http_get(&dlm.metrics, "/").unwrap().0, 404);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let n1 = client(&dlm.addr, &secret, 1).await;
        let n2 = client(&dlm.addr, &secret, 2).await;
        for i in 0..50 {
            let g = n1.lock(format!("inode/{i}").as_bytes(), Mode::PR, 0).await.unwrap();
            n1.unlock(g.lock_id, None).await.unwrap();
        }
        let held = n1.lock(b"r", Mode::EX, 0).await.unwrap();
        assert_eq!(n2.lock(b"r", Mode::EX, flags::NOQUEUE).await.unwrap_err(), ClientError::WouldBlock);
        assert!(matches!(n2.unlock(12345, None).await, Err(ClientError::NotFound(_))));
        let n2w = n2.clone();
        let waiter = tokio::spawn(async move { n2w.lock(b"r", Mode::EX, 0).await });
        wait_for("a grant waiting", T, || (dlm.value("mcfs_dlm_grants_waiting", &[("lockspace", "c:fs")]) == 1.0).then_some(()))
            .unwrap();
        n1.unlock(held.lock_id, None).await.unwrap();
        let g = tokio::time::timeout(T, waiter).await.unwrap().unwrap().unwrap();
        // Node 1 holds a lock and dies; mcfs-fenced kills its stand-in process.
        n1.lock(b"dead", Mode::EX, 0).await.unwrap();
        drop(n1);
        let gd = tokio::time::timeout(T, n2.lock(b"dead", Mode::EX, 0)).await.unwrap().unwrap();
        assert!(node1.gone());

        let m = dlm.scrape().unwrap();
        check_exposition(&m).unwrap();
        let v = |name: &str, l: &[(&str, &str)]| metric(&m, name, l).unwrap_or(-1.0);
        assert_eq!(v("mcfs_dlm_lock_ops_total", &[("kind", "lock"), ("outcome", "granted")]), 52.0, "{m}");
        assert_eq!(v("mcfs_dlm_lock_ops_total", &[("kind", "lock"), ("outcome", "queued")]), 2.0);
        assert_eq!(v("mcfs_dlm_lock_ops_total", &[("kind", "lock"), ("outcome", "would_block")]), 1.0);
        assert_eq!(v("mcfs_dlm_lock_ops_total", &[("kind", "unlock"), ("outcome", "ok")]), 51.0);
        assert_eq!(v("mcfs_dlm_lock_ops_total", &[("kind", "unlock"), ("outcome", "not_found")]), 1.0);
        assert_eq!(v("mcfs_dlm_grant_latency_seconds_count", &[("path", "immediate")]), 52.0);
        assert_eq!(v("mcfs_dlm_grant_latency_seconds_count", &[("path", "queued")]), 2.0);
        assert!(v("mcfs_dlm_grant_latency_seconds_sum", &[("path", "queued")]) > 0.0);
        assert_eq!(v("mcfs_dlm_grants_waiting", &[("lockspace", "c:fs")]), 0.0);
        assert_eq!(v("mcfs_dlm_sessions", &[]), 1.0);
        assert_eq!(v("mcfs_dlm_members", &[("lockspace", "c:fs"), ("state", "active")]), 1.0);
        assert_eq!(v("mcfs_dlm_members", &[("lockspace", "c:fs"), ("state", "fenced")]), 1.0);
        assert_eq!(v("mcfs_dlm_recoveries", &[("lockspace", "c:fs"), ("state", "released")]), 1.0);
        assert_eq!(v("mcfs_dlm_recoveries_started_total", &[]), 1.0);
        assert_eq!(v("mcfs_dlm_recovery_duration_seconds_count", &[("phase", "fencing")]), 1.0);
        assert_eq!(v("mcfs_dlm_recovery_duration_seconds_count", &[("phase", "total")]), 1.0);
        assert_eq!(v("mcfs_dlm_session_failures_total", &[("reason", "stream_dropped")]), 1.0);
        assert_eq!(v("mcfs_dlm_fence_requests_total", &[("outcome", "success")]), 1.0);
        assert!(v("mcfs_dlm_fence_calls_total", &[("result", "success")]) == 1.0);
        assert_eq!(v("mcfs_dlm_resources", &[("lockspace", "c:fs")]), 2.0, "r and dead");
        assert_eq!(v("mcfs_dlm_joins_total", &[]), 2.0);

        // The Stats RPC tells the same story.
        let st = n2.stats().await.unwrap();
        let ops = |k: &str, o: &str| st.lock_ops.iter().find(|c| c.kind == k && c.outcome == o).map_or(0, |c| c.count);
        assert_eq!((ops("lock", "granted"), ops("lock", "queued"), ops("unlock", "ok")), (52, 2, 51));
        assert_eq!((st.grants_immediate, st.grants_queued, st.sessions, st.recoveries_started), (52, 2, 1, 1));
        assert!(st.grant_latency_p99_ms > 0.0, "{st:?}");

        n2.unlock(g.lock_id, None).await.unwrap();
        n2.unlock(gd.lock_id, None).await.unwrap();
        n2.leave().await.unwrap();
    });

    // mcfs-fenced: one fence by the process method, and a refused call.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "wrong-secret").unwrap();
    let out = std::process::Command::new(mcfs_integration::bin("mcfs"))
        .args(["fence", "history", "--fence", &fenced.addr, "--cluster-dir", "/nonexistent-mcfs-cluster", "--secret-file"])
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let m = fenced.scrape().unwrap();
    check_exposition(&m).unwrap();
    let v = |name: &str, l: &[(&str, &str)]| metric(&m, name, l).unwrap_or(-1.0);
    assert_eq!(v("mcfs_fenced_operations_total", &[("kind", "fence"), ("outcome", "success")]), 1.0, "{m}");
    assert_eq!(v("mcfs_fenced_operation_duration_seconds_count", &[("kind", "fence"), ("outcome", "success")]), 1.0);
    assert_eq!(v("mcfs_fenced_attempts_total", &[("method", "process"), ("outcome", "ok")]), 1.0);
    assert!(v("mcfs_fenced_calls_total", &[("rpc", "fence"), ("code", "ok")]) >= 1.0);
    assert_eq!(v("mcfs_fenced_refused_calls_total", &[("rpc", "history")]), 1.0);
    assert_eq!(v("mcfs_fenced_nodes_fenced", &[]), 1.0);
    assert_eq!(v("mcfs_fenced_nodes_configured", &[]), 1.0);
    assert_eq!(v("mcfs_fenced_operations_in_progress", &[]), 0.0);
}
