//! Talks to mcfs-fenced (`proto/fence.proto`) on behalf of the recovery state
//! machine.
//!
//! A fence request is idempotent by its request id (`<lockspace>/<node>/<failure
//! generation>[/retry<N>]`, chosen by the core), so after a lock-server restart
//! the same operation is polled again rather than started twice. Transport
//! errors and PENDING are retried with backoff for ever: safety does not allow
//! giving up, only waiting (and saying so in the log). The verdict goes back to
//! the core, which checks that the fence time is not older than the failure.

use crate::core::recovery::FenceOutcome;
use crate::core::NodeId;
use crate::error::{Error, Result};
use mcfs_proto::auth::Secret;
use mcfs_proto::fence::{fencer_client::FencerClient, FenceRequest, Outcome, UnfenceRequest};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone)]
pub enum FenceClient {
    /// A real fencing agent.
    Agent { channel: Channel, secret: Secret, addr: String },
    /// `--no-fencing`: every fence "succeeds" at once. Single-host demos only.
    Disabled,
}

impl FenceClient {
    pub fn agent(addr: &str, secret: Secret) -> Result<FenceClient> {
        let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| Error::Config(format!("bad --fence address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        Ok(FenceClient::Agent { channel, secret, addr: addr.to_string() })
    }

    pub fn describe(&self) -> String {
        match self {
            FenceClient::Agent { addr, .. } => format!("mcfs-fenced at {addr}"),
            FenceClient::Disabled => "DISABLED (--no-fencing)".into(),
        }
    }

    /// Fence `node` and wait for the agent's final verdict.
    pub async fn fence(&self, request_id: &str, node: NodeId, failed_at_ms: u64, reason: &str) -> FenceOutcome {
        let (channel, secret) = match self {
            FenceClient::Disabled => {
                tracing::warn!(node, request_id, "fencing is DISABLED (--no-fencing): pretending node {node} is fenced");
                return FenceOutcome::Success { fence_time_ms: crate::unix_ms().max(failed_at_ms) };
            }
            FenceClient::Agent { channel, secret, .. } => (channel.clone(), secret.clone()),
        };
        let mut client = FencerClient::with_interceptor(channel, secret.interceptor());
        let mut backoff = Duration::from_millis(50);
        let mut logged = false;
        loop {
            let req = FenceRequest {
                request_id: request_id.to_string(),
                node_id: node,
                failure_time_unix_ms: failed_at_ms,
                reason: reason.to_string(),
            };
            match client.fence(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    match Outcome::try_from(r.outcome) {
                        Ok(Outcome::Success) => {
                            tracing::info!(node, request_id, method = %r.method, "node fenced");
                            return FenceOutcome::Success { fence_time_ms: r.fence_time_unix_ms };
                        }
                        Ok(Outcome::Failed) => {
                            return FenceOutcome::Failed(format!("{} ({})", r.message, r.method));
                        }
                        Ok(Outcome::Pending) | Err(_) => {
                            if !logged {
                                tracing::info!(node, request_id, "fencing in progress: {}", r.message);
                                logged = true;
                            }
                        }
                    }
                }
                Err(st) => {
                    tracing::warn!(node, request_id, "cannot reach the fencing agent: {} ({:?}); retrying", st.message(), st.code());
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Operator unfence, forwarded to the agent (once).
    pub async fn unfence(&self, request_id: &str, node: NodeId) -> Result<String> {
        let (channel, secret) = match self {
            FenceClient::Disabled => return Ok("fencing disabled".into()),
            FenceClient::Agent { channel, secret, .. } => (channel.clone(), secret.clone()),
        };
        let mut client = FencerClient::with_interceptor(channel, secret.interceptor());
        let mut backoff = Duration::from_millis(50);
        for _ in 0..60 {
            let r = match client.unfence(UnfenceRequest { request_id: request_id.to_string(), node_id: node }).await {
                Ok(r) => r.into_inner(),
                // The agent has nothing to lift (e.g. the node was never fenced there).
                Err(s) if s.code() == tonic::Code::FailedPrecondition && s.message().contains("not fenced") => {
                    return Ok(format!("agent: {}", s.message()));
                }
                Err(s) => return Err(Error::from(s)),
            };
            match Outcome::try_from(r.outcome) {
                Ok(Outcome::Success) => return Ok(format!("unfenced by {}", r.method)),
                Ok(Outcome::Failed) => return Err(Error::FailedPrecondition(format!("unfence failed: {}", r.message))),
                _ => {}
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        Err(Error::Unavailable("unfence still pending at the fencing agent".into()))
    }
}
