//! Talks to mcfs-fenced (`proto/fence.proto`) on behalf of the recovery state
//! machine.
//!
//! A fence request is idempotent by its request id (`<lockspace>/<node>/<failure
//! generation>[/retry<N>]`, chosen by the core), so after a lock-server restart
//! the same operation is polled again rather than started twice.
//!
//! The agent may be down, hung (SIGSTOP: its port still accepts connections),
//! or answer nonsense. None of that may block recovery silently, and none of it
//! may end it either (safety does not allow giving up, only waiting):
//! 1. every call has a deadline (`fence_call_timeout_ms`);
//! 2. a failed call, a PENDING answer or an answer that does not make sense
//!    (another request id or node, an unknown outcome, a success without a
//!    fence time) is retried with exponential backoff from `fence_retry_min_ms`
//!    to `fence_retry_max_ms`, with the same request id;
//! 3. every call's result goes to the [`FenceProgress`] of the recovery (shown
//!    in the Dump: calls made, last error and when) and to the metrics, and the
//!    log says so the first time and then every 30 s while it lasts.
//!
//! The verdict goes back to the core, which checks that the fence time is not
//! older than the failure.

use crate::core::recovery::FenceOutcome;
use crate::core::NodeId;
use crate::error::{Error, Result};
use crate::metrics::{CallResult, DlmMetrics};
use mcfs_proto::auth::Secret;
use mcfs_proto::fence::{fencer_client::FencerClient, FenceReply, FenceRequest, Outcome, UnfenceRequest};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// Time-outs and retry pacing for calls to mcfs-fenced.
#[derive(Clone, Debug)]
pub struct FenceOptions {
    /// Deadline of one call (connect included).
    pub call_timeout: Duration,
    /// First retry delay; doubled after each unsuccessful call.
    pub retry_min: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
}

impl Default for FenceOptions {
    fn default() -> Self {
        FenceOptions {
            call_timeout: Duration::from_millis(5000),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_millis(5000),
        }
    }
}

impl FenceOptions {
    /// Delay before retry number `n` (0-based): min * 2^n, capped at max.
    pub fn backoff(&self, n: u32) -> Duration {
        let d = self.retry_min.saturating_mul(1u32.checked_shl(n.min(20)).unwrap_or(u32::MAX));
        d.min(self.retry_max).max(Duration::from_millis(1))
    }
}

#[derive(Clone)]
pub enum FenceClient {
    /// A real fencing agent.
    Agent { channel: Channel, secret: Secret, addr: String, opts: FenceOptions },
    /// `--no-fencing`: every fence "succeeds" at once. Single-host demos only.
    Disabled,
}

/// What is known about a fence request while it runs (shown in the Dump).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgressState {
    pub request_id: String,
    /// Calls made to mcfs-fenced for this failure (all request ids).
    pub calls: u32,
    pub last_call_unix_ms: u64,
    /// Why the last call did not bring a verdict; empty after a good answer.
    pub last_error: String,
    pub last_error_unix_ms: u64,
}

#[derive(Default, Debug)]
pub struct FenceProgress(Mutex<ProgressState>);

impl FenceProgress {
    pub fn get(&self) -> ProgressState {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
    fn error(&self, msg: String) {
        self.update(|s| {
            s.last_error = msg;
            s.last_error_unix_ms = crate::unix_ms();
        });
    }
}

/// Check that a reply is an answer to our request; classify it.
fn judge(r: &FenceReply, request_id: &str, node: NodeId) -> std::result::Result<Outcome, String> {
    if (!r.request_id.is_empty() && r.request_id != request_id) || (r.node_id != 0 && r.node_id != node) {
        return Err(format!(
            "the agent answered for request {:?} node {} instead of {request_id:?} node {node}",
            r.request_id, r.node_id
        ));
    }
    match Outcome::try_from(r.outcome) {
        Ok(Outcome::Success) if r.fence_time_unix_ms == 0 => Err("the agent reported success without a fence time".into()),
        Ok(o) => Ok(o),
        Err(_) => Err(format!("the agent answered with an unknown outcome {}", r.outcome)),
    }
}

impl FenceClient {
    pub fn agent(addr: &str, secret: Secret) -> Result<FenceClient> {
        Self::agent_with(addr, secret, FenceOptions::default())
    }

