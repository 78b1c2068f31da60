//! mcfs-node's Prometheus endpoint (docs/METRICS.md, "mcfs-node").

use std::io::{Read, Write};
use std::time::Duration;

use mcfs_integration::{wait_for, TestCluster};

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn value(text: &str, series: &str) -> f64 {
    text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' ')).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(-1.0)
}

#[test]
fn node_metrics_move_with_activity() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let (dir, mut o) = TestCluster::options(2);
    o.per_node_args.insert(1, vec!["--metrics".into(), addr.clone()]);
    let tc = TestCluster::up(dir, &o).unwrap();
    let before = scrape(&addr);
    assert!(before.contains("HTTP/1.1 200"), "{before}");
    assert!(before.contains("# TYPE mcfs_node_lock_request_seconds histogram"));
    let ops0 = value(&before, "mcfs_node_ops_total");
    std::fs::write(tc.mnt(1).join("f"), vec![7u8; 100_000]).unwrap();
    // node 2 reading it sends node 1 a blocking callback
    assert_eq!(std::fs::read(tc.mnt(2).join("f")).unwrap().len(), 100_000);
    let after = wait_for("callback counted", Duration::from_secs(10), || {
        let t = scrape(&addr);
        (value(&t, "mcfs_node_lock_callbacks_total") >= 1.0).then_some(t)
    })
    .unwrap();
    assert!(value(&after, "mcfs_node_ops_total") > ops0);
    assert!(value(&after, "mcfs_node_lock_requests_total") >= 1.0);
    assert!(value(&after, r#"mcfs_node_data_bytes_total{op="write"}"#) >= 100_000.0);
    assert!(value(&after, r#"mcfs_node_cache_bytes{kind="limit"}"#) > 0.0);
    assert_eq!(value(&after, "mcfs_node_withdrawn"), 0.0);
    assert_eq!(value(&after, "mcfs_node_reclaim_sleep_violations_total"), 0.0);
}
