//! Exhaustive tests of the core: every mode pair and conversion, queue order,
//! cancel, conversion deadlock, callbacks, LVBs, tokens, failure and recovery.

use super::recovery::{FenceOutcome, Saved};
use super::*;
use crate::error::Error;
use Mode::*;

struct T {
    ls: Lockspace,
    fx: Vec<Effect>,
}

impl T {
    fn new(nodes: &[NodeId]) -> T {
        let mut t = T { ls: Lockspace::new("c:fs", 1, Limits::default()), fx: Vec::new() };
        for &n in nodes {
            t.ls.join(n, "", &mut t.fx).unwrap();
        }
        t.fx.clear();
        t
    }

    fn req(&mut self, node: NodeId, res: &str, mode: Mode, flags: u32) -> Result<LockOutcome, Error> {
        self.fx.clear();
        let r = LockReq { resource: res.as_bytes(), mode: Some(mode), flags, client_ref: 7, ..Default::default() };
        self.ls.request(node, &r, &mut self.fx)
    }

    fn lock(&mut self, node: NodeId, res: &str, mode: Mode) -> LockOutcome {
        self.req(node, res, mode, 0).unwrap()
    }

    fn granted(&mut self, node: NodeId, res: &str, mode: Mode) -> LockId {
        match self.lock(node, res, mode) {
            LockOutcome::Granted(g) => g.lock_id,
            o => panic!("{node} {res} {mode}: expected a grant, got {o:?}"),
        }
    }

    fn conv(&mut self, node: NodeId, id: LockId, mode: Mode, flags: u32) -> Result<LockOutcome, Error> {
        self.fx.clear();
        let r = LockReq { mode: Some(mode), flags: flags | flags::CONVERT, lock_id: id, client_ref: 9, ..Default::default() };
        self.ls.request(node, &r, &mut self.fx)
    }

    fn unlock(&mut self, node: NodeId, id: LockId) {
        self.fx.clear();
        self.ls.unlock(node, id, None, 0, &mut self.fx).unwrap();
    }

    fn completions(&self) -> Vec<(NodeId, LockId, CompletionResult)> {
        self.fx
            .iter()
            .filter_map(|e| match e {
                Effect::Completion { node, lock_id, result, .. } => Some((*node, *lock_id, result.clone())),
                _ => None,
            })
            .collect()
    }

    fn granted_ids(&self) -> Vec<LockId> {
        self.completions()
            .into_iter()
            .filter_map(|(_, id, r)| matches!(r, CompletionResult::Granted(_)).then_some(id))
            .collect()
    }

    fn basts(&self) -> Vec<(NodeId, LockId, Mode)> {
        self.fx
            .iter()
            .filter_map(|e| match e {
                Effect::Blocking { node, lock_id, mode, .. } => Some((*node, *lock_id, *mode)),
                _ => None,
            })
            .collect()
    }

    fn mode_of(&self, id: LockId) -> Option<Mode> {
        self.ls.lock(id).and_then(|l| l.gr)
    }

    fn fail(&mut self, node: NodeId) -> (String, u64) {
        self.fx.clear();
        self.ls.node_failed(node, 1000, "test", &mut self.fx);
        self.fx
            .iter()
            .find_map(|e| match e {
                Effect::Fence { request_id, failure_generation, .. } => Some((request_id.clone(), *failure_generation)),
                _ => None,
            })
            .expect("a fence request")
    }

    fn fenced(&mut self, node: NodeId, gen: u64) {
        self.fx.clear();
        self.ls.fence_result(node, gen, FenceOutcome::Success { fence_time_ms: 2000 }, &mut self.fx);
    }

    fn rec_state(&self, node: NodeId) -> Option<RecoveryState> {
        self.ls.recoveries().find(|r| r.node == node).map(|r| r.state)
    }

    /// Safety invariant: all held modes on every resource pairwise compatible,
    /// except locks a NOEXP holder was allowed to ignore.
    fn check(&self) {
        for (name, r) in self.ls.resources() {
            let held: Vec<&Lock> =
                r.granted.iter().chain(r.converting.iter()).map(|id| self.ls.lock(*id).unwrap()).collect();
            for (i, a) in held.iter().enumerate() {
                for b in &held[i + 1..] {
                    let (ga, gb) = (a.gr.unwrap(), b.gr.unwrap());
                    let excused = (a.flags | b.flags) & flags::NOEXP != 0;
                    assert!(ga.compatible(gb) || excused, "{name:?}: {} {ga} and {} {gb} held together", a.id, b.id);
                }
            }
        }
    }
}

#[test]
fn every_mode_pair_new_request() {
    for held in Mode::ALL {
        for want in Mode::ALL {
            let mut t = T::new(&[1, 2]);
            let a = t.granted(1, "r", held);
            let o = t.lock(2, "r", want);
            if held.compatible(want) {
                assert!(matches!(o, LockOutcome::Granted(ref g) if g.mode == want), "{held}/{want}: {o:?}");
                assert!(t.basts().is_empty());
            } else {
                let LockOutcome::Queued(b) = o else { panic!("{held}/{want}: {o:?}") };
                assert_eq!(t.basts(), vec![(1, a, want)], "{held}/{want}");
                t.unlock(1, a);
                assert_eq!(t.granted_ids(), vec![b], "{held}/{want}");
                assert_eq!(t.mode_of(b), Some(want));
            }
            t.check();
        }
    }
}

