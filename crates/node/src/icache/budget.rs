//! The node's memory budget. Inodes, metadata buffers, cached file data,
//! read-ahead windows (from the moment they are read), file data being
//! written behind, spare data buffers, journal images and replay buffers are
//! charged to it through [`Charge`] guards (RAII: dropping the thing uncharges
//! it), so "usage" is what the daemon really holds.
//!
//! * Direct reclaim: a charge that would take usage over the limit reclaims
//!   first, before it counts, in the allocating thread, in the no-sleep
//!   context (it can never wait for a cluster lock; see `glock::ReclaimScope`).
//!   Charges never wait: a thread inside a transaction must not, and
//!   overshooting a little beats deadlocking.
//! * Waiting for memory happens only at throttle points outside transactions
//!   (the start of each filesystem request, each journal-replay read), which wait
//!   for the background reclaimer to bring usage below the limit; every wait is
//!   timed and the longest is reported.
//! * The background reclaimer (the kswapd role) keeps usage under the low
//!   watermark; pressure notifications from the cgroup wake it early.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::glock::{in_reclaim, ReclaimScope};

/// Something that can give memory back.
pub trait Reclaimer: Send + Sync {
    /// Free about `want` bytes. `scope` proves the caller is in reclaim.
    fn reclaim(&self, want: u64, scope: &ReclaimScope) -> u64;

    /// Background reclaim only: memory reclaim cannot free because someone
    /// else holds references (the kernel's cached dentries): ask them to let
    /// go of about `want` bytes' worth, without waiting for it.
    fn release_references(&self, _want: u64) {}
}

#[derive(Debug, Default, serde::Serialize, Clone)]
pub struct BudgetStats {
    pub limit: u64,
    pub used: u64,
    pub peak: u64,
    pub low_watermark: u64,
    pub direct_reclaims: u64,
    pub background_reclaims: u64,
    pub pressure_events: u64,
    pub throttle_waits: u64,
    pub longest_alloc_wait_us: u64,
    pub total_alloc_wait_us: u64,
    /// Allocations that had to reclaim or wait, and the p99 of those waits
    /// (upper bound of the histogram bucket).
    pub alloc_waits: u64,
    pub alloc_wait_p99_us: u64,
}

pub struct Budget {
    limit: AtomicU64,
    used: AtomicU64,
    peak: AtomicU64,
    reclaimer: Mutex<Option<Weak<dyn Reclaimer>>>,
    kick: Mutex<bool>,
    kick_cv: Condvar,
    freed: Mutex<()>,
    freed_cv: Condvar,
    direct: AtomicU64,
    background: AtomicU64,
    pressure: AtomicU64,
    pressure_pending: std::sync::atomic::AtomicBool,
    waits: AtomicU64,
    longest_wait_us: AtomicU64,
    total_wait_us: AtomicU64,
    stop: AtomicBool,
    /// Every wait of an allocation (direct reclaim or throttle), for p99.
    pub wait_hist: mcfs_dlm::net::metrics::Histogram,
}

