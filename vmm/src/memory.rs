//! Guest RAM: one anonymous mapping (registered with KVM as up to three
//! memory slots, the kernel's text and read-only data read-only: see
//! [`crate::vm::Vm::new`]), and typed, bounds-checked access to it.
//!
//! Everything the VMM reads from the guest goes through [`GuestRam::read`] or
//! [`GuestRam::read_bytes`]: values are copied out (never referenced in place)
//! and decoded with zerocopy, so a hostile guest can make a read fail but can
//! never make the VMM misbehave.
//!
//! Everything the VMM writes goes through [`GuestRam::write_bytes`], which
//! marks the pages it writes for [`crate::write_log`] (the checker's record
//! of which free frames can have changed). [`GuestRam::memory`] is for the
//! kernel loader only, before the guest first runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use superos_protocol::layout::{MAX_GUEST_MEMORY, MIN_GUEST_MEMORY, PAGE_SIZE};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Errors creating or accessing guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The requested size is not acceptable.
    #[error("guest memory of {mib} MiB is not allowed: use a multiple of 2 MiB from {} to {} MiB", MIN_GUEST_MEMORY >> 20, MAX_GUEST_MEMORY >> 20)]
    BadSize {
        /// The size asked for, in MiB.
        mib: u64,
    },
    /// The host could not allocate it.
    #[error("could not allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        /// Size in MiB.
        mib: u64,
        /// Why.
        source: vm_memory::mmap::FromRangesError,
    },
    /// A guest-physical range is outside guest RAM.
    #[error("guest-physical range {gpa:#x}+{len:#x} is outside guest memory")]
    OutOfBounds {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
    },
}

/// Guest RAM, starting at guest-physical address 0. A clone is another
/// handle to the same memory (the mapping lives until the last handle is
/// dropped); the control socket uses one to read a held guest.
#[derive(Clone, Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    size: u64,
    /// One bit per page written through [`GuestRam::write_bytes`] since the
    /// last [`GuestRam::take_written`] (shared by every handle).
    written: Arc<[AtomicU64]>,
}

impl GuestRam {
    /// Allocates `mib` MiB of zeroed guest RAM after validating the size.
    pub fn new(mib: u64) -> Result<Self, MemoryError> {
        let size = mib.checked_mul(1 << 20).ok_or(MemoryError::BadSize { mib })?;
        if !(MIN_GUEST_MEMORY..=MAX_GUEST_MEMORY).contains(&size) || size % (2 << 20) != 0 {
            return Err(MemoryError::BadSize { mib });
        }
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|source| MemoryError::Allocate { mib, source })?;
        let words = (size / PAGE_SIZE).div_ceil(64) as usize;
        let written = (0..words).map(|_| AtomicU64::new(0)).collect();
        Ok(GuestRam { memory, size, written })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The vm-memory object (for linux-loader).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Host virtual address of guest-physical 0 (for the KVM memory slot).
    pub fn host_address(&self) -> *mut u8 {
        self.memory.get_host_address(GuestAddress(0)).expect("address 0 is inside guest RAM")
    }

    /// True if `[gpa, gpa + len)` lies inside guest RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), MemoryError> {
        if self.contains(gpa, len as u64) {
            Ok(())
        } else {
            Err(MemoryError::OutOfBounds { gpa, len: len as u64 })
        }
    }

    /// Copies guest bytes at `gpa` into `buffer`.
    pub fn read_bytes(&self, gpa: u64, buffer: &mut [u8]) -> Result<(), MemoryError> {
        self.check(gpa, buffer.len())?;
        self.memory
            .read_slice(buffer, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfBounds { gpa, len: buffer.len() as u64 })
    }

    /// Copies `bytes` into guest memory at `gpa` (and marks the pages
    /// written, before writing: a harvest in between sees the page again
    /// later, never misses it).
    pub fn write_bytes(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        self.check(gpa, bytes.len())?;
        if !bytes.is_empty() {
            let last = (gpa + bytes.len() as u64 - 1) / PAGE_SIZE;
            for page in gpa / PAGE_SIZE..=last {
                self.written[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::SeqCst);
            }
        }
        self.memory
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfBounds { gpa, len: bytes.len() as u64 })
    }

    /// The pages written through [`GuestRam::write_bytes`] since the last
    /// call (bit `i` of word `w`: page `64 * w + i`), forgotten here.
    pub fn take_written(&self) -> Vec<u64> {
        self.written.iter().map(|word| word.swap(0, Ordering::SeqCst)).collect()
    }

    /// Reads a plain-data value at `gpa`.
    pub fn read<T: FromBytes>(&self, gpa: u64) -> Result<T, MemoryError> {
        let mut buffer = vec![0u8; core::mem::size_of::<T>()];
        self.read_bytes(gpa, &mut buffer)?;
        Ok(T::read_from_bytes(&buffer).expect("buffer has exactly the size of T"))
    }

    /// Writes a plain-data value at `gpa`.
    pub fn write<T: IntoBytes + Immutable>(&self, gpa: u64, value: &T) -> Result<(), MemoryError> {
        self.write_bytes(gpa, value.as_bytes())
    }

    /// Reads a little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        self.read::<u64>(gpa)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_validated() {
        assert!(matches!(GuestRam::new(0), Err(MemoryError::BadSize { mib: 0 })));
        assert!(matches!(GuestRam::new(15), Err(MemoryError::BadSize { .. })));
        assert!(matches!(GuestRam::new(33), Err(MemoryError::BadSize { .. })));
        assert!(matches!(GuestRam::new(4096), Err(MemoryError::BadSize { .. })));
        assert!(matches!(GuestRam::new(u64::MAX), Err(MemoryError::BadSize { .. })));
        let message = GuestRam::new(15).unwrap_err().to_string();
        assert_eq!(
            message,
            "guest memory of 15 MiB is not allowed: use a multiple of 2 MiB from 16 to 3072 MiB"
        );
        assert_eq!(GuestRam::new(16).unwrap().size(), 16 << 20);
    }

    #[test]
    fn accesses_are_bounds_checked() {
        let ram = GuestRam::new(16).unwrap();
        let end = ram.size();
        ram.write(end - 8, &0x1122_3344_5566_7788u64).unwrap();
        assert_eq!(ram.read_u64(end - 8).unwrap(), 0x1122_3344_5566_7788);
        assert!(matches!(ram.read_u64(end - 4), Err(MemoryError::OutOfBounds { .. })));
        assert!(matches!(ram.read_u64(u64::MAX - 2), Err(MemoryError::OutOfBounds { .. })));
        assert!(ram.write_bytes(end, &[1]).is_err());
        assert!(!ram.contains(u64::MAX, 2));
    }
}
