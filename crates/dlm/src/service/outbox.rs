//! Per-session event queue and the task that feeds it to the Events stream.
//!
//! Events are pushed under the lockspace mutex (so their order is the order of
//! the state changes) and never block: a client that stops reading makes its
//! queue grow instead of stalling the server. A client that does not read its
//! callbacks cannot be trusted to give locks back, so it is evicted (which
//! fails the node) when any of these holds (`overdue`, checked by the reaper):
//!
//! 1. more than `hard` events are undelivered: at once;
//! 2. `soft` or more have been undelivered for `evict_after`;
//! 3. an event has waited `evict_after` without being taken by a stream (the
//!    session never attached its Events stream);
//! 4. events handed to the stream `evict_after` ago are still not confirmed:
//!    each heartbeat carries `events_received`, the number of events the client
//!    took off its stream. Transport buffers (the channel, HTTP/2 windows,
//!    sockets) can swallow thousands of events sent to a client that never
//!    reads, so "the server could send" proves nothing; only the client's
//!    count does. The reaper samples the sent count every tick
//!    (`checkpoint`); the check compares the client's count with the sample
//!    taken `evict_after` ago.
//!
//! From `soft` undelivered events on, the session's own Ops stream is not read
//! (`wait_room`), so a client that pipelines requests without reading the
//! replies is slowed by HTTP/2 flow control rather than growing the queue.
//!
//! Each event carries the store sequence number that must be durable before it
//! is delivered, so no client learns of a state change (a membership change, a
//! recovery step, an LVB write) that a crash could still undo.

use mcfs_proto::dlm::{event::Kind, Event, SessionClosed};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

pub struct Outbox {
    q: Mutex<Q>,
    notify: Notify,
    /// Woken when the backlog falls below `soft` (or the session ends).
    room: Notify,
    soft: usize,
    hard: usize,
    /// Events ever pushed / handed to the stream / confirmed by the client.
    pushed: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    /// Mirrors `over_since.is_some()`, so the forwarder's hot path needs no lock.
    over: AtomicBool,
}

