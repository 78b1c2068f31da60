//! Prometheus metrics without a framework: a lock-free histogram, a writer for
//! the text exposition format (version 0.0.4), and a tiny HTTP/1.1 responder.
//!
//! Counters are plain atomics owned by each daemon; at scrape time the daemon
//! renders them (and gauges computed on the spot) with [`Exposition`]. Nothing
//! on a hot path allocates or takes a lock.
//!
//! The responder serves `GET /metrics` (and `HEAD`), one request per
//! connection (`Connection: close`), and nothing else: any other path is 404,
//! any other method 405, a request head over 8 KiB or slower than 5 s is
//! dropped. At most 16 scrapes run at once; more are closed at once.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Latency buckets (seconds) for lock grants and RPCs: 50 µs .. 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
];

/// Buckets (seconds) for slow operations: fencing, recoveries: 10 ms .. 1 h.
pub const SLOW_BUCKETS: &[f64] =
    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// A histogram with fixed upper bounds; `observe` is a few relaxed atomics.
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus +Inf. Not cumulative (summed at render time).
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

/// A consistent-enough copy for rendering: cumulative counts per bound.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    /// Cumulative, one per bound (the +Inf bucket is `count`).
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_secs: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_ns: AtomicU64::new(0) }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.iter().position(|b| secs <= *b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn observe_ms(&self, ms: u64) {
        self.observe(Duration::from_millis(ms));
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let mut cumulative = Vec::with_capacity(self.bounds.len());
        for c in self.counts.iter().take(self.bounds.len()) {
            acc += c.load(Ordering::Relaxed);
            cumulative.push(acc);
        }
        let count = acc + self.counts[self.bounds.len()].load(Ordering::Relaxed);
        HistogramSnapshot { bounds: self.bounds, cumulative, count, sum_secs: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9 }
    }
}

impl HistogramSnapshot {
    /// Upper bound of the bucket holding quantile `q` (0..1), in seconds; the
    /// largest bound when it lies beyond them; 0 with no observations.
    pub fn quantile_upper_bound(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        for (b, c) in self.bounds.iter().zip(&self.cumulative) {
            if *c >= rank {
                return *b;
            }
        }
        self.bounds.last().copied().unwrap_or(0.0)
    }
}

/// Builds a text exposition. Each metric family gets its HELP and TYPE once,
/// then its samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn labels(l: &[(&str, &str)], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn num(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// `# HELP` and `# TYPE` lines; `kind` is counter, gauge or histogram.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    pub fn sample(&mut self, name: &str, l: &[(&str, &str)], v: f64) -> &mut Self {
        let _ = writeln!(self.out, "{name}{} {}", labels(l, None), num(v));
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, v: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], v)
    }

    /// The `_bucket`, `_sum` and `_count` samples of one histogram series.
    pub fn histogram(&mut self, name: &str, l: &[(&str, &str)], h: &HistogramSnapshot) -> &mut Self {
        for (b, c) in h.bounds.iter().zip(&h.cumulative) {
            let _ = writeln!(self.out, "{name}_bucket{} {c}", labels(l, Some(("le", num(*b)))));
        }
        let _ = writeln!(self.out, "{name}_bucket{} {}", labels(l, Some(("le", "+Inf".into()))), h.count);
        let _ = writeln!(self.out, "{name}_sum{} {}", labels(l, None), num(h.sum_secs));
        let _ = writeln!(self.out, "{name}_count{} {}", labels(l, None), h.count);
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Renders the current metrics.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

const MAX_HEAD: usize = 8192;
const MAX_SCRAPES: usize = 16;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve `GET /metrics` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, render: Render) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Some(head)) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await else { return };
            let resp = respond(&head, &render);
            let _ = tokio::time::timeout(HEAD_TIMEOUT, async {
                stream.write_all(&resp).await?;
                stream.shutdown().await
            })
            .await;
        });
    }
}

/// Read up to the blank line that ends the request head.
async fn read_head(s: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(String::from_utf8_lossy(&buf[..end]).into_owned());
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
    }
}

fn respond(head: &str, render: &Render) -> Vec<u8> {
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render()),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain; charset=utf-8", "only /metrics is served here\n".into()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "use GET\n".into()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_quantiles_bounded() {
        let h = Histogram::new(&[0.001, 0.01, 0.1]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(2));
        let s = h.snapshot();
        assert_eq!(s.cumulative, vec![1, 3, 3]);
        assert_eq!(s.count, 4);
        assert!((s.sum_secs - 2.0105).abs() < 1e-9, "{}", s.sum_secs);
        assert_eq!(s.quantile_upper_bound(0.5), 0.01);
        assert_eq!(s.quantile_upper_bound(0.25), 0.001);
        assert_eq!(s.quantile_upper_bound(1.0), 0.1, "beyond the last bound");
        assert_eq!(Histogram::new(&[1.0]).snapshot().quantile_upper_bound(0.99), 0.0);
    }

    #[test]
    fn exposition_format() {
        let h = Histogram::new(&[0.5]);
        h.observe(Duration::from_millis(100));
        let mut e = Exposition::new();
        e.family("x_total", "counter", "Things.\nMore.")
            .sample("x_total", &[("kind", "a\"b\\c\nd")], 3.0)
            .single("y", "gauge", "Y.", 0.25)
            .family("z_seconds", "histogram", "Z.")
            .histogram("z_seconds", &[("k", "v")], &h.snapshot());
        let t = e.finish();
        assert!(t.contains("# HELP x_total Things.\\nMore.\n# TYPE x_total counter\n"), "{t}");
        assert!(t.contains("x_total{kind=\"a\\\"b\\\\c\\nd\"} 3\n"), "{t}");
        assert!(t.contains("y 0.25\n"), "{t}");
        assert!(t.contains("z_seconds_bucket{k=\"v\",le=\"0.5\"} 1\n"), "{t}");
        assert!(t.contains("z_seconds_bucket{k=\"v\",le=\"+Inf\"} 1\n"), "{t}");
        assert!(t.contains("z_seconds_count{k=\"v\"} 1\n"), "{t}");
    }

    #[tokio::test]
    async fn http_responder_serves_only_get_metrics() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, Arc::new(|| "m 1\n".to_string())));
        let get = |req: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let r = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\nm 1\n"), "{r}");
        assert!(r.contains("Content-Length: 4\r\n"), "{r}");
        assert!(get("GET / HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        let h = get("HEAD /metrics HTTP/1.0\r\n\r\n").await;
        assert!(h.starts_with("HTTP/1.1 200") && h.ends_with("\r\n\r\n"), "{h}");
    }
}
