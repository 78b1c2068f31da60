//! Engine tests with real agents (the committed script agent), real processes and
//! a real sled store in a temporary directory.
#![allow(clippy::unwrap_used)]

use super::*;
use std::path::PathBuf;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/agents/fence_mcfs_test")
}

/// An agent level of the script agent, recording into `dir/<tag>.record`.
fn agent_level(dir: &Path, tag: &str, mode: &str, extra: &str) -> String {
    format!(
        "[[node.level]]\nmethod = \"agent\"\nagent = \"{}\"\nplug = \"{tag}\"\ntimeout_ms = {}\n\
         options = {{ record = \"{}\", state_file = \"{}\", mode = \"{mode}\" }}\n",
        script().display(),
        if extra.is_empty() { "10000" } else { extra },
        dir.join(format!("{tag}.record")).display(),
        dir.join(format!("{tag}.state")).display(),
    )
}

fn config(dir: &Path, node_levels: &[(u32, String)]) -> Config {
    let mut s = String::new();
    for (id, levels) in node_levels {
        s.push_str(&format!("[[node]]\nid = {id}\n{levels}"));
    }
    Config::parse(&s, &dir.join("fence.toml")).unwrap()
}

fn actions(dir: &Path, tag: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{tag}.record")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("action="))
        .map(str::to_string)
        .collect()
}

fn req(id: &str, node: u32) -> FenceArgs {
    FenceArgs {
        request_id: id.into(),
        node_id: node,
        failure_time_ms: now_ms(),
        reason: "test".into(),
    }
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn levels_run_in_order_and_the_first_success_wins() {
    let d = tempfile::tempdir().unwrap();
    let levels = agent_level(d.path(), "a", "fail", "")
        + &agent_level(d.path(), "b", "ok", "")
        + &agent_level(d.path(), "c", "ok", "");
    let e = Engine::open(config(d.path(), &[(1, levels)]), &d.path().join("data"))
        .await
        .unwrap();
    let t0 = now_ms();
    let r = e.fence(req("r1", 1)).await.unwrap();
    assert_eq!(r.outcome, Outcome::Pending);
    let r = e.wait_final("r1", WAIT).await.unwrap();
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_eq!(r.method, "agent:fence_mcfs_test");
    let lv: Vec<(u32, bool)> = r.attempts.iter().map(|a| (a.level, a.ok)).collect();
    assert_eq!(lv, [(1, false), (2, true)]);
    assert!(
        r.attempts[0].message.contains("exited 1"),
        "{:?}",
        r.attempts[0]
    );
    assert!(r.fence_time_ms >= t0 && r.fence_time_ms >= r.attempts[1].started_ms);
    assert_eq!(actions(d.path(), "a"), ["off"]);
    assert_eq!(actions(d.path(), "b"), ["off", "status"]);
    assert!(
        actions(d.path(), "c").is_empty(),
        "a later level ran after success"
    );
    let st = e.status(1).unwrap();
    assert!(st.fenced && !st.in_progress);
    assert_eq!(st.fenced_at_ms, r.fence_time_ms);
    assert_eq!(st.methods.len(), 3);
}

#[tokio::test]
async fn all_levels_failing_is_failed_and_does_not_mark_fenced() {
    let d = tempfile::tempdir().unwrap();
    let levels = agent_level(d.path(), "a", "fail", "") + &agent_level(d.path(), "b", "lie", "");
    let e = Engine::open(config(d.path(), &[(1, levels)]), &d.path().join("data"))
        .await
        .unwrap();
    e.fence(req("r1", 1)).await.unwrap();
    let r = e.wait_final("r1", WAIT).await.unwrap();
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(r.fence_time_ms, 0);
    assert!(
        r.message.contains("all 2 fencing levels failed"),
        "{}",
        r.message
    );
    assert!(
        r.attempts[1].message.contains("the node is ON"),
        "{:?}",
        r.attempts[1]
    );
    assert!(!e.status(1).unwrap().fenced);
}

#[tokio::test]
async fn a_request_id_runs_once_even_when_retried_concurrently() {
    let d = tempfile::tempdir().unwrap();
    let e = Engine::open(
        config(d.path(), &[(1, agent_level(d.path(), "a", "ok", ""))]),
        &d.path().join("data"),
    )
    .await
    .unwrap();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let e = e.clone();
            async move { e.fence(req("same", 1)).await }
        })
        .collect();
    for r in futures_join(calls).await {
        assert_eq!(r.unwrap().request_id, "same");
    }
    let r = e.wait_final("same", WAIT).await.unwrap();
    assert_eq!(r.outcome, Outcome::Success);
    let again = e.fence(req("same", 1)).await.unwrap();
    assert_eq!(again, r, "a retry must return the recorded outcome");
    assert_eq!(
        actions(d.path(), "a"),
        ["off", "status"],
        "the agent ran more than once"
    );
    assert_eq!(e.history(0, 0).unwrap().len(), 1);

    // The id names a fence of node 1: reusing it for anything else is refused.
    let e2 = e.unfence("same", 1).await.unwrap_err();
    assert!(matches!(e2, FenceError::RequestIdReused { .. }), "{e2}");
}