struct Q {
    events: VecDeque<(u64, Event)>,
    closed: Option<String>,
    over_since: Option<Instant>,
    /// When the oldest event not yet taken by the forwarder was pushed.
    oldest_untaken: Option<Instant>,
    overflow: bool,
    /// (when, sent count then), oldest first; see `checkpoint`.
    samples: VecDeque<(Instant, u64)>,
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
            q: Mutex::new(Q {
                events: VecDeque::new(),
                closed: None,
                over_since: None,
                oldest_untaken: None,
                overflow: false,
                samples: VecDeque::new(),
            }),
            notify: Notify::new(),
            room: Notify::new(),
            soft,
            hard: hard.max(soft),
            pushed: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            over: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Q> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every operation is a single push/drain), so poisoning is ignored.
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Events pushed but not yet handed to the stream.
    pub fn backlog(&self) -> u64 {
        self.pushed.load(Ordering::Acquire).saturating_sub(self.sent.load(Ordering::Acquire))
    }

    /// (pushed, sent, confirmed by the client).
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.pushed.load(Ordering::Relaxed), self.sent.load(Ordering::Relaxed), self.acked.load(Ordering::Relaxed))
    }

    /// Queue an event that may be delivered once the store has flushed `need`.
    pub fn push(&self, need: u64, kind: Kind) {
        {
            let mut q = self.lock();
            if q.closed.is_some() || q.overflow {
                return;
            }
            q.events.push_back((need, Event { kind: Some(kind) }));
            let now = Instant::now();
            if q.oldest_untaken.is_none() {
                q.oldest_untaken = Some(now);
            }
            let backlog = self.pushed.fetch_add(1, Ordering::AcqRel) + 1 - self.sent.load(Ordering::Acquire);
            if backlog >= self.soft as u64 && q.over_since.is_none() {
                q.over_since = Some(now);
                self.over.store(true, Ordering::Release);
            }
            if backlog > self.hard as u64 {
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
        self.room.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        let q = self.lock();
        q.closed.is_some() || q.overflow
    }

    /// The forwarder handed one event to the stream.
    pub fn sent_one(&self) {
        let sent = self.sent.fetch_add(1, Ordering::AcqRel) + 1;
        if !self.over.load(Ordering::Acquire) {
            return;
        }
        let backlog = self.pushed.load(Ordering::Acquire).saturating_sub(sent);
        if backlog < self.soft as u64 {
            {
                let mut q = self.lock();
                q.over_since = None;
                self.over.store(false, Ordering::Release);
            }
            self.room.notify_waiters();
        }
    }

    /// The client says it has taken `n` events off its stream.
    pub fn confirm(&self, n: u64) {
        // Never more than was sent: a client cannot pre-confirm events.
        let n = n.min(self.sent.load(Ordering::Acquire));
        self.acked.fetch_max(n, Ordering::AcqRel);
    }

    /// Wait while the backlog is at or over the soft bound (Ops back-pressure).
    pub async fn wait_room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.backlog() < self.soft as u64 || self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Record the sent count now (the reaper calls this every tick); samples
    /// older than needed for `evict_after` are dropped.
    pub fn checkpoint(&self, now: Instant, evict_after: Duration) {
        let sent = self.sent.load(Ordering::Acquire);
        let mut q = self.lock();
        if q.samples.back().is_none_or(|(_, s)| *s != sent) {
            q.samples.push_back((now, sent));
        }
        // Keep the newest sample at least `evict_after` old, and all newer ones.
        while q.samples.len() >= 2 && now.saturating_duration_since(q.samples[1].0) >= evict_after {
            q.samples.pop_front();
        }
    }

    /// Has the client fallen too far behind? (`now` from the reaper.)
    pub fn overdue(&self, now: Instant, evict_after: Duration) -> Option<String> {
        let q = self.lock();
        if q.overflow {
            return Some(format!("more than {} undelivered events: the client does not read its stream", self.hard));
        }
        if let Some(t) = q.over_since {
            if now.saturating_duration_since(t) >= evict_after {
                return Some(format!(
                    "{} or more undelivered events for {:?}: the client does not read its stream",
                    self.soft, evict_after
                ));
            }
        }
        if let Some(t) = q.oldest_untaken {
            if now.saturating_duration_since(t) >= evict_after {
                return Some(format!(
                    "events waited {evict_after:?} for an Events stream: the session never attached one"
                ));
            }
        }
        if let Some((t, sent_then)) = q.samples.front() {
            let acked = self.acked.load(Ordering::Acquire);
            if now.saturating_duration_since(*t) >= evict_after && acked < *sent_then {
                return Some(format!(
                    "{} events sent more than {evict_after:?} ago are not confirmed (it confirmed {acked}): \
                     the client does not read its stream",
                    sent_then - acked
                ));
            }
        }
        None
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
                    q.oldest_untaken = None;
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

#[cfg(test)]
mod tests {
    use super::*;
    use mcfs_proto::dlm::Blocking;

    fn ev() -> Kind {
        Kind::Blocking(Blocking { lock_id: 1, resource: vec![], mode: 0 })
    }

    #[tokio::test(start_paused = true)]
    async fn unconfirmed_events_evict_after_the_window() {
        let w = Duration::from_secs(10);
        let o = Outbox::new(100, 1000);
        o.push(0, ev());
        let b = o.next_batch().await;
        assert_eq!(b.events.len(), 1);
        o.sent_one();
        let t0 = Instant::now();
        o.checkpoint(t0, w);
        assert_eq!(o.overdue(t0 + Duration::from_secs(9), w), None);
        o.checkpoint(t0 + Duration::from_secs(9), w);
        // Not confirmed 10 s later: evicted.
        let why = o.overdue(t0 + w, w).unwrap_or_default();
        assert!(why.contains("not confirmed"), "{why}");
        // Confirmed: fine. A client cannot confirm more than was sent.
        o.confirm(5);
        assert_eq!(o.counts(), (1, 1, 1));
        assert_eq!(o.overdue(t0 + w, w), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_without_a_stream_is_evicted_and_ops_wait_for_room() {
        let w = Duration::from_secs(1);
        let o = std::sync::Arc::new(Outbox::new(2, 100));
        o.push(0, ev());
        let t0 = Instant::now();
        assert_eq!(o.overdue(t0, w), None);
        assert!(o.overdue(t0 + w, w).unwrap_or_default().contains("never attached"));
        o.push(0, ev());
        assert_eq!(o.backlog(), 2);
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.wait_room().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "backlog at the soft bound: Ops must wait");
        let b = o.next_batch().await;
        for _ in b.events {
            o.sent_one();
        }
        tokio::time::timeout(Duration::from_secs(1), waiter).await.ok();
        assert_eq!(o.backlog(), 0);
        assert_eq!(o.overdue(t0 + w * 5, w), None, "taken by a stream");
    }

    #[test]
    fn overflow_past_the_hard_bound() {
        let o = Outbox::new(1, 3);
        for _ in 0..4 {
            o.push(0, ev());
        }
        assert!(o.is_closed());
        assert!(o.overdue(Instant::now(), Duration::from_secs(1)).unwrap_or_default().contains("more than 3"));
    }
}
