//! Helpers for the lock server and fencing agent tests (`hardening_*`,
//! `metrics_*`): start a real `mcfs-dlm` / `mcfs-fenced` on 127.0.0.1:0 with a
//! metrics port, scrape `GET /metrics` and read values out of it, and write a
//! process-fencing configuration whose "node" is a stand-in process.

use crate::{bin, wait_addr_file, Daemon};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// A running daemon with its gRPC and metrics addresses.
pub struct Served {
    pub daemon: Daemon,
    pub addr: String,
    pub metrics: String,
}

impl Served {
    pub fn scrape(&self) -> Result<String> {
        scrape(&self.metrics)
    }

    /// The value of one sample (see [`metric`]); 0 when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.scrape().ok().and_then(|t| metric(&t, name, labels)).unwrap_or(0.0)
    }
}

fn start(kind: &str, dir: &Path, tag: &str, args: &[String]) -> Result<Served> {
    let metrics_file = dir.join(format!("{tag}.metrics"));
    let _ = std::fs::remove_file(&metrics_file);
    let mut cmd = Command::new(bin(kind));
    cmd.args(args).arg("--metrics").arg("127.0.0.1:0").arg("--metrics-addr-file").arg(&metrics_file).env("RUST_LOG", "info");
    let (daemon, addr) = Daemon::spawn_listening(tag, &mut cmd, dir.join(format!("{tag}.log")), &dir.join(format!("{tag}.addr")))?;
    let metrics = wait_addr_file(&metrics_file, Duration::from_secs(10))?;
    Ok(Served { daemon, addr, metrics })
}

/// `mcfs-dlm --listen 127.0.0.1:0 --data-dir DIR/<tag>.data --secret-file S`
/// plus `--fence ADDR` (or `--no-fencing`) and `extra` flags.
pub fn start_dlm(dir: &Path, tag: &str, secret: &Path, fence: Option<&str>, extra: &[&str]) -> Result<Served> {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join(format!("{tag}.data")).display().to_string(),
        "--secret-file".into(),
        secret.display().to_string(),
    ];
    match fence {
        Some(f) => args.extend(["--fence".into(), f.to_string()]),
        None => args.push("--no-fencing".into()),
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    start("mcfs-dlm", dir, tag, &args)
}

/// `mcfs-fenced --listen LISTEN --config C --data-dir DIR/<tag>.data --secret-file S` plus `extra`.
pub fn start_fenced(dir: &Path, tag: &str, config: &Path, secret: &Path, listen: &str, extra: &[&str]) -> Result<Served> {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        listen.into(),
        "--config".into(),
        config.display().to_string(),
        "--data-dir".into(),
        dir.join(format!("{tag}.data")).display().to_string(),
        "--secret-file".into(),
        secret.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    start("mcfs-fenced", dir, tag, &args)
}

/// A stand-in for a node: a `sleep` process whose pid is in `pid_file`,
/// killed on drop if the fencing agent did not.
pub struct StandIn {
    pub child: Child,
    pub pid_file: PathBuf,
}

impl StandIn {
    pub fn spawn(pid_file: &Path) -> Result<StandIn> {
        let child = Command::new("sleep").arg("600").spawn().context("spawn sleep")?;
        std::fs::write(pid_file, format!("{}\n", child.id()))?;
        Ok(StandIn { child, pid_file: pid_file.to_path_buf() })
    }

    /// Has it exited (been fenced)? Reaps it.
    pub fn gone(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fencing configuration: each `(node, pid_file)` gets one process level
/// (expecting a `sleep` command line); `manual` nodes get a manual level.
pub fn fence_config(dir: &Path, process: &[(u32, &Path)], manual: &[u32]) -> Result<PathBuf> {
    let mut s = String::new();
    for (n, pf) in process {
        s.push_str(&format!(
            "[[node]]\nid = {n}\n[[node.level]]\nmethod = \"process\"\npid_file = \"{}\"\nexpect_cmdline = \"sleep\"\ntimeout_ms = 10000\n",
            pf.display()
        ));
    }
    for n in manual {
        s.push_str(&format!("[[node]]\nid = {n}\n[[node.level]]\nmethod = \"manual\"\n"));
    }
    let p = dir.join("fence.toml");
    std::fs::write(&p, s)?;
    Ok(p)
}

/// `GET /metrics` over plain HTTP/1.1.
pub fn scrape(addr: &str) -> Result<String> {
    let (code, body) = http_get(addr, "/metrics")?;
    if code != 200 {
        bail!("GET /metrics on {addr}: HTTP {code}: {body}");
    }
    Ok(body)
}

/// (status code, body) of `GET path`.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").context("no end of HTTP head")?;
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).context("no status code")?;
    Ok((code, body.to_string()))
}

/// The value of the first sample of `name` whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, r)) => (n, r.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let ok = labels.iter().all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if ok {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// Every sample line names a family that has `# TYPE` above it, and parses.
pub fn check_exposition(text: &str) -> Result<usize> {
    let mut typed = std::collections::HashSet::new();
    let mut n = 0;
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap_or("");
            typed.insert(name.to_string());
            continue;
        }
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        let (series, value) = l.rsplit_once(' ').with_context(|| format!("bad line {l:?}"))?;
        let name = series.split('{').next().unwrap_or("");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        if !typed.contains(family) {
            bail!("sample {name} has no # TYPE line");
        }
        if value != "+Inf" && value.parse::<f64>().is_err() {
            bail!("bad value in {l:?}");
        }
        n += 1;
    }
    Ok(n)
}
