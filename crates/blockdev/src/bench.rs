//! This crate against `fio --ioengine=io_uring --direct=1`, side by side on the same
//! device in one run.
//!
//! Without a device, [`run`] makes one: a sparse file in a private temp dir, attached
//! with `losetup -f --show --direct-io=on`. The loop device is detached even if the
//! bench fails or is killed: right after attaching we hold it open and ask `losetup -d`,
//! which on a busy device only sets autoclear, so the kernel detaches it when the last
//! opener (us) closes; the backing file is unlinked at once for the same reason.
//!
//! Each workload keeps `qd` requests in flight for a fixed time, refilling as
//! completions arrive, as fio does. Our side is measured three ways ([`Mode`]):
//! completion callbacks that resubmit on the ring thread (fio's own structure: whoever
//! reaps issues the next request), futures awaited by one thread (the async API as a
//! tokio task would use it), and many threads calling the blocking API (as the FUSE
//! thread pool does). The device is first written end to end so that neither side pays
//! for the backing file's block allocation. fio and ours alternate within each round;
//! rows report medians over rounds.

use crate::buf::AlignedBuf;
use crate::error::Error;
use crate::uring::{IoFuture, OpenOptions, UringDevice};
use crate::BlockDevice;
use serde::Serialize;
use std::fmt::Write as _;
use std::future::Future as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// The ratio to fio the crate must reach on every row.
pub const TARGET_RATIO: f64 = 0.95;

#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// Time per measurement (each side, each row, each round).
    pub runtime: Duration,
    /// Size of the sparse image behind the loop device the bench creates.
    pub image_size: u64,
    /// Also measure the reads (same shapes as the writes).
    pub reads: bool,
    /// Repeat every measurement this many times (order alternating); report medians.
    pub rounds: u32,
    /// Write the whole device once before measuring.
    pub precondition: bool,
    /// The fio binary; `None` measures this crate only.
    pub fio: Option<PathBuf>,
    /// Also run each 4 KiB random workload as this many threads calling the blocking
    /// API (how the filesystem's FUSE thread pool uses the device), compared with the
    /// same fio numbers. 0 skips it.
    pub sync_threads: usize,
    /// Also run fio a second time in every round and report fio against itself: the
    /// noise floor of the machine, to read the other ratios against.
    pub control: bool,
    /// Only these workloads, by fio's name (`randwrite`, `write`, `randread`, `read`);
    /// empty runs all.
    pub only: Vec<String>,
}

