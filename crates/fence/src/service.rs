//! The gRPC face of the engine (`proto/fence.proto`), the cluster-secret check on
//! every call, and the conversions between engine records and protocol messages.
//!
//! The check runs inside each method rather than in a tonic interceptor because
//! a refused call must be recorded with what it asked for (which rpc, which node),
//! and an interceptor sees neither the path nor the body.

use crate::engine::{Engine, FenceArgs, NodeStatusView};
use crate::store::{AttemptRecord, OpRecord, Outcome as RecOutcome, RefusedRecord};
use mcfs_proto::auth::Secret;
use mcfs_proto::fence as pb;
use mcfs_proto::fence::fencer_server::{Fencer, FencerServer};
use tonic::{Request, Response, Status};

pub struct FencerService {
    engine: Engine,
    secret: Secret,
}

impl FencerService {
    pub fn new(engine: Engine, secret: Secret) -> FencerService {
        FencerService { engine, secret }
    }

    /// The tonic service, refusing request messages over `max_message_bytes`.
    pub fn into_server(self) -> FencerServer<FencerService> {
        let max = self.engine.config().server.max_message_bytes();
        FencerServer::new(self).max_decoding_message_size(max)
    }

    /// Refuse and record an unauthenticated call; nothing else changes.
    async fn authorize<T>(
        &self,
        rpc: &str,
        req: &Request<T>,
        call: impl FnOnce() -> String,
    ) -> Result<(), Status> {
        let Err(st) = self.secret.check(req) else {
            return Ok(());
        };
        self.engine.metrics().refused(rpc);
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        if let Err(e) = self
            .engine
            .record_refused(call(), peer, st.message().to_string())
            .await
        {
            tracing::error!("cannot record a refused call: {e}");
        }
        Err(st)
    }

    /// Count an answered call by its status code.
    fn counted<T>(&self, rpc: &str, r: Result<T, Status>) -> Result<T, Status> {
        let code = r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        self.engine.metrics().call(rpc, code);
        r
    }
}

pub fn outcome(o: RecOutcome) -> pb::Outcome {
    match o {
        RecOutcome::Pending => pb::Outcome::Pending,
        RecOutcome::Success => pb::Outcome::Success,
        RecOutcome::Failed => pb::Outcome::Failed,
    }
}

fn attempt(a: &AttemptRecord) -> pb::Attempt {
    pb::Attempt {
        level: a.level,
        method: a.method.clone(),
        started_unix_ms: a.started_ms,
        finished_unix_ms: a.finished_ms,
        ok: a.ok,
        message: a.message.clone(),
    }
}

pub fn reply(r: &OpRecord) -> pb::FenceReply {
    pb::FenceReply {
        request_id: r.request_id.clone(),
        node_id: r.node_id,
        outcome: outcome(r.outcome) as i32,
        fence_time_unix_ms: r.fence_time_ms,
        method: r.method.clone(),
        message: r.message.clone(),
        attempts: r.attempts.iter().map(attempt).collect(),
        kind: r.kind.as_str().to_string(),
        requested_unix_ms: r.requested_ms,
        finished_unix_ms: r.finished_ms,
        failure_time_unix_ms: r.failure_time_ms,
        reason: r.reason.clone(),
    }
}

fn node_status(s: NodeStatusView) -> pb::NodeStatus {
    pb::NodeStatus {
        node_id: s.node_id,
        fenced: s.fenced,
        fenced_at_unix_ms: s.fenced_at_ms,
        last_request_id: s.last_request_id,
        last_outcome: outcome(s.last_outcome.unwrap_or(RecOutcome::Pending)) as i32,
        methods: s.methods,
        in_progress: s.in_progress,
        awaiting_ack: s.awaiting_ack,
    }
}

fn refused(r: RefusedRecord) -> pb::RefusedCall {
    pb::RefusedCall {
        at_unix_ms: r.at_ms,
        call: r.call,
        peer: r.peer,
        reason: r.reason,
    }
}

#[tonic::async_trait]
impl Fencer for FencerService {
    async fn fence(
        &self,
        req: Request<pb::FenceRequest>,
    ) -> Result<Response<pb::FenceReply>, Status> {
        self.authorize("fence", &req, || {
            format!(
                "Fence(node {}, request {:?})",
                req.get_ref().node_id,
                req.get_ref().request_id.chars().take(300).collect::<String>()
            )
        })
        .await?;
        let r = req.into_inner();
        let rec = self
            .engine
            .fence(FenceArgs {
                request_id: r.request_id,
                node_id: r.node_id,
                failure_time_ms: r.failure_time_unix_ms,
                reason: r.reason,
            })
            .await
            .map_err(Status::from);
        self.counted("fence", rec.map(|rec| Response::new(reply(&rec))))
    }

    async fn unfence(
        &self,
        req: Request<pb::UnfenceRequest>,
    ) -> Result<Response<pb::FenceReply>, Status> {
        self.authorize("unfence", &req, || {
            format!(
                "Unfence(node {}, request {:?})",
                req.get_ref().node_id,
                req.get_ref().request_id.chars().take(300).collect::<String>()
            )
        })
        .await?;
        let r = req.into_inner();
        let rec = self
            .engine
            .unfence(&r.request_id, r.node_id)
            .await
            .map_err(Status::from);
        self.counted("unfence", rec.map(|rec| Response::new(reply(&rec))))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        self.authorize("status", &req, || {
            format!("Status(node {})", req.get_ref().node_id)
        })
        .await?;
        let r = self
            .engine
            .status(req.get_ref().node_id)
            .map(|s| Response::new(node_status(s)))
            .map_err(Status::from);
        self.counted("status", r)
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryReply>, Status> {
        self.authorize("history", &req, || {
            format!("History(node {})", req.get_ref().node_id)
        })
        .await?;
        let r = req.into_inner();
        let res = (|| {
            if r.node_id != 0 {
                self.engine.config().node(r.node_id)?;
            }
            let records = self.engine.history(r.node_id, r.limit as usize)?;
            let refused_calls = self.engine.refused(r.limit as usize)?;
            Ok::<_, crate::FenceError>(Response::new(pb::HistoryReply {
                records: records.iter().map(reply).collect(),
                refused: refused_calls.into_iter().map(refused).collect(),
            }))
        })();
        self.counted("history", res.map_err(Status::from))
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckReply>, Status> {
        self.authorize("ack", &req, || {
            let op: String = req.get_ref().operator.chars().take(64).collect();
            format!("Ack(node {}, operator {op:?})", req.get_ref().node_id)
        })
        .await?;
        let r = req.into_inner();
        let a = self
            .engine
            .ack(r.node_id, &r.operator)
            .map(|a| {
                Response::new(pb::AckReply {
                    acknowledged: a.acknowledged,
                    message: a.message,
                })
            })
            .map_err(Status::from);
        self.counted("ack", a)
    }
}
