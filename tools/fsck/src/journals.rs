//! Pass 1: journals. Each journal's head is found with the node's own
//! `recovery::find_head`. A dirty journal is replayed with `recovery::replay`
//! before any other pass, exactly as the next mount would: with `-y` on the
//! device itself, with `-n` into the overlay (so the report describes the
//! filesystem as it will be once replayed, and the device is not touched). A
//! journal with no valid commit block at all is reset to an empty, clean one.

use mcfs_blockdev::BlockDevice;
use mcfs_node::icache::budget::Budget;
use mcfs_node::recovery;

use crate::report::{JournalState, Kind};
use crate::{Ctx, Result};

/// Replay reads whole journal windows; its memory is charged to this budget.
const REPLAY_BUDGET: u64 = 256 << 20;

pub fn check(ctx: &mut Ctx<'_>, dev: &dyn BlockDevice) -> Result<Vec<JournalState>> {
    let budget = Budget::new(REPLAY_BUDGET);
    let n = ctx.g.journal_count;
    let mut out = Vec::new();
    for slot in 0..n {
        ctx.progress("journals", slot as u64, n as u64);
        let start = ctx.g.journal_block(slot);
        match recovery::find_head(&ctx.io, &ctx.sb, slot, &budget) {
            Ok(info) if info.clean => out.push(JournalState { slot, state: "clean", head_seq: info.head_seq, transactions_replayed: 0, blocks_replayed: 0 }),
            Ok(info) => {
                // -y: the replay lands on the device before anything else is
                // read; -n: in the overlay only.
                let (r, _) = if ctx.repair { recovery::replay(dev, &ctx.sb, slot, &budget, 0)? } else { recovery::replay(&ctx.io, &ctx.sb, slot, &budget, 0)? };
                let torn = r.stopped_early.as_deref().map(|w| format!("; replay stopped early: {w}")).unwrap_or_default();
                let verb = if ctx.repair { "replayed" } else { "would be replayed (checked as if they were)" };
                ctx.find(
                    Kind::Journal,
                    None,
                    Some(start + info.head_pos as u64),
                    true,
                    format!(
                        "journal {slot} is dirty (head sequence {} at position {}, tail {} at {}, last written by node {}): {} transactions, {} blocks {verb}{torn}",
                        info.head_seq, info.head_pos, info.tail_seq, info.tail_pos, info.writer_node, r.transactions, r.blocks_replayed
                    ),
                );
                out.push(JournalState { slot, state: "dirty", head_seq: info.head_seq, transactions_replayed: r.transactions, blocks_replayed: r.blocks_replayed });
            }
            Err(mcfs_node::FsError::Corrupt(e)) => {
                // No commit block verifies: nothing can be replayed from it. An
                // empty clean journal lets nodes mount and use it again.
                recovery::write_clean_commit(&ctx.io, &ctx.sb, slot, 0, 1, 0)?;
                ctx.find(Kind::Journal, None, Some(start), true, format!("journal {slot} has no valid commit block ({e}): reset to an empty journal"));
                out.push(JournalState { slot, state: "corrupt", head_seq: 0, transactions_replayed: 0, blocks_replayed: 0 });
            }
            Err(e) => return Err(e.into()),
        }
    }
    ctx.progress("journals", n as u64, n as u64);
    Ok(out)
}