async fn futures_join<F: std::future::Future + Send + 'static>(fs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let hs: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in hs {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn request_id_reuse_for_another_node_and_unknown_nodes_are_errors() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(
        d.path(),
        &[
            (1, agent_level(d.path(), "a", "ok", "")),
            (2, agent_level(d.path(), "b", "ok", "")),
        ],
    );
    let e = Engine::open(cfg, &d.path().join("data")).await.unwrap();
    e.fence(req("x", 1)).await.unwrap();
    let err = e.fence(req("x", 2)).await.unwrap_err();
    assert!(
        err.to_string().contains("already used for fence of node 1"),
        "{err}"
    );
    let err = e.fence(req("y", 9)).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("node 9 is not in the fencing configuration (configured nodes: 1, 2)"),
        "{err}"
    );
    assert!(e.fence(req("", 1)).await.is_err());
    assert!(matches!(e.status(9), Err(FenceError::UnknownNode { .. })));
    e.wait_final("x", WAIT).await.unwrap();
}

#[tokio::test]
async fn a_timed_out_level_is_killed_and_the_next_level_runs() {
    let d = tempfile::tempdir().unwrap();
    let levels =
        agent_level(d.path(), "slow", "hang", "300") + &agent_level(d.path(), "b", "ok", "");
    let e = Engine::open(config(d.path(), &[(1, levels)]), &d.path().join("data"))
        .await
        .unwrap();
    e.fence(req("t", 1)).await.unwrap();
    let r = e.wait_final("t", WAIT).await.unwrap();
    assert_eq!(r.outcome, Outcome::Success);
    assert!(
        !r.attempts[0].ok && r.attempts[0].message.contains("timed out"),
        "{:?}",
        r.attempts[0]
    );
    let took = r.attempts[0].finished_ms - r.attempts[0].started_ms;
    assert!((250..5000).contains(&took), "level 1 took {took} ms");
    assert_eq!(r.attempts[1].level, 2);
}

#[tokio::test]
async fn manual_level_waits_for_an_operator_ack() {
    let d = tempfile::tempdir().unwrap();
    let levels = agent_level(d.path(), "a", "fail", "") + "[[node.level]]\nmethod = \"manual\"\n";
    let e = Engine::open(config(d.path(), &[(3, levels)]), &d.path().join("data"))
        .await
        .unwrap();
    let none = e.ack(3, "op").unwrap();
    assert!(
        !none.acknowledged && none.message.contains("no fence operation is in progress"),
        "{none:?}"
    );
    e.fence(req("m", 3)).await.unwrap();
    let mut st = e.status(3).unwrap();
    let deadline = Instant::now() + WAIT;
    while !st.awaiting_ack && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        st = e.status(3).unwrap();
    }
    assert!(st.awaiting_ack && st.in_progress && !st.fenced);
    assert_eq!(
        e.wait_final("m", Duration::from_millis(200))
            .await
            .unwrap()
            .outcome,
        Outcome::Pending
    );
    let before = now_ms();
    let a = e.ack(3, "alice").unwrap();
    assert!(a.acknowledged, "{a:?}");
    let r = e.wait_final("m", WAIT).await.unwrap();
    assert_eq!(r.outcome, Outcome::Success);
    assert_eq!(r.method, "manual");
    assert!(r.attempts[1].message.contains("alice"));
    assert!(r.fence_time_ms >= before && r.fence_time_ms <= r.finished_ms);
    assert!(!e.status(3).unwrap().awaiting_ack);
}

#[tokio::test]
async fn manual_level_time_out_fails_the_operation() {
    let d = tempfile::tempdir().unwrap();
    let e = Engine::open(
        config(
            d.path(),
            &[(
                3,
                "[[node.level]]\nmethod = \"manual\"\ntimeout_ms = 100\n".into(),
            )],
        ),
        &d.path().join("data"),
    )
    .await
    .unwrap();
    e.fence(req("m", 3)).await.unwrap();
    let r = e.wait_final("m", WAIT).await.unwrap();
    assert_eq!(r.outcome, Outcome::Failed);
    assert!(r.attempts[0]
        .message
        .contains("no operator acknowledgement within 100 ms"));
}

