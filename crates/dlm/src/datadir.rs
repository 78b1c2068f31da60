//! The lock a daemon holds on its data directory (mcfs-dlm, mcfs-fenced).
//!
//! Two daemons on one sled database would corrupt it, and sled's own refusal
//! ("could not acquire lock on .../db: WouldBlock") tells an operator nothing
//! about who holds it. So before a daemon opens its database it takes an
//! exclusive `flock` on `DIR/<daemon>.pid` and writes its pid there; the next
//! one to try reads that pid back and says which process to stop.
//!
//! The lock, not the file, is what counts: the kernel drops it when the holder
//! exits however it exits (SIGKILL included), so a file left behind is stale
//! but harmless. The file is never removed, because removing it while another
//! process has it open would let two processes each lock a different inode.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Held for the life of the daemon; dropping it releases the directory.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    pub path: PathBuf,
}

impl DataDirLock {
    /// Create `dir` if needed and lock it for `daemon` (its binary name), or
    /// say which running process holds it.
    pub fn acquire(dir: &Path, daemon: &str) -> Result<DataDirLock> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Startup(format!("cannot create data directory {}: {e}", dir.display())))?;
        let path = dir.join(format!("{daemon}.pid"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::Startup(format!("cannot open {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(in_use(dir, daemon, holder_pid(&mut file))),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::Startup(format!("cannot lock {}: {e}", path.display())))
            }
        }
        let pid = std::process::id();
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(format!("{pid}\n").as_bytes()))
            .map_err(|e| Error::Startup(format!("cannot write {}: {e}", path.display())))?;
        Ok(DataDirLock { _file: file, path })
    }
}

/// The pid the holder wrote (none yet if it has only just locked the file).
fn holder_pid(f: &mut File) -> Option<u32> {
    let mut s = String::new();
    f.read_to_string(&mut s).ok()?;
    s.trim().parse().ok().filter(|p| *p > 0)
}

/// The refusal an operator reads when `dir` is taken by a running `daemon`.
pub fn in_use(dir: &Path, daemon: &str, pid: Option<u32>) -> Error {
    let who = match pid {
        Some(p) => format!("{daemon} (pid {p})"),
        None => daemon.to_string(),
    };
    Error::Startup(format!(
        "data directory {} is in use by another running {who}; stop it or use another --data-dir",
        dir.display()
    ))
}

/// Is this sled error its refusal to open a database another process has open?
/// (A holder that did not take [`DataDirLock`]: another program, or an older build.)
pub fn is_sled_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_second_holder_is_told_the_pid_and_the_lock_dies_with_the_first() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("data");
        let first = DataDirLock::acquire(&dir, "mcfs-test").unwrap();
        assert_eq!(std::fs::read_to_string(&first.path).unwrap(), format!("{}\n", std::process::id()));
        // flock locks belong to the open file, so a second open in this very
        // process is refused just as another process would be.
        let e = DataDirLock::acquire(&dir, "mcfs-test").unwrap_err().to_string();
        let want = format!(
            "data directory {} is in use by another running mcfs-test (pid {}); stop it or use another --data-dir",
            dir.display(),
            std::process::id()
        );
        assert_eq!(e, want);
        drop(first);
        // a stale file (longer than a pid) is overwritten whole
        std::fs::write(dir.join("mcfs-test.pid"), "4294967295999\n").unwrap();
        let again = DataDirLock::acquire(&dir, "mcfs-test").unwrap();
        assert_eq!(std::fs::read_to_string(&again.path).unwrap(), format!("{}\n", std::process::id()));
        // another daemon's lock in the same directory is another file
        DataDirLock::acquire(&dir, "mcfs-other").unwrap();
    }

    #[test]
    fn without_a_pid_the_message_still_names_the_daemon() {
        let e = in_use(Path::new("/var/lib/x"), "mcfs-dlm", None).to_string();
        assert_eq!(e, "data directory /var/lib/x is in use by another running mcfs-dlm; stop it or use another --data-dir");
    }
}
