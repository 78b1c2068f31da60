//! Server settings: defaults, an optional TOML file, then command-line flags.
//!
//! [`Settings`] is both the flag set and the TOML schema (same names, `-` in
//! flags, `_` in TOML), so a key can never exist in one and not the other.
//! Every bound the server enforces is a field of [`ServerConfig`] and a key
//! here; docs/CONFIGURATION.md lists them with their defaults.

use crate::core::Limits;
use crate::error::{Error, Result};
use crate::fence_client::FenceOptions;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Tunables of a running server (everything but where it listens and stores).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub heartbeat_ms: u32,
    pub lease_ms: u32,
    /// After a restart: how long recorded members have to come back and reclaim.
    pub grace_ms: u32,
    pub max_sessions: usize,
    pub max_lockspaces: usize,
    pub limits: Limits,
    /// Per-session undelivered events: over `event_queue_soft` for
    /// `evict_after_ms`, or over `event_queue_hard`, evicts the session. Past
    /// the soft bound the session's Ops stream is not read until it drains.
    pub event_queue_soft: usize,
    pub event_queue_hard: usize,
    /// Also: events handed to a session's stream and not confirmed by its
    /// heartbeats (`events_received`) for this long evict it.
    pub evict_after_ms: u64,
    /// Locks listed per resource dump (`Dump` with locks=true) before truncating.
    pub dump_max_resources: usize,
    /// Open TCP connections (including those still in their handshake).
    pub max_connections: usize,
    /// A connection must send the HTTP/2 preface within this time.
    pub handshake_timeout_ms: u64,
    /// HTTP/2 streams (concurrent calls) per connection.
    pub max_streams_per_connection: u32,
    /// Largest request message, bytes.
    pub max_message_bytes: usize,
    /// Deadline of a unary call, from its headers to its reply (Events and Ops
    /// streams are exempt: they live as long as the session).
    pub request_timeout_ms: u64,
    /// HTTP/2 ping interval; a peer that does not answer within the same time
    /// is disconnected.
    pub keepalive_ms: u64,
    /// Calls to mcfs-fenced.
    pub fence: FenceOptions,
    /// The cluster this server serves: when set, a Join must name a lockspace
    /// `<cluster_name>:<fsname>` (a filesystem made with `mkfs -t
    /// <cluster_name>:...`); any other is refused. Unset: every lockspace.
    pub cluster_name: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            heartbeat_ms: 1000,
            lease_ms: 3000,
            grace_ms: 10_000,
            max_sessions: 1024,
            max_lockspaces: 256,
            limits: Limits::default(),
            event_queue_soft: 65_536,
            event_queue_hard: 1_048_576,
            evict_after_ms: 10_000,
            dump_max_resources: 10_000,
            max_connections: 4096,
            handshake_timeout_ms: 5000,
            max_streams_per_connection: 256,
            max_message_bytes: 32 << 20,
            request_timeout_ms: 30_000,
            keepalive_ms: 10_000,
            fence: FenceOptions::default(),
            cluster_name: None,
        }
    }
}