#[test]
fn every_conversion_alone_and_against_a_holder() {
    for from in Mode::ALL {
        for to in Mode::ALL {
            // Alone: always granted in place.
            let mut t = T::new(&[1, 2]);
            let a = t.granted(1, "r", from);
            let o = t.conv(1, a, to, 0).unwrap();
            assert!(matches!(o, LockOutcome::Granted(ref g) if g.mode == to), "{from}->{to}: {o:?}");
            for other in Mode::ALL.into_iter().filter(|o| o.compatible(from)) {
                let mut t = T::new(&[1, 2]);
                let a = t.granted(1, "r", from);
                let b = t.granted(2, "r", other);
                let o = t.conv(1, a, to, 0).unwrap();
                if other.compatible(to) {
                    assert!(matches!(o, LockOutcome::Granted(_)), "{from}->{to} vs {other}: {o:?}");
                    assert_eq!(t.mode_of(a), Some(to));
                } else {
                    assert_eq!(o, LockOutcome::Queued(a), "{from}->{to} vs {other}");
                    assert_eq!(t.mode_of(a), Some(from), "keeps its granted mode while converting");
                    assert_eq!(t.basts(), vec![(2, b, to)]);
                    t.check();
                    t.unlock(2, b);
                    assert_eq!(t.granted_ids(), vec![a]);
                    assert_eq!(t.mode_of(a), Some(to));
                }
                t.check();
            }
        }
    }
}

#[test]
fn new_requests_wait_in_fifo_order_even_when_compatible() {
    let mut t = T::new(&[1, 2, 3, 4]);
    let a = t.granted(1, "r", PR);
    let LockOutcome::Queued(b) = t.lock(2, "r", EX) else { panic!() };
    // 6-4: PR is compatible with the holder but must queue behind the EX waiter.
    let LockOutcome::Queued(c) = t.lock(3, "r", PR) else { panic!() };
    let LockOutcome::Queued(d) = t.lock(4, "r", CR) else { panic!() };
    t.unlock(1, a);
    assert_eq!(t.granted_ids(), vec![b]);
    t.unlock(2, b);
    assert_eq!(t.granted_ids(), vec![c, d]);
    t.check();
}

#[test]
fn conversions_are_served_before_new_requests_and_in_order() {
    let mut t = T::new(&[1, 2, 3, 4]);
    let a = t.granted(1, "r", CR);
    let b = t.granted(2, "r", CR);
    let x = t.granted(3, "r", PR);
    assert_eq!(t.conv(1, a, PW, 0).unwrap(), LockOutcome::Queued(a));
    let LockOutcome::Queued(w) = t.lock(4, "r", CR) else { panic!("new request must wait behind a conversion") };
    assert_eq!(t.conv(2, b, PR, 0).unwrap(), LockOutcome::Granted(t.ls_grant_of(b)), "in-place conversion");
    t.unlock(3, x);
    // b (PR) blocks a's PW: still waiting, and the new CR waits behind the conversion.
    assert!(t.granted_ids().is_empty());
    t.unlock(2, b);
    assert_eq!(t.granted_ids(), vec![a, w]);
    t.check();
}

impl T {
    fn ls_grant_of(&self, id: LockId) -> Grant {
        let l = self.ls.lock(id).unwrap();
        Grant {
            lock_id: id,
            mode: l.gr.unwrap(),
            lvb: None,
            lvb_valid: true,
            lvb_seq: 0,
            fence_token: l.fence_token,
            generation: self.ls.generation(),
        }
    }
}

#[test]
fn quecvt_queues_behind_earlier_conversions() {
    let mut t = T::new(&[1, 2, 3]);
    let a = t.granted(1, "r", NL);
    let b = t.granted(2, "r", NL);
    let c = t.granted(3, "r", PR);
    assert_eq!(t.conv(1, a, EX, 0).unwrap(), LockOutcome::Queued(a));
    // Compatible with every held mode, but QUECVT puts it behind a.
    assert_eq!(t.conv(2, b, CR, flags::QUECVT).unwrap(), LockOutcome::Queued(b));
    // Without QUECVT the same conversion happens in place.
    assert!(matches!(t.conv(3, c, CR, 0).unwrap(), LockOutcome::Granted(_)));
    t.unlock(3, c);
    assert_eq!(t.granted_ids(), vec![a]);
    t.unlock(1, a);
    assert_eq!(t.granted_ids(), vec![b]);
    // QUECVT on a down-conversion is refused.
    assert!(matches!(t.conv(2, b, NL, flags::QUECVT), Err(Error::InvalidArgument(_))));
}

