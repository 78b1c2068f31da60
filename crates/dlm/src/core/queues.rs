//! Grant, convert and wait queues: the VMS / Linux DLM rules (`fs/dlm/lock.c`:
//! `_can_be_granted`, `can_be_granted`, `conversion_deadlock_detect`,
//! `grant_pending_locks`, `send_blocking_asts`), quoted by rule number of the VMS
//! manual where the kernel does.
//!
//! * 6-3: a conversion is granted at once ("in place") if its mode is compatible
//!   with every other held lock, granted or converting, unless QUECVT asks it to
//!   queue behind earlier conversions.
//! * 6-3: once queued, conversions are granted strictly in order.
//! * 6-4: a new request is granted at once only if both queues are empty and it
//!   is compatible; once queued it waits for all conversions and every earlier
//!   new request.
//! * A conversion deadlock (the granted mode of a converting lock blocks the
//!   requested mode of one ahead of it, or two block each other) is refused with
//!   EDEADLK, or with CONVDEADLK the converter is demoted to NL.
//! * ALTPR/ALTCW: when the requested mode cannot be granted, the alternative is tried.
//!
//! mcfs additions: locks of a node whose recovery is at NEEDS_REPLAY are ignored
//! by NOEXP requests (which are ordered only among themselves), and nothing but
//! reclaims and down-conversions is granted during the restart grace window or
//! while a recovery whose lock set was lost in a restart is unfinished.

use super::lockspace::{Lockspace, Queue};
use super::mode::{flags, Mode};
use super::recovery::RecoveryState;
use super::{CompletionResult, Effect, LockId};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Decision {
    Grant(Mode),
    Wait,
    Deadlock,
    /// CONVDEADLK: demote the converter to NL and try again.
    Demote,
}

impl Lockspace {
    /// Does some other held lock on the resource conflict with `mode` for `id`?
    fn conflicts(&self, key: &[u8], id: LockId, mode: Mode) -> bool {
        let (Some(r), Some(lk)) = (self.resources.get(key), self.locks.get(&id)) else { return true };
        let noexp = lk.flags & flags::NOEXP != 0;
        r.granted.iter().chain(r.converting.iter()).any(|&o| {
            if o == id {
                return false;
            }
            let Some(ol) = self.locks.get(&o) else { return false };
            let held = ol.gr.unwrap_or(Mode::NL);
            !(held.compatible(mode) || noexp && self.needs_replay(ol.node, ol.inc))
        })
    }

    /// Lockspace-wide reasons to hold back every grant but down-conversions.
    fn lockspace_blocks(&self, id: LockId, mode: Mode) -> bool {
        let Some(lk) = self.locks.get(&id) else { return true };
        if lk.gr.is_some_and(|g| g.is_weakening_to(mode)) {
            return false;
        }
        if self.grace {
            return true;
        }
        let noexp = lk.flags & flags::NOEXP != 0;
        self.recoveries.values().any(|r| {
            !r.locks_known
                && r.state != RecoveryState::Released
                && !(noexp && r.state == RecoveryState::NeedsReplay)
        })
    }

    /// `_can_be_granted` for `mode`. `now`: the request is being made (not yet on
    /// a queue) rather than re-examined from its queue.
    fn can_be_granted_in(&self, key: &[u8], id: LockId, mode: Mode, now: bool) -> bool {
        if self.lockspace_blocks(id, mode) || self.conflicts(key, id, mode) {
            return false;
        }
        let (Some(r), Some(lk)) = (self.resources.get(key), self.locks.get(&id)) else { return false };
        let conv = lk.gr.is_some();
        let noexp = lk.flags & flags::NOEXP != 0;
        // NOEXP requests (recovery) are ordered only among themselves: they must
        // not wait behind requests that wait for the dead node.
        let counts = |o: &LockId| !noexp || self.locks.get(o).is_some_and(|l| l.flags & flags::NOEXP != 0);
        let first_of = |q: &Vec<LockId>| q.iter().find(|o| counts(o)).copied();
        if conv {
            if now {
                // 6-3 in place; QUECVT forces FIFO behind earlier conversions.
                return lk.flags & flags::QUECVT == 0 || first_of(&r.converting).is_none();
            }
            return first_of(&r.converting) == Some(id);
        }
        if first_of(&r.converting).is_some() {
            return false;
        }
        if now {
            first_of(&r.waiting).is_none()
        } else {
            first_of(&r.waiting) == Some(id)
        }
    }