/// Usage is charged while this lives.
pub struct Charge {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Charge {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.uncharge(self.bytes);
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Charge({})", self.bytes)
    }
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit: AtomicU64::new(limit.max(1 << 20)),
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            reclaimer: Mutex::new(None),
            kick: Mutex::new(false),
            kick_cv: Condvar::new(),
            freed: Mutex::new(()),
            freed_cv: Condvar::new(),
            direct: AtomicU64::new(0),
            background: AtomicU64::new(0),
            pressure: AtomicU64::new(0),
            pressure_pending: std::sync::atomic::AtomicBool::new(false),
            waits: AtomicU64::new(0),
            longest_wait_us: AtomicU64::new(0),
            total_wait_us: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            wait_hist: mcfs_dlm::net::metrics::Histogram::new(crate::glock::LOCK_WAIT_BUCKETS),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }
    pub fn set_limit(&self, l: u64) {
        self.limit.store(l.max(1 << 20), Ordering::Relaxed);
        self.kick();
    }
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
    pub fn low_watermark(&self) -> u64 {
        self.limit() / 10 * 8
    }

    pub fn set_reclaimer(&self, r: Weak<dyn Reclaimer>) {
        *self.reclaimer.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    fn reclaimer(&self) -> Option<Arc<dyn Reclaimer>> {
        self.reclaimer.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|w| w.upgrade())
    }

    /// Charge `bytes`. A charge that would take usage over the limit reclaims
    /// in this thread first, before it counts (never waiting for a cluster
    /// lock in nonblocking mode), so that threads charging at once do not
    /// each add theirs on top of a full budget. Always succeeds.
    pub fn charge(self: &Arc<Self>, bytes: u64) -> Charge {
        let would = self.used() + bytes;
        if would > self.limit() && !in_reclaim() {
            let t = Instant::now();
            if let Some(r) = self.reclaimer() {
                self.direct.fetch_add(1, Ordering::Relaxed);
                let scope = ReclaimScope::enter();
                let want = would - self.low_watermark().min(would);
                r.reclaim(want.max(bytes), &scope);
            }
            self.record_wait(t.elapsed());
        }
        let now = self.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        if now > self.low_watermark() {
            self.kick();
        }
        Charge { budget: self.clone(), bytes }
    }

    /// Charge `bytes` without reclaiming in this thread, for callers that hold
    /// locks reclaim needs (the log flush); wakes the background reclaimer
    /// when over the low watermark.
    pub fn charge_no_reclaim(self: &Arc<Self>, bytes: u64) -> Charge {
        let now = self.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        if now > self.low_watermark() {
            self.kick();
        }
        Charge { budget: self.clone(), bytes }
    }

    fn uncharge(&self, bytes: u64) {
        let prev = self.used.fetch_sub(bytes, Ordering::Relaxed);
        if prev >= self.limit() && prev - bytes < self.limit() {
            let _g = self.freed.lock().unwrap_or_else(|p| p.into_inner());
            self.freed_cv.notify_all();
        }
    }

    fn record_wait(&self, d: Duration) {
        self.wait_hist.observe(d);
        let us = d.as_micros() as u64;
        self.longest_wait_us.fetch_max(us, Ordering::Relaxed);
        self.total_wait_us.fetch_add(us, Ordering::Relaxed);
    }

    /// A throttle point (outside any transaction): if over the limit, wake the
    /// reclaimer and wait until usage is below the limit or `max` passes.
    pub fn throttle(&self, max: Duration) {
        if self.used() <= self.limit() || in_reclaim() {
            return;
        }
        let t = Instant::now();
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.kick();
        let mut g = self.freed.lock().unwrap_or_else(|p| p.into_inner());
        while self.used() > self.limit() && t.elapsed() < max && !self.stop.load(Ordering::Relaxed) {
            g = self.freed_cv.wait_timeout(g, Duration::from_millis(10)).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
        }
        drop(g);
        self.record_wait(t.elapsed());
    }

    /// Wake the background reclaimer.
    pub fn kick(&self) {
        let mut k = self.kick.lock().unwrap_or_else(|p| p.into_inner());
        *k = true;
        self.kick_cv.notify_all();
    }

    /// A memory-pressure notification from the cgroup: the background
    /// reclaimer frees below its usual watermark (a quarter of what is in
    /// use) and gives freed heap memory back to the system.
    pub fn pressure(&self) {
        self.pressure.fetch_add(1, Ordering::Relaxed);
        self.pressure_pending.store(true, Ordering::Release);
        self.kick();
    }

    /// Run the background reclaimer on its own thread until `stop`.
    pub fn start_background(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let _ = std::thread::Builder::new().name("reclaim".into()).spawn(move || {
            let mut last_trim = Instant::now();
            loop {
                let Some(b) = me.upgrade() else { return };
                if b.stop.load(Ordering::Relaxed) {
                    return;
                }
                {
                    let mut k = b.kick.lock().unwrap_or_else(|p| p.into_inner());
                    if !*k {
                        k = b.kick_cv.wait_timeout(k, Duration::from_millis(500)).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
                    }
                    *k = false;
                }
                let pressured = b.pressure_pending.swap(false, Ordering::AcqRel);
                let used = b.used();
                let low = if pressured { b.low_watermark().min(used - used / 4) } else { b.low_watermark() };
                if used > low {
                    if let Some(r) = b.reclaimer() {
                        b.background.fetch_add(1, Ordering::Relaxed);
                        let scope = ReclaimScope::enter();
                        let freed = r.reclaim(used - low, &scope);
                        if freed < used - low {
                            r.release_references(used - low - freed);
                        }
                    }
                    let _g = b.freed.lock().unwrap_or_else(|p| p.into_inner());
                    b.freed_cv.notify_all();
                }
                // What reclaim freed goes back to the system (and the cgroup), not
                // only to malloc's free lists: at once under pressure, else at
                // most once a second while reclaim keeps running.
                if pressured || (used > low && last_trim.elapsed() >= Duration::from_secs(1)) {
                    last_trim = Instant::now();
                    #[cfg(target_env = "gnu")]
                    // SAFETY: malloc_trim only releases free heap pages; no Rust object is touched.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                }
            }
        });
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.kick();
    }

    pub fn stats(&self) -> BudgetStats {
        BudgetStats {
            limit: self.limit(),
            used: self.used(),
            peak: self.peak.load(Ordering::Relaxed),
            low_watermark: self.low_watermark(),
            direct_reclaims: self.direct.load(Ordering::Relaxed),
            background_reclaims: self.background.load(Ordering::Relaxed),
            pressure_events: self.pressure.load(Ordering::Relaxed),
            throttle_waits: self.waits.load(Ordering::Relaxed),
            longest_alloc_wait_us: self.longest_wait_us.load(Ordering::Relaxed),
            total_alloc_wait_us: self.total_wait_us.load(Ordering::Relaxed),
            alloc_waits: self.wait_hist.snapshot().count,
            alloc_wait_p99_us: {
                let q = self.wait_hist.snapshot().quantile_upper_bound(0.99);
                if q.is_finite() {
                    (q * 1e6) as u64
                } else {
                    u64::MAX
                }
            },
        }
    }
}