#[tokio::test]
async fn a_node_has_no_ack_without_a_manual_level() {
    let d = tempfile::tempdir().unwrap();
    let e = Engine::open(
        config(d.path(), &[(1, agent_level(d.path(), "a", "ok", ""))]),
        &d.path().join("data"),
    )
    .await
    .unwrap();
    assert!(e
        .ack(1, "x")
        .unwrap()
        .message
        .contains("no manual fencing level"));
}

#[tokio::test]
async fn unfence_requires_a_fenced_node_and_switches_agents_on() {
    let d = tempfile::tempdir().unwrap();
    let levels = agent_level(d.path(), "a", "ok", "") + &agent_level(d.path(), "b", "ok", "");
    let e = Engine::open(config(d.path(), &[(1, levels)]), &d.path().join("data"))
        .await
        .unwrap();
    let err = e.unfence("u0", 1).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("node 1 is not fenced; refusing to unfence it"),
        "{err}"
    );
    assert!(
        e.op("u0").unwrap().is_none(),
        "a refused unfence must record nothing"
    );
    e.fence(req("f", 1)).await.unwrap();
    assert_eq!(
        e.wait_final("f", WAIT).await.unwrap().outcome,
        Outcome::Success
    );
    std::fs::write(d.path().join("b.state"), "off").unwrap();
    e.unfence("u1", 1).await.unwrap();
    let r = e.wait_final("u1", WAIT).await.unwrap();
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_eq!(actions(d.path(), "a"), ["off", "status", "on", "status"]);
    assert_eq!(
        actions(d.path(), "b"),
        ["on", "status"],
        "every agent level is switched on"
    );
    assert!(!e.status(1).unwrap().fenced);
    assert_eq!(
        e.unfence("u1", 1).await.unwrap(),
        r,
        "unfence is idempotent by request id too"
    );
    assert!(matches!(
        e.unfence("u2", 1).await,
        Err(FenceError::NotFenced(1))
    ));
}

#[tokio::test]
async fn a_failed_unfence_leaves_the_node_fenced() {
    let d = tempfile::tempdir().unwrap();
    let e = Engine::open(
        config(d.path(), &[(1, agent_level(d.path(), "a", "ok", ""))]),
        &d.path().join("data"),
    )
    .await
    .unwrap();
    e.fence(req("f", 1)).await.unwrap();
    e.wait_final("f", WAIT).await.unwrap();
    // The agent now fails every switch.
    let cfg = config(d.path(), &[(1, agent_level(d.path(), "a", "fail", ""))]);
    drop(e);
    let e = reopen(cfg, &d.path().join("data")).await;
    e.unfence("u", 1).await.unwrap();
    let r = e.wait_final("u", WAIT).await.unwrap();
    assert_eq!(r.outcome, Outcome::Failed);
    assert!(r.message.contains("stays fenced"));
    assert!(e.status(1).unwrap().fenced);
}

/// sled holds a lock on its directory until every handle is gone; background
/// tasks may still hold a clone for a moment after the last operation finished.
async fn reopen(cfg: Config, dir: &Path) -> Engine {
    let deadline = Instant::now() + WAIT;
    loop {
        match Engine::open(cfg.clone(), dir).await {
            Ok(e) => return e,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

#[test]
fn records_survive_a_restart_and_pending_operations_resume() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let levels = agent_level(d.path(), "a", "ok", "");
    // The agent waits 1 s before switching off: the daemon "crashes" meanwhile.
    let slow = levels.replace("mode = \"ok\"", "mode = \"ok\", delay = \"1\"");
    let cfg = config(d.path(), &[(1, slow)]);
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let e = Engine::open(cfg.clone(), &data).await.unwrap();
            e.fence(req("done", 1)).await.unwrap();
            assert_eq!(
                e.wait_final("done", WAIT).await.unwrap().outcome,
                Outcome::Success
            );
            e.fence(req("cut", 1)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(e.op("cut").unwrap().unwrap().outcome, Outcome::Pending);
        });
        // Drops every task (the agent is killed on drop) and the store handle.
        rt.shutdown_timeout(Duration::from_millis(500));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let e = reopen(cfg.clone(), &data).await;
        let done = e.op("done").unwrap().unwrap();
        assert_eq!(done.outcome, Outcome::Success);
        assert!(
            e.status(1).unwrap().fenced,
            "fenced state must survive a restart"
        );
        let r = e.wait_final("cut", WAIT).await.unwrap();
        assert_eq!(r.outcome, Outcome::Success, "{r:?}");
        assert_eq!(r.attempts[0].method, "restart");
        assert!(r.fence_time_ms > done.fence_time_ms);
        let h = e.history(1, 0).unwrap();
        assert_eq!(
            h.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(),
            ["cut", "done"]
        );
    });
}