impl ServerConfig {
    pub fn validate(&self) -> Result<()> {
        if self.heartbeat_ms == 0 || self.lease_ms < 2 * self.heartbeat_ms {
            return Err(Error::Config(format!(
                "lease ({} ms) must be at least twice the heartbeat ({} ms)",
                self.lease_ms, self.heartbeat_ms
            )));
        }
        if self.evict_after_ms < 2 * u64::from(self.heartbeat_ms) {
            return Err(Error::Config(format!(
                "evict_after_ms ({}) must be at least twice the heartbeat ({} ms): clients confirm events with their heartbeats",
                self.evict_after_ms, self.heartbeat_ms
            )));
        }
        let positive = [
            ("max_sessions", self.max_sessions as u64),
            ("max_lockspaces", self.max_lockspaces as u64),
            ("max_locks_per_node", self.limits.max_locks_per_node as u64),
            ("max_pending_per_node", self.limits.max_pending_per_node as u64),
            ("event_queue_soft", self.event_queue_soft as u64),
            ("max_connections", self.max_connections as u64),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("max_streams_per_connection", u64::from(self.max_streams_per_connection)),
            ("max_message_bytes", self.max_message_bytes as u64),
            ("request_timeout_ms", self.request_timeout_ms),
            ("keepalive_ms", self.keepalive_ms),
            ("fence_call_timeout_ms", self.fence.call_timeout.as_millis() as u64),
            ("fence_retry_min_ms", self.fence.retry_min.as_millis() as u64),
        ];
        if let Some((k, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Config(format!("{k} must be positive")));
        }
        if self.max_streams_per_connection < 4 {
            return Err(Error::Config("max_streams_per_connection must be at least 4 (a client uses 3 at once)".into()));
        }
        if self.fence.retry_max < self.fence.retry_min {
            return Err(Error::Config("fence_retry_max_ms must be at least fence_retry_min_ms".into()));
        }
        if let Some(c) = &self.cluster_name {
            check_cluster_name(c)?;
        }
        Ok(())
    }

    /// May a node join lockspace `name`? Refused when it belongs to another
    /// cluster than `cluster_name` (if set): its filesystem was made for
    /// another cluster, and mixing clusters' lockspaces on one server is how
    /// the wrong lock server ends up guarding a disk.
    pub fn check_lockspace_cluster(&self, name: &str) -> Result<()> {
        let Some(mine) = &self.cluster_name else { return Ok(()) };
        match name.split_once(':') {
            Some((cluster, _)) if cluster == mine => Ok(()),
            Some((cluster, _)) => Err(Error::FailedPrecondition(format!(
                "filesystem table {name} belongs to cluster {cluster}; this lock server serves cluster {mine}"
            ))),
            None => Err(Error::FailedPrecondition(format!(
                "filesystem table {name} names no cluster (CLUSTER:FSNAME); this lock server serves cluster {mine}"
            ))),
        }
    }
}

/// The rule mkfs applies to the cluster part of `-t CLUSTER:FSNAME`
/// (`mcfs_format::sb::parse_table`): a name that mkfs cannot write could never
/// match a filesystem.
fn check_cluster_name(c: &str) -> Result<()> {
    if c.is_empty() || c.len() > 31 {
        return Err(Error::Config(format!("cluster_name {c:?} must be 1 to 31 characters")));
    }
    if !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(Error::Config(format!("cluster_name {c:?} may contain only letters, digits, '-' and '_'")));
    }
    Ok(())
}