/// The memory limit of the cgroup this process is in (v2 memory.max/high, v1
/// memory.limit_in_bytes), if any.
pub fn cgroup_limit() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cg.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        if ctrls.is_empty() {
            for f in ["memory.high", "memory.max"] {
                let p = format!("/sys/fs/cgroup{path}/{f}");
                if let Some(v) = std::fs::read_to_string(&p).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                    return Some(v);
                }
            }
        } else if ctrls.split(',').any(|c| c == "memory") {
            let p = format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes");
            let v = std::fs::read_to_string(&p).ok()?.trim().parse::<u64>().ok()?;
            // "no limit" is a huge page-aligned number
            if v < (1u64 << 60) {
                return Some(v);
            }
        }
    }
    None
}

/// The v1 memory cgroup directory of this process, if any.
pub fn cgroup_v1_dir() -> Option<std::path::PathBuf> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cg.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls.split(',').any(|c| c == "memory").then(|| std::path::PathBuf::from(format!("/sys/fs/cgroup/memory{path}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Freer {
        held: Mutex<Vec<Charge>>,
        calls: AtomicU64,
        saw_reclaim: AtomicBool,
    }
    impl Reclaimer for Freer {
        fn reclaim(&self, want: u64, _scope: &ReclaimScope) -> u64 {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.saw_reclaim.store(in_reclaim(), Ordering::Relaxed);
            let mut h = self.held.lock().unwrap();
            let mut freed = 0;
            while freed < want {
                match h.pop() {
                    Some(c) => freed += c.bytes(),
                    None => break,
                }
            }
            freed
        }
    }

    /// A budget of `limit` whose reclaimer frees what `charge_mib` charged,
    /// newest first.
    fn budget_with_freer(limit: u64) -> (Arc<Budget>, Arc<Freer>) {
        let b = Budget::new(limit);
        let f = Arc::new(Freer { held: Mutex::new(Vec::new()), calls: 0.into(), saw_reclaim: false.into() });
        let fr: Arc<dyn Reclaimer> = f.clone();
        b.set_reclaimer(Arc::downgrade(&fr));
        (b, f)
    }

    /// Charge 1 MiB `n` times, each charge held by the freer.
    fn charge_mib(b: &Arc<Budget>, f: &Freer, n: usize) {
        for _ in 0..n {
            let c = b.charge(1 << 20);
            f.held.lock().unwrap().push(c);
        }
    }

    #[test]
    fn direct_reclaim_runs_in_reclaim_context_and_frees() {
        let (b, f) = budget_with_freer(4 << 20);
        charge_mib(&b, &f, 8);
        assert!(f.calls.load(Ordering::Relaxed) > 0);
        assert!(f.saw_reclaim.load(Ordering::Relaxed));
        assert!(b.used() <= 4 << 20, "used {}", b.used());
        assert!(b.stats().direct_reclaims > 0);
    }

    #[test]
    fn a_charge_reclaims_before_it_counts() {
        let (b, f) = budget_with_freer(4 << 20);
        charge_mib(&b, &f, 4);
        assert_eq!(b.used(), 4 << 20);
        // a full budget: the next charge makes room first, so usage never
        // went past the limit
        let _c = b.charge(1 << 20);
        assert!(b.stats().peak <= 4 << 20, "peak {}", b.stats().peak);
        assert_eq!(f.calls.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn charges_are_released_on_drop() {
        let b = Budget::new(8 << 20);
        let c = b.charge(1000);
        assert_eq!(b.used(), 1000);
        drop(c);
        assert_eq!(b.used(), 0);
    }
}
