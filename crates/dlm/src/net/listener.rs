//! The accept loop in front of a tonic server.
//!
//! tonic (hyper) accepts every connection and waits as long as the peer likes
//! for its HTTP/2 preface. A peer that connects and sends nothing, half a
//! preface, or garbage would each hold a connection and a task; enough of them
//! and the daemon runs out of file descriptors while its real clients are
//! refused. So, before a connection is handed to tonic:
//!
//! 1. At most `max_connections` are open at once (counting those still in
//!    their handshake). One more is closed at once and counted.
//! 2. The first 24 bytes must be the HTTP/2 client preface (`PRI * HTTP/2.0...`,
//!    what every gRPC client sends first) and must arrive within
//!    `handshake_timeout`. Otherwise the connection is closed and counted as
//!    garbage or as a stalled handshake. The bytes are only peeked at, so hyper
//!    reads them again.
//! 3. What stays open is a gRPC peer; stalls after the handshake are bounded by
//!    HTTP/2 keepalive pings, the per-connection stream limit and the services'
//!    own time-outs.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::RateLog;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Debug)]
pub struct ListenerLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

/// Connection counters, read by the metrics.
#[derive(Default, Debug)]
pub struct ConnStats {
    pub accepted: AtomicU64,
    pub open: AtomicU64,
    pub rejected_limit: AtomicU64,
    pub rejected_garbage: AtomicU64,
    pub rejected_timeout: AtomicU64,
}

impl ConnStats {
    pub fn rejected(&self) -> u64 {
        self.rejected_limit.load(Ordering::Relaxed)
            + self.rejected_garbage.load(Ordering::Relaxed)
            + self.rejected_timeout.load(Ordering::Relaxed)
    }
}

/// A connection that passed the checks; it gives its slot back when dropped.
pub struct Guarded {
    stream: TcpStream,
    stats: Arc<ConnStats>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

enum Verdict {
    Ok,
    Garbage,
    Closed,
}

/// Wait for the full HTTP/2 preface without consuming it.
async fn preface(stream: &TcpStream) -> io::Result<Verdict> {
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(Verdict::Closed);
        }
        if buf[..n] != PREFACE[..n] {
            return Ok(Verdict::Garbage);
        }
        if n == PREFACE.len() {
            return Ok(Verdict::Ok);
        }
        // Part of it arrived; peek again shortly (peek does not wait for more).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

static REJECT_LOG: RateLog = RateLog::new(Duration::from_secs(10), 5);

/// Accept on `listener` and yield the connections that pass the checks, for
/// `Server::serve_with_incoming`. `what` names the daemon in logs.
pub fn incoming(
    listener: TcpListener,
    limits: ListenerLimits,
    stats: Arc<ConnStats>,
    what: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Guarded>> {
    let (tx, rx) = mpsc::channel::<io::Result<Guarded>>(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("{what}: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                stats.rejected_limit.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = REJECT_LOG.allow() {
                    tracing::warn!(%peer, suppressed = n, "{what}: connection refused: {} connections open (max_connections)", limits.max_connections);
                }
                drop(stream);
                continue;
            };
            stats.open.fetch_add(1, Ordering::Relaxed);
            let (tx, stats, timeout) = (tx.clone(), stats.clone(), limits.handshake_timeout);
            tokio::spawn(async move {
                let verdict = tokio::time::timeout(timeout, preface(&stream)).await;
                let why = match verdict {
                    Ok(Ok(Verdict::Ok)) => {
                        let _ = stream.set_nodelay(true);
                        let g = Guarded { stream, stats, _permit: permit };
                        let _ = tx.send(Ok(g)).await;
                        return;
                    }
                    Ok(Ok(Verdict::Closed)) | Ok(Err(_)) => None,
                    Ok(Ok(Verdict::Garbage)) => {
                        stats.rejected_garbage.fetch_add(1, Ordering::Relaxed);
                        Some("sent something other than an HTTP/2 (gRPC) preface")
                    }
                    Err(_) => {
                        stats.rejected_timeout.fetch_add(1, Ordering::Relaxed);
                        Some("did not complete the HTTP/2 preface in time (handshake_timeout_ms)")
                    }
                };
                stats.open.fetch_sub(1, Ordering::Relaxed);
                if let Some(why) = why {
                    if let Some(n) = REJECT_LOG.allow() {
                        tracing::warn!(%peer, suppressed = n, "{what}: connection closed: the peer {why}");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn only_http2_peers_get_through_within_the_limits() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stats = Arc::new(ConnStats::default());
        let limits = ListenerLimits { max_connections: 3, handshake_timeout: Duration::from_millis(300) };
        let mut inc = incoming(l, limits, stats.clone(), "test");

        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(&PREFACE[..10]).await.unwrap();
        let mut good = TcpStream::connect(addr).await.unwrap();
        good.write_all(&PREFACE[..10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        good.write_all(&PREFACE[10..]).await.unwrap();
        let g = tokio::time::timeout(Duration::from_secs(5), inc.next()).await.unwrap().unwrap().unwrap();
        // The preface was only peeked at: the service still reads it.
        assert_eq!(g.connect_info().remote_addr, Some(good.local_addr().unwrap()));
        let mut buf = [0u8; 24];
        g.stream.peek(&mut buf).await.unwrap();
        assert_eq!(&buf, PREFACE);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while stats.rejected_garbage.load(Ordering::Relaxed) < 1 || stats.rejected_timeout.load(Ordering::Relaxed) < 1 {
            assert!(tokio::time::Instant::now() < deadline, "{stats:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.open.load(Ordering::Relaxed), 1);
        // Fill the slots: three open (one accepted + two idle), the fourth is refused.
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while stats.rejected_limit.load(Ordering::Relaxed) < 1 {
            assert!(tokio::time::Instant::now() < deadline, "{stats:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(g);
        drop(half);
        drop(garbage);
    }
}