#[test]
fn cancel_of_queued_request_conversion_and_granted_lock() {
    let mut t = T::new(&[1, 2, 3]);
    let a = t.granted(1, "r", PR);
    let LockOutcome::Queued(b) = t.lock(2, "r", EX) else { panic!() };
    let LockOutcome::Queued(c) = t.lock(3, "r", PR) else { panic!() };
    t.fx.clear();
    assert!(t.ls.cancel(2, b, &mut t.fx).unwrap());
    let comps = t.completions();
    assert_eq!(comps[0], (2, b, CompletionResult::Canceled));
    // Cancelling the head of the queue lets the compatible request behind it through.
    assert_eq!(t.granted_ids(), vec![c]);
    assert!(t.ls.lock(b).is_none());
    assert!(matches!(t.ls.cancel(2, b, &mut t.fx), Err(Error::FailedPrecondition(_))));
    // A queued conversion: cancel restores the granted mode.
    assert_eq!(t.conv(1, a, EX, 0).unwrap(), LockOutcome::Queued(a));
    t.fx.clear();
    assert!(t.ls.cancel(1, a, &mut t.fx).unwrap());
    assert_eq!(t.mode_of(a), Some(PR));
    assert_eq!(t.ls.lock(a).unwrap().queue, Queue::Granted);
    // Nothing pending: false, nothing changes.
    t.fx.clear();
    assert!(!t.ls.cancel(1, a, &mut t.fx).unwrap());
    assert!(t.fx.is_empty());
    t.check();
}

#[test]
fn conversion_deadlock_is_refused_or_demoted() {
    // Two PR holders both want EX.
    let mut t = T::new(&[1, 2]);
    let a = t.granted(1, "r", PR);
    let b = t.granted(2, "r", PR);
    assert_eq!(t.conv(1, a, EX, 0).unwrap(), LockOutcome::Queued(a));
    assert_eq!(t.conv(2, b, EX, 0).unwrap(), LockOutcome::Deadlock(b));
    assert_eq!(t.mode_of(b), Some(PR), "keeps PR after EDEADLK");
    t.unlock(2, b);
    assert_eq!(t.granted_ids(), vec![a]);

    // With CONVDEADLK the second is demoted to NL, the first gets EX, the second queues.
    let mut t = T::new(&[1, 2]);
    let a = t.granted(1, "r", PR);
    let b = t.granted(2, "r", PR);
    t.conv(1, a, EX, 0).unwrap();
    assert_eq!(t.conv(2, b, EX, flags::CONVDEADLK).unwrap(), LockOutcome::Queued(b));
    assert_eq!(t.granted_ids(), vec![a]);
    assert_eq!(t.mode_of(a), Some(EX));
    assert_eq!(t.mode_of(b), Some(NL));
    t.check();
    t.unlock(1, a);
    assert_eq!(t.granted_ids(), vec![b]);
    assert_eq!(t.mode_of(b), Some(EX));

    // NL->EX ahead, PR->PW behind: PR blocks the EX ahead.
    let mut t = T::new(&[1, 2, 3]);
    let a = t.granted(1, "r", NL);
    let b = t.granted(2, "r", PR);
    let _c = t.granted(3, "r", PR);
    t.conv(1, a, EX, 0).unwrap();
    assert_eq!(t.conv(2, b, PW, 0).unwrap(), LockOutcome::Deadlock(b));
    // NOQUEUE never reports deadlock, only would-block.
    assert_eq!(t.conv(2, b, PW, flags::NOQUEUE).unwrap(), LockOutcome::WouldBlock(b));
}

#[test]
fn blocking_callbacks_are_not_repeated_for_the_same_mode() {
    let mut t = T::new(&[1, 2, 3, 4]);
    let a = t.granted(1, "r", EX);
    t.lock(2, "r", PR);
    assert_eq!(t.basts(), vec![(1, a, PR)]);
    t.lock(3, "r", PR);
    assert!(t.basts().is_empty(), "same mode again: no second callback");
    t.lock(4, "r", EX);
    assert_eq!(t.basts(), vec![(1, a, EX)], "a higher mode is news");
    // After a grant (mode change) callbacks start afresh.
    t.conv(1, a, PR, 0).unwrap();
    // 2 and 3 are granted PR; 4's EX still waits and now blocks them all.
    assert_eq!(t.granted_ids().len(), 2);
    let mut b = t.basts();
    b.sort();
    assert_eq!(b.len(), 3, "{b:?}");
    assert!(b.iter().all(|x| x.2 == EX));
    t.check();
}

#[test]
fn pr_and_cw_callbacks() {
    let mut t = T::new(&[1, 2]);
    let a = t.granted(1, "r", PR);
    t.lock(2, "r", CW);
    assert_eq!(t.basts(), vec![(1, a, CW)]);
    let mut t = T::new(&[1, 2]);
    let a = t.granted(1, "r", CW);
    t.lock(2, "r", PR);
    assert_eq!(t.basts(), vec![(1, a, PR)]);
}

