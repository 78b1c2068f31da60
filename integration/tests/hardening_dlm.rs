//! Bad peers against the real `mcfs-dlm` binary: a wrong secret, oversized
//! names, LVBs and messages, garbage and stalled connections, a flood of
//! requests from one client, more sessions than allowed, and clients that do
//! not read their Events stream. Each time the server must answer with a clear
//! status (or close the connection), change nothing it should not, and keep
//! serving a well-behaved client.
#![allow(clippy::unwrap_used)]

use mcfs_dlm::{ClientConfig, ClientError, ClientEvent, DlmClient, Mode};
use mcfs_integration::dlmd::start_dlm;
use mcfs_integration::{secret_file, tempdir, wait_for};
use mcfs_proto::auth::Secret;
use mcfs_proto::dlm as pb;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;
use tonic::Code;

const T: Duration = Duration::from_secs(30);
const LS: &str = "c:fs";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn client(addr: &str, secret: &Secret, node: u32) -> (DlmClient, UnboundedReceiver<ClientEvent>) {
    DlmClient::connect(ClientConfig {
        addr: addr.into(),
        secret: secret.clone(),
        lockspace: LS.into(),
        node_id: node,
        admin_addr: String::new(),
    })
    .await
    .unwrap()
}

/// Sends the given secret (None: no authorization header at all).
#[derive(Clone)]
struct Auth(Option<Secret>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        Ok(match &self.0 {
            Some(s) => s.attach(r),
            None => r,
        })
    }
}

type Raw = pb::dlm_client::DlmClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Auth>>;

async fn raw(addr: &str, secret: Option<Secret>) -> Raw {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    pb::dlm_client::DlmClient::with_interceptor(ch, Auth(secret))
}

fn secret_of(p: &std::path::Path) -> Secret {
    Secret::from_file(p).unwrap()
}

/// Connect, send `bytes`, and wait for the server to close the connection.
fn closed_by_server(addr: &str, bytes: &[u8], within: Duration) -> bool {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    if !bytes.is_empty() {
        let _ = s.write_all(bytes);
    }
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    // The server may answer (an HTTP/2 GOAWAY) before it closes.
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
    false
}

fn lock_req(sid: u64, res: &[u8], mode: Mode) -> pb::LockRequest {
    pb::LockRequest { session_id: sid, resource: res.to_vec(), mode: mode as i32, ..Default::default() }
}

