//! Randomized test of the core against a simple reference model.
//!
//! The model is rebuilt only from what the core *tells* its clients (replies,
//! completions): which locks exist and in which mode they are granted. After
//! every step we check that
//! * the model agrees with the core's own queues (no grant was lost or invented);
//! * no two incompatible modes are held on a resource at once;
//! * no request waits without a reason: the head of the convert queue, or (when
//!   there is none) the head of the wait queue, conflicts with a held lock;
//! * at the end, releasing every holder (and recovering failed nodes) grants
//!   every waiter before the resource empties.

use super::recovery::FenceOutcome;
use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

#[derive(Clone, Debug)]
enum Op {
    Lock { node: NodeId, res: u8, mode: u8, flags: u32 },
    Convert { pick: usize, mode: u8, flags: u32 },
    Unlock { pick: usize },
    Cancel { pick: usize },
    Fail { node: NodeId },
    Fence { node: NodeId },
}

fn op() -> impl Strategy<Value = Op> {
    let lock_flags = prop::sample::select(vec![0, 0, 0, flags::NOQUEUE, flags::ALTPR, flags::ALTCW, flags::VALBLK]);
    let conv_flags =
        prop::sample::select(vec![0, 0, flags::NOQUEUE, flags::QUECVT, flags::CONVDEADLK, flags::ALTPR, flags::VALBLK]);
    prop_oneof![
        6 => (1u32..=4, 0u8..3, 0u8..6, lock_flags).prop_map(|(node, res, mode, flags)| Op::Lock { node, res, mode, flags }),
        3 => (any::<usize>(), 0u8..6, conv_flags).prop_map(|(pick, mode, flags)| Op::Convert { pick, mode, flags }),
        5 => any::<usize>().prop_map(|pick| Op::Unlock { pick }),
        2 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => (1u32..=4).prop_map(|node| Op::Fail { node }),
        1 => (1u32..=4).prop_map(|node| Op::Fence { node }),
    ]
}

/// What the clients were told about one lock.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    node: NodeId,
    granted: Option<Mode>,
    pending: bool,
    /// A CONVDEADLK conversion is pending: the lock may have been demoted to NL
    /// (the caller learns its mode from the completion, as with the kernel's
    /// DEMOTED status).
    may_demote: bool,
}

struct Harness {
    ls: Lockspace,
    seen: HashMap<LockId, Seen>,
    fx: Vec<Effect>,
    fence_gen: HashMap<NodeId, u64>,
}

impl Harness {
    fn new() -> Harness {
        let mut ls = Lockspace::new("m:fs", 1, Limits::default());
        let mut fx = vec![];
        for n in 1..=4 {
            ls.join(n, "", &mut fx).unwrap();
        }
        Harness { ls, seen: HashMap::new(), fx: vec![], fence_gen: HashMap::new() }
    }

    fn ids(&self) -> Vec<LockId> {
        let mut v: Vec<LockId> = self.seen.keys().copied().collect();
        v.sort();
        v
    }

