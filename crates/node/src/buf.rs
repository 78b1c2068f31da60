//! The metadata buffer cache. Every cached metadata block belongs to exactly one
//! glock (its owner): an inode's dinode, indirect, directory leaf and hash blocks
//! belong to the inode glock; an rgrp's header and bitmaps to the rgrp glock. A
//! demote syncs and then drops everything its glock owns, which is what keeps the
//! nodes' caches coherent. Each buffer is charged to the memory budget while it
//! lives.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::glock::LockName;
use crate::icache::budget::{Budget, Charge};

pub struct Buf {
    pub blkno: u64,
    pub owner: LockName,
    data: RwLock<Vec<u8>>,
    _charge: Charge,
}

impl Buf {
    pub fn read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }
    pub fn write(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({} of {})", self.blkno, self.owner)
    }
}

#[derive(Default)]
struct Inner {
    map: HashMap<u64, Arc<Buf>>,
    owners: HashMap<LockName, HashSet<u64>>,
}

pub struct BufCache {
    inner: Mutex<Inner>,
    budget: Arc<Budget>,
}

impl BufCache {
    pub fn new(budget: Arc<Budget>) -> BufCache {
        BufCache { inner: Mutex::new(Inner::default()), budget }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, blkno: u64) -> Option<Arc<Buf>> {
        self.lock().map.get(&blkno).cloned()
    }

    /// Insert a block's contents (just read, or freshly built). If another thread
    /// inserted the same block meanwhile, that copy wins and is returned.
    pub fn insert(&self, blkno: u64, owner: LockName, data: Vec<u8>) -> Arc<Buf> {
        if let Some(b) = self.get(blkno) {
            return b;
        }
        let charge = self.budget.charge(data.len() as u64 + 96);
        let b = Arc::new(Buf { blkno, owner, data: RwLock::new(data), _charge: charge });
        let mut g = self.lock();
        if let Some(existing) = g.map.get(&blkno) {
            return existing.clone();
        }
        g.map.insert(blkno, b.clone());
        g.owners.entry(owner).or_default().insert(blkno);
        b
    }

    /// Replace a block's cached copy (a freshly allocated block gets new contents
    /// and possibly a new owner).
    pub fn replace(&self, blkno: u64, owner: LockName, data: Vec<u8>) -> Arc<Buf> {
        self.forget(blkno);
        self.insert(blkno, owner, data)
    }

    /// Drop one block (freed).
    pub fn forget(&self, blkno: u64) {
        let mut g = self.lock();
        if let Some(b) = g.map.remove(&blkno) {
            if let Some(s) = g.owners.get_mut(&b.owner) {
                s.remove(&blkno);
            }
        }
    }

    /// Drop every block `owner` covers (after its glock was synced).
    pub fn invalidate(&self, owner: LockName) -> usize {
        let mut g = self.lock();
        let Some(set) = g.owners.remove(&owner) else { return 0 };
        for b in &set {
            g.map.remove(b);
        }
        set.len()
    }

    /// Blocks cached for `owner`.
    pub fn count_of(&self, owner: LockName) -> usize {
        self.lock().owners.get(&owner).map_or(0, |s| s.len())
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl BufCache {
    /// Drop clean buffers nobody else references (not pending in the log, not
    /// in use by an operation) until about `want` bytes are freed. A journaled
    /// but not yet written-back block is re-read from the log's copy, so dropping
    /// it is safe.
    pub fn shrink(&self, want: u64) -> u64 {
        let mut g = self.lock();
        let victims: Vec<u64> = g.map.iter().filter(|(_, b)| Arc::strong_count(b) == 1).map(|(k, _)| *k).collect();
        let mut freed = 0u64;
        for k in victims {
            if freed >= want {
                break;
            }
            if let Some(b) = g.map.remove(&k) {
                freed += b.read().len() as u64;
                if let Some(s) = g.owners.get_mut(&b.owner) {
                    s.remove(&k);
                }
            }
        }
        freed
    }
}