    /// `conversion_deadlock_detect`: the converter's granted mode blocks the
    /// requested mode of a conversion ahead of it, or it and one behind it
    /// block each other.
    fn conversion_deadlock(&self, key: &[u8], id: LockId) -> bool {
        let (Some(r), Some(lk)) = (self.resources.get(key), self.locks.get(&id)) else { return false };
        let Some(gr) = lk.gr else { return false };
        let mut behind = false;
        for &o in &r.converting {
            if o == id {
                behind = true;
                continue;
            }
            let Some(ol) = self.locks.get(&o) else { continue };
            let ogr = ol.gr.unwrap_or(Mode::NL);
            if !behind {
                if !gr.compatible(ol.rq) {
                    return true;
                }
            } else if !gr.compatible(ol.rq) && !ogr.compatible(lk.rq) {
                return true;
            }
        }
        false
    }

    /// `can_be_granted`: the requested mode, deadlock detection, then ALTPR/ALTCW.
    pub(super) fn decide(&self, key: &[u8], id: LockId, now: bool) -> Decision {
        let Some(lk) = self.locks.get(&id) else { return Decision::Wait };
        let (rq, f, conv) = (lk.rq, lk.flags, lk.gr.is_some());
        if self.can_be_granted_in(key, id, rq, now) {
            return Decision::Grant(rq);
        }
        if conv && f & flags::NOQUEUE == 0 && self.conversion_deadlock(key, id) {
            return if f & flags::CONVDEADLK != 0 { Decision::Demote } else { Decision::Deadlock };
        }
        let alt = if rq != Mode::PR && f & flags::ALTPR != 0 {
            Some(Mode::PR)
        } else if rq != Mode::CW && f & flags::ALTCW != 0 {
            Some(Mode::CW)
        } else {
            None
        };
        match alt {
            Some(m) if self.can_be_granted_in(key, id, m, now) => Decision::Grant(m),
            _ => Decision::Wait,
        }
    }

    /// Move a queued lock to the granted queue and tell its owner.
    fn grant_queued(&mut self, key: &Arc<[u8]>, id: LockId, mode: Mode, out: &mut Vec<Effect>) {
        self.unplace(key, id);
        let g = self.grant(id, mode, out);
        self.place(key, id, Queue::Granted);
        let Some(l) = self.locks.get(&id) else { return };
        let (node, inc, client_ref) = (l.node, l.inc, l.client_ref);
        let active = self.owner_active(l);
        self.count(node, inc, 0, -1);
        if active {
            out.push(Effect::Completion { node, lock_id: id, client_ref, result: CompletionResult::Granted(g) });
        }
    }

    /// `grant_pending_convert`: serve the convert queue in order, restarting after
    /// each grant. Returns the highest mode still waiting and whether CW waits.
    pub(super) fn grant_pending_convert(&mut self, key: &Arc<[u8]>, out: &mut Vec<Effect>) -> (Option<Mode>, bool) {
        let mut quit = false;
        loop {
            let (mut hi, mut cw) = (None, false);
            let mut restart = false;
            let mut demote_restart = false;
            let queue = match self.resources.get(&**key) {
                Some(r) => r.converting.clone(),
                None => return (None, false),
            };
            for id in queue {
                match self.decide(key, id, false) {
                    Decision::Grant(m) => {
                        self.grant_queued(key, id, m, out);
                        restart = true;
                    }
                    Decision::Demote => {
                        self.demote(id);
                        demote_restart = true;
                    }
                    Decision::Deadlock => {
                        // Found only at request time in practice; the kernel logs
                        // and leaves it queued, so do we (a cancel resolves it).
                        tracing::warn!(lockspace = %self.name, lock = id, "pending conversion deadlock");
                    }
                    Decision::Wait => {
                        if let Some(l) = self.locks.get(&id) {
                            hi = hi.max(Some(l.rq));
                            cw |= l.rq == Mode::CW;
                        }
                    }
                }
            }
            if restart {
                continue;
            }
            if demote_restart && !quit {
                quit = true;
                continue;
            }
            return (hi, cw);
        }
    }