#[test]
fn noqueue_and_noqueuebast() {
    let mut t = T::new(&[1, 2]);
    let a = t.granted(1, "r", EX);
    let o = t.req(2, "r", PR, flags::NOQUEUE).unwrap();
    let LockOutcome::WouldBlock(id) = o else { panic!("{o:?}") };
    assert!(t.ls.lock(id).is_none(), "a refused request leaves nothing behind");
    assert!(t.basts().is_empty());
    t.req(2, "r", PR, flags::NOQUEUE | flags::NOQUEUEBAST).unwrap();
    assert_eq!(t.basts(), vec![(1, a, PR)]);
    assert!(matches!(t.req(2, "r", PR, flags::NOQUEUEBAST), Err(Error::InvalidArgument(_))));
    assert_eq!(t.ls.member(2).unwrap().locks, 0);
}

#[test]
fn altpr_altcw() {
    let mut t = T::new(&[1, 2, 3]);
    t.granted(1, "r", PR);
    let o = t.req(2, "r", EX, flags::ALTPR).unwrap();
    assert!(matches!(o, LockOutcome::Granted(ref g) if g.mode == PR), "{o:?}");
    let mut t = T::new(&[1, 2]);
    t.granted(1, "r", CW);
    let o = t.req(2, "r", PW, flags::ALTCW).unwrap();
    assert!(matches!(o, LockOutcome::Granted(ref g) if g.mode == CW), "{o:?}");
    assert!(matches!(t.req(2, "r", PW, flags::ALTCW | flags::ALTPR), Err(Error::InvalidArgument(_))));
}

#[test]
fn lvb_read_write_and_sequence() {
    let mut t = T::new(&[1, 2]);
    let a = match t.req(1, "r", EX, flags::VALBLK).unwrap() {
        LockOutcome::Granted(g) => {
            assert_eq!(g.lvb, Some(vec![]));
            assert_eq!((g.lvb_seq, g.lvb_valid), (0, true));
            g.lock_id
        }
        o => panic!("{o:?}"),
    };
    t.fx.clear();
    t.ls.unlock(1, a, Some(b"v1"), flags::VALBLK, &mut t.fx).unwrap();
    assert!(t.fx.iter().any(|e| matches!(e, Effect::Persist(Record::Lvb(_, l)) if l.data == b"v1" && l.seq == 1)));
    let LockOutcome::Granted(g) = t.req(2, "r", PR, flags::VALBLK).unwrap() else { panic!() };
    assert_eq!((g.lvb.as_deref(), g.lvb_seq), (Some(&b"v1"[..]), 1));
    // Unlock from PR does not write.
    t.fx.clear();
    t.ls.unlock(2, g.lock_id, Some(b"zz"), flags::VALBLK, &mut t.fx).unwrap();
    assert!(t.fx.is_empty());
    // Down-conversion from EX with VALBLK writes the LVB it carries.
    let LockOutcome::Granted(g) = t.req(1, "r", EX, flags::VALBLK).unwrap() else { panic!() };
    t.fx.clear();
    let r = LockReq { mode: Some(PR), flags: flags::CONVERT | flags::VALBLK, lock_id: g.lock_id, lvb: Some(b"v2"), ..Default::default() };
    t.ls.request(1, &r, &mut t.fx).unwrap();
    let LockOutcome::Granted(g2) = t.req(2, "r", PR, flags::VALBLK).unwrap() else { panic!() };
    assert_eq!((g2.lvb.as_deref(), g2.lvb_seq), (Some(&b"v2"[..]), 2));
    // Too long.
    let big = [0u8; 65];
    assert!(matches!(t.ls.unlock(2, g2.lock_id, Some(&big), flags::VALBLK, &mut t.fx), Err(Error::InvalidArgument(_))));
}

#[test]
fn lvb_invalidated_when_a_pw_or_ex_holder_dies() {
    let mut t = T::new(&[1, 2]);
    t.granted(1, "x", EX);
    t.granted(1, "journal/1", EX);
    t.granted(1, "y", PR);
    t.fx.clear();
    t.ls.set_session_info(1, 1, "", &mut t.fx).unwrap();
    let (_, gen) = t.fail(1);
    t.fenced(1, gen);
    t.req(2, "journal/1", EX, flags::NOEXP).unwrap();
    t.fx.clear();
    t.ls.recovery_done(2, 1, 1, &mut t.fx).unwrap();
    assert!(!t.ls.resource(b"x").unwrap().lvb.valid);
    assert!(t.ls.resource(b"y").is_none_or(|r| r.lvb.valid));
    let LockOutcome::Granted(g) = t.req(2, "x", PR, flags::VALBLK).unwrap() else { panic!() };
    assert!(!g.lvb_valid);
    // A new write makes it valid again.
    t.fx.clear();
    t.conv(2, g.lock_id, EX, 0).unwrap();
    t.ls.unlock(2, g.lock_id, Some(b"new"), flags::VALBLK, &mut t.fx).unwrap();
    assert!(t.ls.resource(b"x").unwrap().lvb.valid);
}

