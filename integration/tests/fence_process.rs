//! Process fencing end to end: a real process stands for node 1 and keeps
//! O_DIRECT writes in flight on a real loop device (through io_uring, or plain
//! pwrite); a real mcfs-fenced kills it on a gRPC Fence call (made by the real
//! `mcfs fence` command), the record survives a restart of mcfs-fenced, a retried
//! request id does not fence again, and a call with a wrong secret is refused and
//! recorded.
#![allow(clippy::unwrap_used)]

use mcfs_integration::fence::{n, s, start_fenced, Fenced};
use mcfs_integration::{tempdir, wait_for, Daemon, LoopDev};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Not a test: the body of the stand-in node process, run by re-executing this
/// test binary with the environment below. Does nothing when run by hand.
#[test]
#[ignore = "helper process for the fence tests (runs only with MCFS_FENCE_WRITER_DEV set)"]
fn fence_writer_node() {
    let (Ok(dev), Ok(pid_file), Ok(mode)) = (
        std::env::var("MCFS_FENCE_WRITER_DEV"),
        std::env::var("MCFS_FENCE_WRITER_PIDFILE"),
        std::env::var("MCFS_FENCE_WRITER_MODE"),
    ) else {
        return;
    };
    if let Err(e) = writer::run(Path::new(&dev), Path::new(&pid_file), &mode) {
        eprintln!("fence_writer_node: {e}");
        std::process::exit(2);
    }
}

