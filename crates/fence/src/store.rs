//! Durable records in sled: every operation, every node's fenced state, and every
//! refused (unauthenticated) call.
//!
//! Trees and keys:
//! * `ops`: request id -> [`OpRecord`] (JSON). Inserted with compare-and-swap, so
//!   two concurrent calls with one request id start one operation.
//! * `nodes`: node id (decimal, zero-padded) -> [`NodeRecord`] (JSON).
//! * `refused`: sequence number (zero-padded) -> [`RefusedRecord`], capped at
//!   [`MAX_REFUSED`] so unauthenticated callers cannot fill the disk.
//!
//! An operation's final record and its node's state change are written in one
//! transaction and flushed before anyone is told the outcome.

use crate::error::{FenceError, Result};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use std::path::Path;

pub const MAX_REFUSED: usize = 1000;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Fence,
    Unfence,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Fence => "fence",
            Kind::Unfence => "unfence",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Success,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AttemptRecord {
    pub level: u32,
    pub method: String,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub ok: bool,
    pub message: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OpRecord {
    /// Order of arrival (sled's monotonic id generator); History sorts by it.
    pub seq: u64,
    pub request_id: String,
    pub node_id: u32,
    pub kind: Kind,
    pub requested_ms: u64,
    pub failure_time_ms: u64,
    pub reason: String,
    pub outcome: Outcome,
    /// Moment of confirmation, when `outcome` is Success.
    pub fence_time_ms: u64,
    pub finished_ms: u64,
    /// Method of the level that succeeded.
    pub method: String,
    pub message: String,
    pub attempts: Vec<AttemptRecord>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRecord {
    pub fenced: bool,
    pub fenced_at_ms: u64,
    pub last_request_id: String,
    pub last_outcome: Option<Outcome>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RefusedRecord {
    pub at_ms: u64,
    pub call: String,
    pub peer: String,
    pub reason: String,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    ops: sled::Tree,
    nodes: sled::Tree,
    refused: sled::Tree,
}

fn node_key(id: u32) -> String {
    format!("{id:010}")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| FenceError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        msg: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Our own plain structs of strings and numbers always serialize.
    serde_json::to_vec(v).unwrap_or_default()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir)
            .map_err(|e| FenceError::io(format!("create data dir {}", dir.display()), e))?;
        let db = sled::Config::new()
            .path(dir.join("fence.sled"))
            .open()
            .map_err(|e| {
                if mcfs_dlm::datadir::is_sled_lock_error(&e) {
                    // mcfs-fenced takes DataDirLock first; this is some other holder.
                    FenceError::DataDirInUse(format!(
                        "data directory {} is in use by another process (its database {} is locked); stop it or use another --data-dir",
                        dir.display(),
                        dir.join("fence.sled").display()
                    ))
                } else {
                    FenceError::Store(e)
                }
            })?;
        Ok(Store {
            ops: db.open_tree("ops")?,
            nodes: db.open_tree("nodes")?,
            refused: db.open_tree("refused")?,
            db,
        })
    }

    pub fn next_seq(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    pub fn op(&self, request_id: &str) -> Result<Option<OpRecord>> {
        match self.ops.get(request_id.as_bytes())? {
            Some(v) => Ok(Some(decode(request_id.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Insert a new operation unless the request id is taken; `Err(existing)` then.
    pub fn insert_op(&self, rec: &OpRecord) -> Result<std::result::Result<(), OpRecord>> {
        let key = rec.request_id.as_bytes();
        match self
            .ops
            .compare_and_swap(key, None as Option<&[u8]>, Some(encode(rec)))?
        {
            Ok(()) => Ok(Ok(())),
            Err(cas) => match cas.current {
                Some(v) => Ok(Err(decode(key, &v)?)),
                // Cannot happen (expected None, found None), but don't guess.
                None => Err(FenceError::Corrupt {
                    key: rec.request_id.clone(),
                    msg: "compare-and-swap lost a record".into(),
                }),
            },
        }
    }

    /// Update a running operation (attempts so far).
    pub fn put_op(&self, rec: &OpRecord) -> Result<()> {
        self.ops.insert(rec.request_id.as_bytes(), encode(rec))?;
        Ok(())
    }

    /// Record an operation together with its node's new state, atomically.
    pub fn put_op_and_node(&self, rec: &OpRecord, node: &NodeRecord) -> Result<()> {
        let op_v = encode(rec);
        let node_v = encode(node);
        let r: std::result::Result<(), TransactionError<()>> = (&self.ops, &self.nodes)
            .transaction(|(o, n)| {
                o.insert(rec.request_id.as_bytes(), op_v.clone())?;
                n.insert(node_key(rec.node_id).as_bytes(), node_v.clone())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            });
        match r {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(e.into()),
            Err(TransactionError::Abort(())) => Err(FenceError::Corrupt {
                key: rec.request_id.clone(),
                msg: "transaction aborted".into(),
            }),
        }
    }

    pub fn node(&self, id: u32) -> Result<NodeRecord> {
        let k = node_key(id);
        match self.nodes.get(k.as_bytes())? {
            Some(v) => decode(k.as_bytes(), &v),
            None => Ok(NodeRecord::default()),
        }
    }

    pub fn put_node(&self, id: u32, rec: &NodeRecord) -> Result<()> {
        self.nodes.insert(node_key(id).as_bytes(), encode(rec))?;
        Ok(())
    }

    /// All operations, oldest first.
    pub fn ops(&self) -> Result<Vec<OpRecord>> {
        let mut v = Vec::new();
        for kv in self.ops.iter() {
            let (k, val) = kv?;
            v.push(decode::<OpRecord>(&k, &val)?);
        }
        v.sort_by_key(|r| r.seq);
        Ok(v)
    }

    pub fn add_refused(&self, rec: &RefusedRecord) -> Result<()> {
        let seq = self.db.generate_id()?;
        self.refused
            .insert(format!("{seq:020}").as_bytes(), encode(rec))?;
        while self.refused.len() > MAX_REFUSED {
            if self.refused.pop_min()?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Refused calls, newest first.
    pub fn refused(&self, limit: usize) -> Result<Vec<RefusedRecord>> {
        let mut v = Vec::new();
        for kv in self.refused.iter().rev().take(limit) {
            let (k, val) = kv?;
            v.push(decode(&k, &val)?);
        }
        Ok(v)
    }

    /// Make everything written so far durable.
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn op(id: &str, seq: u64) -> OpRecord {
        OpRecord {
            seq,
            request_id: id.into(),
            node_id: 2,
            kind: Kind::Fence,
            requested_ms: 5,
            failure_time_ms: 4,
            reason: "lease expired".into(),
            outcome: Outcome::Pending,
            fence_time_ms: 0,
            finished_ms: 0,
            method: String::new(),
            message: String::new(),
            attempts: vec![],
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_and_ids_are_unique() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            assert!(s.insert_op(&op("a", 1)).unwrap().is_ok());
            let mut dup = op("a", 2);
            dup.node_id = 9;
            let existing = s.insert_op(&dup).unwrap().unwrap_err();
            assert_eq!(existing.node_id, 2, "the first record must win");
            let mut done = op("a", 1);
            done.outcome = Outcome::Success;
            done.fence_time_ms = 77;
            s.put_op_and_node(
                &done,
                &NodeRecord {
                    fenced: true,
                    fenced_at_ms: 77,
                    last_request_id: "a".into(),
                    last_outcome: Some(Outcome::Success),
                },
            )
            .unwrap();
            s.add_refused(&RefusedRecord {
                at_ms: 1,
                call: "Fence".into(),
                peer: "127.0.0.1:5".into(),
                reason: "wrong".into(),
            })
            .unwrap();
            s.flush().await.unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        let r = s.op("a").unwrap().unwrap();
        assert_eq!((r.outcome, r.fence_time_ms), (Outcome::Success, 77));
        assert!(s.node(2).unwrap().fenced);
        assert!(!s.node(3).unwrap().fenced);
        assert_eq!(s.refused(10).unwrap()[0].call, "Fence");
    }

    #[tokio::test]
    async fn refused_calls_are_capped_newest_kept() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        for i in 0..(MAX_REFUSED + 5) {
            s.add_refused(&RefusedRecord {
                at_ms: i as u64,
                call: "Fence".into(),
                peer: String::new(),
                reason: String::new(),
            })
            .unwrap();
        }
        let all = s.refused(usize::MAX).unwrap();
        assert_eq!(all.len(), MAX_REFUSED);
        assert_eq!(all[0].at_ms, (MAX_REFUSED + 4) as u64);
    }

    #[test]
    fn a_database_open_elsewhere_is_named_not_a_sled_error() {
        let d = tempfile::tempdir().unwrap();
        let _first = Store::open(d.path()).unwrap();
        let e = Store::open(d.path()).err().unwrap();
        assert!(matches!(e, FenceError::DataDirInUse(_)), "{e:?}");
        let want = format!(
            "data directory {} is in use by another process",
            d.path().display()
        );
        assert!(
            e.to_string().starts_with(&want) && e.to_string().ends_with("use another --data-dir"),
            "{e}"
        );
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.ops.insert("bad", b"{not json".to_vec()).unwrap();
        assert!(matches!(s.op("bad"), Err(FenceError::Corrupt { .. })));
    }
}
