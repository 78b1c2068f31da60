//! A mixed file workload for failure tests: creates, writes with fsync,
//! renames and unlinks in one directory of one mount, remembering only what
//! was acknowledged as durable (fsync returned), so a test can check exactly
//! that after a crash.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// FNV-1a over the bytes: cheap, good enough to tell contents apart.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

/// Deterministic content of file `i`, version `v`.
pub fn content(seed: u64, i: u64, v: u64) -> Vec<u8> {
    let len = match (i + v) % 4 {
        0 => 100,
        1 => 5000,
        2 => 70_000,
        _ => 300_000,
    } as usize;
    let mut x = seed ^ (i << 20) ^ (v << 40) ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What is durable: relative path -> checksum. A path being changed when the
/// node died (a rename, unlink or overwrite whose fsync had not returned) is
/// uncertain: either outcome, or for an overwrite any content, is correct.
#[derive(Default, Debug, Clone)]
pub struct Durable {
    pub files: BTreeMap<String, u64>,
    pub uncertain: std::collections::BTreeSet<String>,
    pub ops: u64,
}

impl Durable {
    fn begin(&mut self, paths: &[String]) {
        for p in paths {
            self.files.remove(p);
            self.uncertain.insert(p.clone());
        }
    }
    fn end(&mut self, paths: &[String]) {
        for p in paths {
            self.uncertain.remove(p);
        }
    }
    /// Merge another workload's record (a later cycle may make paths certain).
    pub fn extend(&mut self, o: Durable) {
        for p in &o.uncertain {
            self.files.remove(p);
        }
        self.uncertain.extend(o.uncertain);
        self.files.extend(o.files);
        self.ops += o.ops;
    }
}

pub struct Workload {
    pub stop: Arc<AtomicBool>,
    pub durable: Arc<Mutex<Durable>>,
    handle: Option<std::thread::JoinHandle<Option<String>>>,
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl Workload {
    /// Start on `dir` (created if missing) under mount `mnt`. The thread ends at
    /// `stop` or at the first I/O error (the mount died); it returns that error.
    pub fn start(mnt: &Path, sub: &str, seed: u64) -> Workload {
        let dir = mnt.join(sub);
        let stop = Arc::new(AtomicBool::new(false));
        let durable = Arc::new(Mutex::new(Durable::default()));
        let (s, d) = (stop.clone(), durable.clone());
        let sub = sub.to_string();
        let handle = std::thread::spawn(move || run(&dir, &sub, seed, &s, &d).err().map(|e| e.to_string()));
        Workload { stop, durable, handle: Some(handle) }
    }

    /// Stop and wait; returns the error that ended it, if any.
    pub fn finish(mut self) -> (Durable, Option<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let err = self.handle.take().and_then(|h| h.join().ok()).flatten();
        let d = self.durable.lock().map(|g| g.clone()).unwrap_or_default();
        (d, err)
    }

    pub fn durable_ops(&self) -> u64 {
        self.durable.lock().map(|g| g.ops).unwrap_or(0)
    }
}

fn run(dir: &PathBuf, sub: &str, seed: u64, stop: &AtomicBool, durable: &Mutex<Durable>) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    fsync_dir(dir)?;
    let mut i = 0u64;
    let mut live: Vec<(u64, u64, String)> = Vec::new(); // (i, version, name)
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        match i % 10 {
            // rename a durable file
            7 if !live.is_empty() => {
                let k = (i as usize * 31) % live.len();
                let (fi, v, old) = live[k].clone();
                let new = format!("r{fi}-{i}");
                let (po, pn) = (format!("{sub}/{old}"), format!("{sub}/{new}"));
                let c = {
                    let mut d = durable.lock().map_err(|_| std::io::Error::other("poisoned"))?;
                    let c = d.files.get(&po).copied();
                    d.begin(&[po.clone(), pn.clone()]);
                    c
                };
                fs::rename(dir.join(&old), dir.join(&new))?;
                fsync_dir(dir)?;
                live[k] = (fi, v, new.clone());
                let mut d = durable.lock().map_err(|_| std::io::Error::other("poisoned"))?;
                d.end(&[po, pn.clone()]);
                if let Some(c) = c {
                    d.files.insert(pn, c);
                }
                d.ops += 1;
            }
            // unlink a durable file
            9 if live.len() > 3 => {
                let (_, _, name) = live.remove((i as usize * 17) % live.len());
                let p = format!("{sub}/{name}");
                durable.lock().map_err(|_| std::io::Error::other("poisoned"))?.begin(std::slice::from_ref(&p));
                fs::remove_file(dir.join(&name))?;
                fsync_dir(dir)?;
                let mut d = durable.lock().map_err(|_| std::io::Error::other("poisoned"))?;
                d.end(&[p]);
                d.ops += 1;
            }
            // a file written but never fsynced (may be lost; must not corrupt)
            5 => {
                let mut f = fs::File::create(dir.join(format!("tmp{i}")))?;
                f.write_all(&content(seed, i, 9))?;
            }
            // overwrite a durable file with a new version
            3 if !live.is_empty() => {
                let k = (i as usize * 13) % live.len();
                let (fi, v, name) = live[k].clone();
                let data = content(seed, fi, v + 1);
                durable.lock().map_err(|_| std::io::Error::other("poisoned"))?.begin(&[format!("{sub}/{name}")]);
                let mut f = fs::OpenOptions::new().write(true).truncate(true).open(dir.join(&name))?;
                f.write_all(&data)?;
                f.sync_all()?;
                live[k] = (fi, v + 1, name.clone());
                let mut d = durable.lock().map_err(|_| std::io::Error::other("poisoned"))?;
                d.end(&[format!("{sub}/{name}")]);
                d.files.insert(format!("{sub}/{name}"), checksum(&data));
                d.ops += 1;
            }
            // create + write + fsync
            _ => {
                let name = format!("f{i}");
                let data = content(seed, i, 0);
                durable.lock().map_err(|_| std::io::Error::other("poisoned"))?.begin(&[format!("{sub}/{name}")]);
                let mut f = fs::File::create(dir.join(&name))?;
                f.write_all(&data)?;
                f.sync_all()?;
                live.push((i, 0, name.clone()));
                let mut d = durable.lock().map_err(|_| std::io::Error::other("poisoned"))?;
                d.end(&[format!("{sub}/{name}")]);
                d.files.insert(format!("{sub}/{name}"), checksum(&data));
                d.ops += 1;
            }
        }
    }
    Ok(())
}

/// Check that every durable file is present under `mnt` with its content.
pub fn verify(mnt: &Path, d: &Durable) -> Result<(), String> {
    for (rel, want) in &d.files {
        let got = fs::read(mnt.join(rel)).map_err(|e| format!("{rel}: {e} (was fsynced)"))?;
        if checksum(&got) != *want {
            return Err(format!("{rel}: content differs from what was fsynced ({} bytes read)", got.len()));
        }
    }
    Ok(())
}
