//! What every call passes before it reaches the `Dlm` service:
//!
//! 1. The cluster secret (`authorization: Bearer ...`, constant-time compare).
//!    A call without it is answered UNAUTHENTICATED right here, so it changes
//!    nothing; it is counted by method, remembered (time, peer, method) for the
//!    `Stats` RPC, and logged (rate-limited: a flood of bad calls must not
//!    flood the log).
//! 2. A deadline on unary calls (`request_timeout_ms`), from the request headers
//!    to the reply, so a client that sends half a request and stalls does not
//!    hold a call open for ever; it gets DEADLINE_EXCEEDED. The Events and Ops
//!    streams are exempt: they live as long as their session, and leases and
//!    eviction bound them instead.
//!
//! A tower service rather than a tonic interceptor, because an interceptor
//! sees neither the method nor the end of the call.

use super::Shared;
use crate::metrics::Refused;
use crate::net::RateLog;
use mcfs_proto::auth::Secret;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::transport::server::TcpConnectInfo;
use tonic::Status;

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    secret: Secret,
    shared: Arc<Shared>,
}

impl<S> Guard<S> {
    pub fn new(inner: S, secret: Secret, shared: Arc<Shared>) -> Guard<S> {
        Guard { inner, secret, shared }
    }
}

impl<S: NamedService> NamedService for Guard<S> {
    const NAME: &'static str = S::NAME;
}

static REFUSED_LOG: RateLog = RateLog::new(Duration::from_secs(10), 5);

/// Calls that last as long as the session.
fn is_stream(method: &str) -> bool {
    matches!(method, "Events" | "Ops")
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for Guard<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or("").to_string();
        let mut probe = http::Request::new(());
        if let Some(v) = req.headers().get("authorization") {
            probe.headers_mut().insert("authorization", v.clone());
        }
        if let Err(st) = self.secret.check(&tonic::Request::from_http(probe)) {
            let peer = req
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(|c| c.remote_addr())
                .map(|a| a.to_string())
                .unwrap_or_default();
            if let Some(n) = REFUSED_LOG.allow() {
                tracing::warn!(%peer, %method, suppressed = n, "refused an unauthenticated call: {}", st.message());
            }
            self.shared.metrics.refused(Refused {
                at_unix_ms: crate::unix_ms(),
                method,
                peer,
                reason: st.message().to_string(),
            });
            return Box::pin(async move { Ok(st.into_http()) });
        }
        // The ready service goes with this call; the clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = inner.call(req);
        if is_stream(&method) {
            return Box::pin(fut);
        }
        let limit = Duration::from_millis(self.shared.cfg.request_timeout_ms);
        let shared = self.shared.clone();
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => {
                    shared.metrics.rpc_timeout(&method);
                    tracing::warn!(%method, "call cut off after {} ms (request_timeout_ms)", limit.as_millis());
                    Ok(Status::deadline_exceeded(format!(
                        "{method} did not complete within {} ms (request_timeout_ms)",
                        limit.as_millis()
                    ))
                    .into_http())
                }
            }
        })
    }
}
