//! `mcfs bench`: every benchmark of the project in one run, each side by side
//! with its reference measured in the same run on the same machine (and, for
//! storage, the same loop device), printed as one table (or JSON).
//!
//! | group | ours | reference | target |
//! |---|---|---|---|
//! | blockdev | crates/blockdev on io_uring | fio --ioengine=io_uring --direct=1 | >= 0.95x |
//! | dlm | lock+unlock pairs/s, EX ping-pong | the absolute targets | see rows |
//! | mount | 1 GiB sequential write/read through a mount | ext4 on the same loop device | >= 0.7x |
//! | smallfiles | create+stat+unlink of 10,000 files | bindfs over ext4 (a FUSE peer) | >= 1.0x |
//! | failover | SIGKILL to survivors holding the dead node's locks | pacemaker+dlm stacks: tens of seconds | <= 2 s |
//! | stall | allocation waits with the lock server frozen, both evict modes | --evict=sync | p99 <= 10 ms |

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cluster::{Cluster, ClusterOptions};
use crate::proc_util::{alive, is_mounted, signal, wait_for, wait_gone};

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub group: String,
    pub name: String,
    pub ours: f64,
    pub reference: Option<f64>,
    pub reference_name: String,
    pub unit: String,
    /// ours / reference, or reference / ours when lower is better.
    pub ratio: Option<f64>,
    pub target: String,
    pub ok: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// Groups to run (empty: all).
    pub only: Vec<String>,
    /// Smaller sizes and shorter runs.
    pub quick: bool,
    /// Where mcfs-node and friends are.
    pub bin_dir: PathBuf,
}

fn wanted(o: &BenchOpts, g: &str) -> bool {
    o.only.is_empty() || o.only.iter().any(|x| x == g)
}

fn row(group: &str, name: &str, ours: f64, reference: Option<(f64, &str)>, unit: &str, higher_better: bool, target: &str, ok: Option<bool>) -> Row {
    // lower-is-better rows at zero (no stall at all) have no meaningful ratio
    let ratio = reference.and_then(|(r, _)| if higher_better { Some(ours / r.max(1e-9)) } else if ours > 0.0 { Some(r / ours) } else { None });
    Row {
        group: group.into(),
        name: name.into(),
        ours,
        reference: reference.map(|r| r.0),
        reference_name: reference.map_or(String::new(), |r| r.1.to_string()),
        unit: unit.into(),
        ratio,
        target: target.into(),
        ok,
    }
}

/// Run the selected groups. Progress goes to stderr.
pub fn run(o: &BenchOpts) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let work = tempfile::Builder::new().prefix("mcfs-bench-").tempdir()?;
    if wanted(o, "blockdev") {
        eprintln!("bench: blockdev vs fio ...");
        rows.extend(blockdev(o)?);
    }
    if wanted(o, "dlm") {
        eprintln!("bench: lock manager ...");
        rows.extend(dlm(o)?);
    }
    if wanted(o, "mount") {
        eprintln!("bench: mount throughput vs ext4 ...");
        rows.extend(mount_throughput(o, work.path())?);
    }
    if wanted(o, "smallfiles") {
        eprintln!("bench: small files vs bindfs ...");
        rows.extend(small_files(o, work.path())?);
    }
    if wanted(o, "failover") {
        eprintln!("bench: failover time ...");
        rows.extend(failover(o, work.path())?);
    }
    if wanted(o, "stall") {
        eprintln!("bench: allocation stalls with a frozen lock server ...");
        rows.extend(stalls(o, work.path())?);
    }
    Ok(rows)
}

