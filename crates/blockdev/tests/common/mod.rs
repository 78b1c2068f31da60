//! Helpers shared by this crate's integration tests: patterns and a loop-device guard.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Deterministic bytes that differ for every (tag, position).
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mcfs-blockdev-test-")
        .tempdir()
        .unwrap()
}

/// A sparse file of `size` bytes.
pub fn sparse(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

pub fn have_losetup() -> bool {
    Command::new("losetup")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A loop device over `file`, detached on drop (even when the test fails).
pub struct LoopDev {
    pub path: PathBuf,
}

impl LoopDev {
    pub fn attach(file: &Path, extra: &[&str]) -> LoopDev {
        let mut last = String::new();
        // Parallel tests race for the same free device; losetup then fails with EBUSY.
        for _ in 0..5 {
            let out = Command::new("losetup")
                .args(["-f", "--show", "--direct-io=on"])
                .args(extra)
                .arg(file)
                .output()
                .unwrap();
            if out.status.success() {
                let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                return LoopDev { path };
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("losetup failed: {last}");
    }

    pub fn run(&self, cmd: &str, args: &[&str]) {
        let st = Command::new(cmd)
            .args(args)
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(st.success(), "{cmd} {args:?} {} failed", self.path.display());
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("blockdev").arg("--setrw").arg(&self.path).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        // Detaching finishes asynchronously; do not leave before it has.
        let sys = Path::new("/sys/block")
            .join(self.path.file_name().unwrap())
            .join("loop");
        let deadline = Instant::now() + Duration::from_secs(5);
        while sys.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
