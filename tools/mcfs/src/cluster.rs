//! A whole mcfs cluster on one machine, in one directory: a sparse image on a
//! loop device (direct I/O), `mcfs-fenced` with process fencing for the local
//! nodes, `mcfs-dlm`, and one `mcfs-node` per node mounted under `DIR/mnt/nodeN`.
//! Like ceph's vstart.sh or `cockroach demo`, for a cluster filesystem.
//!
//! Everything the cluster owns is recorded in `DIR/cluster.toml` (loop device,
//! image, addresses, pids), so `down` cleans up after a crashed or half-started
//! cluster without touching anything it did not create.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::proc_util::{alive, is_mounted, read_pid, signal, umount_lazy, wait_for, wait_gone};

/// How to bring a cluster up.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub dir: PathBuf,
    pub nodes: u32,
    /// Image size in bytes.
    pub size: u64,
    /// Where mcfs-dlm, mcfs-fenced and mcfs-node live.
    pub bin_dir: PathBuf,
    /// Journals (default: nodes + 1, so a spare node can join).
    pub journals: Option<u32>,
    /// Single node without lock server (nodes must be 1).
    pub nolock: bool,
    /// Extra flags for every mcfs-node.
    pub node_args: Vec<String>,
    /// Extra flags for one node.
    pub per_node_args: BTreeMap<u32, Vec<String>>,
    /// Extra flags for mcfs-dlm (e.g. --lease-ms).
    pub dlm_args: Vec<String>,
    /// Print progress.
    pub verbose: bool,
}

impl ClusterOptions {
    pub fn new(dir: impl Into<PathBuf>, nodes: u32, bin_dir: impl Into<PathBuf>) -> ClusterOptions {
        ClusterOptions {
            dir: dir.into(),
            nodes,
            size: 1 << 30,
            bin_dir: bin_dir.into(),
            journals: None,
            nolock: false,
            node_args: Vec::new(),
            per_node_args: BTreeMap::new(),
            dlm_args: Vec::new(),
            verbose: false,
        }
    }
}

/// `DIR/cluster.toml`: everything the cluster created, and where to reach it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ClusterFile {
    pub dir: PathBuf,
    pub lockspace: String,
    pub image: PathBuf,
    pub loop_device: Option<PathBuf>,
    pub nodes: u32,
    pub nolock: bool,
    pub bin_dir: PathBuf,
    pub secret_file: Option<PathBuf>,
    pub dlm_addr: Option<String>,
    pub fence_addr: Option<String>,
    pub dlm_pid: Option<u32>,
    pub fenced_pid: Option<u32>,
    pub node_args: Vec<String>,
    pub per_node_args: BTreeMap<String, Vec<String>>,
    pub dlm_args: Vec<String>,
}

/// A running (or recorded) local cluster.
pub struct Cluster {
    pub f: ClusterFile,
}