/// Every setting, as flags and as TOML keys (all optional; flags win).
#[derive(clap::Args, Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on (host:port; port 0 picks one).
    #[arg(long)]
    pub listen: Option<String>,
    /// Directory of the sled database.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// File holding the cluster secret.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// The cluster this server serves: refuse filesystems (lock tables
    /// CLUSTER:FSNAME) made for another cluster. Recommended.
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Address of mcfs-fenced.
    #[arg(long, conflicts_with = "no_fencing")]
    pub fence: Option<String>,
    /// Treat every fence as done at once. UNSAFE: single-host demos only.
    #[arg(long)]
    #[serde(default)]
    pub no_fencing: bool,
    /// Write the bound address (host:port) here once listening.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Serve Prometheus metrics (GET /metrics) on this address (host:port).
    #[arg(long)]
    pub metrics: Option<String>,
    /// Write the bound metrics address (host:port) here once listening.
    #[arg(long)]
    pub metrics_addr_file: Option<PathBuf>,
    /// Heartbeat period clients are told to use [1000].
    #[arg(long)]
    pub heartbeat_ms: Option<u32>,
    /// Lease: a session without a heartbeat for this long fails [3000].
    #[arg(long)]
    pub lease_ms: Option<u32>,
    /// Grace window after a restart for members to reclaim their locks [10000].
    #[arg(long)]
    pub grace_ms: Option<u32>,
    /// Sessions open at once, all lockspaces [1024].
    #[arg(long)]
    pub max_sessions: Option<usize>,
    /// Lockspaces [256].
    #[arg(long)]
    pub max_lockspaces: Option<usize>,
    /// Locks one node may own in a lockspace [1000000].
    #[arg(long)]
    pub max_locks_per_node: Option<usize>,
    /// Requests and conversions of one node that may wait in a queue [65536].
    #[arg(long)]
    pub max_pending_per_node: Option<usize>,
    /// Undelivered events per session before its Ops stream is paused, and,
    /// if that lasts evict_after_ms, the session evicted [65536].
    #[arg(long)]
    pub event_queue_soft: Option<usize>,
    /// Undelivered events per session that evict it at once [1048576].
    #[arg(long)]
    pub event_queue_hard: Option<usize>,
    /// A session that does not read (confirm) its events for this long is evicted [10000].
    #[arg(long)]
    pub evict_after_ms: Option<u64>,
    /// Open TCP connections [4096].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// A connection must send the HTTP/2 preface within this time [5000].
    #[arg(long)]
    pub handshake_timeout_ms: Option<u64>,
    /// Concurrent calls (HTTP/2 streams) per connection [256].
    #[arg(long)]
    pub max_streams_per_connection: Option<u32>,
    /// Largest request message in bytes [33554432].
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// Deadline of a unary call [30000].
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// HTTP/2 ping interval; a peer silent as long again is disconnected [10000].
    #[arg(long)]
    pub keepalive_ms: Option<u64>,
    /// Deadline of one call to mcfs-fenced [5000].
    #[arg(long)]
    pub fence_call_timeout_ms: Option<u64>,
    /// First retry delay after a failed fence call, doubled each time [100].
    #[arg(long)]
    pub fence_retry_min_ms: Option<u64>,
    /// Largest retry delay of fence calls [5000].
    #[arg(long)]
    pub fence_retry_max_ms: Option<u64>,
}

/// The TOML file (`--config`). Kept as a name for the file's schema.
pub type FileConfig = Settings;

macro_rules! overlay {
    ($dst:ident, $src:ident; $($f:ident),*) => {
        $( if $src.$f.is_some() { $dst.$f = $src.$f.clone(); } )*
    };
}