mod writer {
    use std::alloc::{alloc_zeroed, Layout};
    use std::fs::OpenOptions;
    use std::io::{Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;

    const BS: usize = 64 * 1024;
    const DEPTH: usize = 16;

    /// Open the device O_DIRECT, publish our pid, and write until killed.
    pub fn run(dev: &Path, pid_file: &Path, mode: &str) -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(dev)?;
        let size = f.seek(SeekFrom::End(0))? as usize / BS * BS;
        let layout = Layout::from_size_align(BS * DEPTH, 4096).unwrap();
        // SAFETY: non-zero size; the buffer lives until the process is killed.
        let buf = unsafe { alloc_zeroed(layout) };
        assert!(!buf.is_null());
        // SAFETY: fill our own buffer with a recognisable pattern.
        unsafe { std::ptr::write_bytes(buf, 0xA5, BS * DEPTH) };
        let tmp = pid_file.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
        std::fs::rename(&tmp, pid_file)?;
        let fd = f.as_raw_fd();
        let mut off = 0usize;
        let mut next = || {
            let o = off;
            off = (off + BS) % size;
            o as u64
        };
        match mode {
            "pwrite" => loop {
                // SAFETY: aligned buffer of BS bytes, valid fd.
                let r = unsafe {
                    libc::pwrite(fd, buf as *const libc::c_void, BS, next() as libc::off_t)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            },
            "uring" => {
                use io_uring::{opcode, types, IoUring};
                let mut ring = IoUring::new(DEPTH as u32 * 2)?;
                let push = |ring: &mut IoUring, slot: usize, at: u64| -> std::io::Result<()> {
                    // SAFETY: slot `slot` of our buffer stays valid until its completion.
                    let p = unsafe { buf.add(slot * BS) };
                    let e = opcode::Write::new(types::Fd(fd), p, BS as u32)
                        .offset(at)
                        .build()
                        .user_data(slot as u64);
                    // SAFETY: the entry's buffer outlives the request (never freed).
                    unsafe { ring.submission().push(&e) }
                        .map_err(|_| std::io::Error::other("submission queue full"))
                };
                for slot in 0..DEPTH {
                    push(&mut ring, slot, next())?;
                }
                loop {
                    ring.submit_and_wait(1)?;
                    let done: Vec<(u64, i32)> = ring
                        .completion()
                        .map(|c| (c.user_data(), c.result()))
                        .collect();
                    for (slot, res) in done {
                        if res < 0 {
                            return Err(std::io::Error::from_raw_os_error(-res));
                        }
                        push(&mut ring, slot as usize, next())?;
                    }
                }
            }
            other => Err(std::io::Error::other(format!("unknown mode {other}"))),
        }
    }
}

/// Completed write requests of a block device (/sys/block/<dev>/stat field 5).
fn writes_done(dev: &Path) -> u64 {
    let name = dev.file_name().unwrap().to_string_lossy().into_owned();
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
    stat.split_whitespace().nth(4).unwrap().parse().unwrap()
}

fn inflight(dev: &Path) -> String {
    let name = dev.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_to_string(format!("/sys/block/{name}/inflight"))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Start a writer for `dev` and wait until its pid is published and its writes land.
fn start_writer(dir: &Path, dev: &Path, pid_file: &Path, mode: &str, tag: &str) -> Daemon {
    let _ = std::fs::remove_file(pid_file);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "fence_writer_node",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("MCFS_FENCE_WRITER_DEV", dev)
    .env("MCFS_FENCE_WRITER_PIDFILE", pid_file)
    .env("MCFS_FENCE_WRITER_MODE", mode);
    let mut w = Daemon::spawn(tag, &mut cmd, dir.join(format!("{tag}.log"))).unwrap();
    let pid: u32 = wait_for("writer pid file", T, || {
        std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
    .unwrap();
    assert_eq!(pid, w.pid(), "the pid file must name the writer itself");
    let before = writes_done(dev);
    wait_for("the writer's I/O to reach the device", T, || {
        if let Some(st) = w.exited() {
            panic!("writer exited early: {st}; log:\n{}", w.log_text());
        }
        (writes_done(dev) > before + 16).then_some(())
    })
    .unwrap();
    w
}

fn config(dir: &Path, pid_file: &Path, dev: &Path) -> PathBuf {
    let p = dir.join("fence.toml");
    std::fs::write(
        &p,
        format!(
            "[[node]]\nid = 1\nname = \"node1\"\n[[node.level]]\nmethod = \"process\"\npid_file = \"{}\"\n\
             expect_cmdline = \"fence_writer_node\"\ndevices = [\"{}\"]\ntimeout_ms = 20000\n",
            pid_file.display(),
            dev.display()
        ),
    )
    .unwrap();
    p
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn fence(f: &Fenced, id: &str) -> serde_json::Value {
    f.json(&[
        "node",
        "1",
        "--request-id",
        id,
        "--reason",
        "integration test",
        "--wait-secs",
        "30",
    ])
    .unwrap()
}

#[test]
fn fence_kills_an_io_uring_writer_durably_and_once() {
    let dir = tempdir();
    let dev = LoopDev::new_image(dir.path(), 64 << 20).unwrap();
    let secret = mcfs_integration::secret_file(dir.path()).unwrap();
    let wrong = dir.path().join("wrong-secret");
    std::fs::write(&wrong, "not-the-cluster-secret").unwrap();
    let pid_file = dir.path().join("node1.pid");
    let cfg = config(dir.path(), &pid_file, &dev.path);
    let data = dir.path().join("fenced-data");

    let mut w1 = start_writer(dir.path(), &dev.path, &pid_file, "uring", "writer1");
    let fenced = start_fenced(dir.path(), &cfg, &data, &secret, "fenced1").unwrap();

    // A call with the wrong secret is refused and changes nothing.
    let out = fenced
        .cli_with_secret(
            &["node", "1", "--request-id", "evil", "--wait-secs", "0"],
            &wrong,
        )
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Unauthenticated"), "{err}");
    assert!(
        w1.exited().is_none(),
        "an unauthenticated request killed the node"
    );

    let asked = now_ms();
    let r = fence(&fenced, "req-1");
    assert_eq!(s(&r, "outcome"), "SUCCESS", "{r:#}");
    assert_eq!(s(&r, "method"), "process");
    let fence_time = n(&r, "fence_time_unix_ms");
    assert!(
        fence_time >= asked && fence_time >= n(&r, "failure_time_unix_ms"),
        "{r:#}"
    );
    let msg = s(&r["attempts"][0], "message").to_string();
    assert!(
        msg.contains(&format!("{} (pid_file)", w1.pid())) && msg.contains("in-flight I/O drained"),
        "{msg}"
    );

    // The writer is dead (SIGKILL), and nothing of it reaches the device any more.
    let st = wait_for("writer 1 to be dead", T, || w1.exited()).unwrap();
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
    assert_eq!(inflight(&dev.path), "0 0");
    let settled = writes_done(&dev.path);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        writes_done(&dev.path),
        settled,
        "writes landed after the fence reported success"
    );

    // Restart mcfs-fenced (SIGKILL) on the same data dir: the record is durable.
    drop(fenced);
    let fenced = start_fenced(dir.path(), &cfg, &data, &secret, "fenced2").unwrap();
    let st = fenced.json(&["status", "1"]).unwrap();
    assert_eq!(st["fenced"], true, "{st:#}");
    assert_eq!(n(&st, "fenced_at_unix_ms"), fence_time);
    assert_eq!(s(&st, "last_request_id"), "req-1");
    let h = fenced.json(&["history"]).unwrap();
    let recs = h["records"].as_array().unwrap();
    assert_eq!(recs.len(), 1, "{h:#}");
    assert_eq!(
        (s(&recs[0], "request_id"), s(&recs[0], "outcome")),
        ("req-1", "SUCCESS")
    );
    assert_eq!(n(&recs[0], "fence_time_unix_ms"), fence_time);
    let refused = h["refused"].as_array().unwrap();
    assert!(
        refused
            .iter()
            .any(|c| s(c, "call").contains("Fence(node 1, request \"evil\")")),
        "{h:#}"
    );

    // A new incarnation of the node writes its pid to the same file. Retrying the
    // recorded request id returns the recorded outcome and must not touch it.
    let mut w2 = start_writer(dir.path(), &dev.path, &pid_file, "uring", "writer2");
    let again = fence(&fenced, "req-1");
    assert_eq!(s(&again, "outcome"), "SUCCESS");
    assert_eq!(n(&again, "fence_time_unix_ms"), fence_time);
    assert_eq!(again["attempts"], r["attempts"]);
    let before = writes_done(&dev.path);
    wait_for("writer 2 to keep writing", T, || {
        (writes_done(&dev.path) > before + 16).then_some(())
    })
    .unwrap();
    assert!(w2.exited().is_none(), "a retried request id fenced again");

    // A new request id is a new fence.
    let r2 = fence(&fenced, "req-2");
    assert_eq!(s(&r2, "outcome"), "SUCCESS", "{r2:#}");
    assert!(n(&r2, "fence_time_unix_ms") > fence_time);
    let st = wait_for("writer 2 to be dead", T, || w2.exited()).unwrap();
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    // The unauthenticated call never created an operation.
    let h = fenced.json(&["history", "--node", "1"]).unwrap();
    let ids: Vec<&str> = h["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| s(r, "request_id"))
        .collect();
    assert_eq!(ids, ["req-2", "req-1"]);
}

#[test]
fn fence_kills_a_stopped_pwrite_writer() {
    let dir = tempdir();
    let dev = LoopDev::new_image(dir.path(), 32 << 20).unwrap();
    let secret = mcfs_integration::secret_file(dir.path()).unwrap();
    let pid_file = dir.path().join("node1.pid");
    let cfg = config(dir.path(), &pid_file, &dev.path);
    let mut w = start_writer(dir.path(), &dev.path, &pid_file, "pwrite", "writer");
    // A stopped node is the dangerous one: its I/O would land when it continues.
    w.signal(libc::SIGSTOP);
    let fenced = start_fenced(
        dir.path(),
        &cfg,
        &dir.path().join("data"),
        &secret,
        "fenced",
    )
    .unwrap();
    let r = fence(&fenced, "stop-1");
    assert_eq!(s(&r, "outcome"), "SUCCESS", "{r:#}");
    let st = wait_for("stopped writer to be dead", T, || w.exited()).unwrap();
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    let unfence = fenced.json(&["unfence", "1"]).unwrap();
    assert_eq!(s(&unfence, "outcome"), "SUCCESS", "{unfence:#}");
    assert_eq!(fenced.json(&["status", "1"]).unwrap()["fenced"], false);
    let out = fenced.cli(&["unfence", "1"]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("node 1 is not fenced; refusing to unfence it"));
}
