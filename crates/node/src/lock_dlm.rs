//! The mcfs-dlm backend of the glock layer (GFS2's lock_dlm.c), and the handler
//! of the lock server's events: blocking callbacks go to the glock table,
//! recovery requests start a journal replay, a lost session withdraws the node.
//!
//! Recovery as seen from a survivor:
//! 1. The DLM reports node N failed, then fenced: NEEDS_REPLAY for journal J.
//! 2. Every survivor asks for `journal/J` in EX with NOEXP (granted although
//!    the dead node still holds it, because the DLM knows N is fenced). The
//!    first one granted replays J; the others get it afterwards, find the journal
//!    clean, and do nothing.
//! 3. The replayer unlocks `journal/J` at once (the restarted node will want
//!    it) and reports RecoveryDone; the DLM then releases N's other locks.

use std::sync::Arc;

use mcfs_dlm::{ClientEvent, DlmClient};

use crate::fs::Fs;
use crate::glock::{BackendGrant, LockBackend, LockError, Mode};

fn to_dlm(m: Mode) -> mcfs_dlm::Mode {
    match m {
        Mode::NL => mcfs_dlm::Mode::NL,
        Mode::CR => mcfs_dlm::Mode::CR,
        Mode::CW => mcfs_dlm::Mode::CW,
        Mode::PR => mcfs_dlm::Mode::PR,
        Mode::PW => mcfs_dlm::Mode::PW,
        Mode::EX => mcfs_dlm::Mode::EX,
    }
}

pub fn from_dlm(m: mcfs_dlm::Mode) -> Mode {
    match m {
        mcfs_dlm::Mode::NL => Mode::NL,
        mcfs_dlm::Mode::CR => Mode::CR,
        mcfs_dlm::Mode::CW => Mode::CW,
        mcfs_dlm::Mode::PR => Mode::PR,
        mcfs_dlm::Mode::PW => Mode::PW,
        mcfs_dlm::Mode::EX => Mode::EX,
    }
}

fn err(e: mcfs_dlm::Error) -> LockError {
    match e {
        mcfs_dlm::Error::WouldBlock => LockError::WouldBlock,
        other => LockError::Failed(other.to_string()),
    }
}

pub struct DlmBackend {
    pub client: DlmClient,
    rt: tokio::runtime::Handle,
    /// Until when try-locks fail at once (the lock server did not answer).
    silent_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// None: a try-lock waits for the lock server's answer however long it
    /// takes (GFS2's behaviour, kept with `--evict=sync`).
    try_timeout: Option<std::time::Duration>,
}

impl DlmBackend {
    pub fn new(client: DlmClient, rt: tokio::runtime::Handle, try_timeout: Option<std::time::Duration>) -> DlmBackend {
        DlmBackend { client, rt, silent_until: std::sync::Mutex::new(None), try_timeout }
    }
}

/// A try-lock waits this long for the lock manager's answer at most: a hung or
/// unreachable lock server must not make a NOQUEUE request (memory reclaim's
/// only kind) sleep. Past it the request counts as "would block" (the client
/// cancels it, and unlocks it if it was granted anyway).
pub const TRY_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(20);
/// After a try-lock timed out, try-locks fail at once for this long: memory
/// reclaim meeting a hung lock server pays one timeout a second, not one per
/// inode.
pub const TRY_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

impl LockBackend for DlmBackend {
    fn lock(&self, res: &[u8], mode: Mode, flags: u32) -> Result<BackendGrant, LockError> {
        let g = if let (true, Some(limit)) = (flags & mcfs_dlm::flags::NOQUEUE != 0, self.try_timeout) {
            let now = std::time::Instant::now();
            if self.silent_until.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|t| now < t) {
                return Err(LockError::WouldBlock);
            }
            match self.rt.block_on(async { tokio::time::timeout(limit, self.client.lock(res, to_dlm(mode), flags)).await }) {
                Ok(r) => r.map_err(err)?,
                Err(_) => {
                    *self.silent_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(now + TRY_BACKOFF);
                    tracing::warn!("the lock server did not answer a try-lock within {limit:?}; try-locks fail for {TRY_BACKOFF:?}");
                    return Err(LockError::WouldBlock);
                }
            }
        } else {
            self.rt.block_on(self.client.lock(res, to_dlm(mode), flags)).map_err(err)?
        };
        Ok(BackendGrant { id: g.lock_id, lvb: g.lvb.unwrap_or_default(), lvb_valid: g.lvb_valid })
    }
    fn convert(&self, id: u64, mode: Mode, flags: u32) -> Result<BackendGrant, LockError> {
        let g = self.rt.block_on(self.client.convert(id, to_dlm(mode), flags)).map_err(err)?;
        Ok(BackendGrant { id: g.lock_id, lvb: g.lvb.unwrap_or_default(), lvb_valid: g.lvb_valid })
    }
    fn unlock(&self, id: u64, lvb: Option<&[u8]>) -> Result<(), LockError> {
        self.rt.block_on(self.client.unlock(id, lvb)).map_err(err)
    }
    fn kind(&self) -> &'static str {
        "dlm"
    }
}