    fn absorb(&mut self) {
        for e in std::mem::take(&mut self.fx) {
            match e {
                Effect::Completion { lock_id, result, node, .. } => {
                    let s = self.seen.get_mut(&lock_id).expect("completion for an unknown lock");
                    assert_eq!(s.node, node);
                    assert!(s.pending, "completion for a lock with nothing pending");
                    s.pending = false;
                    s.may_demote = false;
                    match result {
                        CompletionResult::Granted(g) => s.granted = Some(g.mode),
                        CompletionResult::Canceled => {
                            if s.granted.is_none() {
                                self.seen.remove(&lock_id);
                            }
                        }
                        CompletionResult::Deadlock => {}
                    }
                }
                Effect::Fence { node, failure_generation, .. } => {
                    self.fence_gen.insert(node, failure_generation);
                }
                Effect::Blocking { lock_id, node, .. } => {
                    let s = self.seen.get(&lock_id).expect("callback for an unknown lock");
                    assert_eq!(s.node, node);
                    assert!(s.granted.is_some(), "callback for a lock that is not held");
                }
                _ => {}
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        let ids = self.ids();
        let pick = |p: usize| (!ids.is_empty()).then(|| ids[p % ids.len()]);
        match *op {
            Op::Lock { node, res, mode, flags } => {
                let name = [b'r', b'0' + res];
                let r = LockReq { resource: &name, mode: Mode::from_u8(mode), flags, ..Default::default() };
                if let Ok(o) = self.ls.request(node, &r, &mut self.fx) {
                    match o {
                        LockOutcome::Granted(g) => {
                            self.seen.insert(g.lock_id, Seen { node, granted: Some(g.mode), pending: false, may_demote: false });
                        }
                        LockOutcome::Queued(id) => {
                            self.seen.insert(id, Seen { node, granted: None, pending: true, may_demote: false });
                        }
                        LockOutcome::WouldBlock(_) | LockOutcome::Deadlock(_) => {}
                    }
                }
            }
            Op::Convert { pick: p, mode, flags: f } => {
                let Some(id) = pick(p) else { return };
                let node = self.seen[&id].node;
                let r = LockReq { mode: Mode::from_u8(mode), flags: f | flags::CONVERT, lock_id: id, ..Default::default() };
                if let Ok(o) = self.ls.request(node, &r, &mut self.fx) {
                    let s = self.seen.get_mut(&id).unwrap();
                    match o {
                        LockOutcome::Granted(g) => s.granted = Some(g.mode),
                        LockOutcome::Queued(_) => {
                            s.pending = true;
                            s.may_demote = f & flags::CONVDEADLK != 0;
                            if s.may_demote {
                                // Demotion can happen before the reply, too.
                                s.granted = self.ls.lock(id).and_then(|l| l.gr);
                            }
                        }
                        LockOutcome::WouldBlock(_) | LockOutcome::Deadlock(_) => {}
                    }
                }
            }
            Op::Unlock { pick: p } => {
                let Some(id) = pick(p) else { return };
                let node = self.seen[&id].node;
                if self.ls.unlock(node, id, None, 0, &mut self.fx).is_ok() {
                    self.seen.remove(&id);
                }
            }
            Op::Cancel { pick: p } => {
                let Some(id) = pick(p) else { return };
                let node = self.seen[&id].node;
                let _ = self.ls.cancel(node, id, &mut self.fx);
            }
            Op::Fail { node } => {
                if self.ls.member(node).is_some_and(|m| m.state == MemberState::Active) {
                    self.ls.node_failed(node, 10, "model", &mut self.fx);
                    // Its queued requests vanished without a completion.
                    let gone: Vec<LockId> =
                        self.seen.iter().filter(|(_, s)| s.node == node && s.granted.is_none()).map(|(id, _)| *id).collect();
                    for id in gone {
                        self.seen.remove(&id);
                    }
                    for s in self.seen.values_mut().filter(|s| s.node == node) {
                        s.pending = false;
                    }
                }
            }
            Op::Fence { node } => {
                if let Some(g) = self.fence_gen.remove(&node) {
                    self.ls.fence_result(node, g, FenceOutcome::Success { fence_time_ms: 20 }, &mut self.fx);
                    // Journal -1: released at once; its locks are gone.
                    self.seen.retain(|_, s| s.node != node);
                    let mut fx = vec![];
                    self.ls.unfence(node, &mut fx).unwrap();
                    self.ls.join(node, "", &mut fx).unwrap();
                    self.fx.extend(fx);
                }
            }
        }
        self.absorb();
        self.check();
    }

    fn check(&self) {
        // The model and the core agree on every lock.
        assert_eq!(self.seen.len(), self.ls.locks().count(), "lock sets differ");
        for l in self.ls.locks() {
            let s = self.seen.get(&l.id).unwrap_or_else(|| panic!("core has lock {} the clients never heard of", l.id));
            if s.may_demote && l.gr == Some(Mode::NL) {
                // demoted while its CONVDEADLK conversion waits
            } else {
                assert_eq!(s.granted, l.gr, "lock {}", l.id);
            }
            assert_eq!(s.pending, l.queue != Queue::Granted, "lock {}", l.id);
        }
        for (name, r) in self.ls.resources() {
            let held: Vec<&Lock> = r.granted.iter().chain(&r.converting).map(|i| self.ls.lock(*i).unwrap()).collect();
            for (i, a) in held.iter().enumerate() {
                for b in &held[i + 1..] {
                    assert!(a.gr.unwrap().compatible(b.gr.unwrap()), "{name:?}: incompatible holders {a:?} {b:?}");
                }
            }
            let blocked = |id: LockId| {
                let me = self.ls.lock(id).unwrap();
                let modes = [Some(me.rq), alt(me)];
                modes.iter().flatten().all(|m| held.iter().any(|h| h.id != id && !h.gr.unwrap().compatible(*m)))
            };
            if let Some(&c) = r.converting.first() {
                assert!(blocked(c), "{name:?}: head conversion {c} waits for nothing");
            } else if let Some(&w) = r.waiting.first() {
                assert!(blocked(w), "{name:?}: head waiter {w} waits for nothing");
            }
        }
    }

    /// Release holders one by one until every lock is gone; every waiter must
    /// have been granted on the way.
    fn drain(&mut self) {
        for node in 1..=4 {
            if let Some(g) = self.fence_gen.remove(&node) {
                self.ls.fence_result(node, g, FenceOutcome::Success { fence_time_ms: 20 }, &mut self.fx);
                self.seen.retain(|_, s| s.node != node);
                self.absorb();
                self.check();
            }
        }
        for _ in 0..10_000 {
            let next = self.ids().into_iter().find(|id| {
                let s = &self.seen[id];
                s.granted.is_some() && !s.pending
            });
            let Some(id) = next else { break };
            let node = self.seen[&id].node;
            self.ls.unlock(node, id, None, 0, &mut self.fx).unwrap();
            self.seen.remove(&id);
            self.absorb();
            self.check();
        }
        assert!(self.seen.is_empty(), "waiters never granted: {:?}", self.seen);
        assert_eq!(self.ls.locks().count(), 0);
    }
}

fn alt(l: &Lock) -> Option<Mode> {
    if l.flags & flags::ALTPR != 0 && l.rq != Mode::PR {
        Some(Mode::PR)
    } else if l.flags & flags::ALTCW != 0 && l.rq != Mode::CW {
        Some(Mode::CW)
    } else {
        None
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_keep_the_invariants(ops in prop::collection::vec(op(), 1..150)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        h.drain();
    }
}
