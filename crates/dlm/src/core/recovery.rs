//! Membership and recovery of failed nodes.
//!
//! Recovery protocol, step by step (docs/LOCKING.md, "Recovery", says the same):
//!
//! 1. A node joins a lockspace: it becomes an ACTIVE member with a new
//!    incarnation (the lockspace generation, bumped). The member record is
//!    written to sled before the Join is answered, so a restarted server knows
//!    every node that may hold locks.
//! 2. Its session's lease expires, or its Events stream drops (a killed
//!    process closes its connection): `node_failed`. The member becomes FAILED,
//!    the generation is bumped, the node's queued requests and conversions are
//!    dropped (a pending conversion falls back to its granted mode), and its
//!    granted locks STAY HELD. Requests that conflict with them wait; the others
//!    carry on. The node gets no more grants or callbacks.
//! 3. A recovery record {FAILED, failure time, journal, generation} is persisted
//!    and broadcast, then immediately FENCING: the core emits `Effect::Fence`
//!    with request id `<lockspace>/<node>/<failure generation>` (a retry after a
//!    FAILED outcome appends `/retry<N>`). The fence client polls mcfs-fenced
//!    with backoff and reports `fence_result`.
//! 4. A fence SUCCESS whose fence time is at or after the failure time moves
//!    the record to NEEDS_REPLAY (persisted, broadcast with the journal slot).
//!    A success older than the failure, or a FAILED outcome, is not accepted:
//!    fencing is retried. From now on NOEXP requests ignore the dead node's
//!    locks, so a survivor can take `journal/<slot>` in EX while the rest of the
//!    dead node's locks are still held. A node that never registered a journal
//!    (journal -1) has nothing to replay and goes straight to step 6.
//! 5. The survivor holding `journal/<slot>` (EX or PW) replays the journal and
//!    calls RecoveryDone(node, slot).
//! 6. RELEASED: the dead incarnation's locks are dropped; the LVB of every
//!    resource it held in PW/EX is marked not valid (its last value may never
//!    have been written back); waiters are granted. The member is now FENCED.
//! 7. The operator (or automation) calls Unfence: allowed once RELEASED; the
//!    member record is removed and the node may join again as a new
//!    incarnation. Exception, for a whole-cluster loss: if no member is active
//!    (nobody could replay), a node at NEEDS_REPLAY may be unfenced and rejoin;
//!    it then replays the journals itself (its old locks are a previous
//!    incarnation and are released on RecoveryDone like anyone's).
//!
//! Failure cases:
//! * The lock server restarts at any step: members and recovery records come
//!   back from sled. ACTIVE members become EXPECTED and have a grace window to
//!   rejoin with `reclaim` lists; those that do not are failed at the end of
//!   the window (step 2, with their lock set unknown). A recovery at FAILED or
//!   FENCING re-issues the same fence request id (idempotent at mcfs-fenced); one
//!   at NEEDS_REPLAY waits for RecoveryDone. Locks are not in sled, so while a
//!   recovery whose lock set was lost is unfinished, nothing but reclaims,
//!   down-conversions and NOEXP requests is granted in the lockspace (the
//!   Linux DLM's whole-lockspace stop, only after a restart).
//! * The replaying survivor dies: it fails in turn (step 2); its journal lock
//!   on `journal/<slot>` is held by a node at FAILED/FENCING, so the next
//!   survivor's NOEXP request waits until that node reaches NEEDS_REPLAY, then
//!   replays both journals.
//! * RecoveryDone for a node that is not at NEEDS_REPLAY, or from a node that
//!   does not hold the journal lock, is refused (FAILED_PRECONDITION).

use super::lockspace::{Lockspace, Queue};
use super::mode::Mode;
use super::{Effect, Limits, LockId, Lvb, NodeId, Record, EPOCH_SHIFT, MAX_NAME};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Has a session.
    Active,
    /// Recorded before a restart; may rejoin with reclaims during the grace window.
    Expected,
    /// Failed; recovery (fencing, replay) under way. Its locks are held.
    Failed,
    /// Recovered (journal replayed, locks released); must be unfenced to rejoin.
    Fenced,
}