/// The table, for a terminal.
pub fn render(rows: &[Row]) -> String {
    let mut s = format!("{:<10} {:<44} {:>12} {:>12} {:<18} {:>7} {:<12} {}\n", "group", "benchmark", "mcfs", "reference", "(reference)", "ratio", "target", "ok");
    s += &"-".repeat(124);
    s += "\n";
    let f = |v: f64| if v >= 1000.0 { format!("{v:.0}") } else if v >= 10.0 { format!("{v:.1}") } else { format!("{v:.3}") };
    for r in rows {
        s += &format!(
            "{:<10} {:<44} {:>12} {:>12} {:<18} {:>7} {:<12} {}\n",
            r.group,
            format!("{} ({})", r.name, r.unit),
            f(r.ours),
            r.reference.map(f).unwrap_or_default(),
            r.reference_name,
            r.ratio.map(|x| format!("{x:.2}x")).unwrap_or_default(),
            r.target,
            match r.ok {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
    }
    s
}

fn blockdev(o: &BenchOpts) -> Result<Vec<Row>> {
    let fio = which("fio");
    if fio.is_none() {
        eprintln!("bench: fio is not installed (apt-get install fio): blockdev rows without reference");
    }
    let opts = mcfs_blockdev::bench::BenchOpts {
        runtime: Duration::from_secs(if o.quick { 1 } else { 3 }),
        rounds: if o.quick { 1 } else { 3 },
        fio,
        reads: false,
        control: false,
        sync_threads: 0,
        ..Default::default()
    };
    let rows = mcfs_blockdev::bench::run(None, &opts).map_err(|e| anyhow::anyhow!("blockdev bench: {e}"))?;
    Ok(rows
        .into_iter()
        .filter(|r| !r.control)
        .map(|r| {
            let seq = r.workload.contains("1M") || r.workload.contains("1m");
            let (ours, refv, unit) = if seq { (r.ours.mib_s, r.fio.map(|m| m.mib_s), "MiB/s") } else { (r.ours.iops, r.fio.map(|m| m.iops), "IOPS") };
            let mut x = row("blockdev", &r.workload, ours, refv.map(|v| (v, "fio io_uring")), unit, true, ">= 0.95x", r.meets_target());
            if let Some(q) = r.ratio {
                x.ratio = Some(q); // median of per-round ratios, as the crate reports it
            }
            x
        })
        .collect())
}

fn dlm(o: &BenchOpts) -> Result<Vec<Row>> {
    let opts = mcfs_dlm::bench::BenchOptions { duration: Duration::from_secs(if o.quick { 1 } else { 3 }), ..Default::default() };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let rows = rt.block_on(mcfs_dlm::bench::run(&opts)).map_err(|e| anyhow::anyhow!("dlm bench: {e}"))?;
    Ok(rows.into_iter().map(|r| row("dlm", &r.name, r.measured, None, &r.unit, true, &r.target, Some(r.ok))).collect())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.exists()).or_else(|| {
        let p = Path::new("/usr/sbin").join(name);
        p.exists().then_some(p)
    })
}

/// A loop device over a sparse file, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn new(dir: &Path, size: u64) -> Result<Loop> {
        let img = dir.join("bench.img");
        let f = fs::File::create(&img)?;
        f.set_len(size)?;
        drop(f);
        let out = Command::new("losetup").args(["-f", "--show", "--direct-io=on"]).arg(&img).output()?;
        if !out.status.success() {
            bail!("losetup: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Loop { dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()) })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A mount, unmounted (lazily if busy) on drop.
struct Mounted {
    dir: PathBuf,
    pid: Option<u32>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let st = Command::new("umount").arg(&self.dir).status();
            if !st.map(|s| s.success()).unwrap_or(false) {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            }
        }
        if let Some(p) = self.pid {
            if !wait_gone(p, Duration::from_secs(30)) {
                signal(p, libc::SIGKILL);
                wait_gone(p, Duration::from_secs(5));
            }
        }
    }
}

fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn mount_ext4(dev: &Path, dir: &Path) -> Result<Mounted> {
    sh(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]).arg(dev))?;
    fs::create_dir_all(dir)?;
    sh(Command::new("mount").arg(dev).arg(dir))?;
    Ok(Mounted { dir: dir.to_path_buf(), pid: None })
}

fn mount_mcfs(o: &BenchOpts, dev: &Path, dir: &Path, log: &Path) -> Result<Mounted> {
    let d = mcfs_blockdev::open_path(dev, false).map_err(|e| anyhow::anyhow!("{e}"))?;
    let p = mcfs_node::mkfs::MkfsParams { lock_proto: mcfs_format::sb::LockProto::NoLock, ..Default::default() };
    mcfs_node::mkfs::mkfs(&d, &p, &mut |_, _| {}).map_err(|e| anyhow::anyhow!("mkfs: {e}"))?;
    drop(d);
    fs::create_dir_all(dir)?;
    let logf = fs::File::create(log)?;
    let child = Command::new(o.bin_dir.join("mcfs-node"))
        .args(["--lock", "nolock", "--node-id", "1", "--device"])
        .arg(dev)
        .arg("--mountpoint")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(logf.try_clone()?))
        .stderr(Stdio::from(logf))
        .spawn()
        .context("start mcfs-node")?;
    let pid = child.id();
    let m = Mounted { dir: dir.to_path_buf(), pid: Some(pid) };
    wait_for(Duration::from_secs(30), || (!alive(pid) || (is_mounted(dir) && fs::metadata(dir).is_ok())).then_some(())).context("mount")?;
    if !alive(pid) {
        bail!("mcfs-node exited: {}", crate::cluster::tail(log, 10));
    }
    Ok(m)
}

fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// (write MiB/s, read MiB/s) of one file of `size` bytes in 1 MiB requests.
fn seq_io(dir: &Path, size: u64) -> Result<(f64, f64)> {
    let p = dir.join("seq");
    let buf: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let t = Instant::now();
    let mut f = fs::File::create(&p)?;
    for _ in 0..size >> 20 {
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    drop(f);
    let w = (size >> 20) as f64 / t.elapsed().as_secs_f64();
    // Read twice, each time after dropping the caches, and keep the better:
    // below the loop device the host caches what it has served once (a second
    // O_DIRECT read of the raw device runs up to 2x the first), and whoever
    // reads a region first pays for it. Two reads give both filesystems the
    // same chance.
    let mut r: f64 = 0.0;
    for _ in 0..2 {
        drop_caches();
        let t = Instant::now();
        let mut f = fs::File::open(&p)?;
        let mut rb = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut rb)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        if total != size {
            bail!("read back {total} of {size} bytes");
        }
        r = r.max((size >> 20) as f64 / t.elapsed().as_secs_f64());
    }
    fs::remove_file(&p)?;
    Ok((w, r))
}

fn mount_throughput(o: &BenchOpts, work: &Path) -> Result<Vec<Row>> {
    let size: u64 = if o.quick { 256 << 20 } else { 1 << 30 };
    let lo = Loop::new(work, size * 2 + (512 << 20))?;
    let (ew, er) = {
        let _m = mount_ext4(&lo.dev, &work.join("ext4"))?;
        seq_io(&work.join("ext4"), size)?
    };
    let (mw, mr) = {
        let _m = mount_mcfs(o, &lo.dev, &work.join("mcfs"), &work.join("node-mount.log"))?;
        seq_io(&work.join("mcfs"), size)?
    };
    let label = format!("{} MiB sequential", size >> 20);
    let mut rows = vec![
        row("mount", &format!("{label} write+fsync"), mw, Some((ew, "ext4, same device")), "MiB/s", true, ">= 0.7x", Some(mw / ew >= 0.7)),
        row("mount", &format!("{label} read (cold, best of 2)"), mr, Some((er, "ext4, same device")), "MiB/s", true, ">= 0.7x", Some(mr / er >= 0.7)),
    ];
    // What the device itself gives a sequential reader (for reading the ext4
    // figure: the backing image may sit in the host's cache, page cache or not).
    if let Some(fio_read) = which("fio").and_then(|f| fio_seq_read(&f, &lo.dev, size)) {
        rows.push(row("mount", &format!("{label} read (cold, best of 2), vs the raw device"), mr, Some((fio_read, "fio 1M qd8 read")), "MiB/s", true, "-", None));
    }
    Ok(rows)
}

/// MiB/s of fio reading `size` bytes of `dev` sequentially, 1 MiB requests,
/// 8 in flight, O_DIRECT (None if fio fails); the better of two runs, as
/// [`seq_io`] reads.
fn fio_seq_read(fio: &Path, dev: &Path, size: u64) -> Option<f64> {
    let a = fio_seq_read_once(fio, dev, size)?;
    Some(a.max(fio_seq_read_once(fio, dev, size).unwrap_or(0.0)))
}

fn fio_seq_read_once(fio: &Path, dev: &Path, size: u64) -> Option<f64> {
    drop_caches();
    let out = Command::new(fio)
        .args(["--name=seqread", "--rw=read", "--bs=1M", "--iodepth=8", "--ioengine=io_uring", "--direct=1", "--output-format=terse"])
        .arg(format!("--size={size}"))
        .arg(format!("--filename={}", dev.display()))
        .stderr(Stdio::null())
        .output()
        .ok()?;
    // terse v3: field 7 is the read bandwidth in KiB/s
    let kib: f64 = String::from_utf8_lossy(&out.stdout).lines().next()?.split(';').nth(6)?.parse().ok()?;
    (out.status.success() && kib > 0.0).then_some(kib / 1024.0)
}

