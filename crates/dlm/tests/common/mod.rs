//! Helpers for the service tests: a server on 127.0.0.1:0, clients, raw RPC
//! stubs, and a tiny in-test Fencer speaking proto/fence.proto.
#![allow(dead_code, clippy::unwrap_used)]

use mcfs_dlm::config::ServerConfig;
use mcfs_dlm::fence_client::FenceClient;
use mcfs_dlm::service::ServerHandle;
use mcfs_dlm::{ClientConfig, ClientEvent, DlmClient};
use mcfs_proto::auth::Secret;
use mcfs_proto::dlm::dlm_client::DlmClient as RawDlm;
use mcfs_proto::fence::fencer_server::{Fencer, FencerServer};
use mcfs_proto::fence::*;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;
use tonic::transport::Channel;

pub fn secret() -> Secret {
    Secret::new("test-secret-0123").unwrap()
}

pub struct Server {
    pub handle: ServerHandle,
    pub dir: tempfile::TempDir,
    pub secret: Secret,
}

impl Server {
    pub fn addr(&self) -> String {
        self.handle.addr.to_string()
    }
}

/// Logs of the server and clients, shown for failing tests (RUST_LOG to tune).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("mcfs_dlm=debug")),
        )
        .with_test_writer()
        .try_init();
}

pub async fn server(cfg: ServerConfig, fence: FenceClient) -> Server {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let store = mcfs_dlm::store::Store::open(dir.path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handle = mcfs_dlm::service::start(cfg, store, secret(), fence, listener).await.unwrap();
    Server { handle, dir, secret: secret() }
}

pub fn quick_cfg() -> ServerConfig {
    ServerConfig { heartbeat_ms: 100, lease_ms: 1000, grace_ms: 2000, ..Default::default() }
}

pub async fn client(addr: &str, ls: &str, node: u32) -> (DlmClient, UnboundedReceiver<ClientEvent>) {
    DlmClient::connect(ClientConfig {
        addr: addr.to_string(),
        secret: secret(),
        lockspace: ls.to_string(),
        node_id: node,
        admin_addr: format!("127.0.0.1:{}", 9000 + node),
    })
    .await
    .unwrap()
}

pub type Raw = RawDlm<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

#[derive(Clone)]
pub struct Auth(pub Option<Secret>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        Ok(match &self.0 {
            Some(s) => s.attach(req),
            None => req,
        })
    }
}

/// A raw stub with the given secret (None: no authorization header).
pub async fn raw(addr: &str, secret: Option<Secret>) -> Raw {
    let ch = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    RawDlm::with_interceptor(ch, Auth(secret))
}

/// Wait for an event matching `f` (skipping others), or panic after `t`.
pub async fn expect_event<T>(
    rx: &mut UnboundedReceiver<ClientEvent>,
    t: Duration,
    what: &str,
    mut f: impl FnMut(&ClientEvent) -> Option<T>,
) -> T {
    let deadline = Instant::now() + t;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(ev)) => {
                if let Some(v) = f(&ev) {
                    return v;
                }
            }
            Ok(None) => panic!("event channel closed while waiting for {what}"),
            Err(_) => panic!("timed out after {t:?} waiting for {what}"),
        }
    }
}

/// Poll an async condition until it holds, or panic after `t`.
pub async fn wait_until<F, Fut>(what: &str, t: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + t;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out after {t:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// State of the in-test fencing agent.
#[derive(Default)]
pub struct FencerState {
    pub calls: Mutex<Vec<FenceRequest>>,
    pub unfences: Mutex<Vec<UnfenceRequest>>,
    /// While set, every Fence call answers PENDING.
    pub hold: AtomicBool,
    /// Fail this many requests (by distinct request id) before succeeding.
    pub fail_first: AtomicU32,
    failed_ids: Mutex<Vec<String>>,
}

impl FencerState {
    pub fn request_ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.calls.lock().unwrap().iter().map(|c| c.request_id.clone()).collect();
        v.dedup();
        v
    }
}

pub struct TestFencer(pub Arc<FencerState>);

#[tonic::async_trait]
impl Fencer for TestFencer {
    async fn fence(&self, req: tonic::Request<FenceRequest>) -> Result<tonic::Response<FenceReply>, tonic::Status> {
        let r = req.into_inner();
        self.0.calls.lock().unwrap().push(r.clone());
        let mut reply = FenceReply { request_id: r.request_id.clone(), node_id: r.node_id, ..Default::default() };
        {
            let mut failed = self.0.failed_ids.lock().unwrap();
            if failed.contains(&r.request_id) {
                reply.outcome = Outcome::Failed as i32;
                reply.message = "agent failed".into();
                return Ok(tonic::Response::new(reply));
            }
            if self.0.fail_first.load(Ordering::SeqCst) > 0 {
                self.0.fail_first.fetch_sub(1, Ordering::SeqCst);
                failed.push(r.request_id.clone());
                reply.outcome = Outcome::Failed as i32;
                reply.message = "agent failed".into();
                return Ok(tonic::Response::new(reply));
            }
        }
        if self.0.hold.load(Ordering::SeqCst) {
            reply.outcome = Outcome::Pending as i32;
        } else {
            reply.outcome = Outcome::Success as i32;
            reply.fence_time_unix_ms = mcfs_dlm::unix_ms();
            reply.method = "test".into();
        }
        Ok(tonic::Response::new(reply))
    }
    async fn unfence(&self, req: tonic::Request<UnfenceRequest>) -> Result<tonic::Response<FenceReply>, tonic::Status> {
        let r = req.into_inner();
        self.0.unfences.lock().unwrap().push(r.clone());
        Ok(tonic::Response::new(FenceReply {
            request_id: r.request_id,
            node_id: r.node_id,
            outcome: Outcome::Success as i32,
            method: "test".into(),
            ..Default::default()
        }))
    }
    async fn status(&self, _: tonic::Request<StatusRequest>) -> Result<tonic::Response<NodeStatus>, tonic::Status> {
        Err(tonic::Status::unimplemented("test fencer"))
    }
    async fn history(&self, _: tonic::Request<HistoryRequest>) -> Result<tonic::Response<HistoryReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("test fencer"))
    }
    async fn ack(&self, _: tonic::Request<AckRequest>) -> Result<tonic::Response<AckReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("test fencer"))
    }
}

/// Start the in-test fencer on 127.0.0.1:0 (same secret). Returns its address.
pub async fn fencer(state: Arc<FencerState>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = tonic::service::interceptor::InterceptedService::new(FencerServer::new(TestFencer(state)), secret().checker());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr.to_string()
}
