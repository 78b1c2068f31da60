//! The `process` method: a node is a set of processes on this host.
//!
//! 1. Find the node's processes: the pid in `pid_file`, and/or every pid in the
//!    cgroup's `cgroup.procs`. Each pid is pinned with `pidfd_open` *before* it is
//!    checked, so a recycled pid can never be killed by mistake: after the check we
//!    confirm through the pidfd that the same process is still alive, hence the
//!    check was about it.
//! 2. A pid-file process whose `/proc/<pid>/cmdline` does not contain
//!    `expect_cmdline` is somebody else (the node died and its pid was reused): the
//!    node counts as already off for that pid. A missing pid file, or a pid that
//!    no longer exists, also counts as off.
//! 3. SIGKILL through the pidfd (`pidfd_send_signal`). SIGKILL also ends a stopped
//!    (SIGSTOP) process, whose pending I/O is exactly what must not land later. A v2
//!    cgroup with `cgroup.kill` is killed atomically (nothing escapes by forking);
//!    otherwise the cgroup is swept until empty, and a frozen v1 freezer cgroup is
//!    thawed so the kill can take effect.
//! 4. Wait until every pidfd is readable: the whole thread group has exited,
//!    including io_uring's io-wq and SQPOLL threads, which belong to it. From here
//!    the node can issue no new I/O. Our own children are reaped.
//! 5. Wait until each configured device's `/sys/dev/block/M:m/inflight` reads
//!    `0 0`. An exited process can still have requests in flight: io_uring tears a
//!    dead process's ring down asynchronously, and the block requests it submitted
//!    complete on the device's time. A zero sample taken after step 4 proves every
//!    request submitted before it has completed.
//! 6. The fence time is the moment step 5 succeeds.
//!
//! All of this runs on a blocking thread under one deadline (`timeout_ms`); when the
//! deadline passes the level fails with what is still outstanding.

use crate::config::ProcessLevel;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// Read a block device's `inflight` file: (reads, writes).
pub fn read_inflight(path: &Path) -> Result<(u64, u64), String> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut it = s.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(r)), Some(Ok(w))) => Ok((r, w)),
        _ => Err(format!("{} holds {s:?}, not two counters", path.display())),
    }
}

