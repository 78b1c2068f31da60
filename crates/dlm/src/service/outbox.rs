//! Per-session event queue and the task that feeds it to the Events stream.
//!
//! Events are pushed under the lockspace mutex (so their order is the order of
//! the state changes) and never block: a client that stops reading makes its
//! queue grow instead of stalling the server. Past a soft bound for longer than
//! `evict_after`, or past a hard bound at once, the reaper evicts the session
//! (which fails the node: a client that does not read its callbacks cannot be
//! trusted to give locks back).
//!
//! Each event carries the store sequence number that must be durable before it
//! is delivered, so no client learns of a state change (a membership change, a
//! recovery step, an LVB write) that a crash could still undo.

use mcfs_proto::dlm::{event::Kind, Event, SessionClosed};
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

pub struct Outbox {
    q: Mutex<Q>,
    notify: Notify,
    soft: usize,
    hard: usize,
}

struct Q {
    events: VecDeque<(u64, Event)>,
    closed: Option<String>,
    over_since: Option<Instant>,
    overflow: bool,
}

/// What the forwarder took from the queue.
pub struct Batch {
    pub events: Vec<(u64, Event)>,
    /// The session ended: deliver `events`, then a SessionClosed with this reason.
    pub closed: Option<String>,
}

impl Outbox {
    pub fn new(soft: usize, hard: usize) -> Outbox {
        Outbox {
            q: Mutex::new(Q { events: VecDeque::new(), closed: None, over_since: None, overflow: false }),
            notify: Notify::new(),
            soft,
            hard: hard.max(soft),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Q> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every operation is a single push/drain), so poisoning is ignored.
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue an event that may be delivered once the store has flushed `need`.
    pub fn push(&self, need: u64, kind: Kind) {
        {
            let mut q = self.lock();
            if q.closed.is_some() || q.overflow {
                return;
            }
            q.events.push_back((need, Event { kind: Some(kind) }));
            let len = q.events.len();
            if len > self.soft && q.over_since.is_none() {
                q.over_since = Some(Instant::now());
            }
            if len > self.hard {
                // Dropping events would corrupt the client's view; it is evicted instead.
                q.overflow = true;
                q.events.clear();
            }
        }
        self.notify.notify_one();
    }

    pub fn close(&self, reason: &str) {
        {
            let mut q = self.lock();
            if q.closed.is_none() {
                q.closed = Some(reason.to_string());
            }
        }
        self.notify.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Has the client fallen too far behind? (`now` from the reaper.)
    pub fn overdue(&self, now: Instant, evict_after: std::time::Duration) -> Option<String> {
        let q = self.lock();
        if q.overflow {
            return Some(format!("more than {} undelivered events: the client does not read its stream", self.hard));
        }
        match q.over_since {
            Some(t) if now.duration_since(t) >= evict_after => Some(format!(
                "more than {} undelivered events for {:?}: the client does not read its stream",
                self.soft, evict_after
            )),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take everything queued, or wait for something to take.
    pub async fn next_batch(&self) -> Batch {
        loop {
            {
                let mut q = self.lock();
                if !q.events.is_empty() || q.closed.is_some() || q.overflow {
                    let events: Vec<_> = q.events.drain(..).collect();
                    q.over_since = None;
                    let closed = q.closed.clone().or_else(|| q.overflow.then(|| "event queue overflow".to_string()));
                    return Batch { events, closed };
                }
            }
            self.notify.notified().await;
        }
    }
}

pub fn closed_event(reason: &str) -> Event {
    Event { kind: Some(Kind::Closed(SessionClosed { reason: reason.to_string() })) }
}