/// files/s for create, stat, unlink of `n` files (each phase in turn).
fn small_file_ops(dir: &Path, n: usize) -> Result<f64> {
    let d = dir.join("small");
    fs::create_dir_all(&d)?;
    let t = Instant::now();
    for i in 0..n {
        fs::File::create(d.join(format!("f{i:06}")))?;
    }
    for i in 0..n {
        fs::metadata(d.join(format!("f{i:06}")))?;
    }
    for i in 0..n {
        fs::remove_file(d.join(format!("f{i:06}")))?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn small_files(o: &BenchOpts, work: &Path) -> Result<Vec<Row>> {
    let n = if o.quick { 2000 } else { 10_000 };
    let Some(bindfs) = which("bindfs") else {
        bail!("bindfs is not installed (apt-get install bindfs)");
    };
    let lo = Loop::new(work, 2 << 30)?;
    let reference = {
        let _e = mount_ext4(&lo.dev, &work.join("ext4"))?;
        let src = work.join("ext4/src");
        fs::create_dir_all(&src)?;
        let mp = work.join("bindfs");
        fs::create_dir_all(&mp)?;
        sh(Command::new(&bindfs).arg(&src).arg(&mp))?;
        let _b = Mounted { dir: mp.clone(), pid: None };
        small_file_ops(&mp, n)?
    };
    let ours = {
        let _m = mount_mcfs(o, &lo.dev, &work.join("mcfs"), &work.join("node-small.log"))?;
        small_file_ops(&work.join("mcfs"), n)?
    };
    Ok(vec![row("smallfiles", &format!("create+stat+unlink x{n}"), ours, Some((reference, "bindfs over ext4")), "files/s", true, ">= 1.0x", Some(ours >= reference))])
}

fn cluster(o: &BenchOpts, work: &Path, name: &str, nodes: u32, per_node: &[(u32, Vec<String>)]) -> Result<Cluster> {
    let mut co = ClusterOptions::new(work.join(name), nodes, &o.bin_dir);
    co.size = 1 << 30;
    for (n, a) in per_node {
        co.per_node_args.insert(*n, a.clone());
    }
    Cluster::up(&co)
}

fn failover(o: &BenchOpts, work: &Path) -> Result<Vec<Row>> {
    let c = cluster(o, work, "failover", 3, &[])?;
    let r = (|| -> Result<Vec<f64>> {
        let mut times = Vec::new();
        let rounds = if o.quick { 3 } else { 7 };
        fs::create_dir_all(c.mountpoint(2).join("fo"))?;
        for i in 0..rounds {
            let p2 = c.mountpoint(2).join(format!("fo/x{i}"));
            let mut f = fs::File::create(&p2)?;
            f.write_all(b"held by node 2")?;
            f.sync_all()?;
            drop(f);
            let t = Instant::now();
            c.kill(2)?;
            // node 1 needs the lock the dead node 2 holds
            let mut f = fs::OpenOptions::new().append(true).open(c.mountpoint(1).join(format!("fo/x{i}")))?;
            f.write_all(b" and then by node 1")?;
            times.push(t.elapsed().as_secs_f64());
            drop(f);
            c.start(2)?;
        }
        Ok(times)
    })();
    let _ = c.down();
    let mut times = r?;
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let max = *times.last().unwrap_or(&0.0);
    Ok(vec![
        row("failover", "SIGKILL to dead node's lock granted, median", median, Some((30.0, "pacemaker+dlm (typ.)")), "s", false, "<= 2 s", Some(median <= 2.0)),
        row("failover", "SIGKILL to dead node's lock granted, max", max, None, "s", false, "<= 2 s", Some(max <= 2.0)),
    ])
}

fn node_json(c: &Cluster, n: u32) -> Result<serde_json::Value> {
    let out = Command::new(std::env::current_exe()?).args(["status", "--json", "--cluster-dir"]).arg(&c.f.dir).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["nodes"].as_array().into_iter().flatten().find(|x| x["node"].as_u64() == Some(n as u64)).map(|x| x["status"].clone()).context("node status")
}

const OWN: usize = 256;

/// One evict mode: node 1 under memory pressure with unlinked inodes on its LRU
/// (their deallocation needs cluster locks) while the lock server is frozen.
/// Returns (p99 ms, longest ms, allocations that waited).
fn stall_run(o: &BenchOpts, work: &Path, mode: &str) -> Result<(f64, f64, u64)> {
    let c = cluster(o, work, &format!("stall-{mode}"), 2, &[(1, vec!["--cache-mem".into(), "4M".into(), "--evict".into(), mode.into()])])?;
    let r = (|| -> Result<(f64, f64, u64)> {
        let (a, b) = (c.mountpoint(1), c.mountpoint(2));
        fs::create_dir_all(a.join("own"))?;
        // four times the budget of cacheable data: every read allocates
        for i in 0..OWN {
            fs::write(a.join(format!("own/{i}")), vec![i as u8; 64 << 10])?;
        }
        // unlinked inodes only node 1 will deallocate (see the seed test)
        fs::create_dir_all(b.join("u"))?;
        for i in 0..32 {
            fs::write(b.join(format!("u/f{i}")), vec![1u8; 8192])?;
            fs::hard_link(b.join(format!("u/f{i}")), b.join(format!("u/h{i}")))?;
        }
        for i in 0..32 {
            fs::metadata(a.join(format!("u/h{i}")))?;
            fs::metadata(a.join(format!("u/f{i}")))?;
        }
        for i in 0..32 {
            fs::remove_file(b.join(format!("u/f{i}")))?;
            fs::remove_file(b.join(format!("u/h{i}")))?;
        }
        wait_for(Duration::from_secs(20), || (node_json(&c, 2).ok()?["eviction"]["deferred_now"].as_u64() == Some(0)).then_some(())).context("node 2 handing over")?;
        // node 1's own files stay open: reading them needs no lock request
        let mut own: Vec<fs::File> = (0..OWN).map(|i| fs::File::open(a.join(format!("own/{i}")))).collect::<std::io::Result<_>>()?;
        std::thread::sleep(Duration::from_millis(300));
        let _ = fs::write("/proc/sys/vm/drop_caches", "2");
        // freeze the lock server and keep node 1 reading (memory pressure); the
        // freeze ends on time whatever the reader does
        let dlm = c.f.dlm_pid.context("no lock server")?;
        let freeze = Duration::from_secs(if o.quick { 2 } else { 4 });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st2 = stop.clone();
        signal(dlm, libc::SIGSTOP);
        let reader = std::thread::spawn(move || -> std::io::Result<u64> {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; 64 << 10];
            let mut n = 0u64;
            while !st2.load(std::sync::atomic::Ordering::Relaxed) {
                let f = &mut own[(n % OWN as u64) as usize];
                f.read_at(&mut buf, 0)?;
                n += 1;
            }
            Ok(n)
        });
        std::thread::sleep(freeze);
        signal(dlm, libc::SIGCONT);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))?.context("reading on node 1")?;
        eprintln!("bench: {mode}: {reads} reads of 64 KiB during the freeze");
        let st = node_json(&c, 1)?;
        let m = st["memory"].clone();
        Ok((m["alloc_wait_p99_us"].as_u64().unwrap_or(0) as f64 / 1000.0, m["longest_alloc_wait_us"].as_u64().unwrap_or(0) as f64 / 1000.0, m["alloc_waits"].as_u64().unwrap_or(0)))
    })();
    if mode == "sync" {
        // reclaim may still be blocked: do not wait for a clean unmount
        let _ = c.kill(1);
    }
    let _ = c.down();
    r
}

fn stalls(o: &BenchOpts, work: &Path) -> Result<Vec<Row>> {
    let (np99, nmax, nwaits) = stall_run(o, work, "nonblocking")?;
    let (sp99, smax, swaits) = stall_run(o, work, "sync")?;
    eprintln!("bench: allocation waits: nonblocking {nwaits}, sync {swaits}");
    Ok(vec![
        row("stall", "allocation wait p99, DLM frozen", np99, Some((sp99, "--evict=sync")), "ms", false, "<= 10 ms", Some(np99 <= 10.0)),
        row("stall", "allocation wait max, DLM frozen", nmax, Some((smax, "--evict=sync")), "ms", false, "-", None),
        row("stall", "allocations that waited, DLM frozen", nwaits as f64, Some((swaits as f64, "--evict=sync")), "count", false, "-", None),
    ])
}
