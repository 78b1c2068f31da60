//! The seed scenario (see `seed_deadlock.rs`) with real memory: node A's
//! `mcfs-node` and the `mcfs-fenced` that fences node C run in one cgroup v1
//! memory cgroup with a hard limit and the OOM killer disabled (an allocation
//! over the limit waits instead of killing), and fencing C needs memory: C's
//! fence level is an agent (`fence_memhog`, written by this test) that
//! allocates and touches a buffer before it kills C. Its parent, fenced, is in
//! the cgroup, so the agent is too.
//!
//! The daemons are put into the cgroup without any change to the cluster
//! library: the cluster's `bin_dir` is a directory of wrappers that write their
//! own pid into `cgroup.procs` and then `exec` the real binary (same pid), so
//! the node sees its cgroup from its first instruction (it reads the cgroup's
//! limit and registers for `memory.pressure_level` at start). The fenced
//! wrapper also swaps in this test's fence configuration.
//!
//! The limit is set after the setup, from what the cgroup then uses: the
//! setup's usage plus the agent's buffer plus a fixed allowance for the rest
//! (the agent's interpreter, replay, fenced's bookkeeping). See `limit_for`.
//!
//! * nonblocking (default): the agent runs inside the limit, recovery
//!   completes, C's fsynced data is readable, deferred deallocations complete,
//!   statfs and fsck agree, A unmounts cleanly; the cgroup never hit its limit
//!   in a way that stalled anyone (recovery within the deadline).
//! * sync: the agent still fences C (it ran in the cgroup), but replay's
//!   reclaim on A blocks on C's rgrp lock, so recovery is not done by the
//!   deadline, and A's status names the lock.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mcfs_integration::seed::{check_after_nonblocking_recovery, exclusive, mib, node_status, proc_status_bytes, recovery_released, run_seed_steps};
use mcfs_integration::{fsck, wait_for, TestCluster};

fn rss(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS:")
}

const FILES: usize = 24;
const FILL: usize = 120;
const A: u32 = 1;
const B: u32 = 2;
const C: u32 = 3;
/// What the fence agent allocates and touches before it kills C.
const HOG_MIB: u64 = 16;
/// Everything in the cgroup besides the setup's usage and the agent's buffer:
/// the agent's perl interpreter (about 5 MiB resident), replay on A (budgeted:
/// 3 MiB at most, over its low watermark only by the 1 MiB of one read),
/// fenced's sled writes (page cache charged to the cgroup, reclaimable), and
/// slack for the runtimes' arenas. Measured numbers are printed by the test.
const ALLOWANCE: u64 = 12 << 20;

// ---------------------------------------------------------------- cgroup v1