impl MemberState {
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Expected => "expected",
            MemberState::Failed => "failed",
            MemberState::Fenced => "fenced",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: NodeId,
    pub state: MemberState,
    pub journal: i32,
    pub admin_addr: String,
    /// Incarnation: the lockspace generation at which it joined.
    pub inc: u64,
    #[serde(skip)]
    pub locks: usize,
    #[serde(skip)]
    pub pending: usize,
    /// Joined from EXPECTED during the grace window: may reclaim.
    #[serde(skip)]
    pub reclaiming: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RecoveryState {
    Failed,
    Fencing,
    NeedsReplay,
    Released,
}

impl RecoveryState {
    pub fn name(self) -> &'static str {
        match self {
            RecoveryState::Failed => "failed",
            RecoveryState::Fencing => "fencing",
            RecoveryState::NeedsReplay => "needs-replay",
            RecoveryState::Released => "released",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryRecord {
    pub node: NodeId,
    pub journal: i32,
    pub state: RecoveryState,
    pub failed_at_ms: u64,
    pub fenced_at_ms: u64,
    /// Lockspace generation of the failure (part of the fence request id).
    pub generation: u64,
    /// Incarnation of the node that failed (whose locks are released).
    pub inc: u64,
    /// Fence attempts that came back FAILED.
    pub attempt: u32,
    pub reason: String,
    /// False after a restart: the dead node's locks were in memory only.
    #[serde(skip, default)]
    pub locks_known: bool,
    /// Unfenced early (whole-cluster loss, see step 7).
    #[serde(default)]
    pub unfenced: bool,
}

impl RecoveryRecord {
    /// Idempotency key of the current fence attempt at mcfs-fenced.
    pub fn fence_request_id(&self, lockspace: &str) -> String {
        if self.attempt == 0 {
            format!("{lockspace}/{}/{}", self.node, self.generation)
        } else {
            format!("{lockspace}/{}/{}/retry{}", self.node, self.generation, self.attempt)
        }
    }
}

/// What the store kept of a lockspace.
#[derive(Clone, Debug, Default)]
pub struct Saved {
    pub generation: u64,
    pub members: Vec<Member>,
    pub recoveries: Vec<RecoveryRecord>,
    pub lvbs: Vec<(Vec<u8>, Lvb)>,
}

/// What a joining node learns.
#[derive(Clone, Debug)]
pub struct JoinInfo {
    pub generation: u64,
    pub members: Vec<NodeId>,
    pub recoveries: Vec<RecoveryRecord>,
    /// The node was expected after a restart and may reclaim its locks.
    pub may_reclaim: bool,
}

/// The fencing agent's verdict on one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceOutcome {
    Success { fence_time_ms: u64 },
    Failed(String),
}

impl Lockspace {
    /// Step 1: a node joins.
    pub fn join(&mut self, node: NodeId, admin_addr: &str, out: &mut Vec<Effect>) -> Result<JoinInfo> {
        if node == 0 || node > 255 {
            return Err(Error::InvalidArgument(format!("node id {node} out of range 1..=255")));
        }
        let mut may_reclaim = false;
        let mut journal = -1;
        match self.members.get(&node).map(|m| (m.state, m.journal)) {
            Some((MemberState::Active, _)) => {
                return Err(Error::AlreadyExists(format!("node {node} already has a session in {}", self.name)))
            }
            Some((MemberState::Failed, _)) => {
                let st = self.recoveries.get(&node).map(|r| r.state.name()).unwrap_or("failed");
                return Err(Error::FailedPrecondition(format!(
                    "node {node} failed and is being recovered (state {st}); it may rejoin once fenced, replayed and unfenced"
                )));
            }
            Some((MemberState::Fenced, _)) => {
                return Err(Error::FailedPrecondition(format!(
                    "node {node} is fenced (its journal was replayed); unfence it before it rejoins"
                )))
            }
            Some((MemberState::Expected, j)) => {
                may_reclaim = self.grace;
                journal = j;
            }
            None => {
                if let Some(r) = self.recoveries.get(&node) {
                    if !r.unfenced && r.state != RecoveryState::Released {
                        return Err(Error::FailedPrecondition(format!(
                            "node {node} is being recovered (state {})",
                            r.state.name()
                        )));
                    }
                }
            }
        }
        self.generation += 1;
        let m = Member {
            node,
            state: MemberState::Active,
            journal,
            admin_addr: admin_addr.to_string(),
            inc: self.generation,
            locks: 0,
            pending: 0,
            reclaiming: may_reclaim,
        };
        out.push(Effect::Persist(Record::Generation(self.generation)));
        out.push(Effect::Persist(Record::Member(m.clone())));
        self.members.insert(node, m);
        // Even if this was the last expected member, grace ends only after its
        // reclaims (`reclaim`): ending it here would refuse them, and could
        // grant a waiter a lock that conflicts with them.
        Ok(JoinInfo {
            generation: self.generation,
            members: self.members.values().filter(|m| m.state == MemberState::Active).map(|m| m.node).collect(),
            recoveries: self.recoveries.values().filter(|r| r.state != RecoveryState::Released).cloned().collect(),
            may_reclaim,
        })
    }

