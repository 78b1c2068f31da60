//! A lockspace: its members, locks and resources, and the lock, conversion,
//! unlock and cancel requests. Queue rules are in `queues`, membership and
//! recovery in `recovery`.

use super::mode::{flags, Mode};
use super::recovery::{Member, MemberState, RecoveryRecord, RecoveryState};
use super::{
    CompletionResult, Effect, Grant, Limits, LockId, LockOutcome, LockReq, Lvb, NodeId, Record, EPOCH_SHIFT,
    MAX_LVB, MAX_NAME,
};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Which queue of its resource a lock is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    Granted,
    Converting,
    Waiting,
}

impl Queue {
    pub fn name(self) -> &'static str {
        match self {
            Queue::Granted => "granted",
            Queue::Converting => "converting",
            Queue::Waiting => "waiting",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Lock {
    pub id: LockId,
    pub node: NodeId,
    /// Incarnation of the owner (the generation at which it joined), so a node
    /// that rejoins never loses its new locks when its old ones are released.
    pub inc: u64,
    pub resource: Arc<[u8]>,
    /// Granted mode; `None` while a new request waits.
    pub gr: Option<Mode>,
    /// Requested mode; equals `gr` while nothing is pending.
    pub rq: Mode,
    /// Flags of the current (or last) request.
    pub flags: u32,
    pub client_ref: u64,
    /// Highest mode a blocking callback was sent for since the last grant
    /// (de-duplication of BASTs, `lkb_highbast`).
    pub highbast: Option<Mode>,
    pub fence_token: u64,
    pub queue: Queue,
    /// LVB carried by a pending down-conversion with VALBLK.
    pub(super) pending_lvb: Option<Vec<u8>>,
}

#[derive(Clone, Debug, Default)]
pub struct Resource {
    pub granted: Vec<LockId>,
    /// Conversions in arrival order (served first, in order).
    pub converting: Vec<LockId>,
    /// New requests in arrival order.
    pub waiting: Vec<LockId>,
    pub lvb: Lvb,
}

impl Resource {
    fn is_idle(&self) -> bool {
        self.granted.is_empty()
            && self.converting.is_empty()
            && self.waiting.is_empty()
            && self.lvb.seq == 0
            && self.lvb.valid
    }

    pub(super) fn queue_mut(&mut self, q: Queue) -> &mut Vec<LockId> {
        match q {
            Queue::Granted => &mut self.granted,
            Queue::Converting => &mut self.converting,
            Queue::Waiting => &mut self.waiting,
        }
    }
}

pub struct Lockspace {
    pub(super) name: String,
    pub(super) epoch: u64,
    pub(super) generation: u64,
    pub(super) limits: Limits,
    pub(super) next_lock: u64,
    pub(super) next_token: u64,
    pub(super) locks: HashMap<LockId, Lock>,
    pub(super) resources: HashMap<Arc<[u8]>, Resource>,
    pub(super) members: BTreeMap<NodeId, Member>,
    pub(super) recoveries: BTreeMap<NodeId, RecoveryRecord>,
    /// After a restart, until every recorded member reclaimed or the window
    /// closed: only reclaims and down-conversions are granted.
    pub(super) grace: bool,
}

impl Lockspace {
    /// A new, empty lockspace. `epoch` is the server's run number (see [`EPOCH_SHIFT`]).
    pub fn new(name: &str, epoch: u64, limits: Limits) -> Lockspace {
        Lockspace {
            name: name.to_string(),
            epoch,
            generation: 0,
            limits,
            next_lock: 1,
            next_token: 1,
            locks: HashMap::new(),
            resources: HashMap::new(),
            members: BTreeMap::new(),
            recoveries: BTreeMap::new(),
            grace: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn in_grace(&self) -> bool {
        self.grace
    }
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }
    pub fn member(&self, node: NodeId) -> Option<&Member> {
        self.members.get(&node)
    }
    pub fn recoveries(&self) -> impl Iterator<Item = &RecoveryRecord> {
        self.recoveries.values()
    }
    pub fn resources(&self) -> impl Iterator<Item = (&Arc<[u8]>, &Resource)> {
        self.resources.iter()
    }
    pub fn resource(&self, name: &[u8]) -> Option<&Resource> {
        self.resources.get(name)
    }
    pub fn resource_count(&self) -> usize {
        self.resources.len()
    }
    pub fn lock_count(&self) -> usize {
        self.locks.len()
    }
    pub fn lock(&self, id: LockId) -> Option<&Lock> {
        self.locks.get(&id)
    }
    pub fn locks(&self) -> impl Iterator<Item = &Lock> {
        self.locks.values()
    }

    pub(super) fn alloc_lock_id(&mut self) -> LockId {
        let id = (self.epoch << EPOCH_SHIFT) | self.next_lock;
        self.next_lock += 1;
        id
    }

    pub(super) fn alloc_token(&mut self) -> u64 {
        let t = (self.epoch << EPOCH_SHIFT) | self.next_token;
        self.next_token += 1;
        t
    }

    /// Find `id` owned by `node`, with an error that says what is wrong.
    pub(super) fn owned_lock(&self, node: NodeId, id: LockId) -> Result<&Lock> {
        match self.locks.get(&id) {
            Some(l) if l.node == node => Ok(l),
            Some(_) => Err(Error::NotFound(format!("lock {id:#x} is not a lock of node {node}"))),
            None if id >> EPOCH_SHIFT == self.epoch && id & ((1 << EPOCH_SHIFT) - 1) < self.next_lock && id != 0 => {
                Err(Error::FailedPrecondition(format!(
                    "lock {id:#x} no longer exists (already unlocked, cancelled or refused)"
                )))
            }
            None => Err(Error::NotFound(format!("unknown lock id {id:#x}"))),
        }
    }

    /// The member must be active to make requests.
    pub(super) fn active_member(&self, node: NodeId) -> Result<&Member> {
        match self.members.get(&node) {
            Some(m) if m.state == MemberState::Active => Ok(m),
            Some(m) => Err(Error::FailedPrecondition(format!(
                "node {node} is {} in lockspace {}",
                m.state.name(),
                self.name
            ))),
            None => Err(Error::FailedPrecondition(format!("node {node} is not a member of lockspace {}", self.name))),
        }
    }

    /// A new lock, or a conversion (`flags::CONVERT`).
    pub fn request(&mut self, node: NodeId, req: &LockReq<'_>, out: &mut Vec<Effect>) -> Result<LockOutcome> {
        let mode = req.mode.ok_or_else(|| Error::InvalidArgument("unknown lock mode".into()))?;
        validate_flags(req.flags)?;
        if let Some(lvb) = req.lvb {
            if lvb.len() > MAX_LVB {
                return Err(Error::InvalidArgument(format!(
                    "LVB is {} bytes, the limit is {MAX_LVB}",
                    lvb.len()
                )));
            }
        }
        let member = self.active_member(node)?;
        let (inc, pending) = (member.inc, member.pending);
        if req.flags & flags::CONVERT != 0 {
            return self.convert(node, req, mode, pending, out);
        }
        if req.resource.is_empty() || req.resource.len() > MAX_NAME {
            return Err(Error::InvalidArgument(format!(
                "resource name is {} bytes; it must be 1..={MAX_NAME}",
                req.resource.len()
            )));
        }
        if member.locks >= self.limits.max_locks_per_node {
            return Err(Error::ResourceExhausted(format!(
                "node {node} already owns {} locks (limit {})",
                member.locks, self.limits.max_locks_per_node
            )));
        }
        let id = self.alloc_lock_id();
        let key: Arc<[u8]> = match self.resources.get_key_value(req.resource) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<[u8]> = Arc::from(req.resource);
                self.resources.insert(k.clone(), Resource { lvb: Lvb { valid: true, ..Lvb::default() }, ..Default::default() });
                k
            }
        };
        self.locks.insert(
            id,
            Lock {
                id,
                node,
                inc,
                resource: key.clone(),
                gr: None,
                rq: mode,
                flags: req.flags,
                client_ref: req.client_ref,
                highbast: None,
                fence_token: 0,
                queue: Queue::Waiting,
                pending_lvb: None,
            },
        );
        self.count(node, inc, 1, 0);
        match self.decide(&key, id, true) {
            super::queues::Decision::Grant(m) => {
                let g = self.grant(id, m, out);
                self.place(&key, id, Queue::Granted);
                Ok(LockOutcome::Granted(g))
            }
            _ if req.flags & flags::NOQUEUE != 0 => {
                if req.flags & flags::NOQUEUEBAST != 0 {
                    self.send_blocking_asts(&key, id, true, out);
                }
                self.locks.remove(&id);
                self.count(node, inc, -1, 0);
                self.drop_if_idle(&key);
                Ok(LockOutcome::WouldBlock(id))
            }
            // Only a request that must wait counts against the pending limit:
            // one that is granted at once or refused (NOQUEUE) never queues.
            _ if pending >= self.limits.max_pending_per_node => {
                self.locks.remove(&id);
                self.count(node, inc, -1, 0);
                self.drop_if_idle(&key);
                Err(pending_limit(node, pending, self.limits.max_pending_per_node))
            }
            _ => {
                self.place(&key, id, Queue::Waiting);
                self.count(node, inc, 0, 1);
                self.send_blocking_asts(&key, id, false, out);
                Ok(LockOutcome::Queued(id))
            }
        }
    }

    fn convert(
        &mut self,
        node: NodeId,
        req: &LockReq<'_>,
        mode: Mode,
        pending: usize,
        out: &mut Vec<Effect>,
    ) -> Result<LockOutcome> {
        let id = req.lock_id;
        let lk = self.owned_lock(node, id)?;
        match lk.queue {
            Queue::Granted => {}
            Queue::Converting => {
                return Err(Error::FailedPrecondition(format!(
                    "lock {id:#x} already has a conversion pending"
                )))
            }
            Queue::Waiting => {
                return Err(Error::FailedPrecondition(format!("lock {id:#x} is not granted yet; nothing to convert")))
            }
        }
        let gr = lk.gr.ok_or_else(|| Error::Internal(format!("granted lock {id:#x} without a mode")))?;
        if req.flags & flags::QUECVT != 0 && !gr.quecvt_allowed(mode) {
            return Err(Error::InvalidArgument(format!("QUECVT is only valid for up-conversions, not {gr}->{mode}")));
        }
        let (key, inc) = (lk.resource.clone(), lk.inc);
        if let Some(l) = self.locks.get_mut(&id) {
            l.rq = mode;
            l.flags = req.flags;
            l.client_ref = req.client_ref;
            l.pending_lvb = req.lvb.map(|b| b.to_vec());
        }
        use super::queues::Decision;
        let mut decision = self.decide(&key, id, true);
        // Only a conversion that must wait counts against the pending limit;
        // refused before a CONVDEADLK demotion changes anything.
        if matches!(decision, Decision::Wait | Decision::Demote)
            && req.flags & flags::NOQUEUE == 0
            && pending >= self.limits.max_pending_per_node
        {
            self.revert(id);
            return Err(pending_limit(node, pending, self.limits.max_pending_per_node));
        }
        if decision == Decision::Demote {
            // CONVDEADLK: our granted mode is what blocks an earlier conversion;
            // drop it to NL, let the others through, then try again.
            self.demote(id);
            self.grant_pending_convert(&key, out);
            decision = match self.decide(&key, id, true) {
                Decision::Grant(m) => Decision::Grant(m),
                _ => Decision::Wait,
            };
        }
        match decision {
            Decision::Grant(m) => {
                let g = self.grant(id, m, out);
                self.grant_pending(&key, out);
                Ok(LockOutcome::Granted(g))
            }
            Decision::Deadlock => {
                self.revert(id);
                Ok(LockOutcome::Deadlock(id))
            }
            _ if req.flags & flags::NOQUEUE != 0 => {
                if req.flags & flags::NOQUEUEBAST != 0 {
                    self.send_blocking_asts(&key, id, true, out);
                }
                self.revert(id);
                Ok(LockOutcome::WouldBlock(id))
            }
            _ => {
                self.unplace(&key, id);
                self.place(&key, id, Queue::Converting);
                self.count(node, inc, 0, 1);
                self.send_blocking_asts(&key, id, false, out);
                Ok(LockOutcome::Queued(id))
            }
        }
    }

    /// Release a granted lock. With VALBLK, a PW/EX holder writes `lvb`.
    pub fn unlock(
        &mut self,
        node: NodeId,
        id: LockId,
        lvb: Option<&[u8]>,
        req_flags: u32,
        out: &mut Vec<Effect>,
    ) -> Result<()> {
        validate_flags(req_flags)?;
        self.active_member(node)?;
        let lk = self.owned_lock(node, id)?;
        match lk.queue {
            Queue::Granted => {}
            Queue::Converting => {
                return Err(Error::FailedPrecondition(format!(
                    "lock {id:#x} has a conversion pending; cancel it before unlocking"
                )))
            }
            Queue::Waiting => {
                return Err(Error::FailedPrecondition(format!("lock {id:#x} is not granted yet; cancel it instead")))
            }
        }
        if let Some(b) = lvb {
            if b.len() > MAX_LVB {
                return Err(Error::InvalidArgument(format!("LVB is {} bytes, the limit is {MAX_LVB}", b.len())));
            }
        }
        let key = lk.resource.clone();
        let writes = req_flags & flags::VALBLK != 0 && lk.gr.is_some_and(|m| m.unlock_writes_lvb());
        let (inc, node_of) = (lk.inc, lk.node);
        if writes {
            self.write_lvb(&key, lvb.unwrap_or(&[]), out);
        }
        self.unplace(&key, id);
        self.locks.remove(&id);
        self.count(node_of, inc, -1, 0);
        self.grant_pending(&key, out);
        self.drop_if_idle(&key);
        Ok(())
    }

    /// Cancel a queued request (the lock disappears) or a queued conversion (the
    /// lock keeps its granted mode). Returns false when nothing was pending.
    pub fn cancel(&mut self, node: NodeId, id: LockId, out: &mut Vec<Effect>) -> Result<bool> {
        self.active_member(node)?;
        let lk = self.owned_lock(node, id)?;
        let (key, queue, client_ref, inc) = (lk.resource.clone(), lk.queue, lk.client_ref, lk.inc);
        match queue {
            Queue::Granted => return Ok(false),
            Queue::Waiting => {
                self.unplace(&key, id);
                self.locks.remove(&id);
                self.count(node, inc, -1, -1);
            }
            Queue::Converting => {
                self.unplace(&key, id);
                self.revert(id);
                self.place(&key, id, Queue::Granted);
                self.count(node, inc, 0, -1);
            }
        }
        out.push(Effect::Completion { node, lock_id: id, client_ref, result: CompletionResult::Canceled });
        self.grant_pending(&key, out);
        self.drop_if_idle(&key);
        Ok(true)
    }

    /// Adjust a member's lock and pending counters (only for its current incarnation).
    pub(super) fn count(&mut self, node: NodeId, inc: u64, locks: isize, pending: isize) {
        if let Some(m) = self.members.get_mut(&node) {
            if m.inc == inc {
                m.locks = m.locks.saturating_add_signed(locks);
                m.pending = m.pending.saturating_add_signed(pending);
            }
        }
    }

    pub(super) fn place(&mut self, key: &[u8], id: LockId, q: Queue) {
        if let Some(r) = self.resources.get_mut(key) {
            r.queue_mut(q).push(id);
        }
        if let Some(l) = self.locks.get_mut(&id) {
            l.queue = q;
        }
    }

    /// Take a lock off whichever queue it is on.
    pub(super) fn unplace(&mut self, key: &[u8], id: LockId) {
        let Some(q) = self.locks.get(&id).map(|l| l.queue) else { return };
        if let Some(r) = self.resources.get_mut(key) {
            let v = r.queue_mut(q);
            if let Some(pos) = v.iter().position(|x| *x == id) {
                v.remove(pos);
            }
        }
    }

    /// A conversion that will not happen: back to the granted mode.
    pub(super) fn revert(&mut self, id: LockId) {
        if let Some(l) = self.locks.get_mut(&id) {
            if let Some(g) = l.gr {
                l.rq = g;
            }
            l.pending_lvb = None;
        }
    }

    pub(super) fn demote(&mut self, id: LockId) {
        if let Some(l) = self.locks.get_mut(&id) {
            l.gr = Some(Mode::NL);
        }
    }

    pub(super) fn write_lvb(&mut self, key: &Arc<[u8]>, data: &[u8], out: &mut Vec<Effect>) {
        if let Some(r) = self.resources.get_mut(key) {
            r.lvb.data = data.to_vec();
            r.lvb.seq += 1;
            r.lvb.valid = true;
            out.push(Effect::Persist(Record::Lvb(key.clone(), r.lvb.clone())));
        }
    }

    pub(super) fn drop_if_idle(&mut self, key: &[u8]) {
        if self.resources.get(key).is_some_and(|r| r.is_idle()) {
            self.resources.remove(key);
        }
    }

    /// Grant `id` in `mode` (its queue placement is the caller's job): LVB read or
    /// write, a fresh fencing token, BAST de-duplication reset.
    pub(super) fn grant(&mut self, id: LockId, mode: Mode, out: &mut Vec<Effect>) -> Grant {
        let token = self.alloc_token();
        let generation = self.generation;
        let Some(l) = self.locks.get_mut(&id) else {
            return Grant {
                lock_id: id,
                mode,
                lvb: None,
                lvb_valid: false,
                lvb_seq: 0,
                fence_token: token,
                generation,
            };
        };
        let from = l.gr;
        let valblk = l.flags & flags::VALBLK != 0;
        let pending_lvb = l.pending_lvb.take();
        l.gr = Some(mode);
        l.rq = mode;
        l.highbast = None;
        l.fence_token = token;
        let key = l.resource.clone();
        let mut lvb = None;
        if valblk {
            match Mode::lvb_op(from, mode) {
                super::mode::LvbOp::Read => lvb = self.resources.get(&key).map(|r| r.lvb.data.clone()),
                super::mode::LvbOp::Write => self.write_lvb(&key, pending_lvb.as_deref().unwrap_or(&[]), out),
                super::mode::LvbOp::None => {}
            }
        }
        let (lvb_valid, lvb_seq) = self.resources.get(&key).map(|r| (r.lvb.valid, r.lvb.seq)).unwrap_or((true, 0));
        Grant { lock_id: id, mode, lvb, lvb_valid, lvb_seq, fence_token: token, generation }
    }

    /// Is `node`'s recovery at NEEDS_REPLAY (fenced, journal not yet replayed)?
    pub(super) fn needs_replay(&self, node: NodeId, inc: u64) -> bool {
        self.recoveries.get(&node).is_some_and(|r| r.state == RecoveryState::NeedsReplay && r.inc == inc)
    }

    /// Is the owner of a lock alive (so it gets callbacks)?
    pub(super) fn owner_active(&self, l: &Lock) -> bool {
        self.members.get(&l.node).is_some_and(|m| m.state == MemberState::Active && m.inc == l.inc)
    }
}

fn pending_limit(node: NodeId, pending: usize, limit: usize) -> Error {
    Error::ResourceExhausted(format!(
        "node {node} already has {pending} queued requests (limit {limit}); this one would have to wait"
    ))
}

fn validate_flags(f: u32) -> Result<()> {
    if f & !flags::ALL != 0 {
        return Err(Error::InvalidArgument(format!("unknown flag bits {:#x}", f & !flags::ALL)));
    }
    if f & flags::NOQUEUEBAST != 0 && f & flags::NOQUEUE == 0 {
        return Err(Error::InvalidArgument("NOQUEUEBAST needs NOQUEUE".into()));
    }
    if f & (flags::QUECVT | flags::CONVDEADLK) != 0 && f & flags::CONVERT == 0 {
        return Err(Error::InvalidArgument("QUECVT and CONVDEADLK are conversion flags (need CONVERT)".into()));
    }
    if f & flags::ALTPR != 0 && f & flags::ALTCW != 0 {
        return Err(Error::InvalidArgument("ALTPR and ALTCW are exclusive".into()));
    }
    Ok(())
}