fn spawn_daemon(bin: &Path, args: &[String], log: &Path) -> Result<u32> {
    if !bin.exists() {
        bail!("{} not found (build with `cargo build --release --workspace --bins`)", bin.display());
    }
    let out = fs::OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("log {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::from(out)).stderr(Stdio::from(err));
    // SAFETY: setsid in the child before exec: the daemon outlives this command
    // and ignores the terminal's signals.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("start {}", bin.display()))?;
    Ok(child.id())
}

fn random_secret() -> String {
    let b: [u8; 24] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read_addr(path: &Path, pid: u32, what: &str, log: &Path) -> Result<String> {
    wait_for(Duration::from_secs(30), || {
        if !alive(pid) {
            return Some(Err(()));
        }
        fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).map(Ok)
    })
    .and_then(|r| r.ok())
    .with_context(|| format!("{what} did not start; last lines of {}:\n{}", log.display(), tail(log, 15)))
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

impl Cluster {
    pub fn file_path(dir: &Path) -> PathBuf {
        dir.join("cluster.toml")
    }

    /// Load a cluster recorded in `dir`.
    pub fn open(dir: &Path) -> Result<Cluster> {
        let p = Self::file_path(dir);
        let s = fs::read_to_string(&p).with_context(|| format!("no cluster in {} (missing {})", dir.display(), p.display()))?;
        let f: ClusterFile = toml::from_str(&s).with_context(|| format!("parsing {}", p.display()))?;
        Ok(Cluster { f })
    }

    fn save(&self) -> Result<()> {
        let p = Self::file_path(&self.f.dir);
        let tmp = p.with_extension("toml.tmp");
        fs::write(&tmp, toml::to_string_pretty(&self.f)?)?;
        fs::rename(&tmp, &p)?;
        Ok(())
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.f.dir.join("logs").join(format!("{name}.log"))
    }
    pub fn mountpoint(&self, n: u32) -> PathBuf {
        self.f.dir.join("mnt").join(format!("node{n}"))
    }
    pub fn pid_file(&self, n: u32) -> PathBuf {
        self.f.dir.join(format!("node{n}.pid"))
    }
    pub fn admin_file(&self, n: u32) -> PathBuf {
        self.f.dir.join(format!("node{n}.admin"))
    }
    pub fn node_config(&self, n: u32) -> PathBuf {
        self.f.dir.join(format!("node{n}.toml"))
    }
    pub fn node_pid(&self, n: u32) -> Option<u32> {
        read_pid(&self.pid_file(n)).filter(|p| alive(*p))
    }
    pub fn device(&self) -> PathBuf {
        self.f.loop_device.clone().unwrap_or_else(|| self.f.image.clone())
    }

    /// Create and start everything. On failure, what was created is torn down.
    pub fn up(o: &ClusterOptions) -> Result<Cluster> {
        if o.nodes == 0 || o.nodes > 16 {
            bail!("--nodes must be between 1 and 16");
        }
        if o.nolock && o.nodes != 1 {
            bail!("a nolock cluster has exactly one node");
        }
        preflight()?;
        fs::create_dir_all(&o.dir).with_context(|| format!("create {}", o.dir.display()))?;
        let dir = fs::canonicalize(&o.dir)?;
        if let Ok(c) = Cluster::open(&dir) {
            if c.anything_running() {
                bail!("a cluster is already running in {} (run `mcfs cluster down --dir {}` first)", dir.display(), dir.display());
            }
            c.down()?;
        }
        fs::create_dir_all(dir.join("logs"))?;
        fs::create_dir_all(dir.join("mnt"))?;
        let name = dir.file_name().map(|s| s.to_string_lossy().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').take(30).collect::<String>()).filter(|s| !s.is_empty()).unwrap_or_else(|| "mcfs".into());
        let mut c = Cluster {
            f: ClusterFile {
                dir: dir.clone(),
                lockspace: format!("local:{name}"),
                image: dir.join("disk.img"),
                nodes: o.nodes,
                nolock: o.nolock,
                bin_dir: fs::canonicalize(&o.bin_dir).unwrap_or_else(|_| o.bin_dir.clone()),
                node_args: o.node_args.clone(),
                per_node_args: o.per_node_args.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
                dlm_args: o.dlm_args.clone(),
                ..Default::default()
            },
        };
        c.save()?;
        match c.bring_up(o) {
            Ok(()) => Ok(c),
            Err(e) => {
                let _ = c.down();
                Err(e)
            }
        }
    }

    fn say(&self, o: &ClusterOptions, what: &str) {
        if o.verbose {
            println!("  {what}");
        }
    }

    fn bring_up(&mut self, o: &ClusterOptions) -> Result<()> {
        let dir = self.f.dir.clone();
        // image and loop device
        {
            let f = fs::File::create(&self.f.image).with_context(|| format!("create {}", self.f.image.display()))?;
            f.set_len(o.size)?;
        }
        let out = Command::new("losetup").args(["-f", "--show", "--direct-io=on"]).arg(&self.f.image).output().context("run losetup")?;
        if !out.status.success() {
            bail!("losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let lo = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        self.f.loop_device = Some(lo.clone());
        self.save()?;
        self.say(o, &format!("image {} on {}", self.f.image.display(), lo.display()));
        // format
        {
            let dev = mcfs_blockdev::open_path(&lo, false).with_context(|| format!("open {}", lo.display()))?;
            let (cl, fsn) = self.f.lockspace.split_once(':').unwrap_or(("local", "mcfs"));
            let p = mcfs_node::mkfs::MkfsParams {
                opts: mcfs_format::geometry::MkfsOptions { journals: o.journals.unwrap_or(o.nodes + 1), journal_bytes: 32 << 20, ..Default::default() },
                lock_proto: if o.nolock { mcfs_format::sb::LockProto::NoLock } else { mcfs_format::sb::LockProto::Dlm },
                cluster: cl.into(),
                fsname: fsn.into(),
                uuid: None,
            };
            mcfs_node::mkfs::mkfs(&dev, &p, &mut |_, _| {}).map_err(|e| anyhow::anyhow!("mkfs: {e}"))?;
        }
        self.say(o, &format!("formatted {} ({} journals)", self.f.lockspace, o.journals.unwrap_or(o.nodes + 1)));
        let secret = dir.join("secret");
        fs::write(&secret, random_secret())?;
        self.f.secret_file = Some(secret);
        if !o.nolock {
            self.write_fence_config()?;
            self.start_fenced()?;
            self.say(o, &format!("mcfs-fenced on {}", self.f.fence_addr.clone().unwrap_or_default()));
            self.start_dlm(None)?;
            self.say(o, &format!("mcfs-dlm on {}", self.f.dlm_addr.clone().unwrap_or_default()));
        }
        self.save()?;
        for n in 1..=o.nodes {
            self.start(n)?;
            self.say(o, &format!("node {n} mounted on {}", self.mountpoint(n).display()));
        }
        Ok(())
    }

    fn write_fence_config(&self) -> Result<()> {
        let mut s = String::from("# written by `mcfs cluster up`: process fencing of the local nodes\n");
        for n in 1..=self.f.nodes.max(16) {
            s += &format!(
                "\n[[node]]\nid = {n}\nname = \"node{n}\"\n\n  [[node.level]]\n  method = \"process\"\n  pid_file = \"{}\"\n  expect_cmdline = \"mcfs-node\"\n{}  timeout_ms = 10000\n",
                self.pid_file(n).display(),
                match &self.f.loop_device {
                    Some(d) => format!("  devices = [\"{}\"]\n", d.display()),
                    None => String::new(),
                }
            );
        }
        fs::write(self.f.dir.join("fence.toml"), s)?;
        Ok(())
    }

    fn secret_arg(&self) -> Result<String> {
        Ok(self.f.secret_file.as_ref().context("no secret file")?.display().to_string())
    }

    fn start_fenced(&mut self) -> Result<()> {
        let addr_file = self.f.dir.join("fenced.addr");
        let _ = fs::remove_file(&addr_file);
        fs::create_dir_all(self.f.dir.join("fenced"))?;
        let listen = self.f.fence_addr.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let args = vec![
            "--listen".into(),
            listen,
            "--config".into(),
            self.f.dir.join("fence.toml").display().to_string(),
            "--data-dir".into(),
            self.f.dir.join("fenced").display().to_string(),
            "--secret-file".into(),
            self.secret_arg()?,
            "--addr-file".into(),
            addr_file.display().to_string(),
        ];
        let log = self.log("fenced");
        let pid = spawn_daemon(&self.f.bin_dir.join("mcfs-fenced"), &args, &log)?;
        self.f.fenced_pid = Some(pid);
        self.f.fence_addr = Some(read_addr(&addr_file, pid, "mcfs-fenced", &log)?);
        self.save()
    }

    /// Start (or restart, on the same address and data) the lock server.
    pub fn start_dlm(&mut self, extra: Option<&[String]>) -> Result<()> {
        let addr_file = self.f.dir.join("dlm.addr");
        let _ = fs::remove_file(&addr_file);
        fs::create_dir_all(self.f.dir.join("dlm"))?;
        let listen = self.f.dlm_addr.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let mut args = vec![
            "--listen".into(),
            listen,
            "--data-dir".into(),
            self.f.dir.join("dlm").display().to_string(),
            "--secret-file".into(),
            self.secret_arg()?,
            "--fence".into(),
            self.f.fence_addr.clone().context("mcfs-fenced is not running")?,
            "--addr-file".into(),
            addr_file.display().to_string(),
        ];
        args.extend(self.f.dlm_args.iter().cloned());
        if let Some(e) = extra {
            args.extend(e.iter().cloned());
        }
        let log = self.log("dlm");
        let pid = spawn_daemon(&self.f.bin_dir.join("mcfs-dlm"), &args, &log)?;
        self.f.dlm_pid = Some(pid);
        self.f.dlm_addr = Some(read_addr(&addr_file, pid, "mcfs-dlm", &log)?);
        self.save()
    }

    /// SIGKILL the lock server (a crash).
    pub fn kill_dlm(&mut self) {
        if let Some(p) = self.f.dlm_pid.take() {
            signal(p, libc::SIGKILL);
            wait_gone(p, Duration::from_secs(5));
        }
        let _ = self.save();
    }

    fn write_node_config(&self, n: u32) -> Result<()> {
        let mut s = format!(
            "device = \"{}\"\nmountpoint = \"{}\"\nnode_id = {n}\npid_file = \"{}\"\nadmin_addr_file = \"{}\"\n",
            self.device().display(),
            self.mountpoint(n).display(),
            self.pid_file(n).display(),
            self.admin_file(n).display()
        );
        s += &format!("secret_file = \"{}\"\n", self.secret_arg()?);
        if self.f.nolock {
            s += "lock = \"nolock\"\n";
        } else {
            s += &format!("dlm = \"{}\"\n", self.f.dlm_addr.clone().unwrap_or_default());
        }
        let mut f = fs::File::create(self.node_config(n))?;
        f.write_all(s.as_bytes())?;
        Ok(())
    }

    /// Start node `n` (after a kill, or a clean stop) and wait for its mount.
    pub fn start(&self, n: u32) -> Result<()> {
        if n == 0 || n > 255 {
            bail!("node ids are 1..=255");
        }
        if let Some(pid) = self.node_pid(n) {
            bail!("node {n} is already running (pid {pid})");
        }
        if !self.f.nolock {
            self.unfence(n)?;
        }
        let mp = self.mountpoint(n);
        umount_lazy(&mp); // a killed node's stale mount
        fs::create_dir_all(&mp)?;
        self.write_node_config(n)?;
        let _ = fs::remove_file(self.admin_file(n));
        let mut args = vec!["--config".into(), self.node_config(n).display().to_string()];
        args.extend(self.f.node_args.iter().cloned());
        if let Some(extra) = self.f.per_node_args.get(&n.to_string()) {
            args.extend(extra.iter().cloned());
        }
        let log = self.log(&format!("node{n}"));
        let pid = spawn_daemon(&self.f.bin_dir.join("mcfs-node"), &args, &log)?;
        let ok = wait_for(Duration::from_secs(60), || {
            if !alive(pid) {
                return Some(false);
            }
            (is_mounted(&mp) && fs::metadata(&mp).is_ok()).then_some(true)
        });
        match ok {
            Some(true) => Ok(()),
            _ => {
                signal(pid, libc::SIGKILL);
                wait_gone(pid, Duration::from_secs(5));
                umount_lazy(&mp);
                bail!("node {n} did not mount; last lines of {}:\n{}", log.display(), tail(&log, 20))
            }
        }
    }

    /// Let a fenced node back in (its journal must have been replayed): the
    /// local cluster unfences automatically on `start`, as a real cluster may
    /// by configuration. A node that is not fenced is left alone.
    pub fn unfence(&self, n: u32) -> Result<()> {
        let (Some(addr), Some(sf)) = (self.f.dlm_addr.clone(), self.f.secret_file.clone()) else { return Ok(()) };
        let secret = mcfs_proto::auth::Secret::from_file(&sf).map_err(anyhow::Error::msg)?;
        let lockspace = self.f.lockspace.clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(30)).connect().await?;
            let mut cl = mcfs_proto::dlm::dlm_client::DlmClient::with_interceptor(ch, secret.interceptor());
            match cl.unfence(mcfs_proto::dlm::UnfenceRequest { lockspace, node_id: n }).await {
                Ok(_) => Ok(()),
                Err(st) if st.code() == tonic::Code::FailedPrecondition || st.code() == tonic::Code::NotFound => {
                    // not fenced (or never joined): nothing to do, unless its journal still waits for replay
                    if st.message().contains("replay") {
                        bail!("node {n} cannot rejoin yet: {}", st.message());
                    }
                    Ok(())
                }
                Err(st) => bail!("unfencing node {n}: {}", st.message()),
            }
        })
    }

    /// SIGKILL node `n` (a crash). Its stale mount stays until `start` or `down`.
    pub fn kill(&self, n: u32) -> Result<u32> {
        let pid = self.node_pid(n).with_context(|| format!("node {n} is not running"))?;
        signal(pid, libc::SIGKILL);
        wait_gone(pid, Duration::from_secs(10));
        Ok(pid)
    }

    /// Cleanly unmount node `n` and wait for its daemon to exit.
    pub fn stop(&self, n: u32) -> Result<()> {
        let mp = self.mountpoint(n);
        let pid = self.node_pid(n);
        if is_mounted(&mp) {
            // umount stats the root first: a node stuck on a cluster lock makes
            // that hang, so give up after a while instead of hanging with it
            let mut child = Command::new("umount").arg(&mp).spawn()?;
            let st = wait_for(Duration::from_secs(30), || child.try_wait().ok().flatten());
            match st {
                Some(st) if st.success() => {}
                Some(_) => bail!("umount {} failed (busy?)", mp.display()),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("umount {} did not finish in 30 s (the node is stuck; see `mcfs status`)", mp.display());
                }
            }
        }
        if let Some(pid) = pid {
            if !wait_gone(pid, Duration::from_secs(60)) {
                bail!("node {n} (pid {pid}) did not exit after unmount; see {}", self.log(&format!("node{n}")).display());
            }
        }
        Ok(())
    }

    pub fn anything_running(&self) -> bool {
        (1..=self.f.nodes.max(16)).any(|n| self.node_pid(n).is_some()) || self.f.dlm_pid.is_some_and(alive) || self.f.fenced_pid.is_some_and(alive)
    }

    /// Stop everything, unmount, detach the loop device. Idempotent; cleans up
    /// after crashes and half-started clusters. Only touches what cluster.toml
    /// says this cluster created.
    pub fn down(&self) -> Result<()> {
        let mut problems = Vec::new();
        for n in 1..=self.f.nodes.max(16) {
            let mp = self.mountpoint(n);
            if self.node_pid(n).is_some() && is_mounted(&mp) {
                if let Err(e) = self.stop(n) {
                    problems.push(format!("node {n}: {e}; killing it"));
                }
            }
            if let Some(pid) = self.node_pid(n) {
                signal(pid, libc::SIGKILL);
                wait_gone(pid, Duration::from_secs(10));
            }
            umount_lazy(&mp);
            let _ = fs::remove_file(self.pid_file(n));
        }
        for pid in [self.f.dlm_pid, self.f.fenced_pid].into_iter().flatten() {
            if alive(pid) {
                signal(pid, libc::SIGTERM);
                if !wait_gone(pid, Duration::from_secs(5)) {
                    signal(pid, libc::SIGKILL);
                    wait_gone(pid, Duration::from_secs(5));
                }
            }
        }
        if let Some(lo) = &self.f.loop_device {
            if loop_backing_is(lo, &self.f.image) {
                let st = Command::new("losetup").arg("-d").arg(lo).status();
                if !st.map(|s| s.success()).unwrap_or(false) {
                    problems.push(format!("could not detach {}", lo.display()));
                } else if wait_for(Duration::from_secs(20), || (!loop_backing_is(lo, &self.f.image)).then_some(())).is_none() {
                    // A loop device still open is only marked for detaching
                    // (autoclear); a SIGKILLed node's io_uring lets go of it a
                    // little after the process is gone. Wait for that, so that
                    // `down` returning means the device is free.
                    problems.push(format!("{} is still open by someone; it detaches itself when they close it", lo.display()));
                }
            }
        }
        if !problems.is_empty() {
            for p in &problems {
                eprintln!("mcfs cluster down: {p}");
            }
        }
        Ok(())
    }
}

/// Does loop device `lo` still point at our image? (Never detach someone else's.)
fn loop_backing_is(lo: &Path, image: &Path) -> bool {
    let Some(name) = lo.file_name() else { return false };
    let p = Path::new("/sys/block").join(name).join("loop/backing_file");
    match fs::read_to_string(p) {
        Ok(s) => {
            let s = s.trim();
            let img = fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
            Path::new(s) == img || s.strip_suffix(" (deleted)").is_some_and(|x| Path::new(x) == img)
        }
        Err(_) => false,
    }
}

/// What a local cluster needs from the machine (checked before anything is created).
pub fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("a local cluster needs root (loop devices and FUSE mounts): run with sudo");
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: load the fuse module (modprobe fuse)");
    }
    if !Path::new("/dev/loop-control").exists() {
        bail!("no loop device support (modprobe loop)");
    }
    Ok(())
}