    /// `grant_pending_locks`: conversions, then new requests, then blocking
    /// callbacks to holders for the highest mode still waiting.
    pub(super) fn grant_pending(&mut self, key: &Arc<[u8]>, out: &mut Vec<Effect>) {
        let Some(r) = self.resources.get(&**key) else { return };
        if r.converting.is_empty() && r.waiting.is_empty() {
            return;
        }
        let (mut hi, mut cw) = self.grant_pending_convert(key, out);
        let waiting = self.resources.get(&**key).map(|r| r.waiting.clone()).unwrap_or_default();
        for id in waiting {
            match self.decide(key, id, false) {
                Decision::Grant(m) => self.grant_queued(key, id, m, out),
                _ => {
                    if let Some(l) = self.locks.get(&id) {
                        hi = hi.max(Some(l.rq));
                        cw |= l.rq == Mode::CW;
                    }
                }
            }
        }
        let Some(high) = hi else { return };
        let granted = self.resources.get(&**key).map(|r| r.granted.clone()).unwrap_or_default();
        for gid in granted {
            let Some(g) = self.locks.get(&gid) else { continue };
            let gm = g.gr.unwrap_or(Mode::NL);
            if !self.owner_active(g) {
                continue;
            }
            let Some(mode) = bast_mode(gm, g.highbast, high, cw) else { continue };
            out.push(Effect::Blocking { node: g.node, lock_id: gid, resource: key.clone(), mode });
            if let Some(g) = self.locks.get_mut(&gid) {
                g.highbast = Some(mode);
            }
        }
    }

    /// `send_blocking_asts` (granted queue) / `send_blocking_asts_all` (also the
    /// convert queue, for NOQUEUEBAST) on behalf of request `id`.
    pub(super) fn send_blocking_asts(&mut self, key: &Arc<[u8]>, id: LockId, all: bool, out: &mut Vec<Effect>) {
        let Some(rq) = self.locks.get(&id).map(|l| l.rq) else { return };
        let Some(r) = self.resources.get(&**key) else { return };
        let mut targets: Vec<LockId> = r.granted.clone();
        if all {
            targets.extend(r.converting.iter().copied());
        }
        for gid in targets {
            if gid == id {
                continue;
            }
            let Some(g) = self.locks.get(&gid) else { continue };
            let gm = g.gr.unwrap_or(Mode::NL);
            if !self.owner_active(g) {
                continue;
            }
            let Some(mode) = bast_mode(gm, g.highbast, rq, false) else { continue };
            out.push(Effect::Blocking { node: g.node, lock_id: gid, resource: key.clone(), mode });
            if let Some(g) = self.locks.get_mut(&gid) {
                g.highbast = Some(mode);
            }
        }
    }

    /// Re-examine every resource with something queued (after a lockspace-wide
    /// change: grace over, a recovery advanced, a barrier lifted).
    pub(super) fn grant_pending_all(&mut self, out: &mut Vec<Effect>) {
        let keys: Vec<Arc<[u8]>> = self
            .resources
            .iter()
            .filter(|(_, r)| !r.converting.is_empty() || !r.waiting.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.grant_pending(&k, out);
        }
    }
}

/// `modes_require_bast` / `lock_requires_bast`: the mode to name in a blocking
/// callback to a holder in `gr` (last callback `highbast`) when `high` is the
/// highest mode waiting (`cw`: a CW waits too), or None when no callback is due.
/// PR and CW block each other although neither is "higher", hence the special
/// case. Unlike the kernel, the special case is de-duplicated too: a holder is
/// never told twice in a row about the same waiting mode.
fn bast_mode(gr: Mode, highbast: Option<Mode>, high: Mode, cw: bool) -> Option<Mode> {
    let send = if cw && high == Mode::PR && gr == Mode::PR { Mode::CW } else { high };
    if (gr == Mode::PR && send == Mode::CW) || (gr == Mode::CW && send == Mode::PR) {
        return (highbast < Some(Mode::EX) && highbast != Some(send)).then_some(send);
    }
    (highbast < Some(send) && !gr.compatible(send)).then_some(send)
}
