//! mcfs-fenced: cuts a failed node off the shared disk before anyone replays its
//! journal or takes the locks it held, and keeps a durable record of doing so.
//!
//! # Protocol (proto/fence.proto), step by step
//!
//! 1. mcfs-dlm sees node N fail at time F and calls `Fence{request_id, node N, F}`.
//!    Every call carries the cluster secret (`authorization: Bearer ...`). A call
//!    without the right secret is refused with UNAUTHENTICATED, changes nothing,
//!    and is recorded (`History.refused`, newest 1000 kept).
//! 2. The request id is the operation's identity. The first call inserts a PENDING
//!    record in sled (compare-and-swap, flushed) and starts the operation; every
//!    later call with that id, concurrent or after a restart of either side, gets
//!    the recorded outcome and never fences twice. An id reused for another node
//!    or for Unfence is refused (ALREADY_EXISTS). A node id that is not configured
//!    is refused (NOT_FOUND) naming the configured ones. The operation is started
//!    before the call first waits (for the flush), so a caller that gives up
//!    mid-call (its deadline, a reset stream) cannot leave a PENDING record that
//!    nothing will ever finish; the operation itself acts only once the record
//!    is flushed.
//! 3. The caller polls (`Fence` again with the same id, or `Status`) until SUCCESS
//!    or FAILED. Operations on one node run one at a time, in arrival order.
//! 4. The node's levels run in configured order; the first level that fully
//!    succeeds wins and later levels do not run. Each attempt (level, method,
//!    start, end, ok, message) is logged with `tracing` and appended to the record,
//!    which is flushed after each failed level.
//!    * `process` ([`process`]): SIGKILL every process of the node (pid file and/or
//!      cgroup), confirm each exited through a pidfd, then wait for the shared
//!      devices' in-flight I/O to drain.
//!    * `agent` ([`agent`]): a ClusterLabs `fence_*` agent, `action=off` confirmed
//!      by `action=status` exiting 2; killed and failed on time-out.
//!    * `manual`: wait for an operator's `Ack` (`mcfs fence ack N`), like
//!      `fence_ack_manual`; optional time-out.
//! 5. On success the record gets SUCCESS, the winning method and
//!    `fence_time_unix_ms` = the moment of confirmation (process: devices drained;
//!    agent: status said OFF; manual: the acknowledgement). In the same sled
//!    transaction the node is marked fenced; both are flushed before any caller can
//!    see SUCCESS. The DLM accepts the fence only if fence time >= F. If every
//!    level fails, the record is FAILED with all attempts; a node fenced earlier
//!    stays fenced. A new request id always runs the levels again (a dead process
//!    or an off outlet just confirms quickly), so a re-fence gets a fresh time.
//! 6. A fenced node stays fenced until `Unfence` (the DLM calls it once the node's
//!    journal is replayed). Unfence of a node that is not fenced is refused
//!    (FAILED_PRECONDITION). Unfence runs `action=on` (confirmed by status 0) for
//!    each agent level with `unfence = true`; if one fails the node stays fenced.
//!    Process and manual levels need no action: the node's daemon is simply
//!    started again by whoever manages it.
//! 7. Restart: records and fenced states are in sled. An operation found PENDING at
//!    start-up was interrupted; it is run again from level 1 under the same request
//!    id (an attempt named `restart` marks the cut). Fencing actions are
//!    idempotent, so repeating them is safe, and the caller's polling simply sees
//!    the outcome later; a fence time is never earlier than the interruption.
//! 8. Start-up refuses bad configuration (malformed TOML, unknown keys, duplicate
//!    or zero node ids, missing or non-executable agents, unreadable pid-file
//!    directories or cgroups, devices that are not block devices) rather than
//!    finding out during a failure.
//!
//! # What `process` fencing guarantees, and what it does not
//!
//! After a SUCCESS from a process level: every process of the node that the pid
//! file or cgroup named has exited (its whole thread group, so io_uring's io-wq and
//! SQPOLL threads too) and can issue no new I/O; and each configured device's
//! in-flight request counter was seen at zero after that, so every request those
//! processes had submitted (including an io_uring ring being torn down after its
//! owner died) has completed. A stopped (SIGSTOP) process is killed as well; it
//! must be, because its queued I/O would otherwise land whenever it is continued.
//!
//! It does not protect against: processes on another host (nothing on this host
//! can stop them); processes outside the configured pid file and cgroup (a helper
//! that escaped the cgroup, a ring fd passed to an unrelated process); a pid file
//! that names a different process than the node (misconfiguration of
//! `expect_cmdline` can make a live node look "already off"); I/O queued beneath
//! the counted layer (a stacked device must be configured as the device the node
//! opened; on kernels that count only driver-tagged requests, requests waiting in
//! an I/O scheduler are not seen: use scheduler `none`, the loop device default);
//! survivors' I/O can keep the counter above zero, in which case the level times
//! out and fails (safe, but slow). Writes that completed are in the device, not
//! necessarily on stable media; that is the journal's business, not fencing's.
//!
//! Real clusters fence with power (IPMI, PDUs: the node stops) or storage (SCSI-3
//! persistent reservations, SAN zoning: the disk refuses the node's writes)
//! because those act outside the failed machine and work when the machine, its
//! kernel or the network to it is wedged. Killing processes relies on the very
//! kernel that may be the one misbehaving; it is right only when every node is a
//! set of processes on this one host, as in tests and the local cluster.
//!
//! # Layout
//! * [`config`]: TOML configuration and its start-up validation.
//! * [`engine`]: operations, levels, idempotency, acks, restart.
//! * [`process`], [`agent`]: the two methods that act on the world.
//! * [`store`]: sled trees for operations, node states and refused calls.
//! * [`service`]: gRPC and authentication. [`error`]: the crate's error type.
//! * [`metrics`]: counters for `GET /metrics` (`--metrics ADDR`).
//!
//! # Bad peers
//!
//! Connections pass `mcfs_dlm::net::listener` (at most `max_connections`, the
//! HTTP/2 preface within `handshake_timeout_ms`); calls are bounded in size
//! (`max_message_bytes`), number per connection (`max_streams_per_connection`)
//! and time (`request_timeout_ms`); request ids, reasons and operator names in
//! length; and a node's queue of operations by `max_pending_ops_per_node`
//! (RESOURCE_EXHAUSTED beyond it). A caller that retries one request id any
//! number of times, concurrently or not, gets the one recorded operation back:
//! a sled read per call, nothing runs twice. Refused calls are counted,
//! logged (rate-limited) and recorded (newest 1000) without a flush per call.

pub mod agent;
pub mod config;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod process;
pub mod service;
pub mod store;

pub use config::Config;
pub use engine::{Engine, FenceArgs};
pub use error::FenceError;
pub use service::FencerService;
