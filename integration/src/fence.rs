//! Helpers for the fencing tests: start a real `mcfs-fenced`, and drive it over
//! gRPC through the real `mcfs fence ...` command, reading its `--json` output.

use crate::{bin, Daemon};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running mcfs-fenced (SIGKILLed on drop) and how to reach it.
pub struct Fenced {
    pub daemon: Daemon,
    pub addr: String,
    pub secret: PathBuf,
}

/// Start `mcfs-fenced --listen 127.0.0.1:0` with `config` and `data_dir`, and wait
/// until it listens. `tag` names its log file in `dir`.
pub fn start_fenced(dir: &Path, config: &Path, data_dir: &Path, secret: &Path, tag: &str) -> Result<Fenced> {
    let mut cmd = Command::new(bin("mcfs-fenced"));
    cmd.arg("--listen").arg("127.0.0.1:0").arg("--config").arg(config).arg("--data-dir").arg(data_dir).arg("--secret-file").arg(secret).env("RUST_LOG", "info");
    let (daemon, addr) = Daemon::spawn_listening(tag, &mut cmd, dir.join(format!("{tag}.log")), &dir.join(format!("{tag}.addr")))?;
    Ok(Fenced { daemon, addr, secret: secret.to_path_buf() })
}

impl Fenced {
    /// Run `mcfs fence ARGS --fence ADDR --secret-file SECRET`.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.cli_with_secret(args, &self.secret)
    }

    pub fn cli_with_secret(&self, args: &[&str], secret: &Path) -> Result<Output> {
        let out = Command::new(bin("mcfs"))
            .arg("fence")
            .args(args)
            .arg("--fence")
            .arg(&self.addr)
            .arg("--secret-file")
            .arg(secret)
            .arg("--cluster-dir")
            .arg("/nonexistent-mcfs-cluster")
            .output()
            .context("run mcfs")?;
        Ok(out)
    }

    /// Run a `mcfs fence` subcommand with `--json`; it must succeed.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a)?;
        if !out.status.success() {
            bail!(
                "mcfs fence {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("mcfs fence {} printed no JSON: {}", args.join(" "), String::from_utf8_lossy(&out.stdout)))
    }
}

/// Text of a JSON string field, "" if absent.
pub fn s<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v.get(key).and_then(|x| x.as_str()).unwrap_or("")
}

/// A JSON number field, 0 if absent.
pub fn n(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(|x| x.as_u64()).unwrap_or(0)
}
