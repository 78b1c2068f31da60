//! Agent and manual fencing end to end through a real mcfs-fenced: the committed
//! script agent (records what it receives), Debian's `fence_dummy` from the
//! `fence-agents` package run unchanged, and an operator's `mcfs fence ack`.
#![allow(clippy::unwrap_used)]

use mcfs_integration::fence::{n, s, start_fenced};
use mcfs_integration::{tempdir, wait_for, workspace_root};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const FENCE_DUMMY: &str = "/usr/sbin/fence_dummy";

fn script_agent() -> PathBuf {
    workspace_root().join("crates/fence/tests/agents/fence_mcfs_test")
}

fn actions(record: &Path) -> Vec<String> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("action="))
        .map(str::to_string)
        .collect()
}

#[test]
fn fence_agents_levels_and_manual_ack_over_grpc() {
    assert!(
        Path::new(FENCE_DUMMY).exists(),
        "{FENCE_DUMMY} is missing: install Debian's `fence-agents` package (apt-get install --no-install-recommends fence-agents)"
    );
    let dir = tempdir();
    let d = dir.path();
    let secret = mcfs_integration::secret_file(d).unwrap();
    // fence_dummy keeps the simulated power state in a file, without a newline.
    std::fs::write(d.join("n2.power"), "on").unwrap();
    let cfg = d.join("fence.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[node]]
id = 1
name = "alpha"
[[node.level]]
method = "agent"
agent = "{script}"
plug = "outlet-1"
timeout_ms = 10000
options = {{ record = "{d}/l1.record", mode = "fail" }}
[[node.level]]
method = "agent"
agent = "{script}"
plug = "outlet-2"
options = {{ record = "{d}/l2.record", state_file = "{d}/n1.power", mode = "ok", login = "admin" }}

[[node]]
id = 2
[[node.level]]
method = "agent"
agent = "fence_dummy"
timeout_ms = 20000
options = {{ status_file = "{d}/n2.power" }}

[[node]]
id = 3
[[node.level]]
method = "manual"
"#,
            script = script_agent().display(),
            d = d.display()
        ),
    )
    .unwrap();
    let fenced = start_fenced(d, &cfg, &d.join("data"), &secret, "fenced").unwrap();

    // Node 1: level 1 fails, level 2 fences; both saw the ClusterLabs stdin protocol.
    let r = fenced.json(&["node", "1", "--request-id", "a-1"]).unwrap();
    assert_eq!(s(&r, "outcome"), "SUCCESS", "{r:#}");
    let att = r["attempts"].as_array().unwrap();
    assert_eq!(att.len(), 2);
    assert_eq!(
        (att[0]["ok"].as_bool(), att[1]["ok"].as_bool()),
        (Some(false), Some(true))
    );
    assert!(
        s(&att[0], "message").contains("simulated failure for alpha"),
        "{r:#}"
    );
    assert_eq!(actions(&d.join("l1.record")), ["off"]);
    assert_eq!(actions(&d.join("l2.record")), ["off", "status"]);
    let sent = std::fs::read_to_string(d.join("l2.record")).unwrap();
    let first: Vec<&str> = sent.split("---\n").next().unwrap().lines().collect();
    assert_eq!(
        first[..3],
        ["action=off", "nodename=alpha", "plug=outlet-2"]
    );
    assert!(
        first.contains(&"login=admin") && first.contains(&"mode=ok"),
        "{first:?}"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("n1.power")).unwrap().trim(),
        "off"
    );

    // Node 2: Debian's fence_dummy, unchanged: off, verified by status, then on.
    let r = fenced.json(&["node", "2", "--request-id", "b-1"]).unwrap();
    assert_eq!(s(&r, "outcome"), "SUCCESS", "{r:#}");
    assert_eq!(s(&r, "method"), "agent:fence_dummy");
    assert!(
        s(&r["attempts"][0], "message").contains("status exited 2 (OFF)"),
        "{r:#}"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("n2.power")).unwrap().trim(),
        "off"
    );
    assert_eq!(fenced.json(&["status", "2"]).unwrap()["fenced"], true);
    let u = fenced
        .json(&["unfence", "2", "--request-id", "b-u"])
        .unwrap();
    assert_eq!(s(&u, "outcome"), "SUCCESS", "{u:#}");
    assert_eq!(
        std::fs::read_to_string(d.join("n2.power")).unwrap().trim(),
        "on"
    );
    assert_eq!(fenced.json(&["status", "2"]).unwrap()["fenced"], false);

    // Node 3: manual. PENDING until an operator acknowledges.
    let r = fenced
        .json(&["node", "3", "--request-id", "c-1", "--wait-secs", "0"])
        .unwrap();
    assert_eq!(s(&r, "outcome"), "PENDING");
    wait_for("node 3 to wait for an ack", T, || {
        fenced.json(&["status", "3"]).unwrap()["awaiting_ack"]
            .as_bool()
            .filter(|b| *b)
    })
    .unwrap();
    let acked = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let a = fenced.json(&["ack", "3", "--operator", "carol"]).unwrap();
    assert_eq!(a["acknowledged"], true, "{a:#}");
    let r = fenced.json(&["node", "3", "--request-id", "c-1"]).unwrap();
    assert_eq!(s(&r, "outcome"), "SUCCESS", "{r:#}");
    assert_eq!(s(&r, "method"), "manual");
    assert!(s(&r["attempts"][0], "message").contains("carol"));
    assert!(n(&r, "fence_time_unix_ms") >= acked);
    // Nothing left to acknowledge now.
    let out = fenced.cli(&["ack", "3"]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no fence operation is in progress"));

    // Unknown nodes are a clear error.
    let out = fenced.cli(&["node", "9", "--wait-secs", "0"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err
                .contains("node 9 is not in the fencing configuration (configured nodes: 1, 2, 3)"),
        "{err}"
    );

    // History in text form names every operation, newest first.
    let out = fenced.cli(&["history"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let order: Vec<usize> = ["c-1", "b-u", "b-1", "a-1"]
        .iter()
        .map(|id| text.find(id).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
}

#[test]
fn fence_bad_configuration_fails_at_start_up() {
    let dir = tempdir();
    let d = dir.path();
    let secret = mcfs_integration::secret_file(d).unwrap();
    let cases = [
        ("[[node]]\nid = 1\n[[node.level]]\nmethod = \"agent\"\nagent = \"fence_not_installed_anywhere\"\n", "not found in PATH"),
        ("[[node]]\nid = 1\n[[node.level]\nmethod = \"manual\"\n", "TOML parse error at line 3"),
        (
            "[[node]]\nid = 1\n[[node.level]]\nmethod = \"manual\"\n[[node]]\nid = 1\n[[node.level]]\nmethod = \"manual\"\n",
            "node id 1 is configured twice",
        ),
        ("[[node]]\nid = 1\n[[node.level]]\nmethod = \"process\"\npid_file = \"/nonexistent-mcfs/n.pid\"\n", "is not readable"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let cfg = d.join(format!("bad{i}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let addr_file = d.join(format!("bad{i}.addr"));
        let out = std::process::Command::new(mcfs_integration::bin("mcfs-fenced"))
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(d.join(format!("data{i}")))
            .arg("--secret-file")
            .arg(&secret)
            .arg("--addr-file")
            .arg(&addr_file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} started: {err}");
        assert!(err.contains(want), "case {i}: {err}");
        assert!(!addr_file.exists(), "case {i} listened");
    }
}