/// A private cgroup v1 memory cgroup. On drop: the limit is lifted (anything
/// waiting for memory in it runs on), every process still in it (only daemons
/// and agents this test started are ever put there) is SIGKILLed and waited
/// for, and the directory is removed.
struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    fn create(tag: &str) -> Cgroup {
        let root = Path::new("/sys/fs/cgroup/memory");
        assert!(root.join("memory.limit_in_bytes").exists(), "needs the cgroup v1 memory controller at {}", root.display());
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let path = root.join(format!("mcfs-test-{tag}-{}-{nanos}", std::process::id()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let cg = Cgroup { path };
        // an allocation over the limit waits (for memory to be freed or the
        // limit raised) instead of invoking the OOM killer
        cg.write("memory.oom_control", "1");
        cg
    }

    fn write(&self, file: &str, v: &str) {
        fs::write(self.path.join(file), v).unwrap_or_else(|e| panic!("write {v} to {}/{file}: {e}", self.path.display()));
    }

    fn read_u64(&self, file: &str) -> u64 {
        fs::read_to_string(self.path.join(file)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    fn procs(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    fn usage(&self) -> u64 {
        self.read_u64("memory.usage_in_bytes")
    }

    /// `under_oom 1` in memory.oom_control: some task waits for memory.
    fn under_oom(&self) -> bool {
        fs::read_to_string(self.path.join("memory.oom_control")).unwrap_or_default().lines().any(|l| l.trim() == "under_oom 1")
    }

    fn oom_kills(&self) -> u64 {
        fs::read_to_string(self.path.join("memory.oom_control"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    fn unlimit(&self) {
        let _ = fs::write(self.path.join("memory.limit_in_bytes"), "-1");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.unlimit();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let procs = self.procs();
            if procs.is_empty() || Instant::now() > deadline {
                break;
            }
            for p in procs {
                // SAFETY: kill(2); only our daemons and their agents are in this cgroup.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
                // reap it if it is our child (the cluster's daemons are)
                // SAFETY: waitpid with WNOHANG on a specific pid.
                unsafe { libc::waitpid(p as i32, std::ptr::null_mut(), libc::WNOHANG) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("could not remove cgroup {}", self.path.display());
    }
}

fn write_exec(p: &Path, text: &str) {
    fs::write(p, text).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A bin_dir whose mcfs-node (for node A only) and mcfs-fenced join `cg`
/// before exec'ing the real binary; fenced gets `fence_cfg` as --config.
fn wrapper_bin_dir(dir: &Path, real: &Path, cg: &Path, fence_cfg: &Path) -> PathBuf {
    let b = dir.join("bin");
    fs::create_dir(&b).unwrap();
    std::os::unix::fs::symlink(real.join("mcfs-dlm"), b.join("mcfs-dlm")).unwrap();
    let procs = cg.join("cgroup.procs");
    write_exec(
        &b.join("mcfs-node"),
        &format!(
            "#!/bin/bash\n# node A joins the memory cgroup before it starts\ncase \"$*\" in *'/node{A}.toml'*) echo $$ > '{}' || exit 97;; esac\nexec '{}' \"$@\"\n",
            procs.display(),
            real.join("mcfs-node").display()
        ),
    );
    write_exec(
        &b.join("mcfs-fenced"),
        &format!(
            "#!/bin/bash\necho $$ > '{}' || exit 97\nargs=(); prev=\nfor a in \"$@\"; do\n  if [ \"$prev\" = --config ]; then a='{}'; fi\n  args+=(\"$a\"); prev=\"$a\"\ndone\nexec '{}' \"${{args[@]}}\"\n",
            procs.display(),
            fence_cfg.display(),
            real.join("mcfs-fenced").display()
        ),
    );
    b
}

/// A ClusterLabs-style agent (key=value lines on stdin). `off` allocates and
/// touches `hog_mib` MiB, logs its memory cgroup and peak RSS to `log`, then
/// SIGKILLs the mcfs-node in `pid_file`; `status` exits 2 (OFF) once that
/// process is gone, 0 (ON) while it lives.
const AGENT: &str = r#"#!/usr/bin/perl
use strict; use warnings;
my %o;
while (my $l = <STDIN>) { chomp $l; my ($k, $v) = split /=/, $l, 2; $o{$k} = $v if defined $v; }
my $pid = 0;
if (open my $f, '<', $o{pid_file}) { my $x = <$f>; $pid = int($x // 0); }
sub alive {
    my $p = shift;
    return 0 unless $p > 0;
    open my $s, '<', "/proc/$p/stat" or return 0;
    my $st = <$s>;
    return 0 if !defined $st || $st =~ /\) [ZX] /;
    open my $c, '<', "/proc/$p/cmdline" or return 0;
    local $/; my $cmd = <$c> // '';
    return index($cmd, 'mcfs-node') >= 0;
}
my $a = $o{action} // '';
if ($a eq 'off' || $a eq 'reboot') {
    my $hog = 'x' x ($o{hog_mib} * 1048576);
    my ($cg) = grep { /:memory:/ } do { open my $c, '<', '/proc/self/cgroup'; <$c> };
    chomp $cg;
    my ($hwm) = grep { /^VmHWM/ } do { open my $s, '<', '/proc/self/status'; <$s> };
    $hwm =~ s/\s+/ /g;
    open my $log, '>>', $o{log}; print $log "off pid=$pid len=" . length($hog) . " cg=$cg $hwm\n"; close $log;
    kill 'KILL', $pid if alive($pid);
    for (1 .. 500) { last unless alive($pid); select(undef, undef, undef, 0.02); }
    exit(alive($pid) ? 1 : 0);
} elsif ($a eq 'status' || $a eq 'monitor') {
    exit(alive($pid) ? 0 : 2);
} elsif ($a eq 'on') {
    exit 0;
}
exit 1;
"#;

fn fence_config(dir: &Path, cluster_dir: &Path, hog_mib: u64) -> PathBuf {
    let agent = dir.join("fence_memhog");
    write_exec(&agent, AGENT);
    let mut s = String::new();
    for n in [A, B] {
        s += &format!(
            "[[node]]\nid = {n}\nname = \"node{n}\"\n[[node.level]]\nmethod = \"process\"\npid_file = \"{}\"\nexpect_cmdline = \"mcfs-node\"\ntimeout_ms = 10000\n",
            cluster_dir.join(format!("node{n}.pid")).display()
        );
    }
    s += &format!(
        "[[node]]\nid = {C}\nname = \"node{C}\"\n[[node.level]]\nmethod = \"agent\"\nagent = \"{}\"\ntimeout_ms = 30000\noptions = {{ pid_file = \"{}\", hog_mib = \"{hog_mib}\", log = \"{}\" }}\n",
        agent.display(),
        cluster_dir.join(format!("node{C}.pid")).display(),
        dir.join("agent.log").display()
    );
    let p = dir.join("fence-cgroup.toml");
    fs::write(&p, s).unwrap();
    p
}

// ------------------------------------------------------------- the scenario

struct Setup {
    tc: Option<TestCluster>,
    cg: Cgroup,
    dir: tempfile::TempDir,
    fsynced_by_c: Vec<(String, Vec<u8>)>,
    free_before: u64,
    limit: u64,
    usage_after_setup: u64,
    hog_mib: u64,
    _excl: fs::File,
}

impl Setup {
    fn tc(&self) -> &TestCluster {
        self.tc.as_ref().unwrap()
    }
    fn agent_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // lift the limit first, so nothing in the cgroup waits for memory
        // while the cluster is taken down; then the cgroup's own drop kills
        // whatever is left in it and removes it
        self.cg.unlimit();
        if std::thread::panicking() {
            eprintln!("cgroup {}: usage {} limit {} oom_control:\n{}", self.cg.path.display(), self.cg.usage(), self.limit, fs::read_to_string(self.cg.path.join("memory.oom_control")).unwrap_or_default());
            eprintln!("agent log:\n{}", self.agent_log());
        }
        drop(self.tc.take());
    }
}

/// The hard limit: what the cgroup uses after the setup, plus the agent's
/// buffer, plus the allowance for everything else.
fn limit_for(usage: u64) -> u64 {
    (usage + (HOG_MIB << 20) + ALLOWANCE + 4095) & !4095
}

/// seed_deadlock's steps 1-3 (A's budget just under its low watermark), with
/// A and fenced in the memory cgroup; then the hard limit is set.
fn setup(mode: &str) -> Setup {
    setup_with(mode, HOG_MIB, limit_for)
}

/// `setup` with the agent's buffer size and the rule for the hard limit
/// (from the cgroup's usage after the setup).
fn setup_with(mode: &str, hog_mib: u64, limit_for: fn(u64) -> u64) -> Setup {
    let excl = exclusive();
    let cg = Cgroup::create(mode);
    // wrappers, fence configuration, agent and its log: removed after the cluster
    let aux = mcfs_integration::tempdir();
    let (dir, mut o) = TestCluster::options(3);
    let fence_cfg = fence_config(aux.path(), &o.dir, hog_mib);
    let real = o.bin_dir.clone();
    o.bin_dir = wrapper_bin_dir(aux.path(), &real, &cg.path, &fence_cfg);
    o.per_node_args.insert(A, vec!["--cache-mem".into(), "3M".into(), "--evict".into(), mode.into()]);
    let mut s = Setup { tc: None, cg, dir: aux, fsynced_by_c: Vec::new(), free_before: 0, limit: u64::MAX, usage_after_setup: 0, hog_mib, _excl: excl };
    s.tc = Some(TestCluster::up(dir, &o).unwrap());
    let tc = s.tc.as_ref().unwrap();
    let a_pid = tc.c.node_pid(A).unwrap();
    let fenced_pid = tc.c.f.fenced_pid.unwrap();
    let mut procs = s.cg.procs();
    procs.sort();
    let mut want = vec![a_pid, fenced_pid];
    want.sort();
    assert_eq!(procs, want, "exactly node A and fenced are in the cgroup");
    assert!(tc.c.log(&format!("node{A}")).exists());
    let (fsynced, free0) = run_seed_steps(tc, A, B, C, FILES, FILL);
    let st = node_status(tc, A);
    // the real memory: set the hard limit just above what the cgroup uses now
    let usage = s.cg.usage();
    let limit = limit_for(usage);
    s.cg.write("memory.limit_in_bytes", &limit.to_string());
    assert_eq!(s.cg.read_u64("memory.limit_in_bytes"), limit);
    s.cg.write("memory.max_usage_in_bytes", "0"); // reset the peak
    eprintln!(
        "after setup: cgroup usage {}, A rss {} (budget used {} of {}), fenced rss {}; hard limit set to {} (agent buffer {hog_mib} MiB)",
        mib(usage),
        mib(rss(a_pid)),
        st["memory"]["used"],
        st["memory"]["limit"],
        mib(rss(fenced_pid)),
        mib(limit),
    );
    s.fsynced_by_c = fsynced;
    s.free_before = free0;
    s.limit = limit;
    s.usage_after_setup = usage;
    s
}

/// The agent ran (in our cgroup) and held its buffer.
fn assert_agent_ran_in_cgroup(s: &Setup) {
    let log = wait_for("the fence agent to run", Duration::from_secs(30), || Some(s.agent_log()).filter(|l| l.contains("off pid="))).unwrap();
    eprintln!("agent: {}", log.trim());
    let name = s.cg.path.file_name().unwrap().to_string_lossy().to_string();
    assert!(log.contains(&format!(":memory:/{name}")), "the agent must run in the cgroup {name}: {log}");
    let hog = s.hog_mib << 20;
    assert!(log.contains(&format!("len={hog}")), "{log}");
    let hwm_kb: u64 = log.split("VmHWM:").nth(1).and_then(|x| x.split_whitespace().next()).and_then(|x| x.parse().ok()).unwrap_or(0);
    assert!(hwm_kb * 1024 >= hog, "the agent's buffer must have been resident (VmHWM {hwm_kb} kB)");
    // and it was charged to the cgroup: the cgroup's peak since the limit was
    // set is at least the setup's usage plus the buffer
    let peak = s.cg.read_u64("memory.max_usage_in_bytes");
    assert!(peak >= s.usage_after_setup + hog, "cgroup peak {} must include the agent's {} over the setup's {}", mib(peak), mib(hog), mib(s.usage_after_setup));
    assert!(peak <= s.limit, "the cgroup never goes over its hard limit");
}

#[test]
fn nonblocking_recovery_completes_inside_a_hard_memory_limit() {
    let s = setup("nonblocking");
    let tc = s.tc();
    let a_pid = tc.c.node_pid(A).unwrap();
    let t = Instant::now();
    tc.c.kill(C).unwrap();
    wait_for("C's recovery to complete", Duration::from_secs(30), || recovery_released(tc, C).then_some(())).unwrap();
    let took = t.elapsed();
    assert_agent_ran_in_cgroup(&s);
    let st = node_status(tc, A);
    let peak = s.cg.read_u64("memory.max_usage_in_bytes");
    eprintln!(
        "recovery after kill: {took:?}; cgroup peak {} of limit {} (failcnt {}), A rss {}; A: memory {} eviction {}",
        mib(peak),
        mib(s.limit),
        s.cg.read_u64("memory.failcnt"),
        mib(rss(a_pid)),
        st["memory"],
        st["eviction"]
    );
    assert_eq!(s.cg.oom_kills(), 0, "nothing may be OOM-killed");
    assert!(!s.cg.under_oom(), "nobody may be waiting for memory after recovery");
    assert!(st["memory"]["direct_reclaims"].as_u64().unwrap_or(0) > 0, "replay must have needed reclaim: {}", st["memory"]);
    assert!(st["eviction"]["deferred_total"].as_u64().unwrap_or(0) > 0, "reclaim must have met the unlinked inodes and deferred them");
    assert_eq!(st["eviction"]["sleep_violations"].as_u64(), Some(0));
    check_after_nonblocking_recovery(tc, A, &s.fsynced_by_c, FILL, s.free_before);
    // a clean unmount, still inside the limit
    tc.c.stop(A).unwrap();
    assert!(s.cg.procs().iter().all(|p| *p != a_pid), "A must have exited");
    let (code, out) = fsck(&tc.c.device());
    assert_eq!(code, 0, "fsck:\n{out}");
}

#[test]
fn sync_eviction_deadlocks_inside_a_hard_memory_limit() {
    let s = setup("sync");
    let tc = s.tc();
    tc.c.kill(C).unwrap();
    // the agent fences C inside the limit ...
    assert_agent_ran_in_cgroup(&s);
    // ... but recovery never finishes: reclaim on A waits for a lock the dead C holds
    let released = wait_for("C's recovery", Duration::from_secs(15), || recovery_released(tc, C).then_some(()));
    assert!(released.is_err(), "with --evict=sync the seed deadlock must reproduce");
    let st = node_status(tc, A);
    let blocked = st["eviction"]["reclaim_blocked_on"].as_str().unwrap_or("").to_string();
    eprintln!(
        "A's reclaim is blocked on: {blocked}; cgroup usage {} peak {} of limit {}",
        mib(s.cg.usage()),
        mib(s.cg.read_u64("memory.max_usage_in_bytes")),
        mib(s.limit)
    );
    assert!(blocked.starts_with("rgrp/") || blocked.starts_with("inode/"), "status must name the lock reclaim waits for: {}", st["eviction"]);
    assert_eq!(s.cg.oom_kills(), 0);
    // tear down: the stuck node is killed; Setup's drop lifts the limit, takes
    // the cluster down and removes the cgroup
    let _ = tc.c.kill(A);
}

/// Reproducer of a node limitation (see the report): the agent needs a little
/// more memory than the limit leaves (2 MiB buffer, 2 MiB of room), and node A
/// holds more than the shortfall in its cache (its budget sits just under its
/// 80 % low watermark: about 2.4 MiB of cached data and unlinked inodes that
/// nonblocking eviction could drop or defer). The kernel reports the pressure
/// through memory.pressure_level and A counts it (`pressure_events`). When
/// this test was written the background reclaimer only reclaimed down to the
/// low watermark, where A already was, and gave nothing back. Since then a
/// pressure event makes it free a quarter of what the budget holds and
/// return freed heap to the system (`malloc_trim`), but that is still not
/// enough here: the agent (a perl interpreter, ~5 MiB resident, plus its
/// 2 MiB buffer) needs more than A's whole 3 MiB budget, so it still waits for
/// memory and C is not fenced. A test that bites needs an agent smaller than
/// what A can free, or a larger budget for A: left open.
/// Run with `--run-ignored only`; tear-down lifts the limit and cleans up.
#[test]
#[ignore = "the agent needs more than A's whole budget can give back: see the comment"]
fn nonblocking_recovery_when_the_agent_needs_memory_only_a_can_free() {
    let s = setup_with("nonblocking", 2, |usage| (usage + (2 << 20) + 4095) & !4095);
    let tc = s.tc();
    tc.c.kill(C).unwrap();
    let done = wait_for("C's recovery to complete", Duration::from_secs(30), || recovery_released(tc, C).then_some(()));
    let st = node_status(tc, A);
    eprintln!(
        "recovered: {}; cgroup usage {} of limit {}, under_oom {}; A: memory {}",
        done.is_ok(),
        mib(s.cg.usage()),
        mib(s.limit),
        s.cg.under_oom(),
        st["memory"]
    );
    done.unwrap();
}
