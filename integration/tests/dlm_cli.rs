//! mcfs-dlm as a real process: startup checks, real client traffic (the bench
//! against a running server), SIGKILL + restart on its sled state, and
//! `mcfs locks` in text and JSON.
#![allow(clippy::unwrap_used)]

use mcfs_integration::*;
use std::process::Command;
use std::time::Duration;

fn start(dir: &std::path::Path, secret: &std::path::Path, listen: &str) -> (Daemon, String) {
    let addr_file = dir.join("dlm.addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut cmd = Command::new(bin("mcfs-dlm"));
    cmd.args(["--listen", listen, "--no-fencing", "--grace-ms", "500"])
        .arg("--data-dir")
        .arg(dir.join("dlm-data"))
        .arg("--secret-file")
        .arg(secret)
        .arg("--addr-file")
        .arg(&addr_file);
    let d = Daemon::spawn("mcfs-dlm", &mut cmd, dir.join(format!("dlm-{}.log", listen.replace(':', "_")))).unwrap();
    let addr = wait_addr_file(&addr_file, Duration::from_secs(20)).unwrap();
    (d, addr)
}

fn locks_json(addr: &str, secret: &std::path::Path) -> serde_json::Value {
    let out = Command::new(bin("mcfs"))
        .args(["locks", "--dlm", addr, "--json"])
        .arg("--secret-file")
        .arg(secret)
        .output()
        .unwrap();
    assert!(out.status.success(), "mcfs locks failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn dlm_refuses_to_start_without_fencing_or_secret() {
    let dir = tempdir();
    let secret = secret_file(dir.path()).unwrap();
    let out = Command::new(bin("mcfs-dlm"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .arg("--secret-file")
        .arg(&secret)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to start without fencing"));
    let out = Command::new(bin("mcfs-dlm"))
        .args(["--listen", "127.0.0.1:0", "--no-fencing", "--secret-file", "/nonexistent/secret"])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("secret"));
}

#[test]
fn dlm_serves_clients_survives_sigkill_and_dumps_state() {
    let dir = tempdir();
    let secret = secret_file(dir.path()).unwrap();
    let (mut dlm, addr) = start(dir.path(), &secret, "127.0.0.1:0");

    // Real traffic through the client library, from another process.
    let out = Command::new(bin("mcfs-dlm"))
        .args(["bench", "--addr", &addr, "--seconds", "0.3", "--json"])
        .arg("--secret-file")
        .arg(&secret)
        .output()
        .unwrap();
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(rows[0]["measured"].as_f64().unwrap() > 0.0, "{rows}");
    assert!(rows[3]["measured"].as_f64().unwrap() > 0.0, "{rows}");

    let j = locks_json(&addr, &secret);
    let ls = j["lockspaces"].as_array().unwrap();
    assert_eq!(ls.len(), 1, "{j}");
    assert!(ls[0]["name"].as_str().unwrap().starts_with("bench:"));
    let gen = ls[0]["generation"].as_u64().unwrap();
    assert!(gen >= 8, "4 joins and 4 leaves: {j}");
    assert!(ls[0]["members"].as_array().unwrap().is_empty(), "every bench client left cleanly: {j}");

    // SIGKILL, restart on the same state: the lockspace and its generation are still there.
    dlm.kill();
    let (_dlm2, addr2) = start(dir.path(), &secret, &addr);
    assert_eq!(addr2, addr);
    let j = locks_json(&addr, &secret);
    assert_eq!(j["lockspaces"][0]["generation"].as_u64().unwrap(), gen, "{j}");

    // Text form, and refusals.
    let out = Command::new(bin("mcfs"))
        .args(["locks", "--dlm", &addr])
        .arg("--secret-file")
        .arg(&secret)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("lockspace bench:") && text.contains(&format!("generation {gen}")), "{text}");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-secret").unwrap();
    let out = Command::new(bin("mcfs")).args(["locks", "--dlm", &addr]).arg("--secret-file").arg(&wrong).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"), "{}", String::from_utf8_lossy(&out.stderr));
}