    /// Reclaim locks held before a restart (only right after a join from
    /// EXPECTED, in the grace window). Returns the ids refused. Called after
    /// every join (with an empty list if there is nothing to reclaim): once no
    /// member is still expected, the grace window ends here.
    pub fn reclaim(&mut self, node: NodeId, locks: &[(LockId, &[u8], Option<Mode>)], out: &mut Vec<Effect>) -> Vec<LockId> {
        let Some(m) = self.members.get(&node) else { return locks.iter().map(|l| l.0).collect() };
        let (inc, ok) = (m.inc, m.reclaiming && m.state == MemberState::Active);
        let mut refused = Vec::new();
        for &(id, name, mode) in locks {
            let Some(mode) = mode else {
                refused.push(id);
                continue;
            };
            let valid = ok
                && !name.is_empty()
                && name.len() <= MAX_NAME
                && id >> EPOCH_SHIFT < self.epoch
                && !self.locks.contains_key(&id);
            let conflict = self.resources.get(name).is_some_and(|r| {
                r.granted.iter().any(|o| self.locks.get(o).and_then(|l| l.gr).is_some_and(|g| !g.compatible(mode)))
            });
            if !valid || conflict {
                refused.push(id);
                continue;
            }
            let key: Arc<[u8]> = match self.resources.get_key_value(name) {
                Some((k, _)) => k.clone(),
                None => {
                    let k: Arc<[u8]> = Arc::from(name);
                    self.resources.insert(
                        k.clone(),
                        super::Resource { lvb: Lvb { valid: true, ..Lvb::default() }, ..Default::default() },
                    );
                    k
                }
            };
            let token = self.alloc_token();
            self.locks.insert(
                id,
                super::Lock {
                    id,
                    node,
                    inc,
                    resource: key.clone(),
                    gr: Some(mode),
                    rq: mode,
                    flags: 0,
                    client_ref: 0,
                    highbast: None,
                    fence_token: token,
                    queue: Queue::Granted,
                    pending_lvb: None,
                },
            );
            self.place(&key, id, Queue::Granted);
            self.count(node, inc, 1, 0);
        }
        if self.grace && !self.members.values().any(|m| m.state == MemberState::Expected) {
            // Everyone is back: no need to wait for the end of the window.
            self.end_grace(0, out);
        }
        refused
    }

    /// Leave cleanly: every lock released without recovery, no LVB invalidation.
    pub fn leave(&mut self, node: NodeId, out: &mut Vec<Effect>) -> Result<()> {
        let inc = self.active_member(node)?.inc;
        let ids: Vec<LockId> = self.locks.values().filter(|l| l.node == node && l.inc == inc).map(|l| l.id).collect();
        let keys = self.remove_locks(&ids, false, out);
        self.members.remove(&node);
        if self.recoveries.remove(&node).is_some() {
            out.push(Effect::Persist(Record::RecoveryGone(node)));
        }
        self.generation += 1;
        out.push(Effect::Persist(Record::MemberGone(node)));
        out.push(Effect::Persist(Record::Generation(self.generation)));
        for k in keys {
            self.grant_pending(&k, out);
            self.drop_if_idle(&k);
        }
        Ok(())
    }