struct Target {
    pid: i32,
    fd: OwnedFd,
    source: &'static str,
    killed: bool,
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_kill(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: signal the process pinned by our own pidfd; no info struct.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Has the process behind this pidfd exited (zombie or reaped)? Waits up to `wait`.
fn exited(fd: &OwnedFd, wait: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd on our stack.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0
}

/// Reap it if it is our own child, so it does not linger as a zombie.
fn reap_if_child(fd: &OwnedFd) {
    // SAFETY: zeroed siginfo is a valid out-parameter for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // P_PIDFD = 3 (Linux 5.4+). ECHILD (not our child) is expected and ignored.
    // Blocking on purpose: the pidfd said the process exited, so for our own
    // child this returns at once (WNOHANG could lose a race with exit_notify).
    // SAFETY: waitid with our pidfd and a valid siginfo pointer.
    unsafe { libc::waitid(3, fd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED) };
}

fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain ") ".
    let after = &s[s.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let s: String = String::from_utf8_lossy(&raw).replace('\0', " ");
    Some(s.trim_end().to_string())
}

fn read_procs(cgroup: &Path) -> Result<Vec<i32>, String> {
    let p = cgroup.join("cgroup.procs");
    let s = std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    Ok(s.split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect())
}

/// What a fencing run saw and did; becomes the attempt message.
#[derive(Default)]
struct Report {
    notes: Vec<String>,
}

/// Fence the node's processes. `Ok(message)` only after every step of the module
/// walkthrough succeeded; `Err(message)` says what could not be confirmed.
pub fn fence(level: &ProcessLevel) -> Result<String, String> {
    let start = Instant::now();
    let deadline = start + level.timeout;
    let mut rep = Report::default();
    let mut targets: BTreeMap<i32, Target> = BTreeMap::new();
    let me = std::process::id() as i32;

    if let Some(pf) = &level.pid_file {
        if let Some(t) = from_pid_file(pf, level.expect_cmdline.as_deref(), me, &mut rep)? {
            targets.insert(t.pid, t);
        }
    }
    for t in targets.values_mut() {
        kill(t, &mut rep)?;
    }

    if let Some(cg) = &level.cgroup {
        sweep_cgroup(cg, me, &mut targets, deadline, &mut rep)?;
    }

    // Step 4: every process has exited (the whole thread group).
    for t in targets.values() {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if exited(&t.fd, left.min(Duration::from_millis(100))) {
                reap_if_child(&t.fd);
                break;
            }
            if left.is_zero() {
                return Err(format!(
                    "pid {} ({}) did not exit within {} ms of SIGKILL (state {:?}); {}",
                    t.pid,
                    t.source,
                    level.timeout.as_millis(),
                    proc_state(t.pid),
                    rep.notes.join("; ")
                ));
            }
        }
    }
    let killed: Vec<String> = targets
        .values()
        .filter(|t| t.killed)
        .map(|t| format!("{} ({})", t.pid, t.source))
        .collect();
    if !killed.is_empty() {
        rep.notes.push(format!(
            "killed and confirmed exited: {}",
            killed.join(", ")
        ));
    } else if level.cgroup.is_none() {
        rep.notes
            .push("no live process of the node was found: already off".into());
    }

    // Step 5: their I/O has drained from every shared device.
    for d in &level.devices {
        let t0 = Instant::now();
        let mut last;
        loop {
            last = read_inflight(&d.inflight)?;
            if last == (0, 0) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "device {} still has {} reads and {} writes in flight after {} ms; {}",
                    d.path.display(),
                    last.0,
                    last.1,
                    level.timeout.as_millis(),
                    rep.notes.join("; ")
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        rep.notes.push(format!(
            "{} in-flight I/O drained ({} us)",
            d.path.display(),
            t0.elapsed().as_micros()
        ));
    }
    rep.notes
        .push(format!("confirmed in {} ms", start.elapsed().as_millis()));
    Ok(rep.notes.join("; "))
}

/// Steps 1-2 for the pid file. `Ok(None)`: the node is off as far as this file says.
fn from_pid_file(
    pf: &Path,
    expect: Option<&str>,
    me: i32,
    rep: &mut Report,
) -> Result<Option<Target>, String> {
    let text = match std::fs::read_to_string(pf) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            rep.notes
                .push(format!("pid file {} absent: no process", pf.display()));
            return Ok(None);
        }
        Err(e) => return Err(format!("cannot read pid file {}: {e}", pf.display())),
    };
    let pid: i32 = text.trim().parse().map_err(|_| {
        format!(
            "pid file {} holds {:?}, not a pid",
            pf.display(),
            text.trim()
        )
    })?;
    if pid <= 1 || pid == me {
        return Err(format!(
            "pid file {} names pid {pid}; refusing to kill it",
            pf.display()
        ));
    }
    let fd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
            rep.notes.push(format!(
                "pid {pid} from {} is gone: already off",
                pf.display()
            ));
            return Ok(None);
        }
        Err(e) => return Err(format!("pidfd_open({pid}): {e}")),
    };
    if matches!(proc_state(pid), Some('Z' | 'X')) {
        // A zombie still owns its pid, so it is the node's process; it has exited
        // but its I/O may not have drained, so it stays a target (not killed).
        rep.notes.push(format!("pid {pid} had already exited"));
        return Ok(Some(Target {
            pid,
            fd,
            source: "pid_file",
            killed: false,
        }));
    }
    if let Some(want) = expect {
        // A process caught inside execve() shows an empty cmdline until the new
        // image has set up its arguments: wait a little for it rather than
        // mistaking it for somebody else.
        let settle = Instant::now() + Duration::from_secs(1);
        let mut got = cmdline(pid).unwrap_or_default();
        while got.is_empty() && Instant::now() < settle && !exited(&fd, Duration::ZERO) {
            std::thread::sleep(Duration::from_millis(1));
            got = cmdline(pid).unwrap_or_default();
        }
        // Checked after the pidfd pinned the process: if it is still alive now,
        // the cmdline we read was its own.
        if !got.contains(want) && !exited(&fd, Duration::ZERO) {
            rep.notes.push(format!(
                "pid {pid} from {} runs {got:?}, which does not contain {want:?}: a recycled pid, node already off",
                pf.display()
            ));
            return Ok(None);
        }
    }
    Ok(Some(Target {
        pid,
        fd,
        source: "pid_file",
        killed: false,
    }))
}