#[test]
fn wrong_secret_bad_sizes_garbage_and_stalls_are_refused_and_the_server_keeps_serving() {
    let dir = tempdir();
    let sf = secret_file(dir.path()).unwrap();
    let secret = secret_of(&sf);
    let dlm = start_dlm(
        dir.path(),
        "dlm",
        &sf,
        None,
        &[
            "--max-message-bytes",
            "65536",
            "--handshake-timeout-ms",
            "500",
            "--request-timeout-ms",
            "1000",
            "--max-connections",
            "16",
        ],
    )
    .unwrap();
    let addr = dlm.addr.clone();
    runtime().block_on(async {
        let (a, _ae) = client(&addr, &secret, 1).await;
        let g = a.lock(b"r", Mode::EX, 0).await.unwrap();

        // 1. Wrong or missing secret: UNAUTHENTICATED, nothing changes, counted and logged.
        let wrong = Secret::new("not-the-cluster-secret").unwrap();
        for auth in [Some(wrong), None] {
            let mut r = raw(&addr, auth).await;
            let j = pb::JoinRequest { lockspace: "evil".into(), node_id: 9, ..Default::default() };
            assert_eq!(r.join(j).await.unwrap_err().code(), Code::Unauthenticated);
            let u = pb::UnlockRequest { session_id: a.session_id(), lock_id: g.lock_id, ..Default::default() };
            assert_eq!(r.unlock(u).await.unwrap_err().code(), Code::Unauthenticated);
            assert_eq!(r.lock(lock_req(a.session_id(), b"r2", Mode::EX)).await.unwrap_err().code(), Code::Unauthenticated);
            assert_eq!(r.stats(pb::StatsRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
        }
        let d = a.dump(true).await.unwrap();
        assert_eq!(d.lockspaces.len(), 1, "no lockspace was created");
        assert_eq!(d.lockspaces[0].members.len(), 1);
        let names: Vec<&[u8]> = d.lockspaces[0].resources.iter().map(|r| r.name.as_slice()).collect();
        assert_eq!(names, vec![&b"r"[..]], "the lock is still held, nothing was added");
        let st = a.stats().await.unwrap();
        assert_eq!(st.refused_calls, 8, "{st:?}");
        assert!(st.last_refused.contains("Stats") && st.last_refused.contains("missing authorization"), "{st:?}");
        assert_eq!(dlm.value("mcfs_dlm_refused_calls_total", &[("method", "Join")]), 2.0);
        assert!(dlm.daemon.log_text().contains("refused an unauthenticated call"));

        // 2. Oversized names, LVBs, lockspace names and messages.
        assert!(matches!(a.lock(&[b'n'; 65], Mode::EX, 0).await, Err(ClientError::InvalidArgument(_))));
        assert!(matches!(a.lock(&[b'n'; 60_000], Mode::EX, 0).await, Err(ClientError::InvalidArgument(_))));
        assert!(matches!(a.unlock(g.lock_id, Some(&[0u8; 65])).await, Err(ClientError::InvalidArgument(_))));
        let mut r = raw(&addr, Some(secret.clone())).await;
        let mut big_lvb = lock_req(a.session_id(), b"q", Mode::EX);
        big_lvb.lvb = vec![7; 65];
        assert_eq!(r.lock(big_lvb).await.unwrap_err().code(), Code::InvalidArgument);
        let j = pb::JoinRequest { lockspace: "x".repeat(65), node_id: 2, ..Default::default() };
        assert_eq!(r.join(j).await.unwrap_err().code(), Code::InvalidArgument);
        let huge = r.lock(lock_req(a.session_id(), &vec![b'h'; 100_000], Mode::EX)).await.unwrap_err();
        assert_eq!(huge.code(), Code::OutOfRange, "{huge:?}");
        assert!(huge.message().contains("too large"), "{huge:?}");
        assert_eq!(a.dump(true).await.unwrap().lockspaces[0].resources.len(), 1, "nothing oversized was kept");

        // 3. Garbage, HTTP/1, silence and half a preface: closed before tonic sees them.
        let addr2 = addr.clone();
        let closed = tokio::task::spawn_blocking(move || {
            [
                closed_by_server(&addr2, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage garbage", T),
                closed_by_server(&addr2, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", T),
                closed_by_server(&addr2, b"", T),
                closed_by_server(&addr2, b"PRI * HTTP/2.0\r\n", T),
                // A preface, then frames that are not HTTP/2: hyper ends the connection.
                closed_by_server(&addr2, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", T),
            ]
        })
        .await
        .unwrap();
        assert_eq!(closed, [true; 5]);
        let m = dlm.scrape().unwrap();
        let rejected = |r: &str| mcfs_integration::dlmd::metric(&m, "mcfs_dlm_connections_rejected_total", &[("reason", r)]).unwrap_or(0.0);
        assert_eq!((rejected("garbage"), rejected("handshake_timeout")), (2.0, 2.0), "{m}");

        // 4. A call that sends its headers and stalls before its message: cut off
        //    after request_timeout_ms with DEADLINE_EXCEEDED.
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut grpc = tonic::client::Grpc::new(ch);
        grpc.ready().await.unwrap();
        let body = tokio_stream::pending::<pb::LockRequest>();
        let req = secret.attach(tonic::Request::new(body));
        let codec = tonic_prost::ProstCodec::<pb::LockRequest, pb::LockReply>::default();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/mcfs.dlm.Dlm/Lock");
        let t0 = Instant::now();
        let err = tokio::time::timeout(T, grpc.client_streaming(req, path, codec)).await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(t0.elapsed() >= Duration::from_millis(900), "{:?}", t0.elapsed());
        assert_eq!(dlm.value("mcfs_dlm_rpc_timeouts_total", &[("method", "Lock")]), 1.0);

        // 5. More connections than allowed: the extra ones are closed at once.
        let idle: Vec<std::net::TcpStream> =
            (0..24).filter_map(|_| std::net::TcpStream::connect(&addr).ok()).collect();
        wait_for("connections refused over the limit", T, || {
            (dlm.value("mcfs_dlm_connections_rejected_total", &[("reason", "limit")]) > 0.0).then_some(())
        })
        .unwrap();
        drop(idle);

        // Through all of it, the well-behaved client was never disturbed.
        let g2 = a.lock(b"r2", Mode::EX, 0).await.unwrap();
        a.unlock(g2.lock_id, None).await.unwrap();
        a.unlock(g.lock_id, None).await.unwrap();
        let st = a.stats().await.unwrap();
        assert_eq!(st.sessions, 1);
        assert!(st.connections_rejected >= 5, "{st:?}");
        a.leave().await.unwrap();
    });
}

#[test]
fn a_flood_from_one_client_gets_resource_exhausted_while_another_keeps_getting_grants() {
    let dir = tempdir();
    let sf = secret_file(dir.path()).unwrap();
    let secret = secret_of(&sf);
    let dlm = start_dlm(
        dir.path(),
        "dlm",
        &sf,
        None,
        &["--max-locks-per-node", "300", "--max-pending-per-node", "20"],
    )
    .unwrap();
    let addr = dlm.addr.clone();
    runtime().block_on(async {
        let (holder, _he) = client(&addr, &secret, 2).await;
        let mut held = Vec::new();
        for i in 0..10 {
            held.push(holder.lock(format!("hot/{i}").as_bytes(), Mode::EX, 0).await.unwrap());
        }
        let (flood, _fe) = client(&addr, &secret, 1).await;
        let (good, _ge) = client(&addr, &secret, 3).await;

        // The well-behaved client takes and releases locks the whole time.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g2, stop2) = (good.clone(), stop.clone());
        let meter = tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = 0u64;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) || lat.len() < 200 {
                let t0 = Instant::now();
                let g = g2.lock(format!("good/{}", k % 50).as_bytes(), Mode::EX, 0).await?;
                lat.push(t0.elapsed());
                g2.unlock(g.lock_id, None).await?;
                k += 1;
            }
            Ok::<_, ClientError>(lat)
        });

        // 3000 requests at once: new locks past the per-node lock limit, and
        // requests that must queue behind the holder past the pending limit.
        let mut tasks = Vec::new();
        for i in 0..3000u32 {
            let f = flood.clone();
            tasks.push(tokio::spawn(async move {
                let name = if i % 3 == 0 { format!("hot/{}", i % 10) } else { format!("flood/{i}") };
                tokio::time::timeout(Duration::from_secs(5), f.lock(name.as_bytes(), Mode::EX, 0)).await
            }));
        }
        let (mut granted, mut over_locks, mut over_pending, mut still_queued, mut other) = (0, 0, 0, 0, Vec::new());
        for t in tasks {
            match t.await.unwrap() {
                Ok(Ok(_)) => granted += 1,
                Ok(Err(ClientError::ResourceExhausted(m))) if m.contains("owns") => over_locks += 1,
                Ok(Err(ClientError::ResourceExhausted(m))) if m.contains("queued requests") => over_pending += 1,
                Err(_) => still_queued += 1, // waiting behind the holder; dropped = cancelled
                Ok(Err(e)) => other.push(e),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut lat = meter.await.unwrap().unwrap();
        lat.sort();
        let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
        println!(
            "flood: granted {granted}, over the lock limit {over_locks}, over the pending limit {over_pending}, \
             queued until the test gave up {still_queued}; well-behaved client: {} grants, p50 {:?} p99 {:?} max {:?}",
            lat.len(),
            p(0.5),
            p(0.99),
            lat[lat.len() - 1]
        );
        assert!(other.is_empty(), "{other:?}");
        assert!(over_locks > 0 && over_pending > 0, "both limits were hit");
        assert!(granted <= 300 && still_queued <= 20, "granted {granted}, queued {still_queued}");
        // Bounded latency for the others (a bound, not a speed target).
        assert!(lat[lat.len() - 1] < Duration::from_secs(2), "max {:?}", lat[lat.len() - 1]);
        let exhausted = dlm.value("mcfs_dlm_lock_ops_total", &[("kind", "lock"), ("outcome", "resource_exhausted")]);
        assert_eq!(exhausted, f64::from(over_locks + over_pending));
        let d = good.dump(false).await.unwrap();
        let m1 = d.lockspaces[0].members.iter().find(|m| m.node_id == 1).unwrap();
        assert!(m1.locks_held <= 300 && m1.pending <= 20, "{m1:?}");
        for g in held {
            holder.unlock(g.lock_id, None).await.unwrap();
        }
        for c in [flood, good, holder] {
            c.leave().await.unwrap();
        }
    });
}

#[test]
fn more_sessions_than_allowed_are_refused_until_one_leaves() {
    let dir = tempdir();
    let sf = secret_file(dir.path()).unwrap();
    let secret = secret_of(&sf);
    let dlm = start_dlm(dir.path(), "dlm", &sf, None, &["--max-sessions", "3"]).unwrap();
    let addr = dlm.addr.clone();
    runtime().block_on(async {
        let mut cs = Vec::new();
        for n in 1..=3 {
            cs.push(client(&addr, &secret, n).await.0);
        }
        let mut r = raw(&addr, Some(secret.clone())).await;
        let j = pb::JoinRequest { lockspace: LS.into(), node_id: 4, ..Default::default() };
        let e = r.join(j.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.message().contains("sessions open"), "{e:?}");
        let cfg = ClientConfig {
            addr: addr.clone(),
            secret: secret.clone(),
            lockspace: "other:fs".into(),
            node_id: 4,
            admin_addr: String::new(),
        };
        let e = DlmClient::connect(cfg.clone()).await.err().unwrap();
        assert!(e.to_string().contains("ResourceExhausted"), "{e}");
        // The others are untouched, and a slot frees when one leaves.
        let g = cs[0].lock(b"x", Mode::EX, 0).await.unwrap();
        cs[0].unlock(g.lock_id, None).await.unwrap();
        cs.pop().unwrap().leave().await.unwrap();
        let (d, _de) = DlmClient::connect(cfg).await.unwrap();
        assert_eq!(d.stats().await.unwrap().sessions, 3);
        d.leave().await.unwrap();
        for c in cs {
            c.leave().await.unwrap();
        }
    });
    drop(dlm);
}

/// A raw session that keeps its lease alive but never reads its Events
/// stream (or never even opens it), holding an EX lock.
async fn deaf_session(addr: &str, secret: &Secret, node: u32, attach: bool, res: &[u8]) -> (u64, tokio::task::JoinHandle<()>, Option<tonic::Streaming<pb::Event>>) {
    let mut r = raw(addr, Some(secret.clone())).await;
    let sid = r.join(pb::JoinRequest { lockspace: LS.into(), node_id: node, ..Default::default() }).await.unwrap().into_inner().session_id;
    let events = if attach { Some(r.events(pb::EventsRequest { session_id: sid }).await.unwrap().into_inner()) } else { None };
    let st = r.lock(lock_req(sid, res, Mode::EX)).await.unwrap().into_inner().status;
    assert_eq!(st, pb::LockStatus::Granted as i32);
    let mut hb = r.clone();
    let beat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if hb.heartbeat(pb::HeartbeatRequest { session_id: sid, events_received: 0 }).await.is_err() {
                return;
            }
        }
    });
    (sid, beat, events)
}

#[test]
fn clients_that_do_not_read_their_events_are_evicted_in_bounded_time() {
    let dir = tempdir();
    let sf = secret_file(dir.path()).unwrap();
    let secret = secret_of(&sf);
    let dlm = start_dlm(
        dir.path(),
        "dlm",
        &sf,
        None,
        &["--heartbeat-ms", "200", "--lease-ms", "1000", "--evict-after-ms", "2000"],
    )
    .unwrap();
    let addr = dlm.addr.clone();
    runtime().block_on(async {
        let (a, _ae) = client(&addr, &secret, 1).await;
        // Node 2 attached its stream but never reads it; node 4 never attached one.
        let (_s2, beat2, _stream2) = deaf_session(&addr, &secret, 2, true, b"deaf").await;
        let (_s4, beat4, _) = deaf_session(&addr, &secret, 4, false, b"mute").await;
        let t0 = Instant::now();
        let (a1, a2) = (a.clone(), a.clone());
        let w1 = tokio::spawn(async move { a1.lock(b"deaf", Mode::EX, 0).await });
        let w2 = tokio::spawn(async move { a2.lock(b"mute", Mode::EX, 0).await });
        // Everyone else is served meanwhile, promptly.
        let mut worst = Duration::ZERO;
        while !(w1.is_finished() && w2.is_finished()) && t0.elapsed() < T {
            let t = Instant::now();
            let g = a.lock(b"other", Mode::EX, 0).await.unwrap();
            a.unlock(g.lock_id, None).await.unwrap();
            worst = worst.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let g1 = w1.await.unwrap().unwrap();
        let g2 = w2.await.unwrap().unwrap();
        let took = t0.elapsed();
        println!("both deaf holders evicted and their locks granted after {took:?}; worst other grant {worst:?}");
        // Evicted after evict_after_ms (2 s) plus a reaper tick, not before, not much later.
        assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(10), "{took:?}");
        assert!(worst < Duration::from_secs(1), "{worst:?}");
        let m = dlm.scrape().unwrap();
        let f = |r: &str| mcfs_integration::dlmd::metric(&m, "mcfs_dlm_session_failures_total", &[("reason", r)]).unwrap_or(0.0);
        assert_eq!((f("evicted"), f("never_attached"), f("lease_expired")), (1.0, 1.0, 0.0), "{m}");
        let log = dlm.daemon.log_text();
        assert!(log.contains("are not confirmed") && log.contains("never attached"), "{log}");
        // Their heartbeats now find no session.
        tokio::time::timeout(T, beat2).await.unwrap().unwrap();
        tokio::time::timeout(T, beat4).await.unwrap().unwrap();
        a.unlock(g1.lock_id, None).await.unwrap();
        a.unlock(g2.lock_id, None).await.unwrap();
        let d = a.dump(false).await.unwrap();
        let states: Vec<(u32, String)> = d.lockspaces[0].members.iter().map(|m| (m.node_id, m.state.clone())).collect();
        assert_eq!(states, vec![(1, "active".into()), (2, "fenced".into()), (4, "fenced".into())]);
        a.leave().await.unwrap();
    });
}

#[test]
fn a_stopped_lock_server_does_not_cost_its_clients_their_sessions() {
    let dir = tempdir();
    let sf = secret_file(dir.path()).unwrap();
    let secret = secret_of(&sf);
    let dlm = start_dlm(dir.path(), "dlm", &sf, None, &["--heartbeat-ms", "200", "--lease-ms", "1000"]).unwrap();
    let addr = dlm.addr.clone();
    runtime().block_on(async {
        let (a, _ae) = client(&addr, &secret, 1).await;
        let (b, _be) = client(&addr, &secret, 2).await;
        let g = a.lock(b"r", Mode::EX, 0).await.unwrap();
        dlm.daemon.signal(libc::SIGSTOP);
        // Three leases without an answer: the clients notice and say so ...
        let t0 = Instant::now();
        while a.server_silent_for() < Duration::from_millis(1500) {
            assert!(t0.elapsed() < T, "the client never noticed the silence");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let b2 = b.clone();
        let blocked = tokio::spawn(async move { b2.lock(b"s", Mode::EX, 0).await });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!blocked.is_finished());
        dlm.daemon.signal(libc::SIGCONT);
        // ... and once it runs again, it blames itself, not them.
        let gs = tokio::time::timeout(T, blocked).await.unwrap().unwrap().unwrap();
        let g2 = a.lock(b"r2", Mode::EX, 0).await.unwrap();
        let st = a.stats().await.unwrap();
        assert!(st.session_failures.iter().all(|f| f.count == 0), "{st:?}");
        assert_eq!(st.sessions, 2);
        let d = a.dump(false).await.unwrap();
        assert!(d.lockspaces[0].members.iter().all(|m| m.state == "active"), "{d:?}");
        assert!(dlm.daemon.log_text().contains("leases extended"));
        wait_for("heartbeats answered again", T, || (a.server_silent_for() == Duration::ZERO).then_some(())).unwrap();
        a.unlock(g.lock_id, None).await.unwrap();
        a.unlock(g2.lock_id, None).await.unwrap();
        b.unlock(gs.lock_id, None).await.unwrap();
        a.leave().await.unwrap();
        b.leave().await.unwrap();
    });
}