impl Default for BenchOpts {
    fn default() -> BenchOpts {
        BenchOpts {
            runtime: Duration::from_secs(2),
            image_size: 1 << 30,
            reads: true,
            rounds: 3,
            precondition: true,
            fio: Some(PathBuf::from("fio")),
            sync_threads: 64,
            control: true,
            only: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Workload {
    pub write: bool,
    pub random: bool,
    pub block_size: usize,
    pub queue_depth: usize,
}

impl Workload {
    pub fn name(&self) -> String {
        let bs = if self.block_size >= 1 << 20 {
            format!("{}M", self.block_size >> 20)
        } else {
            format!("{}k", self.block_size >> 10)
        };
        format!("{bs} {} qd{}", self.fio_rw(), self.queue_depth)
    }

    fn fio_rw(&self) -> &'static str {
        match (self.write, self.random) {
            (true, true) => "randwrite",
            (true, false) => "write",
            (false, true) => "randread",
            (false, false) => "read",
        }
    }
}

/// The bench's workloads: 4 KiB random at queue depth 64, 1 MiB sequential at 8.
pub fn workloads(reads: bool) -> Vec<Workload> {
    let mut v = Vec::new();
    let dirs: &[bool] = if reads { &[true, false] } else { &[true] };
    for &write in dirs {
        v.push(Workload {
            write,
            random: true,
            block_size: 4096,
            queue_depth: 64,
        });
        v.push(Workload {
            write,
            random: false,
            block_size: 1 << 20,
            queue_depth: 8,
        });
    }
    v
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Measure {
    pub iops: f64,
    pub mib_s: f64,
    /// CPU time (user + system, all threads) over wall time, in percent of one CPU.
    pub cpu_pct: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: String,
    pub ours: Measure,
    pub fio: Option<Measure>,
    /// ours / fio in IOPS: the median of the per-round ratios.
    pub ratio: Option<f64>,
    /// Each round's ratio.
    pub ratios: Vec<f64>,
    /// A control row: fio against itself, not this crate.
    pub control: bool,
}

impl Row {
    /// Whether this crate reached the target on this row (`None` without fio, and for
    /// control rows).
    pub fn meets_target(&self) -> Option<bool> {
        if self.control {
            return None;
        }
        self.ratio.map(|r| r >= TARGET_RATIO)
    }
}

/// Run the bench on `device` (destroying its contents), or on a fresh loop device when
/// `None`. Returns one row per workload.
pub fn run(device: Option<&Path>, opts: &BenchOpts) -> Result<Vec<Row>, Error> {
    if let Some(fio) = &opts.fio {
        check_fio(fio)?;
    }
    let guard;
    let path: PathBuf = match device {
        Some(p) => p.to_path_buf(),
        None => {
            guard = LoopGuard::create(opts.image_size)?;
            guard.dev.clone()
        }
    };
    let dev = Arc::new(UringDevice::open(&path, OpenOptions::default())?);
    tracing::info!(device = %path.display(), size = dev.size(), ring = ?dev.ring_info(), "bench device");
    if opts.precondition {
        precondition(&dev)?;
    }
    let rounds = opts.rounds.max(1);
    let mut rows = Vec::new();
    let chosen = workloads(opts.reads)
        .into_iter()
        .filter(|w| opts.only.is_empty() || opts.only.iter().any(|o| o == w.fio_rw()));
    for w in chosen {
        let modes = modes_for(&w, opts);
        let mut ours: Vec<Vec<Measure>> = vec![Vec::new(); modes.len()];
        let mut fio = Vec::new();
        let mut fio_again = Vec::new();
        for r in 0..rounds {
            // Alternate who goes first, so neither side always inherits the other's state.
            let fio_first = r % 2 == 0;
            if fio_first {
                if let Some(f) = &opts.fio {
                    fio.push(run_fio(f, &path, &w, opts.runtime, dev.size())?);
                    tracing::debug!(workload = %w.name(), round = r, fio = ?fio.last());
                }
            }
            for (i, mode) in modes.iter().enumerate() {
                // fio flushes the device before each job (`invalidate=1` does BLKFLSBUF),
                // outside its timed window; do the same so both start from a clean device.
                dev.flush()?;
                let m = match mode {
                    Mode::Callbacks => run_ours_callbacks(&dev, &w, opts.runtime)?,
                    Mode::Futures => run_ours_futures(&dev, &w, opts.runtime)?,
                    Mode::Threads(n) => run_ours_threads(&dev, &w, opts.runtime, *n)?,
                };
                tracing::debug!(workload = %w.name(), ?mode, round = r, ours = ?m, stats = ?dev.stats());
                ours[i].push(m);
            }
            if !fio_first {
                if let Some(f) = &opts.fio {
                    fio.push(run_fio(f, &path, &w, opts.runtime, dev.size())?);
                    tracing::debug!(workload = %w.name(), round = r, fio = ?fio.last());
                }
            }
            if opts.control {
                if let Some(f) = &opts.fio {
                    fio_again.push(run_fio(f, &path, &w, opts.runtime, dev.size())?);
                    tracing::debug!(workload = %w.name(), round = r, fio_again = ?fio_again.last());
                }
            }
        }
        let fio_m = (!fio.is_empty()).then(|| median(&fio));
        for (mode, runs) in modes.iter().zip(&ours) {
            // Each round's fio and ours ran back to back: their ratio cancels slow drift
            // of the machine, so the row's ratio is the median of the per-round ratios.
            let ratios: Vec<f64> = runs
                .iter()
                .zip(&fio)
                .map(|(o, f)| ratio(o.iops, f.iops))
                .collect();
            let row = Row {
                workload: format!("{} — {}", w.name(), mode.label()),
                ours: median(runs),
                fio: fio_m,
                ratio: median_f(&ratios),
                ratios,
                control: false,
            };
            tracing::info!(?row, "measured");
            rows.push(row);
        }
        if !fio_again.is_empty() {
            // The second fio run of a round against the first: what the ratio of two
            // identical programs looks like on this machine right now.
            let ratios: Vec<f64> = fio_again
                .iter()
                .zip(&fio)
                .map(|(a, f)| ratio(a.iops, f.iops))
                .collect();
            rows.push(Row {
                workload: format!("{} — fio again (noise floor)", w.name()),
                ours: median(&fio_again),
                fio: fio_m,
                ratio: median_f(&ratios),
                ratios,
                control: true,
            });
        }
    }
    Ok(rows)
}

/// How our side drives the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `submit_*_with` callbacks resubmit from the ring thread (fio's structure: the
    /// thread that reaps a completion issues the next request).
    Callbacks,
    /// One thread awaiting `IoFuture`s and resubmitting (two thread hand-offs per
    /// completion batch).
    Futures,
    /// This many threads calling the blocking `write_at` / `read_at` (the FUSE pool).
    Threads(usize),
}

impl Mode {
    pub fn label(&self) -> String {
        match self {
            Mode::Callbacks => "callbacks".into(),
            Mode::Futures => "futures, 1 thread".into(),
            Mode::Threads(n) => format!("blocking, {n} threads"),
        }
    }
}

fn modes_for(w: &Workload, opts: &BenchOpts) -> Vec<Mode> {
    let mut m = vec![Mode::Callbacks, Mode::Futures];
    if w.random && opts.sync_threads > 0 {
        m.push(Mode::Threads(opts.sync_threads));
    }
    m
}

/// The measurement with the median IOPS (the mean of the middle two for an even count):
/// a neighbour's burst on a shared machine skews one round, not the result.
fn median(ms: &[Measure]) -> Measure {
    let mut v = ms.to_vec();
    v.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    match v.len() {
        0 => Measure::default(),
        n if n % 2 == 1 => v[n / 2],
        n => {
            let (a, b) = (v[n / 2 - 1], v[n / 2]);
            Measure {
                iops: (a.iops + b.iops) / 2.0,
                mib_s: (a.mib_s + b.mib_s) / 2.0,
                cpu_pct: (a.cpu_pct + b.cpu_pct) / 2.0,
            }
        }
    }
}

fn median_f(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// The table, with ratio and target columns.
pub fn format_table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | mcfs IOPS | mcfs MiB/s | mcfs CPU | fio IOPS | fio MiB/s | fio CPU | ratio | target |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let (fi, fm, fc) = match r.fio {
            Some(f) => (
                format!("{:.0}", f.iops),
                format!("{:.0}", f.mib_s),
                format!("{:.0}%", f.cpu_pct),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let ratio = match r.ratio {
            Some(x) if r.ratios.len() > 1 => {
                let lo = r.ratios.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = r.ratios.iter().copied().fold(0.0, f64::max);
                format!("{x:.3} ({lo:.2}–{hi:.2})")
            }
            Some(x) => format!("{x:.3}"),
            None => "-".into(),
        };
        let target = match (r.control, r.meets_target()) {
            (true, _) => "control".to_string(),
            (false, Some(ok)) => format!("≥ {TARGET_RATIO} {}", if ok { "met" } else { "MISSED" }),
            (false, None) => format!("≥ {TARGET_RATIO} (no fio)"),
        };
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.0}% | {fi} | {fm} | {fc} | {ratio} | {target} |",
            r.workload, r.ours.iops, r.ours.mib_s, r.ours.cpu_pct
        );
    }
    s
}

// ---- fio -------------------------------------------------------------------------

fn check_fio(fio: &Path) -> Result<(), Error> {
    match Command::new(fio)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(st) if st.success() => Ok(()),
        _ => Err(Error::Bench(format!(
            "fio not found (`{}`): install it with `apt-get install fio`, or run with --no-fio \
             to measure this crate alone",
            fio.display()
        ))),
    }
}

