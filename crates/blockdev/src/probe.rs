//! Size and sector size of what we opened.
//!
//! * Block device: size from `BLKGETSIZE64`, sector from `BLKSSZGET` (the logical block
//!   size: the smallest unit the device accepts for O_DIRECT).
//! * Regular file opened with O_DIRECT: sector from `statx(STATX_DIOALIGN)` (the
//!   filesystem's real O_DIRECT offset alignment, Linux 6.1+); a kernel or filesystem
//!   that does not report it gets `st_blksize` (the filesystem block size, which every
//!   filesystem accepts for O_DIRECT), never less than 512.
//! * Regular file without O_DIRECT: 512, the smallest sector of any real disk, so an
//!   image made on a file works on any device it is later copied to.
//!
//! A regular file's size is rounded down to a whole sector. Sizes are read once at open:
//! a device resized later (`losetup -c`) keeps its old size until reopened, and the
//! kernel then reports I/O past its new end as an error.

use crate::error::Error;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// `_IOR(0x12, 114, size_t)`: not exported by the libc crate.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    BlockDevice,
    RegularFile,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub size: u64,
    pub sector: u32,
    /// Memory alignment O_DIRECT needs; 1 for buffered I/O.
    pub mem_align: u32,
    pub kind: DeviceKind,
}

fn open_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Open {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Refuse anything but a block device or a regular file before opening it, so that a
/// character device or directory gets a clear error instead of open(2)'s EINVAL.
pub(crate) fn check_kind(path: &Path) -> Result<(), Error> {
    match std::fs::metadata(path) {
        Ok(md) if md.file_type().is_block_device() || md.is_file() => Ok(()),
        Ok(_) => Err(Error::NotADevice {
            path: path.to_path_buf(),
        }),
        // Let open() report a missing path or permission problem in its own words.
        Err(_) => Ok(()),
    }
}

pub(crate) fn probe(
    file: &File,
    path: &Path,
    direct: bool,
    sector_override: Option<u32>,
) -> Result<Geometry, Error> {
    let md = file.metadata().map_err(open_err(path, "fstat"))?;
    let ft = md.file_type();
    let fd = file.as_raw_fd();
    let (kind, size, detected) = if ft.is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        if unsafe { libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64) } < 0 {
            return Err(open_err(path, "ioctl BLKGETSIZE64")(io::Error::last_os_error()));
        }
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer.
        if unsafe { libc::ioctl(fd, libc::BLKSSZGET as _, &mut ssz as *mut libc::c_int) } < 0 {
            return Err(open_err(path, "ioctl BLKSSZGET")(io::Error::last_os_error()));
        }
        let ssz = u32::try_from(ssz).unwrap_or(512).max(512);
        (DeviceKind::BlockDevice, size, ssz)
    } else if ft.is_file() {
        let sector = if direct {
            let (offset_align, _) = dio_align(file);
            match offset_align {
                Some(a) => a.max(512),
                None => {
                    use std::os::unix::fs::MetadataExt;
                    u32::try_from(md.blksize()).unwrap_or(4096).max(512)
                }
            }
        } else {
            512
        };
        (DeviceKind::RegularFile, md.len(), sector)
    } else {
        return Err(Error::NotADevice {
            path: path.to_path_buf(),
        });
    };
    if !detected.is_power_of_two() {
        return Err(Error::InvalidOption(format!(
            "{}: detected sector size {detected} is not a power of two",
            path.display()
        )));
    }
    let sector = match sector_override {
        None => detected,
        Some(s) if s.is_power_of_two() && s >= detected => s,
        Some(s) => {
            return Err(Error::InvalidOption(format!(
                "sector size {s} for {}: must be a power of two and at least the device's \
                 {detected}-byte sector",
                path.display()
            )))
        }
    };
    let mem_align = if direct {
        let (_, mem) = dio_align(file);
        mem.unwrap_or(sector).max(sector)
    } else {
        1
    };
    Ok(Geometry {
        size: size - size % u64::from(sector),
        sector,
        mem_align,
        kind,
    })
}

/// `(dio_offset_align, dio_mem_align)` from statx, when the kernel and filesystem say.
fn dio_align(file: &File) -> (Option<u32>, Option<u32>) {
    // SAFETY: statx fills the zeroed struct; an empty path with AT_EMPTY_PATH means fd.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return (None, None);
    }
    let nz = |v: u32| (v != 0).then_some(v);
    (nz(stx.stx_dio_offset_align), nz(stx.stx_dio_mem_align))
}
