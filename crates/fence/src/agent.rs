//! The `agent` method: run a standard ClusterLabs `fence_*` agent, unchanged.
//!
//! The interface every ClusterLabs agent implements (fencing.py `process_input`):
//! with no arguments it reads `key=value` lines on stdin until EOF. We send
//! `action=`, `nodename=`, `plug=` (when configured) and the level's `options`.
//! Exit status: 0 success, 1 failure; for `action=status` 0 means ON and 2 OFF.
//!
//! 1. `action=off`; it must exit 0.
//! 2. `action=status`; it must exit 2 (OFF). An agent that claims success while the
//!    node is still ON (0) fails the level: only a confirmed OFF fences.
//! 3. Both run under one deadline (`timeout_ms`). On expiry the agent's whole
//!    process group is SIGKILLed (agents shell out to ssh, snmp, ipmitool ...) and
//!    the level fails.
//! 4. Unfence is the same with `action=on`, confirmed by `status` exiting 0.

use crate::config::AgentLevel;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How much of an agent's output is kept in the attempt message.
const OUTPUT_TAIL: usize = 600;

/// The exact text sent on the agent's stdin.
pub fn stdin_text(level: &AgentLevel, node_name: &str, action: &str) -> String {
    let mut s = format!("action={action}\nnodename={node_name}\n");
    if let Some(p) = &level.plug {
        s.push_str(&format!("plug={p}\n"));
    }
    for (k, v) in &level.options {
        s.push_str(&format!("{k}={v}\n"));
    }
    s
}

#[derive(Debug)]
pub struct Run {
    /// `None` when killed by a signal (or by us on time-out).
    pub exit: Option<i32>,
    pub timed_out: bool,
    pub output: String,
}

impl Run {
    fn describe(&self, action: &str) -> String {
        let how = match (self.timed_out, self.exit) {
            (true, _) => "timed out and was killed".to_string(),
            (false, Some(c)) => format!("exited {c}"),
            (false, None) => "was killed by a signal".to_string(),
        };
        if self.output.is_empty() {
            format!("action={action} {how}")
        } else {
            format!("action={action} {how} [{}]", self.output)
        }
    }
}