fn run_fio(
    fio: &Path,
    dev: &Path,
    w: &Workload,
    runtime: Duration,
    size: u64,
) -> Result<Measure, Error> {
    let secs = runtime.as_secs_f64().max(1.0).round() as u64;
    let cpu0 = cpu_time_of(libc::RUSAGE_CHILDREN);
    let started = Instant::now();
    let out = Command::new(fio)
        .arg("--name=mcfs-bench")
        .arg(format!("--filename={}", dev.display()))
        .args(["--ioengine=io_uring", "--direct=1"])
        .arg(format!("--rw={}", w.fio_rw()))
        .arg(format!("--bs={}", w.block_size))
        .arg(format!("--iodepth={}", w.queue_depth))
        .arg(format!("--size={size}"))
        .arg(format!("--runtime={secs}"))
        .args([
            "--time_based",
            "--norandommap",
            "--randrepeat=0",
            "--output-format=json",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Bench(format!("cannot run {}: {e}", fio.display())))?;
    if !out.status.success() {
        return Err(Error::Bench(format!(
            "fio failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_time_of(libc::RUSAGE_CHILDREN).saturating_sub(cpu0);
    let mut m = parse_fio_json(&String::from_utf8_lossy(&out.stdout), w.write)?;
    // fio reports its job thread's CPU only; count the whole process as we count ours
    // (io_uring's io-wq workers and all). The process runs slightly longer than the
    // job, so this errs in fio's favour.
    m.cpu_pct = 100.0 * cpu.as_secs_f64() / wall;
    Ok(m)
}

/// Read IOPS, bandwidth and CPU from fio's `--output-format=json` (it may print notes
/// before the JSON object).
pub fn parse_fio_json(text: &str, write: bool) -> Result<Measure, Error> {
    let start = text
        .find('{')
        .ok_or_else(|| Error::Bench("fio printed no JSON".into()))?;
    let v: serde_json::Value = serde_json::from_str(&text[start..])
        .map_err(|e| Error::Bench(format!("fio JSON: {e}")))?;
    let job = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or_else(|| Error::Bench("fio JSON has no jobs".into()))?;
    let dir = job
        .get(if write { "write" } else { "read" })
        .ok_or_else(|| Error::Bench("fio JSON job has no read/write section".into()))?;
    let num = |o: &serde_json::Value, k: &str| -> Result<f64, Error> {
        o.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| Error::Bench(format!("fio JSON lacks {k}")))
    };
    Ok(Measure {
        iops: num(dir, "iops")?,
        mib_s: num(dir, "bw_bytes")? / (1 << 20) as f64,
        cpu_pct: num(job, "usr_cpu")? + num(job, "sys_cpu")?,
    })
}

// ---- this crate --------------------------------------------------------------------

/// Completed slots, pushed by wakers (from the ring thread) and taken by the bench loop.
struct Ready {
    list: Mutex<Vec<usize>>,
    thread: Thread,
}

struct SlotWaker {
    slot: usize,
    ready: Arc<Ready>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        crate::uring::lock_ignoring_poison(&self.ready.list).push(self.slot);
        self.ready.thread.unpark();
    }
}

/// xorshift64*: enough randomness for offsets, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

struct Offsets {
    w: Workload,
    blocks: u64,
    next: u64,
    rng: Rng,
}

impl Offsets {
    fn next(&mut self) -> u64 {
        let b = if self.w.random {
            self.rng.next() % self.blocks
        } else {
            let b = self.next;
            self.next = (self.next + 1) % self.blocks;
            b
        };
        b * self.w.block_size as u64
    }
}

fn seed_from_clock() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (t ^ 0x9E37_79B9_7F4A_7C15) | 1
}

fn cpu_time() -> Duration {
    cpu_time_of(libc::RUSAGE_SELF)
}

fn cpu_time_of(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn run_ours_futures(dev: &UringDevice, w: &Workload, runtime: Duration) -> Result<Measure, Error> {
    let blocks = dev.size() / w.block_size as u64;
    if blocks == 0 {
        return Err(Error::Bench(format!(
            "device of {} bytes is smaller than one {}-byte block",
            dev.size(),
            w.block_size
        )));
    }
    let mut offs = Offsets {
        w: *w,
        blocks,
        next: 0,
        rng: Rng(seed_from_clock()),
    };
    let ready = Arc::new(Ready {
        list: Mutex::new(Vec::new()),
        thread: std::thread::current(),
    });
    let wakers: Vec<Waker> = (0..w.queue_depth)
        .map(|slot| {
            Waker::from(Arc::new(SlotWaker {
                slot,
                ready: ready.clone(),
            }))
        })
        .collect();
    let mut seed = Rng(0x1234_5678_9ABC_DEF1);
    let mut bufs: Vec<Option<AlignedBuf>> = (0..w.queue_depth)
        .map(|_| {
            let mut b = dev.alloc_buf(w.block_size);
            for chunk in b.chunks_mut(8) {
                chunk.copy_from_slice(&seed.next().to_le_bytes()[..chunk.len()]);
            }
            Some(b)
        })
        .collect();
    let mut futs: Vec<Option<IoFuture>> = (0..w.queue_depth).map(|_| None).collect();

    let cpu0 = cpu_time();
    let start = Instant::now();
    let deadline = start + runtime;
    let mut done: u64 = 0;
    let mut to_submit: Vec<usize> = (0..w.queue_depth).collect();
    let mut batch = Vec::with_capacity(w.queue_depth);
    let mut first_err: Option<Error> = None;
    let mut stopping = false;
    loop {
        // Refill freed slots in one batch.
        if !stopping && !to_submit.is_empty() {
            batch.clear();
            for &slot in &to_submit {
                if let Some(b) = bufs[slot].take() {
                    batch.push((offs.next(), b));
                }
            }
            let new = if w.write {
                dev.submit_writes(std::mem::take(&mut batch))
            } else {
                dev.submit_reads(std::mem::take(&mut batch))
            };
            for (&slot, f) in to_submit.iter().zip(new) {
                futs[slot] = Some(f);
                // First poll registers the waker; an early completion shows up as ready.
                crate::uring::lock_ignoring_poison(&ready.list).push(slot);
            }
            to_submit.clear();
        }
        let slots = std::mem::take(&mut *crate::uring::lock_ignoring_poison(&ready.list));
        if slots.is_empty() {
            if futs.iter().all(Option::is_none) {
                break;
            }
            let now = Instant::now();
            if !stopping && now >= deadline {
                stopping = true;
                continue;
            }
            if stopping {
                std::thread::park();
            } else {
                std::thread::park_timeout(deadline - now);
            }
            continue;
        }
        let in_time = Instant::now() < deadline;
        for slot in slots {
            let Some(f) = futs[slot].as_mut() else {
                continue;
            };
            let mut cx = Context::from_waker(&wakers[slot]);
            if let Poll::Ready((res, buf)) = std::pin::Pin::new(f).poll(&mut cx) {
                futs[slot] = None;
                bufs[slot] = Some(buf);
                match res {
                    Ok(()) if in_time => done += 1,
                    Ok(()) => {}
                    Err(e) => {
                        first_err.get_or_insert(e);
                        stopping = true;
                    }
                }
                to_submit.push(slot);
            }
        }
        if !in_time {
            stopping = true;
        }
    }
    let wall = start.elapsed().min(runtime).max(Duration::from_millis(1));
    let cpu = cpu_time().saturating_sub(cpu0);
    if let Some(e) = first_err {
        return Err(e);
    }
    let secs = wall.as_secs_f64();
    let iops = done as f64 / secs;
    Ok(Measure {
        iops,
        mib_s: iops * w.block_size as f64 / (1 << 20) as f64,
        cpu_pct: 100.0 * cpu.as_secs_f64() / start.elapsed().as_secs_f64(),
    })
}

/// State shared by the callbacks of one callback-driven measurement.
struct CbRun {
    dev: Arc<UringDevice>,
    write: bool,
    offs: Mutex<Offsets>,
    deadline: Instant,
    done: AtomicU64,
    outstanding: AtomicUsize,
    failed: Mutex<Option<Error>>,
    waiter: Thread,
}

impl CbRun {
    fn submit(self: &Arc<Self>, buf: AlignedBuf) {
        let off = crate::uring::lock_ignoring_poison(&self.offs).next();
        let me = self.clone();
        let f = move |res, buf| me.completed(res, buf);
        if self.write {
            self.dev.submit_write_with(off, buf, f);
        } else {
            self.dev.submit_read_with(off, buf, f);
        }
    }

    /// Runs on the ring thread: count, then issue the next request from right here.
    fn completed(self: Arc<Self>, res: Result<(), Error>, buf: AlignedBuf) {
        let in_time = Instant::now() < self.deadline;
        match res {
            Ok(()) if in_time => {
                self.done.fetch_add(1, Ordering::Relaxed);
                if crate::uring::lock_ignoring_poison(&self.failed).is_none() {
                    return self.submit(buf);
                }
            }
            Ok(()) => {}
            Err(e) => {
                crate::uring::lock_ignoring_poison(&self.failed).get_or_insert(e);
            }
        }
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waiter.unpark();
        }
    }
}

fn run_ours_callbacks(
    dev: &Arc<UringDevice>,
    w: &Workload,
    runtime: Duration,
) -> Result<Measure, Error> {
    let blocks = dev.size() / w.block_size as u64;
    if blocks == 0 {
        return Err(Error::Bench("device smaller than one block".into()));
    }
    let cpu0 = cpu_time();
    let start = Instant::now();
    let run = Arc::new(CbRun {
        dev: dev.clone(),
        write: w.write,
        offs: Mutex::new(Offsets {
            w: *w,
            blocks,
            next: 0,
            rng: Rng(seed_from_clock()),
        }),
        deadline: start + runtime,
        done: AtomicU64::new(0),
        outstanding: AtomicUsize::new(w.queue_depth),
        failed: Mutex::new(None),
        waiter: std::thread::current(),
    });
    for _ in 0..w.queue_depth {
        run.submit(filled_buf(dev, w.block_size));
    }
    while run.outstanding.load(Ordering::Acquire) > 0 {
        std::thread::park();
    }
    let cpu = cpu_time().saturating_sub(cpu0);
    let elapsed = start.elapsed();
    if let Some(e) = crate::uring::lock_ignoring_poison(&run.failed).take() {
        return Err(e);
    }
    let iops = run.done.load(Ordering::Relaxed) as f64 / runtime.as_secs_f64();
    Ok(Measure {
        iops,
        mib_s: iops * w.block_size as f64 / (1 << 20) as f64,
        cpu_pct: 100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64(),
    })
}

/// An aligned buffer of pseudo-random bytes (fio writes random data too).
fn filled_buf(dev: &UringDevice, len: usize) -> AlignedBuf {
    let mut rng = Rng(seed_from_clock());
    let mut b = dev.alloc_buf(len);
    for chunk in b.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
    }
    b
}

/// `threads` threads each doing one blocking request at a time, `qd` in flight in all
/// when `threads == qd`.
fn run_ours_threads(
    dev: &UringDevice,
    w: &Workload,
    runtime: Duration,
    threads: usize,
) -> Result<Measure, Error> {
    let blocks = (dev.size() / w.block_size as u64).max(1);
    let done = AtomicU64::new(0);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let cpu0 = cpu_time();
    let start = Instant::now();
    let deadline = start + runtime;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (done, first_err) = (&done, &first_err);
            s.spawn(move || {
                let mut rng = Rng(seed_from_clock() ^ (t as u64).wrapping_mul(0x9E37_79B9));
                let mut buf = dev.alloc_buf(w.block_size);
                for chunk in buf.chunks_mut(8) {
                    chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
                }
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let off = (rng.next() % blocks) * w.block_size as u64;
                    let r = if w.write {
                        dev.write_at(off, &buf)
                    } else {
                        dev.read_at(off, &mut buf)
                    };
                    if let Err(e) = r {
                        crate::uring::lock_ignoring_poison(first_err).get_or_insert(e);
                        break;
                    }
                    if Instant::now() <= deadline {
                        n += 1;
                    }
                }
                done.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    let elapsed = start.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    if let Some(e) = crate::uring::lock_ignoring_poison(&first_err).take() {
        return Err(e);
    }
    let iops = done.load(Ordering::Relaxed) as f64 / runtime.as_secs_f64();
    Ok(Measure {
        iops,
        mib_s: iops * w.block_size as f64 / (1 << 20) as f64,
        cpu_pct: 100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64(),
    })
}

fn precondition(dev: &UringDevice) -> Result<(), Error> {
    const CHUNK: u64 = 1 << 20;
    const DEPTH: u64 = 8;
    let size = dev.size();
    let mut off = 0;
    let mut bufs: Vec<AlignedBuf> = (0..DEPTH).map(|_| dev.alloc_buf(CHUNK as usize)).collect();
    while off < size {
        let mut batch = Vec::new();
        while off < size && !bufs.is_empty() {
            let n = (size - off).min(CHUNK) as usize;
            let Some(mut b) = bufs.pop() else { break };
            b.truncate(n);
            batch.push((off, b));
            off += n as u64;
        }
        for f in dev.submit_writes(batch) {
            let (res, b) = f.wait();
            res?;
            bufs.push(b);
        }
    }
    dev.flush()
}

// ---- the loop device -------------------------------------------------------------

struct LoopGuard {
    dev: PathBuf,
    holder: Option<OwnedFd>,
    _dir: tempfile::TempDir,
}

impl LoopGuard {
    fn create(size: u64) -> Result<LoopGuard, Error> {
        let dir = tempfile::Builder::new()
            .prefix("mcfs-blockdev-bench-")
            .tempdir()
            .map_err(|e| Error::Bench(format!("temp dir: {e}")))?;
        let img = dir.path().join("bench.img");
        let f = std::fs::File::create(&img)
            .map_err(|e| Error::Bench(format!("create {}: {e}", img.display())))?;
        f.set_len(size)
            .map_err(|e| Error::Bench(format!("size {}: {e}", img.display())))?;
        drop(f);
        let out = Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(&img)
            .output()
            .map_err(|e| Error::Bench(format!("cannot run losetup: {e}")))?;
        if !out.status.success() {
            return Err(Error::Bench(format!(
                "losetup -f --show --direct-io=on {} failed: {}",
                img.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let holder = match std::fs::File::open(&dev) {
            Ok(f) => OwnedFd::from(f),
            Err(e) => {
                detach(&dev);
                return Err(Error::Bench(format!("open {}: {e}", dev.display())));
            }
        };
        // Busy device: this only sets autoclear, see the module comment.
        detach(&dev);
        let _ = std::fs::remove_file(&img);
        Ok(LoopGuard {
            dev,
            holder: Some(holder),
            _dir: dir,
        })
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        // Closing the last opener lets autoclear detach; the kernel does it a moment
        // later, so wait for it to show, then insist in case autoclear did not take.
        drop(self.holder.take());
        let name = self.dev.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        let bound = Path::new("/sys/block").join(name).join("loop");
        let deadline = Instant::now() + Duration::from_secs(5);
        while bound.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if bound.exists() {
            detach(&self.dev);
        }
    }
}

fn detach(dev: &Path) {
    let _ = Command::new("losetup")
        .arg("-d")
        .arg(dev)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `/proc/loadavg`'s 1, 5 and 15 minute figures: other work on the machine skews a bench.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Facts about this machine for the bench header: kernel, CPUs, CPU model.
pub fn machine_summary() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("Linux {kernel}, {cpus} CPUs ({model})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json() {
        let text = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"fio version":"fio-3.33","jobs":[{"jobname":"x","read":{"iops":0.0,"bw_bytes":0},
"write":{"iops":61234.5,"bw_bytes":250816512},"usr_cpu":3.5,"sys_cpu":20.25}]}"#;
        let m = parse_fio_json(text, true).unwrap();
        assert_eq!(m.iops, 61234.5);
        assert_eq!(m.mib_s, 239.197265625);
        assert_eq!(m.cpu_pct, 23.75);
        assert!(parse_fio_json("fio: error", true).is_err());
        assert!(parse_fio_json(r#"{"jobs":[]}"#, true).is_err());
    }

    #[test]
    fn table_has_ratio_and_target() {
        let rows = vec![Row {
            workload: "4k randwrite qd64".into(),
            ours: Measure {
                iops: 95.0,
                mib_s: 1.0,
                cpu_pct: 10.0,
            },
            fio: Some(Measure {
                iops: 100.0,
                mib_s: 1.0,
                cpu_pct: 10.0,
            }),
            ratio: Some(0.95),
            ratios: vec![0.95],
            control: false,
        }];
        let t = format_table(&rows);
        assert!(t.contains("| 4k randwrite qd64 | 95 |"), "{t}");
        assert!(t.contains("0.950 | ≥ 0.95 met"), "{t}");
    }
}