#[test]
fn fence_tokens_are_monotonic() {
    let mut t = T::new(&[1, 2]);
    let mut last = 0;
    for i in 0..50 {
        let node = 1 + (i % 2);
        let LockOutcome::Granted(g) = t.lock(node, "r", EX) else { panic!() };
        assert!(g.fence_token > last);
        last = g.fence_token;
        t.unlock(node, g.lock_id);
    }
    // A restarted server (next epoch) continues above.
    let mut fx = vec![];
    let mut ls2 = Lockspace::new("c:fs", 2, Limits::default());
    ls2.join(1, "", &mut fx).unwrap();
    let r = LockReq { resource: b"r", mode: Some(EX), ..Default::default() };
    let LockOutcome::Granted(g) = ls2.request(1, &r, &mut fx).unwrap() else { panic!() };
    assert!(g.fence_token > last);
}

#[test]
fn precise_errors() {
    let mut t = T::new(&[1, 2]);
    let a = t.granted(1, "r", EX);
    t.unlock(1, a);
    let e = t.ls.unlock(1, a, None, 0, &mut t.fx).unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(ref m) if m.contains("no longer exists")), "{e}");
    assert!(matches!(t.ls.unlock(1, 0xdead_beef_0000_0000, None, 0, &mut t.fx), Err(Error::NotFound(_))));
    let b = t.granted(2, "r", EX);
    assert!(matches!(t.ls.unlock(1, b, None, 0, &mut t.fx), Err(Error::NotFound(_))), "not yours");
    assert!(matches!(t.conv(1, b, NL, 0), Err(Error::NotFound(_))));
    let LockOutcome::Queued(c) = t.lock(1, "r", EX) else { panic!() };
    assert!(matches!(t.conv(1, c, PR, 0), Err(Error::FailedPrecondition(_))), "not granted");
    assert!(matches!(t.ls.unlock(1, c, None, 0, &mut t.fx), Err(Error::FailedPrecondition(_))));
    let d = t.granted(2, "s", PR);
    t.granted(1, "s", PR);
    t.conv(2, d, EX, 0).unwrap();
    assert!(matches!(t.conv(2, d, PW, 0), Err(Error::FailedPrecondition(_))), "conversion already pending");
    assert!(matches!(t.ls.unlock(2, d, None, 0, &mut t.fx), Err(Error::FailedPrecondition(_))));
    assert!(matches!(t.req(1, "", EX, 0), Err(Error::InvalidArgument(_))));
    assert!(matches!(t.req(1, &"x".repeat(65), EX, 0), Err(Error::InvalidArgument(_))));
    assert!(t.req(1, &"x".repeat(64), EX, 0).is_ok());
    assert!(matches!(t.req(1, "r", EX, 1 << 20), Err(Error::InvalidArgument(_))));
    assert!(matches!(t.req(1, "r", EX, flags::QUECVT), Err(Error::InvalidArgument(_))));
    let r = LockReq { resource: b"r", mode: None, ..Default::default() };
    assert!(matches!(t.ls.request(1, &r, &mut t.fx), Err(Error::InvalidArgument(_))));
    assert!(matches!(t.req(9, "r", EX, 0), Err(Error::FailedPrecondition(_))), "not a member");
}

#[test]
fn limits_per_node() {
    let mut t = T::new(&[1, 2]);
    t.ls.limits = Limits { max_locks_per_node: 3, max_pending_per_node: 1 };
    t.granted(1, "a", EX);
    t.granted(1, "b", EX);
    t.lock(2, "a", EX);
    assert!(matches!(t.req(2, "b", EX, 0), Err(Error::ResourceExhausted(_))), "pending limit");
    assert!(t.ls.resource(b"b").is_some_and(|r| r.waiting.is_empty()), "the refused request left nothing");
    // A request that needs no queue is not limited by the queued ones.
    let free = t.granted(2, "free", EX);
    assert_eq!(t.ls.member(2).map(|m| (m.locks, m.pending)), Some((2, 1)));
    // Nor is a conversion granted in place; one that would wait is refused
    // and keeps its mode.
    assert!(matches!(t.conv(2, free, PR, 0), Ok(LockOutcome::Granted(_))));
    let sh1 = t.granted(1, "shared", PR);
    assert!(matches!(t.conv(2, free, EX, 0), Ok(LockOutcome::Granted(_))), "nobody else on free");
    let sh2 = t.granted(2, "shared", PR);
    assert!(matches!(t.conv(2, sh2, EX, 0), Err(Error::ResourceExhausted(_))));
    assert_eq!(t.ls.lock(sh2).map(|l| (l.gr, l.rq, l.queue)), Some((Some(PR), PR, Queue::Granted)));
    assert!(matches!(t.req(1, "d", EX, 0), Err(Error::ResourceExhausted(_))), "lock limit");
    assert!(matches!(t.conv(1, sh1, EX, 0), Ok(LockOutcome::Queued(_))), "node 1 has room to wait");
}