    /// Record facts the recovery needs (journal slot, admin address).
    pub fn set_session_info(&mut self, node: NodeId, journal: i32, admin_addr: &str, out: &mut Vec<Effect>) -> Result<()> {
        self.active_member(node)?;
        if journal < -1 {
            return Err(Error::InvalidArgument(format!("journal {journal} is not a slot (use -1 for none)")));
        }
        if journal >= 0 {
            if let Some(other) = self.members.values().find(|m| m.node != node && m.journal == journal && m.state != MemberState::Fenced) {
                return Err(Error::AlreadyExists(format!("journal {journal} belongs to node {}", other.node)));
            }
        }
        if let Some(m) = self.members.get_mut(&node) {
            m.journal = journal;
            m.admin_addr = admin_addr.to_string();
            out.push(Effect::Persist(Record::Member(m.clone())));
        }
        Ok(())
    }

    /// Steps 2-3: a node's lease expired or its stream dropped.
    pub fn node_failed(&mut self, node: NodeId, now_ms: u64, reason: &str, out: &mut Vec<Effect>) {
        let Some(m) = self.members.get(&node) else { return };
        let (state, inc, journal) = (m.state, m.inc, m.journal);
        if state != MemberState::Active && state != MemberState::Expected {
            return;
        }
        let locks_known = state == MemberState::Active;
        // Queued requests die with the node; pending conversions fall back.
        let mut touched = Vec::new();
        let mine: Vec<(LockId, Queue, Arc<[u8]>)> = self
            .locks
            .values()
            .filter(|l| l.node == node && l.inc == inc && l.queue != Queue::Granted)
            .map(|l| (l.id, l.queue, l.resource.clone()))
            .collect();
        for (id, q, key) in mine {
            self.unplace(&key, id);
            if q == Queue::Waiting {
                self.locks.remove(&id);
                self.count(node, inc, -1, -1);
            } else {
                self.revert(id);
                self.place(&key, id, Queue::Granted);
                self.count(node, inc, 0, -1);
            }
            touched.push(key);
        }
        self.generation += 1;
        if let Some(m) = self.members.get_mut(&node) {
            m.state = MemberState::Failed;
            m.reclaiming = false;
            out.push(Effect::Persist(Record::Member(m.clone())));
        }
        out.push(Effect::Persist(Record::Generation(self.generation)));
        let mut rec = RecoveryRecord {
            node,
            journal,
            state: RecoveryState::Failed,
            failed_at_ms: now_ms,
            fenced_at_ms: 0,
            generation: self.generation,
            inc,
            attempt: 0,
            reason: reason.to_string(),
            locks_known,
            unfenced: false,
        };
        out.push(Effect::Recovery(rec.clone()));
        rec.state = RecoveryState::Fencing;
        out.push(Effect::Persist(Record::Recovery(rec.clone())));
        out.push(Effect::Recovery(rec.clone()));
        out.push(self.fence_effect(&rec));
        self.recoveries.insert(node, rec);
        for k in touched {
            self.grant_pending(&k, out);
            self.drop_if_idle(&k);
        }
    }

    fn fence_effect(&self, rec: &RecoveryRecord) -> Effect {
        Effect::Fence {
            node: rec.node,
            request_id: rec.fence_request_id(&self.name),
            failed_at_ms: rec.failed_at_ms,
            failure_generation: rec.generation,
        }
    }