fn kill(t: &mut Target, rep: &mut Report) -> Result<(), String> {
    if exited(&t.fd, Duration::ZERO) {
        return Ok(());
    }
    match pidfd_kill(&t.fd) {
        Ok(()) => {
            t.killed = true;
            tracing::info!(pid = t.pid, source = t.source, "SIGKILL sent");
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
            rep.notes
                .push(format!("pid {} exited before the kill", t.pid));
            Ok(())
        }
        Err(e) => Err(format!("pidfd_send_signal({}, SIGKILL): {e}", t.pid)),
    }
}

/// Steps 1, 3 and 4 for a cgroup: kill everything in it, then wait until every
/// task listed in it has exited.
///
/// `cgroup.procs` hides a process as soon as all its threads are dying, before
/// they have closed their files; so exit is confirmed on the thread list
/// (`cgroup.threads` in v2, `tasks` in v1), which keeps a task until it has passed
/// `exit_files`: every listed thread must be gone or a zombie.
fn sweep_cgroup(
    cg: &Path,
    me: i32,
    targets: &mut BTreeMap<i32, Target>,
    deadline: Instant,
    rep: &mut Report,
) -> Result<(), String> {
    let initial = read_procs(cg)?;
    if initial.contains(&me) {
        return Err(format!(
            "mcfs-fenced itself (pid {me}) is in the node's cgroup {}; refusing",
            cg.display()
        ));
    }
    let threads_file = if cg.join("cgroup.threads").exists() {
        "cgroup.threads"
    } else {
        "tasks"
    };
    let kill_file = cg.join("cgroup.kill");
    let atomic = kill_file.exists();
    if atomic {
        // v2: the kernel kills every member, including ones forking right now.
        std::fs::write(&kill_file, "1")
            .map_err(|e| format!("cannot write {}: {e}", kill_file.display()))?;
    }
    loop {
        if !atomic {
            kill_members(cg, me, targets, rep)?;
            thaw_v1_freezer(cg);
        }
        let listed = read_list(&cg.join(threads_file))?;
        let live: Vec<i32> = listed
            .into_iter()
            .filter(|t| !matches!(proc_state(*t), None | Some('Z' | 'X')))
            .collect();
        if live.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "cgroup {} still has live tasks {live:?}",
                cg.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if initial.is_empty() && targets.values().all(|t| t.source != "cgroup") {
        rep.notes.push(format!("cgroup {} was empty", cg.display()));
    } else {
        let how = if atomic {
            "cgroup.kill"
        } else {
            "SIGKILL to each member"
        };
        rep.notes.push(format!(
            "cgroup {}: processes {initial:?} killed ({how}), every task exited",
            cg.display()
        ));
    }
    Ok(())
}

fn read_list(p: &Path) -> Result<Vec<i32>, String> {
    let s = std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    Ok(s.split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect())
}

/// v1 (no `cgroup.kill`): SIGKILL each member through a pidfd.
fn kill_members(
    cg: &Path,
    me: i32,
    targets: &mut BTreeMap<i32, Target>,
    rep: &mut Report,
) -> Result<(), String> {
    let listed = read_procs(cg)?;
    let mut fresh = Vec::new();
    for pid in listed {
        if targets.contains_key(&pid) || pid <= 1 {
            continue;
        }
        if pid == me {
            return Err(format!(
                "mcfs-fenced itself (pid {me}) is in the node's cgroup {}; refusing",
                cg.display()
            ));
        }
        match pidfd_open(pid) {
            Ok(fd) => fresh.push((pid, fd)),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(format!("pidfd_open({pid}): {e}")),
        }
    }
    // Membership read after the pidfds pinned the processes; a process still
    // alive after this read is the member the read was about.
    let members = read_procs(cg)?;
    for (pid, fd) in fresh {
        if !members.contains(&pid) && !exited(&fd, Duration::ZERO) {
            continue; // left the cgroup, or a recycled pid: not the node's
        }
        let mut t = Target {
            pid,
            fd,
            source: "cgroup",
            killed: false,
        };
        kill(&mut t, rep)?;
        targets.insert(pid, t);
    }
    Ok(())
}

/// A v1-frozen task cannot act on SIGKILL until thawed (v2-frozen ones can).
fn thaw_v1_freezer(cg: &Path) {
    let f = cg.join("freezer.state");
    if let Ok(s) = std::fs::read_to_string(&f) {
        if s.trim() != "THAWED" {
            let _ = std::fs::write(&f, "THAWED");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{Device, ProcessLevel};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command};

    fn level(pid_file: Option<&Path>, expect: Option<&str>, cgroup: Option<&Path>) -> ProcessLevel {
        ProcessLevel {
            pid_file: pid_file.map(Path::to_path_buf),
            expect_cmdline: expect.map(str::to_string),
            cgroup: cgroup.map(Path::to_path_buf),
            devices: vec![],
            timeout: Duration::from_secs(10),
        }
    }

    fn sleeper() -> Child {
        Command::new("sleep").arg("1000").spawn().unwrap()
    }

    /// Kills the child on drop so a failing assertion leaves nothing behind.
    struct Reap(Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn kills_the_pid_file_process_and_confirms() {
        let dir = tempfile::tempdir().unwrap();
        let pf = dir.path().join("n.pid");
        let c = Reap(sleeper());
        std::fs::write(&pf, format!("{}\n", c.0.id())).unwrap();
        let msg = fence(&level(Some(&pf), Some("sleep 1000"), None)).unwrap();
        assert!(msg.contains("killed and confirmed exited"), "{msg}");
        assert_dead(c);
    }

    #[test]
    fn a_stopped_process_is_killed_too() {
        let dir = tempfile::tempdir().unwrap();
        let pf = dir.path().join("n.pid");
        let c = Reap(sleeper());
        // SAFETY: signal our own child.
        unsafe { libc::kill(c.0.id() as i32, libc::SIGSTOP) };
        std::fs::write(&pf, c.0.id().to_string()).unwrap();
        let msg = fence(&level(Some(&pf), Some("sleep"), None)).unwrap();
        assert!(msg.contains("killed and confirmed exited"), "{msg}");
        assert_dead(c);
    }

    /// Killed by SIGKILL: reaped by the fence already (ECHILD), or reapable now.
    fn assert_dead(mut c: Reap) {
        match c.0.try_wait() {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ECHILD)),
            Ok(st) => assert_eq!(
                st.and_then(|s| s.signal()),
                Some(libc::SIGKILL),
                "still running"
            ),
        }
        assert!(matches!(proc_state(c.0.id() as i32), None | Some('Z')));
    }

    #[test]
    fn a_recycled_or_vanished_pid_counts_as_off_and_is_not_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pf = dir.path().join("n.pid");
        let mut other = Reap(sleeper());
        std::fs::write(&pf, other.0.id().to_string()).unwrap();
        let msg = fence(&level(Some(&pf), Some("mcfs-node --id 7"), None)).unwrap();
        assert!(msg.contains("recycled pid"), "{msg}");
        assert!(
            other.0.try_wait().unwrap().is_none(),
            "an unrelated process was killed"
        );

        std::fs::remove_file(&pf).unwrap();
        let msg = fence(&level(Some(&pf), Some("x"), None)).unwrap();
        assert!(msg.contains("absent"), "{msg}");

        let mut gone = sleeper();
        let gone_pid = gone.id();
        gone.kill().unwrap();
        gone.wait().unwrap();
        std::fs::write(&pf, gone_pid.to_string()).unwrap();
        let msg = fence(&level(Some(&pf), Some("sleep"), None)).unwrap();
        assert!(msg.contains("already off"), "{msg}");
    }

    #[test]
    fn garbage_and_dangerous_pid_files_fail_the_level() {
        let dir = tempfile::tempdir().unwrap();
        let pf = dir.path().join("n.pid");
        std::fs::write(&pf, "not-a-pid").unwrap();
        assert!(fence(&level(Some(&pf), None, None))
            .unwrap_err()
            .contains("not a pid"));
        std::fs::write(&pf, "1").unwrap();
        assert!(fence(&level(Some(&pf), None, None))
            .unwrap_err()
            .contains("refusing"));
        std::fs::write(&pf, std::process::id().to_string()).unwrap();
        assert!(fence(&level(Some(&pf), None, None))
            .unwrap_err()
            .contains("refusing"));
    }

    #[test]
    fn inflight_parses_and_waits_on_a_real_device() {
        let dev = Path::new("/sys/dev/block/7:0/inflight");
        if dev.exists() {
            let (r, w) = read_inflight(dev).unwrap();
            assert!(r < 1 << 32 && w < 1 << 32);
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("inflight");
        std::fs::write(&f, "       0        3\n").unwrap();
        assert_eq!(read_inflight(&f).unwrap(), (0, 3));
        std::fs::write(&f, "x").unwrap();
        assert!(read_inflight(&f).is_err());
        // A device that never drains fails the level at the deadline.
        std::fs::write(&f, "0 3\n").unwrap();
        let mut l = level(Some(&dir.path().join("absent.pid")), None, None);
        l.devices = vec![Device {
            path: "/dev/fake".into(),
            inflight: f.clone(),
        }];
        l.timeout = Duration::from_millis(50);
        let e = fence(&l).unwrap_err();
        assert!(e.contains("still has 0 reads and 3 writes"), "{e}");
        std::fs::write(&f, "0 0\n").unwrap();
        assert!(fence(&l).unwrap().contains("drained"));
    }

    /// A cgroup of a real hierarchy (v2 if mounted, else v1 pids), removed on drop.
    struct TestCgroup(std::path::PathBuf);
    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    fn cgroup_roots() -> Vec<std::path::PathBuf> {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut v2 = Vec::new();
        let mut v1 = Vec::new();
        for l in mounts.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() > 3 && f[2] == "cgroup2" {
                v2.push(f[1].into());
            } else if f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "pids") {
                v1.push(f[1].into());
            }
        }
        v2.into_iter().chain(v1).collect()
    }

    #[test]
    fn cgroup_processes_are_all_killed_including_forked_children() {
        let roots = cgroup_roots();
        assert!(!roots.is_empty(), "no cgroup hierarchy mounted");
        for root in roots {
            let cg = TestCgroup(root.join(format!("mcfs-fence-test-{}", std::process::id())));
            std::fs::create_dir(&cg.0).unwrap();
            // A shell that forks a child into the cgroup and then waits.
            let mut sh = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "echo $$ > {}/cgroup.procs; sleep 1000 & wait",
                    cg.0.display()
                ))
                .spawn()
                .unwrap();
            let procs = crate::process::read_procs(&cg.0).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut procs = procs;
            while procs.len() < 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                procs = read_procs(&cg.0).unwrap();
            }
            assert!(!procs.is_empty(), "nothing joined {}", cg.0.display());
            let msg = fence(&level(None, None, Some(&cg.0))).unwrap();
            assert!(msg.contains("every task exited"), "{msg}");
            for p in &procs {
                assert!(
                    matches!(proc_state(*p), None | Some('Z')),
                    "pid {p} survived in {}",
                    cg.0.display()
                );
            }
            let _ = sh.wait();
            // Give the kernel a moment to drop reaped tasks from the list.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !read_procs(&cg.0).unwrap().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