#[test]
fn failure_keeps_locks_held_and_others_carry_on() {
    let mut t = T::new(&[1, 2, 3]);
    t.granted(1, "held", EX);
    t.granted(1, "shared", PR);
    let conv = t.granted(1, "c", PR);
    t.granted(3, "c", PR);
    assert_eq!(t.conv(1, conv, EX, 0).unwrap(), LockOutcome::Queued(conv), "pending conversion at the failure");
    let mut fx = vec![];
    t.ls.set_session_info(1, 4, "", &mut fx).unwrap();
    let x = t.granted(3, "busy", EX);
    let LockOutcome::Queued(w) = t.lock(1, "busy", PR) else { panic!() };
    let (rid, gen) = t.fail(1);
    assert_eq!(rid, format!("c:fs/1/{gen}"));
    assert_eq!(t.rec_state(1), Some(RecoveryState::Fencing));
    assert!(t.ls.lock(w).is_none(), "queued request of the dead node dropped");
    // Its pending conversion fell back to PR and stays held.
    let conv = t.ls.locks().find(|l| l.node == 1 && &*l.resource == b"c").unwrap();
    assert_eq!((conv.gr, conv.rq, conv.queue), (Some(PR), PR, Queue::Granted));
    // Conflicting requests wait, compatible and unrelated ones are granted.
    let LockOutcome::Queued(q) = t.lock(2, "held", PR) else { panic!() };
    assert!(t.basts().is_empty(), "no callbacks to a dead node");
    assert!(matches!(t.lock(2, "shared", PR), LockOutcome::Granted(_)));
    assert!(matches!(t.lock(2, "free", EX), LockOutcome::Granted(_)));
    t.unlock(3, x);
    // The dead node can't do anything any more.
    assert!(matches!(t.req(1, "z", EX, 0), Err(Error::FailedPrecondition(_))));
    // Fencing, then release: the waiter is granted.
    t.fenced(1, gen);
    assert_eq!(t.rec_state(1), Some(RecoveryState::NeedsReplay));
    assert!(t.granted_ids().is_empty());
    t.req(2, "journal/4", EX, flags::NOEXP).unwrap();
    t.fx.clear();
    t.ls.recovery_done(2, 1, 4, &mut t.fx).unwrap();
    assert_eq!(t.rec_state(1), Some(RecoveryState::Released));
    assert_eq!(t.granted_ids(), vec![q]);
    assert_eq!(t.ls.member(1).unwrap().state, MemberState::Fenced);
    t.check();
}

#[test]
fn noexp_takes_the_dead_nodes_journal_lock_after_fencing_only() {
    let mut t = T::new(&[1, 2, 3]);
    t.fx.clear();
    t.ls.set_session_info(1, 0, "", &mut t.fx).unwrap();
    t.granted(1, "journal/0", EX);
    t.granted(1, "inode/5", EX);
    let (_, gen) = t.fail(1);
    // Before fencing, NOEXP waits like everyone.
    let LockOutcome::Queued(j) = t.req(2, "journal/0", EX, flags::NOEXP).unwrap() else { panic!() };
    let LockOutcome::Queued(i) = t.lock(3, "inode/5", PR) else { panic!() };
    // Replay must not be reported before fencing.
    assert!(matches!(t.ls.recovery_done(2, 1, 0, &mut t.fx), Err(Error::FailedPrecondition(_))));
    t.fenced(1, gen);
    assert_eq!(t.granted_ids(), vec![j], "NOEXP granted while the dead node's locks are still held");
    assert_eq!(t.mode_of(j), Some(EX));
    // Without the journal lock, node 3 may not report.
    assert!(matches!(t.ls.recovery_done(3, 1, 0, &mut t.fx), Err(Error::FailedPrecondition(_))));
    assert!(matches!(t.ls.recovery_done(2, 1, 4, &mut t.fx), Err(Error::InvalidArgument(_))));
    // A second survivor's NOEXP request waits behind the first survivor's lock.
    let LockOutcome::Queued(_) = t.req(3, "journal/0", EX, flags::NOEXP).unwrap() else { panic!() };
    t.fx.clear();
    t.ls.recovery_done(2, 1, 0, &mut t.fx).unwrap();
    assert_eq!(t.granted_ids(), vec![i]);
    assert!(t.fx.iter().any(|e| matches!(e, Effect::Recovery(r) if r.state == RecoveryState::Released)));
    t.check();
}

