//! Server settings: defaults, an optional TOML file, then command-line flags.

use crate::core::Limits;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

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
    /// `evict_after_ms`, or over `event_queue_hard`, evicts the session.
    pub event_queue_soft: usize,
    pub event_queue_hard: usize,
    pub evict_after_ms: u64,
    /// Locks listed per resource dump (`Dump` with locks=true) before truncating.
    pub dump_max_resources: usize,
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
        if self.max_sessions == 0 || self.limits.max_locks_per_node == 0 || self.limits.max_pending_per_node == 0 {
            return Err(Error::Config("limits must be positive".into()));
        }
        Ok(())
    }
}

/// The TOML file (`--config`): every key optional; flags win.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<std::path::PathBuf>,
    pub secret_file: Option<std::path::PathBuf>,
    pub fence: Option<String>,
    pub no_fencing: Option<bool>,
    pub addr_file: Option<std::path::PathBuf>,
    pub heartbeat_ms: Option<u32>,
    pub lease_ms: Option<u32>,
    pub grace_ms: Option<u32>,
    pub max_sessions: Option<usize>,
    pub max_locks_per_node: Option<usize>,
    pub max_pending_per_node: Option<usize>,
    pub event_queue_soft: Option<usize>,
    pub event_queue_hard: Option<usize>,
    pub evict_after_ms: Option<u64>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig> {
        let s = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("read {}: {e}", path.display())))?;
        toml::from_str(&s).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Apply the file's tunables over `c`.
    pub fn apply(&self, c: &mut ServerConfig) {
        if let Some(v) = self.heartbeat_ms {
            c.heartbeat_ms = v;
        }
        if let Some(v) = self.lease_ms {
            c.lease_ms = v;
        }
        if let Some(v) = self.grace_ms {
            c.grace_ms = v;
        }
        if let Some(v) = self.max_sessions {
            c.max_sessions = v;
        }
        if let Some(v) = self.max_locks_per_node {
            c.limits.max_locks_per_node = v;
        }
        if let Some(v) = self.max_pending_per_node {
            c.limits.max_pending_per_node = v;
        }
        if let Some(v) = self.event_queue_soft {
            c.event_queue_soft = v;
        }
        if let Some(v) = self.event_queue_hard {
            c.event_queue_hard = v;
        }
        if let Some(v) = self.evict_after_ms {
            c.evict_after_ms = v;
        }
    }
}
