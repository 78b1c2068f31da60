//! [`MemDevice`]: a device in memory, for unit tests and for images built in memory.

use crate::error::{check_request, Error, IoOp};
use crate::BlockDevice;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// An in-memory device. Writes are immediately "durable" (there is nothing to lose);
/// use [`RecordingDevice`](crate::RecordingDevice) to test crashes.
#[derive(Debug)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    sector: u32,
}

impl MemDevice {
    /// A zeroed device of `size` bytes (rounded down to whole sectors). `sector` is
    /// rounded up to a power of two.
    pub fn new(size: u64, sector: u32) -> MemDevice {
        MemDevice::from_vec(vec![0; size as usize], sector)
    }

    /// A device holding `data` (truncated to whole sectors).
    pub fn from_vec(mut data: Vec<u8>, sector: u32) -> MemDevice {
        let sector = sector.max(1).next_power_of_two();
        let whole = data.len() - data.len() % sector as usize;
        data.truncate(whole);
        MemDevice {
            data: RwLock::new(data),
            sector,
        }
    }

    /// A copy of the contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.read().clone()
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, op: IoOp, offset: u64, len: usize) -> Result<(), Error> {
        check_request(op, offset, len as u64, self.sector, self.size())
    }
}

impl Clone for MemDevice {
    fn clone(&self) -> MemDevice {
        MemDevice::from_vec(self.to_vec(), self.sector)
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.read().len() as u64
    }

    fn sector_size(&self) -> u32 {
        self.sector
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.check(IoOp::Read, offset, buf.len())?;
        let o = offset as usize;
        buf.copy_from_slice(&self.read()[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        self.check(IoOp::Write, offset, buf.len())?;
        let o = offset as usize;
        self.write()[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), Error> {
        for (off, b) in reqs.iter() {
            self.check(IoOp::Read, *off, b.len())?;
        }
        let data = self.read();
        for (off, b) in reqs.iter_mut() {
            let o = *off as usize;
            b.copy_from_slice(&data[o..o + b.len()]);
        }
        Ok(())
    }

    fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<(), Error> {
        for (off, b) in reqs {
            self.check(IoOp::Write, *off, b.len())?;
        }
        let mut data = self.write();
        for (off, b) in reqs {
            let o = *off as usize;
            data[o..o + b.len()].copy_from_slice(b);
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
}