#[test]
fn fence_failures_and_stale_successes_are_retried() {
    let mut t = T::new(&[1, 2]);
    let (rid, gen) = t.fail(1);
    t.fx.clear();
    t.ls.fence_result(1, gen, FenceOutcome::Failed("agent error".into()), &mut t.fx);
    let next = t.fx.iter().find_map(|e| match e {
        Effect::Fence { request_id, .. } => Some(request_id.clone()),
        _ => None,
    });
    assert_eq!(next, Some(format!("{rid}/retry1")));
    assert_eq!(t.rec_state(1), Some(RecoveryState::Fencing));
    // Fenced before it failed: not a fence of this failure.
    t.fx.clear();
    t.ls.fence_result(1, gen, FenceOutcome::Success { fence_time_ms: 999 }, &mut t.fx);
    assert_eq!(t.rec_state(1), Some(RecoveryState::Fencing));
    assert!(t.fx.iter().any(|e| matches!(e, Effect::Fence { request_id, .. } if request_id.ends_with("retry2"))));
    // A stale answer for another generation is ignored.
    t.fx.clear();
    t.ls.fence_result(1, gen + 7, FenceOutcome::Success { fence_time_ms: 5000 }, &mut t.fx);
    assert!(t.fx.is_empty());
    // Journal -1: fenced means released at once.
    t.fenced(1, gen);
    assert_eq!(t.rec_state(1), Some(RecoveryState::Released));
}

#[test]
fn rejoin_rules_and_unfence() {
    let mut t = T::new(&[1, 2]);
    let mut fx = vec![];
    assert!(matches!(t.ls.join(2, "", &mut fx), Err(Error::AlreadyExists(_))));
    assert!(matches!(t.ls.join(0, "", &mut fx), Err(Error::InvalidArgument(_))));
    assert!(matches!(t.ls.join(256, "", &mut fx), Err(Error::InvalidArgument(_))));
    let (_, gen) = t.fail(1);
    assert!(matches!(t.ls.join(1, "", &mut fx), Err(Error::FailedPrecondition(_))));
    assert!(matches!(t.ls.unfence(1, &mut fx), Err(Error::FailedPrecondition(_))), "not replayed yet");
    t.fenced(1, gen); // journal -1: released
    assert!(matches!(t.ls.join(1, "", &mut fx), Err(Error::FailedPrecondition(_))), "fenced");
    t.ls.unfence(1, &mut fx).unwrap();
    t.ls.join(1, "", &mut fx).unwrap();
    assert!(matches!(t.ls.unfence(2, &mut fx), Err(Error::FailedPrecondition(_))));
}

#[test]
fn whole_cluster_loss_unfence_before_replay() {
    let mut t = T::new(&[1, 2]);
    let mut fx = vec![];
    t.ls.set_session_info(1, 0, "", &mut fx).unwrap();
    t.ls.set_session_info(2, 1, "", &mut fx).unwrap();
    let old = t.granted(1, "inode/9", EX);
    let (_, g1) = t.fail(1);
    let (_, g2) = t.fail(2);
    t.fenced(1, g1);
    t.fenced(2, g2);
    // Nobody left to replay: node 1 may come back early and replay both journals.
    t.ls.unfence(1, &mut fx).unwrap();
    t.ls.join(1, "", &mut fx).unwrap();
    assert!(matches!(t.lock(1, "inode/9", PR), LockOutcome::Queued(_)), "old incarnation's EX still held");
    t.req(1, "journal/0", EX, flags::NOEXP).unwrap();
    t.req(1, "journal/1", EX, flags::NOEXP).unwrap();
    t.fx.clear();
    t.ls.recovery_done(1, 1, 0, &mut t.fx).unwrap();
    assert!(t.ls.lock(old).is_none());
    assert_eq!(t.granted_ids().len(), 1, "new incarnation's request granted");
    assert_eq!(t.ls.member(1).unwrap().state, MemberState::Active, "new incarnation untouched");
    t.ls.recovery_done(1, 2, 1, &mut fx).unwrap();
    t.check();
}