fn tail(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let s = s.trim();
    let cut = s.len().saturating_sub(OUTPUT_TAIL);
    let cut = (cut..=s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[cut..].split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Run the agent once with `input` on stdin, killed at `deadline`.
pub async fn run(agent: &Path, input: &str, deadline: Instant) -> Result<Run, String> {
    let mut cmd = tokio::process::Command::new(agent);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", agent.display()))?;
    let pgid = child.id().map(|p| p as i32);
    let mut stdin = child.stdin.take();
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let input = input.to_string();
    // Write stdin and drain stdout/stderr concurrently, so a chatty agent never
    // blocks on a full pipe.
    let feeder = tokio::spawn(async move {
        if let Some(mut s) = stdin.take() {
            let _ = s.write_all(input.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    let reader = tokio::spawn(async move {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let ra = async {
            if let Some(o) = out.as_mut() {
                let _ = o.read_to_end(&mut a).await;
            }
        };
        let rb = async {
            if let Some(e) = err.as_mut() {
                let _ = e.read_to_end(&mut b).await;
            }
        };
        tokio::join!(ra, rb);
        a.extend_from_slice(&b);
        a
    });
    let left = deadline.saturating_duration_since(Instant::now());
    let (exit, timed_out) = match tokio::time::timeout(left, child.wait()).await {
        Ok(Ok(st)) => (st.code(), false),
        Ok(Err(e)) => return Err(format!("waiting for {}: {e}", agent.display())),
        Err(_) => {
            if let Some(pg) = pgid {
                // SAFETY: kill(2) on the process group we created for the agent.
                unsafe { libc::kill(-pg, libc::SIGKILL) };
            }
            let _ = child.wait().await;
            (None, true)
        }
    };
    feeder.abort();
    // A grandchild may hold the pipes open after the agent exits: don't wait on it.
    let output = match tokio::time::timeout(Duration::from_millis(500), reader).await {
        Ok(Ok(bytes)) => tail(&bytes),
        _ => String::new(),
    };
    Ok(Run {
        exit,
        timed_out,
        output,
    })
}

/// Fence: `off`, then confirm with `status` (exit 2). `Ok(message)` when off.
pub async fn off(level: &AgentLevel, node_name: &str) -> Result<String, String> {
    switch(level, node_name, "off", 2).await
}

/// Unfence: `on`, then confirm with `status` (exit 0).
pub async fn on(level: &AgentLevel, node_name: &str) -> Result<String, String> {
    switch(level, node_name, "on", 0).await
}

async fn switch(
    level: &AgentLevel,
    node_name: &str,
    action: &str,
    status_want: i32,
) -> Result<String, String> {
    let deadline = Instant::now() + level.timeout;
    let name = level.agent.display().to_string();
    let r = run(
        &level.agent,
        &stdin_text(level, node_name, action),
        deadline,
    )
    .await?;
    tracing::info!(agent = %name, action, exit = ?r.exit, timed_out = r.timed_out, "fence agent ran");
    if r.timed_out {
        return Err(format!(
            "{name}: {} (timeout {} ms)",
            r.describe(action),
            level.timeout.as_millis()
        ));
    }
    if r.exit != Some(0) {
        return Err(format!("{name}: {}", r.describe(action)));
    }
    let s = run(
        &level.agent,
        &stdin_text(level, node_name, "status"),
        deadline,
    )
    .await?;
    tracing::info!(agent = %name, action = "status", exit = ?s.exit, timed_out = s.timed_out, "fence agent ran");
    let state = |c: i32| match c {
        0 => "ON",
        2 => "OFF",
        _ => "unknown",
    };
    match s.exit {
        Some(c) if c == status_want && !s.timed_out => Ok(format!(
            "{name}: action={action} exited 0; action=status exited {c} ({})",
            state(c)
        )),
        Some(c @ (0 | 2)) if !s.timed_out => Err(format!(
            "{name}: action={action} exited 0 but action=status exited {c}: the node is {}, not {}",
            state(c),
            state(status_want)
        )),
        _ if s.timed_out => Err(format!(
            "{name}: {} (timeout {} ms)",
            s.describe("status"),
            level.timeout.as_millis()
        )),
        _ => Err(format!(
            "{name}: action={action} exited 0 but {}",
            s.describe("status")
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    pub(crate) fn script_agent() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/agents/fence_mcfs_test")
    }

    fn level(dir: &Path, mode: &str, timeout_ms: u64) -> AgentLevel {
        let mut options = BTreeMap::new();
        options.insert(
            "record".to_string(),
            dir.join("record").display().to_string(),
        );
        options.insert(
            "state_file".to_string(),
            dir.join("state").display().to_string(),
        );
        options.insert("mode".to_string(), mode.to_string());
        AgentLevel {
            agent: script_agent(),
            plug: Some("plug-7".into()),
            options,
            timeout: Duration::from_millis(timeout_ms),
            unfence: true,
        }
    }

    fn records(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("record"))
            .unwrap_or_default()
            .split("---\n")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[tokio::test]
    async fn off_sends_key_value_lines_and_verifies_with_status() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("state"), "on").unwrap();
        let l = level(d.path(), "ok", 10_000);
        let msg = off(&l, "node7").await.unwrap();
        assert!(msg.contains("status exited 2 (OFF)"), "{msg}");
        let recs = records(d.path());
        assert_eq!(recs.len(), 2, "{recs:?}");
        let first: Vec<&str> = recs[0].lines().collect();
        assert_eq!(first[0], "action=off");
        assert!(first.contains(&"nodename=node7"));
        assert!(first.contains(&"plug=plug-7"));
        assert!(first.contains(&"mode=ok"));
        assert!(recs[1].starts_with("action=status\n"));
        assert_eq!(
            std::fs::read_to_string(d.path().join("state"))
                .unwrap()
                .trim(),
            "off"
        );

        let msg = on(&l, "node7").await.unwrap();
        assert!(msg.contains("status exited 0 (ON)"), "{msg}");
        assert!(records(d.path())[2].starts_with("action=on\n"));
    }

    #[tokio::test]
    async fn exit_1_is_a_failure_with_the_agents_words() {
        let d = tempfile::tempdir().unwrap();
        let e = off(&level(d.path(), "fail", 10_000), "n")
            .await
            .unwrap_err();
        assert!(
            e.contains("action=off exited 1") && e.contains("simulated failure"),
            "{e}"
        );
        assert_eq!(
            records(d.path()).len(),
            1,
            "status must not run after a failed off"
        );
    }

    #[tokio::test]
    async fn success_without_off_status_is_a_failure() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("state"), "on").unwrap();
        let e = off(&level(d.path(), "lie", 10_000), "n").await.unwrap_err();
        assert!(
            e.contains("action=status exited 0: the node is ON, not OFF"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_hanging_agent_and_its_children_are_killed_at_the_timeout() {
        let d = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let e = off(&level(d.path(), "hang", 300), "n").await.unwrap_err();
        assert!(e.contains("timed out and was killed"), "{e}");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t0.elapsed()
        );
        // The agent wrote its sleeper's pid; the process group kill must have ended it.
        let pid: i32 = std::fs::read_to_string(d.path().join("record.sleeper"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if st.contains(") Z") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            st.is_empty() || st.contains(") Z"),
            "agent's child survived: {st}"
        );
    }

    #[test]
    fn stdin_text_is_exact() {
        let mut options = BTreeMap::new();
        options.insert("ip".to_string(), "10.1.1.1".to_string());
        options.insert("b".to_string(), "2".to_string());
        let l = AgentLevel {
            agent: "/bin/true".into(),
            plug: None,
            options,
            timeout: Duration::from_secs(1),
            unfence: true,
        };
        assert_eq!(
            stdin_text(&l, "n1", "off"),
            "action=off\nnodename=n1\nb=2\nip=10.1.1.1\n"
        );
    }
}
