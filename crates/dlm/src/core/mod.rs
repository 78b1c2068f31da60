//! The lock manager's core: pure, synchronous, deterministic. No tokio, no gRPC,
//! no sled. Every entry point takes an input (a request, a node failure, a fence
//! result, "recovery done", the time) and appends the resulting effects (grants,
//! completions, blocking callbacks, recovery events to broadcast, "please fence
//! node N", records to persist) to a caller-supplied `Vec<Effect>`. The service
//! carries the effects out; the tests inspect them.
//!
//! * [`mode`]: the six modes, compatibility and LVB tables, flags.
//! * [`lockspace`]: the lockspace, its locks and resources; lock/convert/unlock/cancel.
//! * [`queues`]: the grant/convert/wait queue rules of the VMS/Linux DLM and blocking callbacks.
//! * [`recovery`]: membership, failure, fencing, journal replay and release; restart and grace.

pub mod lockspace;
pub mod mode;
mod queues;
pub mod recovery;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use lockspace::{Lock, Lockspace, Queue, Resource};
pub use mode::{flags, Mode};
pub use recovery::{Member, MemberState, RecoveryRecord, RecoveryState};

pub type NodeId = u32;
pub type LockId = u64;

/// Resource names and LVBs are at most this many bytes.
pub const MAX_NAME: usize = 64;
pub const MAX_LVB: usize = 64;
/// Lock ids and fencing tokens are `epoch << EPOCH_SHIFT | counter`, so values
/// handed out by an earlier run of the server never repeat and tokens stay
/// monotonic across restarts without a disk write per grant.
pub const EPOCH_SHIFT: u32 = 40;

/// Per-node limits enforced by the core.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Locks (granted, converting or waiting) one node may own in a lockspace.
    pub max_locks_per_node: usize,
    /// Requests and conversions one node may have queued at once.
    pub max_pending_per_node: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_locks_per_node: 1_000_000, max_pending_per_node: 65_536 }
    }
}

/// What a granted lock receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub lock_id: LockId,
    /// Granted mode (differs from the requested one with ALTPR/ALTCW or a CONVDEADLK demotion).
    pub mode: Mode,
    /// The resource's LVB, when VALBLK was asked and the transition reads it.
    pub lvb: Option<Vec<u8>>,
    pub lvb_valid: bool,
    pub lvb_seq: u64,
    pub fence_token: u64,
    pub generation: u64,
}

/// The immediate answer to a lock or conversion request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockOutcome {
    Granted(Grant),
    /// Queued; a `Completion` effect follows.
    Queued(LockId),
    /// NOQUEUE and not grantable now. For a conversion the lock keeps its mode.
    WouldBlock(LockId),
    /// Conversion deadlock; the lock keeps its granted mode.
    Deadlock(LockId),
}

impl LockOutcome {
    pub fn lock_id(&self) -> LockId {
        match self {
            LockOutcome::Granted(g) => g.lock_id,
            LockOutcome::Queued(id) | LockOutcome::WouldBlock(id) | LockOutcome::Deadlock(id) => *id,
        }
    }
}

/// How a queued request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompletionResult {
    Granted(Grant),
    Canceled,
    Deadlock,
}

/// A lock request (new or conversion).
#[derive(Clone, Debug, Default)]
pub struct LockReq<'a> {
    pub resource: &'a [u8],
    pub mode: Option<Mode>,
    pub flags: u32,
    /// The lock to convert (with `flags::CONVERT`).
    pub lock_id: LockId,
    pub client_ref: u64,
    /// LVB written by a down-conversion from PW/EX with VALBLK.
    pub lvb: Option<&'a [u8]>,
}

/// Lock value block of a resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lvb {
    pub data: Vec<u8>,
    pub seq: u64,
    /// False once a PW/EX holder died before writing it back.
    pub valid: bool,
}

/// A state change that must survive a restart of the lock server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Generation(u64),
    Member(Member),
    MemberGone(NodeId),
    Recovery(RecoveryRecord),
    RecoveryGone(NodeId),
    Lvb(Arc<[u8]>, Lvb),
}

/// Something the service must do on the core's behalf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// A queued request or conversion finished (the "AST").
    Completion { node: NodeId, lock_id: LockId, client_ref: u64, result: CompletionResult },
    /// A granted lock blocks a request for `mode` (the "BAST").
    Blocking { node: NodeId, lock_id: LockId, resource: Arc<[u8]>, mode: Mode },
    /// Tell every active member of the lockspace.
    Recovery(RecoveryRecord),
    /// Ask the fencing agent to fence `node`; report with `Lockspace::fence_result`.
    Fence { node: NodeId, request_id: String, failed_at_ms: u64, failure_generation: u64 },
    /// Write to stable storage before answering the request that caused it.
    Persist(Record),
}
