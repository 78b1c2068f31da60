//! Durable state in sled: what a restarted lock server must not forget.
//!
//! * tree `meta`: `epoch` — the run number, bumped and flushed at every start.
//!   Lock ids, session ids and fencing tokens carry it in their high bits, so
//!   they never repeat and tokens stay monotonic across restarts without a
//!   write per grant.
//! * tree `ls/<lockspace>`: `gen` (generation), `m/<node>` (member records),
//!   `r/<node>` (recovery records), `l/<hex name>` (LVBs with their sequence
//!   number and validity). Values are JSON, so `sled` dumps stay readable.
//!
//! Locks themselves are not stored (they are rebuilt from the survivors'
//! reclaims; see `core::recovery`). Writes are applied in the order the core
//! made them, under the lockspace mutex; `flush_to` is a group commit: every
//! caller waiting for a sequence number is released by one flush that covers it.

use crate::core::recovery::Saved;
use crate::core::Record;
#[cfg(test)]
use crate::core::{Lvb, Member, RecoveryRecord};
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub struct Store {
    db: sled::Db,
    /// Records written so far (a sequence number, not a count of bytes).
    written: AtomicU64,
    flushed: tokio::sync::watch::Sender<u64>,
    kick: tokio::sync::Notify,
}

/// A lockspace as found on disk.
#[derive(Debug, Default)]
pub struct StoredLockspace {
    pub name: String,
    pub saved: Saved,
}

const TREE_PREFIX: &str = "ls/";

