//! The six lock modes, their compatibility matrix, and the request flags.
//!
//! Tables are those of the Linux DLM (`fs/dlm/lock.c`, `dlmconstants.h`), indexed
//! by mode (NL=0 .. EX=5). "Granted mode" is the row, "requested mode" the column.

use serde::{Deserialize, Serialize};

/// A lock mode, weakest to strongest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[repr(u8)]
pub enum Mode {
    /// Null: holds the resource (and its LVB) without any access.
    NL = 0,
    /// Concurrent read.
    CR = 1,
    /// Concurrent write.
    CW = 2,
    /// Protected read (shared).
    PR = 3,
    /// Protected write (update, readers of CR allowed).
    PW = 4,
    /// Exclusive.
    EX = 5,
}

/// `__dlm_compat_matrix` without the UN/PD rows.
const COMPAT: [[bool; 6]; 6] = [
    //  NL    CR     CW     PR     PW     EX
    [true, true, true, true, true, true],      // NL
    [true, true, true, true, true, false],     // CR
    [true, true, true, false, false, false],   // CW
    [true, true, false, true, false, false],   // PR
    [true, true, false, false, false, false],  // PW
    [true, false, false, false, false, false], // EX
];

/// `__quecvt_compat_matrix`: conversions for which QUECVT is valid (up-conversions).
const QUECVT_OK: [[bool; 6]; 6] = [
    [false, true, true, true, true, true],
    [false, false, true, true, true, true],
    [false, false, false, true, true, true],
    [false, false, true, false, true, true],
    [false, false, false, false, false, true],
    [false, false, false, false, false, false],
];

/// What a grant in a mode does to the lock value block (`dlm_lvb_operations`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LvbOp {
    /// Nothing to read or write.
    None,
    /// The holder receives the resource's LVB.
    Read,
    /// The holder's LVB (sent with the request) replaces the resource's.
    Write,
}

impl Mode {
    pub const ALL: [Mode; 6] = [Mode::NL, Mode::CR, Mode::CW, Mode::PR, Mode::PW, Mode::EX];

    /// May a lock granted in `self` coexist with a lock granted in `other`?
    /// (The matrix is symmetric.)
    pub fn compatible(self, other: Mode) -> bool {
        COMPAT[self as usize][other as usize]
    }

    /// Is QUECVT allowed when converting from `self` to `to`?
    pub fn quecvt_allowed(self, to: Mode) -> bool {
        QUECVT_OK[self as usize][to as usize]
    }

    /// Converting `self` -> `to` never needs to wait: everything compatible with
    /// `self` is also compatible with `to` (down-conversions, and `to == self`).
    pub fn is_weakening_to(self, to: Mode) -> bool {
        Mode::ALL.iter().all(|&m| !self.compatible(m) || to.compatible(m))
    }

    /// LVB operation of a grant from `from` (None = a new lock) to `to`.
    pub fn lvb_op(from: Option<Mode>, to: Mode) -> LvbOp {
        match from {
            None => LvbOp::Read,
            Some(Mode::PW) if to < Mode::EX => LvbOp::Write,
            Some(Mode::EX) => LvbOp::Write,
            Some(f) if to >= f && f != Mode::PW => LvbOp::Read,
            Some(Mode::PW) => LvbOp::Read,
            Some(_) => LvbOp::None,
        }
    }

    /// Does unlocking a lock held in `self` write the LVB (when VALBLK is set)?
    pub fn unlock_writes_lvb(self) -> bool {
        self >= Mode::PW
    }