#[tokio::test]
async fn process_level_through_the_engine() {
    let d = tempfile::tempdir().unwrap();
    let pf = d.path().join("n.pid");
    let mut child = std::process::Command::new("sleep")
        .arg("999")
        .spawn()
        .unwrap();
    std::fs::write(&pf, child.id().to_string()).unwrap();
    let levels = format!(
        "[[node.level]]\nmethod = \"process\"\npid_file = \"{}\"\nexpect_cmdline = \"sleep 999\"\n",
        pf.display()
    );
    let e = Engine::open(config(d.path(), &[(5, levels)]), &d.path().join("data"))
        .await
        .unwrap();
    e.fence(req("p", 5)).await.unwrap();
    let r = e.wait_final("p", WAIT).await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert!(
        r.attempts[0]
            .message
            .contains("killed and confirmed exited"),
        "{:?}",
        r.attempts[0]
    );
    assert!(!Path::new(&format!("/proc/{}", child.id())).exists());
}

#[tokio::test]
async fn a_node_queue_is_bounded_and_retries_are_counted_not_rerun() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config(d.path(), &[(1, "[[node.level]]\nmethod = \"manual\"\n".into())]);
    cfg.server.max_pending_ops_per_node = Some(2);
    let e = Engine::open(cfg, &d.path().join("data")).await.unwrap();
    e.fence(req("a", 1)).await.unwrap();
    e.fence(req("b", 1)).await.unwrap();
    let err = e.fence(req("c", 1)).await.unwrap_err();
    assert!(matches!(err, FenceError::TooBusy { node: 1, pending: 2, limit: 2 }), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::ResourceExhausted);
    assert!(e.op("c").unwrap().is_none(), "a refused request leaves no record");
    // A known id is answered from the record even while the queue is full.
    for _ in 0..50 {
        assert_eq!(e.fence(req("a", 1)).await.unwrap().outcome, Outcome::Pending);
    }
    assert_eq!(e.metrics().duplicates(Kind::Fence), 50);
    let long = FenceArgs { reason: "x".repeat(MAX_TEXT + 1), ..req("d", 1) };
    assert!(matches!(e.fence(long).await, Err(FenceError::InvalidRequest(_))));
    assert!(matches!(e.ack(1, &"o".repeat(MAX_TEXT + 1)), Err(FenceError::InvalidRequest(_))));
    // Acknowledging finishes "a"; the queue has room again.
    e.ack(1, "test").unwrap();
    assert_eq!(e.wait_final("a", WAIT).await.unwrap().outcome, Outcome::Success);
    e.fence(req("c", 1)).await.unwrap();
    let m = e.render_metrics();
    assert!(m.contains("mcfs_fenced_operations_total{kind=\"fence\",outcome=\"success\"} 1"), "{m}");
    assert!(m.contains("mcfs_fenced_duplicate_requests_total{kind=\"fence\"} 50"), "{m}");
    assert!(m.contains("mcfs_fenced_attempts_total{method=\"manual\",outcome=\"ok\"} 1"), "{m}");
    assert!(m.contains("mcfs_fenced_operations_in_progress 2"), "{m}");
    assert!(m.contains("mcfs_fenced_nodes_fenced 1"), "{m}");
}

/// A caller that gives up mid-call (the DLM's per-call deadline: hyper drops the
/// handler on RST_STREAM) must not leave a PENDING record behind whose operation
/// never starts: every retry of that id would be told "running" forever.
#[tokio::test]
async fn a_call_abandoned_mid_acceptance_still_runs_its_operation() {
    let d = tempfile::tempdir().unwrap();
    let levels = [
        (1, agent_level(d.path(), "a", "ok", "")),
        (2, agent_level(d.path(), "b", "ok", "")),
    ];
    let e = Engine::open(config(d.path(), &levels), &d.path().join("data"))
        .await
        .unwrap();
    let mut abandoned = 0;
    for (id, node) in [("gone", 1), ("gone-too", 2)] {
        // Poll the call once (it gets as far as its first await), then drop it.
        let mut call = Box::pin(e.fence(req(id, node)));
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(call.as_mut(), cx))
        })
        .await;
        drop(call);
        if first.is_ready() {
            continue; // it finished in one poll: nothing was abandoned
        }
        abandoned += 1;
        let r = e.wait_final(id, WAIT).await.unwrap();
        assert_eq!(r.outcome, Outcome::Success, "{r:?}");
        assert_eq!(e.fence(req(id, node)).await.unwrap(), r, "a retry gets the outcome");
        let st = e.status(node).unwrap();
        assert!(st.fenced && !st.in_progress, "{st:?}");
    }
    assert!(abandoned > 0, "every call finished in one poll; nothing was tested");
    assert_eq!(actions(d.path(), "a"), ["off", "status"]);
}