impl Store {
    pub fn open(dir: &Path) -> Result<Arc<Store>> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Store(format!("create {}: {e}", dir.display())))?;
        let db = sled::Config::new()
            .path(dir.join("dlm.sled"))
            .flush_every_ms(None)
            .open()
            .map_err(|e| {
                if crate::datadir::is_sled_lock_error(&e) {
                    // mcfs-dlm takes DataDirLock first; this is some other holder.
                    Error::Startup(format!(
                        "data directory {} is in use by another process (its database {} is locked); stop it or use another --data-dir",
                        dir.display(),
                        dir.join("dlm.sled").display()
                    ))
                } else {
                    Error::Store(format!("open {}: {e}", dir.display()))
                }
            })?;
        let (flushed, _) = tokio::sync::watch::channel(0);
        Ok(Arc::new(Store { db, written: AtomicU64::new(0), flushed, kick: tokio::sync::Notify::new() }))
    }

    /// Bump and durably record the run number.
    pub fn next_epoch(&self) -> Result<u64> {
        let meta = self.db.open_tree("meta")?;
        let prev = match meta.get("epoch")? {
            Some(v) => {
                let b: [u8; 8] = v.as_ref().try_into().map_err(|_| Error::Store("corrupt epoch record".into()))?;
                u64::from_le_bytes(b)
            }
            None => 0,
        };
        let next = prev + 1;
        if next >= 1 << (64 - crate::core::EPOCH_SHIFT) {
            return Err(Error::Store("epoch counter exhausted".into()));
        }
        meta.insert("epoch", &next.to_le_bytes())?;
        self.db.flush()?;
        Ok(next)
    }

    /// Every lockspace on disk.
    pub fn load(&self) -> Result<Vec<StoredLockspace>> {
        let mut out = Vec::new();
        for tn in self.db.tree_names() {
            let Some(name) = tn.strip_prefix(TREE_PREFIX.as_bytes()) else { continue };
            let name = String::from_utf8(name.to_vec()).map_err(|_| Error::Store("lockspace name is not UTF-8".into()))?;
            let t = self.db.open_tree(&tn)?;
            let mut ls = StoredLockspace { name, saved: Saved::default() };
            for kv in t.iter() {
                let (k, v) = kv?;
                if &*k == b"gen" {
                    ls.saved.generation = serde_json::from_slice(&v)?;
                } else if k.starts_with(b"m/") {
                    ls.saved.members.push(serde_json::from_slice(&v)?);
                } else if k.starts_with(b"r/") {
                    ls.saved.recoveries.push(serde_json::from_slice(&v)?);
                } else if let Some(hex) = k.strip_prefix(b"l/") {
                    let name = unhex(hex).ok_or_else(|| Error::Store("corrupt LVB key".into()))?;
                    ls.saved.lvbs.push((name, serde_json::from_slice(&v)?));
                }
            }
            out.push(ls);
        }
        Ok(out)
    }

    /// Apply one record (not yet durable; see `flush_to`). Returns its sequence number.
    pub fn apply(&self, lockspace: &str, rec: &Record) -> Result<u64> {
        let t = self.db.open_tree(format!("{TREE_PREFIX}{lockspace}"))?;
        match rec {
            Record::Generation(g) => {
                t.insert("gen", serde_json::to_vec(g)?)?;
            }
            Record::Member(m) => {
                t.insert(format!("m/{:03}", m.node), serde_json::to_vec(m)?)?;
            }
            Record::MemberGone(n) => {
                t.remove(format!("m/{n:03}"))?;
            }
            Record::Recovery(r) => {
                t.insert(format!("r/{:03}", r.node), serde_json::to_vec(r)?)?;
            }
            Record::RecoveryGone(n) => {
                t.remove(format!("r/{n:03}"))?;
            }
            Record::Lvb(name, lvb) => {
                let key = format!("l/{}", hex(name));
                if lvb.seq == 0 && lvb.valid {
                    t.remove(key)?;
                } else {
                    t.insert(key, serde_json::to_vec(lvb)?)?;
                }
            }
        }
        Ok(self.written.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Sequence number of the last record applied.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Highest sequence number known durable.
    pub fn flushed(&self) -> u64 {
        *self.flushed.borrow()
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.flushed.subscribe()
    }

    /// Ask the flusher to make `seq` durable, without waiting.
    pub fn request_flush(&self, seq: u64) {
        if seq > self.flushed() {
            self.kick.notify_one();
        }
    }

    /// Wait until every record up to `seq` is on disk.
    pub async fn flush_to(&self, seq: u64) -> Result<()> {
        let mut rx = self.flushed.subscribe();
        self.request_flush(seq);
        while *rx.borrow_and_update() < seq {
            if rx.changed().await.is_err() {
                return Err(Error::Store("store flusher stopped".into()));
            }
        }
        Ok(())
    }

    /// The group-commit loop; run once per process.
    pub async fn run_flusher(self: Arc<Self>) {
        loop {
            self.kick.notified().await;
            let target = self.written();
            if target <= self.flushed() {
                continue;
            }
            let db = self.db.clone();
            let res = tokio::task::spawn_blocking(move || db.flush()).await;
            match res {
                Ok(Ok(_)) => {
                    self.flushed.send_modify(|f| *f = (*f).max(target));
                }
                Ok(Err(e)) => {
                    // Nothing is acknowledged until it is durable: keep trying.
                    tracing::error!("sled flush failed: {e}; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    self.kick.notify_one();
                }
                Err(e) => tracing::error!("sled flush task failed: {e}"),
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|c| std::str::from_utf8(c).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{MemberState, RecoveryState};

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let flusher = tokio::spawn(s.clone().run_flusher());
            assert_eq!(s.next_epoch().unwrap(), 1);
            let m = Member {
                node: 3,
                state: MemberState::Active,
                journal: 2,
                admin_addr: "127.0.0.1:9".into(),
                inc: 4,
                locks: 0,
                pending: 0,
                reclaiming: false,
            };
            s.apply("c:fs", &Record::Generation(4)).unwrap();
            s.apply("c:fs", &Record::Member(m)).unwrap();
            let r = RecoveryRecord {
                node: 5,
                journal: 1,
                state: RecoveryState::NeedsReplay,
                failed_at_ms: 10,
                fenced_at_ms: 11,
                generation: 3,
                inc: 2,
                attempt: 0,
                reason: "lease".into(),
                locks_known: true,
                unfenced: false,
            };
            s.apply("c:fs", &Record::Recovery(r)).unwrap();
            let lvb = Lvb { data: b"abc".to_vec(), seq: 7, valid: false };
            let seq = s.apply("c:fs", &Record::Lvb(Arc::from(&b"rgrp/\x00\xff"[..]), lvb)).unwrap();
            s.flush_to(seq).await.unwrap();
            assert!(s.flushed() >= seq);
            flusher.abort();
            let _ = flusher.await;
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.next_epoch().unwrap(), 2);
        let ls = s.load().unwrap();
        assert_eq!(ls.len(), 1);
        let l = &ls[0];
        assert_eq!((l.name.as_str(), l.saved.generation), ("c:fs", 4));
        assert_eq!(l.saved.members[0].journal, 2);
        assert_eq!(l.saved.recoveries[0].state, RecoveryState::NeedsReplay);
        assert_eq!(l.saved.lvbs, vec![(b"rgrp/\x00\xff".to_vec(), Lvb { data: b"abc".to_vec(), seq: 7, valid: false })]);
    }

    #[test]
    fn a_database_open_elsewhere_is_named_not_a_sled_error() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let e = Store::open(dir.path()).err().unwrap();
        let want = format!("data directory {} is in use by another process", dir.path().display());
        assert!(matches!(&e, Error::Startup(m) if m.starts_with(&want) && m.ends_with("use another --data-dir")), "{e}");
    }
}