impl Settings {
    pub fn load(path: &Path) -> Result<Settings> {
        let s = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("read {}: {e}", path.display())))?;
        toml::from_str(&s).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// `self` (from the file) with every setting `flags` gives replaced.
    pub fn overlaid(mut self, flags: &Settings) -> Settings {
        overlay!(self, flags; listen, data_dir, secret_file, cluster_name, fence, addr_file, metrics, metrics_addr_file,
            heartbeat_ms, lease_ms, grace_ms, max_sessions, max_lockspaces, max_locks_per_node,
            max_pending_per_node, event_queue_soft, event_queue_hard, evict_after_ms, max_connections,
            handshake_timeout_ms, max_streams_per_connection, max_message_bytes, request_timeout_ms,
            keepalive_ms, fence_call_timeout_ms, fence_retry_min_ms, fence_retry_max_ms);
        self.no_fencing |= flags.no_fencing;
        self
    }

    /// Apply the tunables over `c`.
    pub fn apply(&self, c: &mut ServerConfig) {
        macro_rules! set {
            ($($f:ident => $dst:expr),* $(,)?) => { $( if let Some(v) = self.$f { $dst = v; } )* };
        }
        set!(
            heartbeat_ms => c.heartbeat_ms,
            lease_ms => c.lease_ms,
            grace_ms => c.grace_ms,
            max_sessions => c.max_sessions,
            max_lockspaces => c.max_lockspaces,
            max_locks_per_node => c.limits.max_locks_per_node,
            max_pending_per_node => c.limits.max_pending_per_node,
            event_queue_soft => c.event_queue_soft,
            event_queue_hard => c.event_queue_hard,
            evict_after_ms => c.evict_after_ms,
            max_connections => c.max_connections,
            handshake_timeout_ms => c.handshake_timeout_ms,
            max_streams_per_connection => c.max_streams_per_connection,
            max_message_bytes => c.max_message_bytes,
            request_timeout_ms => c.request_timeout_ms,
            keepalive_ms => c.keepalive_ms,
        );
        if self.cluster_name.is_some() {
            c.cluster_name = self.cluster_name.clone();
        }
        if let Some(v) = self.fence_call_timeout_ms {
            c.fence.call_timeout = Duration::from_millis(v);
        }
        if let Some(v) = self.fence_retry_min_ms {
            c.fence.retry_min = Duration::from_millis(v);
        }
        if let Some(v) = self.fence_retry_max_ms {
            c.fence.retry_max = Duration::from_millis(v);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn file_then_flags_then_validation() {
        let file: Settings = toml::from_str(
            "listen = \"127.0.0.1:1\"\nlease_ms = 4000\nmax_connections = 10\nfence_call_timeout_ms = 700\nno_fencing = true\n",
        )
        .unwrap();
        let flags = Settings { lease_ms: Some(5000), metrics: Some("127.0.0.1:0".into()), ..Default::default() };
        let s = file.overlaid(&flags);
        assert_eq!((s.listen.as_deref(), s.lease_ms, s.metrics.as_deref(), s.no_fencing), (Some("127.0.0.1:1"), Some(5000), Some("127.0.0.1:0"), true));
        let mut c = ServerConfig::default();
        s.apply(&mut c);
        assert_eq!((c.lease_ms, c.max_connections, c.fence.call_timeout), (5000, 10, Duration::from_millis(700)));
        c.validate().unwrap();
        assert!(toml::from_str::<Settings>("lease = 3").is_err(), "unknown keys are errors");
        for bad in [
            ServerConfig { lease_ms: 1000, ..Default::default() },
            ServerConfig { evict_after_ms: 1000, ..Default::default() },
            ServerConfig { max_connections: 0, ..Default::default() },
            ServerConfig { max_streams_per_connection: 2, ..Default::default() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cluster_name_from_file_or_flag_refuses_other_clusters() {
        let file: Settings = toml::from_str("cluster_name = \"prod\"\n").unwrap();
        let mut c = ServerConfig::default();
        file.clone().overlaid(&Settings::default()).apply(&mut c);
        assert_eq!(c.cluster_name.as_deref(), Some("prod"));
        let flags = Settings { cluster_name: Some("mine".into()), ..Default::default() };
        let mut c = ServerConfig::default();
        file.overlaid(&flags).apply(&mut c);
        assert_eq!(c.cluster_name.as_deref(), Some("mine"), "flags win");
        c.validate().unwrap();
        c.check_lockspace_cluster("mine:fs").unwrap();
        let e = c.check_lockspace_cluster("other:fs").unwrap_err();
        assert_eq!(
            e,
            Error::FailedPrecondition("filesystem table other:fs belongs to cluster other; this lock server serves cluster mine".into())
        );
        assert!(c.check_lockspace_cluster("minefs").unwrap_err().to_string().contains("names no cluster"));
        assert!(c.check_lockspace_cluster("mine2:fs").is_err(), "a prefix is not the cluster");
        // unset: anything goes
        ServerConfig::default().check_lockspace_cluster("other:fs").unwrap();
        for bad in ["", "a:b", "has space", "x".repeat(32).as_str()] {
            let c = ServerConfig { cluster_name: Some(bad.into()), ..Default::default() };
            assert!(c.validate().unwrap_err().to_string().contains("cluster_name"), "{bad:?}");
        }
    }
}
