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
use crate::glock::{BackendGrant, LockBackend, LockError, LockName, MaySleep, Mode};

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
}

impl DlmBackend {
    pub fn new(client: DlmClient, rt: tokio::runtime::Handle) -> DlmBackend {
        DlmBackend { client, rt }
    }
}

impl LockBackend for DlmBackend {
    fn lock(&self, res: &[u8], mode: Mode, flags: u32) -> Result<BackendGrant, LockError> {
        let g = self.rt.block_on(self.client.lock(res, to_dlm(mode), flags)).map_err(err)?;
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

/// Serve the lock server's events until the channel closes.
pub async fn run_events(mut rx: tokio::sync::mpsc::UnboundedReceiver<ClientEvent>, fs: Arc<std::sync::OnceLock<Arc<Fs>>>, client: DlmClient) {
    let mut early: Vec<ClientEvent> = Vec::new();
    while let Some(ev) = rx.recv().await {
        let Some(fs) = fs.get().cloned() else {
            // not mounted yet: recovery requests wait for the mount
            early.push(ev);
            continue;
        };
        for ev in early.drain(..).chain(std::iter::once(ev)) {
            handle(&fs, &client, ev);
        }
    }
}

fn handle(fs: &Arc<Fs>, client: &DlmClient, ev: ClientEvent) {
    match ev {
        ClientEvent::Blocking { lock_id, resource, mode } => fs.glocks.blocking_callback(lock_id, &resource, from_dlm(mode)),
        ClientEvent::Recovery(r) => {
            tracing::info!(node = r.node_id, journal = r.journal, state = ?r.state, "recovery event");
            if r.state == mcfs_dlm::core::recovery::RecoveryState::NeedsReplay && r.journal >= 0 && r.node_id != fs.node_id {
                let fs = fs.clone();
                let client = client.clone();
                let rt = tokio::runtime::Handle::current();
                let _ = std::thread::Builder::new().name(format!("recover-j{}", r.journal)).spawn(move || recover(&fs, &client, &rt, r.node_id, r.journal as u32));
            }
        }
        ClientEvent::SessionLost(why) => fs.withdraw(&format!("lock server session lost: {why}")),
        ClientEvent::Reconnected => tracing::info!("lock server restarted; every lock reclaimed"),
    }
}

/// Replay a failed node's journal (survivor side).
fn recover(fs: &Arc<Fs>, client: &DlmClient, rt: &tokio::runtime::Handle, node: u32, journal: u32) {
    if journal >= fs.geo.journal_count {
        tracing::error!(node, journal, "recovery names a journal this filesystem does not have");
        return;
    }
    let Some(ms) = MaySleep::new() else { return };
    let t0 = std::time::Instant::now();
    let name = LockName::Journal(journal);
    let h = match fs.glocks.acquire_noexp(name, Mode::EX, &ms) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(node, journal, "cannot take the journal lock for recovery: {e}");
            return;
        }
    };
    fs.set_recovery_progress(node, journal, "replaying");
    let res = crate::recovery::replay(fs.dev.as_ref(), &fs.sb, journal, &fs.budget, fs.node_id);
    match res {
        Ok((report, _)) => {
            let was_clean = report.was_clean;
            tracing::info!(node, journal, replayed = report.blocks_replayed, ms = t0.elapsed().as_millis() as u64, was_clean, "journal of failed node replayed");
            fs.note_replay(report);
            // reported while we still hold the journal lock: the DLM checks that
            match rt.block_on(client.recovery_done(node, journal as i32)) {
                Ok(()) => fs.set_recovery_progress(node, journal, "done"),
                Err(e) => {
                    tracing::info!(node, journal, "recovery done not accepted (another survivor finished first): {e}");
                    fs.set_recovery_progress(node, journal, "done by another node");
                }
            }
        }
        Err(e) => {
            fs.set_recovery_progress(node, journal, "failed");
            fs.withdraw(&format!("replay of journal {journal} (node {node}) failed: {e}"));
        }
    }
    drop(h);
    fs.glocks.unlock_idle(name);
}