    /// Step 4: the fencing agent answered for the failure of `generation`.
    pub fn fence_result(&mut self, node: NodeId, generation: u64, outcome: FenceOutcome, out: &mut Vec<Effect>) {
        let name = self.name.clone();
        let Some(rec) = self.recoveries.get_mut(&node) else { return };
        if rec.generation != generation || rec.state != RecoveryState::Fencing {
            return; // a stale answer for an older failure
        }
        match outcome {
            FenceOutcome::Success { fence_time_ms } if fence_time_ms >= rec.failed_at_ms => {
                rec.state = RecoveryState::NeedsReplay;
                rec.fenced_at_ms = fence_time_ms;
                let rec = rec.clone();
                out.push(Effect::Persist(Record::Recovery(rec.clone())));
                out.push(Effect::Recovery(rec.clone()));
                if rec.journal < 0 {
                    self.release(node, out);
                } else {
                    // NOEXP waiters may go now.
                    self.grant_pending_all(out);
                }
            }
            FenceOutcome::Success { fence_time_ms } => {
                tracing::error!(
                    lockspace = %name, node, fence_time_ms, failed_at_ms = rec.failed_at_ms,
                    "fence success predates the failure; not accepted, fencing again"
                );
                rec.attempt += 1;
                let rec = rec.clone();
                out.push(Effect::Persist(Record::Recovery(rec.clone())));
                out.push(self.fence_effect(&rec));
            }
            FenceOutcome::Failed(msg) => {
                tracing::error!(lockspace = %name, node, attempt = rec.attempt, "fencing failed: {msg}; retrying");
                rec.attempt += 1;
                let rec = rec.clone();
                out.push(Effect::Persist(Record::Recovery(rec.clone())));
                out.push(self.fence_effect(&rec));
            }
        }
    }

    /// Step 5: `by` replayed `node`'s journal.
    pub fn recovery_done(&mut self, by: NodeId, node: NodeId, journal: i32, out: &mut Vec<Effect>) -> Result<()> {
        self.active_member(by)?;
        let rec = self
            .recoveries
            .get(&node)
            .ok_or_else(|| Error::NotFound(format!("no recovery for node {node} in {}", self.name)))?;
        match rec.state {
            RecoveryState::NeedsReplay => {}
            RecoveryState::Released => return Ok(()),
            s => {
                return Err(Error::FailedPrecondition(format!(
                    "node {node} is at {} (not fenced yet); its journal must not be replayed",
                    s.name()
                )))
            }
        }
        if rec.journal >= 0 && journal != rec.journal {
            return Err(Error::InvalidArgument(format!("node {node} used journal {}, not {journal}", rec.journal)));
        }
        if rec.journal >= 0 {
            let name = format!("journal/{}", rec.journal);
            let holds = self.resources.get(name.as_bytes()).is_some_and(|r| {
                r.granted.iter().any(|id| {
                    self.locks.get(id).is_some_and(|l| l.node == by && l.gr.is_some_and(|g| g >= Mode::PW) && self.owner_active(l))
                })
            });
            if !holds {
                return Err(Error::FailedPrecondition(format!(
                    "node {by} does not hold {name} in PW/EX; take it (with NOEXP) before replaying"
                )));
            }
        }
        self.release(node, out);
        Ok(())
    }

    /// Step 6: drop the dead incarnation's locks and invalidate the LVBs it held for writing.
    fn release(&mut self, node: NodeId, out: &mut Vec<Effect>) {
        let Some(rec) = self.recoveries.get_mut(&node) else { return };
        rec.state = RecoveryState::Released;
        let inc = rec.inc;
        let rec = rec.clone();
        out.push(Effect::Persist(Record::Recovery(rec.clone())));
        out.push(Effect::Recovery(rec.clone()));
        let ids: Vec<LockId> = self.locks.values().filter(|l| l.node == node && l.inc == inc).map(|l| l.id).collect();
        let keys = self.remove_locks(&ids, true, out);
        if let Some(m) = self.members.get_mut(&node) {
            if m.inc == inc && m.state == MemberState::Failed {
                m.state = MemberState::Fenced;
                m.locks = 0;
                m.pending = 0;
                out.push(Effect::Persist(Record::Member(m.clone())));
            }
        }
        if rec.locks_known {
            for k in keys {
                self.grant_pending(&k, out);
                self.drop_if_idle(&k);
            }
        } else {
            self.grant_pending_all(out);
        }
    }