    pub fn agent_with(addr: &str, secret: Secret, opts: FenceOptions) -> Result<FenceClient> {
        let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| Error::Config(format!("bad --fence address {addr}: {e}")))?
            .connect_timeout(opts.call_timeout)
            // A hung agent keeps its connection open; pings notice a dead one.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(opts.call_timeout.max(Duration::from_secs(1)))
            .connect_lazy();
        Ok(FenceClient::Agent { channel, secret, addr: addr.to_string(), opts })
    }

    pub fn describe(&self) -> String {
        match self {
            FenceClient::Agent { addr, .. } => format!("mcfs-fenced at {addr}"),
            FenceClient::Disabled => "DISABLED (--no-fencing)".into(),
        }
    }

    pub fn options(&self) -> FenceOptions {
        match self {
            FenceClient::Agent { opts, .. } => opts.clone(),
            FenceClient::Disabled => FenceOptions::default(),
        }
    }

    /// Fence `node` and wait for the agent's final verdict.
    pub async fn fence(&self, request_id: &str, node: NodeId, failed_at_ms: u64, reason: &str) -> FenceOutcome {
        self.fence_tracked(request_id, node, failed_at_ms, reason, &FenceProgress::default(), None).await
    }

    /// [`fence`](Self::fence), reporting every call to `progress` and `metrics`.
    pub async fn fence_tracked(
        &self,
        request_id: &str,
        node: NodeId,
        failed_at_ms: u64,
        reason: &str,
        progress: &FenceProgress,
        metrics: Option<&DlmMetrics>,
    ) -> FenceOutcome {
        let (channel, secret, opts) = match self {
            FenceClient::Disabled => {
                tracing::warn!(node, request_id, "fencing is DISABLED (--no-fencing): pretending node {node} is fenced");
                return FenceOutcome::Success { fence_time_ms: crate::unix_ms().max(failed_at_ms) };
            }
            FenceClient::Agent { channel, secret, opts, .. } => (channel.clone(), secret.clone(), opts.clone()),
        };
        let note = |r: CallResult| {
            if let Some(m) = metrics {
                m.fence_call(r);
            }
        };
        progress.update(|s| s.request_id = request_id.to_string());
        let mut client = FencerClient::with_interceptor(channel, secret.interceptor());
        let mut retry = 0u32;
        let mut logged_pending = false;
        let mut last_warn: Option<Instant> = None;
        let mut failures = 0u64;
        loop {
            let req = FenceRequest {
                request_id: request_id.to_string(),
                node_id: node,
                failure_time_unix_ms: failed_at_ms,
                reason: reason.to_string(),
            };
            progress.update(|s| {
                s.calls += 1;
                s.last_call_unix_ms = crate::unix_ms();
            });
            let err = match tokio::time::timeout(opts.call_timeout, client.fence(req)).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    match judge(&r, request_id, node) {
                        Ok(Outcome::Success) => {
                            note(CallResult::Success);
                            progress.update(|s| s.last_error.clear());
                            tracing::info!(node, request_id, method = %r.method, "node fenced");
                            return FenceOutcome::Success { fence_time_ms: r.fence_time_unix_ms };
                        }
                        Ok(Outcome::Failed) => {
                            note(CallResult::Failed);
                            let m = format!("{} ({})", r.message, r.method);
                            progress.error(format!("the agent could not fence: {m}"));
                            return FenceOutcome::Failed(m);
                        }
                        Ok(Outcome::Pending) => {
                            note(CallResult::Pending);
                            progress.update(|s| s.last_error.clear());
                            if !logged_pending {
                                tracing::info!(node, request_id, "fencing in progress: {}", r.message);
                                logged_pending = true;
                            }
                            None
                        }
                        Err(m) => {
                            note(CallResult::BadReply);
                            Some(m)
                        }
                    }
                }
                Ok(Err(st)) => {
                    note(CallResult::Error);
                    Some(format!("mcfs-fenced call failed ({:?}): {}", st.code(), st.message()))
                }
                Err(_) => {
                    note(CallResult::Timeout);
                    Some(format!("mcfs-fenced did not answer within {} ms", opts.call_timeout.as_millis()))
                }
            };
            if let Some(m) = err {
                failures += 1;
                if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    tracing::warn!(node, request_id, failures, "fencing agent: {m}; retrying (recovery waits at FENCING)");
                    last_warn = Some(Instant::now());
                } else {
                    tracing::debug!(node, request_id, "fencing agent: {m}; retrying");
                }
                progress.error(m);
            }
            tokio::time::sleep(opts.backoff(retry)).await;
            retry = retry.saturating_add(1);
        }
    }

    /// Operator unfence, forwarded to the agent; polls until it is done, for at
    /// most four call time-outs.
    pub async fn unfence(&self, request_id: &str, node: NodeId) -> Result<String> {
        let (channel, secret, opts) = match self {
            FenceClient::Disabled => return Ok("fencing disabled".into()),
            FenceClient::Agent { channel, secret, opts, .. } => (channel.clone(), secret.clone(), opts.clone()),
        };
        let mut client = FencerClient::with_interceptor(channel, secret.interceptor());
        let deadline = Instant::now() + opts.call_timeout * 4;
        let mut retry = 0;
        loop {
            let call = client.unfence(UnfenceRequest { request_id: request_id.to_string(), node_id: node });
            let r = match tokio::time::timeout(opts.call_timeout, call).await {
                Ok(Ok(r)) => r.into_inner(),
                // The agent has nothing to lift (e.g. the node was never fenced there).
                Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition && s.message().contains("not fenced") => {
                    return Ok(format!("agent: {}", s.message()));
                }
                Ok(Err(s)) => return Err(Error::from(s)),
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "mcfs-fenced did not answer within {} ms",
                        opts.call_timeout.as_millis()
                    )))
                }
            };
            match Outcome::try_from(r.outcome) {
                Ok(Outcome::Success) => return Ok(format!("unfenced by {}", r.method)),
                Ok(Outcome::Failed) => return Err(Error::FailedPrecondition(format!("unfence failed: {}", r.message))),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable("unfence still pending at the fencing agent".into()));
            }
            tokio::time::sleep(opts.backoff(retry)).await;
            retry += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let o = FenceOptions {
            call_timeout: Duration::from_secs(1),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_millis(1000),
        };
        let v: Vec<u128> = (0..6).map(|n| o.backoff(n).as_millis()).collect();
        assert_eq!(v, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(o.backoff(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn replies_that_do_not_answer_the_request_are_rejected() {
        let ok = FenceReply {
            request_id: "ls/1/3".into(),
            node_id: 1,
            outcome: Outcome::Success as i32,
            fence_time_unix_ms: 5,
            ..Default::default()
        };
        assert_eq!(judge(&ok, "ls/1/3", 1), Ok(Outcome::Success));
        assert!(judge(&FenceReply { request_id: "other".into(), ..ok.clone() }, "ls/1/3", 1).is_err());
        assert!(judge(&FenceReply { node_id: 2, ..ok.clone() }, "ls/1/3", 1).is_err());
        assert!(judge(&FenceReply { outcome: 7, ..ok.clone() }, "ls/1/3", 1).is_err());
        assert!(judge(&FenceReply { fence_time_unix_ms: 0, ..ok.clone() }, "ls/1/3", 1).is_err());
        let pending = FenceReply { outcome: Outcome::Pending as i32, fence_time_unix_ms: 0, ..ok };
        assert_eq!(judge(&pending, "ls/1/3", 1), Ok(Outcome::Pending));
    }
}
