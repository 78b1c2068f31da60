//! mcfs-dlm: the distributed lock manager of mcfs.
//!
//! Layout, one module a job:
//! * [`core`]: the lock manager itself, pure and synchronous (modes, queues,
//!   callbacks, LVBs, fencing tokens, the recovery state machine). Inputs in,
//!   effects out; tested exhaustively in memory.
//! * [`store`]: what must survive a restart, in sled.
//! * [`service`]: the tonic server: sessions, leases, event streams, the
//!   reaper; carries out the core's effects.
//! * [`fence_client`]: asks mcfs-fenced to fence failed nodes.
//! * [`client`]: the library node daemons use (`DlmClient`).
//! * [`bench`]: the benchmark behind `mcfs-dlm bench`.
//! * [`metrics`]: the server's counters (Prometheus `GET /metrics`, `Stats`).
//! * [`net`]: what sits between a port and a service in every mcfs daemon:
//!   the guarded accept loop, the metrics exposition and its HTTP responder.
//! * [`datadir`]: the lock (and pid file) a daemon holds on its data
//!   directory, shared with mcfs-fenced.
//! * [`config`], [`error`]: settings and the crate's one error type.

pub mod bench;
pub mod client;
pub mod config;
pub mod core;
pub mod datadir;
pub mod error;
pub mod fence_client;
pub mod metrics;
pub mod net;
pub mod service;
pub mod store;

pub use crate::core::{flags, Grant, Mode};
pub use client::{ClientConfig, ClientEvent, DlmClient, Recovery};
pub use error::{Error, Error as ClientError, Result};
pub use mcfs_proto::dlm::DumpReply;

/// Milliseconds since the Unix epoch (wall clock: failure and fence times are
/// compared with mcfs-fenced's).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
