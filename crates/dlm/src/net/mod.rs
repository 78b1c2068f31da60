//! Network plumbing shared by the mcfs daemons (mcfs-dlm, mcfs-fenced, and any
//! later daemon that wants it): what sits between a TCP port and a service.
//!
//! * [`listener`]: the accept loop in front of a tonic server. It bounds the
//!   number of open connections and drops a connection that does not start with
//!   the HTTP/2 client preface within a deadline (garbage bytes, a port scanner,
//!   a client that connects and stalls) before tonic ever sees it.
//! * [`metrics`]: a histogram with fixed buckets, a writer for the Prometheus
//!   text exposition format, and a tiny HTTP/1.1 responder for `GET /metrics`.
//! * [`RateLog`]: a log line per event for the first few, then a summary, so a
//!   flood of bad calls cannot flood the log too.
//! * [`bind`]: a listening socket, or a refusal that names the address and, when
//!   it is taken, the likely culprit.

pub mod listener;
pub mod metrics;

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Listen on `addr` for `daemon` (its binary name). `purpose` (e.g.
/// `"--metrics"`) tells which of the daemon's listeners failed, when it has
/// more than one. The error is a sentence for the operator.
pub async fn bind(addr: &str, daemon: &str, purpose: Option<&str>) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| bind_error(addr, daemon, purpose, &e))
}

/// The refusal [`bind`] gives for `e`.
pub fn bind_error(addr: &str, daemon: &str, purpose: Option<&str>, e: &std::io::Error) -> String {
    let what = purpose.map(|p| format!(" ({p})")).unwrap_or_default();
    match e.kind() {
        // The OS's own words, capital and all: operators search for them.
        std::io::ErrorKind::AddrInUse => {
            format!("cannot listen on {addr}{what}: Address already in use (another {daemon} running?)")
        }
        _ => format!("cannot listen on {addr}{what}: {e}"),
    }
}

/// Lets `burst` messages through per `period`, then counts what it suppressed.
pub struct RateLog {
    period: Duration,
    burst: u32,
    st: Mutex<(Option<Instant>, u32, u64)>,
}

impl RateLog {
    pub const fn new(period: Duration, burst: u32) -> RateLog {
        RateLog { period, burst, st: Mutex::new((None, 0, 0)) }
    }

    /// `Some(n)` when this event should be logged; `n` events were suppressed
    /// since the last one that was.
    pub fn allow(&self) -> Option<u64> {
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (start, used, suppressed) = &mut *st;
        if start.is_none_or(|s| now.duration_since(s) >= self.period) {
            *start = Some(now);
            *used = 0;
        }
        if *used < self.burst {
            *used += 1;
            let n = *suppressed;
            *suppressed = 0;
            Some(n)
        } else {
            *suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_names_the_address_and_the_likely_culprit() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = bind(&addr, "mcfs-dlm", None).await.unwrap_err();
        assert_eq!(e, format!("cannot listen on {addr}: Address already in use (another mcfs-dlm running?)"));
        let e = bind(&addr, "mcfs-fenced", Some("--metrics")).await.unwrap_err();
        assert_eq!(e, format!("cannot listen on {addr} (--metrics): Address already in use (another mcfs-fenced running?)"));
        let e = bind("127.0.0.1:notaport", "mcfs-dlm", None).await.unwrap_err();
        assert!(e.starts_with("cannot listen on 127.0.0.1:notaport: ") && !e.contains("running?"), "{e}");
        assert!(bind("127.0.0.1:0", "mcfs-dlm", None).await.is_ok());
    }

    #[test]
    fn rate_log_lets_a_burst_through_then_counts() {
        let r = RateLog::new(Duration::from_secs(3600), 2);
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        let r = RateLog::new(Duration::ZERO, 1);
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), Some(0), "a new period starts at once");
    }
}
