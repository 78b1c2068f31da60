//! [`FileDevice`]: plain buffered pread/pwrite. For tools working on image files where
//! the page cache is welcome (and for filesystems without O_DIRECT); never for a device
//! another node shares.

use crate::error::{check_request, Error, IoOp};
use crate::probe::{check_kind, probe, DeviceKind, Geometry};
use crate::BlockDevice;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

#[derive(Debug)]
pub struct FileDevice {
    file: File,
    geo: Geometry,
    read_only: bool,
}

impl FileDevice {
    /// Open an image or block device. The sector is the block device's logical sector,
    /// or 512 for a regular file (or `sector_size` if given: a power of two at least that).
    pub fn open(
        path: impl AsRef<Path>,
        read_only: bool,
        sector_size: Option<u32>,
    ) -> Result<FileDevice, Error> {
        let path = path.as_ref();
        check_kind(path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                what: "open",
                source,
            })?;
        let geo = probe(&file, path, false, sector_size)?;
        Ok(FileDevice {
            file,
            geo,
            read_only,
        })
    }

    pub fn kind(&self) -> DeviceKind {
        self.geo.kind
    }

    fn check(&self, op: IoOp, offset: u64, len: usize) -> Result<(), Error> {
        if op == IoOp::Write && self.read_only {
            return Err(Error::ReadOnly { op, offset });
        }
        check_request(op, offset, len as u64, self.geo.sector, self.geo.size)
    }

    fn result(op: IoOp, offset: u64, len: usize, r: io::Result<usize>) -> Result<(), Error> {
        match r {
            Ok(done) if done == len => Ok(()),
            Ok(done) => Err(Error::ShortIo {
                op,
                offset,
                len: len as u64,
                done: done as u64,
            }),
            Err(source) => Err(Error::Io { op, offset, source }),
        }
    }
}

/// pread until done, EOF or error; returns bytes transferred.
fn read_full(f: &File, mut off: u64, mut buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while !buf.is_empty() {
        match f.read_at(buf, off) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as u64;
                buf = &mut buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn write_full(f: &File, mut off: u64, mut buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while !buf.is_empty() {
        match f.write_at(buf, off) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as u64;
                buf = &buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.geo.size
    }

    fn sector_size(&self) -> u32 {
        self.geo.sector
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.check(IoOp::Read, offset, buf.len())?;
        let len = buf.len();
        FileDevice::result(IoOp::Read, offset, len, read_full(&self.file, offset, buf))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        self.check(IoOp::Write, offset, buf.len())?;
        FileDevice::result(
            IoOp::Write,
            offset,
            buf.len(),
            write_full(&self.file, offset, buf),
        )
    }

    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), Error> {
        for (off, b) in reqs.iter() {
            self.check(IoOp::Read, *off, b.len())?;
        }
        let mut first = None;
        for (off, b) in reqs.iter_mut() {
            if let Err(e) = self.read_at(*off, b) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<(), Error> {
        for (off, b) in reqs {
            self.check(IoOp::Write, *off, b.len())?;
        }
        let mut first = None;
        for (off, b) in reqs {
            if let Err(e) = self.write_at(*off, b) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn flush(&self) -> Result<(), Error> {
        self.file.sync_data().map_err(|source| Error::Io {
            op: IoOp::Flush,
            offset: 0,
            source,
        })
    }
}