    /// Take locks off their resources. With `invalidate`, a PW/EX holder's LVB is
    /// marked not valid. Returns the resources touched.
    fn remove_locks(&mut self, ids: &[LockId], invalidate: bool, out: &mut Vec<Effect>) -> Vec<Arc<[u8]>> {
        let mut keys: Vec<Arc<[u8]>> = Vec::new();
        for &id in ids {
            let Some(l) = self.locks.get(&id) else { continue };
            let (key, gr, node, inc, q) = (l.resource.clone(), l.gr, l.node, l.inc, l.queue);
            self.unplace(&key, id);
            self.locks.remove(&id);
            self.count(node, inc, -1, if q == Queue::Granted { 0 } else { -1 });
            if invalidate && gr.is_some_and(|g| g >= Mode::PW) {
                if let Some(r) = self.resources.get_mut(&key) {
                    r.lvb.valid = false;
                    out.push(Effect::Persist(Record::Lvb(key.clone(), r.lvb.clone())));
                }
            }
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        keys
    }

    /// Step 7, the check alone: may `node` be unfenced now? `Ok(true)` for the
    /// whole-cluster-loss exception (unfenced before its journal was replayed).
    pub fn check_unfence(&self, node: NodeId) -> Result<bool> {
        let state = self.members.get(&node).map(|m| m.state);
        let rec_state = self.recoveries.get(&node).map(|r| r.state);
        match (state, rec_state) {
            (Some(MemberState::Fenced), _) | (None, Some(RecoveryState::Released)) => Ok(false),
            (Some(MemberState::Failed), Some(RecoveryState::NeedsReplay))
                if !self.members.values().any(|m| m.state == MemberState::Active) =>
            {
                Ok(true)
            }
            (Some(MemberState::Failed), Some(s)) => Err(Error::FailedPrecondition(format!(
                "node {node} is at {}: it may be unfenced only once its journal was replayed",
                s.name()
            ))),
            (Some(s), _) => Err(Error::FailedPrecondition(format!("node {node} is {}, not fenced", s.name()))),
            _ => Err(Error::NotFound(format!("node {node} is not fenced in {}", self.name))),
        }
    }

    /// Step 7: let a fenced node join again.
    pub fn unfence(&mut self, node: NodeId, out: &mut Vec<Effect>) -> Result<String> {
        if !self.check_unfence(node)? {
            self.members.remove(&node);
            self.recoveries.remove(&node);
            out.push(Effect::Persist(Record::MemberGone(node)));
            out.push(Effect::Persist(Record::RecoveryGone(node)));
            return Ok(format!("node {node} unfenced in {}: it may rejoin", self.name));
        }
        self.members.remove(&node);
        if let Some(r) = self.recoveries.get_mut(&node) {
            r.unfenced = true;
            out.push(Effect::Persist(Record::Recovery(r.clone())));
        }
        out.push(Effect::Persist(Record::MemberGone(node)));
        Ok(format!(
            "node {node} unfenced in {} before its journal was replayed (no member is active to replay it): it must replay journal(s) after it rejoins",
            self.name
        ))
    }

    /// End of the restart grace window: members that did not come back failed
    /// while the server was down (their lock set is unknown).
    pub fn end_grace(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        if !self.grace {
            return;
        }
        self.grace = false;
        let missing: Vec<NodeId> =
            self.members.values().filter(|m| m.state == MemberState::Expected).map(|m| m.node).collect();
        for m in self.members.values_mut() {
            m.reclaiming = false;
        }
        for n in missing {
            self.node_failed(n, now_ms, "did not reclaim within the grace window after a lock-server restart", out);
        }
        self.grant_pending_all(out);
    }

    /// Rebuild a lockspace from its records after a restart. Effects: fence
    /// requests to re-issue for recoveries that were at FAILED/FENCING.
    pub fn restore(name: &str, epoch: u64, limits: Limits, saved: Saved, out: &mut Vec<Effect>) -> Lockspace {
        let Saved { generation, members, recoveries, lvbs } = saved;
        let mut ls = Lockspace::new(name, epoch, limits);
        ls.generation = generation;
        for (k, lvb) in lvbs {
            ls.resources.insert(Arc::from(k), super::Resource { lvb, ..Default::default() });
        }
        for mut m in members {
            if m.state == MemberState::Active || m.state == MemberState::Expected {
                m.state = MemberState::Expected;
                ls.grace = true;
            }
            ls.members.insert(m.node, m);
        }
        for mut r in recoveries {
            r.locks_known = false;
            if r.state == RecoveryState::Failed {
                r.state = RecoveryState::Fencing;
            }
            if r.state == RecoveryState::Fencing {
                out.push(ls.fence_effect(&r));
            }
            ls.recoveries.insert(r.node, r);
        }
        ls
    }
}
