//! Small process and mount helpers shared by the cluster tooling.

use std::path::Path;
use std::time::{Duration, Instant};

/// Is `pid` a live process? Not once every one of its threads has exited: a
/// process whose main thread is already a zombie while other threads are
/// still being torn down (an io_uring ring cancelling its work, say) is still
/// alive, and still a member of its cgroup.
pub fn alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    if task_alive(&format!("/proc/{pid}/stat")) {
        return true;
    }
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().any(|t| task_alive(&format!("{}/stat", t.path().display()))))
        .unwrap_or(false)
}

/// Does the `stat` file at `path` show a task that has not exited?
fn task_alive(path: &str) -> bool {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            // state is the field after the parenthesised command name
            let state = s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

pub fn signal(pid: u32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

/// Wait until `pid` is gone.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let t = Instant::now();
    while alive(pid) {
        if t.elapsed() > timeout {
            return false;
        }
        // reap it if it is our child
        // SAFETY: waitpid with WNOHANG on a specific pid.
        unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above; collects the zombie if it was our child.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
    true
}

/// Is `path` a mount point (per /proc/mounts)?
pub fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy();
    std::fs::read_to_string("/proc/mounts").map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&*want))).unwrap_or(false)
}

/// `umount -l` (works on stale mounts of killed FUSE daemons).
pub fn umount_lazy(path: &Path) {
    if is_mounted(path) {
        let _ = std::process::Command::new("umount").arg("-l").arg(path).status();
    }
}

/// Read a pid file.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Poll until `f` gives a value or the timeout passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_is_not_alive_and_a_running_process_is() {
        assert!(alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // exited but not reaped: a zombie whose only thread is gone
        let t = Instant::now();
        while alive(pid) {
            assert!(t.elapsed() < Duration::from_secs(10), "`true` did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(std::fs::metadata(format!("/proc/{pid}")).is_ok(), "still a zombie, not reaped");
        child.wait().unwrap();
        assert!(!alive(pid));
        assert!(!alive(0));
    }
}