#[test]
fn restart_grace_reclaim_and_barrier() {
    // Before the "crash".
    let mut t = T::new(&[1, 2, 3]);
    let mut recs = vec![];
    let mut fx = vec![];
    t.ls.set_session_info(3, 2, "", &mut fx).unwrap();
    let a = t.granted(1, "inode/1", EX);
    let b = t.granted(2, "inode/2", PR);
    let members: Vec<Member> = t.ls.members().cloned().collect();
    recs.extend(t.ls.recoveries().cloned());
    // Restart with epoch 2.
    let mut fx = vec![];
    let mut ls = Lockspace::restore("c:fs", 2, Limits::default(), Saved { generation: t.ls.generation(), members, recoveries: recs, lvbs: vec![] }, &mut fx);
    assert!(ls.in_grace());
    assert!(fx.is_empty());
    ls.join(1, "", &mut fx).unwrap();
    assert!(ls.reclaim(1, &[(a, b"inode/1", Some(EX))], &mut fx).is_empty());
    // A conflicting or duplicate reclaim is refused.
    ls.join(2, "", &mut fx).unwrap();
    let refused = ls.reclaim(2, &[(b, b"inode/2", Some(PR)), (a, b"inode/1", Some(EX)), (999, b"inode/1", Some(PR))], &mut fx);
    assert_eq!(refused, vec![a, 999]);
    // New requests wait during grace, even uncontended ones.
    let r = LockReq { resource: b"other", mode: Some(EX), ..Default::default() };
    let LockOutcome::Queued(w) = ls.request(2, &r, &mut fx).unwrap() else { panic!() };
    // Node 3 never comes back: grace ends, it is failed with unknown locks.
    fx.clear();
    ls.end_grace(5000, &mut fx);
    assert!(!ls.in_grace());
    assert_eq!(ls.member(3).unwrap().state, MemberState::Failed);
    let gen = fx
        .iter()
        .find_map(|e| match e {
            Effect::Fence { node: 3, failure_generation, .. } => Some(*failure_generation),
            _ => None,
        })
        .unwrap();
    assert!(!fx.iter().any(|e| matches!(e, Effect::Completion { lock_id, .. } if *lock_id == w)), "barrier");
    // Reclaiming after the window is refused.
    assert_eq!(ls.reclaim(2, &[(5, b"z", Some(NL))], &mut fx), vec![5]);
    fx.clear();
    ls.fence_result(3, gen, FenceOutcome::Success { fence_time_ms: 6000 }, &mut fx);
    // NOEXP goes through the barrier once the node is fenced.
    let r = LockReq { resource: b"journal/2", mode: Some(EX), flags: flags::NOEXP, ..Default::default() };
    assert!(matches!(ls.request(1, &r, &mut fx).unwrap(), LockOutcome::Granted(_)));
    fx.clear();
    ls.recovery_done(1, 3, 2, &mut fx).unwrap();
    assert!(fx.iter().any(|e| matches!(e, Effect::Completion { lock_id, .. } if *lock_id == w)));
    // A recovery at FENCING when the server stops is resumed with the same request id.
    let rec = ls.recoveries().next().unwrap().clone();
    let mut pending = rec.clone();
    pending.state = RecoveryState::Fencing;
    let mut fx = vec![];
    let ls3 = Lockspace::restore("c:fs", 3, Limits::default(), Saved { generation: 10, recoveries: vec![pending.clone()], ..Default::default() }, &mut fx);
    assert_eq!(
        fx,
        vec![Effect::Fence {
            node: 3,
            request_id: pending.fence_request_id("c:fs"),
            failed_at_ms: pending.failed_at_ms,
            failure_generation: pending.generation
        }]
    );
    assert!(!ls3.in_grace());
}

#[test]
fn the_last_member_back_reclaims_before_grace_ends() {
    let mut t = T::new(&[1, 2]);
    let a = t.granted(1, "a", EX);
    let b = t.granted(2, "b", EX);
    let members: Vec<Member> = t.ls.members().cloned().collect();
    let mut fx = vec![];
    let saved = Saved { generation: t.ls.generation(), members, recoveries: vec![], lvbs: vec![] };
    let mut ls = Lockspace::restore("c:fs", 2, Limits::default(), saved, &mut fx);
    ls.join(1, "", &mut fx).unwrap();
    assert!(ls.reclaim(1, &[(a, b"a", Some(EX))], &mut fx).is_empty());
    // Node 1 wants b meanwhile: it waits (grace).
    let r = LockReq { resource: b"b", mode: Some(EX), ..Default::default() };
    let LockOutcome::Queued(w) = ls.request(1, &r, &mut fx).unwrap() else { panic!() };
    // Node 2, the last one expected, comes back: its reclaim is accepted and
    // only then does grace end; node 1's request keeps waiting behind it.
    fx.clear();
    ls.join(2, "", &mut fx).unwrap();
    assert!(ls.in_grace(), "not before the reclaim");
    assert!(ls.reclaim(2, &[(b, b"b", Some(EX))], &mut fx).is_empty());
    assert!(!ls.in_grace());
    assert!(!fx.iter().any(|e| matches!(e, Effect::Completion { lock_id, .. } if *lock_id == w)));
    assert_eq!(ls.lock(w).map(|l| l.queue), Some(Queue::Waiting));
    // With nothing to reclaim, the (empty) reclaim still ends grace.
    let members: Vec<Member> = ls.members().cloned().collect();
    let mut ls2 = Lockspace::restore("c:fs", 3, Limits::default(), Saved { members, ..Default::default() }, &mut fx);
    ls2.join(1, "", &mut fx).unwrap();
    ls2.reclaim(1, &[], &mut fx);
    assert!(ls2.in_grace(), "node 2 is still expected");
    ls2.join(2, "", &mut fx).unwrap();
    ls2.reclaim(2, &[], &mut fx);
    assert!(!ls2.in_grace());
}

#[test]
fn leave_releases_everything_without_recovery() {
    let mut t = T::new(&[1, 2]);
    t.granted(1, "r", EX);
    let LockOutcome::Queued(w) = t.lock(2, "r", EX) else { panic!() };
    t.fx.clear();
    t.ls.leave(1, &mut t.fx).unwrap();
    assert_eq!(t.granted_ids(), vec![w]);
    assert!(t.ls.member(1).is_none());
    assert!(t.ls.recoveries().next().is_none());
    let mut fx = vec![];
    t.ls.join(1, "", &mut fx).unwrap();
}