    pub fn from_u8(v: u8) -> Option<Mode> {
        Mode::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::NL => "NL",
            Mode::CR => "CR",
            Mode::CW => "CW",
            Mode::PR => "PR",
            Mode::PW => "PW",
            Mode::EX => "EX",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Request flags, bit values as in `proto/dlm.proto` `LockFlag`.
pub mod flags {
    pub const NOQUEUE: u32 = 1;
    pub const CONVERT: u32 = 4;
    pub const VALBLK: u32 = 8;
    pub const QUECVT: u32 = 16;
    pub const CONVDEADLK: u32 = 64;
    pub const NOQUEUEBAST: u32 = 128;
    pub const ALTPR: u32 = 256;
    pub const ALTCW: u32 = 512;
    pub const NOEXP: u32 = 1024;
    /// Every flag this server understands.
    pub const ALL: u32 = NOQUEUE | CONVERT | VALBLK | QUECVT | CONVDEADLK | NOQUEUEBAST | ALTPR | ALTCW | NOEXP;

    /// Names of the set bits, for dumps.
    pub fn names(f: u32) -> Vec<&'static str> {
        let table = [
            (NOQUEUE, "NOQUEUE"),
            (CONVERT, "CONVERT"),
            (VALBLK, "VALBLK"),
            (QUECVT, "QUECVT"),
            (CONVDEADLK, "CONVDEADLK"),
            (NOQUEUEBAST, "NOQUEUEBAST"),
            (ALTPR, "ALTPR"),
            (ALTCW, "ALTCW"),
            (NOEXP, "NOEXP"),
        ];
        table.iter().filter(|(b, _)| f & b != 0).map(|(_, n)| *n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_is_symmetric_and_matches_the_standard_table() {
        for a in Mode::ALL {
            for b in Mode::ALL {
                assert_eq!(a.compatible(b), b.compatible(a), "{a} {b}");
            }
        }
        // Spot checks everyone knows by heart.
        assert!(Mode::PR.compatible(Mode::PR));
        assert!(!Mode::PR.compatible(Mode::CW));
        assert!(Mode::CW.compatible(Mode::CW));
        assert!(Mode::PW.compatible(Mode::CR));
        assert!(!Mode::PW.compatible(Mode::PW));
        assert!(Mode::EX.compatible(Mode::NL));
        assert!(!Mode::EX.compatible(Mode::CR));
        let compatible_pairs = Mode::ALL
            .iter()
            .flat_map(|a| Mode::ALL.iter().map(move |b| (a, b)))
            .filter(|(a, b)| a.compatible(**b))
            .count();
        assert_eq!(compatible_pairs, 20, "table changed");
    }

    #[test]
    fn weakening_is_down_conversion() {
        use Mode::*;
        assert!(EX.is_weakening_to(NL) && EX.is_weakening_to(PR) && EX.is_weakening_to(PW));
        assert!(PW.is_weakening_to(CW) && PW.is_weakening_to(PR) && PW.is_weakening_to(CR));
        assert!(PR.is_weakening_to(CR) && !PR.is_weakening_to(CW) && !CW.is_weakening_to(PR));
        assert!(!NL.is_weakening_to(CR));
        for m in Mode::ALL {
            assert!(m.is_weakening_to(m));
            assert!(m.is_weakening_to(NL));
        }
    }

    #[test]
    fn lvb_operations_follow_dlm_table() {
        use Mode::*;
        for m in Mode::ALL {
            assert_eq!(Mode::lvb_op(None, m), LvbOp::Read);
            assert_eq!(Mode::lvb_op(Some(NL), m), LvbOp::Read);
            assert_eq!(Mode::lvb_op(Some(EX), m), LvbOp::Write);
        }
        assert_eq!(Mode::lvb_op(Some(PW), EX), LvbOp::Read);
        assert_eq!(Mode::lvb_op(Some(PW), PR), LvbOp::Write);
        assert_eq!(Mode::lvb_op(Some(PW), NL), LvbOp::Write);
        assert_eq!(Mode::lvb_op(Some(PR), EX), LvbOp::Read);
        assert_eq!(Mode::lvb_op(Some(PR), CR), LvbOp::None);
        assert_eq!(Mode::lvb_op(Some(CW), CR), LvbOp::None);
        assert_eq!(Mode::lvb_op(Some(CR), CR), LvbOp::Read);
    }
}