/// What recovery needs when the filesystem is not mounted yet (a node that
/// joins while recoveries are pending must be able to do them: the lockspace
/// may be paused until they are done, and so would its own mount).
pub struct RecoveryCtx {
    pub dev: Arc<dyn mcfs_blockdev::BlockDevice>,
    pub sb: mcfs_format::sb::Superblock,
    pub node_id: u32,
    pub budget: Arc<crate::icache::budget::Budget>,
}

/// Serve the lock server's events until the channel closes.
pub async fn run_events(mut rx: tokio::sync::mpsc::UnboundedReceiver<ClientEvent>, fs: Arc<std::sync::OnceLock<Arc<Fs>>>, client: DlmClient, ctx: Arc<RecoveryCtx>) {
    let mut early: Vec<ClientEvent> = Vec::new();
    while let Some(ev) = rx.recv().await {
        if let ClientEvent::Recovery(r) = &ev {
            tracing::info!(node = r.node_id, journal = r.journal, state = ?r.state, "recovery event");
            let mounted = fs.get().cloned();
            let ours = mounted.as_ref().is_some_and(|f| f.node_id == r.node_id);
            if r.state == mcfs_dlm::core::recovery::RecoveryState::NeedsReplay && r.journal >= 0 && !ours {
                let (client, ctx, rt) = (client.clone(), ctx.clone(), tokio::runtime::Handle::current());
                let (node, journal) = (r.node_id, r.journal as u32);
                let _ = std::thread::Builder::new().name(format!("recover-j{journal}")).spawn(move || recover(&ctx, mounted.as_ref(), &client, &rt, node, journal));
            }
            continue;
        }
        let Some(f) = fs.get().cloned() else {
            // not mounted yet: callbacks wait for the glock table
            early.push(ev);
            continue;
        };
        for ev in early.drain(..).chain(std::iter::once(ev)) {
            match ev {
                ClientEvent::Blocking { lock_id, resource, mode } => f.glocks.blocking_callback(lock_id, &resource, from_dlm(mode)),
                ClientEvent::SessionLost(why) => f.withdraw(&format!("lock server session lost: {why}")),
                ClientEvent::Reconnected => tracing::info!("lock server restarted; every lock reclaimed"),
                ClientEvent::Recovery(_) => {}
            }
        }
    }
}

/// Replay a failed node's journal (survivor side, or a node joining while the
/// recovery is pending). The journal lock is taken with NOEXP directly from the
/// lock manager: it is never cached.
fn recover(ctx: &RecoveryCtx, fs: Option<&Arc<Fs>>, client: &DlmClient, rt: &tokio::runtime::Handle, node: u32, journal: u32) {
    if journal >= ctx.sb.geometry.journal_count {
        tracing::error!(node, journal, "recovery names a journal this filesystem does not have");
        return;
    }
    let t0 = std::time::Instant::now();
    let res = format!("journal/{journal}");
    let grant = match rt.block_on(client.lock(res.as_bytes(), mcfs_dlm::Mode::EX, mcfs_dlm::flags::NOEXP)) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(node, journal, "cannot take the journal lock for recovery: {e}");
            return;
        }
    };
    let progress = |step: &str| {
        if let Some(f) = fs {
            f.set_recovery_progress(node, journal, step);
        }
    };
    progress("replaying");
    let budget = fs.map_or_else(|| ctx.budget.clone(), |f| f.budget.clone());
    match crate::recovery::replay(ctx.dev.as_ref(), &ctx.sb, journal, &budget, ctx.node_id) {
        Ok((report, _)) => {
            let was_clean = report.was_clean;
            tracing::info!(node, journal, replayed = report.blocks_replayed, ms = t0.elapsed().as_millis() as u64, was_clean, "journal of failed node replayed");
            if let Some(f) = fs {
                f.note_replay(report);
            }
            // reported while we still hold the journal lock: the DLM checks that
            match rt.block_on(client.recovery_done(node, journal as i32)) {
                Ok(()) => progress("done"),
                Err(e) => {
                    tracing::info!(node, journal, "recovery done not accepted (another node finished first): {e}");
                    progress("done by another node");
                }
            }
        }
        Err(e) => {
            progress("failed");
            tracing::error!(node, journal, "replay failed: {e}");
            if let Some(f) = fs {
                f.withdraw(&format!("replay of journal {journal} (node {node}) failed: {e}"));
            }
        }
    }
    if let Err(e) = rt.block_on(client.unlock(grant.lock_id, None)) {
        tracing::warn!(journal, "unlocking the journal after recovery: {e}");
    }
    // deallocations the dead node had not finished are now ours to finish
    if let Some(f) = fs {
        f.icache.request_scan();
    }
}
