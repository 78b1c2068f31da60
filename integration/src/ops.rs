//! Helpers for the operator-facing tests (`cluster_cli`, `mount_helper`,
//! `errors_cli`, `packaging_configs`): run the real commands and capture what a
//! user would read, find what a cluster directory left behind on the machine,
//! and give a test thread a private mount namespace so mount(8) finds a helper
//! that was never installed in the real /sbin.

use crate::{bin, wait_for};
use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What a command printed (stdout then stderr) and how it exited.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub text: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

/// Run `cmd` (a `Command` or `&mut Command`) to completion; never panics on a
/// failing command.
pub fn run(mut cmd: impl std::borrow::BorrowMut<Command>) -> Result<Out> {
    let cmd = cmd.borrow_mut();
    let o = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let text = format!("{stdout}{}", strip_ansi(&String::from_utf8_lossy(&o.stderr)));
    Ok(Out { code: o.status.code().unwrap_or(-1), stdout, text })
}

/// Log lines of the daemons carry colour codes when written by tracing.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `mcfs ARGS` from this workspace's debug build, never rebuilding on its own
/// (the test built everything through [`bin`] already).
pub fn mcfs(args: &[&str]) -> Command {
    let mut c = Command::new(bin("mcfs"));
    c.args(args).env("MCFS_SKIP_BUILD", "1");
    c
}

/// The mounts of the calling thread's mount namespace (`/proc/thread-self`:
/// `/proc/mounts` is the main thread's view, which differs after
/// [`private_mount_namespace`]).
pub fn mounts() -> Vec<(String, String, String)> {
    std::fs::read_to_string("/proc/thread-self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((f.next()?.to_string(), f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

/// Is `dir` a mount point, in this thread's namespace? Returns its fs type.
pub fn mounted_type(dir: &Path) -> Option<String> {
    let want = dir.to_string_lossy();
    mounts().into_iter().find(|(_, m, _)| *m == want).map(|(_, _, t)| t)
}

/// Everything `dir` left on the machine: mounts under it, loop devices whose
/// backing file is under it, and processes whose command line mentions it.
pub fn leftovers(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().to_string();
    let mut found = Vec::new();
    for (src, m, t) in mounts() {
        if m.starts_with(&d) {
            found.push(format!("mount {src} on {m} ({t})"));
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                if b.trim().starts_with(&d) {
                    found.push(format!("loop device /dev/{name} backed by {}", b.trim()));
                }
            }
        }
    }
    let me = std::process::id().to_string();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let pid = e.file_name().to_string_lossy().to_string();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                continue;
            }
            let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(&d) {
                found.push(format!("process {pid}: {}", cmd.trim()));
            }
        }
    }
    found
}

/// Wait until `pid` no longer exists (it need not be our child).
pub fn wait_pid_gone(pid: u32, timeout: Duration) -> Result<()> {
    wait_for(&format!("process {pid} to exit"), timeout, || (!Path::new(&format!("/proc/{pid}")).exists() || zombie(pid)).then_some(()))
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next().map(|x| x == "Z")))
        .unwrap_or(false)
}

/// A process known by its pid file (a daemon that is not our child, such as
/// the node a mount helper forked), SIGKILLed on drop if still there.
pub struct PidFileGuard {
    pub pid_file: PathBuf,
    pub pid: Option<u32>,
}

impl PidFileGuard {
    pub fn new(pid_file: &Path) -> PidFileGuard {
        PidFileGuard { pid_file: pid_file.to_path_buf(), pid: None }
    }

    /// Read (and remember) the pid once the daemon wrote it.
    pub fn pid(&mut self) -> Option<u32> {
        if self.pid.is_none() {
            self.pid = std::fs::read_to_string(&self.pid_file).ok().and_then(|s| s.trim().parse().ok());
        }
        self.pid
    }
}

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            if Path::new(&format!("/proc/{pid}")).exists() {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let _ = wait_pid_gone(pid, Duration::from_secs(10));
            }
        }
    }
}

/// A mount point, lazily unmounted on drop (in the dropping thread's namespace).
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if mounted_type(&self.0).is_some() {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// `mcfs cluster down --dir D` on drop (through the library, so it runs even
/// when the `mcfs` binary is the thing that failed).
pub struct ClusterDirGuard(pub PathBuf);

impl Drop for ClusterDirGuard {
    fn drop(&mut self) {
        if let Ok(c) = mcfs_cli::cluster::Cluster::open(&self.0) {
            if std::thread::panicking() {
                for name in ["dlm", "fenced", "node1", "node2", "node3"] {
                    eprintln!("----- {name} -----\n{}", mcfs_cli::cluster::tail(&c.log(name), 30));
                }
            }
            let _ = c.down();
        }
    }
}

/// Move the calling thread into a mount namespace of its own, with every
/// mount private (nothing mounted here is seen by the rest of the machine),
/// and lay `helper_dir` over the directory `/sbin` resolves to with a
/// read-only overlay: mount(8) looks for `mount.TYPE` helpers only in /sbin,
/// /sbin/fs.d and /sbin/fs, and this way finds ours there without the real
/// /sbin being touched. Processes this thread starts afterwards (and their
/// children, such as the node daemon a helper forks) live in that namespace;
/// it disappears with the last of them.
pub fn private_mount_namespace(helper_dir: &Path) -> Result<()> {
    // SAFETY: unshare(2) affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        bail!("unshare(CLONE_NEWNS): {}", std::io::Error::last_os_error());
    }
    let root = CString::new("/")?;
    // SAFETY: mount(2) with valid C strings and null pointers where allowed.
    if unsafe { libc::mount(std::ptr::null(), root.as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) } != 0 {
        bail!("make / private: {}", std::io::Error::last_os_error());
    }
    // libmount records userspace options (_netdev, x-*) of helper mounts in
    // /run/mount/utab: keep those records in this namespace too.
    let utab_dir = Path::new("/run/mount");
    if utab_dir.is_dir() {
        let o = run(Command::new("mount").args(["-t", "tmpfs", "-o", "mode=0755,size=1m", "mcfs-test-utab"]).arg(utab_dir))?;
        if !o.ok() {
            bail!("tmpfs on {}: {}", utab_dir.display(), o.text);
        }
    }
    let sbin = std::fs::canonicalize("/sbin")?;
    let o = run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={}:{}", helper_dir.display(), sbin.display()))
        .arg(&sbin))?;
    if !o.ok() {
        bail!("overlay of {} on {}: {}", helper_dir.display(), sbin.display(), o.text);
    }
    Ok(())
}

/// A sparse image file of `size` bytes formatted by the real mkfs-mcfs with `args`.
pub fn mkfs_image(path: &Path, size: u64, args: &[&str]) -> Result<()> {
    crate::sparse_file(path, size)?;
    mkfs(path, args)
}

/// `mkfs-mcfs -q ARGS DEV`.
pub fn mkfs(dev: &Path, args: &[&str]) -> Result<()> {
    let o = run(Command::new(bin("mkfs-mcfs")).arg("-q").args(args).arg(dev))?;
    if !o.ok() {
        bail!("mkfs-mcfs {args:?} {}: {}", dev.display(), o.text);
    }
    Ok(())
}
