//! Harness for the integration tests: real loop devices, real daemons, real FUSE
//! mounts. Every resource a test creates is held by a guard whose `Drop` removes
//! it (kill the daemon, `umount -l` the mount, `losetup -d` the loop device), so a
//! failing test leaves nothing behind on the machine.
//!
//! Binaries are found in the cargo target directory; the first call to [`bin`] in
//! a test process runs `cargo build --workspace --bins` so tests never use stale
//! daemons.

#![allow(clippy::unwrap_used)]

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Path of a workspace binary (debug profile), building the workspace binaries
/// once per test process.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        if std::env::var_os("MCFS_SKIP_BUILD").is_some() {
            return Ok(());
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--workspace", "--bins", "--quiet"])
            .current_dir(workspace_root())
            .status()
            .map_err(|e| format!("cannot run cargo build: {e}"))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("cargo build --workspace --bins failed: {st}"))
        }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    let p = target_dir().join("debug").join(name);
    assert!(p.exists(), "binary {} not found", p.display());
    p
}

/// Poll `f` until it returns `Some`, or fail after `timeout` saying what we waited for.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A private temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("mcfs-test-").tempdir().unwrap()
}

/// Create a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)?;
    Ok(())
}

/// A loop device over a backing file, detached on drop.
pub struct LoopDev {
    pub path: PathBuf,
}

impl LoopDev {
    /// `losetup -f --show --direct-io=on FILE`.
    pub fn attach(file: &Path) -> Result<LoopDev> {
        let out = Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .context("run losetup")?;
        if !out.status.success() {
            bail!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(LoopDev { path })
    }

    /// A fresh sparse image of `size` bytes in `dir`, attached.
    pub fn new_image(dir: &Path, size: u64) -> Result<LoopDev> {
        let img = dir.join("disk.img");
        sparse_file(&img, size)?;
        LoopDev::attach(&img)
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        // A mount that still uses the device makes detaching lazy (autoclear).
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A daemon process, SIGKILLed and reaped on drop. Its stdout/stderr go to `log`.
pub struct Daemon {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Daemon> {
        let f = std::fs::File::create(&log)?;
        let f2 = f.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Daemon { name: name.to_string(), child: Some(child), log })
    }

    /// [`Daemon::spawn`] a daemon given `--addr-file ADDR_FILE` and wait until it
    /// writes its listening address there; if it does not, the error carries
    /// its exit status and log.
    pub fn spawn_listening(name: &str, cmd: &mut Command, log: PathBuf, addr_file: &Path) -> Result<(Daemon, String)> {
        let _ = std::fs::remove_file(addr_file);
        let mut daemon = Daemon::spawn(name, cmd.arg("--addr-file").arg(addr_file), log)?;
        match wait_addr_file(addr_file, Duration::from_secs(30)) {
            Ok(a) => Ok((daemon, a)),
            Err(e) => {
                let st = daemon.exited();
                anyhow::bail!("{name} did not start ({e}); exit {st:?}; log:\n{}", daemon.log_text())
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Has it exited? (reaps it if so)
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Wait for a clean exit after a signal.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let st = wait_for(&format!("{} to exit", self.name), timeout, || self.exited())?;
        self.child = None;
        Ok(st)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Read an address a daemon wrote to its `--addr-file` once it listens.
pub fn wait_addr_file(path: &Path, timeout: Duration) -> Result<String> {
    wait_for(&format!("address file {}", path.display()), timeout, || {
        std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    })
}

/// A FUSE mount point, lazily unmounted on drop (a killed daemon leaves a stale one).
pub struct MountGuard {
    pub path: PathBuf,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Is `path` a mount point in /proc/mounts?
pub fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy();
    std::fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&want)))
        .unwrap_or(false)
}

/// Write a random cluster secret file.
pub fn secret_file(dir: &Path) -> Result<PathBuf> {
    let p = dir.join("secret");
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))?;
    let s: String = b.iter().map(|x| format!("{x:02x}")).collect();
    std::fs::write(&p, s)?;
    Ok(p)
}

pub mod dlmd;
pub mod fence;
pub mod ops;
pub mod rng;
pub mod seed;
pub mod workload;

/// A local cluster for a test: `mcfs_cli::cluster` (the code behind `mcfs
/// cluster up`) in a private temp dir, torn down on drop even when the test fails.
pub struct TestCluster {
    pub c: mcfs_cli::cluster::Cluster,
    pub dir: tempfile::TempDir,
}

impl TestCluster {
    pub fn options(nodes: u32) -> (tempfile::TempDir, mcfs_cli::cluster::ClusterOptions) {
        let dir = tempdir();
        let bin_dir = bin("mcfs-node").parent().unwrap().to_path_buf();
        let mut o = mcfs_cli::cluster::ClusterOptions::new(dir.path().join("c"), nodes, bin_dir);
        o.size = 512 << 20;
        (dir, o)
    }

    pub fn up(dir: tempfile::TempDir, o: &mcfs_cli::cluster::ClusterOptions) -> Result<TestCluster> {
        let c = mcfs_cli::cluster::Cluster::up(o)?;
        Ok(TestCluster { c, dir })
    }

    pub fn start(nodes: u32) -> Result<TestCluster> {
        let (dir, o) = Self::options(nodes);
        Self::up(dir, &o)
    }

    pub fn mnt(&self, n: u32) -> PathBuf {
        self.c.mountpoint(n)
    }

    /// Print the daemons' logs (for a failing test's output).
    pub fn dump_logs(&self) {
        for name in ["dlm", "fenced"].into_iter().map(String::from).chain((1..=self.c.f.nodes).map(|n| format!("node{n}"))) {
            eprintln!("----- {name} -----\n{}", mcfs_cli::cluster::tail(&self.c.log(&name), 40));
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
            if std::env::var_os("MCFS_KEEP_FAILED").is_some() {
                // debugging: leave the cluster running for inspection
                eprintln!("MCFS_KEEP_FAILED: cluster left running in {}", self.c.f.dir.display());
                let _kept = std::mem::replace(&mut self.dir, tempdir()).keep();
                return;
            }
        }
        let _ = self.c.down();
    }
}

/// Run `fsck-mcfs` (read-only) on a device; returns (exit code, output).
pub fn fsck(device: &Path) -> (i32, String) {
    let out = Command::new(bin("fsck-mcfs")).arg("-n").arg(device).output().expect("run fsck-mcfs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}
